//! Where events go: a JSONL file (always) and an HTTP endpoint (optional),
//! with a spool for what the endpoint did not take.
//!
//! Rules:
//! - [`FileSink`] appends each event to the run's file as it happens, one
//!   line per event, the whole line in one `write` to a file opened in append
//!   mode: a killed run leaves every event emitted before the kill, and never
//!   a torn line (a line cut short by a failed write is cut back off; an
//!   unfinished last line is cut off when the file is next opened). Not
//!   fsynced: the run record is the durable account of a run, and the file
//!   of a run killed with the machine may lose its last lines.
//!   Several lines can go in one write ([`FileSink::write_text`]): the
//!   emitter holds back events whose loss leaves no run open (see
//!   `engine::openlineage`), so a no-op run writes its file once.
//! - [`HttpSink`] POSTs each event (JSON body) to `URL/api/v1/lineage` from
//!   its own thread, never from a stage's: emission only queues. Each request
//!   has bounded timeouts ([`CONNECT_TIMEOUT`], [`REQUEST_TIMEOUT`]); after the
//!   first failure (down, slow, 5xx, 401…) the sender stops trying for the
//!   rest of the run. When the run ends, the sender gets at most
//!   [`FLUSH_GRACE`] to finish; everything not delivered by then is returned
//!   as pending, for the [`Spool`]. An event the endpoint refuses as malformed
//!   (400, 413, 422) is dropped and counted, so one bad event cannot block the
//!   queue forever.
//! - The bearer token is only ever put in the `Authorization` header; the URL
//!   is shown without any user:password part.
//! - [`Spool`] = `.dagrun/openlineage/pending.jsonl`, rewritten atomically at
//!   the end of each run; each line is `MAC EVENT`, the MAC (keyed blake3
//!   under the workspace integrity key) sealing the event's bytes. Read back
//!   as untrusted input: a line whose MAC does not verify (planted or edited:
//!   review 13 found planted lines sent with the user's bearer token; or
//!   written by a dagrun from before the spool was sealed), or that is not a
//!   JSON object with a `schemaURL`, is dropped with a warning. Without the
//!   key nothing is spooled or resent. Holds at most [`MAX_PENDING`] events
//!   (the oldest are dropped past that, with a warning).

use crate::util::redact::redact_url;
use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Time to open a connection to the endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a whole request (connect, send, response).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the end of a run waits for the sender to deliver what is queued.
pub const FLUSH_GRACE: Duration = Duration::from_secs(1);
/// Most events kept in the spool.
pub const MAX_PENDING: usize = 100_000;
/// Largest event line accepted back from the spool.
pub const MAX_LINE: usize = 1 << 20;

/// Appends events to `runs/RUN_ID.openlineage.jsonl` as they happen.
pub struct FileSink {
    path: PathBuf,
    inner: Mutex<FileInner>,
    written: AtomicUsize,
}

struct FileInner {
    /// The open file (append mode) and its length after the last whole line.
    file: Option<(std::fs::File, u64)>,
    /// Lines of the write under way.
    deferred: Vec<u8>,
    deferred_n: usize,
    /// The first write error (later events are not written).
    failed: Option<String>,
}

impl FileSink {
    /// The file is created (or opened for appending) at the first write.
    pub fn new(path: &Path) -> FileSink {
        FileSink {
            path: path.to_path_buf(),
            inner: Mutex::new(FileInner { file: None, deferred: Vec::new(), deferred_n: 0, failed: None }),
            written: AtomicUsize::new(0),
        }
    }

    /// Append `n` whole lines given as one text (each line ending in a
    /// newline) in one `write` (a line is never interleaved with another;
    /// the text is written as it is, not copied); a write that fails half
    /// way is cut back to the last whole line. Never fsynced.
    pub fn write_text(&self, text: String, n: usize) {
        debug_assert!(text.is_empty() || text.ends_with('\n'));
        debug_assert_eq!(text.bytes().filter(|&c| c == b'\n').count(), n);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.deferred.is_empty() {
            g.deferred = text.into_bytes();
        } else {
            g.deferred.extend_from_slice(text.as_bytes());
        }
        g.deferred_n += n;
        self.flush_locked(&mut g);
    }

