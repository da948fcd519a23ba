//! The scheduler: runs independent stages concurrently on a tokio runtime,
//! at most `--jobs` at a time. Stage work (hashing, commands, CPU-heavy
//! kinds) runs on blocking threads, never on the async worker. A failed stage
//! stops its dependents; independent stages finish.

use super::report::{Reporter, Verbosity};
use super::runs::{self, RunRecord, StageRecord, Status};
use super::{Engine, lock};
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
    /// `--openlineage-url` (else `DAGRUN_OPENLINEAGE_URL`): see `engine::openlineage`.
    pub openlineage_url: Option<String>,
    /// `--metrics-file` (else `metrics_file:` in config/dagrun.yaml): see `engine::run_metrics`.
    pub metrics_file: Option<PathBuf>,
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
pub fn run(pipeline: Pipeline, opts: &RunOptions) -> Result<RunOutcome> {
    let dagrun_dir = pipeline.workspace.join(super::DAGRUN_DIR);
    // Settings are checked before anything runs (a bad one is exit 2).
    let settings = crate::config::DagrunConfig::load(&pipeline.workspace)?;
    let lineage_url = super::openlineage::endpoint(opts.openlineage_url.as_deref())?;
    let metrics_file = opts.metrics_file.clone().or(settings.metrics_file);
    let _lock = lock::acquire(&dagrun_dir, opts.wait, &format!("dagrun run {}", pipeline.shown))?;
    let selected = select(&pipeline, &opts.targets)?;
    let forced = forced(&pipeline, &opts.force, &selected)?;
    let mut engine = Engine::new(pipeline);
    engine.forced = forced;
    engine.sweep_temp_files();
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

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(jobs + 2).build()?;
    let (records, interrupted) = rt.block_on(schedule(engine.clone(), selected, jobs, reporter.clone(), t0));
    reporter.done();

    // Plaintext never outlives the run, whatever happened.
    engine.shred_sensitive();
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
        status: match exit_code {
            exit::OK => "ok",
            exit::INTERRUPTED => "interrupted",
            _ => "failed",
        }
        .into(),
        exit_code,
        targets: opts.targets.clone(),
        forced: {
            let mut v: Vec<String> = engine.forced.iter().map(|&i| engine.stage(i).name.clone()).collect();
            v.sort();
            v
        },
        stages: records,
        params: engine.pipeline.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        jobs: Some(jobs as u32),
        openlineage: None,
    };
    for o in &engine.observers {
        o.run_finished(&engine, &mut record);
    }
    // A record that cannot be written (say the disk is full) must not hide
    // why the stages failed.
    let written = runs::write(&engine.pipeline.workspace, &record);

    if interrupted {
        if let Err(e) = &written {
            tracing::error!("cannot write the run record: {e:#}");
        }
        return Err(Failure::Interrupted.into());
    }
    if !failed.is_empty() {
        let mut msg = String::new();
        for f in &failed {
            msg.push_str(&format!("stage {} failed: {}\n", f.stage, f.error.as_deref().unwrap_or("unknown error")));
        }
        match &written {
            Ok(p) => msg.push_str(&format!("run {} recorded in {}", record.run_id, p.strip_prefix(&engine.pipeline.workspace).unwrap_or(p).display())),
            Err(e) => msg.push_str(&format!("run {}: the run record could not be written: {e:#}", record.run_id)),
        }
        return Err(Failure::Stages(msg).into());
    }
    let record_path = written?;

    let mut summary = Vec::new();
    for &i in &engine.pipeline.topo {
        let s = engine.stage(i);
        if record.stages.iter().any(|r| r.stage == s.name) {
            let outs: Vec<PathBuf> = s.outs.iter().map(|o| engine.pipeline.abs(&o.path)).collect();
            if let Some(line) = s.kind.summarize(s, &outs) {
                summary.push(line);
            }
        }
    }
    Ok(RunOutcome { record, record_path, summary })
}

fn skipped(name: &str, why: String) -> StageRecord {
    StageRecord { error: Some(why), ..StageRecord::new(name, Status::Skipped) }
}

