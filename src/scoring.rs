//! Scoring: raw rows in, propensity scores out (spec §8).
//!
//! The online path applies `features::v1::transform` with the *stored*
//! statistics and `as_of` of the model's feature version (never refitted on
//! the rows being scored), then the model's scaler and coefficients through
//! `ModelArtifact::predict_proba_row` — the same function the offline path
//! (feature store + model) uses, so both paths agree to the bit.
//!
//! Serving trusts nothing on disk: the model is loaded only through
//! [`load_deployed_with`] (authenticated state record, recorded hash, signed
//! artifact of the right tenant, verified feature manifest).

use crate::crypto::IntegrityKey;
use crate::data::schema;
use crate::features::v1::{self, TenantStats};
use crate::model::ModelArtifact;
use crate::model::artifact::load_verified;
use crate::store::Manifest;
use crate::workspace::cas::Cas;
use crate::workspace::state::{Loaded, StateStore};
use crate::workspace::{ContentHash, Workspace};
use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{Array, Date32Array, Float64Array, Int64Array, RecordBatch};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The score of one raw row: the v1 features with the stored statistics and
/// `as_of`, then the model. `raw_features` + `predict_proba_row` compute
/// exactly this; the HTTP server calls it per row.
#[inline]
pub fn score_row(model: &ModelArtifact, stats: &TenantStats, as_of: i32, login: i64, amount: f64, date: i32) -> f64 {
    model.predict_proba_row(&v1::transform(stats, as_of, login, amount, date).as_array())
}

/// The v1 feature vector of every row of a batch holding the raw columns
/// `Customer_ID`, `Login_Count`, `Purchase_Amount`, `Last_Visit_Date`.
pub fn raw_features(stats: &TenantStats, as_of: i32, batch: &RecordBatch) -> Result<Vec<(i64, [f64; 5])>> {
    let get = |name: &str| batch.column_by_name(name).ok_or_else(|| anyhow!("missing column {name}"));
    let ids = get(schema::CUSTOMER_ID)?.as_any().downcast_ref::<Int64Array>().context("Customer_ID must be int64")?;
    let logins = get(schema::LOGIN_COUNT)?.as_any().downcast_ref::<Int64Array>().context("Login_Count must be int64")?;
    let amounts = get(schema::PURCHASE_AMOUNT)?.as_any().downcast_ref::<Float64Array>().context("Purchase_Amount must be float64")?;
    let dates = get(schema::LAST_VISIT_DATE)?.as_any().downcast_ref::<Date32Array>().context("Last_Visit_Date must be date32")?;
    Ok((0..batch.num_rows()).map(|i| (ids.value(i), v1::transform(stats, as_of, logins.value(i), amounts.value(i), dates.value(i)).as_array())).collect())
}

/// The five feature columns of a feature-store batch, per row.
pub fn stored_features(batch: &RecordBatch) -> Result<Vec<(i64, [f64; 5])>> {
    let ids = stored_ids(batch)?;
    let mut cols: [Vec<f64>; 5] = Default::default();
    extend_feature_columns(&mut cols, batch)?;
    Ok((0..batch.num_rows()).map(|i| (ids[i], [cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i]])).collect())
}

/// The `Customer_ID` column of a feature batch.
pub fn stored_ids(batch: &RecordBatch) -> Result<&[i64]> {
    let ids = batch.column_by_name(schema::CUSTOMER_ID).ok_or_else(|| anyhow!("feature file has no column {}", schema::CUSTOMER_ID))?;
    Ok(ids.as_any().downcast_ref::<Int64Array>().context("Customer_ID must be int64")?.values())
}

/// Append the v1 feature columns of `batch` (in `FEATURE_NAMES` order, as
/// f64) to `cols`, column by column (no per-row tuples).
pub fn extend_feature_columns(cols: &mut [Vec<f64>], batch: &RecordBatch) -> Result<()> {
    for (col, name) in cols.iter_mut().zip(v1::FEATURE_NAMES) {
        let c = batch.column_by_name(name).ok_or_else(|| anyhow!("feature file has no column {name}"))?;
        if let Some(a) = c.as_any().downcast_ref::<Float64Array>() {
            col.extend_from_slice(a.values());
        } else if let Some(a) = c.as_any().downcast_ref::<Int64Array>() {
            col.extend(a.values().iter().map(|&v| v as f64));
        } else {
            bail!("feature column {name} has an unexpected type")
        }
    }
    Ok(())
}

/// The columns a model reads from a feature version: `Customer_ID`, the v1
/// features and the label (not the tenant id or the token).
pub const MODEL_COLUMNS: [&str; 7] =
    [schema::CUSTOMER_ID, v1::FEATURE_NAMES[0], v1::FEATURE_NAMES[1], v1::FEATURE_NAMES[2], v1::FEATURE_NAMES[3], v1::FEATURE_NAMES[4], schema::CONVERTED];

