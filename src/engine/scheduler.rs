//! The scheduler: runs independent stages concurrently, at most `--jobs` at
//! a time, on `--jobs` worker threads (stage work: hashing, commands,
//! CPU-heavy kinds). A failed stage stops its dependents; independent stages
//! finish.
//!
//! Rules: a worker that finishes a stage releases its dependents and runs
//! the first one itself, waking another worker only for the rest: no thread
//! hand-off between a stage and the next one on its path (on a busy machine
//! each hand-off was a wait for a core, paid by every trivial stage). The
//! main thread only waits for SIGINT/SIGTERM/SIGHUP (then no new stage
//! starts and running ones are cancelled) and for the workers to finish;
//! their handlers are installed before the first stage starts.

use super::Engine;
use super::report::{Reporter, Verbosity, say};
use super::runs::{self, RunRecord, RunStatus, StageRecord, Status};
use crate::error::{Failure, exit};
use crate::pipeline::Pipeline;
use anyhow::Result;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What `dagrun run` was asked.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stages to bring up to date (with what they need); empty = all.
    pub targets: Vec<String>,
    /// `--force` (empty list = everything selected) / `--force STAGE`.
    pub force: Option<Vec<String>>,
    pub jobs: usize,
    /// Wait this long for the workspace lock (None = fail at once).
    pub wait: Option<Duration>,
    pub verbosity: Verbosity,
    /// `--pull`: the remote cache consulted for keys not in the local cache.
    pub remote: Option<Arc<dyn super::RemoteSource>>,
    /// `--executor`: run every stage here, overriding the pipeline.
    pub executor: Option<crate::pipeline::ExecutorKind>,
    /// `--openlineage-url` (else `DAGRUN_OPENLINEAGE_URL`): see `engine::openlineage`.
    pub openlineage_url: Option<String>,
    /// `--metrics-file` (else `metrics_file:` in config/dagrun.yaml): see `engine::run_metrics`.
    pub metrics_file: Option<PathBuf>,
    /// `--json`: a run that fails or is interrupted prints its record on
    /// stdout too, before its error (a run that succeeds returns it).
    pub json: bool,
}

/// The result of a run.
pub struct RunOutcome {
    pub record: RunRecord,
    pub record_path: PathBuf,
    /// One line per summarising stage (e.g. per-tenant model quality).
    pub summary: Vec<String>,
}

/// Stages selected by `targets` (and everything upstream of them).
pub fn select(p: &Pipeline, targets: &[String]) -> Result<HashSet<usize>> {
    if targets.is_empty() {
        return Ok((0..p.stages.len()).collect());
    }
    let mut roots = Vec::new();
    for t in targets {
        roots.extend(p.select(t)?);
    }
    Ok(p.with_ancestors(&roots))
}

/// Stages forced to rerun.
pub fn forced(p: &Pipeline, force: &Option<Vec<String>>, selected: &HashSet<usize>) -> Result<HashSet<usize>> {
    Ok(match force {
        None => HashSet::new(),
        Some(list) if list.is_empty() => selected.clone(),
        Some(list) => {
            let mut roots = Vec::new();
            for t in list {
                roots.extend(p.select(t)?);
            }
            p.with_descendants(&roots).intersection(selected).copied().collect()
        }
    })
}

