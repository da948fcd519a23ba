//! The per-tenant keyring: data keys (versioned, rotatable) and one pseudonym key
//! per tenant, stored only wrapped under a master key-encryption key.
//!
//! # Files
//! - `<workspace>/.dagrun/keys/keyring.json` — wrapped keys and metadata, mode 0600,
//!   rewritten atomically on every change (directory `.dagrun/keys` is created 0700).
//! - `<workspace>/.dagrun/keys/audit.jsonl` — the hash-chained log of every key
//!   operation (see [`super::audit`]).
//! - `<workspace>/.dagrun/keys/keyring.lock` — empty; its exclusive `flock` is
//!   held around every change of `keyring.json` (see "Changes").
//! - `<workspace>/.dagrun/keys/forgetting.json` — `{"tenant", "started_at"}`
//!   while a `keys forget` runs: written (durably) before its keyring commit,
//!   removed after. One left by a killed forget whose tenant the keyring has
//!   not forgotten is an erasure that did not happen: every run warns, and
//!   `verify` and `keys audit --verify` report it, until `keys forget` is run
//!   again ([`unfinished_forget`]; review 68: the killed forget was seen
//!   only in the audit log's last line). No key material.
//! - The master key comes from one of the sources of [`super::master`] (a file, the
//!   environment, or a PKCS#11 token); the keyring records which kind (`master`).
//!
//! # Wrapping
//! Each key is stored as hex of `nonce(12) || AES-256-GCM(master, key)(32) || tag(16)`
//! with associated data `"dagrun/keywrap/v1|" + tenant + "|" + key_id`, so a
//! wrapped key copied to another tenant or id does not unwrap. With a PKCS#11 master
//! the same AES-GCM runs inside the token (`CKM_AES_GCM`), or, on a token without
//! AES-GCM, AES key wrap with padding (`CKM_AES_KEY_WRAP_PAD`, the associated data
//! bound inside the wrapped value; see [`super::master`]). Each stored key records
//! its `mechanism` (absent in keyrings written before: AES-GCM), and is unwrapped
//! with it; `master.mechanism` is what new keys get. A mechanism this dagrun does
//! not know is refused when the keyring is read. The file also holds `key_check`
//! (see [`super::master`]), which tells "wrong master key" apart from a damaged
//! keyring without trying keys.
//!
//! # Rewrapping (moving to another master key)
//! [`Keyring::rewrap`] unwraps every key with the old master and wraps it with the
//! new one into a complete new keyring, then replaces `keyring.json` in one atomic
//! rename: until that instant the old keyring (old master) is the valid one, from it
//! the new one. No data is re-encrypted; key ids and bytes do not change.
//!
//! # Changes
//! Other processes change `keyring.json` too: the jobs of a Slurm run are
//! `exec-stage` processes, each with its own copy, creating their tenants'
//! first keys at the same time. So every change (a tenant's first keys, a
//! rotation, a forget) is a read-modify-write under the exclusive lock of
//! `keyring.lock`, on the file read again inside it: no process writes back a
//! copy that lacks another's keys, and a key another process made is used,
//! never made a second time. A key id this process does not hold is looked up
//! in the file again before it is called unknown.
//!
//! # Crypto-shredding
//! [`Keyring::forget`] removes every wrapped key of a tenant from the file and leaves
//! a tombstone; later requests for that tenant fail with [`KeyError::Forgotten`] and
//! never create new keys. Copies of an older `keyring.json` (backups) still hold the
//! wrapped keys, readable only together with the master key.

use super::audit::AuditLog;
use super::keys::{DataKey, PseudonymKey};
use super::master::file::check_private;
use super::master::{KNOWN_MECHANISMS, Master, MasterRecord, Pkcs11Uri};
use super::{escape_for_message, validate_tenant, wipe};
use crate::util::atomic::write_atomic_mode;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

pub use super::master::{ENV_MASTER_KEY, ENV_MASTER_KEY_FILE, ENV_MASTER_KEY_URI, MasterKeySource, default_master_key_path};

/// The lock file of keyring changes, beside `keyring.json`.
const KEYRING_LOCK_FILE: &str = "keyring.lock";
/// `format` value of the keyring file.
pub const KEYRING_FORMAT: &str = "dagrun-keyring/v1";
const WRAP_AAD_PREFIX: &str = "dagrun/keywrap/v1|";

/// `<workspace>/.dagrun/keys`
pub fn keys_dir(workspace: &Path) -> PathBuf {
    workspace.join(".dagrun").join("keys")
}

/// `<workspace>/.dagrun/keys/keyring.json`
pub fn keyring_path(workspace: &Path) -> PathBuf {
    keys_dir(workspace).join("keyring.json")
}

/// The marker of a `keys forget` under way, beside the keyring (module doc, "Files").
const FORGETTING_FILE: &str = "forgetting.json";

fn forgetting_path(workspace: &Path) -> PathBuf {
    keys_dir(workspace).join(FORGETTING_FILE)
}

/// What to say about [`unfinished_forget`]'s answer (a run's warning,
/// `verify`'s problem).
pub fn unfinished_forget_message(workspace: &Path, (tenant, at): &(String, String)) -> String {
    if tenant.starts_with('(') {
        return format!(
            "{} is not a marker dagrun wrote: a `dagrun keys forget` may not have finished; check `dagrun keys audit` and run the forget again",
            forgetting_path(workspace).display()
        );
    }
    format!(
        "`dagrun keys forget {tenant}` started at {at} did not finish: {tenant}'s keys were NOT destroyed and runs still use them; run `dagrun keys forget {tenant}` again"
    )
}

/// A `keys forget` that started and did not finish: its tenant and when it
/// started, unless the keyring has forgotten the tenant since (the commit
/// happened; only the marker's removal was cut short). The marker is read as
/// untrusted input (bounded; a tenant id checked); one that does not parse is
/// reported as such, naming the file.
pub fn unfinished_forget(workspace: &Path, forgotten: impl Fn(&str) -> bool) -> Option<(String, String)> {
    forget_marker(&forgetting_path(workspace), forgotten)
}

/// [`unfinished_forget`] of the marker at `p`.
fn forget_marker(p: &Path, forgotten: impl Fn(&str) -> bool) -> Option<(String, String)> {
    let bytes = crate::util::read_capped(p, 4096).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let tenant = v.get("tenant").and_then(|t| t.as_str()).filter(|t| validate_tenant(t).is_ok());
    let at = v.get("started_at").and_then(|t| t.as_str()).filter(|t| t.len() <= 64 && t.chars().all(|c| c.is_ascii_graphic()));
    match (tenant, at) {
        (Some(t), _) if forgotten(t) => None,
        (Some(t), at) => Some((t.to_string(), at.unwrap_or("?").to_string())),
        _ => Some(("(unreadable marker)".to_string(), p.display().to_string())),
    }
}

/// Temporary files a killed key operation left in `.dagrun/keys/` (an
/// unfinished atomic write of the keyring, its audit log or the master key):
/// each may be a whole keyring holding keys that a later `keys forget`
/// destroyed, so it must not outlive the operation. Removed under the
/// workspace lock by every key command and every run that sweeps; `verify`
/// reports them.
pub fn stale_copies(workspace: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(keys_dir(workspace)) else { return Vec::new() };
    // Not the audit head's: it holds no key, and a `keys export` (which takes
    // no workspace lock) may be writing it now (the audit append removes a
    // killed writer's, under the log's lock).
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            crate::util::atomic::is_temp_name(&name) && !crate::crypto::audit::is_head_temp(&name)
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Remove [`stale_copies`] (the caller holds the workspace lock); the ones
/// that could not be removed.
pub fn remove_stale_copies(workspace: &Path) -> Vec<PathBuf> {
    stale_copies(workspace).into_iter().filter(|p| crate::util::fs_remove(p).is_err()).collect()
}

/// Key ids for an audit line: comma-separated, `-` for none.
fn shown_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<&str> = ids.into_iter().collect();
    if v.is_empty() { "-".to_string() } else { v.join(",") }
}

