//! `uses: drift` — feature drift of a new feature version against the one
//! the champion model was trained on (PSI and missing/out-of-range shares,
//! `features::drift`), as a JSON report and a gate.
//!
//! Rules:
//! - `current:` is a feature-store version directory (a declared input: the
//!   stage follows `store`). `model:` is the champion model artifact. It is
//!   *not* a declared input, because the pipeline retrains it downstream
//!   (drift runs before `train`); instead the blake3 of the feature file it
//!   was trained on is a cache-key ingredient read when the stage is
//!   evaluated ([`StageKind::extra_ingredients`]): a champion trained on
//!   other features reruns drift, one retrained on the same features (say
//!   with another `C`) does not. With no model yet the current data's hash
//!   stands in, so the run after the first finds drift up to date; and once
//!   `train` has retrained on the data drift last measured, the earlier
//!   reference is kept (the data is not compared with itself on the next run).
//! - The reference is exactly the feature file the model names
//!   (`feature_file`, `feature_file_hash`): read from the workspace when that
//!   file still has that hash, else from the content-addressed cache (the
//!   store's outputs are cached), in both cases hashed before it is used.
//!   The data is never compared with itself: no model yet (first run), or a
//!   model trained on this very data → the report says `no_reference` and passes.
//! - Gate: any feature's PSI > `max_psi` (default 0.25) fails the stage after
//!   the report is written (so it can be read, and `dagrun report` shows it);
//!   `warn_psi` (default 0.1) ≤ PSI ≤ `max_psi` is a warning in the report,
//!   the run record facts and the summary. Data a model was already trained
//!   on (drift reran after `train` learnt from it) passes: above `max_psi`
//!   the report says `accepted` (never `fail`: a gate reading the report
//!   must pass what the stage passed; helper-71) and names that model in
//!   `reference.accepted_by`; `reference.model_version` is then the version
//!   of the model trained on the reference data, looked up in the registry.
//! - The report holds aggregates only (shares per bin, min/max of the
//!   reference), never a row.

use super::params::{self, Number, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::features::drift::{self, DEFAULT_MAX_PSI, DEFAULT_WARN_PSI, FeatureDrift, Level};
use crate::model::ModelArtifact;
use crate::pipeline::Stage;
use crate::util::atomic::write_atomic;
use crate::workspace::is_safe_rel as safe_rel;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct Drift;

/// Format identifier of the report.
pub const FORMAT: &str = "dagrun-drift/1";

/// Where the reference came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub model: String,
    pub model_blake3: String,
    pub model_version: String,
    pub feature_set_version: String,
    pub feature_file: String,
    pub feature_file_blake3: String,
    pub read_from: ReadFrom,
    pub rows: u64,
    /// The model trained on the current data, when the reference is the data
    /// of the model before it (drift reran after `train` retrained on this
    /// data: a changed threshold, `--force`, a lost report). That data was
    /// accepted when the model was trained on it: the measurement is shown,
    /// the gate passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_by: Option<String>,
}

impl Reference {
    /// The reference model as a sentence names it: `model X`, or `the model before X`.
    pub fn named(&self) -> String {
        if self.model_version.starts_with("the model before ") { self.model_version.clone() } else { format!("model {}", self.model_version) }
    }
}

/// Where the reference feature file was read (JSON: `workspace`, `cache`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReadFrom {
    /// The file in the workspace still had the recorded hash.
    Workspace,
    /// The content-addressed cache's copy.
    Cache,
}

/// The current data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Current {
    pub feature_file: String,
    pub feature_file_blake3: String,
    pub feature_set_version: String,
    pub rows: u64,
}

/// The report's verdict (JSON: `ok`, `warn`, `fail`, `no_reference`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftStatus {
    /// Every feature's PSI is below `warn_psi`.
    Ok,
    /// Some feature's PSI is between `warn_psi` and `max_psi`.
    Warn,
    /// Some feature's PSI is above `max_psi` (the stage fails).
    Fail,
    /// Some feature's PSI is above `max_psi`, but a model was trained on this
    /// data (`reference.accepted_by`): the stage passes.
    Accepted,
    /// Nothing to compare with: no model yet, or one trained on this data.
    NoReference,
}

