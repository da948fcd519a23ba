//! The environment a child process may see: the one rule for every process
//! dagrun starts (`cmd` stages, and the outside tools it calls: [`tool`] for
//! Graphviz `dot` and Slurm's `sacct`, `scontrol`, `scancel`, `squeue`;
//! `sbatch` gets the smaller job environment of `executor::slurm`).
//!
//! # Rules
//! - A child gets dagrun's own environment **minus**:
//!   - every variable whose name starts with `DAGRUN_MASTER_KEY`
//!     (`DAGRUN_MASTER_KEY`, `DAGRUN_MASTER_KEY_FILE`, `DAGRUN_MASTER_KEY_URI`
//!     with its PIN, and any later one: name every new master-key variable
//!     with that prefix and it is withheld automatically);
//!   - dagrun's own credentials in [`ALWAYS_DENIED`] (the OpenLineage token,
//!     and its endpoint URL, which may carry a password or a query key);
//!   - the cloud providers' variables (every `AWS_*`, `AZURE_*` and
//!     `GOOGLE_*`, which is where the remote cache's `object_store` and the
//!     providers' SDKs read secret keys, session and bearer tokens, SAS
//!     tokens, encryption keys, proxy URLs with passwords), except the few in
//!     [`CLOUD_PASSING`] that grant nothing alone (ids, regions, endpoints,
//!     profiles, paths of credential files), unless the pipeline lets one
//!     through by name under `pass_env:` (a stage that runs `aws s3 cp`
//!     itself). A list of known secret names would miss the next one: the
//!     rule withholds by prefix and passes by name;
//!   - every variable the pipeline lists under `secrets:` (exact names, or a
//!     prefix ending in `*`, e.g. `AWS_SECRET_*`).
//! - The caller then adds what it declares (e.g. `DAGRUN_STAGE`, a stage's
//!   `env:`); [`check_declared`] refuses a declared name that is denied, so a
//!   pipeline cannot hand a secret's name back to a child by accident.
//! - The environment is rebuilt from scratch ([`apply`] calls `env_clear`), so
//!   nothing reaches a child by inheritance that this module did not pass.

use std::ffi::{OsStr, OsString};
use std::process::Command;

/// Names with this prefix never reach a child.
pub const ALWAYS_DENIED_PREFIX: &str = "DAGRUN_MASTER_KEY";
/// dagrun's own credentials that never reach a child (`lineage::TOKEN_ENV`).
pub const ALWAYS_DENIED: &[&str] = &["DAGRUN_OPENLINEAGE_TOKEN", "DAGRUN_OPENLINEAGE_URL"];

/// Prefixes of the cloud providers' variables: withheld from children
/// (see the module's rules).
pub const CLOUD_PREFIXES: &[&str] = &["AWS_", "AZURE_", "GOOGLE_"];
/// Cloud variables that pass: they name an account, a region, an endpoint or
/// a file, and grant nothing alone.
pub const CLOUD_PASSING: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_CA_BUNDLE",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
];

/// What a pipeline withholds from its commands besides what is always
/// withheld: its `secrets:` patterns, and the cloud variables it lets through
/// (`pass_env:`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Withheld {
    secrets: Vec<String>,
    pass: Vec<String>,
}

impl Withheld {
    /// A pipeline's `secrets:` (checked patterns) and `pass_env:`. A
    /// `pass_env:` entry must be a withheld cloud variable, and not also a
    /// secret: anything else is a mistake (a variable that is not withheld
    /// needs no pass; the master key and OpenLineage ones can never pass).
    pub fn new(secrets: &[String], pass: &[String]) -> Result<Withheld, String> {
        let w = Withheld { secrets: secrets.to_vec(), pass: Vec::new() };
        for p in pass {
            if p.contains('*') || check_secret_pattern(p).is_err() {
                return Err(format!("`pass_env:` entry {p:?} is not a variable name: name each variable to pass (no patterns)"));
            }
            if !is_cloud_withheld(p) {
                return Err(format!(
                    "`pass_env:` entry {p:?} is not a withheld cloud variable, so it needs no pass (the master key and OpenLineage variables can never be passed); it may name variables starting with {} other than {}",
                    CLOUD_PREFIXES.join(", "),
                    CLOUD_PASSING.join(", ")
                ));
            }
            if w.is_secret(p) {
                return Err(format!("`pass_env:` entry {p} is also withheld by `secrets:`; keep it in one of the two"));
            }
        }
        Ok(Withheld { pass: pass.to_vec(), ..w })
    }