    fn flush_locked(&self, g: &mut FileInner) {
        if g.deferred.is_empty() || g.failed.is_some() {
            return;
        }
        let n = g.deferred_n;
        let buf = std::mem::take(&mut g.deferred);
        g.deferred_n = 0;
        let res = (|| -> Result<()> {
            if g.file.is_none() {
                g.file = Some(open_append(&self.path)?);
            }
            let (f, len) = g.file.as_mut().expect("opened above");
            use std::io::Write;
            if let Err(e) = f.write_all(&buf) {
                // Cut a partly written line back off (disk full…).
                let _ = f.set_len(*len);
                return Err(e).with_context(|| format!("cannot append to {}", self.path.display()));
            }
            *len += buf.len() as u64;
            Ok(())
        })();
        match res {
            Ok(()) => {
                self.written.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("OpenLineage events are no longer written to a file for this run: {e:#}");
                g.failed = Some(format!("{e:#}"));
            }
        }
    }

    /// Events written so far.
    pub fn written(&self) -> usize {
        self.written.load(Ordering::Relaxed)
    }

    /// End of run: close the file; the first write
    /// error, if any.
    pub fn finish(&self) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.flush_locked(&mut g);
        g.file.take();
        match g.failed.as_ref() {
            Some(m) => Err(anyhow::anyhow!("{m}")),
            None => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Open `path` for appending (created with its parent folder when missing).
/// A last line without its newline (a write cut short by a crash) is cut
/// off first, so every line of the file stays a whole event.
pub fn open_append(path: &Path) -> Result<(std::fs::File, u64)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Never through a planted link (it would truncate the file it leads to).
    // Private: an event's error message may quote what a command printed.
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = crate::util::nofollow::open_own_file(std::fs::OpenOptions::new().read(true).append(true).create(true).mode(0o600), path)?;
    let len = f.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let whole = whole_lines_len(&mut f, len).with_context(|| format!("cannot read {}", path.display()))?;
    if whole != len {
        tracing::warn!("{}: cutting off an unfinished last line ({} bytes)", path.display(), len - whole);
        f.set_len(whole).with_context(|| format!("cannot truncate {}", path.display()))?;
    }
    Ok((f, whole))
}

/// Length of `f` up to and including its last newline.
fn whole_lines_len(f: &mut std::fs::File, len: u64) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut end = len;
    let mut buf = [0u8; 4096];
    while end > 0 {
        let n = (end.min(buf.len() as u64)) as usize;
        f.seek(SeekFrom::Start(end - n as u64))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(end - n as u64 + i as u64 + 1);
        }
        end -= n as u64;
    }
    Ok(0)
}

/// Check an endpoint base URL and return the lineage URL (`BASE/api/v1/lineage`,
/// the base's query string kept after it).
pub fn lineage_url(base: &str) -> std::result::Result<String, String> {
    let b = base.trim();
    if !(b.starts_with("http://") || b.starts_with("https://")) || b.len() <= "https://".len() {
        return Err(format!(
            "OpenLineage URL {:?} is not an http:// or https:// URL; give the endpoint's base, e.g. http://localhost:5000 for Marquez",
            redact_url(b)
        ));
    }
    if b.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("OpenLineage URL {:?} contains spaces or control characters", redact_url(b)));
    }
    let mut u =
        url::Url::parse(b).map_err(|e| format!("OpenLineage URL {:?} is not a valid URL ({e}); percent-encode a `/` or `@` in a password", redact_url(b)))?;
    u.set_fragment(None);
    let path = format!("{}/api/v1/lineage", u.path().trim_end_matches('/'));
    u.set_path(&path);
    Ok(u.to_string())
}