/// Key errors a caller may want to tell apart (downcast from `anyhow::Error`).
/// Messages never contain key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The tenant was crypto-shredded with `dagrun keys forget`.
    #[error(
        "tenant {tenant}'s keys were destroyed on {at} (dagrun keys forget); its encrypted data can no \
         longer be decrypted. Remove {tenant} from config/tenants.yaml (and its rows from the input data) \
         to run without it"
    )]
    Forgotten { tenant: String, at: String },
    /// The master key's check value does not match the keyring's.
    #[error(
        "the master key (from {source_desc}) does not open the keyring at {keyring}: it is not the key \
         these data keys were wrapped with{recorded}. Set DAGRUN_MASTER_KEY_URI to the PKCS#11 URI of the right \
         key, or DAGRUN_MASTER_KEY to the right key (64 hex characters) or DAGRUN_MASTER_KEY_FILE to the file \
         holding it; do not delete or overwrite the keyring, the tenants' encrypted data can only be decrypted \
         with the keys in it"
    )]
    WrongMasterKey {
        source_desc: String,
        keyring: String,
        /// What the keyring says about its master (e.g. the PKCS#11 URI), or "".
        recorded: String,
    },
    /// No data key with that id for that tenant.
    #[error(
        "tenant {tenant} has no data key {key_id} in the keyring at {keyring} (it has: {known}): the data \
         was encrypted with another workspace's keyring, or this keyring was restored from an older backup"
    )]
    UnknownKey { tenant: String, key_id: String, keyring: String, known: String },
    /// A tenant id outside `[A-Za-z0-9_-]{1,64}`.
    #[error(
        "invalid tenant id \"{shown}\" ({len} characters): a tenant id is 1 to 64 characters of A-Z, a-z, \
         0-9, '_' and '-'; fix it in config/tenants.yaml"
    )]
    InvalidTenant { shown: String, len: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    Data,
    Pseudonym,
}

/// State of a key in [`KeyInfo`]. Only one data key per tenant is active;
/// retired keys still decrypt; destroyed keys are gone (tenant forgotten).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Retired,
    Destroyed,
}

/// Metadata of one key, never its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub tenant: String,
    pub key_id: String,
    pub kind: KeyKind,
    /// RFC 3339 UTC.
    pub created: String,
    pub state: KeyState,
}

// ---- on-disk format ------------------------------------------------------------

#[derive(Clone, Serialize, Deserialize)]
struct KeyringFile {
    format: String,
    key_check: String,
    /// Which kind of master key wraps the keys (absent in keyrings written before
    /// PKCS#11 support: a file key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    master: Option<MasterRecord>,
    #[serde(default)]
    tenants: BTreeMap<String, TenantEntry>,
    #[serde(default)]
    forgotten: Vec<Tombstone>,
    /// The workspace integrity key carried over a master-key rewrap, wrapped
    /// like a tenant key (AAD owner part [`INTEGRITY_OWNER`]); see
    /// [`Keyring::integrity_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    integrity: Option<StoredKey>,
}

/// Owner part of the stored integrity key's wrapping AAD (not a valid tenant id).
const INTEGRITY_OWNER: &str = "@workspace";
/// Id of the stored integrity key.
const INTEGRITY_ID: &str = "integrity-1";

#[derive(Clone, Default, Serialize, Deserialize)]
struct TenantEntry {
    #[serde(default)]
    data_keys: Vec<StoredKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pseudonym_key: Option<StoredKey>,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredKey {
    id: String,
    created: String,
    state: KeyState,
    /// hex of the wrapped key (format by `mechanism`, see `crypto::master`)
    wrapped: String,
    /// How it was wrapped: `AES-256-GCM`, `CKM_AES_GCM` or `CKM_AES_KEY_WRAP_PAD`
    /// (absent in keyrings written before it was recorded: AES-GCM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mechanism: Option<String>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Tombstone {
    tenant: String,
    forgotten_at: String,
    #[serde(default)]
    destroyed_keys: Vec<DestroyedKey>,
    /// MAC under the workspace integrity key ([`Tombstone::sealed_bytes`]):
    /// a tombstone only this workspace's `keys forget` can make. Runs refuse
    /// any tombstone's tenant; `gc` deletes data only of a sealed one whose
    /// tenant has no keys left (helper-73: a line added to keyring.json
    /// without the key had gc wipe a live tenant). Absent in keyrings of
    /// older dagruns: such a tombstone stays unproven (gc removes nothing
    /// of its tenant; its folders are deleted by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal: Option<String>,
}

/// The keyring's tombstones, judged ([`Keyring::erasures`]).
#[derive(Debug, Default, PartialEq)]
pub struct Erasures {
    /// Tenants whose erasure is proven.
    pub proven: Vec<String>,
    /// Tombstones that prove nothing: unsealed (an older dagrun's, or added
    /// to the file by hand), sealed for another folder, or naming a tenant
    /// whose keys are still here; each with whether its keys are (a
    /// tombstone a finished forget did not make: a problem).
    pub unproven: Vec<(String, bool)>,
}

/// MAC domain of a tombstone's seal.
const TOMBSTONE_DOMAIN: &str = "dagrun keyring tombstone v1";

impl Tombstone {
    /// What the seal covers: the workspace (the keyring's folder, so a
    /// tombstone copied from another workspace sharing the master key does
    /// not verify: helper-74), the tenant, the time and the destroyed keys.
    fn sealed_bytes(&self, workspace: &Path) -> Vec<u8> {
        let ids: Vec<&str> = self.destroyed_keys.iter().map(|d| d.id.as_str()).collect();
        format!("{}\n{}\n{}\n{}", workspace.display(), self.tenant, self.forgotten_at, ids.join(",")).into_bytes()
    }

    fn seal_with(&mut self, key: &super::integrity::IntegrityKey, workspace: &Path) {
        self.seal = Some(key.mac(TOMBSTONE_DOMAIN, &self.sealed_bytes(workspace)).to_hex().to_string());
    }

