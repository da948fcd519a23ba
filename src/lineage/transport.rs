//! Where events go: a JSONL file (always) and an HTTP endpoint (optional),
//! with a spool per endpoint for what that endpoint did not take.
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
//!   first failure (down, slow, 5xx, 401, 403, 404, 407, 408, 429, a redirect)
//!   the sender stops trying for the rest of the run. When the run ends, the
//!   sender gets at most [`FLUSH_GRACE`] to finish; everything not delivered
//!   by then is returned as pending, for the [`Spool`].
//! - An answer that refuses an event (any other 4xx: 400, 413, 422…) never
//!   silently destroys the backlog (review 69 H2: a proxy's 413 or a wrong
//!   path's 400 dropped everything queued). The sender tries the next events;
//!   an event refused and followed, in the same run, by an event the
//!   endpoint accepts is the event's own fault: it is given up
//!   ([`HttpOutcome::dropped`]) — the caller appends it to
//!   `.dagrun/openlineage/dropped.jsonl` ([`record_dropped`]) and counts it.
//!   [`MAX_REFUSED_STREAK`] refusals in a row stop the sender for the run:
//!   those events and everything after stay pending, in order (an endpoint
//!   that refuses everything keeps the whole backlog). So that a few bad
//!   events at the head cannot block the queue forever, the caller gives up
//!   the head event once it has been refused at [`DROP_AFTER_RUNS`] runs in a
//!   row (the count is kept in the spool). The refusal is said once per run,
//!   with the status and the start of the answer's body ([`MAX_ANSWER`]
//!   characters, control characters escaped).
//! - The bearer token is only ever put in the `Authorization` header; the URL
//!   is shown without any user:password part or query.
//! - [`Spool`] = `.dagrun/openlineage/pending-ID.jsonl`, one per endpoint
//!   (review 69 H1: one shared spool sent one catalog's backlog to whatever
//!   endpoint the next run used, with that endpoint's token). `ID` is
//!   [`endpoint_id`]: a keyed hash (workspace integrity key) of the lineage
//!   URL as [`lineage_url`] normalises it, without its `user:password@`; so
//!   neither the credentials, the query nor the token are in a file name or
//!   a file (the spool's first line names the endpoint as shown in
//!   messages: no credentials, the query as `?…`). A run reads and sends its
//!   own endpoint's spool only; the others wait for a run with their
//!   endpoint ([`waiting_elsewhere`] counts them). Rewritten atomically at
//!   the end of each run, mode 0600 (events carry stage reasons and
//!   parameters; review 69 H4); each line is `MAC EVENT`, the MAC (keyed
//!   blake3 under the workspace integrity key, in a domain naming the
//!   endpoint id) sealing the event's bytes, so a line moved to another
//!   endpoint's spool does not verify either. Read back as untrusted input:
//!   a line whose MAC does not verify (planted or edited: review 13 found
//!   planted lines sent with the user's bearer token; moved from another
//!   spool; or written by a dagrun from before the spool was sealed), or that
//!   is not a JSON object with a `schemaURL`, is dropped with a warning.
//!   Without the key nothing is spooled or resent. Holds at most
//!   [`MAX_PENDING`] events (the oldest are dropped past that, with a
//!   warning).
//! - The spool of a dagrun from before spools were per endpoint
//!   (`.dagrun/openlineage/pending.jsonl`, [`legacy_path`]) names no
//!   endpoint: it is kept until a run whose endpoint comes from
//!   `DAGRUN_OPENLINEAGE_URL` (the standing setting, as in
//!   `examples/deploy/dagrun.service`), which takes its events into its own
//!   spool (stored before the old file is removed: at worst sent twice),
//!   with a warning; a run with `--openlineage-url` (ad hoc) leaves it, with
//!   a warning ([`load_legacy`]).
//! - `.dagrun/openlineage/dropped.jsonl` (mode 0600, appended, at most
//!   [`MAX_DROPPED_BYTES`]): one JSON line per event given up, with when,
//!   the endpoint as shown, the HTTP status, why, and the event itself.

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
/// Refusals in a row (no event accepted in between) that stop the sender
/// for the run, everything kept: the endpoint refuses everything, as far as
/// the sender can tell (a wrong path or API version, a proxy's size limit).
pub const MAX_REFUSED_STREAK: usize = 3;
/// Runs in a row at which the spool's head event is refused before it is given up.
pub const DROP_AFTER_RUNS: u32 = 3;
/// Characters of an endpoint's answer shown with a refusal.
pub const MAX_ANSWER: usize = 200;
/// Largest `dropped.jsonl` appended to.
pub const MAX_DROPPED_BYTES: u64 = 256 << 20;

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
    /// The event being sent, and (under the same lock) the events refused
    /// since the last accepted one (in order, before the one in flight).
    in_flight: Mutex<InFlight>,
    delivered: AtomicUsize,
    rejected: AtomicUsize,
    failure: Mutex<Option<String>>,
    done: Mutex<bool>,
    done_cv: Condvar,
}

