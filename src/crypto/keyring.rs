//! The per-tenant keyring: data keys (versioned, rotatable) and one pseudonym key
//! per tenant, stored only wrapped under a master key-encryption key.
//!
//! # Files
//! - `<workspace>/.dagrun/keys/keyring.json` — wrapped keys and metadata, mode 0600,
//!   rewritten atomically on every change (directory `.dagrun/keys` is created 0700).
//! - The master key (64 hex characters) comes from, in order: env `DAGRUN_MASTER_KEY`;
//!   env `DAGRUN_MASTER_KEY_FILE` (a file path); the default file
//!   `<workspace>/.dagrun/keys/master.key`, created (mode 0600 from the start,
//!   never overwriting an existing file) with a one-time warning if none exists.
//!
//! # Key files must be private: refuse, don't warn
//! A master key file (or the keyring) whose mode gives group or other any access
//! is refused with an error naming the file, its mode and the `chmod 600` fix.
//! A warning would scroll past in a pipeline log while the key that protects every
//! tenant's data stays readable by other local users; refusing costs one `chmod`.
//! A key file inside `<workspace>/config/` is refused too: config is shared and
//! versioned, key material never lives there.
//!
//! # Wrapping
//! Each key is stored as hex of `nonce(12) || AES-256-GCM(master, key)(32) || tag(16)`
//! with associated data `"dagrun/keywrap/v1|" + tenant + "|" + key_id`, so a
//! wrapped key copied to another tenant or id does not unwrap. The file also holds
//! `key_check` = hex(blake3 `derive_key("dagrun keyring master-key check v1", master)`),
//! which tells "wrong master key" apart from a damaged keyring without trying keys.
//!
//! # Crypto-shredding
//! [`Keyring::forget`] removes every wrapped key of a tenant from the file and leaves
//! a tombstone; later requests for that tenant fail with [`KeyError::Forgotten`] and
//! never create new keys. Copies of an older `keyring.json` (backups) still hold the
//! wrapped keys, readable only together with the master key.

use super::keys::{DataKey, MasterKey, PseudonymKey};
use super::{escape_for_message, validate_tenant, wipe, wipe_string};
use crate::util::atomic::{TEMP_MARKER, sync_parent, write_atomic_mode};
use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use anyhow::{Context, Result, anyhow, bail};
use rand::TryRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Env var holding the master key as 64 hex characters.
pub const ENV_MASTER_KEY: &str = "DAGRUN_MASTER_KEY";
/// Env var holding the path of a file with the master key.
pub const ENV_MASTER_KEY_FILE: &str = "DAGRUN_MASTER_KEY_FILE";
/// `format` value of the keyring file.
pub const KEYRING_FORMAT: &str = "dagrun-keyring/v1";
const WRAP_AAD_PREFIX: &str = "dagrun/keywrap/v1|";
const CHECK_CONTEXT: &str = "dagrun keyring master-key check v1";

/// `<workspace>/.dagrun/keys`
pub fn keys_dir(workspace: &Path) -> PathBuf {
    workspace.join(".dagrun").join("keys")
}

/// `<workspace>/.dagrun/keys/keyring.json`
pub fn keyring_path(workspace: &Path) -> PathBuf {
    keys_dir(workspace).join("keyring.json")
}

