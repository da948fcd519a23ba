//! [`ContentHash`]: a blake3 content hash, exactly 64 lowercase hex digits.
//!
//! Rules:
//! - Every hash read back from disk (state files, action-cache entries,
//!   directory listings, the hash memo, cache object names) is parsed into a
//!   `ContentHash` once, when the record is read. Anything else is an error
//!   naming the file and the field — never a panic, never a path component.
//! - Cache object paths are built only from a `ContentHash`
//!   (`Cas::object_path`), so no text from disk can steer a path.
//! - `short()` (the first 12 digits, for messages) cannot panic.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A blake3 hash as 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(String);

/// Why a text is not a content hash (shape only: the text itself may be
/// anything, so it is not repeated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a content hash ({0}); expected 64 lowercase hex digits")]
pub struct BadHash(String);

impl ContentHash {
    /// Parse `s`: exactly 64 characters `0-9a-f`.
    pub fn parse(s: &str) -> Result<ContentHash, BadHash> {
        if s.len() != 64 {
            return Err(BadHash(format!("{} characters", s.chars().count())));
        }
        if let Some(c) = s.bytes().find(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            let what = if c.is_ascii_hexdigit() { "an upper-case hex digit".to_string() } else { "a character that is not a hex digit".to_string() };
            return Err(BadHash(format!("64 characters with {what}")));
        }
        Ok(ContentHash(s.to_string()))
    }

    /// The blake3 hash of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> ContentHash {
        ContentHash::from(blake3::hash(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits (for messages).
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl From<blake3::Hash> for ContentHash {
    fn from(h: blake3::Hash) -> ContentHash {
        ContentHash(h.to_hex().to_string())
    }
}

impl std::str::FromStr for ContentHash {
    type Err = BadHash;
    fn from_str(s: &str) -> Result<Self, BadHash> {
        ContentHash::parse(s)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.0)
    }
}

impl AsRef<str> for ContentHash {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ContentHash {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for ContentHash {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<&str> for ContentHash {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl Serialize for ContentHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ContentHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ContentHash::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The first 12 characters of any text shown as a hash (never panics).
pub fn short(s: &str) -> &str {
    match s.char_indices().nth(12) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_64_lowercase_hex() {
        let h = ContentHash::of_bytes(b"x");
        assert_eq!(ContentHash::parse(h.as_str()).unwrap(), h);
        assert_eq!(h.short().len(), 12);
        for bad in
            ["", "abc", "xx/tmp/victim", &"A".repeat(64), &"0".repeat(63), &"0".repeat(65), &format!("{}/", "0".repeat(63)), &format!("../{}", "0".repeat(61))]
        {
            let e = ContentHash::parse(bad).unwrap_err().to_string();
            assert!(e.contains("64 lowercase hex digits"), "{e}");
            assert!(!bad.is_empty() && !e.contains(bad) || bad.is_empty(), "the bad text is not echoed: {e}");
        }
        let e: Result<ContentHash, _> = serde_json::from_str("\"abc\"");
        assert!(e.unwrap_err().to_string().contains("3 characters"));
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("ééééééééééééééé"), "éééééééééééé");
    }
}