impl DriftStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftStatus::Ok => "ok",
            DriftStatus::Warn => "warn",
            DriftStatus::Fail => "fail",
            DriftStatus::Accepted => "accepted",
            DriftStatus::NoReference => "no_reference",
        }
    }
}

impl From<Level> for DriftStatus {
    fn from(l: Level) -> DriftStatus {
        match l {
            Level::Ok => DriftStatus::Ok,
            Level::Warn => DriftStatus::Warn,
            Level::Fail => DriftStatus::Fail,
        }
    }
}

/// The JSON report (`output:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub format: String,
    pub tenant: String,
    pub status: DriftStatus,
    pub reference: Option<Reference>,
    pub current: Current,
    pub bins: usize,
    pub epsilon: f64,
    pub warn_psi: f64,
    pub max_psi: f64,
    pub features: Vec<FeatureDrift>,
}

impl Report {
    /// Parse and check a report read back from disk; `origin` is named in errors.
    pub fn from_json_bytes(bytes: &[u8], origin: &str) -> Result<Report> {
        let r: Report = crate::util::redact::from_json(bytes).map_err(|why| anyhow!("{origin}: not a valid {FORMAT} report: {}", why))?;
        if r.format != FORMAT {
            bail!("{origin}: unsupported drift report format {:?} (expected {FORMAT:?})", r.format);
        }
        let share = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        for f in &r.features {
            if !(f.psi.is_finite() && f.psi >= 0.0 && share(f.missing_share) && share(f.out_of_range_share)) {
                bail!("{origin}: feature {:?} has out-of-range values", f.name);
            }
        }
        Ok(r)
    }
}

/// `with:` of `uses: drift`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftWith {
    /// The champion model artifact (a workspace path; not a declared input).
    pub model: Text,
    /// The feature-store version directory measured.
    pub current: Text,
    pub output: Text,
    #[serde(default, deserialize_with = "present")]
    pub max_psi: Option<Number>,
    #[serde(default, deserialize_with = "present")]
    pub warn_psi: Option<Number>,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
}

fn thresholds(p: &DriftWith) -> std::result::Result<(f64, f64), StageError> {
    let max_psi = p.max_psi.map_or(DEFAULT_MAX_PSI, |n| n.0);
    let warn_psi = p.warn_psi.map_or(DEFAULT_WARN_PSI, |n| n.0);
    if !(max_psi.is_finite() && max_psi > 0.0) {
        return Err(StageError::at_key("max_psi", format!("`with.max_psi` = {max_psi}: must be a positive number")));
    }
    if !(warn_psi.is_finite() && warn_psi > 0.0 && warn_psi <= max_psi) {
        return Err(StageError::at_key("warn_psi", format!("`with.warn_psi` = {warn_psi}: must be positive and at most max_psi ({max_psi})")));
    }
    Ok((warn_psi, max_psi))
}

/// The five v1 feature columns of a Parquet feature file opened at `path`,
/// after checking its blake3 equals `hash` (hashed and read from one handle).
/// `None` when the file is absent or holds other bytes.
fn read_features_if(path: &Path, hash: &str) -> Result<Option<Vec<Vec<f64>>>> {
    // Named by the reference model, not a declared input: a FIFO or a device
    // there is never waited on nor read; like a missing file, the cache's copy is tried.
    let Ok(mut f) = crate::util::open_regular(path) else { return Ok(None) };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    if h.finalize().to_hex().as_str() != hash {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(0))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?
        .with_batch_size(crate::data::DEFAULT_BATCH_SIZE)
        .build()?;
    let mut cols = vec![Vec::new(); 5];
    for batch in reader {
        let batch = batch.with_context(|| format!("cannot read {}", path.display()))?;
        push_columns(&mut cols, &batch)?;
    }
    Ok(Some(cols))
}

fn push_columns(cols: &mut [Vec<f64>], batch: &arrow_array::RecordBatch) -> Result<()> {
    crate::scoring::extend_feature_columns(cols, batch)
}

