//! OpenLineage emission: turns the run (pipeline, stages, records) into
//! OpenLineage run events ([`crate::lineage`] holds the types and writers).
//!
//! What is emitted (see the README, "OpenLineage"):
//! - one job for the pipeline (`jobType` DAG) and one per started stage
//!   (`jobType` TASK), in namespace `dagrun://HOST/WORKSPACE-ID`, named
//!   `PIPELINE` and `PIPELINE.STAGE` (`PIPELINE` = the pipeline file's
//!   workspace-relative path without `.yaml`);
//! - per job run: `START`, then exactly one of `COMPLETE` (ran, cached or
//!   restored: the `dagrun` run facet says `workDone: false` for the last
//!   two), `FAIL` (with `errorMessage`) or `ABORT` (interrupted; or killed:
//!   then sent by the next run, see [`crate::lineage::recover`]); every stage
//!   run has a `parent` facet naming the pipeline run;
//! - datasets: namespace `dagrun://HOST/WORKSPACE-ID/TENANT` (the tenant of
//!   the stage that writes the path; for a source file, of the stages that
//!   read it when they all share one tenant; otherwise `_shared`), name = the
//!   workspace-relative path, `version` facet = its blake3, `schema` facet =
//!   the Parquet schema (column names and types) when the path is a Parquet
//!   file or a folder with exactly one;
//! - stage params (`with:` and the pipeline params the stage uses) in the
//!   `executionParameters` run facet; pipeline params on the pipeline run.
//!
//! Never in an event: a data value, a key, a token, an environment variable
//! or a `cmd:` string (a command line may carry credentials).
//!
//! Delivery (rules in [`crate::lineage::transport`]): a run sends the backlog
//! of its own endpoint's spool only, never another endpoint's (review 69 H1;
//! the older single `pending.jsonl` goes to the first run whose endpoint comes
//! from `DAGRUN_OPENLINEAGE_URL`: `adopt_legacy_spool`); at its end it gives
//! up what the endpoint refused for good (appended to `dropped.jsonl`,
//! counted, said once), spools the rest, and records `delivered`, `rejected`,
//! `dropped`, `pending` and `pending_other_endpoints`.

use super::Engine;
use super::observer::RunObserver;
use super::runs::{RunRecord, RunStatus, StageRecord, Status};
use crate::crypto::IntegrityKey;
use crate::lineage::event::{self, EventType, Facets, Field, Job, Run, RunEvent, json_of, push_json, push_str_json};
use crate::lineage::recover::{self, OpenRuns, SentTo};
use crate::lineage::transport::{self, DROP_AFTER_RUNS, FLUSH_GRACE, FileSink, HttpOutcome, HttpSink, Refused, Spool};
use crate::lineage::{TOKEN_ENV, URL_ENV, ids};
use crate::util::redact::redact_url;
use anyhow::Result;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{LazyLock, Mutex};

/// Tenant segment of datasets no single tenant owns.
pub const SHARED: &str = "_shared";

/// A stage's error as events carry it: its first line only. What follows
/// is the end of a command's stderr or of a Slurm job's log (`stages::cmd`,
/// `executor::slurm`), which may quote data values; it stays in the local run
/// record and log, never goes to a catalog (review 13).
fn error_for_events(error: &str) -> String {
    match error.split_once('\n') {
        None => error.to_string(),
        Some((first, _)) => format!("{} (not sent with lineage events: see the run record)", first.trim_end_matches(':')),
    }
}

/// A run's endpoint: its checked lineage URL (`URL/api/v1/lineage`), and
/// whether it comes from `DAGRUN_OPENLINEAGE_URL` (the standing setting) rather
/// than `--openlineage-url` (ad hoc): only the former takes the spool of a
/// dagrun from before spools were per endpoint (`lineage::transport`).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub from_env: bool,
}

/// The endpoint to use: `--openlineage-url`, else `DAGRUN_OPENLINEAGE_URL`
/// (empty = none). Checked here so a bad URL stops the run before it starts.
pub fn endpoint(flag: Option<&str>) -> Result<Option<Endpoint>> {
    let url = match flag {
        Some(u) => Some(u.to_string()),
        None => std::env::var(URL_ENV).ok(),
    };
    match url.filter(|u| !u.trim().is_empty()) {
        None => Ok(None),
        Some(u) => crate::lineage::transport::lineage_url(&u).map(|url| Some(Endpoint { url, from_env: flag.is_none() })).map_err(|m| {
            let from = if flag.is_some() { "--openlineage-url" } else { URL_ENV };
            crate::error::config(format!("{from}: {m}"))
        }),
    }
}

