//! Runs a killed dagrun left open: their terminal `ABORT` events.
//!
//! Rules:
//! - A run marks itself open ([`OpenRuns::mark`], an empty file
//!   `.dagrun/openlineage/open/RUN_ID`) before its first event and clears the
//!   mark after its last one. A mark found by a later run (which holds the
//!   workspace lock, so the marked run is not running) belongs to a run that
//!   was killed (SIGKILL, power loss, OOM killer).
//! - For such a run, [`recover`] reads its event file back (untrusted: a line
//!   that is not a dagrun RunEvent of spec 2-0-2 is ignored, with a warning),
//!   finds every OpenLineage run with a `START` and no terminal event, and
//!   appends one `ABORT` per such run to that same file (stage runs first,
//!   then the pipeline run), each a copy of the run's `START` (same run id,
//!   job, parent, datasets) with the current time, an `errorMessage` facet and
//!   `status: killed` in the `dagrun` facet.
//! - The mark holds a MAC of the run id under the workspace integrity key: a
//!   mark planted by someone without the key (or left by a dagrun from
//!   before marks were sealed) is removed with a warning, and no event is
//!   made for it (review 13: a planted mark and event file were re-sent to
//!   the catalog with the user's token).
//! - The mark also names where the run sent its events ([`SentTo`]: no
//!   endpoint, or an endpoint by its spool id and its URL as shown, under the
//!   same MAC): the `ABORT`s go where the `START`s went, never to the
//!   recovering run's endpoint unless it is the same one (session 21: a
//!   killed production run's `ABORT`s went to the next run's ad-hoc dev
//!   catalog). The caller queues them for its own endpoint or stores them in
//!   the other endpoint's spool; a run that had no endpoint gets them in its
//!   file only. A mark from before marks named the endpoint is
//!   [`SentTo::Unknown`]: its `ABORT`s go to the recovering run's endpoint,
//!   as they did then.
//! - A mark whose run has a run record (`runs/RUN_ID.json`: the run ended)
//!   is removed, with no event (a mark copied while its run was live and put
//!   back afterwards: review 14).
//! - Only a `START` dagrun made gets an `ABORT`: in a namespace of this
//!   workspace (`dagrun://HOST/WORKSPACE_ID` on any host: the killed run may
//!   have been on another one, review 16), and with a run id that is the
//!   MAC-derived id of its job, namespace and time in the killed run
//!   (`ids::is_run_uuid_of`); a `START` planted in the event
//!   file (any job name, any dataset) makes nothing (review 14). The `ABORT`
//!   is rebuilt, never copied, in the killed run's namespace: the run id, the job, the parent run (checked
//!   the same way), and a `dagrun` facet of the dagrun run id, the stage
//!   (from the job's name) and `status: killed`; no datasets (those are on
//!   the `START`) and nothing else the file holds.
//! - Exactly once: the events are handed to the caller (to queue for the
//!   endpoint and store in the spool) after they are in the file and before
//!   the mark is removed; a run killed in between leaves the mark, and the
//!   next run finds those runs closed in the file and emits nothing more.

use super::event::{self, EventType, Facets, Job, RUN_EVENT_SCHEMA, Run, RunEvent};
use super::transport::open_append;
use crate::crypto::IntegrityKey;
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// MAC domain of a mark from before marks named the endpoint (the MAC of the run id alone).
const MARK_DOMAIN: &str = "dagrun openlineage open run v1";
/// MAC domain of a mark `MAC ENDPOINT_ID SHOWN` (or `MAC -`): the run id, the endpoint id and the URL as shown.
const MARK_DOMAIN_V2: &str = "dagrun openlineage open run v2";
/// Longest endpoint URL (as shown) a mark holds.
const MAX_SHOWN: usize = 2048;

