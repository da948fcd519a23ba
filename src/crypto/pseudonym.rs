//! `Sensitive_Token` = HMAC-SHA256(tenant pseudonym key, UTF-8 value) (spec §3):
//! a stable pseudonym for joins. The pseudonym key is a separate per-tenant key,
//! never the AEAD data key, and it is not rotated with the data key.

use super::keys::PseudonymKey;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// A keyed HMAC-SHA256 with the key's inner/outer pad states already absorbed:
/// each [`Pseudonymizer::token`] clones that state (a few hundred bytes, no
/// key processing) and hashes only the value. `Send + Sync`.
#[derive(Clone)]
pub struct Pseudonymizer {
    mac: HmacSha256,
}

impl fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pseudonymizer([redacted])")
    }
}

impl Pseudonymizer {
    /// Precompute the keyed state for `key`.
    pub fn new(key: &PseudonymKey) -> Self {
        // HMAC accepts keys of any length; 32 bytes cannot fail.
        let mac = HmacSha256::new_from_slice(key.bytes()).expect("HMAC takes a 32-byte key");
        Pseudonymizer { mac }
    }

    /// HMAC-SHA256(key, value).
    pub fn token(&self, value: &[u8]) -> [u8; 32] {
        let mut m = self.mac.clone();
        m.update(value);
        m.finalize().into_bytes().into()
    }
}

/// HMAC-SHA256(key, value) as 32 bytes. For many values build a [`Pseudonymizer`] once.
pub fn token(key: &PseudonymKey, value: &[u8]) -> [u8; 32] {
    Pseudonymizer::new(key).token(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2. HMAC zero-pads keys shorter than the 64-byte block,
    /// so the 4-byte key "Jefe" equals the 32-byte key "Jefe" + 28 zero bytes.
    #[test]
    fn rfc4231_case_2() {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(b"Jefe");
        let key = PseudonymKey::from_bytes(k);
        let want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let t = token(&key, b"what do ya want for nothing?");
        assert_eq!(hex::encode(t), want);
        // stable: same again, and the reusable state gives the same bytes
        let p = Pseudonymizer::new(&key);
        assert_eq!(p.token(b"what do ya want for nothing?"), t);
        assert_eq!(p.token(b"what do ya want for nothing?"), t);
        assert_ne!(p.token(b"what do ya want for nothing!"), t);
        assert_eq!(format!("{p:?}"), "Pseudonymizer([redacted])");
    }

    #[test]
    fn different_keys_different_tokens() {
        let a = token(&PseudonymKey::from_bytes([1; 32]), b"x@example.org");
        let b = token(&PseudonymKey::from_bytes([2; 32]), b"x@example.org");
        assert_ne!(a, b);
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Pseudonymizer>();
    }
}
