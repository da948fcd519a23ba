//! Cache behaviour of `dagrun run`, checked through run records: what runs,
//! what is cached, what is restored, and why.

use crate::common::*;
use std::process::Command;

/// A diamond a → {b, c} → d fed by src.txt, plus an independent chain
/// e → f → g fed by other.txt. Every command appends a line to log/NAME
/// (outside its outs) so a test can tell whether it executed.
const DIAMOND: &str = r#"
params:
  n: 3
  m: 7
stages:
  a:
    cmd: echo run >> log/a; cat src.txt > a.txt
    deps: [src.txt]
    outs: [a.txt]
  b:
    cmd: echo run >> log/b; (cat a.txt; echo n=${params.n}) > b.txt
    deps: [a.txt]
    outs: [b.txt]
  c:
    cmd: echo run >> log/c; tr a-z A-Z < a.txt > c.txt
    deps: [a.txt]
    outs: [c.txt]
  d:
    cmd: echo run >> log/d; cat b.txt c.txt > d.txt
    deps: [b.txt, c.txt]
    outs: [d.txt]
  e:
    cmd: echo run >> log/e; (cat other.txt; echo m=${params.m}) > e.txt
    deps: [other.txt]
    outs: [e.txt]
  f:
    cmd: echo run >> log/f; wc -c < e.txt | tr -d ' ' > f.txt
    deps: [e.txt]
    outs: [f.txt]
  g:
    cmd: echo run >> log/g; (echo size; cat f.txt) > g.txt
    deps: [f.txt]
    outs: [g.txt]
"#;

const ALL: [&str; 7] = ["a", "b", "c", "d", "e", "f", "g"];

fn diamond() -> Ws {
    let ws = Ws::new();
    ws.pipeline(DIAMOND);
    ws.write("src.txt", "hello\n");
    ws.write("other.txt", "apples\n");
    std::fs::create_dir_all(ws.path("log")).unwrap();
    ws
}

/// Cold run, asserting everything ran once.
fn cold(ws: &Ws) {
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&ALL), "{:#}", r.rec());
    for s in ALL {
        assert_eq!(ws.count(&format!("log/{s}")), 1, "stage {s}");
    }
}

fn counts(ws: &Ws) -> Vec<usize> {
    ALL.iter().map(|s| ws.count(&format!("log/{s}"))).collect()
}

fn set_param(ws: &Ws, from: &str, to: &str) {
    let p = ws.read("pipeline.yaml");
    assert!(p.contains(from));
    ws.write("pipeline.yaml", p.replacen(from, to, 1));
}

#[test]
fn second_run_does_nothing() {
    let ws = diamond();
    cold(&ws);
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("cached"), set(&ALL), "{:#}", r.rec());
    assert_eq!(counts(&ws), vec![1; 7]);
    assert_eq!(r.rec()["status"], "ok");
    assert_eq!(r.rec()["exit_code"], 0);
}

#[test]
fn changed_input_reruns_exactly_its_downstream() {
    let ws = diamond();
    cold(&ws);
    ws.write("src.txt", "hello, world\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["a", "b", "c", "d"]), "{:#}", r.rec());
    assert_eq!(r.with("cached"), set(&["e", "f", "g"]));
    assert_eq!(counts(&ws), vec![2, 2, 2, 2, 1, 1, 1]);
    assert_eq!(ws.read("d.txt"), "hello, world\nn=3\nHELLO, WORLD\n");
    let why = r.stage("a")["reasons"].to_string();
    assert!(why.contains("src.txt changed"), "{why}");
}

#[test]
fn param_change_reruns_referencing_stages_and_dependents() {
    let ws = diamond();
    cold(&ws);
    set_param(&ws, "n: 3", "n: 4");

    // status names the param before anything runs.
    let st = ws.dagrun(&["status", "pipeline.yaml", "--json"]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    let rows = st.json()["stages"].as_array().unwrap().clone();
    let stale: Vec<&str> = rows.iter().filter(|r| r["state"] == "stale").map(|r| r["stage"].as_str().unwrap()).collect();
    assert_eq!(stale, ["b", "d"], "{rows:#?}");
    let b = rows.iter().find(|r| r["stage"] == "b").unwrap();
    assert_eq!(b["action"], "run");
    assert!(b["reasons"].as_array().unwrap().iter().any(|x| x == "param n: 3 → 4"), "{b:#}");
    assert!(rows.iter().filter(|r| r["state"] == "fresh").all(|r| r["action"] == "none"));
    assert_eq!(counts(&ws), vec![1; 7], "status must not run anything");

    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["b", "d"]), "{:#}", r.rec());
    assert_eq!(r.with("cached"), set(&["a", "c", "e", "f", "g"]));
    assert!(r.stage("b")["reasons"].as_array().unwrap().iter().any(|x| x == "param n: 3 → 4"));
    assert!(ws.read("d.txt").contains("n=4"));
}

#[test]
fn command_line_param_override_counts_like_an_edit() {
    let ws = diamond();
    cold(&ws);
    let r = ws.run(&["-p", "n=5"]).ok();
    assert_eq!(r.ran(), set(&["b", "d"]), "{:#}", r.rec());
    assert!(ws.read("b.txt").contains("n=5"));
}

#[test]
fn deleted_output_is_restored_without_running() {
    let ws = diamond();
    cold(&ws);
    let before = ws.read("c.txt");
    std::fs::remove_file(ws.path("c.txt")).unwrap();
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["c"]), "{:#}", r.rec());
    assert_eq!(r.with("cached").len(), 6);
    assert_eq!(ws.read("c.txt"), before);
    assert_eq!(counts(&ws), vec![1; 7], "nothing may execute");
    let why = r.stage("c")["reasons"].to_string();
    assert!(why.contains("c.txt is missing"), "{why}");
}