/// The reference model (bytes hash and parsed): the tenant's champion in the
/// model registry (the copy `serve` and `predict` use, verified), else the
/// model at `rel`, which must be authentic (MAC under the workspace integrity
/// key) and `tenant`'s; None when there is neither.
fn read_model(workspace: &Path, rel: &str, key: &crate::crypto::IntegrityKey, tenant: &str) -> Result<Option<(String, ModelArtifact)>> {
    if let Some(m) = crate::registry::Registry::of_workspace(workspace).load_champion(tenant, key)? {
        return Ok(Some((m.blake3, m.artifact)));
    }
    let p = workspace.join(rel);
    // Not a declared input (the registry's champion comes first): read as a
    // regular file, never a FIFO or a device (`util::read_capped`).
    let bytes = match crate::util::read_capped(&p, crate::model::artifact::MAX_MODEL_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read the reference model {rel}: {e}")),
    };
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let m = crate::model::artifact::load_verified(&bytes, rel, key, tenant).map_err(|e| {
        e.context(format!(
            "the reference model {rel} cannot be trusted: delete it (the next run restores the train stage's output from the cache, or retrains) and check the workspace with `dagrun verify`"
        ))
    })?;
    Ok(Some((hash, m)))
}

/// The blake3 of the reference feature file (the cache-key ingredient, and
/// what `run` compares with), plus the model file read on the way.
/// The reference is the feature file the model was trained on; with no model
/// yet, the current data stands in (the first model is trained on it), so the
/// run after the first finds drift up to date; once `train` retrained on the
/// data drift last measured, that measurement's reference is kept (the data
/// is not compared with itself on the next run).
fn reference_hash(stage: &Stage, services: &super::Services) -> Result<(String, Option<(String, ModelArtifact)>)> {
    let p = params::of::<DriftWith>(stage)?;
    let (rel, dir) = (p.model.0.clone(), p.current.0.clone());
    let tenant = stage.tenant.as_deref().context("no tenant")?;
    // Without a master key yet (status before the first run) nothing here
    // can be verified: no model, no current version.
    let key = services.integrity_key().ok();
    let current = key.as_ref().and_then(|k| crate::store::read_manifest(&services.workspace.join(&dir), k).ok()).map(|m| m.file_blake3);
    let model = match &key {
        Some(k) => read_model(&services.workspace, &rel, k, tenant).map_err(|e| e.context(format!("stage {}", stage.name)))?,
        None => None,
    };
    let hash = match &model {
        Some((_, m)) if Some(&m.feature_file_hash) == current.as_ref() => {
            let features = format!("{dir}/{}", crate::store::FEATURES_FILE);
            // The measurement's reference is kept only while its file is: one
            // lost from the cache (review 18) makes the data the model's own
            // (no_reference), not an error no promotion can mend.
            let cas = crate::workspace::cas::Cas::read_only(&services.ws);
            services
                .states
                .get(&stage.name)
                .filter(|st| st.ingredients.inputs.get(&features) == current.as_ref())
                .and_then(|st| st.ingredients.extras.get("reference_features").cloned())
                .filter(|h| h == "none" || crate::workspace::ContentHash::parse(h).is_ok_and(|c| cas.object_path(&c).is_file()))
                .unwrap_or_else(|| m.feature_file_hash.clone())
        }
        Some((_, m)) => m.feature_file_hash.clone(),
        None => current.unwrap_or_else(|| "none".into()),
    };
    Ok((hash, model))
}

/// The newest registered version of `tenant`'s models trained on the
/// feature file of blake3 `features` (the model before the one `train`
/// retrained on the current data), if the registry still has one.
fn version_trained_on(ctx: &RunCtx, tenant: &str, features: &str) -> Option<String> {
    let registry = crate::registry::Registry::of_workspace(&ctx.services.workspace);
    let key = ctx.services.integrity_key().ok()?;
    registry
        .versions(tenant)
        .ok()?
        .iter()
        .rev()
        .find(|v| registry.load(tenant, &v.version, &key).is_ok_and(|m| m.artifact.feature_file_hash == features))
        .map(|v| v.version.clone())
}

