//! Master-key sources: where the key-encryption key that wraps every tenant key
//! lives, and the only two things the keyring asks of it (wrap, unwrap).
//!
//! # Sources, first match wins
//! 1. env `DAGRUN_MASTER_KEY_URI`: an RFC 7512 PKCS#11 URI ([`pkcs11`]);
//! 2. env `DAGRUN_MASTER_KEY`: the key as 64 hex characters ([`file`]);
//! 3. env `DAGRUN_MASTER_KEY_FILE`: a file holding them ([`file`]);
//! 4. `master_key:` in `config/dagrun.yaml`: a PKCS#11 URI (without `pin-value`);
//! 5. the PKCS#11 URI the keyring records (`keys init --master` / `keys rewrap --to`
//!    wrote it; the PIN is never recorded, only its `pin-source`);
//! 6. the default file `<workspace>/.dagrun/keys/master.key`, created on first use.
//!
//! # Rules
//! - Every wrap returns the blob and the name of its mechanism, which the keyring
//!   records per key; unwrapping uses the recorded one (an unknown name is refused):
//!   - `AES-256-GCM` (file/env key, in software) and `CKM_AES_GCM` (in the token):
//!     `nonce(12) || ciphertext(32) || tag(16)` under the caller's associated data;
//!   - `CKM_AES_KEY_WRAP_PAD` (in the token, RFC 5649; for tokens without AES-GCM):
//!     the 72-byte key wrap of `key(32) || blake3-derive(KWP_AAD_CONTEXT, aad)(32)`
//!     — key wrap takes no associated data, so it is bound inside the wrapped
//!     value and checked (constant time) after unwrapping.
//! - A PKCS#11 master key never enters dagrun's memory: wrapping and unwrapping run
//!   inside the token (see [`pkcs11`] for the detection of the mechanism:
//!   AES-GCM if offered, else AES key wrap with padding; `DAGRUN_MASTER_KEY_MECHANISM`
//!   or `master_key_mechanism:` in `config/dagrun.yaml` forces one). An existing
//!   keyring keeps its recorded mechanism unless one is forced. A key that is
//!   extractable, not sensitive, or lacks the permissions of its mechanism is refused.
//! - A file master key lives in memory only as an expanded AES key, wiped on drop.
//! - The keyring's `key_check` tells "wrong master key" from a damaged keyring: for a
//!   file key a blake3 derivation of it, for a PKCS#11 key a wrap of 32 zero bytes
//!   made inside the token (`pkcs11-gcm:` or `pkcs11-kwp:` + hex: the prefix names
//!   the mechanism that made it).
//! - Messages name the source (a path, or the URI without its PIN), never key bytes
//!   or a PIN.

pub mod file;
pub mod pkcs11;
pub mod uri;

use super::keys::MasterKey;
use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use anyhow::{Context, Result, anyhow};
use rand::TryRng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

pub use file::{ENV_MASTER_KEY, ENV_MASTER_KEY_FILE, SEALED_RECORDS, default_master_key_path, keyed_before};
pub use uri::Pkcs11Uri;

