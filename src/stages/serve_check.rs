//! `uses: serve-check` — proves the serving path equals the offline path
//! (spec §8). For the tenant's test rows it scores (a) the raw columns through
//! the online path (`scoring`: v1 transform with the *stored* statistics, then
//! the model) and (b) the stored features through the model, and fails if any
//! score differs by more than 1e-9, if the model's feature version or feature
//! hash does not match the store, or if the model's hash does not match its
//! lineage record. Writes a per-tenant JSON report.

use super::params::{self, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::crypto::IntegrityKey;
use crate::data::schema;
use crate::model::artifact::load_verified;
use crate::model::split::test_mask;
use crate::scoring;
use crate::util::atomic::write_json_atomic;
use crate::workspace::ContentHash;
use anyhow::{Context, Result, bail};
use arrow_array::{Array, BooleanArray};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ServeCheck;

/// Largest allowed |online − offline| score difference.
pub const TOLERANCE: f64 = 1e-9;

/// The report written per tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub tenant: String,
    pub passed: bool,
    pub rows_total: u64,
    pub rows_checked: u64,
    pub max_abs_diff: f64,
    pub tolerance: f64,
    pub auc: f64,
    pub model_version: String,
    pub model_blake3: String,
    pub feature_set_version: String,
    pub feature_file_blake3: String,
}

/// Run the check. `recorded_model_hash` is the model's lineage record.
pub fn check(key: &IntegrityKey, tenant: &str, data: &Path, store_dir: &Path, model: &Path, recorded_model_hash: Option<&ContentHash>) -> Result<Report> {
    check_with(key, tenant, data, store_dir, model, recorded_model_hash, None)
}

/// [`check`] with the feature file's hash as the engine knows it
/// (`store::open_verified_with`: spares a second read and hash of the file).
pub fn check_with(
    key: &IntegrityKey,
    tenant: &str,
    data: &Path,
    store_dir: &Path,
    model: &Path,
    recorded_model_hash: Option<&ContentHash>,
    known_features_hash: Option<&str>,
) -> Result<Report> {
    let bytes = crate::util::read_capped(model, crate::model::artifact::MAX_MODEL_BYTES).with_context(|| format!("cannot read {}", model.display()))?;
    let model_hash = ContentHash::of_bytes(&bytes);
    match recorded_model_hash {
        Some(h) if *h == model_hash => {}
        Some(h) => bail!("model {} does not match its lineage record (blake3 {} recorded, file is {})", model.display(), h.short(), model_hash.short()),
        None => bail!("model {} has no lineage record: it was not produced by a train stage of this workspace", model.display()),
    }
    let artifact = load_verified(&bytes, &model.display().to_string(), key, tenant)?;
    let (manifest, batches) = crate::store::open_verified_with(store_dir, key, known_features_hash, Some(&scoring::MODEL_COLUMNS))?;
    scoring::check_model_matches_store(&artifact, &manifest)?;
    if artifact.feature_stats != manifest.stats {
        bail!("the statistics stored with feature version {} differ from those the model was trained with", manifest.feature_set_version);
    }
    // Offline path: stored features → model. Memory: one (id, score, label)
    // per test-split row (a fifth of the tenant), in file order, and each
    // row's Customer_ID and split; everything else streams batch by batch.
    let mut offline: Vec<(i64, f64, bool)> = Vec::new();
    let mut is_test_row: Vec<bool> = Vec::new();
    let mut store_ids: Vec<i64> = Vec::new();
    for batch in batches {
        let batch = batch?;
        let labels = batch.column_by_name(schema::CONVERTED).and_then(|c| c.as_any().downcast_ref::<BooleanArray>().cloned());
        let rows = scoring::stored_features(&batch)?;
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let mask = test_mask(tenant, &ids);
        store_ids.extend_from_slice(&ids);
        for (i, (id, x)) in rows.into_iter().enumerate() {
            if mask[i] {
                let y = labels.as_ref().is_some_and(|l| l.is_valid(i) && l.value(i));
                offline.push((id, artifact.predict_proba_row(&x), y));
            }
        }
        is_test_row.extend_from_slice(&mask);
    }
    // Online path: raw columns → stored statistics → model. The data and
    // the feature file hold the same rows in the same order when the store
    // was made from this data (the pipeline's case): then row k of the data
    // pairs with row k of the store, checked by Customer_ID. Any other order
    // is paired by Customer_ID through a map, as it comes.
    let as_of = schema::parse_date(&manifest.as_of)?;
    let mut max_diff = 0.0f64;
    let mut checked = 0u64;
    let mut total = 0u64;
    let mut scores = Vec::new();
    let mut truth = Vec::new();
    let mut by_id: Option<HashMap<i64, (f64, bool)>> = None;
    let mut next = 0usize; // next offline row, in order
    let raw_cols = [schema::CUSTOMER_ID, schema::LOGIN_COUNT, schema::PURCHASE_AMOUNT, schema::LAST_VISIT_DATE];
    for batch in crate::data::parquet_io::open_batches_columns(data, crate::data::DEFAULT_BATCH_SIZE, &raw_cols)? {
        let batch = batch?;
        let first_row = total as usize;
        total += batch.num_rows() as u64;
        for (k, (id, x)) in scoring::raw_features(&manifest.stats, as_of, &batch)?.into_iter().enumerate() {
            let row = first_row + k;
            if by_id.is_none() && store_ids.get(row) != Some(&id) {
                // Not the store's order: from here on every row is paired by
                // Customer_ID with the map of all test rows (rows paired in
                // order so far stay counted), as the check always did.
                by_id = Some(offline.iter().map(|&(i, p, y)| (i, (p, y))).collect());
                store_ids = Vec::new();
            }
            let (off, y) = match &mut by_id {
                None if is_test_row[row] => {
                    next += 1;
                    (offline[next - 1].1, offline[next - 1].2)
                }
                None => continue,
                // The offline map holds exactly the test split (hashed once per row).
                Some(m) => match m.get(&id).copied() {
                    Some(v) => v,
                    None => continue,
                },
            };
            let online = artifact.predict_proba_row(&x);
            let d = (online - off).abs();
            if d.is_nan() || d > max_diff {
                max_diff = if d.is_nan() { f64::INFINITY } else { d };
            }
            checked += 1;
            scores.push(online);
            truth.push(y);
        }
    }
    if checked as usize != offline.len() {
        bail!("the feature store has {} test rows but the data has {checked}", offline.len());
    }
    if max_diff > TOLERANCE {
        bail!(
            "online and offline scores differ by up to {max_diff:.3e} (> {TOLERANCE:e}) for tenant {tenant}: the serving path does not reproduce the training features (were the stored statistics changed?)"
        );
    }
    Ok(Report {
        tenant: tenant.to_string(),
        passed: true,
        rows_total: total,
        rows_checked: checked,
        max_abs_diff: max_diff,
        tolerance: TOLERANCE,
        auc: crate::model::metrics::roc_auc(&truth, &scores),
        model_version: artifact.model_version,
        model_blake3: model_hash.to_string(),
        feature_set_version: manifest.feature_set_version,
        feature_file_blake3: manifest.file_blake3,
    })
}

