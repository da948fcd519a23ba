//! API tokens for `dagrun serve`: one tenant per token, stored only as a hash.
//!
//! Rules:
//! - A token is `dgr_` + 64 hex digits: 256 bits from the operating system's
//!   CSPRNG. It is shown once, by `dagrun tokens create`, and never stored:
//!   `.dagrun/tokens.json` (mode 0600) keeps its SHA-256 only (a 256-bit random
//!   secret needs no slow password hash). Lists, logs and errors name a
//!   token by its id (8 hex digits, also random), never by its value.
//! - Checking a token hashes it and compares the digest with every stored
//!   digest in constant time (no early exit, no map lookup keyed by the
//!   secret), so response times do not depend on how much of it matched.
//! - A token is valid when it is not revoked and not expired; expiry is
//!   checked on every request against the clock, revocation as soon as the
//!   server reloads the file (it polls it, see `serve::state`).
//! - `tokens.json` is untrusted input when read back: parsed, every field
//!   checked (id and hash shapes, tenant id rules, timestamps).
//! - Writers (`create`, `revoke`) hold the workspace lock and replace the
//!   file atomically.
//! - The server records "last used" in `.dagrun/tokens-last-used.json`, a
//!   separate file it rewrites at most every few seconds, so that it never
//!   writes the token file itself.

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File name under `.dagrun/`.
pub const TOKENS_FILE: &str = "tokens.json";
/// Last-use times, written by the server.
pub const LAST_USED_FILE: &str = "tokens-last-used.json";
const FORMAT: &str = "dagrun-tokens/1";
const PREFIX: &str = "dgr_";
const MAX_FILE: u64 = 16 << 20;

/// One stored token (never the token itself).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub created: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
    pub revoked: Option<DateTime<Utc>>,
    /// SHA-256 of the token, lower-case hex.
    pub sha256: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct TokenFile {
    format: String,
    tokens: Vec<TokenRecord>,
}

/// Path of the token file of the workspace whose `.dagrun/` is `dagrun_dir`.
pub fn tokens_path(dagrun_dir: &Path) -> PathBuf {
    dagrun_dir.join(TOKENS_FILE)
}

/// Path of the last-used file.
pub fn last_used_path(dagrun_dir: &Path) -> PathBuf {
    dagrun_dir.join(LAST_USED_FILE)
}

fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// SHA-256 of a presented token.
pub fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Constant-time equality of two digests.
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut d = 0u8;
    for i in 0..32 {
        d |= a[i] ^ b[i];
    }
    // Keep the compiler from turning the loop into an early exit.
    std::hint::black_box(d) == 0
}

/// Read and verify the token file (empty when absent).
pub fn load(dagrun_dir: &Path) -> Result<Vec<TokenRecord>> {
    let path = tokens_path(dagrun_dir);
    let meta = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        r => r.with_context(|| format!("cannot read {}", path.display()))?,
    };
    if !meta.is_file() || meta.len() > MAX_FILE {
        bail!("{} is not a regular file of a sensible size; remove it and create the tokens again", path.display());
    }
    let bytes = crate::util::read_capped(&path, MAX_FILE).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes, &path.display().to_string())
}

fn parse(bytes: &[u8], origin: &str) -> Result<Vec<TokenRecord>> {
    let f: TokenFile = crate::util::redact::from_json(bytes)
        .map_err(|why| anyhow::anyhow!("{origin}: not a valid token file ({why}); restore it from a backup, or remove it and create the tokens again"))?;
    if f.format != FORMAT {
        bail!("{origin}: unsupported format {:?} (expected {FORMAT:?})", f.format);
    }
    let mut ids = std::collections::HashSet::new();
    for (i, t) in f.tokens.iter().enumerate() {
        let at = format!("{origin}: token {}", i + 1);
        if !is_hex(&t.id, 8) {
            bail!("{at}: id is not 8 lower-case hex digits");
        }
        if !ids.insert(t.id.as_str()) {
            bail!("{at}: id {} appears twice", t.id);
        }
        if !is_hex(&t.sha256, 64) {
            bail!("{at} ({}): sha256 is not 64 lower-case hex digits", t.id);
        }
        if !crate::data::is_valid_tenant_id(&t.tenant) {
            bail!("{at} ({}): invalid tenant id {}", t.id, crate::data::show_tenant(&t.tenant));
        }
        if t.name.len() > 200 || t.name.chars().any(char::is_control) {
            bail!("{at} ({}): name is longer than 200 bytes or holds control characters", t.id);
        }
    }
    Ok(f.tokens)
}

