//! What the report reads besides the run record, each piece checked.
//!
//! Rules:
//! - An artifact is read by the blake3 the run record gives for it: from the
//!   workspace when the file there still has that hash, else from the
//!   content-addressed cache (the object is hashed before use). A later run
//!   that replaced the file therefore does not change an older run's report.
//!   An artifact found nowhere is reported as missing, never guessed.
//! - Paths come from files: only workspace-relative paths without `..` are
//!   followed, and only 64-hex-digit hashes are looked up.
//! - Parsed strictly by the artifact's own reader (`ModelArtifact`,
//!   `Evaluation`, the drift `Report`), which rejects unknown formats.

use crate::engine::runs::{RunRecord, StageRecord, Status};
use crate::model::ModelArtifact;
use crate::model::evaluation::{self, Evaluation};
use crate::stages::drift::Report as DriftReport;
use crate::workspace::is_safe_rel as safe_rel;
use std::path::Path;

/// Where a verified artifact came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Workspace,
    Cache,
    /// The model registry's copy (`.dagrun/registry/T/versions/V.json`): a
    /// registered model outlives its cache entry (`gc` keeps champions only).
    Registry,
    /// Written by a failed stage: on disk, not recorded, not verified by a record.
    Unrecorded,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Workspace => "workspace",
            Source::Cache => "cache",
            Source::Registry => "model registry",
            Source::Unrecorded => "file on disk, written by the failed stage (not recorded)",
        }
    }
}

/// Largest artifact the report reads (a model, an evaluation, a drift report):
/// the model's own bound, which every one of them is far below.
const MAX_ARTIFACT_BYTES: u64 = crate::model::artifact::MAX_MODEL_BYTES;

/// An artifact's bytes: a regular file of at most [`MAX_ARTIFACT_BYTES`], read
/// without waiting on a FIFO (`util::read_capped`); a device or a FIFO put in
/// its place is refused, never read.
fn read_artifact(path: &Path) -> std::io::Result<Vec<u8>> {
    crate::util::read_capped(path, MAX_ARTIFACT_BYTES)
}

/// The artifact at `path` if its blake3 is `hash`.
fn read_with_hash(path: &Path, hash: &str) -> Option<Vec<u8>> {
    read_artifact(path).ok().filter(|b| blake3::hash(b).to_hex().as_str() == hash)
}

/// The bytes recorded as `rel` with blake3 `hash`, if they can be found intact.
pub fn verified_bytes(workspace: &Path, rel: &str, hash: &str) -> Option<(Vec<u8>, Source)> {
    let parsed = crate::workspace::ContentHash::parse(hash).ok().filter(|_| safe_rel(rel))?;
    if let Some(b) = read_with_hash(&workspace.join(rel), hash) {
        return Some((b, Source::Workspace));
    }
    let cas = crate::workspace::cas::Cas::read_only(&crate::workspace::Workspace::at(workspace));
    read_with_hash(&cas.object_path(&parsed), hash).map(|b| (b, Source::Cache))
}

/// One tenant's model as the run left it.
pub struct ModelCard {
    pub stage: String,
    pub status: Status,
    pub tenant: String,
    /// The model and its evaluation, or why they are not shown.
    pub model: std::result::Result<(ModelArtifact, Source), String>,
    pub evaluation: std::result::Result<Evaluation, String>,
    /// The registry's champion version for the tenant, when there is a registry entry.
    pub champion: Option<String>,
}

/// The model outputs of a stage record: `X.json` with `X.eval.json` beside it.
fn model_outputs(s: &StageRecord) -> Option<(&String, &String, Option<(&String, &String)>)> {
    s.outputs.iter().find_map(|(p, h)| {
        if p.ends_with(".eval.json") || !p.ends_with(".json") {
            return None;
        }
        let ev = s.outputs.get_key_value(&evaluation::path_for(p));
        (ev.is_some() || s.facts.contains_key("model_version")).then_some((p, h, ev))
    })
}