/// What to do when the reference feature file is gone (`dagrun gc` keeps the
/// champions' own; removed by hand, or by a gc of an older dagrun): the
/// registered models of `tenant` whose training features are at hand, newest
/// first, to promote; else fetch the file back.
fn missing_reference_fix(ctx: &RunCtx, tenant: &str, cas: &crate::workspace::cas::Cas, current: &str, champion: &str) -> String {
    let registry = crate::registry::Registry::of_workspace(&ctx.services.workspace);
    let key = ctx.services.integrity_key().ok();
    let kept: Vec<String> = registry
        .versions(tenant)
        .unwrap_or_default()
        .iter()
        .rev()
        // Not the model drift compares with already (promoting it changes nothing).
        .filter(|v| v.version != champion)
        .filter_map(|v| {
            let m = registry.load(tenant, &v.version, key.as_ref()?).ok()?;
            let h = crate::workspace::ContentHash::parse(&m.artifact.feature_file_hash).ok()?;
            (m.artifact.feature_file_hash == current || cas.object_path(&h).is_file()).then(|| v.version.clone())
        })
        .take(3)
        .collect();
    let restore = "fetch it back (`dagrun pull` from the shared cache, or a backup of .dagrun/cache)";
    match kept.first() {
        Some(v) => format!(
            "Promote a model whose training features are kept — `dagrun models promote {tenant} {v}`{} — or {restore}",
            if kept.len() > 1 { format!(" (also kept: {})", kept[1..].join(", ")) } else { String::new() }
        ),
        None => format!("No registered model of {tenant} has its training features kept: {restore}"),
    }
}

impl KindDecl for Drift {
    fn name(&self) -> &'static str {
        "drift"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: DriftWith = params::parse(with)?;
        per_tenant("drift", tenant)?;
        thresholds(&p)?;
        let model = &p.model.0;
        if !safe_rel(model) {
            return Err(StageError::at_key("model", format!("`with.model` = {model:?}: must be a path inside the workspace")));
        }
        let dir = &p.current.0;
        Ok(Declared {
            deps: vec![format!("{dir}/{}", crate::store::FEATURES_FILE), format!("{dir}/{}", crate::store::MANIFEST_FILE)],
            outs: vec![DeclaredOut { path: p.output.0.clone(), sensitive: false }],
            params: params::keep(p),
        })
    }
}

