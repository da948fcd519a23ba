//! Datasets of the propensity pipeline (spec §2–§4): schemas, Parquet I/O,
//! the synthetic generator, ingestion of user data, and featurization.
pub mod featurize;
pub mod generate;
pub mod ingest;
pub mod parquet_io;
pub mod schema;

/// Rows per Arrow RecordBatch when streaming.
pub const DEFAULT_BATCH_SIZE: usize = 65_536;

/// The one rule for tenant ids (spec §1): `[A-Za-z0-9_-]{1,64}`. The tenant
/// list, the keyring and the readers all check ids with it.
pub fn is_valid_tenant_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A tenant id (or any untrusted short string) made safe for a message:
/// truncated to 64 characters and escaped with `{:?}`.
pub fn show_tenant(s: &str) -> String {
    let mut t: String = s.chars().take(64).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

/// The shape of an untrusted value read from a data file, for an error
/// message that must not show the value itself (it may be PII: a headerless
/// file's first row, or columns swapped): its length and what it looks like,
/// e.g. `31 characters, looks like an e-mail address`.
pub fn describe_value(s: &str) -> String {
    let n = s.chars().count();
    let t = s.trim();
    let looks = if t.is_empty() {
        "blank"
    } else if let Some((local, domain)) = t.split_once('@')
        && !local.is_empty()
        && domain.contains('.')
        && !t.contains(char::is_whitespace)
    {
        "looks like an e-mail address"
    } else if t.parse::<f64>().is_ok() {
        "looks like a number"
    } else if crate::data::schema::parse_date(t).is_ok() {
        "looks like a date"
    } else if t.bytes().filter(u8::is_ascii_digit).count() * 2 > t.len() {
        "mostly digits (a phone number or an id?)"
    } else if t.contains(char::is_whitespace) {
        "text with spaces"
    } else if s.chars().any(char::is_control) {
        "text with control characters"
    } else {
        "text"
    };
    format!("{n} character{}, {looks}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_described_not_shown() {
        assert_eq!(describe_value("elizabeth.davis.4779@example.org"), "32 characters, looks like an e-mail address");
        assert_eq!(describe_value("12.5"), "4 characters, looks like a number");
        assert_eq!(describe_value("2025-03-01"), "10 characters, looks like a date");
        assert_eq!(describe_value("+1 555 0100 200"), "15 characters, mostly digits (a phone number or an id?)");
        assert_eq!(describe_value("Jane Doe"), "8 characters, text with spaces");
        assert_eq!(describe_value("x"), "1 character, text");
        assert!(!describe_value("secret@example.org").contains("secret"));
    }
}
