//! Tampering, on the real binary: someone with write access to a workspace
//! file (a group member, a careless colleague) edits what dagrun wrote and
//! later reads back. Every case was a finding of issue 9; each test fails on
//! the code before the fix.
//!
//! - a state hash used as a path (`xx/…/victim`): never a path, never deletes anything;
//! - directory listings: a file name with a newline forges nothing; a listing
//!   entry outside the workspace is reported by `verify` and repaired;
//! - state files, models and feature stores are authenticated (MAC under the
//!   workspace integrity key): an edited model with its hash written into the
//!   state is refused by `predict`, reported by `status` and `verify`, and
//!   recomputed by `run`; another tenant's model or feature store is refused;
//! - pipeline-less commands outside a workspace refuse (exit 2) and create nothing;
//! - a malformed (3-character) hash in a state file is an error naming the
//!   file and the field, never a panic.

use crate::common::{BIN, HANG, Out, Ws, ok, spawn};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const TWO: &str = "tenants:\n  - id: Tenant_A\n    share: 0.5\n  - id: Tenant_B\n    share: 0.5\n";

fn dg_in(dir: &Path, args: &[&str]) -> Out {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(dir).env_remove("RUST_LOG").env_remove("DAGRUN_MASTER_KEY").env_remove("DAGRUN_MASTER_KEY_FILE").env("NO_COLOR", "1");
    let o = spawn(c).wait(HANG);
    assert!(!o.stderr.contains("panicked") && o.code != 101, "dagrun {args:?} panicked:\n{}", o.stderr);
    o
}

fn dg(ws: &Ws, args: &[&str]) -> Out {
    dg_in(&ws.root, args)
}

fn state(ws: &Ws, stage: &str) -> Value {
    serde_json::from_slice(&std::fs::read(ws.path(&format!(".dagrun/state/{stage}.json"))).unwrap()).unwrap()
}

