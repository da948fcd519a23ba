//! Run metrics: `--metrics-file PATH` (or `metrics_file:` in
//! `config/dagrun.yaml`) gets the run's metrics in Prometheus text format,
//! for node_exporter's textfile collector.
//!
//! Rules:
//! - Written when the run ends — ok, failed or interrupted — atomically (temp
//!   file in the same folder, named `.NAME.dagrun-tmp.…` so the collector,
//!   which reads `*.prom`, never sees a half-written file; then rename).
//! - One file may serve several pipelines (`metrics_file:` is
//!   workspace-wide): the series of other pipelines in the file it replaces
//!   are kept (read back as untrusted input: a file that is not what dagrun
//!   writes is replaced whole, with a warning). A pipeline's series stay
//!   until a run of it writes the file again (review 69: a failed
//!   pipeline's series vanished when another pipeline ran, and its alert
//!   resolved).
//! - A run of some stages (`run PIPELINE STAGE…`, `targets` in its record)
//!   is not a success of the pipeline: it does not move
//!   `dagrun_last_success_timestamp_seconds`, and the file keeps this
//!   pipeline's old series about every stage, and every tenant's model and
//!   drift, the run wrote nothing about (a stage it did not select keeps
//!   the status of the last run that did). A whole run replaces all of the
//!   pipeline's series.
//! - The time of the last successful run of each pipeline is kept in
//!   `.dagrun/metrics/last-success.json` (read back as untrusted input), so
//!   `dagrun_last_success_timestamp_seconds` stays true across failed runs and
//!   an alert "no successful run in 26 h" works; 0 if there never was one.
//! - Only names, statuses, counts, times and model-quality numbers: never a
//!   data value. Row counts, AUC and model versions come from the stages'
//!   facts (cached stages keep the facts of the execution they reuse).
//! - A metrics file that cannot be written is a warning, never a failed run
//!   (the staleness alert catches it).
//! - `models promote` / `models rollback` mark the new champion in the file
//!   (`--metrics-file`, or `metrics_file:` of `config/dagrun.yaml`):
//!   [`mark_champion`].
//! - A run that does not start because the pipeline or the workspace's
//!   settings do not load (exit 2) still writes its run series as failed
//!   when the file is known (`--metrics-file`, or `metrics_file:` of a
//!   `config/dagrun.yaml` that loads): [`write_failed_start`].
//! - OpenLineage: `dagrun_openlineage_pending_events` counts the events
//!   waiting in every spool of the workspace when the run ends (this run's
//!   endpoint's and the others': the record's `pending` +
//!   `pending_other_endpoints`), so a backlog left for another endpoint still
//!   shows; `dagrun_openlineage_dropped_events` the events this run gave up
//!   (refused by the endpoint: `lineage::transport`).
//!
//! Hooks for work landing in parallel:
//! - **Champion** ([`champion_version`]): the model registry's
//!   `.dagrun/registry/TENANT/champion.json` when the tenant has a registry
//!   (none while no version is promoted: `promote: manual`); for a tenant
//!   without one, the model `predict` uses, i.e. the one at the train
//!   stage's `output:`.
//! - **Drift** ([`drift_rows`]): for every stage of kind `drift`, its JSON
//!   report (`with.output`, format `dagrun-drift/1`: `max_psi`,
//!   `features[{name, psi}]`), read when the record's hash matches it, or —
//!   when the gate failed the stage — when it was written during this run.

use super::Engine;
use super::observer::RunObserver;
use super::runs::{RunRecord, RunStatus, Status};
use crate::util::prometheus::{Exposition, Kind};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Writes the metrics file at the end of a run.
pub struct RunMetrics {
    path: PathBuf,
}

const STAGE_STATUSES: [Status; 5] = [Status::Ran, Status::Cached, Status::Restored, Status::Failed, Status::Skipped];
const LAST_SUCCESS_FORMAT: &str = "dagrun-last-success/1";
const MAX_STATE_BYTES: u64 = 1 << 20;

impl RunMetrics {
    /// Also removes what a killed run may have left of an earlier write of
    /// `path` (its temporary files; the collector ignores them anyway).
    pub fn new(path: PathBuf) -> RunMetrics {
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            let prefix = format!(".{}{}", name.to_string_lossy(), crate::util::atomic::TEMP_MARKER);
            if let Ok(rd) = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        RunMetrics { path }
    }
}

