//! `cmd:` stages: a shell command with declared `deps:` and `outs:`, as in
//! dvc.yaml. Run with `/bin/sh -c` in the workspace, in its own process group
//! (so a timeout or Ctrl-C ends it and all its children), stdout and stderr
//! captured in `.dagrun/logs/STAGE.out|.err`, each created only when the
//! command writes to that stream (`util::capture`).
//!
//! # What the command sees
//! - Its environment is rebuilt by `util::child_env`: dagrun's environment
//!   minus every `DAGRUN_MASTER_KEY*` variable and the pipeline's `secrets:`;
//!   plus `DAGRUN_WORKSPACE`, `DAGRUN_STAGE`, `DAGRUN_TENANT` (fanned-out
//!   stages), `DAGRUN_PARAM_<NAME>` for every param the command references,
//!   and the stage's declared `env:` (`PATH` defaults to
//!   `/usr/local/bin:/usr/bin:/bin` when dagrun has none).
//! - Param values inside the command string are shell-quoted (`pipeline::shell`).
//! - The log files are created afresh at the command's first byte on that
//!   stream (an old file, or a planted symlink or hard link in its place, is
//!   removed first, never written through), mode 0600, inside a
//!   `.dagrun/logs` that must be a real directory. A stream the command
//!   leaves silent has no log (an old one is removed before it starts).

use super::{Declared, KindDecl, RunCtx, RunReport, StageError, StageKind};
use crate::pipeline::Stage;
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub struct Cmd;

/// `/dev/null` for the commands' stdin, opened once per process.
fn dev_null() -> Result<&'static std::fs::File> {
    static NULL: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(f) = NULL.get() {
        return Ok(f);
    }
    let f = std::fs::File::open("/dev/null").context("cannot open /dev/null")?;
    Ok(NULL.get_or_init(|| f))
}

/// The last `n` lines of a log file (at most 4 KiB read). The file is
/// opened without following a link and without waiting (a FIFO or a device
/// in its place reads as nothing): whatever ran may have replaced it.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path);
    let Ok(mut f) = opened else { return String::new() };
    let Ok(meta) = f.metadata() else { return String::new() };
    if !meta.is_file() {
        return String::new();
    }
    let _ = f.seek(SeekFrom::Start(meta.len().saturating_sub(crate::util::capture::TAIL_BYTES as u64)));
    let mut buf = Vec::new();
    let _ = f.take(crate::util::capture::TAIL_BYTES as u64).read_to_end(&mut buf);
    tail_lines(&buf, n)
}

/// The last `n` lines of `bytes` (a log's end).
/// Control characters are escaped: the text is the command's, and it is
/// shown in terminals (an escape sequence is shown, never obeyed).
pub fn tail_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    crate::util::escape_controls_in_lines(&lines[lines.len().saturating_sub(n)..].join("\n")).into_owned()
}

/// Stop what a failed, timed-out or interrupted attempt (mark `mark`) left
/// running outside its process group (`workspace::orphans`); the words to
/// add to its error when there was any.
fn stop_leftovers(workspace: &std::path::Path, mark: &str) -> String {
    let s = crate::workspace::orphans::stop_attempt(workspace, mark);
    let n = s.killed.len() + s.spared.len();
    match (n, s.left.len() + s.spared.len()) {
        (0, _) => String::new(),
        (n, 0) => format!(
            "; {} it had started outside its process group {} stopped",
            crate::util::count(n, "process", "processes"),
            if n == 1 { "was" } else { "were" }
        ),
        (_, k) => format!(
            "; {} it had started outside its process group did not stop (the next run stops {})",
            crate::util::count(k, "process", "processes"),
            if k == 1 { "it" } else { "them" }
        ),
    }
}

