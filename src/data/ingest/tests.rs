use super::*;
use crate::data::parquet_io::{open_batches, read_footer_kv};
use parquet::arrow::ArrowWriter;
use std::path::PathBuf;

const HEADER: &str = "Tenant_ID,Customer_ID,Sensitive_Data,Login_Count,Purchase_Amount,Last_Visit_Date,Converted";

fn good_rows() -> Vec<String> {
    vec![
        "T1,0,secret.alice.0001@example.org,3,12.50,2025-12-01,true".into(),
        "T1,1,secret.bob.0002@example.org,0,0,2025-06-30,false".into(),
        "T1,2,secret.carol.0003@example.org,15,99.99,2026-01-01,1".into(),
    ]
}

fn opts() -> IngestOptions {
    IngestOptions {
        expected_tenant: Some("T1".into()),
        known_tenants: None,
        require_label: false,
        allow_label: true,
        as_of: Some(parse_date("2026-01-01").unwrap()),
    }
}

fn write_csv(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("in.csv");
    std::fs::write(&p, body).unwrap();
    p
}

/// Run validate_to_parquet on `input` and expect an error containing every
/// fragment, no secret in the message, and nothing but the input left in the dir.
fn expect_err(dir: &Path, input: &Path, o: &IngestOptions, frags: &[&str]) -> String {
    let out = dir.join("out").join("raw.parquet");
    let e = validate_to_parquet(input, &out, o).expect_err("should fail");
    let msg = format!("{e:#}");
    for f in frags {
        assert!(msg.contains(f), "message {msg:?} lacks {f:?}");
    }
    assert!(!msg.contains("secret") && !msg.contains("example.org"), "leaks sensitive data: {msg}");
    assert!(msg.contains(&input.display().to_string()), "no file name: {msg}");
    assert!(!out.exists());
    if let Ok(rd) = std::fs::read_dir(dir.join("out")) {
        let left: Vec<_> = rd.map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    msg
}

/// CSV whose row 2 (line 3) has `col` replaced by `val`.
fn csv_with(col: usize, val: &str) -> String {
    let mut rows = good_rows();
    let mut f: Vec<String> = rows[1].split(',').map(String::from).collect();
    f[col] = val.to_string();
    rows[1] = f.join(",");
    format!("{HEADER}\n{}\n", rows.join("\n"))
}

fn bad_csv(col: usize, val: &str, o: &IngestOptions, frags: &[&str]) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), &csv_with(col, val));
    expect_err(d.path(), &p, o, frags)
}

#[test]
fn good_csv_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), &format!("\u{feff}{HEADER}\n{}\n", good_rows().join("\n")));
    let out = d.path().join("raw.parquet");
    let s = validate_to_parquet(&p, &out, &opts()).unwrap();
    assert_eq!(s.rows, 3);
    assert_eq!(s.positives, Some(2));
    assert_eq!(s.tenants.get("T1"), Some(&3));
    let kv = read_footer_kv(&out).unwrap();
    assert_eq!(kv["dagrun.dataset"], "raw");
    assert_eq!(kv["dagrun.tenant"], "T1");
    let b: Vec<_> = open_batches(&out, 100).unwrap().collect::<Result<_>>().unwrap();
    assert_eq!(b.len(), 1);
    let b = &b[0];
    assert_eq!(b.schema(), raw_schema(true));
    assert_eq!(b.column(1).as_primitive::<Int64Type>().values().to_vec(), vec![0, 1, 2]);
    assert_eq!(b.column(2).as_string::<i32>().value(1), "secret.bob.0002@example.org");
    assert_eq!(b.column(3).as_primitive::<Int64Type>().values().to_vec(), vec![3, 0, 15]);
    assert_eq!(b.column(4).as_primitive::<Float64Type>().values().to_vec(), vec![12.5, 0.0, 99.99]);
    assert_eq!(b.column(5).as_primitive::<Date32Type>().value(2), parse_date("2026-01-01").unwrap());
    assert_eq!(b.column(6).as_boolean().iter().collect::<Vec<_>>(), vec![Some(true), Some(false), Some(true)]);
    // The Parquet output re-ingests identically.
    let again = d.path().join("again.parquet");
    let s2 = validate_to_parquet(&out, &again, &opts()).unwrap();
    assert_eq!(s2, s);
    // Small batches stream in several pieces.
    let n: usize = open_raw(&p, &opts(), 2).unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(n, 3);
}