fn unix_seconds(rfc3339: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339).ok().map(|t| t.timestamp_millis() as f64 / 1000.0)
}

fn last_success_path(dagrun_dir: &Path) -> PathBuf {
    dagrun_dir.join("metrics").join("last-success.json")
}

/// Pipeline → time of its last successful run (unix seconds).
fn load_last_success(dagrun_dir: &Path) -> BTreeMap<String, f64> {
    let p = last_success_path(dagrun_dir);
    let parsed = (|| {
        let v: Value = serde_json::from_slice(&crate::util::read_capped(&p, MAX_STATE_BYTES).ok()?).ok()?;
        if v.get("format")?.as_str()? != LAST_SUCCESS_FORMAT {
            return None;
        }
        let m = v.get("pipelines")?.as_object()?;
        Some(m.iter().filter_map(|(k, t)| t.as_f64().filter(|t| t.is_finite() && *t > 0.0).map(|t| (k.clone(), t))).collect::<BTreeMap<_, _>>())
    })();
    if parsed.is_none() && p.exists() {
        tracing::warn!("{} is not a valid last-success record; starting a new one", p.display());
    }
    parsed.unwrap_or_default()
}

fn store_last_success(dagrun_dir: &Path, m: &BTreeMap<String, f64>) -> anyhow::Result<()> {
    let v = serde_json::json!({"format": LAST_SUCCESS_FORMAT, "pipelines": m});
    crate::util::atomic::write_json_atomic(&last_success_path(dagrun_dir), &v)
}

/// A name that is safe as a label value coming from a file (feature names,
/// model versions): short, printable, no quotes.
fn plain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']' | ':'))
}

/// The champion model version of `tenant` (see the module doc), given the
/// version the train stage just produced or reused.
pub fn champion_version(dagrun_dir: &Path, tenant: &str, trained: Option<&str>) -> Option<String> {
    let dir = dagrun_dir.join("registry").join(tenant);
    let p = dir.join("champion.json");
    // A tenant with registered models but none promoted has no champion.
    if p.exists() || dir.is_dir() {
        let v: Value = crate::util::read_capped(&p, MAX_STATE_BYTES).ok().and_then(|b| serde_json::from_slice(&b).ok())?;
        let ok_tenant = v.get("tenant").and_then(Value::as_str) == Some(tenant);
        return v.get("version").and_then(Value::as_str).filter(|s| ok_tenant && plain(s)).map(str::to_string);
    }
    trained.map(str::to_string)
}

/// One drift report's rows: (feature, psi) and its max_psi.
pub struct DriftRows {
    pub tenant: String,
    pub max_psi: f64,
    pub features: Vec<(String, f64)>,
    /// The report's status (`ok`, `warn`, `fail`, `accepted`, `no_reference`).
    pub status: Option<&'static str>,
}

/// The statuses a drift report may have (`stages::drift::DriftStatus`).
const DRIFT_STATUSES: [&str; 5] = ["ok", "warn", "fail", "accepted", "no_reference"];

/// Parse a `dagrun-drift/1` report (untrusted: only plain names, finite
/// numbers and a known status).
fn parse_drift_report(bytes: &[u8]) -> Option<(f64, Vec<(String, f64)>, Option<&'static str>)> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    if v.get("format")?.as_str()? != "dagrun-drift/1" {
        return None;
    }
    let status = v.get("status").and_then(Value::as_str).and_then(|s| DRIFT_STATUSES.iter().copied().find(|k| *k == s));
    let max_psi = v.get("max_psi")?.as_f64().filter(|x| x.is_finite())?;
    let features = v
        .get("features")?
        .as_array()?
        .iter()
        .filter_map(|f| {
            let name = f.get("name")?.as_str().filter(|n| plain(n))?;
            let psi = f.get("psi")?.as_f64().filter(|x| x.is_finite())?;
            Some((name.to_string(), psi))
        })
        .collect();
    Some((max_psi, features, status))
}

