//! dagrun: a DAG runner for regulated, multi-tenant ML pipelines.
//!
//! - [`pipeline`]: YAML model, validation, params, per-tenant expansion, DAG;
//! - [`engine`]: cache keys, content-addressed store, state, lock, scheduler,
//!   run records, lineage;
//! - [`stages`]: the stage kinds (`cmd` and the propensity kinds), one trait;
//! - [`crypto`]: keyring, envelope encryption, AEAD, pseudonyms;
//! - [`data`]: raw/encrypted/feature schemas, generator, ingest, Parquet I/O;
//! - [`features`]: feature sets (fit + transform), the only copy of the formulas;
//! - [`store`]: the versioned Parquet feature store;
//! - [`model`]: split, scaling, logistic regression, metrics, artifacts;
//! - [`scoring`]: raw rows -> features -> scores, shared by `predict`, `serve-check` and `serve`;
//! - [`workspace`]: the one owner of paths and the lock, content hashes,
//!   authenticated records, the content-addressed store;
//! - [`remote`]: the shared remote cache (object_store: S3, GCS, Azure, local);
//! - [`config`]: `config/dagrun.yaml`, optional workspace settings;
//! - [`report`]: `dagrun report`, one run as a self-contained HTML page;
//! - [`registry`]: the model registry (champion per tenant, promote, rollback, history);
//! - [`serve`]: `dagrun serve`, the HTTP server (OIP V2 and MLflow protocols, tokens);
//! - [`commands`]: one file per command (run, status, predict, keys, serve, models, push, pull, report, …).
pub mod commands;
pub mod config;
pub mod crypto;
pub mod data;
pub mod engine;
pub mod error;
pub mod executor;
pub mod features;
pub mod lineage;
pub mod model;
pub mod pipeline;
pub mod registry;
pub mod remote;
pub mod report;
pub mod scoring;
pub mod serve;
pub mod stages;
pub mod store;
pub mod util;
pub mod workspace;