    fn is_sealed(&self, key: &super::integrity::IntegrityKey, workspace: &Path) -> bool {
        self.seal.as_deref().is_some_and(|m| key.verify(TOMBSTONE_DOMAIN, &self.sealed_bytes(workspace), m))
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct DestroyedKey {
    id: String,
    kind: KeyKind,
    created: String,
}

impl TenantEntry {
    fn active_data(&self) -> Option<&StoredKey> {
        self.data_keys.iter().rev().find(|k| k.state == KeyState::Active)
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn ensure_keys_dir(workspace: &Path) -> Result<()> {
    let dagrun = workspace.join(".dagrun");
    fs::create_dir_all(&dagrun).with_context(|| format!("cannot create directory {}", dagrun.display()))?;
    let keys = keys_dir(workspace);
    if !keys.is_dir() {
        let mut b = fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        match b.create(&keys) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create directory {}", keys.display()));
            }
        }
    }
    Ok(())
}

// ---- the keyring ---------------------------------------------------------------

/// Per-tenant keys, wrapped under the master key. `Send + Sync`: every method
/// takes `&self` (state behind a mutex); each change is written to disk
/// atomically before the method returns, then appended to the audit log.
pub struct Keyring {
    path: PathBuf,
    key_check: String,
    master: Master,
    audit: AuditLog,
    /// Authenticates dagrun's records (see `crypto::integrity`).
    integrity: std::sync::Arc<super::integrity::IntegrityKey>,
    state: Mutex<KeyringFile>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("path", &self.path).field("master_key", &format_args!("[redacted] (from {})", self.master.describe())).finish()
    }
}

/// What the keyring records about its master key, read without opening it
/// (`None` when there is no readable keyring or it records nothing).
pub fn recorded_master(workspace: &Path) -> Option<MasterRecord> {
    read_recorded_master(workspace).ok().flatten()
}

/// Like [`recorded_master`], but a keyring that exists and cannot be read (bad
/// JSON, unknown format or mechanism, loose mode) is an error, not "nothing".
pub fn read_recorded_master(workspace: &Path) -> Result<Option<MasterRecord>> {
    let path = keyring_path(workspace);
    if fs::symlink_metadata(&path).is_err() {
        return Ok(None);
    }
    Ok(read_keyring(&path)?.master)
}

/// What [`Keyring::rewrap`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Rewrapped {
    /// This many keys now wrapped under the new master.
    Done(usize),
    /// The keyring was already wrapped under the new master (a resumed rewrap).
    AlreadyDone,
}

impl KeyringFile {
    /// A keyring with no tenant keys yet, under `master` (whose check value is `check`).
    fn empty(check: String, master: &Master) -> KeyringFile {
        KeyringFile {
            format: KEYRING_FORMAT.into(),
            key_check: check,
            master: Some(master.record()),
            tenants: BTreeMap::new(),
            forgotten: Vec::new(),
            integrity: None,
        }
    }
}

impl Keyring {
    /// Open the keyring of `workspace`, taking the master key from the environment,
    /// `config/dagrun.yaml` or the keyring's record (see [`MasterKeySource::resolve`]).
    pub fn open(workspace: &Path) -> Result<Keyring> {
        Self::open_with(workspace, MasterKeySource::resolve(workspace)?)
    }

    /// Open the keyring only if its master key already exists: `Ok(None)` when
    /// the master key would be the default file, `.dagrun/keys/master.key`
    /// does not exist and no key was used here before (a workspace no run
    /// has keyed yet). A key used before but not found now is an error, as in
    /// a run ([`super::master::keyed_before`]: a cron job without
    /// `DAGRUN_MASTER_KEY` is told so, not shown every stage stale). Creates
    /// nothing (read-only commands: `status`, `verify`, `predict`,
    /// `features`, `lineage`).
    pub fn open_existing(workspace: &Path) -> Result<Option<Keyring>> {
        let source = MasterKeySource::resolve(workspace)?;
        if matches!(source, MasterKeySource::Default) && fs::symlink_metadata(super::master::default_master_key_path(workspace)).is_err() {
            return match super::master::keyed_before(workspace) {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let master = Master::open(workspace, &source)?;
        drop(source);
        Self::with_master(workspace, master).map(Some)
    }

    /// The workspace integrity key: the ONE way to get it (see
    /// `crypto::integrity`). Derived from the master key with HKDF-SHA256 and
    /// its own label ([`Master::integrity_key`]: file/env keys and PKCS#11 keys
    /// alike), unless a `keys rewrap` stored the previous one in the keyring.
    pub fn integrity_key(&self) -> std::sync::Arc<super::integrity::IntegrityKey> {
        self.integrity.clone()
    }

    /// Open with an explicit master key source (tests, or callers that already
    /// read the environment). A missing keyring file is an empty keyring.
    pub fn open_with(workspace: &Path, source: MasterKeySource) -> Result<Keyring> {
        ensure_keys_dir(workspace)?;
        let master = Master::open(workspace, &source)?;
        drop(source);
        Self::with_master(workspace, master)
    }

    fn with_master(workspace: &Path, mut master: Master) -> Result<Keyring> {
        let path = keyring_path(workspace);
        let (file, key_check) = if fs::symlink_metadata(&path).is_ok() {
            let file = read_keyring(&path)?;
            if !master.verify_check(&file.key_check)? {
                return Err(KeyError::WrongMasterKey {
                    source_desc: master.describe().to_string(),
                    keyring: path.display().to_string(),
                    recorded: recorded_hint(file.master.as_ref()),
                }
                .into());
            }
            if let Some(rec) = &file.master {
                master.adopt_recorded(&rec.mechanism)?;
            }
            let check = file.key_check.clone();
            (file, check)
        } else {
            let check = master.check_value()?;
            let file = KeyringFile::empty(check.clone(), &master);
            (file, check)
        };
        let integrity = std::sync::Arc::new(integrity_of(&master, &path, file.integrity.as_ref(), &key_check)?);
        Ok(Keyring { path, key_check, master, audit: AuditLog::new(&keys_dir(workspace)), integrity, state: Mutex::new(file) })
    }

    /// Start a workspace's keyring under `source` (`dagrun keys init --master`): a
    /// PKCS#11 key is generated inside the token, non-extractable, when the token
    /// has none with that label. Refused when a keyring with keys exists (use
    /// [`Keyring::rewrap`]). Returns the keyring and whether the key was created.
    /// `accept` sees the integrity key the master key makes before the
    /// keyring is written (the caller checks that the workspace's sealed
    /// records verify under it), or `None` before a key would be generated in
    /// the token; an error from it writes no keyring and generates no key.
    pub fn init(
        workspace: &Path,
        source: MasterKeySource,
        accept: impl FnOnce(Option<&std::sync::Arc<super::integrity::IntegrityKey>>) -> Result<()>,
    ) -> Result<(Keyring, bool)> {
        ensure_keys_dir(workspace)?;
        let path = keyring_path(workspace);
        if fs::symlink_metadata(&path).is_ok() {
            let file = read_keyring(&path)?;
            if !file.tenants.is_empty() || !file.forgotten.is_empty() {
                bail!(
                    "the keyring {} already holds keys; `dagrun keys init` is for a new workspace. To move its keys \
                     to another master key run `dagrun keys rewrap --to URI`",
                    path.display()
                );
            }
        }
        // `accept` sees the new key's integrity key, or `None` before a key
        // would be generated (a fresh key verifies nothing sealed before).
        let mut accept = Some(accept);
        let (master, created) = Master::open_or_create(workspace, &source, &mut || accept.take().map_or(Ok(()), |a| a(None)))?;
        drop(source);
        let audit = AuditLog::new(&keys_dir(workspace));
        let desc = master.describe().to_string();
        if created {
            audit.append("create", "-", "master", &format!("ok: generated non-extractable master key {desc}"))?;
        }
        let check = master.check_value()?;
        let file = KeyringFile::empty(check.clone(), &master);
        let integrity = std::sync::Arc::new(master.integrity_key(&check)?);
        if let Some(a) = accept.take() {
            a(Some(&integrity))?;
        }
        let ring = Keyring { path, key_check: check, master, audit, integrity, state: Mutex::new(file.clone()) };
        let mut g = ring.lock();
        ring.commit(&mut g, file)?;
        drop(g);
        ring.audit.append("init", "-", "keyring", &format!("ok: keyring under {desc}"))?;
        Ok((ring, created))
    }

    /// Re-wrap every key of `workspace` from the master `from` to the master `to`
    /// (file to HSM, or HSM key to a new HSM key). Crash-safe at any instant: the
    /// new keyring is complete before one atomic rename makes it the keyring; a
    /// rerun after an interruption either starts over (the old keyring was still in
    /// place) or finds the work done. The caller holds the workspace lock.
    pub fn rewrap(workspace: &Path, from: MasterKeySource, to: MasterKeySource) -> Result<Rewrapped> {
        ensure_keys_dir(workspace)?;
        let path = keyring_path(workspace);
        if fs::symlink_metadata(&path).is_err() {
            bail!("there is no keyring at {}: nothing to rewrap (use `dagrun keys init --master URI` for a new workspace)", path.display());
        }
        // The new key must exist (made by the HSM's administrator, or `keys init`):
        // a typo in the URI must not silently mint a key nobody backs up.
        let new_master = Master::open(workspace, &to)?;
        drop(to);
        let audit = AuditLog::new(&keys_dir(workspace));
        let file = read_keyring(&path)?;
        if new_master.verify_check(&file.key_check)? {
            audit.append("rewrap", "-", "keyring", &format!("ok: already under {} (resumed)", new_master.describe()))?;
            return Ok(Rewrapped::AlreadyDone);
        }
        let old = Keyring::open_with(workspace, from)?;
        let old_desc = old.master.describe().to_string();
        let new_desc = new_master.describe().to_string();
        let mut new = old.lock().clone();
        let mut moved = Vec::new();
        for (tenant, entry) in new.tenants.iter_mut() {
            let keys = entry.data_keys.iter_mut().chain(entry.pseudonym_key.iter_mut());
            for k in keys {
                let mut bytes = old.unwrap_bytes(tenant, k)?;
                let wrapped = wrap_with(&new_master, tenant, &k.id, &bytes);
                wipe(&mut bytes);
                (k.wrapped, k.mechanism) = wrapped?;
                moved.push((tenant.clone(), k.id.clone()));
            }
        }
        new.key_check = new_master.check_value()?;
        new.master = Some(new_master.record());
        // The integrity key survives the rotation: stored, wrapped under the new master.
        let (wrapped, mechanism) = wrap_with(&new_master, INTEGRITY_OWNER, INTEGRITY_ID, old.integrity.bytes())?;
        new.integrity = Some(StoredKey { id: INTEGRITY_ID.into(), created: now(), state: KeyState::Active, wrapped, mechanism });
        let ring = Keyring {
            integrity: old.integrity.clone(),
            path: path.clone(),
            key_check: new.key_check.clone(),
            master: new_master,
            audit,
            state: Mutex::new(old.lock().clone()),
        };
        drop(old);
        // Logged before the switch, as a forget is: a rewrap stopped after the
        // rename leaves this line (and a rerun logs "resumed").
        ring.audit.append("rewrap", "-", "keyring", &format!("started: {} key(s) from {old_desc} to {new_desc}", moved.len()))?;
        // The switch: one atomic rename.
        let mut g = ring.lock();
        ring.commit(&mut g, new)?;
        drop(g);
        for (tenant, id) in &moved {
            ring.audit.append("rewrap", tenant, id, &format!("ok: from {old_desc} to {new_desc}"))?;
        }
        ring.audit.append("rewrap", "-", "keyring", &format!("ok: {} key(s) from {old_desc} to {new_desc}", moved.len()))?;
        Ok(Rewrapped::Done(moved.len()))
    }

    /// Path of `keyring.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the master key came from: `DAGRUN_MASTER_KEY` or `file PATH`.
    pub fn master_key_source(&self) -> &str {
        self.master.describe()
    }

    /// What the keyring records about its master key.
    pub fn master_record(&self) -> MasterRecord {
        self.lock().master.clone().unwrap_or_else(|| self.master.record())
    }

    /// The tenant's active data key, created and persisted the first time the
    /// tenant is seen. Fails with [`KeyError::Forgotten`] for a forgotten tenant.
    pub fn active_data_key(&self, tenant: &str) -> Result<(String, DataKey)> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        forgotten_check(&g, tenant)?;
        if let Some(k) = g.tenants.get(tenant).and_then(TenantEntry::active_data) {
            let key = self.unwrap_key(tenant, k, DataKey::from_bytes)?;
            return Ok((k.id.clone(), key));
        }
        let _file = self.reload_for(&mut g, tenant)?;
        if let Some(k) = g.tenants.get(tenant).and_then(TenantEntry::active_data) {
            // Another process made it meanwhile.
            let key = self.unwrap_key(tenant, k, DataKey::from_bytes)?;
            return Ok((k.id.clone(), key));
        }
        self.add_data_key_as(&mut g, tenant, "create")
    }

    /// A data key by id; retired keys stay readable.
    pub fn data_key(&self, tenant: &str, key_id: &str) -> Result<DataKey> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        forgotten_check(&g, tenant)?;
        if !g.tenants.get(tenant).is_some_and(|e| e.data_keys.iter().any(|k| k.id == key_id)) {
            // Made by another process since this one read the file?
            let _file = self.reload_for(&mut g, tenant)?;
        }
        self.unwrap_key(tenant, self.stored_data_key(&g, tenant, key_id)?, DataKey::from_bytes)
    }