/// The run-level series of a pipeline's last run.
struct RunSeries {
    status: RunStatus,
    exit_code: i32,
    start: Option<f64>,
    end: Option<f64>,
    seconds: f64,
    last_success: Option<f64>,
}

/// Add `run`'s run-level series (every family but `dagrun_run_info`): one
/// place for a run's ([`render`]) and a run's that did not start
/// ([`write_failed_start`]).
fn run_series(e: &mut Exposition, pipeline: &str, run: &RunSeries) {
    let g = Kind::Gauge;
    e.family("dagrun_run_status", g, "Outcome of the last run: 1 for its status, 0 for the others.");
    for st in RunStatus::ALL {
        e.sample("dagrun_run_status", &[("pipeline", pipeline), ("status", st.as_str())], if run.status == st { 1.0 } else { 0.0 });
    }
    e.family("dagrun_run_success", g, "1 if the last run succeeded (exit code 0), else 0.");
    e.sample("dagrun_run_success", &[("pipeline", pipeline)], if run.status == RunStatus::Ok { 1.0 } else { 0.0 });
    e.family("dagrun_run_exit_code", g, "Exit code of the last run (0 ok, 1 a stage failed, 130 interrupted).");
    e.sample("dagrun_run_exit_code", &[("pipeline", pipeline)], run.exit_code as f64);
    e.family("dagrun_run_start_timestamp_seconds", g, "Start of the last run (Unix time).");
    e.family("dagrun_run_end_timestamp_seconds", g, "End of the last run (Unix time).");
    if let Some(t) = run.start {
        e.sample("dagrun_run_start_timestamp_seconds", &[("pipeline", pipeline)], t);
    }
    if let Some(t) = run.end {
        e.sample("dagrun_run_end_timestamp_seconds", &[("pipeline", pipeline)], t);
    }
    e.family("dagrun_run_duration_seconds", g, "Wall time of the last run.");
    e.sample("dagrun_run_duration_seconds", &[("pipeline", pipeline)], run.seconds);
    e.family("dagrun_last_success_timestamp_seconds", g, "End of the last successful run (Unix time; 0 if none yet). Kept across failed runs.");
    e.sample("dagrun_last_success_timestamp_seconds", &[("pipeline", pipeline)], run.last_success.unwrap_or(0.0));
}

/// Write `e` to the metrics file `path` of `workspace`, atomically, checked
/// at the moment of writing (a symlink planted on the way since is
/// refused); a failure is a warning, never an error (module rules).
fn write_metrics_file(path: &Path, workspace: &Path, e: &Exposition) {
    if let Err(err) = crate::workspace::Workspace::at(workspace).check_user_output(path, "the metrics file") {
        tracing::warn!("not writing the metrics file: {err:#}");
    } else if let Err(err) = crate::util::atomic::write_atomic(path, e.render().as_bytes()) {
        tracing::warn!("cannot write the metrics file: {err:#}");
    }
}

/// Drift rows of the run (see the module doc).
pub fn drift_rows(engine: &Engine, record: &RunRecord) -> Vec<DriftRows> {
    let mut out = Vec::new();
    let started = chrono::DateTime::parse_from_rfc3339(&record.started_at).ok().map(std::time::SystemTime::from);
    for r in &record.stages {
        let Some(s) = engine.pipeline.stages.iter().find(|s| s.name == r.stage) else { continue };
        // The stage's typed params exist only for a drift stage.
        let Some(p) = crate::stages::params::get::<crate::stages::drift::DriftWith>(s) else { continue };
        let rel = p.output.0.as_str();
        let abs = engine.pipeline.abs(rel);
        // Read once (a regular file, never a FIFO or a device), then judged.
        let Ok(bytes) = crate::util::read_capped(&abs, crate::stages::MAX_REPORT_BYTES) else { continue };
        let trusted = match r.status {
            Status::Ran | Status::Cached | Status::Restored => r.outputs.get(rel).is_some_and(|h| blake3::hash(&bytes).to_hex().as_str() == h),
            // The gate failed the stage after writing the report: use it if it is this run's.
            Status::Failed => {
                let mtime = std::fs::metadata(&abs).and_then(|m| m.modified()).ok();
                matches!((mtime, started), (Some(m), Some(s)) if m >= s)
            }
            Status::Skipped => false,
        };
        if !trusted {
            continue;
        }
        if let Some((max_psi, features, status)) = parse_drift_report(&bytes) {
            out.push(DriftRows { tenant: s.tenant.clone().unwrap_or_default(), max_psi, features, status });
        }
    }
    out
}

