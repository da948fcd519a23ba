//! Starting a child process cheaply: `clone(CLONE_VM | CLONE_VFORK)`, as
//! glibc's `posix_spawn` does, with the set-up `posix_spawn` cannot do
//! (`PR_SET_PDEATHSIG`, a caller's async-signal-safe hook) done in the child.
//!
//! Why not `std::process::Command`: with a `pre_exec` hook it forks. A fork
//! of dagrun (a large, multi-threaded process) copies its page tables,
//! write-protects every private page (a TLB shootdown on every core running
//! one of its threads) and tears the copy down again at `exec`; measured on
//! the 200-stage `cmd` benchmark that was the largest part of dagrun's own
//! kernel time per stage. Here the child borrows the parent's memory until it
//! has called `execve` (the calling thread is suspended meanwhile) and no
//! page is copied.
//!
//! # Rules (the child shares the parent's memory until `execve`)
//! - Everything the child uses is prepared before `clone`: C strings, the
//!   `argv`/`envp` arrays, file descriptors. The child calls raw system calls
//!   only: no allocation, no lock, no Rust I/O, no panic.
//! - Every signal is blocked in the parent around `clone`, so no handler of
//!   dagrun's can run on the shared memory; the child sets every handled
//!   signal back to the default (and `SIGPIPE` and `SIGXFSZ`, which dagrun
//!   ignores, as `std` does for `SIGPIPE`), then unblocks all signals, then
//!   calls `execve`: the command starts with default dispositions and an
//!   empty signal mask, as with `Command`.
//! - The child runs in its own process group (`setpgid(0, 0)`), gets
//!   `SIGKILL` when the thread that started it exits (`PR_SET_PDEATHSIG`:
//!   that thread waits for it, so this fires only when dagrun dies), has
//!   stdin/stdout/stderr on the given descriptors and the given working
//!   directory. All of dagrun's other descriptors are close-on-exec.
//! - A failed `execve` (or set-up step) is reported to the parent through
//!   memory both share (the parent reads it after the child has exited) and
//!   the child is reaped: [`spawn`] returns the error.
//! - The parent gets a pidfd (`CLONE_PIDFD`) to wait with a timeout without
//!   a waiter thread ([`Child::wait_timeout`]).

use anyhow::{Context, Result, anyhow};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// What to start.
pub struct Spawn<'a> {
    /// An absolute path (no `PATH` search).
    pub program: &'a Path,
    /// Including `argv[0]`.
    pub args: &'a [&'a OsStr],
    /// The complete environment (`NAME=value`; nothing is inherited).
    pub env: &'a [(std::ffi::OsString, std::ffi::OsString)],
    pub cwd: &'a Path,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Run in the child just before `execve`: async-signal-safe calls only
    /// (it shares the parent's memory; see the module rules).
    pub pre_exec: Option<&'a (dyn Fn() + Sync)>,
}

/// A started child: its pid (also its process group) and a pidfd.
pub struct Child {
    pub pid: libc::pid_t,
    pidfd: OwnedFd,
}

fn cstring(s: &OsStr, what: &str) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| anyhow!("{what} holds a NUL byte"))
}

/// Everything the child reads, prepared in the parent.
struct ChildArgs<'a> {
    program: &'a CStr,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: &'a CStr,
    fds: [RawFd; 3],
    pre_exec: Option<&'a (dyn Fn() + Sync)>,
    /// errno of the step that failed (0: none), written by the child.
    error: AtomicI32,
}

const CHILD_STACK: usize = 64 * 1024;

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the ChildArgs of `spawn`, alive until the
    // parent resumes (after this child's execve or _exit: CLONE_VFORK).
    let a = unsafe { &*(arg as *const ChildArgs) };
    let fail = |a: &ChildArgs| -> libc::c_int {
        // SAFETY: errno of this (borrowed) thread context.
        let e = unsafe { *libc::__errno_location() };
        a.error.store(if e == 0 { libc::EINVAL } else { e }, Ordering::Relaxed);
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: raw system calls on prepared, valid arguments; see the module rules.
    unsafe {
        // Handlers of dagrun's must not run here: back to the defaults.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            let ignored = old.sa_sigaction == libc::SIG_IGN;
            if (old.sa_sigaction != libc::SIG_DFL && !ignored) || (ignored && (sig == libc::SIGPIPE || sig == libc::SIGXFSZ)) {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(a);
        }
        #[cfg(target_os = "linux")]
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return fail(a);
        }
        for (target, &fd) in a.fds.iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                return fail(a);
            }
        }
        if libc::chdir(a.cwd.as_ptr()) != 0 {
            return fail(a);
        }
        if let Some(f) = a.pre_exec {
            f();
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.program.as_ptr(), a.argv, a.envp);
    }
    fail(a)
}

