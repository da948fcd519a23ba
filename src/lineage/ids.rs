//! Identifiers: UUIDv7 run ids (RFC 9562) derived from dagrun's run id, the
//! host name and the workspace id that namespace jobs and datasets.

use crate::crypto::IntegrityKey;
use anyhow::{Context, Result};
use std::path::Path;

/// A UUIDv7 string: the 48-bit Unix time in milliseconds `unix_ms`, then 74
/// bits taken from blake3 of `seed` (so the same seed and time always give
/// the same id), with the version (7) and variant (10) bits set.
pub fn uuid_v7(unix_ms: u64, seed: &[u8]) -> String {
    uuid_v7_of(unix_ms, blake3::hash(seed).as_bytes())
}

/// A UUIDv7 of `unix_ms` with its 74 other bits from `r`.
fn uuid_v7_of(unix_ms: u64, r: &[u8; 32]) -> String {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    b[6..].copy_from_slice(&r[..10]);
    b[6] = 0x70 | (b[6] & 0x0f);
    b[8] = 0x80 | (b[8] & 0x3f);
    let x = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..])
}

/// MAC domain of a run id's random bits.
const RUN_UUID_DOMAIN: &str = "dagrun openlineage run uuid v1";

/// The id of a job's run within dagrun run `run_id` (`job` = the job name).
/// With the workspace integrity key its random bits are a MAC of the two and
/// the time (`is_run_uuid_of` checks one read back: recovery makes an `ABORT` only for
/// a run dagrun started, never for one planted in an event file).
pub fn run_uuid(unix_ms: u64, run_id: &str, namespace: &str, job: &str, key: Option<&IntegrityKey>) -> String {
    let mut seed = Vec::with_capacity(run_id.len() + job.len() + 24);
    seed.extend_from_slice(b"dagrun-openlineage-run\0");
    seed.extend_from_slice(run_id.as_bytes());
    seed.push(0);
    seed.extend_from_slice(job.as_bytes());
    match key {
        Some(k) => {
            // The time and the job's namespace too: an id re-stamped with
            // another time, or a START moved to another namespace, does not
            // check (reviews 15 and 16).
            seed.extend_from_slice(&unix_ms.to_be_bytes());
            seed.push(0);
            seed.extend_from_slice(namespace.as_bytes());
            uuid_v7_of(unix_ms, k.mac(RUN_UUID_DOMAIN, &seed).as_bytes())
        }
        None => uuid_v7(unix_ms, &seed),
    }
}

/// Is `uuid` the id [`run_uuid`] gives job `job` of dagrun run `run_id`
/// under `key` (at the time the id itself carries)?
pub fn is_run_uuid_of(uuid: &str, run_id: &str, namespace: &str, job: &str, key: &IntegrityKey) -> bool {
    let hex: String = uuid.chars().filter(|&c| c != '-').collect();
    if uuid.len() != 36 || hex.len() != 32 {
        return false;
    }
    let Ok(ms) = u64::from_str_radix(&hex[..12], 16) else { return false };
    run_uuid(ms, run_id, namespace, job, Some(key)) == uuid
}

/// The workspace id of a job namespace `dagrun://HOST/WORKSPACE_ID` (None
/// for any other form). A workspace's runs may have been on other hosts (a
/// shared filesystem, a container with a new host name each start).
pub fn workspace_of_namespace(namespace: &str) -> Option<&str> {
    let (host, ws) = namespace.strip_prefix("dagrun://")?.split_once('/')?;
    let host_ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    (host_ok && valid_workspace_id(ws)).then_some(ws)
}

/// This machine's host name (`localhost` when it cannot be read).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is a live local, writable for buf.len() bytes, and
    // gethostname writes at most that many; it may leave the name without a
    // NUL on truncation, which the position() below tolerates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let s = String::from_utf8_lossy(&buf[..end]).to_string();
        let s: String = s.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).collect();
        if !s.is_empty() {
            return s;
        }
    }
    "localhost".into()
}

/// File (under `.dagrun/`) holding the workspace id.
pub const WORKSPACE_ID_FILE: &str = "openlineage/workspace-id";

