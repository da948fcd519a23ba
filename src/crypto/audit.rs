//! The audit trail of key operations: `<workspace>/.dagrun/keys/audit.jsonl`.
//!
//! # Format
//! One JSON object a line: `seq` (1, 2, …), `time` (RFC 3339 UTC), `op` (`create`,
//! `rotate`, `forget`, `export`, `rewrap`, `init`), `tenant` (`-` for the whole
//! keyring), `key_id`, `user`, `host`, `result`, `prev`, then `hash` last.
//! `hash` = blake3 of the line's bytes up to (not including) `,"hash":…`, plus `}`;
//! `prev` = the previous line's `hash` (64 zeros for the first line). So editing
//! any byte of a line breaks its hash, and deleting or reordering lines breaks the
//! `seq`/`prev` chain. `audit.head` (`{"seq":N,"hash":H}`, rewritten atomically after
//! each append) records the last line, so cutting lines off the end is detected too.
//! The head exists before the first line is written (`{"seq":0,…}`), so a log
//! without a head is a deleted head, never a first append cut short.
//!
//! # Rules
//! - Append-only, under an exclusive `flock` of the log (runs and `keys` commands
//!   of different processes interleave whole lines, never parts); each line is
//!   fsynced before the operation reports success.
//! - A failed append leaves no part of its lines: a write that fails (a full
//!   disk) is cut back to the log's length before it. Bytes after the last
//!   newline that are no whole line (a machine that stopped mid-write; they
//!   may end inside a character) are cut off by the next append, which logs
//!   a `removed:` line saying so; [`verify`] names them without failing. A
//!   whole line missing only its newline is kept and finished.
//! - The head is behind the log only by the lines of an append whose head
//!   update failed or was cut short (a full disk, SIGKILL): the next append
//!   first brings the head up to the log (and appends nothing if it cannot),
//!   and [`verify`] accepts lines after the head when the head names an
//!   earlier line by its hash, reporting them as not yet confirmed.
//! - An append that finds the head naming no line of the log (lines cut off,
//!   the log rewritten, the head deleted or damaged) never moves the head over
//!   it: it first writes a `tampering:` line saying what it found, and
//!   [`verify`] fails on every such line from then on. Key operations go on.
//! - [`verify`] reads the log and the head under a shared lock of the log;
//!   the head's temporary files are removed only by an append (under the
//!   lock every head is written under).
//! - No key material: ids, tenant names and results only.
//! - `dagrun keys audit --verify` ([`verify`]) reads every line as untrusted input.
//! - Limits: whoever can rewrite both files can forge a consistent shorter history;
//!   ship the log off the machine (syslog, WORM storage) to rule that out.

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// File name of the log inside `.dagrun/keys/`.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// Largest audit log read back.
pub const MAX_LOG_BYTES: u64 = 1 << 30;
/// File name of the head record inside `.dagrun/keys/`.
pub const HEAD_FILE: &str = "audit.head";
const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line without its hash (the hashed part), fields in file order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    pub op: String,
    pub tenant: String,
    pub key_id: String,
    pub user: String,
    pub host: String,
    pub result: String,
    pub prev: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Head {
    seq: u64,
    hash: String,
}

/// The audit log of one workspace.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
    head: PathBuf,
}

fn user() -> String {
    for v in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(v)
            && !u.is_empty()
        {
            return u;
        }
    }
    // SAFETY: getuid has no preconditions.
    format!("uid {}", unsafe { libc::getuid() })
}

fn host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Split a stored line into the hashed body (`{…}` without the hash) and the hash.
fn split_line(line: &str) -> Option<(String, &str)> {
    let i = line.rfind(",\"hash\":\"")?;
    let rest = line[i..].strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    Some((format!("{}}}", &line[..i]), rest))
}

