//! Bad pipelines and tenant lists: a clear message (file, line where known,
//! reason), exit code 2, quickly, and nothing written.

use crate::common::*;
use std::time::Duration;

/// Run `dagrun run pipeline.yaml` on a workspace holding a bad input and check
/// the failure: exit 2, every `needle` in stderr, no panic, fast, and no trace
/// left (no run record, no state, no outputs).
fn refused(ws: &Ws, needles: &[&str]) -> String {
    let before = ws.walk();
    let out = spawn(ws.cmd(&["run", "pipeline.yaml"])).wait(Duration::from_secs(30));
    assert_eq!(out.code, 2, "expected exit 2\nstdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.elapsed < Duration::from_secs(10), "took {:?}", out.elapsed);
    let err = out.stderr.clone();
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.len() < 2000, "message too long ({} bytes): {}", err.len(), &err[..300]);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    assert_eq!(ws.walk(), before, "a refused pipeline must not write anything");
    assert!(!ws.exists("runs"));
    // status and dag refuse it the same way.
    for cmd in [["status", "pipeline.yaml"], ["dag", "pipeline.yaml"]] {
        let o = spawn(ws.cmd(&cmd)).wait(Duration::from_secs(30));
        assert_eq!(o.code, 2, "{cmd:?}: {}", o.stderr);
        assert_eq!(o.stderr, err, "{cmd:?} gives another message");
    }
    assert_eq!(ws.walk(), before);
    err
}

fn bad(yaml: &str, needles: &[&str]) -> String {
    let ws = Ws::new();
    ws.write("in.txt", "x\n");
    ws.pipeline(yaml);
    refused(&ws, needles)
}

#[test]
fn yaml_syntax_error() {
    bad("stages:\n  a:\n    cmd: echo hi\n   outs: [x]\n", &["pipeline.yaml:4:", "did not find expected key"]);
    bad("stages:\n  a:\n    cmd: \"echo\n    outs: [x]\n", &["pipeline.yaml:", "unexpected end of stream"]);
    bad("stages: [a, b\n", &["pipeline.yaml:", "expected ',' or ']'"]);
    // `${…}` unquoted in a flow list: `{` opens a mapping; the fix is named.
    bad(
        "stages:\n  a:\n    foreach: tenants\n    cmd: echo hi > out/${tenant}.txt\n    outs: [out/${tenant}.txt]\n",
        &["pipeline.yaml:5:", "must be quoted (`outs: ['out/${tenant}.txt']`)"],
    );
}

#[test]
fn unknown_key() {
    bad("stages:\n  a:\n    cmd: echo hi > x\n    outz: [x]\n", &["pipeline.yaml:4:", "unknown field `outz`", "expected one of"]);
    bad("stage:\n  a:\n    cmd: echo\n", &["pipeline.yaml:1:", "unknown field `stage`"]);
}

#[test]
fn unknown_uses_kind() {
    bad("stages:\n  a:\n    uses: frobnicate\n    outs: [x]\n", &["pipeline.yaml:3:", "stage `a`", "unknown stage kind `uses: frobnicate`", "cmd:"]);
}

#[test]
fn cycle() {
    let e = bad(
        "stages:\n  a:\n    cmd: cp y x\n    deps: [y]\n    outs: [x]\n  b:\n    cmd: cp x y\n    deps: [x]\n    outs: [y]\n",
        &["pipeline.yaml", "cycle", "a → b → a"],
    );
    assert!(!e.contains("b → a → b"), "{e}");
    bad("stages:\n  a:\n    cmd: echo\n    needs: [c]\n  b:\n    cmd: echo\n    needs: [a]\n  c:\n    cmd: echo\n    needs: [b]\n", &["a → b → c → a"]);
    bad("stages:\n  a:\n    cmd: echo\n    needs: [a]\n", &["pipeline.yaml:4:", "needs itself"]);
    // A stage reading its own output: the pair is named.
    bad(
        "stages:\n  b:\n    cmd: ls d > d/b.txt\n    deps: [d]\n    outs: [d/b.txt]\n",
        &["pipeline.yaml:2:", "reads \"d\", which holds its own output \"d/b.txt\""],
    );
    bad("stages:\n  b:\n    cmd: cat d/x > d/y\n    deps: [d/x]\n    outs: [d]\n", &["pipeline.yaml:2:", "reads \"d/x\", inside its own output \"d\""]);
}

