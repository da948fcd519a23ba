//! OpenLineage events of real runs: every event checked against the spec's
//! required fields and types (OpenLineage.json 2-0-2 and the facet schemas),
//! and re-read by the official `openlineage-python` client; START/terminal
//! pairing, parent links, datasets; and an HTTP endpoint on loopback that is
//! down, then slow, then up.

use crate::common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RUN_EVENT_SCHEMA: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";

/// A dagrun command without any OpenLineage endpoint from the environment.
fn cmd(ws: &Ws, args: &[&str]) -> Command {
    let mut c = ws.cmd(args);
    c.env_remove("DAGRUN_OPENLINEAGE_URL").env_remove("DAGRUN_OPENLINEAGE_TOKEN").env("DAGRUN_PLAIN", "1");
    c
}

fn events_of(ws: &Ws, run: &Run) -> Vec<Value> {
    let id = run.rec()["run_id"].as_str().unwrap();
    let text = ws.read(&format!("runs/{id}.openlineage.jsonl"));
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12] && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// RFC 3986: a scheme (`ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`), a colon, no spaces.
fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else { return false };
    let mut c = scheme.chars();
    c.next().is_some_and(|x| x.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || "+-.".contains(x))
        && !rest.is_empty()
        && !s.chars().any(|x| x.is_whitespace())
}

fn string<'a>(v: &'a Value, key: &str, at: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_else(|| panic!("{at}: `{key}` must be a string: {v}"))
}

/// BaseFacet: `_producer` and `_schemaURL` (uri), both required.
fn check_facets(facets: Option<&Value>, at: &str) {
    let Some(f) = facets else { return };
    let f = f.as_object().unwrap_or_else(|| panic!("{at}: facets must be an object"));
    for (k, v) in f {
        let w = format!("{at}.facets.{k}");
        assert!(v.is_object(), "{w}: a facet is an object");
        assert!(is_uri(string(v, "_producer", &w)), "{w}: _producer is a uri");
        assert!(is_uri(string(v, "_schemaURL", &w)), "{w}: _schemaURL is a uri");
        if let Some(d) = v.get("_deleted") {
            assert!(d.is_boolean(), "{w}: _deleted is a boolean");
        }
        // Required fields of the standard facets dagrun uses (facet schemas).
        match k.as_str() {
            "parent" => {
                assert!(is_uuid(string(&v["run"], "runId", &w)), "{w}: run.runId is a uuid");
                string(&v["job"], "namespace", &w);
                string(&v["job"], "name", &w);
                if let Some(r) = v.get("root") {
                    assert!(is_uuid(string(&r["run"], "runId", &w)));
                    string(&r["job"], "namespace", &w);
                    string(&r["job"], "name", &w);
                }
            }
            "errorMessage" => {
                string(v, "message", &w);
                string(v, "programmingLanguage", &w);
            }
            "processing_engine" => {
                string(v, "version", &w);
            }
            "executionParameters" => {
                for p in v["parameters"].as_array().unwrap_or_else(|| panic!("{w}: parameters is an array")) {
                    string(p, "key", &w);
                    assert!(p.get("value").is_none_or(Value::is_string), "{w}: value is a string");
                }
            }
            "jobType" => {
                string(v, "processingType", &w);
                string(v, "integration", &w);
            }
            "documentation" => {
                string(v, "description", &w);
            }
            "version" => {
                string(v, "datasetVersion", &w);
            }
            "schema" => {
                for fld in v["fields"].as_array().unwrap_or_else(|| panic!("{w}: fields is an array")) {
                    string(fld, "name", &w);
                    assert!(fld.get("type").is_none_or(Value::is_string), "{w}: type is a string");
                }
            }
            "dagrun" => {
                string(v, "dagrunRunId", &w);
            }
            other => panic!("{w}: unexpected facet {other}"),
        }
    }
}

/// The checks of OpenLineage.json 2-0-2 for a RunEvent: BaseEvent requires
/// eventTime (date-time), producer (uri), schemaURL (uri); RunEvent requires
/// run {runId: uuid} and job {namespace, name}; eventType is one of the enum;
/// inputs/outputs are arrays of {namespace, name, facets?}.
fn check_event(e: &Value, at: &str) {
    assert!(e.is_object(), "{at}: an event is an object");
    let t = string(e, "eventTime", at);
    chrono::DateTime::parse_from_rfc3339(t).unwrap_or_else(|err| panic!("{at}: eventTime {t:?} is not a date-time: {err}"));
    assert!(is_uri(string(e, "producer", at)), "{at}: producer is a uri");
    assert_eq!(string(e, "schemaURL", at), RUN_EVENT_SCHEMA, "{at}");
    let et = string(e, "eventType", at);
    assert!(["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"].contains(&et), "{at}: eventType {et}");
    let run = &e["run"];
    assert!(is_uuid(string(run, "runId", at)), "{at}: run.runId is a uuid");
    check_facets(run.get("facets"), &format!("{at}.run"));
    let job = &e["job"];
    string(job, "namespace", at);
    string(job, "name", at);
    check_facets(job.get("facets"), &format!("{at}.job"));
    for side in ["inputs", "outputs"] {
        if let Some(list) = e.get(side) {
            for (i, d) in list.as_array().unwrap_or_else(|| panic!("{at}: {side} is an array")).iter().enumerate() {
                let w = format!("{at}.{side}[{i}]");
                string(d, "namespace", &w);
                string(d, "name", &w);
                check_facets(d.get("facets"), &w);
            }
        }
    }
}

/// runId -> event types in file order; also checks START comes first and
/// exactly one terminal event follows, not earlier than the START.
fn pairing(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut by_run: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for e in events {
        by_run
            .entry(e["run"]["runId"].as_str().unwrap().to_string())
            .or_default()
            .push((e["eventType"].as_str().unwrap().into(), e["eventTime"].as_str().unwrap().into()));
    }
    for (id, evs) in &by_run {
        assert_eq!(evs.len(), 2, "run {id}: START then exactly one terminal event: {evs:?}");
        assert_eq!(evs[0].0, "START", "run {id}: {evs:?}");
        assert!(["COMPLETE", "FAIL", "ABORT"].contains(&evs[1].0.as_str()), "run {id}: {evs:?}");
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
        assert!(t(&evs[1].1) >= t(&evs[0].1), "run {id}: terminal before START");
    }
    by_run.into_iter().map(|(k, v)| (k, v.into_iter().map(|x| x.0).collect())).collect()
}

