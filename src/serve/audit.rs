//! The audit log: one JSON line per scoring request.
//!
//! Rules:
//! - A line holds the time, request id, token id, tenant, model version,
//!   route, rows, status and latency: never a data value, never a token.
//! - Lines go to `DIR/serve-audit-YYYY-MM-DD.jsonl` (the UTC day of the
//!   line's time; a new file each day: daily rotation without renaming). The
//!   default DIR is `.dagrun/audit/`.
//! - A request never waits for the disk and never wakes another thread: it
//!   appends its line to an in-memory batch (a short mutex section, a copy of
//!   the line). One background thread takes the whole batch every 100 ms
//!   (sooner when [`WAKE_AT`] lines wait), writes and flushes it. At most
//!   [`QUEUE`] lines wait; beyond that, and on any write failure, the lines
//!   are counted (`dagrun_serve_audit_write_failures_total`) and the
//!   responses are still sent. On shutdown the batch is written, flushed and
//!   fsynced.
//! - Every line in a file is whole (review 26: a full disk left half a line,
//!   and the next batch was appended to it, hiding a line from every reader
//!   and the count from the metrics): a batch is written under an exclusive
//!   `flock` of the file (two servers may share the folder), waited for at
//!   most [`LOCK_WAIT`] (then the batch is counted as not written); a write that
//!   fails is cut back off, and the end of a line a killed writer left is cut
//!   off (and logged) before the next batch is written.
//! - A log file is opened without following a symlink (`O_NOFOLLOW`), must be
//!   a regular file, and is created mode 0600: a link planted in the folder
//!   never sends lines elsewhere. Today's file is checked at start, so such a
//!   link is an error the operator sees, not silently lost lines.

use crate::serve::metrics::Metrics;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Lines waiting to be written before new ones are dropped (and counted).
pub const QUEUE: u64 = 65_536;
/// Waiting lines that wake the writer before its next tick.
pub const WAKE_AT: u64 = 4_096;
/// The writer's tick.
const TICK: Duration = Duration::from_millis(100);
/// How long the writer waits for another process's lock of a log file.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Lines of one UTC day, newline-terminated.
struct Chunk {
    day: chrono::NaiveDate,
    bytes: Vec<u8>,
    lines: u64,
}

#[derive(Default)]
struct Batch {
    chunks: VecDeque<Chunk>,
    lines: u64,
    closed: bool,
}

struct Inner {
    batch: Mutex<Batch>,
    wake: Condvar,
}

/// The sending side, held by the server.
pub struct Audit {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    pub dir: PathBuf,
}

/// The file of a given UTC day.
pub fn file_for(dir: &Path, day: chrono::NaiveDate) -> PathBuf {
    dir.join(format!("serve-audit-{}.jsonl", day.format("%Y-%m-%d")))
}

impl Audit {
    /// Start the writer thread for `dir` (created when missing).
    pub fn start(dir: PathBuf, metrics: Arc<Metrics>) -> anyhow::Result<Audit> {
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("cannot create the audit log folder {}: {e}", dir.display()))?;
        let today = file_for(&dir, chrono::Utc::now().date_naive());
        open(&dir, chrono::Utc::now().date_naive()).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the audit log {}: {e}; it must be a regular file (not a symlink, nor a hard link to a file elsewhere) that dagrun can append to",
                today.display()
            )
        })?;
        let inner = Arc::new(Inner { batch: Mutex::new(Batch::default()), wake: Condvar::new() });
        let (i, m, d) = (inner.clone(), metrics.clone(), dir.clone());
        let thread = std::thread::Builder::new().name("dagrun-audit".into()).spawn(move || writer(d, i, m))?;
        Ok(Audit { inner, thread: Some(thread), metrics, dir })
    }

    /// Queue one line of UTC day `day` (a JSON object without the newline).
    pub fn log(&self, day: chrono::NaiveDate, line: &[u8]) {
        let wake = {
            let mut b = self.inner.batch.lock().unwrap_or_else(|e| e.into_inner());
            if b.closed || b.lines >= QUEUE {
                drop(b);
                self.metrics.audit_write_failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let chunk = match b.chunks.back_mut() {
                Some(c) if c.day == day => c,
                _ => {
                    b.chunks.push_back(Chunk { day, bytes: Vec::with_capacity(64 << 10), lines: 0 });
                    b.chunks.back_mut().expect("just pushed")
                }
            };
            chunk.bytes.extend_from_slice(line);
            chunk.bytes.push(b'\n');
            chunk.lines += 1;
            b.lines += 1;
            b.lines == WAKE_AT
        };
        if wake {
            self.inner.wake.notify_one();
        }
    }

    /// Write everything queued, fsync, stop the thread.
    pub fn close(&mut self) {
        self.inner.batch.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.inner.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.close();
    }
}

