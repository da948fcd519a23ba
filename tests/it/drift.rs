//! The `drift` stage on the real binary: the ingest pipeline on new data of
//! the same distribution passes, on drifted data trips the `max_psi` gate
//! before retraining (the model stays), and `-p max_psi=…` accepts it.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const PIPE: &str = "pipelines/propensity-ingest.yaml";

pub fn dagrun(ws: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dagrun"))
        .current_dir(ws)
        .args(args)
        .env_remove("DAGRUN_MASTER_KEY")
        .env_remove("DAGRUN_MASTER_KEY_FILE")
        .env_remove("RUST_LOG")
        .env("DAGRUN_PLAIN", "1")
        .output()
        .unwrap()
}

pub fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "exit {:?}\nstdout:\n{out}\nstderr:\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
    out
}

/// A workspace with the shipped pipelines and two tenants.
pub fn workspace() -> crate::common::Ws {
    crate::common::shipped_workspace("tenants:\n  - id: Tenant_A\n    share: 0.5\n  - id: Tenant_B\n    share: 0.5\n")
}

pub fn sample(ws: &Path, tenant: &str, rows: &str, seed: &str) {
    let out = ws.join("incoming").join(format!("{tenant}.csv"));
    ok(&dagrun(ws, &["sample", "--tenant", tenant, "--rows", rows, "--seed", seed, "--out", out.to_str().unwrap()]));
}

/// Scale Purchase_Amount and add to Login_Count in a sample CSV: a shift a
/// real feed might show after a currency or tracking change.
pub fn drift_csv(path: &Path, amount_factor: f64, extra_logins: i64) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let cols: Vec<&str> = header.split(',').collect();
    let (li, pi) = (cols.iter().position(|c| *c == "Login_Count").unwrap(), cols.iter().position(|c| *c == "Purchase_Amount").unwrap());
    let mut out = vec![header.to_string()];
    for l in lines {
        let mut f: Vec<String> = l.split(',').map(String::from).collect();
        f[li] = (f[li].parse::<i64>().unwrap() + extra_logins).to_string();
        f[pi] = format!("{:.2}", f[pi].parse::<f64>().unwrap() * amount_factor);
        out.push(f.join(","));
    }
    std::fs::write(path, out.join("\n") + "\n").unwrap();
}

fn last_record(ws: &Path) -> Value {
    serde_json::from_str(&ok(&dagrun(ws, &["runs", "show", "last", "--json"]))).unwrap()
}

fn stage<'a>(rec: &'a Value, name: &str) -> &'a Value {
    rec["stages"].as_array().unwrap().iter().find(|s| s["stage"] == name).unwrap_or_else(|| panic!("no stage {name} in {rec:#}"))
}

fn report(ws: &Path, tenant: &str) -> Value {
    serde_json::from_slice(&std::fs::read(ws.join(format!("reports/drift/{tenant}.json"))).unwrap()).unwrap()
}

