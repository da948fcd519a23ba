//! `uses: ingest` — a user's own raw data (Parquet or CSV with the columns of
//! spec §2) instead of generated data. Every row is validated (types, ranges,
//! dates, tenant) while it is streamed into the workspace's raw Parquet file;
//! on the first bad value the stage fails naming the file, row and column, and
//! nothing is written. The output holds plaintext PII: it is declared
//! sensitive, like `generate`'s.

use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageKind, check_keys, param_str};
use crate::data::ingest::{IngestOptions, validate_to_parquet};
use crate::data::schema::parse_date;
use anyhow::{Context, Result, anyhow};
use serde_json::{Map, Value};

pub struct Ingest;

impl KindDecl for Ingest {
    fn name(&self) -> &'static str {
        "ingest"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, String> {
        check_keys(with, &["input", "output", "as_of", "tenant"])?;
        if tenant.is_none() {
            return Err("`uses: ingest` runs per tenant: add `foreach: tenants`".into());
        }
        if with.contains_key("as_of") {
            parse_date(&param_str(with, "as_of")?).map_err(|e| format!("`with.as_of`: {e:#}"))?;
        }
        Ok(Declared { deps: vec![param_str(with, "input")?], outs: vec![DeclaredOut { path: param_str(with, "output")?, sensitive: true }] })
    }
}

impl StageKind for Ingest {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let as_of = match ctx.with().get("as_of") {
            Some(_) => Some(parse_date(&param_str(ctx.with(), "as_of").map_err(|e| anyhow!(e))?)?),
            None => None,
        };
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