struct Out {
    day: chrono::NaiveDate,
    f: File,
}

fn open(dir: &Path, day: chrono::NaiveDate) -> std::io::Result<Out> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(file_for(dir, day))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    // A hard link planted under the log's name (today's or a future day's)
    // would have the lines appended to the file it names (as `util::nofollow::open_own_file`).
    if std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
        return Err(std::io::Error::other(format!(
            "has {} names (a hard link to a file elsewhere); not written to",
            std::os::unix::fs::MetadataExt::nlink(&meta)
        )));
    }
    Ok(Out { day, f })
}

/// Append `bytes` (whole lines) to `f`, under an exclusive `flock`: first
/// cut off the end of a line a stopped writer left; if the write fails, cut
/// the file back to where it was, so that no half line stays.
fn append_whole(f: &File, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Bounded (review 28: a process holding the lock stalled the writer, and
    // with it the server's shutdown, for as long as it liked): the batch is
    // then counted as not written.
    crate::util::flock::lock_within(f, path, crate::util::flock::Mode::Exclusive, LOCK_WAIT).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let result = (|| {
        let len = end_of_whole_lines(f, path)?;
        if let Err(e) = (&*f).write_all(bytes) {
            let _ = f.set_len(len);
            return Err(e);
        }
        Ok(())
    })();
    let _ = f.unlock();
    result
}

/// The length of `f` up to its last newline, after cutting off what follows
/// it (what a writer killed mid-line left).
fn end_of_whole_lines(f: &File, path: &Path) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.read_exact_at(&mut buf[..n], start)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        f.set_len(end)?;
        tracing::warn!("audit log {}: removed {} byte(s) of a line a stopped write left at its end", path.display(), len - end);
    }
    Ok(end)
}