/// Run a pipeline.
pub fn run(mut pipeline: Pipeline, opts: &RunOptions) -> Result<RunOutcome> {
    let ws = crate::workspace::Workspace::at(&pipeline.workspace);
    // Settings are checked before anything runs (a bad one is exit 2).
    let settings = crate::config::DagrunConfig::load(&pipeline.workspace)?;
    let lineage_url = super::openlineage::endpoint(opts.openlineage_url.as_deref())?;
    let metrics_file = opts.metrics_file.clone().or(settings.metrics_file);
    if let Some(m) = &metrics_file {
        ws.check_user_output(m, if opts.metrics_file.is_some() { "--metrics-file" } else { "`metrics_file:` of config/dagrun.yaml," })?;
    }
    let lock = ws.lock_run(opts.wait, &format!("{} {}", crate::workspace::lock::RUN_HOLDER, pipeline.shown))?;
    let selected = select(&pipeline, &opts.targets)?;
    let forced = forced(&pipeline, &opts.force, &selected)?;
    if let Some(kind) = opts.executor {
        for s in &mut pipeline.stages {
            s.executor = kind;
        }
    }
    // Outside tools (Slurm's commands) get the pipeline's `secrets:` withheld too.
    crate::util::child_env::withhold_from_tools(&pipeline.secrets);
    // Jobs of a killed earlier run must end before anything writes their outputs.
    crate::executor::slurm::abandon_orphans(&pipeline.workspace)?;
    // ... and so must what its stage commands started here (their shells died with it).
    let orphans_stopped = crate::workspace::orphans::stop_killed_runs(&lock, &pipeline.workspace);
    let uses_slurm = selected.iter().any(|&i| pipeline.stages[i].executor == crate::pipeline::ExecutorKind::Slurm);
    if uses_slurm {
        // A job killed by Slurm (time limit, scancel) may leave temp files: the next run sweeps.
        lock.keep_unclean();
    }
    let mut engine = Engine::new(pipeline)?;
    engine.forced = forced;
    engine.remote = opts.remote.clone();
    if uses_slurm {
        let slurm = crate::executor::slurm::Slurm::new(&engine.pipeline, &engine.run_id, engine.states.clone())?;
        crate::executor::slurm::prune_runs(&engine.pipeline.workspace, 10);
        engine.slurm = Some(Arc::new(slurm));
    }
    // Temp files (and plaintext) are left only if a run died without
    // unwinding (`workspace::lock`); where it wrote is recorded
    // (`workspace::places`) before any stage of this run starts.
    let cleaned = engine.prepare_places(lock.found_unclean());
    if lock.found_unclean() && cleaned && orphans_stopped {
        lock.swept();
    }
    if uses_slurm {
        engine.open_places();
    }
    match super::openlineage::OpenLineage::new(&engine, lineage_url) {
        Ok(o) => engine.observers.push(Box::new(o)),
        Err(e) => tracing::warn!("OpenLineage events are off for this run: {e:#}"),
    }
    if let Some(path) = metrics_file {
        engine.observers.push(Box::new(super::run_metrics::RunMetrics::new(path)));
    }
    let engine = Arc::new(engine);
    for o in &engine.observers {
        o.run_started(&engine);
    }

    let started_at = chrono::Utc::now();
    let t0 = Instant::now();
    let reporter = Arc::new(Reporter::new(opts.verbosity, selected.len()));
    let jobs = opts.jobs.max(1);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (records, interrupted) = schedule(&rt, engine.clone(), selected, jobs, reporter.clone(), t0);
    reporter.done();
    // A failed attempt's leftovers that would not stop: the next run stops
    // them before it sweeps (`workspace::orphans`).
    if crate::workspace::orphans::attempts_left_survivors() {
        lock.keep_own_marks();
    }

    // Plaintext never outlives the run, whatever happened.
    engine.shred_sensitive();
    engine.close_places();
    // What the run wrote is durable before the memo vouches for it and the
    // run record reports it (see workspace::state, "Durability"); a run that
    // ran and restored nothing has nothing to flush.
    engine.sync_written();
    if let Err(e) = engine.memo.save() {
        tracing::warn!("cannot save the file-hash memo: {e:#}");
    }

    let failed: Vec<StageRecord> = records.iter().filter(|r| r.status == Status::Failed).cloned().collect();
    let exit_code = if interrupted {
        exit::INTERRUPTED
    } else if failed.is_empty() {
        exit::OK
    } else {
        exit::FAILED
    };
    let mut record = RunRecord {
        run_id: engine.run_id.clone(),
        pipeline: engine.pipeline.shown.clone(),
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        seconds: t0.elapsed().as_secs_f64(),
        status: RunStatus::of_exit_code(exit_code),
        exit_code,
        targets: opts.targets.clone(),
        forced: {
            let mut v: Vec<String> = engine.forced.iter().map(|&i| engine.stage(i).name.clone()).collect();
            v.sort();
            v
        },
        stages: records,
        params: engine.pipeline.params.iter().map(|(k, v)| (k.clone(), crate::util::redact::param_value(v))).collect(),
        jobs: Some(jobs as u32),
        openlineage: None,
    };
    for o in &engine.observers {
        o.run_finished(&engine, &mut record);
    }
    // A record that cannot be written (say the disk is full) must not hide
    // why the stages failed.
    let written = runs::write(&engine.pipeline.workspace, &record);
    if opts.json && (interrupted || !failed.is_empty()) {
        say(&serde_json::to_string_pretty(&record)?);
    }

    // What a run that did not finish did, and where its record is.
    let tally = || {
        let at = match &written {
            Ok(p) => format!("recorded in {}", crate::workspace::shown_path(&engine.pipeline.workspace, p).display()),
            Err(e) => format!("the run record could not be written: {e:#}"),
        };
        format!("{} ({:.2}s, run {}); {at}", record.tally(), record.seconds, record.run_id)
    };
    if interrupted {
        return Err(Failure::Interrupted(format!(" — {}", tally())).into());
    }
    if !failed.is_empty() {
        let mut msg = String::new();
        for f in &failed {
            msg.push_str(&format!("stage {} failed: {}\n", f.stage, f.error.as_deref().unwrap_or("unknown error")));
        }
        msg.push_str(&tally());
        return Err(Failure::Stages(msg).into());
    }
    let record_path = written?;

    let mut summary = Vec::new();
    for &i in &engine.pipeline.topo {
        let s = engine.stage(i);
        if record.stages.iter().any(|r| r.stage == s.name) {
            let outs: Vec<PathBuf> = s.outs.iter().map(|o| engine.pipeline.abs(&o.path)).collect();
            if let Some(line) = engine.kind(i).ok().and_then(|k| k.summarize(s, &outs, &engine.services)) {
                summary.push(line);
            }
        }
    }
    Ok(RunOutcome { record, record_path, summary })
}

