//! A command's results on standard output.
//!
//! Rules:
//! - Commands print their results with [`outln!`](crate::outln) and
//!   [`out!`](crate::out), never `println!` (which panics when the write fails).
//! - A reader that goes away (`dagrun keys list | head -1`) ends the command
//!   the way it ends `ls` or `grep`: killed by SIGPIPE, quietly. Only a write
//!   to stdout does that: SIGPIPE stays ignored for the rest of the process, so
//!   a write to a closed socket (push, pull, serve, an HSM's network client)
//!   is an error its caller handles.
//! - Any other failure to write (a full disk behind `> file`) is an error
//!   message and exit 1, never a panic.
//! - `dagrun run` prints its progress lines with `engine::report::say`
//!   instead, which drops them: a closed stdout must not stop a run half-way.
//! - A command that has already changed something (`keys rotate`, `keys
//!   forget`, `models promote`, `push` …) reports it with
//!   [`doneln!`](crate::doneln): its exit status says the change was made,
//!   so a reader that went away cannot turn it into a death by SIGPIPE (a
//!   script would take that for a failure and repeat the change); the line
//!   is dropped, and any other write error is a warning on stderr.
//! - `-q` ([`set_quiet`]) silences those reports of a change made
//!   ([`doneln!`](crate::doneln)) and the summary lines commands print when
//!   all went well (`gc`'s, a clean `verify`'s): a cron job mails only what
//!   went wrong. What a command was asked for — a listing, `--json`, a token,
//!   scores, problems found — prints whatever the verbosity.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: see the module's rules.
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

/// Whether `-q` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Write `args` to stdout (see the module's rules).
pub fn print(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        drop(out);
        failed(&e);
    }
}

/// Write the report of a change already made (see the module's rules): never
/// ends the process.
pub fn print_done(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.flush()) {
        drop(out);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = writeln!(std::io::stderr(), "warning: the change was made, but its report could not be written to standard output: {e}");
        }
    }
}

/// A line on stderr about a change being made (`push`'s skipped files,
/// `pull`'s refusals): a closed stderr drops it (never `eprintln!`'s panic,
/// which would turn the command's exit status into 101). Such lines quote
/// file names from the workspace: control characters are shown escaped,
/// never obeyed by the terminal (line breaks kept).
pub fn warn(args: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "{}", crate::util::escape_controls_in_lines(&args.to_string()));
}

/// Standard output as a [`Write`] for a command that streams its results
/// (`predict`, behind a `BufWriter`): a reader that goes away ends the
/// process as with [`outln!`](crate::outln); other errors are returned.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write(buf).inspect_err(end_if_reader_gone)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush().inspect_err(end_if_reader_gone)
    }
}

fn end_if_reader_gone(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        failed(e);
    }
}

fn failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        #[cfg(unix)]
        // SAFETY: SIG_DFL installs no handler code; raise() then delivers
        // SIGPIPE to this thread with its default action (the process ends),
        // as the failed write would have without dagrun ignoring the signal.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    let _ = writeln!(std::io::stderr(), "error: cannot write to standard output: {e}");
    std::process::exit(crate::error::exit::FAILED)
}

/// `println!` for a command's results: see [`crate::util::stdout`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::util::stdout::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::util::stdout::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's results: see [`crate::util::stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::util::stdout::print(format_args!($($arg)*))
    };
}

/// `println!` for the report of a change a command already made (nothing
/// under `-q`): see [`crate::util::stdout`].
#[macro_export]
macro_rules! doneln {
    ($($arg:tt)*) => {
        if !$crate::util::stdout::quiet() {
            $crate::util::stdout::print_done(format_args!("{}\n", format_args!($($arg)*)))
        }
    };
}