#[test]
fn hand_edited_output_is_restored() {
    let ws = diamond();
    cold(&ws);
    let before = ws.read("d.txt");
    ws.write("d.txt", "tampered\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["d"]), "{:#}", r.rec());
    assert_eq!(ws.read("d.txt"), before);
    assert_eq!(counts(&ws), vec![1; 7]);
    let why = r.stage("d")["reasons"].to_string();
    assert!(why.contains("modified outside dagrun"), "{why}");
    // Same size edit, right after the previous run: still seen.
    let before_b = ws.read("b.txt");
    let same_len: String = before_b.chars().map(|c| if c == 'h' { 'j' } else { c }).collect();
    assert_ne!(same_len, before_b);
    ws.write("b.txt", &same_len);
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["b"]), "{:#}", r.rec());
    assert_eq!(ws.read("b.txt"), before_b);
}

#[test]
fn param_changed_back_restores_without_recomputing() {
    let ws = diamond();
    cold(&ws);
    let d3 = ws.read("d.txt");
    set_param(&ws, "n: 3", "n: 4");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["b", "d"]));
    assert_eq!(counts(&ws), vec![1, 2, 1, 2, 1, 1, 1]);

    set_param(&ws, "n: 4", "n: 3");
    let st = ws.dagrun(&["status", "pipeline.yaml", "--json"]).json();
    let b = st["stages"].as_array().unwrap().iter().find(|r| r["stage"] == "b").unwrap().clone();
    assert_eq!(b["action"], "restore", "{b:#}");
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["b", "d"]), "{:#}", r.rec());
    assert!(r.ran().is_empty());
    assert_eq!(counts(&ws), vec![1, 2, 1, 2, 1, 1, 1], "nothing may be recomputed");
    assert_eq!(ws.read("d.txt"), d3);
    // And then it is all up to date.
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("cached"), set(&ALL));
}