fn writer(dir: PathBuf, inner: Arc<Inner>, m: Arc<Metrics>) {
    let mut out: Option<Out> = None;
    let fail = |n: u64| {
        m.audit_write_failures.fetch_add(n, Ordering::Relaxed);
    };
    loop {
        let (chunks, closed) = {
            let mut b = inner.batch.lock().unwrap_or_else(|e| e.into_inner());
            if !b.closed && b.lines < WAKE_AT {
                b = inner.wake.wait_timeout(b, TICK).unwrap_or_else(|e| e.into_inner()).0;
            }
            b.lines = 0;
            (std::mem::take(&mut b.chunks), b.closed)
        };
        for c in chunks {
            if out.as_ref().is_some_and(|o| o.day != c.day) {
                out = None;
            }
            if out.is_none() {
                match open(&dir, c.day) {
                    Ok(o) => out = Some(o),
                    Err(e) => tracing::warn!("audit log {}: {e}", file_for(&dir, c.day).display()),
                }
            }
            let path = file_for(&dir, c.day);
            let written = match out.as_ref().map(|o| append_whole(&o.f, &path, &c.bytes)) {
                Some(Ok(())) => true,
                Some(Err(e)) => {
                    tracing::warn!("audit log {}: {e}; {} line(s) not written", path.display(), c.lines);
                    false
                }
                None => false,
            };
            if written {
                m.audit_lines.fetch_add(c.lines, Ordering::Relaxed);
            } else {
                fail(c.lines);
                out = None;
            }
        }
        if closed {
            break;
        }
    }
    if let Some(o) = out {
        let _ = o.f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_of_their_day_and_overflow_is_counted() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let mut a = Audit::start(d.path().to_path_buf(), m.clone()).unwrap();
        let day1 = chrono::NaiveDate::from_ymd_opt(2026, 12, 4).unwrap();
        let day2 = day1.succ_opt().unwrap();
        a.log(day1, br#"{"n":1}"#);
        a.log(day1, br#"{"n":2}"#);
        a.log(day2, br#"{"n":3}"#);
        // Written within a tick or two, without closing.
        let f1 = file_for(d.path(), day1);
        let t0 = std::time::Instant::now();
        while std::fs::read_to_string(&f1).map(|s| s.lines().count()).unwrap_or(0) < 2 {
            assert!(t0.elapsed() < Duration::from_secs(10), "audit lines not written");
            std::thread::sleep(Duration::from_millis(20));
        }
        a.close();
        assert_eq!(std::fs::read_to_string(&f1).unwrap(), "{\"n\":1}\n{\"n\":2}\n");
        assert_eq!(std::fs::read_to_string(file_for(d.path(), day2)).unwrap(), "{\"n\":3}\n");
        assert_eq!(m.audit_lines.load(Ordering::Relaxed), 3);
        assert_eq!(m.audit_write_failures.load(Ordering::Relaxed), 0);
        // After close (and beyond the queue) a line is counted, not lost silently.
        a.log(day1, b"{}");
        assert_eq!(m.audit_write_failures.load(Ordering::Relaxed), 1);
    }

    /// Review 26: a batch appended to half a line (a full disk, a kill) hid
    /// a whole line from every reader.
    #[test]
    fn the_end_of_a_line_a_stopped_write_left_is_cut_off_before_the_next_batch() {
        let d = tempfile::tempdir().unwrap();
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 4).unwrap();
        let f = file_for(d.path(), day);
        std::fs::write(&f, b"{\"n\":1}\n{\"n\":2,\"tenant\":\"Ten").unwrap();
        let m = Arc::new(Metrics::default());
        let mut a = Audit::start(d.path().to_path_buf(), m.clone()).unwrap();
        a.log(day, br#"{"n":3}"#);
        a.close();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "{\"n\":1}\n{\"n\":3}\n");
        assert_eq!(m.audit_lines.load(Ordering::Relaxed), 1);
        // A file that is all fragment (no newline at all), longer than one read.
        std::fs::write(&f, vec![b'x'; 10_000]).unwrap();
        let mut a = Audit::start(d.path().to_path_buf(), m.clone()).unwrap();
        a.log(day, br#"{"n":4}"#);
        a.close();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "{\"n\":4}\n");
    }

    /// Review 28: a process holding the log's lock stalled the writer, and
    /// the server's shutdown, without end.
    #[test]
    fn a_lock_held_elsewhere_is_waited_for_a_bounded_time_and_the_batch_counted() {
        let d = tempfile::tempdir().unwrap();
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 4).unwrap();
        let f = file_for(d.path(), day);
        std::fs::write(&f, b"").unwrap();
        let holder = File::open(&f).unwrap();
        holder.lock().unwrap();
        let m = Arc::new(Metrics::default());
        let mut a = Audit::start(d.path().to_path_buf(), m.clone()).unwrap();
        a.log(day, br#"{"n":1}"#);
        let t0 = std::time::Instant::now();
        a.close();
        assert!(t0.elapsed() < LOCK_WAIT + Duration::from_secs(3), "close waited {:?}", t0.elapsed());
        assert_eq!(m.audit_write_failures.load(Ordering::Relaxed), 1);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "");
    }

    #[test]
    fn an_unwritable_folder_counts_failures() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let mut a = Audit::start(d.path().join("audit"), m.clone()).unwrap();
        std::fs::remove_dir_all(d.path().join("audit")).unwrap();
        std::fs::write(d.path().join("audit"), b"a file where the folder was").unwrap();
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 4).unwrap();
        a.log(day, b"{}");
        a.close();
        assert_eq!(m.audit_write_failures.load(Ordering::Relaxed), 1);
        assert_eq!(m.audit_lines.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_hard_link_under_a_days_name_is_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("tenants.yaml");
        std::fs::write(&victim, "tenants: []\n").unwrap();
        let dir = d.path().join("audit");
        std::fs::create_dir_all(&dir).unwrap();
        // Planted for today: the server does not start on it.
        let today = chrono::Utc::now().date_naive();
        std::fs::hard_link(&victim, file_for(&dir, today)).unwrap();
        let e = Audit::start(dir.clone(), Arc::new(Metrics::default())).err().expect("refused");
        assert!(e.to_string().contains("hard link"), "{e}");
        std::fs::remove_file(file_for(&dir, today)).unwrap();
        // Planted for a later day: that day's lines are counted as failures, not appended.
        let later = today.succ_opt().unwrap();
        std::fs::hard_link(&victim, file_for(&dir, later)).unwrap();
        let m = Arc::new(Metrics::default());
        let mut a = Audit::start(dir, m.clone()).unwrap();
        a.log(later, b"{}");
        a.close();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "tenants: []\n");
        assert_eq!(m.audit_write_failures.load(Ordering::Relaxed), 1);
    }
}
