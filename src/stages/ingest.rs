//! `uses: ingest` — a user's own raw data (Parquet or CSV with the columns of
//! spec §2) instead of generated data. Every row is validated (types, ranges,
//! dates, tenant) while it is streamed into the workspace's raw Parquet file;
//! on the first bad value the stage fails naming the file, row and column, and
//! nothing is written. The output holds plaintext PII: it is declared
//! sensitive, like `generate`'s.

use super::params::{self, Date, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::data::ingest::{IngestOptions, validate_to_parquet};
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

pub struct Ingest;

/// `with:` of `uses: ingest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestWith {
    pub input: Text,
    pub output: Text,
    /// Rows dated after it are refused.
    #[serde(default, deserialize_with = "present")]
    pub as_of: Option<Date>,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
}

impl KindDecl for Ingest {
    fn name(&self) -> &'static str {
        "ingest"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: IngestWith = params::parse(with)?;
        per_tenant("ingest", tenant)?;
        Ok(Declared { deps: vec![p.input.0.clone()], outs: vec![DeclaredOut { path: p.output.0.clone(), sensitive: true }], params: params::keep(p) })
    }
}

impl StageKind for Ingest {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let as_of = ctx.params::<IngestWith>()?.as_of.as_ref().map(|d| d.days);
        let opts = IngestOptions {
            expected_tenant: Some(tenant.to_string()),
            known_tenants: ctx.services.tenants.as_ref().map(|t| t.ids().map(str::to_string).collect()),
            require_label: true,
            allow_label: true,
            as_of,
        };
        let summary = validate_to_parquet(&ctx.deps[0], &ctx.outs[0], &opts)?;
        let mut facts = Map::new();
        facts.insert("rows".into(), summary.rows.into());
        Ok(RunReport { facts })
    }
}