#[test]
fn needs_a_missing_stage() {
    bad("stages:\n  a:\n    cmd: echo\n  b:\n    cmd: echo\n    needs: [zz]\n", &["pipeline.yaml:6:", "stage `b`", "`needs: zz` names no stage", "a, b"]);
}

#[test]
fn two_stages_one_output() {
    bad(
        "stages:\n  a:\n    cmd: echo 1 > x\n    outs: [x]\n  b:\n    cmd: echo 2 > x\n    outs: [./x]\n",
        &["pipeline.yaml:7:", "stage `b`", "\"x\" is already an output of stage `a`"],
    );
    bad("stages:\n  a:\n    cmd: mkdir -p d\n    outs: [d]\n  b:\n    cmd: echo > d/x\n    outs: [d/x]\n", &["outputs may not nest"]);
    // Not neighbours in sorted order: `d-x` sorts between `d` and `d/pii.csv`
    // ('-' < '/'), and the sensitive output inside `d` must still be refused.
    bad(
        "stages:\n  a:\n    cmd: mkdir -p d\n    outs: [d, d-x]\n  b:\n    cmd: echo > d/pii.csv\n    outs: [{path: d/pii.csv, sensitive: true}]\n",
        &["output \"d/pii.csv\" lies inside output \"d\" of stage `a`", "outputs may not nest"],
    );
}

#[test]
fn output_escaping_the_workspace() {
    bad("stages:\n  a:\n    cmd: echo > ../x\n    outs: [../x]\n", &["pipeline.yaml:2:", "stage `a`", "\"../x\"", "`..`"]);
    bad("stages:\n  a:\n    cmd: echo > x\n    outs: [sub/../../x]\n", &["`..`"]);
    bad("stages:\n  a:\n    cmd: echo > /tmp/x\n    outs: [/tmp/dagrun-it-abs-out]\n", &["pipeline.yaml:2:", "\"/tmp/dagrun-it-abs-out\"", "absolute path"]);
    assert!(!std::path::Path::new("/tmp/dagrun-it-abs-out").exists());
    bad("stages:\n  a:\n    cmd: echo\n    outs: [.dagrun/state/x.json]\n", &["inside .dagrun/"]);
}