/// `with:` of `uses: serve-check` (the run reads its paths from the
/// stage's declared inputs and output).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeCheckWith {
    pub data: Text,
    /// A feature-store version directory.
    pub store: Text,
    pub model: Text,
    pub output: Text,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
}

impl KindDecl for ServeCheck {
    fn name(&self) -> &'static str {
        "serve-check"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: ServeCheckWith = params::parse(with)?;
        per_tenant("serve-check", tenant)?;
        let dir = &p.store.0;
        Ok(Declared {
            deps: vec![p.data.0.clone(), format!("{dir}/{}", crate::store::FEATURES_FILE), format!("{dir}/{}", crate::store::MANIFEST_FILE), p.model.0.clone()],
            outs: vec![DeclaredOut { path: p.output.0.clone(), sensitive: false }],
            params: params::keep(p),
        })
    }
}

impl StageKind for ServeCheck {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let model_rel = ctx.stage.deps[3].clone();
        let recorded = ctx.services.states.producer_of(&model_rel).map(|(_, o)| o.hash);
        let store_dir: PathBuf = ctx.deps[1].parent().context("store dir")?.to_path_buf();
        let report = check_with(&*ctx.services.integrity_key()?, tenant, &ctx.deps[0], &store_dir, &ctx.deps[3], recorded.as_ref(), ctx.input_hash(1))?;
        write_json_atomic(&ctx.outs[0], &report)?;
        let mut facts = Map::new();
        facts.insert("rows_checked".into(), report.rows_checked.into());
        facts.insert("max_abs_diff".into(), report.max_abs_diff.into());
        facts.insert("auc".into(), report.auc.into());
        Ok(RunReport { facts })
    }
    /// The tenant's line; when the model it names is not what `predict` and
    /// `serve` use (restored from the cache, which registers nothing, or
    /// `promote: manual`), it says which one they use and how to change it.
    fn summarize(&self, stage: &crate::pipeline::Stage, outs: &[PathBuf], services: &super::Services) -> Option<String> {
        let r: Report = serde_json::from_slice(&crate::util::read_capped(outs.first()?, super::MAX_REPORT_BYTES).ok()?).ok()?;
        let tenant = stage.tenant.as_deref().unwrap_or(&r.tenant);
        let promote = format!("`dagrun models promote {tenant} {}` to serve this one", r.model_version);
        let registry = crate::registry::Registry::of_workspace(&services.workspace);
        let serving = match registry.champion(tenant) {
            Ok(Some(c)) if c.version != r.model_version => format!("; not the champion: `predict` and `serve` use {} ({promote})", c.version),
            // `scoring::load_deployed_with`: registered models without a
            // champion are refused by `predict` too.
            Ok(None) if registry.versions(tenant).is_ok_and(|v| !v.is_empty()) => {
                format!("; no champion (`promote: manual`): `serve` answers 503 for {tenant} and `predict` refuses until one is promoted ({promote})")
            }
            Ok(None) => format!("; no champion: `serve` answers 503 for {tenant} and `predict` uses the latest `train` output ({promote})"),
            _ => String::new(),
        };
        Some(format!(
            "{}: {} rows, features {}, model {}, test AUC {:.4}, serve-check {} ({} rows, max |Δ| {:.1e}){serving}",
            tenant,
            r.rows_total,
            r.feature_set_version,
            r.model_version,
            r.auc,
            if r.passed { "ok" } else { "FAILED" },
            r.rows_checked,
            r.max_abs_diff
        ))
    }
}
