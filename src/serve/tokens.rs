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
//!   checked (id and hash shapes, tenant id rules, timestamps), and the
//!   whole file authenticated: it is a record (`workspace::record`, domain
//!   [`TOKENS_DOMAIN`]) whose MAC, under the workspace integrity key, covers
//!   every token's tenant, hash, expiry and revocation. Whoever can write
//!   `.dagrun/` but holds no master key cannot add a token, move one to
//!   another tenant, or lift a revocation or an expiry. Each write gives the
//!   file a `generation` above the previous one's and at least the time of
//!   the write in microseconds, so a file made anew (after the old one was
//!   removed) is newer than any before it; a running server refuses a file
//!   older than the one it holds (a copy restored to un-revoke a token).
//!   Across a restart the server cannot tell an old sealed file from the
//!   current one: keep `.dagrun/` writable by its owner only.
//! - A file of the unsealed format 1 (dagrun before the MAC) is refused by
//!   every command and the server, for good: nothing can vouch for its
//!   tokens (one may have been added, or a revocation lifted, after the
//!   upgrade), so it is removed and the tokens created again.
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
const FORMAT: &str = "dagrun-tokens/2";
/// The unsealed format of dagrun before the token file had a MAC.
const FORMAT_UNSEALED: &str = "dagrun-tokens/1";
/// The record domain of the token file.
pub const TOKENS_DOMAIN: &str = "dagrun-record/tokens/1";
const PREFIX: &str = "dgr_";
const MAX_FILE: u64 = 16 << 20;
/// Longest token name (`--name`), in bytes.
const MAX_NAME_BYTES: usize = 200;

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
    /// Raised by every write: a server refuses to go back to an older file.
    #[serde(default)]
    generation: u64,
    tokens: Vec<TokenRecord>,
}

/// The verified token file: its tokens and its generation.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    pub generation: u64,
    pub tokens: Vec<TokenRecord>,
}

/// Path of the token file of the workspace whose `.dagrun/` is `dagrun_dir`.
pub fn tokens_path(dagrun_dir: &Path) -> PathBuf {
    dagrun_dir.join(TOKENS_FILE)
}

