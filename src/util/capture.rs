//! Capturing a child's stdout and stderr into log files that exist only when
//! it writes something.
//!
//! A command's stdout and stderr are pipes; dagrun copies what arrives into
//! `NAME.out` / `NAME.err` in a directory opened without following links
//! ([`Dir`]). A log file is created at the first byte (with
//! [`Dir::create_fresh`]: whatever had the name, a planted symlink or hard
//! link included, is removed first, never written through), so a command that
//! writes nothing to a stream costs no file. On a file system where creating
//! an inode is expensive (ext4 right after mass deletions), the two empty
//! logs per silent `cmd` stage were most of its cost.
//!
//! # Rules
//! - [`Capture::new`] removes the old logs of the name before the command
//!   starts: after a run, a log holds only that run's output, and a stream
//!   the command left silent has no log.
//! - The pipes are read while the child runs ([`Capture::wait`] polls them
//!   beside the child's pidfd), so a command that writes more than a pipe
//!   holds never blocks.
//! - [`Capture::finish`], after the child is reaped, copies what is left. A
//!   process the command left running that still holds a stream keeps its
//!   output copied by a thread until it closes it or dagrun exits (the run
//!   does not wait for it; before, such a process wrote into the log file
//!   directly, also after dagrun had exited).
//! - A log that cannot be written (disk full) does not block the command:
//!   the rest of its output is read and dropped, and the error is returned by
//!   [`Capture::finish`].

use super::nofollow::Dir;
use super::spawn::Child;
use anyhow::{Context, Result, anyhow};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One captured stream: the pipe's read end and its (lazily created) log.
struct Stream {
    pipe: Option<OwnedFd>,
    dir: Arc<Dir>,
    name: String,
    file: Option<File>,
    error: Option<anyhow::Error>,
    /// The last [`TAIL_BYTES`] bytes the command wrote (a failed stage's
    /// message quotes them: never read back from the log, which the command
    /// may have replaced by a FIFO or a link).
    tail: Vec<u8>,
}

/// How much of the end of a stream [`Capture::finish`] keeps for messages.
pub const TAIL_BYTES: usize = 4096;

/// The command's stderr, as [`Capture::finish`] reports it.
#[derive(Debug)]
pub struct StderrLog {
    /// The log file (as shown in messages).
    pub path: std::path::PathBuf,
    /// Its last [`TAIL_BYTES`] bytes, as the command wrote them.
    pub tail: Vec<u8>,
}

/// What one read from a non-blocking pipe found.
enum Pumped {
    /// Everything there was is copied; the pipe is still open.
    Drained,
    /// The writers are gone and everything is copied.
    Eof,
}

impl Stream {
    /// Copy what the pipe holds now into the log (created at the first
    /// byte), without blocking.
    fn pump(&mut self, buf: &mut Vec<u8>) -> Result<Pumped> {
        let Some(fd) = self.pipe.as_ref().map(|p| p.as_raw_fd()) else { return Ok(Pumped::Eof) };
        // Capacity only, never zeroed (most commands write nothing: the read
        // then finds end-of-file); `read` initializes the bytes it returns.
        buf.clear();
        buf.reserve(64 * 1024);
        loop {
            // SAFETY: a valid pipe descriptor and buf.capacity() writable bytes.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.capacity()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => return Ok(Pumped::Drained),
                    _ => return Err(e).with_context(|| format!("cannot read the output of the command for {}", self.dir.path().join(&self.name).display())),
                }
            }
            if n == 0 {
                self.pipe = None;
                return Ok(Pumped::Eof);
            }
            // SAFETY: `read` initialized the first n bytes of the buffer.
            unsafe { buf.set_len(n as usize) };
            self.write(buf);
            buf.clear();
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail.extend_from_slice(&bytes[bytes.len() - TAIL_BYTES..]);
        } else {
            let drop = (self.tail.len() + bytes.len()).saturating_sub(TAIL_BYTES);
            self.tail.drain(..drop);
            self.tail.extend_from_slice(bytes);
        }
        if self.error.is_some() {
            return; // read and dropped: the command must not block on a full pipe
        }
        if self.file.is_none() {
            match self.dir.create_fresh(&self.name, 0o600) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    self.error = Some(e);
                    return;
                }
            }
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(bytes)
        {
            self.error = Some(anyhow::Error::new(e).context(format!("cannot write {}", self.dir.path().join(&self.name).display())));
        }
    }
}