fn kill_group(pid: u32, sig: i32) {
    #[cfg(unix)]
    // SAFETY: killpg takes plain integers and touches no memory of ours. The
    // group id is the pid of a child we started in its own process group
    // (util::spawn); a group id is not reused while any member of the group
    // lives; once none does, the call fails with ESRCH (ignored), unless the
    // id was taken again in between: the last call, right after the shell is
    // reaped, has that (microseconds wide) window, as it had before.
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
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
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
        // Logs only for the streams the command writes to (util::capture).
        let mut capture = crate::util::capture::Capture::new(logs, &s.name)?;
        // The environment, exactly (util::child_env: inherited minus the
        // denied names, then what dagrun and the stage declare; later wins).
        let mut env: std::collections::BTreeMap<OsString, OsString> = crate::util::child_env::inherited(&s.secrets).into_iter().collect();
        if std::env::var_os("PATH").is_none() {
            env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
        }
        env.insert(crate::workspace::WORKSPACE_ENV.into(), ctx.workspace.as_os_str().to_owned());
        env.insert("DAGRUN_STAGE".into(), s.name.clone().into());
        // What the command starts inherits it: the run after a killed one
        // stops those processes, and so does this attempt when it fails
        // (workspace::orphans).
        let mark = crate::workspace::lock::attempt_mark();
        env.insert(crate::workspace::lock::RUN_MARK_ENV.into(), mark.clone().into());
        if let Some(t) = &s.tenant {
            env.insert("DAGRUN_TENANT".into(), t.into());
        }
        env.extend(s.env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
        // A value the command reads through its variable (pipeline::shell);
        // `env:` may name none of dagrun's own variables (checked at load).
        env.extend(crate::pipeline::shell::param_env(&s.param_refs).into_iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
        // The master key's URI names the PIN's file (pin-source) or holds the PIN
        // (pin-value): no child process gets it, whatever the stage declares.
        env.remove(OsStr::new(crate::crypto::master::ENV_MASTER_KEY_URI));
        // The OpenLineage bearer token is for dagrun's own requests only.
        env.remove(OsStr::new(crate::lineage::TOKEN_ENV));
        let env: Vec<(OsString, OsString)> = env.into_iter().collect();
        let stdin = dev_null()?;
        // In its own process group; killed if dagrun itself dies (even by
        // SIGKILL: the thread that starts it waits for it, so it lives as long
        // as the command does); default signal dispositions (dagrun ignores
        // SIGPIPE and SIGXFSZ); started without copying dagrun's memory: see
        // util::spawn. dagrun runs with core dumps off
        // (crypto::harden_process); the command gets the user's limit back.
        let restore_core = || crate::crypto::restore_core_limit_for_child();
        let args = [OsStr::new("/bin/sh"), OsStr::new("-c"), OsStr::new(cmd)];
        let (stdout, stderr) = capture.child_fds();
        let child = crate::util::spawn::spawn(&crate::util::spawn::Spawn {
            program: std::path::Path::new("/bin/sh"),
            args: &args,
            env: &env,
            cwd: ctx.workspace,
            stdin: stdin.as_raw_fd(),
            stdout,
            stderr,
            pre_exec: Some(&restore_core),
        })
        .context("cannot start /bin/sh")?;
        capture.started();
        let pid = child.pid as u32;
        let start = Instant::now();
        let status = loop {
            if let Some(st) = capture.wait(&child, Duration::from_millis(100))? {
                break st;
            }
            let timed_out = ctx.timeout.is_some_and(|t| start.elapsed() >= t);
            if timed_out || ctx.cancel.load(Ordering::Relaxed) {
                kill_group(pid, libc::SIGTERM);
                if child.wait_timeout(Duration::from_secs(2))?.is_none() {
                    kill_group(pid, libc::SIGKILL);
                    let _ = child.wait();
                }
                // Children that ignored SIGTERM while the shell exited.
                kill_group(pid, libc::SIGKILL);
                // ... and those that left its process group (`setsid`).
                let left = stop_leftovers(ctx.workspace, &mark);
                let _ = capture.finish();
                if timed_out {
                    bail!(
                        "timed out after {}s (timeout: {}); the command and its child processes were killed{left}",
                        start.elapsed().as_secs(),
                        ctx.timeout.unwrap().as_secs_f64()
                    );
                }
                bail!("interrupted; the command and its child processes were killed{left}");
            }
        };
        if !status.success() {
            // A failed attempt's processes must not write after its partial
            // outputs are removed (or into the retry's).
            kill_group(pid, libc::SIGKILL);
            let left = stop_leftovers(ctx.workspace, &mark);
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
            let Ok(Some(log)) = capture.finish() else { bail!("command failed with {code}{left} (no stderr)") };
            // What the command wrote, not what its log file holds now (the
            // command may have replaced it: a FIFO would hang the run).
            let t = tail_lines(&log.tail, 10);
            let shown = log.path.strip_prefix(ctx.workspace).unwrap_or(&log.path).display().to_string();
            if t.is_empty() {
                bail!("command failed with {code}{left} (no stderr; full log: {shown})");
            }
            bail!("command failed with {code}{left}; end of stderr ({shown}):\n{t}");
        }
        capture.finish()?;
        Ok(RunReport::default())
    }
}

#[cfg(test)]
mod tests {
    /// The tail keeps its line breaks (the README's promise for messages) and
    /// escapes every other control character (a terminal shows, never obeys).
    #[test]
    fn tail_lines_keeps_line_breaks_and_escapes_the_rest() {
        let log = b"one\ntwo\nthree \x1b[31mred\x1b[0m\r\nfour\n";
        assert_eq!(super::tail_lines(log, 3), "two\nthree \\u{1b}[31mred\\u{1b}[0m\nfour");
        assert_eq!(super::tail_lines(b"", 10), "");
    }
}