/// A PKCS#11 module named by a file of the workspace (`master_key:` in
/// `config/dagrun.yaml`, the URI the keyring records) is refused when it lies
/// inside the workspace: a cloned repository or a shared folder can ship a
/// library owned by whoever copied it, which would then run inside dagrun with
/// the PIN and the tenant keys (review 27; `pkcs11::check_module` refuses
/// modules others could change, wherever they are named). Such a module must
/// also be named by a plain path (no `..`, not through `/proc`), lie outside
/// the repository the workspace is part of, and be root's, it and every
/// folder above it.
fn refuse_module_in_workspace(workspace: &Path, uri: &Pkcs11Uri, from: &str) -> Result<()> {
    let Some(module) = uri.module_path.as_deref() else { return Ok(()) };
    // Named plainly: no `..` and no `/proc` (review 28: `/proc/self/cwd/..`
    // reached a library a repository shipped beside the workspace, wherever
    // it was cloned).
    if module.components().any(|c| c == std::path::Component::ParentDir) || module.starts_with("/proc") {
        return Err(crate::error::config(format!(
            "{from} names the PKCS#11 module {} through `..` or /proc: name the installed module by its plain absolute path \
             (e.g. /usr/lib/softhsm/libsofthsm2.so)",
            module.display()
        )));
    }
    let (Ok(m), Ok(w)) = (std::fs::canonicalize(module), std::fs::canonicalize(workspace)) else { return Ok(()) };
    // The workspace, or the repository it is part of (a folder above it with `.git`).
    let shipped = w.ancestors().find(|a| a.join(".git").exists()).unwrap_or(&w);
    if m.starts_with(&w) || m.starts_with(shipped) {
        return Err(crate::error::config(format!(
            "{from} names the PKCS#11 module {}, which lies inside the workspace {}: dagrun loads no library a \
             workspace or its repository ships. Install the HSM vendor's module outside it (e.g. under /usr/lib) and name that",
            module.display(),
            shipped.display()
        )));
    }
    // Root's, wherever it is (review 28: `/proc/self/cwd/..` reached a
    // library a repository shipped beside the workspace).
    pkcs11::check_module(module, true).map_err(|e| crate::error::config(format!("{from}: {e:#}")))?;
    Ok(())
}

/// Env var holding an RFC 7512 PKCS#11 URI of the master key.
pub const ENV_MASTER_KEY_URI: &str = "DAGRUN_MASTER_KEY_URI";
/// Env var forcing the wrapping mechanism of a PKCS#11 master key: `auto`,
/// `CKM_AES_GCM` or `CKM_AES_KEY_WRAP_PAD` (overrides `master_key_mechanism:`).
pub const ENV_MASTER_KEY_MECHANISM: &str = "DAGRUN_MASTER_KEY_MECHANISM";
/// Recorded mechanism of a file/env master key (AES-256-GCM in software).
pub const MECH_SOFTWARE: &str = "AES-256-GCM";
/// Every mechanism name a keyring may record.
pub const KNOWN_MECHANISMS: [&str; 3] = [MECH_SOFTWARE, pkcs11::MECH_GCM, pkcs11::MECH_KWP];
pub use pkcs11::Mech;

/// Length of a wrapped 32-byte key: nonce, ciphertext, tag.
pub const WRAPPED_LEN: usize = 12 + 32 + 16;
const CHECK_CONTEXT: &str = "dagrun keyring master-key check v1";
const CHECK_AAD: &[u8] = b"dagrun/keycheck/v1";
const HSM_CHECK_PREFIX: &str = "pkcs11-gcm:";
const HSM_KWP_CHECK_PREFIX: &str = "pkcs11-kwp:";
/// blake3 context binding the associated data inside a key-wrap-with-padding blob.
const KWP_AAD_CONTEXT: &str = "dagrun keywrap-pad associated data v1";
/// Length of a `CKM_AES_KEY_WRAP_PAD` blob of 64 bytes (RFC 5649: 8 + 64).
pub const KWP_WRAPPED_LEN: usize = 72;
/// Nonce and associated data reserved for deriving the integrity key inside a token.
const INTEGRITY_NONCE: [u8; 12] = *b"dagrun-ik/v1";
const INTEGRITY_AAD: &[u8] = b"dagrun/integrity-key/v1";

/// Where the master key comes from. `Debug` never shows a key or a PIN.
pub enum MasterKeySource {
    /// The hex text itself (what `DAGRUN_MASTER_KEY` holds). Wiped on drop.
    Env(String),
    /// A file holding 64 hex characters, mode 0600, outside `config/`; must exist.
    File(PathBuf),
    /// `<workspace>/.dagrun/keys/master.key`, created if missing.
    Default,
    /// A key inside a PKCS#11 token; `from` says where the URI was found.
    Pkcs11 { uri: Pkcs11Uri, from: String },
}