/// A child's stdout and stderr, captured into `NAME.out` and `NAME.err`.
pub struct Capture {
    streams: [Stream; 2],
    /// The write ends, handed to the child (closed here once it started).
    writers: Option<[OwnedFd; 2]>,
    buf: Vec<u8>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a pipe for the command's output");
    }
    // SAFETY: fresh descriptors owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set up a pipe for the command's output");
    }
    Ok((r, w))
}

/// Remove `name` in `dir` if present (not following a link: a link itself is removed).
fn remove_old(dir: &Dir, name: &str) -> Result<()> {
    let c = std::ffi::CString::new(name).map_err(|_| anyhow!("a log name holds a NUL byte"))?;
    // SAFETY: a valid directory descriptor and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e).with_context(|| format!("cannot remove the old log {}", dir.path().join(name).display()));
        }
    }
    Ok(())
}

impl Capture {
    /// Pipes for a child's stdout and stderr, logged as `NAME.out` and
    /// `NAME.err` in `dir`; the old logs of that name are removed.
    pub fn new(dir: Dir, name: &str) -> Result<Capture> {
        let (out_name, err_name) = (format!("{name}.out"), format!("{name}.err"));
        remove_old(&dir, &out_name)?;
        remove_old(&dir, &err_name)?;
        let dir = Arc::new(dir);
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stream = |pipe, name| Stream { pipe: Some(pipe), dir: dir.clone(), name, file: None, error: None, tail: Vec::new() };
        Ok(Capture { streams: [stream(out_r, out_name), stream(err_r, err_name)], writers: Some([out_w, err_w]), buf: Vec::new() })
    }

    /// The descriptors to give the child as stdout and stderr.
    pub fn child_fds(&self) -> (RawFd, RawFd) {
        let w = self.writers.as_ref().expect("child_fds before the child started");
        (w[0].as_raw_fd(), w[1].as_raw_fd())
    }

    /// The child has started: close this process's write ends (else the
    /// pipes would never reach end-of-file).
    pub fn started(&mut self) {
        self.writers = None;
    }