#[derive(Default)]
struct InFlight {
    line: Option<String>,
    /// Refused since the last accepted event: pending unless a later event is accepted.
    refused: Vec<Refused>,
    /// Refused and then followed by an accepted event: given up.
    dropped: Vec<Refused>,
}

/// An event an endpoint refused, and its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub line: String,
    pub status: u16,
    /// The start of the answer's body, control characters escaped (may be empty).
    pub answer: String,
}

/// What the HTTP sender achieved by the end of a run.
#[derive(Debug, Default)]
pub struct HttpOutcome {
    pub delivered: usize,
    /// Answers that refused an event (4xx other than 401, 403, 404, 407, 408, 429).
    pub rejected: usize,
    /// Not delivered: to be spooled, oldest first.
    pub pending: Vec<String>,
    /// The refusal of `pending[0]` in this run, when it was refused.
    pub head_refused: Option<Refused>,
    /// Refused while a later event was accepted: given up, for `dropped.jsonl`.
    pub dropped: Vec<Refused>,
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
            in_flight: Mutex::new(InFlight::default()),
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
        let (head_refused, dropped) = {
            let mut inf = sh.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let refused = std::mem::take(&mut inf.refused);
            let head = refused.first().cloned();
            pending.extend(refused.into_iter().map(|r| r.line));
            if let Some(l) = inf.line.take() {
                pending.push(l);
            }
            (head, std::mem::take(&mut inf.dropped))
        };
        pending.extend(sh.queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..));
        let mut failure = sh.failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let (None, Some(r)) = (&failure, &head_refused) {
            failure = Some(format!("{}: refused an event (HTTP {}{})", self.url_shown, r.status, shown_answer(&r.answer)));
        }
        if !finished && failure.is_none() && !pending.is_empty() {
            failure = Some(format!("{} did not answer within {:?}", self.url_shown, grace));
        }
        HttpOutcome { delivered: sh.delivered.load(Ordering::SeqCst), rejected: sh.rejected.load(Ordering::SeqCst), pending, head_refused, dropped, failure }
    }
}

enum Sent {
    Ok,
    /// A 4xx that refuses this event (not one that says the endpoint or the
    /// credentials are wrong, or to come back later): its status and answer.
    Refused(u16, String),
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
                    sh.in_flight.lock().unwrap_or_else(|e| e.into_inner()).line = Some(l.clone());
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
                inf.line = None;
                // The events refused before this one were refused for what they are.
                let refused = std::mem::take(&mut inf.refused);
                inf.dropped.extend(refused);
                sh.delivered.fetch_add(1, Ordering::SeqCst);
            }
            Sent::Refused(status, answer) => {
                let Some(l) = inf.line.take() else { continue };
                sh.rejected.fetch_add(1, Ordering::SeqCst);
                inf.refused.push(Refused { line: l, status, answer: answer.clone() });
                if inf.refused.len() >= MAX_REFUSED_STREAK {
                    // Refuses everything, as far as we can tell: keep it all.
                    // Said once, by the caller, at the end of the run.
                    let why = format!("refused {} events in a row (HTTP {status}{})", inf.refused.len(), shown_answer(&answer));
                    *sh.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{shown}: {why}"));
                    sh.stopped.store(true, Ordering::SeqCst);
                    return;
                }
            }
            Sent::Failed(why) => {
                // Put it back first in line (after the refused ones, still
                // held in `refused`) and stop for this run.
                if let Some(l) = inf.line.take() {
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

/// `: «ANSWER»` when the endpoint said something, else nothing.
pub fn shown_answer(answer: &str) -> String {
    if answer.is_empty() { String::new() } else { format!(": «{answer}»") }
}

/// The start of an answer's body as shown in a message: at most
/// [`MAX_ANSWER`] characters, blanks collapsed, control characters escaped.
pub fn answer_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut n = 0usize;
    let mut blank = false;
    for c in text.trim().chars() {
        if n >= MAX_ANSWER {
            out.push('…');
            break;
        }
        if c == ' ' || c == '\n' || c == '\r' || c == '\t' {
            if !blank {
                out.push(' ');
                n += 1;
            }
            blank = true;
            continue;
        }
        blank = false;
        if c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        n += 1;
    }
    out
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
                // The endpoint or the credentials are wrong, or later: not the event's fault.
                401 | 403 | 404 | 407 | 408 | 429 => Sent::Failed(format!("HTTP {code}")),
                400..=499 => {
                    use std::io::Read;
                    let mut buf = Vec::new();
                    let _ = resp.into_body().into_reader().take(4 * MAX_ANSWER as u64).read_to_end(&mut buf);
                    Sent::Refused(code, answer_excerpt(&buf))
                }
                _ => Sent::Failed(format!("HTTP {code}")),
            }
        }
        // ureq's error text names the failure (timeout, refused, TLS), never
        // the headers; a URL in it is shown redacted (its query may be a key).
        Err(e) => Sent::Failed(e.to_string().replace(url, &redact_url(url))),
    }
}