#[test]
fn early_cutoff_keeps_dependents_cached() {
    let ws = diamond();
    cold(&ws);
    let f_before = ws.read("f.txt");
    // Same length: e's output changes, f (a byte count) does not.
    ws.write("other.txt", "pears!\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["e", "f"]), "{:#}", r.rec());
    assert_eq!(r.stage("e")["outputs_changed"], true);
    assert_eq!(r.stage("f")["outputs_changed"], false, "{:#}", r.stage("f"));
    assert_eq!(r.stage("g")["status"], "cached");
    assert_eq!(ws.count("log/g"), 1);
    assert_eq!(ws.read("f.txt"), f_before);
}

#[test]
fn force_reruns_everything() {
    let ws = diamond();
    cold(&ws);
    let r = ws.run(&["--force"]).ok();
    assert_eq!(r.ran(), set(&ALL), "{:#}", r.rec());
    assert_eq!(counts(&ws), vec![2; 7]);
    let forced: Vec<&str> = r.rec()["forced"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(forced, ALL);
    // Identical outputs: nothing changed.
    assert!(r.stages().iter().all(|s| s["outputs_changed"] == false), "{:#}", r.rec());
}

#[test]
fn force_one_stage_reruns_it_and_its_downstream() {
    let ws = diamond();
    cold(&ws);
    let r = ws.run(&["--force", "b"]).ok();
    assert_eq!(r.ran(), set(&["b", "d"]), "{:#}", r.rec());
    assert_eq!(r.with("cached"), set(&["a", "c", "e", "f", "g"]));
    assert_eq!(counts(&ws), vec![1, 2, 1, 2, 1, 1, 1]);
}

#[test]
fn targets_run_only_them_and_their_upstream() {
    let ws = diamond();
    let r = ws.run(&["b"]).ok();
    assert_eq!(r.statuses().keys().cloned().collect::<Vec<_>>(), ["a", "b"], "{:#}", r.rec());
    assert_eq!(r.ran(), set(&["a", "b"]));
    for absent in ["c.txt", "d.txt", "e.txt", "log/c", "log/e"] {
        assert!(!ws.exists(absent), "{absent} should not exist");
    }
    assert_eq!(r.rec()["targets"], serde_json::json!(["b"]));
    // A later full run does the rest only.
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["c", "d", "e", "f", "g"]));
    assert_eq!(r.with("cached"), set(&["a", "b"]));
}

#[test]
fn runs_from_another_cwd_and_with_an_empty_environment() {
    let ws = diamond();
    let abs = ws.path("pipeline.yaml");
    let abs = abs.to_str().unwrap();

    let root_runs_before = std::path::Path::new("/runs").exists();
    let mut c = Command::new(BIN);
    c.args(["run", abs]).current_dir("/");
    let r = ws.run_cmd(c).ok();
    assert_eq!(r.ran(), set(&ALL), "{:#}", r.rec());
    assert_eq!(std::path::Path::new("/runs").exists(), root_runs_before, "the record belongs in the workspace");

    // env -i PATH=/usr/bin:/bin, from yet another folder.
    let other = tempfile::tempdir().unwrap();
    ws.write("src.txt", "changed\n");
    let mut c = Command::new(BIN);
    c.args(["run", abs]).current_dir(other.path()).env_clear().env("PATH", "/usr/bin:/bin");
    let r = ws.run_cmd(c).ok();
    assert_eq!(r.ran(), set(&["a", "b", "c", "d"]), "{:#}", r.rec());
    assert_eq!(r.with("cached"), set(&["e", "f", "g"]));
    assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0, "nothing written to the cwd");

    // No environment at all (not even PATH): commands still find sh and coreutils.
    let mut c = Command::new(BIN);
    c.args(["run", abs, "--force", "c"]).current_dir("/").env_clear();
    let r = ws.run_cmd(c).ok();
    assert_eq!(r.ran(), set(&["c", "d"]), "{:#}", r.rec());
}

#[test]
fn pipeline_in_a_subfolder_uses_the_enclosing_workspace() {
    let ws = Ws::new();
    ws.write("data/in.txt", "x\n");
    ws.write("pipelines/p.yaml", "stages:\n  s:\n    cmd: cp data/in.txt out.txt\n    deps: [data/in.txt]\n    outs: [out.txt]\n");
    let mut c = Command::new(BIN);
    c.args(["run", "p.yaml"]).current_dir(ws.path("pipelines"));
    let r = ws.run_cmd(c).ok();
    assert_eq!(r.ran(), set(&["s"]));
    assert_eq!(ws.read("out.txt"), "x\n");
    assert_eq!(r.rec()["pipeline"], "pipelines/p.yaml");
}

const TENANTS: &str = r#"
stages:
  prep:
    foreach: tenants
    cmd: tr a-z A-Z < data/${tenant}.txt > out/prep_${tenant}.txt
    deps: ["data/${tenant}.txt"]
    outs: ["out/prep_${tenant}.txt"]
  train:
    foreach: tenants
    cmd: (echo model for $DAGRUN_TENANT; cat out/prep_${tenant}.txt) > out/model_${tenant}.txt
    deps: ["out/prep_${tenant}.txt"]
    outs: ["out/model_${tenant}.txt"]
  report:
    cmd: cat out/model_A.txt out/model_B.txt out/model_C.txt > report.txt
    deps: [out/model_A.txt, out/model_B.txt, out/model_C.txt]
    outs: [report.txt]
"#;