/// The pipeline run (the one without a parent) and, per stage job, its events.
fn by_job(events: &[Value]) -> (String, String, BTreeMap<String, Vec<Value>>) {
    let roots: BTreeSet<(String, String)> = events
        .iter()
        .filter(|e| e["run"]["facets"].get("parent").is_none())
        .map(|e| (e["run"]["runId"].as_str().unwrap().to_string(), e["job"]["name"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(roots.len(), 1, "one pipeline run: {roots:?}");
    let (root_id, root_job) = roots.into_iter().next().unwrap();
    let mut jobs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["run"]["runId"] != root_id.as_str()) {
        let p = &e["run"]["facets"]["parent"];
        assert_eq!(p["run"]["runId"], root_id.as_str(), "stage run's parent is the pipeline run: {e}");
        assert_eq!(p["job"]["name"], root_job.as_str());
        assert_eq!(p["job"]["namespace"], e["job"]["namespace"]);
        let name = e["job"]["name"].as_str().unwrap();
        let stage = name.strip_prefix(&format!("{root_job}.")).unwrap_or_else(|| panic!("stage job {name} is named PIPELINE.STAGE"));
        jobs.entry(stage.to_string()).or_default().push(e.clone());
    }
    (root_id, root_job, jobs)
}

fn python_check(file: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/openlineage_check.py");
    let o = Command::new("python3").arg(&script).arg(file).output().expect("python3 is needed (see .ci/run)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "openlineage-python rejects the events (`pip install openlineage-python`, see .ci/run):\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("checked "), "{out}");
}

fn propensity_ws() -> Ws {
    let ws = Ws::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ws.write("pipelines/propensity.yaml", std::fs::read(root.join("pipelines/propensity.yaml")).unwrap());
    ws.write("config/tenants.yaml", "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n");
    ws
}

#[test]
fn every_event_of_a_real_run_follows_the_spec_pairs_and_links_to_its_parent() {
    let ws = propensity_ws();
    let r = ws.run_cmd(cmd(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"])).ok();
    let events = events_of(&ws, &r);
    for (i, e) in events.iter().enumerate() {
        check_event(e, &format!("event {i}"));
    }
    let pairs = pairing(&events);
    assert_eq!(pairs.len(), 15, "the pipeline and its 14 stages");
    let (_, root_job, jobs) = by_job(&events);
    assert_eq!(root_job, "pipelines/propensity");
    let stages: BTreeSet<String> = r.statuses().keys().cloned().collect();
    assert_eq!(jobs.keys().cloned().collect::<BTreeSet<_>>(), stages);
    assert_eq!(events.first().unwrap()["eventType"], "START");
    assert_eq!(events.last().unwrap()["eventType"], "COMPLETE");
    assert_eq!(events.last().unwrap()["job"]["name"], "pipelines/propensity");

    // Datasets: tenant namespace, workspace-relative name, blake3 version, Parquet schema.
    let ws_id = ws.read(".dagrun/openlineage/workspace-id").trim().to_string();
    let train = &jobs["train[Tenant_A]"][1];
    assert_eq!(train["eventType"], "COMPLETE");
    assert_eq!(train["run"]["facets"]["dagrun"]["workDone"], true);
    let out = &train["outputs"][0];
    assert_eq!(out["name"], "models/Tenant_A/model.json");
    let ns = out["namespace"].as_str().unwrap();
    assert!(ns.starts_with("dagrun://") && ns.ends_with(&format!("/{ws_id}/Tenant_A")), "{ns}");
    assert_eq!(out["facets"]["version"]["datasetVersion"], b3(&ws.path("models/Tenant_A/model.json")));
    let params: BTreeMap<String, String> = train["run"]["facets"]["executionParameters"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["key"].as_str().unwrap().into(), p["value"].as_str().unwrap().into()))
        .collect();
    assert_eq!(params["min_auc"], "0.6");
    assert_eq!(params["tenant"], "Tenant_A");
    let enc = &jobs["encrypt[Tenant_B]"][1]["outputs"][0];
    assert_eq!(enc["name"], "data/encrypted/Tenant_B.parquet");
    let cols: Vec<&str> = enc["facets"]["schema"]["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(cols.contains(&"Sensitive_Data_Enc") && cols.contains(&"Customer_ID") && !cols.contains(&"Sensitive_Data"), "{cols:?}");
    // The same path is one dataset in the producer's outputs and the consumer's inputs.
    let afe_in = &jobs["afe[Tenant_B]"][1]["inputs"][0];
    assert_eq!((&afe_in["namespace"], &afe_in["name"]), (&enc["namespace"], &enc["name"]));
    assert_eq!(afe_in["facets"]["version"], enc["facets"]["version"]);

    // The run record says where the events went.
    let ol = &r.rec()["openlineage"];
    assert_eq!(ol["events"], events.len());
    assert_eq!(ol["pending"], 0);

    // No data value and no key in any event.
    let all = ws.read(&format!("runs/{}.openlineage.jsonl", r.rec()["run_id"].as_str().unwrap()));
    let sample = ws.path("sample.csv");
    let o = cmd(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "1800", "--out", sample.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success());
    let text = std::fs::read_to_string(&sample).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "Sensitive_Data").unwrap();
    let values: Vec<&str> = text.lines().skip(1).map(|l| l.split(',').nth(col).unwrap()).collect();
    assert!(values.len() == 1800 && values.iter().all(|v| v.len() > 3));
    assert!(values.iter().all(|v| !all.contains(v)), "a Sensitive_Data value is in an event");
    let master = ws.read(".dagrun/keys/master.key");
    let master = master.trim();
    assert!(master.len() >= 32 && !all.to_lowercase().contains(&master.to_lowercase()), "the master key is in an event");
    python_check(&ws.path(&format!("runs/{}.openlineage.jsonl", r.rec()["run_id"].as_str().unwrap())));

    // A no-op run: every stage is reported, as COMPLETE with no work done.
    let r2 = ws.run_cmd(cmd(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=3000"])).ok();
    assert_eq!(r2.with("cached").len(), 14);
    let ev2 = events_of(&ws, &r2);
    for (i, e) in ev2.iter().enumerate() {
        check_event(e, &format!("no-op event {i}"));
    }
    assert_eq!(pairing(&ev2).len(), 15);
    let (_, _, jobs2) = by_job(&ev2);
    for (stage, evs) in &jobs2 {
        let end = &evs[1];
        assert_eq!(end["eventType"], "COMPLETE", "{stage}");
        assert_eq!(end["run"]["facets"]["dagrun"]["status"], "cached", "{stage}");
        assert_eq!(end["run"]["facets"]["dagrun"]["workDone"], false, "{stage}");
    }
    // Stable names across runs: the same jobs and datasets, new run ids.
    assert_eq!(jobs.keys().collect::<Vec<_>>(), jobs2.keys().collect::<Vec<_>>());
    assert_ne!(jobs["train[Tenant_A]"][0]["run"]["runId"], jobs2["train[Tenant_A]"][0]["run"]["runId"]);
    assert_eq!(jobs2["train[Tenant_A]"][1]["outputs"][0]["facets"]["version"], train["outputs"][0]["facets"]["version"]);
    python_check(&ws.path(&format!("runs/{}.openlineage.jsonl", r2.rec()["run_id"].as_str().unwrap())));
}

#[test]
fn a_failed_stage_is_a_fail_with_its_error_and_skipped_stages_have_no_events() {
    let ws = Ws::new();
    ws.write("in.txt", "x\n");
    ws.pipeline(
        r#"
stages:
  bad:
    cmd: |
      echo "boom: disk on fire" >&2; exit 3
    deps: [in.txt]
    outs: [bad.txt]
  after_bad:
    cmd: cp bad.txt after.txt
    deps: [bad.txt]
    outs: [after.txt]
  good:
    cmd: cp in.txt good.txt
    deps: [in.txt]
    outs: [good.txt]
"#,
    );
    let r = ws.run_cmd(cmd(&ws, &["run", "pipeline.yaml"]));
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    let events = events_of(&ws, &r);
    for (i, e) in events.iter().enumerate() {
        check_event(e, &format!("event {i}"));
    }
    pairing(&events);
    let (_, root_job, jobs) = by_job(&events);
    assert_eq!(root_job, "pipeline");
    assert_eq!(jobs.keys().cloned().collect::<BTreeSet<_>>(), set(&["bad", "good"]), "after_bad never started");
    let bad = &jobs["bad"][1];
    assert_eq!(bad["eventType"], "FAIL");
    let msg = bad["run"]["facets"]["errorMessage"]["message"].as_str().unwrap();
    // The first line of the error; the command's stderr (which may quote
    // data: review 13) stays in the run record and the log.
    assert!(msg.contains("stage bad failed: command failed with exit status 3") && msg.contains(".dagrun/logs/bad.err"), "{msg}");
    for e in &events {
        assert!(!e.to_string().contains("disk on fire"), "a command's stderr reached an event: {e}");
    }
    let recorded = r.rec()["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "bad").unwrap()["error"].as_str().unwrap().to_string();
    assert!(recorded.contains("boom: disk on fire"), "{recorded}");
    assert_eq!(jobs["good"][1]["eventType"], "COMPLETE");
    let end = events.last().unwrap();
    assert_eq!((end["eventType"].as_str(), end["job"]["name"].as_str()), (Some("FAIL"), Some("pipeline")));
    assert!(end["run"]["facets"]["errorMessage"]["message"].as_str().unwrap().contains("stage bad failed"));
    // Sources read by no tenant stage are in the shared namespace.
    assert!(jobs["good"][0]["inputs"][0]["namespace"].as_str().unwrap().ends_with("/_shared"));
    python_check(&ws.path(&format!("runs/{}.openlineage.jsonl", r.rec()["run_id"].as_str().unwrap())));
}

#[test]
fn a_bad_endpoint_url_is_refused_before_anything_runs() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let o = cmd(&ws, &["run", "pipeline.yaml", "--openlineage-url", "localhost:5000"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--openlineage-url") && err.contains("http://"), "{err}");
    assert!(!ws.exists("a.txt") && !ws.exists("runs"));
    let o = cmd(&ws, &["run", "pipeline.yaml"]).env("DAGRUN_OPENLINEAGE_URL", "ftp://user:hunter2@x").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DAGRUN_OPENLINEAGE_URL") && !err.contains("hunter2"), "{err}");
}

/// What the loopback receiver does with each request.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Read the request, then never answer.
    Hang,
    /// Answer 200.
    Ok,
    /// Answer this status, with a body (control characters in it).
    Status(u16),
    /// Answer 413 to an event whose body holds this text, 200 to the others.
    RefuseIf(&'static str),
}

/// The body of a refusal.
const REFUSAL_BODY: &str = "{\"error\":\"request entity too large\"}\n\u{1b}[31m";

/// One received request.
struct Got {
    path: String,
    auth: Option<String>,
    body: String,
    /// The status answered.
    status: u16,
}

/// A minimal HTTP/1.1 server on loopback (keep-alive, Content-Length bodies).
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
    mode: Arc<Mutex<Mode>>,
}

fn serve_conn(mut s: TcpStream, mode: Arc<Mutex<Mode>>, got: Arc<Mutex<Vec<Got>>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut len, mut auth) = (0usize, None);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                } else if k.eq_ignore_ascii_case("authorization") {
                    auth = Some(v.trim().to_string());
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8(body).unwrap();
        let mode_now = *mode.lock().unwrap();
        let status = match mode_now {
            Mode::Hang => {
                std::thread::sleep(Duration::from_secs(60));
                return;
            }
            Mode::Ok => 200,
            Mode::Status(c) => c,
            Mode::RefuseIf(t) => {
                if body.contains(t) {
                    413
                } else {
                    200
                }
            }
        };
        got.lock().unwrap().push(Got { path, auth, body, status });
        let answer = if status >= 400 { REFUSAL_BODY } else { "" };
        if s.write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{answer}", answer.len()).as_bytes()).is_err() {
            return;
        }
    }
}

impl Receiver {
    fn start(listener: TcpListener, mode: Mode) -> Receiver {
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let (g, m) = (got.clone(), mode.clone());
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (g, m) = (g.clone(), m.clone());
                std::thread::spawn(move || serve_conn(s, m, g));
            }
        });
        Receiver { port, got, mode }
    }

    /// How later requests are answered.
    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// The bodies of the requests answered with `status`, in order.
    fn bodies(&self, status: u16) -> Vec<String> {
        self.got.lock().unwrap().iter().filter(|g| g.status == status).map(|g| g.body.clone()).collect()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `RUST_LOG=trace` turns on every crate's logs, the HTTP client's too, whose
/// request dumps would show the bearer token and the URL's query: those
/// crates stay capped, and neither secret reaches stderr.
#[test]
fn the_endpoints_token_and_query_never_reach_the_logs_even_at_trace() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let up = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::Ok);
    let token = "oltok_S3cr3tBearerValue_0123456789";
    // Everything at trace, and the HTTP crates' own modules named outright.
    for rust_log in ["trace", "ureq_proto::util=trace,ureq=trace,dagrun=debug"] {
        let mut c = cmd(&ws, &["run", "pipeline.yaml", "--force", ""]);
        c.env("DAGRUN_OPENLINEAGE_URL", format!("http://svc:Pw_5ecret@127.0.0.1:{}/x?api_key=QuerySecret_987654", up.port))
            .env("DAGRUN_OPENLINEAGE_TOKEN", token)
            .env("RUST_LOG", rust_log);
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert!(up.got.lock().unwrap().iter().any(|g| g.auth.as_deref() == Some(&format!("Bearer {token}"))), "the token is sent");
        for w in token.as_bytes().windows(8) {
            assert!(!err.contains(std::str::from_utf8(w).unwrap()), "RUST_LOG={rust_log}: the token shows in the logs:\n{err}");
        }
        assert!(!err.contains("QuerySecret") && !err.contains("Pw_5ecret"), "{err}");
    }
}

