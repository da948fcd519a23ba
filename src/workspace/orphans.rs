//! Processes a killed run, or a timed-out or failed attempt of a stage, left
//! behind on this machine: stopped before the next run sweeps (or the next
//! attempt starts, or the run ends), so nothing they write lands after the
//! clean-up.
//!
//! A `cmd` stage's shell dies with a SIGKILLed dagrun (`PR_SET_PDEATHSIG`),
//! but the processes that shell started do not (`sh -c 'a; b'` keeps running
//! `b`): one could write plaintext after the next run's sweep, where no later
//! run of another pipeline would look for it (review 33). Killing an
//! attempt's process group on a timeout or an interrupt misses a process
//! that left the group (`setsid`, as daemonising tools do): it wrote a
//! timed-out attempt's output over the retry's, which was then recorded, and
//! plaintext after an interrupted run's clean-up (review 68).
//!
//! Rules:
//! - Every attempt of a `cmd` stage gets its own mark, `M.N`: the run's
//!   random mark M ([`super::lock::run_mark`]) and the attempt's number in
//!   this process ([`super::lock::attempt_mark`]); the processes it starts
//!   inherit it. Stopping mark `M` stops every attempt of that run
//!   (`DAGRUN_RUN_MARK=M` or `=M.N`); stopping `M.N` that attempt only.
//! - An attempt that timed out, was interrupted or failed has its marked
//!   processes stopped before the stage's failure is handled (the retry
//!   starts from a clean slate; an interrupted run's plaintext is shredded
//!   after them). One that succeeded keeps what it started (a server a stage
//!   started on purpose runs on), unless the run is later killed.
//! - A process is the killed run's if its environment holds
//!   `DAGRUN_RUN_MARK=M` (or `M.N`) with M one of the marks of the lock's
//!   dead holders (`workspace::lock`) **and** a
//!   `DAGRUN_WORKSPACE` that is this workspace folder, however spelt (`ws/`,
//!   a link: `workspace::same_folder`): a lock copied with its workspace
//!   (`cp -a` while a run was under way) names the marks of a run that may be
//!   alive in the original, whose processes must not be touched. Nothing else
//!   identifies one: not a pid (reused), not a process group (a number
//!   reused once its members are gone), not the workspace alone (a process a
//!   cleanly ended run left on purpose, a server started by a stage, carries
//!   it too). A process whose main thread exited is read through its threads.
//! - Never this process, its ancestors or a member of its own process group
//!   (a leftover script that started this very run, the `cat` it pipes the
//!   run's output into): those are spared, said, and the workspace is not
//!   called clean; a group holding one of them is never killed as a group.
//! - Only this user's processes can be read and signalled; they are sent
//!   `SIGKILL` (they belong to a run that no longer exists: nothing would
//!   record what they finish), a process group at once when every member
//!   carries the mark (a member that forks while it is signalled cannot slip
//!   out), and waited for, up to [`WAIT`], until they have exited.
//! - The scan is repeated until two looks 20 ms apart find no carrier, at
//!   most [`ROUNDS`] times; otherwise (or when one did not exit) the result
//!   is not [`Stopped::complete`] and the caller must not call the workspace
//!   clean, so the next run tries again.
//! - A process that changed its environment to drop the mark (`env -i`), or
//!   overwrote it with a process title (Perl's `$0 = …`, `setproctitle`), or
//!   hands over to a new child faster than a scan of /proc (every few
//!   hundred microseconds: it may be missed by every look), or
//!   runs on another machine (a Slurm job: `executor::slurm` cancels those)
//!   is not found here.

use crate::workspace::WORKSPACE_ENV;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for the killed processes to exit.
pub const WAIT: Duration = Duration::from_secs(5);
/// Scans before giving up on processes that keep appearing.
const ROUNDS: usize = 8;

/// What [`stop`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// The processes sent SIGKILL.
    pub killed: Vec<u32>,
    /// Those still running after [`WAIT`].
    pub left: Vec<u32>,
    /// Carriers left alone because they are this run's own: its ancestors
    /// and its process group (say the `cat` a leftover script pipes this
    /// run's output into).
    pub spared: Vec<u32>,
    /// No carrier was found by the last scan: every one is gone. False when
    /// new ones kept appearing for [`ROUNDS`] scans (a process that forks
    /// on and on) or some did not exit: the run must not call the workspace
    /// clean, so that the next run tries again.
    pub complete: bool,
}