/// Where a killed run sent its events, as its mark says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SentTo {
    /// No endpoint: its events are in its file only.
    Nowhere,
    /// The endpoint whose spool id ([`super::transport::endpoint_id`]) is
    /// `id`, shown (no credentials, no query) as `shown`.
    Endpoint { id: String, shown: String },
    /// A mark from before marks named the endpoint.
    Unknown,
}

impl SentTo {
    /// The mark's text after its MAC.
    fn body(&self) -> String {
        match self {
            SentTo::Endpoint { id, shown } => {
                // A long URL is cut (it is only shown): a mark must read back
                // (helper-73: one of 2,100 characters was taken for planted).
                format!("{id} {}", &shown[..crate::util::floor_char_boundary(shown, MAX_SHOWN)])
            }
            SentTo::Nowhere | SentTo::Unknown => "-".to_string(),
        }
    }

    /// The inverse of [`SentTo::body`]; `None` for anything else.
    fn parse(body: &str) -> Option<SentTo> {
        if body == "-" {
            return Some(SentTo::Nowhere);
        }
        let (id, shown) = body.split_once(' ')?;
        let plain = !shown.is_empty() && shown.len() <= MAX_SHOWN && !shown.chars().any(|c| c.is_control() || c.is_whitespace());
        (crate::util::is_lower_hex(id, 32) && plain).then(|| SentTo::Endpoint { id: id.to_string(), shown: shown.to_string() })
    }
}

/// Largest event file read back.
pub const MAX_FILE: u64 = 256 << 20;

/// `.dagrun/openlineage/open/`: one file per run that has not ended, holding
/// the MAC of its run id (see the module's rules).
pub struct OpenRuns {
    dir: PathBuf,
    key: Option<Arc<IntegrityKey>>,
    /// Where this process's run sends its events (written into its mark).
    sent_to: SentTo,
}

/// A dagrun run id as used in file names (`YYYYMMDD-HHMMSS-mmm-XXXX`).
pub fn valid_run_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl OpenRuns {
    /// Marks sealed under `key` (without a key nothing is marked, listed or
    /// recovered); this process's run sends its events to `sent_to`
    /// ([`SentTo::Nowhere`] or [`SentTo::Endpoint`]).
    pub fn new(dagrun_dir: &Path, key: Option<Arc<IntegrityKey>>, sent_to: SentTo) -> OpenRuns {
        OpenRuns { dir: dagrun_dir.join("openlineage").join("open"), key, sent_to }
    }

    /// What a mark's MAC seals: the run id and the mark's text after the MAC.
    fn sealed_bytes(run_id: &str, body: &str) -> Vec<u8> {
        format!("{run_id}\n{body}").into_bytes()
    }

    /// Mark `run_id` open (before its first event).
    pub fn mark(&self, run_id: &str) -> Result<()> {
        let Some(key) = &self.key else { return Ok(()) };
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let body = self.sent_to.body();
        let text = format!("{} {body}", key.mac(MARK_DOMAIN_V2, &Self::sealed_bytes(run_id, &body)).to_hex());
        // The owner's only (a mark someone copied could be put back later);
        // never through a link. Not fsynced: a torn mark does not verify and
        // is removed, as a missing one would be.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(run_id);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(())
    }

    /// Where the run of `run_id` sent its events, if its mark is one this
    /// workspace made (`None`: not sealed, or unreadable).
    fn read(&self, run_id: &str) -> Option<SentTo> {
        let key = self.key.as_ref()?;
        let text = crate::util::read_capped(&self.dir.join(run_id), 64 + 1 + 32 + 1 + MAX_SHOWN as u64).ok().and_then(|b| String::from_utf8(b).ok())?;
        let text = text.trim_end_matches('\n');
        match text.split_once(' ') {
            Some((mac, body)) => {
                let sent_to = SentTo::parse(body)?;
                key.verify(MARK_DOMAIN_V2, &Self::sealed_bytes(run_id, body), mac).then_some(sent_to)
            }
            None => key.verify(MARK_DOMAIN, run_id.as_bytes(), text).then_some(SentTo::Unknown),
        }
    }

    /// The run ended (after its last event).
    pub fn clear(&self, run_id: &str) {
        match std::fs::remove_file(self.dir.join(run_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("cannot remove {}: {e}", self.dir.join(run_id).display())
            }
            _ => {}
        }
    }

    /// Marked runs, oldest first (run ids sort by time).
    pub fn list(&self) -> Vec<String> {
        self.marks().into_iter().map(|(run_id, _)| run_id).collect()
    }

    /// Marked runs, oldest first, each with where it sent its events (each
    /// mark read and verified once).
    fn marks(&self) -> Vec<(String, SentTo)> {
        let mut v: Vec<String> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect(),
            Err(_) => return vec![],
        };
        v.retain(|n| {
            let ok = valid_run_id(n);
            if !ok && !n.starts_with('.') {
                tracing::warn!("{}: ignoring {n:?}, not a run id", self.dir.display());
            }
            ok
        });
        // Only marks this workspace sealed; another is removed (it could
        // only make events out of a file anyone may have written).
        let mut marks: Vec<(String, SentTo)> = v
            .into_iter()
            .filter_map(|n| match self.read(&n) {
                Some(sent_to) => Some((n, sent_to)),
                None => {
                    if self.key.is_some() {
                        tracing::warn!(
                            "{}: {n} is not a mark this workspace made (planted, or left by an older dagrun); removed, no event made for it",
                            self.dir.display()
                        );
                        self.clear(&n);
                    }
                    None
                }
            })
            .collect();
        marks.sort_by(|a, b| a.0.cmp(&b.0));
        marks
    }
}