/// The metrics of a finished run.
pub fn render(engine: &Engine, record: &RunRecord, last_success: Option<f64>) -> Exposition {
    let pipeline = record.pipeline.as_str();
    let mut e = Exposition::new();
    let g = Kind::Gauge;
    e.family("dagrun_run_info", g, "The last run of the pipeline (1); labels name it.");
    e.sample("dagrun_run_info", &[("pipeline", pipeline), ("run_id", &record.run_id)], 1.0);
    let run = RunSeries {
        status: record.status,
        exit_code: record.exit_code,
        start: unix_seconds(&record.started_at),
        end: unix_seconds(&record.finished_at),
        seconds: record.seconds,
        last_success,
    };
    run_series(&mut e, pipeline, &run);

    e.family("dagrun_stage_status", g, "Outcome of each stage in the last run: 1 for its status, 0 for the others.");
    e.family("dagrun_stage_duration_seconds", g, "Wall time of each stage in the last run.");
    for r in &record.stages {
        let tenant = engine.pipeline.stages.iter().find(|s| s.name == r.stage).and_then(|s| s.tenant.clone()).unwrap_or_default();
        for st in STAGE_STATUSES {
            e.sample(
                "dagrun_stage_status",
                &[("pipeline", pipeline), ("stage", &r.stage), ("tenant", &tenant), ("status", st.as_str())],
                if r.status == st { 1.0 } else { 0.0 },
            );
        }
        e.sample("dagrun_stage_duration_seconds", &[("pipeline", pipeline), ("stage", &r.stage), ("tenant", &tenant)], r.seconds);
    }

    e.family("dagrun_tenant_rows", g, "Rows per tenant, as counted by each stage that reports rows.");
    e.family("dagrun_model_rows", g, "Rows the tenant's model was trained and tested on.");
    e.family("dagrun_model_test_auc", g, "Test AUC of the tenant's model from the last run.");
    e.family("dagrun_model_min_auc", g, "The AUC gate (min_auc) of the tenant's train stage.");
    e.family("dagrun_model_champion", g, "1 if the model is the tenant's champion (at the run's end; models promote/rollback update it), else 0.");
    for r in &record.stages {
        let Some(s) = engine.pipeline.stages.iter().find(|s| s.name == r.stage) else { continue };
        let Some(tenant) = s.tenant.as_deref() else { continue };
        if let Some(rows) = r.facts.get("rows").and_then(Value::as_f64) {
            e.sample("dagrun_tenant_rows", &[("pipeline", pipeline), ("tenant", tenant), ("stage", &s.base)], rows);
        }
        if s.kind.name() != "train" {
            continue;
        }
        if let Some(p) = crate::stages::params::get::<crate::stages::train::TrainWith>(s) {
            e.sample("dagrun_model_min_auc", &[("pipeline", pipeline), ("tenant", tenant)], p.min_auc.0);
        }
        let version = r.facts.get("model_version").and_then(Value::as_str).filter(|v| plain(v));
        let Some(version) = version else { continue };
        for (split, key) in [("train", "rows_train"), ("test", "rows_test")] {
            if let Some(n) = r.facts.get(key).and_then(Value::as_f64) {
                e.sample("dagrun_model_rows", &[("pipeline", pipeline), ("tenant", tenant), ("model_version", version), ("split", split)], n);
            }
        }
        if let Some(auc) = r.facts.get("auc").and_then(Value::as_f64) {
            e.sample("dagrun_model_test_auc", &[("pipeline", pipeline), ("tenant", tenant), ("model_version", version)], auc);
        }
        let champion = champion_version(&engine.dagrun_dir, tenant, Some(version));
        e.sample(
            "dagrun_model_champion",
            &[("pipeline", pipeline), ("tenant", tenant), ("model_version", version)],
            if champion.as_deref() == Some(version) { 1.0 } else { 0.0 },
        );
    }

    e.family("dagrun_feature_drift_psi", g, "Population stability index of each feature (drift stage, 10 quantile bins of the reference).");
    e.family("dagrun_drift_max_psi", g, "The drift gate (max_psi) of the tenant's drift stage.");
    e.family(
        "dagrun_drift_status",
        g,
        "Verdict of the tenant's drift report: 1 for its status (ok, warn, fail, accepted: above max_psi but a model was trained on this data, no_reference), 0 for the others.",
    );
    for d in drift_rows(engine, record) {
        e.sample("dagrun_drift_max_psi", &[("pipeline", pipeline), ("tenant", &d.tenant)], d.max_psi);
        if let Some(status) = d.status {
            for st in DRIFT_STATUSES {
                e.sample("dagrun_drift_status", &[("pipeline", pipeline), ("tenant", &d.tenant), ("status", st)], if st == status { 1.0 } else { 0.0 });
            }
        }
        for (feature, psi) in &d.features {
            e.sample("dagrun_feature_drift_psi", &[("pipeline", pipeline), ("tenant", &d.tenant), ("feature", feature)], *psi);
        }
    }

    e.family(
        "dagrun_openlineage_pending_events",
        g,
        "OpenLineage events waiting in the workspace's spools after the run: for this run's endpoint and for any other (each sent by the next run with its endpoint).",
    );
    e.family(
        "dagrun_openlineage_dropped_events",
        g,
        "OpenLineage events this run gave up because the endpoint refused them (kept in .dagrun/openlineage/dropped.jsonl).",
    );
    if let Some(ol) = record.openlineage.as_ref() {
        let n = |k: &str| ol.get(k).and_then(Value::as_f64);
        if n("pending").is_some() || n("pending_other_endpoints").is_some() {
            let p = n("pending").unwrap_or(0.0) + n("pending_other_endpoints").unwrap_or(0.0);
            e.sample("dagrun_openlineage_pending_events", &[("pipeline", pipeline)], p);
        }
        e.sample("dagrun_openlineage_dropped_events", &[("pipeline", pipeline)], n("dropped").unwrap_or(0.0));
    }
    e
}

