//! Per-stage state and the action cache.
//!
//! - `.dagrun/state/STAGE.json`: the last completed execution of each stage
//!   (its key, ingredients, output hashes). One small file per stage, written
//!   atomically as each stage finishes, so saving state costs O(1) per stage.
//! - `.dagrun/cache/actions/KEY.json`: every execution ever completed, by cache
//!   key: a key seen before restores its outputs without recomputing.

use super::fingerprint::Ingredients;
use crate::util::atomic::write_json_atomic;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One output of a completed execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub hash: String,
    pub size: u64,
    #[serde(default)]
    pub dir: bool,
    /// Plaintext PII: not in the cache, deleted after use.
    #[serde(default)]
    pub sensitive: bool,
    /// A copy is in the content-addressed store.
    #[serde(default)]
    pub cached: bool,
}

/// A completed execution of a stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageState {
    pub stage: String,
    pub key: String,
    pub ingredients: Ingredients,
    /// Pipeline params the stage referenced, with their values then.
    #[serde(default)]
    pub param_refs: BTreeMap<String, Value>,
    pub outputs: BTreeMap<String, OutputRecord>,
    pub run_id: String,
    pub finished_at: String,
    pub seconds: f64,
    /// PII-free facts the stage reported (rows, AUC, ...).
    #[serde(default)]
    pub facts: Map<String, Value>,
}

/// Paths of the state and action-cache files.
pub struct StateStore {
    state_dir: PathBuf,
    actions_dir: PathBuf,
}

impl StateStore {
    pub fn new(dagrun_dir: &Path) -> StateStore {
        StateStore { state_dir: dagrun_dir.join("state"), actions_dir: dagrun_dir.join("cache").join("actions") }
    }

    fn stage_file(&self, stage: &str) -> PathBuf {
        self.state_dir.join(format!("{stage}.json"))
    }

    /// The last completed execution of a stage (a torn or unreadable file
    /// counts as none: the stage reruns).
    pub fn get(&self, stage: &str) -> Option<StageState> {
        let b = std::fs::read(self.stage_file(stage)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn put(&self, st: &StageState) -> Result<()> {
        write_json_atomic(&self.stage_file(&st.stage), st)
    }

    pub fn remove(&self, stage: &str) {
        let _ = std::fs::remove_file(self.stage_file(stage));
    }

    /// An earlier execution with this cache key.
    pub fn action(&self, key: &str) -> Option<StageState> {
        let b = std::fs::read(self.actions_dir.join(format!("{key}.json"))).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Record `st` in the action cache: a hard link to the stage's state file
    /// just written (same bytes, no second write), else an unsynced copy
    /// (entries are verified by parsing; a lost one only costs a recomputation).
    pub fn put_action(&self, st: &StageState) -> Result<()> {
        let dest = self.actions_dir.join(format!("{}.json", st.key));
        if dest.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.actions_dir)?;
        let state_file = self.stage_file(&st.stage);
        // Called right after `put(st)` by the only thread running this stage.
        if std::fs::hard_link(&state_file, &dest).is_ok() {
            return Ok(());
        }
        crate::util::atomic::write_json_with(&dest, st, crate::util::atomic::Durability::Verified)
    }

    /// Every stage state on disk.
    pub fn all(&self) -> Vec<StageState> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.state_dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".json") {
                    if let Some(s) = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice::<StageState>(&b).ok()) {
                        v.push(s);
                    }
                }
            }
        }
        v.sort_by(|a, b| a.stage.cmp(&b.stage));
        v
    }

    /// Every action-cache entry (for `verify` and model look-ups).
    pub fn all_actions(&self) -> Vec<StageState> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.actions_dir) {
            for e in rd.flatten() {
                if let Some(s) = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice::<StageState>(&b).ok()) {
                    v.push(s);
                }
            }
        }
        v
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    pub fn actions_dir(&self) -> &Path {
        &self.actions_dir
    }
}
