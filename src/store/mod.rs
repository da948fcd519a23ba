//! The versioned feature store (spec §6).
//!
//! Layout (paths chosen by the stage): `features/<tenant>/<version>/` holds
//! `features.parquet` and `manifest.json`. The Parquet file is written first
//! (and hashed: from disk, or as its bytes are written), then the manifest
//! is written; both atomically. A
//! version directory without a manifest is incomplete and does not open.

use crate::crypto::IntegrityKey;
use crate::data::parquet_io::{ParquetSink, footer_kv};
use crate::data::schema::{features_schema, format_date};
use crate::features::v1::TenantStats;
use crate::util::atomic::write_json_atomic;
use crate::workspace::{ContentHash, record};
use anyhow::{Context, Result, anyhow, bail};
use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Value of [`Manifest::format`].
pub const MANIFEST_FORMAT: &str = "dagrun-feature-manifest/1";
/// File name of the feature file in a version directory.
pub const FEATURES_FILE: &str = "features.parquet";
/// File name of the manifest in a version directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Footer keys written into `features.parquet`.
pub const KV_VERSION: &str = "dagrun.feature_set_version";
pub const KV_LINEAGE: &str = "dagrun.lineage_hash";
pub const KV_TENANT: &str = "dagrun.tenant";
pub const KV_AS_OF: &str = "dagrun.as_of";

/// One column of the stored schema.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    /// Arrow type as displayed by arrow-rs (e.g. `Int64`, `FixedSizeBinary(32)`).
    pub data_type: String,
    pub nullable: bool,
}

/// Where a feature version came from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Lineage {
    /// See [`lineage_hash`].
    pub lineage_hash: String,
    /// Input path → blake3 hex of its bytes.
    pub inputs: BTreeMap<String, String>,
    pub params: serde_json::Value,
    pub code_version: String,
}

/// The manifest beside a feature file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub tenant: String,
    pub feature_set_version: String,
    pub schema: Vec<ColumnInfo>,
    pub rows: u64,
    pub stats: TenantStats,
    /// `YYYY-MM-DD`.
    pub as_of: String,
    /// File name of the feature file, relative to the version directory.
    pub file: String,
    pub file_blake3: String,
    pub lineage: Lineage,
    /// MAC under the workspace integrity key (see the module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// `features/<tenant>/<version>` under `root`.
pub fn version_dir(root: &Path, tenant: &str, version: &str) -> PathBuf {
    root.join(tenant).join(version)
}

/// blake3 (hex) over a canonical encoding of the lineage:
/// the bytes `"dagrun-lineage/1\n"` followed by compact JSON (serde_json,
/// keys sorted, no whitespace) of the object
/// `{"code_version": .., "feature_set_version": .., "inputs": {path: blake3, ..},
///   "params": .., "tenant": ..}`. Object keys at every depth of `params` are
/// sorted (serde_json's map is ordered here), numbers are written by
/// serde_json (shortest round-trip form). The incoming `lineage_hash` is ignored.
pub fn lineage_hash(tenant: &str, feature_set_version: &str, lineage: &Lineage) -> String {
    let v = serde_json::json!({
        "code_version": lineage.code_version,
        "feature_set_version": feature_set_version,
        "inputs": lineage.inputs,
        "params": lineage.params,
        "tenant": tenant,
    });
    let mut h = blake3::Hasher::new();
    h.update(b"dagrun-lineage/1\n");
    h.update(&serde_json::to_vec(&v).unwrap_or_default());
    h.finalize().to_hex().to_string()
}

/// blake3 (hex) of a file's bytes, streamed.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = crate::util::open_regular(path).with_context(|| format!("cannot open {}", path.display()))?;
    hash_reader(&mut f).with_context(|| format!("cannot read {}", path.display()))
}