impl MasterKeySource {
    /// `DAGRUN_MASTER_KEY_URI`, else `DAGRUN_MASTER_KEY`, else `DAGRUN_MASTER_KEY_FILE`
    /// (each only when set and non-empty), else [`MasterKeySource::Default`].
    pub fn from_env() -> Result<MasterKeySource> {
        if let Some(v) = non_empty_env(ENV_MASTER_KEY_URI) {
            let s = v.into_string().map_err(|_| anyhow!("{ENV_MASTER_KEY_URI} is set but is not text; it must be a pkcs11: URI"))?;
            return Self::from_uri(&s, ENV_MASTER_KEY_URI);
        }
        if let Some(v) = non_empty_env(ENV_MASTER_KEY) {
            let s = v.into_string().map_err(|_| anyhow!("{ENV_MASTER_KEY} is set but is not text; it must be 64 hex characters"))?;
            return Ok(MasterKeySource::Env(s));
        }
        if let Some(p) = non_empty_env(ENV_MASTER_KEY_FILE) {
            return Ok(MasterKeySource::File(PathBuf::from(p)));
        }
        Ok(MasterKeySource::Default)
    }

    /// The source for `workspace`: the environment, else `master_key:` in
    /// `config/dagrun.yaml`, else the URI recorded in the keyring, else the default file.
    pub fn resolve(workspace: &Path) -> Result<MasterKeySource> {
        let env = Self::from_env()?;
        if !matches!(env, MasterKeySource::Default) {
            return Ok(env);
        }
        let cfg = crate::config::DagrunConfig::load(workspace)?;
        if let Some(uri) = cfg.master_key {
            let from = format!("master_key in {}", crate::config::CONFIG_FILE);
            refuse_module_in_workspace(workspace, &uri, &from)?;
            return Ok(MasterKeySource::Pkcs11 { uri, from });
        }
        if let Some(rec) = super::keyring::read_recorded_master(workspace)?
            && let Some(u) = rec.uri
        {
            let uri = Pkcs11Uri::parse(&u)
                .with_context(|| format!("the master key URI recorded in {} is damaged", super::keyring::keyring_path(workspace).display()))?;
            let from = "the URI recorded in the keyring".to_string();
            refuse_module_in_workspace(workspace, &uri, &from)?;
            return Ok(MasterKeySource::Pkcs11 { uri, from });
        }
        Ok(MasterKeySource::Default)
    }

    /// [`MasterKeySource::from_uri`] of a command-line argument (`--master`,
    /// `--to`), which every user of the machine can read (`ps`) and shell
    /// history keeps: a `pin-value` is refused there (review 27).
    pub fn from_argument(s: &str, from: &str) -> Result<MasterKeySource> {
        let source = Self::from_uri(s, from)?;
        if let MasterKeySource::Pkcs11 { uri, .. } = &source
            && uri.has_pin_value()
        {
            return Err(crate::error::config(format!(
                "{from} carries the PIN itself (pin-value): a command line is visible to every user of this machine \
                 (ps) and kept in shell history. Put the PIN in a file readable only by you and use \
                 pin-source=file:/path/to/pin, or give the whole URI in {ENV_MASTER_KEY_URI}"
            )));
        }
        Ok(source)
    }

    /// Parse a `--master` / `--to` argument: a `pkcs11:` URI, `file:PATH` or a path.
    pub fn from_uri(s: &str, from: &str) -> Result<MasterKeySource> {
        if s.starts_with("pkcs11:") {
            let uri = Pkcs11Uri::parse(s).with_context(|| format!("{from} is not a valid PKCS#11 URI"))?;
            return Ok(MasterKeySource::Pkcs11 { uri, from: from.to_string() });
        }
        let path = s.strip_prefix("file:").unwrap_or(s);
        if path.is_empty() {
            return Err(crate::error::config(format!("{from} is empty: give a pkcs11: URI (RFC 7512) or file:PATH of a master key file")));
        }
        Ok(MasterKeySource::File(PathBuf::from(path)))
    }
}

