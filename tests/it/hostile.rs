//! Hostile input and leaks, on the real binary: bad tenant lists, bad raw data
//! for `ingest` and `predict` (CSV and Parquet), training data that cannot make
//! a model, damaged ciphertexts and key files, lost keys, and a search of every
//! file and every command's output for plaintext PII and key material.
//!
//! Every refusal must: exit non-zero (2 for a bad command line, tenant list or
//! `predict` input, where nothing runs; 1 for a stage that fails at run time —
//! `ingest` rejecting its file, `train` refusing its data, key problems),
//! name the file and the place (row/column/line/key) and the reason, never
//! panic, never echo a `Sensitive_Data` value, and change nothing on disk.
//!
//! "Nothing changed on disk" means: every file of the workspace has the same
//! bytes before and after, except dagrun's bookkeeping of the failed attempt —
//! its run record (`runs/`), `.dagrun/logs/`, the lock file and the file-hash
//! memo (`.dagrun/hashmemo.json`). Outputs, state files (`.dagrun/state/`),
//! the cache and the keyring are compared. When the failing stage is late in
//! the pipeline (`train`), the stages before it legitimately ran on the new
//! input; then the failing stage's own output and state must be unchanged.
//!
//! There is no CLI command that decrypts `Sensitive_Data_Enc` (dagrun never
//! needs the plaintext after `encrypt`), so decrypt-time failures are tested
//! through the library (`dagrun::crypto::aead::decrypt_field`) on files made by
//! a real run.

