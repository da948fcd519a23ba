//! Per-tenant encryption of `Sensitive_Data` (spec `propensity.md` §3).
//!
//! - [`keys`]: the 32-byte key types ([`DataKey`], [`PseudonymKey`], [`MasterKey`]);
//!   their `Debug` prints `[redacted]` and their bytes are wiped on drop.
//!
//! # Key material is zeroized; the process never dumps core
//! Every key type is `ZeroizeOnDrop` (the `zeroize` crate), and so are the
//! cipher states built from keys: AES-GCM (aes-gcm's `zeroize` feature: the
//! AES key schedule and the GHASH key) and the HMAC states of pseudonyms
//! (hmac/sha2 `zeroize`). Hex text of a key is wiped before it is freed.
//! `main` calls [`harden_process`] before any key can be loaded, so neither a
//! crash nor `kill -ABRT` writes key material into a core file, and another
//! process of the same user cannot ptrace dagrun to read it.
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
pub mod integrity;
pub mod keyring;
pub mod keys;
pub mod master;
pub mod pseudonym;

pub use aead::{FieldCipher, FieldError, aad, decrypt_field, encrypt_field};
pub use integrity::IntegrityKey;
pub use keyring::{KeyError, KeyInfo, KeyKind, KeyState, Keyring, KeyringView};
pub use keys::{DataKey, MasterKey, PseudonymKey};
pub use master::MasterKeySource;
pub use pseudonym::{Pseudonymizer, token};

/// Overwrite `buf` with zeros in a way the optimiser may not remove
/// (`zeroize`: volatile writes + a compiler fence).
pub(crate) fn wipe(buf: &mut [u8]) {
    use zeroize::Zeroize;
    buf.zeroize();
}

/// Wipe a `String` holding secret text (hex of a key) before it is freed:
/// its whole capacity, not only its length.
pub(crate) fn wipe_string(s: &mut String) {
    use zeroize::Zeroize;
    s.zeroize();
}

/// The core-file size limit dagrun started with, restored for child
/// processes (see [`restore_core_limit_for_child`]); valid once `CORE_LIMIT_KNOWN`.
static CHILD_CORE_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static CHILD_CORE_LIMIT_MAX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static CORE_LIMIT_KNOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Make this process unable to leak key material through core dumps or
/// ptrace: `RLIMIT_CORE` = 0 (soft and hard stay as they are for children,
/// see below) and `PR_SET_DUMPABLE` = 0 on Linux. Call first thing in `main`,
/// before any key is loaded. Errors are ignored on purpose: a platform that
/// refuses the call still runs (there is nothing more dagrun could do).
pub fn harden_process() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit get pointers to live, initialised locals of
    // the right type (`rlimit`) for the duration of the call; prctl with
    // PR_SET_DUMPABLE takes only integers. None of them touch other memory.
    unsafe {
        let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_CORE, &mut old) == 0 {
            CHILD_CORE_LIMIT.store(old.rlim_cur, std::sync::atomic::Ordering::Relaxed);
            CHILD_CORE_LIMIT_MAX.store(old.rlim_max, std::sync::atomic::Ordering::Relaxed);
            CORE_LIMIT_KNOWN.store(true, std::sync::atomic::Ordering::Release);
        }
        // Keep the hard limit so a child can get the user's soft limit back.
        let zero = libc::rlimit { rlim_cur: 0, rlim_max: old.rlim_max };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        #[cfg(target_os = "linux")]
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// In a forked child before `exec` (async-signal-safe: one `setrlimit`): give
/// the command back the core-file limit dagrun started with. A child's core
/// holds the child's memory, not dagrun's keys; `exec` already resets the
/// dumpable flag.
#[cfg(unix)]
pub fn restore_core_limit_for_child() {
    if CORE_LIMIT_KNOWN.load(std::sync::atomic::Ordering::Acquire) {
        let cur = CHILD_CORE_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
        let max = CHILD_CORE_LIMIT_MAX.load(std::sync::atomic::Ordering::Relaxed);
        let lim = libc::rlimit { rlim_cur: cur as libc::rlim_t, rlim_max: max as libc::rlim_t };
        // SAFETY: setrlimit reads a live, initialised `rlimit` local; it is an
        // async-signal-safe syscall, so this is also sound in the pre_exec
        // closure of stages/cmd.rs (no allocation, no lock here).
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &lim);
        }
    }
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
        Err(KeyError::InvalidTenant { shown: escape_for_message(tenant), len: tenant.chars().count() }.into())
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
        let e = validate_tenant("evil\u{1b}[31m\nname").unwrap_err().to_string();
        assert!(!e.contains('\u{1b}') && !e.contains('\n'), "{e}");
        assert!(e.contains("\\u{1b}") && e.contains("\\n"), "{e}");
        assert!(matches!(validate_tenant("a b").unwrap_err().downcast_ref::<KeyError>(), Some(KeyError::InvalidTenant { .. })));
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