#[test]
fn csv_without_label_and_bool_spellings() {
    let d = tempfile::tempdir().unwrap();
    let body = "Login_Count,Tenant_ID,Customer_ID,Sensitive_Data,Purchase_Amount,Last_Visit_Date\n4,T1,7,x@y,1.5,2025-01-01\n";
    let p = write_csv(d.path(), body);
    let mut o = opts();
    o.allow_label = false;
    let r = open_raw(&p, &o, 10).unwrap();
    assert!(!r.has_label());
    let b: Vec<_> = r.collect::<Result<_>>().unwrap();
    assert_eq!(b[0].schema(), raw_schema(false));
    assert_eq!(b[0].column(3).as_primitive::<Int64Type>().value(0), 4);
    let p = write_csv(d.path(), &format!("{HEADER}\nT1,0,a,1,1,2025-01-01,TRUE\nT1,1,b,1,1,2025-01-01,False\nT1,2,c,1,1,2025-01-01,0\n"));
    let s = validate_to_parquet(&p, &d.path().join("o.parquet"), &opts()).unwrap();
    assert_eq!(s.positives, Some(1));
}

#[test]
fn missing_column() {
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), "Tenant_ID,Customer_ID,Sensitive_Data,Purchase_Amount,Last_Visit_Date\nT1,0,secret,1,2025-01-01\n");
    expect_err(d.path(), &p, &opts(), &["missing column Login_Count", "expected exactly"]);
    // The list says whether Converted is needed, optional or not allowed (helper-71:
    // predict, which takes it optionally, listed it as required).
    let cols = "Tenant_ID, Customer_ID, Sensitive_Data, Login_Count, Purchase_Amount, Last_Visit_Date";
    expect_err(d.path(), &p, &opts(), &[&format!("expected exactly: {cols} (and Converted, optional)")]);
    let mut o = opts();
    o.require_label = true;
    expect_err(d.path(), &p, &o, &[&format!("expected exactly: {cols}, Converted")]);
    let mut o = opts();
    o.allow_label = false;
    let m = expect_err(d.path(), &p, &o, &[&format!("expected exactly: {cols}")]);
    assert!(!m.contains("Converted"), "{m}");
}

#[test]
fn unknown_column() {
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), &format!("{HEADER},Extra\nT1,0,secret,1,1,2025-01-01,true,x\n"));
    expect_err(d.path(), &p, &opts(), &["column 8: unexpected column name (5 characters, text)", "expected exactly: Tenant_ID, Customer_ID"]);
    // A headerless file: the first row is taken as the header, and described, never shown.
    let p = write_csv(d.path(), "T1,0,elizabeth.davis.4779@example.org,1,1,2025-01-01,true\n");
    let m = expect_err(d.path(), &p, &opts(), &["column 1: unexpected column name (2 characters, text)"]);
    let p = write_csv(d.path(), "Tenant_ID,Customer_ID,elizabeth.davis.4779@example.org,1,1,2025-01-01,true\n");
    let m2 = expect_err(d.path(), &p, &opts(), &["column 3: unexpected column name (32 characters, looks like an e-mail address)", "lack its header line"]);
    assert!(!m.contains("elizabeth") && !m2.contains("elizabeth"));
    let p = write_csv(d.path(), &HEADER.replace("Tenant_ID", "tenant_id"));
    expect_err(d.path(), &p, &opts(), &["column 1", "is it Tenant_ID spelt differently"]);
}

#[test]
fn unparseable_numbers() {
    bad_csv(3, "abc", &opts(), &["row 2 (line 3), column Login_Count", "not an integer"]);
    bad_csv(3, "2.5", &opts(), &["row 2 (line 3), column Login_Count"]);
    bad_csv(1, "x1", &opts(), &["row 2 (line 3), column Customer_ID", "not an integer"]);
    bad_csv(4, "12,50", &opts(), &["row 2 (line 3)", "has 8 fields but the header has 7"]);
    // One value: "1 field", not "1 fields".
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), &format!("{HEADER}\nT1\n"));
    expect_err(d.path(), &p, &opts(), &["row 1 (line 2)", "has 1 field but the header has 7"]);
    bad_csv(4, "twelve", &opts(), &["row 2 (line 3), column Purchase_Amount", "not a number"]);
    bad_csv(1, "99999999999999999999999", &opts(), &["row 2 (line 3), column Customer_ID"]);
}