use crate::common::{BIN, HANG, Out, Ws, ok, spawn};
use arrow_array::{Array, ArrayRef, BinaryArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use dagrun::crypto::FieldError;
use dagrun::crypto::aead::decrypt_field;
use dagrun::data::parquet_io::{ParquetSink, open_batches};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const THREE: &str = "tenants:\n  - id: Tenant_A\n    share: 0.5\n  - id: Tenant_B\n    share: 0.3\n  - id: Tenant_C\n    share: 0.2\n";
const ONE: &str = "tenants:\n  - id: Tenant_A\n";
/// Rows per tenant of the default pipeline with -p rows=3000 and THREE.
const SPLIT: [(&str, usize); 3] = [("Tenant_A", 1500), ("Tenant_B", 900), ("Tenant_C", 600)];
/// A recognisable fake e-mail put into bad rows: must never be echoed.
const PROBE: &str = "hostile.probe.4711@leak.example";

/// A workspace with the shipped pipelines and a tenant list.
fn workspace(tenants: &str) -> Ws {
    crate::common::shipped_workspace(tenants)
}

fn command(ws: &Ws, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(&ws.root).env_remove("RUST_LOG").env_remove("DAGRUN_MASTER_KEY").env_remove("DAGRUN_MASTER_KEY_FILE");
    c.env("NO_COLOR", "1").env("DAGRUN_PLAIN", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn dg(ws: &Ws, args: &[&str]) -> Out {
    dg_env(ws, args, &[])
}

fn dg_env(ws: &Ws, args: &[&str], env: &[(&str, &str)]) -> Out {
    let o = spawn(command(ws, args, env)).wait(HANG);
    assert!(!o.stderr.contains("panicked"), "dagrun {args:?} panicked:\n{}", o.stderr);
    o
}

/// Assert a refusal: exit code, every needle in stderr, no PII probe echoed.
fn refused(o: &Out, code: i32, needles: &[&str], what: &str) {
    assert_eq!(o.code, code, "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "{what}: stderr lacks {n:?}:\n{}", o.stderr);
    }
    assert!(!o.stderr.contains(PROBE) && !o.stdout.contains(PROBE), "{what}: a Sensitive_Data value was echoed:\n{}", o.stderr);
    assert!(!o.stderr.contains("078-05") && !o.stdout.contains("078-05"), "{what}: a tenant-id-shaped SSN was echoed:\n{}", o.stderr);
}

/// Path → blake3 of every file, without the bookkeeping of a failed attempt.
fn snapshot(ws: &Ws) -> BTreeMap<String, String> {
    let skip = |p: &str| p.starts_with("runs/") || p.starts_with(".dagrun/logs/") || p == ".dagrun/lock" || p == ".dagrun/hashmemo.json";
    ws.walk()
        .into_iter()
        .filter(|p| !skip(p))
        .map(|p| {
            let full = ws.path(&p);
            let h = if full.is_file() { crate::common::b3(&full) } else { "dir".into() };
            (p, h)
        })
        .collect()
}

fn assert_same(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>, what: &str) {
    if before != after {
        let changed: Vec<&String> = before.keys().chain(after.keys()).filter(|k| before.get(*k) != after.get(*k)).collect();
        panic!("{what}: the workspace changed: {changed:?}");
    }
}

// ------------------------------------------------------------------ CSV edits

/// Lines of a CSV file, split into cells (sample output has no quoted commas).
fn cells(text: &str) -> Vec<Vec<String>> {
    text.lines().map(|l| l.split(',').map(String::from).collect()).collect()
}

fn join(rows: &[Vec<String>]) -> String {
    rows.iter().map(|r| r.join(",")).collect::<Vec<_>>().join("\n") + if rows.is_empty() { "" } else { "\n" }
}

type Edit = fn(&mut Vec<Vec<String>>);

/// Column indexes of the raw CSV written by `dagrun sample`.
const TID: usize = 0;
const LOGIN: usize = 3;
const AMOUNT: usize = 4;
const DATE: usize = 5;

/// (name, edit of the CSV (row 2 = rows[2]), stderr needles) shared by ingest and predict.
fn csv_cases() -> Vec<(&'static str, Edit, Vec<&'static str>)> {
    vec![
        (
            "missing column",
            |r| {
                r.iter_mut().for_each(|l| {
                    l.remove(LOGIN);
                })
            },
            vec!["missing column Login_Count"],
        ),
        (
            "extra column",
            |r| r.iter_mut().enumerate().for_each(|(i, l)| l.push(if i == 0 { "Extra".into() } else { "1".into() })),
            vec!["unexpected column name (5 characters, text)"],
        ),
        ("wrong type (count)", |r| r[2][LOGIN] = "twelve".into(), vec!["row 2 (line 3), column Login_Count", "not an integer"]),
        ("wrong type (amount)", |r| r[2][AMOUNT] = "12,50 EUR".replace(',', ";"), vec!["row 2 (line 3), column Purchase_Amount", "not a number"]),
        ("NaN", |r| r[2][AMOUNT] = "NaN".into(), vec!["row 2 (line 3), column Purchase_Amount", "NaN"]),
        ("+inf", |r| r[2][AMOUNT] = "inf".into(), vec!["row 2 (line 3), column Purchase_Amount", "infinite"]),
        ("-inf", |r| r[2][AMOUNT] = "-inf".into(), vec!["row 2 (line 3), column Purchase_Amount", "infinite"]),
        ("negative count", |r| r[2][LOGIN] = "-3".into(), vec!["row 2 (line 3), column Login_Count", "negative"]),
        ("absurd count", |r| r[2][LOGIN] = "1000000000000".into(), vec!["row 2 (line 3), column Login_Count", "above the bound"]),
        ("negative amount", |r| r[2][AMOUNT] = "-5.00".into(), vec!["row 2 (line 3), column Purchase_Amount", "negative"]),
        ("future date", |r| r[2][DATE] = "2026-06-30".into(), vec!["row 2 (line 3), column Last_Visit_Date", "in the future relative to as_of (2026-01-01)"]),
        ("date before 1970", |r| r[2][DATE] = "1969-12-31".into(), vec!["row 2 (line 3), column Last_Visit_Date", "before 1970-01-01"]),
        ("unparseable date", |r| r[2][DATE] = "31/12/2025".into(), vec!["row 2 (line 3), column Last_Visit_Date", "YYYY-MM-DD"]),
        // Named when it is a configured tenant (predict's THREE), else described (ingest's ONE).
        ("another tenant's row", |r| r[2][TID] = "Tenant_B".into(), vec!["row 2 (line 3), column Tenant_ID", "belongs to tenant "]),
        // A tenant-id-shaped value that is not a configured tenant may be PII: described, never shown.
        ("an SSN as tenant", |r| r[2][TID] = "078-05-1120".into(), vec!["row 2 (line 3), column Tenant_ID", "belongs to tenant (11 characters, mostly digits"]),
        ("empty file", |r| r.clear(), vec!["is empty"]),
        ("header only", |r| r.truncate(1), vec!["no data rows"]),
    ]
}

/// The probe e-mail as Sensitive_Data of the bad row and the row after (before the edit).
fn plant_probe(rows: &mut [Vec<String>]) {
    for r in rows.iter_mut().skip(2).take(2) {
        r[2] = PROBE.into();
    }
}

// ------------------------------------------------------------------ Parquet

fn read_all(path: &Path) -> RecordBatch {
    let batches: Vec<RecordBatch> = open_batches(path, 1 << 20).unwrap().map(Result::unwrap).collect();
    arrow_select::concat::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Replace (or, with `None`, drop) a column; `Some((name, array))` keeps the position.
fn with_column(b: &RecordBatch, name: &str, new: Option<ArrayRef>) -> RecordBatch {
    let schema = b.schema();
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    for (f, c) in schema.fields().iter().zip(b.columns()) {
        if f.name() == name {
            if let Some(a) = &new {
                fields.push(arrow_schema::Field::new(name, a.data_type().clone(), true));
                cols.push(a.clone());
            }
        } else {
            fields.push(f.as_ref().clone());
            cols.push(c.clone());
        }
    }
    RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), cols).unwrap()
}

fn write_parquet(path: &Path, b: &RecordBatch) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut s = ParquetSink::create(path, b.schema(), vec![]).unwrap();
    s.write(b).unwrap();
    s.finish().unwrap();
}

fn i64_col(b: &RecordBatch, n: &str) -> Vec<i64> {
    b.column_by_name(n).unwrap().as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
}
fn f64_col(b: &RecordBatch, n: &str) -> Vec<f64> {
    b.column_by_name(n).unwrap().as_any().downcast_ref::<Float64Array>().unwrap().values().to_vec()
}
fn str_col(b: &RecordBatch, n: &str) -> Vec<String> {
    let a = b.column_by_name(n).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

/// Bad Parquet variants of a good raw batch: (name, batch, needles). Row 2 is index 1.
fn parquet_cases(good: &RecordBatch) -> Vec<(&'static str, RecordBatch, Vec<&'static str>)> {
    let mut pii = str_col(good, "Sensitive_Data");
    pii[1] = PROBE.into();
    let good = with_column(good, "Sensitive_Data", Some(Arc::new(StringArray::from(pii))));
    let set_i64 = |n: &str, v: i64| {
        let mut c = i64_col(&good, n);
        c[1] = v;
        with_column(&good, n, Some(Arc::new(Int64Array::from(c))))
    };
    let set_f64 = |v: f64| {
        let mut c = f64_col(&good, "Purchase_Amount");
        c[1] = v;
        with_column(&good, "Purchase_Amount", Some(Arc::new(Float64Array::from(c))))
    };
    let dates = |v: i32| {
        let a = good.column_by_name("Last_Visit_Date").unwrap().as_any().downcast_ref::<Date32Array>().unwrap();
        let mut c = a.values().to_vec();
        c[1] = v;
        with_column(&good, "Last_Visit_Date", Some(Arc::new(Date32Array::from(c))))
    };
    let logins_as_text: ArrayRef = Arc::new(StringArray::from(i64_col(&good, "Login_Count").iter().map(|v| v.to_string()).collect::<Vec<_>>()));
    let mut nulls: Vec<Option<i64>> = i64_col(&good, "Login_Count").into_iter().map(Some).collect();
    nulls[1] = None;
    let mut tenants = str_col(&good, "Tenant_ID");
    tenants[1] = "Tenant_B".into();
    vec![
        ("parquet missing column", with_column(&good, "Login_Count", None), vec!["missing column Login_Count"]),
        ("parquet wrong type", with_column(&good, "Login_Count", Some(logins_as_text)), vec!["column Login_Count has type Utf8", "int64"]),
        ("parquet null", with_column(&good, "Login_Count", Some(Arc::new(Int64Array::from(nulls)))), vec!["row 2, column Login_Count", "null"]),
        ("parquet NaN", set_f64(f64::NAN), vec!["row 2, column Purchase_Amount", "NaN"]),
        ("parquet -inf", set_f64(f64::NEG_INFINITY), vec!["row 2, column Purchase_Amount", "infinite"]),
        ("parquet negative count", set_i64("Login_Count", -1), vec!["row 2, column Login_Count", "negative"]),
        ("parquet absurd count", set_i64("Login_Count", 1_000_000_000_000), vec!["row 2, column Login_Count", "above the bound"]),
        ("parquet date before 1970", dates(-1), vec!["row 2, column Last_Visit_Date", "before 1970-01-01"]),
        ("parquet future date", dates(20454 + 30), vec!["row 2, column Last_Visit_Date", "in the future"]),
        (
            "parquet another tenant",
            with_column(&good, "Tenant_ID", Some(Arc::new(StringArray::from(tenants)))),
            vec!["row 2, column Tenant_ID", "belongs to tenant "],
        ),
        ("parquet header only", good.slice(0, 0), vec!["no data rows"]),
    ]
}

/// Put `bytes` at `input` and run `pipeline`: Tenant_A's ingest must refuse
/// them (exit 1, naming the stage, the file and the needles), change nothing
/// on disk and leave no plaintext.
fn ingest_refuses(ws: &Ws, pipeline: &str, input: &str, bytes: &[u8], needles: &[&str], what: &str) {
    ws.write(input, bytes);
    let before = snapshot(ws);
    let o = dg(ws, &["run", pipeline]);
    let mut n = vec!["ingest[Tenant_A]", input];
    n.extend(needles);
    refused(&o, 1, &n, what);
    assert_same(&before, &snapshot(ws), what);
    assert!(!ws.exists("data/raw/Tenant_A.parquet"), "{what}: plaintext left behind");
}

// ------------------------------------------------------------------ tests

#[test]
fn bad_tenant_lists_are_refused_before_anything_runs() {
    let ws = workspace(ONE);
    let long = "x".repeat(10_000);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("duplicate", "tenants:\n  - id: Tenant_A\n  - id: Tenant_A\n".into(), vec!["tenants[1]", "listed twice"]),
        ("slash", "tenants:\n  - id: a/b\n".into(), vec!["tenants[0]", "invalid tenant id \"a/b\""]),
        ("dotdot", "tenants:\n  - id: \"..\"\n".into(), vec!["tenants[0]", "invalid tenant id \"..\""]),
        ("space", "tenants:\n  - id: \"Tenant A\"\n".into(), vec!["tenants[0]", "invalid tenant id \"Tenant A\""]),
        ("control", "tenants:\n  - id: \"A\\u001b[31mB\"\n".into(), vec!["tenants[0]", "\\u{1b}"]),
        ("10k chars", format!("tenants:\n  - id: {long}\n"), vec!["tenants[0]", "(10000 characters)"]),
        ("shares", "tenants:\n  - id: A\n    share: 0.5\n  - id: B\n    share: 0.4\n".into(), vec!["shares sum to 0.9", "add up to 1"]),
        ("share out of range", "tenants:\n  - id: A\n    share: 1.5\n".into(), vec!["tenants[0] (A)", "share 1.5"]),
        ("some shares", "tenants:\n  - id: A\n    share: 1.0\n  - id: B\n".into(), vec!["every tenant a `share`, or none"]),
    ];
    for (what, yaml, needles) in cases {
        ws.write("config/tenants.yaml", &yaml);
        let before = snapshot(&ws);
        for args in [&["run", "pipelines/propensity.yaml", "-p", "rows=300"][..], &["status", "pipelines/propensity.yaml"]] {
            let o = dg(&ws, args);
            let mut n = vec!["config/tenants.yaml"];
            n.extend(&needles);
            refused(&o, 2, &n, what);
            assert!(!o.stderr.contains('\u{1b}'), "{what}: raw control character echoed");
            assert!(o.stderr.len() < 1000, "{what}: message of {} bytes", o.stderr.len());
        }
        assert_same(&before, &snapshot(&ws), what);
        assert!(ws.record_files().is_empty(), "{what}: a run record was written although nothing ran");
    }
    // A bad --tenant on the command line.
    for bad in ["../etc", "a b", &long] {
        let o = dg(&ws, &["predict", "--tenant", bad, "--input", "x.csv"]);
        refused(&o, 2, &["--tenant", "invalid tenant id"], bad);
    }
}

#[test]
fn ingest_refuses_bad_csv_and_parquet_and_changes_nothing() {
    let ws = workspace(ONE);
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "400", "--out", "incoming/Tenant_A.csv"]));
    let good = ws.read("incoming/Tenant_A.csv");
    ok(dg(&ws, &["run", "pipelines/propensity-ingest.yaml"]));
    for (what, edit, needles) in csv_cases() {
        let mut rows = cells(&good);
        plant_probe(&mut rows);
        edit(&mut rows);
        ingest_refuses(&ws, "pipelines/propensity-ingest.yaml", "incoming/Tenant_A.csv", join(&rows).as_bytes(), &needles, what);
    }
    // Parquet variants, through the same pipeline reading incoming/T.parquet.
    let pq_pipeline = ws.read("pipelines/propensity-ingest.yaml").replace("incoming/${tenant}.csv", "incoming/${tenant}.parquet");
    ws.write("pipelines/ingest-pq.yaml", pq_pipeline);
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "400", "--out", "incoming/Tenant_A.parquet"]));
    let batch = read_all(&ws.path("incoming/Tenant_A.parquet"));
    ok(dg(&ws, &["run", "pipelines/ingest-pq.yaml"]));
    for (what, b, needles) in parquet_cases(&batch) {
        ingest_refuses(&ws, "pipelines/ingest-pq.yaml", "incoming/Tenant_A.parquet", &encoded(&b), &needles, what);
    }
    // Neither run records nor logs hold the probe.
    for p in ws.walk() {
        if ws.path(&p).is_file() {
            assert!(!contains(&std::fs::read(ws.path(&p)).unwrap(), PROBE.as_bytes()) || p.starts_with("incoming/"), "{p} holds the probe");
        }
    }
}