/// Check the workspace's master-key source as opening it would (key file
/// present, private, outside `config/`; `DAGRUN_MASTER_KEY` well-formed)
/// without reading a key, touching a token or creating anything: `status` and
/// cache-key computation refuse a key file others can read. A PKCS#11 source
/// is checked when it is opened.
pub fn check_source(workspace: &Path) -> Result<()> {
    file::check_source(workspace, &MasterKeySource::resolve(workspace)?)
}

fn non_empty_env(name: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

impl fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKeySource::Env(_) => f.write_str("Env([redacted])"),
            MasterKeySource::File(p) => write!(f, "File({})", p.display()),
            MasterKeySource::Default => f.write_str("Default"),
            MasterKeySource::Pkcs11 { uri, .. } => write!(f, "Pkcs11({})", uri.shown()),
        }
    }
}

impl Drop for MasterKeySource {
    fn drop(&mut self) {
        if let MasterKeySource::Env(s) = self {
            super::wipe_string(s);
        }
    }
}

/// What the keyring records about its master key (never key bytes or a PIN).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterRecord {
    /// `file` or `pkcs11`.
    pub kind: String,
    /// How new keys are wrapped: `AES-256-GCM` (in software), `CKM_AES_GCM` or
    /// `CKM_AES_KEY_WRAP_PAD` (in the token). Each key records its own too.
    pub mechanism: String,
    /// For `pkcs11`: the URI without any `pin-value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

enum Inner {
    Local { cipher: Box<Aes256Gcm>, check: [u8; 32], integrity: [u8; 32] },
    Hsm(pkcs11::HsmKey),
}

/// An opened master key: wraps and unwraps 32-byte keys.
pub struct Master {
    inner: Inner,
    desc: String,
}

impl fmt::Debug for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Master([redacted] from {})", self.desc)
    }
}

impl Master {
    /// Open the master key `source` names (creating the default file when the
    /// workspace has no keyring yet).
    pub fn open(workspace: &Path, source: &MasterKeySource) -> Result<Master> {
        match source {
            MasterKeySource::Pkcs11 { uri, from } => {
                let want = requested_mechanism(workspace)?;
                let (key, _) = pkcs11::HsmKey::open(uri, from, None, want.as_ref().map(|(m, f)| (*m, f.as_str())))?;
                Ok(Master { desc: key.describe(), inner: Inner::Hsm(key) })
            }
            other => {
                let (key, desc) = file::load_master(workspace, other)?;
                Ok(Self::local(&key, desc))
            }
        }
    }

    /// Open a PKCS#11 master key, generating it inside the token (non-extractable)
    /// when no key with that label exists (`dagrun keys init --master`) and
    /// `before_create` allows it (it is asked only then, before anything is
    /// made: a refused key is never left in the token).
    pub fn open_or_create(workspace: &Path, source: &MasterKeySource, before_create: &mut dyn FnMut() -> Result<()>) -> Result<(Master, bool)> {
        match source {
            MasterKeySource::Pkcs11 { uri, from } => {
                let want = requested_mechanism(workspace)?;
                let (key, created) = pkcs11::HsmKey::open(uri, from, Some(before_create), want.as_ref().map(|(m, f)| (*m, f.as_str())))?;
                Ok((Master { desc: key.describe(), inner: Inner::Hsm(key) }, created))
            }
            other => Ok((Self::open(workspace, other)?, false)),
        }
    }

