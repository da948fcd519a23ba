//! `uses: generate` — deterministic synthetic raw data for one tenant (spec §2, §5).
//!
//! ```yaml
//! generate:
//!   foreach: tenants
//!   uses: generate
//!   with: { rows: ${params.rows}, seed: ${params.seed}, as_of: ${params.as_of},
//!           output: data/raw/${tenant}.parquet }
//! ```
//! The tenant's row count comes from `rows` and the shares in
//! `config/tenants.yaml` (largest remainder); it is part of the cache key, so a
//! share change reruns only tenants whose count changed. The output holds
//! plaintext PII and is declared sensitive: never cached, deleted after the run.

use super::Services;
use super::params::{self, Count, Date, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::data::generate::{TenantShare, generate_tenant, split_rows};
use crate::pipeline::Stage;
use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub struct Generate;

/// `with:` of `uses: generate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateWith {
    /// Rows over all tenants (split by the configured shares).
    pub rows: Count,
    pub seed: Count,
    pub as_of: Date,
    pub output: Text,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
}

/// Rows of `tenant` when `rows` are split over the configured tenants.
pub fn tenant_rows(services: &Services, rows: u64, tenant: &str) -> Result<u64> {
    let tenants = services.tenants.as_ref().context("generate needs config/tenants.yaml")?;
    let n = tenants.list.len() as f64;
    let shares: Vec<TenantShare> = tenants.list.iter().map(|t| TenantShare { id: t.id.clone(), share: t.share.unwrap_or(1.0 / n) }).collect();
    let counts = split_rows(rows, &shares);
    let i = shares.iter().position(|t| t.id == tenant).ok_or_else(|| anyhow!("tenant {tenant} is not in config/tenants.yaml"))?;
    Ok(counts[i])
}

impl KindDecl for Generate {
    fn name(&self) -> &'static str {
        "generate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: GenerateWith = params::parse(with)?;
        per_tenant("generate", tenant)?;
        Ok(Declared { deps: vec![], outs: vec![DeclaredOut { path: p.output.0.clone(), sensitive: true }], params: params::keep(p) })
    }
}

impl StageKind for Generate {
    fn extra_ingredients(&self, stage: &Stage, services: &Services) -> Result<BTreeMap<String, String>> {
        let rows = params::of::<GenerateWith>(stage)?.rows.0;
        let t = stage.tenant.as_deref().unwrap_or_default();
        Ok(BTreeMap::from([("rows of this tenant".to_string(), tenant_rows(services, rows, t)?.to_string())]))
    }
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let p: &GenerateWith = ctx.params()?;
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let n = tenant_rows(ctx.services, p.rows.0, tenant)?;
        let summary = generate_tenant(&ctx.outs[0], tenant, n, p.seed.0, p.as_of.days)?;
        let mut facts = Map::new();
        facts.insert("rows".into(), summary.rows.into());
        facts.insert("positives".into(), summary.positives.into());
        Ok(RunReport { facts })
    }
}