#[test]
fn predict_refuses_bad_rows_and_writes_nothing() {
    let ws = workspace(THREE);
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "300", "--no-label", "--out", "in/good.csv"]));
    let good = ws.read("in/good.csv");
    // The good file scores.
    let o = ok(dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in/good.csv"]));
    assert_eq!(o.stdout.lines().count(), 301);
    let mut cases = csv_cases();
    cases.push((
        "another tenant's file",
        |r| r.iter_mut().skip(1).for_each(|l| l[TID] = "Tenant_B".into()),
        vec!["row 1 (line 2), column Tenant_ID", "belongs to tenant \"Tenant_B\""],
    ));
    for (what, edit, needles) in cases {
        let mut rows = cells(&good);
        plant_probe(&mut rows);
        edit(&mut rows);
        ws.write("in/bad.csv", join(&rows));
        let before = snapshot(&ws);
        for out in [None, Some("scores.csv")] {
            let mut args = vec!["predict", "--tenant", "Tenant_A", "--input", "in/bad.csv"];
            if let Some(f) = out {
                args.extend(["--output", f]);
            }
            let o = dg(&ws, &args);
            let mut n = vec!["in/bad.csv"];
            n.extend(&needles);
            refused(&o, 2, &n, what);
            assert!(o.stdout.is_empty(), "{what}: scores printed before the refusal:\n{}", o.stdout);
        }
        assert_same(&before, &snapshot(&ws), what);
    }
    // Parquet input.
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "300", "--no-label", "--out", "in/good.parquet"]));
    let batch = read_all(&ws.path("in/good.parquet"));
    for (what, b, needles) in parquet_cases(&batch) {
        write_parquet(&ws.path("in/bad.parquet"), &b);
        let before = snapshot(&ws);
        let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in/bad.parquet", "--output", "scores.jsonl"]);
        let mut n = vec!["in/bad.parquet"];
        n.extend(&needles);
        refused(&o, 2, &n, what);
        assert_same(&before, &snapshot(&ws), what);
    }
}

