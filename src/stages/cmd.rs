//! `cmd:` stages: a shell command with declared `deps:` and `outs:`, as in
//! dvc.yaml. Run with `/bin/sh -c` in the workspace, in its own process group
//! (so a timeout or Ctrl-C ends it and all its children), stdout and stderr
//! captured in `.dagrun/logs/STAGE.out|.err`.
//!
//! # What the command sees
//! - Its environment is rebuilt by `util::child_env`: dagrun's environment
//!   minus every `DAGRUN_MASTER_KEY*` variable and the pipeline's `secrets:`;
//!   plus `DAGRUN_WORKSPACE`, `DAGRUN_STAGE`, `DAGRUN_TENANT` (fanned-out
//!   stages), `DAGRUN_PARAM_<NAME>` for every param the command references,
//!   and the stage's declared `env:` (`PATH` defaults to
//!   `/usr/local/bin:/usr/bin:/bin` when dagrun has none).
//! - Param values inside the command string are shell-quoted (`pipeline::shell`).
//! - The log files are created afresh (an old file, or a planted symlink or
//!   hard link in its place, is removed first, never written through), mode
//!   0600, inside a `.dagrun/logs` that must be a real directory.

use super::{Declared, KindDecl, RunCtx, RunReport, StageKind};
use crate::pipeline::Stage;
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Cmd;

/// The last `n` lines of a log file (at most 4 KiB read).
pub fn tail(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kill_group(pid: u32, sig: i32) {
    #[cfg(unix)]
    // SAFETY: killpg takes plain integers and touches no memory of ours. The
    // group id is the pid of a child we spawned with process_group(0) and
    // have not reaped yet (the caller still holds the Child), so the id cannot
    // have been reused by an unrelated group; an error (ESRCH) is ignored.
    unsafe {
        libc::killpg(pid as i32, sig);
    }
}

impl KindDecl for Cmd {
    fn name(&self) -> &'static str {
        "cmd"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, String> {
        let extra: Vec<&String> = with.keys().filter(|k| !(tenant.is_some() && *k == "tenant")).collect();
        if !extra.is_empty() {
            return Err("`with:` is for built-in kinds; a `cmd:` stage takes its values in the command (use ${params.NAME})".into());
        }
        Ok(Declared::default())
    }
}

impl StageKind for Cmd {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let s: &Stage = ctx.stage;
        let cmd = s.cmd.as_deref().context("cmd stage without a command")?;
        let logs_rel = std::path::Path::new(crate::workspace::DAGRUN_DIR).join("logs");
        let logs = crate::util::nofollow::Dir::open_or_create(ctx.workspace, &logs_rel)?;
        let out_name = format!("{}.out", s.name);
        let err_name = format!("{}.err", s.name);
        let err_path = ctx.workspace.join(&logs_rel).join(&err_name);
        let stdout = logs.create_fresh(&out_name, 0o600)?;
        let stderr = logs.create_fresh(&err_name, 0o600)?;
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(cmd).current_dir(ctx.workspace).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        crate::util::child_env::apply(&mut c, &s.secrets);
        if std::env::var_os("PATH").is_none() {
            c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        c.env("DAGRUN_WORKSPACE", ctx.workspace).env("DAGRUN_STAGE", &s.name);
        if let Some(t) = &s.tenant {
            c.env("DAGRUN_TENANT", t);
        }
        c.envs(crate::pipeline::shell::param_env(&s.param_refs));
        c.envs(&s.env);
        // The master key's URI names the PIN's file (pin-source) or holds the PIN
        // (pin-value): no child process gets it, whatever the stage declares.
        c.env_remove(crate::crypto::master::ENV_MASTER_KEY_URI);
        // The OpenLineage bearer token is for dagrun's own requests only.
        c.env_remove(crate::lineage::TOKEN_ENV);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            c.process_group(0);
            // If dagrun itself is killed (even with SIGKILL), the shell dies
            // too: the thread that started it waits for it, so it lives as
            // long as the command does. dagrun ignores SIGXFSZ (main.rs); an
            // ignored signal stays ignored across exec, so give the command
            // the default back.
            // SAFETY: the closure runs in the forked child before exec, where
            // only async-signal-safe calls are allowed. It calls prctl, signal
            // and setrlimit (all async-signal-safe syscalls); it allocates
            // nothing, takes no lock and reads only atomics already set by
            // the parent (restore_core_limit_for_child).
            unsafe {
                c.pre_exec(|| {
                    #[cfg(target_os = "linux")]
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
                    // dagrun runs with core dumps off (crypto::harden_process);
                    // the command gets the user's limit back.
                    crate::crypto::restore_core_limit_for_child();
                    Ok(())
                });
            }
        }
        let mut child = c.spawn().context("cannot start /bin/sh")?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let start = Instant::now();
        let status = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(st) => break st.context("waiting for the command")?,
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("lost track of the command"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let timed_out = ctx.timeout.is_some_and(|t| start.elapsed() >= t);
                    if timed_out || ctx.cancel.load(Ordering::Relaxed) {
                        kill_group(pid, libc::SIGTERM);
                        let grace = rx.recv_timeout(Duration::from_secs(2));
                        if grace.is_err() {
                            kill_group(pid, libc::SIGKILL);
                            let _ = rx.recv();
                        }
                        // Children that ignored SIGTERM while the shell exited.
                        kill_group(pid, libc::SIGKILL);
                        let _ = waiter.join();
                        if timed_out {
                            bail!(
                                "timed out after {}s (timeout: {}); the command and its child processes were killed",
                                start.elapsed().as_secs(),
                                ctx.timeout.unwrap().as_secs_f64()
                            );
                        }
                        bail!("interrupted; the command and its child processes were killed");
                    }
                }
            }
        };
        let _ = waiter.join();
        if !status.success() {
            let code = match status.code() {
                Some(c) => format!("exit status {c}"),
                None => {
                    #[cfg(unix)]
                    {
                        use std::os::unix::process::ExitStatusExt;
                        format!("signal {}", status.signal().unwrap_or(0))
                    }
                }
            };
            let t = tail(&err_path, 10);
            let shown = err_path.strip_prefix(ctx.workspace).unwrap_or(&err_path).display().to_string();
            if t.is_empty() {
                bail!("command failed with {code} (no stderr; full log: {shown})");
            }
            bail!("command failed with {code}; end of stderr ({shown}):\n{t}");
        }
        Ok(RunReport::default())
    }
}
