//! Per-stage state and the action cache: authenticated records.
//!
//! - `.dagrun/state/STAGE.json`: the last completed execution of each stage
//!   (its key, ingredients, output hashes). One small file per stage, written
//!   atomically as each stage finishes, so saving state costs O(1) per stage.
//! - `.dagrun/cache/actions/KEY.json`: every execution ever completed, by cache
//!   key: a key seen before restores its outputs without recomputing.
//!
//! Both are MAC'd records (`workspace::record`, domain `STAGE_RECORD`; an
//! action entry is a hard link to the state file just written, same bytes).
//! A record is trusted only if its MAC holds, every hash in it is a
//! [`ContentHash`], and it is where it claims to be (a state file names its
//! own stage; an action entry its own key). Anything else is
//! [`Loaded::Invalid`]: the engine recomputes, `status` says why, `verify`
//! reports it.
//!
//! # Durability (what a crash can leave)
//! Records are written atomically (temporary file, then rename) but not
//! fsynced one by one: a run makes the records and outputs it wrote durable
//! in one batch at its end (`util::atomic::sync_files`: writeback of all
//! started, then the fsyncs issued together, which the file system groups
//! into a few commits), and only then
//! writes the hash memo and the run record. Cache objects are verified by
//! hash on every use and never fsynced (as before). Why that is as safe as an
//! fsync per record:
//! - A killed process (SIGKILL, OOM, panic) loses nothing the kernel has:
//!   each record is old or new, never torn (the `faults::` tests).
//! - A power cut or kernel crash during a run can lose records written since
//!   the run began, roll them back to an earlier version, or (on some file
//!   systems) leave them empty or torn; outputs likewise. No record is used
//!   without checks that catch each case: a lost record means the stage
//!   reruns; an empty or torn one fails its MAC and the stage reruns; a record
//!   that reached the disk while the output it names did not is caught
//!   because an output is trusted only when its content hashes to the
//!   recorded hash (read again, or vouched for by the hash memo, which is
//!   written after the sync and so describes only files already durable);
//!   then it is restored from the cache (objects are verified by hash) or
//!   the stage reruns. So a record never makes a lost or stale output count
//!   as done; the cost of a crash is at most a rerun of that run's stages.
//! - Once `dagrun run` has returned, everything it recorded is on disk.

use super::Workspace;
use super::hash::ContentHash;
use super::record::{self, RecordError};
use crate::crypto::IntegrityKey;
use crate::util::atomic::{Durability, write_atomic_with};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything that goes into a cache key (the rules and the key itself are
/// in `engine::fingerprint`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredients {
    pub kind: String,
    pub kind_version: u32,
    pub params: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub inputs: BTreeMap<String, String>,
    pub outs: Vec<String>,
    #[serde(default)]
    pub extras: BTreeMap<String, String>,
}

/// One output of a completed execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub hash: ContentHash,
    pub size: u64,
    #[serde(default)]
    pub dir: bool,
    /// Plaintext PII: not in the cache, deleted after use.
    #[serde(default)]
    pub sensitive: bool,
    /// A copy is in the content-addressed store.
    #[serde(default)]
    pub cached: bool,
    /// A file output's execute bit, restored with it and checked as part of
    /// it (a folder's files carry theirs in its listing). None in records
    /// made before 2026-12-07: not checked, restored without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<bool>,
}

/// Digests of a stage's `cmd:` and `with:` as written, before params were
/// put in. Not in the cache key (the key sees the resolved text): they let
/// an explanation name an edit of the command or of `with:` that came with a
/// change of a param they use, which the resolved text cannot tell apart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Written {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<ContentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<ContentHash>,
}

impl Written {
    pub fn is_empty(&self) -> bool {
        self.cmd.is_none() && self.with.is_none()
    }
}

/// A completed execution of a stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageState {
    pub stage: String,
    pub key: ContentHash,
    pub ingredients: Ingredients,
    /// Pipeline params the stage referenced, with their values then.
    #[serde(default)]
    pub param_refs: BTreeMap<String, Value>,
    /// Its `cmd:` and `with:` as written (absent in records of dagrun before
    /// 2026-12-07).
    #[serde(default, skip_serializing_if = "Written::is_empty")]
    pub written: Written,
    pub outputs: BTreeMap<String, OutputRecord>,
    pub run_id: String,
    pub finished_at: String,
    pub seconds: f64,
    /// PII-free facts the stage reported (rows, AUC, ...).
    #[serde(default)]
    pub facts: Map<String, Value>,
}