/// The spool files (one per endpoint: `pending-ID.jsonl`).
fn spool_files(ws: &Ws) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(ws.path(".dagrun/openlineage"))
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("pending")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The spooled events of every endpoint (each line is `MAC EVENT`, after a
/// `MAC #{header}` line naming the endpoint: the MACs are checked by dagrun,
/// not here), and the endpoints named.
fn spooled(ws: &Ws) -> (Vec<String>, Vec<String>) {
    let (mut events, mut endpoints) = (vec![], vec![]);
    for f in spool_files(ws) {
        assert!(f.file_name().unwrap().to_string_lossy().len() == "pending-.jsonl".len() + 32, "{f:?}");
        for l in std::fs::read_to_string(&f).unwrap().lines() {
            let (mac, event) = l.split_once(' ').expect("a spooled line is `MAC EVENT`");
            assert!(mac.len() == 64 && mac.bytes().all(|b| b.is_ascii_hexdigit()), "{l}");
            match event.strip_prefix('#') {
                Some(h) => endpoints.push(serde_json::from_str::<Value>(h).unwrap()["endpoint"].as_str().unwrap().to_string()),
                None => events.push(event.to_string()),
            }
        }
    }
    (events, endpoints)
}

fn pending_lines(ws: &Ws) -> Vec<String> {
    spooled(ws).0
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn an_endpoint_that_is_down_then_slow_never_fails_or_holds_the_run_and_gets_everything_when_up() {
    let ws = Ws::new();
    ws.write("in.txt", "1\n");
    ws.pipeline(
        r#"
stages:
  a:
    cmd: cp in.txt a.txt
    deps: [in.txt]
    outs: [a.txt]
  b:
    cmd: env > b.txt
    deps: [a.txt]
    outs: [b.txt]
"#,
    );
    const TOKEN: &str = "ol-token-7f3a9c1e5b";
    let run = |port: u16, n: &str| -> (Run, Duration) {
        ws.write("in.txt", format!("{n}\n"));
        let mut c = cmd(&ws, &["run", "pipeline.yaml", "-v"]);
        c.env("DAGRUN_OPENLINEAGE_URL", format!("http://127.0.0.1:{port}/")).env("DAGRUN_OPENLINEAGE_TOKEN", TOKEN);
        let t0 = Instant::now();
        let r = ws.run_cmd(c).ok();
        (r, t0.elapsed())
    };
    let mut all_events: Vec<String> = Vec::new();
    let file_lines =
        |r: &Run| -> Vec<String> { ws.read(&format!("runs/{}.openlineage.jsonl", r.rec()["run_id"].as_str().unwrap())).lines().map(String::from).collect() };

    // One endpoint throughout (its spool is its own): down, slow, then up.
    let port = free_port();
    // 1. Down: nothing listens. The run succeeds; its 6 events are spooled.
    let (r1, _) = run(port, "1");
    let ol = &r1.rec()["openlineage"];
    assert_eq!((ol["events"].as_u64(), ol["delivered"].as_u64(), ol["pending"].as_u64()), (Some(6), Some(0), Some(6)), "{ol}");
    assert!(ol["error"].is_string(), "{ol}");
    all_events.extend(file_lines(&r1));
    assert_eq!(pending_lines(&ws), all_events);

    // 2. Slow: the endpoint accepts and never answers. The run does not wait
    //    for it (bounded: 1 s grace at the end, not the 10 s request timeout).
    let endpoint = Receiver::start(TcpListener::bind(("127.0.0.1", port)).unwrap(), Mode::Hang);
    let (r2, took) = run(port, "2");
    assert!(took < Duration::from_secs(5), "the run waited {took:?} on a slow endpoint");
    let ol = &r2.rec()["openlineage"];
    assert_eq!((ol["delivered"].as_u64(), ol["pending"].as_u64()), (Some(0), Some(12)), "{ol}");
    all_events.extend(file_lines(&r2));
    assert_eq!(pending_lines(&ws), all_events, "spooled in order, oldest first");
    assert!(endpoint.got.lock().unwrap().is_empty());
    for f in spool_files(&ws) {
        assert_eq!(mode_of(&f), 0o600, "{f:?}: events carry reasons and parameters (review 69 H4)");
    }

    // 3. Up: everything pending is delivered first, in order, then this run's events.
    endpoint.set(Mode::Ok);
    let up = &endpoint;
    let (r3, _) = run(port, "3");
    let ol = &r3.rec()["openlineage"];
    assert_eq!((ol["delivered"].as_u64(), ol["pending"].as_u64()), (Some(18), Some(0)), "{ol}");
    assert!(ol.get("error").is_none(), "{ol}");
    all_events.extend(file_lines(&r3));
    let got = up.got.lock().unwrap();
    assert_eq!(got.iter().map(|g| g.body.clone()).collect::<Vec<_>>(), all_events);
    assert!(got.iter().all(|g| g.path == "/api/v1/lineage"));
    assert!(got.iter().all(|g| g.auth.as_deref() == Some(&format!("Bearer {TOKEN}"))));
    assert!(pending_lines(&ws).is_empty() && spool_files(&ws).is_empty());

    // The token reached the endpoint only: not the records, events, logs, output or a command's environment.
    for r in [&r1, &r2, &r3] {
        assert!(!r.out.stdout.contains(TOKEN) && !r.out.stderr.contains(TOKEN));
    }
    for f in ws.walk() {
        let p = ws.path(&f);
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(!String::from_utf8_lossy(&bytes).contains(TOKEN), "the token is in {f}");
        }
    }
    assert!(ws.read("b.txt").contains("DAGRUN_WORKSPACE="), "b.txt holds the command's environment");
}

/// A run with `url` (by `--openlineage-url` when `flag`, else by
/// `DAGRUN_OPENLINEAGE_URL`) and `token`; every stage reruns.
fn run_with(ws: &Ws, url: &str, token: &str, flag: bool, extra: &[&str]) -> Run {
    let mut args = vec!["run", "pipeline.yaml", "--force", ""];
    if flag {
        args.extend(["--openlineage-url", url]);
    }
    args.extend(extra);
    let mut c = cmd(ws, &args);
    if !flag {
        c.env("DAGRUN_OPENLINEAGE_URL", url);
    }
    c.env("DAGRUN_OPENLINEAGE_TOKEN", token);
    ws.run_cmd(c).ok()
}

fn run_lines(ws: &Ws, r: &Run) -> Vec<String> {
    ws.read(&format!("runs/{}.openlineage.jsonl", r.rec()["run_id"].as_str().unwrap())).lines().map(String::from).collect()
}

/// Review 69 H1: events that did not reach catalog A went to whatever
/// endpoint the next run used (an ad-hoc dev catalog, with its token), and
/// A never got them. Each endpoint has its own spool now.
#[test]
fn events_pending_for_one_endpoint_are_sent_to_that_endpoint_only() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let a = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::Status(500));
    let b = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::Ok);
    let url_a = format!("http://svc:PwA_5ecret@127.0.0.1:{}/catalog-a?api_key=QueryA_s3cret", a.port);
    let url_b = format!("http://127.0.0.1:{}/dev-catalog", b.port);

    // 1. A answers 500: the run's events wait for A.
    let r1 = run_with(&ws, &url_a, "tokA_0123456789", false, &[]);
    assert_eq!((r1.rec()["openlineage"]["pending"].as_u64(), r1.rec()["openlineage"]["delivered"].as_u64()), (Some(4), Some(0)));
    let (events, endpoints) = spooled(&ws);
    assert_eq!(events, run_lines(&ws, &r1));
    assert_eq!(endpoints, [format!("http://127.0.0.1:{}/catalog-a/api/v1/lineage?…", a.port)]);
    // Neither the URL's credentials, its query nor the token in a file name or a file.
    for f in std::fs::read_dir(ws.path(".dagrun/openlineage")).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        let text = if f.path().is_file() { std::fs::read_to_string(f.path()).unwrap() } else { String::new() };
        for secret in ["PwA_5ecret", "QueryA_s3cret", "tokA_0123456789", "catalog-a?"] {
            assert!(!name.contains(secret) && !text.contains(secret), "{secret} is in {name}");
        }
    }
    for f in spool_files(&ws) {
        assert_eq!(mode_of(&f), 0o600, "{f:?}");
    }

    // 2. An ad-hoc run with the dev catalog B: B gets this run's events only.
    let r2 = run_with(&ws, &url_b, "tokB_0123456789", true, &[]);
    assert_eq!(b.bodies(200), run_lines(&ws, &r2), "B got A's backlog");
    assert!(b.got.lock().unwrap().iter().all(|g| g.auth.as_deref() == Some("Bearer tokB_0123456789")));
    let ol = &r2.rec()["openlineage"];
    assert_eq!((ol["pending"].as_u64(), ol["pending_other_endpoints"].as_u64()), (Some(0), Some(4)), "{ol}");
    assert!(r2.out.stderr.contains("4 OpenLineage event(s) wait for other endpoints"), "{}", r2.out.stderr);
    assert_eq!(pending_lines(&ws), run_lines(&ws, &r1), "A's backlog stays for A");
    assert_eq!(a.got.lock().unwrap().len(), 1, "A was tried once, in run 1");

    // 3. A is back: the next run with A sends A's backlog first, then its own, with A's token.
    a.set(Mode::Ok);
    let r3 = run_with(&ws, &url_a, "tokA_0123456789", false, &[]);
    let mut want = run_lines(&ws, &r1);
    want.extend(run_lines(&ws, &r3));
    assert_eq!(a.bodies(200), want);
    assert!(
        a.got
            .lock()
            .unwrap()
            .iter()
            .all(|g| g.auth.as_deref() == Some("Bearer tokA_0123456789") && g.path == "/catalog-a/api/v1/lineage?api_key=QueryA_s3cret")
    );
    let ol = &r3.rec()["openlineage"];
    assert_eq!((ol["delivered"].as_u64(), ol["pending"].as_u64(), ol["pending_other_endpoints"].as_u64()), (Some(8), Some(0), Some(0)), "{ol}");
    assert!(spool_files(&ws).is_empty());
    assert_eq!(b.got.lock().unwrap().len(), 4, "B got nothing more");
}