/// Emits a run's OpenLineage events to `runs/RUN_ID.openlineage.jsonl` and,
/// when configured, to an HTTP endpoint.
pub struct OpenLineage {
    file: FileSink,
    file_shown: String,
    http: Mutex<Option<HttpSink>>,
    /// The endpoint's spool (none without an endpoint or the workspace key).
    spool: Option<Spool>,
    /// The first event of the spool when the run started, and at how many
    /// runs in a row it had been refused: see `lineage::transport`.
    spool_head: Option<String>,
    head_refused_runs: u32,
    /// Marks this run open until its last event is out.
    open: OpenRuns,
    run_id: String,
    /// Killed earlier runs closed at the start of this one: (run id, ABORT events).
    closed_killed: Vec<(String, usize)>,
    /// This run is marked open (at its first event that opens a run in the file).
    marked: std::sync::atomic::AtomicBool,
    /// Events held back, each line ending in a newline, and their count:
    /// their loss leaves no run open (see [`OpenLineage::hold`]).
    held: Mutex<(String, usize)>,
    /// Stages started whose `START` is not out yet: its time.
    starts: Mutex<HashMap<usize, String>>,
    namespace: String,
    dataset_base: String,
    pipeline_job: String,
    pipeline_run: String,
    /// Per dataset path: the start of its JSON object (namespace and name).
    dataset_heads: HashMap<String, String>,
    /// The parts of a stage's events that do not change during the run,
    /// serialized once (see [`OpenLineage::stage_line`]).
    parent_json: String,
    /// `,"producer":…,"schemaURL":…}`: the end of every event line.
    tail_json: String,
    stage_parts: Vec<StageParts>,
    schemas: Mutex<HashMap<(String, String), Option<Vec<Field>>>>,
    /// Content hash of every path written (or read from the sources) so far in
    /// this run: the versions of a stage's inputs.
    versions: Mutex<HashMap<String, String>>,
}

/// A stage's event parts that are the same in every event of the run, as JSON.
struct StageParts {
    run_id: String,
    /// The `dagrun` run facet of the stage's `START` event.
    start_dagrun: String,
    /// `executionParameters` run facet, when the stage has parameters.
    params: Option<String>,
    /// The whole `job` object.
    job: String,
}

fn job_name_of(shown: &str) -> String {
    let s = shown.strip_suffix(".yaml").or_else(|| shown.strip_suffix(".yml")).unwrap_or(shown);
    s.to_string()
}

impl StageParts {
    /// `task_job_type`: the `jobType` facet of a stage (TASK) as JSON.
    fn new(engine: &Engine, i: usize, namespace: &str, pipeline_job: &str, start_ms: u64, task_job_type: &str) -> StageParts {
        let s = engine.stage(i);
        let job_name = format!("{pipeline_job}.{}", s.name);
        let params = (!s.with.is_empty() || !s.param_refs.is_empty() || s.tenant.is_some()).then(|| {
            let mut params: BTreeMap<String, Value> = s.with.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            for (k, v) in &s.param_refs {
                params.insert(format!("params.{k}"), v.clone());
            }
            if let Some(t) = &s.tenant {
                params.insert("tenant".into(), Value::String(t.clone()));
            }
            json_of(&event::parameters_facet(&params))
        });
        // The `job` object: namespace, name, facets (sorted: documentation, jobType).
        let mut job = String::with_capacity(400);
        job.push_str("{\"namespace\":");
        push_json(&mut job, namespace);
        job.push_str(",\"name\":");
        push_json(&mut job, &job_name);
        job.push_str(",\"facets\":{");
        if let Some(d) = s.desc.as_deref().filter(|d| !d.trim().is_empty()) {
            job.push_str("\"documentation\":");
            push_json(&mut job, &event::documentation_facet(d));
            job.push(',');
        }
        job.push_str("\"jobType\":");
        job.push_str(task_job_type);
        job.push_str("}}");
        debug_assert_eq!(serde_json::from_str::<Job>(&job).ok().and_then(|j| serde_json::to_string(&j).ok()).as_deref(), Some(job.as_str()));
        let mut start_dagrun = dagrun_facet_head();
        push_key(&mut start_dagrun, "dagrunRunId");
        push_str_json(&mut start_dagrun, &engine.run_id);
        push_key(&mut start_dagrun, "kind");
        push_str_json(&mut start_dagrun, s.kind.name());
        push_key(&mut start_dagrun, "stage");
        push_str_json(&mut start_dagrun, &s.name);
        start_dagrun.push('}');
        StageParts { run_id: ids::run_uuid(start_ms, &engine.run_id, namespace, &job_name, engine.states.integrity_key()), start_dagrun, params, job }
    }
}

/// The start of a stage event's `dagrun` run facet as JSON: `{`, `_producer`
/// and `_schemaURL`; the caller adds the other fields in key order
/// ([`push_key`] + value) and the closing `}`.
fn dagrun_facet_head() -> String {
    static HEAD: LazyLock<String> = LazyLock::new(|| {
        let mut b = String::from("{\"_producer\":");
        push_str_json(&mut b, event::PRODUCER);
        b.push_str(",\"_schemaURL\":");
        push_str_json(&mut b, &event::dagrun_facet_schema());
        b
    });
    let mut b = String::with_capacity(400);
    b.push_str(&HEAD);
    b
}