    fn local(key: &MasterKey, desc: String) -> Master {
        let check = blake3::derive_key(CHECK_CONTEXT, key.bytes());
        let cipher = Box::new(Aes256Gcm::new(key.bytes().into()));
        let integrity = super::integrity::hkdf_sha256_32(super::integrity::HKDF_SALT, key.bytes(), super::integrity::HKDF_INFO);
        Master { inner: Inner::Local { cipher, check, integrity }, desc }
    }

    /// The integrity key this master derives (`crypto::integrity`), never the
    /// master key itself, for a keyring whose `key_check` is `key_check` (its
    /// prefix says which token mechanism the keyring was made with, so the
    /// derivation never changes under a keyring). A file/env key:
    /// HKDF-SHA256(salt, master bytes, label). A PKCS#11 key (its bytes never
    /// leave the token): HKDF-SHA256 of a fixed-input operation inside the token
    /// — with AES-GCM the encryption of 32 zero bytes under a nonce and
    /// associated data reserved for this one purpose (every wrap uses a random
    /// nonce, so this nonce never encrypts anything else); with key wrap (which
    /// is deterministic) the wrap of 32 zero bytes bound to [`INTEGRITY_AAD`].
    /// Always the same input, so the same output, secret to anyone without the
    /// token key.
    pub fn integrity_key(&self, key_check: &str) -> Result<super::integrity::IntegrityKey> {
        match &self.inner {
            Inner::Local { integrity, .. } => Ok(super::integrity::IntegrityKey::from_bytes(*integrity)),
            Inner::Hsm(k) if key_check.starts_with(HSM_KWP_CHECK_PREFIX) => {
                let mut ikm = kwp_wrap(k, INTEGRITY_AAD, &[0u8; 32])?;
                let key = super::integrity::hkdf_sha256_32(super::integrity::HKDF_SALT, &ikm, super::integrity::HKDF_INFO);
                super::wipe(&mut ikm);
                Ok(super::integrity::IntegrityKey::from_bytes(key))
            }
            Inner::Hsm(k) => {
                let mut ikm = k.encrypt(&INTEGRITY_NONCE, INTEGRITY_AAD, &[0u8; 32])?;
                let key = super::integrity::hkdf_sha256_32(super::integrity::HKDF_SALT, &ikm, super::integrity::HKDF_INFO);
                super::wipe(&mut ikm);
                Ok(super::integrity::IntegrityKey::from_bytes(key))
            }
        }
    }

    /// Where the key is, for messages: `DAGRUN_MASTER_KEY`, `file PATH`, or the URI.
    pub fn describe(&self) -> &str {
        &self.desc
    }

    /// True for a key inside a PKCS#11 token.
    pub fn is_hsm(&self) -> bool {
        matches!(self.inner, Inner::Hsm(_))
    }

    /// What the keyring records about this master.
    pub fn record(&self) -> MasterRecord {
        match &self.inner {
            Inner::Local { .. } => MasterRecord { kind: "file".into(), mechanism: MECH_SOFTWARE.into(), uri: None },
            Inner::Hsm(k) => MasterRecord { kind: "pkcs11".into(), mechanism: k.mech().name().into(), uri: Some(k.uri().recorded()) },
        }
    }

    /// A value stored in the keyring that only this master key reproduces or opens.
    pub fn check_value(&self) -> Result<String> {
        match &self.inner {
            Inner::Local { check, .. } => Ok(hex::encode(check)),
            Inner::Hsm(k) => {
                let prefix = match k.mech() {
                    Mech::Gcm => HSM_CHECK_PREFIX,
                    Mech::Kwp => HSM_KWP_CHECK_PREFIX,
                };
                Ok(format!("{prefix}{}", hex::encode(self.wrap(CHECK_AAD, &[0u8; 32])?.0)))
            }
        }
    }