fn save(dagrun_dir: &Path, tokens: &[TokenRecord]) -> Result<()> {
    let f = TokenFile { format: FORMAT.into(), tokens: tokens.to_vec() };
    let mut b = serde_json::to_vec_pretty(&f)?;
    b.push(b'\n');
    crate::util::atomic::write_atomic_mode(&tokens_path(dagrun_dir), &b, 0o600)
}

/// Create a token for `tenant`; returns its record and the token (shown once).
/// The caller holds the workspace lock.
pub fn create(dagrun_dir: &Path, tenant: &str, name: &str, expires_in_days: Option<f64>) -> Result<(TokenRecord, String)> {
    if !crate::data::is_valid_tenant_id(tenant) {
        return Err(crate::error::config(format!("invalid tenant id {}; a tenant id is 1-64 characters of A-Z a-z 0-9 _ -", crate::data::show_tenant(tenant))));
    }
    if name.len() > 200 || name.chars().any(char::is_control) {
        return Err(crate::error::config("--name: at most 200 bytes, no control characters"));
    }
    let created = Utc::now();
    let expires = match expires_in_days {
        None => None,
        Some(d) if d.is_finite() && d > 0.0 && d <= 36_500.0 => Some(created + chrono::Duration::milliseconds((d * 86_400_000.0) as i64)),
        Some(d) => return Err(crate::error::config(format!("--expires-in {d}: give a number of days above 0, at most 36500"))),
    };
    let mut tokens = load(dagrun_dir)?;
    let secret = random_bytes::<32>()?;
    let token = format!("{PREFIX}{}", hex::encode(secret));
    let id = loop {
        let id = hex::encode(random_bytes::<4>()?);
        if !tokens.iter().any(|t| t.id == id) {
            break id;
        }
    };
    let rec = TokenRecord { id, tenant: tenant.into(), name: name.into(), created, expires, revoked: None, sha256: hex::encode(digest(token.as_bytes())) };
    tokens.push(rec.clone());
    save(dagrun_dir, &tokens)?;
    Ok((rec, token))
}

/// Revoke token `id`. The caller holds the workspace lock.
pub fn revoke(dagrun_dir: &Path, id: &str) -> Result<TokenRecord> {
    let mut tokens = load(dagrun_dir)?;
    let Some(t) = tokens.iter_mut().find(|t| t.id == id) else {
        return Err(crate::error::config(format!("no token with id {}; see `dagrun tokens list`", crate::data::show_tenant(id))));
    };
    if t.revoked.is_none() {
        t.revoked = Some(Utc::now());
    }
    let out = t.clone();
    save(dagrun_dir, &tokens)?;
    Ok(out)
}

/// Last-use times by token id (empty when unknown or unreadable: it is
/// informational only).
pub fn last_used(dagrun_dir: &Path) -> BTreeMap<String, DateTime<Utc>> {
    crate::util::read_capped(&last_used_path(dagrun_dir), MAX_FILE)
        .ok()
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, DateTime<Utc>>>(&b).ok())
        .map(|m| m.into_iter().filter(|(k, _)| is_hex(k, 8)).collect())
        .unwrap_or_default()
}

/// Merge `seen` into the last-used file (keeping the later time per id).
pub fn record_last_used(dagrun_dir: &Path, seen: &BTreeMap<String, DateTime<Utc>>) -> Result<()> {
    let mut all = last_used(dagrun_dir);
    for (k, v) in seen {
        let e = all.entry(k.clone()).or_insert(*v);
        if *v > *e {
            *e = *v;
        }
    }
    let b = serde_json::to_vec_pretty(&all)?;
    crate::util::atomic::write_atomic_with(&last_used_path(dagrun_dir), &b, crate::util::atomic::Durability::Verified)
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use rand::TryRng;
    let mut b = [0u8; N];
    rand::rngs::SysRng.try_fill_bytes(&mut b).context("the operating system's random number generator failed; cannot create a token")?;
    Ok(b)
}

/// The tokens in memory, ready to check presented tokens.
#[derive(Debug, Default)]
pub struct TokenSet {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    rec: TokenRecord,
    digest: [u8; 32],
    used: std::sync::atomic::AtomicI64,
    caller: Caller,
}

/// Who a valid token belongs to: shared strings, so that a request names
/// its tenant and token without copying them.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: std::sync::Arc<str>,
    pub token_id: std::sync::Arc<str>,
}

/// Why a presented token was refused (all map to 401; kept apart for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Unknown,
    Revoked,
    Expired,
}

