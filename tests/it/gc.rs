//! `dagrun gc`: what the current state and the newest runs use stays and
//! still restores; the rest of the cache goes; nothing is collected when a
//! record cannot be verified or a run holds the workspace.

use crate::common::*;
use std::time::{Duration, Instant};

/// One stage with a file and a directory output (a listing object plus one
/// object per file; `outd/b` is the same in every version).
const PIPELINE: &str = r#"
params:
  v: 1
stages:
  s:
    cmd: mkdir -p outd && echo ${params.v} > out.txt && echo x${params.v} > outd/a && echo same > outd/b
    outs: [out.txt, outd]
"#;

fn objects(ws: &Ws) -> usize {
    ws.walk().iter().filter(|p| p.starts_with(".dagrun/cache/objects/") && !ws.path(p).is_dir()).count()
}

fn entries(ws: &Ws) -> usize {
    std::fs::read_dir(ws.path(".dagrun/cache/actions")).map(|rd| rd.count()).unwrap_or(0)
}

fn run_v(ws: &Ws, v: u32) -> String {
    let r = ws.run(&["-p", &format!("v={v}")]).ok();
    r.statuses()["s"].clone()
}

#[test]
fn gc_keeps_what_the_state_and_the_newest_runs_use_and_removes_the_rest() {
    let ws = Ws::new();
    ws.pipeline(PIPELINE);
    for v in [1, 2, 3] {
        assert_eq!(run_v(&ws, v), "ran");
    }
    assert_eq!((entries(&ws), objects(&ws)), (3, 10));

    // --dry-run: the figures, nothing removed.
    let d = ws.dagrun(&["gc", "--keep-runs", "1", "--dry-run", "--json"]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    let j = d.json();
    assert_eq!((j["entries_removed"].as_u64(), j["objects_removed"].as_u64()), (Some(2), Some(6)), "{j:#}");
    assert_eq!((j["entries_kept"].as_u64(), j["objects_kept"].as_u64(), j["runs_read"].as_u64()), (Some(1), Some(4), Some(1)), "{j:#}");
    assert_eq!((entries(&ws), objects(&ws)), (3, 10));

    // The default keeps the newest 10 runs: here, everything.
    let all = ws.dagrun(&["gc"]);
    assert_eq!(all.code, 0, "{}", all.stderr);
    assert!(all.stdout.starts_with("removed 0 cache entries and 0 objects"), "{}", all.stdout);
    assert_eq!((entries(&ws), objects(&ws)), (3, 10));

    let g = ws.dagrun(&["gc", "--keep-runs", "1"]);
    assert_eq!(g.code, 0, "{}", g.stderr);
    assert!(g.stdout.starts_with("removed 2 cache entries and 6 objects"), "{}", g.stdout);
    assert_eq!((entries(&ws), objects(&ws)), (1, 4));
    let v = ws.dagrun(&["verify"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);

    // What was kept still serves: up to date, and restorable after a switch.
    assert_eq!(run_v(&ws, 3), "cached");
    assert_eq!(run_v(&ws, 1), "ran", "v=1's entry was collected: it must recompute");
    std::fs::remove_dir_all(ws.path("outd")).unwrap();
    assert_eq!(run_v(&ws, 3), "restored");
    assert_eq!(ws.read("out.txt"), "3\n");
    assert_eq!(ws.read("outd/a"), "x3\n");
    assert_eq!(ws.read("outd/b"), "same\n");

    // --keep-runs 0: only the current state (v=3) stays.
    let z = ws.dagrun(&["gc", "--keep-runs", "0", "--json"]);
    assert_eq!(z.code, 0, "{}", z.stderr);
    assert_eq!(z.json()["entries_removed"].as_u64(), Some(1), "{}", z.stdout);
    assert_eq!((entries(&ws), objects(&ws)), (1, 4));
    assert_eq!(run_v(&ws, 3), "cached");
}

#[test]
fn gc_collects_nothing_when_a_record_does_not_verify() {
    let ws = Ws::new();
    ws.pipeline(PIPELINE);
    for v in [1, 2] {
        run_v(&ws, v);
    }
    // Tamper with the older entry (the one gc would remove).
    let actions: Vec<_> = std::fs::read_dir(ws.path(".dagrun/cache/actions")).unwrap().flatten().map(|e| e.path()).collect();
    let older = actions.iter().find(|p| !std::fs::read_to_string(p).unwrap().contains("\"v\":2")).unwrap().clone();
    let text = std::fs::read_to_string(&older).unwrap();
    std::fs::remove_file(&older).unwrap(); // a hard link shared with nothing now; write a new file
    std::fs::write(&older, text.replacen("\"seconds\":", "\"seconds\":1", 1)).unwrap();
    let before = (entries(&ws), objects(&ws));
    let g = ws.dagrun(&["gc", "--keep-runs", "0"]);
    assert_eq!(g.code, 4, "{}{}", g.stdout, g.stderr);
    assert!(g.stderr.contains("cannot be verified") && g.stderr.contains("dagrun verify --repair"), "{}", g.stderr);
    assert_eq!((entries(&ws), objects(&ws)), before, "gc deleted something although it refused");
    // After the repair it collects.
    assert_eq!(ws.dagrun(&["verify", "--repair"]).code, 0, "every problem it found is repaired");
    let g = ws.dagrun(&["gc", "--keep-runs", "0"]);
    assert_eq!(g.code, 0, "{}", g.stderr);
    assert_eq!(entries(&ws), 1);
    assert_eq!(run_v(&ws, 2), "cached");
}

#[test]
fn gc_does_not_run_beside_a_run() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  slow:\n    cmd: touch started; sleep 3; echo x > slow.txt\n    outs: [slow.txt]\n");
    let run = spawn(ws.cmd(&["run", "pipeline.yaml"]));
    let t0 = Instant::now();
    while !ws.exists("started") {
        assert!(t0.elapsed() < Duration::from_secs(20), "the stage never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let g = ws.dagrun(&["gc"]);
    assert_eq!(g.code, 75, "{}{}", g.stdout, g.stderr);
    let w = ws.dagrun(&["gc", "--wait", "30"]);
    assert_eq!(w.code, 0, "{}", w.stderr);
    assert_eq!(run.wait(HANG).code, 0);
    assert_eq!(ws.read("slow.txt"), "x\n");
}