/// A record as read from disk.
#[derive(Debug)]
pub enum Loaded<T> {
    /// No such file.
    Missing,
    /// Present, authenticated, well-formed.
    Valid(T),
    /// Present but not to be trusted (why, naming the file).
    Invalid(RecordError),
}

impl<T> Loaded<T> {
    pub fn valid(self) -> Option<T> {
        match self {
            Loaded::Valid(t) => Some(t),
            _ => None,
        }
    }
}

/// The largest state or action record read (they hold hashes and facts).
const MAX_RECORD_BYTES: u64 = 16 << 20;

/// The state and action-cache records of a workspace.
pub struct StateStore {
    ws: Workspace,
    state_dir: PathBuf,
    actions_dir: PathBuf,
    key: Option<Arc<IntegrityKey>>,
}

impl StateStore {
    /// `key`: the workspace integrity key (None: nothing verifies and nothing
    /// can be written — a workspace without a master key yet).
    pub fn new(ws: &Workspace, key: Option<Arc<IntegrityKey>>) -> StateStore {
        StateStore { state_dir: ws.state_dir(), actions_dir: ws.actions_dir(), ws: ws.clone(), key }
    }

    /// The workspace integrity key records are verified and sealed with.
    pub fn integrity_key(&self) -> Option<&IntegrityKey> {
        self.key.as_deref()
    }

    /// The same key, shared (for what seals records of its own with it: the
    /// OpenLineage spool and open-run marks).
    pub fn shared_integrity_key(&self) -> Option<Arc<IntegrityKey>> {
        self.key.clone()
    }

    /// Where a stage's record lives (also for the run's end-of-run sync).
    pub fn record_path(&self, stage: &str) -> PathBuf {
        self.state_dir.join(format!("{stage}.json"))
    }

    fn shown(&self, p: &Path) -> String {
        self.ws.rel(p)
    }

    /// Read and check one record file.
    pub fn read_record(&self, path: &Path) -> Loaded<StageState> {
        self.read_record_bytes(path).0
    }