/// Largest metrics file read back (to keep other pipelines' series).
const MAX_METRICS_BYTES: u64 = 16 << 20;

/// What a sample of a pipeline says something about: a stage, else a
/// tenant, else the run (none). A targeted run replaces the old samples of a
/// family whose subject it wrote a sample about.
fn subject(labels: &[(String, String)]) -> Option<(String, String)> {
    ["stage", "tenant"].iter().find_map(|k| labels.iter().find(|(n, _)| n == k).cloned())
}

/// The metrics file at `path` as dagrun wrote it; `None` when it is missing,
/// cannot be read, or is not what dagrun writes (warned: what the reading
/// was `for`, and what happens `then`).
fn read_metrics_file(path: &Path, r#for: &str, then: &str) -> Option<Exposition> {
    let bytes = match crate::util::read_capped(path, MAX_METRICS_BYTES) {
        Ok(b) => b,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => {
            tracing::warn!("cannot read the metrics file {} to {}: {err}; {then}", path.display(), r#for);
            return None;
        }
    };
    match std::str::from_utf8(&bytes).map_err(|_| "not UTF-8".to_string()).and_then(Exposition::parse) {
        Ok(e) => Some(e),
        Err(why) => {
            tracing::warn!("the metrics file {} is not one dagrun wrote ({why}); {then}", path.display());
            None
        }
    }
}

/// Add to `e` (this run's metrics) the samples of the file it replaces that
/// stay true (module rules): other pipelines' series; for a targeted run,
/// also this pipeline's series about stages and tenants it did not write
/// anything about. A file that is not what dagrun writes is replaced whole,
/// with a warning.
fn keep_from_old_file(e: &mut Exposition, path: &Path, pipeline: &str, targeted: bool) {
    let Some(old) = read_metrics_file(path, "keep other pipelines' series", "it is replaced whole") else { return };
    let written: Vec<(String, Option<(String, String)>)> = e.samples().map(|(n, _, _, l, _)| (n.to_string(), subject(l))).collect();
    for (name, kind, help, labels, v) in old.samples() {
        let Some(p) = labels.iter().find(|(k, _)| k == "pipeline").map(|(_, p)| p.as_str()) else { continue };
        let keep = if p != pipeline {
            true
        } else {
            let s = subject(labels);
            targeted && !written.iter().any(|(n, w)| n == name && *w == s)
        };
        if keep && !e.has_sample(name, labels) {
            e.family(name, kind, help);
            let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            e.sample(name, &l, v);
        }
    }
}

/// A run that ended before any stage ran because the pipeline or the
/// workspace's settings did not load (exit 2: a config error): the
/// pipeline's run series say so — `dagrun_run_success` 0, the exit code,
/// status `failed`, the end time — so `DagrunRunFailed` fires that night,
/// not the 26 h staleness alert a day later (helper-72: the file kept the
/// last run's success). Its other series stay as the last run left them;
/// `dagrun_last_success_timestamp_seconds` stays the last success. Written
/// under the workspace lock, and not at all while a run holds it. A file
/// that cannot be written is a warning (the run's own error is the news).
pub fn write_failed_start(path: &Path, workspace: &Path, pipeline: &str, exit_code: i32) {
    let ws = crate::workspace::Workspace::at(workspace);
    if let Err(e) = ws.check_user_output(path, "the metrics file") {
        tracing::warn!("not writing the metrics file: {e:#}");
        return;
    }
    let dagrun_dir = workspace.join(crate::workspace::DAGRUN_DIR);
    // Under the workspace lock, as a run writes the file: never over a run
    // under way (its own end writes the truth), never racing its write.
    let _lock = if dagrun_dir.is_dir() {
        match ws.lock(None, "dagrun run (the metrics of a run that did not start)") {
            Ok(l) => Some(l),
            Err(_) => return,
        }
    } else {
        None
    };
    let last = load_last_success(&dagrun_dir);
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let mut e = Exposition::new();
    let run = RunSeries {
        status: RunStatus::Failed,
        exit_code,
        start: Some(now),
        end: Some(now),
        seconds: 0.0,
        last_success: Some(last.get(pipeline).copied().unwrap_or(0.0)),
    };
    run_series(&mut e, pipeline, &run);
    // Every other series of this pipeline as the last run left it: no stage ran.
    keep_from_old_file(&mut e, path, pipeline, true);
    write_metrics_file(path, workspace, &e);
}

/// After `models promote` / `models rollback`: the metrics file's
/// `dagrun_model_champion` series of `tenant` say that `version` is its
/// champion now (1 for it, added where missing, 0 for the others), in every
/// pipeline that has such series; nothing else changes (helper-72: the file
/// named the champion as of the run's end, so the model a promotion step
/// made champion after the run read 0 until the next night). A missing file
/// is left missing; one that is not what dagrun writes is left alone, with a
/// warning.
pub fn mark_champion(path: &Path, workspace: &Path, tenant: &str, version: &str) {
    const FAMILY: &str = "dagrun_model_champion";
    let Some(mut e) = read_metrics_file(path, "mark the new champion", "the new champion is not marked in it") else { return };
    let label = |l: &[(String, String)], k: &str| l.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let ours: Vec<(Vec<(String, String)>, String)> = e
        .samples()
        .filter(|(n, ..)| *n == FAMILY)
        .filter(|(_, _, _, l, _)| label(l, "tenant").as_deref() == Some(tenant))
        .filter_map(|(_, _, _, l, _)| Some((l.to_vec(), label(l, "pipeline")?)))
        .collect();
    if ours.is_empty() || !plain(version) {
        return;
    }
    for (labels, _) in &ours {
        let is = label(labels, "model_version").as_deref() == Some(version);
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        e.sample(FAMILY, &l, if is { 1.0 } else { 0.0 });
    }
    let pipelines: std::collections::BTreeSet<&String> = ours.iter().map(|(_, p)| p).collect();
    for p in pipelines {
        e.sample(FAMILY, &[("pipeline", p), ("tenant", tenant), ("model_version", version)], 1.0);
    }
    write_metrics_file(path, workspace, &e);
}

impl RunObserver for RunMetrics {
    fn run_finished(&self, engine: &Engine, record: &mut RunRecord) {
        let mut last = load_last_success(&engine.dagrun_dir);
        // A run of some stages (`run PIPELINE STAGE…`) is no success of the pipeline.
        let targeted = !record.targets.is_empty();
        if record.status == RunStatus::Ok
            && !targeted
            && let Some(t) = unix_seconds(&record.finished_at)
        {
            last.insert(record.pipeline.clone(), t);
            if let Err(e) = store_last_success(&engine.dagrun_dir, &last) {
                tracing::warn!("cannot record the time of this successful run: {e:#}");
            }
        }
        let mut metrics = render(engine, record, last.get(&record.pipeline).copied());
        keep_from_old_file(&mut metrics, &self.path, &record.pipeline, targeted);
        // Checked when the run started, and again now: a stage may have
        // planted a symlink on the way since.
        write_metrics_file(&self.path, &engine.pipeline.workspace, &metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_reports_are_read_as_untrusted_input() {
        let report = br#"{"format":"dagrun-drift/1","tenant":"Tenant_A","max_psi":0.25,"features":[
                {"name":"Recency_Days","psi":0.31},{"name":"bad\"name","psi":0.5},{"name":"Login_Count","psi":"x"},{"name":"Purchase_Amount","psi":0.02}]}"#;
        let (max, rows, status) = parse_drift_report(report).unwrap();
        assert_eq!(max, 0.25);
        assert_eq!(rows, vec![("Recency_Days".to_string(), 0.31), ("Purchase_Amount".to_string(), 0.02)]);
        assert_eq!(status, None, "no status: none");
        let with =
            |st: &str| parse_drift_report(format!(r#"{{"format":"dagrun-drift/1","status":"{st}","max_psi":0.25,"features":[]}}"#).as_bytes()).unwrap().2;
        assert_eq!((with("accepted"), with("fail"), with("evil} 1")), (Some("accepted"), Some("fail"), None));
        assert!(parse_drift_report(br#"{"format":"other/1","max_psi":0.25,"features":[]}"#).is_none());
        assert!(parse_drift_report(b"not json").is_none());
    }

    #[test]
    fn the_champion_is_the_registry_s_when_there_is_one_else_the_trained_model() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(champion_version(d.path(), "Tenant_A", Some("Tenant_A-1")).as_deref(), Some("Tenant_A-1"));
        let reg = d.path().join("registry/Tenant_A");
        std::fs::create_dir_all(&reg).unwrap();
        // Registered, none promoted (`promote: manual`): no champion.
        assert_eq!(champion_version(d.path(), "Tenant_A", Some("Tenant_A-1")), None);
        std::fs::write(reg.join("champion.json"), r#"{"format":"dagrun-registry-champion/1","tenant":"Tenant_A","version":"Tenant_A-0","previous":[]}"#)
            .unwrap();
        assert_eq!(champion_version(d.path(), "Tenant_A", Some("Tenant_A-1")).as_deref(), Some("Tenant_A-0"));
        // Another tenant's champion file, or a version with odd characters, names no champion.
        std::fs::write(reg.join("champion.json"), r#"{"tenant":"Tenant_B","version":"Tenant_B-0"}"#).unwrap();
        assert_eq!(champion_version(d.path(), "Tenant_A", Some("Tenant_A-1")), None);
        std::fs::write(reg.join("champion.json"), r#"{"tenant":"Tenant_A","version":"a\"} 1\nx"}"#).unwrap();
        assert_eq!(champion_version(d.path(), "Tenant_A", Some("Tenant_A-1")), None);
    }

    #[test]
    fn the_last_success_record_is_untrusted() {
        let d = tempfile::tempdir().unwrap();
        assert!(load_last_success(d.path()).is_empty());
        let m: BTreeMap<String, f64> = [("p.yaml".to_string(), 1.8e9)].into();
        store_last_success(d.path(), &m).unwrap();
        assert_eq!(load_last_success(d.path()), m);
        std::fs::write(last_success_path(d.path()), r#"{"format":"dagrun-last-success/1","pipelines":{"a":-1,"b":"x","c":5}}"#).unwrap();
        assert_eq!(load_last_success(d.path()), [("c".to_string(), 5.0)].into());
        std::fs::write(last_success_path(d.path()), "garbage").unwrap();
        assert!(load_last_success(d.path()).is_empty());
    }
}