fn skipped(name: &str, why: String) -> StageRecord {
    StageRecord { error: Some(why), ..StageRecord::new(name, Status::Skipped) }
}

/// The records of a task whose members a panic stopped: failed, with
/// `detail` after the message (the panic's text, when it has one).
fn internal_error(engine: &Engine, members: &[usize], detail: &str) -> Vec<StageRecord> {
    members
        .iter()
        .map(|&i| {
            let mut r = skipped(&engine.stage(i).name, format!("internal error (a bug in dagrun, please report it){detail}"));
            r.status = Status::Failed;
            r
        })
        .collect()
}

/// Units of execution: one stage each, except that stages of one Slurm job
/// group (same `group:` and tenant) form one task, members in dependency order.
fn tasks(p: &Pipeline, selected: &HashSet<usize>) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut task_of = vec![usize::MAX; p.stages.len()];
    let mut tasks: Vec<Vec<usize>> = Vec::new();
    let mut by_group: BTreeMap<(String, Option<String>), usize> = BTreeMap::new();
    for &i in p.topo.iter().filter(|i| selected.contains(i)) {
        let grouped = p.stages[i].executor == crate::pipeline::ExecutorKind::Slurm;
        let t = match p.group_of(i).filter(|_| grouped) {
            Some((g, tenant)) => *by_group.entry((g.to_string(), tenant.map(str::to_string))).or_insert_with(|| {
                tasks.push(Vec::new());
                tasks.len() - 1
            }),
            None => {
                tasks.push(Vec::new());
                tasks.len() - 1
            }
        };
        tasks[t].push(i);
        task_of[i] = t;
    }
    (tasks, task_of)
}

/// What the workers share (under one lock).
struct Shared {
    ready: VecDeque<usize>,
    indeg: Vec<usize>,
    done: Vec<Option<StageRecord>>,
    task_done: Vec<bool>,
    running: usize,
    /// Free scheduler slots (recorded as each stage's `worker`), lowest first.
    free_slots: std::collections::BTreeSet<u32>,
    interrupted: bool,
    finished: bool,
}

/// Runs its closure when dropped during a panic.
struct OnPanic<F: Fn()>(F);

impl<F: Fn()> Drop for OnPanic<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