/// Path of the last-used file.
pub fn last_used_path(dagrun_dir: &Path) -> PathBuf {
    dagrun_dir.join(LAST_USED_FILE)
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

/// The token file's bytes (None when absent).
fn read_file(dagrun_dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = tokens_path(dagrun_dir);
    // `read_capped` refuses a non-regular or oversized file (`InvalidData`).
    match crate::util::read_capped(&path, MAX_FILE) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            bail!("{} is not a regular file of a sensible size; remove it and create the tokens again", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Read and verify the token file (empty when absent) under the workspace
/// integrity key.
pub fn load(dagrun_dir: &Path, key: &crate::crypto::IntegrityKey) -> Result<Tokens> {
    let Some(bytes) = read_file(dagrun_dir)? else { return Ok(Tokens::default()) };
    parse(&bytes, &tokens_path(dagrun_dir).display().to_string(), key)
}

/// Parse and check a sealed token file: its MAC must verify under `key`.
fn parse(bytes: &[u8], origin: &str, key: &crate::crypto::IntegrityKey) -> Result<Tokens> {
    let format = serde_json::from_slice::<serde_json::Value>(bytes).ok().and_then(|v| v.get("format").and_then(|f| f.as_str()).map(str::to_string));
    if format.as_deref() == Some(FORMAT_UNSEALED) {
        bail!(
            "{origin} was written by a dagrun older than the token file's MAC: nothing vouches for its tokens (anyone who could write .dagrun/ \
             may have added one or lifted a revocation). Remove it and create the tokens again (`dagrun tokens create`)"
        );
    }
    let f: TokenFile = crate::workspace::record::open(Some(key), TOKENS_DOMAIN, bytes, origin)
        .map_err(|e| anyhow::anyhow!("{e}: its tokens are not trusted (restore it from a backup, or remove it and create the tokens again)"))?;
    if f.format != FORMAT {
        bail!("{origin}: unsupported format {:?} (expected {FORMAT:?})", f.format);
    }
    let mut ids = std::collections::HashSet::new();
    for (i, t) in f.tokens.iter().enumerate() {
        let at = format!("{origin}: token {}", i + 1);
        if !crate::util::is_lower_hex(&t.id, 8) {
            bail!("{at}: id is not 8 lower-case hex digits");
        }
        if !ids.insert(t.id.as_str()) {
            bail!("{at}: id {} appears twice", t.id);
        }
        if !crate::util::is_lower_hex(&t.sha256, 64) {
            bail!("{at} ({}): sha256 is not 64 lower-case hex digits", t.id);
        }
        if !crate::data::is_valid_tenant_id(&t.tenant) {
            bail!("{at} ({}): invalid tenant id {}", t.id, crate::data::show_tenant(&t.tenant));
        }
        if !crate::util::is_plain_label(&t.name, MAX_NAME_BYTES) {
            bail!("{at} ({}): name is longer than {MAX_NAME_BYTES} bytes or holds control characters", t.id);
        }
    }
    Ok(Tokens { generation: f.generation, tokens: f.tokens })
}

/// Seal and write the token file, of a generation above `previous` and at
/// least the time now in microseconds (see the module's rules).
fn save(dagrun_dir: &Path, key: &crate::crypto::IntegrityKey, previous: u64, tokens: &[TokenRecord]) -> Result<()> {
    let now = u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0);
    let f = TokenFile { format: FORMAT.into(), generation: previous.saturating_add(1).max(now), tokens: tokens.to_vec() };
    let mut b = serde_json::to_vec_pretty(&crate::workspace::record::seal_value(key, TOKENS_DOMAIN, &f)?)?;
    b.push(b'\n');
    crate::util::atomic::write_atomic_mode(&tokens_path(dagrun_dir), &b, 0o600)
}

/// Create a token for `tenant`; returns its record and the token (shown once).
/// The caller holds the workspace lock.
pub fn create(dagrun_dir: &Path, key: &crate::crypto::IntegrityKey, tenant: &str, name: &str, expires_in_days: Option<f64>) -> Result<(TokenRecord, String)> {
    if !crate::data::is_valid_tenant_id(tenant) {
        return Err(crate::error::config(format!("invalid tenant id {}; a tenant id is 1-64 characters of A-Z a-z 0-9 _ -", crate::data::show_tenant(tenant))));
    }
    if !crate::util::is_plain_label(name, MAX_NAME_BYTES) {
        return Err(crate::error::config(format!("--name: at most {MAX_NAME_BYTES} bytes, no control characters")));
    }
    let created = Utc::now();
    let expires = match expires_in_days {
        None => None,
        Some(d) if d.is_finite() && d > 0.0 && d <= 36_500.0 => Some(created + chrono::Duration::milliseconds((d * 86_400_000.0) as i64)),
        Some(d) => return Err(crate::error::config(format!("--expires-in {d}: give a number of days above 0, at most 36500"))),
    };
    let Tokens { generation, mut tokens } = load(dagrun_dir, key)?;
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
    save(dagrun_dir, key, generation, &tokens)?;
    Ok((rec, token))
}

/// Revoke token `id`. The caller holds the workspace lock.
pub fn revoke(dagrun_dir: &Path, key: &crate::crypto::IntegrityKey, id: &str) -> Result<TokenRecord> {
    let Tokens { generation, mut tokens } = load(dagrun_dir, key)?;
    let Some(t) = tokens.iter_mut().find(|t| t.id == id) else {
        return Err(crate::error::config(format!("no token with id {}; see `dagrun tokens list`", crate::data::show_tenant(id))));
    };
    if t.revoked.is_none() {
        t.revoked = Some(Utc::now());
    }
    let out = t.clone();
    save(dagrun_dir, key, generation, &tokens)?;
    Ok(out)
}

/// Last-use times by token id (empty when unknown or unreadable: it is
/// informational only).
pub fn last_used(dagrun_dir: &Path) -> BTreeMap<String, DateTime<Utc>> {
    crate::util::read_capped(&last_used_path(dagrun_dir), MAX_FILE)
        .ok()
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, DateTime<Utc>>>(&b).ok())
        .map(|m| m.into_iter().filter(|(k, _)| crate::util::is_lower_hex(k, 8)).collect())
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

    /// Tokens that would be accepted at `now` (neither revoked nor expired).
    pub fn usable(&self, now: DateTime<Utc>) -> usize {
        self.entries.iter().filter(|e| e.rec.revoked.is_none() && e.rec.expires.is_none_or(|x| x > now)).count()
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
    use crate::crypto::IntegrityKey;

    fn key() -> IntegrityKey {
        IntegrityKey::from_bytes([7; 32])
    }

    #[test]
    fn create_check_revoke_expire() {
        let d = tempfile::tempdir().unwrap();
        let k = key();
        let (rec, tok) = create(d.path(), &k, "Tenant_A", "ci", None).unwrap();
        let mut generations = vec![load(d.path(), &k).unwrap().generation];
        assert!(tok.starts_with("dgr_") && tok.len() == 68);
        let text = std::fs::read_to_string(tokens_path(d.path())).unwrap();
        assert!(!text.contains(&tok[4..]), "the token is stored in clear");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(tokens_path(d.path())).unwrap().permissions().mode() & 0o777, 0o600);
        let set = TokenSet::new(load(d.path(), &k).unwrap().tokens);
        let now = Utc::now();
        assert_eq!(set.check(tok.as_bytes(), now).unwrap().tenant, "Tenant_A");
        assert_eq!(set.check(b"", now).unwrap_err(), Refusal::Missing);
        let mut bad = tok.clone().into_bytes();
        bad[10] ^= 1;
        assert_eq!(set.check(&bad, now).unwrap_err(), Refusal::Unknown);
        assert_eq!(set.check(&now.to_rfc3339().into_bytes(), now).unwrap_err(), Refusal::Unknown);
        revoke(d.path(), &k, &rec.id).unwrap();
        generations.push(load(d.path(), &k).unwrap().generation);
        let set = TokenSet::new(load(d.path(), &k).unwrap().tokens);
        assert_eq!(set.check(tok.as_bytes(), now).unwrap_err(), Refusal::Revoked);
        let (_, tok2) = create(d.path(), &k, "Tenant_B", "", Some(1.0)).unwrap();
        let t = load(d.path(), &k).unwrap();
        assert!(t.generation > generations[1] && generations[1] > generations[0], "each write raises the generation: {generations:?} {}", t.generation);
        // A file made anew (the old one removed) is newer than any before it.
        let before = t.generation;
        std::fs::remove_file(tokens_path(d.path())).unwrap();
        create(d.path(), &k, "Tenant_B", "", None).unwrap();
        assert!(load(d.path(), &k).unwrap().generation > before);
        let set = TokenSet::new(t.tokens);
        assert!(set.check(tok2.as_bytes(), now).is_ok());
        assert_eq!(set.check(tok2.as_bytes(), now + chrono::Duration::days(2)).unwrap_err(), Refusal::Expired);
        assert!(revoke(d.path(), &k, "nope").is_err());
        assert!(create(d.path(), &k, "../x", "", None).is_err());
    }

    #[test]
    fn hostile_token_files_are_refused() {
        for bad in [
            &b"{"[..],
            br#"{"format":"x","tokens":[]}"#,
            br#"{"format":"dagrun-tokens/1","tokens":[{"id":"../../x","tenant":"A","name":"","created":"2026-01-01T00:00:00Z","expires":null,"revoked":null,"sha256":"00"}]}"#,
        ] {
            assert!(parse(bad, "t.json", &key()).unwrap_err().to_string().contains("t.json"));
        }
    }

    /// Whoever can write `.dagrun/` but has no master key cannot add a
    /// token, move one to another tenant, lift a revocation or an expiry.
    #[test]
    fn a_token_file_edited_outside_dagrun_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let k = key();
        let (rec, tok) = create(d.path(), &k, "Tenant_A", "ci", Some(1.0)).unwrap();
        revoke(d.path(), &k, &rec.id).unwrap();
        let good = std::fs::read_to_string(tokens_path(d.path())).unwrap();
        let forged = format!("dgr_{}", "ab".repeat(32));
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        let edits: Vec<Box<dyn Fn(&mut serde_json::Value)>> = vec![
            Box::new(|v| v["tokens"][0]["tenant"] = "Tenant_B".into()),
            Box::new(|v| v["tokens"][0]["revoked"] = serde_json::Value::Null),
            Box::new(|v| v["tokens"][0]["expires"] = serde_json::Value::Null),
            Box::new(move |v| {
                let mut t = v["tokens"][0].clone();
                t["id"] = "0badc0de".into();
                t["revoked"] = serde_json::Value::Null;
                t["sha256"] = hex::encode(digest(forged.as_bytes())).into();
                v["tokens"].as_array_mut().unwrap().push(t);
            }),
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("mac");
            }),
        ];
        for edit in &edits {
            let mut e = v.clone();
            edit(&mut e);
            std::fs::write(tokens_path(d.path()), serde_json::to_vec_pretty(&e).unwrap()).unwrap();
            let err = load(d.path(), &k).unwrap_err().to_string();
            assert!(err.contains("modified outside dagrun") && err.contains("not trusted"), "{err}");
        }
        // Another workspace's key does not open it either.
        std::fs::write(tokens_path(d.path()), &good).unwrap();
        assert!(load(d.path(), &IntegrityKey::from_bytes([8; 32])).is_err());
        assert!(load(d.path(), &k).is_ok());
        // An unsealed file (format 1, or one made to look so, with a
        // revocation lifted) is refused for good.
        v["format"] = "dagrun-tokens/1".into();
        v.as_object_mut().unwrap().remove("mac");
        v.as_object_mut().unwrap().remove("generation");
        v["tokens"][0]["revoked"] = serde_json::Value::Null;
        std::fs::write(tokens_path(d.path()), serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        let err = load(d.path(), &k).unwrap_err().to_string();
        assert!(err.contains("older than the token file's MAC") && err.contains("create the tokens again"), "{err}");
        assert!(create(d.path(), &k, "Tenant_A", "", None).is_err() && revoke(d.path(), &k, &rec.id).is_err());
        assert_eq!(TokenSet::new(vec![]).check(tok.as_bytes(), Utc::now()).unwrap_err(), Refusal::Unknown);
    }
}