#[test]
fn nan_and_inf() {
    bad_csv(4, "NaN", &opts(), &["row 2 (line 3), column Purchase_Amount", "NaN"]);
    bad_csv(4, "inf", &opts(), &["row 2 (line 3), column Purchase_Amount", "infinite"]);
    bad_csv(4, "1e400", &opts(), &["row 2 (line 3), column Purchase_Amount", "infinite"]);
}

#[test]
fn negative_values() {
    bad_csv(3, "-1", &opts(), &["row 2 (line 3), column Login_Count", "negative"]);
    bad_csv(4, "-0.01", &opts(), &["row 2 (line 3), column Purchase_Amount", "negative"]);
}

#[test]
fn absurd_values() {
    bad_csv(3, "1000001", &opts(), &["row 2 (line 3), column Login_Count", "1000000"]);
    bad_csv(3, "99999999999999999999999", &opts(), &["row 2 (line 3), column Login_Count", "1000000"]);
    bad_csv(4, "1e10", &opts(), &["row 2 (line 3), column Purchase_Amount", "1e9"]);
}

#[test]
fn bad_dates() {
    bad_csv(5, "2025/01/01", &opts(), &["row 2 (line 3), column Last_Visit_Date", "YYYY-MM-DD"]);
    bad_csv(5, "2025-02-30", &opts(), &["row 2 (line 3), column Last_Visit_Date"]);
    bad_csv(5, "1969-12-31", &opts(), &["row 2 (line 3), column Last_Visit_Date", "before 1970-01-01"]);
    bad_csv(5, "2026-01-02", &opts(), &["row 2 (line 3), column Last_Visit_Date", "in the future relative to as_of", "2026-01-01"]);
    let mut o = opts();
    o.as_of = None;
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), &csv_with(5, "2030-01-02"));
    assert!(validate_to_parquet(&p, &d.path().join("o.parquet"), &o).is_ok());
}

#[test]
fn wrong_tenants() {
    // A tenant that is not configured is described, not shown: a value of
    // tenant-id shape may be PII (an SSN, a user name).
    bad_csv(0, "T2", &opts(), &["row 2 (line 3), column Tenant_ID", "belongs to tenant (2 characters, text), but only tenant \"T1\" rows are accepted here"]);
    let m = bad_csv(0, "078-05-1120", &opts(), &["belongs to tenant (11 characters, mostly digits (a phone number or an id?))"]);
    assert!(!m.contains("078") && !m.contains("1120"), "{m}");
    let mut o = opts();
    o.expected_tenant = None;
    o.known_tenants = Some(vec!["T1".into(), "T3".into()]);
    bad_csv(0, "T2", &o, &["row 2 (line 3), column Tenant_ID", "unknown tenant (2 characters, text)"]);
    let m = bad_csv(0, "078-05-1120", &o, &["unknown tenant (11 characters, mostly digits"]);
    assert!(!m.contains("078") && !m.contains("1120"), "{m}");
    bad_csv(0, "T 1", &o, &["row 2 (line 3), column Tenant_ID", "invalid tenant id (3 characters, text with spaces)"]);
    // Swapped columns: an e-mail address where the tenant id belongs is described, not shown.
    let m = bad_csv(0, "jane.doe@example.org", &o, &["invalid tenant id (20 characters, looks like an e-mail address)"]);
    assert!(!m.contains("jane"), "{m}");
    let mut known = opts();
    known.known_tenants = Some(vec!["T1".into(), "T3".into()]);
    bad_csv(0, "T3", &known, &["belongs to tenant \"T3\", but only tenant \"T1\" rows are accepted here"]);
    let long = "X".repeat(300);
    let m = bad_csv(0, &long, &o, &["row 2 (line 3), column Tenant_ID", "invalid tenant id"]);
    assert!(!m.contains(&"X".repeat(65)), "{m}");
    bad_csv(0, "T\u{7}1", &o, &["3 characters, text with control characters"]);
    // Several known tenants in one file are fine, with per-tenant counts and
    // Customer_ID unique per tenant.
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), &format!("{HEADER}\nT1,0,a,1,1,2025-01-01,1\nT3,0,b,1,1,2025-01-01,0\n"));
    let s = validate_to_parquet(&p, &d.path().join("o.parquet"), &o).unwrap();
    assert_eq!(s.tenants.len(), 2);
}