/// Review 69 H2: a 413 (or 400) for every event dropped the event and the
/// whole backlog, one warning per event, with no metric. Now nothing is
/// given up while the endpoint refuses everything (but an event refused at
/// three runs in a row), and it is said once per run.
#[test]
fn an_endpoint_that_refuses_every_event_keeps_the_backlog_and_says_so_once_per_run() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let e = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::Status(413));
    let url = format!("http://127.0.0.1:{}/", e.port);
    let prom = ws.path("m.prom");
    let metrics = || -> BTreeMap<String, f64> {
        let o = Command::new("promtool").args(["check", "metrics"]).stdin(std::fs::File::open(&prom).unwrap()).output().expect("promtool (see .ci/run)");
        assert!(o.status.success(), "promtool check metrics: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        ws.read("m.prom")
            .lines()
            .filter(|l| l.starts_with("dagrun_openlineage_"))
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.split('{').next().unwrap().to_string(), v.parse().unwrap())
            })
            .collect()
    };
    let mut all: Vec<String> = Vec::new();
    for n in 1..=2 {
        let r = run_with(&ws, &url, "t", false, &["--metrics-file", prom.to_str().unwrap()]);
        all.extend(run_lines(&ws, &r));
        let ol = &r.rec()["openlineage"];
        assert_eq!((ol["pending"].as_u64(), ol["dropped"].as_u64(), ol["rejected"].as_u64()), (Some(4 * n), Some(0), Some(3)), "run {n}: {ol}");
        assert_eq!(pending_lines(&ws), all, "run {n}: the backlog is kept, in order");
        let said: Vec<&str> = r.out.stderr.lines().filter(|l| l.contains("413")).collect();
        assert_eq!(said.len(), 1, "run {n}: one warning per run:\n{}", r.out.stderr);
        assert!(said[0].contains("refuses events") && said[0].contains("request entity too large") && said[0].contains("\\u{1b}[31m"), "{}", said[0]);
        assert!(!r.out.stderr.contains('\u{1b}'), "the answer's control characters are escaped");
        let m = metrics();
        assert_eq!((m["dagrun_openlineage_pending_events"], m["dagrun_openlineage_dropped_events"]), (4.0 * n as f64, 0.0));
    }
    assert!(!ws.exists(".dagrun/openlineage/dropped.jsonl"));
    // 3 tries a run, each at the head of the backlog: nothing else was sent.
    assert_eq!(e.bodies(413), [&all[..3], &all[..3]].concat());

    // At the third run in a row the head event (refused at every run) is
    // given up: written to dropped.jsonl (0600) and counted; the rest stays.
    let r3 = run_with(&ws, &url, "t", false, &["--metrics-file", prom.to_str().unwrap()]);
    all.extend(run_lines(&ws, &r3));
    let ol = &r3.rec()["openlineage"];
    assert_eq!((ol["pending"].as_u64(), ol["dropped"].as_u64()), (Some(11), Some(1)), "{ol}");
    assert_eq!(pending_lines(&ws), all[1..]);
    let dropped = ws.path(".dagrun/openlineage/dropped.jsonl");
    assert_eq!(mode_of(&dropped), 0o600);
    let d: Vec<Value> = ws.read(".dagrun/openlineage/dropped.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["event"], serde_json::from_str::<Value>(&all[0]).unwrap());
    assert_eq!(d[0]["status"], 413);
    assert!(d[0]["why"].as_str().unwrap().contains("3 runs in a row"), "{}", d[0]);
    assert_eq!(metrics()["dagrun_openlineage_dropped_events"], 1.0);
    assert_eq!(r3.out.stderr.lines().filter(|l| l.contains("for good")).count(), 1, "{}", r3.out.stderr);

    // Fixed: everything kept is delivered, in order.
    e.set(Mode::Ok);
    let r4 = run_with(&ws, &url, "t", false, &[]);
    all.extend(run_lines(&ws, &r4));
    assert_eq!(e.bodies(200), all[1..]);
    assert_eq!(r4.rec()["openlineage"]["pending"], 0);
    assert!(spool_files(&ws).is_empty());
}

