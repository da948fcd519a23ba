//! The engine: decides what is up to date, runs or restores stages, records
//! state, run records and lineage.
//!
//! Per stage, in dependency order:
//! 1. hash every input (memoized, see [`hashing`]) and compute the cache key
//!    ([`fingerprint`] documents exactly what goes in);
//! 2. same key as the stage's last execution and every output on disk with its
//!    recorded hash → **cached**, nothing done;
//! 3. same key but an output missing or edited by hand, or a key seen before
//!    (say a param changed and changed back) → **restored** from the
//!    content-addressed store ([`cas`]) without executing;
//! 4. otherwise → **ran**; outputs are hashed, stored in the cache and recorded
//!    in the stage's state file ([`state`]) as soon as the stage finishes.
//!    If the outputs are byte-identical to the previous execution, dependents'
//!    keys do not change and they stay cached (early cutoff).
//!
//! ## Sensitive outputs
//! An output marked `sensitive: true` (plaintext PII, e.g. the raw data before
//! `encrypt`) is never copied into the cache and is deleted when the run ends;
//! its hash is kept in the state file. A stage whose only missing output is a
//! sensitive one is still up to date, so a no-op run does no work. When a
//! consumer must rerun and the sensitive input is gone, the producer is rerun
//! first to regenerate it (as GNU make does for intermediate files).
//!
//! ## Files
//! This file holds the engine's types and constructors; `decide.rs` computes
//! keys and decides (fresh / restore / run, with reasons), `execute.rs` runs
//! stages through their executor and records them, `sweep.rs` cleans up after
//! a run, `scheduler.rs` drives a whole run in parallel, `status.rs` is the
//! read-only view of `dagrun status`; run records, lineage and observers
//! (OpenLineage, metrics) have their own files.

mod decide;
mod execute;
pub mod fingerprint;
pub mod lineage;
pub mod observer;
pub mod openlineage;
pub mod report;
pub mod run_metrics;
pub mod runs;
pub mod scheduler;
pub mod status;
mod sweep;

// The records and the store moved to `workspace` (their one owner); these
// names stay for callers that still use the old paths.
pub use crate::stages::Services;
pub use crate::workspace::DAGRUN_DIR;
pub use crate::workspace::{cas, hashing, lock, state};

use crate::executor::{Batch, Done, Executor, LocalWork, Member};
use crate::pipeline::{Pipeline, Stage};
use crate::stages::RunCtx;
use crate::workspace::{ContentHash, Workspace};
use anyhow::{Context, Result, anyhow, bail};
use cas::Cas;
use fingerprint::Ingredients;
use hashing::HashMemo;
use runs::{StageRecord, Status};
use state::{Loaded, OutputRecord, StageState, StateStore};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Outputs of built-in kinds at least this large are hard-linked into the
/// cache instead of copied (see `Cas::link_file`).
pub const LINK_THRESHOLD: u64 = 1 << 20;

/// Where `dagrun run --pull` looks for a stage's key that is not in the
/// local cache (implemented by `commands::pull` over `remote`). `fetch`
/// brings the action entry for `key` and every object it needs into the
/// local cache, verified; `Ok(false)` when the remote has no such entry.
pub trait RemoteSource: Send + Sync + std::fmt::Debug {
    /// Entries land in `states` (sealed under this workspace's key) and
    /// objects in `cas`: the run's own stores. A record that `forgotten`
    /// claims (data of a forgotten tenant) is not fetched: `Ok(false)`.
    fn fetch(
        &self,
        stage: &Stage,
        key: &ContentHash,
        states: &state::StateStore,
        cas: &Cas,
        forgotten: &Mutex<crate::remote::forgotten::Forgotten>,
    ) -> Result<bool>;
    /// The remote as shown in messages.
    fn shown(&self) -> String;
}

/// What to do with a stage.
#[derive(Debug)]
pub enum Decision {
    /// Up to date.
    Fresh,
    /// Copy these outputs back from the cache (from the execution `from`).
    Restore { outs: Vec<String>, reasons: Vec<String>, from: Box<StageState> },
    /// Execute.
    Run { reasons: Vec<String> },
}

/// A stage's key and what to do.
pub struct Evaluation {
    pub key: ContentHash,
    pub ingredients: Ingredients,
    pub decision: Decision,
    /// Producers whose sensitive output this stage reads and which is gone.
    pub missing_sensitive: Vec<usize>,
    /// The stage's last completed execution (read once per evaluation).
    pub prev: Option<StageState>,
}

/// An input's hash as far as it is known.
pub enum InputHash {
    Known(ContentHash),
    /// Not known without running upstream (dry runs): why.
    Unknown(String),
}