/// A CSV of `rows` labelled rows for Tenant_A, with an edit applied to every data row.
fn ingest_file(ws: &Ws, rows: &str, edit: impl Fn(&mut Vec<String>)) {
    ok(dg(ws, &["sample", "--tenant", "Tenant_A", "--rows", rows, "--out", "incoming/Tenant_A.csv"]));
    let mut r = cells(&ws.read("incoming/Tenant_A.csv"));
    r.iter_mut().skip(1).for_each(&edit);
    ws.write("incoming/Tenant_A.csv", join(&r));
}

#[test]
fn training_refuses_data_that_cannot_make_a_model() {
    // One row: the stages before train accept it, train refuses; no model appears.
    let ws = workspace(ONE);
    ingest_file(&ws, "1", |_| {});
    let o = dg(&ws, &["run", "pipelines/propensity-ingest.yaml"]);
    refused(&o, 1, &["train[Tenant_A]", "tenant Tenant_A", "split is empty", "1 rows"], "one row");
    assert!(!ws.exists("models/Tenant_A/model.json"));
    assert!(!ws.exists(".dagrun/state/train[Tenant_A].json"));

    // A constant column (every Login_Count equal) is valid data: the feature
    // carries no information, its scale is 1 and its L2-penalised coefficient 0.
    ingest_file(&ws, "2000", |r| r[LOGIN] = "7".into());
    ok(dg(&ws, &["run", "pipelines/propensity-ingest.yaml"]));
    let model: serde_json::Value = serde_json::from_str(&ws.read("models/Tenant_A/model.json")).unwrap();
    assert_eq!(model["feature_stats"]["mean_login"], 7.0);
    assert_eq!(model["scaler"]["scale"][1], 1.0, "Frequency_Ratio is constant");
    assert!(model["coefficients"][1].as_f64().unwrap().abs() < 1e-9, "{}", model["coefficients"]);

    // Labels all 0: refused, the previous model and its state stay as they were.
    let model_before = crate::common::b3(&ws.path("models/Tenant_A/model.json"));
    let state_before = crate::common::b3(&ws.path(".dagrun/state/train[Tenant_A].json"));
    ingest_file(&ws, "2000", |r| r[6] = "false".into());
    // (New logins differ from the constant ones: accept that drift, so train sees the data.)
    let o = dg(&ws, &["run", "pipelines/propensity-ingest.yaml", "-p", "max_psi=1000"]);
    refused(&o, 1, &["train[Tenant_A]", "tenant Tenant_A", "training labels are 0", "need both classes"], "labels all 0");
    assert_eq!(crate::common::b3(&ws.path("models/Tenant_A/model.json")), model_before);
    assert_eq!(crate::common::b3(&ws.path(".dagrun/state/train[Tenant_A].json")), state_before);
    // Serving never mixes the old model with the new feature version: the
    // tenant's champion (the previous model, from the model registry) scores
    // with the statistics recorded in it; the model without the registry
    // (`--model` of the train output) is refused against the new store.
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "20", "--no-label", "--out", "in.csv"]));
    let o = ok(dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv"]));
    assert!(o.stdout.contains(model["model_version"].as_str().unwrap()), "{}", o.stdout);
    let o = dg(&ws, &["models", "list", "Tenant_A", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let w = dagrun::workspace::Workspace::at(&ws.root);
    let key = dagrun::scoring::integrity_key_of(&w).unwrap();
    assert!(dagrun::scoring::load_trained(&w, key, "Tenant_A", None).err().unwrap().to_string().contains("retrain"));
}

/// Unwrap every key of the keyring with the master key (from the workspace's
/// key file, or the hex given): (name, bytes).
fn all_keys(ws: &Ws, master_hex: Option<&str>) -> Vec<(String, Vec<u8>)> {
    use aes_gcm::aead::{AeadInOut, KeyInit};
    let master = hex::decode(master_hex.map(str::to_string).unwrap_or_else(|| ws.read(".dagrun/keys/master.key")).trim()).unwrap();
    let ring: serde_json::Value = serde_json::from_str(&ws.read(".dagrun/keys/keyring.json")).unwrap();
    let mk: [u8; 32] = master.as_slice().try_into().unwrap();
    let aes = aes_gcm::Aes256Gcm::new((&mk).into());
    let mut out = vec![("master".to_string(), master.clone())];
    for (tenant, e) in ring["tenants"].as_object().unwrap() {
        let mut ks: Vec<&serde_json::Value> = e["data_keys"].as_array().unwrap().iter().collect();
        ks.push(&e["pseudonym_key"]);
        for k in ks {
            let id = k["id"].as_str().unwrap();
            let blob = hex::decode(k["wrapped"].as_str().unwrap()).unwrap();
            let mut buf = blob[12..44].to_vec();
            let aad = format!("dagrun/keywrap/v1|{tenant}|{id}");
            let nonce: &aes_gcm::aead::Nonce<aes_gcm::Aes256Gcm> = blob[..12].try_into().unwrap();
            let tag: &aes_gcm::aead::Tag<aes_gcm::Aes256Gcm> = blob[44..].try_into().unwrap();
            aes.decrypt_inout_detached(nonce, aad.as_bytes(), buf.as_mut_slice().into(), tag).unwrap();
            out.push((id.to_string(), buf));
        }
    }
    out
}

/// Plaintext Sensitive_Data values of a tenant, regenerated with `dagrun sample`.
fn plaintext(ws: &Ws, tenant: &str, rows: usize) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("pii.csv");
    ok(dg(ws, &["sample", "--tenant", tenant, "--rows", &rows.to_string(), "--out", f.to_str().unwrap()]));
    cells(&std::fs::read_to_string(&f).unwrap()).into_iter().skip(1).map(|r| r[2].clone()).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Needles grouped by length: every window of the haystack is looked up once per length.
struct Needles(HashMap<usize, HashSet<Vec<u8>>>);

impl Needles {
    fn new(all: impl IntoIterator<Item = Vec<u8>>) -> Needles {
        let mut m: HashMap<usize, HashSet<Vec<u8>>> = HashMap::new();
        for n in all {
            m.entry(n.len()).or_default().insert(n);
        }
        Needles(m)
    }
    fn find<'a>(&'a self, hay: &[u8]) -> Option<&'a [u8]> {
        for (len, set) in &self.0 {
            for w in hay.windows(*len) {
                if let Some(n) = set.get(w) {
                    return Some(n);
                }
            }
        }
        None
    }
}

