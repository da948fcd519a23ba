//! Failing, retried, timed-out, overlapping and killed runs.

use crate::common::*;
use std::time::{Duration, Instant};

#[test]
fn failed_stage_skips_dependents_and_independent_stages_finish() {
    let ws = Ws::new();
    ws.write("in.txt", "x\n");
    ws.pipeline(
        r#"
stages:
  bad:
    cmd: |
      echo starting; echo "first line of noise" >&2; echo "boom: disk on fire" >&2; exit 3
    deps: [in.txt]
    outs: [bad.txt]
  after_bad:
    cmd: cp bad.txt after.txt
    deps: [bad.txt]
    outs: [after.txt]
  after_after:
    cmd: cp after.txt after2.txt
    deps: [after.txt]
    outs: [after2.txt]
  good:
    cmd: sleep 0.2; cp in.txt good.txt
    deps: [in.txt]
    outs: [good.txt]
  good2:
    cmd: cp good.txt good2.txt
    deps: [good.txt]
    outs: [good2.txt]
"#,
    );
    for jobs in ["1", "4"] {
        let r = ws.run(&["-j", jobs]);
        assert_eq!(r.out.code, 1, "{}", r.out.stderr);
        let st = r.statuses();
        assert_eq!(st["bad"], "failed", "{:#}", r.rec());
        assert_eq!(st["after_bad"], "skipped");
        assert_eq!(st["after_after"], "skipped");
        assert_eq!(r.stage("after_after")["error"], "upstream stage bad failed");
        assert!(["ran", "cached"].contains(&st["good"].as_str()));
        assert!(["ran", "cached"].contains(&st["good2"].as_str()));
        assert_eq!(r.rec()["status"], "failed");
        assert_eq!(r.rec()["exit_code"], 1);
        let e = &r.out.stderr;
        assert!(e.contains("stage bad failed"), "{e}");
        assert!(e.contains("exit status 3"), "{e}");
        assert!(e.contains("boom: disk on fire"), "{e}");
        assert!(e.contains(".dagrun/logs/bad.err"), "{e}");
        assert!(r.stage("bad")["error"].as_str().unwrap().contains("boom: disk on fire"));
        assert!(!ws.exists("after.txt") && !ws.exists("bad.txt"));
        assert_eq!(ws.read("good2.txt"), "x\n");
    }
    // Fixed: the failed part runs, the rest stays cached.
    let p = ws.read("pipeline.yaml").replace("exit 3", "cp in.txt bad.txt");
    ws.pipeline(&p);
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["bad", "after_bad", "after_after"]), "{:#}", r.rec());
    assert_eq!(r.with("cached"), set(&["good", "good2"]));
}

#[test]
fn stage_that_does_not_write_its_output_fails() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo nothing\n    outs: [a.txt]\n  b:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n");
    let r = ws.run(&[]);
    assert_eq!(r.out.code, 1);
    assert_eq!(r.statuses()["a"], "failed");
    assert_eq!(r.statuses()["b"], "skipped");
    assert!(r.out.stderr.contains("did not write its declared output a.txt"), "{}", r.out.stderr);
}

#[test]
fn retries_until_success() {
    let ws = Ws::new();
    ws.pipeline(
        r#"
stages:
  flaky:
    retries: 2
    cmd: n=$(cat tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > tries; [ $n -ge 3 ] || { echo "attempt $n failed" >&2; exit 1; }; echo ok > out.txt
    outs: [out.txt]
"#,
    );
    let r = ws.run(&[]).ok();
    assert_eq!(r.statuses()["flaky"], "ran", "{:#}", r.rec());
    assert_eq!(ws.read("tries").trim(), "3");
    assert_eq!(ws.read("out.txt"), "ok\n");

    // One retry too few: failed after 2 attempts.
    let ws = Ws::new();
    ws.pipeline(&ws_flaky(1));
    let r = ws.run(&[]);
    assert_eq!(r.out.code, 1);
    assert_eq!(r.statuses()["flaky"], "failed");
    assert_eq!(ws.read("tries").trim(), "2");
    assert!(r.out.stderr.contains("failed after 2 attempts"), "{}", r.out.stderr);
    assert!(r.out.stderr.contains("attempt 2 failed"), "{}", r.out.stderr);
}

fn ws_flaky(retries: u32) -> String {
    format!(
        "stages:\n  flaky:\n    retries: {retries}\n    cmd: n=$(cat tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > tries; [ $n -ge 3 ] || {{ echo \"attempt $n failed\" >&2; exit 1; }}; echo ok > out.txt\n    outs: [out.txt]\n"
    )
}

fn alive(pid: i32) -> bool {
    // A zombie (waiting for a reaper that may never come in a container) is dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next().unwrap_or('?')).unwrap_or('?');
            state != 'Z' && state != 'X'
        }
        Err(_) => false,
    }
}