#[test]
fn empty_sensitive_data_and_nulls() {
    bad_csv(2, "", &opts(), &["row 2 (line 3), column Sensitive_Data", "empty value"]);
    bad_csv(4, "", &opts(), &["row 2 (line 3), column Purchase_Amount", "empty value"]);
    bad_csv(6, "", &opts(), &["row 2 (line 3), column Converted", "empty value"]);
    bad_csv(6, "yes", &opts(), &["row 2 (line 3), column Converted", "not a boolean"]);
}

#[test]
fn duplicate_customer() {
    bad_csv(1, "0", &opts(), &["row 2 (line 3), column Customer_ID", "duplicate Customer_ID: an earlier row of tenant"]);
}

#[test]
fn empty_and_header_only() {
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), "");
    expect_err(d.path(), &p, &opts(), &["is empty"]);
    let p = write_csv(d.path(), &format!("{HEADER}\n"));
    expect_err(d.path(), &p, &opts(), &["has no data rows"]);
    let p = d.path().join("in.parquet");
    std::fs::write(&p, b"").unwrap();
    expect_err(d.path(), &p, &opts(), &["is empty"]);
    std::fs::write(&p, b"\x00\xffgarbage secret bytes PAR1").unwrap();
    expect_err(d.path(), &p, &opts(), &["not a readable Parquet file"]);
    let p = d.path().join("in.txt");
    std::fs::write(&p, b"x").unwrap();
    expect_err(d.path(), &p, &opts(), &["unknown data file type"]);
}

#[test]
fn non_utf8() {
    let d = tempfile::tempdir().unwrap();
    let mut body = format!("{HEADER}\n{}\n", good_rows()[0]).into_bytes();
    body.extend_from_slice(b"T1,1,secret\xff\xfe@example.org,1,1,2025-01-01,true\n");
    let p = d.path().join("in.csv");
    std::fs::write(&p, body).unwrap();
    expect_err(d.path(), &p, &opts(), &["row 2 (line 3), column Sensitive_Data", "not valid UTF-8"]);
    // Garbage everywhere: an error, no panic.
    let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&p, junk).unwrap();
    let out = d.path().join("o.parquet");
    assert!(validate_to_parquet(&p, &out, &opts()).is_err());
    assert!(!out.exists());
}

#[test]
fn label_presence_rules() {
    let d = tempfile::tempdir().unwrap();
    let p = write_csv(d.path(), "Tenant_ID,Customer_ID,Sensitive_Data,Login_Count,Purchase_Amount,Last_Visit_Date\nT1,0,secret,1,1,2025-01-01\n");
    let mut o = opts();
    o.require_label = true;
    expect_err(d.path(), &p, &o, &["missing column Converted"]);
    let p = write_csv(d.path(), &format!("{HEADER}\n{}\n", good_rows()[0]));
    let mut o = opts();
    o.allow_label = false;
    expect_err(d.path(), &p, &o, &["column Converted is not allowed"]);
}

// ------------------------------------------------------------ Parquet input

fn write_pq(path: &Path, batch: &RecordBatch) {
    let f = File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn user_batch(login: ArrayRef) -> RecordBatch {
    let n = login.len();
    RecordBatch::try_from_iter(vec![
        ("Customer_ID", Arc::new(arrow_array::Int32Array::from_iter_values(0..n as i32)) as ArrayRef),
        ("Tenant_ID", Arc::new(StringArray::from(vec!["T1"; n])) as ArrayRef),
        ("Sensitive_Data", Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("secret{i}@example.org")))) as ArrayRef),
        ("Login_Count", login),
        ("Purchase_Amount", Arc::new(arrow_array::Float32Array::from(vec![1.5f32; n])) as ArrayRef),
        ("Last_Visit_Date", Arc::new(Date32Array::from(vec![20000; n])) as ArrayRef),
    ])
    .unwrap()
}