async fn schedule(engine: Arc<Engine>, selected: HashSet<usize>, jobs: usize, reporter: Arc<Reporter>, t0: Instant) -> (Vec<StageRecord>, bool) {
    let p = &engine.pipeline;
    let n = p.stages.len();
    let mut indeg = vec![0usize; n];
    for &i in &selected {
        indeg[i] = p.upstream(i).iter().filter(|u| selected.contains(u)).count();
    }
    // Ready stages in topological (file) order.
    let order: Vec<usize> = p.topo.iter().copied().filter(|i| selected.contains(i)).collect();
    let rank: BTreeMap<usize, usize> = order.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    let mut ready: VecDeque<usize> = order.iter().copied().filter(|&i| indeg[i] == 0).collect();
    let mut done: Vec<Option<StageRecord>> = (0..n).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut running = 0usize;
    // Free scheduler slots (recorded as each stage's `worker`), lowest first.
    let mut free_slots: std::collections::BTreeSet<u32> = (0..jobs as u32).collect();
    let mut slot_of: BTreeMap<usize, u32> = BTreeMap::new();
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();

    loop {
        while running < jobs && !interrupted {
            let Some(i) = ready.pop_front() else { break };
            let eng = engine.clone();
            let rep = reporter.clone();
            rep.started(&eng.stage(i).name);
            let slot = free_slots.pop_first().unwrap_or(0);
            slot_of.insert(i, slot);
            set.spawn_blocking(move || {
                for o in &eng.observers {
                    o.stage_started(&eng, i);
                }
                let start = t0.elapsed().as_secs_f64();
                let mut rec = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| eng.execute(i))).unwrap_or_else(|panic| {
                    let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
                    let mut r = skipped(&eng.stage(i).name, format!("internal error (a bug in dagrun, please report it): {what}"));
                    r.status = Status::Failed;
                    r
                });
                rec.start_s = Some(start);
                rec.end_s = Some(t0.elapsed().as_secs_f64().max(start));
                rec.worker = Some(slot);
                for o in &eng.observers {
                    o.stage_finished(&eng, i, &rec);
                }
                (i, rec)
            });
            running += 1;
        }
        if running == 0 {
            break;
        }
        let joined = tokio::select! {
            j = set.join_next() => j,
            _ = &mut ctrl_c, if !interrupted => { interrupted = true; engine.cancel.store(true, Ordering::SeqCst); continue; }
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } }, if !interrupted => {
                interrupted = true; engine.cancel.store(true, Ordering::SeqCst); continue;
            }
        };
        let Some(joined) = joined else { break };
        running -= 1;
        let (i, rec) = match joined {
            Ok(x) => {
                if let Some(slot) = slot_of.remove(&x.0) {
                    free_slots.insert(slot);
                }
                x
            }
            Err(e) => {
                // A panicking stage: report it as a failure, never crash the run.
                tracing::error!("a stage thread panicked: {e}");
                continue;
            }
        };
        reporter.finished(&rec);
        let ok = rec.status != Status::Failed;
        done[i] = Some(rec);
        let mut down: Vec<usize> = p.downstream(i).into_iter().filter(|d| selected.contains(d)).collect();
        down.sort_by_key(|d| rank[d]);
        for d in down {
            if !ok {
                for x in p.with_descendants(&[d]) {
                    if selected.contains(&x) && done[x].is_none() {
                        let r = skipped(&p.stages[x].name, format!("upstream stage {} failed", p.stages[i].name));
                        reporter.finished(&r);
                        done[x] = Some(r);
                        indeg[x] = usize::MAX;
                    }
                }
                continue;
            }
            if indeg[d] == usize::MAX {
                continue;
            }
            indeg[d] -= 1;
            if indeg[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    for &i in &order {
        if done[i].is_none() {
            let why = if interrupted { "run interrupted".to_string() } else { "not reached".to_string() };
            done[i] = Some(skipped(&p.stages[i].name, why));
        }
    }
    let records = order.iter().filter_map(|&i| done[i].take()).collect();
    (records, interrupted)
}