#[test]
fn output_through_a_symlink_pointing_outside() {
    let outside = tempfile::tempdir().unwrap();
    let ws = Ws::new();
    std::os::unix::fs::symlink(outside.path(), ws.path("link")).unwrap();
    ws.pipeline("stages:\n  a:\n    cmd: echo hi > link/x\n    outs: [link/x]\n");
    refused(&ws, &["pipeline.yaml:4:", "stage `a`", "\"link/x\"", "symlink link", "outputs must be real paths inside the workspace"]);
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    // The symlink itself as the output, too.
    let ws = Ws::new();
    std::os::unix::fs::symlink(outside.path().join("f"), ws.path("out.txt")).unwrap();
    ws.pipeline("stages:\n  a:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n");
    refused(&ws, &["symlink"]);
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn undefined_param() {
    bad("params:\n  y: 1\nstages:\n  a:\n    cmd: echo ${params.x}\n", &["pipeline.yaml:4:", "stage `a`", "${params.x}", "not defined", "defined: y"]);
    bad("stages:\n  a:\n    cmd: echo\n    outs: [\"${params.x}.txt\"]\n", &["${params.x}", "defined: none"]);
}

#[test]
fn foreach_over_an_unknown_list() {
    // No config/tenants.yaml: the message is about the list, not the file.
    let e = bad("stages:\n  a:\n    cmd: echo\n    foreach: regions\n", &["pipeline.yaml:4:", "stage `a`", "`foreach: regions` is unknown", "tenants"]);
    assert!(!e.contains("cannot read"), "{e}");
}

#[test]
fn non_utf8_bytes() {
    let ws = Ws::new();
    ws.write("pipeline.yaml", b"stages:\n  a:\n    cmd: echo caf\xe9\n".as_slice());
    refused(&ws, &["pipeline.yaml:3:", "not valid UTF-8"]);
}

#[test]
fn file_over_one_mib() {
    let mut yaml = String::from("stages:\n  a:\n    cmd: echo hi\n");
    while yaml.len() <= 1 << 20 {
        yaml.push_str(&format!("# {}\n", "x".repeat(100)));
    }
    bad(&yaml, &["pipeline.yaml", "at most 1048576 bytes"]);
}

#[test]
fn stage_named_like_a_path() {
    bad("stages:\n  a/b:\n    cmd: echo\n", &["pipeline.yaml:2:", "stage `a/b`", "invalid stage name", "no '/'"]);
    bad("stages:\n  ../x:\n    cmd: echo\n", &["invalid stage name"]);
}

#[test]
fn deeply_nested_yaml() {
    bad(&format!("stages: {}{}\n", "[".repeat(10_000), "]".repeat(10_000)), &["pipeline.yaml:1:", "nested too deeply"]);
    bad(&format!("params:\n  x: {}\nstages:\n  a:\n    cmd: echo\n", "[".repeat(10_000)), &["pipeline.yaml:2:", "nested too deeply"]);
    let mut yaml = String::from("params:\n");
    for i in 0..300 {
        yaml.push_str(&format!("{}k{i}:\n", "  ".repeat(i + 1)));
    }
    yaml.push_str(&format!("{}v\nstages:\n  a:\n    cmd: echo\n", "  ".repeat(301)));
    bad(&yaml, &["pipeline.yaml:", "nested too deeply"]);
}

#[test]
fn billion_laughs() {
    // Classic: 9 levels of 9 aliases each.
    let mut yaml = String::from("params:\n  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        yaml.push_str(&format!("  l{i}: &l{i} [{}]\n", vec![format!("*l{}", i - 1); 9].join(", ")));
    }
    yaml.push_str("stages:\n  a:\n    cmd: echo ${params.l9}\n");
    bad(&yaml, &["pipeline.yaml", "alias"]);
    // Wide: one 100k-item anchor aliased 100k times (0.5 MB; 10^10 values
    // expanded), under yaml_serde's own repetition limit: refused by the
    // alias count (pipeline::yaml_limits) on the line of the aliases.
    let n = 100_000;
    let yaml = format!("params:\n  a: &a [{}]\n  b: [{}]\nstages:\n  s:\n    cmd: echo hi\n", vec!["1"; n].join(","), vec!["*a"; n].join(","));
    bad(&yaml, &["pipeline.yaml:3:", "alias"]);
    // The same through typed fields: many stages' deps alias one long list.
    let list: Vec<String> = (0..40_000).map(|i| format!("f{i}")).collect();
    let mut yaml = format!("stages:\n  s0:\n    cmd: echo\n    deps: &d [{}]\n", list.join(","));
    for i in 1..15_000 {
        yaml.push_str(&format!("  s{i}:\n    cmd: echo\n    deps: *d\n"));
    }
    assert!(yaml.len() < 1 << 20, "{}", yaml.len());
    bad(&yaml, &["pipeline.yaml", "alias"]);
}

#[test]
fn small_aliases_still_work() {
    let ws = Ws::new();
    ws.write("in.txt", "x\n");
    ws.pipeline("stages:\n  a:\n    cmd: cp in.txt a.txt\n    deps: &ins [in.txt]\n    outs: [a.txt]\n  b:\n    cmd: cp in.txt b.txt\n    deps: *ins\n    outs: [b.txt]\n");
    let r = ws.run(&[]).ok();
    assert_eq!(r.ran(), set(&["a", "b"]));
}

fn bad_tenants(tenants: &str, needles: &[&str]) {
    let ws = Ws::new();
    ws.write("config/tenants.yaml", tenants);
    ws.write("data/A.txt", "a\n");
    ws.pipeline("stages:\n  a:\n    foreach: tenants\n    cmd: echo ${tenant} > out_${tenant}.txt\n    outs: [\"out_${tenant}.txt\"]\n");
    refused(&ws, needles);
}

#[test]
fn tenants_duplicate() {
    bad_tenants("tenants:\n  - id: A\n    share: 0.5\n  - id: A\n    share: 0.5\n", &["config/tenants.yaml", "tenants[1]", "tenant A is listed twice"]);
}

#[test]
fn tenant_id_with_a_slash() {
    bad_tenants("tenants:\n  - id: A/../B\n", &["config/tenants.yaml", "tenants[0]", "invalid tenant id \"A/../B\""]);
    bad_tenants("tenants:\n  - id: ..\n", &["config/tenants.yaml", "invalid tenant id"]);
}

#[test]
fn tenant_shares_not_summing_to_one() {
    bad_tenants("tenants:\n  - id: A\n    share: 0.5\n  - id: B\n    share: 0.3\n", &["config/tenants.yaml", "shares sum to 0.8, not 1"]);
    bad_tenants("tenants:\n  - id: A\n    share: 0.5\n  - id: B\n", &["config/tenants.yaml", "every tenant a `share`, or none"]);
}

#[test]
fn tenants_file_syntax_and_bombs() {
    bad_tenants("tenants:\n  - id: A\n   share: 1\n", &["config/tenants.yaml", "line 3"]);
    let mut y = String::from("x0: &x0 [a, a, a, a, a, a, a, a, a]\n");
    for i in 1..10 {
        y.push_str(&format!("x{i}: &x{i} [{}]\n", vec![format!("*x{}", i - 1); 9].join(", ")));
    }
    y.push_str("tenants:\n  - id: A\n");
    bad_tenants(&y, &["config/tenants.yaml", "alias"]);
}

/// A built-in kind's `with:` is checked against its params struct: a
/// misspelt key or a value of the wrong type is refused at load, naming the
/// file, the key's own line (the stage's for a missing key), the stage and
/// the key (and, for an unknown key, the keys it takes).
#[test]
fn misspelt_or_mistyped_with_key() {
    let train = |extra: &str| {
        format!(
            "params:\n  C: \"1.0\"\nstages:\n  train:\n    foreach: tenants\n    uses: train\n    with:\n      store: features/${{tenant}}/v1\n      C: ${{params.C}}\n      min_auc: 0.5\n      output: models/${{tenant}}/model.json\n{extra}"
        )
    };
    let ws_with = |yaml: &str| {
        let ws = Ws::new();
        ws.write("config/tenants.yaml", "tenants:\n  - id: Tenant_A\n");
        ws.pipeline(yaml);
        ws
    };
    refused(
        &ws_with(&train("      promot: manual\n")),
        &["pipeline.yaml:12:", "stage `train`", "unknown `with.promot`", "this kind takes: store, C, min_auc, output, tenant, promote"],
    );
    refused(&ws_with(&train("      promote: sometimes\n")), &["pipeline.yaml:12:", "stage `train`", "`with.promote` = \"sometimes\": use auto or manual"]);
    refused(&ws_with(&train("      promote: [auto]\n")), &["pipeline.yaml:12:", "stage `train`", "`with.promote` = [\"auto\"]"]);
    let ws = ws_with(&train("").replace("min_auc: 0.5", "min_auc: [0.5]"));
    refused(&ws, &["pipeline.yaml:10:", "stage `train`", "`with.min_auc` must be a number, not [0.5]"]);
    // A kind's own check of a value is placed at its key too.
    refused(&ws_with(&train("").replace("min_auc: 0.5", "min_auc: 2")), &["pipeline.yaml:10:", "stage `train`", "`with.min_auc` = 2: must be between 0 and 1"]);
    // So is a param a value names but the pipeline lacks; a flow mapping's keys are at its `with:` line.
    refused(&ws_with(&train("").replace("min_auc: 0.5", "min_auc: ${params.nope}")), &["pipeline.yaml:10:", "stage `train`", "params.nope"]);
    let flow = train("").replace("    with:\n", "    with: {C: 0, store: s, min_auc: 0.5, output: m.json}\n").lines().take(7).collect::<Vec<_>>().join("\n");
    refused(&ws_with(&format!("{flow}\n")), &["pipeline.yaml:7:", "stage `train`", "`with.C` = 0: C must be a positive number"]);
    let ws = ws_with(&train("").replace("      min_auc: 0.5\n", ""));
    refused(&ws, &["pipeline.yaml:4:", "stage `train`", "missing `with.min_auc`"]);
    // A string param (here `C: "1.0"`, and so its `-p` overrides) holding a number is taken; anything else is named.
    let ws = ws_with(&train(""));
    let o = spawn(ws.cmd(&["status", "pipeline.yaml", "-p", "C=abc"])).wait(Duration::from_secs(30));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("pipeline.yaml:9: stage `train`") && o.stderr.contains("`with.C` = \"abc\" is not a number"), "{}", o.stderr);
    let o = spawn(ws.cmd(&["status", "pipeline.yaml", "-p", "C=0.5"])).wait(Duration::from_secs(30));
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Given twice, the last would win silently: refused, both named.
    let o = spawn(ws.cmd(&["status", "pipeline.yaml", "-p", "C=0.5", "-p", "C=0.7"])).wait(Duration::from_secs(30));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--param C is given twice (C=\"0.5\", C=\"0.7\"); give it once"), "{}", o.stderr);
    // Every kind checks its keys, with its own list.
    let ws = ws_with(
        "stages:\n  gen:\n    foreach: tenants\n    uses: generate\n    with:\n      rows: 10\n      seed: 1\n      as_of: 2026-01-01\n      ouput: raw.parquet\n",
    );
    refused(&ws, &["pipeline.yaml:9:", "stage `gen`", "unknown `with.ouput`; this kind takes: rows, seed, as_of, output, tenant"]);
    let ws = ws_with(
        "stages:\n  gen:\n    foreach: tenants\n    uses: generate\n    with:\n      rows: -3\n      seed: 1\n      as_of: 2026-01-01\n      output: raw.parquet\n",
    );
    refused(&ws, &["pipeline.yaml:6:", "stage `gen`", "`with.rows` = -3 must be a whole number ≥ 0"]);
}