#[test]
fn drifted_data_trips_the_gate_and_undrifted_data_passes() {
    let d = workspace();
    let ws = d.root.as_path();
    for t in ["Tenant_A", "Tenant_B"] {
        sample(ws, t, "4000", "1");
    }
    // First run: no model to compare with yet.
    let out = ok(&dagrun(ws, &["run", PIPE]));
    assert!(out.contains("Tenant_A: drift not measured (no earlier model"), "{out}");
    assert_eq!(report(ws, "Tenant_A")["status"], "no_reference");
    // The run after the first has nothing to do (the first model was trained on this data).
    let out = ok(&dagrun(ws, &["run", PIPE]));
    assert!(out.contains("all 14 stages up to date"), "{out}");
    let model_v1 = last_record(ws);
    let mv1 = stage(&model_v1, "train[Tenant_A]")["facts"]["model_version"].as_str().unwrap().to_string();

    // New data, same distribution: drift measured against model v1, passes, retrains.
    for t in ["Tenant_A", "Tenant_B"] {
        sample(ws, t, "4000", "2");
    }
    let out = ok(&dagrun(ws, &["run", PIPE]));
    assert!(out.contains(&format!("Tenant_A: drift ok vs model {mv1}")) || out.contains("drift WARNING"), "{out}");
    let r = report(ws, "Tenant_A");
    assert_eq!(r["reference"]["model_version"], mv1.as_str());
    assert_eq!(r["bins"], 10);
    assert_eq!(r["features"].as_array().unwrap().len(), 5);
    for f in r["features"].as_array().unwrap() {
        let psi = f["psi"].as_f64().unwrap();
        assert!(psi < 0.1, "undrifted data: {} PSI {psi}", f["name"]);
        assert!(f["out_of_range_share"].as_f64().unwrap() < 0.01, "{f}");
    }
    let rec = last_record(ws);
    let dr = stage(&rec, "drift[Tenant_A]");
    assert_eq!(dr["status"], "ran");
    assert!(dr["facts"]["psi"]["Purchase_Login_Ratio"].is_f64(), "{dr:#}");
    assert_eq!(stage(&rec, "train[Tenant_A]")["status"], "ran");
    // Retrained on the data drift measured: the next run compares nothing again.
    let out = ok(&dagrun(ws, &["run", PIPE]));
    assert!(out.contains("all 14 stages up to date"), "{out}");

    // Drifted data for Tenant_A: the gate fails before retraining.
    sample(ws, "Tenant_A", "4000", "3");
    drift_csv(&ws.join("incoming/Tenant_A.csv"), 4.0, 5);
    let model_before = std::fs::read(ws.join("models/Tenant_A/model.json")).unwrap();
    let version_before = serde_json::from_slice::<Value>(&model_before).unwrap()["model_version"].as_str().unwrap().to_string();
    let o = dagrun(ws, &["run", PIPE]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stage drift[Tenant_A] failed") && err.contains("above max_psi 0.25") && err.contains("Purchase_Login_Ratio PSI"), "{err}");
    assert!(err.contains("reports/drift/Tenant_A.json"), "{err}");
    let r = report(ws, "Tenant_A");
    assert_eq!(r["status"], "fail");
    let plr = r["features"].as_array().unwrap().iter().find(|f| f["name"] == "Purchase_Login_Ratio").unwrap();
    assert!(plr["psi"].as_f64().unwrap() > 0.25 && plr["level"] == "fail", "{plr}");
    let rec = last_record(ws);
    assert_eq!(stage(&rec, "drift[Tenant_A]")["status"], "failed");
    assert_eq!(stage(&rec, "train[Tenant_A]")["status"], "skipped");
    assert_eq!(stage(&rec, "train[Tenant_B]")["status"], "cached");
    assert_eq!(std::fs::read(ws.join("models/Tenant_A/model.json")).unwrap(), model_before, "the champion stays in place");
    // The report the gate left is not taken for an edit (helper-72: `verify`
    // called it modified outside dagrun every drift night, exit 4).
    let v = dagrun(ws, &["verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", String::from_utf8_lossy(&v.stdout));
    let st = ok(&dagrun(ws, &["status", PIPE]));
    assert!(st.contains("drift[Tenant_A]"), "{st}");

    // Accepting the shift: raising max_psi lets the run retrain.
    let out = ok(&dagrun(ws, &["run", PIPE, "-p", "max_psi=5"]));
    assert!(out.contains("Tenant_A: drift"), "{out}");
    let rec = last_record(ws);
    assert_eq!(stage(&rec, "train[Tenant_A]")["status"], "ran");
    assert_ne!(std::fs::read(ws.join("models/Tenant_A/model.json")).unwrap(), model_before);
    let accepted = stage(&rec, "train[Tenant_A]")["facts"]["model_version"].as_str().unwrap().to_string();

    // The nightly run goes back to the pipeline's max_psi: drift reruns (its
    // threshold is part of its key) and measures the same shift again, but a
    // model was trained on this data: accepted, not a failure every night.
    let out = ok(&dagrun(ws, &["run", PIPE]));
    assert!(out.contains(&format!("accepted: model {accepted} was trained on this data")), "{out}");
    assert!(out.contains(&format!("Tenant_A: drift vs model {version_before}:")), "{out}");
    let rec = last_record(ws);
    let dr = stage(&rec, "drift[Tenant_A]");
    assert_eq!(dr["status"], "ran");
    assert_eq!(dr["facts"]["drift_accepted_by"], accepted.as_str(), "{dr:#}");
    assert_eq!(stage(&rec, "train[Tenant_A]")["status"], "cached");
    assert_eq!(dr["facts"]["drift_status"], "accepted", "{dr:#}");
    assert_eq!(dr["facts"]["reference_model_version"], version_before.as_str(), "{dr:#}");
    // The report says what the gate did (helper-71: it said `fail`, and
    // promote-if-gates-pass.sh refused every night), the measurement as it is.
    let r = report(ws, "Tenant_A");
    assert_eq!(r["status"], "accepted");
    assert_eq!(r["reference"]["accepted_by"], accepted.as_str());
    assert_eq!(r["reference"]["model_version"], version_before.as_str(), "the version the reference data trained");
    assert!(r["features"].as_array().unwrap().iter().any(|f| f["level"] == "fail"), "{r:#}");
    let out = ok(&dagrun(ws, &["run", PIPE]));
    assert!(out.contains("all 14 stages up to date"), "{out}");
}

/// helper-72: `-p max_psi=…` accepted every tenant's drift, checked or not.
/// A run of one tenant's stages accepts that tenant's shift only.
#[test]
fn a_shift_is_accepted_for_one_tenant_by_a_run_of_its_stages() {
    let d = workspace();
    let ws = d.root.as_path();
    for t in ["Tenant_A", "Tenant_B"] {
        sample(ws, t, "3000", "1");
    }
    ok(&dagrun(ws, &["run", PIPE]));
    for t in ["Tenant_A", "Tenant_B"] {
        sample(ws, t, "3000", "2");
        drift_csv(&ws.join(format!("incoming/{t}.csv")), 4.0, 5);
    }
    let o = dagrun(ws, &["run", PIPE]);
    assert_eq!(o.status.code(), Some(1));
    // Tenant_B's shift was checked: accepted by a run of its stages alone.
    ok(&dagrun(ws, &["run", PIPE, "serve-check[Tenant_B]", "-p", "max_psi=5"]));
    assert_eq!(stage(&last_record(ws), "train[Tenant_B]")["status"], "ran");
    // The nightly run: B's accepted, A's still stopped.
    let o = dagrun(ws, &["run", PIPE]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stage drift[Tenant_A] failed") && !err.contains("drift[Tenant_B] failed"), "{err}");
    assert_eq!((report(ws, "Tenant_A")["status"].as_str(), report(ws, "Tenant_B")["status"].as_str()), (Some("fail"), Some("accepted")));
}

#[test]
fn bad_drift_params_are_refused_before_anything_runs() {
    let d = workspace();
    let ws = d.root.as_path();
    sample(ws, "Tenant_A", "500", "1");
    sample(ws, "Tenant_B", "500", "1");
    let o = dagrun(ws, &["run", PIPE, "-p", "max_psi=-1"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("max_psi") && err.contains("positive"), "{err}");
    assert!(!ws.join("reports").exists());
}

fn champion(ws: &Path, tenant: &str) -> String {
    let c: Value = serde_json::from_slice(&std::fs::read(ws.join(format!(".dagrun/registry/{tenant}/champion.json"))).unwrap()).unwrap();
    c["version"].as_str().unwrap().to_string()
}

/// Review 17: `gc` removed the feature file a rolled-back champion was
/// trained on (drift's reference, only in the cache once new data replaced
/// the store's file), and every later run failed `drift` with a fix that
/// could not work (`--force train`: train needs drift). gc keeps the
/// champions' training features; a reference lost anyway names a model to
/// promote whose features are kept, and promoting it works.
#[test]
fn gc_keeps_the_champions_training_features_and_a_lost_reference_names_a_working_fix() {
    let ws = workspace();
    let root = ws.root.as_path();
    let run = |seed: &str| dagrun(root, &["run", "pipelines/propensity.yaml", "-p", "rows=3000", "-p", &format!("seed={seed}")]);
    ok(&run("1"));
    let m1 = champion(root, "Tenant_A");
    ok(&run("7"));
    assert_ne!(champion(root, "Tenant_A"), m1);
    ok(&dagrun(root, &["models", "rollback", "Tenant_A", "--reason", "review 17"]));
    assert_eq!(champion(root, "Tenant_A"), m1);
    let g = ok(&dagrun(root, &["gc", "--keep-runs", "0"]));
    assert!(g.contains("the registry's champions"), "{g}");
    // New data: drift compares it with m1's features, read from the cache.
    ok(&run("8"));
    let r = report(root, "Tenant_A");
    assert_eq!(r["reference"]["model_version"], m1.as_str(), "{r:#}");
    assert_eq!(r["reference"]["read_from"], "cache", "{r:#}");
    let m3 = champion(root, "Tenant_A");
    assert_ne!(m3, m1, "the model trained on seed 8 became champion");
    let h = r["reference"]["feature_file_blake3"].as_str().unwrap().to_string();
    let object = root.join(format!(".dagrun/cache/objects/{}/{}", &h[..2], &h[2..]));

    // Review 18: m3 was trained on the data drift measured, so drift keeps
    // that measurement's reference (m1's features); lost from the cache, the
    // data is m3's own (no_reference), not an error naming m3 to promote.
    std::fs::remove_file(&object).unwrap();
    ok(&dagrun(root, &["run", "pipelines/propensity.yaml", "-p", "rows=3000", "-p", "seed=8", "-p", "max_psi=0.3"]));
    assert_eq!(report(root, "Tenant_A")["status"], "no_reference");

    // Back to m1, whose features are then lost (by hand: gc keeps them).
    ok(&dagrun(root, &["models", "rollback", "Tenant_A", "--reason", "review 17"]));
    assert_eq!(champion(root, "Tenant_A"), m1);
    assert!(!object.exists(), "m1's features are gone");
    let o = run("9");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("neither in the workspace nor in the cache"), "{err}");
    assert!(err.contains(&format!("`dagrun models promote Tenant_A {m3}`")), "the newest model with kept features is named:\n{err}");
    assert!(!err.contains("--force train"), "{err}");
    ok(&dagrun(root, &["models", "promote", "Tenant_A", &m3, "--reason", "its features are kept"]));
    ok(&run("9"));
}

/// Helper-65: promoting the version that is already the champion succeeds
/// (a script makes sure of a promotion) and writes nothing; a tenant neither
/// configured nor registered is refused (exit 2) naming the configured ones,
/// not listed as having "no registered models".
#[test]
fn promoting_the_champion_again_changes_nothing_and_unknown_tenants_are_refused() {
    let ws = workspace();
    let root = ws.root.as_path();
    ok(&dagrun(root, &["run", "pipelines/propensity.yaml", "-p", "rows=2000"]));
    let champ = champion(root, "Tenant_A");
    let history = || std::fs::read(root.join(".dagrun/registry/Tenant_A/history.jsonl")).unwrap();
    let before = history();
    let out = ok(&dagrun(root, &["models", "promote", "Tenant_A", &champ]));
    assert!(out.contains(&format!("tenant Tenant_A: {champ} is already the champion; nothing changed")), "{out}");
    assert_eq!(history(), before, "a promotion that changed nothing is not in the history");
    // A champion record whose hash was altered is no "already the champion":
    // promoting again writes it anew (review 66 #5), and predict works again.
    let cpath = root.join(".dagrun/registry/Tenant_A/champion.json");
    let text = std::fs::read_to_string(&cpath).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let real = v["blake3"].as_str().unwrap().to_string();
    std::fs::write(&cpath, text.replace(&real, &"0".repeat(64))).unwrap();
    let out = ok(&dagrun(root, &["models", "promote", "Tenant_A", &champ]));
    assert!(!out.contains("already the champion"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    assert_eq!(v["blake3"], real);
    assert!(v["previous"].as_array().is_some_and(|p| !p.iter().any(|x| x == champ.as_str())), "{v}");
    for args in [
        &["models", "list", "Tenant_Z"][..],
        &["models", "history", "Tenant_Z"],
        &["models", "promote", "Tenant_Z", &champ],
        &["models", "rollback", "Tenant_Z"],
    ] {
        let o = dagrun(root, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("no tenant Tenant_Z: config/tenants.yaml lists Tenant_A, Tenant_B"), "{args:?}: {err}");
    }
    // A registered tenant since removed from the list is still shown.
    std::fs::write(root.join("config/tenants.yaml"), "tenants:\n  - id: Tenant_B\n    share: 1.0\n").unwrap();
    assert!(ok(&dagrun(root, &["models", "list", "Tenant_A"])).contains(&champ));
}