    fn is_secret(&self, name: &str) -> bool {
        self.secrets.iter().any(|s| match s.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == s,
        })
    }
}

/// A cloud variable withheld unless passed by name.
fn is_cloud_withheld(name: &str) -> bool {
    CLOUD_PREFIXES.iter().any(|p| name.starts_with(p)) && !CLOUD_PASSING.contains(&name)
}

/// True when `name` must not reach a child: the master-key prefix, dagrun's
/// own credentials, a cloud variable not passed, or a `secrets:` entry.
pub fn is_denied(name: &OsStr, w: &Withheld) -> bool {
    let Some(name) = name.to_str() else {
        // Not UTF-8: cannot be a secret's declared name, but it cannot be the
        // master key prefix either unless its start matches byte for byte.
        return name.as_encoded_bytes().starts_with(ALWAYS_DENIED_PREFIX.as_bytes());
    };
    if name.starts_with(ALWAYS_DENIED_PREFIX) || ALWAYS_DENIED.contains(&name) || w.is_secret(name) {
        return true;
    }
    is_cloud_withheld(name) && !w.pass.iter().any(|p| p == name)
}

/// dagrun's environment with every denied variable removed.
pub fn inherited(w: &Withheld) -> Vec<(OsString, OsString)> {
    std::env::vars_os().filter(|(k, _)| !is_denied(k, w)).collect()
}

/// Give `cmd` exactly the inherited, filtered environment (declared
/// variables are added by the caller afterwards).
pub fn apply(cmd: &mut Command, w: &Withheld) {
    cmd.env_clear();
    cmd.envs(inherited(w));
}

/// What the process's pipeline withholds (set once it is loaded, by
/// [`withhold_from_tools`]): outside tools get its `secrets:` withheld too.
static PIPELINE_WITHHELD: std::sync::OnceLock<Withheld> = std::sync::OnceLock::new();

/// Withhold the loaded pipeline's `secrets:` (and pass its `pass_env:`) from
/// every outside tool this process starts ([`tool`]). One pipeline per
/// process: a second call is ignored.
pub fn withhold_from_tools(w: &Withheld) {
    let _ = PIPELINE_WITHHELD.set(w.clone());
}

/// Variables an outside tool gets, by exact name (what a system tool needs
/// to find its programs, libraries, locale, fonts and home).
const TOOL_PASS: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "GVBINDIR",
    "FONTCONFIG_FILE",
    "FONTCONFIG_PATH",
    "MUNGE_SOCKET",
];
/// ... and by prefix: the locale, and Slurm's own settings (`SLURM_CONF`,
/// the client commands' defaults).
const TOOL_PASS_PREFIXES: &[&str] = &["LC_", "SLURM_", "SBATCH_", "SQUEUE_", "SACCT_", "SCONTROL_", "SCANCEL_", "SINFO_"];

/// Does variable `name` reach an outside tool (before the deny rules)?
fn tool_passes(name: &OsStr) -> bool {
    name.to_str().is_some_and(|n| TOOL_PASS.contains(&n) || TOOL_PASS_PREFIXES.iter().any(|p| n.starts_with(p)))
}

