//! dagrun: a DAG runner for regulated, multi-tenant ML pipelines.
pub mod features;
pub mod util;