struct Shared {
    queue: Mutex<VecDeque<String>>,
    wake: Condvar,
    closed: AtomicBool,
    /// The sender stopped (after a failure, or done).
    stopped: AtomicBool,
    in_flight: Mutex<Option<String>>,
    delivered: AtomicUsize,
    rejected: AtomicUsize,
    failure: Mutex<Option<String>>,
    done: Mutex<bool>,
    done_cv: Condvar,
}

/// What the HTTP sender achieved by the end of a run.
#[derive(Debug, Default)]
pub struct HttpOutcome {
    pub delivered: usize,
    pub rejected: usize,
    /// Not delivered: to be spooled, oldest first.
    pub pending: Vec<String>,
    /// Why delivery stopped, if it did (never holds the token).
    pub failure: Option<String>,
}

/// POSTs events to an OpenLineage endpoint from a background thread.
pub struct HttpSink {
    shared: Arc<Shared>,
    url_shown: String,
}

impl HttpSink {
    /// Start the sender. `backlog` (spooled events of earlier runs) is sent
    /// first, in order.
    pub fn start(lineage_url: String, token: Option<String>, backlog: Vec<String>) -> HttpSink {
        let shared = Arc::new(Shared {
            queue: Mutex::new(backlog.into()),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            in_flight: Mutex::new(None),
            delivered: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            failure: Mutex::new(None),
            done: Mutex::new(false),
            done_cv: Condvar::new(),
        });
        let url_shown = redact_url(&lineage_url);
        let s = shared.clone();
        let shown = url_shown.clone();
        let spawned = std::thread::Builder::new().name("openlineage-http".into()).spawn(move || {
            send_loop(&s, &lineage_url, token.as_deref(), &shown);
            *s.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
            s.done_cv.notify_all();
        });
        if let Err(e) = spawned {
            *shared.failure.lock().unwrap() = Some(format!("cannot start the sender thread: {e}"));
            shared.stopped.store(true, Ordering::SeqCst);
            *shared.done.lock().unwrap() = true;
        }
        HttpSink { shared, url_shown }
    }

    /// Queue one event (never blocks on the network).
    pub fn send(&self, line: String) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(line);
        drop(q);
        self.shared.wake.notify_one();
    }

    /// The endpoint as shown in messages (no credentials).
    pub fn url_shown(&self) -> &str {
        &self.url_shown
    }

    /// End of run: wait at most `grace` for the queue to drain, then return
    /// what was not delivered. The sender thread is not waited for past
    /// `grace` (an in-flight request ends by its own timeout, or with the process).
    pub fn finish(self, grace: Duration) -> HttpOutcome {
        let sh = &self.shared;
        sh.closed.store(true, Ordering::SeqCst);
        sh.wake.notify_all();
        let deadline = Instant::now() + grace;
        let mut done = sh.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            done = sh.done_cv.wait_timeout(done, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        let finished = *done;
        drop(done);
        // Stop the sender from taking more work; what it holds now is pending.
        sh.stopped.store(true, Ordering::SeqCst);
        let mut pending: Vec<String> = Vec::new();
        if let Some(l) = sh.in_flight.lock().unwrap_or_else(|e| e.into_inner()).take() {
            pending.push(l);
        }
        pending.extend(sh.queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..));
        let mut failure = sh.failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !finished && failure.is_none() && !pending.is_empty() {
            failure = Some(format!("{} did not answer within {:?}", self.url_shown, grace));
        }
        HttpOutcome { delivered: sh.delivered.load(Ordering::SeqCst), rejected: sh.rejected.load(Ordering::SeqCst), pending, failure }
    }
}

enum Sent {
    Ok,
    Refused(u16),
    Failed(String),
}

