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
