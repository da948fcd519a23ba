//! Run records: `runs/RUN_ID.json`, one per `dagrun run`, written atomically
//! when the run ends. The `stages` items `{stage, status, seconds}` are a
//! stable interface for scripts. Fields are only ever added, as optional
//! (`serde(default)`), so records of older versions still read; readers that
//! draw from a record (`report`) check its values (`validate_timing`).

use crate::util::atomic::{Durability, write_json_with};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a stage ended in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Executed.
    Ran,
    /// Up to date: nothing done.
    Cached,
    /// Outputs copied back from the cache without executing.
    Restored,
    Failed,
    /// Not attempted because an upstream stage failed (or the run was interrupted).
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::Restored => "restored",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// One stage in a run record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    pub status: Status,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Output path -> blake3.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Why it ran (or was restored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// For `ran`: whether any output differs from the previous execution
    /// (false = early cutoff: dependents stay cached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_changed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub facts: Map<String, Value>,
    /// CPU time (user+sys) of the stage, where measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// The Slurm job that ran the stage's work (`executor: slurm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
    /// When the stage started and ended, in seconds since the run started
    /// (absent in records of older versions and for stages never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_s: Option<f64>,
    /// The scheduler slot (0 .. jobs-1) that ran the stage: stages sharing a
    /// slot never overlap in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
}

impl StageRecord {
    /// A record with nothing but a stage name and a status.
    pub fn new(stage: &str, status: Status) -> StageRecord {
        StageRecord {
            stage: stage.to_string(),
            status,
            seconds: 0.0,
            key: None,
            outputs: BTreeMap::new(),
            reasons: vec![],
            outputs_changed: None,
            error: None,
            facts: Map::new(),
            cpu_seconds: None,
            slurm_job: None,
            start_s: None,
            end_s: None,
            worker: None,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline: String,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
    /// "ok", "failed" or "interrupted".
    pub status: String,
    pub exit_code: i32,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub forced: Vec<String>,
    pub stages: Vec<StageRecord>,
    /// The pipeline's params as this run resolved them (after `-p` overrides).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// `-j`: how many stages could run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<u32>,
    /// OpenLineage delivery: `{file, events, endpoint?, delivered?, rejected?,
    /// pending, error?}` (`pending` = events spooled for the next run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openlineage: Option<Value>,
}

/// A new, sortable, unique run id: `YYYYMMDD-HHMMSS-mmm-XXXX`.
pub fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&now.timestamp_nanos_opt().unwrap_or(0).to_le_bytes());
    format!("{}-{}", now.format("%Y%m%d-%H%M%S-%3f"), &h.finalize().to_hex()[..4])
}

pub fn runs_dir(workspace: &Path) -> PathBuf {
    workspace.join("runs")
}

pub fn write(workspace: &Path, rec: &RunRecord) -> Result<PathBuf> {
    let p = runs_dir(workspace).join(format!("{}.json", rec.run_id));
    write_json_with(&p, rec, Durability::Full)?;
    Ok(p)
}

/// All run records, oldest first (unreadable files are skipped).
pub fn list(workspace: &Path) -> Vec<RunRecord> {
    let mut v: Vec<RunRecord> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(runs_dir(workspace)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json")
                && !name.starts_with('.')
                && let Some(r) = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice(&b).ok())
            {
                v.push(r);
            }
        }
    }
    v.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    v
}

/// One run by id (or unique id prefix, or `last`).
pub fn find(workspace: &Path, id: &str) -> Result<RunRecord> {
    let all = list(workspace);
    if id == "last" || id == "latest" {
        return all.into_iter().last().context("no runs recorded yet");
    }
    let matches: Vec<RunRecord> = all.into_iter().filter(|r| r.run_id.starts_with(id)).collect();
    match matches.len() {
        0 => Err(crate::error::config(format!("no run with id {id:?} under {}", runs_dir(workspace).display()))),
        1 => Ok(matches.into_iter().next().unwrap()),
        n => Err(crate::error::config(format!("{n} runs match {id:?}; give more of the id"))),
    }
}

impl RunRecord {
    /// Check the timing fields a reader relies on: finite, non-negative,
    /// `start_s ≤ end_s`, and a worker slot below `jobs` when both are known.
    /// `origin` is named in the error.
    pub fn validate_timing(&self, origin: &str) -> Result<()> {
        for s in &self.stages {
            let ok = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v >= 0.0);
            if !(ok(s.start_s) && ok(s.end_s) && s.seconds.is_finite() && s.seconds >= 0.0) {
                anyhow::bail!("{origin}: stage {}: timing values must be finite and ≥ 0", s.stage);
            }
            if let (Some(a), Some(b)) = (s.start_s, s.end_s)
                && b < a
            {
                anyhow::bail!("{origin}: stage {}: end_s {b} is before start_s {a}", s.stage);
            }
            if let (Some(w), Some(j)) = (s.worker, self.jobs)
                && w >= j
            {
                anyhow::bail!("{origin}: stage {}: worker {w} is not below jobs {j}", s.stage);
            }
        }
        Ok(())
    }
}