/// The id of an endpoint's spool: a keyed hash (workspace integrity key) of
/// its lineage URL as [`lineage_url`] normalises it, without `user:password@`
/// (credentials, not where events go; the query is kept: it may name the
/// account). 32 hex digits; the URL cannot be recovered or guessed from it
/// without the key.
pub fn endpoint_id(key: &crate::crypto::IntegrityKey, lineage_url: &str) -> String {
    let id = match url::Url::parse(lineage_url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => lineage_url.to_string(),
    };
    key.mac("dagrun openlineage endpoint id v1", id.as_bytes()).to_hex()[..32].to_string()
}

/// `.dagrun/openlineage/pending-ID.jsonl`: the events not yet delivered to
/// one endpoint, each sealed (see the module's rules).
pub struct Spool {
    path: PathBuf,
    key: Arc<crate::crypto::IntegrityKey>,
    /// MAC domain of its lines: names the endpoint id.
    domain: String,
    /// The endpoint as shown in messages.
    shown: String,
}

/// What a spool holds.
#[derive(Debug, Default, PartialEq)]
pub struct Spooled {
    /// Oldest first.
    pub events: Vec<String>,
    /// Runs in a row that ended with `events[0]` refused by the endpoint.
    pub head_refused_runs: u32,
}

/// MAC domain of a spooled event in the spool of a dagrun from before spools were per endpoint.
pub(crate) const LEGACY_DOMAIN: &str = "dagrun openlineage spool v1";
/// Start of a spool file's name (`pending-ID.jsonl`).
const SPOOL_PREFIX: &str = "pending-";

/// The spool of a dagrun from before spools were per endpoint.
pub fn legacy_path(dagrun_dir: &Path) -> PathBuf {
    dagrun_dir.join("openlineage").join("pending.jsonl")
}

/// `.dagrun/openlineage/dropped.jsonl`.
pub fn dropped_path(dagrun_dir: &Path) -> PathBuf {
    dagrun_dir.join("openlineage").join("dropped.jsonl")
}

impl Spool {
    /// The spool of the endpoint whose checked lineage URL is `lineage_url`.
    pub fn for_endpoint(dagrun_dir: &Path, key: Arc<crate::crypto::IntegrityKey>, lineage_url: &str) -> Spool {
        let id = endpoint_id(&key, lineage_url);
        Spool::for_id(dagrun_dir, key, &id, &redact_url(lineage_url))
    }

