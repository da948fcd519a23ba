//! The propensity pipeline end to end, on the real binary, in temporary
//! workspaces with a small row count.

use arrow_array::{Array, BinaryArray, Float64Array, Int64Array, StringArray};
use dagrun::data::parquet_io::{open_batches, read_footer_kv};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROWS: &str = "6000";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dagrun")
}

const TWO: &str = "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n";
const THREE: &str = "tenants:\n  - id: Tenant_A\n    share: 0.5\n  - id: Tenant_B\n    share: 0.3\n  - id: Tenant_C\n    share: 0.2\n";

fn run(ws: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.current_dir(ws).args(args).env_remove("DAGRUN_MASTER_KEY").env_remove("DAGRUN_MASTER_KEY_FILE").env("DAGRUN_PLAIN", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "exit {:?}\nstdout:\n{out}\nstderr:\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
    out
}

fn run_pipeline(ws: &Path, extra: &[&str]) -> String {
    let mut args = vec!["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}")].into_iter().map(String::from).collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&run(ws, &refs, &[]))
}

/// stage -> status of the latest run record.
fn last_statuses(ws: &Path) -> Vec<(String, String)> {
    let o = run(ws, &["runs", "show", "last", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    v["stages"].as_array().unwrap().iter().map(|s| (s["stage"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string())).collect()
}

fn ran(ws: &Path) -> Vec<String> {
    let mut v: Vec<String> = last_statuses(ws).into_iter().filter(|(_, s)| s == "ran").map(|(n, _)| n).collect();
    v.sort();
    v
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if e.file_type().unwrap().is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// The plaintext Sensitive_Data values of a tenant, regenerated with `dagrun sample`.
fn plaintext_values(ws: &Path, tenant: &str, rows: &str) -> Vec<String> {
    let out = ws.parent().unwrap().join(format!("pii-{tenant}-{}.csv", std::process::id()));
    ok(&run(ws, &["sample", "--tenant", tenant, "--rows", rows, "--out", out.to_str().unwrap()], &[]));
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    text.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().to_string()).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn full_pipeline_noop_and_c_change() {
    let ws = crate::common::shipped_workspace(TWO);
    let out = run_pipeline(ws.root.as_path(), &[]);
    assert!(out.contains("Tenant_A: 3600 rows, features v1.0") && out.contains("serve-check ok"), "{out}");
    assert!(out.contains("Tenant_B: 2400 rows"), "{out}");
    for t in ["Tenant_A", "Tenant_B"] {
        for p in [
            format!("data/encrypted/{t}.parquet"),
            format!("featurestore/{t}/v1.0/features.parquet"),
            format!("featurestore/{t}/v1.0/manifest.json"),
            format!("models/{t}/model.json"),
            format!("reports/serve-check/{t}.json"),
        ] {
            assert!(ws.root.as_path().join(&p).is_file(), "missing {p}");
        }
        // The plaintext intermediate is gone.
        assert!(!ws.root.as_path().join(format!("data/raw/{t}.parquet")).exists());
    }
    // Second run: nothing to do.
    run_pipeline(ws.root.as_path(), &[]);
    assert!(last_statuses(ws.root.as_path()).iter().all(|(_, s)| s == "cached"), "{:?}", last_statuses(ws.root.as_path()));
    // Changing C reruns training and what follows, nothing before it.
    run_pipeline(ws.root.as_path(), &["-p", "C=0.25"]);
    assert_eq!(ran(ws.root.as_path()), ["serve-check[Tenant_A]", "serve-check[Tenant_B]", "train[Tenant_A]", "train[Tenant_B]"]);
    let model: serde_json::Value = serde_json::from_slice(&std::fs::read(ws.root.as_path().join("models/Tenant_A/model.json")).unwrap()).unwrap();
    assert_eq!(model["c"], 0.25);
    assert_eq!(model["format"], "dagrun-model/1");
    assert_eq!(model["feature_names"].as_array().unwrap().len(), 5);
}

#[test]
fn no_plaintext_pii_or_key_bytes_anywhere() {
    let ws = crate::common::shipped_workspace(TWO);
    let o = run(ws.root.as_path(), &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}"), "-v"], &[]);
    let mut captured = o.stdout.clone();
    captured.extend_from_slice(&o.stderr);
    ok(&o);
    let mut needles: Vec<Vec<u8>> = Vec::new();
    needles.extend(plaintext_values(ws.root.as_path(), "Tenant_A", "3600").into_iter().map(String::into_bytes));
    needles.extend(plaintext_values(ws.root.as_path(), "Tenant_B", "2400").into_iter().map(String::into_bytes));
    assert_eq!(needles.len(), 6000);
    // Every key, as raw bytes and as hex.
    for t in ["Tenant_A", "Tenant_B"] {
        let hex = ok(&run(ws.root.as_path(), &["keys", "export", t, "--i-understand-this-prints-a-secret"], &[])).trim().to_string();
        assert_eq!(hex.len(), 64);
        needles.push(hex.clone().into_bytes());
        needles.push(hex::decode(&hex).unwrap());
    }
    let master = std::fs::read_to_string(ws.root.as_path().join(".dagrun/keys/master.key")).unwrap().trim().to_string();
    let master_bytes = hex::decode(&master).unwrap();
    for f in all_files(ws.root.as_path()) {
        let bytes = std::fs::read(&f).unwrap();
        for n in &needles {
            assert!(!contains(&bytes, n), "{} contains plaintext PII or a key", f.display());
        }
        if !f.ends_with("master.key") {
            assert!(!contains(&bytes, master.as_bytes()) && !contains(&bytes, &master_bytes), "{} holds the master key", f.display());
        }
    }
    for n in &needles {
        assert!(!contains(&captured, n), "the run's output contains plaintext PII or a key");
    }
}

#[test]
fn ciphertexts_decrypt_with_the_tenant_key_and_bind_their_place() {
    let ws = crate::common::shipped_workspace(TWO);
    run_pipeline(ws.root.as_path(), &[]);
    let path = ws.root.as_path().join("data/encrypted/Tenant_A.parquet");
    let kv = read_footer_kv(&path).unwrap();
    let key_id = kv["dagrun.key_id"].clone();
    let hex = ok(&run(ws.root.as_path(), &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"], &[])).trim().to_string();
    let key = dagrun::crypto::DataKey::from_bytes(hex::decode(&hex).unwrap().try_into().unwrap());
    assert_eq!(key_id, "Tenant_A-dk-1");
    let expected = plaintext_values(ws.root.as_path(), "Tenant_A", "3600");
    let mut n = 0;
    for b in open_batches(&path, 1024).unwrap() {
        let b = b.unwrap();
        let ids = b.column_by_name("Customer_ID").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
        let enc = b.column_by_name("Sensitive_Data_Enc").unwrap().as_any().downcast_ref::<BinaryArray>().unwrap().clone();
        assert!(b.column_by_name("Sensitive_Data").is_none());
        for i in 0..b.num_rows() {
            let id = ids.value(i);
            let pt = dagrun::crypto::aead::decrypt_field(&key, "Tenant_A", "Sensitive_Data", id, enc.value(i)).unwrap();
            assert_eq!(String::from_utf8(pt).unwrap(), expected[id as usize]);
            if i == 0 {
                // Moved to another row or tenant: refused.
                assert!(dagrun::crypto::aead::decrypt_field(&key, "Tenant_A", "Sensitive_Data", id + 1, enc.value(i)).is_err());
                assert!(dagrun::crypto::aead::decrypt_field(&key, "Tenant_B", "Sensitive_Data", id, enc.value(i)).is_err());
            }
            n += 1;
        }
    }
    assert_eq!(n, 3600);
}

#[test]
fn wrong_master_key_fails_clearly_without_echoing_keys() {
    let ws = crate::common::shipped_workspace(TWO);
    run_pipeline(ws.root.as_path(), &["encrypt"]);
    let wrong = "ab".repeat(32);
    let o =
        run(ws.root.as_path(), &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}"), "--force", "encrypt"], &[("DAGRUN_MASTER_KEY", &wrong)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not open the keyring") && err.contains("DAGRUN_MASTER_KEY"), "{err}");
    assert!(!err.contains(&wrong));
}

#[test]
fn forgetting_a_tenant_leaves_the_others_working() {
    let ws = crate::common::shipped_workspace(THREE);
    run_pipeline(ws.root.as_path(), &[]);
    let o = run(ws.root.as_path(), &["keys", "forget", "Tenant_B"], &[]);
    assert_eq!(o.status.code(), Some(2), "needs --yes");
    // A copy of the keyring that a killed key command left (an unfinished
    // atomic write) would still hold Tenant_B's keys after the forget.
    let keys = ws.root.as_path().join(".dagrun/keys");
    let stale = keys.join(".keyring.json.dagrun-tmp.4242.0");
    std::fs::copy(keys.join("keyring.json"), &stale).unwrap();
    let v = run(ws.root.as_path(), &["verify"], &[]);
    assert_eq!(v.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&v.stdout).contains(".keyring.json.dagrun-tmp.4242.0: a temporary copy left by a killed key operation"), "{v:?}");
    // Review 68: a forget killed before its keyring commit leaves its marker
    // (written before the commit, removed after): the erasure did not happen,
    // and every run, `verify` and `keys audit --verify` say so until the
    // forget is run again.
    let marker = keys.join("forgetting.json");
    std::fs::write(&marker, r#"{"tenant":"Tenant_B","started_at":"2026-12-07T01:02:03Z"}"#).unwrap();
    let said = "`dagrun keys forget Tenant_B` started at 2026-12-07T01:02:03Z did not finish: Tenant_B's keys were NOT destroyed";
    let o = run(ws.root.as_path(), &["-q", "run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}")], &[]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains(said), "{o:?}");
    let v = run(ws.root.as_path(), &["verify"], &[]);
    assert_eq!(v.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&v.stdout).contains(said), "{v:?}");
    assert!(ok(&run(ws.root.as_path(), &["keys", "audit", "--verify"], &[])).contains(said));
    ok(&run(ws.root.as_path(), &["keys", "forget", "Tenant_B", "--yes"], &[]));
    assert!(!stale.exists(), "a copy of the keyring with Tenant_B's keys outlived the forget");
    assert!(!marker.exists(), "the finished forget left its marker");
    // A marker whose tenant the keyring has forgotten (only its removal was cut short) says nothing.
    std::fs::write(&marker, r#"{"tenant":"Tenant_B","started_at":"2026-12-07T01:02:03Z"}"#).unwrap();
    assert!(!ok(&run(ws.root.as_path(), &["keys", "audit", "--verify"], &[])).contains("did not finish"));
    std::fs::remove_file(&marker).unwrap();
    let list = ok(&run(ws.root.as_path(), &["keys", "list", "--json"], &[]));
    assert!(list.contains("destroyed"), "{list}");
    // The next run says clearly that Tenant_B's data cannot be decrypted; A and C are fine.
    let o = run(ws.root.as_path(), &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}")], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("encrypt[Tenant_B]") && err.contains("can no") && err.contains("decrypted"), "{err}");
    let st = last_statuses(ws.root.as_path());
    for (s, status) in &st {
        if s == "encrypt[Tenant_B]" {
            assert_eq!(status, "failed");
        } else if s == "generate[Tenant_B]" {
            // Its plaintext was made again for encrypt[Tenant_B], which then failed.
            assert_eq!(status, "ran", "{s}");
        } else if s.contains("Tenant_B") {
            assert_eq!(status, "skipped", "{s}");
        } else {
            assert_eq!(status, "cached", "{s}");
        }
    }
    // Tenant_A's data still decrypts.
    let hex = ok(&run(ws.root.as_path(), &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"], &[])).trim().to_string();
    assert_eq!(hex.len(), 64);
    let o = run(ws.root.as_path(), &["keys", "export", "Tenant_B", "--i-understand-this-prints-a-secret"], &[]);
    assert!(!o.status.success());

    // What the forget's note says to do next: Tenant_B out of the tenants
    // file, its folders deleted, then `dagrun gc`. `verify` is clean meanwhile
    // (helper-72: 9 problems every night, `--repair` could fix none), and gc
    // removes its records, cache entries and registry (it kept them for good).
    let root = ws.root.as_path();
    std::fs::write(root.join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n    share: 0.7\n  - id: Tenant_C\n    share: 0.3\n").unwrap();
    fn remove_named(dir: &Path, what: &str) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let (p, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            if name == ".dagrun" {
                continue;
            }
            if name.contains(what) {
                if p.is_dir() { std::fs::remove_dir_all(&p).unwrap() } else { std::fs::remove_file(&p).unwrap() }
            } else if p.is_dir() {
                remove_named(&p, what);
            }
        }
    }
    remove_named(root, "Tenant_B");
    let b_records = || -> usize {
        ["state", "cache/actions"]
            .iter()
            .filter_map(|d| std::fs::read_dir(root.join(".dagrun").join(d)).ok())
            .flat_map(|rd| rd.flatten())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.contains("[Tenant_B]") || std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("[Tenant_B]"))
            })
            .count()
    };
    assert!(b_records() > 0);
    let v = run(root, &["verify"], &[]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert_eq!(v.status.code(), Some(0), "{out}");
    assert!(out.contains("state records of forgotten tenants are not checked; `dagrun gc` removes them"), "{out}");
    let o = ok(&run(root, &["gc"], &[]));
    assert!(o.contains("removed what was left of forgotten tenant(s) Tenant_B"), "{o}");
    assert_eq!(b_records(), 0, "a record of Tenant_B's stages outlived gc");
    assert!(!root.join(".dagrun/registry/Tenant_B").exists(), "Tenant_B's registry outlived gc");
    assert!(root.join(".dagrun/registry/Tenant_A").exists());
    let v = run(root, &["verify"], &[]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert_eq!(v.status.code(), Some(0), "{out}");
    assert!(!out.contains("forgotten"), "{out}");
    ok(&run(root, &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}")], &[]));
    assert!(!ok(&run(root, &["gc"], &[])).contains("forgotten"), "nothing is left to remove");
}

/// helper-73: a tombstone added to keyring.json without the master key made
/// `gc` delete a live tenant's registry, records and cache entries, and
/// `verify` stop checking them. Only a sealed tombstone of a tenant with no
/// keys left counts.
#[test]
fn a_tombstone_added_by_hand_makes_gc_delete_nothing() {
    let ws = crate::common::shipped_workspace(TWO);
    let root = ws.root.as_path();
    run_pipeline(root, &[]);
    let ring_path = root.join(".dagrun/keys/keyring.json");
    let mut ring: serde_json::Value = serde_json::from_slice(&std::fs::read(&ring_path).unwrap()).unwrap();
    let forged = serde_json::json!({"tenant": "Tenant_A", "forgotten_at": "2026-12-07T00:00:00Z", "destroyed_keys": []});
    ring["forgotten"] = serde_json::json!([forged.clone()]);
    std::fs::write(&ring_path, serde_json::to_vec_pretty(&ring).unwrap()).unwrap();
    let before = std::fs::read_dir(root.join(".dagrun/state")).unwrap().count();
    let o = run(root, &["gc"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("names tenant Tenant_A forgotten without proof (its keys are still there)") && err.contains("nothing of Tenant_A is removed"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("forgotten tenant"), "{o:?}");
    assert!(root.join(".dagrun/registry/Tenant_A/champion.json").exists(), "gc deleted a live tenant's registry");
    assert_eq!(std::fs::read_dir(root.join(".dagrun/state")).unwrap().count(), before);
    let v = run(root, &["verify"], &[]);
    assert_eq!(v.status.code(), Some(4), "{v:?}");
    assert!(String::from_utf8_lossy(&v.stdout).contains("names tenant Tenant_A forgotten, but its keys are still there"), "{v:?}");
    // The same line with a seal copied from elsewhere does not verify either.
    let mut sealed = forged;
    sealed["seal"] = "0".repeat(64).into();
    ring["forgotten"] = serde_json::json!([sealed]);
    std::fs::write(&ring_path, serde_json::to_vec_pretty(&ring).unwrap()).unwrap();
    ok(&run(root, &["gc"], &[]));
    assert!(root.join(".dagrun/registry/Tenant_A/champion.json").exists());
}

#[test]
fn feature_store_parquet_schema_footer_and_hash() {
    let ws = crate::common::shipped_workspace(TWO);
    run_pipeline(ws.root.as_path(), &[]);
    let dir = ws.root.as_path().join("featurestore/Tenant_A/v1.0");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let file = dir.join("features.parquet");
    assert_eq!(manifest["file_blake3"].as_str().unwrap(), blake3::hash(&std::fs::read(&file).unwrap()).to_hex().as_str());
    assert_eq!(manifest["feature_set_version"], "v1.0");
    assert_eq!(manifest["rows"], 3600);
    let kv = read_footer_kv(&file).unwrap();
    assert_eq!(kv["dagrun.feature_set_version"], "v1.0");
    assert_eq!(kv["dagrun.lineage_hash"], manifest["lineage"]["lineage_hash"].as_str().unwrap());
    let schema = dagrun::data::parquet_io::read_schema(&file).unwrap();
    let names: Vec<String> = schema.fields().iter().map(|f| format!("{}:{}", f.name(), f.data_type())).collect();
    assert_eq!(
        names,
        [
            "Tenant_ID:Utf8",
            "Customer_ID:Int64",
            "Sensitive_Token:FixedSizeBinary(32)",
            "Recency_Days:Int64",
            "Frequency_Ratio:Float64",
            "High_Value_Segment:Int64",
            "Purchase_Login_Ratio:Float64",
            "Activity_Score:Float64",
            "Converted:Boolean"
        ]
    );
    // Formulas hold row by row against the stored statistics.
    let stats = &manifest["stats"];
    let mean = stats["mean_login"].as_f64().unwrap();
    let mut rows = 0;
    for b in open_batches(&file, 4096).unwrap() {
        let b = b.unwrap();
        let t = b.column_by_name("Tenant_ID").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        let fr = b.column_by_name("Frequency_Ratio").unwrap().as_any().downcast_ref::<Float64Array>().unwrap().clone();
        for i in 0..b.num_rows() {
            assert_eq!(t.value(i), "Tenant_A");
            assert!(fr.value(i) >= 0.0 && mean > 0.0);
        }
        rows += b.num_rows();
    }
    assert_eq!(rows, 3600);
    let show = ok(&run(ws.root.as_path(), &["features", "Tenant_A"], &[]));
    assert!(show.contains("p80_purchase") && show.contains("lineage"), "{show}");
}

#[test]
fn serve_check_fails_when_stored_statistics_are_tampered_with() {
    let ws = crate::common::shipped_workspace(TWO);
    run_pipeline(ws.root.as_path(), &[]);
    let dir = ws.root.as_path().join("featurestore/Tenant_A/v1.0");
    let model = ws.root.as_path().join("models/Tenant_A/model.json");
    let key = dagrun::crypto::Keyring::open_existing(ws.root.as_path()).unwrap().expect("a master key").integrity_key();
    let wsp = dagrun::workspace::Workspace::at(ws.root.as_path());
    let recorded = dagrun::scoring::recorded_hash(&wsp, key.clone(), "models/Tenant_A/model.json").unwrap().1;
    let data = ws.root.as_path().join("data/encrypted/Tenant_A.parquet");
    // Untouched: passes with identical scores.
    let r = dagrun::stages::serve_check::check(&key, "Tenant_A", &data, &dir, &model, Some(&recorded)).unwrap();
    assert!(r.passed && r.max_abs_diff <= 1e-9 && r.rows_checked > 0);
    // The same rows in another order (paired by Customer_ID, not by
    // position): the same report. Reversed (out of order from the first
    // row), and rotated (in order for a while, then not).
    {
        use arrow_array::RecordBatch;
        let batches: Vec<RecordBatch> = dagrun::data::parquet_io::open_batches(&data, 4096).unwrap().map(|b| b.unwrap()).collect();
        let all = arrow_select::concat::concat_batches(&batches[0].schema(), &batches).unwrap();
        let n = all.num_rows() as u32;
        for (name, order) in [("reversed", (0..n).rev().collect::<Vec<u32>>()), ("rotated", (0..n).map(|i| (i + n / 2) % n).collect())] {
            let idx = arrow_array::UInt32Array::from(order);
            let cols = all.columns().iter().map(|c| arrow_select::take::take(c, &idx, None).unwrap()).collect();
            let shuffled = RecordBatch::try_new(all.schema(), cols).unwrap();
            let other = ws.root.as_path().join(format!("{name}.parquet"));
            let mut sink = dagrun::data::parquet_io::ParquetSink::create(&other, all.schema(), vec![]).unwrap();
            sink.write(&shuffled).unwrap();
            sink.finish().unwrap();
            let r2 = dagrun::stages::serve_check::check(&key, "Tenant_A", &other, &dir, &model, Some(&recorded)).unwrap();
            assert_eq!((r2.rows_total, r2.rows_checked, r2.max_abs_diff), (r.rows_total, r.rows_checked, r.max_abs_diff), "{name}");
            assert!((r2.auc - r.auc).abs() < 1e-12, "{name}: {} vs {}", r2.auc, r.auc);
            std::fs::remove_file(&other).unwrap();
        }
    }
    // Tampered statistics in the manifest: refused.
    let mpath = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["stats"]["p80_purchase"] = serde_json::json!(m["stats"]["p80_purchase"].as_f64().unwrap() * 0.5);
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let err = dagrun::stages::serve_check::check(&key, "Tenant_A", &data, &dir, &model, Some(&recorded)).unwrap_err();
    assert!(format!("{err:#}").contains("modified outside dagrun"), "{err:#}");
    // Even re-sealed by someone holding the key, other statistics are refused.
    let sealed = dagrun::workspace::record::seal_value(&key, dagrun::workspace::record::FEATURE_MANIFEST, &m).unwrap();
    std::fs::write(&mpath, serde_json::to_vec_pretty(&sealed).unwrap()).unwrap();
    let err = dagrun::stages::serve_check::check(&key, "Tenant_A", &data, &dir, &model, Some(&recorded)).unwrap_err();
    assert!(format!("{err:#}").contains("statistics"), "{err:#}");
    // A model that does not match its lineage record: refused.
    let zero = dagrun::workspace::ContentHash::parse(&"0".repeat(64)).unwrap();
    let err = dagrun::stages::serve_check::check(&key, "Tenant_A", &data, &dir, &model, Some(&zero)).unwrap_err();
    assert!(format!("{err:#}").contains("lineage record"), "{err:#}");
    // The engine notices the hand edit and restores the manifest before serving.
    run_pipeline(ws.root.as_path(), &[]);
    assert!(last_statuses(ws.root.as_path()).iter().any(|(s, st)| s == "store[Tenant_A]" && st == "restored"));
}

#[test]
fn predict_on_training_rows_matches_the_offline_path() {
    let ws = crate::common::shipped_workspace(TWO);
    run_pipeline(ws.root.as_path(), &[]);
    // The generator is deterministic: `sample` with the pipeline's seed gives the training rows.
    let raw = ws.root.as_path().join("in.csv");
    ok(&run(ws.root.as_path(), &["sample", "--tenant", "Tenant_A", "--rows", "3600", "--no-label", "--out", raw.to_str().unwrap()], &[]));
    let out = ws.root.as_path().join("scores.csv");
    ok(&run(ws.root.as_path(), &["predict", "--tenant", "Tenant_A", "--input", raw.to_str().unwrap(), "--output", out.to_str().unwrap()], &[]));
    let text = std::fs::read_to_string(&out).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "Customer_ID,score,model_version,feature_version");
    let online: Vec<(i64, f64)> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap())
        })
        .collect();
    assert_eq!(online.len(), 3600);
    // Offline: stored features through the model artifact.
    let model = dagrun::model::ModelArtifact::from_json_bytes(&std::fs::read(ws.root.as_path().join("models/Tenant_A/model.json")).unwrap(), "model").unwrap();
    let mut offline = std::collections::HashMap::new();
    for b in open_batches(&ws.root.as_path().join("featurestore/Tenant_A/v1.0/features.parquet"), 4096).unwrap() {
        for (id, x) in dagrun::scoring::stored_features(&b.unwrap()).unwrap() {
            offline.insert(id, model.predict_proba_row(&x));
        }
    }
    for (id, s) in &online {
        assert!((0.0..=1.0).contains(s));
        assert!((s - offline[id]).abs() <= 1e-12, "customer {id}: {s} vs {}", offline[id]);
    }
    // Parquet (from the extension): the same scores, typed, in the same order.
    let pq = ws.root.as_path().join("scores.parquet");
    ok(&run(ws.root.as_path(), &["predict", "--tenant", "Tenant_A", "--input", raw.to_str().unwrap(), "--output", pq.to_str().unwrap()], &[]));
    let mut from_parquet = Vec::new();
    for b in open_batches(&pq, 1000).unwrap() {
        let b = b.unwrap();
        let names: Vec<String> = b.schema().fields().iter().map(|f| format!("{}:{}", f.name(), f.data_type())).collect();
        assert_eq!(names, ["Customer_ID:Int64", "score:Float64", "model_version:Utf8", "feature_version:Utf8"]);
        let ids = b.column(0).as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
        let scores = b.column(1).as_any().downcast_ref::<arrow_array::Float64Array>().unwrap();
        let mv = b.column(2).as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
        for i in 0..b.num_rows() {
            assert_eq!(mv.value(i), model.model_version);
            from_parquet.push((ids.value(i), scores.value(i)));
        }
    }
    assert_eq!(from_parquet, online, "Parquet scores differ from the CSV's");
    // Parquet has no stdout form; an unknown format is named.
    let o = run(ws.root.as_path(), &["predict", "--tenant", "Tenant_A", "--input", raw.to_str().unwrap(), "--format", "parquet"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--output FILE.parquet"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
    // JSON lines, and refusals.
    let o = ok(&run(ws.root.as_path(), &["predict", "--tenant", "Tenant_A", "--input", raw.to_str().unwrap(), "--format", "jsonl"], &[]));
    assert_eq!(o.lines().count(), 3600);
    assert!(o.lines().next().unwrap().contains("\"model_version\""));
    let o = run(ws.root.as_path(), &["predict", "--tenant", "Tenant_B", "--input", raw.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Tenant_A"), "{}", String::from_utf8_lossy(&o.stderr));
    // predict serves the tenant's champion from the model registry: the
    // champion's registered copy edited by hand is refused.
    let mp = ws.root.as_path().join(format!(".dagrun/registry/Tenant_A/versions/{}.json", model.model_version));
    let mut bytes = std::fs::read(&mp).unwrap();
    bytes.extend_from_slice(b" ");
    std::fs::write(&mp, bytes).unwrap();
    let o = run(ws.root.as_path(), &["predict", "--tenant", "Tenant_A", "--input", raw.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not match its registry record"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn ingest_pipeline_reruns_only_the_changed_tenant() {
    let ws = crate::common::shipped_workspace(THREE);
    let inc = ws.root.as_path().join("incoming");
    for (t, n, seed) in [("Tenant_A", "2000", "1"), ("Tenant_B", "1500", "2"), ("Tenant_C", "1500", "3")] {
        ok(&run(ws.root.as_path(), &["sample", "--tenant", t, "--rows", n, "--seed", seed, "--out", inc.join(format!("{t}.csv")).to_str().unwrap()], &[]));
    }
    ok(&run(ws.root.as_path(), &["run", "pipelines/propensity-ingest.yaml"], &[]));
    ok(&run(ws.root.as_path(), &["run", "pipelines/propensity-ingest.yaml"], &[]));
    assert!(ran(ws.root.as_path()).is_empty());
    ok(&run(ws.root.as_path(), &["sample", "--tenant", "Tenant_B", "--rows", "1600", "--seed", "9", "--out", inc.join("Tenant_B.csv").to_str().unwrap()], &[]));
    ok(&run(ws.root.as_path(), &["run", "pipelines/propensity-ingest.yaml"], &[]));
    let r = ran(ws.root.as_path());
    assert!(!r.is_empty() && r.iter().all(|s| s.ends_with("[Tenant_B]")), "{r:?}");
    assert!(r.contains(&"train[Tenant_B]".to_string()));
    // A bad row: clear error naming file, row and column; nothing written.
    let bad = inc.join("Tenant_C.csv");
    let text = std::fs::read_to_string(&bad).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut f: Vec<String> = lines[5].split(',').map(String::from).collect();
    f[3] = "-4".into();
    lines[5] = f.join(",");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let o = run(ws.root.as_path(), &["run", "pipelines/propensity-ingest.yaml"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Tenant_C.csv") && err.contains("Login_Count") && err.contains("row 5"), "{err}");
    assert!(!ws.root.as_path().join("data/raw/Tenant_C.parquet").exists());
}

#[test]
fn rotating_a_key_reencrypts_only_that_tenant_and_old_keys_stay_readable() {
    let ws = crate::common::shipped_workspace(TWO);
    run_pipeline(ws.root.as_path(), &[]);
    let old_hex = ok(&run(ws.root.as_path(), &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"], &[])).trim().to_string();
    let out = ok(&run(ws.root.as_path(), &["keys", "rotate", "Tenant_A"], &[]));
    assert!(out.contains("Tenant_A-dk-2"), "{out}");
    // status names the key change as the reason, for Tenant_A only.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&run(ws.root.as_path(), &["status", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}"), "--json"], &[]))).unwrap();
    let stale: Vec<(String, String)> = st["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "stale")
        .map(|s| (s["stage"].as_str().unwrap().to_string(), s["reasons"][0].as_str().unwrap_or("").to_string()))
        .collect();
    assert!(stale.iter().all(|(s, _)| s.ends_with("[Tenant_A]") && !s.starts_with("generate")), "{stale:?}");
    assert_eq!(stale[0].0, "encrypt[Tenant_A]");
    assert!(stale[0].1.contains("Tenant_A-dk-1 → Tenant_A-dk-2"), "{stale:?}");
    run_pipeline(ws.root.as_path(), &[]);
    let r = ran(ws.root.as_path());
    assert!(r.contains(&"encrypt[Tenant_A]".to_string()) && r.iter().all(|s| s.ends_with("[Tenant_A]")), "{r:?}");
    let path = ws.root.as_path().join("data/encrypted/Tenant_A.parquet");
    assert_eq!(read_footer_kv(&path).unwrap()["dagrun.key_id"], "Tenant_A-dk-2");
    // The retired key is still there for data encrypted with it.
    let again = ok(&run(ws.root.as_path(), &["keys", "export", "Tenant_A", "--key-id", "Tenant_A-dk-1", "--i-understand-this-prints-a-secret"], &[]));
    assert_eq!(again.trim(), old_hex);
    let list = ok(&run(ws.root.as_path(), &["keys", "list"], &[]));
    assert!(list.contains("retired") && !list.contains(&old_hex), "{list}");
}
