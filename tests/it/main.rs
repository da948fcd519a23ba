//! The integration suite: one test binary (so arrow, parquet and linfa are linked
//! once), one module per concern. Every test drives the real `dagrun` binary on a
//! temporary workspace; `common` holds the shared helpers.
mod common;

mod bad_pipelines;
mod cache;
mod cmd_spawn;
mod deploy;
mod drift;
mod failures;
mod faults;
mod gc;
mod hardening;
mod hostile;
mod hsm;
mod openlineage;
mod propensity;
mod remote;
mod report;
mod run_records;
mod serve;
mod slurm;
mod tampering;
