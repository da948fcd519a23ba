//! Per-tenant encryption of `Sensitive_Data` (spec `propensity.md` §3).
//!
//! - [`keys`]: the 32-byte key types ([`DataKey`], [`PseudonymKey`], [`MasterKey`]);
//!   their `Debug` prints `[redacted]` and their bytes are wiped on drop.
//! - [`aead`]: AES-256-GCM field encryption. A blob is `nonce(12) || ciphertext || tag(16)`
//!   and its associated data is the UTF-8 of `tenant + "|" + column + "|" + customer_id`
//!   (decimal), so a ciphertext moved to another row, column or tenant fails to decrypt.
//! - [`pseudonym`]: `Sensitive_Token` = HMAC-SHA256(tenant pseudonym key, value).
//! - [`keyring`]: per-tenant data keys and pseudonym keys, stored only wrapped
//!   (AES-256-GCM) under a master key-encryption key, in
//!   `<workspace>/.dagrun/keys/keyring.json`; rotation and crypto-shredding (`forget`).
//!
//! # Decrypting from Python
//!
//! With a data key exported by [`Keyring::export_data_key_hex`] (64 hex characters),
//! Python's `cryptography` package decrypts a `Sensitive_Data_Enc` value like this:
//!
//! ```text
//! from cryptography.hazmat.primitives.ciphers.aead import AESGCM
//!
//! key = bytes.fromhex(exported_hex)                 # 32 bytes
//! aad = f"{tenant_id}|Sensitive_Data|{customer_id}".encode("utf-8")
//! plaintext = AESGCM(key).decrypt(blob[:12], blob[12:], aad).decode("utf-8")
//! # a wrong key, a wrong row/tenant or a tampered blob raises cryptography.exceptions.InvalidTag
//! ```
//!
//! and recomputes a token with
//! `hmac.new(pseudonym_key, value.encode(), hashlib.sha256).digest()`.

pub mod aead;
pub mod audit;
pub mod keyring;
pub mod master;
pub mod keys;
pub mod pseudonym;

pub use aead::{FieldCipher, FieldError, aad, decrypt_field, encrypt_field};
pub use keyring::{KeyError, KeyInfo, KeyKind, KeyState, Keyring};
pub use master::MasterKeySource;
pub use keys::{DataKey, MasterKey, PseudonymKey};
pub use pseudonym::{Pseudonymizer, token};


/// Overwrite `buf` with zeros in a way the optimiser may not remove (volatile
/// writes + a compiler fence); used to wipe key material on drop without adding
/// the `zeroize` crate.
pub(crate) fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to a u8.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// Wipe a `String` holding secret text (hex of a key) before it is freed.
pub(crate) fn wipe_string(s: &mut String) {
    // SAFETY: zero bytes are valid UTF-8, so the String stays valid.
    wipe(unsafe { s.as_mut_vec() });
    s.clear();
}

/// Render untrusted text for an error message: control and non-ASCII characters
/// escaped (`\n`, `\u{1b}`, ...), cut to 80 characters.
pub(crate) fn escape_for_message(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 80 {
            out.push_str("...");
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// Check a tenant id against `[A-Za-z0-9_-]{1,64}`; the error escapes whatever it quotes.
pub fn validate_tenant(tenant: &str) -> anyhow::Result<()> {
    if crate::data::is_valid_tenant_id(tenant) {
        Ok(())
    } else {
        Err(KeyError::InvalidTenant {
            shown: escape_for_message(tenant),
            len: tenant.chars().count(),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_validated_and_escaped() {
        for ok in ["Tenant_A", "t-1", "a", &"x".repeat(64)] {
            validate_tenant(ok).unwrap();
        }
        for bad in ["", "Tenant A", "a|b", "../x", "é", &"x".repeat(65)] {
            assert!(validate_tenant(bad).is_err(), "{bad:?}");
        }
        let e = validate_tenant("evil\u{1b}[31m\nname")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\u{1b}') && !e.contains('\n'), "{e}");
        assert!(e.contains("\\u{1b}") && e.contains("\\n"), "{e}");
        assert!(matches!(
            validate_tenant("a b")
                .unwrap_err()
                .downcast_ref::<KeyError>(),
            Some(KeyError::InvalidTenant { .. })
        ));
    }

    #[test]
    fn wipe_zeroes() {
        let mut b = [7u8; 32];
        wipe(&mut b);
        assert_eq!(b, [0u8; 32]);
        let mut s = String::from("abcdef");
        wipe_string(&mut s);
        assert!(s.is_empty());
    }
}