impl StageKind for Drift {
    fn extra_ingredients(&self, stage: &Stage, services: &super::Services) -> Result<BTreeMap<String, String>> {
        Ok(BTreeMap::from([("reference_features".to_string(), reference_hash(stage, services)?.0)]))
    }
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let p: &DriftWith = ctx.params()?;
        let (warn_psi, max_psi) = thresholds(p).map_err(|e| anyhow!("stage {}: {e}", ctx.stage.name))?;
        let model_rel = p.model.0.clone();
        // Current data: the verified feature version.
        let dir = ctx.deps[0].parent().context("store dir")?;
        // The engine hashed the feature file for this run's key: no second
        // hash; only the five feature columns are decoded.
        let (manifest, batches) =
            crate::store::open_verified_with(dir, &*ctx.services.integrity_key()?, ctx.input_hash(0), Some(&crate::features::v1::FEATURE_NAMES))?;
        if manifest.tenant != tenant {
            bail!("{} holds tenant {}'s features, not {tenant}'s", ctx.rel(dir), manifest.tenant);
        }
        let mut current = vec![Vec::new(); 5];
        for b in batches {
            push_columns(&mut current, &b?)?;
        }
        let cur = Current {
            feature_file: ctx.rel(&ctx.deps[0]).into_owned(),
            feature_file_blake3: manifest.file_blake3.clone(),
            feature_set_version: manifest.feature_set_version.clone(),
            rows: current[0].len() as u64,
        };
        let mut report = Report {
            format: FORMAT.into(),
            tenant: tenant.into(),
            status: DriftStatus::NoReference,
            reference: None,
            current: cur,
            bins: drift::BINS,
            epsilon: drift::EPSILON,
            warn_psi,
            max_psi,
            features: vec![],
        };
        // Compare with exactly the reference the cache key names; data is
        // never compared with itself (that is `no_reference`, as on the first run).
        let (ref_hash, model) = reference_hash(ctx.stage, ctx.services)?;
        if let Some((model_hash, model)) = model.filter(|_| ref_hash != report.current.feature_file_blake3 && ref_hash != "none") {
            if model.tenant != tenant {
                bail!("reference model {model_rel} is tenant {}'s, not {tenant}'s", model.tenant);
            }
            let ff = &model.feature_file;
            if !safe_rel(ff) || crate::workspace::ContentHash::parse(&ref_hash).is_err() {
                bail!("reference model {model_rel}: feature_file {ff:?} / feature_file_hash must be a workspace path and a blake3 hex digest");
            }
            // The model itself, or (after a retrain on this data) the one before it.
            let model_version = if model.feature_file_hash == ref_hash {
                model.model_version.clone()
            } else {
                version_trained_on(ctx, tenant, &ref_hash).unwrap_or_else(|| format!("the model before {}", model.model_version))
            };
            let cas = crate::workspace::cas::Cas::read_only(&ctx.services.ws);
            let ref_content = crate::workspace::ContentHash::parse(&ref_hash).map_err(|e| anyhow!("reference model {model_rel}: feature_file_hash: {e}"))?;
            let (cols, from) = match read_features_if(&ctx.workspace.join(ff), &ref_hash)? {
                Some(c) => (c, ReadFrom::Workspace),
                None => match read_features_if(&cas.object_path(&ref_content), &ref_hash)? {
                    Some(c) => (c, ReadFrom::Cache),
                    None => bail!(
                        "the feature file {model_version} was trained on ({ff}, blake3 {}) is neither in the workspace nor in the cache: cannot measure drift. {}",
                        &ref_hash[..12],
                        missing_reference_fix(ctx, tenant, &cas, &report.current.feature_file_blake3, &model.model_version)
                    ),
                },
            };
            for (i, name) in crate::features::v1::FEATURE_NAMES.iter().enumerate() {
                report.features.push(drift::compare(name, &cols[i], &current[i], warn_psi, max_psi).with_context(|| format!("tenant {tenant}"))?);
            }
            let worst = report.features.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
            let accepted = model.feature_file_hash == report.current.feature_file_blake3;
            report.status = if worst == Level::Fail && accepted { DriftStatus::Accepted } else { worst.into() };
            report.reference = Some(Reference {
                model: model_rel.clone(),
                model_blake3: model_hash,
                model_version,
                feature_set_version: model.feature_set_version.clone(),
                feature_file: ff.clone(),
                feature_file_blake3: ref_hash.clone(),
                read_from: from,
                rows: cols[0].len() as u64,
                accepted_by: accepted.then(|| model.model_version.clone()),
            });
        }
        let mut bytes = serde_json::to_vec_pretty(&report)?;
        bytes.push(b'\n');
        write_atomic(&ctx.outs[0], &bytes)?;