/// `,"KEY":` (an object member after the first, its value to follow).
fn push_key(b: &mut String, key: &str) {
    b.push(',');
    push_str_json(b, key);
    b.push(':');
}

/// `{"namespace":"BASE+TENANT","name":"PATH"` (the object left open for its facets).
fn dataset_head(base: &str, tenant: &str, path: &str) -> String {
    let mut b = String::with_capacity(base.len() + tenant.len() + path.len() + 32);
    b.push_str("{\"namespace\":");
    push_str_json(&mut b, &format!("{base}{tenant}"));
    b.push_str(",\"name\":");
    push_str_json(&mut b, path);
    b
}

impl OpenLineage {
    /// `endpoint`: see [`endpoint`].
    pub fn new(engine: &Engine, endpoint: Option<Endpoint>) -> Result<OpenLineage> {
        let p = &engine.pipeline;
        let host = ids::host_name();
        let ws = ids::workspace_id(&engine.dagrun_dir)?;
        let namespace = format!("dagrun://{host}/{ws}");
        let pipeline_job = job_name_of(&p.shown);
        let start_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let pipeline_run = ids::run_uuid(start_ms, &engine.run_id, &namespace, &pipeline_job, engine.states.integrity_key());

        // Which tenant owns each path (see the module doc).
        let mut producer: HashMap<&str, Option<&str>> = HashMap::new();
        let mut readers: HashMap<&str, BTreeSet<Option<&str>>> = HashMap::new();
        for s in &p.stages {
            for o in &s.outs {
                producer.insert(o.path.as_str(), s.tenant.as_deref());
            }
            for d in &s.deps {
                readers.entry(d.as_str()).or_default().insert(s.tenant.as_deref());
            }
        }
        let mut dataset_tenant = HashMap::new();
        for (path, t) in &producer {
            dataset_tenant.insert(path.to_string(), t.unwrap_or(SHARED).to_string());
        }
        for (path, ts) in &readers {
            if !producer.contains_key(path) {
                let t = if ts.len() == 1 { ts.iter().next().copied().flatten() } else { None };
                dataset_tenant.insert(path.to_string(), t.unwrap_or(SHARED).to_string());
            }
        }

        let file_rel = format!("runs/{}.openlineage.jsonl", engine.run_id);
        let file = FileSink::new(&p.workspace.join(&file_rel));
        // The spool and the open-run marks are sealed under the workspace
        // integrity key (`lineage::transport`, `lineage::recover`).
        let key = engine.states.shared_integrity_key();
        // One spool per endpoint: a run sends its own endpoint's backlog only (review 69 H1).
        let spool = match (&endpoint, &key) {
            (Some(ep), Some(k)) => Some(Spool::for_endpoint(&engine.dagrun_dir, k.clone(), &ep.url)),
            _ => None,
        };
        let spooled = spool.as_ref().map(Spool::load).unwrap_or_default();
        let mut backlog = spooled.events;
        let mut head_refused_runs = spooled.head_refused_runs;
        if let (Some(ep), Some(sp), Some(k)) = (&endpoint, &spool, &key) {
            adopt_legacy_spool(&engine.dagrun_dir, ep, sp, k, &mut backlog, &mut head_refused_runs);
        }
        let spool_head = backlog.first().cloned();
        // Runs a killed dagrun left open get their ABORT now (in their own
        // file; and, like any event, to the endpoint: spooled first, so they
        // are not lost if this run is killed too).
        // The mark names this run's endpoint, so a killed run's ABORTs go
        // where its STARTs went (`lineage::recover`).
        let own_id = match (&endpoint, &key) {
            (Some(ep), Some(k)) => Some(transport::endpoint_id(k, &ep.url)),
            _ => None,
        };
        let sent_to = match (&endpoint, &own_id) {
            (Some(ep), Some(id)) => SentTo::Endpoint { id: id.clone(), shown: redact_url(&ep.url) },
            _ => SentTo::Nowhere,
        };
        let open = OpenRuns::new(&engine.dagrun_dir, key.clone(), sent_to);
        let runs_dir = crate::engine::runs::runs_dir(&p.workspace);
        let has_endpoint = endpoint.is_some();
        let closed = recover::recover(
            &open,
            &engine.run_id,
            &namespace,
            |id| runs_dir.join(format!("{id}.openlineage.jsonl")),
            |sent_to, lines| {
                if lines.is_empty() {
                    return Ok(());
                }
                let own = match sent_to {
                    SentTo::Nowhere => false,
                    // From before marks named the endpoint: as then.
                    SentTo::Unknown => has_endpoint,
                    SentTo::Endpoint { id, .. } => own_id.as_deref() == Some(id.as_str()),
                };
                if own {
                    backlog.extend(lines.iter().cloned());
                    if let Some(sp) = &spool {
                        sp.store(&backlog, head_refused_runs)?;
                    }
                } else if let (SentTo::Endpoint { id, shown }, Some(k)) = (sent_to, &key) {
                    // Another endpoint's: into its spool, for the next run that uses it.
                    let other = Spool::for_id(&engine.dagrun_dir, k.clone(), id, shown);
                    // Not over a spool that cannot be read (the mark stays: the next run tries again).
                    other.check_readable()?;
                    let mut waiting = other.load();
                    waiting.events.extend(lines.iter().cloned());
                    other.store(&waiting.events, waiting.head_refused_runs)?;
                }
                Ok(())
            },
        );
        let parent_json = json_of(&event::parent_facet(&pipeline_run, &namespace, &pipeline_job));
        let task_job_type = json_of(&event::job_type_facet("TASK"));
        let mut tail_json = String::from(",\"producer\":");
        push_str_json(&mut tail_json, event::PRODUCER);
        tail_json.push_str(",\"schemaURL\":");
        push_str_json(&mut tail_json, event::RUN_EVENT_SCHEMA);
        tail_json.push('}');
        let stage_parts = (0..p.stages.len()).map(|i| StageParts::new(engine, i, &namespace, &pipeline_job, start_ms, &task_job_type)).collect();
        let closed_killed = closed.into_iter().filter(|c| !c.lines.is_empty()).map(|c| (c.run_id, c.lines.len())).collect();
        let http = endpoint.map(|ep| {
            let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
            HttpSink::start(ep.url, token, backlog)
        });
        let dataset_heads = dataset_tenant.iter().map(|(path, t)| (path.clone(), dataset_head(&format!("{namespace}/"), t, path))).collect();
        Ok(OpenLineage {
            file,
            file_shown: file_rel,
            http: Mutex::new(http),
            spool,
            spool_head,
            head_refused_runs,
            open,
            run_id: engine.run_id.clone(),
            closed_killed,
            marked: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new((String::new(), 0)),
            starts: Mutex::new(HashMap::new()),
            dataset_base: format!("{namespace}/"),
            namespace,
            pipeline_job,
            pipeline_run,
            dataset_heads,
            parent_json,
            tail_json,
            stage_parts,
            schemas: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
        })
    }