/// A key written twice in one mapping (named at its second occurrence, in a
/// block mapping): YAML keeps the last one, so a stage,
/// a param, an `env:` variable or a `with:` parameter would vanish silently.
#[test]
fn a_key_written_twice_is_refused_not_dropped() {
    let twice = "is written twice in one mapping";
    bad("stages:\n  a: {cmd: echo > a.txt, outs: [a.txt]}\n  a: {cmd: echo > b.txt, outs: [b.txt]}\n", &["pipeline.yaml:3:3: stages: `a`", twice]);
    bad(
        "stages:\n  a:\n    cmd: echo > a.txt\n    env:\n      X: a\n      Y: b\n      X: c\n    outs: [a.txt]\n",
        &["pipeline.yaml:7:7: stages.a.env: `X`", twice],
    );
    bad("params: {x: 1, x: 2}\nstages:\n  a: {cmd: echo > a.txt, outs: [a.txt]}\n", &["pipeline.yaml:1:9: params: `x`", twice]);
    bad("stages:\n  a:\n    cmd: echo > a.txt\n    env: {X: a, X: b}\n    outs: [a.txt]\n", &["pipeline.yaml:4:10: stages.a.env: `X`", twice]);
    bad("stages:\n  g:\n    uses: generate\n    with: {rows: 10, rows: 20, output: r.parquet}\n", &["pipeline.yaml:4:11: stages.g.with: `rows`", twice]);
}