/// `<workspace>/.dagrun/keys/master.key`
pub fn default_master_key_path(workspace: &Path) -> PathBuf {
    keys_dir(workspace).join("master.key")
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
         these data keys were wrapped with. Set DAGRUN_MASTER_KEY to the right key (64 hex characters) or \
         DAGRUN_MASTER_KEY_FILE to the file holding it; do not delete or overwrite the keyring, the \
         tenants' encrypted data can only be decrypted with the keys in it"
    )]
    WrongMasterKey {
        source_desc: String,
        keyring: String,
    },
    /// No data key with that id for that tenant.
    #[error(
        "tenant {tenant} has no data key {key_id} in the keyring at {keyring} (it has: {known}): the data \
         was encrypted with another workspace's keyring, or this keyring was restored from an older backup"
    )]
    UnknownKey {
        tenant: String,
        key_id: String,
        keyring: String,
        known: String,
    },
    /// A tenant id outside `[A-Za-z0-9_-]{1,64}`.
    #[error(
        "invalid tenant id \"{shown}\" ({len} characters): a tenant id is 1 to 64 characters of A-Z, a-z, \
         0-9, '_' and '-'; fix it in config/tenants.yaml"
    )]
    InvalidTenant { shown: String, len: usize },
}

/// Where the master key comes from. `Debug` never shows the key.
pub enum MasterKeySource {
    /// The hex text itself (what `DAGRUN_MASTER_KEY` holds). Wiped on drop.
    Env(String),
    /// A file holding 64 hex characters, mode 0600, outside `config/`; must exist.
    File(PathBuf),
    /// `<workspace>/.dagrun/keys/master.key`, created if missing.
    Default,
}

impl MasterKeySource {
    /// `DAGRUN_MASTER_KEY` if set and non-empty, else `DAGRUN_MASTER_KEY_FILE` if
    /// set and non-empty, else [`MasterKeySource::Default`].
    pub fn from_env() -> Result<MasterKeySource> {
        if let Some(v) = std::env::var_os(ENV_MASTER_KEY)
            && !v.is_empty()
        {
            let s = v.into_string().map_err(|_| {
                anyhow!("{ENV_MASTER_KEY} is set but is not text; it must be 64 hex characters")
            })?;
            return Ok(MasterKeySource::Env(s));
        }
        if let Some(p) = std::env::var_os(ENV_MASTER_KEY_FILE)
            && !p.is_empty()
        {
            return Ok(MasterKeySource::File(PathBuf::from(p)));
        }
        Ok(MasterKeySource::Default)
    }
}

impl fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKeySource::Env(_) => f.write_str("Env([redacted])"),
            MasterKeySource::File(p) => write!(f, "File({})", p.display()),
            MasterKeySource::Default => f.write_str("Default"),
        }
    }
}

impl Drop for MasterKeySource {
    fn drop(&mut self) {
        if let MasterKeySource::Env(s) = self {
            wipe_string(s);
        }
    }
}

/// Kind of a key in [`KeyInfo`].
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
    #[serde(default)]
    tenants: BTreeMap<String, TenantEntry>,
    #[serde(default)]
    forgotten: Vec<Tombstone>,
}

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
    /// hex(nonce || wrapped key || tag)
    wrapped: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Tombstone {
    tenant: String,
    forgotten_at: String,
    #[serde(default)]
    destroyed_keys: Vec<DestroyedKey>,
}

#[derive(Clone, Serialize, Deserialize)]
struct DestroyedKey {
    id: String,
    kind: KeyKind,
    created: String,
}