#[test]
fn no_plaintext_or_key_in_any_file_or_output() {
    leak_search(None);
}

/// The master key in `DAGRUN_MASTER_KEY` (no key file), and a `cmd` stage
/// that dumps its environment into an output, its log and the cache: the
/// key is found nowhere.
#[test]
fn no_key_anywhere_with_the_master_key_in_the_environment() {
    leak_search(Some("3c4b5a69788796a5b4c3d2e1f00f1e2d0f1e2d3c4b5a69788796a5b4c3d2e1f0"));
}

/// Run everything on a 3-tenant workspace, then search every file and every
/// output for plaintext PII and key bytes (raw, lower- and upper-case hex).
fn leak_search(master_env: Option<&str>) {
    let ws = workspace(THREE);
    let env: Vec<(&str, &str)> = master_env.map(|m| ("DAGRUN_MASTER_KEY", m)).into_iter().collect();
    if master_env.is_some() {
        let mut p = ws.read("pipelines/propensity.yaml");
        p.push_str("\n  envdump:\n    desc: a command that prints everything it can see\n    cmd: env > reports/env.txt; env; tr '\\0' '\\n' < /proc/$$/environ\n    outs: [reports/env.txt]\n");
        ws.write("pipelines/propensity.yaml", p);
    }
    let mut outputs: Vec<(String, Out)> = Vec::new();
    let mut run = |args: &[&str], expect_ok: bool| {
        let o = dg_env(&ws, args, &env);
        if expect_ok {
            assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        }
        outputs.push((args.join(" "), o));
    };
    run(&["run", "pipelines/propensity.yaml", "-p", "rows=3000", "-vv"], true);
    run(&["run", "pipelines/propensity.yaml", "-p", "rows=3000", "-v", "--json"], true);
    run(&["status", "pipelines/propensity.yaml", "-p", "rows=3000", "--json"], true);
    run(&["status", "pipelines/propensity.yaml", "-p", "rows=3000", "-vv"], true);
    run(&["dag", "pipelines/propensity.yaml"], true);
    for t in ["Tenant_A", "Tenant_B", "Tenant_C"] {
        run(&["lineage", &format!("models/{t}/model.json"), "--json"], true);
        run(&["lineage", &format!("data/encrypted/{t}.parquet")], true);
        run(&["features", t, "--json"], true);
        run(&["features", t], true);
    }
    run(&["runs"], true);
    run(&["runs", "show", "last", "--json"], true);
    run(&["runs", "show", "last"], true);
    run(&["keys", "list"], true);
    run(&["keys", "list", "--json"], true);
    run(&["verify", "--json"], true);
    run(&["verify", "-vv"], true);
    run(&["keys", "export", "Tenant_A"], false); // refused without the flag
    // Predict on the tenants' own rows (their plaintext is in the input file, outside the workspace).
    let tmp = tempfile::tempdir().unwrap();
    for (t, n) in SPLIT {
        let input = tmp.path().join(format!("{t}.csv"));
        run(&["sample", "--tenant", t, "--rows", &n.to_string(), "--no-label", "--out", input.to_str().unwrap()], true);
        run(&["predict", "--tenant", t, "--input", input.to_str().unwrap(), "-vv"], true);
        run(&["predict", "--tenant", t, "--input", input.to_str().unwrap(), "--format", "jsonl"], true);
        // Another tenant's rows: refused, without echoing them.
        let other = if t == "Tenant_A" { "Tenant_B" } else { "Tenant_A" };
        run(&["predict", "--tenant", other, "--input", input.to_str().unwrap()], false);
    }
    let mut pii: Vec<Vec<u8>> = Vec::new();
    for (t, n) in SPLIT {
        pii.extend(plaintext(&ws, t, n).into_iter().map(String::into_bytes));
    }
    assert_eq!(pii.len(), 3000);
    let keys = all_keys(&ws, master_env);
    if master_env.is_some() {
        assert!(!ws.exists(".dagrun/keys/master.key"), "a key file was created although DAGRUN_MASTER_KEY is set");
        let dump = ws.read("reports/env.txt");
        assert!(dump.contains("DAGRUN_STAGE=envdump") && dump.contains("NO_COLOR=1"), "the dump ran with an environment:\n{dump}");
        assert!(ws.read(".dagrun/logs/envdump.out").contains("DAGRUN_STAGE=envdump"));
    }
    assert_eq!(keys.len(), 1 + 3 * 2, "master + a data and a pseudonym key per tenant");
    let mut needles = pii.clone();
    for (_, k) in &keys {
        needles.push(k.clone());
        needles.push(hex::encode(k).into_bytes());
        needles.push(hex::encode_upper(k).into_bytes());
    }
    let needles = Needles::new(needles);
    for (what, o) in &outputs {
        for (stream, text) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
            if let Some(n) = needles.find(text.as_bytes()) {
                panic!("`dagrun {what}` {stream} holds PII or a key ({} bytes)", n.len());
            }
        }
    }
    let mut files = 0;
    for p in ws.walk() {
        let full = ws.path(&p);
        if !full.is_file() || p == ".dagrun/keys/master.key" {
            continue;
        }
        files += 1;
        if let Some(n) = needles.find(&std::fs::read(&full).unwrap()) {
            panic!("{p} holds PII or a key ({} bytes)", n.len());
        }
    }
    assert!(files > 30, "searched only {files} files");
    assert!(ws.walk().iter().any(|p| p.starts_with(".dagrun/cache/objects/")), "the cache was searched");
    // `keys export` prints exactly the data key, and that is its only output.
    let o = ok(dg_env(&ws, &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"], &env));
    let dk = &keys.iter().find(|(id, _)| id == "Tenant_A-dk-1").unwrap().1;
    assert_eq!(o.stdout.trim(), hex::encode(dk));
    assert!(needles.find(o.stderr.as_bytes()).is_none());
}

#[test]
fn damaged_or_moved_ciphertexts_do_not_decrypt() {
    let ws = workspace(THREE);
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000", "encrypt"]));
    let key = |t: &str| {
        let hex = ok(dg(&ws, &["keys", "export", t, "--i-understand-this-prints-a-secret"])).stdout.trim().to_string();
        dagrun::crypto::DataKey::from_bytes(hex::decode(hex).unwrap().try_into().unwrap())
    };
    let (ka, kb) = (key("Tenant_A"), key("Tenant_B"));
    let blobs = |t: &str| -> Vec<(i64, Vec<u8>)> {
        let b = read_all(&ws.path(&format!("data/encrypted/{t}.parquet")));
        let ids = i64_col(&b, "Customer_ID");
        let enc = b.column_by_name("Sensitive_Data_Enc").unwrap().as_any().downcast_ref::<BinaryArray>().unwrap().clone();
        ids.into_iter().enumerate().map(|(i, id)| (id, enc.value(i).to_vec())).collect()
    };
    let (a, b) = (blobs("Tenant_A"), blobs("Tenant_B"));
    let expected = plaintext(&ws, "Tenant_A", 1500);
    let (id, blob) = &a[0];
    let pt = decrypt_field(&ka, "Tenant_A", "Sensitive_Data", *id, blob).unwrap();
    assert_eq!(String::from_utf8(pt).unwrap(), expected[*id as usize]);

    let not_authentic = |r: anyhow::Result<Vec<u8>>, what: &str| {
        let e = r.expect_err(what);
        assert!(matches!(e.downcast_ref::<FieldError>(), Some(FieldError::NotAuthentic { .. })), "{what}: {e:#}");
        let msg = format!("{e:#}");
        assert!(msg.contains("does not authenticate") && !expected.iter().any(|p| msg.contains(p.as_str())), "{what}: {msg}");
    };
    // Truncated: below nonce+tag is TooShort, otherwise the tag fails.
    for len in [0, 11, 27] {
        let e = decrypt_field(&ka, "Tenant_A", "Sensitive_Data", *id, &blob[..len]).unwrap_err();
        assert!(matches!(e.downcast_ref::<FieldError>(), Some(FieldError::TooShort { .. })), "{e:#}");
        assert!(format!("{e:#}").contains(&format!("is {len} bytes")));
    }
    not_authentic(decrypt_field(&ka, "Tenant_A", "Sensitive_Data", *id, &blob[..blob.len() - 1]), "truncated by one byte");
    // A flipped byte in the tag, the nonce, the ciphertext.
    for pos in [blob.len() - 1, blob.len() - 16, 0, 12] {
        let mut m = blob.clone();
        m[pos] ^= 0x01;
        not_authentic(decrypt_field(&ka, "Tenant_A", "Sensitive_Data", *id, &m), &format!("flipped byte {pos}"));
    }
    // Copied from another row of the same tenant.
    let (id1, blob1) = &a[1];
    assert_ne!(id, id1);
    not_authentic(decrypt_field(&ka, "Tenant_A", "Sensitive_Data", *id, blob1), "copied from another row");
    // Copied from another tenant's row with the same Customer_ID, under either key.
    let (bid, bblob) = b.iter().find(|(i, _)| i == id).unwrap();
    not_authentic(decrypt_field(&ka, "Tenant_A", "Sensitive_Data", *bid, bblob), "B's row under A's key and place");
    not_authentic(decrypt_field(&kb, "Tenant_A", "Sensitive_Data", *bid, bblob), "B's row moved into A's place");
    // Isolation: tenant A's key opens none of B's rows, B's key none of A's.
    for (bid, bblob) in b.iter().take(200) {
        not_authentic(decrypt_field(&ka, "Tenant_B", "Sensitive_Data", *bid, bblob), "A's key on B's row");
        assert!(decrypt_field(&kb, "Tenant_B", "Sensitive_Data", *bid, bblob).is_ok());
    }
    for (aid, ablob) in a.iter().take(200) {
        not_authentic(decrypt_field(&kb, "Tenant_A", "Sensitive_Data", *aid, ablob), "B's key on A's row");
    }
}

#[test]
fn readable_key_files_and_lost_keys_are_refused() {
    let ws = workspace(THREE);
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]));
    let master = ws.read(".dagrun/keys/master.key");
    let chmod = |p: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // A DAGRUN_MASTER_KEY_FILE readable by others.
    let outside = tempfile::tempdir().unwrap();
    let kf = outside.path().join("master.key");
    std::fs::write(&kf, &master).unwrap();
    chmod(&kf, 0o644);
    let kfs = kf.to_str().unwrap();
    let before = snapshot(&ws);
    for args in [&["keys", "list"][..], &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]] {
        let o = dg_env(&ws, args, &[("DAGRUN_MASTER_KEY_FILE", kfs)]);
        refused(&o, 1, &[kfs, "mode 0644", &format!("chmod 600 {kfs}")], "DAGRUN_MASTER_KEY_FILE 0644");
        assert!(!o.stderr.contains(master.trim()));
    }
    assert_same(&before, &snapshot(&ws), "key file 0644");
    chmod(&kf, 0o600);
    ok(dg_env(&ws, &["keys", "list"], &[("DAGRUN_MASTER_KEY_FILE", kfs)]));
    // The default key file made readable.
    let dk = ws.path(".dagrun/keys/master.key");
    chmod(&dk, 0o644);
    let dks = dk.to_str().unwrap();
    for args in [
        &["keys", "list"][..],
        &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"],
        &["run", "pipelines/propensity.yaml", "-p", "rows=3000"],
    ] {
        let o = dg(&ws, args);
        refused(&o, 1, &[dks, "mode 0644", &format!("chmod 600 {dks}")], "master.key 0644");
        assert!(o.stdout.trim().len() != 64, "a key was printed");
    }
    chmod(&dk, 0o600);
    assert_same(&before, &snapshot(&ws), "master.key 0644");

    // A tenant's keys deleted from the keyring: its encrypt stage refuses to mint
    // a new key under the old id (which would leave the data undecryptable
    // while looking up to date); the other tenants are not affected.
    let ring_path = ws.path(".dagrun/keys/keyring.json");
    let ring_bytes = std::fs::read(&ring_path).unwrap();
    let mut ring: serde_json::Value = serde_json::from_slice(&ring_bytes).unwrap();
    ring["tenants"].as_object_mut().unwrap().remove("Tenant_B");
    std::fs::write(&ring_path, serde_json::to_vec_pretty(&ring).unwrap()).unwrap();
    let before = snapshot(&ws);
    let o = dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]);
    refused(&o, 1, &["encrypt[Tenant_B]", "Tenant_B-dk-1", "no longer holds", "keyring.json", "backup"], "lost tenant key");
    assert!(!o.stderr.contains("encrypt[Tenant_A]") && !o.stderr.contains("encrypt[Tenant_C]"), "{}", o.stderr);
    assert_same(&before, &snapshot(&ws), "lost tenant key");
    let list = ok(dg(&ws, &["keys", "list"])).stdout;
    assert!(!list.contains("Tenant_B"), "a new key was created:\n{list}");
    // A fresh keyring with an old workspace: every tenant refuses, no keyring is written.
    std::fs::remove_file(&ring_path).unwrap();
    let before = snapshot(&ws);
    let o = dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]);
    refused(&o, 1, &["encrypt[Tenant_A]", "encrypt[Tenant_B]", "encrypt[Tenant_C]", "no longer holds"], "fresh keyring");
    assert_same(&before, &snapshot(&ws), "fresh keyring");
    // The keyring a dangling symbolic link: both paths are named, not "no such
    // file" for a path `ls` shows.
    let gone = outside.path().join("moved/keyring.json");
    std::os::unix::fs::symlink(&gone, &ring_path).unwrap();
    let o = dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]);
    refused(&o, 1, &["keyring.json is a symbolic link to", gone.to_str().unwrap(), "does not exist", "restore"], "dangling keyring link");
    std::fs::remove_file(&ring_path).unwrap();
    // Restoring the keyring brings everything back.
    std::fs::write(&ring_path, &ring_bytes).unwrap();
    chmod(&ring_path, 0o600);
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"]));
}