    /// The stored (wrapped) data key `key_id` of `tenant` in `file`, or the
    /// error naming the keys the tenant has.
    fn stored_data_key<'a>(&self, file: &'a KeyringFile, tenant: &str, key_id: &str) -> Result<&'a StoredKey> {
        let entry = file.tenants.get(tenant);
        entry.and_then(|e| e.data_keys.iter().find(|k| k.id == key_id)).ok_or_else(|| {
            let known: Vec<&str> = entry.map(|e| e.data_keys.iter().map(|k| k.id.as_str()).collect()).unwrap_or_default();
            KeyError::UnknownKey {
                tenant: tenant.into(),
                key_id: escape_for_message(key_id),
                keyring: self.path.display().to_string(),
                known: if known.is_empty() { "no data keys".into() } else { known.join(", ") },
            }
            .into()
        })
    }

    /// Id of the tenant's active data key, created (and persisted) the first time
    /// the tenant is seen, without unwrapping an existing key: what a cache key
    /// needs, at no HSM round trip.
    pub fn active_data_key_id(&self, tenant: &str) -> Result<String> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        forgotten_check(&g, tenant)?;
        if let Some(k) = g.tenants.get(tenant).and_then(TenantEntry::active_data) {
            return Ok(k.id.clone());
        }
        let _file = self.reload_for(&mut g, tenant)?;
        if let Some(k) = g.tenants.get(tenant).and_then(TenantEntry::active_data) {
            return Ok(k.id.clone());
        }
        Ok(self.add_data_key_as(&mut g, tenant, "create")?.0)
    }

    /// Fails with [`KeyError::UnknownKey`] unless the keyring holds data key
    /// `key_id` of `tenant` (nothing is unwrapped).
    pub fn require_data_key(&self, tenant: &str, key_id: &str) -> Result<()> {
        validate_tenant(tenant)?;
        let g = self.lock();
        forgotten_check(&g, tenant)?;
        let entry = g.tenants.get(tenant);
        if entry.is_some_and(|e| e.data_keys.iter().any(|k| k.id == key_id)) {
            return Ok(());
        }
        drop(g);
        self.data_key(tenant, key_id).map(drop)
    }

    /// Id of the tenant's active data key, without creating or unwrapping anything
    /// (`None` if the tenant has no data key yet). Errors for a forgotten tenant.
    pub fn active_key_id(&self, tenant: &str) -> Result<Option<String>> {
        validate_tenant(tenant)?;
        let g = self.lock();
        forgotten_check(&g, tenant)?;
        Ok(g.tenants.get(tenant).and_then(TenantEntry::active_data).map(|k| k.id.clone()))
    }

    /// The tenant's pseudonym (HMAC) key, created on first use; a separate random
    /// key, never rotated with the data key.
    pub fn pseudonym_key(&self, tenant: &str) -> Result<PseudonymKey> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        forgotten_check(&g, tenant)?;
        if let Some(k) = g.tenants.get(tenant).and_then(|e| e.pseudonym_key.as_ref()) {
            return self.unwrap_key(tenant, k, PseudonymKey::from_bytes);
        }
        let _file = self.reload_for(&mut g, tenant)?;
        if let Some(k) = g.tenants.get(tenant).and_then(|e| e.pseudonym_key.as_ref()) {
            return self.unwrap_key(tenant, k, PseudonymKey::from_bytes);
        }
        let mut new = (*g).clone();
        let id = pseudonym_key_id(tenant);
        let key = PseudonymKey::generate()?;
        let (wrapped, mechanism) = self.wrap_key(tenant, &id, key.bytes())?;
        let stored = StoredKey { id: id.clone(), created: now(), state: KeyState::Active, wrapped, mechanism };
        new.tenants.entry(tenant.to_string()).or_default().pseudonym_key = Some(stored);
        // Logged first, as in `add_data_key_as`: never a key without a line.
        self.audit.append("create", tenant, &id, "ok: pseudonym key")?;
        self.commit_logged(&mut g, new, "create", tenant, &id)?;
        Ok(key)
    }

    /// Make a new active data key; the previous one becomes retired (still decrypts).
    pub fn rotate(&self, tenant: &str) -> Result<String> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        let _file = self.reload_for(&mut g, tenant)?;
        let (id, _key) = self.add_data_key_as(&mut g, tenant, "rotate")?;
        tracing::info!("rotated the data key of tenant {tenant}: new active key {id}");
        Ok(id)
    }

    /// Crypto-shred a tenant: remove all its wrapped data keys and its pseudonym
    /// key from the keyring (atomic rewrite) and leave a tombstone. Other tenants
    /// are untouched. Forgetting a forgotten tenant is a no-op.
    pub fn forget(&self, tenant: &str) -> Result<()> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        let _file = self.lock_file()?;
        self.reload(&mut g)?;
        // A tombstone with no keys left: done before (the audit line names
        // the destroyed keys again: a forget killed between its keyring write
        // and its audit line is recorded here at the latest). One whose
        // tenant still has keys was not made by a forget that finished (or
        // was added to the file): the keys are destroyed now (helper-74: the
        // forget reported success and destroyed nothing).
        if let Some(t) = g.forgotten.iter().find(|t| t.tenant == tenant)
            && !g.tenants.contains_key(tenant)
        {
            let shown = shown_ids(t.destroyed_keys.iter().map(|d| d.id.as_str()));
            self.audit.append("forget", tenant, &shown, &format!("ok: already forgotten at {}", t.forgotten_at))?;
            let _ = fs::remove_file(self.path.with_file_name(FORGETTING_FILE));
            return Ok(());
        }
        let mut new = (*g).clone();
        new.forgotten.retain(|t| t.tenant != tenant);
        let entry = new.tenants.remove(tenant);
        let mut destroyed = Vec::new();
        match &entry {
            Some(e) => {
                for k in &e.data_keys {
                    destroyed.push(DestroyedKey { id: k.id.clone(), kind: KeyKind::Data, created: k.created.clone() });
                }
                if let Some(k) = &e.pseudonym_key {
                    destroyed.push(DestroyedKey { id: k.id.clone(), kind: KeyKind::Pseudonym, created: k.created.clone() });
                }
            }
            None => tracing::warn!("tenant {tenant} had no keys in {}; recording it as forgotten so none are ever created", self.path.display()),
        }
        let n = destroyed.len();
        let shown = shown_ids(destroyed.iter().map(|d| d.id.as_str()));
        let mut tomb = Tombstone { tenant: tenant.to_string(), forgotten_at: now(), destroyed_keys: destroyed, seal: None };
        tomb.seal_with(&self.integrity, &self.workspace());
        new.forgotten.push(tomb);
        // Logged before the keyring is written, as an export is: a forget
        // killed in between leaves a `started` line, never destroyed keys
        // without one, and the marker every run warns about.
        let marker = self.path.with_file_name(FORGETTING_FILE);
        crate::util::atomic::write_atomic_with(
            &marker,
            serde_json::json!({"tenant": tenant, "started_at": now()}).to_string().as_bytes(),
            crate::util::atomic::Durability::Full,
        )?;
        self.audit.append("forget", tenant, &shown, &format!("started: destroying {n} key(s)"))?;
        self.commit(&mut g, new)?;
        self.audit.append("forget", tenant, &shown, &format!("ok: {n} key(s) destroyed"))?;
        let _ = fs::remove_file(&marker);
        tracing::warn!("destroyed {n} key(s) of tenant {tenant}; its encrypted data can no longer be decrypted");
        Ok(())
    }

    /// A `keys forget` that started and did not finish ([`unfinished_forget`]).
    pub fn unfinished_forget(&self) -> Option<(String, String)> {
        let g = self.lock();
        forget_marker(&self.path.with_file_name(FORGETTING_FILE), |t| g.forgotten.iter().any(|f| f.tenant == t))
    }

    /// Every forgotten tenant, with when it was forgotten (RFC 3339).
    pub fn forgotten_tenants(&self) -> std::collections::BTreeMap<String, String> {
        self.lock().forgotten.iter().map(|t| (t.tenant.clone(), t.forgotten_at.clone())).collect()
    }

    /// The tombstones, judged: a proven erasure is a tombstone this
    /// workspace's `keys forget` sealed with no key of the tenant left; only
    /// those may have their data deleted (`dagrun gc`) or their records left
    /// unchecked (`verify`). Every other proves nothing (see [`Erasures`]).
    pub fn erasures(&self) -> Erasures {
        let ws = self.workspace();
        let g = self.lock();
        let mut out = Erasures::default();
        for t in &g.forgotten {
            let has_keys = g.tenants.contains_key(&t.tenant);
            if t.is_sealed(&self.integrity, &ws) && !has_keys {
                out.proven.push(t.tenant.clone());
            } else {
                out.unproven.push((t.tenant.clone(), has_keys));
            }
        }
        out
    }

    /// The workspace whose keyring this is (`WS/.dagrun/keys/keyring.json`),
    /// canonical (a tombstone's seal names it: `Tombstone::sealed_bytes`).
    fn workspace(&self) -> PathBuf {
        let w = self.path.parent().and_then(Path::parent).and_then(Path::parent).unwrap_or(Path::new("."));
        std::fs::canonicalize(w).unwrap_or_else(|_| w.to_path_buf())
    }

    /// When the tenant was forgotten (RFC 3339), if it was.
    pub fn is_forgotten(&self, tenant: &str) -> Option<String> {
        self.lock().forgotten.iter().find(|t| t.tenant == tenant).map(|t| t.forgotten_at.clone())
    }

    /// Every key's metadata (never bytes), by tenant; destroyed keys of forgotten
    /// tenants are listed with state `Destroyed`.
    pub fn list(&self) -> Vec<KeyInfo> {
        let g = self.lock();
        let mut out = Vec::new();
        for (tenant, e) in &g.tenants {
            for k in &e.data_keys {
                out.push(KeyInfo { tenant: tenant.clone(), key_id: k.id.clone(), kind: KeyKind::Data, created: k.created.clone(), state: k.state });
            }
            if let Some(k) = &e.pseudonym_key {
                out.push(KeyInfo {
                    tenant: tenant.clone(),
                    key_id: k.id.clone(),
                    kind: KeyKind::Pseudonym,
                    created: k.created.clone(),
                    state: KeyState::Active,
                });
            }
        }
        for t in &g.forgotten {
            for k in &t.destroyed_keys {
                out.push(KeyInfo { tenant: t.tenant.clone(), key_id: k.id.clone(), kind: k.kind, created: k.created.clone(), state: KeyState::Destroyed });
            }
        }
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// Every stored key unwrapped once and wiped again (`dagrun verify`): one
    /// message per key that does not unwrap (named, never its bytes). A wrapped
    /// key is bound to its tenant and id, so an edited, damaged, swapped or
    /// copied entry is found here instead of by the run that needs it.
    pub fn check_all_keys(&self) -> Vec<String> {
        let g = self.lock();
        let mut problems = Vec::new();
        for (tenant, e) in &g.tenants {
            for k in e.data_keys.iter().chain(&e.pseudonym_key) {
                match self.unwrap_bytes(tenant, k) {
                    Ok(mut bytes) => wipe(&mut bytes),
                    Err(err) => problems.push(format!("{err:#}")),
                }
            }
        }
        problems
    }

    /// Hex of a data key (the active one when `key_id` is `None`; never creates
    /// one), for decrypting elsewhere. The caller must gate this behind an
    /// explicit confirmation; an audit line (without the key) is logged.
    ///
    /// The look-up, the audit line and the hand-out happen under the keyring's
    /// file lock, on the keyring as it is on disk then: a `keys forget` that
    /// finished before is seen (the export is refused), and one that starts
    /// meanwhile waits until the export is logged.
    pub fn export_data_key_hex(&self, tenant: &str, key_id: Option<&str>) -> Result<String> {
        let mut g = self.lock();
        let _file = self.lock_file()?;
        self.reload(&mut g)?;
        let found = (|| -> Result<(String, DataKey)> {
            validate_tenant(tenant)?;
            forgotten_check(&g, tenant)?;
            let id = match key_id {
                Some(id) => id.to_string(),
                None => g.tenants.get(tenant).and_then(TenantEntry::active_data).map(|k| k.id.clone()).ok_or_else(|| {
                    anyhow!(
                        "tenant {tenant} has no data key yet in the keyring at {}: nothing to export (run the \
                         encrypt stage first)",
                        self.path.display()
                    )
                })?,
            };
            // `keys list` shows the pseudonym key beside the data keys: its id
            // is refused as what it is, not as a key the keyring lacks.
            let entry = g.tenants.get(tenant);
            if entry.and_then(|e| e.pseudonym_key.as_ref()).is_some_and(|k| k.id == id) {
                let data: Vec<&str> = entry.map(|e| e.data_keys.iter().map(|k| k.id.as_str()).collect()).unwrap_or_default();
                return Err(crate::error::config(format!(
                    "{id} is tenant {tenant}'s pseudonym key (the HMAC key of its Sensitive_Token join keys), not a data key: \
                     `dagrun keys export` prints data keys only ({}); leave out --key-id to export the active one",
                    if data.is_empty() { "the tenant has none yet".to_string() } else { format!("{tenant}'s: {}", data.join(", ")) }
                )));
            }
            let key = self.unwrap_key(tenant, self.stored_data_key(&g, tenant, &id)?, DataKey::from_bytes)?;
            Ok((id, key))
        })();
        let shown_tenant = escape_for_message(tenant);
        let (id, key) = match found {
            Ok(v) => v,
            Err(e) => {
                let id = key_id.map(escape_for_message).unwrap_or_else(|| "active".into());
                let why = match e.downcast_ref::<KeyError>() {
                    Some(KeyError::Forgotten { .. }) => "refused: the tenant was forgotten",
                    _ if crate::error::exit_code_of(&e) == crate::error::exit::CONFIG => "refused: not a data key",
                    _ => "refused: no such key",
                };
                self.audit.append("export", &shown_tenant, &id, why)?;
                return Err(e);
            }
        };
        // Logged before the key is handed out: no audit line, no export.
        self.audit.append("export", tenant, &id, "ok: data key exported in clear")?;
        tracing::warn!("exported a data key of tenant {tenant} in clear (key id {})", escape_for_message(&id));
        Ok(hex::encode(key.as_bytes()))
    }

    // ---- internals ----

    fn lock(&self) -> MutexGuard<'_, KeyringFile> {
        // State is only replaced after a successful write, so a poisoned lock still
        // guards a consistent value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exclusive lock every change of the keyring file is made under
    /// (see "Changes" above); released when the returned file is dropped.
    /// Taken after the in-memory state's mutex, never before.
    fn lock_file(&self) -> Result<fs::File> {
        let path = self.path.with_file_name(KEYRING_LOCK_FILE);
        let what = || format!("cannot lock {}", path.display());
        let mut o = fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let f = crate::util::nofollow::open_own_file(&mut o, &path).with_context(what)?;
        crate::util::flock::lock_short(&f, &path, crate::util::flock::Mode::Exclusive).with_context(what)?;
        Ok(f)
    }

    /// Lock the file ([`Self::lock_file`]), take the keyring as it is on disk
    /// now ([`Self::reload`]) and check `tenant` was not forgotten meanwhile:
    /// what every change, and every look-up of a key not held, starts with.
    fn reload_for(&self, g: &mut MutexGuard<'_, KeyringFile>, tenant: &str) -> Result<fs::File> {
        let file = self.lock_file()?;
        self.reload(g)?;
        forgotten_check(g, tenant)?;
        Ok(file)
    }

    /// Under [`Self::lock_file`]: take the keyring as it is on disk now (another
    /// process may have changed it since this one read it). It must be under
    /// the same master key (a rewrap holds the workspace lock, which no run
    /// shares, so a different one means the file was replaced).
    fn reload(&self, g: &mut MutexGuard<'_, KeyringFile>) -> Result<()> {
        if fs::symlink_metadata(&self.path).is_err() {
            return Ok(()); // not written yet: what this process holds stands
        }
        let fresh = read_keyring(&self.path)?;
        // A token's check value differs per process (a wrap with a fresh
        // nonce): unequal text is asked of the master itself.
        if fresh.key_check != self.key_check && !self.master.verify_check(&fresh.key_check)? {
            bail!("the keyring {} was replaced by one under another master key while this command ran; run it again", self.path.display());
        }
        **g = fresh;
        Ok(())
    }

    /// Persist `new`, then make it the in-memory state.
    fn commit(&self, g: &mut MutexGuard<'_, KeyringFile>, mut new: KeyringFile) -> Result<()> {
        new.format = KEYRING_FORMAT.into();
        new.key_check = self.key_check.clone();
        new.master = Some(self.master.record());
        let mut bytes = serde_json::to_vec_pretty(&new).context("cannot serialise the keyring")?;
        bytes.push(b'\n');
        write_atomic_mode(&self.path, &bytes, 0o600).with_context(|| format!("cannot save the keyring {}; no key was changed", self.path.display()))?;
        **g = new;
        Ok(())
    }

    fn add_data_key_as(&self, g: &mut MutexGuard<'_, KeyringFile>, tenant: &str, op: &str) -> Result<(String, DataKey)> {
        let mut new = (**g).clone();
        let entry = new.tenants.entry(tenant.to_string()).or_default();
        let id = next_data_key_id(tenant, entry);
        let key = DataKey::generate()?;
        let (wrapped, mechanism) = self.wrap_key(tenant, &id, key.bytes())?;
        for k in entry.data_keys.iter_mut().filter(|k| k.state == KeyState::Active) {
            k.state = KeyState::Retired;
        }
        entry.data_keys.push(StoredKey { id: id.clone(), created: now(), state: KeyState::Active, wrapped, mechanism });
        // A tenant's first data key comes with its pseudonym key (every
        // tenant that encrypts needs both): one keyring write and one audit
        // append instead of two of each.
        let pseudonym = match (op, &entry.pseudonym_key) {
            ("create", None) => {
                let pid = pseudonym_key_id(tenant);
                let pkey = PseudonymKey::generate()?;
                let (wrapped, mechanism) = self.wrap_key(tenant, &pid, pkey.bytes())?;
                entry.pseudonym_key = Some(StoredKey { id: pid.clone(), created: now(), state: KeyState::Active, wrapped, mechanism });
                Some(pid)
            }
            _ => None,
        };
        let mut lines = vec![(op, tenant, id.as_str(), "ok: data key")];
        if let Some(pid) = &pseudonym {
            lines.push(("create", tenant, pid.as_str(), "ok: pseudonym key"));
        }
        // Every change is logged before the keyring changes, as a forget is:
        // killed in between, a rotation (an operator's act) leaves a `started`
        // line, a creation a line for a key that never came to exist (the
        // next run creates it again, under the same id, and logs it again);
        // never a key without a line.
        if op == "rotate" {
            self.audit.append(op, tenant, &id, "started: new data key")?;
            self.commit(g, new)?;
            self.audit.append_all(&lines)?;
        } else {
            self.audit.append_all(&lines)?;
            self.commit_logged(g, new, op, tenant, &id)?;
        }
        Ok((id, key))
    }

    /// [`Self::commit`] of a creation logged already: when the keyring cannot
    /// be written, a `failed` line follows (best effort) so the log does not
    /// leave the key looking made.
    fn commit_logged(&self, g: &mut MutexGuard<'_, KeyringFile>, new: KeyringFile, op: &str, tenant: &str, id: &str) -> Result<()> {
        self.commit(g, new).inspect_err(|_| {
            // An error after the rename (the folder's flush) leaves the key
            // written: say `failed` only when the file does not hold it.
            let holds = read_keyring(&self.path).is_ok_and(|f| {
                f.tenants.get(tenant).is_some_and(|e| e.data_keys.iter().any(|k| k.id == id) || e.pseudonym_key.as_ref().is_some_and(|k| k.id == id))
            });
            if !holds {
                let _ = self.audit.append(op, tenant, id, "failed: the keyring was not written; this key does not exist");
            }
        })
    }

    fn wrap_key(&self, tenant: &str, id: &str, key: &[u8; 32]) -> Result<(String, Option<String>)> {
        wrap_with(&self.master, tenant, id, key)
    }

    fn unwrap_key<K>(&self, tenant: &str, k: &StoredKey, make: fn([u8; 32]) -> K) -> Result<K> {
        let mut buf = self.unwrap_bytes(tenant, k)?;
        let key = make(buf);
        wipe(&mut buf);
        Ok(key)
    }

    /// The raw bytes of a stored key; the caller wipes them.
    fn unwrap_bytes(&self, tenant: &str, k: &StoredKey) -> Result<[u8; 32]> {
        let shown = escape_for_message(tenant);
        let damaged = || {
            anyhow!(
                "wrapped key {} of tenant {shown} in the keyring {} does not unwrap although the master key \
                 matches: the keyring was edited or damaged (or the entry was copied from another tenant or \
                 id). Restore {} from a backup",
                escape_for_message(&k.id),
                self.path.display(),
                self.path.display()
            )
        };
        let blob = hex::decode(&k.wrapped).map_err(|_| damaged())?;
        let aad = format!("{WRAP_AAD_PREFIX}{tenant}|{}", k.id);
        self.master
            .unwrap(k.mechanism.as_deref(), aad.as_bytes(), &blob)
            .with_context(|| format!("cannot unwrap key {} of tenant {shown} in the keyring {}", escape_for_message(&k.id), self.path.display()))?
            .ok_or_else(damaged)
    }
}