/// The `ABORT` events closing every run of `text` (an event file) that has a
/// `START` and no terminal event; stage runs (with a `parent`) first. Also
/// the number of lines ignored as not being dagrun events.
pub fn abort_events(text: &[u8], why: &str, now: &str, namespace: &str, run_id: &str, key: &IntegrityKey) -> (Vec<RunEvent>, usize) {
    let mut starts: Vec<RunEvent> = Vec::new();
    let mut closed: HashMap<String, ()> = HashMap::new();
    let mut bad = 0usize;
    let this_workspace = super::ids::workspace_of_namespace(namespace);
    for line in text.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let e = match serde_json::from_slice::<RunEvent>(line) {
            Ok(e)
                if e.schema_url == RUN_EVENT_SCHEMA
                    && e.producer.starts_with("urn:dagrun:")
                    && this_workspace.is_some_and(|w| super::ids::workspace_of_namespace(&e.job.namespace) == Some(w))
                    && super::ids::is_run_uuid_of(&e.run.run_id, run_id, &e.job.namespace, &e.job.name, key) =>
            {
                e
            }
            _ => {
                bad += 1;
                continue;
            }
        };
        if e.event_type.is_terminal() {
            closed.insert(e.run.run_id.clone(), ());
        } else if !starts.iter().any(|s| s.run.run_id == e.run.run_id || s.job.name == e.job.name) {
            // One run per job in a dagrun run: a second id for a job is not one dagrun made.
            starts.push(e);
        }
    }
    let mut open: Vec<RunEvent> = starts.into_iter().filter(|s| !closed.contains_key(&s.run.run_id)).collect();
    // Stage runs before their pipeline run; otherwise file order.
    open.sort_by_key(|s| !s.run.facets.contains_key("parent"));
    let out = open.into_iter().map(|e| abort_of(&e, why, now, run_id, key)).collect();
    (out, bad)
}