fn pgrep(marker: &str) -> Vec<i32> {
    let out = std::process::Command::new("pgrep").args(["-f", marker]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).filter(|&p| alive(p)).collect()
}

#[test]
fn timeout_kills_the_command_and_its_children() {
    let ws = Ws::new();
    let marker = format!("dagrun-it-timeout-{}-{}", std::process::id(), ws.root.file_name().unwrap().to_string_lossy());
    ws.pipeline(&format!(
        "stages:\n  slow:\n    timeout: 1\n    cmd: sh -c 'sleep 30 & echo $! > child.pid; wait' {marker}; echo done > slow.txt\n    outs: [slow.txt]\n  fast:\n    cmd: echo ok > fast.txt\n    outs: [fast.txt]\n"
    ));
    let t0 = Instant::now();
    let r = ws.run(&[]);
    let took = t0.elapsed();
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(r.statuses()["slow"], "failed");
    assert_eq!(r.statuses()["fast"], "ran");
    let err = r.stage("slow")["error"].as_str().unwrap().to_string();
    assert!(err.contains("timed out after") && err.contains("killed"), "{err}");
    assert!(r.out.stderr.contains("stage slow failed"), "{}", r.out.stderr);
    assert!(!ws.exists("slow.txt"));

    let child: i32 = ws.read("child.pid").trim().parse().unwrap();
    // Give the kernel a moment to deliver the signals (generous).
    let deadline = Instant::now() + Duration::from_secs(5);
    while (alive(child) || !pgrep(&marker).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(child), "the child sleep (pid {child}) outlived the timeout");
    assert_eq!(pgrep(&marker), Vec::<i32>::new(), "processes with the marker remain");
}

#[test]
fn overlapping_runs_lock_and_wait() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  slow:\n    cmd: sleep 3; echo done > slow.txt\n    outs: [slow.txt]\n  next:\n    cmd: cp slow.txt next.txt\n    deps: [slow.txt]\n    outs: [next.txt]\n");
    let first = spawn(ws.cmd(&["run", "pipeline.yaml"]));
    // Wait until run 1 holds the lock (it writes its pid into .dagrun/lock).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(ws.path(".dagrun/lock")).unwrap_or_default().starts_with("pid ") {
        assert!(Instant::now() < deadline, "run 1 never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = ws.run(&[]);
    assert_eq!(second.out.code, 75, "stdout:\n{}\nstderr:\n{}", second.out.stdout, second.out.stderr);
    assert!(second.out.stderr.contains(&format!("locked by pid {}", first.pid())), "{}", second.out.stderr);
    assert!(second.out.stderr.contains("--wait"), "{}", second.out.stderr);
    assert!(second.record.is_none(), "a refused run writes no record");

    // Waits for run 1 (both then write a record): its own record is on stdout.
    let third = spawn(ws.cmd(&["run", "pipeline.yaml", "--wait", "30", "--json"])).wait(HANG);
    assert_eq!(third.code, 0, "{}", third.stderr);
    let rec = third.json();
    let statuses: Vec<(&str, &str)> = rec["stages"].as_array().unwrap().iter().map(|s| (s["stage"].as_str().unwrap(), s["status"].as_str().unwrap())).collect();
    assert_eq!(statuses, [("slow", "cached"), ("next", "cached")], "{rec:#}");

    let first = first.wait(HANG);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(ws.read("next.txt"), "done\n");
}

#[test]
fn sigint_interrupts_kills_the_command_and_records_it() {
    interrupt_kills_the_command_and_records_it(libc::SIGINT);
}