    /// The spool of the endpoint whose [`endpoint_id`] is `id` (32 lowercase
    /// hex digits), shown as `shown`: another endpoint's, known only by what a
    /// killed run's mark names (`lineage::recover::SentTo`).
    pub fn for_id(dagrun_dir: &Path, key: Arc<crate::crypto::IntegrityKey>, id: &str, shown: &str) -> Spool {
        debug_assert!(crate::util::is_lower_hex(id, 32), "{id}");
        Spool {
            path: dagrun_dir.join("openlineage").join(format!("{SPOOL_PREFIX}{id}.jsonl")),
            key,
            domain: format!("dagrun openlineage spool v2 {id}"),
            shown: shown.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The spool can be read (or is not there): [`Spool::load`] takes an
    /// unreadable one for empty, and a store after it would drop its events.
    pub fn check_readable(&self) -> Result<()> {
        match std::fs::File::open(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("cannot read {}", self.path.display())),
            _ => Ok(()),
        }
    }

    /// The spooled events, oldest first; unsealed or malformed lines are dropped (warned).
    pub fn load(&self) -> Spooled {
        let (events, header) = load_sealed(&self.path, &self.key, &self.domain);
        let head_refused_runs = header.and_then(|h| h.get("headRefusedRuns").and_then(serde_json::Value::as_u64)).unwrap_or(0).min(u32::MAX as u64) as u32;
        Spooled { head_refused_runs: if events.is_empty() { 0 } else { head_refused_runs }, events }
    }

    /// Replace the spool with `events` (removed when empty), mode 0600, atomically.
    /// `head_refused_runs`: see [`Spooled`].
    pub fn store(&self, events: &[String], head_refused_runs: u32) -> Result<()> {
        let events = &events[events.len().saturating_sub(MAX_PENDING)..];
        if events.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("cannot remove {}", self.path.display())),
                _ => Ok(()),
            };
        }
        let mut bytes = Vec::with_capacity(events.iter().map(|e| e.len() + 66).sum::<usize>() + 200);
        let header = format!("#{}", serde_json::json!({"endpoint": self.shown, "headRefusedRuns": head_refused_runs}));
        for e in std::iter::once(&header).chain(events) {
            bytes.extend_from_slice(self.key.mac(&self.domain, e.as_bytes()).to_hex().as_bytes());
            bytes.push(b' ');
            bytes.extend_from_slice(e.as_bytes());
            bytes.push(b'\n');
        }
        crate::util::atomic::write_atomic_mode(&self.path, &bytes, 0o600)
    }
}

/// The events of the spool of a dagrun from before spools were per endpoint
/// (`pending.jsonl`, sealed without an endpoint), oldest first; unsealed or
/// malformed lines are dropped (warned). The caller removes the file
/// ([`remove_legacy`]) once it has stored them in an endpoint's spool.
pub fn load_legacy(dagrun_dir: &Path, key: &crate::crypto::IntegrityKey) -> Vec<String> {
    load_sealed(&legacy_path(dagrun_dir), key, LEGACY_DOMAIN).0
}

pub fn remove_legacy(dagrun_dir: &Path) -> Result<()> {
    let p = legacy_path(dagrun_dir);
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("cannot remove {}", p.display())),
        _ => Ok(()),
    }
}

/// A spool file's sealed events and its sealed header (`#{…}`), if any.
fn load_sealed(path: &Path, key: &crate::crypto::IntegrityKey, domain: &str) -> (Vec<String>, Option<serde_json::Value>) {
    let bytes = match crate::util::read_capped(path, super::recover::MAX_FILE) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (vec![], None),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}; spooled OpenLineage events are not resent", path.display());
            return (vec![], None);
        }
    };
    let mut out = Vec::new();
    let mut header = None;
    let mut bad = 0usize;
    let mut unsealed = 0usize;
    for line in bytes.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let sealed = line.len() > 65 && line[64] == b' ' && std::str::from_utf8(&line[..64]).is_ok_and(|mac| key.verify(domain, &line[65..], mac));
        if !sealed {
            unsealed += 1;
            continue;
        }
        let line = &line[65..];
        if let Some(h) = line.strip_prefix(b"#") {
            if header.is_none() && out.is_empty() {
                header = serde_json::from_slice::<serde_json::Value>(h).ok();
            }
            continue;
        }
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
            "{}: dropped {unsealed} line(s) not sealed by this workspace for this endpoint (edited, planted or moved from another endpoint's spool, or spooled by an older dagrun)",
            path.display()
        );
    }
    if bad > 0 {
        tracing::warn!("{}: dropped {bad} line(s) that are not OpenLineage events", path.display());
    }
    if out.len() > MAX_PENDING {
        let n = out.len() - MAX_PENDING;
        tracing::warn!("{}: more than {MAX_PENDING} events are pending; dropping the {n} oldest", path.display());
        out.drain(..n);
    }
    (out, header)
}