    /// Hold events back, to go out with the next [`OpenLineage::emit`]: the
    /// pipeline's `START` and the `START` + terminal pairs of stages that did
    /// no work (cached, restored, or failed before running). A crash that
    /// loses them leaves no run open anywhere (they reached neither the file
    /// nor the endpoint), and a no-op run writes its file once.
    /// `lines`: `n` whole event lines, each ending in a newline.
    fn hold(&self, lines: &str, n: usize) {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        h.0.push_str(lines);
        h.1 += n;
    }

    /// Send the held events and `events`, in order: to the file (one write)
    /// and the endpoint's queue. `opens` = these events may leave a run open
    /// if the process dies now: mark this run open first.
    fn emit(&self, events: impl IntoIterator<Item = String>, opens: bool) {
        if opens
            && !self.marked.swap(true, Ordering::SeqCst)
            && let Err(e) = self.open.mark(&self.run_id)
        {
            tracing::warn!("if this run is killed, its OpenLineage runs will not be closed: {e:#}");
        }
        let (mut text, mut n) = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        for e in events {
            text.push_str(&e);
            text.push('\n');
            n += 1;
        }
        // The file first, then the endpoint: a run killed in between has
        // events in its file the endpoint lacks (the next run closes them
        // from the file), never the other way round.
        let http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        // Event lines are compact JSON: a newline only ends one.
        let lines: Vec<String> = if http.is_some() { text.lines().map(str::to_string).collect() } else { Vec::new() };
        self.file.write_text(text, n);
        if let Some(h) = http.as_ref() {
            for l in lines {
                h.send(l);
            }
        }
    }

    /// A stage's `START` event line, appended to `b`.
    fn start_line(&self, b: &mut String, engine: &Engine, i: usize, time: &str) {
        let none = |_: &str| None;
        self.stage_line(b, engine, i, EventType::Start, time, &self.stage_parts[i].start_dagrun, None, &none, &none)
    }