    /// The mechanism new wraps use (the recorded name).
    pub fn mechanism(&self) -> &'static str {
        match &self.inner {
            Inner::Local { .. } => MECH_SOFTWARE,
            Inner::Hsm(k) => k.mech().name(),
        }
    }

    /// Keep wrapping new keys with `recorded`, the mechanism an existing keyring
    /// records, unless a setting forced another one (PKCS#11 only).
    pub fn adopt_recorded(&mut self, recorded: &str) -> Result<()> {
        if let (Inner::Hsm(k), Some(m)) = (&mut self.inner, Mech::from_name(recorded)) {
            k.adopt(m)?;
        }
        Ok(())
    }

    /// Does `stored` (a keyring's `key_check`) belong to this master key?
    pub fn verify_check(&self, stored: &str) -> Result<bool> {
        match &self.inner {
            Inner::Local { check, .. } => Ok(blake3::Hash::from_hex(stored.as_bytes())
                // blake3::Hash compares in constant time.
                .map(|h| h == blake3::Hash::from(*check))
                .unwrap_or(false)),
            Inner::Hsm(_) => {
                let (mech, h) = if let Some(h) = stored.strip_prefix(HSM_CHECK_PREFIX) {
                    (pkcs11::MECH_GCM, h)
                } else if let Some(h) = stored.strip_prefix(HSM_KWP_CHECK_PREFIX) {
                    (pkcs11::MECH_KWP, h)
                } else {
                    return Ok(false);
                };
                let Ok(blob) = hex::decode(h) else { return Ok(false) };
                match self.unwrap(Some(mech), CHECK_AAD, &blob)? {
                    Some(mut k) => {
                        let ok = k == [0u8; 32];
                        super::wipe(&mut k);
                        Ok(ok)
                    }
                    None => Ok(false),
                }
            }
        }
    }

    /// Wrap a 32-byte key under `aad` with this master's mechanism: the blob and
    /// the mechanism's name (to record beside it).
    pub fn wrap(&self, aad: &[u8], key: &[u8; 32]) -> Result<(Vec<u8>, &'static str)> {
        if let Inner::Hsm(k) = &self.inner
            && k.mech() == Mech::Kwp
        {
            let blob = kwp_wrap(k, aad, key)?;
            if blob.len() != KWP_WRAPPED_LEN {
                anyhow::bail!(
                    "the token behind {} returned {} bytes for an AES key wrap with padding of 64 bytes (expected {KWP_WRAPPED_LEN})",
                    self.desc,
                    blob.len()
                );
            }
            return Ok((blob, pkcs11::MECH_KWP));
        }
        Ok((self.wrap_gcm(aad, key)?.to_vec(), self.mechanism()))
    }

    /// AES-GCM wrap (in software or in the token): `nonce || ciphertext || tag`.
    fn wrap_gcm(&self, aad: &[u8], key: &[u8; 32]) -> Result<[u8; WRAPPED_LEN]> {
        let mut nonce = [0u8; 12];
        rand::rngs::SysRng.try_fill_bytes(&mut nonce).context("the operating system's random number generator failed; cannot wrap a key")?;
        let mut out = [0u8; WRAPPED_LEN];
        out[..12].copy_from_slice(&nonce);
        match &self.inner {
            Inner::Local { cipher, .. } => {
                let mut buf = *key;
                let tag = cipher.encrypt_inout_detached((&nonce).into(), aad, (&mut buf[..]).into()).map_err(|_| anyhow!("cannot wrap a key"))?;
                out[12..44].copy_from_slice(&buf);
                out[44..].copy_from_slice(tag.as_slice());
                super::wipe(&mut buf);
            }
            Inner::Hsm(k) => {
                let ct = k.encrypt(&nonce, aad, key)?;
                if ct.len() != 48 {
                    anyhow::bail!("the token behind {} returned {} bytes for an AES-GCM encryption of 32 bytes (expected 48)", self.desc, ct.len());
                }
                out[12..].copy_from_slice(&ct);
            }
        }
        Ok(out)
    }

    /// Unwrap a key wrapped with the mechanism `mech` records (`None`: a key
    /// written before mechanisms were recorded, i.e. this master's AES-GCM);
    /// `Ok(None)` when it does not authenticate (wrong key, wrong associated data,
    /// edited blob, wrong length). An unknown mechanism, or one this kind of master
    /// cannot run, and a lost HSM session are errors. The caller wipes the bytes.
    pub fn unwrap(&self, mech: Option<&str>, aad: &[u8], blob: &[u8]) -> Result<Option<[u8; 32]>> {
        let mech = mech.unwrap_or(match &self.inner {
            Inner::Local { .. } => MECH_SOFTWARE,
            Inner::Hsm(_) => pkcs11::MECH_GCM,
        });
        if !KNOWN_MECHANISMS.contains(&mech) {
            anyhow::bail!("unknown key-wrapping mechanism \"{}\" (this dagrun knows {})", super::escape_for_message(mech), KNOWN_MECHANISMS.join(", "));
        }
        let usable = match &self.inner {
            Inner::Local { .. } => mech == MECH_SOFTWARE,
            Inner::Hsm(_) => mech != MECH_SOFTWARE,
        };
        if !usable {
            anyhow::bail!("a key wrapped with {mech} cannot be unwrapped by {} (a {} master key)", self.desc, if self.is_hsm() { "PKCS#11" } else { "file" });
        }
        if let Inner::Hsm(k) = &self.inner
            && mech == pkcs11::MECH_KWP
        {
            return kwp_unwrap(k, aad, blob);
        }
        let Ok(blob) = <&[u8; WRAPPED_LEN]>::try_from(blob) else { return Ok(None) };
        match &self.inner {
            Inner::Local { cipher, .. } => {
                let nonce: &Nonce<Aes256Gcm> = blob[..12].try_into().map_err(|_| anyhow!("bad nonce"))?;
                let tag: &Tag<Aes256Gcm> = blob[44..].try_into().map_err(|_| anyhow!("bad tag"))?;
                let mut buf = [0u8; 32];
                buf.copy_from_slice(&blob[12..44]);
                match cipher.decrypt_inout_detached(nonce, aad, (&mut buf[..]).into(), tag) {
                    Ok(()) => Ok(Some(buf)),
                    Err(_) => {
                        super::wipe(&mut buf);
                        Ok(None)
                    }
                }
            }
            Inner::Hsm(k) => k.decrypt(blob[..12].try_into().expect("12 bytes"), aad, &blob[12..]),
        }
    }
}