/// A command for an outside tool dagrun runs for itself (Graphviz `dot`,
/// Slurm's query and cancel commands): only the variables a system tool
/// needs ([`TOOL_PASS`], [`TOOL_PASS_PREFIXES`]), and of those nothing
/// denied (nor the pipeline's `secrets:` once [`withhold_from_tools`] named
/// them). An allow-list, not the deny rules alone: a tool needs no secret,
/// and `report` may start `dot` without knowing the pipeline's `secrets:`
/// (review 15: the pipeline no longer loaded). Never `Command::new` for a
/// child: a tool started that way would see the master key.
pub fn tool(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_clear();
    c.envs(inherited(PIPELINE_WITHHELD.get().unwrap_or(&Withheld::default())).into_iter().filter(|(k, _)| tool_passes(k)));
    c
}

/// How long a tool that has exited may leave its output open (a helper it
/// started still holds its stdout or stderr) before that helper is killed
/// with the tool's group and what the tool printed is its answer.
const AFTER_EXIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The most of a tool's stdout, and of its stderr, that is kept: a tool
/// that prints more (a wrapper gone wrong) is drained and the excess
/// dropped, and its call fails ([`had_started`]) instead of filling memory.
const OUTPUT_CAP: usize = 64 << 20;

/// The cause of an error [`output_within_unless`] returns after the tool
/// started: it may have done its work (a job submitted), whatever the error
/// says. Errors without it come from starting the tool: it never ran.
#[derive(Debug)]
struct AfterStart(String);

impl std::fmt::Display for AfterStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AfterStart {}

/// Whether an error of [`output_within_unless`] came after the tool had
/// started (a timeout, an interrupt, losing track of it): what it was asked
/// to do may have been done.
pub fn had_started(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<AfterStart>())
}