#[test]
fn foreach_tenants_reruns_only_the_changed_tenant() {
    let ws = Ws::new();
    ws.write("config/tenants.yaml", "tenants:\n  - id: A\n    share: 0.5\n  - id: B\n    share: 0.25\n  - id: C\n    share: 0.25\n");
    for t in ["A", "B", "C"] {
        ws.write(&format!("data/{t}.txt"), format!("rows of {t}\n"));
    }
    ws.pipeline(TENANTS);
    let r = ws.run(&[]).ok();
    let all = set(&["prep[A]", "prep[B]", "prep[C]", "train[A]", "train[B]", "train[C]", "report"]);
    assert_eq!(r.ran(), all, "{:#}", r.rec());
    assert_eq!(ws.read("out/model_B.txt"), "model for B\nROWS OF B\n");

    ws.write("data/B.txt", "new rows of B\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["prep[B]", "train[B]", "report"]), "{:#}", r.rec());
    assert_eq!(r.with("cached"), set(&["prep[A]", "prep[C]", "train[A]", "train[C]"]));

    // One tenant's instance as a target.
    ws.write("data/C.txt", "new rows of C\n");
    let r = ws.run(&["train[C]"]).ok();
    assert_eq!(r.statuses().keys().cloned().collect::<Vec<_>>(), ["prep[C]", "train[C]"]);
    assert_eq!(r.ran(), set(&["prep[C]", "train[C]"]));
}

#[test]
fn dag_dot_is_valid() {
    let ws = diamond();
    let out = ws.dagrun(&["dag", "pipeline.yaml", "--format", "dot"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let dot = out.stdout.trim();
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.ends_with('}'), "{dot}");
    assert_eq!(dot.matches('{').count(), dot.matches('}').count());
    let mut edges = std::collections::BTreeSet::new();
    for line in dot.lines().filter(|l| l.contains("->")) {
        let l = line.trim().trim_end_matches(';');
        let parts: Vec<&str> = l.split(" -> ").collect();
        assert_eq!(parts.len(), 2, "{line}");
        for p in &parts {
            assert!(p.len() >= 3 && p.starts_with('"') && p.ends_with('"'), "unquoted node in {line}");
        }
        edges.insert((parts[0].trim_matches('"').to_string(), parts[1].trim_matches('"').to_string()));
    }
    let want: std::collections::BTreeSet<(String, String)> =
        [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("e", "f"), ("f", "g")].iter().map(|(x, y)| (x.to_string(), y.to_string())).collect();
    assert_eq!(edges, want);
    for s in ALL {
        assert!(dot.contains(&format!("\"{s}\" [label=")), "node {s} missing");
    }
    // The real parser, when installed.
    if let Ok(mut child) =
        Command::new("dot").arg("-Tsvg").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn()
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(out.stdout.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "dot rejects the output: {}", String::from_utf8_lossy(&o.stderr));
    }
    // Tenant instance names (with brackets) stay valid too.
    let ws2 = Ws::new();
    ws2.write("config/tenants.yaml", "tenants:\n  - id: A\n  - id: B\n  - id: C\n");
    ws2.pipeline(TENANTS);
    let out = ws2.dagrun(&["dag", "pipeline.yaml", "--format", "dot"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("\"prep[A]\" -> \"train[A]\";"), "{}", out.stdout);
    assert!(out.stdout.contains("\"train[C]\" -> \"report\";"), "{}", out.stdout);
}

#[test]
fn dag_mermaid_keeps_stages_whose_names_differ_only_in_punctuation_apart() {
    // `a-b` and `a_b` are two stages; `c` reads only what `a-b` writes.
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  a-b:\n    cmd: echo 1 > x.txt\n    outs: [x.txt]\n  a_b:\n    cmd: echo 2 > y.txt\n    outs: [y.txt]\n  c:\n    cmd: cat x.txt > z.txt\n    deps: [x.txt]\n    outs: [z.txt]\n",
    );
    let out = ws.dagrun(&["dag", "pipeline.yaml", "--format", "mermaid"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id_of = |label: &str| {
        let line = out.stdout.lines().find(|l| l.contains(&format!("[\"{label} (cmd)\"]"))).unwrap_or_else(|| panic!("no node {label}:\n{}", out.stdout));
        line.trim().split('[').next().unwrap().to_string()
    };
    let (ab_dash, ab_under, c) = (id_of("a-b"), id_of("a_b"), id_of("c"));
    assert_ne!(ab_dash, ab_under, "two stages drawn as one node:\n{}", out.stdout);
    let edges: Vec<&str> = out.stdout.lines().filter(|l| l.contains("-->")).map(str::trim).collect();
    assert_eq!(edges, [format!("{ab_dash} --> {c}")], "{}", out.stdout);
}

#[test]
fn lineage_goes_back_to_the_source_with_hashes() {
    let ws = diamond();
    let r = ws.run(&[]).ok();
    let out = ws.dagrun(&["lineage", "d.txt", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let d = out.json();
    let outputs = r.outputs();
    assert_eq!(d["path"], "d.txt");
    assert_eq!(d["stage"], "d");
    assert_eq!(d["hash"], outputs["d"]["d.txt"]);
    assert_eq!(d["hash"].as_str().unwrap(), b3(&ws.path("d.txt")));
    assert_eq!(d["modified"], false);
    assert_eq!(d["run_id"], r.rec()["run_id"]);
    // d.txt ← b.txt ← a.txt ← src.txt (source)
    let b = d["inputs"].as_array().unwrap().iter().find(|x| x["path"] == "b.txt").expect("b.txt in d's inputs").clone();
    assert_eq!(b["stage"], "b");
    assert_eq!(b["hash"], outputs["b"]["b.txt"]);
    assert_eq!(b["param_refs"]["n"], 3);
    let a = &b["inputs"][0];
    assert_eq!(a["path"], "a.txt");
    assert_eq!(a["stage"], "a");
    assert_eq!(a["hash"], outputs["a"]["a.txt"]);
    let src = &a["inputs"][0];
    assert_eq!(src["path"], "src.txt");
    assert_eq!(src["source"], true);
    assert_eq!(src["hash"].as_str().unwrap(), b3(&ws.path("src.txt")));
    assert_eq!(src["modified"], false);
    // Editing the source shows up as modified.
    ws.write("src.txt", "edited\n");
    let d = ws.dagrun(&["lineage", "d.txt", "--json"]).json();
    let src = &d["inputs"].as_array().unwrap().iter().find(|x| x["path"] == "b.txt").unwrap()["inputs"][0]["inputs"][0];
    assert_eq!(src["modified"], true, "{src:#}");
    // A path no stage made is a config error.
    let out = ws.dagrun(&["lineage", "src.txt", "--json"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
}

#[test]
fn runs_list_and_show_shapes() {
    let ws = diamond();
    let r1 = ws.run(&[]).ok();
    ws.write("src.txt", "v2\n");
    let r2 = ws.run(&[]).ok();

    let out = ws.dagrun(&["runs", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list = out.json();
    let runs = list["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["run_id"], r1.rec()["run_id"]);
    assert_eq!(runs[1]["run_id"], r2.rec()["run_id"]);
    for r in runs {
        for k in ["run_id", "pipeline", "started_at", "seconds", "status", "exit_code"] {
            assert!(r.get(k).is_some(), "runs --json item lacks {k}: {r:#}");
        }
        assert_eq!(r["status"], "ok");
        assert_eq!(r["pipeline"], "pipeline.yaml");
    }

    let out = ws.dagrun(&["runs", "show", "last", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let last = out.json();
    assert_eq!(&last, r2.rec());
    for k in ["run_id", "pipeline", "started_at", "finished_at", "seconds", "status", "exit_code", "targets", "forced", "stages"] {
        assert!(last.get(k).is_some(), "record lacks {k}");
    }
    for s in last["stages"].as_array().unwrap() {
        assert!(s["stage"].is_string() && s["status"].is_string() && s["seconds"].is_number(), "{s:#}");
        assert!(["ran", "cached", "restored", "failed", "skipped"].contains(&s["status"].as_str().unwrap()));
        assert!(s["key"].as_str().is_some_and(|k| k.len() == 64), "{s:#}");
        assert!(s["outputs"].is_object());
    }
    // By id prefix, and the text forms.
    let id = r1.rec()["run_id"].as_str().unwrap();
    let shown = ws.dagrun(&["runs", "show", id, "--json"]).json();
    assert_eq!(&shown, r1.rec());
    let text = ws.dagrun(&["runs"]);
    assert!(text.stdout.contains(id) && text.stdout.contains("7 ran"), "{}", text.stdout);
    // Helper-65: a pipeline path longer than the old 24-character column
    // pushed its line's counts out of the STAGES column (then lowercase).
    let long = "pipelines/a-rather-long-folder-name/p.yaml";
    ws.write(long, "stages:\n  a: {cmd: echo a > long-a.txt, outs: [long-a.txt]}\n");
    assert_eq!(ws.dagrun(&["run", long]).code, 0);
    let text = ws.dagrun(&["runs"]).stdout;
    let header = text.lines().next().unwrap();
    let col = header.find("STAGES").unwrap_or_else(|| panic!("no STAGES column:\n{text}"));
    for line in text.lines().skip(1) {
        assert!(line[col..].starts_with(|c: char| c.is_ascii_digit()) && line[..col].ends_with(' '), "not in the STAGES column:\n{text}");
    }
    assert!(text.contains(long), "{text}");
    let missing = ws.dagrun(&["runs", "show", "19700101", "--json"]);
    assert_eq!(missing.code, 2);
}

/// The cache-key format, pinned (as turborepo pins its task hashes): a known
/// pipeline on a known input has exactly this key. A change to what goes into
/// a key (engine/fingerprint.rs), to its encoding, or to a kind's version makes
/// this fail; update the expected key only on purpose, with the reason in the
/// commit (every workspace's cache is invalidated by such a change).
#[test]
fn cache_key_format_is_pinned() {
    let ws = Ws::new();
    ws.pipeline(
        r#"params:
  greeting: hello
stages:
  copy:
    cmd: cp in.txt out.txt && echo ${params.greeting} >> out.txt
    deps: [in.txt]
    outs: [out.txt]
    env:
      LANG: C
"#,
    );
    ws.write("in.txt", "pinned input\n");
    let r = ws.run(&[]).ok();
    let key = r.stage("copy")["key"].as_str().unwrap_or_else(|| panic!("no key in {:#}", r.rec())).to_string();
    assert_eq!(
        key, "17543fa06a9c4a245a0d2a796dea6ee3a076d1322b6a8c5a72457e3a584271c7",
        "the cache key of a known stage changed: is that deliberate? (see engine/fingerprint.rs)"
    );
}

/// Review 36 #1 (and review 37): an input written while its stage runs. The
/// stage's key was computed from the input's old bytes; its outputs may come
/// from the new ones. Recorded, they would be restored for the old bytes for
/// good: the stage is not recorded or cached (a warning, not a failure: a
/// tool that writes a cache into its input folder is common), and the next
/// run decides it again. A mere ctime change (a hard link made to the input)
/// is not a change.
#[test]
fn an_input_written_while_its_stage_runs_is_not_recorded() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: sleep 1; cat in.txt > out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n");
    ws.write("in.txt", "v1\n");
    let bg = spawn(ws.cmd(&["run", "pipeline.yaml", "--json"]));
    std::thread::sleep(std::time::Duration::from_millis(400));
    ws.write("in.txt", "v2\n");
    let out = bg.wait(HANG);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("stage a: not recorded or cached: input in.txt changed while the stage ran"), "{}", out.stderr);
    // The run record says so beside "ran" (and `runs show` too).
    let rec = out.json();
    assert_eq!(rec["stages"][0]["status"], "ran");
    assert_eq!(rec["stages"][0]["recorded"], false, "{rec:#}");
    let show = ws.dagrun(&["runs", "show", rec["run_id"].as_str().unwrap()]);
    assert!(show.stdout.lines().any(|l| l.contains(" a ") && l.ends_with("not recorded")), "{}", show.stdout);
    // Put back (an undo, a checkout): the stage runs on v1, nothing restores v2.
    ws.write("in.txt", "v1\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["a"]), "{:#}", r.rec());
    assert!(r.stage("a").get("recorded").is_none(), "{:#}", r.rec());
    assert_eq!(ws.read("out.txt"), "v1\n");
    assert_eq!(ws.run(&[]).ok().with("cached"), set(&["a"]));
    // A stage that hard-links its input changes only the input's ctime.
    ws.pipeline("stages:\n  a:\n    cmd: ln in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["a"]), "{:#}", r.rec());
    assert!(!r.out.stderr.contains("not recorded"), "{}", r.out.stderr);
    assert_eq!(ws.run(&[]).ok().with("cached"), set(&["a"]));
}

/// Review 36 #2: a stage that ran replaces the action entry of its key with
/// what it made (`--force` of a command whose output differs run to run):
/// switching a param away and back restores the latest run's output, not
/// the first one's.
#[test]
fn a_forced_run_replaces_the_action_entry_of_its_key() {
    let ws = Ws::new();
    ws.pipeline("params:\n  p: 1\nstages:\n  a:\n    cmd: echo ${params.p} $(date +%s%N) > out.txt\n    outs: [out.txt]\n");
    ws.run(&[]).ok();
    let first = ws.read("out.txt");
    let r = ws.run(&["--force"]).ok();
    assert_eq!(r.ran(), set(&["a"]));
    let forced = ws.read("out.txt");
    assert_ne!(first, forced);
    ws.run(&["-p", "p=2"]).ok();
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["a"]), "{:#}", r.rec());
    assert_eq!(ws.read("out.txt"), forced);
}

/// Review 36 #5: a file output's execute bit is part of what the run made:
/// restored with it, and a chmod outside dagrun is named and put back.
#[test]
fn a_restored_output_keeps_its_execute_bit() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  build:\n    cmd: printf '#!/bin/sh\\necho tool\\n' > tool.sh; chmod +x tool.sh\n    outs: [tool.sh]\n  use:\n    cmd: ./tool.sh > used.txt\n    deps: [tool.sh]\n    outs: [used.txt]\n",
    );
    ws.run(&[]).ok();
    let mode = |ws: &Ws| std::fs::metadata(ws.path("tool.sh")).unwrap().permissions().mode() & 0o111;
    assert_ne!(mode(&ws), 0);
    std::fs::remove_file(ws.path("tool.sh")).unwrap();
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["build"]), "{:#}", r.rec());
    assert_ne!(mode(&ws), 0, "restored without its execute bit");
    std::fs::set_permissions(ws.path("tool.sh"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["build"]), "{:#}", r.rec());
    assert!(r.stage("build")["reasons"].to_string().contains("execute bit"), "{:#}", r.rec());
    assert_ne!(mode(&ws), 0);
    let r = ws.run(&["--force", "use"]).ok();
    assert_eq!(r.ran(), set(&["use"]));
    assert_eq!(ws.read("used.txt"), "tool\n");
    // Restored under a umask of 077, the bit comes back as `chmod +x` would
    // set it (0700), not world-readable 0755.
    std::fs::remove_file(ws.path("tool.sh")).unwrap();
    let mut c = Command::new("sh");
    c.args(["-c", "umask 077 && exec \"$0\" \"$@\"", BIN, "run", "pipeline.yaml"]).current_dir(ws.path("")).env_remove("RUST_LOG");
    let r = ws.run_cmd(c).ok();
    assert_eq!(r.with("restored"), set(&["build"]), "{:#}", r.rec());
    assert_eq!(std::fs::metadata(ws.path("tool.sh")).unwrap().permissions().mode() & 0o777, 0o700);
}

/// Review 36 #4 (and review 37): a folder input holding a link that leads
/// out of the workspace (a dataset kept elsewhere): an edit behind the link
/// reruns the stage, as it does behind a link named as the input itself. A
/// link into the workspace is its target text (only declared inputs order
/// stages and rerun them).
#[test]
fn an_edit_behind_a_link_out_of_a_folder_input_reruns_the_stage() {
    let ws = Ws::new();
    let elsewhere = tempfile::tempdir().unwrap();
    let dataset = elsewhere.path().join("train.csv");
    ws.pipeline("stages:\n  a:\n    cmd: cat data/train.csv data/same.csv data/sibling.csv > out.txt\n    deps: [data]\n    outs: [out.txt]\n");
    std::fs::write(&dataset, "v1\n").unwrap();
    ws.write("data/local.csv", "l\n");
    ws.write("sibling.csv", "s\n");
    std::os::unix::fs::symlink(&dataset, ws.path("data/train.csv")).unwrap();
    std::os::unix::fs::symlink("local.csv", ws.path("data/same.csv")).unwrap();
    std::os::unix::fs::symlink("../sibling.csv", ws.path("data/sibling.csv")).unwrap();
    ws.run(&[]).ok();
    assert_eq!(ws.run(&[]).ok().with("cached"), set(&["a"]));
    std::fs::write(&dataset, "v2\n").unwrap();
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["a"]), "{:#}", r.rec());
    assert_eq!(ws.read("out.txt"), "v2\nl\ns\n");
    ws.write("sibling.csv", "t\n");
    assert_eq!(ws.run(&[]).ok().with("cached"), set(&["a"]), "a link into the workspace is its target text");
    ws.write("data/local.csv", "m\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["a"]), "{:#}", r.rec());
    assert_eq!(ws.run(&[]).ok().with("cached"), set(&["a"]));
}

/// Review 36 #6 and #7: `status` sees that a folder input changes when an
/// upstream output inside it will, and names an edit of the command that
/// came with a change of a param it uses.
#[test]
fn status_sees_outputs_inside_folder_inputs_and_command_edits_beside_a_param() {
    let ws = Ws::new();
    ws.pipeline(
        "params:\n  q: a\nstages:\n  part:\n    cmd: cat in.txt > out/part.txt\n    deps: [in.txt]\n    outs: [out/part.txt]\n  all:\n    cmd: cat out/part.txt > all.txt; echo ${params.q} >> all.txt\n    deps: [out]\n    outs: [all.txt]\n",
    );
    ws.write("in.txt", "1\n");
    std::fs::create_dir_all(ws.path("out")).unwrap();
    ws.run(&[]).ok();
    ws.write("in.txt", "2\n");
    let o = ws.dagrun(&["status", "pipeline.yaml"]);
    assert!(o.stdout.contains("STALE  all") && o.stdout.contains("upstream stage part will rerun"), "{}", o.stdout);
    ws.run(&[]).ok();
    let p = ws.read("pipeline.yaml").replace("cat out/part.txt > all.txt;", "cat out/part.txt > all.txt; date >/dev/null;");
    ws.write("pipeline.yaml", p);
    let o = ws.dagrun(&["status", "pipeline.yaml", "-p", "q=b"]);
    assert!(o.stdout.contains("param q: a → b") && o.stdout.contains("command changed as well"), "{}", o.stdout);
}

/// Review 38 #1: a chain of sensitive outputs (deleted after every run).
/// When the last consumer must rerun, each producer is regenerated with its
/// own sensitive input regenerated first, never from a missing file recorded
/// under the missing file's old hash.
#[test]
fn a_chain_of_sensitive_outputs_is_regenerated_from_its_start() {
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  g1:\n    cmd: cat in.txt > s1.txt\n    deps: [in.txt]\n    outs: [{path: s1.txt, sensitive: true}]\n  g2:\n    cmd: tr a-z A-Z < s1.txt > s2.txt\n    deps: [s1.txt]\n    outs: [{path: s2.txt, sensitive: true}]\n  e:\n    cmd: cat e.cfg s2.txt > e.txt\n    deps: [s2.txt, e.cfg]\n    outs: [e.txt]\n",
    );
    ws.write("in.txt", "hello\n");
    ws.write("e.cfg", "cfg1\n");
    ws.run(&[]).ok();
    assert!(!ws.exists("s1.txt") && !ws.exists("s2.txt"), "plaintext outlived the run");
    ws.write("e.cfg", "cfg2\n");
    // `status` predicts the regeneration: the producers are fresh, and run.
    let st = ws.dagrun(&["status", "pipeline.yaml", "--json"]).json();
    let actions: Vec<(String, String, String)> = st["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["stage"].as_str().unwrap().into(), r["state"].as_str().unwrap().into(), r["action"].as_str().unwrap().into()))
        .collect();
    let own = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(actions, vec![own("g1", "fresh", "run"), own("g2", "fresh", "run"), own("e", "stale", "run")], "{st:#}");
    assert!(st["stages"][1]["reasons"].to_string().contains("runs to regenerate its sensitive output s2.txt"), "{st:#}");
    let r = ws.run(&[]).ok();
    assert_eq!(ws.read("e.txt"), "cfg2\nHELLO\n", "{:#}", r.rec());
    // The producers ran (regenerated): the record says so.
    assert_eq!(r.ran(), set(&["g1", "g2", "e"]), "{:#}", r.rec());
    assert!(r.stage("g2")["reasons"].to_string().contains("regenerated for stage e, which reruns"), "{:#}", r.rec());
    assert!(r.stage("e")["reasons"].to_string().contains("reran g2 first"), "{:#}", r.rec());
    assert_eq!(ws.run(&[]).ok().with("cached"), set(&["g1", "g2", "e"]));
}

/// A folder output is restored whole: the files put in it since its stage
/// ran go with the rest, and the warning names them.
#[test]
fn restoring_a_folder_output_names_the_files_it_removes() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  parts:\n    cmd: mkdir -p parts && echo 1 > parts/a.txt\n    outs: [parts]\n");
    ws.run(&[]).ok();
    ws.write("parts/extra.txt", "mine\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("restored"), set(&["parts"]), "{:#}", r.rec());
    assert!(
        r.out.stderr.contains("stage parts: restoring its folder output parts from the cache removes what its recorded run did not make in it: extra.txt"),
        "{}",
        r.out.stderr
    );
    assert!(!ws.exists("parts/extra.txt") && ws.exists("parts/a.txt"));
}

/// Review 39: a producer restored (its plain output was gone) and then run
/// to regenerate its sensitive output for a consumer is recorded as ran;
/// one whose regeneration fails is recorded as failed, never cached.
#[test]
fn a_restored_or_failing_regenerated_producer_is_recorded_as_what_it_did() {
    let ws = Ws::new();
    ws.pipeline(
        "params:\n  v: 1\nstages:\n  p:\n    cmd: echo s > s.csv; echo q > q.txt; if [ -f FAIL ]; then exit 3; fi\n    outs: [{path: s.csv, sensitive: true}, q.txt]\n  c:\n    cmd: cat s.csv > c.txt; echo ${params.v} >> c.txt\n    deps: [s.csv]\n    outs: [c.txt]\n",
    );
    ws.run(&[]).ok();
    std::fs::remove_file(ws.path("q.txt")).unwrap();
    let st = ws.dagrun(&["status", "pipeline.yaml", "-p", "v=2", "--json"]).json();
    assert_eq!(st["stages"][0]["action"], "run", "{st:#}");
    let r = ws.run(&["-p", "v=2"]).ok();
    assert_eq!(r.ran(), set(&["p", "c"]), "{:#}", r.rec());
    ws.write("FAIL", "");
    let r = ws.run(&["-p", "v=3"]);
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    assert_eq!(r.statuses()["p"], "failed", "{:#}", r.rec());
    assert!(r.stage("p")["error"].as_str().is_some_and(|e| e.contains("exit status 3")), "{:#}", r.rec());
    assert_eq!(r.statuses()["c"], "failed", "{:#}", r.rec());
}