    /// [`Self::read_record`], with the bytes it checked (empty when none
    /// could be read): a caller that goes on to use the bytes (`push`) uses
    /// exactly what was checked, read once.
    pub fn read_record_bytes(&self, path: &Path) -> (Loaded<StageState>, Vec<u8>) {
        let bytes = match crate::util::read_capped(path, MAX_RECORD_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Loaded::Missing, Vec::new()),
            Err(e) => return (Loaded::Invalid(RecordError::Unreadable { file: self.shown(path), why: e.to_string() }), Vec::new()),
        };
        let loaded = match record::open::<StageState>(self.key.as_deref(), record::STAGE_RECORD, &bytes, &self.shown(path)) {
            Ok(st) => Loaded::Valid(st),
            Err(e) => Loaded::Invalid(e),
        };
        (loaded, bytes)
    }

    /// The last completed execution of a stage, checked.
    pub fn load(&self, stage: &str) -> Loaded<StageState> {
        let p = self.record_path(stage);
        match self.read_record(&p) {
            Loaded::Valid(st) if st.stage != stage => Loaded::Invalid(RecordError::BadField {
                file: self.shown(&p),
                field: "stage".into(),
                why: "names another stage (the record was moved or copied outside dagrun)".into(),
            }),
            other => other,
        }
    }

    /// The last completed execution of a stage, if it is trustworthy
    /// (anything else counts as none: the stage reruns).
    pub fn get(&self, stage: &str) -> Option<StageState> {
        self.load(stage).valid()
    }

    fn seal(&self, st: &StageState) -> Result<Vec<u8>> {
        let Some(k) = &self.key else { bail!("cannot record stage {}: no workspace integrity key (internal error)", st.stage) };
        record::seal(k, record::STAGE_RECORD, st)
    }

    /// Write a stage's record (atomically; durable at the run's end sync:
    /// see the module comment).
    pub fn put(&self, st: &StageState) -> Result<()> {
        write_atomic_with(&self.record_path(&st.stage), &self.seal(st)?, Durability::Verified)
    }

    pub fn remove(&self, stage: &str) {
        let _ = std::fs::remove_file(self.record_path(stage));
    }

    fn action_file(&self, key: &ContentHash) -> PathBuf {
        self.actions_dir.join(format!("{key}.json"))
    }

    /// An earlier execution with this cache key, checked.
    pub fn load_action(&self, key: &ContentHash) -> Loaded<StageState> {
        let p = self.action_file(key);
        match self.read_record(&p) {
            Loaded::Valid(st) if &st.key != key => Loaded::Invalid(RecordError::BadField {
                file: self.shown(&p),
                field: "key".into(),
                why: "is not the key the entry is filed under (moved or copied outside dagrun)".into(),
            }),
            other => other,
        }
    }

    /// An earlier execution with this cache key, if trustworthy.
    pub fn action(&self, key: &ContentHash) -> Option<StageState> {
        self.load_action(key).valid()
    }

    /// Record `st`, a stage that just ran under its key, in the action cache:
    /// a hard link to the stage's state file just written (same bytes, no
    /// second write). An entry already there is replaced (atomically): this
    /// run is the latest word on what the key makes (`--force`, or a run whose
    /// entry named outputs no longer in the cache); a kept older entry would
    /// restore what an earlier run made, whatever this one made.
    pub fn put_action(&self, st: &StageState) -> Result<()> {
        let dest = self.action_file(&st.key);
        let state_file = self.record_path(&st.stage);
        // Called right after `put(st)` by the only thread running this stage.
        match std::fs::hard_link(&state_file, &dest) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Linked beside it and renamed over it: no second write.
                let tmp = crate::util::atomic::temp_path_for(&dest);
                if std::fs::hard_link(&state_file, &tmp).is_ok() {
                    if std::fs::rename(&tmp, &dest).is_ok() {
                        return Ok(());
                    }
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            Err(_) => {
                std::fs::create_dir_all(&self.actions_dir)?;
                if std::fs::hard_link(&state_file, &dest).is_ok() {
                    return Ok(());
                }
            }
        }
        write_atomic_with(&dest, &self.seal(st)?, Durability::Verified)
    }

    /// Install an action entry made elsewhere (a record pulled from a
    /// remote cache, validated by the caller): sealed under this workspace's
    /// integrity key and written atomically. A valid local entry is kept.
    pub fn import_action(&self, st: &StageState) -> Result<()> {
        if matches!(self.load_action(&st.key), Loaded::Valid(_)) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.actions_dir)?;
        write_atomic_with(&self.action_file(&st.key), &self.seal(st)?, Durability::Verified)
    }

    fn scan_dir(&self, dir: &Path) -> Vec<(PathBuf, Loaded<StageState>)> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".json") || crate::util::atomic::is_temp_name(&name) {
                    continue;
                }
                let p = e.path();
                let l = self.read_record(&p);
                v.push((p, l));
            }
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every state file with what reading it found (for `verify`).
    pub fn scan_states(&self) -> Vec<(PathBuf, Loaded<StageState>)> {
        self.scan_dir(&self.state_dir)
            .into_iter()
            .map(|(p, l)| {
                let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let l = match l {
                    Loaded::Valid(st) if st.stage != stem => Loaded::Invalid(RecordError::BadField {
                        file: self.shown(&p),
                        field: "stage".into(),
                        why: "names another stage (moved or copied outside dagrun)".into(),
                    }),
                    other => other,
                };
                (p, l)
            })
            .collect()
    }

    /// Every action-cache entry with what reading it found (for `verify`).
    pub fn scan_actions(&self) -> Vec<(PathBuf, Loaded<StageState>)> {
        self.scan_dir(&self.actions_dir)
            .into_iter()
            .map(|(p, l)| {
                let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let l = match l {
                    Loaded::Valid(st) if st.key.as_str() != stem => Loaded::Invalid(RecordError::BadField {
                        file: self.shown(&p),
                        field: "key".into(),
                        why: "is not the key the entry is filed under".into(),
                    }),
                    other => other,
                };
                (p, l)
            })
            .collect()
    }

    /// Every trustworthy stage state on disk.
    pub fn all(&self) -> Vec<StageState> {
        let mut v: Vec<StageState> = self.scan_states().into_iter().filter_map(|(_, l)| l.valid()).collect();
        v.sort_by(|a, b| a.stage.cmp(&b.stage));
        v
    }

    /// Every trustworthy action-cache entry (model look-ups).
    pub fn all_actions(&self) -> Vec<StageState> {
        self.scan_actions().into_iter().filter_map(|(_, l)| l.valid()).collect()
    }

    /// The trustworthy record of the stage that produced a workspace-relative
    /// path, with that output's record.
    pub fn producer_of(&self, rel: &str) -> Option<(StageState, OutputRecord)> {
        self.all().into_iter().find_map(|s| {
            let o = s.outputs.get(rel).cloned()?;
            Some((s, o))
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    /// The workspace these records belong to.
    pub fn workspace(&self) -> &Workspace {
        &self.ws
    }
    pub fn actions_dir(&self) -> &Path {
        &self.actions_dir
    }
}