    /// One stage event as a JSON line (no newline), appended to `b` from the
    /// parts serialized once per run. The bytes are what serializing the
    /// [`RunEvent`] would give (keys in the same order: struct fields in
    /// declaration order, facets sorted by key); debug builds check that on
    /// every line by parsing it back into a `RunEvent` and serializing that.
    /// `input_hash`, `output_hash`: a dataset's version, when known.
    #[allow(clippy::too_many_arguments)]
    fn stage_line(
        &self,
        b: &mut String,
        engine: &Engine,
        i: usize,
        event_type: EventType,
        time: &str,
        dagrun: &str,
        error: Option<&Value>,
        input_hash: &dyn Fn(&str) -> Option<String>,
        output_hash: &dyn Fn(&str) -> Option<String>,
    ) {
        let s = engine.stage(i);
        let parts = &self.stage_parts[i];
        let ws = &engine.pipeline.workspace;
        let line_start = b.len();
        b.push_str(match event_type {
            EventType::Start => "{\"eventType\":\"START\"",
            EventType::Complete => "{\"eventType\":\"COMPLETE\"",
            EventType::Fail => "{\"eventType\":\"FAIL\"",
            EventType::Abort => "{\"eventType\":\"ABORT\"",
        });
        b.push_str(",\"eventTime\":");
        push_str_json(b, time);
        b.push_str(",\"run\":{\"runId\":");
        push_str_json(b, &parts.run_id);
        // Run facets, sorted: dagrun, errorMessage, executionParameters, parent.
        b.push_str(",\"facets\":{\"dagrun\":");
        b.push_str(dagrun);
        if let Some(e) = error {
            b.push_str(",\"errorMessage\":");
            push_json(b, e);
        }
        if let Some(p) = &parts.params {
            b.push_str(",\"executionParameters\":");
            b.push_str(p);
        }
        b.push_str(",\"parent\":");
        b.push_str(&self.parent_json);
        b.push_str("}},\"job\":");
        b.push_str(&parts.job);
        b.push_str(",\"inputs\":[");
        for (k, d) in s.deps.iter().enumerate() {
            if k > 0 {
                b.push(',');
            }
            self.push_dataset(b, ws, d, input_hash(d).as_deref());
        }
        b.push_str("],\"outputs\":[");
        for (k, o) in s.outs.iter().enumerate() {
            if k > 0 {
                b.push(',');
            }
            self.push_dataset(b, ws, &o.path, output_hash(&o.path).as_deref());
        }
        b.push(']');
        b.push_str(&self.tail_json);
        let line = &b[line_start..];
        debug_assert_eq!(serde_json::from_str::<RunEvent>(line).map(|e| e.to_line()).as_deref().ok(), Some(line), "stage_line is not canonical");
    }

    /// A dataset object: namespace, name, and the facets `schema` (a Parquet
    /// file's columns) and `version` (its hash) when the hash is known.
    fn push_dataset(&self, b: &mut String, workspace: &Path, path: &str, hash: Option<&str>) {
        match self.dataset_heads.get(path) {
            Some(head) => b.push_str(head),
            None => b.push_str(&dataset_head(&self.dataset_base, SHARED, path)),
        }
        if let Some(h) = hash.filter(|h| !h.is_empty()) {
            b.push_str(",\"facets\":{");
            if let Some(fields) = self.schema_of(workspace, path, h) {
                b.push_str("\"schema\":");
                push_json(b, &event::schema_facet(&fields));
                b.push(',');
            }
            b.push_str("\"version\":");
            event::push_version_facet(b, h);
            b.push('}');
        }
        b.push('}');
    }