fn hash_reader(r: &mut impl Read) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Write a feature version into `dir` (the version directory): the Parquet
/// file (footer: version, lineage hash, tenant, as_of), then its blake3, then
/// `manifest.json`. Existing files are replaced (overwrite policy is the
/// caller's). The schema is that of the first batch (`features_schema(false)`
/// when there are no batches); every batch must share it.
#[allow(clippy::too_many_arguments)]
pub fn write_version(
    key: &IntegrityKey,
    dir: &Path,
    tenant: &str,
    version: &str,
    as_of: i32,
    stats: &TenantStats,
    lineage: Lineage,
    batches: impl IntoIterator<Item = Result<RecordBatch>>,
) -> Result<Manifest> {
    let (lineage, as_of_s, kv) = prepare(tenant, version, as_of, lineage)?;
    let path = dir.join(FEATURES_FILE);
    let mut it = batches.into_iter().peekable();
    let schema = match it.peek() {
        Some(Ok(b)) => b.schema(),
        _ => features_schema(false),
    };
    let mut sink = ParquetSink::create(&path, schema.clone(), kv)?;
    for b in it {
        let b = b?;
        if b.schema() != schema {
            bail!("feature batches for tenant {tenant} {version} do not share one schema (internal error)");
        }
        sink.write(&b)?;
    }
    let rows = sink.rows();
    sink.finish()?;
    finish_version(key, dir, tenant, version, &as_of_s, stats, lineage, &schema, rows, None)
}

/// Like [`write_version`], from a finished feature file: its column chunks
/// are copied byte for byte (no decoding) under the store's footer.
#[allow(clippy::too_many_arguments)]
pub fn write_version_from_file(
    key: &IntegrityKey,
    dir: &Path,
    tenant: &str,
    version: &str,
    as_of: i32,
    stats: &TenantStats,
    lineage: Lineage,
    src: &Path,
) -> Result<Manifest> {
    let (lineage, as_of_s, kv) = prepare(tenant, version, as_of, lineage)?;
    let (schema, rows, hash) = crate::data::parquet_io::copy_with_footer(src, &dir.join(FEATURES_FILE), kv)?;
    finish_version(key, dir, tenant, version, &as_of_s, stats, lineage, &schema, rows, Some(hash))
}

/// Shared start of both writers: check the tenant, seal the lineage hash, and
/// build the footer metadata.
fn prepare(tenant: &str, version: &str, as_of: i32, mut lineage: Lineage) -> Result<(Lineage, String, Vec<(String, String)>)> {
    if !crate::data::is_valid_tenant_id(tenant) {
        bail!("invalid tenant id {}", crate::data::show_tenant(tenant));
    }
    lineage.lineage_hash = lineage_hash(tenant, version, &lineage);
    let as_of_s = format_date(as_of);
    let kv = vec![
        (KV_VERSION.to_string(), version.to_string()),
        (KV_LINEAGE.to_string(), lineage.lineage_hash.clone()),
        (KV_TENANT.to_string(), tenant.to_string()),
        (KV_AS_OF.to_string(), as_of_s.clone()),
    ];
    Ok((lineage, as_of_s, kv))
}

/// Hash the written feature file (unless its writer hashed the bytes on
/// the way out: `written_hash`) and write the manifest (last).
#[allow(clippy::too_many_arguments)]
fn finish_version(
    key: &IntegrityKey,
    dir: &Path,
    tenant: &str,
    version: &str,
    as_of: &str,
    stats: &TenantStats,
    lineage: Lineage,
    schema: &arrow_schema::Schema,
    rows: u64,
    written_hash: Option<String>,
) -> Result<Manifest> {
    let file_blake3 = match written_hash {
        Some(h) => h,
        None => hash_file(&dir.join(FEATURES_FILE))?,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        tenant: tenant.to_string(),
        feature_set_version: version.to_string(),
        schema: schema
            .fields()
            .iter()
            .map(|f| ColumnInfo { name: f.name().clone(), data_type: f.data_type().to_string(), nullable: f.is_nullable() })
            .collect(),
        rows,
        stats: *stats,
        as_of: as_of.to_string(),
        file: FEATURES_FILE.to_string(),
        file_blake3,
        lineage,
        mac: None,
    };
    let sealed = record::seal_value(key, record::FEATURE_MANIFEST, &manifest)?;
    write_json_atomic(&dir.join(MANIFEST_FILE), &sealed)?;
    Ok(Manifest { mac: sealed.get(record::MAC_FIELD).and_then(|m| m.as_str()).map(str::to_string), ..manifest })
}

