//! Processes a killed run left behind on this machine: stopped before the
//! next run sweeps, so nothing they write lands after the clean-up.
//!
//! A `cmd` stage's shell dies with a SIGKILLed dagrun (`PR_SET_PDEATHSIG`),
//! but the processes that shell started do not (`sh -c 'a; b'` keeps running
//! `b`): one could write plaintext after the next run's sweep, where no later
//! run of another pipeline would look for it (review 33).
//!
//! Rules:
//! - A process is the killed run's if its environment holds
//!   `DAGRUN_RUN_MARK=M` with M one of the marks of the lock's dead holders
//!   (`workspace::lock`: every `cmd` stage's process gets its run's random
//!   mark, and the processes it starts inherit it) **and**
//!   `DAGRUN_WORKSPACE=` this workspace: a lock copied with its workspace
//!   (`cp -r` while a run was under way) names the marks of a run that may be
//!   alive in the original, whose processes must not be touched. Nothing else identifies
//!   one: not a pid (reused), not a process group (a number reused once its
//!   members are gone), not the workspace in `DAGRUN_WORKSPACE` (a process a
//!   cleanly ended run left on purpose, a server started by a stage, carries
//!   it too).
//! - Only this user's processes can be read and signalled; they are sent
//!   `SIGKILL` (they belong to a run that no longer exists: nothing would
//!   record what they finish) and waited for, up to [`WAIT`], until they have
//!   exited; the scan is repeated so that a child one of them started in the
//!   meantime is found too.
//! - A process that changed its environment to drop the mark (`env -i`) or
//!   runs on another machine (a Slurm job: `executor::slurm` cancels those)
//!   is not found here.

use crate::workspace::WORKSPACE_ENV;
use std::time::{Duration, Instant};

/// How long to wait for the killed processes to exit.
pub const WAIT: Duration = Duration::from_secs(5);
/// Scans before giving up on processes that keep appearing.
const ROUNDS: usize = 5;

/// Stop the processes carrying one of `marks` (see the module's rules).
/// Returns the pids stopped, and those still alive after [`WAIT`].
pub fn stop(workspace: &std::path::Path, marks: &[String]) -> (Vec<u32>, Vec<u32>) {
    let mut stopped = Vec::new();
    if marks.is_empty() {
        return (stopped, Vec::new());
    }
    let wanted: Vec<Vec<u8>> = marks.iter().map(|m| format!("{}={m}", crate::workspace::lock::RUN_MARK_ENV).into_bytes()).collect();
    let mut here = WORKSPACE_ENV.as_bytes().to_vec();
    here.push(b'=');
    here.extend_from_slice(workspace.as_os_str().as_encoded_bytes());
    let deadline = Instant::now() + WAIT;
    for _ in 0..ROUNDS {
        let found = carrying(&wanted, &here);
        let new: Vec<u32> = found.iter().copied().filter(|p| !stopped.contains(p) || alive(*p)).collect();
        if new.is_empty() {
            break;
        }
        for &pid in &new {
            // SAFETY: kill(2) with a pid read from /proc and a valid signal
            // number; it touches no memory of this process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            if !stopped.contains(&pid) {
                stopped.push(pid);
            }
        }
        while Instant::now() < deadline && new.iter().any(|&p| alive(p)) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let left = stopped.iter().copied().filter(|&p| alive(p)).collect();
    (stopped, left)
}

/// Pids (not this process) whose environment holds one of `wanted`, and `here`.
fn carrying(wanted: &[Vec<u8>], here: &[u8]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        // Another user's process, or one that just exited: not readable.
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let mut vars = env.split(|&b| b == 0);
        if vars.clone().any(|var| wanted.iter().any(|w| var == w.as_slice())) && vars.any(|var| var == here) {
            out.push(pid);
        }
    }
    out
}

/// Still running: present and not a zombie (a killed process whose parent
/// has not collected it yet writes nothing more).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) S …`: the state follows the last ')' (comm may hold one).
    !matches!(stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next()), Some('Z' | 'X' | 'x'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process carrying a mark is stopped (and one with another mark, the
    /// mark under another name, or the mark of another workspace, is not),
    /// and so is its child.
    #[test]
    fn the_processes_carrying_a_dead_mark_are_stopped_and_no_other() {
        let mark = "0123456789abcdef0123456789abcde0".to_string();
        let other = "ffffffffffffffffffffffffffffffff".to_string();
        let start = |env: &[(&str, &str)]| {
            let mut c = std::process::Command::new("/bin/sh");
            c.args(["-c", "sleep 30 & wait"]).env_clear();
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
        let (stopped, left) = stop(std::path::Path::new(ws), std::slice::from_ref(&mark));
        assert!(left.is_empty(), "{left:?}");
        assert!(stopped.contains(&ours.id()) && stopped.contains(&sleep_pid), "{stopped:?}");
        assert_eq!(stopped.len(), 2, "{stopped:?}");
        assert!(ours.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(!alive(sleep_pid));
        for c in [&mut theirs, &mut renamed, &mut elsewhere] {
            assert!(c.try_wait().unwrap().is_none(), "a process without the mark runs on");
            c.kill().unwrap();
            c.wait().unwrap();
        }
        assert_eq!(stop(std::path::Path::new(ws), &[]), (vec![], vec![]));
    }
}
