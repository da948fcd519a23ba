//! `uses: encrypt` — per-tenant encryption of raw data (spec §3).
//!
//! `Sensitive_Data` becomes `Sensitive_Data_Enc` (AES-256-GCM, random 96-bit
//! nonce, stored as `nonce || ciphertext || tag`, associated data
//! `tenant|Sensitive_Data|Customer_ID`) and `Sensitive_Token`
//! (HMAC-SHA256 under the tenant's separate pseudonym key). Other columns stay
//! in clear. The id of the tenant's active data key is part of the cache key
//! and is written into the Parquet footer (`dagrun.key_id`), so a reader knows
//! which key opens the file.
//!
//! Work is streamed batch by batch; each batch is split across the cores.

use super::Services;
use super::params::{self, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::crypto::aead::FieldCipher;
use crate::crypto::pseudonym::Pseudonymizer;
use crate::data::parquet_io::{Output, ParquetSink, SpliceColumns, open_batches};
use crate::data::schema::{self, encrypted_schema};
use crate::pipeline::Stage;
use anyhow::{Context, Result, anyhow, bail};
use arrow_array::builder::{BinaryBuilder, FixedSizeBinaryBuilder};
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct Encrypt;

/// Column name bound into the associated data.
pub const COLUMN: &str = "Sensitive_Data";

/// Encrypt rows `range` of a raw batch: (ciphertexts, tokens).
fn encrypt_rows(
    cipher: &FieldCipher,
    pseudo: &Pseudonymizer,
    tenant: &str,
    ids: &Int64Array,
    pii: &StringArray,
    range: std::ops::Range<usize>,
) -> (ArrayRef, ArrayRef) {
    let n = range.len();
    let mut enc = BinaryBuilder::with_capacity(n, n * 64);
    let mut tok = FixedSizeBinaryBuilder::with_capacity(n, 32);
    cipher.encrypt_many(tenant, COLUMN, range.clone().map(|i| (ids.value(i), pii.value(i).as_bytes())), |blob| enc.append_value(blob));
    for i in range {
        tok.append_value(pseudo.token(pii.value(i).as_bytes())).expect("32-byte token");
    }
    (Arc::new(enc.finish()), Arc::new(tok.finish()))
}

/// `Sensitive_Data_Enc` and `Sensitive_Token` of one raw batch (which must
/// hold `Tenant_ID`, `Customer_ID` and `Sensitive_Data`; every row must
/// belong to `tenant`), the rows split across `threads` threads.
pub fn encrypt_columns(cipher: &FieldCipher, pseudo: &Pseudonymizer, tenant: &str, batch: &RecordBatch, threads: usize) -> Result<(ArrayRef, ArrayRef)> {
    let col = |name: &str| batch.column_by_name(name).ok_or_else(|| anyhow!("raw data has no column {name}"));
    let tenants = col(schema::TENANT_ID)?.as_any().downcast_ref::<StringArray>().context("Tenant_ID is not utf8")?;
    if let Some(i) = (0..tenants.len()).find(|&i| tenants.value(i) != tenant) {
        let other = tenants.value(i);
        // Described, not shown: a value of tenant-id shape may still be PII (an SSN, a user name).
        bail!("row {} of the raw data belongs to another tenant ({}), not {tenant}", i + 1, crate::data::describe_value(other));
    }
    let ids = col(schema::CUSTOMER_ID)?.as_any().downcast_ref::<Int64Array>().context("Customer_ID is not int64")?;
    let pii = col(schema::SENSITIVE_DATA)?.as_any().downcast_ref::<StringArray>().context("Sensitive_Data is not utf8")?;
    if pii.null_count() > 0 || ids.null_count() > 0 {
        bail!("raw data has empty Customer_ID or Sensitive_Data values");
    }
    let parts = crate::util::par::map_chunks(batch.num_rows(), threads, 8192, |r| encrypt_rows(cipher, pseudo, tenant, ids, pii, r));
    let concat = |f: fn(&(ArrayRef, ArrayRef)) -> &ArrayRef| -> Result<ArrayRef> {
        let arrays: Vec<&dyn Array> = parts.iter().map(|p| f(p).as_ref()).collect();
        arrow_select_concat(&arrays)
    };
    Ok((concat(|p| &p.0)?, concat(|p| &p.1)?))
}

/// Encrypt one raw batch into the encrypted schema, split across `threads` threads.
pub fn encrypt_batch(cipher: &FieldCipher, pseudo: &Pseudonymizer, tenant: &str, batch: &RecordBatch, threads: usize) -> Result<RecordBatch> {
    let col = |name: &str| batch.column_by_name(name).ok_or_else(|| anyhow!("raw data has no column {name}"));
    let (enc, tok) = encrypt_columns(cipher, pseudo, tenant, batch, threads)?;
    let with_label = batch.column_by_name(schema::CONVERTED).is_some();
    let mut cols: Vec<ArrayRef> = vec![col(schema::TENANT_ID)?.clone(), col(schema::CUSTOMER_ID)?.clone(), enc, tok];
    for c in [schema::LOGIN_COUNT, schema::PURCHASE_AMOUNT, schema::LAST_VISIT_DATE] {
        cols.push(col(c)?.clone());
    }
    if with_label {
        cols.push(col(schema::CONVERTED)?.clone());
    }
    Ok(RecordBatch::try_new(encrypted_schema(with_label), cols)?)
}

/// Concatenate arrays of one type (binary or fixed-size binary).
fn arrow_select_concat(arrays: &[&dyn Array]) -> Result<ArrayRef> {
    if arrays.len() == 1 {
        return Ok(arrow_array::make_array(arrays[0].to_data()));
    }
    Ok(arrow_select::concat::concat(arrays)?)
}

/// The cache-key ingredient naming the tenant's data key.
fn key_ingredient(tenant: &str) -> String {
    format!("data key of {tenant}")
}

/// Refuse to go on when this tenant's data was encrypted before (the stage's
/// state record, or the footer of its output, names a data key) but the keyring
/// no longer holds that key: its entry was deleted, or the keyring was replaced
/// by a fresh one. Creating a new key would give it the same id, so the old
/// ciphertexts would silently stay "up to date" while nothing can decrypt them.
fn check_earlier_key(stage: &Stage, services: &Services, ring: &crate::crypto::KeyringView, tenant: &str) -> Result<()> {
    let recorded = services
        .states
        .get(&stage.name)
        .and_then(|st| st.ingredients.extras.get(&key_ingredient(tenant)).cloned())
        .filter(|id| !id.starts_with("destroyed "))
        .map(|id| (format!("the state record of stage {}", stage.name), id));
    let in_footer = || {
        let out = stage.outs.first()?;
        let kv = crate::data::parquet_io::read_footer_kv(&services.workspace.join(&out.path)).ok()?;
        kv.get("dagrun.key_id").map(|id| (out.path.clone(), id.clone()))
    };
    let Some((place, key_id)) = recorded.or_else(in_footer) else { return Ok(()) };
    if ring.holds_data_key(tenant, &key_id) {
        return Ok(());
    }
    bail!(
        "tenant {tenant}'s data was encrypted with data key {} ({place}), which the keyring {} no longer holds; \
         dagrun will not create a new key for it (the existing ciphertexts would stay undecryptable). \
         Restore .dagrun/keys/keyring.json from a backup, or remove {tenant}'s encrypted data and state to start it afresh",
        crate::crypto::escape_for_message(&key_id),
        ring.path().display()
    )
}

/// `with:` of `uses: encrypt` (the run reads its paths from the stage's
/// declared input and output).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptWith {
    pub input: Text,
    pub output: Text,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
}