/// Read `dir/manifest.json` and verify its MAC under the workspace integrity key.
pub fn read_manifest(dir: &Path, key: &IntegrityKey) -> Result<Manifest> {
    let (p, bytes) = manifest_bytes(dir)?;
    parse_manifest(&p, &bytes, key)
}

fn manifest_bytes(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let p = dir.join(MANIFEST_FILE);
    let bytes = crate::util::read_capped(&p, 16 << 20).with_context(|| {
        format!("cannot read feature manifest {}: the feature version is missing or incomplete; rerun `dagrun run --force store`", p.display())
    })?;
    Ok((p, bytes))
}

fn parse_manifest(p: &Path, bytes: &[u8], key: &IntegrityKey) -> Result<Manifest> {
    let m: Manifest = record::open(Some(key), record::FEATURE_MANIFEST, bytes, &p.display().to_string())
        .map_err(|e| anyhow!("feature manifest refused: {e}; rerun `dagrun run --force store`"))?;
    if m.format != MANIFEST_FORMAT {
        bail!("feature manifest {} has format {:?}; this build reads {MANIFEST_FORMAT:?}", p.display(), m.format);
    }
    if m.file.is_empty() || m.file.contains(['/', '\\']) || m.file == "." || m.file == ".." {
        bail!("feature manifest {} names an invalid file {:?}; it must be a file name in the same directory", p.display(), m.file);
    }
    Ok(m)
}

/// [`read_manifest`] of one tenant's feature version: a genuine manifest of
/// another tenant (its MAC verifies: same workspace key) copied over this
/// one's is refused, naming both tenants.
pub fn read_manifest_of(dir: &Path, key: &IntegrityKey, tenant: &str) -> Result<Manifest> {
    let (p, bytes) = manifest_bytes(dir)?;
    manifest_of(&p, &bytes, key, tenant)
}

fn manifest_of(p: &Path, bytes: &[u8], key: &IntegrityKey, tenant: &str) -> Result<Manifest> {
    let m = parse_manifest(p, bytes, key)?;
    if m.tenant != tenant {
        bail!("{} names tenant {}, not {tenant}", p.display(), crate::data::show_tenant(&m.tenant));
    }
    Ok(m)
}

/// [`read_manifest_of`], and the very file its store stage wrote (its blake3
/// is `recorded`, from the stage's state record), checked on the bytes read
/// once: an older genuine manifest put back is not taken for the current one.
pub fn read_recorded_manifest(dir: &Path, key: &IntegrityKey, tenant: &str, recorded: &ContentHash) -> Result<Manifest> {
    let (p, bytes) = manifest_bytes(dir)?;
    // The specific refusals first (MAC, tenant), then "not the recorded one".
    let m = manifest_of(&p, &bytes, key, tenant)?;
    let now = ContentHash::of_bytes(&bytes);
    if now != *recorded {
        bail!(
            "{} was modified after its store stage wrote it (blake3 {}, recorded {}); `dagrun verify` names it, and the next run restores it",
            p.display(),
            now.short(),
            recorded.short()
        );
    }
    Ok(m)
}

/// Open a feature version after checking it: blake3 of the file equals the
/// manifest's, and the footer's version, lineage hash and tenant equal the
/// manifest's. The file is opened once, hashed and then read from the same handle.
pub fn open_verified(dir: &Path, key: &IntegrityKey) -> Result<(Manifest, impl Iterator<Item = Result<RecordBatch>> + use<>)> {
    open_verified_with(dir, key, None, None)
}