impl TenantEntry {
    fn active_data(&self) -> Option<&StoredKey> {
        self.data_keys
            .iter()
            .rev()
            .find(|k| k.state == KeyState::Active)
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

// ---- file checks ---------------------------------------------------------------

/// Refuse a key file whose mode lets group or other do anything with it.
fn check_private(path: &Path, what: &str) -> Result<()> {
    let meta =
        fs::metadata(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{what} {} is not a regular file; point dagrun at the file itself",
            path.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            bail!(
                "{what} {p} has mode {mode:04o}; it must be readable only by its owner: run `chmod 600 {p}`",
                p = path.display()
            );
        }
    }
    Ok(())
}

/// Refuse a master key file that lies inside `<workspace>/config/`.
fn refuse_if_in_config(workspace: &Path, path: &Path) -> Result<()> {
    let config = workspace.join("config");
    let lexical = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let inside = match (fs::canonicalize(path), fs::canonicalize(&config)) {
        (Ok(p), Ok(c)) => p.starts_with(c),
        (Ok(p), Err(_)) => p.starts_with(lexical(&config)),
        _ => lexical(path).starts_with(lexical(&config)),
    };
    if inside {
        bail!(
            "the master key file {} is inside {}: key material must never live in config/ (it is shared \
             and versioned). Move the file outside config/ (e.g. to {}) with mode 0600 and point \
             DAGRUN_MASTER_KEY_FILE at it, or set DAGRUN_MASTER_KEY",
            path.display(),
            config.display(),
            default_master_key_path(workspace).display()
        );
    }
    Ok(())
}

fn read_master_file(path: &Path) -> Result<MasterKey> {
    check_private(path, "key file")?;
    let mut text = fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read key file {} (it must hold 64 hex characters)",
            path.display()
        )
    })?;
    let key = MasterKey::from_hex(&text).map_err(|e| {
        anyhow!(
            "key file {} does not hold a valid master key: {e}",
            path.display()
        )
    });
    wipe_string(&mut text);
    key
}

/// Create `path` holding a new random master key, mode 0600 from the first byte,
/// without ever replacing an existing file (temp file + hard link). Returns `None`
/// when another process created it first (the caller then reads that one).
fn create_master_file(path: &Path) -> Result<Option<MasterKey>> {
    use std::fs::OpenOptions;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;

    let key = MasterKey::generate()?;
    let mut text = hex::encode(key.bytes());
    text.push('\n');
    let write_new = |p: &Path, text: &str| -> std::io::Result<()> {
        let mut o = OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        o.mode(0o600);
        let mut f = o.open(p)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = chrono::Utc::now().timestamp_subsec_nanos();
    let tmp = path.with_file_name(format!(
        ".{name}{TEMP_MARKER}{}.{nanos}",
        std::process::id()
    ));
    let result = (|| -> Result<bool> {
        write_new(&tmp, &text).with_context(|| format!("cannot create {}", tmp.display()))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(_) => {
                // Filesystem without hard links: exclusive create in place.
                match write_new(path, &text) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e).with_context(|| {
                        format!("cannot create the master key file {}", path.display())
                    }),
                }
            }
        }
    })();
    let _ = fs::remove_file(&tmp);
    wipe_string(&mut text);
    if result? {
        sync_parent(path);
        tracing::warn!(
            "created a new local master key at {p}. Back it up now (without it no tenant's encrypted data can \
             be decrypted), or move it out of the workspace and set DAGRUN_MASTER_KEY_FILE (or \
             DAGRUN_MASTER_KEY) to it",
            p = path.display()
        );
        Ok(Some(key))
    } else {
        Ok(None)
    }
}

/// The file `DAGRUN_MASTER_KEY_FILE` names must exist and lie outside `config/`.
fn check_named_key_file(workspace: &Path, p: &Path) -> Result<()> {
    if !p.exists() {
        bail!(
            "{ENV_MASTER_KEY_FILE} names {}, which does not exist: point it at the master key file \
             (64 hex characters, mode 0600), or unset it to use {}",
            p.display(),
            default_master_key_path(workspace).display()
        );
    }
    refuse_if_in_config(workspace, p)
}

