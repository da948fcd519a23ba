//! dagrun: a DAG runner for regulated, multi-tenant ML pipelines.
pub mod engine;
pub mod error;
pub mod features;
pub mod pipeline;
pub mod stages;
pub mod util;