    /// Copy output until the child exits (then it is reaped: `Some(status)`)
    /// or `timeout` has passed (`None`).
    pub fn wait(&mut self, child: &Child, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut fds = [libc::pollfd { fd: child.pidfd(), events: libc::POLLIN, revents: 0 }; 3];
            let mut n = 1;
            for s in &self.streams {
                if let Some(p) = &s.pipe {
                    fds[n] = libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    n += 1;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: `n` valid pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("waiting for the command");
            }
            for f in &fds[1..n] {
                if f.revents != 0 {
                    let s = self.streams.iter_mut().find(|s| s.pipe.as_ref().is_some_and(|p| p.as_raw_fd() == f.fd)).expect("a polled stream");
                    if f.revents & libc::POLLIN == 0 {
                        s.pipe = None; // hang-up with nothing left to read: no writer, nothing written
                    } else {
                        s.pump(&mut self.buf)?;
                    }
                }
            }
            if fds[0].revents != 0 {
                return child.wait().map(Some);
            }
            if r == 0 || Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// After the child was reaped: copy what is left in the pipes. A stream
    /// still held open by a process the command left running is handed to a
    /// thread that copies until it is closed (see the module rules). Returns
    /// the first error writing a log, else the stderr log (its path as shown
    /// in messages, and the end of what the command wrote) when the command
    /// wrote to stderr.
    pub fn finish(self) -> Result<Option<StderrLog>> {
        let Capture { streams, mut buf, .. } = self;
        let mut error = None;
        let mut stderr_log = None;
        for (k, mut s) in streams.into_iter().enumerate() {
            if s.pipe.is_some()
                && let Err(e) = s.pump(&mut buf)
            {
                error = error.or(Some(e));
                s.pipe = None;
            }
            if k == 1 && s.file.is_some() {
                stderr_log = Some(StderrLog { path: s.dir.path().join(&s.name), tail: std::mem::take(&mut s.tail) });
            }
            if s.pipe.is_none() {
                error = error.or(s.error.take());
                continue;
            }
            // Drained but open: a process the command left running holds the
            // write end. Copy on, blocking, in the background.
            if let Some(p) = &s.pipe {
                // SAFETY: fcntl on a descriptor we own.
                unsafe { libc::fcntl(p.as_raw_fd(), libc::F_SETFL, 0) };
            }
            error = error.or(s.error.take());
            let _ = std::thread::Builder::new().name("log-copy".into()).spawn(move || {
                let mut buf = Vec::new();
                while let Ok(Pumped::Drained) = s.pump(&mut buf) {}
            });
        }
        error.map_or(Ok(stderr_log), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::path::Path;

    fn run(dir: &Path, script: &str) -> ExitStatus {
        let logs = Dir::open_or_create(dir, Path::new("logs")).unwrap();
        let mut cap = Capture::new(logs, "s").unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let (o, e) = cap.child_fds();
        let args = [OsStr::new("sh"), OsStr::new("-c"), OsStr::new(script)];
        let env = [(std::ffi::OsString::from("PATH"), std::ffi::OsString::from("/usr/bin:/bin"))];
        let child = super::super::spawn::spawn(&super::super::spawn::Spawn {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            cwd: dir,
            stdin: null.as_raw_fd(),
            stdout: o,
            stderr: e,
            pre_exec: None,
        })
        .unwrap();
        cap.started();
        let st = loop {
            if let Some(st) = cap.wait(&child, Duration::from_millis(50)).unwrap() {
                break st;
            }
        };
        cap.finish().unwrap();
        st
    }

    #[test]
    fn logs_exist_only_for_streams_written_and_hold_everything() {
        let d = tempfile::tempdir().unwrap();
        let logs = d.path().join("logs");
        assert!(run(d.path(), "true").success());
        assert!(!logs.join("s.out").exists() && !logs.join("s.err").exists());
        // More than a pipe holds (64 KiB), on both streams, while the command runs.
        assert!(run(d.path(), "head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2; echo end").success());
        assert_eq!(std::fs::metadata(logs.join("s.out")).unwrap().len(), 300_004);
        assert_eq!(std::fs::metadata(logs.join("s.err")).unwrap().len(), 200_000);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(logs.join("s.out")).unwrap().permissions().mode() & 0o777, 0o600);
        // A silent rerun leaves no old log behind.
        assert_eq!(run(d.path(), "echo only-err >&2; exit 3").code(), Some(3));
        assert!(!logs.join("s.out").exists());
        assert_eq!(std::fs::read_to_string(logs.join("s.err")).unwrap(), "only-err\n");
    }

    #[test]
    fn a_process_left_running_does_not_hold_up_the_stage() {
        let d = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        assert!(run(d.path(), "echo before; (sleep 0.5; echo late) & exit 0").success());
        assert!(t0.elapsed() < Duration::from_millis(450), "{:?}", t0.elapsed());
        assert_eq!(std::fs::read_to_string(d.path().join("logs/s.out")).unwrap(), "before\n");
        std::thread::sleep(Duration::from_millis(900));
        assert_eq!(std::fs::read_to_string(d.path().join("logs/s.out")).unwrap(), "before\nlate\n", "copied on in the background");
    }

    #[test]
    fn a_planted_link_is_replaced_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::create_dir(d.path().join("logs")).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("logs/s.out")).unwrap();
        assert!(run(d.path(), "echo hi").success());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(d.path().join("logs/s.out")).unwrap(), "hi\n");
    }
}