/// The value key wrap protects: the key, then its associated data's digest.
fn kwp_payload(aad: &[u8], key: &[u8; 32]) -> [u8; 64] {
    let mut p = [0u8; 64];
    p[..32].copy_from_slice(key);
    p[32..].copy_from_slice(&blake3::derive_key(KWP_AAD_CONTEXT, aad));
    p
}

fn kwp_wrap(k: &pkcs11::HsmKey, aad: &[u8], key: &[u8; 32]) -> Result<Vec<u8>> {
    let mut p = kwp_payload(aad, key);
    let out = k.kwp_wrap(&p);
    super::wipe(&mut p);
    out
}

fn kwp_unwrap(k: &pkcs11::HsmKey, aad: &[u8], blob: &[u8]) -> Result<Option<[u8; 32]>> {
    if blob.len() != KWP_WRAPPED_LEN {
        return Ok(None);
    }
    let Some(mut v) = k.kwp_unwrap(blob)? else { return Ok(None) };
    let out = if v.len() == 64
        // blake3::Hash compares in constant time.
        && blake3::Hash::from(<[u8; 32]>::try_from(&v[32..]).expect("32 bytes")) == blake3::Hash::from(blake3::derive_key(KWP_AAD_CONTEXT, aad))
    {
        Some(<[u8; 32]>::try_from(&v[..32]).expect("32 bytes"))
    } else {
        None
    };
    super::wipe(&mut v);
    Ok(out)
}