/// Load the master key; returns it with a description of its source for messages.
fn load_master(workspace: &Path, source: &MasterKeySource) -> Result<(MasterKey, String)> {
    match source {
        MasterKeySource::Env(s) => {
            let k = MasterKey::from_hex(s)
                .map_err(|e| anyhow!("{ENV_MASTER_KEY} does not hold a valid master key: {e}"))?;
            Ok((k, ENV_MASTER_KEY.to_string()))
        }
        MasterKeySource::File(p) => {
            check_named_key_file(workspace, p)?;
            Ok((read_master_file(p)?, format!("file {}", p.display())))
        }
        MasterKeySource::Default => {
            let p = default_master_key_path(workspace);
            refuse_if_in_config(workspace, &p)?;
            let desc = format!("file {}", p.display());
            let missing = fs::symlink_metadata(&p).is_err();
            let ring = keyring_path(workspace);
            if missing && fs::symlink_metadata(&ring).is_ok() {
                // A new master key could never open the existing wrapped keys.
                bail!(
                    "the keyring {} exists but its master key was not found: {ENV_MASTER_KEY} and {ENV_MASTER_KEY_FILE} are unset and {} does not exist. Set {ENV_MASTER_KEY} to the master key (64 hex characters) or {ENV_MASTER_KEY_FILE} to the file holding it, or restore {} from a backup; do not delete the keyring",
                    ring.display(),
                    p.display(),
                    p.display()
                );
            }
            if missing && let Some(k) = create_master_file(&p)? {
                return Ok((k, desc));
            }
            Ok((read_master_file(&p)?, desc))
        }
    }
}

/// Check the master key's source as [`Keyring::open`] would (a valid
/// `DAGRUN_MASTER_KEY`; a key file that exists, is private and is outside
/// `config/`) without reading the key file, creating anything or unwrapping a
/// key: `status` and cache-key computation refuse a key file others can read.
pub fn check_master_key_source(workspace: &Path) -> Result<()> {
    match &MasterKeySource::from_env()? {
        MasterKeySource::Env(s) => {
            MasterKey::from_hex(s).map_err(|e| anyhow!("{ENV_MASTER_KEY} does not hold a valid master key: {e}"))?;
        }
        MasterKeySource::File(p) => {
            check_named_key_file(workspace, p)?;
            check_private(p, "key file")?;
        }
        MasterKeySource::Default => {
            let p = default_master_key_path(workspace);
            if fs::symlink_metadata(&p).is_ok() {
                refuse_if_in_config(workspace, &p)?;
                check_private(&p, "key file")?;
            }
        }
    }
    Ok(())
}

fn ensure_keys_dir(workspace: &Path) -> Result<()> {
    let dagrun = workspace.join(".dagrun");
    fs::create_dir_all(&dagrun)
        .with_context(|| format!("cannot create directory {}", dagrun.display()))?;
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
                return Err(e)
                    .with_context(|| format!("cannot create directory {}", keys.display()));
            }
        }
    }
    Ok(())
}

// ---- the keyring ---------------------------------------------------------------

/// Per-tenant keys, wrapped under the master key. `Send + Sync`: every method
/// takes `&self` (state behind a mutex); each change is written to disk
/// atomically before the method returns.
pub struct Keyring {
    path: PathBuf,
    source_desc: String,
    key_check: String,
    wrap: Aes256Gcm,
    state: Mutex<KeyringFile>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field(
                "master_key",
                &format_args!("[redacted] (from {})", self.source_desc),
            )
            .finish()
    }
}

impl Keyring {
    /// Open the keyring of `workspace`, taking the master key from the environment
    /// (see [`MasterKeySource::from_env`]).
    pub fn open(workspace: &Path) -> Result<Keyring> {
        Self::open_with(workspace, MasterKeySource::from_env()?)
    }

    /// Open with an explicit master key source (tests, or callers that already
    /// read the environment). A missing keyring file is an empty keyring.
    pub fn open_with(workspace: &Path, source: MasterKeySource) -> Result<Keyring> {
        ensure_keys_dir(workspace)?;
        let (master, source_desc) = load_master(workspace, &source)?;
        drop(source);
        let path = keyring_path(workspace);
        let check = blake3::derive_key(CHECK_CONTEXT, master.bytes());
        let key_check = hex::encode(check);
        let file = if fs::symlink_metadata(&path).is_ok() {
            let file = read_keyring(&path)?;
            let stored = blake3::Hash::from_hex(file.key_check.as_bytes()).map_err(|_| {
                anyhow!(
                    "the keyring {} has a damaged key_check field; restore it from a backup",
                    path.display()
                )
            })?;
            // blake3::Hash compares in constant time.
            if stored != blake3::Hash::from(check) {
                return Err(KeyError::WrongMasterKey {
                    source_desc,
                    keyring: path.display().to_string(),
                }
                .into());
            }
            file
        } else {
            KeyringFile {
                format: KEYRING_FORMAT.into(),
                key_check: key_check.clone(),
                tenants: BTreeMap::new(),
                forgotten: Vec::new(),
            }
        };
        let wrap = Aes256Gcm::new(master.bytes().into());
        Ok(Keyring {
            path,
            source_desc,
            key_check,
            wrap,
            state: Mutex::new(file),
        })
    }