/// The integrity key: the one stored by a rewrap, else the master's own.
fn integrity_of(master: &Master, path: &Path, stored: Option<&StoredKey>, key_check: &str) -> Result<super::integrity::IntegrityKey> {
    let Some(k) = stored else { return master.integrity_key(key_check) };
    let damaged = || {
        anyhow!("the stored integrity key in the keyring {} does not unwrap although the master key matches: restore the keyring from a backup", path.display())
    };
    let blob = hex::decode(&k.wrapped).map_err(|_| damaged())?;
    let aad = format!("{WRAP_AAD_PREFIX}{INTEGRITY_OWNER}|{}", k.id);
    let mut bytes = master.unwrap(k.mechanism.as_deref(), aad.as_bytes(), &blob)?.ok_or_else(damaged)?;
    let key = super::integrity::IntegrityKey::from_bytes(bytes);
    wipe(&mut bytes);
    Ok(key)
}

/// hex of the wrapped key, and the mechanism to record beside it.
/// Every wrap is unwrapped again and compared before it is stored: a token
/// (or a bug) that hands back a wrong wrap of the right length must fail the
/// operation, not replace a key by one nothing can open (review 27: a rewrap
/// wrote every tenant key without reading one back).
fn wrap_with(master: &Master, tenant: &str, id: &str, key: &[u8; 32]) -> Result<(String, Option<String>)> {
    let aad = format!("{WRAP_AAD_PREFIX}{tenant}|{id}");
    let (blob, mech) = master.wrap(aad.as_bytes(), key)?;
    let back = master.unwrap(Some(mech), aad.as_bytes(), &blob)?;
    // blake3::Hash compares in constant time.
    let same = back.as_ref().is_some_and(|b| blake3::Hash::from(*b) == blake3::Hash::from(*key));
    if let Some(mut b) = back {
        wipe(&mut b);
    }
    if !same {
        bail!(
            "{} wrapped key {} of {} but the result does not unwrap to the same key: nothing was stored; check the \
             master key's token (or HSM firmware) and try again",
            master.describe(),
            escape_for_message(id),
            escape_for_message(tenant)
        );
    }
    Ok((hex::encode(blob), Some(mech.to_string())))
}