/// The mechanism a setting forces, and which setting: `DAGRUN_MASTER_KEY_MECHANISM`,
/// else `master_key_mechanism:` in `config/dagrun.yaml`; `None` = detect (`auto`).
pub fn requested_mechanism(workspace: &Path) -> Result<Option<(Mech, String)>> {
    if let Some(v) = non_empty_env(ENV_MASTER_KEY_MECHANISM) {
        let s = v.to_string_lossy();
        return match parse_mechanism_setting(&s) {
            Some(m) => Ok(m.map(|m| (m, ENV_MASTER_KEY_MECHANISM.to_string()))),
            None => Err(crate::error::config(format!(
                "{ENV_MASTER_KEY_MECHANISM} is \"{}\": it must be auto, {} or {}",
                super::escape_for_message(&s),
                pkcs11::MECH_GCM,
                pkcs11::MECH_KWP
            ))),
        };
    }
    let cfg = crate::config::DagrunConfig::load(workspace)?;
    Ok(cfg.master_key_mechanism.map(|m| (m, format!("master_key_mechanism in {}", crate::config::CONFIG_FILE))))
}

/// `auto` (detect: `Some(None)`), `CKM_AES_GCM`, `CKM_AES_KEY_WRAP_PAD`; else `None`.
pub fn parse_mechanism_setting(s: &str) -> Option<Option<Mech>> {
    match s.trim() {
        "auto" => Some(None),
        other => Mech::from_name(other).map(Some),
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Inner::Local { check, integrity, .. } = &mut self.inner {
            super::wipe(check);
            super::wipe(integrity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_wrap_round_trips_and_binds_aad() {
        let m = Master::local(&MasterKey::from_bytes([7; 32]), "test".into());
        let (blob, mech) = m.wrap(b"a", &[9; 32]).unwrap();
        assert_eq!(mech, MECH_SOFTWARE);
        assert_eq!(m.unwrap(Some(mech), b"a", &blob).unwrap(), Some([9; 32]));
        assert_eq!(m.unwrap(None, b"a", &blob).unwrap(), Some([9; 32]));
        assert_eq!(m.unwrap(Some(mech), b"b", &blob).unwrap(), None);
        assert_eq!(m.unwrap(Some(mech), b"a", &blob[1..]).unwrap(), None);
        let e = m.unwrap(Some("CKM_ROT13"), b"a", &blob).unwrap_err().to_string();
        assert!(e.contains("unknown key-wrapping mechanism \"CKM_ROT13\""), "{e}");
        let e = m.unwrap(Some(pkcs11::MECH_KWP), b"a", &blob).unwrap_err().to_string();
        assert!(e.contains("cannot be unwrapped"), "{e}");
        let other = Master::local(&MasterKey::from_bytes([8; 32]), "other".into());
        assert_eq!(other.unwrap(Some(mech), b"a", &blob).unwrap(), None);
        let check = m.check_value().unwrap();
        assert!(m.verify_check(&check).unwrap());
        assert!(!other.verify_check(&check).unwrap());
        assert!(!m.verify_check("pkcs11-gcm:00").unwrap());
        assert_eq!(m.record().kind, "file");
        assert!(!format!("{m:?}").contains("0707"));
    }

    #[test]
    fn mechanism_settings_parse() {
        assert_eq!(parse_mechanism_setting("auto"), Some(None));
        assert_eq!(parse_mechanism_setting("CKM_AES_GCM"), Some(Some(Mech::Gcm)));
        assert_eq!(parse_mechanism_setting(" CKM_AES_KEY_WRAP_PAD "), Some(Some(Mech::Kwp)));
        assert_eq!(parse_mechanism_setting("CKM_AES_KEY_WRAP"), None);
        assert_eq!(kwp_payload(b"x", &[1; 32])[..32], [1; 32]);
        assert_ne!(kwp_payload(b"x", &[1; 32])[32..], kwp_payload(b"y", &[1; 32])[32..]);
    }
}