    /// Path of `keyring.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the master key came from: `DAGRUN_MASTER_KEY` or `file PATH`.
    pub fn master_key_source(&self) -> &str {
        &self.source_desc
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
        self.add_data_key(&mut g, tenant)
    }

    /// A data key by id; retired keys stay readable.
    pub fn data_key(&self, tenant: &str, key_id: &str) -> Result<DataKey> {
        validate_tenant(tenant)?;
        let g = self.lock();
        forgotten_check(&g, tenant)?;
        let entry = g.tenants.get(tenant);
        match entry.and_then(|e| e.data_keys.iter().find(|k| k.id == key_id)) {
            Some(k) => self.unwrap_key(tenant, k, DataKey::from_bytes),
            None => {
                let known: Vec<&str> = entry
                    .map(|e| e.data_keys.iter().map(|k| k.id.as_str()).collect())
                    .unwrap_or_default();
                Err(KeyError::UnknownKey {
                    tenant: tenant.into(),
                    key_id: escape_for_message(key_id),
                    keyring: self.path.display().to_string(),
                    known: if known.is_empty() {
                        "no data keys".into()
                    } else {
                        known.join(", ")
                    },
                }
                .into())
            }
        }
    }

    /// Id of the tenant's active data key, without creating or unwrapping anything
    /// (`None` if the tenant has no data key yet). Errors for a forgotten tenant.
    pub fn active_key_id(&self, tenant: &str) -> Result<Option<String>> {
        validate_tenant(tenant)?;
        let g = self.lock();
        forgotten_check(&g, tenant)?;
        Ok(g.tenants
            .get(tenant)
            .and_then(TenantEntry::active_data)
            .map(|k| k.id.clone()))
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
        let mut new = (*g).clone();
        let id = format!("{tenant}-pk-1");
        let key = PseudonymKey::generate()?;
        let stored = StoredKey {
            id: id.clone(),
            created: now(),
            state: KeyState::Active,
            wrapped: self.wrap_key(tenant, &id, key.bytes())?,
        };
        new.tenants
            .entry(tenant.to_string())
            .or_default()
            .pseudonym_key = Some(stored);
        self.commit(&mut g, new)?;
        Ok(key)
    }