impl TokenSet {
    pub fn new(records: Vec<TokenRecord>) -> TokenSet {
        let entries = records
            .into_iter()
            .map(|r| {
                let mut d = [0u8; 32];
                // Shapes were checked by `parse`.
                let _ = hex::decode_to_slice(&r.sha256, &mut d);
                let caller = Caller { tenant: r.tenant.as_str().into(), token_id: r.id.as_str().into() };
                Entry { rec: r, digest: d, used: std::sync::atomic::AtomicI64::new(0), caller }
            })
            .collect();
        TokenSet { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, token: &[u8], now: DateTime<Utc>) -> std::result::Result<&Entry, Refusal> {
        if token.is_empty() {
            return Err(Refusal::Missing);
        }
        let d = digest(token);
        let mut found = None;
        for e in &self.entries {
            if ct_eq(&d, &e.digest) {
                found = Some(e);
            }
        }
        let e = found.ok_or(Refusal::Unknown)?;
        if e.rec.revoked.is_some() {
            return Err(Refusal::Revoked);
        }
        if e.rec.expires.is_some_and(|x| x <= now) {
            return Err(Refusal::Expired);
        }
        let t = now.timestamp();
        // One store per second per token, not per request (a shared cache line).
        if e.used.load(std::sync::atomic::Ordering::Relaxed) != t {
            e.used.store(t, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(e)
    }

    /// The record of a presented token, if it is valid at `now`.
    pub fn check(&self, token: &[u8], now: DateTime<Utc>) -> std::result::Result<&TokenRecord, Refusal> {
        self.find(token, now).map(|e| &e.rec)
    }

    /// The tenant and id of a presented token, if it is valid at `now`
    /// (the same check as [`TokenSet::check`]).
    pub fn caller(&self, token: &[u8], now: DateTime<Utc>) -> std::result::Result<&Caller, Refusal> {
        self.find(token, now).map(|e| &e.caller)
    }

    /// Tokens used since this set was loaded: id and last use.
    pub fn used(&self) -> BTreeMap<String, DateTime<Utc>> {
        self.entries
            .iter()
            .filter_map(|e| {
                let t = e.used.load(std::sync::atomic::Ordering::Relaxed);
                (t > 0).then(|| DateTime::from_timestamp(t, 0).map(|d| (e.rec.id.clone(), d))).flatten()
            })
            .collect()
    }

    /// The tenants that have at least one token.
    pub fn tenants(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.iter().map(|e| e.rec.tenant.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_check_revoke_expire() {
        let d = tempfile::tempdir().unwrap();
        let (rec, tok) = create(d.path(), "Tenant_A", "ci", None).unwrap();
        assert!(tok.starts_with("dgr_") && tok.len() == 68);
        let text = std::fs::read_to_string(tokens_path(d.path())).unwrap();
        assert!(!text.contains(&tok[4..]), "the token is stored in clear");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(tokens_path(d.path())).unwrap().permissions().mode() & 0o777, 0o600);
        let set = TokenSet::new(load(d.path()).unwrap());
        let now = Utc::now();
        assert_eq!(set.check(tok.as_bytes(), now).unwrap().tenant, "Tenant_A");
        assert_eq!(set.check(b"", now).unwrap_err(), Refusal::Missing);
        let mut bad = tok.clone().into_bytes();
        bad[10] ^= 1;
        assert_eq!(set.check(&bad, now).unwrap_err(), Refusal::Unknown);
        assert_eq!(set.check(&now.to_rfc3339().into_bytes(), now).unwrap_err(), Refusal::Unknown);
        revoke(d.path(), &rec.id).unwrap();
        let set = TokenSet::new(load(d.path()).unwrap());
        assert_eq!(set.check(tok.as_bytes(), now).unwrap_err(), Refusal::Revoked);
        let (_, tok2) = create(d.path(), "Tenant_B", "", Some(1.0)).unwrap();
        let set = TokenSet::new(load(d.path()).unwrap());
        assert!(set.check(tok2.as_bytes(), now).is_ok());
        assert_eq!(set.check(tok2.as_bytes(), now + chrono::Duration::days(2)).unwrap_err(), Refusal::Expired);
        assert!(revoke(d.path(), "nope").is_err());
        assert!(create(d.path(), "../x", "", None).is_err());
    }

    #[test]
    fn hostile_token_files_are_refused() {
        for bad in [
            &b"{"[..],
            br#"{"format":"x","tokens":[]}"#,
            br#"{"format":"dagrun-tokens/1","tokens":[{"id":"../../x","tenant":"A","name":"","created":"2026-01-01T00:00:00Z","expires":null,"revoked":null,"sha256":"00"}]}"#,
        ] {
            assert!(parse(bad, "t.json").unwrap_err().to_string().contains("t.json"));
        }
    }
}