/// Model cards for the record's train stages (`kind_of` names each stage's kind).
pub fn model_cards(workspace: &Path, rec: &RunRecord, kind_of: &dyn Fn(&str) -> Option<String>) -> Vec<ModelCard> {
    let mut cards = Vec::new();
    for s in &rec.stages {
        let is_train = match kind_of(&s.stage) {
            Some(k) => k == "train",
            None => s.facts.contains_key("model_version"),
        };
        if !is_train {
            continue;
        }
        let tenant = tenant_label(&s.stage);
        let Some((p, h, ev)) = model_outputs(s) else {
            let why = match s.status {
                Status::Failed => format!("train failed: {}", s.error.as_deref().unwrap_or("unknown error")),
                Status::Skipped => format!("train skipped: {}", s.error.as_deref().unwrap_or("")),
                _ => "the run record names no model output".into(),
            };
            cards.push(ModelCard { stage: s.stage.clone(), status: s.status, tenant, model: Err(why.clone()), evaluation: Err(why), champion: None });
            continue;
        };
        let registered = || {
            // Both from the run record (untrusted): names, never a path.
            let version = s.facts.get("model_version")?.as_str().filter(|v| crate::registry::is_valid_version(v))?;
            if !crate::data::is_valid_tenant_id(&tenant) {
                return None;
            }
            let path = crate::registry::Registry::of_workspace(workspace).artifact_path(&tenant, version);
            read_with_hash(&path, h).map(|b| (b, Source::Registry))
        };
        let model = match verified_bytes(workspace, p, h).or_else(registered) {
            Some((b, src)) => ModelArtifact::from_json_bytes(&b, p).map(|a| (a, src)).map_err(|e| format!("{e:#}")),
            None => Err(format!("{p} (blake3 {}…) is neither in the workspace, nor in the cache, nor in the model registry", crate::workspace::hash::short(h))),
        };
        let evaluation = match ev {
            Some((ep, eh)) => match verified_bytes(workspace, ep, eh) {
                Some((b, _)) => Evaluation::from_json_bytes(&b, ep).map_err(|e| format!("{e:#}")),
                None => Err(format!("{ep} is neither in the workspace nor in the cache")),
            },
            None => Err("this model was trained by an older dagrun that wrote no evaluation file; rerun train (`--force train`) for the curves".into()),
        };
        let tenant = model.as_ref().map(|(a, _)| a.tenant.clone()).unwrap_or(tenant);
        let champion = crate::engine::run_metrics::champion_version(&workspace.join(crate::engine::DAGRUN_DIR), &tenant, None);
        cards.push(ModelCard { stage: s.stage.clone(), status: s.status, tenant, model, evaluation, champion });
    }
    cards
}

/// The label of a stage's tenant in the report: `NAME[TENANT]` → TENANT
/// (`pipeline::tenants::tenant_of_stage`'s rule), else the stage's name.
pub fn tenant_label(stage: &str) -> String {
    crate::pipeline::tenants::tenant_of_stage(stage).ok().flatten().unwrap_or_else(|| stage.to_string())
}

/// One drift stage's report.
pub struct DriftEntry {
    pub stage: String,
    pub status: Status,
    pub report: std::result::Result<(DriftReport, Source), String>,
}

/// Drift reports of the record's drift stages. `declared_output` gives the
/// report path a stage declares (for a failed stage, whose outputs are not
/// recorded, the file on disk is shown and labelled as such).
pub fn drift_entries(
    workspace: &Path,
    rec: &RunRecord,
    kind_of: &dyn Fn(&str) -> Option<String>,
    declared_output: &dyn Fn(&str) -> Option<String>,
) -> Vec<DriftEntry> {
    let mut out = Vec::new();
    for s in &rec.stages {
        let is_drift = match kind_of(&s.stage) {
            Some(k) => k == "drift",
            None => s.facts.contains_key("drift_status"),
        };
        if !is_drift {
            continue;
        }
        let report = if let Some((p, h)) = s.outputs.iter().next() {
            match verified_bytes(workspace, p, h) {
                Some((b, src)) => DriftReport::from_json_bytes(&b, p).map(|r| (r, src)).map_err(|e| format!("{e:#}")),
                None => Err(format!("{p} is neither in the workspace nor in the cache")),
            }
        } else if s.status == Status::Failed {
            match declared_output(&s.stage).filter(|p| safe_rel(p)) {
                Some(p) => match read_artifact(&workspace.join(&p)) {
                    Ok(b) => DriftReport::from_json_bytes(&b, &p).map(|r| (r, Source::Unrecorded)).map_err(|e| format!("{e:#}")),
                    Err(_) => Err(format!("failed before writing its report: {}", s.error.as_deref().unwrap_or(""))),
                },
                None => Err(format!("failed: {}", s.error.as_deref().unwrap_or(""))),
            }
        } else {
            Err(format!("{}: {}", s.status.as_str(), s.error.as_deref().unwrap_or("no report in this run")))
        };
        out.push(DriftEntry { stage: s.stage.clone(), status: s.status, report });
    }
    out
}