    /// Make a new active data key; the previous one becomes retired (still decrypts).
    pub fn rotate(&self, tenant: &str) -> Result<String> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        forgotten_check(&g, tenant)?;
        let (id, _key) = self.add_data_key(&mut g, tenant)?;
        tracing::info!("rotated the data key of tenant {tenant}: new active key {id}");
        Ok(id)
    }

    /// Crypto-shred a tenant: remove all its wrapped data keys and its pseudonym
    /// key from the keyring (atomic rewrite) and leave a tombstone. Other tenants
    /// are untouched. Forgetting a forgotten tenant is a no-op.
    pub fn forget(&self, tenant: &str) -> Result<()> {
        validate_tenant(tenant)?;
        let mut g = self.lock();
        if g.forgotten.iter().any(|t| t.tenant == tenant) {
            return Ok(());
        }
        let mut new = (*g).clone();
        let entry = new.tenants.remove(tenant);
        let mut destroyed = Vec::new();
        match &entry {
            Some(e) => {
                for k in &e.data_keys {
                    destroyed.push(DestroyedKey {
                        id: k.id.clone(),
                        kind: KeyKind::Data,
                        created: k.created.clone(),
                    });
                }
                if let Some(k) = &e.pseudonym_key {
                    destroyed.push(DestroyedKey {
                        id: k.id.clone(),
                        kind: KeyKind::Pseudonym,
                        created: k.created.clone(),
                    });
                }
            }
            None => tracing::warn!(
                "tenant {tenant} had no keys in {}; recording it as forgotten so none are ever created",
                self.path.display()
            ),
        }
        let n = destroyed.len();
        new.forgotten.push(Tombstone {
            tenant: tenant.to_string(),
            forgotten_at: now(),
            destroyed_keys: destroyed,
        });
        self.commit(&mut g, new)?;
        tracing::warn!(
            "destroyed {n} key(s) of tenant {tenant}; its encrypted data can no longer be decrypted"
        );
        Ok(())
    }

    /// When the tenant was forgotten (RFC 3339), if it was.
    pub fn is_forgotten(&self, tenant: &str) -> Option<String> {
        self.lock()
            .forgotten
            .iter()
            .find(|t| t.tenant == tenant)
            .map(|t| t.forgotten_at.clone())
    }

    /// Every key's metadata (never bytes), by tenant; destroyed keys of forgotten
    /// tenants are listed with state `Destroyed`.
    pub fn list(&self) -> Vec<KeyInfo> {
        let g = self.lock();
        let mut out = Vec::new();
        for (tenant, e) in &g.tenants {
            for k in &e.data_keys {
                out.push(KeyInfo {
                    tenant: tenant.clone(),
                    key_id: k.id.clone(),
                    kind: KeyKind::Data,
                    created: k.created.clone(),
                    state: k.state,
                });
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
                out.push(KeyInfo {
                    tenant: t.tenant.clone(),
                    key_id: k.id.clone(),
                    kind: k.kind,
                    created: k.created.clone(),
                    state: KeyState::Destroyed,
                });
            }
        }
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// Hex of a data key (the active one when `key_id` is `None`; never creates
    /// one), for decrypting elsewhere. The caller must gate this behind an
    /// explicit confirmation; an audit line (without the key) is logged.
    pub fn export_data_key_hex(&self, tenant: &str, key_id: Option<&str>) -> Result<String> {
        let key = match key_id {
            Some(id) => self.data_key(tenant, id)?,
            None => {
                let id = self.active_key_id(tenant)?.ok_or_else(|| {
                    anyhow!(
                        "tenant {tenant} has no data key yet in the keyring at {}: nothing to export (run the \
                         encrypt stage first)",
                        self.path.display()
                    )
                })?;
                self.data_key(tenant, &id)?
            }
        };
        tracing::warn!(
            "exported a data key of tenant {tenant} in clear (key id {})",
            key_id
                .map(escape_for_message)
                .unwrap_or_else(|| "active".into())
        );
        Ok(hex::encode(key.as_bytes()))
    }

    // ---- internals ----

    fn lock(&self) -> MutexGuard<'_, KeyringFile> {
        // State is only replaced after a successful write, so a poisoned lock still
        // guards a consistent value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Persist `new`, then make it the in-memory state.
    fn commit(&self, g: &mut MutexGuard<'_, KeyringFile>, mut new: KeyringFile) -> Result<()> {
        new.format = KEYRING_FORMAT.into();
        new.key_check = self.key_check.clone();
        let mut bytes = serde_json::to_vec_pretty(&new).context("cannot serialise the keyring")?;
        bytes.push(b'\n');
        write_atomic_mode(&self.path, &bytes, 0o600).with_context(|| {
            format!(
                "cannot save the keyring {}; no key was changed",
                self.path.display()
            )
        })?;
        **g = new;
        Ok(())
    }

    fn add_data_key(
        &self,
        g: &mut MutexGuard<'_, KeyringFile>,
        tenant: &str,
    ) -> Result<(String, DataKey)> {
        let mut new = (**g).clone();
        let entry = new.tenants.entry(tenant.to_string()).or_default();
        let id = next_data_key_id(tenant, entry);
        let key = DataKey::generate()?;
        let wrapped = self.wrap_key(tenant, &id, key.bytes())?;
        for k in entry
            .data_keys
            .iter_mut()
            .filter(|k| k.state == KeyState::Active)
        {
            k.state = KeyState::Retired;
        }
        entry.data_keys.push(StoredKey {
            id: id.clone(),
            created: now(),
            state: KeyState::Active,
            wrapped,
        });
        self.commit(g, new)?;
        Ok((id, key))
    }

    fn wrap_key(&self, tenant: &str, id: &str, key: &[u8; 32]) -> Result<String> {
        let mut nonce = [0u8; 12];
        rand::rngs::SysRng
            .try_fill_bytes(&mut nonce)
            .context("the operating system's random number generator failed; cannot wrap a key")?;
        let aad = format!("{WRAP_AAD_PREFIX}{tenant}|{id}");
        let mut buf = *key;
        let tag = self
            .wrap
            .encrypt_inout_detached((&nonce).into(), aad.as_bytes(), (&mut buf[..]).into())
            .map_err(|_| anyhow!("cannot wrap key {id}"))?;
        let mut blob = Vec::with_capacity(60);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(tag.as_slice());
        Ok(hex::encode(blob))
    }

    fn unwrap_key<K>(&self, tenant: &str, k: &StoredKey, make: fn([u8; 32]) -> K) -> Result<K> {
        let damaged = || {
            anyhow!(
                "wrapped key {} of tenant {tenant} in the keyring {} does not unwrap although the master key \
                 matches: the keyring was edited or damaged (or the entry was copied from another tenant or \
                 id). Restore {} from a backup",
                escape_for_message(&k.id),
                self.path.display(),
                self.path.display()
            )
        };
        let blob = hex::decode(&k.wrapped).map_err(|_| damaged())?;
        if blob.len() != 12 + 32 + 16 {
            return Err(damaged());
        }
        let nonce: &Nonce<Aes256Gcm> = blob[..12].try_into().map_err(|_| damaged())?;
        let tag: &Tag<Aes256Gcm> = blob[44..].try_into().map_err(|_| damaged())?;
        let mut buf = [0u8; 32];
        buf.copy_from_slice(&blob[12..44]);
        let aad = format!("{WRAP_AAD_PREFIX}{tenant}|{}", k.id);
        let ok =
            self.wrap
                .decrypt_inout_detached(nonce, aad.as_bytes(), (&mut buf[..]).into(), tag);
        let out = ok.map(|()| make(buf)).map_err(|_| damaged());
        wipe(&mut buf);
        out
    }
}

/// The id the tenant's next data key gets: `TENANT-dk-N`, N = one more than
/// the keys it has, skipping ids in use. [`KeyringView::data_key_ingredient`]
/// predicts the first key with it, so a dry run and the real run agree.
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
        self.file
            .as_ref()
            .and_then(|f| f.tenants.get(tenant))
            .is_some_and(|e| e.data_keys.iter().any(|k| k.id == key_id))
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
        Some(t) => Err(KeyError::Forgotten {
            tenant: tenant.into(),
            at: t.forgotten_at.clone(),
        }
        .into()),
        None => Ok(()),
    }
}

fn read_keyring(path: &Path) -> Result<KeyringFile> {
    check_private(path, "keyring")?;
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read the keyring {}", path.display()))?;
    let file: KeyringFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "the keyring {} is not valid keyring JSON; restore it from a backup (do not delete it: the \
             data keys exist only there)",
            path.display()
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
    Ok(file)
}

#[cfg(test)]
mod tests;