/// A closed terminal or ssh session (SIGHUP) interrupts like Ctrl-C: dagrun
/// once died of it at once and left the command running, orphaned, after
/// the workspace lock was free again.
#[test]
fn sighup_interrupts_kills_the_command_and_records_it() {
    interrupt_kills_the_command_and_records_it(libc::SIGHUP);
}

#[test]
fn sigterm_interrupts_kills_the_command_and_records_it() {
    interrupt_kills_the_command_and_records_it(libc::SIGTERM);
}

fn interrupt_kills_the_command_and_records_it(sig: i32) {
    let ws = Ws::new();
    let marker = format!("dagrun-it-sig{sig}-{}-{}", std::process::id(), ws.root.file_name().unwrap().to_string_lossy());
    ws.pipeline(&format!(
        "stages:\n  slow:\n    cmd: sh -c 'sleep 30 & echo $! > child.pid; wait' {marker}; echo done > slow.txt\n    outs: [slow.txt]\n  after:\n    cmd: cp slow.txt after.txt\n    deps: [slow.txt]\n    outs: [after.txt]\n"
    ));
    let before = ws.record_files();
    let run = spawn(ws.cmd(&["run", "pipeline.yaml"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ws.exists("child.pid") || ws.read("child.pid").trim().is_empty() {
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    signal(run.pid() as i32, sig);
    let out = run.wait(HANG);
    assert_eq!(out.code, 130, "signal {sig}: {}", out.stderr);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    let new: Vec<_> = ws.record_files().difference(&before).cloned().collect();
    assert_eq!(new.len(), 1);
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&new[0]).unwrap()).unwrap();
    assert_eq!(rec["status"], "interrupted", "{rec:#}");
    assert_eq!(rec["exit_code"], 130);
    assert_eq!(rec["stages"][0]["status"], "failed");
    assert_eq!(rec["stages"][1]["status"], "skipped");
    let child: i32 = ws.read("child.pid").trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(child) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(child), "the command's child outlived the interrupt");
    assert_eq!(pgrep(&marker), Vec::<i32>::new());
    assert!(!ws.exists("slow.txt"));
}

const CHAIN: &str = r#"
stages:
  s1:
    cmd: sleep 0.3; (cat in.txt; echo s1) > out/s1.txt
    deps: [in.txt]
    outs: [out/s1.txt]
  s2:
    cmd: sleep 0.3; (cat out/s1.txt; echo s2) > out/s2.txt
    deps: [out/s1.txt]
    outs: [out/s2.txt]
  s3:
    cmd: sleep 0.3; (cat out/s2.txt; echo s3) > out/s3.txt
    deps: [out/s2.txt]
    outs: [out/s3.txt]
  s4:
    cmd: sleep 0.3; (cat out/s1.txt; echo s4) > out/s4.txt
    deps: [out/s1.txt]
    outs: [out/s4.txt]
  s5:
    cmd: sleep 0.3; cat out/s3.txt out/s4.txt > out/s5.txt
    deps: [out/s3.txt, out/s4.txt]
    outs: [out/s5.txt]
  s6:
    cmd: sleep 0.3; mkdir -p out/s6 && cp out/s5.txt out/s6/a && echo s6 > out/s6/b
    deps: [out/s5.txt]
    outs: [out/s6]
"#;

fn temp_files(ws: &Ws) -> Vec<String> {
    ws.walk().into_iter().filter(|p| p.contains(".dagrun-tmp.")).collect()
}

#[test]
fn killed_run_resumes_to_the_same_result() {
    // Reference: an uninterrupted run.
    let reference = Ws::new();
    reference.pipeline(CHAIN);
    reference.write("in.txt", "input\n");
    let want = reference.run(&["-j", "1"]).ok();

    let ws = Ws::new();
    ws.pipeline(CHAIN);
    ws.write("in.txt", "input\n");
    let mut victim = spawn(ws.cmd(&["run", "pipeline.yaml", "-j", "1"]));
    std::thread::sleep(Duration::from_millis(500));
    signal(victim.pid() as i32, libc::SIGKILL);
    let _ = victim.child.wait();
    assert!(!ws.exists("out/s6"), "the run finished before it was killed; the test proves nothing");
    // Let the orphaned command of the killed run (it had its own process
    // group) finish before resuming; it writes the same bytes anyway.
    std::thread::sleep(Duration::from_millis(800));

    let r = ws.run(&[]).ok();
    assert!(r.ran().contains("s6"), "{:#}", r.rec());
    assert_eq!(r.statuses().len(), 6);
    assert_eq!(r.outputs(), want.outputs(), "resumed outputs differ from an uninterrupted run");
    assert_eq!(ws.read("out/s5.txt"), reference.read("out/s5.txt"));
    assert_eq!(temp_files(&ws), Vec::<String>::new());
    // And it is complete: nothing left to do.
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("cached").len(), 6, "{:#}", r.rec());
}