/// `n` copies of `b`'s first row, its string columns dictionary-encoded (one
/// value each: small in memory and on disk), `Sensitive_Data` set to `pii`.
fn repeated_first_row(b: &RecordBatch, n: usize, pii: &str) -> RecordBatch {
    let first = arrow_array::UInt32Array::from(vec![0u32; n]);
    let (mut fields, mut cols) = (Vec::new(), Vec::new());
    for f in b.schema().fields() {
        let col: ArrayRef = match f.name().as_str() {
            name @ ("Tenant_ID" | "Sensitive_Data") => {
                let v = if name == "Sensitive_Data" { pii.to_string() } else { str_col(b, name)[0].clone() };
                Arc::new(arrow_array::DictionaryArray::new(arrow_array::Int32Array::from(vec![0; n]), Arc::new(StringArray::from(vec![v]))))
            }
            name => arrow_select::take::take(b.column_by_name(name).unwrap(), &first, None).unwrap(),
        };
        fields.push(arrow_schema::Field::new(f.name(), col.data_type().clone(), false));
        cols.push(col);
    }
    RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), cols).unwrap()
}

/// `b` as Parquet bytes, written as pyarrow and arrow-rs do (dictionary
/// encoding, run-length encoded indices; format 2.0, whose booleans are
/// run-length encoded too).
fn encoded(b: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder().set_writer_version(parquet::file::properties::WriterVersion::PARQUET_2_0).build();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, b.schema(), Some(props)).unwrap();
    w.write(b).unwrap();
    w.close().unwrap();
    out
}