fn schedule(
    rt: &tokio::runtime::Runtime,
    engine: Arc<Engine>,
    selected: HashSet<usize>,
    jobs: usize,
    reporter: Arc<Reporter>,
    t0: Instant,
) -> (Vec<StageRecord>, bool) {
    let p = &engine.pipeline;
    let n = p.stages.len();
    let (tasks, task_of) = tasks(p, &selected);
    // A task's upstream: tasks of its members' selected upstream stages.
    let mut indeg = vec![0usize; tasks.len()];
    for (t, members) in tasks.iter().enumerate() {
        let ups: HashSet<usize> =
            members.iter().flat_map(|&i| p.upstream(i)).filter(|u| selected.contains(u)).map(|u| task_of[u]).filter(|&u| u != t).collect();
        indeg[t] = ups.len();
    }
    // Stages in topological (file) order; tasks ready in the order of their first member.
    let order: Vec<usize> = p.topo.iter().copied().filter(|i| selected.contains(i)).collect();
    let position: Vec<usize> = {
        let mut v = vec![usize::MAX; n];
        for (k, &i) in order.iter().enumerate() {
            v[i] = k;
        }
        v
    };
    let ready: VecDeque<usize> = (0..tasks.len()).filter(|&t| indeg[t] == 0).collect();
    let shared = std::sync::Mutex::new(Shared {
        finished: ready.is_empty(),
        ready,
        indeg,
        done: (0..n).map(|_| None).collect(),
        task_done: vec![false; tasks.len()],
        running: 0,
        free_slots: (0..jobs as u32).collect(),
        interrupted: false,
    });
    let wake = std::sync::Condvar::new();
    let all_done = tokio::sync::Notify::new();
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());

    // Record a finished task and release (or skip) what depends on it.
    let complete = |g: &mut Shared, t: usize, members: &[usize], recs: Vec<StageRecord>| {
        g.task_done[t] = true;
        let mut failed_members = Vec::new();
        for (&i, rec) in members.iter().zip(recs) {
            reporter.finished(&rec);
            if rec.status == Status::Failed || rec.status == Status::Skipped {
                failed_members.push(i);
            }
            g.done[i] = Some(rec);
        }
        // Downstream tasks of this one.
        let mut down: Vec<usize> = members.iter().flat_map(|&i| p.downstream(i)).filter(|d| selected.contains(d) && task_of[*d] != t).collect();
        down.sort_by_key(|&d| position[d]);
        down.dedup();
        // First skip everything downstream of a failed member, then release the rest.
        for &d in &down {
            let blocked_by = failed_members.iter().find(|&&f| p.with_descendants(&[f]).contains(&d));
            if let Some(&f) = blocked_by {
                for x in p.with_descendants(&[d]) {
                    if selected.contains(&x) && g.done[x].is_none() && !g.task_done[task_of[x]] {
                        let r = skipped(&p.stages[x].name, format!("upstream stage {} failed", p.stages[f].name));
                        reporter.finished(&r);
                        g.done[x] = Some(r);
                        g.indeg[task_of[x]] = usize::MAX;
                    }
                }
            }
        }
        let mut seen_tasks = HashSet::new();
        for d in down {
            let dt = task_of[d];
            if !seen_tasks.insert(dt) || g.indeg[dt] == usize::MAX {
                continue;
            }
            g.indeg[dt] -= 1;
            if g.indeg[dt] == 0 {
                g.ready.push_back(dt);
            }
        }
    };

    // Run one task (on a worker thread, outside the lock).
    let run_task = |members: &[usize], slot: u32| -> Vec<StageRecord> {
        let eng = &engine;
        let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for o in &eng.observers {
                for &i in members {
                    o.stage_started(eng, i);
                }
            }
            let start = t0.elapsed().as_secs_f64();
            let mut recs: Vec<StageRecord> = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| eng.execute_group(members))).unwrap_or_else(|panic| {
                let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
                internal_error(eng, members, &format!(": {what}"))
            });
            // A group's members ran one after the other in its slot.
            let end = t0.elapsed().as_secs_f64().max(start);
            let mut cursor = start;
            let last = recs.len().saturating_sub(1);
            for (k, rec) in recs.iter_mut().enumerate() {
                rec.start_s = Some(cursor);
                let e = if k == last { end } else { (cursor + rec.seconds).min(end) };
                rec.end_s = Some(e);
                rec.worker = Some(slot);
                cursor = e;
            }
            for o in &eng.observers {
                for (&i, rec) in members.iter().zip(&recs) {
                    o.stage_finished(eng, i, rec);
                }
            }
            recs
        }));
        work.unwrap_or_else(|_| {
            // An observer panicked: report it as a failure, never crash the run.
            tracing::error!("a stage thread panicked");
            internal_error(eng, members, "")
        })
    };

    let worker = || {
        // A panic outside a stage's own catch (a bug) must end the run, not
        // leave the main thread waiting forever for a worker that is gone
        // (the workspace lock held, every later cron run refused).
        let _end_on_panic = OnPanic(|| {
            tracing::error!("internal error (a bug in dagrun, please report it): a worker thread panicked; stopping the run");
            let mut g = lock();
            g.interrupted = true;
            g.finished = true;
            wake.notify_all();
            all_done.notify_one();
        });
        let mut g = lock();
        loop {
            if g.finished {
                break;
            }
            let next = if g.interrupted { None } else { g.ready.pop_front() };
            let Some(t) = next else {
                if g.running == 0 {
                    // Nothing runs and nothing can start: the run is over.
                    g.finished = true;
                    wake.notify_all();
                    all_done.notify_one();
                    break;
                }
                g = wake.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let members = tasks[t].clone();
            for &i in &members {
                reporter.started(&engine.stage(i).name);
            }
            let slot = g.free_slots.pop_first().unwrap_or(0);
            g.running += 1;
            // Another idle worker may take what is still ready.
            if !g.ready.is_empty() {
                wake.notify_one();
            }
            drop(g);
            let recs = run_task(&members, slot);
            g = lock();
            g.running -= 1;
            g.free_slots.insert(slot);
            complete(&mut g, t, &members, recs);
        }
    };

    // Signal handlers first, before any stage starts: a SIGINT, SIGTERM or
    // SIGHUP (the terminal or ssh session went away) arriving at any instant
    // after this must interrupt the run (commands killed with their
    // children), never kill dagrun with the default action and leave its
    // commands running, orphaned, after the workspace lock is free again.
    let mut signals: Vec<tokio::signal::unix::Signal> = {
        use tokio::signal::unix::{SignalKind, signal};
        let _rt = rt.enter();
        [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()]
            .into_iter()
            .filter_map(|k| signal(k).inspect_err(|e| tracing::warn!("cannot handle signal {}: {e}", k.as_raw_value())).ok())
            .collect()
    };
    std::thread::scope(|sc| {
        for k in 0..jobs {
            if let Err(e) = std::thread::Builder::new().name(format!("dagrun-worker-{k}")).spawn_scoped(sc, worker) {
                tracing::error!("cannot start worker thread {k}: {e}");
                if k == 0 {
                    // No worker at all: nothing can run.
                    let mut g = lock();
                    g.finished = true;
                    all_done.notify_one();
                }
                break;
            }
        }
        // Signals: stop starting stages and cancel the running ones.
        rt.block_on(async {
            let mut interrupted = false;
            let have_signals = !signals.is_empty();
            loop {
                let any_signal = async {
                    if have_signals {
                        futures_util::future::select_all(signals.iter_mut().map(|s| Box::pin(s.recv()))).await;
                    } else {
                        std::future::pending::<()>().await
                    }
                };
                tokio::select! {
                    _ = all_done.notified() => break,
                    _ = any_signal, if !interrupted => { interrupted = true; }
                }
                if interrupted {
                    engine.cancel.store(true, Ordering::SeqCst);
                    let mut g = lock();
                    g.interrupted = true;
                    wake.notify_all();
                    if g.finished {
                        break;
                    }
                }
            }
        });
    });

    let mut g = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    let interrupted = g.interrupted;
    for &i in &order {
        if g.done[i].is_none() {
            let why = if interrupted { "run interrupted".to_string() } else { "not reached".to_string() };
            g.done[i] = Some(skipped(&p.stages[i].name, why));
        }
    }
    // A producer decided fresh (or restored) and later run to regenerate a
    // deleted sensitive output for a consumer: it ran in this run (or failed
    // there), and says so.
    for (i, regen) in engine.regenerated() {
        // The record is that execution's; only when and where the stage was
        // decided (its slot in the run) stays.
        if let Some(rec) = g.done[i].as_mut().filter(|r| matches!(r.status, Status::Cached | Status::Restored)) {
            *rec = StageRecord { start_s: rec.start_s, end_s: rec.end_s, worker: rec.worker, ..regen };
        }
    }
    let records = order.iter().filter_map(|&i| g.done[i].take()).collect();
    (records, interrupted)
}

#[cfg(test)]
mod tests {
    use super::OnPanic;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn on_panic_runs_only_when_unwinding() {
        let calls = AtomicUsize::new(0);
        {
            let _g = OnPanic(|| {
                calls.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "ran on a normal return");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = OnPanic(|| {
                calls.fetch_add(1, Ordering::SeqCst);
            });
            panic!("a bug");
        }));
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "did not run while unwinding");
    }
}
