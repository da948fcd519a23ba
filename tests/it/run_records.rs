//! Run records read back from `runs/` are parsed strictly: a record with a
//! value dagrun never writes (here an unknown run status) is named with the
//! reason, never silently dropped when asked for, and never a panic.

use crate::common::*;

#[test]
fn a_record_with_an_unknown_status_is_named() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo hi > a.txt\n    outs: [a.txt]\n");
    let good = ws.run(&[]).ok();
    let good_id = good.rec()["run_id"].as_str().unwrap().to_string();
    // A later record whose status is not one dagrun writes.
    let mut bad = good.rec().clone();
    bad["run_id"] = "20990101-000000-000-abcd".into();
    bad["status"] = "exploded".into();
    ws.write("runs/20990101-000000-000-abcd.json", serde_json::to_vec_pretty(&bad).unwrap());

    for id in ["20990101", "last"] {
        let o = ws.dagrun(&["runs", "show", id, "--json"]);
        assert_eq!(o.code, 2, "runs show {id}: {}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        assert!(o.stderr.contains("runs/20990101-000000-000-abcd.json") && o.stderr.contains("unknown variant `exploded`"), "{}", o.stderr);
        assert!(o.stdout.is_empty(), "{}", o.stdout);
    }
    let o = ws.dagrun(&["report", "20990101"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("runs/20990101-000000-000-abcd.json"), "{}", o.stderr);
    // The listing shows the good record and names the bad one on stderr.
    let o = ws.dagrun(&["runs", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let runs = o.json()["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["run_id"], good_id.as_str());
    assert!(o.stderr.contains("runs/20990101-000000-000-abcd.json") && o.stderr.contains("not listed"), "{}", o.stderr);
    // The good record still shows, byte for byte as written.
    let o = ws.dagrun(&["runs", "show", &good_id, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(&o.json(), good.rec());
}

/// An output path may hold any character a file name may (here a tab): the
/// run record dagrun writes for it reads back (the strict read refuses
/// control characters only where dagrun never writes them).
#[test]
fn a_tab_in_an_output_path_keeps_the_record_readable() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a: {cmd: \"printf x > 'a\tb.txt'\", outs: [\"a\\tb.txt\"]}\n");
    ws.run(&[]).ok();
    let o = ws.dagrun(&["runs", "show", "last"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ws.dagrun(&["runs"]).stderr, "");
}

/// `runs/` that is not a folder is said, not listed as "no runs recorded".
#[test]
fn runs_that_is_not_a_folder_is_named() {
    let ws = Ws::new();
    ws.write("runs", "not a folder\n");
    let o = ws.dagrun(&["runs"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("runs is not a folder, so it holds no run records"), "{}", o.stderr);
}

/// A failed stage's error in the run record quotes the last lines its
/// command wrote to stderr, which may show data: the record, the run's
/// OpenLineage events and its HTML report are private (0600), like the
/// stage log they quote.
#[test]
fn what_quotes_a_commands_stderr_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo 'jane.doe.4711@example.com is not valid' >&2; exit 3\n    outs: [a.txt]\n");
    let o = ws.dagrun(&["run", "pipeline.yaml"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    let id = ws.walk().into_iter().find(|p| p.starts_with("runs/") && p.ends_with(".json")).expect("a run record");
    assert!(ws.read(&id).contains("jane.doe.4711@example.com"), "the record keeps the stderr tail");
    let html = ok_report(&ws);
    let ol = id.replace(".json", ".openlineage.jsonl");
    for f in [id.as_str(), ol.as_str(), html.as_str(), ".dagrun/logs/a.err"] {
        let mode = std::fs::metadata(ws.path(f)).unwrap_or_else(|e| panic!("{f}: {e}")).permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} is {mode:o}");
    }
}

fn ok_report(ws: &Ws) -> String {
    let o = ws.dagrun(&["report", "last"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    ws.walk().into_iter().find(|p| p.starts_with("runs/") && p.ends_with(".html")).expect("an HTML report")
}

/// The run ids whose files are under `runs/` (records, events, reports).
fn run_ids(ws: &Ws) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(ws.path("runs")).unwrap().flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.split('.').next()).map(str::to_string)).collect()
}

/// `runs prune` removes old runs' files (record, events, report) under the
/// lock, and never a run that made a current output, a killed run whose
/// lineage is still open, or a file that is not a record dagrun wrote.
#[test]
fn runs_prune_keeps_the_newest_the_makers_of_current_outputs_and_open_lineage() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  s1:\n    cmd: echo hi > out/a.txt\n    outs: [out/a.txt]\n  s2:\n    cmd: date +%N > out/b.txt\n    outs: [out/b.txt]\n");
    let id = |r: &Run| r.rec()["run_id"].as_str().unwrap().to_string();
    let r1 = id(&ws.run(&[]).ok());
    let forced: Vec<String> = (0..3).map(|_| id(&ws.run(&["--force", "s2"]).ok())).collect();
    ok(ws.dagrun(&["report", &forced[0]]));
    assert!(ws.exists(&format!("runs/{}.html", forced[0])));
    // A killed run: events and an open lineage mark, no record.
    ws.write("killed.yaml", "stages:\n  k:\n    cmd: kill -9 $PPID; sleep 5\n    outs: [k.txt]\n");
    assert_ne!(ws.dagrun(&["run", "killed.yaml"]).code, 0);
    let killed: Vec<String> = run_ids(&ws).into_iter().filter(|i| *i != r1 && !forced.contains(i)).collect();
    assert_eq!(killed.len(), 1, "{:?}", ws.walk());
    let killed = &killed[0];
    ws.write("runs/20200101-000000-000-abcd.json", "not a record\n");

    // Nothing is old yet; the dry run removes nothing.
    let o = ok(ws.dagrun(&["runs", "prune", "--older-than", "1d"]));
    assert!(o.stdout.contains("removed 0 runs"), "{}", o.stdout);
    let before = run_ids(&ws);
    let o = ok(ws.dagrun(&["runs", "prune", "--keep", "0", "--dry-run"]));
    assert_eq!(run_ids(&ws), before);
    assert!(o.stdout.contains(&format!("would remove {}", forced[0])), "{}", o.stdout);
    // The killed run's lineage is open: kept, even with --keep 0.
    let o = ok(ws.dagrun(&["runs", "prune", "--keep", "0"]));
    assert!(o.stderr.contains("20200101-000000-000-abcd.json") && o.stderr.contains("left alone"), "{}", o.stderr);
    let left = run_ids(&ws);
    assert!(left.contains(&r1) && left.contains(&forced[2]) && left.contains(killed), "{left:?}");
    assert!(!left.contains(&forced[0]) && !left.contains(&forced[1]), "{left:?}");
    assert!(!ws.exists(&format!("runs/{}.html", forced[0])) && !ws.exists(&format!("runs/{}.openlineage.jsonl", forced[0])));
    assert!(ws.exists("runs/20200101-000000-000-abcd.json"));
    // The next run closes the killed run's lineage: then it may go.
    let r5 = id(&ws.run(&[]).ok());
    let o = ok(ws.dagrun(&["runs", "prune", "--keep", "1", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["removed"], serde_json::json!([killed]), "{}", o.stdout);
    assert_eq!(v["kept_for_current_outputs"], 2, "{}", o.stdout);
    let left = run_ids(&ws);
    assert_eq!(left, [r1.clone(), forced[2].clone(), r5.clone(), "20200101-000000-000-abcd".to_string()].into_iter().collect(), "{left:?}");
    // `runs show` still finds what made the current outputs.
    ok(ws.dagrun(&["runs", "show", &r1]));
    // A file that cannot go keeps its run whole, record included.
    let r6 = id(&ws.run(&["--force", "s2"]).ok());
    let r7 = id(&ws.run(&["--force", "s2"]).ok());
    std::fs::create_dir(ws.path(&format!("runs/{r5}.html"))).unwrap();
    std::fs::write(ws.path(&format!("runs/{r5}.html/x")), "").unwrap();
    let o = ws.dagrun(&["runs", "prune", "--keep", "1", "--json"]);
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["removed"], serde_json::json!([forced[2], r6]), "{}", o.stdout);
    assert!(ws.exists(&format!("runs/{r5}.json")) && ws.exists(&format!("runs/{r5}.openlineage.jsonl")) && ws.exists(&format!("runs/{r7}.json")));
    // Under the lock: not while a run holds it.
    let lock = std::fs::File::open(ws.path(".dagrun/lock")).unwrap();
    lock.lock().unwrap();
    assert_eq!(ws.dagrun(&["runs", "prune", "--keep", "0"]).code, 75);
}

/// A stage without a state record says why: never run, or its last run
/// failed (which leaves no record), naming that run.
#[test]
fn a_stage_whose_last_run_failed_says_so_not_never_run() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: test -f go && echo hi > a.txt\n    outs: [a.txt]\n");
    let o = ws.dagrun(&["status", "pipeline.yaml"]);
    assert!(o.stdout.contains("no earlier run recorded"), "{}", o.stdout);
    let failed = ws.run(&[]);
    assert_eq!(failed.out.code, 1, "{}", failed.out.stderr);
    let id = failed.rec()["run_id"].as_str().unwrap().to_string();
    let o = ws.dagrun(&["status", "pipeline.yaml"]);
    assert!(o.stdout.contains(&format!("its last run failed (run {id}; `dagrun runs show {id}` says why)")), "{}", o.stdout);
    ws.write("go", "");
    let r = ws.run(&[]).ok();
    let reasons = r.rec()["stages"][0]["reasons"].to_string();
    assert!(reasons.contains(&format!("its last run failed (run {id}")), "{reasons}");
}