#[test]
fn temp_files_left_by_a_killed_run_are_swept() {
    let ws = Ws::new();
    ws.pipeline(CHAIN);
    ws.write("in.txt", "input\n");
    ws.run(&[]).ok();
    // What a SIGKILL in the middle of an atomic write leaves behind, wherever
    // dagrun writes atomically: outputs, state, action cache, object store,
    // the hash memo, run records.
    let pid = 4_000_000; // no such process
    let objects: Vec<_> =
        std::fs::read_dir(ws.path(".dagrun/cache/objects")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let planted = [
        format!("out/.s3.txt.dagrun-tmp.{pid}.0"),
        format!(".dagrun/state/.s2.json.dagrun-tmp.{pid}.1"),
        format!(".dagrun/cache/actions/.abc.json.dagrun-tmp.{pid}.2"),
        format!(".dagrun/cache/objects/{}/.cdef.dagrun-tmp.{pid}.3", objects[0]),
        format!(".dagrun/.hashmemo.json.dagrun-tmp.{pid}.4"),
        format!("runs/.20990101-000000-000-abcd.json.dagrun-tmp.{pid}.5"),
    ];
    for p in &planted {
        ws.write(p, "partial plaintext");
    }
    // A killed run also leaves its line in the lock (it never released it):
    // that is what makes the next run sweep (`workspace::lock`).
    ws.write(".dagrun/lock", format!("pid {pid} (dagrun run pipeline.yaml, started 2026-12-05T00:00:00Z)"));
    ws.run(&[]).ok();
    assert_eq!(temp_files(&ws), Vec::<String>::new());
}

/// The sweep runs only after an unclean end: a real SIGKILL leaves the lock
/// unclean (the next run sweeps), a clean run leaves it clean (the next run
/// lists no cache folder), and a run that sweeps cleans the mark.
#[test]
fn only_a_run_after_an_unclean_end_sweeps() {
    let ws = Ws::new();
    ws.pipeline(CHAIN);
    ws.write("in.txt", "input\n");
    ws.run(&[]).ok();
    assert!(ws.read(".dagrun/lock").starts_with("released "), "{}", ws.read(".dagrun/lock"));
    // Not a killed run's leftover (the lock is clean): left alone by the next run.
    ws.write("out/.s9.txt.dagrun-tmp.4000000.0", "not dagrun's");
    ws.run(&[]).ok();
    assert_eq!(temp_files(&ws), vec!["out/.s9.txt.dagrun-tmp.4000000.0".to_string()]);
    // A real SIGKILL mid-run: the lock keeps the killed run's line, and the next run sweeps.
    ws.write("in.txt", "changed\n");
    let mut victim = spawn(ws.cmd(&["run", "pipeline.yaml", "-j", "1"]));
    std::thread::sleep(Duration::from_millis(400));
    signal(victim.pid() as i32, libc::SIGKILL);
    let _ = victim.child.wait();
    assert!(ws.read(".dagrun/lock").starts_with("pid "), "{}", ws.read(".dagrun/lock"));
    std::thread::sleep(Duration::from_millis(800));
    ws.run(&[]).ok();
    assert_eq!(temp_files(&ws), Vec::<String>::new());
    assert!(ws.read(".dagrun/lock").starts_with("released "));
}

/// `dagrun run … | head`, or a log collector that went away: a closed stdout
/// must neither hang nor fail the run (it once panicked a worker thread on
/// the first progress line and left the run waiting forever), and the
/// commands that only print end quietly, as `ls | head` does.
#[test]
fn a_closed_stdout_neither_hangs_nor_fails_a_run() {
    use std::process::Stdio;
    let ws = Ws::new();
    let mut yaml = String::from("stages:\n");
    for i in 0..20 {
        yaml.push_str(&format!("  s{i}:\n    cmd: echo {i} > o{i}.txt\n    outs: [o{i}.txt]\n"));
    }
    ws.pipeline(&yaml);
    let closed_stdout = |args: &[&str]| {
        let mut cmd = ws.cmd(args);
        // The reader is gone before dagrun starts: every write to stdout fails.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        cmd.stdin(Stdio::null()).stdout(writer).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                return (st, err);
            }
            if t0.elapsed() > HANG {
                let _ = child.kill();
                panic!("dagrun {args:?} hung with a closed stdout");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (st, err) = closed_stdout(&["-v", "run", "pipeline.yaml"]);
    assert!(st.success(), "{st:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for i in 0..20 {
        assert_eq!(ws.read(&format!("o{i}.txt")), format!("{i}\n"));
    }
    // Printed nothing (no reader), but the run is recorded and complete.
    assert_eq!(ws.run(&[]).ok().with("cached").len(), 20);
    let (st, err) = closed_stdout(&["run", "--json", "pipeline.yaml"]);
    assert!(st.success(), "{st:?}: {err}");
    // A command that only prints: ended by SIGPIPE like any Unix tool, no
    // panic message (`verify`, `keys list` and the others once panicked: exit 101).
    use std::os::unix::process::ExitStatusExt;
    for args in [
        &["status", "pipeline.yaml"][..],
        &["run", "-n", "pipeline.yaml"],
        &["run", "-n", "--json", "pipeline.yaml"],
        &["dag", "pipeline.yaml"],
        &["runs"],
        &["runs", "show", "last"],
        &["verify"],
        &["verify", "--json"],
        &["keys", "list"],
        &["keys", "audit"],
        &["models", "list"],
        &["tokens", "list"],
    ] {
        let (st, err) = closed_stdout(args);
        assert_eq!(st.signal(), Some(libc::SIGPIPE), "dagrun {args:?}: {st:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "dagrun {args:?}: {st:?}: {err}");
    }
    // A token is shown once: one that cannot be printed is revoked, not left working and unknown.
    let (st, err) = closed_stdout(&["tokens", "create", "Tenant_A"]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("it is revoked: create another"), "{err}");
    let list = ws.dagrun(&["tokens", "list"]);
    assert!(list.stdout.contains("revoked") && !list.stdout.contains("active"), "{}", list.stdout);
    // Standard output closed outright (`>&-`: Rust's runtime makes it
    // /dev/null) or /dev/null (helper-71: exit 0, the token active and shown
    // to nobody): refused before a token exists.
    let mut c = ws.cmd(&["tokens", "create", "Tenant_A", "--name", "unseen"]);
    c.stdin(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: close(2) is async-signal-safe; nothing else runs in the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            libc::close(1);
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("standard output is /dev/null or another device that is not a terminal (or was closed)") && err.contains("nothing was created"),
        "{err}"
    );
    let o = ws.cmd(&["tokens", "create", "Tenant_A", "--name", "unseen"]).stdout(std::fs::File::create("/dev/zero").unwrap()).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "/dev/zero: {}", String::from_utf8_lossy(&o.stderr));
    let o = ws.cmd(&["tokens", "create", "Tenant_A", "--name", "unseen"]).stdout(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!ws.dagrun(&["tokens", "list"]).stdout.contains("unseen"));
    // A command that has changed something reports it, and exits 0 even when
    // nobody reads the report: a death by SIGPIPE would make a script take
    // the rotation (or the shredding) for a failure and repeat it.
    dagrun::crypto::Keyring::open(ws.root.as_path()).unwrap().active_data_key_id("Tenant_A").unwrap();
    let (st, err) = closed_stdout(&["keys", "rotate", "Tenant_A"]);
    assert!(st.success(), "{st:?}: {err}");
    assert!(!err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("warning"), "{err}");
    let ring = dagrun::crypto::Keyring::open(ws.root.as_path()).unwrap();
    assert_eq!(ring.active_key_id("Tenant_A").unwrap().as_deref(), Some("Tenant_A-dk-2"));
    drop(ring);
    let (st, err) = closed_stdout(&["keys", "forget", "Tenant_A", "--yes"]);
    assert!(st.success(), "{st:?}: {err}");
    let remote = format!("file://{}", ws.path("remote").display());
    let (st, err) = closed_stdout(&["push", "--json", "--remote", &remote]);
    assert!(st.success(), "push --json: {st:?}: {err}");
    assert!(ws.path("remote").read_dir().unwrap().next().is_some(), "nothing was pushed");
    assert!(dagrun::crypto::Keyring::open(ws.root.as_path()).unwrap().is_forgotten("Tenant_A").is_some());
}

/// A `cmd` stage that fails for good (an error, a timeout, an interrupt)
/// leaves nothing at its outputs: what is there is its failed attempt's, and
/// left in place the next run called it the user's edit. Its run record
/// keeps its key and reasons; `--json` prints the failed run's record.
#[test]
fn a_failed_stage_leaves_no_partial_output() {
    let ws = Ws::new();
    ws.pipeline("params:\n  v: 1\nstages:\n  s:\n    cmd: echo \"partial ${params.v}\" > s.txt; test ${params.v} = 1 || { [ ${params.v} = 3 ] && sleep 30; exit 3; }\n    outs: [s.txt]\n");
    ws.run(&[]).ok();
    assert_eq!(ws.read("s.txt"), "partial 1\n");
    let o = ws.dagrun(&["run", "pipeline.yaml", "-p", "v=2", "--json"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("stage s failed: removed what its attempt had written at s.txt"), "{}", o.stderr);
    assert!(!ws.exists("s.txt"));
    let rec = o.json();
    // The error ends with what the run did and where its record is (the
    // workspace is the current folder: the path is relative to it).
    let tally = "1 stage: 0 ran, 0 restored, 0 cached, 1 failed (";
    let id = rec["run_id"].as_str().unwrap();
    assert!(o.stderr.contains(tally) && o.stderr.contains(&format!("run {id}); recorded in runs/{id}.json")), "{}", o.stderr);
    assert_eq!(rec["status"], "failed");
    let s = &rec["stages"][0];
    assert_eq!(s["status"], "failed");
    assert!(s["key"].as_str().is_some_and(|k| k.len() == 64), "{rec:#}");
    assert!(s["reasons"].to_string().contains("param v"), "{rec:#}");
    // Back to v=1: the recorded output comes back from the cache, named as missing.
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["s"]), "{:#}", r.rec());
    assert!(r.stage("s")["reasons"].to_string().contains("output s.txt is missing"), "{:#}", r.rec());
    assert_eq!(ws.read("s.txt"), "partial 1\n");
    // Interrupted mid-stage: the same.
    let bg = spawn(ws.cmd(&["run", "pipeline.yaml", "-p", "v=3"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(ws.path("s.txt")).unwrap_or_default() != "partial 3\n" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(signal(bg.pid() as i32, libc::SIGINT));
    let o = bg.wait(HANG);
    assert_eq!(o.code, 130, "{}", o.stderr);
    assert!(!ws.exists("s.txt"), "{}", o.stderr);
    assert!(
        o.stderr.contains("error: interrupted — 1 stage: 0 ran, 0 restored, 0 cached, 1 failed (") && o.stderr.contains("recorded in runs/"),
        "{}",
        o.stderr
    );
    assert_eq!(ws.run(&[]).ok().with("restored"), set(&["s"]));
}

/// Review 39: a folder on an output's path swapped for a link while the
/// stage ran (here to a folder of the user's): the failed stage's clean-up
/// removes nothing through it.
#[test]
fn a_failed_stage_removes_nothing_through_a_link_swapped_in_while_it_ran() {
    let ws = Ws::new();
    ws.write("keep/x.txt", "USER\n");
    std::fs::create_dir_all(ws.path("o")).unwrap();
    ws.pipeline("stages:\n  a:\n    cmd: sleep 1; exit 1\n    outs: [o/x.txt]\n");
    let bg = spawn(ws.cmd(&["run", "pipeline.yaml"]));
    std::thread::sleep(Duration::from_millis(400));
    std::fs::remove_dir_all(ws.path("o")).unwrap();
    std::os::unix::fs::symlink("keep", ws.path("o")).unwrap();
    let o = bg.wait(HANG);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_eq!(ws.read("keep/x.txt"), "USER\n", "{}", o.stderr);
    assert!(!o.stderr.contains("removed what its attempt had written"), "{}", o.stderr);
}