/// A pipeline bound to its workspace state.
pub struct Engine {
    pub pipeline: Pipeline,
    /// The runnable kinds, by name (`stages::registry`): the pipeline holds
    /// only their declarations.
    kinds: BTreeMap<&'static str, Arc<dyn crate::stages::StageKind>>,
    pub ws: Workspace,
    pub services: Services,
    pub dagrun_dir: PathBuf,
    pub memo: HashMemo,
    pub cas: Cas,
    pub states: Arc<StateStore>,
    pub run_id: String,
    pub cancel: AtomicBool,
    /// Stages forced to rerun.
    pub forced: HashSet<usize>,
    /// `run --pull`: consulted when a stage's key is not in the local cache.
    pub remote: Option<std::sync::Arc<dyn RemoteSource>>,
    /// The Slurm executor, when some stage runs under Slurm (set by the scheduler).
    pub slurm: Option<std::sync::Arc<dyn Executor>>,
    /// Told about the run as it goes (OpenLineage, metrics): see [`observer`].
    pub observers: Vec<Box<dyn observer::RunObserver>>,
    stage_locks: Vec<Mutex<()>>,
    /// State records and outputs this run wrote, made durable in one batch
    /// when it ends (`sweep.rs`, `sync_written`).
    written: Mutex<Vec<PathBuf>>,
    /// Where this run writes (`workspace::places`), once the scheduler has
    /// recorded it: the record, its key, and whether this run opened it.
    places: Mutex<Option<sweep::PlacesState>>,
    /// Stages that ran in this run after they were decided fresh: a
    /// producer of a deleted sensitive output, regenerated for a consumer
    /// that reruns (`decide.rs`, `rematerialize`). The scheduler reports
    /// them as `ran` (see [`Engine::regenerated`]).
    regenerated: Mutex<Vec<(usize, StageRecord)>>,
    /// `run --pull`: what of a forgotten tenant is not fetched (traced over
    /// this workspace's records at the first fetch).
    forgotten: std::sync::OnceLock<Mutex<crate::remote::forgotten::Forgotten>>,
    /// The newest run record, read once, when a stage has no state record
    /// ([`Engine::no_record_reason`]).
    newest_run: std::sync::OnceLock<Option<runs::RunRecord>>,
}

/// A stage about to run: its evaluation (`None` until its inputs exist, for a
/// member downstream of another member of the same job group).
struct Pending {
    i: usize,
    ev: Option<Evaluation>,
    reasons: Vec<String>,
    rec: StageRecord,
}

enum Step {
    Done(StageRecord),
    Run(Pending),
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Engine {
    /// Why stage `name`, which has no state record, runs (`runs::no_record_reason`).
    pub fn no_record_reason(&self, name: &str) -> String {
        runs::no_record_reason(self.newest_run.get_or_init(|| runs::newest(&self.pipeline.workspace)).as_ref(), name)
    }

    /// An engine that runs stages: it opens the keyring (creating the master
    /// key on first use) for the workspace integrity key that MACs every record.
    pub fn new(pipeline: Pipeline) -> Result<Engine> {
        let ws = Workspace::at(&pipeline.workspace);
        let ring = Arc::new(crate::crypto::Keyring::open(ws.root())?);
        if let Some(u) = ring.unfinished_forget() {
            tracing::warn!("{}", crate::crypto::keyring::unfinished_forget_message(ws.root(), &u));
        }
        Ok(Self::with_keyring(pipeline, ws, Some(ring), false))
    }

    /// An engine on a keyring the caller has opened already (`exec-stage`,
    /// which verified its job spec with it): the master key is opened once.
    pub fn with_ring(pipeline: Pipeline, ring: Arc<crate::crypto::Keyring>) -> Engine {
        let ws = Workspace::at(&pipeline.workspace);
        Self::with_keyring(pipeline, ws, Some(ring), false)
    }

    /// An engine for `status` / `--dry-run`: it creates no key. Without a
    /// master key no record can be verified (every stage counts as stale).
    pub fn read_only(pipeline: Pipeline) -> Result<Engine> {
        let ws = Workspace::at(&pipeline.workspace);
        let ring = crate::crypto::Keyring::open_existing(ws.root())?.map(Arc::new);
        Ok(Self::with_keyring(pipeline, ws, ring, true))
    }

    fn with_keyring(pipeline: Pipeline, ws: Workspace, ring: Option<Arc<crate::crypto::Keyring>>, read_only: bool) -> Engine {
        let key = ring.as_ref().map(|r| r.integrity_key());
        let states = Arc::new(StateStore::new(&ws, key.clone()));
        let services = Services::new(&ws, pipeline.tenants.clone(), states.clone(), ring, read_only);
        let n = pipeline.stages.len();
        Engine {
            memo: HashMemo::load(&ws, key),
            kinds: crate::stages::registry(),
            cas: Cas::new(&ws),
            states,
            services,
            dagrun_dir: ws.dagrun_dir(),
            ws,
            pipeline,
            run_id: runs::new_run_id(),
            cancel: AtomicBool::new(false),
            forced: HashSet::new(),
            remote: None,
            slurm: None,
            observers: Vec::new(),
            stage_locks: (0..n).map(|_| Mutex::new(())).collect(),
            written: Mutex::new(Vec::new()),
            places: Mutex::new(None),
            regenerated: Mutex::new(Vec::new()),
            forgotten: std::sync::OnceLock::new(),
            newest_run: std::sync::OnceLock::new(),
        }
    }

    /// The stages regenerated in this run after they were decided fresh,
    /// with the record of that execution (taken: once).
    pub fn regenerated(&self) -> Vec<(usize, StageRecord)> {
        std::mem::take(&mut *self.regenerated.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn stage(&self, i: usize) -> &Stage {
        &self.pipeline.stages[i]
    }

    /// The runnable kind of stage `i`. The pipeline was loaded with the
    /// declarations of the same built-in kinds (`stages::kinds`), so every
    /// name resolves; a pipeline loaded with other kinds is an error here.
    pub fn kind(&self, i: usize) -> Result<&dyn crate::stages::StageKind> {
        let s = self.stage(i);
        self.kinds.get(s.kind.name()).map(|k| k.as_ref()).ok_or_else(|| anyhow!("stage {}: this build has no runnable kind `{}`", s.name, s.kind.name()))
    }
}

/// Remove a file, symlink or directory if present.
pub fn remove_path(p: &Path) -> Result<()> {
    crate::util::fs_remove(p)
}
