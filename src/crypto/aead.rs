//! AES-256-GCM encryption of one field value, bound to its place (spec §3).
//!
//! Blob layout: `nonce (12 bytes) || ciphertext (len of plaintext) || tag (16 bytes)`.
//! Associated data: UTF-8 of `tenant + "|" + column + "|" + decimal customer_id`.
//! This is exactly what Python's `AESGCM(key).decrypt(blob[:12], blob[12:], aad)` expects.

use super::keys::DataKey;
use aes::Aes256;
use aes::cipher::BlockCipherEncrypt;
use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::aead::{Nonce, Tag};
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use rand::Rng;
use std::fmt;
use std::io::Write;

/// Nonce length in bytes (96 bits).
pub const NONCE_LEN: usize = 12;
/// GCM tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Bytes a blob has beyond its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Why a field did not decrypt; downcast from `anyhow::Error` to tell the cases apart.
/// Messages never contain key bytes or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum FieldError {
    /// Shorter than nonce + tag.
    #[error(
        "ciphertext for customer {customer_id} of tenant {tenant} is {len} bytes, shorter than the \
         {OVERHEAD} bytes of nonce and tag: it was truncated or is not a dagrun ciphertext"
    )]
    TooShort { tenant: String, customer_id: i64, len: usize },
    /// Tag check failed.
    #[error(
        "ciphertext for customer {customer_id} of tenant {tenant} does not authenticate \
         (wrong key, tampered, truncated, or moved from another row/tenant)"
    )]
    NotAuthentic { tenant: String, customer_id: i64 },
}

/// The associated data that binds a ciphertext to its place:
/// UTF-8 of `tenant + "|" + column + "|" + decimal customer_id`.
pub fn aad(tenant: &str, column: &str, customer_id: i64) -> Vec<u8> {
    format!("{tenant}|{column}|{customer_id}").into_bytes()
}

/// Build the AAD into a stack buffer when it fits (tenant ids are at most 64
/// bytes), else on the heap; calls `f` with it. Avoids an allocation per row.
fn with_aad<R>(tenant: &str, column: &str, customer_id: i64, f: impl FnOnce(&[u8]) -> R) -> R {
    let mut stack = [0u8; 192];
    let need = tenant.len() + column.len() + 2 + 20;
    if need <= stack.len() {
        let mut cur: &mut [u8] = &mut stack[..];
        // Cannot fail: capacity checked above (an i64 has at most 20 characters).
        let _ = write!(cur, "{tenant}|{column}|{customer_id}");
        let left = cur.len();
        let used = stack.len() - left;
        f(&stack[..used])
    } else {
        f(&aad(tenant, column, customer_id))
    }
}

/// Append the decimal digits of `v` (with `-` when negative): what
/// `format!("{v}")` gives, without the formatting machinery.
fn push_decimal(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    let mut n = v.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Append `bytes` as GHASH blocks, the last one zero-padded.
fn push_padded(out: &mut Vec<ghash::Block>, bytes: &[u8]) {
    for chunk in bytes.chunks(16) {
        let mut b = ghash::Block::default();
        b[..chunk.len()].copy_from_slice(chunk);
        out.push(b);
    }
}

/// A reusable AES-256-GCM cipher for one data key: build it once per (tenant, key)
/// and call [`FieldCipher::encrypt`] for millions of rows. `Send + Sync`: share it
/// between threads by reference or `Arc`.
///
/// Nonces: 96 random bits per call from `rand::rng()` (rand's `ThreadRng`), a
/// ChaCha12 CSPRNG per thread, seeded from the OS RNG and reseeded from it every
/// 64 KiB of output. That is as unpredictable as the OS RNG for our purpose while
/// costing nanoseconds instead of one `getrandom` syscall per row, and it needs no
/// lock, so one `FieldCipher` can be used from many threads at once. Random 96-bit
/// nonces stay safe up to about 2^32 encryptions under one key (NIST SP 800-38D);
/// rotate a tenant's data key well before that.
pub struct FieldCipher {
    cipher: Aes256Gcm,
    /// The same key's block cipher and GHASH key, for [`FieldCipher::encrypt_many`].
    aes: Aes256,
    ghash: GHash,
}

/// Rows whose AES work [`FieldCipher::encrypt_many`] does in one call.
const MANY_ROWS: usize = 256;

impl fmt::Debug for FieldCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FieldCipher([redacted])")
    }
}

