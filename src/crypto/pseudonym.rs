//! `Sensitive_Token` = HMAC-SHA256(tenant pseudonym key, UTF-8 value) (spec §3):
//! a stable pseudonym for joins. The pseudonym key is a separate per-tenant key,
//! never the AEAD data key, and it is not rotated with the data key.

use super::keys::PseudonymKey;
use sha2::block_api::compress256;
use std::fmt;
use zeroize::Zeroize;

/// SHA-256's block size and initial state (FIPS 180-4 §5.3.3).
const BLOCK: usize = 64;
const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// HMAC-SHA256 (RFC 2104) for one key, with the key's inner and outer pad
/// blocks already compressed: a [`Pseudonymizer::token`] of a value of up to
/// 55 bytes (an e-mail address) costs exactly two SHA-256 compressions, run by
/// `sha2`'s own compression function (SHA-NI when the CPU has it) on blocks
/// padded here, with no hasher object cloned or buffered. The unit tests
/// check it against the `hmac` crate for every length from 0 to 300 bytes and
/// RFC 4231. The two states are key material: wiped on drop. `Send + Sync`.
#[derive(Clone)]
pub struct Pseudonymizer {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl Drop for Pseudonymizer {
    fn drop(&mut self) {
        self.inner.zeroize();
        self.outer.zeroize();
    }
}

impl fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pseudonymizer([redacted])")
    }
}

impl Pseudonymizer {
    /// Precompute the keyed states for `key` (32 bytes: shorter than a block,
    /// so HMAC zero-pads it; no key hashing).
    pub fn new(key: &PseudonymKey) -> Self {
        let pad = |byte: u8| {
            let mut block = [byte; BLOCK];
            for (b, k) in block.iter_mut().zip(key.bytes()) {
                *b ^= k;
            }
            let mut state = IV;
            compress256(&mut state, std::slice::from_ref(&block));
            block.zeroize();
            state
        };
        Pseudonymizer { inner: pad(0x36), outer: pad(0x5c) }
    }

    /// HMAC-SHA256(key, value).
    pub fn token(&self, value: &[u8]) -> [u8; 32] {
        let mut state = self.inner;
        let full = value.len() / BLOCK * BLOCK;
        let blocks: &[[u8; BLOCK]] = value[..full].as_chunks().0;
        compress256(&mut state, blocks);
        // The inner message is the pad block (64 bytes) then `value`.
        finish(&mut state, &value[full..], BLOCK as u64 + value.len() as u64);
        let mut digest = digest_bytes(&state);
        let mut outer = self.outer;
        finish(&mut outer, &digest, (BLOCK + 32) as u64);
        digest.zeroize();
        digest_bytes(&outer)
    }
}

/// A SHA-256 state as its 32-byte digest (big-endian words).
fn digest_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (d, w) in out.chunks_exact_mut(4).zip(state) {
        d.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// Compress the last `tail` (< 64) bytes of a message of `total` bytes with
/// SHA-256's padding: `0x80`, zeros, the bit length as a big-endian u64 — one
/// block, or two when fewer than 9 bytes are left for it.
fn finish(state: &mut [u32; 8], tail: &[u8], total: u64) {
    let mut blocks = [[0u8; BLOCK]; 2];
    let n = if tail.len() < BLOCK - 8 { 1 } else { 2 };
    let flat = blocks.as_flattened_mut();
    flat[..tail.len()].copy_from_slice(tail);
    flat[tail.len()] = 0x80;
    flat[n * BLOCK - 8..n * BLOCK].copy_from_slice(&(total * 8).to_be_bytes());
    compress256(state, &blocks[..n]);
    blocks.as_flattened_mut().zeroize();
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

    /// The hand-padded path equals the `hmac` crate at every length around
    /// the block and padding boundaries (0..300 bytes).
    #[test]
    fn equals_the_hmac_crate_at_every_length() {
        use hmac::{Hmac, KeyInit, Mac};
        let key = PseudonymKey::from_bytes(std::array::from_fn(|i| (i * 37 + 11) as u8));
        let p = Pseudonymizer::new(&key);
        for len in 0..300usize {
            let value: Vec<u8> = (0..len).map(|i| (i * 131 + len) as u8).collect();
            let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.bytes()).unwrap();
            m.update(&value);
            let want: [u8; 32] = m.finalize().into_bytes().into();
            assert_eq!(p.token(&value), want, "length {len}");
        }
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
