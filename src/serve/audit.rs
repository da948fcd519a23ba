//! The audit log: one JSON line per scoring request.
//!
//! Rules:
//! - A line holds the time, request id, token id, tenant, model version,
//!   route, rows, status and latency: never a data value, never a token.
//! - Lines go to `DIR/serve-audit-YYYY-MM-DD.jsonl` (UTC day; a new file each
//!   day: daily rotation without renaming). The default DIR is
//!   `.dagrun/audit/`.
//! - Writing happens on one background thread fed by a channel, so a
//!   request never waits for the disk; the thread flushes whenever the
//!   channel runs dry (at most every 200 ms under constant load). A failed
//!   write is counted (`dagrun_serve_audit_write_failures_total`) and never
//!   fails or delays a response. On shutdown the channel is drained and the
//!   file flushed and fsynced.

use crate::serve::metrics::Metrics;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Lines waiting to be written before new ones are dropped (and counted).
const QUEUE: usize = 65_536;

/// The sending side, held by the server.
pub struct Audit {
    tx: Option<SyncSender<String>>,
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
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
        let m = metrics.clone();
        let d = dir.clone();
        let thread = std::thread::Builder::new().name("dagrun-audit".into()).spawn(move || writer(d, rx, m))?;
        Ok(Audit { tx: Some(tx), thread: Some(thread), metrics, dir })
    }

    /// Queue one line (a JSON object without the newline).
    pub fn log(&self, line: String) {
        if let Some(tx) = &self.tx {
            match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.metrics.audit_write_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Write everything queued, fsync, stop the thread.
    pub fn close(&mut self) {
        self.tx.take();
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
    w: BufWriter<File>,
}

fn open(dir: &Path, day: chrono::NaiveDate) -> std::io::Result<Out> {
    let f = OpenOptions::new().create(true).append(true).open(file_for(dir, day))?;
    Ok(Out { day, w: BufWriter::with_capacity(1 << 16, f) })
}

fn writer(dir: PathBuf, rx: Receiver<String>, m: Arc<Metrics>) {
    let mut out: Option<Out> = None;
    let mut pending = 0u64;
    let mut last_flush = Instant::now();
    let fail = |n: u64| {
        m.audit_write_failures.fetch_add(n, Ordering::Relaxed);
    };
    let flush = |out: &mut Option<Out>, pending: &mut u64| {
        if let Some(o) = out.as_mut() {
            if o.w.flush().is_err() {
                fail(*pending);
                *out = None;
            } else {
                m.audit_lines.fetch_add(*pending, Ordering::Relaxed);
            }
        }
        *pending = 0;
    };
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let dry = line.is_none();
        if let Some(line) = line {
            let today = chrono::Utc::now().date_naive();
            if out.as_ref().is_some_and(|o| o.day != today) {
                flush(&mut out, &mut pending);
                out = None;
            }
            if out.is_none() {
                match open(&dir, today) {
                    Ok(o) => out = Some(o),
                    Err(e) => {
                        tracing::warn!("audit log {}: {e}", file_for(&dir, today).display());
                    }
                }
            }
            match out.as_mut() {
                Some(o) => {
                    if o.w.write_all(line.as_bytes()).and_then(|_| o.w.write_all(b"\n")).is_err() {
                        fail(pending + 1);
                        pending = 0;
                        out = None;
                    } else {
                        pending += 1;
                    }
                }
                None => fail(1),
            }
        }
        // Flush when the queue runs dry, or every 200 ms under constant load.
        if pending > 0 && (dry || last_flush.elapsed() >= Duration::from_millis(200)) {
            flush(&mut out, &mut pending);
            last_flush = Instant::now();
        }
    }
    flush(&mut out, &mut pending);
    if let Some(o) = out {
        let _ = o.w.get_ref().sync_all();
    }
}