impl FieldCipher {
    /// Initialise the cipher (AES key schedule + GHASH key) for `key`.
    pub fn new(key: &DataKey) -> Self {
        let aes = <Aes256 as KeyInit>::new(key.bytes().into());
        let mut h = ghash::Key::default();
        aes.encrypt_block(&mut h);
        let ghash = GHash::new(&h);
        super::wipe(h.as_mut_slice());
        FieldCipher { cipher: Aes256Gcm::new(key.bytes().into()), aes, ghash }
    }

    /// Encrypt many fields, exactly as [`FieldCipher::encrypt`] would one by one
    /// (same blob format, a fresh random nonce each), calling `emit` with each
    /// blob in order. AES-GCM is computed here from its two RustCrypto parts —
    /// AES-256 in counter mode and GHASH — so that the AES blocks of up to
    /// [`MANY_ROWS`] rows (every row's `J0, J0+1, …`) are encrypted in one call:
    /// the wide (VAES) AES backend then runs at full width instead of paying its
    /// set-up for each 2–3-block field. The tests check every byte against the
    /// `aes-gcm` crate (and decryption, which is `aes-gcm`'s own).
    pub fn encrypt_many<'v>(&self, tenant: &str, column: &str, rows: impl Iterator<Item = (i64, &'v [u8])>, emit: impl FnMut(&[u8])) {
        self.encrypt_many_with(tenant, column, rows, |n: &mut [u8]| rand::rng().fill_bytes(n), emit)
    }

    fn encrypt_many_with<'v>(
        &self,
        tenant: &str,
        column: &str,
        mut rows: impl Iterator<Item = (i64, &'v [u8])>,
        mut nonces: impl FnMut(&mut [u8]),
        mut emit: impl FnMut(&[u8]),
    ) {
        let mut group: Vec<(i64, &[u8])> = Vec::with_capacity(MANY_ROWS);
        let mut nonce_bytes = vec![0u8; MANY_ROWS * NONCE_LEN];
        let mut blocks: Vec<aes::Block> = Vec::new();
        let mut blob = Vec::new();
        // GHASH input of one row: AAD and ciphertext, each zero-padded to
        // whole blocks, then the lengths block; hashed in one `update` so
        // GHASH can fold several blocks per reduction.
        let mut gblocks: Vec<ghash::Block> = Vec::new();
        // The AAD is `tenant|column|` (the same for every row) + the id.
        let prefix = format!("{tenant}|{column}|").into_bytes();
        let mut aad_buf = prefix.clone();
        loop {
            group.clear();
            group.extend(rows.by_ref().take(MANY_ROWS));
            if group.is_empty() {
                return;
            }
            let nonce_bytes = &mut nonce_bytes[..group.len() * NONCE_LEN];
            nonces(nonce_bytes);
            // Counter blocks: J0 = nonce || 1 (its keystream masks the tag), then
            // J0+1, J0+2, … for the plaintext (the low 32 bits count, big-endian,
            // wrapping: GCM's inc32).
            blocks.clear();
            for ((_, pt), nonce) in group.iter().zip(nonce_bytes.chunks_exact(NONCE_LEN)) {
                assert!(pt.len() as u64 <= (1u64 << 36) - 32, "AES-GCM refused to encrypt a field larger than 64 GiB");
                for i in 0..=pt.len().div_ceil(16) as u32 {
                    let mut b = aes::Block::default();
                    b[..NONCE_LEN].copy_from_slice(nonce);
                    b[NONCE_LEN..].copy_from_slice(&1u32.wrapping_add(i).to_be_bytes());
                    blocks.push(b);
                }
            }
            self.aes.encrypt_blocks(&mut blocks);
            let mut ks = blocks.iter();
            for ((customer_id, pt), nonce) in group.iter().zip(nonce_bytes.chunks_exact(NONCE_LEN)) {
                let mask = ks.next().expect("one J0 block per row");
                blob.clear();
                blob.extend_from_slice(nonce);
                for (chunk, k) in pt.chunks(16).zip(ks.by_ref()) {
                    blob.extend(chunk.iter().zip(k.iter()).map(|(p, k)| p ^ k));
                }
                let ct = &blob[NONCE_LEN..];
                aad_buf.truncate(prefix.len());
                push_decimal(&mut aad_buf, *customer_id);
                gblocks.clear();
                push_padded(&mut gblocks, &aad_buf);
                push_padded(&mut gblocks, ct);
                let mut lens = ghash::Block::default();
                lens[..8].copy_from_slice(&((aad_buf.len() as u64) * 8).to_be_bytes());
                lens[8..].copy_from_slice(&((ct.len() as u64) * 8).to_be_bytes());
                gblocks.push(lens);
                let mut g = self.ghash.clone();
                g.update(&gblocks);
                let tag = g.finalize();
                blob.extend(tag.iter().zip(mask.iter()).map(|(t, m)| t ^ m));
                emit(&blob);
            }
        }
    }

    /// Append `nonce || ciphertext || tag` of `plaintext` to `out`, with a fresh
    /// random nonce. `out` is not cleared, so one buffer can collect many blobs.
    ///
    /// # Panics
    /// Only if `plaintext` is longer than GCM's limit (about 64 GiB); the message
    /// contains no data.
    pub fn encrypt(&self, tenant: &str, column: &str, customer_id: i64, plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        self.encrypt_with_nonce(tenant, column, customer_id, &nonce, plaintext, out);
    }

    fn encrypt_with_nonce(&self, tenant: &str, column: &str, customer_id: i64, nonce: &[u8; NONCE_LEN], plaintext: &[u8], out: &mut Vec<u8>) {
        out.reserve(plaintext.len() + OVERHEAD);
        out.extend_from_slice(nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = with_aad(tenant, column, customer_id, |aad| {
            let nonce: &Nonce<Aes256Gcm> = nonce.into();
            self.cipher.encrypt_inout_detached(nonce, aad, (&mut out[start..]).into())
        })
        .expect("AES-GCM refused to encrypt a field larger than 64 GiB");
        out.extend_from_slice(tag.as_slice());
    }

    /// Check and decrypt `blob` (`nonce || ciphertext || tag`), appending the
    /// plaintext to `out`. On error nothing is appended.
    pub fn decrypt(&self, tenant: &str, column: &str, customer_id: i64, blob: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
        if blob.len() < OVERHEAD {
            return Err(FieldError::TooShort { tenant: tenant.to_string(), customer_id, len: blob.len() }.into());
        }
        let (nonce, rest) = blob.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let start = out.len();
        out.extend_from_slice(ct);
        // Lengths are fixed by the split above, so these conversions cannot fail.
        let nonce: &Nonce<Aes256Gcm> = nonce.try_into().expect("nonce is 12 bytes");
        let tag: &Tag<Aes256Gcm> = tag.try_into().expect("tag is 16 bytes");
        let ok = with_aad(tenant, column, customer_id, |aad| self.cipher.decrypt_inout_detached(nonce, aad, (&mut out[start..]).into(), tag));
        if ok.is_err() {
            super::wipe(&mut out[start..]);
            out.truncate(start);
            return Err(FieldError::NotAuthentic { tenant: tenant.to_string(), customer_id }.into());
        }
        Ok(())
    }

    /// Decrypt into a new `Vec`.
    pub fn decrypt_to_vec(&self, tenant: &str, column: &str, customer_id: i64, blob: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(blob.len().saturating_sub(OVERHEAD));
        self.decrypt(tenant, column, customer_id, blob, &mut out)?;
        Ok(out)
    }
}