/// An event the endpoint refuses while it accepts the events after it is
/// given up at once (it would block the queue forever), never silently:
/// counted, and kept in dropped.jsonl.
#[test]
fn an_event_refused_alone_is_given_up_counted_and_kept_in_dropped_jsonl() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n  big:\n    cmd: echo b > b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n");
    let e = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::RefuseIf("\"pipeline.big\""));
    let r = run_with(&ws, &format!("http://127.0.0.1:{}", e.port), "t", false, &[]);
    let lines = run_lines(&ws, &r);
    let (bad, good): (Vec<String>, Vec<String>) = lines.iter().cloned().partition(|l| l.contains("\"pipeline.big\""));
    assert_eq!(bad.len(), 2);
    let ol = &r.rec()["openlineage"];
    assert_eq!((ol["delivered"].as_u64(), ol["dropped"].as_u64(), ol["pending"].as_u64()), (Some(good.len() as u64), Some(2), Some(0)), "{ol}");
    assert_eq!(e.bodies(200), good);
    let d: Vec<Value> = ws.read(".dagrun/openlineage/dropped.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(d.iter().map(|x| x["event"].clone()).collect::<Vec<_>>(), bad.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect::<Vec<_>>());
    assert!(d.iter().all(|x| x["status"] == 413 && x["endpoint"] == format!("http://127.0.0.1:{}/api/v1/lineage", e.port)));
    assert_eq!(mode_of(&ws.path(".dagrun/openlineage/dropped.jsonl")), 0o600);
    let said: Vec<&str> = r.out.stderr.lines().filter(|l| l.contains("413")).collect();
    assert_eq!(said.len(), 1, "{}", r.out.stderr);
    assert!(said[0].contains("refused 2 event(s) for good") && said[0].contains("dropped.jsonl"), "{}", said[0]);
    assert!(spool_files(&ws).is_empty());
}