/// `retries:` is bounded (an absurd count once wrapped the attempt counter
/// and retried forever), and no output may be the pipeline file itself or a
/// folder holding it (a `cmd` stage's outputs are removed before it runs).
#[test]
fn absurd_retries_and_an_output_over_the_pipeline_file() {
    bad("stages:\n  a: {cmd: exit 1, outs: [a.txt], retries: 4294967295}\n", &["pipeline.yaml:2:", "stage `a`", "`retries: 4294967295` is more than 100"]);
    bad(
        "stages:\n  a: {cmd: echo > a.txt, outs: [a.txt, pipeline.yaml]}\n",
        &["pipeline.yaml:2:", "stage `a`", "output \"pipeline.yaml\" would replace this pipeline file"],
    );
    // Through a symlink too: the pipeline file given is a link to the output.
    let ws = Ws::new();
    ws.write("real.yaml", "stages:\n  a: {cmd: echo > a.txt, outs: [a.txt, real.yaml]}\n");
    std::os::unix::fs::symlink("real.yaml", ws.path("pipeline.yaml")).unwrap();
    refused(&ws, &["output \"real.yaml\" would replace this pipeline file (real.yaml)"]);
    let ws = Ws::new();
    ws.write("pipes/p.yaml", "stages:\n  a: {cmd: mkdir -p pipes, outs: [pipes]}\n");
    let o = spawn(ws.cmd(&["run", "pipes/p.yaml"])).wait(Duration::from_secs(30));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("output \"pipes\" would replace this pipeline file (pipes/p.yaml)"), "{}", o.stderr);
    assert!(ws.exists("pipes/p.yaml"));
}