/// Set when an attempt's leftovers did not all stop ([`stop_attempt`]).
static ATTEMPT_SURVIVORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stop what one attempt of a `cmd` stage (mark `M.N`) left running after it
/// timed out, was interrupted or failed. When some did not stop, the run
/// leaves its own mark in the lock for the next run
/// ([`attempts_left_survivors`], `WorkspaceLock::keep_own_marks`).
pub fn stop_attempt(workspace: &Path, mark: &str) -> Stopped {
    let s = stop(workspace, &[mark.to_string()]);
    if !s.complete {
        ATTEMPT_SURVIVORS.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    s
}

/// Some attempt of this process left processes [`stop_attempt`] could not stop.
pub fn attempts_left_survivors() -> bool {
    ATTEMPT_SURVIVORS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Stop the processes the lock's dead holders left running, saying so
/// (`dagrun run` and `verify --repair`, before they clean up after a killed run). False when some may still run: the workspace is not then called clean.
pub fn stop_killed_runs(lock: &super::lock::WorkspaceLock, workspace: &Path) -> bool {
    let Stopped { killed: stopped, left, spared, complete } = stop(workspace, lock.dead_marks());
    let pids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    if !stopped.is_empty() {
        tracing::warn!(
            "stopped {} process{} a killed run had left running (pid {}), before cleaning up after it",
            stopped.len(),
            if stopped.len() == 1 { "" } else { "es" },
            pids(&stopped)
        );
    }
    if !left.is_empty() {
        tracing::warn!(
            "process{} {} of a killed run did not exit after SIGKILL; the next run stops {} again and cleans up after it",
            if left.len() == 1 { "" } else { "es" },
            pids(&left),
            if left.len() == 1 { "it" } else { "them" }
        );
    }
    if !spared.is_empty() {
        tracing::warn!(
            "left alone process{} {} of a killed run: {} this dagrun's own (an ancestor, or in its process group); the workspace stays marked for a later run to clean up",
            if spared.len() == 1 { "" } else { "es" },
            pids(&spared),
            if spared.len() == 1 { "it is" } else { "they are" }
        );
    } else if left.is_empty() && !complete {
        tracing::warn!("processes of a killed run kept appearing (one forks on and on?); the next run stops them again");
    }
    complete
}

/// Stop the processes carrying one of `marks` in `workspace` (see the
/// module's rules).
pub fn stop(workspace: &Path, marks: &[String]) -> Stopped {
    let mut out = Stopped { complete: true, ..Stopped::default() };
    if marks.is_empty() {
        return out;
    }
    let wanted: Vec<Vec<u8>> = marks.iter().map(|m| format!("{}={m}", crate::workspace::lock::RUN_MARK_ENV).into_bytes()).collect();
    let deadline = Instant::now() + WAIT;
    out.complete = false;
    let mut empty_scans = 0;
    // SAFETY: getpgrp(2) takes nothing and cannot fail.
    let my_group = unsafe { libc::getpgrp() } as u32;
    for _ in 0..ROUNDS {
        let table = processes();
        // Never this process's own group or its ancestors (a carrier that
        // started this very run: `dagrun run` from an orphaned script).
        let mut mine: BTreeSet<u32> = BTreeSet::new();
        let mut up = own_parent();
        while up > 1 && mine.insert(up) {
            up = table.get(&up).map_or(0, |p| p.ppid);
        }
        let own = |pid: &u32, p: &Proc| mine.contains(pid) || p.pgrp == my_group;
        // Each process's environment is looked at once per scan.
        let carrying: BTreeSet<u32> = table.iter().filter(|(_, p)| p.carries(&wanted, workspace)).map(|(&pid, _)| pid).collect();
        for pid in carrying.iter().filter(|pid| own(pid, &table[pid])) {
            if !out.spared.contains(pid) {
                out.spared.push(*pid);
            }
        }
        let found: Vec<u32> = carrying.iter().copied().filter(|pid| !own(pid, &table[pid])).collect();
        if found.is_empty() {
            // Once more, a moment later: a process caught between two
            // generations (its parent gone, its child not yet listed) is
            // found by the next look.
            if empty_scans >= 1 {
                out.complete = true;
                break;
            }
            empty_scans += 1;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        empty_scans = 0;
        // A whole process group of carriers is killed at once: a member that
        // forks while it is signalled cannot slip out (the kernel fails a
        // fork with a fatal signal pending). Other carriers one by one.
        let mut groups: BTreeMap<u32, bool> = BTreeMap::new();
        for (pid, p) in table.iter() {
            let all = groups.entry(p.pgrp).or_insert(true);
            *all &= !own(pid, p) && (carrying.contains(pid) || !p.alive);
        }
        let found_groups: BTreeSet<u32> = found.iter().map(|pid| table[pid].pgrp).collect();
        for &pid in &found {
            let g = table[&pid].pgrp;
            let whole = g > 1 && g != my_group && !mine.contains(&g) && groups.get(&g) == Some(&true) && found_groups.contains(&g);
            // SAFETY: kill(2) with a pid or process group read from /proc and
            // a valid signal number; it touches no memory of this process.
            unsafe {
                if whole {
                    libc::kill(-(g as libc::pid_t), libc::SIGKILL);
                } else {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            // Every live member a group kill reached is reported.
            let reached: Vec<u32> = if whole { table.iter().filter(|(_, p)| p.pgrp == g && p.alive).map(|(&m, _)| m).collect() } else { vec![pid] };
            for m in reached {
                if !out.killed.contains(&m) {
                    out.killed.push(m);
                }
            }
        }
        while Instant::now() < deadline && found.iter().any(|&p| alive(p)) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    out.left = out.killed.iter().copied().filter(|&p| alive(p)).collect();
    out.spared.retain(|&p| alive(p));
    out.complete &= out.left.is_empty() && out.spared.is_empty();
    out
}

/// This process's parent.
fn own_parent() -> u32 {
    // SAFETY: getppid(2) takes nothing and cannot fail.
    unsafe { libc::getppid() as u32 }
}

/// One process as /proc shows it.
struct Proc {
    ppid: u32,
    pgrp: u32,
    /// Not a zombie (nor a zombie leader with every thread gone).
    alive: bool,
    /// Its environment (empty when it cannot be read: another user's).
    environ: Vec<u8>,
}

impl Proc {
    /// It holds one of `wanted` and `DAGRUN_WORKSPACE` names `workspace`.
    fn carries(&self, wanted: &[Vec<u8>], workspace: &Path) -> bool {
        if !self.alive {
            return false;
        }
        let vars = || self.environ.split(|&b| b == 0);
        let prefix = format!("{WORKSPACE_ENV}=");
        // `M` or `M.N`: the mark, or one of its attempts' (module rules).
        vars().any(|var| wanted.iter().any(|w| var.strip_prefix(w.as_slice()).is_some_and(|rest| rest.is_empty() || rest.starts_with(b"."))))
            && vars().filter_map(|var| var.strip_prefix(prefix.as_bytes())).any(|ws| {
                let ws = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(ws));
                ws == workspace || crate::workspace::same_folder(ws, workspace)
            })
    }
}

/// Every process but this one, by pid.
fn processes() -> BTreeMap<u32, Proc> {
    let me = std::process::id();
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Some((state, ppid, pgrp)) = stat(&format!("/proc/{pid}/stat")) else { continue };
        out.insert(pid, Proc { ppid, pgrp, alive: running(pid, state), environ: environ(pid) });
    }
    out
}

/// The state letter, parent and process group in a `stat` file.
fn stat(path: &str) -> Option<(char, u32, u32)> {
    let s = std::fs::read_to_string(path).ok()?;
    // `pid (comm) S ppid pgrp …`: the fields follow the last ')' (comm may hold one).
    let mut f = s[s.rfind(')')? + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

fn is_dead(state: char) -> bool {
    matches!(state, 'Z' | 'X' | 'x')
}

/// Process `pid`, in `state`, still runs: not a zombie, or a zombie leader
/// with a live thread.
fn running(pid: u32, state: char) -> bool {
    !is_dead(state) || live_task(pid)
}

/// A thread of `pid` other than a dead leader still runs (a leader that
/// called `pthread_exit` shows as a zombie while its threads go on).
fn live_task(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| stat(&format!("/proc/{pid}/task/{}/stat", t.file_name().to_string_lossy())).is_some_and(|(st, _, _)| !is_dead(st)))
}

/// The environment of `pid`: the process's, else a live thread's (a dead
/// leader's cannot be read). Empty when unreadable (another user's).
fn environ(pid: u32) -> Vec<u8> {
    if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
        && !env.is_empty()
    {
        return env;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks.flatten().find_map(|t| std::fs::read(t.path().join("environ")).ok().filter(|e| !e.is_empty())).unwrap_or_default()
}

/// Still running: present and not a zombie (nor a zombie leader whose
/// threads are all gone): a dead process writes nothing more.
fn alive(pid: u32) -> bool {
    stat(&format!("/proc/{pid}/stat")).is_some_and(|(st, _, _)| running(pid, st))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's mark `M` finds every attempt's `M.N`; an attempt's `M.N`
    /// finds that attempt only; neither finds a mark that merely starts
    /// with it.
    #[test]
    fn a_run_mark_covers_its_attempts_and_an_attempt_mark_only_itself() {
        let ws = Path::new("/ws");
        let proc_with = |mark: &str| Proc {
            ppid: 1,
            pgrp: 1,
            alive: true,
            environ: format!("A=1\0{}={mark}\0{WORKSPACE_ENV}=/ws\0", crate::workspace::lock::RUN_MARK_ENV).into_bytes(),
        };
        let wanted = |m: &str| vec![format!("{}={m}", crate::workspace::lock::RUN_MARK_ENV).into_bytes()];
        let run = "0123456789abcdef0123456789abcdef";
        assert!(proc_with(run).carries(&wanted(run), ws));
        assert!(proc_with(&format!("{run}.7")).carries(&wanted(run), ws));
        assert!(proc_with(&format!("{run}.7")).carries(&wanted(&format!("{run}.7")), ws));
        assert!(!proc_with(&format!("{run}.70")).carries(&wanted(&format!("{run}.7")), ws));
        assert!(!proc_with(&format!("{run}.8")).carries(&wanted(&format!("{run}.7")), ws));
        assert!(!proc_with(&format!("{run}0")).carries(&wanted(run), ws));
        assert!(!proc_with(run).carries(&wanted(&format!("{run}.7")), ws));
    }

    /// A process carrying a mark is stopped (and one with another mark, the
    /// mark under another name, or the mark of another workspace, is not),
    /// and so is its child.
    #[test]
    fn the_processes_carrying_a_dead_mark_are_stopped_and_no_other() {
        let mark = "0123456789abcdef0123456789abcde0".to_string();
        let other = "ffffffffffffffffffffffffffffffff".to_string();
        let start = |env: &[(&str, &str)]| {
            use std::os::unix::process::CommandExt;
            let mut c = std::process::Command::new("/bin/sh");
            // In a group of its own, as a stage's command is (one in this
            // process's group would be spared: see the next test).
            c.args(["-c", "sleep 30 & wait"]).env_clear().process_group(0);
            for (k, v) in env {
                c.env(k, v);
            }
            c.spawn().unwrap()
        };
        let ws = "/work/space";
        let mark_env = crate::workspace::lock::RUN_MARK_ENV;
        let mut ours = start(&[(mark_env, &mark), (WORKSPACE_ENV, ws)]);
        let mut theirs = start(&[(mark_env, &other), (WORKSPACE_ENV, ws)]);
        let mut renamed = start(&[("DAGRUN_RUN_MARKS", &mark), (WORKSPACE_ENV, ws)]);
        // The same mark in another workspace: a lock copied with its workspace.
        let mut elsewhere = start(&[(mark_env, &mark), (WORKSPACE_ENV, "/work/space2")]);
        // Wait until the shells have started their `sleep` children.
        let children_of = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let t = Instant::now();
        while [&ours, &theirs, &renamed, &elsewhere].iter().any(|c| children_of(c.id()).trim().is_empty()) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let sleep_pid: u32 = children_of(ours.id()).trim().parse().unwrap();
        let Stopped { killed: stopped, left, complete, .. } = stop(std::path::Path::new(ws), std::slice::from_ref(&mark));
        assert!(left.is_empty() && complete, "{left:?}");
        assert!(stopped.contains(&ours.id()) && stopped.contains(&sleep_pid), "{stopped:?}");
        assert_eq!(stopped.len(), 2, "{stopped:?}");
        assert!(ours.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(!alive(sleep_pid));
        for c in [&mut theirs, &mut renamed, &mut elsewhere] {
            assert!(c.try_wait().unwrap().is_none(), "a process without the mark runs on");
            c.kill().unwrap();
            c.wait().unwrap();
        }
        assert_eq!(stop(std::path::Path::new(ws), &[]), Stopped { complete: true, ..Stopped::default() });
    }

    /// A process that hands over to a new child every few milliseconds (its
    /// pid changes under every scan) is stopped with its whole group.
    #[test]
    fn a_process_that_forks_on_and_on_is_stopped_with_its_group() {
        use std::os::unix::process::CommandExt;
        let mark = "abcdefabcdefabcdefabcdefabcdef01".to_string();
        let ws = "/work/hop";
        let wanted = vec![format!("{}={mark}", crate::workspace::lock::RUN_MARK_ENV).into_bytes()];
        let carriers = || processes().into_values().filter(|p| p.carries(&wanted, Path::new(ws))).count();
        let mut c = std::process::Command::new("/bin/sh");
        // Each generation starts the next in the background and exits.
        let hop = r#"sleep 0.02; /bin/sh -c "$HOP" & exit 0"#;
        c.args(["-c", hop]).env_clear().env("HOP", hop).env(crate::workspace::lock::RUN_MARK_ENV, &mark).env(WORKSPACE_ENV, ws);
        c.process_group(0);
        let mut first = c.spawn().unwrap();
        // Whatever the outcome, the hopper's group goes with the test (a
        // failed assertion left it hopping for good, and every generation a
        // zombie for PID 1 to reap).
        struct Group(i32);
        impl Drop for Group {
            fn drop(&mut self) {
                for _ in 0..50 {
                    // SAFETY: kill takes plain integers and touches no memory of ours.
                    if unsafe { libc::kill(-self.0, libc::SIGKILL) } != 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let _group = Group(first.id() as i32);
        first.wait().unwrap();
        let t = Instant::now();
        while carriers() == 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(carriers() > 0, "the hopper runs");
        let done = stop(Path::new(ws), std::slice::from_ref(&mark));
        assert!(done.complete && done.left.is_empty() && !done.killed.is_empty(), "{done:?}");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(carriers(), 0, "a hopper survived");
    }

    /// A carrier in this process's own group (the `cat` a leftover script
    /// pipes this run's output into) is spared and said, and the result is
    /// not complete: the workspace is not called clean.
    #[test]
    fn a_carrier_in_this_processs_own_group_is_spared() {
        let mark = "abcdefabcdefabcdefabcdefabcdef02".to_string();
        let ws = "/work/own";
        let mut c = std::process::Command::new("/bin/sh");
        c.args(["-c", "exec sleep 30"]).env_clear().env(crate::workspace::lock::RUN_MARK_ENV, &mark).env(WORKSPACE_ENV, ws);
        let mut child = c.spawn().unwrap();
        let t = Instant::now();
        let wanted = vec![format!("{}={mark}", crate::workspace::lock::RUN_MARK_ENV).into_bytes()];
        while !processes().get(&child.id()).is_some_and(|p| p.carries(&wanted, Path::new(ws))) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let done = stop(Path::new(ws), std::slice::from_ref(&mark));
        assert!(done.killed.is_empty() && done.spared == [child.id()] && !done.complete, "{done:?}");
        assert!(child.try_wait().unwrap().is_none(), "spared, still running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