#[test]
fn parquet_casts_and_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("in.parquet");
    write_pq(&p, &user_batch(Arc::new(arrow_array::Int32Array::from(vec![1, 2, 3]))));
    let out = d.path().join("o.pq");
    let s = validate_to_parquet(&p, &out, &opts()).unwrap();
    assert_eq!((s.rows, s.has_label, s.positives), (3, false, None));
    let b: Vec<_> = open_batches(&out, 10).unwrap().collect::<Result<_>>().unwrap();
    assert_eq!(b[0].schema(), raw_schema(false));
    assert_eq!(b[0].column(3).as_primitive::<Int64Type>().values().to_vec(), vec![1, 2, 3]);
    assert_eq!(b[0].column(4).as_primitive::<Float64Type>().value(0), 1.5);
}

#[test]
fn parquet_wrong_type() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("in.parquet");
    write_pq(&p, &user_batch(Arc::new(StringArray::from(vec!["1", "2"]))));
    expect_err(d.path(), &p, &opts(), &["column Login_Count has type Utf8 but int64"]);
}

#[test]
fn parquet_null_and_negative() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("in.parquet");
    write_pq(&p, &user_batch(Arc::new(Int64Array::from(vec![Some(1), None, Some(3)]))));
    expect_err(d.path(), &p, &opts(), &["row 2, column Login_Count", "null value"]);
    write_pq(&p, &user_batch(Arc::new(Int64Array::from(vec![1, 2, -3]))));
    expect_err(d.path(), &p, &opts(), &["row 3, column Login_Count", "negative"]);
    write_pq(&p, &user_batch(Arc::new(arrow_array::UInt64Array::from(vec![1, u64::MAX]))));
    expect_err(d.path(), &p, &opts(), &["row 2, column Login_Count"]);
}

#[test]
fn generated_file_ingests() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("gen.parquet");
    crate::data::generate::generate_tenant(&raw, "T1", 1000, 5, parse_date("2026-01-01").unwrap()).unwrap();
    let mut o = opts();
    o.require_label = true;
    let s = validate_to_parquet(&raw, &d.path().join("o.parquet"), &o).unwrap();
    assert_eq!(s.rows, 1000);
    // Same rows, same bytes: the validated copy of a dagrun file equals it batch for batch.
    let a: Vec<_> = open_batches(&raw, 300).unwrap().collect::<Result<_>>().unwrap();
    let b: Vec<_> = open_batches(&d.path().join("o.parquet"), 300).unwrap().collect::<Result<_>>().unwrap();
    assert_eq!(a, b);
}

#[test]
fn corrupted_parquet_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("gen.parquet");
    crate::data::generate::generate_tenant(&good, "T1", 3000, 5, 20454).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let p = d.path().join("in.parquet");
    let out = d.path().join("o.parquet");
    // Flip bytes across the file (data pages and footer) and truncate: never a panic.
    for k in 0..40 {
        let mut b = bytes.clone();
        let at = (k * 7919 + 13) % b.len();
        b[at] ^= 0x5a;
        if k % 5 == 0 {
            b.truncate(b.len() - k);
        }
        std::fs::write(&p, &b).unwrap();
        let _ = validate_to_parquet(&p, &out, &opts());
    }
}

#[test]
fn long_fields_and_rows_are_refused_before_they_fill_memory() {
    let field = "x".repeat(MAX_CSV_FIELD_BYTES + 1);
    bad_csv(2, &field, &opts(), &["row 2 (line 3), column 3 (Sensitive_Data)", "at most 65536 bytes"]);
    // A quoted field spanning many lines, and a file without any line break.
    let d = tempfile::tempdir().unwrap();
    let huge = format!("{HEADER}\nT1,0,\"{}\",1,1,2025-01-01,true\n", "a\n".repeat(2 << 20));
    let p = write_csv(d.path(), &huge);
    expect_err(d.path(), &p, &opts(), &["longer than 1048576 bytes"]);
    let p = write_csv(d.path(), &"y".repeat(4 << 20));
    expect_err(d.path(), &p, &opts(), &["longer than 1048576 bytes"]);
}