    /// Column names and types of a Parquet file (or of the one Parquet file
    /// in a folder), memoized per (path, hash) for the run.
    fn schema_of(&self, workspace: &Path, path: &str, hash: &str) -> Option<Vec<Field>> {
        let key = (path.to_string(), hash.to_string());
        if let Some(v) = self.schemas.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return v.clone();
        }
        let abs = if Path::new(path).is_absolute() { Path::new(path).to_path_buf() } else { workspace.join(path) };
        let meta = std::fs::metadata(&abs).ok();
        let file = if meta.as_ref().is_some_and(|m| m.is_dir()) {
            let parquet: Vec<_> = std::fs::read_dir(&abs)
                .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "parquet") && p.is_file()).collect())
                .unwrap_or_default();
            if parquet.len() == 1 { parquet.into_iter().next() } else { None }
        } else if abs.extension().is_some_and(|x| x == "parquet") && meta.is_some_and(|m| m.is_file()) {
            Some(abs)
        } else {
            None
        };
        let fields = file
            .and_then(|f| crate::data::parquet_io::read_schema(&f).ok())
            .map(|schema| schema.fields().iter().map(|f| Field { name: f.name().clone(), r#type: f.data_type().to_string() }).collect::<Vec<_>>());
        self.schemas.lock().unwrap_or_else(|e| e.into_inner()).insert(key, fields.clone());
        fields
    }

    fn pipeline_job_value(&self, engine: &Engine) -> Job {
        let mut facets = Facets::new();
        facets.insert("jobType".into(), event::job_type_facet("DAG"));
        let _ = engine;
        Job { namespace: self.namespace.clone(), name: self.pipeline_job.clone(), facets }
    }

    fn pipeline_run_value(&self, engine: &Engine, extra: Value) -> Run {
        let mut facets = Facets::new();
        facets.insert("processing_engine".into(), event::processing_engine_facet());
        let params: BTreeMap<String, Value> = engine.pipeline.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !params.is_empty() {
            facets.insert("executionParameters".into(), event::parameters_facet(&params));
        }
        let mut d = json!({"dagrunRunId": engine.run_id, "pipeline": engine.pipeline.shown});
        if let (Value::Object(m), Value::Object(x)) = (&mut d, extra) {
            m.extend(x);
        }
        facets.insert("dagrun".into(), event::dagrun_facet(d));
        Run { run_id: self.pipeline_run.clone(), facets }
    }
}

/// Take the spool of a dagrun from before spools were per endpoint
/// (`pending.jsonl`, no endpoint named) into `spool`, before its own events,
/// when the run's endpoint comes from `DAGRUN_OPENLINEAGE_URL` (the standing
/// setting); a run with `--openlineage-url` (ad hoc) leaves it for such a
/// run. Stored in `spool` before the old file is removed: a crash in between
/// sends them twice at worst, never loses them.
fn adopt_legacy_spool(dagrun_dir: &Path, ep: &Endpoint, spool: &Spool, key: &IntegrityKey, backlog: &mut Vec<String>, head_refused_runs: &mut u32) {
    if !ep.from_env || std::fs::symlink_metadata(transport::legacy_path(dagrun_dir)).is_err() {
        return;
    }
    let old = transport::load_legacy(dagrun_dir, key);
    if !old.is_empty() {
        let n = old.len();
        let mut all = old;
        all.append(backlog);
        // A new head: no refusal counted yet.
        if let Err(e) = spool.store(&all, 0) {
            tracing::warn!(
                "cannot move the {n} OpenLineage event(s) of {} to this endpoint's spool: {e:#}; they stay there",
                transport::legacy_path(dagrun_dir).display()
            );
            *backlog = all.split_off(n);
            return;
        }
        *backlog = all;
        *head_refused_runs = 0;
        tracing::warn!(
            "{n} OpenLineage event(s) spooled by an older dagrun (one spool for every endpoint) are sent to {}, the endpoint of {URL_ENV}; from now on each endpoint has its own spool",
            redact_url(&ep.url)
        );
    }
    if let Err(e) = transport::remove_legacy(dagrun_dir) {
        tracing::warn!("{e:#}");
    }
}

impl OpenLineage {
    /// End of run with an endpoint: give up the events refused for good
    /// (`dropped.jsonl`), spool the rest, say once what happened, fill the
    /// record's summary (`delivered`, `rejected`, `dropped`, `pending`, `error`).
    fn settle(&self, engine: &Engine, shown: &str, out: HttpOutcome, summary: &mut Value) {
        let ws = &engine.pipeline.workspace;
        let rel = |p: &Path| p.strip_prefix(ws).unwrap_or(p).display().to_string();
        let mut pending = out.pending;
        let mut given_up: Vec<(Refused, String)> =
            out.dropped.into_iter().map(|r| (r, "refused by the endpoint, which accepted a later event".to_string())).collect();
        let mut runs = 0u32;
        if let Some(r) = &out.head_refused {
            // Refused again: the same head as at the start of the run?
            runs = if pending.first() == self.spool_head.as_ref() { self.head_refused_runs.saturating_add(1) } else { 1 };
            if runs >= DROP_AFTER_RUNS && !pending.is_empty() {
                let line = pending.remove(0);
                given_up.push((Refused { line, ..r.clone() }, format!("refused by the endpoint at {runs} runs in a row")));
                runs = 0;
            }
        }
        let n_refused = given_up.len();
        if n_refused > 0 {
            let first = &given_up[0].0;
            let kept = match transport::record_dropped(&engine.dagrun_dir, shown, &given_up) {
                Ok(_) => format!("written to {}", rel(&transport::dropped_path(&engine.dagrun_dir))),
                Err(e) => format!("not written anywhere ({e:#}); each is in its run's runs/*.openlineage.jsonl"),
            };
            tracing::warn!(
                "OpenLineage endpoint {shown} refused {n_refused} event(s) for good (HTTP {}{}): given up, not resent; {kept}",
                first.status,
                transport::shown_answer(&first.answer)
            );
        }
        match &self.spool {
            Some(sp) => {
                if let Err(e) = sp.store(&pending, runs) {
                    tracing::warn!("cannot spool {} undelivered OpenLineage events: {e:#}", pending.len());
                }
                if let Some(r) = out.head_refused.as_ref().filter(|_| !pending.is_empty()) {
                    tracing::warn!(
                        "OpenLineage endpoint {shown} refuses events (HTTP {}{}); nothing is given up for that: {} event(s) kept in {} for the next run with this endpoint (an event refused at {DROP_AFTER_RUNS} runs in a row is given up)",
                        r.status,
                        transport::shown_answer(&r.answer),
                        pending.len(),
                        rel(sp.path())
                    );
                } else if !pending.is_empty() {
                    tracing::warn!(
                        "{} OpenLineage event(s) not delivered to {shown}; kept in {} for the next run with this endpoint",
                        pending.len(),
                        rel(sp.path())
                    );
                }
            }
            None if !pending.is_empty() => {
                tracing::warn!("{} OpenLineage event(s) not delivered to {shown}, and not kept: the workspace has no integrity key", pending.len());
            }
            None => {}
        }
        summary["endpoint"] = shown.into();
        summary["delivered"] = out.delivered.into();
        summary["rejected"] = out.rejected.into();
        summary["dropped"] = n_refused.into();
        summary["pending"] = pending.len().into();
        if let Some(f) = out.failure {
            summary["error"] = f.into();
        }
    }
}

impl RunObserver for OpenLineage {
    fn run_started(&self, engine: &Engine) {
        let e = RunEvent::new(EventType::Start, event::now(), self.pipeline_run_value(engine, json!({})), self.pipeline_job_value(engine));
        let mut line = e.to_line();
        line.push('\n');
        self.hold(&line, 1);
    }

    fn stage_started(&self, _engine: &Engine, i: usize) {
        // Built when the stage starts work, or with its terminal event.
        self.starts.lock().unwrap_or_else(|e| e.into_inner()).insert(i, event::now());
    }

    fn stage_working(&self, engine: &Engine, i: usize) {
        let Some(t) = self.starts.lock().unwrap_or_else(|e| e.into_inner()).remove(&i) else { return };
        let mut e = String::with_capacity(2048);
        self.start_line(&mut e, engine, i, &t);
        self.emit([e], true);
    }

    fn stage_finished(&self, engine: &Engine, i: usize, rec: &StageRecord) {
        let s = engine.stage(i);
        let interrupted = engine.cancel.load(Ordering::SeqCst);
        let event_type = match rec.status {
            Status::Ran | Status::Cached | Status::Restored => EventType::Complete,
            Status::Failed if !interrupted => EventType::Fail,
            Status::Failed | Status::Skipped => EventType::Abort,
        };
        // Keys in order.
        let mut dagrun = dagrun_facet_head();
        let d = &mut dagrun;
        if let Some(k) = &rec.key {
            push_key(d, "cacheKey");
            push_str_json(d, k);
        }
        push_key(d, "dagrunRunId");
        push_str_json(d, &engine.run_id);
        push_key(d, "kind");
        push_str_json(d, s.kind.name());
        if let Some(c) = rec.outputs_changed {
            push_key(d, "outputsChanged");
            d.push_str(if c { "true" } else { "false" });
        }
        if !rec.reasons.is_empty() {
            push_key(d, "reasons");
            push_json(d, &rec.reasons);
        }
        push_key(d, "seconds");
        push_json(d, &json!(rec.seconds));
        push_key(d, "stage");
        push_str_json(d, &s.name);
        push_key(d, "status");
        push_str_json(d, rec.status.as_str());
        push_key(d, "workDone");
        d.push_str(if rec.status == Status::Ran { "true" } else { "false" });
        d.push('}');
        let error = (event_type != EventType::Complete).then(|| {
            let msg = rec.error.as_deref().map(error_for_events).unwrap_or_else(|| if interrupted { "run interrupted".into() } else { "stage failed".into() });
            event::error_message_facet(&format!("stage {} failed: {msg}", s.name))
        });
        // Input versions: what upstream stages wrote in this run (the hashes
        // this stage's key was computed from); other inputs' from the hash memo.
        let mut inputs: BTreeMap<String, String> = BTreeMap::new();
        if event_type == EventType::Complete {
            let mut known = self.versions.lock().unwrap_or_else(|e| e.into_inner());
            for (path, h) in &rec.outputs {
                known.insert(path.clone(), h.clone());
            }
            for d in &s.deps {
                let h = match known.get(d) {
                    Some(h) => Some(h.clone()),
                    None => {
                        let h = engine.memo.hash_input(&engine.pipeline.abs(d), &engine.pipeline.workspace).ok().flatten().map(|h| h.to_string());
                        if let Some(h) = &h {
                            known.insert(d.clone(), h.clone());
                        }
                        h
                    }
                };
                if let Some(h) = h {
                    inputs.insert(d.clone(), h);
                }
            }
        }
        let input_hash = |d: &str| inputs.get(d).cloned();
        let output_hash = |o: &str| if event_type == EventType::Complete { rec.outputs.get(o).cloned() } else { None };
        let start = self.starts.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
        let mut lines = String::with_capacity(4096);
        match start {
            // No work was started: both events together, held back.
            Some(t) => {
                self.start_line(&mut lines, engine, i, &t);
                lines.push('\n');
                self.stage_line(&mut lines, engine, i, event_type, &event::now(), &dagrun, error.as_ref(), &input_hash, &output_hash);
                lines.push('\n');
                self.hold(&lines, 2);
            }
            None => {
                self.stage_line(&mut lines, engine, i, event_type, &event::now(), &dagrun, error.as_ref(), &input_hash, &output_hash);
                self.emit([lines], false);
            }
        }
    }

    fn run_finished(&self, engine: &Engine, record: &mut RunRecord) {
        let event_type = match record.status {
            RunStatus::Ok => EventType::Complete,
            RunStatus::Interrupted => EventType::Abort,
            RunStatus::Failed => EventType::Fail,
        };
        let count = |st: Status| record.stages.iter().filter(|r| r.status == st).count();
        let extra = json!({
            "status": record.status,
            "exitCode": record.exit_code,
            "stages": {"ran": count(Status::Ran), "cached": count(Status::Cached), "restored": count(Status::Restored), "failed": count(Status::Failed), "skipped": count(Status::Skipped)},
        });
        let mut run = self.pipeline_run_value(engine, extra);
        if event_type != EventType::Complete {
            let failed: Vec<String> = record
                .stages
                .iter()
                .filter(|r| r.status == Status::Failed)
                .map(|r| format!("stage {} failed: {}", r.stage, r.error.as_deref().map(error_for_events).unwrap_or_else(|| "unknown error".into())))
                .collect();
            let msg = if failed.is_empty() { format!("run {}", record.status) } else { failed.join("\n") };
            run.facets.insert("errorMessage".into(), event::error_message_facet(&msg));
        }
        let e = RunEvent::new(event_type, event::now(), run, self.pipeline_job_value(engine));
        self.emit([e.to_line()], false);

        let written = match self.file.finish() {
            Ok(()) => Some(self.file_shown.clone()),
            Err(e) => {
                tracing::warn!("cannot write the OpenLineage events of this run: {e:#}");
                None
            }
        };
        let mut summary = json!({
            "file": written,
            "events": self.file.written(),
        });
        let has_endpoint = match self.http.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(h) => {
                let shown = h.url_shown().to_string();
                let out = h.finish(FLUSH_GRACE);
                self.settle(engine, &shown, out, &mut summary);
                true
            }
            None => {
                summary["pending"] = 0.into();
                false
            }
        };
        // Other endpoints' backlogs (and an older dagrun's spool) wait for a
        // run with their endpoint; the metric counts them too.
        let others = transport::waiting_elsewhere(&engine.dagrun_dir, self.spool.as_ref().map(Spool::path));
        let n_other: usize = others.iter().map(|w| w.events).sum();
        summary["pending_other_endpoints"] = n_other.into();
        if n_other > 0 {
            let list: Vec<String> = others.iter().map(|w| format!("{} for {}", w.events, w.endpoint)).collect();
            let msg = format!("{n_other} OpenLineage event(s) wait for other endpoints ({}): each is sent by the next run with its endpoint", list.join(", "));
            if has_endpoint {
                tracing::warn!("{msg}");
            } else {
                tracing::info!("{msg}");
            }
        }
        if !self.closed_killed.is_empty() {
            summary["killed_runs"] = self.closed_killed.iter().map(|(id, n)| json!({"run_id": id, "abort_events": n})).collect();
        }
        record.openlineage = Some(summary);
        // Last: the run's events are all in its file (and delivered or spooled).
        if self.marked.load(Ordering::SeqCst) {
            self.open.clear(&engine.run_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_a_stage_errors_first_line_never_a_commands_stderr() {
        let e = "command failed with exit status 1; end of stderr (.dagrun/logs/s.err):\nbad row - alice@example.com,123-45-6789";
        assert_eq!(
            error_for_events(e),
            "command failed with exit status 1; end of stderr (.dagrun/logs/s.err) (not sent with lineage events: see the run record)"
        );
        assert_eq!(error_for_events("input a.txt does not exist"), "input a.txt does not exist");
    }

    /// Review 69 H1, the migration: the older dagrun's single spool names no
    /// endpoint. An ad-hoc `--openlineage-url` run leaves it; a run with the
    /// standing `DAGRUN_OPENLINEAGE_URL` takes it, before its own backlog,
    /// stored in its spool before the old file goes.
    #[test]
    fn the_older_single_spool_goes_to_the_standing_endpoint_only() {
        let d = tempfile::tempdir().unwrap();
        let key = std::sync::Arc::new(IntegrityKey::from_bytes([9; 32]));
        let ev = |i: u32| format!(r#"{{"schemaURL":"x","run":{{"runId":"{i}"}}}}"#);
        let legacy = transport::legacy_path(d.path());
        std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
        let text: String = [ev(1), ev(2)].iter().map(|e| format!("{} {e}\n", key.mac(transport::LEGACY_DOMAIN, e.as_bytes()).to_hex())).collect();
        std::fs::write(&legacy, text).unwrap();
        let url = "http://a:5000/api/v1/lineage".to_string();
        let spool = Spool::for_endpoint(d.path(), key.clone(), &url);
        spool.store(&[ev(3)], 2).unwrap();
        let adhoc = Endpoint { url: url.clone(), from_env: false };
        let mut backlog = spool.load().events;
        let mut runs = 2;
        adopt_legacy_spool(d.path(), &adhoc, &spool, &key, &mut backlog, &mut runs);
        assert_eq!((backlog.clone(), runs), (vec![ev(3)], 2));
        assert!(legacy.exists(), "kept for the standing endpoint");
        let standing = Endpoint { url, from_env: true };
        adopt_legacy_spool(d.path(), &standing, &spool, &key, &mut backlog, &mut runs);
        assert_eq!((backlog.clone(), runs), (vec![ev(1), ev(2), ev(3)], 0));
        assert!(!legacy.exists());
        assert_eq!(spool.load(), transport::Spooled { events: vec![ev(1), ev(2), ev(3)], head_refused_runs: 0 });
    }
}