/// The end of a wrong-master-key message: what the keyring says its master is.
fn recorded_hint(rec: Option<&MasterRecord>) -> String {
    match rec {
        Some(r) if r.kind == "pkcs11" => format!(
            " (the keyring records its master key as {}; set {ENV_MASTER_KEY_URI} to that URI)",
            r.uri.as_deref().map(|u| Pkcs11Uri::parse(u).map(|u| u.shown()).unwrap_or_else(|_| escape_for_message(u))).unwrap_or_default()
        ),
        Some(r) if r.kind == "file" => " (the keyring records a file master key)".into(),
        _ => String::new(),
    }
}

/// The id the tenant's next data key gets: `TENANT-dk-N`, N = one more than
/// the keys it has, skipping ids in use. [`KeyringView::data_key_ingredient`]
/// predicts the first key with it, so a dry run and the run agree.
/// Id of a tenant's pseudonym key (there is one, never rotated).
fn pseudonym_key_id(tenant: &str) -> String {
    format!("{tenant}-pk-1")
}

fn next_data_key_id(tenant: &str, entry: &TenantEntry) -> String {
    let mut n = entry.data_keys.len() + 1;
    let mut id = format!("{tenant}-dk-{n}");
    while entry.data_keys.iter().any(|k| k.id == id) {
        n += 1;
        id = format!("{tenant}-dk-{n}");
    }
    id
}

