//! Authenticated records: JSON files dagrun writes and later trusts.
//!
//! Rules:
//! - A record is a JSON object with one extra top-level field, `"mac"`: hex of
//!   keyed blake3 under the workspace integrity key (`crypto::integrity`) of
//!   the record's *domain* (what kind of record it is: a state record cannot
//!   pass as a model), a newline, and the canonical JSON of the object
//!   without `"mac"` (keys sorted at every level, no whitespace:
//!   [`canonical_json`]). The file stays plain JSON, readable by any tool.
//! - Reading ([`open`]) checks, in order: the bytes are a JSON object; every
//!   field has its type (a malformed hash is an error naming the file and the
//!   field, e.g. `outputs.models/A.json.hash`); the MAC is present and right.
//!   Any failure means the record was not written by dagrun under this
//!   workspace's key — modified outside dagrun — and it is not used.
//! - Records are small (state, action-cache entries, the hash memo, models,
//!   feature manifests): MACs never cost a read of data files. Data files are
//!   bound by their content hash inside an authenticated record, and cache
//!   objects (directory listings included) are verified against that hash
//!   on every use.

use crate::crypto::IntegrityKey;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The MAC field of every record.
pub const MAC_FIELD: &str = "mac";

/// Domains (one per kind of record).
pub const STAGE_RECORD: &str = "dagrun-record/stage-state/1";
pub const HASH_MEMO: &str = "dagrun-record/hash-memo/1";
pub const MODEL: &str = "dagrun-record/model/1";
pub const FEATURE_MANIFEST: &str = "dagrun-record/feature-manifest/1";
/// A Slurm job's result file (`executor::spec`).
pub const JOB_RESULT: &str = "dagrun-record/job-result/1";
/// A Slurm job's spec: what the job is asked to run (`executor::spec`).
pub const JOB_SPEC: &str = "dagrun-record/job-spec/1";
/// Where runs write (`workspace::places`).
pub const PLACES: &str = "dagrun-record/places/1";
/// What forgotten tenants' outputs were, kept by `gc` (`remote::forgotten`).
pub const FORGOTTEN_OUTPUTS: &str = "dagrun-record/forgotten-outputs/1";
/// A forgotten tenant's tombstone on the shared remote (`remote::erasure`).
pub const REMOTE_ERASURE: &str = "dagrun-record/remote-erasure/1";

/// Why a record cannot be trusted. Messages name the file and never echo
/// field values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{file} is not a readable record ({why})")]
    Unreadable { file: String, why: String },
    #[error("{file}: field `{field}`: {why}")]
    BadField { file: String, field: String, why: String },
    #[error("{file} has no MAC: it was modified outside dagrun (or written by an older dagrun)")]
    NoMac { file: String },
    #[error("{file} fails its MAC check: it was modified outside dagrun (or written under another master key)")]
    BadMac { file: String },
    #[error("{file} cannot be verified: this workspace has no master key yet")]
    NoKey { file: String },
}

impl RecordError {
    /// True when the record exists but was altered (or forged): a MAC failure.
    pub fn is_tampering(&self) -> bool {
        matches!(self, RecordError::NoMac { .. } | RecordError::BadMac { .. } | RecordError::BadField { .. })
    }
}

/// JSON with object keys sorted at every level and no insignificant whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut s = Vec::new();
    write_canonical(v, &mut s);
    String::from_utf8(s).expect("serde_json writes UTF-8")
}

// Keys and scalars are written by serde_json itself (the same escaping and
// number format as `Value`'s Display), straight into the buffer: no copy of
// a key, no String per value.
fn write_json<T: Serialize + ?Sized>(x: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, x).expect("writing JSON to memory cannot fail");
}

fn write_object(m: &serde_json::Map<String, Value>, skip: Option<&str>, out: &mut Vec<u8>) {
    // Entries with their values (no look-up per key); a map kept in key
    // order (serde_json's default) is already sorted, which the sort only checks.
    let mut entries: Vec<(&String, &Value)> = m.iter().filter(|(k, _)| Some(k.as_str()) != skip).collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json(k.as_str(), out);
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => write_object(m, None, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        other => write_json(other, out),
    }
}

