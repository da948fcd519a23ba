//! 256-bit key types. Bytes are private, `Debug` prints `[redacted]`, and the
//! bytes are overwritten with zeros when a key is dropped. None of them is
//! `Clone`/`Copy`, so key bytes are not duplicated by accident.

use anyhow::{Context, Result, bail};
use rand::TryRng;
use std::fmt;

/// Fill 32 bytes from the operating system's CSPRNG (getrandom).
pub(crate) fn random_32() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    rand::rngs::SysRng.try_fill_bytes(&mut b).context("the operating system's random number generator failed; cannot create a key")?;
    Ok(b)
}

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name([u8; 32]);

        impl $name {
            /// Wrap existing key bytes (e.g. a key imported from elsewhere, or a test key).
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// A fresh random key from the OS CSPRNG.
            pub fn generate() -> Result<Self> {
                Ok(Self(random_32()?))
            }

            /// Key bytes for use inside this module (ciphers, wrapping).
            pub(crate) fn bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "([redacted])"))
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                zeroize::Zeroize::zeroize(&mut self.0);
            }
        }
        impl zeroize::ZeroizeOnDrop for $name {}

        impl PartialEq for $name {
            /// Constant-time comparison.
            fn eq(&self, other: &Self) -> bool {
                self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            }
        }
        impl Eq for $name {}
    };
}

key_type!(
    /// A tenant's AES-256-GCM data key (encrypts `Sensitive_Data`).
    DataKey
);
key_type!(
    /// A tenant's HMAC-SHA256 pseudonym key (makes `Sensitive_Token`). Always a
    /// separate random key, never the data key.
    PseudonymKey
);
key_type!(
    /// The master key-encryption key that wraps every data and pseudonym key.
    MasterKey
);

impl DataKey {
    /// The raw key bytes, for an explicit, confirmed export only
    /// (see `Keyring::export_data_key_hex`).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl MasterKey {
    /// Parse 64 hex characters (surrounding whitespace ignored). The error never
    /// echoes the input, only its length.
    pub fn from_hex(s: &str) -> Result<MasterKey> {
        let t = s.trim();
        if t.len() != 64 {
            bail!(
                "a master key must be 64 hex characters (32 bytes); the value given has {} characters. \
                 Generate one with `openssl rand -hex 32`",
                t.chars().count()
            );
        }
        let mut b = [0u8; 32];
        if hex::decode_to_slice(t, &mut b).is_err() {
            super::wipe(&mut b);
            bail!(
                "a master key must be 64 hex characters (0-9, a-f); the value given has 64 characters \
                 but not all are hex digits. Generate one with `openssl rand -hex 32`"
            );
        }
        Ok(MasterKey(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn debug_is_redacted() {
        let k = DataKey::from_bytes([0xab; 32]);
        let p = PseudonymKey::from_bytes([0xab; 32]);
        let m = MasterKey::from_hex(HEX).unwrap();
        for s in [format!("{k:?}"), format!("{p:?}"), format!("{m:?}"), format!("{:#?}", Some(&k))] {
            assert!(s.contains("[redacted]"), "{s}");
            assert!(!s.contains("ab") && !s.contains("171") && !s.contains("0011"), "{s}");
        }
    }

    #[test]
    fn master_from_hex() {
        let m = MasterKey::from_hex(&format!("  {}\n", HEX.to_uppercase())).unwrap();
        assert_eq!(m.bytes()[1], 0x11);
        let bad = format!("{}zz", &HEX[..62]);
        let e = format!("{:#}", MasterKey::from_hex(&bad).unwrap_err());
        assert!(!e.contains(&bad[..20]), "{e}");
        let e = format!("{:#}", MasterKey::from_hex(&HEX[..40]).unwrap_err());
        assert!(e.contains("40 characters") && !e.contains(&HEX[..20]), "{e}");
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(DataKey::generate().unwrap(), DataKey::generate().unwrap());
        assert_eq!(DataKey::from_bytes([1; 32]), DataKey::from_bytes([1; 32]));
    }
}
