//! The workspace integrity key: authenticates the records dagrun writes and
//! later reads back (state files, action-cache entries, the hash memo, model
//! artifacts, feature-store manifests; see `workspace::record`).
//!
//! Rules:
//! - It is derived from the master key with HKDF-SHA256 (RFC 5869), salt
//!   [`HKDF_SALT`], info [`HKDF_INFO`] (its own label), so it is never the
//!   master key itself and knowing it reveals nothing about the master or any
//!   tenant key. A PKCS#11 master key never leaves its token: there the HKDF
//!   input is a fixed-input operation made inside the token with the keyring's
//!   wrapping mechanism — an AES-GCM encryption (`CKM_AES_GCM`) or a key wrap
//!   (`CKM_AES_KEY_WRAP_PAD`), chosen by the prefix of the keyring's `key_check`
//!   so it never changes under a keyring (`crypto::master::Master::integrity_key`).
//! - `keys rewrap` (master-key rotation) keeps it: the keyring then stores the
//!   old integrity key wrapped under the new master, like a tenant key, and
//!   that stored key wins over the derivation, so every record stays valid.
//! - Callers get it only through [`crate::crypto::Keyring::integrity_key`]
//!   (or [`crate::crypto::Keyring::open_existing`] for read-only commands),
//!   so how it is made can change without touching any caller.
//! - A MAC is keyed blake3 (`blake3::keyed_hash`) over a domain label, a
//!   newline and the record's canonical bytes; MACs compare in constant time.
//! - The key is wiped on drop and never printed (`Debug` says `[redacted]`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;

/// HKDF salt of the integrity key.
pub const HKDF_SALT: &[u8] = b"dagrun/hkdf-salt/v1";
/// HKDF info (the label) of the integrity key.
pub const HKDF_INFO: &[u8] = b"dagrun workspace integrity key v1";

/// The 32-byte workspace integrity key.
pub struct IntegrityKey([u8; 32]);

impl fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IntegrityKey([redacted])")
    }
}

impl Drop for IntegrityKey {
    fn drop(&mut self) {
        super::wipe(&mut self.0);
    }
}

/// HKDF-SHA256 with a 32-byte output (one expand block): RFC 5869 §2.2–2.3.
pub fn hkdf_sha256_32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: these cannot fail.
    let mut ext = Hmac::<Sha256>::new_from_slice(salt).expect("HMAC takes any key length");
    ext.update(ikm);
    let mut prk: [u8; 32] = ext.finalize().into_bytes().into();
    let mut exp = Hmac::<Sha256>::new_from_slice(&prk).expect("HMAC takes any key length");
    exp.update(info);
    exp.update(&[1u8]);
    let okm: [u8; 32] = exp.finalize().into_bytes().into();
    super::wipe(&mut prk);
    okm
}

impl IntegrityKey {
    /// Derive an integrity key from 32 bytes of key material (HKDF, own label).
    #[cfg(test)]
    pub(crate) fn derive(ikm: &[u8; 32]) -> IntegrityKey {
        IntegrityKey(hkdf_sha256_32(HKDF_SALT, ikm, HKDF_INFO))
    }

    /// The key bytes (to carry the key across a master-key rewrap).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from raw bytes (tests; an HSM-backed source that unwraps one).
    pub fn from_bytes(bytes: [u8; 32]) -> IntegrityKey {
        IntegrityKey(bytes)
    }

    /// MAC of `bytes` in `domain` (keyed blake3).
    pub fn mac(&self, domain: &str, bytes: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(domain.as_bytes());
        h.update(b"\n");
        h.update(bytes);
        h.finalize()
    }

    /// Does `mac_hex` authenticate `bytes` in `domain`? (constant-time compare)
    pub fn verify(&self, domain: &str, bytes: &[u8], mac_hex: &str) -> bool {
        match blake3::Hash::from_hex(mac_hex.as_bytes()) {
            Ok(m) => m == self.mac(domain, bytes),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_matches_rfc5869_test_case_1() {
        // RFC 5869 A.1 (first 32 bytes of the 42-byte OKM).
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let okm = hkdf_sha256_32(&salt, &ikm, &info);
        assert_eq!(hex::encode(okm), "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf");
    }

    #[test]
    fn derived_key_is_not_the_master_and_macs_bind_domain_and_bytes() {
        let master = [7u8; 32];
        let k = IntegrityKey::derive(&master);
        assert_ne!(k.0, master);
        let m = k.mac("state", b"abc").to_hex().to_string();
        assert!(k.verify("state", b"abc", &m));
        assert!(!k.verify("model", b"abc", &m));
        assert!(!k.verify("state", b"abd", &m));
        assert!(!k.verify("state", b"abc", "zz"));
        assert!(!IntegrityKey::derive(&[8u8; 32]).verify("state", b"abc", &m));
        assert_eq!(format!("{k:?}"), "IntegrityKey([redacted])");
    }
}