fn valid_workspace_id(s: &str) -> bool {
    crate::util::is_lower_hex(s, 32)
}

/// The workspace's stable random id (32 lower-case hex), created on first
/// use in `.dagrun/openlineage/workspace-id`. A file that does not hold a
/// valid id (edited, truncated) is replaced, with a warning.
pub fn workspace_id(dagrun_dir: &Path) -> Result<String> {
    let p = dagrun_dir.join(WORKSPACE_ID_FILE);
    match crate::util::read_capped(&p, 4096).map(|b| String::from_utf8_lossy(&b).into_owned()) {
        Ok(s) if valid_workspace_id(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => tracing::warn!("{} does not hold a workspace id (32 hex characters); making a new one", p.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    crate::util::atomic::write_atomic(&p, format!("{id}\n").as_bytes())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_v7_has_the_layout_of_rfc_9562() {
        let u = uuid_v7(0x0190_1234_5678, b"x");
        assert_eq!(u.len(), 36);
        let parts: Vec<&str> = u.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
        assert_eq!(&u[..13], "01901234-5678");
        assert_eq!(&u[14..15], "7", "version nibble");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "variant bits: {u}");
        assert_eq!(uuid_v7(5, b"x"), uuid_v7(5, b"x"));
        assert_ne!(uuid_v7(5, b"x"), uuid_v7(5, b"y"));
    }

    #[test]
    fn run_uuids_differ_per_job_and_run_and_are_checked_under_the_key() {
        assert_ne!(run_uuid(1, "r1", "ns", "p", None), run_uuid(1, "r1", "ns", "p.a", None));
        assert_ne!(run_uuid(1, "r1", "ns", "p", None), run_uuid(1, "r2", "ns", "p", None));
        let k = IntegrityKey::from_bytes([7; 32]);
        let u = run_uuid(1_765_000_000_000, "r1", "ns", "p.a", Some(&k));
        assert!(is_run_uuid_of(&u, "r1", "ns", "p.a", &k));
        assert!(!is_run_uuid_of(&u, "r1", "ns2", "p.a", &k), "another namespace");
        assert!(!is_run_uuid_of(&u, "r1", "ns", "p.b", &k) && !is_run_uuid_of(&u, "r2", "ns", "p.a", &k));
        assert!(!is_run_uuid_of(&run_uuid(1_765_000_000_000, "r1", "ns", "p.a", None), "r1", "ns", "p.a", &k), "an id made without the key");
        assert!(!is_run_uuid_of(&u, "r1", "ns", "p.a", &IntegrityKey::from_bytes([8; 32])));
        assert!(!is_run_uuid_of("not-a-uuid", "r1", "ns", "p.a", &k));
        // Re-stamped with another time (its first 48 bits): no longer checks.
        let restamped = format!("{}{}", &run_uuid(1_700_000_000_000, "r1", "ns", "p.a", Some(&k))[..13], &u[13..]);
        assert!(!is_run_uuid_of(&restamped, "r1", "ns", "p.a", &k));
        let ws = "0123456789abcdef0123456789abcdef";
        assert_eq!(workspace_of_namespace(&format!("dagrun://login-1.example/{ws}")), Some(ws));
        for bad in [
            "dagrun://h/x",
            "http://h/0123456789abcdef0123456789abcdef",
            "dagrun:///0123456789abcdef0123456789abcdef",
            "dagrun://a b/0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(workspace_of_namespace(bad), None, "{bad}");
        }
    }

    #[test]
    fn workspace_id_is_stable_and_bad_files_are_replaced() {
        let d = tempfile::tempdir().unwrap();
        let a = workspace_id(d.path()).unwrap();
        assert!(valid_workspace_id(&a));
        assert_eq!(workspace_id(d.path()).unwrap(), a);
        std::fs::write(d.path().join(WORKSPACE_ID_FILE), "../../etc\n").unwrap();
        let b = workspace_id(d.path()).unwrap();
        assert!(valid_workspace_id(&b) && b != a);
    }

    #[test]
    fn host_name_is_a_plain_token() {
        let h = host_name();
        assert!(!h.is_empty() && !h.contains('/') && !h.contains(' '));
    }
}