/// A spool other than the caller's: its file, the endpoint it is for (as
/// shown; "an endpoint not named (older dagrun)" for `pending.jsonl`) and
/// how many events wait in it.
#[derive(Debug, PartialEq)]
pub struct Waiting {
    pub path: PathBuf,
    pub endpoint: String,
    pub events: usize,
}

/// The spools in `.dagrun/openlineage` other than `own` (the legacy
/// `pending.jsonl` included), with the number of events each holds (lines,
/// not checked: a count for messages and the metric, nothing is sent).
pub fn waiting_elsewhere(dagrun_dir: &Path, own: Option<&Path>) -> Vec<Waiting> {
    let dir = dagrun_dir.join("openlineage");
    let Ok(rd) = std::fs::read_dir(&dir) else { return vec![] };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_spool = name == "pending.jsonl" || (name.starts_with(SPOOL_PREFIX) && name.ends_with(".jsonl"));
        if !is_spool {
            continue;
        }
        let path = e.path();
        if own == Some(path.as_path()) || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(bytes) = crate::util::read_capped(&path, super::recover::MAX_FILE) else { continue };
        let mut endpoint = String::from("an endpoint not named (spooled by an older dagrun)");
        let mut events = 0usize;
        for (i, line) in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            match line.get(65..) {
                Some(h) if h.starts_with(b"#") => {
                    if i == 0
                        && let Some(s) = serde_json::from_slice::<serde_json::Value>(&h[1..]).ok().and_then(|v| v.get("endpoint")?.as_str().map(str::to_string))
                    {
                        endpoint = answer_excerpt(redact_url(&s).as_bytes());
                    }
                }
                _ => events += 1,
            }
        }
        if events > 0 {
            out.push(Waiting { path, endpoint, events: events.min(MAX_PENDING) });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Append the events given up to `.dagrun/openlineage/dropped.jsonl`
/// (mode 0600; never through a link), one JSON line each:
/// `{"droppedAt", "endpoint", "status", "answer", "why", "event"}`. Past
/// [`MAX_DROPPED_BYTES`] nothing more is appended (warned). Returns how many were written.
pub fn record_dropped(dagrun_dir: &Path, endpoint_shown: &str, dropped: &[(Refused, String)]) -> Result<usize> {
    if dropped.is_empty() {
        return Ok(0);
    }
    let path = dropped_path(dagrun_dir);
    let (mut f, len) = open_append(&path)?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut text = String::new();
    let mut n = 0usize;
    for (r, why) in dropped {
        let event: serde_json::Value = serde_json::from_str(&r.line).unwrap_or_else(|_| serde_json::Value::String(r.line.clone()));
        let line = serde_json::json!({"droppedAt": now, "endpoint": endpoint_shown, "status": r.status, "answer": r.answer, "why": why, "event": event});
        let line = line.to_string();
        if len + (text.len() + line.len() + 1) as u64 > MAX_DROPPED_BYTES {
            tracing::warn!("{} holds {MAX_DROPPED_BYTES} bytes or more: {} event(s) given up are not written there", path.display(), dropped.len() - n);
            break;
        }
        text.push_str(&line);
        text.push('\n');
        n += 1;
    }
    use std::io::Write;
    if let Err(e) = f.write_all(text.as_bytes()) {
        let _ = f.set_len(len);
        return Err(e).with_context(|| format!("cannot append to {}", path.display()));
    }
    Ok(n)
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

    fn key_of(b: u8) -> Arc<crate::crypto::IntegrityKey> {
        Arc::new(crate::crypto::IntegrityKey::from_bytes([b; 32]))
    }

    #[test]
    fn the_spool_round_trips_and_drops_garbage() {
        let d = tempfile::tempdir().unwrap();
        let key = key_of(7);
        let s = Spool::for_endpoint(d.path(), key.clone(), "http://u:pw@h:5000/api/v1/lineage?api_key=Q");
        assert_eq!(s.load(), Spooled::default());
        let ev = r#"{"schemaURL":"x","run":{"runId":"1"}}"#.to_string();
        s.store(&[ev.clone(), ev.clone()], 2).unwrap();
        assert_eq!(s.load(), Spooled { events: vec![ev.clone(), ev.clone()], head_refused_runs: 2 });
        // Private (review 69 H4), named by a hash: no credentials, query or host in its name or text.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777, 0o600);
        let name = s.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("pending-") && name.len() == "pending-.jsonl".len() + 32, "{name}");
        let mut text = std::fs::read_to_string(s.path()).unwrap();
        assert!(!text.contains("pw") && !text.contains("api_key") && text.contains("http://h:5000/api/v1/lineage?…"), "{text}");
        // Garbage, and (review 13) events planted without the key: an
        // unsealed line, a sealed line edited, another key's line; and
        // (review 69 H1) a line sealed for another endpoint, moved here.
        let other = Spool::for_endpoint(&d.path().join("other"), key_of(8), "http://h:5000/api/v1/lineage?api_key=Q");
        other.store(std::slice::from_ref(&ev), 0).unwrap();
        let elsewhere = Spool::for_endpoint(&d.path().join("elsewhere"), key.clone(), "http://dev:5000/api/v1/lineage");
        elsewhere.store(std::slice::from_ref(&ev), 0).unwrap();
        let sealed = text.lines().nth(1).unwrap().to_string();
        text.push_str(&format!(
            "not json\n[1]\n{{\"run\":{{}}}}\n{}\n{ev}\n{}\n{}{}",
            '\u{0}',
            sealed.replace("\"1\"", "\"2\""),
            std::fs::read_to_string(other.path()).unwrap(),
            std::fs::read_to_string(elsewhere.path()).unwrap()
        ));
        std::fs::write(s.path(), text).unwrap();
        assert_eq!(s.load().events, vec![ev.clone(), ev.clone()]);
        s.store(&[], 0).unwrap();
        assert!(!s.path().exists());
    }

    #[test]
    fn an_endpoint_is_named_by_where_events_go_not_by_its_credentials() {
        let k = key_of(1);
        let id = |u: &str| endpoint_id(&k, &lineage_url(u).unwrap());
        assert_eq!(id("http://a:5000"), id("http://alice:pw@a:5000/"));
        assert_ne!(id("http://a:5000"), id("http://a:5001"));
        assert_ne!(id("http://a:5000/x"), id("http://a:5000/y"));
        assert_ne!(id("http://a:5000/?ns=1"), id("http://a:5000/?ns=2"));
        // Keyed: another workspace's key names it otherwise.
        assert_ne!(endpoint_id(&key_of(2), "http://a:5000/api/v1/lineage"), endpoint_id(&k, "http://a:5000/api/v1/lineage"));
    }

    #[test]
    fn the_older_single_spool_is_read_with_its_own_seal_and_counted_as_waiting() {
        let d = tempfile::tempdir().unwrap();
        let k = key_of(3);
        let ev = r#"{"schemaURL":"x","run":{"runId":"1"}}"#;
        let legacy = legacy_path(d.path());
        std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
        std::fs::write(
            &legacy,
            format!("{} {ev}\n{} {ev}\n", k.mac(LEGACY_DOMAIN, ev.as_bytes()).to_hex(), key_of(4).mac(LEGACY_DOMAIN, ev.as_bytes()).to_hex()),
        )
        .unwrap();
        assert_eq!(load_legacy(d.path(), &k), vec![ev.to_string()]);
        let mine = Spool::for_endpoint(d.path(), k.clone(), "http://a/api/v1/lineage");
        let theirs = Spool::for_endpoint(d.path(), k.clone(), "http://b/api/v1/lineage?k=1");
        mine.store(&[ev.to_string()], 0).unwrap();
        theirs.store(&[ev.to_string(), ev.to_string(), ev.to_string()], 0).unwrap();
        let w = waiting_elsewhere(d.path(), Some(mine.path()));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|w| w.path == legacy && w.events == 2 && w.endpoint.contains("older dagrun")), "{w:?}");
        assert!(w.iter().any(|w| w.path == theirs.path() && w.events == 3 && w.endpoint == "http://b/api/v1/lineage?…"), "{w:?}");
        assert_eq!(waiting_elsewhere(d.path(), None).iter().map(|w| w.events).sum::<usize>(), 6);
        remove_legacy(d.path()).unwrap();
        assert!(!legacy.exists());
    }

    #[test]
    fn an_answer_is_shown_short_and_with_its_control_characters_escaped() {
        assert_eq!(answer_excerpt(b"  bad\r\n\tevent\x1b[31m \xe2\x80\xae "), "bad event\\u{1b}[31m \\u{202e}");
        let long = answer_excerpt("x".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), MAX_ANSWER + 1);
        assert_eq!(shown_answer(""), "");
    }

    #[test]
    fn dropped_events_are_appended_privately_with_the_answer() {
        let d = tempfile::tempdir().unwrap();
        let ev = r#"{"schemaURL":"x","run":{"runId":"1"}}"#.to_string();
        let r = Refused { line: ev.clone(), status: 413, answer: "too large".into() };
        assert_eq!(record_dropped(d.path(), "http://h/api/v1/lineage", &[(r.clone(), "why".into()), (r, "why".into())]).unwrap(), 2);
        let text = std::fs::read_to_string(dropped_path(d.path())).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!((v["status"].as_u64(), v["answer"].as_str(), v["event"]["run"]["runId"].as_str()), (Some(413), Some("too large"), Some("1")));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dropped_path(d.path())).unwrap().permissions().mode() & 0o777, 0o600);
    }

    /// A loopback endpoint answering each event with `status(body)`.
    fn endpoint(status: fn(&str) -> u16) -> u16 {
        use std::io::{BufRead, BufReader, Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut s = s;
                    loop {
                        let mut len = 0usize;
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            if h.trim().is_empty() {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        let code = status(std::str::from_utf8(&body).unwrap());
                        let _ = s.write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 4\r\n\r\nnope").as_bytes());
                    }
                });
            }
        });
        port
    }

    #[test]
    fn refusals_in_a_row_keep_everything_and_a_refusal_followed_by_an_accepted_event_gives_that_event_up() {
        // Everything refused: the sender stops after MAX_REFUSED_STREAK, nothing is given up.
        let port = endpoint(|_| 400);
        let backlog: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
        let sink = HttpSink::start(format!("http://127.0.0.1:{port}/api/v1/lineage"), None, backlog.clone());
        sink.send("e5".into());
        let out = sink.finish(Duration::from_secs(5));
        assert_eq!(out.pending, (0..6).map(|i| format!("e{i}")).collect::<Vec<_>>());
        assert!(out.dropped.is_empty());
        assert_eq!(out.rejected, MAX_REFUSED_STREAK);
        assert_eq!(out.head_refused, Some(Refused { line: "e0".into(), status: 400, answer: "nope".into() }));
        assert!(out.failure.unwrap().contains("refused 3 events in a row (HTTP 400: «nope»)"));
        // e1 and e2 refused, e3 accepted: e1 and e2 are the events' fault.
        let port = endpoint(|b| if b == "e1" || b == "e2" { 413 } else { 201 });
        let sink = HttpSink::start(format!("http://127.0.0.1:{port}/api/v1/lineage"), None, backlog.clone());
        let out = sink.finish(Duration::from_secs(5));
        assert_eq!((out.delivered, out.rejected, out.pending.len(), out.head_refused.is_none()), (3, 2, 0, true));
        assert_eq!(out.dropped.iter().map(|r| (r.line.as_str(), r.status)).collect::<Vec<_>>(), [("e1", 413), ("e2", 413)]);
        // The last event refused, nothing after it: kept, its refusal reported.
        let port = endpoint(|b| if b == "e4" { 422 } else { 200 });
        let sink = HttpSink::start(format!("http://127.0.0.1:{port}/api/v1/lineage"), None, backlog);
        let out = sink.finish(Duration::from_secs(5));
        assert_eq!((out.delivered, out.pending.clone(), out.dropped.len()), (4, vec!["e4".to_string()], 0));
        assert_eq!(out.head_refused.map(|r| r.status), Some(422));
        // 401, 403, 404, 429 say the endpoint or the credentials are wrong: stop, keep, give nothing up.
        for code in [401u16, 403, 404, 429] {
            static CODE: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
            CODE.store(code, Ordering::SeqCst);
            let port = endpoint(|_| CODE.load(Ordering::SeqCst));
            let sink = HttpSink::start(format!("http://127.0.0.1:{port}/api/v1/lineage"), None, vec!["a".into(), "b".into()]);
            let out = sink.finish(Duration::from_secs(5));
            assert_eq!((out.pending.len(), out.rejected, out.dropped.len(), out.head_refused.is_none()), (2, 0, 0, true), "HTTP {code}");
        }
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