fn send_loop(sh: &Shared, url: &str, token: Option<&str>, shown: &str) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(REQUEST_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    loop {
        let line = {
            let mut q = sh.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if sh.stopped.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(l) = q.pop_front() {
                    // Taken from the queue and marked in flight atomically
                    // (under the queue lock), so `finish` never loses it.
                    *sh.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.clone());
                    break l;
                }
                if sh.closed.load(Ordering::SeqCst) {
                    return;
                }
                q = sh.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let res = post(&agent, url, token, &line);
        // A result that arrives after `finish` gave up still counts, but the
        // event has already been spooled: at-least-once delivery.
        let mut inf = sh.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Sent::Ok => {
                *inf = None;
                sh.delivered.fetch_add(1, Ordering::SeqCst);
            }
            Sent::Refused(code) => {
                *inf = None;
                sh.rejected.fetch_add(1, Ordering::SeqCst);
                tracing::warn!("OpenLineage endpoint {shown} refused an event (HTTP {code}); it is dropped");
            }
            Sent::Failed(why) => {
                // Put it back first in line and stop for this run.
                if let Some(l) = inf.take() {
                    sh.queue.lock().unwrap_or_else(|e| e.into_inner()).push_front(l);
                }
                tracing::warn!("OpenLineage endpoint {shown}: {why}; events are kept and sent at the next run");
                *sh.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{shown}: {why}"));
                sh.stopped.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

fn post(agent: &ureq::Agent, url: &str, token: Option<&str>, body: &str) -> Sent {
    let mut req = agent.post(url).header("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    match req.send(body) {
        Ok(resp) => {
            let code = resp.status().as_u16();
            match code {
                200..=299 => Sent::Ok,
                400 | 413 | 422 => Sent::Refused(code),
                _ => Sent::Failed(format!("HTTP {code}")),
            }
        }
        // ureq's error text names the failure (timeout, refused, TLS), never
        // the headers; a URL in it is shown redacted (its query may be a key).
        Err(e) => Sent::Failed(e.to_string().replace(url, &redact_url(url))),
    }
}

/// `.dagrun/openlineage/pending.jsonl`: events not yet delivered, each
/// sealed (see the module's rules).
pub struct Spool {
    path: PathBuf,
    key: Option<Arc<crate::crypto::IntegrityKey>>,
}

/// MAC domain of a spooled event.
const SPOOL_DOMAIN: &str = "dagrun openlineage spool v1";

impl Spool {
    pub fn new(dagrun_dir: &Path, key: Option<Arc<crate::crypto::IntegrityKey>>) -> Spool {
        Spool { path: dagrun_dir.join("openlineage").join("pending.jsonl"), key }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The spooled events, oldest first; unsealed or malformed lines are dropped (warned).
    pub fn load(&self) -> Vec<String> {
        let Some(key) = &self.key else { return vec![] };
        let bytes = match crate::util::read_capped(&self.path, super::recover::MAX_FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return vec![],
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; spooled OpenLineage events are not resent", self.path.display());
                return vec![];
            }
        };
        let mut out = Vec::new();
        let mut bad = 0usize;
        let mut unsealed = 0usize;
        for line in bytes.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let sealed = line.len() > 65 && line[64] == b' ' && std::str::from_utf8(&line[..64]).is_ok_and(|mac| key.verify(SPOOL_DOMAIN, &line[65..], mac));
            if !sealed {
                unsealed += 1;
                continue;
            }
            let line = &line[65..];
            let ok = line.len() <= MAX_LINE
                && std::str::from_utf8(line).ok().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()).is_some_and(|v| {
                    v.as_object().is_some_and(|o| o.get("schemaURL").is_some_and(|s| s.is_string()) && o.get("run").is_some_and(|r| r.is_object()))
                });
            if ok {
                out.push(String::from_utf8_lossy(line).into_owned());
            } else {
                bad += 1;
            }
        }
        if unsealed > 0 {
            tracing::warn!(
                "{}: dropped {unsealed} line(s) not sealed by this workspace (edited or planted, or spooled by an older dagrun)",
                self.path.display()
            );
        }
        if bad > 0 {
            tracing::warn!("{}: dropped {bad} line(s) that are not OpenLineage events", self.path.display());
        }
        if out.len() > MAX_PENDING {
            let n = out.len() - MAX_PENDING;
            tracing::warn!("{}: more than {MAX_PENDING} events are pending; dropping the {n} oldest", self.path.display());
            out.drain(..n);
        }
        out
    }

    /// Replace the spool with `events` (removed when empty).
    pub fn store(&self, events: &[String]) -> Result<()> {
        let events = &events[events.len().saturating_sub(MAX_PENDING)..];
        if events.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("cannot remove {}", self.path.display())),
                _ => Ok(()),
            };
        }
        let Some(key) = &self.key else { return Ok(()) };
        let mut bytes = Vec::with_capacity(events.iter().map(|e| e.len() + 66).sum());
        for e in events {
            bytes.extend_from_slice(key.mac(SPOOL_DOMAIN, e.as_bytes()).to_hex().as_bytes());
            bytes.push(b' ');
            bytes.extend_from_slice(e.as_bytes());
            bytes.push(b'\n');
        }
        crate::util::atomic::write_atomic(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        assert_eq!(lineage_url("http://localhost:5000/").unwrap(), "http://localhost:5000/api/v1/lineage");
        assert_eq!(lineage_url("https://m.example/base").unwrap(), "https://m.example/base/api/v1/lineage");
        assert!(lineage_url("localhost:5000").is_err());
        assert!(lineage_url("ftp://x").is_err());
        assert!(lineage_url("http://a b").is_err());
        assert_eq!(lineage_url("http://127.0.0.1:9/base/?api_key=k").unwrap(), "http://127.0.0.1:9/base/api/v1/lineage?api_key=k");
        let e = lineage_url("http://alice:S3cret/PW@127.0.0.1:9").unwrap_err();
        assert!(!e.contains("S3cret") && e.contains("percent-encode"), "{e}");
        let e = lineage_url("htp://user:secret@h").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn the_spool_round_trips_and_drops_garbage() {
        let d = tempfile::tempdir().unwrap();
        let key = Arc::new(crate::crypto::IntegrityKey::from_bytes([7; 32]));
        let s = Spool::new(d.path(), Some(key.clone()));
        assert!(s.load().is_empty());
        let ev = r#"{"schemaURL":"x","run":{"runId":"1"}}"#.to_string();
        s.store(&[ev.clone(), ev.clone()]).unwrap();
        assert_eq!(s.load(), vec![ev.clone(), ev.clone()]);
        let mut text = std::fs::read_to_string(s.path()).unwrap();
        // Garbage, and (review 13) events planted without the key: an
        // unsealed line, a sealed line edited, another key's line.
        let other = Spool::new(&d.path().join("other"), Some(Arc::new(crate::crypto::IntegrityKey::from_bytes([8; 32]))));
        other.store(std::slice::from_ref(&ev)).unwrap();
        let sealed = text.lines().next().unwrap().to_string();
        text.push_str(&format!(
            "not json\n[1]\n{{\"run\":{{}}}}\n{}\n{ev}\n{}\n{}",
            '\u{0}',
            sealed.replace("\"1\"", "\"2\""),
            std::fs::read_to_string(other.path()).unwrap()
        ));
        std::fs::write(s.path(), text).unwrap();
        assert_eq!(s.load(), vec![ev.clone(), ev.clone()]);
        // Without the key nothing is resent.
        assert!(Spool::new(d.path(), None).load().is_empty());
        s.store(&[]).unwrap();
        assert!(!s.path().exists());
    }

    #[test]
    fn a_dead_endpoint_leaves_everything_pending_quickly() {
        // A port nobody listens on: connection refused at once.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let sink = HttpSink::start(format!("http://127.0.0.1:{port}/api/v1/lineage"), Some("tok".into()), vec!["a".into()]);
        sink.send("b".into());
        let t0 = Instant::now();
        let out = sink.finish(Duration::from_secs(2));
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(out.pending, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(out.delivered, 0);
        assert!(out.failure.is_some());
    }
}