/// Check that a model belongs to a feature-store version.
pub fn check_model_matches_store(a: &ModelArtifact, m: &Manifest) -> Result<()> {
    if a.tenant != m.tenant {
        bail!("the model is tenant {}'s but the feature version is tenant {}'s", a.tenant, m.tenant);
    }
    if a.feature_set_version != m.feature_set_version {
        bail!("the model was trained on feature set {} but the store holds {}", a.feature_set_version, m.feature_set_version);
    }
    if a.feature_file_hash != m.file_blake3 {
        bail!(
            "the model was trained on feature file blake3 {} but the store's file is {}: retrain (dagrun run --force train)",
            &a.feature_file_hash[..a.feature_file_hash.len().min(12)],
            &m.file_blake3[..m.file_blake3.len().min(12)]
        );
    }
    Ok(())
}

/// A model ready to serve, with the statistics of the feature version it was
/// trained on.
pub struct Deployed {
    pub artifact: ModelArtifact,
    /// The feature version's fitted statistics (never refitted when serving).
    pub stats: TenantStats,
    pub model_path: PathBuf,
    pub model_hash: String,
    /// `as_of` of the feature version, as days since 1970-01-01.
    pub as_of: i32,
}

impl Deployed {
    /// Scores of the rows of a raw batch.
    pub fn score_batch(&self, batch: &RecordBatch) -> Result<Vec<(i64, f64)>> {
        Ok(raw_features(&self.stats, self.as_of, batch)?.into_iter().map(|(id, x)| (id, self.artifact.predict_proba_row(&x))).collect())
    }
}

/// The lineage record (producing stage and recorded hash) of a
/// workspace-relative path, from the authenticated state records.
pub fn recorded_hash(ws: &Workspace, key: Arc<IntegrityKey>, rel: &str) -> Option<(String, ContentHash)> {
    StateStore::new(ws, Some(key)).producer_of(rel).map(|(s, o)| (s.stage, o.hash))
}

impl Deployed {
    /// A verified registry model. It is self-describing: the statistics and
    /// `as_of` are the ones recorded in the artifact at training time.
    pub fn from_registry(m: crate::registry::LoadedModel, model_path: PathBuf) -> Result<Deployed> {
        let as_of = schema::parse_date(&m.artifact.as_of).with_context(|| format!("model {}: as_of", m.artifact.model_version))?;
        Ok(Deployed { stats: m.artifact.feature_stats, artifact: m.artifact, model_path, model_hash: m.blake3, as_of })
    }
}

/// The workspace's integrity key, opening the keyring without creating
/// anything: serving refuses a workspace with no master key.
pub fn integrity_key_of(ws: &Workspace) -> Result<Arc<IntegrityKey>> {
    let ring = crate::crypto::Keyring::open_existing(ws.root())?.ok_or_else(|| {
        anyhow!(
            "no master key in {}: dagrun cannot verify any model here (models are signed with a key derived from it); refusing to serve",
            ws.root().display()
        )
    })?;
    Ok(ring.integrity_key())
}

/// Load tenant `tenant`'s model for serving; see [`load_deployed_with`].
pub fn load_deployed(workspace: &Path, tenant: &str, version: Option<&str>) -> Result<Deployed> {
    let ws = Workspace::at(workspace);
    let key = integrity_key_of(&ws)?;
    load_deployed_with(&ws, key, tenant, version)
}

/// Load tenant `tenant`'s model: without `version`, its champion in the model
/// registry (or, for a tenant with no registered model at all, the current
/// output of its `train` stage; a tenant with registered models but no
/// champion is refused, as `serve` refuses it); with `version`, that
/// registered version (or an earlier
/// output found in the cache). Every path refuses anything not authentic: the
/// artifact's MAC must verify and name `tenant`
/// ([`crate::model::artifact::load_verified`]), and its hash must equal its
/// record (registry index, or the authenticated lineage record).
pub fn load_deployed_with(ws: &Workspace, key: Arc<IntegrityKey>, tenant: &str, version: Option<&str>) -> Result<Deployed> {
    let registry = crate::registry::Registry::of_workspace(ws.root());
    match version {
        None => {
            if let Some(m) = registry.load_champion(tenant, &key)? {
                let path = registry.artifact_path(tenant, &m.artifact.model_version);
                return Deployed::from_registry(m, path);
            }
            // Registered but never promoted (`promote: manual`): what `serve`
            // answers 503 for is not scored here with another model.
            if let Some(newest) = registry.versions(tenant)?.last() {
                return Err(crate::error::config(format!(
                    "tenant {tenant} has registered models but no champion (`promote: manual` registers without promoting): promote one with `dagrun models promote {tenant} {}` (the newest; `dagrun models list {tenant}` shows all), or name one with `--model VERSION`",
                    newest.version
                )));
            }
        }
        Some(v) => {
            if registry.versions(tenant)?.iter().any(|e| e.version == v) {
                let m = registry.load(tenant, v, &key)?;
                return Deployed::from_registry(m, registry.artifact_path(tenant, v));
            }
        }
    }
    load_trained(ws, key, tenant, version)
}