/// Whether the child `pid` has exited, without reaping it (`waitid` with
/// `WNOWAIT`): until it is reaped its pid, which is also its process
/// group's id, cannot be given to another process, so signalling the group
/// never reaches a stranger.
fn has_exited(pid: libc::pid_t) -> std::io::Result<bool> {
    loop {
        // SAFETY: siginfo_t is plain data, valid when zeroed.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into `info`, a live siginfo_t, and reads
        // nothing else; `pid` is our own unreaped child.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
        if r == 0 {
            // SAFETY: waitid filled `info` (si_pid is 0 when nothing has exited).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Run a tool ([`tool`]) with `input` on its stdin (closed once written)
/// and its stdout and stderr read while it runs (a full pipe would stall
/// it); its output, or a `TimedOut` error once it has run for `limit` (it is
/// then killed and reaped): a tool never holds dagrun up for longer
/// (Graphviz on a huge graph, a Slurm command whose controller does not
/// answer).
pub fn output_within(cmd: Command, input: &[u8], limit: std::time::Duration) -> std::io::Result<std::process::Output> {
    output_within_unless(cmd, input, limit, &|| false)
}

/// [`output_within`], also killed (and reaped) as soon as `stop()` holds,
/// checked every 10 ms: an `Interrupted` error (an interrupted run does not
/// wait out a tool's limit).
///
/// The tool runs in a process group of its own, and the limit covers its
/// output too: a process it left behind holding its stdout or stderr (a
/// wrapper's background helper) is killed with the group. When the tool
/// has exited, such a helper gets [`AFTER_EXIT`], then the tool's answer
/// is what it printed (an `sbatch` wrapper that printed its job id is not
/// turned into a timeout). Exit is seen without reaping the tool, so its
/// group's id stays its own while the group is signalled. Every error after
/// the tool started is marked ([`had_started`]).
pub fn output_within_unless(mut cmd: Command, input: &[u8], limit: std::time::Duration, stop: &dyn Fn() -> bool) -> std::io::Result<std::process::Output> {
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let t0 = std::time::Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn()?;
    let pid = child.id() as libc::pid_t;
    let started = |kind: ErrorKind, msg: String| std::io::Error::new(kind, AfterStart(msg));
    // The whole group (what the tool started too), then the tool, reaped.
    let kill_all = |child: &mut std::process::Child| {
        // SAFETY: kill(2) on the tool's own process group; the tool is not
        // reaped yet (`has_exited` only looks), so the id is still its own.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = child.kill();
        let _ = child.wait();
    };
    let nonblocking = |fd: std::os::fd::RawFd| {
        // SAFETY: fcntl on a pipe end this function owns.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
    };
    let mut stdin = child.stdin.take().filter(|_| !input.is_empty());
    // The output pipes as files: read and polled alike.
    let as_file = |fd: std::os::fd::OwnedFd| std::fs::File::from(fd);
    let mut outs = [child.stdout.take().map(|p| as_file(p.into())), child.stderr.take().map(|p| as_file(p.into()))];
    let mut bufs = [Vec::new(), Vec::new()];
    let mut overflow = false;
    for o in outs.iter().flatten() {
        nonblocking(o.as_raw_fd());
    }
    if let Some(s) = &stdin {
        nonblocking(s.as_raw_fd());
    }
    let mut written = 0;
    let mut exited_at: Option<std::time::Instant> = None;
    loop {
        if exited_at.is_none() {
            match has_exited(pid) {
                Ok(true) => exited_at = Some(std::time::Instant::now()),
                Ok(false) => {}
                Err(e) => {
                    kill_all(&mut child);
                    return Err(started(ErrorKind::Other, format!("lost track of the tool: {e}")));
                }
            }
        }
        if let Some(t) = exited_at {
            if outs.iter().all(Option::is_none) {
                break;
            }
            if t.elapsed() >= AFTER_EXIT {
                // SAFETY: as in kill_all: the exited tool is not reaped yet.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                break;
            }
        }
        if t0.elapsed() >= limit {
            kill_all(&mut child);
            return Err(started(ErrorKind::TimedOut, format!("no answer within {}s", limit.as_secs_f64())));
        }
        if stop() {
            kill_all(&mut child);
            return Err(started(ErrorKind::Interrupted, "interrupted".into()));
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        for o in outs.iter().flatten() {
            fds.push(libc::pollfd { fd: o.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if let Some(s) = &stdin {
            fds.push(libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
        }
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        for (slot, buf) in outs.iter_mut().zip(bufs.iter_mut()) {
            let Some(o) = slot else { continue };
            let mut chunk = [0u8; 8192];
            // At most 256 KiB a turn: a tool that never stops printing still
            // has its limit and `stop()` checked.
            for _ in 0..32 {
                match o.read(&mut chunk) {
                    Ok(0) => {
                        *slot = None;
                        break;
                    }
                    Ok(n) => {
                        let keep = n.min(OUTPUT_CAP - buf.len());
                        buf.extend_from_slice(&chunk[..keep]);
                        overflow |= keep < n;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        kill_all(&mut child);
                        return Err(started(ErrorKind::Other, format!("cannot read the tool's output: {e}")));
                    }
                }
            }
        }
        if let Some(s) = &mut stdin {
            match s.write(&input[written..]) {
                Ok(n) => written += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                // The tool stopped reading (it exited, or needs no more): its status says how it went.
                Err(e) if e.kind() == ErrorKind::BrokenPipe => written = input.len(),
                Err(e) => {
                    kill_all(&mut child);
                    return Err(started(ErrorKind::Other, format!("cannot write the tool's input: {e}")));
                }
            }
            if written == input.len() {
                stdin = None; // closed: the tool sees the end of its input
            }
        }
    }
    let status = child.wait().map_err(|e| started(ErrorKind::Other, format!("lost track of the tool: {e}")))?;
    if overflow {
        return Err(started(ErrorKind::Other, format!("the tool printed more than {} MiB", OUTPUT_CAP >> 20)));
    }
    let [stdout, stderr] = bufs;
    Ok(std::process::Output { status, stdout, stderr })
}

/// Check a `secrets:` entry: a variable name (`[A-Za-z_][A-Za-z0-9_]*`),
/// optionally ending in `*` (a prefix).
pub fn check_secret_pattern(p: &str) -> Result<(), String> {
    let name = p.strip_suffix('*').unwrap_or(p);
    let ok = name.chars().enumerate().all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
    if (name.is_empty() && !p.ends_with('*')) || !ok || p == "*" {
        return Err(format!(
            "`secrets:` entry {p:?} is not an environment variable name (letters, digits, '_', not starting with a digit), optionally ending in '*' for a prefix"
        ));
    }
    Ok(())
}

/// Refuse a declared variable (a stage's `env:`) whose name is denied.
pub fn check_declared(name: &str, w: &Withheld) -> Result<(), String> {
    // `A=B: x` would reach the command as `A=B=x`: variable A (review 66 #3).
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(format!("`env:` names {name:?}, which is not a variable name (empty, or holding `=`); name the variable alone"));
    }
    if let Some(own) = set_by_dagrun(name) {
        return Err(format!(
            "`env:` sets {name}, which dagrun sets itself for every command ({own}); remove it from `env:`{}",
            if name.starts_with(PARAM_PREFIX) { " (a command reads a param's value there: set the param instead)" } else { "" }
        ));
    }
    if is_denied(OsStr::new(name), w) {
        return Err(format!(
            "`env:` sets {name}, which is withheld from commands (the master key variables, cloud credentials not under `pass_env:`, and the pipeline's `secrets:`); remove it from `env:`"
        ));
    }
    Ok(())
}

/// What every `cmd` stage's command is given by dagrun (`stages::cmd`):
/// a stage's `env:` may not set these, or the orphan sweep would miss its
/// processes (`DAGRUN_RUN_MARK`, `DAGRUN_WORKSPACE`) and a param's value
/// would depend on which of two entries won.
const SET_BY_DAGRUN: [(&str, &str); 4] = [
    ("DAGRUN_WORKSPACE", "the workspace folder"),
    ("DAGRUN_STAGE", "the stage name"),
    ("DAGRUN_TENANT", "the tenant of a fanned-out stage"),
    ("DAGRUN_RUN_MARK", "the run's mark, by which a later run finds the processes a killed run left"),
];
const PARAM_PREFIX: &str = "DAGRUN_PARAM_";

fn set_by_dagrun(name: &str) -> Option<&'static str> {
    if name.starts_with(PARAM_PREFIX) {
        return Some("a param the command references");
    }
    SET_BY_DAGRUN.iter().find(|(n, _)| *n == name).map(|(_, what)| *what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn master_key_variables_and_secrets_are_denied() {
        let s = Withheld::new(&names(&["API_TOKEN", "AWS_SECRET_*"]), &[]).unwrap();
        assert!(ALWAYS_DENIED.contains(&crate::lineage::TOKEN_ENV));
        assert!(ALWAYS_DENIED.contains(&crate::lineage::URL_ENV));
        for n in [
            "DAGRUN_MASTER_KEY",
            "DAGRUN_MASTER_KEY_FILE",
            "DAGRUN_MASTER_KEY_URI",
            "DAGRUN_MASTER_KEY_PIN",
            "DAGRUN_OPENLINEAGE_TOKEN",
            "API_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(is_denied(OsStr::new(n), &s), "{n}");
        }
        for n in ["PATH", "HOME", "API_TOKEN_X", "AWS_REGION", "DAGRUN_STAGE", "DAGRUN_MASTER"] {
            assert!(!is_denied(OsStr::new(n), &s), "{n}");
        }
        assert!(check_declared("DAGRUN_MASTER_KEY", &s).is_err());
        assert!(check_declared("AWS_SECRET_X", &s).is_err());
        assert!(check_declared("LC_ALL", &s).is_ok());
        for n in ["DAGRUN_RUN_MARK", "DAGRUN_WORKSPACE", "DAGRUN_STAGE", "DAGRUN_TENANT", "DAGRUN_PARAM_N"] {
            let m = check_declared(n, &s).unwrap_err();
            assert!(m.contains(n) && m.contains("dagrun sets itself"), "{m}");
        }
        assert!(check_declared("DAGRUN_PARAM_N", &s).unwrap_err().contains("set the param instead"));
        assert!(check_declared("DAGRUN_PLAIN", &s).is_ok());
        for n in ["DAGRUN_RUN_MARK=evil", "DAGRUN_MASTER_KEY=x", "", "A\0B", "X="] {
            assert!(check_declared(n, &s).is_err(), "{n:?}");
        }
        // The names are the ones the rest of dagrun uses.
        assert!(set_by_dagrun(crate::workspace::WORKSPACE_ENV).is_some() && set_by_dagrun(crate::workspace::lock::RUN_MARK_ENV).is_some());
    }

    #[test]
    fn cloud_variables_are_withheld_unless_they_grant_nothing_or_are_passed_by_name() {
        let s = Withheld::new(&names(&["API_TOKEN"]), &[]).unwrap();
        // Secret keys and tokens, the ones a list of names missed (review 7), and any future one.
        for n in [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_SSE_CUSTOMER_KEY_BASE64",
            "AWS_PROXY_URL",
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_CONNECTION_STRING",
            "AZURE_STORAGE_ENCRYPTION_KEY",
            "AZURE_FABRIC_SESSION_TOKEN",
            "GOOGLE_SERVICE_ACCOUNT_KEY",
            "GOOGLE_BEARER_TOKEN",
            "AWS_SOMETHING_NEW",
            "API_TOKEN",
        ] {
            assert!(is_denied(OsStr::new(n), &s), "{n}");
        }
        for n in ["AWS_ACCESS_KEY_ID", "AWS_REGION", "AWS_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "HOME"] {
            assert!(!is_denied(OsStr::new(n), &s), "{n}");
        }
        let s = Withheld::new(&[], &names(&["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])).unwrap();
        assert!(!is_denied(OsStr::new("AWS_SECRET_ACCESS_KEY"), &s));
        assert!(!is_denied(OsStr::new("AWS_SESSION_TOKEN"), &s));
        assert!(is_denied(OsStr::new("AZURE_CLIENT_SECRET"), &s));
        for bad in ["DAGRUN_MASTER_KEY", "DAGRUN_OPENLINEAGE_TOKEN", "HOME", "AWS_REGION"] {
            let e = Withheld::new(&[], &names(&[bad])).unwrap_err();
            assert!(e.contains("needs no pass") && e.contains("AWS_"), "{e}");
        }
        assert!(Withheld::new(&[], &names(&["AWS_*"])).unwrap_err().contains("no patterns"));
        let e = Withheld::new(&names(&["AWS_SECRET_*"]), &names(&["AWS_SECRET_ACCESS_KEY"])).unwrap_err();
        assert!(e.contains("also withheld by `secrets:`"), "{e}");
        // A user's `secrets:` wins over what passes by default.
        let s = Withheld::new(&names(&["AWS_*"]), &[]).unwrap();
        assert!(is_denied(OsStr::new("AWS_REGION"), &s));
    }

    #[test]
    fn a_tool_is_bounded_with_what_it_leaves_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let gone = |pid: libc::pid_t| {
            (0..100).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                // SAFETY: signal 0 only checks that the process exists.
                let exists = unsafe { libc::kill(pid, 0) } == 0;
                !exists
                    || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            })
        };
        // Answers and exits at once, but a helper it started holds stdout:
        // the answer counts, after a short grace; the helper is killed with
        // the tool's group (and reaped by init).
        let mut c = Command::new("sh");
        c.args(["-c", &format!("sleep 300 & echo $! > {}; echo answered; echo note >&2", pid_file.display())]);
        let t0 = std::time::Instant::now();
        let o = output_within(c, b"", std::time::Duration::from_secs(60)).unwrap();
        assert_eq!((o.stdout.as_slice(), o.stderr.as_slice(), o.status.success()), (&b"answered\n"[..], &b"note\n"[..], true));
        assert!(t0.elapsed() >= AFTER_EXIT && t0.elapsed() < std::time::Duration::from_secs(20), "{:?}", t0.elapsed());
        let pid: libc::pid_t = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert!(gone(pid), "the helper {pid} still runs");
        // A helper that left the group (setsid) is not waited for either.
        let mut c = Command::new("sh");
        c.args(["-c", &format!("setsid sleep 300 & echo $! > {}; echo answered", pid_file.display())]);
        let t0 = std::time::Instant::now();
        let o = output_within(c, b"", std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(o.stdout, b"answered\n");
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{:?}", t0.elapsed());
        let pid: libc::pid_t = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // SAFETY: the test's own `sleep`, by the pid it wrote.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // A tool that does not answer: killed with its group at the limit,
        // an error marked as coming after the tool started.
        let mut c = Command::new("sh");
        c.args(["-c", &format!("sleep 300 & echo $! > {}; wait", pid_file.display())]);
        let t0 = std::time::Instant::now();
        let e = output_within(c, b"", std::time::Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(had_started(&e));
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", t0.elapsed());
        let pid: libc::pid_t = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert!(gone(pid), "the helper {pid} still runs");
        // A tool that cannot start: not marked.
        let e = output_within(Command::new("/nonexistent/tool"), b"", std::time::Duration::from_secs(1)).unwrap_err();
        assert!(!had_started(&e) && e.kind() == std::io::ErrorKind::NotFound, "{e:?}");
        // A tool that prints without end is bounded in memory too.
        let mut c = Command::new("sh");
        c.args(["-c", "head -c 70000000 /dev/zero"]);
        let e = output_within(c, b"", std::time::Duration::from_secs(60)).unwrap_err();
        assert!(had_started(&e) && e.to_string().contains("more than 64 MiB"), "{e}");
        // Input larger than a pipe holds, while the tool writes as much back.
        let big = vec![b'x'; 1 << 20];
        let o = output_within(Command::new("cat"), &big, std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(o.stdout.len(), big.len());
        // Stopped at once when asked.
        let c = {
            let mut c = Command::new("sleep");
            c.arg("300");
            c
        };
        let t0 = std::time::Instant::now();
        let e = output_within_unless(c, b"", std::time::Duration::from_secs(300), &|| t0.elapsed() > std::time::Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        // An ordinary tool: its output.
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2"]);
        let o = output_within(c, b"", std::time::Duration::from_secs(30)).unwrap();
        assert_eq!((o.stdout.as_slice(), o.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
    }

    #[test]
    fn secret_patterns_are_names() {
        for ok in ["A", "_X", "AWS_*", "a1", "X*"] {
            check_secret_pattern(ok).unwrap();
        }
        for bad in ["", "*", "1A", "A-B", "A B", "A*B", "$X"] {
            assert!(check_secret_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tools_get_only_what_a_system_tool_needs() {
        for n in ["PATH", "HOME", "LC_ALL", "SLURM_CONF", "SBATCH_PARTITION"] {
            assert!(tool_passes(OsStr::new(n)), "{n}");
        }
        for n in ["DAGRUN_MASTER_KEY", "MY_API_TOKEN", "AWS_ACCESS_KEY_ID", "DAGRUN_OPENLINEAGE_TOKEN", "LD_PRELOAD", "PATHX"] {
            assert!(!tool_passes(OsStr::new(n)), "{n}");
        }
        let c = tool("/bin/true");
        assert!(c.get_envs().all(|(k, v)| v.is_some() && tool_passes(k)));
    }

    #[test]
    fn apply_rebuilds_the_environment() {
        let mut c = Command::new("/bin/true");
        c.env("DAGRUN_MASTER_KEY", "x");
        apply(&mut c, &Withheld::default());
        assert!(c.get_envs().all(|(k, _)| !k.to_string_lossy().starts_with("DAGRUN_MASTER_KEY")));
    }
}