/// Start dagrun (`c`) and SIGKILL it once a stage's command has written its
/// shell's pid to `pid_file`; that command (its own process group) is killed
/// too.
fn kill_mid_stage(ws: &Ws, c: Command, pid_file: &str) {
    let _ = std::fs::remove_file(ws.path(pid_file));
    let mut victim = spawn(c);
    let t0 = Instant::now();
    let pid = loop {
        if let Ok(s) = std::fs::read_to_string(ws.path(pid_file))
            && let Ok(p) = s.trim().parse::<i32>()
        {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    signal(victim.pid() as i32, libc::SIGKILL);
    let _ = victim.child.wait();
    signal(-pid, libc::SIGKILL);
}

#[test]
fn a_killed_run_leaves_its_start_events_and_the_next_run_closes_them_with_abort_exactly_once() {
    let ws = Ws::new();
    ws.write("in.txt", "1\n");
    ws.write("delay.txt", "60\n");
    ws.pipeline(
        r#"
stages:
  a:
    cmd: cp in.txt a.txt
    deps: [in.txt]
    outs: [a.txt]
  slow:
    cmd: |
      echo $$ > slow.pid; sleep "$(cat delay.txt)"; cp a.txt slow.txt
    deps: [a.txt]
    outs: [slow.txt]
  after:
    cmd: cp slow.txt after.txt
    deps: [slow.txt]
    outs: [after.txt]
"#,
    );
    let jsonl_files = || -> BTreeSet<String> {
        std::fs::read_dir(ws.path("runs"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".openlineage.jsonl")).collect())
            .unwrap_or_default()
    };
    let parse = |rel: &str| -> Vec<Value> {
        let text = ws.read(rel);
        assert!(text.is_empty() || text.ends_with('\n'), "{rel}: a torn last line");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{rel}: not JSON ({e}): {l}"))).collect()
    };

    // 1. Killed with SIGKILL while `slow` runs: its events so far are on disk.
    let up = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::Ok);
    let with_up = |args: &[&str]| {
        let mut c = cmd(&ws, args);
        c.env("DAGRUN_OPENLINEAGE_URL", format!("http://127.0.0.1:{}", up.port));
        c
    };
    kill_mid_stage(&ws, with_up(&["run", "pipeline.yaml", "-j", "1"]), "slow.pid");
    assert!(!ws.exists("slow.txt"), "the stage finished before the kill; the test proves nothing");
    let files = jsonl_files();
    assert_eq!(files.len(), 1, "{files:?}");
    let killed_file = format!("runs/{}", files.iter().next().unwrap());
    let killed_id = files.iter().next().unwrap().strip_suffix(".openlineage.jsonl").unwrap().to_string();
    assert!(!ws.exists(&format!("runs/{killed_id}.json")), "a killed run has no run record");
    let before = parse(&killed_file);
    for (i, e) in before.iter().enumerate() {
        check_event(e, &format!("killed run, event {i}"));
    }
    let kinds: Vec<(String, String)> = before.iter().map(|e| (e["job"]["name"].as_str().unwrap().into(), e["eventType"].as_str().unwrap().into())).collect();
    let want: Vec<(String, String)> = [("pipeline", "START"), ("pipeline.a", "START"), ("pipeline.a", "COMPLETE"), ("pipeline.slow", "START")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(kinds, want, "the killed run's events, as they happened");
    assert!(ws.exists(&format!(".dagrun/openlineage/open/{killed_id}")));

    // 2. The next run closes the two open runs (slow, then the pipeline) with
    //    ABORT in the killed run's file, and sends them to the endpoint (the
    //    killed run's) first.
    ws.write("delay.txt", "0\n");
    let run_up = || ws.run_cmd(with_up(&["run", "pipeline.yaml"])).ok();
    let n0 = up.got.lock().unwrap().len();
    let r2 = run_up();
    let after = parse(&killed_file);
    assert_eq!(after.len(), before.len() + 2, "two ABORT events appended");
    assert_eq!(&after[..before.len()], &before[..], "the killed run's events are kept as they were");
    for (i, e) in after.iter().enumerate() {
        check_event(e, &format!("killed run after recovery, event {i}"));
    }
    let pairs = pairing(&after);
    assert_eq!(pairs.len(), 3, "{pairs:?}");
    let (root, _, jobs) = by_job(&after);
    assert_eq!(pairs[&root], ["START", "ABORT"]);
    assert_eq!(jobs["a"].iter().map(|e| e["eventType"].as_str().unwrap()).collect::<Vec<_>>(), ["START", "COMPLETE"]);
    assert_eq!(jobs["slow"].iter().map(|e| e["eventType"].as_str().unwrap()).collect::<Vec<_>>(), ["START", "ABORT"]);
    let abort_slow = &after[before.len()];
    assert_eq!(abort_slow["job"]["name"], "pipeline.slow", "the stage run is closed before its pipeline run");
    assert_eq!(abort_slow["run"]["facets"]["dagrun"]["status"], "killed");
    assert_eq!(abort_slow["run"]["facets"]["dagrun"]["dagrunRunId"], killed_id.as_str());
    let msg = abort_slow["run"]["facets"]["errorMessage"]["message"].as_str().unwrap();
    assert!(msg.contains("stage slow killed") && msg.contains(&killed_id), "{msg}");
    assert_eq!(after.last().unwrap()["job"]["name"], "pipeline");
    python_check(&ws.path(&killed_file));

    let r2_file = format!("runs/{}.openlineage.jsonl", r2.rec()["run_id"].as_str().unwrap());
    let ev2 = parse(&r2_file);
    for (i, e) in ev2.iter().enumerate() {
        check_event(e, &format!("next run, event {i}"));
    }
    // Pairing across both files: every OpenLineage run of either is closed once.
    let mut both = after.clone();
    both.extend(ev2.iter().cloned());
    assert_eq!(pairing(&both).len(), 3 + 4);
    python_check(&ws.path(&r2_file));
    assert_eq!(r2.statuses()["slow"], "ran");
    let ol = &r2.rec()["openlineage"];
    assert_eq!(ol["killed_runs"], serde_json::json!([{"run_id": killed_id, "abort_events": 2}]), "{ol}");
    assert_eq!((ol["delivered"].as_u64(), ol["pending"].as_u64()), (Some(2 + 8), Some(0)), "{ol}");
    let abort_lines: Vec<String> = ws.read(&killed_file).lines().skip(before.len()).map(String::from).collect();
    let mut want_sent = abort_lines.clone();
    want_sent.extend(ws.read(&r2_file).lines().map(String::from));
    assert_eq!(up.got.lock().unwrap()[n0..].iter().map(|g| g.body.clone()).collect::<Vec<_>>(), want_sent, "the ABORT events, then the run's own");
    assert!(!ws.exists(&format!(".dagrun/openlineage/open/{killed_id}")));

    // 3. A third run emits them no more.
    let n = up.got.lock().unwrap().len();
    let r3 = run_up();
    assert_eq!(parse(&killed_file), after, "the killed run's file is not touched again");
    assert!(r3.rec()["openlineage"].get("killed_runs").is_none(), "{}", r3.rec()["openlineage"]);
    let sent3: Vec<String> = up.got.lock().unwrap()[n..].iter().map(|g| g.body.clone()).collect();
    let r3_lines: Vec<String> = ws.read(&format!("runs/{}.openlineage.jsonl", r3.rec()["run_id"].as_str().unwrap())).lines().map(String::from).collect();
    assert_eq!(sent3, r3_lines, "only the third run's own events");
    assert!(sent3.iter().all(|l| !l.contains("\"ABORT\"")));
    let open_left: Vec<_> = std::fs::read_dir(ws.path(".dagrun/openlineage/open")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(open_left.is_empty(), "{open_left:?}");
}

/// A killed run's ABORTs go where its STARTs went (session 21's note: the
/// recovering run's endpoint got them, an ad-hoc dev catalog included): kept
/// for the killed run's endpoint while the next run uses another, sent when
/// a run uses it again; a killed run without an endpoint gets them in its
/// file only.
#[test]
fn a_killed_runs_abort_events_go_to_its_own_endpoint_only() {
    let ws = Ws::new();
    ws.write("delay.txt", "60\n");
    ws.pipeline("stages:\n  slow:\n    cmd: echo $$ > slow.pid; sleep \"$(cat delay.txt)\"; echo s > s.txt\n    outs: [s.txt]\n");
    let prod = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::Ok);
    let dev = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap(), Mode::Ok);
    let with = |r: Option<&Receiver>, args: &[&str]| {
        let mut c = cmd(&ws, args);
        if let Some(r) = r {
            c.env("DAGRUN_OPENLINEAGE_URL", format!("http://127.0.0.1:{}/prod-or-dev", r.port));
        }
        c
    };
    let aborts = |r: &Receiver| r.bodies(200).iter().filter(|b| b.contains("\"ABORT\"")).count();

    // 1. Killed while sending to prod; the next run uses dev: dev gets no ABORT, prod's wait.
    kill_mid_stage(&ws, with(Some(&prod), &["run", "pipeline.yaml"]), "slow.pid");
    ws.write("delay.txt", "0\n");
    let r2 = ws.run_cmd(with(Some(&dev), &["run", "pipeline.yaml"])).ok();
    let ol = &r2.rec()["openlineage"];
    assert_eq!(ol["killed_runs"][0]["abort_events"], 2, "{ol}");
    assert_eq!(dev.bodies(200), run_lines(&ws, &r2), "dev got the killed prod run's ABORTs");
    assert_eq!((ol["pending"].as_u64(), ol["pending_other_endpoints"].as_u64()), (Some(0), Some(2)), "{ol}");
    let (waiting, endpoints) = spooled(&ws);
    assert_eq!(waiting.len(), 2);
    assert!(waiting.iter().all(|l| l.contains("\"ABORT\"")));
    assert_eq!(endpoints, [format!("http://127.0.0.1:{}/prod-or-dev/api/v1/lineage", prod.port)]);
    assert_eq!(aborts(&prod), 0);

    // 2. The next run with prod sends them first.
    let n = prod.got.lock().unwrap().len();
    let r3 = ws.run_cmd(with(Some(&prod), &["run", "pipeline.yaml"])).ok();
    let sent: Vec<String> = prod.got.lock().unwrap()[n..].iter().map(|g| g.body.clone()).collect();
    let mut want = waiting.clone();
    want.extend(run_lines(&ws, &r3));
    assert_eq!(sent, want);
    assert!(spool_files(&ws).is_empty());

    // 3. Killed without an endpoint: the next run's endpoint gets no ABORT; the file has them.
    ws.write("delay.txt", "60\n");
    kill_mid_stage(&ws, with(None, &["run", "pipeline.yaml", "--force", ""]), "slow.pid");
    ws.write("delay.txt", "0\n");
    let before = aborts(&prod);
    let r4 = ws.run_cmd(with(Some(&prod), &["run", "pipeline.yaml"])).ok();
    let killed = r4.rec()["openlineage"]["killed_runs"][0]["run_id"].as_str().unwrap().to_string();
    assert_eq!(ws.read(&format!("runs/{killed}.openlineage.jsonl")).matches("\"ABORT\"").count(), 2);
    assert_eq!(aborts(&prod), before, "the ABORTs of a run that had no endpoint were sent");
    assert!(spool_files(&ws).is_empty());
}