/// The `ABORT` closing the run `start` opened (a `START` whose id checked):
/// rebuilt from what identifies it (see the module's rules).
fn abort_of(start: &RunEvent, why: &str, now: &str, run_id: &str, key: &IntegrityKey) -> RunEvent {
    // The killed run's own namespace (its host may not be this one's).
    let namespace = start.job.namespace.as_str();
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let parent = start.run.facets.get("parent");
    let parent = match (text(parent.and_then(|p| p.pointer("/run/runId"))), text(parent.and_then(|p| p.pointer("/job/name")))) {
        (Some(run), Some(job)) if super::ids::is_run_uuid_of(&run, run_id, namespace, &job, key) => Some((run, job)),
        _ => None,
    };
    // A stage's job is `PIPELINE_JOB.STAGE`, its parent the pipeline's job.
    let stage = parent.as_ref().and_then(|(_, pj)| start.job.name.strip_prefix(pj.as_str())).and_then(|r| r.strip_prefix('.')).map(str::to_string);
    let mut fields = serde_json::Map::new();
    fields.insert("dagrunRunId".into(), run_id.into());
    if let Some(s) = &stage {
        fields.insert("stage".into(), s.clone().into());
    }
    fields.insert("status".into(), "killed".into());
    let mut facets = Facets::new();
    facets.insert("dagrun".into(), event::dagrun_facet(Value::Object(fields)));
    if let Some((run, job)) = &parent {
        facets.insert("parent".into(), event::parent_facet(run, namespace, job));
    }
    let what = match &stage {
        Some(stage) => format!("stage {stage}"),
        None => "run".to_string(),
    };
    facets.insert("errorMessage".into(), event::error_message_facet(&format!("{what} killed: {why}")));
    RunEvent::new(
        EventType::Abort,
        now.to_string(),
        Run { run_id: start.run.run_id.clone(), facets },
        Job { namespace: namespace.to_string(), name: start.job.name.clone(), facets: Facets::new() },
    )
}

/// What [`recover`] closed in one killed run.
#[derive(Debug)]
pub struct Closed {
    pub run_id: String,
    /// The `ABORT` event lines appended to the run's file.
    pub lines: Vec<String>,
}

