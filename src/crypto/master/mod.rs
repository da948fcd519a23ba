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
//! - Both kinds of master produce the same wrapped blob, `nonce(12) || AES-256-GCM
//!   ciphertext(32) || tag(16)`, under the caller's associated data, so the keyring
//!   format does not depend on where the master lives.
//! - A PKCS#11 master key never enters dagrun's memory: wrapping and unwrapping are
//!   `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM` inside the token. A key that is
//!   extractable, not sensitive, or not allowed to encrypt and decrypt is refused.
//! - A file master key lives in memory only as an expanded AES key, wiped on drop.
//! - The keyring's `key_check` tells "wrong master key" from a damaged keyring: for a
//!   file key a blake3 derivation of it, for a PKCS#11 key a GCM encryption of 32
//!   zero bytes made inside the token (`pkcs11-gcm:` + hex).
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

pub use file::{ENV_MASTER_KEY, ENV_MASTER_KEY_FILE, default_master_key_path};
pub use uri::Pkcs11Uri;

/// Env var holding an RFC 7512 PKCS#11 URI of the master key.
pub const ENV_MASTER_KEY_URI: &str = "DAGRUN_MASTER_KEY_URI";

/// Length of a wrapped 32-byte key: nonce, ciphertext, tag.
pub const WRAPPED_LEN: usize = 12 + 32 + 16;
const CHECK_CONTEXT: &str = "dagrun keyring master-key check v1";
const CHECK_AAD: &[u8] = b"dagrun/keycheck/v1";
const HSM_CHECK_PREFIX: &str = "pkcs11-gcm:";
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
            let s = v
                .into_string()
                .map_err(|_| anyhow!("{ENV_MASTER_KEY} is set but is not text; it must be 64 hex characters"))?;
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
            return Ok(MasterKeySource::Pkcs11 { uri, from: format!("master_key in {}", crate::config::CONFIG_FILE) });
        }
        if let Some(rec) = super::keyring::recorded_master(workspace)
            && let Some(u) = rec.uri
        {
            let uri = Pkcs11Uri::parse(&u).with_context(|| {
                format!("the master key URI recorded in {} is damaged", super::keyring::keyring_path(workspace).display())
            })?;
            return Ok(MasterKeySource::Pkcs11 { uri, from: "the URI recorded in the keyring".into() });
        }
        Ok(MasterKeySource::Default)
    }

    /// Parse a `--master` / `--to` argument: a `pkcs11:` URI, `file:PATH` or a path.
    pub fn from_uri(s: &str, from: &str) -> Result<MasterKeySource> {
        if s.starts_with("pkcs11:") {
            let uri = Pkcs11Uri::parse(s).with_context(|| format!("{from} is not a valid PKCS#11 URI"))?;
            return Ok(MasterKeySource::Pkcs11 { uri, from: from.to_string() });
        }
        let path = s.strip_prefix("file:").unwrap_or(s);
        if path.is_empty() {
            return Err(crate::error::config(format!(
                "{from} is empty: give a pkcs11: URI (RFC 7512) or file:PATH of a master key file"
            )));
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
    /// How keys are wrapped: `AES-256-GCM` (in software) or `CKM_AES_GCM` (in the token).
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
                let key = pkcs11::HsmKey::open(uri, from, false)?;
                Ok(Master { desc: key.describe(), inner: Inner::Hsm(key) })
            }
            other => {
                let (key, desc) = file::load_master(workspace, other)?;
                Ok(Self::local(&key, desc))
            }
        }
    }

    /// Open a PKCS#11 master key, generating it inside the token (non-extractable)
    /// when no key with that label exists (`dagrun keys init --master`).
    pub fn open_or_create(workspace: &Path, source: &MasterKeySource) -> Result<(Master, bool)> {
        match source {
            MasterKeySource::Pkcs11 { uri, from } => {
                let existed = pkcs11::HsmKey::exists(uri, from)?;
                let key = pkcs11::HsmKey::open(uri, from, !existed)?;
                Ok((Master { desc: key.describe(), inner: Inner::Hsm(key) }, !existed))
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
    /// master key itself. A file/env key: HKDF-SHA256(salt, master bytes,
    /// label). A PKCS#11 key (its bytes never leave the token): HKDF-SHA256 of
    /// the token's AES-GCM encryption of 32 zero bytes under a nonce and
    /// associated data reserved for this one purpose — always the same input,
    /// so the same output, secret to anyone without the token key (every wrap
    /// uses a random nonce, so this nonce never encrypts anything else).
    pub fn integrity_key(&self) -> Result<super::integrity::IntegrityKey> {
        match &self.inner {
            Inner::Local { integrity, .. } => Ok(super::integrity::IntegrityKey::from_bytes(*integrity)),
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
            Inner::Local { .. } => MasterRecord { kind: "file".into(), mechanism: "AES-256-GCM".into(), uri: None },
            Inner::Hsm(k) => MasterRecord {
                kind: "pkcs11".into(),
                mechanism: k.mechanism().into(),
                uri: Some(k.uri().recorded()),
            },
        }
    }

    /// A value stored in the keyring that only this master key reproduces or opens.
    pub fn check_value(&self) -> Result<String> {
        match &self.inner {
            Inner::Local { check, .. } => Ok(hex::encode(check)),
            Inner::Hsm(_) => Ok(format!("{HSM_CHECK_PREFIX}{}", hex::encode(self.wrap(CHECK_AAD, &[0u8; 32])?))),
        }
    }

    /// Does `stored` (a keyring's `key_check`) belong to this master key?
    pub fn verify_check(&self, stored: &str) -> Result<bool> {
        match &self.inner {
            Inner::Local { check, .. } => Ok(blake3::Hash::from_hex(stored.as_bytes())
                // blake3::Hash compares in constant time.
                .map(|h| h == blake3::Hash::from(*check))
                .unwrap_or(false)),
            Inner::Hsm(_) => {
                let Some(h) = stored.strip_prefix(HSM_CHECK_PREFIX) else { return Ok(false) };
                let Ok(blob) = hex::decode(h) else { return Ok(false) };
                let Ok(blob) = <[u8; WRAPPED_LEN]>::try_from(blob.as_slice()) else { return Ok(false) };
                match self.unwrap(CHECK_AAD, &blob)? {
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

    /// Encrypt a 32-byte key under `aad`: `nonce || ciphertext || tag`.
    pub fn wrap(&self, aad: &[u8], key: &[u8; 32]) -> Result<[u8; WRAPPED_LEN]> {
        let mut nonce = [0u8; 12];
        rand::rngs::SysRng
            .try_fill_bytes(&mut nonce)
            .context("the operating system's random number generator failed; cannot wrap a key")?;
        let mut out = [0u8; WRAPPED_LEN];
        out[..12].copy_from_slice(&nonce);
        match &self.inner {
            Inner::Local { cipher, .. } => {
                let mut buf = *key;
                let tag = cipher
                    .encrypt_inout_detached((&nonce).into(), aad, (&mut buf[..]).into())
                    .map_err(|_| anyhow!("cannot wrap a key"))?;
                out[12..44].copy_from_slice(&buf);
                out[44..].copy_from_slice(tag.as_slice());
                super::wipe(&mut buf);
            }
            Inner::Hsm(k) => {
                let ct = k.encrypt(&nonce, aad, key)?;
                if ct.len() != 48 {
                    anyhow::bail!(
                        "the token behind {} returned {} bytes for an AES-GCM encryption of 32 bytes (expected 48)",
                        self.desc,
                        ct.len()
                    );
                }
                out[12..].copy_from_slice(&ct);
            }
        }
        Ok(out)
    }

    /// Decrypt a wrapped key; `Ok(None)` when it does not authenticate (wrong key,
    /// wrong associated data, edited blob). Other failures (a lost HSM session) are
    /// errors. The caller wipes the returned bytes.
    pub fn unwrap(&self, aad: &[u8], blob: &[u8; WRAPPED_LEN]) -> Result<Option<[u8; 32]>> {
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
        let blob = m.wrap(b"a", &[9; 32]).unwrap();
        assert_eq!(m.unwrap(b"a", &blob).unwrap(), Some([9; 32]));
        assert_eq!(m.unwrap(b"b", &blob).unwrap(), None);
        let other = Master::local(&MasterKey::from_bytes([8; 32]), "other".into());
        assert_eq!(other.unwrap(b"a", &blob).unwrap(), None);
        let check = m.check_value().unwrap();
        assert!(m.verify_check(&check).unwrap());
        assert!(!other.verify_check(&check).unwrap());
        assert!(!m.verify_check("pkcs11-gcm:00").unwrap());
        assert_eq!(m.record().kind, "file");
        assert!(!format!("{m:?}").contains("0707"));
    }
}
