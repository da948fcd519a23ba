//! Run metrics (`--metrics-file`, `metrics_file:` in config/dagrun.yaml) of
//! real runs checked by `promtool check metrics`, and the deployment examples
//! (`examples/deploy/`): alert rules checked and unit-tested by promtool, the
//! CI workflow parsed as YAML with every `dagrun` command in it existing.
//! `promtool` comes from the Debian package `prometheus` (`.ci/run` installs it).

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str], dir: &Path, stdin: Option<&Path>) -> String {
    let mut c = Command::new("promtool");
    c.args(args).current_dir(dir);
    if let Some(f) = stdin {
        c.stdin(std::fs::File::open(f).unwrap());
    }
    let o = c.output().expect("promtool is needed: apt-get install prometheus (see .ci/run)");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Samples of a text exposition: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {l}")))
        })
        .collect()
}

fn propensity_ws() -> Ws {
    let ws = Ws::new();
    ws.write("pipelines/propensity.yaml", std::fs::read(root().join("pipelines/propensity.yaml")).unwrap());
    ws.write("config/tenants.yaml", "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n");
    ws
}

fn run_ws(ws: &Ws, args: &[&str]) -> Run {
    let mut c = ws.cmd(args);
    c.env_remove("DAGRUN_OPENLINEAGE_URL").env("DAGRUN_PLAIN", "1");
    ws.run_cmd(c)
}