/// The MAC (hex) of a record value (its top-level `"mac"` field ignored;
/// nothing is copied).
pub fn mac_of(key: &IntegrityKey, domain: &str, v: &Value) -> String {
    let mut canon = Vec::with_capacity(1024);
    match v {
        Value::Object(m) => write_object(m, Some(MAC_FIELD), &mut canon),
        _ => write_canonical(v, &mut canon),
    }
    key.mac(domain, &canon).to_hex().to_string()
}

/// `rec` as a JSON value with its MAC added.
pub fn seal_value<T: Serialize>(key: &IntegrityKey, domain: &str, rec: &T) -> anyhow::Result<Value> {
    let mut v = serde_json::to_value(rec)?;
    let Value::Object(m) = &mut v else { anyhow::bail!("a record must be a JSON object (internal error)") };
    m.remove(MAC_FIELD);
    let mac = mac_of(key, domain, &v);
    if let Value::Object(m) = &mut v {
        m.insert(MAC_FIELD.to_string(), Value::String(mac));
    }
    Ok(v)
}

/// `rec` as compact JSON bytes with its MAC.
pub fn seal<T: Serialize>(key: &IntegrityKey, domain: &str, rec: &T) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&seal_value(key, domain, rec)?)?)
}

/// Parse a value into `T`, naming the field on error.
pub fn typed<T: DeserializeOwned>(v: Value, file: &str) -> Result<T, RecordError> {
    // The common case without the path tracking; a failure is redone with it
    // for the message naming the field.
    if let Ok(t) = T::deserialize(&v) {
        return Ok(t);
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let field = e.path().to_string();
        let why = crate::util::redact::without_values(&e.into_inner().to_string());
        if field == "." { RecordError::Unreadable { file: file.to_string(), why } } else { RecordError::BadField { file: file.to_string(), field, why } }
    })
}