impl AuditLog {
    /// The log in `keys_dir` (`.dagrun/keys`).
    pub fn new(keys_dir: &Path) -> AuditLog {
        AuditLog { path: keys_dir.join(AUDIT_FILE), head: keys_dir.join(HEAD_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one operation. Fails (and the caller reports failure) when the line
    /// cannot be written and synced.
    pub fn append(&self, op: &str, tenant: &str, key_id: &str, result: &str) -> Result<()> {
        self.append_all(&[(op, tenant, key_id, result)])
    }

    /// Append several operations `(op, tenant, key_id, result)` in order, as
    /// consecutive chained lines: one write, one fsync and one head update
    /// for all of them (a tenant's first two keys are logged so).
    pub fn append_all(&self, ops: &[(&str, &str, &str, &str)]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let what = || format!("cannot append to the key audit log {}", self.path.display());
        let mut f = {
            let mut o = OpenOptions::new();
            o.read(true).append(true).create(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            crate::util::nofollow::open_own_file(&mut o, &self.path).with_context(what)?
        };
        crate::util::flock::lock_short(&f, &self.path, crate::util::flock::Mode::Exclusive).with_context(what)?;
        // The head's temporary files are written under this lock: any found
        // now is a killed writer's (no other sweep may take a live one).
        remove_head_temps(&self.head);
        let mut bytes = Vec::new();
        f.seek(SeekFrom::Start(0)).with_context(what)?;
        f.read_to_end(&mut bytes).with_context(what)?;
        // After the last newline: a whole line is finished; anything else is
        // what a stopped write left (it may end inside a character): cut off,
        // and logged (review 23).
        let mut lines = String::new();
        let mut ops = ops.to_vec();
        let cut_note;
        let n = cut_short_len(&bytes);
        if n > 0 {
            tracing::warn!("the key audit log {} ended in {n} byte(s) of a line cut short (a write that failed or was stopped); removed", self.path.display());
            bytes.truncate(bytes.len() - n);
            f.set_len(bytes.len() as u64).with_context(what)?;
            f.sync_data().with_context(what)?;
            cut_note = format!("{CUT_SHORT}{n} byte(s) of a line cut short at the end of the log (a write that was stopped) were removed");
            ops.insert(0, ("audit", "-", AUDIT_FILE, cut_note.as_str()));
        } else if bytes.last().is_some_and(|&b| b != b'\n') {
            lines.push('\n'); // a whole line missing only its newline
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow!("the key audit log {} is not UTF-8 before its last line: it was edited or damaged; run `dagrun keys audit --verify`", self.path.display())
        })?;
        let (mut seq, mut prev) = match text.lines().rev().find(|l| !l.trim().is_empty()) {
            None => (1, ZERO.to_string()),
            Some(last) => {
                let (e, hash) = valid_line(last)
                    .ok_or_else(|| anyhow!("the key audit log {} ends in a damaged line; run `dagrun keys audit --verify`", self.path.display()))?;
                (e.seq + 1, hash.to_string())
            }
        };
        // The head must name one of the log's lines by its hash. If it does,
        // it first names the log as it is (it is behind after an append whose
        // head update failed, and missing before the first line). If it does
        // not, the log was cut or rewritten (or the head deleted): that is
        // written into the log, before this operation's lines, and never
        // papered over by moving the head (review 22).
        let at_head = Head { seq: seq - 1, hash: prev.clone() };
        let head_now = match crate::util::read_capped(&self.head, 64 * 1024) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", self.head.display())),
        };
        let tampered = head_problem(head_now.as_deref(), &text, at_head.seq);
        let note;
        match &tampered {
            Some(problem) => {
                tracing::error!("the key audit log {}: {problem}", self.path.display());
                note = format!("{TAMPERING}{problem}; found by the key operation logged next, which goes on from the log as it is");
                ops.insert(0, ("audit", "-", HEAD_FILE, note.as_str()));
            }
            None if head_now.as_deref().and_then(|b| serde_json::from_slice::<Head>(b).ok()).as_ref() != Some(&at_head) => self.write_head(&at_head)?,
            None => {}
        }
        let (time, user, host) = (chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true), user(), host());
        for (i, &(op, tenant, key_id, result)) in ops.iter().enumerate() {
            if i > 0 {
                seq += 1;
            }
            let entry = Entry {
                seq,
                time: time.clone(),
                op: op.into(),
                tenant: tenant.into(),
                key_id: key_id.into(),
                user: user.clone(),
                host: host.clone(),
                result: result.into(),
                prev,
            };
            let body = serde_json::to_string(&entry).context("cannot serialise an audit line")?;
            let hash = blake3::hash(body.as_bytes()).to_hex().to_string();
            lines.push_str(&format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]));
            prev = hash;
        }
        let before = text.len() as u64;
        if let Err(e) = f.write_all(lines.as_bytes()).and_then(|()| f.sync_data()) {
            // No part of these lines stays: the log is as it was.
            let _ = f.set_len(before).and_then(|()| f.sync_data());
            return Err(e).with_context(what);
        }
        self.write_head(&Head { seq, hash: prev })
    }

    fn write_head(&self, head: &Head) -> Result<()> {
        let bytes = serde_json::to_vec(head).context("cannot serialise the audit head")?;
        crate::util::atomic::write_atomic_mode(&self.head, &bytes, 0o600).with_context(|| format!("cannot update {}", self.head.display()))
    }
}