impl KindDecl for Encrypt {
    fn name(&self) -> &'static str {
        "encrypt"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: EncryptWith = params::parse(with)?;
        per_tenant("encrypt", tenant)?;
        Ok(Declared { deps: vec![p.input.0.clone()], outs: vec![DeclaredOut { path: p.output.0.clone(), sensitive: false }], params: params::keep(p) })
    }
}

impl StageKind for Encrypt {
    fn extra_ingredients(&self, stage: &Stage, services: &Services) -> Result<BTreeMap<String, String>> {
        let tenant = stage.tenant.as_deref().unwrap_or_default();
        // Read-only: computing a cache key (status, --dry-run, a run's
        // decisions) never loads the master key nor creates a key. A tenant
        // with no key yet gets the id its first key will have, so the dry run
        // and the run agree (a forgotten tenant gets no new key).
        crate::crypto::master::check_source(&services.workspace)?;
        let ring = crate::crypto::KeyringView::read(&services.workspace)?;
        let id = match ring.is_forgotten(tenant) {
            Some(when) => format!("destroyed {when}"),
            None => {
                check_earlier_key(stage, services, &ring, tenant)?;
                ring.data_key_ingredient(tenant)?
            }
        };
        Ok(BTreeMap::from([(key_ingredient(tenant), id)]))
    }
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let ring = ctx.services.keyring()?;
        let (key_id, key) = ring.active_data_key(tenant)?;
        let cipher = FieldCipher::new(&key);
        let pseudo = Pseudonymizer::new(&ring.pseudonym_key(tenant)?);
        drop(key);
        let input = &ctx.deps[0];
        let in_schema = crate::data::parquet_io::read_schema(input)?;
        let with_label = in_schema.field_with_name(schema::CONVERTED).is_ok();
        let kv = vec![
            ("dagrun.dataset".to_string(), "encrypted".to_string()),
            ("dagrun.tenant".to_string(), tenant.to_string()),
            ("dagrun.key_id".to_string(), key_id.clone()),
            (
                "dagrun.aead".to_string(),
                "AES-256-GCM; Sensitive_Data_Enc = nonce(12) || ciphertext || tag(16); AAD = UTF-8 of tenant|Sensitive_Data|Customer_ID".to_string(),
            ),
            ("dagrun.pseudonym".to_string(), "Sensitive_Token = HMAC-SHA256(tenant pseudonym key, UTF-8 Sensitive_Data)".to_string()),
        ];
        let threads = crate::util::par::threads();
        let check_cancel = || {
            if ctx.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                bail!("interrupted");
            }
            Ok(())
        };
        // The clear columns pass through byte for byte (spliced, not decoded
        // and encoded again); only the two new columns are computed. A raw
        // file dagrun did not write in this layout takes the ordinary path.
        let spliced = crate::data::parquet_io::rewrite_with_spliced_columns(
            input,
            &ctx.outs[0],
            Output { schema: encrypted_schema(with_label), kv_metadata: kv.clone() },
            SpliceColumns {
                computed: &[schema::SENSITIVE_DATA_ENC, schema::SENSITIVE_TOKEN],
                read: &[schema::TENANT_ID, schema::CUSTOMER_ID, schema::SENSITIVE_DATA],
                batch_size: crate::data::DEFAULT_BATCH_SIZE,
            },
            |batch| {
                check_cancel()?;
                let (enc, tok) = encrypt_columns(&cipher, &pseudo, tenant, batch, threads)?;
                Ok(vec![enc, tok])
            },
        )?;
        let rows = match spliced {
            Some(rows) => rows,
            None => {
                let mut sink = ParquetSink::create(&ctx.outs[0], encrypted_schema(with_label), kv)?;
                let mut rows = 0u64;
                for batch in open_batches(input, crate::data::DEFAULT_BATCH_SIZE)? {
                    check_cancel()?;
                    let batch = batch?;
                    rows += batch.num_rows() as u64;
                    sink.write(&encrypt_batch(&cipher, &pseudo, tenant, &batch, threads)?)?;
                }
                sink.finish()?;
                rows
            }
        };
        let mut facts = Map::new();
        facts.insert("rows".into(), rows.into());
        facts.insert("key_id".into(), key_id.into());
        Ok(RunReport { facts })
    }
}
