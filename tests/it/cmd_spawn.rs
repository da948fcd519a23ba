//! How `cmd` stages are started (`util::spawn`): what the command inherits,
//! and that it dies with dagrun.

use crate::common::*;
use std::time::{Duration, Instant};

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by init) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn a_command_dies_with_a_sigkilled_dagrun() {
    let ws = Ws::new();
    // `exec`: the pid written is the process that sleeps (the death signal
    // survives exec).
    ws.pipeline("stages:\n  wait:\n    cmd: echo $$ > pid.txt; exec sleep 30\n    outs: [done.txt]\n");
    let mut victim = spawn(ws.cmd(&["run", "pipeline.yaml"]));
    let t0 = Instant::now();
    while !(ws.exists("pid.txt") && ws.read("pid.txt").ends_with('\n')) {
        assert!(t0.elapsed() < Duration::from_secs(20), "the command never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: i32 = ws.read("pid.txt").trim().parse().unwrap();
    assert!(alive(pid), "the command runs while dagrun does");
    // SAFETY: signalling the dagrun process this test started.
    unsafe {
        libc::kill(victim.pid() as i32, libc::SIGKILL);
    }
    let _ = victim.child.wait();
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < Duration::from_secs(5), "the command outlived dagrun's SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_command_starts_with_default_signals_nothing_blocked_and_its_own_group() {
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  sig:\n    cmd: grep -E '^(SigBlk|SigIgn)' /proc/self/status > sig.txt; ps -o pgid= -p $$ | tr -d ' ' > pgid.txt; echo $$ > pid.txt\n    outs: [sig.txt, pgid.txt, pid.txt]\n",
    );
    ws.run(&[]).ok();
    for l in ws.read("sig.txt").lines() {
        let mask = u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap();
        if l.starts_with("SigBlk") {
            assert_eq!(mask, 0, "a signal is blocked in the command: {l}");
        } else {
            // dagrun ignores SIGPIPE and SIGXFSZ; the command must not.
            assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE ignored in the command: {l}");
            assert_eq!(mask & (1 << (libc::SIGXFSZ - 1)), 0, "SIGXFSZ ignored in the command: {l}");
        }
    }
    assert_eq!(ws.read("pgid.txt").trim(), ws.read("pid.txt").trim(), "the command leads its own process group");
}