/// How the `result` of the line an append writes when it cut off the end of
/// a line a stopped write left begins.
const CUT_SHORT: &str = "removed: ";

/// Remove temporary files of `audit.head` (the caller holds the log's lock,
/// under which every head is written).
fn remove_head_temps(head: &Path) {
    let Some(dir) = head.parent() else { return };
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if is_head_temp(&e.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether `name` (in `.dagrun/keys/`) is a temporary file of `audit.head`:
/// it holds no key, and only an append holding the log's lock may remove it.
pub fn is_head_temp(name: &str) -> bool {
    name.starts_with(&format!(".{HEAD_FILE}{}", crate::util::atomic::TEMP_MARKER))
}

/// How the `result` of a line an append writes when it finds the log and
/// its head disagree begins ([`verify`] reports every such line).
const TAMPERING: &str = "tampering: ";

/// What is wrong between `audit.head` (its bytes; None: no head file) and
/// the log's whole lines `text`, whose last line is `last_seq` (0: none).
/// None when the head names one of the lines by its hash (or the start).
fn head_problem(head: Option<&[u8]>, text: &str, last_seq: u64) -> Option<String> {
    let Some(bytes) = head else {
        return (last_seq > 0).then(|| format!("{HEAD_FILE} was missing (deleted) while the log had {last_seq} line(s)"));
    };
    let Ok(head) = serde_json::from_slice::<Head>(bytes) else {
        return Some(format!("{HEAD_FILE} was damaged (not a head record)"));
    };
    if head.seq > last_seq {
        return Some(format!("{HEAD_FILE} recorded line {} but the log had {last_seq} line(s): lines were cut off its end", head.seq));
    }
    let named = match head.seq {
        0 => Some(ZERO),
        n => text.lines().nth(n as usize - 1).and_then(valid_line).filter(|(e, _)| e.seq == n).map(|(_, h)| h),
    };
    (named != Some(head.hash.as_str()))
        .then(|| format!("line {} of the log is not the one {HEAD_FILE} recorded: the log was rewritten from there on", head.seq))
}

/// How many bytes after the log's last newline are no whole line: what a
/// stopped write left (it may end inside a character). 0 when the log ends
/// in a newline or in a whole line missing only its newline.
fn cut_short_len(bytes: &[u8]) -> usize {
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let tail = &bytes[complete..];
    if tail.is_empty() || std::str::from_utf8(tail).ok().and_then(valid_line).is_some() { 0 } else { tail.len() }
}

/// A stored line's entry and hash, if it is a whole line whose hash matches.
fn valid_line(line: &str) -> Option<(Entry, &str)> {
    let (body, hash) = split_line(line)?;
    let e: Entry = serde_json::from_str(&body).ok()?;
    (blake3::hash(body.as_bytes()).to_hex().as_str() == hash).then_some((e, hash))
}

/// What [`verify`] found in an intact log.
#[derive(Debug, PartialEq)]
pub struct Verified {
    pub lines: u64,
    /// Lines after the one `audit.head` names: appended by a command whose
    /// head update failed or was cut short (the next append confirms them).
    pub unconfirmed: u64,
    /// Bytes after the last whole line: a line a stopped write cut short
    /// (the next append removes them and logs that).
    pub cut_short: u64,
}

/// Check every line's hash and the chain; errors name the first bad line.
pub fn verify(keys_dir: &Path) -> Result<Verified> {
    let log = AuditLog::new(keys_dir);
    let shown = log.path.display().to_string();
    // Under a shared lock of the log: an append (exclusive) cannot come
    // between reading the log and reading its head (review 22: a head read
    // after a concurrent append looked like lines cut off the end).
    // The wait is bounded (`util::flock`): a holder that never lets go is
    // reported, not waited on (review 23).
    // Read from the descriptor the lock is held on.
    let held = match crate::util::open_regular(&log.path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if log.head.exists() {
                bail!("{shown} is missing but {} records earlier lines: the audit log was deleted", log.head.display());
            }
            return Ok(Verified { lines: 0, unconfirmed: 0, cut_short: 0 });
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {shown}")),
    };
    crate::util::flock::lock_short(&held, &log.path, crate::util::flock::Mode::Shared)?;
    let mut bytes = crate::util::read_capped_from(&held, MAX_LOG_BYTES).with_context(|| format!("cannot read {shown}"))?;
    // What a stopped write left after the last newline (not a whole line):
    // the next append removes it and logs that; it is no line to check.
    let cut_short = cut_short_len(&bytes);
    bytes.truncate(bytes.len() - cut_short);
    let cut_short = cut_short as u64;
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("{shown}: not UTF-8: the log was edited or damaged"))?;
    let mut prev = ZERO.to_string();
    let mut expect = 1u64;
    // hashes[k] = the hash of line k (hashes[0]: the chain's start).
    let mut hashes = vec![ZERO.to_string()];
    // Lines an append wrote when it found the log tampered with.
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((body, hash)) = split_line(line) else {
            bail!("{shown}:{n}: not an audit line (no trailing hash): the line was edited or damaged");
        };
        let e: Entry = serde_json::from_str(&body).map_err(|_| anyhow!("{shown}:{n}: not a valid audit line: the line was edited or damaged"))?;
        if blake3::hash(body.as_bytes()).to_hex().as_str() != hash {
            bail!("{shown}:{n}: the line's hash does not match its content: line {n} (seq {}) was edited", e.seq);
        }
        if e.seq != expect {
            bail!("{shown}:{n}: sequence number {} where {expect} was expected: {} line(s) before it were deleted or moved", e.seq, e.seq.abs_diff(expect));
        }
        if e.prev != prev {
            bail!("{shown}:{n}: the line does not chain to the previous one (prev hash differs): a line before it was deleted, inserted or edited");
        }
        if e.op == "audit" && e.result.starts_with(TAMPERING) {
            found.push(format!("{shown}:{n}: a key operation at {} found the log tampered with: {}", e.time, &e.result[TAMPERING.len()..]));
        }
        prev = hash.to_string();
        hashes.push(prev.clone());
        expect += 1;
    }
    let lines = expect - 1;
    match crate::util::read_capped(&log.head, 64 * 1024) {
        Ok(b) => {
            let head: Head = serde_json::from_slice(&b).map_err(|_| anyhow!("{} is damaged: the audit head was edited", log.head.display()))?;
            if head.seq > lines {
                bail!("{shown}: the log has {lines} line(s) but {} records line {} as the last: lines were deleted from the end", log.head.display(), head.seq);
            }
            // Lines after the head's are an append whose head update failed.
            if hashes[head.seq as usize] != head.hash {
                bail!(
                    "{shown}: line {} does not match the one {} records: the line was replaced, or the log was rewritten from there on",
                    head.seq,
                    log.head.display()
                );
            }
            if let Some(first) = found.first() {
                bail!("{first}{}", if found.len() > 1 { format!(" (and {} more such line(s))", found.len() - 1) } else { String::new() });
            }
            Ok(Verified { lines, unconfirmed: lines - head.seq, cut_short })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && lines == 0 => Ok(Verified { lines, unconfirmed: 0, cut_short }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{} is missing: the audit head was deleted", log.head.display()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", log.head.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p.join(AUDIT_FILE)).unwrap().lines().map(String::from).collect()
    }

    fn write(p: &Path, l: &[String]) {
        std::fs::write(p.join(AUDIT_FILE), l.iter().map(|s| format!("{s}\n")).collect::<String>()).unwrap();
    }

    #[test]
    fn chain_detects_edits_deletions_and_truncation() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::new(d.path());
        assert_eq!(verify(d.path()).unwrap().lines, 0);
        for i in 0..4 {
            log.append("create", "Tenant_A", &format!("Tenant_A-dk-{i}"), "ok").unwrap();
        }
        assert_eq!(verify(d.path()).unwrap().lines, 4);
        let orig = lines(d.path());
        let e: Entry = serde_json::from_str(&split_line(&orig[1]).unwrap().0).unwrap();
        assert_eq!((e.seq, e.op.as_str()), (2, "create"));

        // edited line
        let mut l = orig.clone();
        l[1] = l[1].replace("Tenant_A-dk-1", "Tenant_A-dk-9");
        write(d.path(), &l);
        let err = verify(d.path()).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("edited"), "{err}");

        // deleted middle line
        let mut l = orig.clone();
        l.remove(2);
        write(d.path(), &l);
        let err = verify(d.path()).unwrap_err().to_string();
        assert!(err.contains(":3:") && err.contains("deleted"), "{err}");

        // deleted last line
        let mut l = orig.clone();
        l.pop();
        write(d.path(), &l);
        let err = verify(d.path()).unwrap_err().to_string();
        assert!(err.contains("deleted from the end"), "{err}");

        write(d.path(), &orig);
        assert_eq!(verify(d.path()).unwrap().lines, 4);
        log.append("export", "Tenant_A", "Tenant_A-dk-1", "ok").unwrap();
        assert_eq!(verify(d.path()).unwrap().lines, 5);
    }

    /// Review 21: a write cut short left a fragment that blocked every key
    /// operation; a head behind by more than one line (two failed head
    /// updates) or missing after a first append cut short was called tampering.
    #[test]
    fn appends_survive_writes_and_head_updates_cut_short() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::new(d.path());
        log.append("init", "-", "keyring", "ok").unwrap();
        // The head exists from the first append on (seq 0 before it).
        let head: Head = serde_json::from_slice(&std::fs::read(d.path().join(HEAD_FILE)).unwrap()).unwrap();
        assert_eq!(head.seq, 1);
        let whole = lines(d.path());

        // A fragment of a line at the end, cut inside a character (review
        // 23: `$USER` may be non-ASCII): verify names it without failing, the
        // next append cuts it off and logs that.
        let mut f = OpenOptions::new().append(true).open(d.path().join(AUDIT_FILE)).unwrap();
        f.write_all(b"{\"seq\":2,\"time\":\"2026-12-06T00:00:00.000Z\",\"user\":\"Ren\xc3").unwrap();
        drop(f);
        assert_eq!(verify(d.path()).unwrap(), Verified { lines: 1, unconfirmed: 0, cut_short: 55 });
        log.append("rotate", "Tenant_A", "Tenant_A-dk-2", "started: new data key").unwrap();
        assert_eq!(verify(d.path()).unwrap(), Verified { lines: 3, unconfirmed: 0, cut_short: 0 });
        let l = lines(d.path());
        assert_eq!(l[0], whole[0]);
        assert!(l[1].contains(r#""op":"audit""#) && l[1].contains("55 byte(s) of a line cut short"), "{}", l[1]);

        // A whole line missing only its newline is kept and finished.
        std::fs::write(d.path().join(AUDIT_FILE), l.join("\n")).unwrap();
        log.append("rotate", "Tenant_A", "Tenant_A-dk-2", "ok").unwrap();
        assert_eq!(verify(d.path()).unwrap().lines, 4);
        let l = lines(d.path());

        // Lines after the head (head updates that failed): not tampering, and
        // the next append first brings the head up to the log.
        let h1 = std::fs::read(d.path().join(HEAD_FILE)).unwrap();
        log.append("export", "Tenant_A", "Tenant_A-dk-2", "ok").unwrap();
        log.append("export", "Tenant_A", "Tenant_A-dk-2", "ok").unwrap();
        std::fs::write(d.path().join(HEAD_FILE), &h1).unwrap();
        assert_eq!(verify(d.path()).unwrap(), Verified { lines: 6, unconfirmed: 2, cut_short: 0 });
        // ... but the head must name its line by that line's hash.
        std::fs::write(d.path().join(HEAD_FILE), serde_json::to_vec(&Head { seq: 2, hash: ZERO.into() }).unwrap()).unwrap();
        let err = verify(d.path()).unwrap_err().to_string();
        assert!(err.contains("line 2 does not match"), "{err}");
        std::fs::write(d.path().join(HEAD_FILE), &h1).unwrap();
        // A head temporary file a killed writer left goes with the next append.
        let stale = d.path().join(format!(".{HEAD_FILE}{}1.0", crate::util::atomic::TEMP_MARKER));
        std::fs::write(&stale, b"{}").unwrap();
        assert!(is_head_temp(&stale.file_name().unwrap().to_string_lossy()));
        log.append("export", "Tenant_A", "Tenant_A-dk-2", "ok").unwrap();
        assert!(!stale.exists());
        assert_eq!(verify(d.path()).unwrap(), Verified { lines: 7, unconfirmed: 0, cut_short: 0 });
        assert_eq!(lines(d.path())[..4], l[..]);

        // A first append cut short after its line: the head (seq 0) was written first.
        let d2 = tempfile::tempdir().unwrap();
        let log2 = AuditLog::new(d2.path());
        log2.append_all(&[("create", "Tenant_A", "Tenant_A-dk-1", "ok"), ("create", "Tenant_A", "Tenant_A-pk-1", "ok")]).unwrap();
        std::fs::write(d2.path().join(HEAD_FILE), serde_json::to_vec(&Head { seq: 0, hash: ZERO.into() }).unwrap()).unwrap();
        assert_eq!(verify(d2.path()).unwrap(), Verified { lines: 2, unconfirmed: 2, cut_short: 0 });
        // A deleted head is still found.
        std::fs::remove_file(d2.path().join(HEAD_FILE)).unwrap();
        assert!(verify(d2.path()).unwrap_err().to_string().contains("the audit head was deleted"));
    }

    /// Review 22: lines cut off the end were found by `--verify` only until
    /// the next key operation, which moved the head back to the shorter log.
    #[test]
    fn an_append_writes_down_what_it_finds_wrong_and_never_hides_it() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::new(d.path());
        for op in ["create", "export", "forget"] {
            log.append(op, "Tenant_A", "Tenant_A-dk-1", "ok").unwrap();
        }
        let mut l = lines(d.path());
        l.pop(); // the forget line cut off
        write(d.path(), &l);
        assert!(verify(d.path()).unwrap_err().to_string().contains("deleted from the end"));
        log.append("export", "Tenant_B", "Tenant_B-dk-1", "refused: no such key").unwrap();
        let err = verify(d.path()).unwrap_err().to_string();
        assert!(err.contains(":3: a key operation at") && err.contains("recorded line 3 but the log had 2 line(s)"), "{err}");
        let now = lines(d.path());
        assert_eq!(now.len(), 4);
        assert!(now[2].contains(r#""op":"audit""#) && now[3].contains("Tenant_B-dk-1"), "{now:?}");
        // It stays found: later appends do not wash it out.
        log.append("export", "Tenant_B", "Tenant_B-dk-1", "ok").unwrap();
        assert!(verify(d.path()).unwrap_err().to_string().contains("found the log tampered with"));

        // A deleted head, a damaged one, and a line the head names rewritten.
        for (what, damage) in [("was missing", 0), ("was damaged", 1), ("is not the one", 2)] {
            let d = tempfile::tempdir().unwrap();
            let log = AuditLog::new(d.path());
            log.append("create", "Tenant_A", "Tenant_A-dk-1", "ok").unwrap();
            log.append("export", "Tenant_A", "Tenant_A-dk-1", "ok").unwrap();
            match damage {
                0 => std::fs::remove_file(d.path().join(HEAD_FILE)).unwrap(),
                1 => std::fs::write(d.path().join(HEAD_FILE), b"{").unwrap(),
                _ => {
                    // A consistent log of other lines (a rewritten history).
                    let other = tempfile::tempdir().unwrap();
                    let forged = AuditLog::new(other.path());
                    forged.append("create", "Tenant_A", "Tenant_A-dk-1", "ok").unwrap();
                    forged.append("create", "Tenant_A", "Tenant_A-dk-9", "ok").unwrap();
                    std::fs::copy(other.path().join(AUDIT_FILE), d.path().join(AUDIT_FILE)).unwrap();
                }
            }
            log.append("rotate", "Tenant_A", "Tenant_A-dk-2", "ok").unwrap();
            let err = verify(d.path()).unwrap_err().to_string();
            assert!(err.contains("found the log tampered with") && err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn lines_appended_together_chain_like_lines_appended_one_by_one() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::new(d.path());
        log.append("init", "-", "keyring", "ok").unwrap();
        log.append_all(&[("create", "Tenant_A", "Tenant_A-dk-1", "ok: data key"), ("create", "Tenant_A", "Tenant_A-pk-1", "ok: pseudonym key")]).unwrap();
        log.append_all(&[]).unwrap();
        log.append("export", "Tenant_A", "Tenant_A-dk-1", "ok").unwrap();
        assert_eq!(verify(d.path()).unwrap().lines, 4);
        let entries: Vec<Entry> = lines(d.path()).iter().map(|l| serde_json::from_str(&split_line(l).unwrap().0).unwrap()).collect();
        let seqs: Vec<(u64, &str)> = entries.iter().map(|e| (e.seq, e.key_id.as_str())).collect();
        assert_eq!(seqs, [(1, "keyring"), (2, "Tenant_A-dk-1"), (3, "Tenant_A-pk-1"), (4, "Tenant_A-dk-1")]);
        // The head names the last line of the batch, so cutting it off is seen.
        let mut l = lines(d.path());
        l.truncate(3);
        write(d.path(), &l);
        let err = verify(d.path()).unwrap_err().to_string();
        assert!(err.contains("deleted from the end"), "{err}");
    }
}