/// The byte span of the top-level `"mac":"<64 lowercase hex>"` member of a
/// JSON object written without whitespace, with one separating comma, and
/// the MAC's hex. `None` when there is no such member (the caller then takes
/// the general path).
fn mac_member(b: &[u8]) -> Option<(usize, usize, &[u8])> {
    if b.first() != Some(&b'{') {
        return None;
    }
    let (mut depth, mut expect_key, mut i) = (0usize, false, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                if depth == 1 && expect_key && b[i + 1..].starts_with(MAC_FIELD.as_bytes()) && b[i + 1 + MAC_FIELD.len()..].starts_with(b"\":\"") {
                    // `"` MAC_FIELD `":"`, then the 64 hex digits.
                    let vs = i + 1 + MAC_FIELD.len() + 3;
                    let ve = vs + 64;
                    let hex = b.get(vs..ve)?;
                    if b.get(ve) != Some(&b'"') || !hex.iter().all(|h| h.is_ascii_digit() || (b'a'..=b'f').contains(h)) {
                        return None;
                    }
                    let end = ve + 1;
                    return Some(if b[i - 1] == b',' {
                        (i - 1, end, hex)
                    } else if b.get(end) == Some(&b',') {
                        (i, end + 1, hex)
                    } else {
                        (i, end, hex)
                    });
                }
                expect_key = false;
                // To the closing quote, stepping over escapes.
                i += 1;
                loop {
                    i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
                    if b[i] == b'"' {
                        break;
                    }
                    i += 2;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1;
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' if depth == 1 => expect_key = true,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The common case of [`open`]: a record exactly as dagrun writes it
/// (compact JSON whose keys are sorted at every level, so that the bytes
/// without the top-level `"mac"` member *are* the canonical JSON the MAC
/// covers). The MAC is checked over those bytes, then the record is
/// deserialized straight from them: no `Value` tree, no re-serialization.
/// Sound because dagrun MACs only canonical JSON of a record without its
/// `"mac"`: bytes that verify are such a serialization, and with the member
/// put back (at the top level, where the scan found it) they parse to that
/// record plus its MAC. `None` (not an error) for anything else: a
/// reformatted record, a wrong MAC, a field of the wrong type; the general
/// path then decides, with its messages.
fn open_fast<T: DeserializeOwned>(key: &IntegrityKey, domain: &str, bytes: &[u8]) -> Option<T> {
    let (start, end, hex) = mac_member(bytes)?;
    let mut canon = Vec::with_capacity(bytes.len());
    canon.extend_from_slice(&bytes[..start]);
    canon.extend_from_slice(&bytes[end..]);
    let stored = blake3::Hash::from_hex(hex).ok()?;
    // Constant-time compare through blake3::Hash.
    if key.mac(domain, &canon) != stored {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// Read and authenticate a record. `file` names it in errors.
pub fn open<T: DeserializeOwned>(key: Option<&IntegrityKey>, domain: &str, bytes: &[u8], file: &str) -> Result<T, RecordError> {
    if let Some(k) = key
        && let Some(rec) = open_fast(k, domain, bytes)
    {
        return Ok(rec);
    }
    let v: Value = crate::util::redact::from_json(bytes).map_err(|why| RecordError::Unreadable { file: file.to_string(), why })?;
    let Value::Object(m) = &v else {
        return Err(RecordError::Unreadable { file: file.to_string(), why: "not a JSON object".into() });
    };
    let mac = match m.get(MAC_FIELD) {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(RecordError::BadField { file: file.to_string(), field: MAC_FIELD.into(), why: "not a string".into() }),
        None => {
            // Still report a malformed field first: it is the more precise finding.
            typed::<T>(v, file)?;
            return Err(RecordError::NoMac { file: file.to_string() });
        }
    };
    let computed = key.map(|k| mac_of(k, domain, &v));
    let rec = typed::<T>(v, file)?;
    match (key, computed) {
        (Some(k), Some(c)) => {
            // Constant-time compare through blake3::Hash.
            let ok = blake3::Hash::from_hex(mac.as_bytes()).ok().zip(blake3::Hash::from_hex(c.as_bytes()).ok()).is_some_and(|(a, b)| a == b);
            let _ = k;
            if ok { Ok(rec) } else { Err(RecordError::BadMac { file: file.to_string() }) }
        }
        _ => Err(RecordError::NoKey { file: file.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The earlier implementation (keys and scalars through `Value`'s
    /// Display), kept to pin the bytes every existing MAC was computed over.
    fn canonical_reference(v: &Value) -> String {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let parts: Vec<String> = keys.iter().map(|k| format!("{}:{}", Value::String((*k).clone()), canonical_reference(&m[*k]))).collect();
                format!("{{{}}}", parts.join(","))
            }
            Value::Array(a) => format!("[{}]", a.iter().map(canonical_reference).collect::<Vec<_>>().join(",")),
            other => other.to_string(),
        }
    }

    #[test]
    fn canonical_bytes_are_unchanged() {
        let v: Value = serde_json::json!({
            "z": [1, -2.5, 1e300, 0.1, true, null, "é\u{1}\"\\\n\t/\u{7f}\u{2028}"],
            "a": {"k\u{0}ey": {}, "": [], "b": {"y": 1, "x": 2}},
            "m": u64::MAX, "n": i64::MIN, "f": 0.30000000000000004
        });
        assert_eq!(canonical_json(&v), canonical_reference(&v));
    }
    use crate::workspace::ContentHash;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct R {
        name: String,
        hash: ContentHash,
        x: f64,
    }

    #[test]
    fn seal_open_and_tamper() {
        let k = IntegrityKey::from_bytes([3; 32]);
        let r = R { name: "a".into(), hash: ContentHash::of_bytes(b"x"), x: 0.1 + 0.2 };
        let b = seal(&k, STAGE_RECORD, &r).unwrap();
        assert_eq!(open::<R>(Some(&k), STAGE_RECORD, &b, "f").unwrap(), r);
        // Another domain, another key, no key.
        assert!(matches!(open::<R>(Some(&k), MODEL, &b, "f"), Err(RecordError::BadMac { .. })));
        assert!(matches!(open::<R>(Some(&IntegrityKey::from_bytes([4; 32])), STAGE_RECORD, &b, "f"), Err(RecordError::BadMac { .. })));
        assert!(matches!(open::<R>(None, STAGE_RECORD, &b, "f"), Err(RecordError::NoKey { .. })));
        // Pretty-printed (reformatted) stays valid: the MAC is over canonical JSON.
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(open::<R>(Some(&k), STAGE_RECORD, &serde_json::to_vec_pretty(&v).unwrap(), "f").unwrap(), r);
        // An edited field fails.
        let mut v2 = v.clone();
        v2["name"] = "b".into();
        let e = open::<R>(Some(&k), STAGE_RECORD, &serde_json::to_vec(&v2).unwrap(), "state/x.json").unwrap_err();
        assert!(e.is_tampering() && e.to_string().contains("state/x.json") && e.to_string().contains("modified outside dagrun"), "{e}");
        // A malformed hash is named by field, never echoed.
        let mut v3 = v.clone();
        v3["hash"] = "x/../../etc".into();
        let e = open::<R>(Some(&k), STAGE_RECORD, &serde_json::to_vec(&v3).unwrap(), "state/x.json").unwrap_err().to_string();
        assert!(e.contains("field `hash`") && e.contains("64 lowercase hex") && !e.contains("etc"), "{e}");
        // No MAC.
        let b = serde_json::to_vec(&r).unwrap();
        assert!(matches!(open::<R>(Some(&k), STAGE_RECORD, &b, "f"), Err(RecordError::NoMac { .. })));
        assert!(matches!(open::<R>(Some(&k), STAGE_RECORD, b"[1]", "f"), Err(RecordError::Unreadable { .. })));
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Nested {
        a: std::collections::BTreeMap<String, Value>,
        mab: String,
        z: Vec<f64>,
    }

    #[test]
    fn records_as_dagrun_writes_them_take_the_fast_path_with_the_same_verdicts() {
        let k = IntegrityKey::from_bytes([5; 32]);
        let mut a = std::collections::BTreeMap::new();
        a.insert("mac".to_string(), serde_json::json!({"mac": "x", "q\"u{1}\\": [1, {"mac": 2}]}));
        a.insert("b".to_string(), serde_json::json!("\",\"mac\":\""));
        let r = Nested { a, mab: "é\u{2028}".into(), z: vec![0.1, 1e300, -2.5] };
        let b = seal(&k, STAGE_RECORD, &r).unwrap();
        // Written bytes verify over themselves minus the top-level member.
        assert_eq!(open_fast::<Nested>(&k, STAGE_RECORD, &b), Some(r));
        let (s, e, _) = mac_member(&b).unwrap();
        let mut canon = b[..s].to_vec();
        canon.extend_from_slice(&b[e..]);
        let mut without: Value = serde_json::from_slice(&b).unwrap();
        without.as_object_mut().unwrap().remove(MAC_FIELD);
        assert_eq!(canon, canonical_json(&without).into_bytes());
        // Reformatted: the general path (still valid); edited: refused by both.
        let v: Value = serde_json::from_slice(&b).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        assert!(open_fast::<Nested>(&k, STAGE_RECORD, &pretty).is_none());
        assert!(open::<Nested>(Some(&k), STAGE_RECORD, &pretty, "f").is_ok());
        let edited = String::from_utf8(b.clone()).unwrap().replace("-2.5", "-3.5");
        assert_ne!(edited.as_bytes(), &b[..]);
        assert!(open_fast::<Nested>(&k, STAGE_RECORD, edited.as_bytes()).is_none());
        assert!(matches!(open::<Nested>(Some(&k), STAGE_RECORD, edited.as_bytes(), "f"), Err(RecordError::BadMac { .. })));
        // A MAC moved into a nested object is not the record's MAC.
        let mac = v["mac"].as_str().unwrap().to_string();
        let mut moved = v.clone();
        moved.as_object_mut().unwrap().remove("mac");
        moved["a"]["b"] = serde_json::json!({"mac": mac});
        assert!(open::<Nested>(Some(&k), STAGE_RECORD, &serde_json::to_vec(&moved).unwrap(), "f").is_err());
        // The only member, first member, last member.
        for json in [r#"{"mac":"M"}"#, r#"{"a":1,"mac":"M"}"#, r#"{"mac":"M","z":1}"#] {
            let canon = json.replace(r#","mac":"M""#, "").replace(r#""mac":"M","#, "").replace(r#""mac":"M""#, "");
            let m = k.mac(STAGE_RECORD, canon.as_bytes()).to_hex().to_string();
            let bytes = json.replace('M', &m);
            let (s, e, hex) = mac_member(bytes.as_bytes()).unwrap();
            assert_eq!(hex, m.as_bytes());
            assert_eq!(format!("{}{}", &bytes[..s], &bytes[e..]), canon, "{json}");
        }
    }
}
