//! `uses: train` — one logistic-regression model per tenant (spec §7).
//!
//! Reads the tenant's verified feature version from the store, splits by
//! customer (`model::split`), scales on the train split, fits the
//! scikit-learn-equivalent objective (`model::logistic`, linfa-logistic with
//! alpha = 1/C), scores the test split, and refuses to promote a model whose
//! test AUC is below `min_auc`. The artifact is self-describing JSON with
//! deterministic bytes; its `model_version` is derived from the stage's cache
//! key, i.e. from exactly the inputs and params that made it.
//! Beside it, `….eval.json` (`model::evaluation`) holds the hold-out ROC,
//! calibration and confusion aggregates the report draws. Every model is
//! registered in the model registry; `promote: auto` (default) makes it the
//! tenant's champion, `promote: manual` leaves that to `dagrun models promote`.

use super::params::{self, Number, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::data::schema;
use crate::model::ModelArtifact;
use crate::util::atomic::write_atomic;
use anyhow::{Context, Result, bail};
use arrow_array::{Array, BooleanArray};
use serde_json::{Map, Value, json};

pub struct Train;

/// `with.promote`: `auto` (default: a model that passes `min_auc` becomes the
/// tenant's champion) or `manual` (registered only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Promote {
    #[default]
    Auto,
    Manual,
}

impl<'de> serde::Deserialize<'de> for Promote {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == "auto" => Ok(Promote::Auto),
            Value::String(s) if s == "manual" => Ok(Promote::Manual),
            v => Err(serde::de::Error::custom(format!("= {v}: use auto or manual"))),
        }
    }
}

/// `with:` of `uses: train`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainWith {
    /// The feature-store version directory trained on.
    pub store: Text,
    /// Inverse regularisation strength (> 0).
    #[serde(rename = "C")]
    pub c: Number,
    /// Test AUC below this fails the stage (0..=1).
    pub min_auc: Number,
    pub output: Text,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
    #[serde(default)]
    pub promote: Promote,
}

impl KindDecl for Train {
    fn name(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 2: linfa fits a subsample of at most 2,000 rows (was 10,000), which
        // moves the models' last bits (model::logistic::LINFA_MAX_ROWS).
        2
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: TrainWith = params::parse(with)?;
        per_tenant("train", tenant)?;
        let c = p.c.0;
        if !c.is_finite() || c <= 0.0 {
            return Err(StageError::at_key("C", format!("`with.C` = {c}: C must be a positive number")));
        }
        let min_auc = p.min_auc.0;
        if !(0.0..=1.0).contains(&min_auc) {
            return Err(StageError::at_key("min_auc", format!("`with.min_auc` = {min_auc}: must be between 0 and 1")));
        }
        let dir = &p.store.0;
        Ok(Declared {
            deps: vec![format!("{dir}/{}", crate::store::FEATURES_FILE), format!("{dir}/{}", crate::store::MANIFEST_FILE)],
            outs: vec![
                DeclaredOut { path: p.output.0.clone(), sensitive: false },
                // Hold-out curves for the model card (`model::evaluation`).
                DeclaredOut { path: crate::model::evaluation::path_for(&p.output), sensitive: false },
            ],
            params: params::keep(p),
        })
    }
}