// ---- read-only view ------------------------------------------------------------

/// The keyring's metadata (ids, states, tombstones), read without the master
/// key and without creating or changing anything: what `status`, `--dry-run`
/// and cache-key computation use. A missing keyring is an empty view.
pub struct KeyringView {
    path: PathBuf,
    file: Option<KeyringFile>,
}

impl KeyringView {
    /// Read `<workspace>/.dagrun/keys/keyring.json` if it exists (checked like
    /// [`Keyring::open`] does: private mode, known format). Writes nothing.
    pub fn read(workspace: &Path) -> Result<KeyringView> {
        let path = keyring_path(workspace);
        let file = match fs::symlink_metadata(&path) {
            Ok(_) => Some(read_keyring(&path)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read the keyring {}", path.display())),
        };
        Ok(KeyringView { path, file })
    }

    /// Path of `keyring.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the tenant was forgotten (RFC 3339), if it was.
    pub fn is_forgotten(&self, tenant: &str) -> Option<String> {
        let f = self.file.as_ref()?;
        f.forgotten.iter().find(|t| t.tenant == tenant).map(|t| t.forgotten_at.clone())
    }

    /// Id of the tenant's active data key, if it has one.
    pub fn active_key_id(&self, tenant: &str) -> Option<String> {
        let f = self.file.as_ref()?;
        f.tenants.get(tenant).and_then(TenantEntry::active_data).map(|k| k.id.clone())
    }

    /// True when the keyring holds a data key `key_id` of the tenant (any state).
    pub fn holds_data_key(&self, tenant: &str, key_id: &str) -> bool {
        self.file.as_ref().and_then(|f| f.tenants.get(tenant)).is_some_and(|e| e.data_keys.iter().any(|k| k.id == key_id))
    }

    /// The data key the tenant's next encryption uses: the active key's id, or
    /// for a tenant with no key yet the id [`Keyring::active_data_key`] will
    /// give the key it creates. Not secret; never creates anything.
    pub fn data_key_ingredient(&self, tenant: &str) -> Result<String> {
        validate_tenant(tenant)?;
        if let Some(id) = self.active_key_id(tenant) {
            return Ok(id);
        }
        let empty = TenantEntry::default();
        let entry = self.file.as_ref().and_then(|f| f.tenants.get(tenant)).unwrap_or(&empty);
        Ok(next_data_key_id(tenant, entry))
    }
}

fn forgotten_check(file: &KeyringFile, tenant: &str) -> Result<()> {
    match file.forgotten.iter().find(|t| t.tenant == tenant) {
        Some(t) => Err(KeyError::Forgotten { tenant: tenant.into(), at: t.forgotten_at.clone() }.into()),
        None => Ok(()),
    }
}

/// Largest keyring read: about 300 bytes a key, so room for a million keys.
const MAX_KEYRING_BYTES: u64 = 256 << 20;

fn read_keyring(path: &Path) -> Result<KeyringFile> {
    check_private(path, "keyring")?;
    // A regular file of a bounded size, never waited on (`util::read_capped`).
    let text = crate::util::read_capped(path, MAX_KEYRING_BYTES)
        .and_then(|b| String::from_utf8(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        .with_context(|| format!("cannot read the keyring {}", path.display()))?;
    let file: KeyringFile = crate::util::redact::from_json(text.as_bytes()).map_err(|why| {
        anyhow::anyhow!(
            "the keyring {} is not valid keyring JSON ({}); restore it from a backup (do not delete it: the \
             data keys exist only there)",
            path.display(),
            why
        )
    })?;
    if file.format != KEYRING_FORMAT {
        bail!(
            "the keyring {} has format \"{}\", but this dagrun reads \"{KEYRING_FORMAT}\"; use the dagrun \
             version that wrote it",
            path.display(),
            escape_for_message(&file.format)
        );
    }
    check_mechanisms(&file, path)?;
    check_fields(&file, path)?;
    Ok(file)
}

/// Refuse a keyring whose names and times are not what dagrun writes (tenant
/// ids, key ids of `[A-Za-z0-9_-]`, RFC 3339 times): they are printed by
/// `keys list` and in messages, and an edited one could carry terminal
/// escapes.
fn check_fields(file: &KeyringFile, path: &Path) -> Result<()> {
    let bad = |what: &str, v: &str, rule: &str| {
        anyhow!(
            "the keyring {} holds {what} \"{}\", which is not {rule}: it was edited outside dagrun. Restore it from a \
             backup; do not delete it (the data keys exist only there)",
            path.display(),
            escape_for_message(v)
        )
    };
    let time = |what: &str, v: &str| match chrono::DateTime::parse_from_rfc3339(v) {
        Ok(_) => Ok(()),
        Err(_) => Err(bad(what, v, "an RFC 3339 time")),
    };
    let id = |v: &str| match !v.is_empty() && v.len() <= 100 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        true => Ok(()),
        false => Err(bad("a key id", v, "1 to 100 characters of A-Z, a-z, 0-9, '_' or '-'")),
    };
    let tenant = |v: &str| match crate::data::is_valid_tenant_id(v) {
        true => Ok(()),
        false => Err(bad("a tenant", v, "a tenant id")),
    };
    for (t, e) in &file.tenants {
        tenant(t)?;
        for k in e.data_keys.iter().chain(e.pseudonym_key.iter()) {
            id(&k.id)?;
            time("a key's creation time", &k.created)?;
        }
    }
    for f in &file.forgotten {
        tenant(&f.tenant)?;
        time("a forget time", &f.forgotten_at)?;
        for k in &f.destroyed_keys {
            id(&k.id)?;
            time("a key's creation time", &k.created)?;
        }
    }
    if let Some(k) = &file.integrity {
        id(&k.id)?;
        time("a key's creation time", &k.created)?;
    }
    Ok(())
}

/// Refuse a keyring naming a wrapping mechanism this dagrun does not know,
/// before anything is unwrapped or written.
fn check_mechanisms(file: &KeyringFile, path: &Path) -> Result<()> {
    let unknown = |what: String, m: &str| {
        anyhow!(
            "the keyring {} records {what} as wrapped with the mechanism \"{}\", which this dagrun does not know \
             (it knows {}): the keyring was written by a newer dagrun or edited. Use the dagrun version that \
             wrote it, or restore the keyring from a backup; do not delete it",
            path.display(),
            escape_for_message(m),
            KNOWN_MECHANISMS.join(", ")
        )
    };
    if let Some(r) = &file.master
        && !KNOWN_MECHANISMS.contains(&r.mechanism.as_str())
    {
        return Err(unknown("its master key".into(), &r.mechanism));
    }
    for (tenant, e) in &file.tenants {
        for k in e.data_keys.iter().chain(e.pseudonym_key.iter()) {
            if let Some(m) = &k.mechanism
                && !KNOWN_MECHANISMS.contains(&m.as_str())
            {
                return Err(unknown(format!("key {} of tenant {}", escape_for_message(&k.id), escape_for_message(tenant)), m));
            }
        }
    }
    if let Some(k) = &file.integrity
        && let Some(m) = &k.mechanism
        && !KNOWN_MECHANISMS.contains(&m.as_str())
    {
        return Err(unknown("the stored integrity key".into(), m));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