fn put_state(ws: &Ws, stage: &str, v: &Value) {
    std::fs::write(ws.path(&format!(".dagrun/state/{stage}.json")), serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// Change one field of a stage's state record without re-sealing it: its MAC fails.
fn edit_state_behind_dagrun(ws: &Ws, stage: &str) {
    let mut st = state(ws, stage);
    st["finished_at"] = Value::from("2020-01-01T00:00:00Z");
    put_state(ws, stage, &st);
}

/// Move the model registry aside, so `predict` serves the train stage's
/// output through its lineage record (the path of a model never registered).
fn without_registry(ws: &Ws) {
    std::fs::rename(ws.path(".dagrun/registry"), ws.path("registry.aside")).unwrap();
}

/// Put the registry back (the drift gate's reference is its champion).
fn with_registry(ws: &Ws) {
    std::fs::rename(ws.path("registry.aside"), ws.path(".dagrun/registry")).unwrap();
}

fn propensity_ws() -> Ws {
    crate::common::shipped_workspace(TWO)
}

fn cmd_ws() -> Ws {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: mkdir -p out && echo hello > out/a.txt\n    outs: [out/a.txt]\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    ws
}

#[test]
fn a_state_hash_is_never_used_as_a_path() {
    let ws = cmd_ws();
    let victim = tempfile::tempdir().unwrap();
    std::fs::write(victim.path().join("precious.txt"), b"keep me").unwrap();
    let vpath = victim.path().canonicalize().unwrap();
    // `xx` + an absolute path: split after two characters, it became the victim.
    let evil = format!("xx{}", vpath.display());
    let mut st = state(&ws, "a");
    st["outputs"]["out/a.txt"]["hash"] = Value::from(evil.clone());
    put_state(&ws, "a", &st);
    std::fs::remove_file(ws.path("out/a.txt")).unwrap();
    for args in [&["status", "pipeline.yaml"][..], &["run", "pipeline.yaml", "-n"], &["verify"], &["verify", "--repair"]] {
        let o = dg(&ws, args);
        assert!(vpath.join("precious.txt").exists(), "dagrun {args:?} deleted a directory outside the workspace");
        let all = format!("{}{}", o.stdout, o.stderr);
        assert!(!all.contains(&evil), "the forged hash was echoed: {all}");
        if args[0] == "verify" && args.len() == 1 {
            assert_eq!(o.code, 4, "{all}");
            assert!(all.contains(".dagrun/state/a.json") && all.contains("outputs.out/a.txt.hash"), "{all}");
        }
    }
    // The run recomputes the stage (the record is not trusted).
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    assert_eq!(ws.read("out/a.txt"), "hello\n");
    assert!(vpath.join("precious.txt").exists());
    ok(dg(&ws, &["verify"]));
}

#[test]
fn a_three_character_hash_is_an_error_naming_the_field_never_a_panic() {
    let ws = propensity_ws();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=2000"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "20", "--no-label", "--out", "in.csv"]));
    let mut st = state(&ws, "train[Tenant_A]");
    st["outputs"]["models/Tenant_A/model.json"]["hash"] = Value::from("abc");
    put_state(&ws, "train[Tenant_A]", &st);
    // Serve from the train stage's output (as for a model trained before the
    // registry existed), not from the registry's copy.
    without_registry(&ws);
    let o = dg(&ws, &["status", "pipelines/propensity.yaml"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains(".dagrun/state/train[Tenant_A].json") && o.stdout.contains("outputs.models/Tenant_A/model.json.hash"), "{}", o.stdout);
    let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("train[Tenant_A].json") && o.stderr.contains("64 lowercase hex"), "{}", o.stderr);
    assert!(!o.stdout.contains("Customer_ID"), "scores were printed: {}", o.stdout);
    let o = dg(&ws, &["verify"]);
    assert_eq!(o.code, 4);
    assert!(o.stdout.contains("train[Tenant_A].json") && o.stdout.contains("64 lowercase hex"), "{}", o.stdout);
}

/// The review's case: the model edited (intercept 50) and its blake3 written
/// into the state file and the cache.
#[test]
fn an_edited_model_with_a_matching_state_is_refused_reported_and_recomputed() {
    let ws = propensity_ws();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=2000"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "30", "--no-label", "--out", "in.csv"]));
    let mpath = ws.path("models/Tenant_A/model.json");
    let mut model: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let version = model["model_version"].as_str().unwrap().to_string();
    model["intercept"] = Value::from(50.0);
    let bytes = serde_json::to_vec_pretty(&model).unwrap();
    let _ = std::fs::remove_file(&mpath);
    std::fs::write(&mpath, &bytes).unwrap();
    let h = blake3::hash(&bytes).to_hex().to_string();
    // Into the state file and the cache, as an attacker would.
    let mut st = state(&ws, "train[Tenant_A]");
    st["outputs"]["models/Tenant_A/model.json"]["hash"] = Value::from(h.clone());
    put_state(&ws, "train[Tenant_A]", &st);
    ws.write(&format!(".dagrun/cache/objects/{}/{}", &h[..2], &h[2..]), &bytes);

    // The registry's copy of the champion is untouched: it is what `predict` serves.
    let o = ok(dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"]));
    assert!(o.stdout.lines().skip(1).any(|l| !l.contains(",1,")), "the edited model was served:\n{}", o.stdout);
    // Without the registry, the edited train output is refused.
    without_registry(&ws);
    let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"]);
    assert_ne!(o.code, 0, "the edited model was served:\n{}", o.stdout);
    assert!(o.stderr.contains("modified outside dagrun") && o.stderr.contains("train[Tenant_A].json"), "{}", o.stderr);
    assert!(!o.stdout.contains(&version), "{}", o.stdout);

    let o = ok(dg(&ws, &["status", "pipelines/propensity.yaml"]));
    assert!(o.stdout.contains("STALE  train[Tenant_A]") && o.stdout.contains("modified outside dagrun"), "{}", o.stdout);

    let o = dg(&ws, &["verify"]);
    assert_eq!(o.code, 4, "{}", o.stdout);
    assert!(o.stdout.contains(".dagrun/state/train[Tenant_A].json") && o.stdout.contains("MAC"), "{}", o.stdout);

    with_registry(&ws);
    let o = ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=2000", "--json"]));
    let rec = o.json();
    let status_of = |n: &str| rec["stages"].as_array().unwrap().iter().find(|s| s["stage"] == n).unwrap()["status"].as_str().unwrap().to_string();
    assert_ne!(status_of("train[Tenant_A]"), "cached");
    let model: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    assert_ne!(model["intercept"], Value::from(50.0));
    let scores = ok(dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"])).stdout;
    assert!(scores.lines().skip(1).any(|l| !l.contains(",1,")), "{scores}");
    // A model with its MAC field kept but an edited body: also refused.
    let mut model: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    assert!(model["mac"].is_string(), "the model is signed");
    model["coefficients"][0] = Value::from(9.0);
    let bytes = serde_json::to_vec_pretty(&model).unwrap();
    std::fs::remove_file(&mpath).unwrap();
    std::fs::write(&mpath, &bytes).unwrap();
    without_registry(&ws); // the run registered the retrained model again
    let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"]);
    assert_ne!(o.code, 0);
    let o = dg(&ws, &["verify"]);
    assert_eq!(o.code, 4);
    assert!(o.stdout.contains("models/Tenant_A/model.json"), "{}", o.stdout);
}

#[test]
fn another_tenants_model_is_never_served() {
    let ws = propensity_ws();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=2000"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_B", "--rows", "30", "--no-label", "--out", "in.csv"]));
    // The lineage path (registry cases: `registry_models_are_verified_before_use`).
    without_registry(&ws);
    let a_rel = "models/Tenant_A/model.json";
    let a_hash = crate::common::b3(&ws.path(a_rel));
    // 1. Tenant_B's state pointed at Tenant_A's model.
    let orig = state(&ws, "train[Tenant_B]");
    let mut st = orig.clone();
    let rec = st["outputs"]["models/Tenant_B/model.json"].clone();
    st["outputs"] = serde_json::json!({ a_rel: rec });
    st["outputs"][a_rel]["hash"] = Value::from(a_hash.clone());
    put_state(&ws, "train[Tenant_B]", &st);
    let o = dg(&ws, &["predict", "--tenant", "Tenant_B", "--input", "in.csv"]);
    assert_ne!(o.code, 0, "Tenant_A's model served Tenant_B:\n{}", o.stdout);
    assert!(!o.stdout.contains("Tenant_A-"), "{}", o.stdout);
    put_state(&ws, "train[Tenant_B]", &orig);
    // 2. Tenant_A's model copied over Tenant_B's, with its hash in B's state.
    let b_path = ws.path("models/Tenant_B/model.json");
    let _ = std::fs::remove_file(&b_path);
    std::fs::copy(ws.path(a_rel), &b_path).unwrap();
    let mut st = orig.clone();
    st["outputs"]["models/Tenant_B/model.json"]["hash"] = Value::from(a_hash);
    put_state(&ws, "train[Tenant_B]", &st);
    let o = dg(&ws, &["predict", "--tenant", "Tenant_B", "--input", "in.csv"]);
    assert_ne!(o.code, 0, "Tenant_A's model served Tenant_B:\n{}", o.stdout);
    assert!(!o.stdout.contains("Tenant_A-"), "{}", o.stdout);
    // 3. Even with B's (authentic) state intact, A's signed model in B's place is refused by tenant.
    put_state(&ws, "train[Tenant_B]", &orig);
    let o = dg(&ws, &["predict", "--tenant", "Tenant_B", "--input", "in.csv"]);
    assert_ne!(o.code, 0);
    // The run puts B's own model back and serves it.
    with_registry(&ws);
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=2000"]));
    let scores = ok(dg(&ws, &["predict", "--tenant", "Tenant_B", "--input", "in.csv"])).stdout;
    assert!(scores.contains("Tenant_B-") && !scores.contains("Tenant_A-"), "{scores}");
}

/// The registry's copies are what `predict` and `serve` use: an edited
/// version (with its blake3 written into the index and the champion record)
/// and another tenant's version registered as this tenant's are refused by
/// `predict`, `models promote` and reported by `verify`.
#[test]
fn registry_models_are_verified_before_use() {
    let ws = propensity_ws();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=2000"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "30", "--no-label", "--out", "in.csv"]));
    let read_json = |rel: &str| -> Value { serde_json::from_slice(&std::fs::read(ws.path(rel)).unwrap()).unwrap() };
    let write_json = |rel: &str, v: &Value| {
        let p = ws.path(rel);
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    };
    let champ_a = read_json(".dagrun/registry/Tenant_A/champion.json");
    let va = champ_a["version"].as_str().unwrap().to_string();
    let vrel = format!(".dagrun/registry/Tenant_A/versions/{va}.json");
    // 1. An edited version, its hash written into the index and the champion record.
    let mut m = read_json(&vrel);
    m["intercept"] = Value::from(50.0);
    write_json(&vrel, &m);
    let h = crate::common::b3(&ws.path(&vrel));
    let mut idx = read_json(".dagrun/registry/Tenant_A/index.json");
    for e in idx["versions"].as_array_mut().unwrap() {
        if e["version"] == va.as_str() {
            e["blake3"] = Value::from(h.clone());
        }
    }
    write_json(".dagrun/registry/Tenant_A/index.json", &idx);
    let mut c = champ_a.clone();
    c["blake3"] = Value::from(h);
    write_json(".dagrun/registry/Tenant_A/champion.json", &c);
    let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"]);
    assert_ne!(o.code, 0, "the edited registry model was served:\n{}", o.stdout);
    assert!(o.stderr.contains(&format!("{va}.json")) && o.stderr.contains("modified outside dagrun"), "{}", o.stderr);
    assert!(!o.stdout.contains("Customer_ID"), "{}", o.stdout);
    let o = dg(&ws, &["verify"]);
    assert_eq!(o.code, 4, "{}", o.stdout);
    assert!(o.stdout.contains("model registry, tenant Tenant_A") && o.stdout.contains("MAC"), "{}", o.stdout);
    // 2. Tenant_B's (authentic) model registered as Tenant_A's champion.
    let vb = read_json(".dagrun/registry/Tenant_B/champion.json")["version"].as_str().unwrap().to_string();
    let brel = format!(".dagrun/registry/Tenant_B/versions/{vb}.json");
    std::fs::copy(ws.path(&brel), ws.path(&format!(".dagrun/registry/Tenant_A/versions/{vb}.json"))).unwrap();
    let hb = crate::common::b3(&ws.path(&brel));
    let mut entry = idx["versions"][0].clone();
    entry["version"] = Value::from(vb.clone());
    entry["blake3"] = Value::from(hb.clone());
    idx["versions"].as_array_mut().unwrap().push(entry);
    write_json(".dagrun/registry/Tenant_A/index.json", &idx);
    let mut c = champ_a.clone();
    c["version"] = Value::from(vb.clone());
    c["blake3"] = Value::from(hb);
    write_json(".dagrun/registry/Tenant_A/champion.json", &c);
    let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"]);
    assert_ne!(o.code, 0, "Tenant_B's model served Tenant_A:\n{}", o.stdout);
    assert!(!o.stdout.contains("Tenant_B-"), "{}", o.stdout);
    // Promotion verifies the version it names.
    let o = dg(&ws, &["models", "promote", "Tenant_A", &va, "--reason", "test"]);
    assert_ne!(o.code, 0, "a tampered version was promoted:\n{}", o.stdout);
    // 3. Index fields `models list` prints (review 11): an escape sequence, or
    // a hash cut inside a multi-byte character (a panic), refused by name.
    for (field, bad, why) in [
        ("registered_at", "\u{1b}]0;x\u{7}", "registered_at is not an RFC 3339 time"),
        ("feature_version", "v1\u{1b}[2J", "feature_version holds a control character"),
        ("lineage_hash", "aaaaaaaaaaa\u{e9}bbb", "lineage_hash is not 64 lower-case hex digits"),
    ] {
        let mut bad_idx = idx.clone();
        bad_idx["versions"][0][field] = Value::from(bad);
        write_json(".dagrun/registry/Tenant_A/index.json", &bad_idx);
        let o = dg(&ws, &["models", "list"]);
        assert_ne!(o.code, 0, "{field}: {}", o.stdout);
        assert!(o.stderr.contains(why), "{field}: {}", o.stderr);
        assert!(!o.stdout.contains('\u{1b}') && !o.stderr.contains('\u{1b}'), "{field}: {}{}", o.stdout, o.stderr);
    }
}

#[test]
fn train_refuses_another_tenants_feature_store() {
    let ws = propensity_ws();
    let p = ws.read("pipelines/propensity.yaml").replace(
        "      store: featurestore/${tenant}/${params.feature_set}\n      C: ${params.C}",
        "      store: featurestore/Tenant_A/${params.feature_set}\n      C: ${params.C}",
    );
    assert!(p.contains("store: featurestore/Tenant_A/"));
    ws.write("pipelines/cross.yaml", p);
    let o = dg(&ws, &["run", "pipelines/cross.yaml", "-p", "rows=2000"]);
    assert_eq!(o.code, 1, "train accepted another tenant's feature store:\n{}", o.stderr);
    assert!(o.stderr.contains("train[Tenant_B]") && o.stderr.contains("tenant Tenant_A's features"), "{}", o.stderr);
    assert!(!o.stderr.contains("train[Tenant_A] failed"), "{}", o.stderr);
    assert!(!ws.exists("models/Tenant_B/model.json"));
}

#[test]
fn a_file_name_with_a_newline_forges_no_listing_entry() {
    let ws = Ws::new();
    let payload = "echo pwned\n";
    let h = blake3::hash(payload.as_bytes()).to_hex().to_string();
    // The name holds a newline followed by what an old listing line looks like.
    ws.write("mk.sh", format!("mkdir -p out\nprintf 'echo pwned\\n' > out/payload\ntouch \"out/$(printf 'z\\nF 1 {h} run_me.sh')\"\n"));
    ws.pipeline("stages:\n  mk:\n    cmd: sh mk.sh\n    deps: [mk.sh]\n    outs: [out]\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    let names = |ws: &Ws| {
        let mut v: Vec<String> = std::fs::read_dir(ws.path("out")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let before = names(&ws);
    assert_eq!(before.len(), 2, "{before:?}");
    std::fs::remove_dir_all(ws.path("out")).unwrap();
    let o = ok(dg(&ws, &["run", "pipeline.yaml", "--json"]));
    assert_eq!(o.json()["stages"][0]["status"], "restored", "{}", o.stdout);
    assert_eq!(names(&ws), before, "the restore created files that never existed");
    assert!(!ws.exists("out/run_me.sh") && !ws.exists("run_me.sh"));
    ok(dg(&ws, &["verify"]));
}

#[test]
fn verify_reports_a_listing_entry_outside_the_workspace_and_repair_removes_it() {
    let ws = cmd_ws();
    let h_payload = blake3::hash(b"x").to_hex().to_string();
    ws.write(&format!(".dagrun/cache/objects/{}/{}", &h_payload[..2], &h_payload[2..]), b"x");
    for (i, listing) in [
        format!(r#"{{"format":"dagrun-tree/2","entries":[{{"type":"file","path":"../../escape.txt","hash":"{h_payload}","exec":false}}]}}"#),
        format!(r#"{{"format":"dagrun-tree/2","entries":[{{"type":"file","path":"/tmp/escape.txt","hash":"{h_payload}","exec":false}}]}}"#),
    ]
    .iter()
    .enumerate()
    {
        let h = blake3::hash(listing.as_bytes()).to_hex().to_string();
        let rel = format!(".dagrun/cache/objects/{}/{}", &h[..2], &h[2..]);
        ws.write(&rel, listing);
        let o = dg(&ws, &["verify"]);
        assert_eq!(o.code, 4, "case {i}: {}", o.stdout);
        assert!(o.stdout.contains(&rel) && o.stdout.contains("directory listing"), "case {i}: {}", o.stdout);
        assert!(!o.stdout.contains("escape.txt"), "the entry is described, not echoed: {}", o.stdout);
        // Fixed by the repair: exit 0 (a cron job alerts on what is left).
        let o = ok(dg(&ws, &["verify", "--repair"]));
        assert!(o.stdout.contains(": 1 problem, repaired"), "case {i}: {}", o.stdout);
        assert!(!ws.exists(&rel), "case {i}: --repair left the listing");
        ok(dg(&ws, &["verify"]));
    }
}

/// `verify --repair` exits 4 only for what it could not fix (helper-64: a
/// cron job alerted after every repair); under `-q` a clean check and the
/// reports of changes made say nothing, while problems still print.
#[test]
fn repair_exits_4_only_for_what_it_left_and_q_silences_success() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n  b:\n    cmd: echo b > b.txt\n    outs: [b.txt]\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    let quiet = ok(dg(&ws, &["-q", "verify"]));
    assert_eq!(quiet.stdout, "", "a clean verify under -q");
    assert!(ok(dg(&ws, &["verify"])).stdout.contains(": 0 problems"));
    assert_eq!(ok(dg(&ws, &["-q", "gc"])).stdout, "");
    edit_state_behind_dagrun(&ws, "a");
    std::fs::remove_file(ws.path("b.txt")).unwrap();
    // The record (and its action-cache entry, the same file) is removed
    // (fixed: the stage reruns); the missing output is for the next run to
    // restore: one problem left, exit 4.
    let o = dg(&ws, &["-q", "verify", "--repair"]);
    assert_eq!(o.code, 4, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("b: output b.txt is missing") && o.stdout.contains(" repaired, 1 not"), "{}", o.stdout);
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    assert_eq!(ok(dg(&ws, &["-q", "verify", "--repair"])).stdout, "");
}

#[test]
fn verify_reports_a_mac_failure_by_file_and_repair_fixes_it_under_the_lock() {
    let ws = cmd_ws();
    edit_state_behind_dagrun(&ws, "a");
    let o = dg(&ws, &["verify"]);
    assert_eq!(o.code, 4);
    assert!(o.stdout.contains(".dagrun/state/a.json") && o.stdout.contains("MAC") && o.stdout.contains("modified outside dagrun"), "{}", o.stdout);
    // --repair takes the lock: it waits for nobody and refuses while a run holds it.
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(ws.path(".dagrun/lock")).unwrap();
    lock.try_lock().unwrap();
    let o = dg(&ws, &["verify", "--repair"]);
    assert_eq!(o.code, 75, "{}", o.stderr);
    assert!(ws.exists(".dagrun/state/a.json"));
    lock.unlock().unwrap();
    let o = ok(dg(&ws, &["verify", "--repair"]));
    // (The state record and its action-cache entry: two problems, one file.)
    assert!(o.stdout.contains("MAC") && o.stdout.contains(": 2 problems, all repaired"), "{}", o.stdout);
    ok(dg(&ws, &["verify"]));
    let o = ok(dg(&ws, &["status", "pipeline.yaml"]));
    assert!(o.stdout.contains("STALE  a"), "{}", o.stdout);
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    ok(dg(&ws, &["verify"]));
}

/// The exit-75 message says "or pass --wait SECONDS": every command refused
/// at once for the lock takes `--wait` (helper-65: `pull` and `verify
/// --repair` had none, and `--wait` was then an unexpected argument).
#[test]
fn commands_refused_for_the_lock_accept_the_wait_the_message_suggests() {
    let ws = cmd_ws();
    let remote = tempfile::tempdir().unwrap();
    let url = format!("file://{}", remote.path().display());
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(ws.path(".dagrun/lock")).unwrap();
    lock.try_lock().unwrap();
    for args in [&["verify", "--repair"][..], &["pull", "--remote", &url], &["gc"], &["run", "pipeline.yaml"]] {
        let o = dg(&ws, args);
        assert_eq!(o.code, 75, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("or pass --wait SECONDS"), "{args:?}: {}", o.stderr);
        let mut waiting = args.to_vec();
        waiting.extend(["--wait", "0.2"]);
        let o = dg(&ws, &waiting);
        assert_eq!(o.code, 75, "{waiting:?}: {}", o.stderr);
        assert!(o.stderr.contains("still locked") && o.stderr.contains("after waiting 0.2s"), "{waiting:?}: {}", o.stderr);
    }
    let o = dg(&ws, &["verify", "--wait", "1"]);
    assert_eq!(o.code, 2, "--wait without --repair takes no lock: {}", o.stderr);
    lock.unlock().unwrap();
    ok(dg(&ws, &["pull", "--remote", &url, "--wait", "1"]));
}

#[test]
fn commands_outside_a_workspace_refuse_and_create_nothing() {
    let empty = tempfile::Builder::new().prefix("dagrun-nows-").tempdir().unwrap();
    let d = empty.path();
    for args in [
        &["keys", "forget", "Tenant_A", "--yes"][..],
        &["keys", "rotate", "Tenant_A"],
        &["keys", "list"],
        &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"],
        &["verify"],
        &["verify", "--repair"],
        &["runs"],
        &["features", "Tenant_A"],
        &["predict", "--tenant", "Tenant_A", "--input", "x.csv"],
        &["lineage", "x.txt"],
    ] {
        let o = dg_in(d, args);
        assert_eq!(o.code, 2, "dagrun {args:?}:\nstdout: {}\nstderr: {}", o.stdout, o.stderr);
        assert!(o.stderr.contains("not inside a dagrun workspace") || o.stderr.contains("not a dagrun workspace"), "{args:?}: {}", o.stderr);
        assert!(!o.stdout.contains("crypto-shredded") && !o.stdout.contains("destroyed"), "{args:?}: {}", o.stdout);
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "dagrun {args:?} created files in an empty folder");
    }
}

/// `verify` unwraps every tenant key: a keyring whose wrapped keys were
/// swapped between tenants (or damaged) is reported by key, never with its
/// bytes, instead of being found by the run that next needs it.
#[test]
fn verify_unwraps_every_tenant_key() {
    let ws = propensity_ws();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=1000", "-q"]));
    ok(dg(&ws, &["verify"]));
    let path = ws.path(".dagrun/keys/keyring.json");
    let mut ring: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let wrapped = |r: &Value, t: &str| r["tenants"][t]["data_keys"][0]["wrapped"].clone();
    let (a, b) = (wrapped(&ring, "Tenant_A"), wrapped(&ring, "Tenant_B"));
    ring["tenants"]["Tenant_A"]["data_keys"][0]["wrapped"] = b.clone();
    ring["tenants"]["Tenant_B"]["data_keys"][0]["wrapped"] = a.clone();
    std::fs::write(&path, serde_json::to_vec_pretty(&ring).unwrap()).unwrap();
    let o = dg(&ws, &["verify"]);
    assert_eq!(o.code, 4, "{}\n{}", o.stdout, o.stderr);
    for t in ["Tenant_A", "Tenant_B"] {
        assert!(o.stdout.contains(&format!("wrapped key {t}-dk-1 of tenant {t}")) && o.stdout.contains("does not unwrap"), "{}", o.stdout);
    }
    for hex in [a.as_str().unwrap(), b.as_str().unwrap()] {
        assert!(!o.stdout.contains(hex) && !o.stderr.contains(hex));
    }
}

/// `lineage` follows only authenticated state records; when the one that
/// would answer fails its check, the message names it instead of saying the
/// path was never produced.
#[test]
fn lineage_names_the_record_it_could_not_trust() {
    let ws = cmd_ws();
    ok(dg(&ws, &["lineage", "out/a.txt"]));
    edit_state_behind_dagrun(&ws, "a");
    let o = dg(&ws, &["lineage", "out/a.txt"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("1 state record(s) could not be trusted") && o.stderr.contains(".dagrun/state/a.json fails its MAC check"), "{}", o.stderr);
}

/// `features` with an edited manifest names it (and the fix) instead of
/// saying the tenant has no feature versions; an edited store state record
/// is counted the same way.
#[test]
fn features_names_the_manifest_it_could_not_trust() {
    let ws = propensity_ws();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=1000", "-q"]));
    ok(dg(&ws, &["features", "Tenant_A"]));
    let path = ws.path("featurestore/Tenant_A/v1.0/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"rows\": 5", "\"rows\": 6", 1)).unwrap();
    let o = dg(&ws, &["features", "Tenant_A"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("1 recorded manifest(s) of it could not be trusted") && o.stderr.contains("v1.0/manifest.json fails its MAC check"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("run the pipeline first"), "{}", o.stderr);
    let o = dg(&ws, &["features", "Tenant_A", "--version", "v2.0"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("manifest.json fails its MAC check"), "{}", o.stderr);
    // The other tenant is untouched; its store's state record edited is counted.
    ok(dg(&ws, &["features", "Tenant_B"]));
    edit_state_behind_dagrun(&ws, "store[Tenant_B]");
    let o = dg(&ws, &["features", "Tenant_B"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("1 state record(s) could not be trusted"), "{}", o.stderr);
}

/// `features TENANT` shows only the manifest that tenant's store stage wrote
/// (review 10): another tenant's genuine manifest copied over it, or an
/// older genuine one of the same tenant put back, is refused by name.
#[test]
fn features_shows_only_the_manifest_the_tenants_store_stage_wrote() {
    let ws = propensity_ws();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=1000", "-q"]));
    let a = ws.path("featurestore/Tenant_A/v1.0/manifest.json");
    let older = std::fs::read(&a).unwrap();
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=1200", "-q"]));
    let current = std::fs::read(&a).unwrap();
    assert_ne!(older, current);
    std::fs::copy(ws.path("featurestore/Tenant_B/v1.0/manifest.json"), &a).unwrap();
    let o = dg(&ws, &["features", "Tenant_A", "--json"]);
    assert_eq!(o.code, 2, "another tenant's manifest was shown:\n{}", o.stdout);
    assert!(o.stderr.contains("names tenant \"Tenant_B\", not Tenant_A") && !o.stdout.contains("Tenant_B"), "{}", o.stderr);
    let o = dg(&ws, &["verify"]);
    assert!(o.stdout.contains("names tenant \"Tenant_B\", not Tenant_A"), "{}", o.stdout);
    std::fs::write(&a, &older).unwrap();
    let o = dg(&ws, &["features", "Tenant_A"]);
    assert_eq!(o.code, 2, "an older manifest was shown as the current one:\n{}", o.stdout);
    assert!(o.stderr.contains("manifest.json was modified after its store stage wrote it"), "{}", o.stderr);
    std::fs::write(&a, &current).unwrap();
    let o = ok(dg(&ws, &["features", "Tenant_A"]));
    assert!(o.stdout.contains("tenant Tenant_A, feature set v1.0") && o.stdout.contains("rows 600 "), "{}", o.stdout);
}