/// A Parquet file whose footer (Thrift compact, written by hand as an
/// attacker would) declares a schema `depth` groups deep: the decoder built
/// the schema tree recursively and overflowed its stack (an abort).
fn deeply_nested_parquet(depth: usize) -> Vec<u8> {
    let varint = |mut v: u64, out: &mut Vec<u8>| loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        out.push(if v == 0 { b } else { b | 0x80 });
        if v == 0 {
            break;
        }
    };
    let mut m = vec![0x15, 0x02, 0x19, 0xfc]; // version 1; schema: a list of structs, long size
    varint(depth as u64 + 2, &mut m);
    m.extend([0x48, 1, b's', 0x15, 2, 0]); // the root: name, 1 child
    for _ in 0..depth {
        m.extend([0x35, 2, 0x18, 1, b'g', 0x15, 2, 0]); // a group: repetition, name, 1 child
    }
    m.extend([0x15, 4, 0x25, 2, 0x18, 1, b'x', 0, 0x16, 2, 0x19, 0x0c, 0]); // an int64 leaf; num_rows 1; no row groups
    [&b"PAR1"[..], &m, &(m.len() as u32).to_le_bytes(), b"PAR1"].concat()
}

#[test]
fn parquet_bombs_are_refused_before_they_expand() {
    let ws = workspace(ONE);
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "400", "--out", "incoming/Tenant_A.parquet"]));
    let pq_pipeline = ws.read("pipelines/propensity-ingest.yaml").replace("incoming/${tenant}.csv", "incoming/${tenant}.parquet");
    ws.write("pipelines/ingest-pq.yaml", pq_pipeline);
    ok(dg(&ws, &["run", "pipelines/ingest-pq.yaml"]));
    let good = read_all(&ws.path("incoming/Tenant_A.parquet"));
    let pii = format!("{}{PROBE}", "x".repeat(30_000));
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        // One 30 KB value on 200,000 rows: the old reader built 65,536 copies a
        // batch (9 GB of memory) and wrote 6 GB of plaintext, then exit 0.
        ("string bomb", encoded(&repeated_first_row(&good, 200_000, &pii)), vec!["row 1, column Sensitive_Data: a value of 30031 bytes; at most 1024 bytes"]),
        // Two million constant rows in a few KB (dictionary and run-length encoding).
        ("rows bomb", encoded(&repeated_first_row(&good, 2_000_000, "a@b.example")), vec!["declares 2000000 rows in", "refused as a decompression bomb"]),
        ("deep schema", deeply_nested_parquet(5_000), vec!["its schema nests more than 8 levels deep"]),
    ];
    for (what, bytes, needles) in cases {
        assert!(bytes.len() < 2 << 20, "{what}: the bomb itself is {} bytes", bytes.len());
        ingest_refuses(&ws, "pipelines/ingest-pq.yaml", "incoming/Tenant_A.parquet", &bytes, &needles, what);
        // `predict` reads on the main thread (an 8 MB stack): the same refusals, exit 2.
        ws.write("in/bomb.parquet", &bytes);
        let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in/bomb.parquet", "--output", "scores.csv"]);
        refused(&o, 2, &needles, what);
        assert!(!ws.exists("scores.csv"), "{what}");
    }
    ws.write("in/deep.parquet", deeply_nested_parquet(100_000));
    let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in/deep.parquet", "--output", "scores.csv"]);
    refused(&o, 2, &["in/deep.parquet", "its schema nests more than 8 levels deep"], "deep schema, 100,000 levels");
}