#[test]
fn metrics_of_real_runs_pass_promtool_and_keep_the_last_success_across_failures() {
    let ws = propensity_ws();
    ws.write("config/dagrun.yaml", "# settings\nmetrics_file: metrics/dagrun.prom\n");
    let r = run_ws(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]).ok();
    let prom = ws.path("metrics/dagrun.prom");
    let text = ws.read("metrics/dagrun.prom");
    let out = promtool(&["check", "metrics"], &ws.root, Some(&prom));
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let s = samples(&text);
    let p = r#"pipeline="pipelines/propensity.yaml""#;
    assert_eq!(s[&format!("dagrun_run_success{{{p}}}")], 1.0);
    assert_eq!(s[&format!("dagrun_run_exit_code{{{p}}}")], 0.0);
    assert_eq!(s[&format!(r#"dagrun_run_status{{{p},status="ok"}}"#)], 1.0);
    assert_eq!(s[&format!(r#"dagrun_run_status{{{p},status="failed"}}"#)], 0.0);
    let end = s[&format!("dagrun_run_end_timestamp_seconds{{{p}}}")];
    let start = s[&format!("dagrun_run_start_timestamp_seconds{{{p}}}")];
    assert!(end >= start && start > 1.7e9);
    assert_eq!(s[&format!("dagrun_last_success_timestamp_seconds{{{p}}}")], end);
    assert_eq!(s[&format!(r#"dagrun_stage_status{{{p},stage="train[Tenant_A]",tenant="Tenant_A",status="ran"}}"#)], 1.0);
    assert_eq!(s[&format!(r#"dagrun_tenant_rows{{{p},tenant="Tenant_A",stage="generate"}}"#)], 1800.0);
    assert_eq!(s[&format!(r#"dagrun_tenant_rows{{{p},tenant="Tenant_B",stage="store"}}"#)], 1200.0);
    let facts = &r.stage("train[Tenant_A]")["facts"];
    let mv = facts["model_version"].as_str().unwrap();
    assert_eq!(s[&format!(r#"dagrun_model_test_auc{{{p},tenant="Tenant_A",model_version="{mv}"}}"#)], facts["auc"].as_f64().unwrap());
    assert_eq!(s[&format!(r#"dagrun_model_champion{{{p},tenant="Tenant_A",model_version="{mv}"}}"#)], 1.0);
    assert_eq!(s[&format!(r#"dagrun_model_min_auc{{{p},tenant="Tenant_A"}}"#)], 0.6);
    // Never a data value: no Sensitive_Data label, only names, counts and times.
    assert!(!text.contains("Sensitive_Data"));

    // A failed run (the AUC gate): the file says so, and the last success stays.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r2 = run_ws(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000", "-p", "min_auc=0.99"]);
    assert_eq!(r2.out.code, 1, "{}", r2.out.stderr);
    let text2 = ws.read("metrics/dagrun.prom");
    promtool(&["check", "metrics"], &ws.root, Some(&prom));
    let s2 = samples(&text2);
    assert_eq!(s2[&format!("dagrun_run_success{{{p}}}")], 0.0);
    assert_eq!(s2[&format!("dagrun_run_exit_code{{{p}}}")], 1.0);
    assert_eq!(s2[&format!(r#"dagrun_run_status{{{p},status="failed"}}"#)], 1.0);
    assert_eq!(s2[&format!(r#"dagrun_stage_status{{{p},stage="train[Tenant_A]",tenant="Tenant_A",status="failed"}}"#)], 1.0);
    assert_eq!(s2[&format!(r#"dagrun_stage_status{{{p},stage="serve-check[Tenant_A]",tenant="Tenant_A",status="skipped"}}"#)], 1.0);
    assert_eq!(s2[&format!("dagrun_last_success_timestamp_seconds{{{p}}}")], end, "kept across the failed run");
    // The gate's failure keeps the model's AUC, so the AUC-below-gate alert
    // (`dagrun_model_test_auc < dagrun_model_min_auc`) sees it; the model
    // was never saved, so it is no champion.
    let rec2 = r2.record.as_ref().expect("a failed run has a record");
    let train = rec2["stages"].as_array().unwrap().iter().find(|x| x["stage"] == "train[Tenant_A]").unwrap();
    let (mv2, auc2) = (train["facts"]["model_version"].as_str().unwrap(), train["facts"]["auc"].as_f64().unwrap());
    assert!(auc2 < 0.99 && mv2.starts_with("Tenant_A-"), "{train:#}");
    assert_eq!(s2[&format!(r#"dagrun_model_test_auc{{{p},tenant="Tenant_A",model_version="{mv2}"}}"#)], auc2);
    assert_eq!(s2[&format!(r#"dagrun_model_min_auc{{{p},tenant="Tenant_A"}}"#)], 0.99);
    assert_eq!(s2[&format!(r#"dagrun_model_champion{{{p},tenant="Tenant_A",model_version="{mv2}"}}"#)], 0.0);
    assert!(s2[&format!("dagrun_run_end_timestamp_seconds{{{p}}}")] > end);
    // Written atomically: no temporary file is left next to it.
    let left: Vec<_> = std::fs::read_dir(ws.path("metrics")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("dagrun.prom")]);

    // --metrics-file overrides the settings file.
    let other = ws.path("elsewhere/run.prom");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    run_ws(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000", "--metrics-file", other.to_str().unwrap()]).ok();
    let s3 = samples(&std::fs::read_to_string(&other).unwrap());
    assert_eq!(s3[&format!("dagrun_run_success{{{p}}}")], 1.0);
    assert!(s3[&format!("dagrun_last_success_timestamp_seconds{{{p}}}")] > end);
    assert_eq!(ws.read("metrics/dagrun.prom"), text2, "the settings file's path is not written when --metrics-file is given");
}

/// Review 69 H3: the workspace-wide `metrics_file:` serves every pipeline,
/// and a run of another pipeline replaced a failed one's series (its alert
/// resolved); a run of one stage reported the whole pipeline a success and
/// dropped the failed stage's series. Other pipelines' series are kept; a
/// targeted run keeps what it wrote nothing about and is no success of the
/// pipeline; a file dagrun did not write is replaced, with a warning.
#[test]
fn a_shared_metrics_file_keeps_other_pipelines_and_a_targeted_run_is_no_success() {
    let ws = Ws::new();
    ws.write("config/dagrun.yaml", "metrics_file: m.prom\n");
    ws.write("a.yaml", "stages:\n  ok:\n    cmd: echo ok > ok.txt\n    outs: [ok.txt]\n  bad:\n    cmd: exit 1\n    outs: [bad.txt]\n");
    ws.write("b.yaml", "stages:\n  b:\n    cmd: echo b > b.txt\n    outs: [b.txt]\n");
    assert_eq!(run_ws(&ws, &["run", "a.yaml"]).out.code, 1);
    run_ws(&ws, &["run", "b.yaml"]).ok();
    promtool(&["check", "metrics"], &ws.root, Some(&ws.path("m.prom")));
    let s = samples(&ws.read("m.prom"));
    assert_eq!(s[r#"dagrun_run_success{pipeline="a.yaml"}"#], 0.0, "the failed pipeline's series were dropped");
    assert_eq!(s[r#"dagrun_run_success{pipeline="b.yaml"}"#], 1.0);
    assert_eq!(s[r#"dagrun_stage_status{pipeline="a.yaml",stage="bad",tenant="",status="failed"}"#], 1.0);
    // Only the stage that works: the failed one keeps its status, the last
    // success does not move, the run-level series are this run's.
    let r = run_ws(&ws, &["run", "a.yaml", "ok"]).ok();
    let s = samples(&ws.read("m.prom"));
    promtool(&["check", "metrics"], &ws.root, Some(&ws.path("m.prom")));
    assert_eq!(s[r#"dagrun_last_success_timestamp_seconds{pipeline="a.yaml"}"#], 0.0, "a targeted run counted as the pipeline's success");
    assert_eq!(s[r#"dagrun_stage_status{pipeline="a.yaml",stage="bad",tenant="",status="failed"}"#], 1.0, "the failed stage's series were dropped");
    assert_eq!(s[r#"dagrun_run_success{pipeline="b.yaml"}"#], 1.0);
    let run_id = r.rec()["run_id"].as_str().unwrap().to_string();
    let infos: Vec<&String> = s.keys().filter(|k| k.starts_with(r#"dagrun_run_info{pipeline="a.yaml""#)).collect();
    assert_eq!(infos, vec![&format!(r#"dagrun_run_info{{pipeline="a.yaml",run_id="{run_id}"}}"#)]);
    // A whole run replaces all of the pipeline's series (a stage removed from it goes).
    ws.write("a.yaml", "stages:\n  ok:\n    cmd: echo ok > ok.txt\n    outs: [ok.txt]\n");
    run_ws(&ws, &["run", "a.yaml"]).ok();
    let text = ws.read("m.prom");
    assert!(!text.contains(r#"stage="bad""#), "{text}");
    assert!(samples(&text)[r#"dagrun_last_success_timestamp_seconds{pipeline="a.yaml"}"#] > 0.0);
    assert!(text.contains(r#"pipeline="b.yaml""#));
    // Not what dagrun writes: replaced whole, said so.
    ws.write("m.prom", "# TYPE x histogram\nnot a sample\n");
    let r = run_ws(&ws, &["run", "b.yaml"]).ok();
    assert!(r.out.stderr.contains("is not one dagrun wrote"), "{}", r.out.stderr);
    let text = ws.read("m.prom");
    assert!(text.contains(r#"pipeline="b.yaml""#) && !text.contains("histogram") && !text.contains(r#"pipeline="a.yaml""#), "{text}");
}

/// helper-72: a night that could not start (a broken pipeline or settings
/// file: exit 2) left the metrics saying the last run succeeded, so
/// `DagrunRunFailed` never fired. Its run series now say failed, exit 2.
#[test]
fn a_run_that_cannot_start_says_so_in_the_metrics_file() {
    let ws = Ws::new();
    ws.write("a.yaml", "stages:\n  ok:\n    cmd: echo ok > ok.txt\n    outs: [ok.txt]\n");
    run_ws(&ws, &["run", "a.yaml", "--metrics-file", "m.prom"]).ok();
    let last = samples(&ws.read("m.prom"))[r#"dagrun_last_success_timestamp_seconds{pipeline="a.yaml"}"#];
    assert!(last > 0.0);
    let check = |how: &str| {
        promtool(&["check", "metrics"], &ws.root, Some(&ws.path("m.prom")));
        let s = samples(&ws.read("m.prom"));
        assert_eq!(s[r#"dagrun_run_success{pipeline="a.yaml"}"#], 0.0, "{how}");
        assert_eq!(s[r#"dagrun_run_exit_code{pipeline="a.yaml"}"#], 2.0, "{how}");
        assert_eq!(s[r#"dagrun_run_status{pipeline="a.yaml",status="failed"}"#], 1.0, "{how}");
        assert_eq!(s[r#"dagrun_last_success_timestamp_seconds{pipeline="a.yaml"}"#], last, "{how}");
        assert_eq!(s[r#"dagrun_stage_status{pipeline="a.yaml",stage="ok",tenant="",status="ran"}"#], 1.0, "{how}: the stage series went");
    };
    // The pipeline file does not load.
    ws.write("a.yaml", "stages:\n  ok:\n    cmd: echo ok > ok.txt\n    outz: [ok.txt]\n");
    assert_eq!(ws.dagrun(&["run", "a.yaml", "--metrics-file", "m.prom"]).code, 2);
    check("a pipeline file that does not load");
    // A mistyped path is no pipeline: no series of its own (helper-73: they stayed for good).
    assert_eq!(ws.dagrun(&["run", "a-typo.yaml", "--metrics-file", "m.prom"]).code, 2);
    assert!(!ws.read("m.prom").contains("a-typo"), "{}", ws.read("m.prom"));
    // Back to a success, then the settings file does not load (metrics_file: from it).
    ws.write("a.yaml", "stages:\n  ok:\n    cmd: echo ok > ok.txt\n    outs: [ok.txt]\n");
    run_ws(&ws, &["run", "a.yaml", "--force", "", "--metrics-file", "m.prom"]).ok();
    let last = samples(&ws.read("m.prom"))[r#"dagrun_last_success_timestamp_seconds{pipeline="a.yaml"}"#];
    ws.write("config/dagrun.yaml", "metrics_file: m.prom\nremote: 12\n");
    assert_eq!(ws.dagrun(&["run", "a.yaml", "--metrics-file", "m.prom"]).code, 2);
    let s = samples(&ws.read("m.prom"));
    assert_eq!((s[r#"dagrun_run_success{pipeline="a.yaml"}"#], s[r#"dagrun_run_exit_code{pipeline="a.yaml"}"#]), (0.0, 2.0));
    assert_eq!(s[r#"dagrun_last_success_timestamp_seconds{pipeline="a.yaml"}"#], last);
}

#[test]
fn a_settings_file_with_an_unknown_key_is_refused_with_file_and_line() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    ws.write("config/dagrun.yaml", "# settings\nmetrics_file: m.prom\nmetric_file: typo.prom\n");
    let r = run_ws(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(r.out.code, 2, "{}", r.out.stderr);
    assert!(r.out.stderr.contains("config/dagrun.yaml:3:") && r.out.stderr.contains("metric_file"), "{}", r.out.stderr);
    assert!(!ws.exists("a.txt") && !ws.exists("m.prom") && r.record.is_none(), "nothing ran");
    ws.write("config/dagrun.yaml", "metrics_file: [1]\n");
    let r = run_ws(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(r.out.code, 2);
    assert!(r.out.stderr.contains("config/dagrun.yaml:1:"), "{}", r.out.stderr);
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = root().join("examples/deploy");
    let out = promtool(&["check", "rules", "dagrun-alerts.yml"], &dir, None);
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let out = promtool(&["test", "rules", "dagrun-alerts.test.yml"], &dir, None);
    assert!(out.contains("SUCCESS"), "{out}");
    // Every metric the rules use is one dagrun writes.
    let rules = std::fs::read_to_string(dir.join("dagrun-alerts.yml")).unwrap();
    let src = std::fs::read_to_string(root().join("src/engine/run_metrics.rs")).unwrap();
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("dagrun_")) {
        assert!(src.contains(&format!("\"{word}\"")), "the rules use {word}, which dagrun does not write");
    }
}

/// Shell words of the `dagrun` invocations in a script (comments,
/// continuation lines and `$(…)` handled; stops at `|`, `>`, `&&`, `;`).
fn dagrun_commands(script: &str) -> Vec<Vec<String>> {
    let joined = script.replace("\\\n", " ").replace("$(", " ").replace(')', " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if Path::new(w).file_name().is_some_and(|n| n == "dagrun") && !w.starts_with('-') {
                let args: Vec<String> =
                    words[i + 1..].iter().take_while(|a| !["|", ">", ">>", "&&", "||", ";", "2>&1"].contains(a)).map(|a| a.to_string()).collect();
                out.push(args);
            }
        }
    }
    out
}

fn check_commands_exist(cmds: &[Vec<String>], from: &str) {
    assert!(!cmds.is_empty(), "{from}: no dagrun command found");
    for args in cmds {
        let mut a = args.clone();
        a.push("--help".into());
        let o = Command::new(BIN).args(&a).output().unwrap();
        assert!(o.status.success(), "{from}: `dagrun {}` is not a dagrun command:\n{}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn the_workflow_parses_and_every_dagrun_command_in_it_exists() {
    let path = root().join("examples/deploy/github-actions.yml");
    let wf: Value = yaml_serde::from_str(&std::fs::read_to_string(&path).unwrap()).expect("the workflow is valid YAML");
    let jobs = wf["jobs"].as_object().expect("jobs:");
    assert!(jobs.contains_key("build-and-test") && jobs.contains_key("pipeline") && jobs.contains_key("promote"));
    assert_eq!(wf["jobs"]["promote"]["needs"], "pipeline", "promotion only after the gated pipeline job");
    assert_eq!(wf["jobs"]["pipeline"]["needs"], "build-and-test");
    let mut cmds = Vec::new();
    for (name, job) in jobs {
        for step in job["steps"].as_array().unwrap_or_else(|| panic!("job {name} has steps")) {
            assert!(step.get("uses").is_some() || step.get("run").is_some(), "job {name}: a step uses an action or runs a command");
            if let Some(run) = step.get("run").and_then(Value::as_str) {
                cmds.extend(dagrun_commands(run));
            }
        }
    }
    assert!(cmds.iter().any(|c| c.first().map(String::as_str) == Some("run")), "the workflow runs a pipeline");
    assert!(cmds.iter().any(|c| c.first().map(String::as_str) == Some("sample")), "on a sample");
    for c in &cmds {
        if let Some(p) = c.iter().find(|a| a.ends_with(".yaml")) {
            assert!(root().join(p).is_file(), "the workflow names {p}, which is not in the repository");
        }
    }
    check_commands_exist(&cmds, "github-actions.yml");
    // Promotion is explicit and gated: the pipeline runs with `promote=manual`
    // and the promotion script (every dagrun command in it checked too) runs
    // `dagrun models promote` only when the gates pass (see the test below).
    let promote_steps: Vec<String> = wf["jobs"]["promote"]["steps"].as_array().unwrap().iter().filter_map(|s| s["run"].as_str().map(String::from)).collect();
    let runs: Vec<&Vec<String>> = cmds.iter().filter(|c| c.first().map(String::as_str) == Some("run")).collect();
    assert!(
        runs.len() >= 2 && runs.iter().all(|c| c.iter().any(|a| a == "promote=manual")),
        "every pipeline run in the workflow leaves promotion to the gate step: {runs:?}"
    );
    assert!(
        promote_steps.iter().any(|r| r.contains("promote-if-gates-pass.sh") && !r.contains("--dry-run")),
        "the promote job promotes through the gate script"
    );
    let script = std::fs::read_to_string(root().join("examples/deploy/promote-if-gates-pass.sh")).unwrap();
    let script_cmds = dagrun_commands(&script);
    for want in [&["runs", "show", "last"][..], &["models", "list"], &["models", "promote"]] {
        assert!(
            script_cmds.iter().any(|c| c.len() >= want.len() && c[..want.len()] == *want),
            "the gate script runs dagrun {}: {script_cmds:?}",
            want.join(" ")
        );
    }
    check_commands_exist(&script_cmds, "promote-if-gates-pass.sh");

    // The systemd service runs the README's cron command, the timer at its time.
    let unit = std::fs::read_to_string(root().join("examples/deploy/dagrun.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
    let cmds = dagrun_commands(exec);
    check_commands_exist(&cmds, "dagrun.service");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let cron = readme.lines().find(|l| l.starts_with("15 2 * * *")).expect("the README's cron line");
    let cron_cmd = &dagrun_commands(cron)[0];
    for a in cron_cmd {
        assert!(cmds[0].contains(a), "the service runs `{}`, the cron line `{}`", cmds[0].join(" "), cron_cmd.join(" "));
    }
    let timer = std::fs::read_to_string(root().join("examples/deploy/dagrun.timer")).unwrap();
    assert!(timer.lines().any(|l| l == "OnCalendar=*-*-* 02:15:00"), "the timer fires at 02:15 like `15 2 * * *`");
}

/// The workflow's promotion step, `examples/deploy/promote-if-gates-pass.sh`,
/// run for real after real runs of the ingest pipeline with `-p promote=manual`:
/// nothing is promoted when the AUC gate or the drift gate fails, each
/// tenant's model is when both pass (with the reason in the history), and
/// never twice.
#[test]
fn the_workflow_promotes_a_model_only_when_the_auc_and_drift_gates_pass() {
    let d = crate::drift::workspace();
    let ws = d.root.as_path();
    for t in ["Tenant_A", "Tenant_B"] {
        crate::drift::sample(ws, t, "4000", "1");
    }
    // The metrics file the runs write (`--metrics-file`) and promotions
    // update (the step's DAGRUN_METRICS_FILE, as the workflow sets it).
    let champion_metric = |t: &str| -> BTreeMap<String, f64> {
        samples(&std::fs::read_to_string(ws.join("m.prom")).unwrap())
            .into_iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("dagrun_model_champion{")?;
                rest.contains(&format!("tenant=\"{t}\"")).then(|| (rest.split("model_version=\"").nth(1).unwrap().trim_end_matches("\"}").to_string(), v))
            })
            .collect()
    };
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let script = root().join("examples/deploy/promote-if-gates-pass.sh");
    let gate = |args: &[&str]| -> (Option<i32>, String, String) {
        let o = Command::new("bash")
            .arg(&script)
            .args(args)
            .current_dir(ws)
            .env("PATH", &path)
            .env("DAGRUN_PLAIN", "1")
            .env("DAGRUN_METRICS_FILE", "m.prom")
            .env_remove("GITHUB_RUN_ID")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let run = |extra: &[&str]| -> std::process::Output {
        let mut a = vec!["run", "pipelines/propensity-ingest.yaml", "-p", "promote=manual", "--metrics-file", "m.prom"];
        a.extend_from_slice(extra);
        crate::drift::dagrun(ws, &a)
    };
    let champions = || -> BTreeMap<String, String> {
        let v: Value = serde_json::from_str(&crate::drift::ok(&crate::drift::dagrun(ws, &["models", "list", "--json"]))).unwrap();
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["alias"] == "champion")
            .map(|m| (m["tenant"].as_str().unwrap().into(), m["version"].as_str().unwrap().into()))
            .collect()
    };
    let version_of = |t: &str| -> String {
        let m: Value = serde_json::from_slice(&std::fs::read(ws.join(format!("models/{t}/model.json"))).unwrap()).unwrap();
        m["model_version"].as_str().unwrap().to_string()
    };

    // 1. The AUC gate fails: the run fails, the step refuses, no champion.
    let o = run(&["-p", "min_auc=0.99"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, _, err) = gate(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("gates not passed") && err.contains("a stage gate failed"), "{err}");
    assert!(champions().is_empty());

    // 2. Both gates pass: `promote: manual` left the champion alone; the dry
    //    run says what it would do; the step promotes each tenant's model.
    crate::drift::ok(&run(&[]));
    assert!(champions().is_empty(), "promote=manual must not promote");
    let (code, out, err) = gate(&["--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    let (va, vb) = (version_of("Tenant_A"), version_of("Tenant_B"));
    assert!(out.contains(&format!("would promote Tenant_A {va}")) && out.contains(&format!("would promote Tenant_B {vb}")), "{out}");
    assert!(champions().is_empty(), "a dry run promotes nothing");
    let (code, _, err) = gate(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(champions(), BTreeMap::from([("Tenant_A".to_string(), va.clone()), ("Tenant_B".to_string(), vb.clone())]));
    // The metrics say so at once (helper-72: 0 until the next night's run).
    assert_eq!(champion_metric("Tenant_A"), BTreeMap::from([(va.clone(), 1.0)]));
    promtool(&["check", "metrics"], ws, Some(&ws.join("m.prom")));
    let hist: Value = serde_json::from_str(&crate::drift::ok(&crate::drift::dagrun(ws, &["models", "history", "Tenant_A", "--json"]))).unwrap();
    let text = hist.to_string();
    assert!(text.contains("gates passed: test AUC") && text.contains(">= min_auc 0.6") && text.contains("drift no_reference"), "{text}");
    // Not twice.
    let (code, out, err) = gate(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("nothing to promote") && err.contains("already the champion"), "{out}\n{err}");

    // 3. New data that drifted: the drift gate fails before retraining; the
    //    step refuses; the champions stay.
    for t in ["Tenant_A", "Tenant_B"] {
        crate::drift::sample(ws, t, "4000", "2");
    }
    crate::drift::drift_csv(&ws.join("incoming/Tenant_A.csv"), 4.0, 5);
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stderr).contains("max_psi") || String::from_utf8_lossy(&o.stdout).contains("max_psi"));
    let (code, _, err) = gate(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("gates not passed"), "{err}");
    assert_eq!(champions(), BTreeMap::from([("Tenant_A".to_string(), va), ("Tenant_B".to_string(), vb.clone())]));

    // 4. The shift is checked and accepted for one run (`-p max_psi=5`): the
    //    gate passes at that run's max_psi and promotes the retrained model.
    crate::drift::ok(&run(&["-p", "max_psi=5"]));
    let va2 = version_of("Tenant_A");
    let (code, _, err) = gate(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(champions()["Tenant_A"], va2);

    // 5. The next nightly run (max_psi back to 0.25) measures the same shift
    //    against the model before, but the champion was trained on this data:
    //    the run passes, the report says `accepted`, and so does the step
    //    (helper-71: the report said `fail` and the step refused every night).
    crate::drift::ok(&run(&[]));
    let report: Value = serde_json::from_slice(&std::fs::read(ws.join("reports/drift/Tenant_A.json")).unwrap()).unwrap();
    assert_eq!((report["status"].as_str(), report["reference"]["accepted_by"].as_str()), (Some("accepted"), Some(va2.as_str())), "{report:#}");
    // The metrics say so (the drift alert does not fire for it).
    let m = samples(&std::fs::read_to_string(ws.join("m.prom")).unwrap());
    let key = |st: &str| format!(r#"dagrun_drift_status{{pipeline="pipelines/propensity-ingest.yaml",tenant="Tenant_A",status="{st}"}}"#);
    assert_eq!((m.get(&key("accepted")), m.get(&key("fail"))), (Some(&1.0), Some(&0.0)), "{m:?}");
    let (code, out, err) = gate(&[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("nothing to promote") && err.contains("already the champion"), "{out}\n{err}");

    // 6. The operator rolls Tenant_A back; the next nights (no new data: the
    //    same model passes its gates again) leave the rollback alone
    //    (helper-72: the step promoted the rolled-back model again).
    crate::drift::ok(&crate::drift::dagrun(ws, &["models", "rollback", "Tenant_A", "--reason", "bad model"]));
    let rolled_back_to = champions()["Tenant_A"].clone();
    assert_ne!(rolled_back_to, va2);
    crate::drift::ok(&run(&[]));
    let (code, out, err) = gate(&[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains(&format!("Tenant_A: {va2} was rolled back by")), "{err}");
    assert_eq!(champions()["Tenant_A"], rolled_back_to, "the rollback was undone");
    // A rollback is marked too: the model rolled back to is 1, the others 0.
    crate::drift::ok(&crate::drift::dagrun(ws, &["models", "rollback", "Tenant_B", "--reason", "check the metrics", "--metrics-file", "m.prom"]));
    let b_now = champions()["Tenant_B"].clone();
    let m = champion_metric("Tenant_B");
    assert_eq!(m[&b_now], 1.0, "{m:?}");
    assert!(m.iter().all(|(v, x)| (v == &b_now) == (*x == 1.0)), "{m:?}");
    promtool(&["check", "metrics"], ws, Some(&ws.join("m.prom")));
}