/// A file that was there before it was declared an output of a `cmd` stage is
/// removed before the command runs, as every output is (DVC and Snakemake do
/// the same), but never silently: the warning names it. Outputs of the
/// stage's own earlier runs go without a word.
#[test]
fn removing_an_output_no_run_made_is_said() {
    let ws = Ws::new();
    ws.write("notes.txt", "kept by hand\n");
    ws.pipeline("stages:\n  a: {cmd: echo hi > a.txt && echo new > notes.txt, outs: [a.txt, notes.txt]}\n");
    let r = ws.run(&[]).ok();
    assert!(
        r.out.stderr.contains("stage a: removing notes.txt before the command runs: it is a declared output, but no recorded run of the stage made it"),
        "{}",
        r.out.stderr
    );
    assert_eq!(ws.read("notes.txt"), "new\n");
    let r = ws.run(&["--force"]).ok();
    assert!(!r.out.stderr.contains("removing"), "{}", r.out.stderr);
}

/// An output's options are checked like every other key: the message names
/// the option and what it takes (it once said only "did not match any
/// variant of untagged enum OutDef").
#[test]
fn a_bad_output_option_is_named() {
    bad(
        "stages:\n  a: {cmd: echo > a.txt, outs: [{path: a.txt, sensitive: maybe}]}\n",
        &["pipeline.yaml:2:", "stages.a.outs[0].sensitive: invalid type: string (5 characters), expected a boolean"],
    );
    bad(
        "stages:\n  a: {cmd: echo > a.txt, outs: [{path: a.txt, sensitiv: true}]}\n",
        &["pipeline.yaml:2:", "stages.a.outs[0]: unknown field `sensitiv`, expected one of `path`, `sensitive`, `cache`"],
    );
}

/// A stage fanned out per tenant with a fixed output path: the message says
/// what to do (it once said only that another stage already wrote it).
#[test]
fn a_per_tenant_stage_with_one_output_path_is_told_to_use_the_tenant() {
    let ws = Ws::new();
    ws.write("config/tenants.yaml", "tenants:\n  - id: T1\n  - id: T2\n");
    ws.pipeline("stages:\n  a:\n    foreach: tenants\n    cmd: echo > a.txt\n    outs: [a.txt]\n");
    refused(&ws, &["pipeline.yaml:5:", "stage `a`", "output \"a.txt\" is the same for every tenant", "put ${tenant} in its path"]);
}

/// `dagrun run --force p.yaml`: `--force` takes the file as the stage to
/// rerun and the pipeline is missing; the message says so, with the fix.
#[test]
fn force_before_the_pipeline_is_explained() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a: {cmd: echo > a.txt, outs: [a.txt]}\n");
    let o = ws.dagrun(&["run", "--force", "pipeline.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("`--force pipeline.yaml` took pipeline.yaml as the stage to rerun") && o.stderr.contains("`dagrun run pipeline.yaml … --force`"),
        "{}",
        o.stderr
    );
}