/// Encrypt one field: returns `nonce(12) || ciphertext || tag(16)` (AES-256-GCM,
/// fresh random nonce). For many rows build a [`FieldCipher`] once instead.
pub fn encrypt_field(key: &DataKey, tenant: &str, column: &str, customer_id: i64, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
    FieldCipher::new(key).encrypt(tenant, column, customer_id, plaintext, &mut out);
    out
}

/// Decrypt one field written by [`encrypt_field`] / [`FieldCipher::encrypt`].
/// Errors are [`FieldError`]s (downcastable).
pub fn decrypt_field(key: &DataKey, tenant: &str, column: &str, customer_id: i64, blob: &[u8]) -> anyhow::Result<Vec<u8>> {
    FieldCipher::new(key).decrypt_to_vec(tenant, column, customer_id, blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COL: &str = "Sensitive_Data";

    fn key() -> DataKey {
        DataKey::from_bytes(std::array::from_fn(|i| i as u8))
    }

    /// `encrypt_many` must give, byte for byte, what `aes-gcm` gives one field
    /// at a time with the same nonces: every length from 0 to 100 bytes (empty,
    /// partial and whole blocks), more rows than one group, a long tenant id.
    #[test]
    fn encrypt_many_equals_aes_gcm_field_by_field() {
        let c = FieldCipher::new(&key());
        let values: Vec<Vec<u8>> = (0..700usize).map(|i| (0..i % 101).map(|j| (i * 31 + j * 7) as u8).collect()).collect();
        for tenant in ["Tenant_A", &"T".repeat(64)] {
            let mut counter = 0u64;
            let mut got = Vec::new();
            c.encrypt_many_with(
                tenant,
                COL,
                values.iter().enumerate().map(|(i, v)| (i as i64 * 7919 - 3, v.as_slice())),
                |buf: &mut [u8]| {
                    for n in buf.chunks_exact_mut(NONCE_LEN) {
                        n[..8].copy_from_slice(&counter.to_le_bytes());
                        n[8..].copy_from_slice(&[0xa5; 4]);
                        counter += 1;
                    }
                },
                |blob| got.push(blob.to_vec()),
            );
            assert_eq!(got.len(), values.len());
            for (i, v) in values.iter().enumerate() {
                let mut nonce = [0xa5u8; NONCE_LEN];
                nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let mut want = Vec::new();
                c.encrypt_with_nonce(tenant, COL, i as i64 * 7919 - 3, &nonce, v, &mut want);
                assert_eq!(got[i], want, "row {i} ({} bytes)", v.len());
                assert_eq!(&c.decrypt_to_vec(tenant, COL, i as i64 * 7919 - 3, &got[i]).unwrap(), v);
            }
            // Fresh random nonces in normal use.
            let mut blobs = Vec::new();
            c.encrypt_many(tenant, COL, [(1, &b"same"[..]), (1, &b"same"[..])].into_iter(), |b| blobs.push(b.to_vec()));
            assert_ne!(blobs[0][..NONCE_LEN], blobs[1][..NONCE_LEN]);
            assert_eq!(c.decrypt_to_vec(tenant, COL, 1, &blobs[1]).unwrap(), b"same");
        }
    }

    #[test]
    fn aad_format() {
        assert_eq!(aad("Tenant_A", COL, 42), b"Tenant_A|Sensitive_Data|42".to_vec());
        assert_eq!(aad("t-1", "c", -7), b"t-1|c|-7".to_vec());
        assert_eq!(aad("T", COL, i64::MIN), format!("T|Sensitive_Data|{}", i64::MIN).into_bytes());
        // the stack path and the heap path give the same bytes
        let long = "x".repeat(300);
        for t in ["Tenant_A", long.as_str()] {
            with_aad(t, COL, i64::MIN, |a| assert_eq!(a, aad(t, COL, i64::MIN).as_slice()));
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let k = key();
        let pt = b"jane.doe.1234@example.org";
        let blob = encrypt_field(&k, "Tenant_A", COL, 42, pt);
        assert_eq!(blob.len(), pt.len() + OVERHEAD);
        assert_eq!(decrypt_field(&k, "Tenant_A", COL, 42, &blob).unwrap(), pt);
        let empty = encrypt_field(&k, "Tenant_A", COL, 0, b"");
        assert_eq!(empty.len(), OVERHEAD);
        assert_eq!(decrypt_field(&k, "Tenant_A", COL, 0, &empty).unwrap(), b"");
    }

    /// A blob made by Python `cryptography` 48:
    /// `nonce + AESGCM(bytes(range(32))).encrypt(nonce, b"jane.doe.1234@example.org",
    /// b"Tenant_A|Sensitive_Data|42")` with nonce = bytes(range(12)).
    #[test]
    fn matches_python_cryptography() {
        let py = hex::decode("000102030405060708090a0b2d63b87eeb81ad7ea370a5b885a91d15e2bbf7589555300e5f8e486742527b39e5c883de8aae2e6695").unwrap();
        assert_eq!(decrypt_field(&key(), "Tenant_A", COL, 42, &py).unwrap(), b"jane.doe.1234@example.org");
        let mut ours = Vec::new();
        let nonce: [u8; 12] = std::array::from_fn(|i| i as u8);
        FieldCipher::new(&key()).encrypt_with_nonce("Tenant_A", COL, 42, &nonce, b"jane.doe.1234@example.org", &mut ours);
        assert_eq!(ours, py);
    }

    #[test]
    fn moved_ciphertext_fails() {
        let k = key();
        let blob = encrypt_field(&k, "Tenant_A", COL, 42, b"secret@example.org");
        for (t, c, id) in [("Tenant_A", COL, 43), ("Tenant_B", COL, 42), ("Tenant_A", "Other", 42)] {
            let e = decrypt_field(&k, t, c, id, &blob).unwrap_err();
            assert!(matches!(e.downcast_ref::<FieldError>(), Some(FieldError::NotAuthentic { .. })));
            let msg = e.to_string();
            assert!(msg.contains(&format!("customer {id} of tenant {t} does not authenticate")), "{msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
        let other = DataKey::from_bytes([9; 32]);
        assert!(decrypt_field(&other, "Tenant_A", COL, 42, &blob).is_err());
    }

    #[test]
    fn tampering_fails() {
        let k = key();
        let blob = encrypt_field(&k, "Tenant_A", COL, 1, b"secret@example.org");
        for i in [0, NONCE_LEN, blob.len() - 1] {
            let mut b = blob.clone();
            b[i] ^= 1;
            assert!(decrypt_field(&k, "Tenant_A", COL, 1, &b).is_err(), "flipped byte {i}");
        }
        // truncated by one byte: still long enough, fails authentication
        assert!(decrypt_field(&k, "Tenant_A", COL, 1, &blob[..blob.len() - 1]).is_err());
        // too short for nonce + tag: its own message
        let e = decrypt_field(&k, "Tenant_A", COL, 1, &blob[..OVERHEAD - 1]).unwrap_err();
        assert!(matches!(e.downcast_ref::<FieldError>(), Some(FieldError::TooShort { len: 27, .. })), "{e}");
        assert!(e.to_string().contains("truncated"));
        // a failed decrypt appends nothing to the output buffer
        let mut out = b"keep".to_vec();
        let mut bad = blob.clone();
        bad[NONCE_LEN] ^= 1;
        assert!(FieldCipher::new(&k).decrypt("Tenant_A", COL, 1, &bad, &mut out).is_err());
        assert_eq!(out, b"keep");
    }

    #[test]
    fn nonces_are_random() {
        let k = key();
        let a = encrypt_field(&k, "Tenant_A", COL, 1, b"same");
        let b = encrypt_field(&k, "Tenant_A", COL, 1, b"same");
        assert_ne!(a, b);
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        let c = FieldCipher::new(&k);
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let mut out = Vec::new();
            c.encrypt("Tenant_A", COL, i, b"x", &mut out);
            assert!(seen.insert(out[..NONCE_LEN].to_vec()));
        }
    }

    #[test]
    fn field_cipher_appends_and_is_shareable() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<FieldCipher>();
        let c = FieldCipher::new(&key());
        assert_eq!(format!("{c:?}"), "FieldCipher([redacted])");
        let mut out = Vec::new();
        c.encrypt("T", COL, 1, b"one", &mut out);
        let first = out.len();
        c.encrypt("T", COL, 2, b"two", &mut out);
        let mut pt = Vec::new();
        c.decrypt("T", COL, 1, &out[..first], &mut pt).unwrap();
        c.decrypt("T", COL, 2, &out[first..], &mut pt).unwrap();
        assert_eq!(pt, b"onetwo");
        std::thread::scope(|s| {
            for t in 0..2 {
                let c = &c;
                s.spawn(move || {
                    let mut o = Vec::new();
                    c.encrypt("T", COL, t, b"v", &mut o);
                    assert_eq!(c.decrypt_to_vec("T", COL, t, &o).unwrap(), b"v");
                });
            }
        });
    }

    #[test]
    fn decimal_digits_equal_format() {
        for v in [0i64, 1, -1, 9, 10, -10, 42, 123_456_789, i64::MAX, i64::MIN, i64::MIN + 1] {
            let mut out = b"x|".to_vec();
            push_decimal(&mut out, v);
            assert_eq!(out, format!("x|{v}").into_bytes());
        }
    }
}