impl StageKind for Train {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let p: &TrainWith = ctx.params()?;
        let (c, min_auc) = (p.c.0, p.min_auc.0);
        let dir = ctx.deps[0].parent().context("store dir")?;
        let t0 = std::time::Instant::now();
        // The training matrix is held in memory: the solver needs all rows.
        let key = ctx.services.integrity_key()?;
        // The engine hashed the feature file for this run's key (no second
        // hash); the tenant and token columns are not decoded.
        let (manifest, batches) = crate::store::open_verified_with(dir, &key, ctx.input_hash(0), Some(&crate::scoring::MODEL_COLUMNS))?;
        if manifest.tenant != tenant {
            bail!(
                "the feature store {} holds tenant {}'s features, not tenant {tenant}'s: refusing to train tenant {tenant}'s model on them; fix `with.store`",
                ctx.rel(dir),
                if crate::data::is_valid_tenant_id(&manifest.tenant) { manifest.tenant.clone() } else { crate::data::show_tenant(&manifest.tenant) }
            );
        }
        // Split by customer batch by batch: only the training matrix and the
        // test rows are held, never a full copy of the tenant's rows beside them.
        let mut data = crate::model::train::SplitData::new(tenant, usize::try_from(manifest.rows).unwrap_or(0).min(1 << 27));
        let mut rows = 0usize;
        // Feature columns of one batch, reused (cleared) batch after batch.
        let mut cols: [Vec<f64>; 5] = Default::default();
        for batch in batches {
            let batch = batch?;
            let labels = batch
                .column_by_name(schema::CONVERTED)
                .context("the feature version has no Converted label: cannot train")?
                .as_any()
                .downcast_ref::<BooleanArray>()
                .context("Converted must be boolean")?;
            if labels.null_count() > 0 {
                bail!("the feature version has rows without a Converted label: cannot train");
            }
            let ids = crate::scoring::stored_ids(&batch)?;
            cols.iter_mut().for_each(Vec::clear);
            crate::scoring::extend_feature_columns(&mut cols, &batch)?;
            data.push_columns(ids, &cols, |i| labels.value(i))?;
            rows += ids.len();
        }
        tracing::debug!("{tenant}: read and split {rows} rows in {:.3}s", t0.elapsed().as_secs_f64());
        let outcome = crate::model::train::train_split(data, c)?;
        tracing::debug!("{tenant}: trained in {:.3}s", t0.elapsed().as_secs_f64());
        let m = &outcome.metrics;
        let model_version = format!("{tenant}-{}", &ctx.cache_key[..12]);
        let mut facts = Map::new();
        facts.insert("model_version".into(), model_version.clone().into());
        facts.insert("auc".into(), json!(m.auc));
        facts.insert("log_loss".into(), json!(m.log_loss));
        facts.insert("accuracy".into(), json!(m.accuracy));
        facts.insert("rows_train".into(), m.rows_train.into());
        facts.insert("rows_test".into(), m.rows_test.into());
        if m.auc < min_auc {
            // The failed record keeps the AUC (and the version the model
            // would have had): the metrics' AUC-below-gate alert reads it.
            facts.insert("promoted".into(), false.into());
            return Err(super::FailedWithFacts {
                message: format!(
                    "tenant {tenant}: test AUC {:.4} is below min_auc {min_auc}: the model is not saved, registered or promoted (the previous model, if any, stays in place)",
                    m.auc
                ),
                facts,
            }
            .into());
        }
        let feature_rel = ctx.rel(&ctx.deps[0]).into_owned();
        let artifact = ModelArtifact {
            format: crate::model::artifact::FORMAT.to_string(),
            tenant: tenant.to_string(),
            model_version: model_version.clone(),
            feature_set_version: manifest.feature_set_version.clone(),
            feature_names: crate::features::v1::FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            feature_file: feature_rel.clone(),
            feature_file_hash: manifest.file_blake3.clone(),
            feature_stats: manifest.stats,
            as_of: manifest.as_of.clone(),
            scaler: outcome.scaler.clone(),
            coefficients: outcome.fitted.coef.clone(),
            intercept: outcome.fitted.intercept,
            c,
            solver: outcome.fitted.solver_json(),
            metrics: outcome.metrics.clone(),
            lineage: json!({
                "cache_key": ctx.cache_key,
                "inputs": ctx.input_hashes,
                "feature_lineage_hash": manifest.lineage.lineage_hash,
                "params": {"C": c, "min_auc": min_auc},
                "code_version": format!("train/{}; model {}", self.version(), crate::model::artifact::FORMAT),
            }),
            mac: None,
        };
        let mut artifact = artifact;
        artifact.validate(&feature_rel)?;
        artifact.seal(&key)?;
        let scores: Vec<f64> = outcome.test_scores.iter().map(|&(_, p)| p).collect();
        let eval = crate::model::evaluation::Evaluation::compute(tenant, &artifact.model_version, &outcome.test_labels, &scores);
        let bytes = artifact.to_json_bytes();
        write_atomic(&ctx.outs[0], &bytes)?;
        write_atomic(&ctx.outs[1], &eval.to_json_bytes())?;
        // Registered (and promoted) in `publish`, once the engine has stored
        // the model and just before it records the run.
        Ok(RunReport { facts })
    }

    /// Register the recorded model (the run holds the workspace lock);
    /// `promote: auto` (the default) makes it the champion, `manual` leaves
    /// the champion to `dagrun models promote`. Only once the model is
    /// written and stored in the cache: an output that cannot be written or
    /// stored (full disk, immutable folder, read-only cache) leaves the
    /// registry untouched
    /// (`faults::write_into_an_immutable_output_directory_fails_cleanly`,
    /// `faults::a_built_in_stage_failing_after_its_output_is_in_place_puts_back_the_recorded_one`).
    /// The model is read back from its output (bounded, and its MAC
    /// checked by the registry), so a Slurm job's model is registered by the
    /// run that waited for it.
    fn publish(&self, ctx: &RunCtx, report: &mut RunReport) -> Result<()> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let p: &TrainWith = ctx.params()?;
        let key = ctx.services.integrity_key()?;
        let bytes = crate::util::read_capped(&ctx.outs[0], MAX_MODEL_BYTES)
            .with_context(|| format!("cannot read the model {} to register it", ctx.rel(&ctx.outs[0])))?;
        let claimed = ModelArtifact::from_json_bytes(&bytes, &ctx.rel(&ctx.outs[0]))?;
        if claimed.tenant != tenant || report.facts.get("model_version").and_then(|v| v.as_str()) != Some(claimed.model_version.as_str()) {
            bail!("the model at {} is not the one this run of tenant {tenant}'s train stage made; it is not registered", ctx.rel(&ctx.outs[0]));
        }
        let registry = crate::registry::Registry::of_workspace(ctx.workspace);
        let entry = registry.register(&bytes, &key)?;
        let promoted = if p.promote == Promote::Auto {
            let current = registry.champion(tenant)?.map(|c| c.version);
            if current.as_deref() != Some(entry.version.as_str()) {
                let auc = report.facts.get("auc").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
                let why = format!("train: test AUC {auc:.4} >= min_auc {} (promote: auto)", p.min_auc.0);
                registry.promote(tenant, &entry.version, &format!("{} (dagrun run)", crate::registry::current_user()), &why, &key)?;
            }
            true
        } else {
            false
        };
        report.facts.insert("promoted".into(), promoted.into());
        Ok(())
    }
}

/// Largest model file read back to register it (a model is a few KiB).
const MAX_MODEL_BYTES: u64 = 64 << 20;