/// A killed run whose event file was replaced by a symlink: recovery never
/// writes through it (it cut the file the link led to back to its last
/// newline), and the run itself is not held up. A mark planted without the
/// workspace key makes no event at all (review 13: a planted mark and event
/// file were re-sent to the catalog with the user's token).
#[test]
fn recovery_never_writes_through_a_planted_event_file_link() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo $$ > a.pid; sleep 60; echo a > a.txt\n    outs: [a.txt]\n");
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.txt");
    let text = "keep this line\nand this one without its newline";
    std::fs::write(&victim, text).unwrap();
    let planted = "20261205-000000-000-abcd";
    // A run killed while its stage runs leaves a genuine mark.
    kill_mid_stage(&ws, cmd(&ws, &["run", "pipeline.yaml"]), "a.pid");
    let marks: Vec<String> = std::fs::read_dir(ws.path(".dagrun/openlineage/open"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != planted)
        .collect();
    assert_eq!(marks.len(), 1, "{marks:?}");
    let file = ws.path(&format!("runs/{}.openlineage.jsonl", marks[0]));
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&victim, &file).unwrap();
    // A planted mark (and event file) is removed, with no event made.
    ws.write(&format!(".dagrun/openlineage/open/{planted}"), "");
    std::os::unix::fs::symlink(&victim, ws.path(&format!("runs/{planted}.openlineage.jsonl"))).unwrap();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let r = ws.run(&[]);
    assert_eq!(r.out.code, 0, "{}", r.out.stderr);
    assert!(r.out.stderr.contains(&format!("{planted} is not a mark this workspace made")), "{}", r.out.stderr);
    assert!(!ws.exists(&format!(".dagrun/openlineage/open/{planted}")), "the planted mark is removed");
    assert!(r.out.stderr.contains("is a symlink; dagrun never writes through a link there"), "{}", r.out.stderr);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), text, "the file behind the link was changed");
}
