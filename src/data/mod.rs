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
