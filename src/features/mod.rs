//! Feature sets. Each version is one module whose formulas are the only copy
//! in the code base: training (`afe`), the feature store and serving
//! (`predict`, `serve-check`) all call them.
pub mod drift;
pub mod v1;

/// Feature set versions this build can compute.
pub const KNOWN_VERSIONS: &[&str] = &[v1::VERSION];