/// [`open_verified`] for a stage that knows more:
/// - `known_hash`: the blake3 of `dir/features.parquet` that the engine
///   computed (or vouched for from its hash memo) for this very run's cache
///   key (`RunCtx::input_hashes`). When it equals the manifest's, the file is
///   not read and hashed a second time; any other value is ignored and the
///   file is hashed as usual, so a wrong hint can never let a file through.
/// - `columns`: read only these top-level columns (names absent from the
///   file are skipped: the consumer reports a missing column).
pub fn open_verified_with(
    dir: &Path,
    key: &IntegrityKey,
    known_hash: Option<&str>,
    columns: Option<&[&str]>,
) -> Result<(Manifest, impl Iterator<Item = Result<RecordBatch>> + use<>)> {
    let m = read_manifest(dir, key)?;
    let path = dir.join(&m.file);
    let shown = path.display().to_string();
    let mut f = crate::util::open_regular(&path).with_context(|| format!("cannot open feature file {shown}; rerun `dagrun run --force store`"))?;
    let vouched = m.file == FEATURES_FILE && known_hash == Some(m.file_blake3.as_str());
    if !vouched {
        let found = hash_reader(&mut f).with_context(|| format!("cannot read feature file {shown}"))?;
        if found != m.file_blake3 {
            bail!(
                "feature file {shown} does not match its manifest (blake3 {} expected, found {found}): the file was modified or corrupted; rerun `dagrun run --force store`",
                m.file_blake3
            );
        }
        f.seek(SeekFrom::Start(0))?;
    }
    let b = ParquetRecordBatchReaderBuilder::try_new(f).with_context(|| format!("{shown} is not a readable Parquet file"))?;
    let kv = footer_kv(b.metadata());
    let check = |key: &str, want: &str| -> Result<()> {
        match kv.get(key) {
            Some(v) if v == want => Ok(()),
            got => Err(anyhow!("feature file {shown}: footer {key} is {got:?} but the manifest says {want:?}; rerun `dagrun run --force store`")),
        }
    };
    check(KV_VERSION, &m.feature_set_version)?;
    check(KV_LINEAGE, &m.lineage.lineage_hash)?;
    check(KV_TENANT, &m.tenant)?;
    let b = match columns {
        Some(cols) => crate::data::parquet_io::only_columns(b, cols),
        None => b,
    };
    let reader = b.with_batch_size(crate::data::DEFAULT_BATCH_SIZE).build()?;
    Ok((m, reader.map(move |r| r.with_context(|| format!("cannot read feature file {shown}")))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::featurize::features_batch;
    use crate::data::generate::generate_tenant;
    use crate::data::parquet_io::{open_batches, read_footer_kv};

    fn key() -> IntegrityKey {
        IntegrityKey::from_bytes([5; 32])
    }

    fn lineage() -> Lineage {
        Lineage {
            lineage_hash: String::new(),
            inputs: [("data/enc/A.parquet".to_string(), "ab".repeat(32))].into_iter().collect(),
            params: serde_json::json!({"as_of": "2026-01-01", "seed": 42, "b": [1.5, {"z": 1, "a": 2}]}),
            code_version: "dagrun 0.1.0".into(),
        }
    }

    /// A features batch from generated raw rows (the token is a stand-in).
    fn feature_batches(d: &Path) -> (TenantStats, Vec<RecordBatch>) {
        let raw = d.join("raw.parquet");
        generate_tenant(&raw, "Tenant_A", 2000, 1, 20454).unwrap();
        let stats = crate::data::featurize::fit_stats(&raw).unwrap();
        let mut out = vec![];
        for b in open_batches(&raw, 700).unwrap() {
            let b = b.unwrap();
            let n = b.num_rows();
            let tok = arrow_array::FixedSizeBinaryArray::try_from_iter((0..n).map(|i| [i as u8; 32])).unwrap();
            let mut cols = b.columns().to_vec();
            cols[2] = std::sync::Arc::new(tok);
            let mut cols2 = cols[..2].to_vec();
            cols2.push(std::sync::Arc::new(arrow_array::BinaryArray::from_iter_values((0..n).map(|_| b"c"))));
            cols2.extend(cols[2..].iter().cloned());
            let enc = RecordBatch::try_new(crate::data::schema::encrypted_schema(true), cols2).unwrap();
            out.push(features_batch(&stats, 20454, &enc).unwrap());
        }
        (stats, out)
    }

    #[test]
    fn copied_version_hash_hint_and_projection() {
        let d = tempfile::tempdir().unwrap();
        let (stats, batches) = feature_batches(d.path());
        let src = d.path().join("afe.parquet");
        let mut sink = ParquetSink::create(&src, batches[0].schema(), vec![]).unwrap();
        for b in &batches {
            sink.write(b).unwrap();
        }
        sink.finish().unwrap();
        let dir = version_dir(&d.path().join("features"), "Tenant_A", "v1.0");
        let m = write_version_from_file(&key(), &dir, "Tenant_A", "v1.0", 20454, &stats, lineage(), &src).unwrap();
        // hashed as written == hashed from disk
        let path = dir.join(FEATURES_FILE);
        assert_eq!(m.file_blake3, hash_file(&path).unwrap());
        let cols = [crate::data::schema::CUSTOMER_ID, "Activity_Score", "no_such_column"];
        let (_, it) = open_verified_with(&dir, &key(), Some(&m.file_blake3), Some(&cols)).unwrap();
        let back: Vec<RecordBatch> = it.collect::<Result<_>>().unwrap();
        assert_eq!(back.iter().map(|b| b.num_rows()).sum::<usize>(), 2000);
        let names: Vec<String> = back[0].schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["Customer_ID", "Activity_Score"]);
        assert_eq!(&back[0].column(1).slice(0, 700), batches[0].column_by_name("Activity_Score").unwrap());
        // A tampered file: a hint other than the manifest's hash is ignored
        // (the file is hashed and refused), and so is no hint.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let other = "0".repeat(64);
        for hint in [None, Some(other.as_str())] {
            let e = format!("{:#}", open_verified_with(&dir, &key(), hint, None).err().expect("must fail"));
            assert!(e.contains("does not match its manifest"), "{e}");
        }
    }

    #[test]
    fn write_read_verify() {
        let d = tempfile::tempdir().unwrap();
        let (stats, batches) = feature_batches(d.path());
        let dir = version_dir(&d.path().join("features"), "Tenant_A", "v1.0");
        let m = write_version(&key(), &dir, "Tenant_A", "v1.0", 20454, &stats, lineage(), batches.clone().into_iter().map(Ok)).unwrap();
        assert_eq!(m.format, MANIFEST_FORMAT);
        assert_eq!(m.rows, 2000);
        assert_eq!(m.as_of, "2026-01-01");
        assert_eq!(m.stats, stats);
        assert_eq!(m.file, "features.parquet");
        assert_eq!(m.schema.len(), 9);
        assert_eq!(m.schema[2], ColumnInfo { name: "Sensitive_Token".into(), data_type: "FixedSizeBinary(32)".into(), nullable: false });
        assert_eq!(m.lineage.lineage_hash, lineage_hash("Tenant_A", "v1.0", &lineage()));
        assert_eq!(m.lineage.lineage_hash.len(), 64);
        assert_eq!(m.file_blake3, hash_file(&dir.join("features.parquet")).unwrap());
        assert_eq!(read_manifest(&dir, &key()).unwrap(), m);
        let kv = read_footer_kv(&dir.join("features.parquet")).unwrap();
        assert_eq!(kv[KV_VERSION], "v1.0");
        assert_eq!(kv[KV_LINEAGE], m.lineage.lineage_hash);
        assert_eq!(kv[KV_TENANT], "Tenant_A");
        assert_eq!(kv[KV_AS_OF], "2026-01-01");
        let (m2, it) = open_verified(&dir, &key()).unwrap();
        assert_eq!(m2, m);
        let back: Vec<_> = it.collect::<Result<_>>().unwrap();
        assert_eq!(back.iter().map(|b| b.num_rows()).sum::<usize>(), 2000);
        assert_eq!(back[0].slice(0, 700), batches[0]);
        // Only the two files: no temp files left.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[test]
    fn lineage_hash_is_canonical_and_sensitive() {
        let a = lineage();
        let mut b = lineage();
        b.params = serde_json::json!({"b": [1.5, {"a": 2, "z": 1}], "seed": 42, "as_of": "2026-01-01"});
        b.lineage_hash = "ignored".into();
        assert_eq!(lineage_hash("T", "v1.0", &a), lineage_hash("T", "v1.0", &b));
        assert_ne!(lineage_hash("T", "v1.0", &a), lineage_hash("U", "v1.0", &a));
        assert_ne!(lineage_hash("T", "v1.0", &a), lineage_hash("T", "v2.0", &a));
        b.code_version = "other".into();
        assert_ne!(lineage_hash("T", "v1.0", &a), lineage_hash("T", "v1.0", &b));
        let mut c = lineage();
        c.inputs.insert("x".into(), "00".into());
        assert_ne!(lineage_hash("T", "v1.0", &a), lineage_hash("T", "v1.0", &c));
    }

    #[test]
    fn flipped_byte_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let (stats, batches) = feature_batches(d.path());
        let dir = d.path().join("v");
        let m = write_version(&key(), &dir, "Tenant_A", "v1.0", 20454, &stats, lineage(), batches.into_iter().map(Ok)).unwrap();
        let p = dir.join("features.parquet");
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&p, &bytes).unwrap();
        let e = format!("{:#}", open_verified(&dir, &key()).err().expect("must fail"));
        assert!(e.contains("does not match its manifest"), "{e}");
        assert!(e.contains(&m.file_blake3) && e.contains("rerun `dagrun run --force store`"), "{e}");
    }

    #[test]
    fn footer_mismatch_and_missing_manifest() {
        let d = tempfile::tempdir().unwrap();
        let (stats, batches) = feature_batches(d.path());
        let dir = d.path().join("v");
        write_version(&key(), &dir, "Tenant_A", "v1.0", 20454, &stats, lineage(), batches.into_iter().map(Ok)).unwrap();
        // A manifest edited by hand fails its MAC.
        let mut m = read_manifest(&dir, &key()).unwrap();
        let mut edited = m.clone();
        edited.stats.mean_login += 1.0;
        write_json_atomic(&dir.join(MANIFEST_FILE), &edited).unwrap();
        let e = format!("{:#}", open_verified(&dir, &key()).err().unwrap());
        assert!(e.contains("modified outside dagrun"), "{e}");
        // One re-sealed with the key but with another lineage hash (the file hash intact) is refused.
        m.lineage.lineage_hash = "0".repeat(64);
        write_json_atomic(&dir.join(MANIFEST_FILE), &record::seal_value(&key(), record::FEATURE_MANIFEST, &m).unwrap()).unwrap();
        let e = format!("{:#}", open_verified(&dir, &key()).err().unwrap());
        assert!(e.contains("dagrun.lineage_hash"), "{e}");
        m.lineage.lineage_hash = read_footer_kv(&dir.join(FEATURES_FILE)).unwrap()[KV_LINEAGE].clone();
        m.feature_set_version = "v2.0".into();
        write_json_atomic(&dir.join(MANIFEST_FILE), &record::seal_value(&key(), record::FEATURE_MANIFEST, &m).unwrap()).unwrap();
        let e = format!("{:#}", open_verified(&dir, &key()).err().unwrap());
        assert!(e.contains("dagrun.feature_set_version"), "{e}");
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        assert!(open_verified(&dir, &key()).is_err());
        std::fs::write(dir.join(MANIFEST_FILE), b"{garbage").unwrap();
        assert!(read_manifest(&dir, &key()).is_err());
    }
}
