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

pub mod fingerprint;
pub mod lineage;
pub mod observer;
pub mod openlineage;
pub mod report;
pub mod run_metrics;
pub mod runs;
pub mod scheduler;
pub mod status;

// The records and the store moved to `workspace` (their one owner); these
// names stay for callers that still use the old paths.
pub use crate::stages::Services;
pub use crate::workspace::DAGRUN_DIR;
pub use crate::workspace::{cas, hashing, lock, state};

use crate::pipeline::{Pipeline, Stage};
use crate::stages::RunCtx;
use crate::workspace::{ContentHash, Workspace};
use crate::executor::{Batch, Done, Executor, LocalWork, Member};
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
    /// objects in `cas`: the run's own stores.
    fn fetch(&self, stage: &Stage, key: &ContentHash, states: &state::StateStore, cas: &Cas) -> Result<bool>;
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
    /// An engine that runs stages: it opens the keyring (creating the master
    /// key on first use) for the workspace integrity key that MACs every record.
    pub fn new(pipeline: Pipeline) -> Result<Engine> {
        let ws = Workspace::at(&pipeline.workspace);
        let ring = Arc::new(crate::crypto::Keyring::open(ws.root())?);
        Ok(Self::with_keyring(pipeline, ws, Some(ring), false))
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
        }
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

    fn producer_name(&self, path: &str) -> Option<String> {
        self.pipeline.producer_of(path).map(|j| self.pipeline.stages[j].name.clone())
    }

    /// Compute a stage's ingredients given a way to hash its inputs.
    pub fn ingredients(&self, i: usize, input: &mut dyn FnMut(&str) -> Result<InputHash>) -> Result<(Ingredients, Vec<String>)> {
        let s = self.stage(i);
        let mut inputs = BTreeMap::new();
        let mut unknown = Vec::new();
        for d in &s.deps {
            match input(d)? {
                InputHash::Known(h) => {
                    inputs.insert(d.clone(), h.to_string());
                }
                InputHash::Unknown(why) => {
                    unknown.push(why);
                    inputs.insert(d.clone(), String::new());
                }
            }
        }
        let extras = self.kind(i)?.extra_ingredients(s, &self.services)?;
        let ing = Ingredients {
            kind: s.kind.name().to_string(),
            kind_version: s.kind.version(),
            params: s.with.clone(),
            cmd: s.cmd.clone(),
            env: s.env.clone(),
            inputs,
            outs: s.outs.iter().map(|o| o.path.clone()).collect(),
            extras,
        };
        Ok((ing, unknown))
    }

    /// Hash an input on disk; a consumed sensitive input counts with its recorded hash.
    pub fn hash_input(&self, dep: &str, missing_sensitive: &mut Vec<usize>) -> Result<InputHash> {
        let abs = self.pipeline.abs(dep);
        if let Some(h) = self.memo.hash_path(&abs)? {
            return Ok(InputHash::Known(h.hash));
        }
        if let Some(p) = self.pipeline.producer_of(dep) {
            let producer = self.stage(p);
            if producer.outs.iter().any(|o| o.path == dep && o.sensitive) {
                if let Some(rec) = self.states.get(&producer.name).and_then(|st| st.outputs.get(dep).cloned()) {
                    missing_sensitive.push(p);
                    return Ok(InputHash::Known(rec.hash));
                }
            }
            bail!("input {dep} does not exist: its producer, stage {}, has not written it", producer.name);
        }
        bail!("input {dep} does not exist; create it, or declare the stage that makes it (as one of its `outs:`)")
    }

    /// Decide what to do with stage `i` now.
    pub fn evaluate(&self, i: usize) -> Result<Evaluation> {
        let mut missing_sensitive = Vec::new();
        let (ingredients, _) = self.ingredients(i, &mut |d| self.hash_input(d, &mut missing_sensitive))?;
        let mut ev = self.evaluate_with(i, ingredients)?;
        ev.missing_sensitive = missing_sensitive;
        Ok(ev)
    }

    /// Decide what to do with stage `i` given its ingredients.
    pub fn evaluate_with(&self, i: usize, ingredients: Ingredients) -> Result<Evaluation> {
        let s = self.stage(i);
        let missing_sensitive = Vec::new();
        let key = ingredients.key();
        if self.forced.contains(&i) {
            let prev = self.states.get(&s.name);
            return Ok(Evaluation { key, ingredients, decision: Decision::Run { reasons: vec!["forced (--force)".into()] }, missing_sensitive, prev });
        }
        let (prev, distrust) = match self.states.load(&s.name) {
            Loaded::Valid(st) => (Some(st), None),
            Loaded::Missing => (None, None),
            Loaded::Invalid(e) => {
                tracing::warn!("{e}: stage {} is recomputed", s.name);
                (None, Some(format!("{e}: recomputing")))
            }
        };
        let decision = match &prev {
            Some(st) if st.key == key => {
                let (bad, reasons) = self.check_outputs(s, st)?;
                let restorable = |bad: &[String]| bad.iter().all(|p| st.outputs.get(p).is_some_and(|o| o.cached && self.cas.restorable(&o.hash, o.dir)));
                if bad.is_empty() {
                    Decision::Fresh
                } else if restorable(&bad) || (self.pull_from_remote(s, &key) && restorable(&bad)) {
                    Decision::Restore { outs: bad, reasons, from: Box::new(st.clone()) }
                } else {
                    let mut reasons = reasons;
                    reasons.push("(not in the cache: the stage must run)".into());
                    Decision::Run { reasons }
                }
            }
            _ => {
                let mut reasons = match (&prev, distrust) {
                    (Some(st), _) => fingerprint::explain(&st.ingredients, &ingredients, &st.param_refs, &s.param_refs, &|p| self.producer_name(p)),
                    (None, Some(why)) => vec![why],
                    (None, None) => vec!["no earlier run recorded".into()],
                };
                match self.states.load_action(&key).valid() {
                    Some(act) if self.action_restorable(s, &act) => {
                        reasons.push("an earlier run with these exact inputs is in the cache: restoring its outputs".into());
                        let outs = s.outs.iter().filter(|o| !o.sensitive).map(|o| o.path.clone()).collect();
                        Decision::Restore { outs, reasons, from: Box::new(act) }
                    }
                    _ => match self.remote_action(s, &key) {
                        Some((act, shown)) => {
                            reasons.push(format!("an earlier run with these exact inputs is in the remote cache {shown}: restoring its outputs"));
                            let outs = s.outs.iter().filter(|o| !o.sensitive).map(|o| o.path.clone()).collect();
                            Decision::Restore { outs, reasons, from: Box::new(act) }
                        }
                        None => Decision::Run { reasons },
                    },
                }
            }
        };
        Ok(Evaluation { key, ingredients, decision, missing_sensitive, prev })
    }

    /// `run --pull`: fetch `key` from the remote; true when something was fetched.
    /// A remote that fails is a warning, never a failed stage: the stage runs.
    fn pull_from_remote(&self, s: &Stage, key: &ContentHash) -> bool {
        let Some(r) = &self.remote else { return false };
        match r.fetch(s, key, &self.states, &self.cas) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("{}: remote cache {}: {e:#}; running the stage instead", s.name, r.shown());
                false
            }
        }
    }

    /// `run --pull`: the action entry for `key`, from the local cache or
    /// fetched from the remote, when its outputs can be restored. Sensitive
    /// outputs (plaintext, never cached nor pushed) are left absent, exactly
    /// as after a local run: a consumer that needs one reruns its producer.
    fn remote_action(&self, s: &Stage, key: &ContentHash) -> Option<(StageState, String)> {
        let r = self.remote.as_ref()?;
        let adoptable = |act: &StageState| {
            s.outs.iter().all(|o| match act.outputs.get(&o.path) {
                Some(rec) if o.sensitive => rec.sensitive && !rec.cached,
                Some(rec) => !rec.sensitive && rec.cached && self.cas.restorable(&rec.hash, rec.dir),
                None => false,
            })
        };
        if let Some(act) = self.states.action(key).filter(|a| adoptable(a)) {
            return Some((act, r.shown()));
        }
        if !self.pull_from_remote(s, key) {
            return None;
        }
        self.states.action(key).filter(|a| adoptable(a)).map(|a| (a, r.shown()))
    }

    fn action_restorable(&self, s: &Stage, act: &StageState) -> bool {
        s.outs.iter().all(|o| {
            if o.sensitive {
                return false; // cannot restore plaintext: must recompute
            }
            act.outputs.get(&o.path).is_some_and(|r| r.cached && self.cas.restorable(&r.hash, r.dir))
        })
    }

    /// Outputs that are missing or differ from the record (sensitive outputs may be absent).
    fn check_outputs(&self, s: &Stage, st: &StageState) -> Result<(Vec<String>, Vec<String>)> {
        let mut bad = Vec::new();
        let mut reasons = Vec::new();
        for o in &s.outs {
            let Some(rec) = st.outputs.get(&o.path) else {
                bad.push(o.path.clone());
                reasons.push(format!("output {} was never recorded", o.path));
                continue;
            };
            match self.memo.hash_path(&self.pipeline.abs(&o.path))? {
                None if o.sensitive => {}
                None => {
                    bad.push(o.path.clone());
                    reasons.push(format!("output {} is missing", o.path));
                }
                Some(h) if h.hash != rec.hash => {
                    bad.push(o.path.clone());
                    reasons.push(format!("output {} was modified outside dagrun (blake3 {} → {})", o.path, rec.hash.short(), h.hash.short()));
                }
                Some(_) => {}
            }
        }
        Ok((bad, reasons))
    }

    /// Evaluate and then cache, restore or run stage `i`. Never panics on
    /// stage errors: they become a `failed` record.
    pub fn execute(&self, i: usize) -> StageRecord {
        let t0 = Instant::now();
        let name = self.stage(i).name.clone();
        let cpu0 = crate::util::par::thread_cpu_ns();
        let mut rec = match self.execute_inner(i) {
            Ok(r) => r,
            Err(e) => StageRecord { error: Some(format!("{e:#}")), ..StageRecord::new(&name, Status::Failed) },
        };
        rec.seconds = t0.elapsed().as_secs_f64();
        if rec.status == Status::Ran && rec.slurm_job.is_none() {
            // This thread's CPU time plus the stage's worker threads' (set by the local work).
            let own = crate::util::par::thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e9;
            rec.cpu_seconds = Some(own + rec.cpu_seconds.unwrap_or(0.0));
        }
        rec
    }

    /// Execute a job group's members (`members`, in dependency order) as one
    /// batch: each member is decided on its own (cached, restored or run);
    /// the members that must run — and every member downstream of one of them,
    /// whose inputs are only known once it ran — go to the executor together.
    /// Each member gets its own record, state, cache entry and lineage.
    pub fn execute_group(&self, members: &[usize]) -> Vec<StageRecord> {
        if members.len() == 1 {
            return vec![self.execute(members[0])];
        }
        let t0 = Instant::now();
        let mut done: BTreeMap<usize, StageRecord> = BTreeMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut failed: Option<String> = None;
        for &i in members {
            let s = self.stage(i);
            if let Some(f) = &failed {
                done.insert(i, StageRecord { error: Some(format!("stage {f} of the same job group failed")), ..StageRecord::new(&s.name, Status::Skipped) });
                continue;
            }
            let ups = self.pipeline.upstream(i);
            if let Some(p) = pending.iter().find(|p| ups.contains(&p.i)) {
                let why = format!("upstream stage {} will rerun (in the same job)", self.stage(p.i).name);
                pending.push(Pending { i, ev: None, reasons: vec![why], rec: StageRecord::new(&s.name, Status::Ran) });
                continue;
            }
            match self.decide(i) {
                Ok(Step::Done(r)) => {
                    done.insert(i, r);
                }
                Ok(Step::Run(p)) => pending.push(p),
                Err(e) => {
                    done.insert(i, StageRecord { error: Some(format!("{e:#}")), ..StageRecord::new(&s.name, Status::Failed) });
                    failed = Some(s.name.clone());
                }
            }
        }
        if !pending.is_empty() {
            let names: Vec<String> = pending.iter().map(|p| self.stage(p.i).name.clone()).collect();
            for (p, r) in names.iter().zip(self.run_batch(pending)) {
                let i = self.pipeline.stages.iter().position(|s| &s.name == p).expect("member");
                let r = r.unwrap_or_else(|e| StageRecord { error: Some(format!("{e:#}")), ..StageRecord::new(p, Status::Failed) });
                done.insert(i, r);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        members
            .iter()
            .map(|i| {
                let mut r = done.remove(i).expect("every member has a record");
                if r.status != Status::Ran {
                    r.seconds = secs.min(r.seconds.max(0.0));
                }
                r
            })
            .collect()
    }

    fn execute_inner(&self, i: usize) -> Result<StageRecord> {
        match self.decide(i)? {
            Step::Done(r) => Ok(r),
            Step::Run(p) => self.run_batch(vec![p]).pop().expect("one result per member"),
        }
    }

    /// Decide what to do with stage `i`: done (cached or restored here), or
    /// run (after regenerating any sensitive input that is gone).
    fn decide(&self, i: usize) -> Result<Step> {
        let s = self.stage(i);
        let mut ev = self.evaluate(i)?;
        let mut rec = StageRecord { key: Some(ev.key.to_string()), ..StageRecord::new(&s.name, Status::Cached) };
        match std::mem::replace(&mut ev.decision, Decision::Fresh) {
            Decision::Fresh => {
                if let Some(st) = ev.prev.take() {
                    rec.outputs = st.outputs.iter().map(|(k, v)| (k.clone(), v.hash.to_string())).collect();
                    rec.facts = st.facts;
                }
                Ok(Step::Done(rec))
            }
            Decision::Restore { outs, reasons, from } => match self.restore(i, &ev, &outs, &from) {
                Ok(()) => {
                    rec.status = Status::Restored;
                    rec.reasons = reasons;
                    rec.outputs = from.outputs.iter().map(|(k, v)| (k.clone(), v.hash.to_string())).collect();
                    rec.facts = from.facts.clone();
                    Ok(Step::Done(rec))
                }
                Err(e) => {
                    tracing::warn!("{}: cannot restore from the cache ({e:#}); running the stage instead", s.name);
                    let mut reasons = reasons;
                    reasons.push(format!("cache restore failed: {e:#}"));
                    // Running needs the real inputs, sensitive ones included.
                    self.with_inputs(i, ev, reasons, rec).map(Step::Run)
                }
            },
            Decision::Run { reasons } => self.with_inputs(i, ev, reasons, rec).map(Step::Run),
        }
    }

    /// Prepare to run stage `i`: first regenerate any sensitive input that is gone.
    fn with_inputs(&self, i: usize, mut ev: Evaluation, mut reasons: Vec<String>, mut rec: StageRecord) -> Result<Pending> {
        let s = self.stage(i);
        if !ev.missing_sensitive.is_empty() {
            let producers = std::mem::take(&mut ev.missing_sensitive);
            for p in producers {
                if self.rematerialize(p, &s.name)? {
                    // The producer was reported `cached` earlier in this run; say here that it executed.
                    reasons.push(format!("reran {} first to regenerate its sensitive output (deleted after the last run)", self.stage(p).name));
                }
            }
            // Inputs now exist: recompute the key from the real bytes.
            let again = self.evaluate(i)?;
            ev.key = again.key;
            ev.ingredients = again.ingredients;
            rec.key = Some(ev.key.to_string());
        }
        Ok(Pending { i, ev: Some(ev), reasons, rec })
    }

    fn restore(&self, i: usize, ev: &Evaluation, outs: &[String], from: &StageState) -> Result<()> {
        let s = self.stage(i);
        for p in outs {
            let r = from.outputs.get(p).with_context(|| format!("no cached copy of {p}"))?;
            let abs = self.pipeline.abs(p);
            crate::pipeline::check_output_at_write(&self.pipeline.workspace, p, true)?;
            self.cas.restore(&r.hash, r.dir, &abs).with_context(|| format!("restoring {p}"))?;
            self.memo.forget(&abs);
        }
        let mut st = from.clone();
        st.stage = s.name.clone();
        st.key = ev.key.clone();
        st.ingredients = ev.ingredients.clone();
        st.param_refs = s.param_refs.clone();
        self.states.put(&st)
    }

    /// Regenerate a consumed sensitive output of stage `p` for `consumer`;
    /// true if the producer executed.
    fn rematerialize(&self, p: usize, consumer: &str) -> Result<bool> {
        let _g = self.stage_locks[p].lock().unwrap_or_else(|e| e.into_inner());
        let s = self.stage(p);
        if s.outs.iter().filter(|o| o.sensitive).all(|o| self.pipeline.abs(&o.path).exists()) {
            return Ok(false);
        }
        tracing::info!("{}: regenerating its sensitive output for {consumer}", s.name);
        let ev = self.evaluate(p)?;
        let pending = Pending { i: p, ev: Some(ev), reasons: vec![format!("regenerate sensitive output for {consumer}")], rec: StageRecord::new(&s.name, Status::Ran) };
        self.run_batch(vec![pending]).pop().expect("one result per member").with_context(|| format!("regenerating the input of {consumer} with stage {}", s.name))?;
        Ok(true)
    }

    /// The executor of stage `i`.
    fn executor_for(&self, i: usize) -> &dyn Executor {
        match (self.stage(i).executor, &self.slurm) {
            (crate::pipeline::ExecutorKind::Slurm, Some(x)) => x.as_ref(),
            _ => &crate::executor::local::Local,
        }
    }

    /// Outputs are written in place by commands: they start from nothing, on
    /// every attempt, so a stale file (of an earlier run, or of an attempt that
    /// timed out half-way) is never mistaken for a fresh one.
    fn prepare_outputs(&self, i: usize) -> Result<()> {
        let s = self.stage(i);
        for o in &s.outs {
            // Checked at write time, not only at load time: a link planted
            // since (by an earlier stage, or anyone) must not redirect a write.
            crate::pipeline::check_output_at_write(&self.pipeline.workspace, &o.path, true).with_context(|| format!("stage {}", s.name))?;
            let o = self.pipeline.abs(&o.path);
            if s.kind.name() == "cmd" {
                remove_path(&o)?;
            }
            if let Some(parent) = o.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create directory {}", parent.display()))?;
            }
        }
        Ok(())
    }

    /// The work of stage `i` in this process, under the key and input hashes
    /// of `ev` (also what `dagrun exec-stage` runs inside a job).
    pub fn local_work(&self, i: usize, ev: &Evaluation) -> Result<Done> {
        let s = self.stage(i);
        let t0 = Instant::now();
        // Worker threads the stage starts (util::par) report their CPU time here.
        let worker_cpu = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _accounting = crate::util::par::account_to(worker_cpu.clone());
        let ctx = RunCtx {
            workspace: &self.pipeline.workspace,
            stage: s,
            deps: s.deps.iter().map(|d| self.pipeline.abs(d)).collect(),
            outs: s.outs.iter().map(|o| self.pipeline.abs(&o.path)).collect(),
            input_hashes: &ev.ingredients.inputs,
            cache_key: ev.key.as_str(),
            services: &self.services,
            cancel: &self.cancel,
            timeout: s.timeout.map(Duration::from_secs_f64),
        };
        let report = self.kind(i)?.run(&ctx)?;
        Ok(Done { report, key: None, seconds: t0.elapsed().as_secs_f64(), cpu_seconds: Some(worker_cpu.load(Ordering::Relaxed) as f64 / 1e9), job: None })
    }

    /// Execute `pending` (one stage, or a group's members in order) with their
    /// executor, retrying a failed member (`retries:`) with the members that
    /// did not finish, and record each finished member as soon as it is known.
    /// One result per member, in order; members after a failure are `skipped`.
    fn run_batch(&self, mut pending: Vec<Pending>) -> Vec<Result<StageRecord>> {
        let mut results: Vec<Result<StageRecord>> = Vec::with_capacity(pending.len());
        let exec = self.executor_for(pending[0].i);
        let mut start = 0;
        let mut attempt = 1u32;
        let mut tries = 0u32; // retries used by the current first member
        for p in &pending {
            self.observers.iter().for_each(|o| o.stage_working(self, p.i));
        }
        let prepare = |from: &[Pending]| -> Result<()> { from.iter().try_for_each(|p| self.prepare_outputs(p.i)) };
        let mut error = prepare(&pending).err();
        while error.is_none() && start < pending.len() {
            let works: Vec<Box<LocalWork>> = pending[start..]
                .iter()
                .map(|p| {
                    let i = p.i;
                    let ev = p.ev.as_ref();
                    Box::new(move || match ev {
                        Some(ev) => self.local_work(i, ev),
                        None => Err(anyhow!("internal error: stage {} has no key to run under in this process", self.stage(i).name)),
                    }) as Box<LocalWork>
                })
                .collect();
            let batch = Batch {
                members: pending[start..]
                    .iter()
                    .zip(&works)
                    .map(|(p, w)| Member { index: p.i, stage: self.stage(p.i), key: p.ev.as_ref().map(|e| e.key.to_string()), local: w.as_ref() })
                    .collect(),
                attempt,
                cancel: Some(&self.cancel),
            };
            let outcomes = exec.execute(&batch);
            drop(batch);
            drop(works);
            let mut failure = None;
            for (i, r) in outcomes {
                if start >= pending.len() || pending[start].i != i {
                    failure = Some(anyhow!("internal error: the {} executor answered for an unexpected stage", exec.name()));
                    break;
                }
                match r.and_then(|done| self.record_run(&mut pending[start], done)) {
                    Ok(rec) => {
                        results.push(Ok(rec));
                        start += 1;
                        tries = 0;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if start == pending.len() {
                break;
            }
            let e = failure.unwrap_or_else(|| anyhow!("the {} executor returned no result", exec.name()));
            let s = self.stage(pending[start].i);
            if tries < s.retries && !self.cancel.load(Ordering::Relaxed) {
                tries += 1;
                attempt += 1;
                tracing::warn!("{} failed (attempt {tries} of {}): {e:#}; retrying", s.name, s.retries + 1);
                error = prepare(&pending[start..]).err();
                continue;
            }
            error = Some(if s.retries > 0 { e.context(format!("failed after {} attempts", tries + 1)) } else { e });
        }
        if let Some(e) = error {
            let failed = self.stage(pending[start].i).name.clone();
            results.push(Err(e));
            for p in &pending[start + 1..] {
                let name = &self.stage(p.i).name;
                results.push(Ok(StageRecord { error: Some(format!("stage {failed} of the same job group failed")), ..StageRecord::new(name, Status::Skipped) }));
            }
        }
        results
    }

    /// Record a finished member: hash and store its outputs, write its state
    /// and action-cache entry. A member whose key was not known before it ran
    /// (downstream in a group) gets it now, from its inputs on disk; a key the
    /// job reports must equal the engine's.
    fn record_run(&self, p: &mut Pending, done: Done) -> Result<StageRecord> {
        let i = p.i;
        let s = self.stage(i);
        let ev = match p.ev.take() {
            Some(ev) => ev,
            None => {
                let mut ms = Vec::new();
                let (ingredients, _) = self.ingredients(i, &mut |d| self.hash_input(d, &mut ms))?;
                let key = ingredients.key();
                Evaluation { key, ingredients, decision: Decision::Fresh, missing_sensitive: vec![], prev: self.states.get(&s.name) }
            }
        };
        if let Some(k) = &done.key {
            if k.as_str() != ev.key.as_str() {
                bail!(
                    "{} computed the stage's cache key as {} but dagrun computes {}: its inputs changed while it ran; run again",
                    done.job.as_deref().unwrap_or("the job"),
                    &k[..k.len().min(12)],
                    ev.key.short()
                );
            }
        }
        let prev = ev.prev.as_ref();
        let outs: Vec<PathBuf> = s.outs.iter().map(|o| self.pipeline.abs(&o.path)).collect();
        let mut rec = std::mem::replace(&mut p.rec, StageRecord::new(&s.name, Status::Ran));
        let reasons = std::mem::take(&mut p.reasons);
        // Hash and store outputs.
        let mut outputs = BTreeMap::new();
        for (o, abs) in s.outs.iter().zip(&outs) {
            crate::pipeline::check_output_at_write(&self.pipeline.workspace, &o.path, false)
                .with_context(|| format!("stage {} wrote its output through a link; it is not recorded or cached", s.name))?;
            self.memo.forget(abs);
            let meta = std::fs::metadata(abs).map_err(|_| {
                anyhow!("the stage finished but did not write its declared output {}; fix the stage so it writes it (or remove it from `outs:`)", o.path)
            })?;
            let store = o.cache && !o.sensitive;
            let h = if store && meta.is_file() {
                // Large files written by built-in kinds are hard-linked into the
                // cache (no copy); anything else is copied while being hashed.
                let (hash, size) = if s.kind.name() != "cmd" && meta.len() >= LINK_THRESHOLD {
                    self.cas.link_file(abs, &self.memo)
                } else {
                    self.cas.ingest_file(abs, &self.memo)
                }
                .with_context(|| format!("storing {} in the cache", o.path))?;
                hashing::Hashed { hash, size, dir: false }
            } else {
                let h = self.memo.hash_path(abs)?.with_context(|| format!("output {} vanished", o.path))?;
                if store {
                    self.cas.put(abs, &h.hash, h.dir, &self.memo).with_context(|| format!("storing {} in the cache", o.path))?;
                }
                h
            };
            if s.kind.name() != "cmd" {
                // dagrun wrote it and the stage is done: no re-read on the next run.
                self.memo.settle(abs);
            }
            outputs.insert(o.path.clone(), OutputRecord { hash: h.hash, size: h.size, dir: h.dir, sensitive: o.sensitive, cached: o.cache && !o.sensitive });
        }
        let changed = match prev {
            Some(p) => p.outputs.iter().map(|(k, v)| (k, &v.hash)).ne(outputs.iter().map(|(k, v)| (k, &v.hash))),
            None => true,
        };
        let st = StageState {
            stage: s.name.clone(),
            key: ev.key.clone(),
            ingredients: ev.ingredients,
            param_refs: s.param_refs.clone(),
            outputs,
            run_id: self.run_id.clone(),
            finished_at: now_rfc3339(),
            seconds: done.seconds,
            facts: done.report.facts.clone(),
        };
        self.states.put(&st)?;
        if st.outputs.values().all(|o| o.cached || o.sensitive) {
            self.states.put_action(&st)?;
        }
        rec.status = Status::Ran;
        rec.key = Some(st.key.to_string());
        rec.reasons = reasons;
        rec.outputs = st.outputs.iter().map(|(k, v)| (k.clone(), v.hash.to_string())).collect();
        rec.outputs_changed = Some(changed);
        rec.facts = done.report.facts;
        rec.cpu_seconds = done.cpu_seconds;
        rec.seconds = done.seconds;
        rec.slurm_job = done.job;
        Ok(rec)
    }

    /// Delete every sensitive output on disk (plaintext never outlives a run).
    pub fn shred_sensitive(&self) {
        for s in &self.pipeline.stages {
            for o in s.outs.iter().filter(|o| o.sensitive) {
                let abs = self.pipeline.abs(&o.path);
                if abs.symlink_metadata().is_ok() {
                    if let Err(e) = remove_path(&abs) {
                        tracing::error!("cannot delete sensitive output {}: {e:#}", o.path);
                    } else {
                        tracing::debug!("deleted sensitive output {}", o.path);
                    }
                    self.memo.forget(&abs);
                }
            }
        }
    }

    /// Remove temporary files left next to outputs by killed runs.
    pub fn sweep_temp_files(&self) {
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        for s in &self.pipeline.stages {
            for o in &s.outs {
                if let Some(parent) = self.pipeline.abs(&o.path).parent() {
                    dirs.insert(parent.to_path_buf());
                }
            }
        }
        dirs.insert(self.ws.dagrun_dir()); // the hash memo
        dirs.insert(self.ws.state_dir());
        dirs.insert(self.ws.dagrun_dir().join("openlineage")); // workspace id, spool
        dirs.insert(self.ws.dagrun_dir().join("metrics")); // last successful run
        dirs.insert(self.ws.actions_dir());
        dirs.insert(self.ws.objects_dir()); // ingest staging files
        if let Ok(rd) = std::fs::read_dir(self.ws.objects_dir()) {
            dirs.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
        dirs.insert(self.ws.runs_dir());
        dirs.extend(crate::registry::Registry::new(&self.ws.dagrun_dir()).dirs()); // registered models
        for d in dirs {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                if crate::util::atomic::is_temp_name(&e.file_name().to_string_lossy()) {
                    let _ = remove_path(&e.path());
                }
            }
        }
    }
}

/// Remove a file, symlink or directory if present.
pub fn remove_path(p: &Path) -> Result<()> {
    crate::util::fs_remove(p)
}