/// Start `s` (see the module rules).
pub fn spawn(s: &Spawn) -> Result<Child> {
    let program = cstring(s.program.as_os_str(), "the program path")?;
    let args: Vec<CString> = s.args.iter().map(|a| cstring(a, "an argument")).collect::<Result<_>>()?;
    let env: Vec<CString> = s
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| anyhow!("environment variable {} holds a NUL byte", k.to_string_lossy()))
        })
        .collect::<Result<_>>()?;
    let cwd = cstring(s.cwd.as_os_str(), "the working directory")?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let child_args = ChildArgs {
        program: &program,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: &cwd,
        fds: [s.stdin, s.stdout, s.stderr],
        pre_exec: s.pre_exec,
        error: AtomicI32::new(0),
    };
    // From the heap (not a fresh mapping: unmapping it would cost a TLB
    // shootdown on every core); the stack grows down from its 16-aligned end.
    // Not zeroed (a stack needs no initial contents; zeroing 64 KiB per
    // command was a tenth of dagrun's instructions in a cold 200-stage run):
    // only the child writes it, through the raw pointer, and nothing here
    // reads it.
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    let top = {
        let end = stack.as_mut_ptr() as usize + CHILD_STACK;
        (end & !15) as *mut libc::c_void
    };
    let mut pidfd: libc::c_int = -1;
    // SAFETY: all signals blocked around clone (restored below); the child
    // only reads `child_args` and writes its `error` (see the module rules);
    // CLONE_VFORK suspends this thread until the child has exec'd or exited,
    // so `child_args`, `stack` and the strings outlive its use of them.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            &child_args as *const ChildArgs as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        );
        let err = std::io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(err).with_context(|| format!("cannot start {}", s.program.display()));
        }
        pid
    };
    drop(stack);
    // SAFETY: CLONE_PIDFD stored a new descriptor owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let child = Child { pid, pidfd };
    let e = child_args.error.load(Ordering::Relaxed);
    if e != 0 {
        let _ = child.wait();
        return Err(std::io::Error::from_raw_os_error(e)).with_context(|| format!("cannot start {}", s.program.display()));
    }
    Ok(child)
}

impl Child {
    /// The pidfd (readable once the child has exited), to poll beside other descriptors.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// Wait up to `timeout` for the child to exit: `Some(status)` when it
    /// has (it is reaped), `None` when it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let mut p = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e).context("waiting for the command");
        }
        if r == 0 {
            return Ok(None);
        }
        self.wait().map(Some)
    }

    /// Wait for the child to exit and reap it.
    pub fn wait(&self) -> Result<ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        let mut status: libc::c_int = 0;
        loop {
            // SAFETY: our own child's pid; status is a valid out-pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                return Ok(ExitStatus::from_raw(status));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("waiting for the command");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::io::Read;

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors owned here.
        unsafe { (std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn run(script: &str, env: &[(OsString, OsString)]) -> (String, ExitStatus) {
        let (mut r, w) = pipe();
        let null = std::fs::File::open("/dev/null").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let args = [OsStr::new("sh"), OsStr::new("-c"), OsStr::new(script)];
        let c = spawn(&Spawn {
            program: Path::new("/bin/sh"),
            args: &args,
            env,
            cwd: dir.path(),
            stdin: null.as_raw_fd(),
            stdout: w.as_raw_fd(),
            stderr: w.as_raw_fd(),
            pre_exec: None,
        })
        .unwrap();
        drop(w);
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        let st = loop {
            if let Some(st) = c.wait_timeout(Duration::from_millis(100)).unwrap() {
                break st;
            }
        };
        (out, st)
    }

    #[test]
    fn runs_with_exactly_the_given_environment_directory_and_group() {
        let env = [(OsString::from("ONLY"), OsString::from("this")), (OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
        let (out, st) = run("echo \"$ONLY ${HOME:-nohome}\"; pwd -P | grep -c tmp; ps -o pgid= -p $$ | tr -d ' '; echo $$", &env);
        assert!(st.success(), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "this nohome");
        assert_eq!(lines[1], "1");
        assert_eq!(lines[2], lines[3], "the command leads its own process group: {out}");
    }

    #[test]
    fn exit_codes_signals_and_default_dispositions_come_through() {
        use std::os::unix::process::ExitStatusExt;
        let (_, st) = run("exit 7", &[]);
        assert_eq!(st.code(), Some(7));
        // SIGPIPE is back to the default in the child (dagrun ignores it): the writer dies of it.
        let (out, st) = run("trap - PIPE; (yes | head -c 1 >/dev/null); kill -TERM $$", &[(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))]);
        assert_eq!(st.signal(), Some(libc::SIGTERM), "{out}");
        let (out, st) = run("grep -E '^(SigBlk|SigIgn)' /proc/self/status", &[(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))]);
        assert!(st.success());
        for l in out.lines() {
            let mask = u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap();
            if l.starts_with("SigBlk") {
                assert_eq!(mask, 0, "no signal blocked: {out}");
            } else {
                assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE not ignored: {out}");
                assert_eq!(mask & (1 << (libc::SIGXFSZ - 1)), 0, "SIGXFSZ not ignored: {out}");
            }
        }
    }

    /// `program` with `args`, no environment, in `/`, all three streams on /dev/null.
    fn spawn_quiet(program: &str, args: &[&str]) -> Result<Child> {
        let null = std::fs::File::open("/dev/null").unwrap();
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        spawn(&Spawn {
            program: Path::new(program),
            args: &args,
            env: &[],
            cwd: Path::new("/"),
            stdin: null.as_raw_fd(),
            stdout: null.as_raw_fd(),
            stderr: null.as_raw_fd(),
            pre_exec: None,
        })
    }

    #[test]
    fn a_program_that_cannot_start_is_an_error_and_leaves_no_child() {
        let e = spawn_quiet("/nonexistent/program", &["x"]).err().expect("an error");
        assert!(format!("{e:#}").contains("No such file"), "{e:#}");
    }

    #[test]
    fn timeouts_report_a_running_child() {
        let c = spawn_quiet("/bin/sleep", &["sleep", "0.3"]).unwrap();
        assert!(c.wait_timeout(Duration::from_millis(10)).unwrap().is_none());
        assert!(c.wait().unwrap().success());
    }
}