        let failing: Vec<String> = report.features.iter().filter(|f| f.level == Level::Fail).map(|f| format!("{} PSI {:.3}", f.name, f.psi)).collect();
        // Data a model was already trained on is not stopped again: the gate
        // guards what `train` is about to learn from, and it has.
        let accepted = report.reference.as_ref().is_some_and(|r| r.accepted_by.is_some());
        if !failing.is_empty() && !accepted {
            bail!(
                "tenant {tenant}: feature drift above max_psi {max_psi}: {} (report: {}); the data differs from what {} was trained on. Investigate the new data, or accept it with `-p max_psi=…` raised for one run (once a model is trained on it, later runs accept it)",
                failing.join(", "),
                ctx.rel(&ctx.outs[0]),
                report.reference.as_ref().map(Reference::named).unwrap_or_else(|| "the model".into())
            );
        }
        let mut facts = Map::new();
        facts.insert("drift_status".into(), report.status.as_str().into());
        if let Some(r) = &report.reference {
            facts.insert("reference_model_version".into(), r.model_version.clone().into());
            if let Some(by) = &r.accepted_by {
                facts.insert("drift_accepted_by".into(), by.clone().into());
            }
        }
        let psi: Map<String, Value> = report.features.iter().map(|f| (f.name.clone(), json!(f.psi))).collect();
        if !psi.is_empty() {
            facts.insert("psi".into(), Value::Object(psi));
        }
        Ok(RunReport { facts })
    }
    fn summarize(&self, stage: &Stage, outs: &[PathBuf], _services: &super::Services) -> Option<String> {
        let r = Report::from_json_bytes(&crate::util::read_capped(outs.first()?, super::MAX_REPORT_BYTES).ok()?, "drift report").ok()?;
        let t = stage.tenant.as_deref().unwrap_or(&r.tenant);
        let Some(reference) = &r.reference else {
            return Some(format!("{t}: drift not measured (no earlier model to compare this data with)"));
        };
        let worst = r.features.iter().max_by(|a, b| a.psi.total_cmp(&b.psi))?;
        let warned: Vec<String> = r.features.iter().filter(|f| f.level != Level::Ok).map(|f| format!("{} {:.3}", f.name, f.psi)).collect();
        let named = reference.named();
        Some(match &reference.accepted_by {
            Some(by) if !warned.is_empty() => format!(
                "{t}: drift vs {named}: PSI {} (warn at {}, fail above {}); accepted: model {by} was trained on this data",
                warned.join(", "),
                r.warn_psi,
                r.max_psi
            ),
            _ if warned.is_empty() => format!("{t}: drift ok vs {named} (max PSI {:.3}, {})", worst.psi, worst.name),
            _ => format!("{t}: drift WARNING vs {named}: PSI {} (warn at {}, fail above {})", warned.join(", "), r.warn_psi, r.max_psi),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_status_keeps_its_json_and_unknown_ones_are_refused() {
        let report = Report {
            format: FORMAT.into(),
            tenant: "Tenant_A".into(),
            status: DriftStatus::NoReference,
            reference: None,
            current: Current { feature_file: "f.parquet".into(), feature_file_blake3: "0".repeat(64), feature_set_version: "v1.0".into(), rows: 3 },
            bins: 10,
            epsilon: 1e-4,
            warn_psi: 0.1,
            max_psi: 0.25,
            features: vec![],
        };
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains(r#""status":"no_reference""#), "{text}");
        assert_eq!(Report::from_json_bytes(text.as_bytes(), "r.json").unwrap(), report);
        let e = Report::from_json_bytes(text.replace("no_reference", "fine").as_bytes(), "r.json").unwrap_err().to_string();
        assert!(e.starts_with("r.json: not a valid dagrun-drift/1 report: unknown variant `fine`"), "{e}");
        assert_eq!(serde_json::to_string(&DriftStatus::Accepted).unwrap(), "\"accepted\"");
        for (l, s) in [(Level::Ok, "ok"), (Level::Warn, "warn"), (Level::Fail, "fail")] {
            assert_eq!(DriftStatus::from(l).as_str(), s);
            assert_eq!(serde_json::to_string(&DriftStatus::from(l)).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(serde_json::to_string(&ReadFrom::Cache).unwrap(), "\"cache\"");
    }

    #[test]
    fn with_params_are_checked_by_key() {
        let with = |v: Value| v.as_object().unwrap().clone();
        let ok = with(json!({"model": "models/A/model.json", "current": "fs/A/v1.0", "output": "r.json", "max_psi": "0.3", "tenant": "A"}));
        let d = Drift.declare(&ok, Some("A")).unwrap();
        assert_eq!(d.deps[0], "fs/A/v1.0/features.parquet");
        let mut bad = ok.clone();
        bad.insert("max_pci".into(), json!(0.3));
        assert_eq!(
            Drift.declare(&bad, Some("A")).unwrap_err(),
            StageError::at_key("max_pci", "unknown `with.max_pci`; this kind takes: model, current, output, max_psi, warn_psi, tenant")
        );
        let mut bad = ok.clone();
        bad.insert("warn_psi".into(), json!([0.1]));
        assert_eq!(Drift.declare(&bad, Some("A")).unwrap_err(), StageError::at_key("warn_psi", "`with.warn_psi` must be a number, not [0.1]"));
        let mut bad = ok;
        bad.insert("warn_psi".into(), json!(0.5));
        assert_eq!(
            Drift.declare(&bad, Some("A")).unwrap_err(),
            StageError::at_key("warn_psi", "`with.warn_psi` = 0.5: must be positive and at most max_psi (0.3)")
        );
    }
}