/// Load tenant `tenant`'s model from its `train` stage's output (the current
/// one, or `version` from the cache), refusing anything not authentic: the
/// train stage's state record must verify (MAC), the model file must have the
/// hash recorded there, the model itself must verify (MAC) and be `tenant`'s,
/// and its feature version must match the (verified) feature-store manifest.
pub fn load_trained(ws: &Workspace, key: Arc<IntegrityKey>, tenant: &str, version: Option<&str>) -> Result<Deployed> {
    let states = StateStore::new(ws, Some(key.clone()));
    let mut distrusted = Vec::new();
    let mut train = None;
    for (_, l) in states.scan_states() {
        match l {
            Loaded::Valid(s) if s.ingredients.kind == "train" && s.ingredients.params.get("tenant").and_then(|v| v.as_str()) == Some(tenant) => {
                train = Some(s);
                break;
            }
            Loaded::Invalid(e) if e.is_tampering() => distrusted.push(e.to_string()),
            _ => {}
        }
    }
    let train = match train {
        Some(t) => t,
        None if !distrusted.is_empty() => bail!(
            "no trustworthy model for tenant {tenant}: {}; refusing to serve. Run the pipeline to recompute it (and `dagrun verify`)",
            distrusted.join("; ")
        ),
        None => {
            // A tenant the workspace's tenant list lacks is a typo more often than an untrained one.
            if let Ok(t) = crate::pipeline::Tenants::load(ws.root())
                && t.get(tenant).is_none()
            {
                let ids: Vec<&str> = t.ids().collect();
                return Err(crate::error::config(format!("no tenant {tenant} in config/tenants.yaml (tenants: {})", ids.join(", "))));
            }
            return Err(crate::error::config(format!("no trained model for tenant {tenant} in {}: run the pipeline first", ws.root().display())));
        }
    };
    // The model is the `output` param (train also writes `….eval.json`).
    let (rel, rec) = match train.ingredients.params.get("output").and_then(|v| v.as_str()) {
        Some(out) => train.outputs.get_key_value(out),
        None => train.outputs.iter().next(),
    }
    .context("train stage recorded no model output")?;
    let model_path = ws.abs(rel);
    let bytes = crate::util::read_capped(&model_path, crate::model::artifact::MAX_MODEL_BYTES).with_context(|| format!("cannot read the model {rel}"))?;
    let hash = ContentHash::of_bytes(&bytes);
    if hash != rec.hash {
        bail!(
            "model {rel} does not match its lineage record (blake3 {} recorded by stage {}, file is {}): it was modified; refusing to serve it. Run the pipeline to restore it",
            rec.hash.short(),
            train.stage,
            hash.short()
        );
    }
    let mut artifact = load_verified(&bytes, rel, &key, tenant)?;
    let mut model_hash = hash;
    if let Some(v) = version.filter(|v| *v != artifact.model_version) {
        // An older model: find it among earlier executions in the action cache.
        let cas = Cas::read_only(ws);
        let mut found = None;
        for act in states.all_actions().into_iter().filter(|a| a.stage == train.stage) {
            if let Some(o) = act.outputs.get(rel)
                && cas.check(&o.hash)?
            {
                let b = crate::util::read_capped(&cas.object_path(&o.hash), crate::model::artifact::MAX_MODEL_BYTES)?;
                if let Ok(a) = load_verified(&b, rel, &key, tenant)
                    && a.model_version == v
                {
                    found = Some((a, o.hash.clone()));
                    break;
                }
            }
        }
        let (a, h) = found.ok_or_else(|| crate::error::config(format!("tenant {tenant} has no model version {v:?} (current: {})", artifact.model_version)))?;
        artifact = a;
        model_hash = h;
    }
    let manifest_path = ws.abs(&artifact.feature_file).with_file_name(crate::store::MANIFEST_FILE);
    let manifest = crate::store::read_manifest(manifest_path.parent().context("feature dir")?, &key)?;
    if version.is_none() {
        check_model_matches_store(&artifact, &manifest)?;
    } else if artifact.tenant != manifest.tenant || artifact.feature_set_version != manifest.feature_set_version || artifact.feature_stats != manifest.stats {
        // An older model keeps its own statistics.
        bail!("model version {} was trained on a feature version that is no longer in the store", artifact.model_version);
    }
    let as_of = schema::parse_date(&manifest.as_of)?;
    Ok(Deployed { artifact, stats: manifest.stats, model_path, model_hash: model_hash.to_string(), as_of })
}