/// Close the runs left open by killed dagrun runs (see the module doc).
/// `file_of(run_id)` = that run's event file; `current` = the run doing
/// this (never treated as killed); `deliver(sent_to, lines)` is called with
/// where the killed run sent its events and the new events of that run,
/// after they are in its file and before its mark is removed (an error keeps
/// the mark: the next run tries again).
pub fn recover(
    open: &OpenRuns,
    current: &str,
    namespace: &str,
    file_of: impl Fn(&str) -> PathBuf,
    mut deliver: impl FnMut(&SentTo, &[String]) -> Result<()>,
) -> Vec<Closed> {
    let mut done = Vec::new();
    let Some(key) = open.key.clone() else { return vec![] };
    for (run_id, sent_to) in open.marks() {
        if run_id == current {
            continue;
        }
        let path = file_of(&run_id);
        let record = path.with_file_name(format!("{run_id}.json"));
        if std::fs::symlink_metadata(&record).is_ok() {
            tracing::warn!("{}: run {run_id} has a run record (it ended): its mark is not a killed run's; removed, no event made", open.dir.display());
            open.clear(&run_id);
            continue;
        }
        let res = (|| -> Result<Vec<String>> {
            let (mut f, len) = match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
                Ok(m) if m.len() > MAX_FILE => anyhow::bail!("{} is larger than {} MiB; not read", path.display(), MAX_FILE >> 20),
                Ok(_) => open_append(&path)?,
            };
            let mut text = Vec::with_capacity(len as usize);
            {
                use std::io::{Read, Seek, SeekFrom};
                f.seek(SeekFrom::Start(0))?;
                (&mut f).take(len).read_to_end(&mut text).with_context(|| format!("cannot read {}", path.display()))?;
            }
            let why = format!("dagrun run {run_id} ended without finishing (killed); closed by the next run, {current}");
            let (events, bad) = abort_events(&text, &why, &event::now(), namespace, &run_id, &key);
            if bad > 0 {
                tracing::warn!(
                    "{}: ignored {bad} line(s) that are not OpenLineage events this workspace's dagrun wrote (edited, planted or unreadable)",
                    path.display()
                );
            }
            let lines: Vec<String> = events.iter().map(RunEvent::to_line).collect();
            if !lines.is_empty() {
                let mut buf = Vec::new();
                for l in &lines {
                    buf.extend_from_slice(l.as_bytes());
                    buf.push(b'\n');
                }
                use std::io::Write;
                if let Err(e) = f.write_all(&buf) {
                    let _ = f.set_len(len);
                    return Err(e).with_context(|| format!("cannot append to {}", path.display()));
                }
            }
            Ok(lines)
        })();
        match res.and_then(|lines| deliver(&sent_to, &lines).map(|()| lines)) {
            Ok(lines) => {
                open.clear(&run_id);
                if !lines.is_empty() {
                    tracing::warn!("run {run_id} was killed: {} OpenLineage run(s) closed with ABORT in {}", lines.len(), path.display());
                }
                done.push(Closed { run_id, lines });
            }
            Err(e) => tracing::warn!("cannot close the OpenLineage runs of killed run {run_id}: {e:#}"),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lineage::event::parent_facet;
    use crate::lineage::ids::run_uuid;

    fn key() -> Arc<IntegrityKey> {
        Arc::new(IntegrityKey::from_bytes([7; 32]))
    }

    /// This workspace on another host: the next run may be elsewhere (review 16).
    const OTHER_HOST: &str = "dagrun://h2/0123456789abcdef0123456789abcdef";

    /// A job namespace of this workspace (on host `h1`).
    const NS: &str = "dagrun://h1/0123456789abcdef0123456789abcdef";

    /// The id dagrun gives job `job` of dagrun run `run` (under `key()`).
    fn id(run: &str, job: &str) -> String {
        run_uuid(1_765_000_000_000, run, NS, job, Some(&key()))
    }

    /// An event of job `job` (`pipe` or `pipe.STAGE`) of dagrun run `run`.
    fn ev(t: EventType, run: &str, job: &str) -> String {
        let mut r = Run { run_id: id(run, job), facets: Default::default() };
        if let Some(stage) = job.strip_prefix("pipe.") {
            r.facets.insert("parent".into(), parent_facet(&id(run, "pipe"), NS, "pipe"));
            r.facets.insert("dagrun".into(), event::dagrun_facet(serde_json::json!({"dagrunRunId": run, "stage": stage})));
        }
        RunEvent::new(t, event::now(), r, Job { namespace: NS.into(), name: job.into(), facets: Default::default() }).to_line()
    }

    #[test]
    fn open_runs_get_one_abort_each_stages_first() {
        let text = [
            ev(EventType::Start, "r1", "pipe"),
            ev(EventType::Start, "r1", "pipe.a"),
            ev(EventType::Complete, "r1", "pipe.a"),
            ev(EventType::Start, "r1", "pipe.b"),
            "{not json".into(),
        ]
        .join("\n");
        let (out, bad) = abort_events(text.as_bytes(), "x", "2026-01-01T00:00:00.000Z", OTHER_HOST, "r1", &key());
        assert_eq!(bad, 1);
        let ids: Vec<&str> = out.iter().map(|e| e.job.name.as_str()).collect();
        assert_eq!(ids, ["pipe.b", "pipe"]);
        assert!(out.iter().all(|e| e.event_type == EventType::Abort && e.run.facets.contains_key("errorMessage")));
        assert_eq!(out[0].run.facets["dagrun"]["status"], "killed");
        assert_eq!(out[0].run.facets["dagrun"]["stage"], "b");
        assert_eq!(out[0].run.facets["parent"]["run"]["runId"], id("r1", "pipe"));
        assert!(out[0].run.facets["errorMessage"]["message"].as_str().unwrap().starts_with("stage b killed: x"));
        // Once closed, nothing more.
        let mut all = text.clone();
        for e in &out {
            all.push('\n');
            all.push_str(&e.to_line());
        }
        assert!(abort_events(all.as_bytes(), "x", "t", OTHER_HOST, "r1", &key()).0.is_empty());
        // Another run's (or another key's) events are not this run's.
        assert!(abort_events(text.as_bytes(), "x", "t", OTHER_HOST, "r2", &key()).0.is_empty());
        assert!(abort_events(text.as_bytes(), "x", "t", OTHER_HOST, "r1", &IntegrityKey::from_bytes([8; 32])).0.is_empty());
    }

    #[test]
    fn recover_appends_once_and_clears_the_mark() {
        let d = tempfile::tempdir().unwrap();
        let open = OpenRuns::new(d.path(), Some(key()), SentTo::Nowhere);
        open.mark("r1").unwrap();
        open.mark("r2").unwrap();
        let file = d.path().join("r1.jsonl");
        // A torn last line is cut off.
        std::fs::write(&file, format!("{}\n{}\n{{\"half", ev(EventType::Start, "r1", "pipe"), ev(EventType::Start, "r1", "pipe.a"))).unwrap();
        let mut got = Vec::new();
        let closed = recover(
            &open,
            "r2",
            OTHER_HOST,
            |id| d.path().join(format!("{id}.jsonl")),
            |_, l| {
                got.extend(l.to_vec());
                Ok(())
            },
        );
        assert_eq!(closed.len(), 1);
        assert_eq!(got.len(), 2);
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with('\n') && !text.contains("half"));
        assert_eq!(open.list(), ["r2"]);
        // A mark left behind (killed after the append): nothing is left open.
        open.mark("r1").unwrap();
        let c = recover(&open, "r2", OTHER_HOST, |id| d.path().join(format!("{id}.jsonl")), |_, _| Ok(()));
        assert!(c[0].lines.is_empty());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        // A mark put back after its run ended (it has a run record): removed, no event.
        std::fs::write(&file, format!("{}\n", ev(EventType::Start, "r1", "pipe"))).unwrap();
        std::fs::write(d.path().join("r1.json"), "{}").unwrap();
        open.mark("r1").unwrap();
        let c = recover(&open, "r2", OTHER_HOST, |id| d.path().join(format!("{id}.jsonl")), |_, _| panic!("nothing to deliver"));
        assert!(c.is_empty());
        assert_eq!(open.list(), ["r2"]);
    }

    /// A mark names where its run sent its events, under its MAC: an edited
    /// endpoint makes the mark untrusted; an older mark (the MAC of the run
    /// id alone) is `Unknown`.
    #[test]
    fn a_mark_names_where_its_run_sent_its_events() {
        let d = tempfile::tempdir().unwrap();
        let a = SentTo::Endpoint { id: "0123456789abcdef0123456789abcdef".into(), shown: "https://catalog.example/api/v1/lineage?…".into() };
        OpenRuns::new(d.path(), Some(key()), a.clone()).mark("r1").unwrap();
        OpenRuns::new(d.path(), Some(key()), SentTo::Nowhere).mark("r2").unwrap();
        std::fs::write(d.path().join("openlineage/open/r3"), key().mac(MARK_DOMAIN, b"r3").to_hex().as_bytes()).unwrap();
        let open = OpenRuns::new(d.path(), Some(key()), SentTo::Nowhere);
        assert_eq!(open.list(), ["r1", "r2", "r3"]);
        assert_eq!((open.read("r1"), open.read("r2"), open.read("r3")), (Some(a), Some(SentTo::Nowhere), Some(SentTo::Unknown)));
        // Another endpoint written into r1's mark, or r2's moved to r4: not this workspace's marks.
        let text = std::fs::read_to_string(d.path().join("openlineage/open/r1")).unwrap();
        std::fs::write(d.path().join("openlineage/open/r1"), text.replace("0123456789abcdef0123", "fedcba98765432100123")).unwrap();
        std::fs::copy(d.path().join("openlineage/open/r2"), d.path().join("openlineage/open/r4")).unwrap();
        assert_eq!(open.list(), ["r2", "r3"]);
        // A long URL is cut to what a mark may hold, and reads back.
        let long = SentTo::Endpoint { id: "0123456789abcdef0123456789abcdef".into(), shown: format!("https://h/{}", "é".repeat(MAX_SHOWN)) };
        OpenRuns::new(d.path(), Some(key()), long).mark("r5").unwrap();
        assert!(matches!(open.read("r5"), Some(SentTo::Endpoint { shown, .. }) if shown.len() <= MAX_SHOWN && shown.starts_with("https://h/é")));
        // What a mark can name is checked before its MAC.
        for body in [
            "",
            "x",
            "0123 https://a",
            "0123456789abcdef0123456789abcdef ",
            "0123456789abcdef0123456789abcdef a b",
            "0123456789ABCDEF0123456789ABCDEF https://a",
        ] {
            assert_eq!(SentTo::parse(body), None, "{body:?}");
        }
    }

    /// Reviews 13 and 14: a planted mark makes no event; a planted START
    /// (any job, any dataset, any facet) makes none either; an ABORT is
    /// rebuilt from what identifies the run, never a copy of the file.
    #[test]
    fn planted_marks_and_events_never_go_out() {
        let d = tempfile::tempdir().unwrap();
        let open = OpenRuns::new(d.path(), Some(key()), SentTo::Nowhere);
        open.mark("r1").unwrap();
        std::fs::write(d.path().join("openlineage/open/planted"), "").unwrap();
        std::fs::write(d.path().join("openlineage/open/r9"), key().mac("other domain", b"r9").to_hex().as_bytes()).unwrap();
        assert_eq!(open.list(), ["r1"]);
        assert!(!d.path().join("openlineage/open/planted").exists(), "a planted mark is removed");
        // Another workspace's key (or none) makes no mark this one trusts.
        assert!(OpenRuns::new(d.path(), Some(Arc::new(IntegrityKey::from_bytes([8; 32]))), SentTo::Nowhere).list().is_empty());
        assert!(OpenRuns::new(d.path(), None, SentTo::Nowhere).list().is_empty());

        // A genuine START whose line was edited: planted facets and datasets stay behind.
        let mut start: serde_json::Value = serde_json::from_str(&ev(EventType::Start, "r1", "pipe.a")).unwrap();
        start["run"]["facets"]["x"] = serde_json::json!({"ssn": "123-45-6789"});
        start["run"]["facets"]["dagrun"]["injected"] = "secret-field".into();
        start["run"]["facets"]["dagrun"]["kind"] = "alice@example.com".into();
        start["inputs"] = serde_json::json!([{"namespace": "ns/T", "name": "123-45-6789.txt"}, {"namespace": "s3://exfil", "name": "x"}]);
        // A planted START: a job name of the attacker's, an id made without the key.
        let mut planted: serde_json::Value = serde_json::from_str(&ev(EventType::Start, "r1", "pipe.a")).unwrap();
        planted["job"]["name"] = "PLANTED-JOB alice.smith@example.com".into();
        let mut other: serde_json::Value = serde_json::from_str(&ev(EventType::Start, "r1", "pipe")).unwrap();
        other["job"]["namespace"] = "dagrun://h1/fedcba9876543210fedcba9876543210".into();
        let text = format!("{start}\n{planted}\n{other}\n");
        let (out, bad) = abort_events(text.as_bytes(), "x", "2026-01-01T00:00:00.000Z", OTHER_HOST, "r1", &key());
        assert_eq!(bad, 2, "the planted START and the one of another namespace are not ours");
        assert_eq!(out.len(), 1);
        let line = out[0].to_line();
        for p in ["123-45-6789", "secret-field", "exfil", "alice", "PLANTED"] {
            assert!(!line.contains(p), "{p} went out: {line}");
        }
        assert!(out[0].inputs.is_empty() && out[0].outputs.is_empty());
        assert_eq!(out[0].job.name, "pipe.a");
        assert_eq!(out[0].run.facets["dagrun"]["stage"], "a");
    }
}