#[test]
fn corrupt_parquet_is_refused_without_a_panic() {
    let ws = workspace(ONE);
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "2000", "--out", "incoming/Tenant_A.csv"]));
    ok(dg(&ws, &["run", "pipelines/propensity-ingest.yaml"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "50", "--no-label", "--out", "in/good.parquet"]));
    let good = std::fs::read(ws.path("in/good.parquet")).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        // Found by the raw_parquet fuzz target: a column chunk with a negative
        // offset made the decoder assert (a panic printed with its backtrace).
        ("negative column offset".into(), std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/negative-column-offset.parquet")).unwrap()),
        ("truncated".into(), good[..good.len() / 2].to_vec()),
        ("magic only".into(), b"PAR1PAR1".to_vec()),
        ("garbage between magics".into(), [&b"PAR1"[..], &[0xff; 64], &8u32.to_le_bytes(), b"PAR1"].concat()),
    ];
    for pos in (4..good.len() - 8).step_by(good.len() / 40) {
        let mut b = good.clone();
        b[pos] ^= 0xff;
        cases.push((format!("byte {pos} flipped"), b));
    }
    for (what, bytes) in cases {
        ws.write("in/bad.parquet", &bytes);
        let before = snapshot(&ws);
        let o = dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in/bad.parquet", "--output", "scores.csv"]);
        // Some flipped bytes only change values (still valid data): then it scores.
        if o.code != 0 {
            refused(&o, 2, &["in/bad.parquet"], &what);
            assert!(!o.stderr.contains("stack backtrace"), "{what}:\n{}", o.stderr);
            assert_same(&before, &snapshot(&ws), &what);
        }
    }
}
