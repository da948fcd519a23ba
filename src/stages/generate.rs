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
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageKind, check_keys, param_str, param_u64};
use crate::data::generate::{TenantShare, generate_tenant, split_rows};
use crate::data::schema::parse_date;
use crate::pipeline::Stage;
use anyhow::{Context, Result, anyhow};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub struct Generate;

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
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, String> {
        check_keys(with, &["rows", "seed", "as_of", "output", "tenant"])?;
        if tenant.is_none() {
            return Err("`uses: generate` runs per tenant: add `foreach: tenants`".into());
        }
        param_u64(with, "rows")?;
        param_u64(with, "seed")?;
        let as_of = param_str(with, "as_of")?;
        parse_date(&as_of).map_err(|e| format!("`with.as_of`: {e:#}"))?;
        Ok(Declared { deps: vec![], outs: vec![DeclaredOut { path: param_str(with, "output")?, sensitive: true }] })
    }
}

impl StageKind for Generate {
    fn extra_ingredients(&self, stage: &Stage, services: &Services) -> Result<BTreeMap<String, String>> {
        let rows = param_u64(&stage.with, "rows").map_err(|e| anyhow!(e))?;
        let t = stage.tenant.as_deref().unwrap_or_default();
        Ok(BTreeMap::from([("rows of this tenant".to_string(), tenant_rows(services, rows, t)?.to_string())]))
    }
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let w = ctx.with();
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let rows = param_u64(w, "rows").map_err(|e| anyhow!(e))?;
        let seed = param_u64(w, "seed").map_err(|e| anyhow!(e))?;
        let as_of = parse_date(&param_str(w, "as_of").map_err(|e| anyhow!(e))?)?;
        let n = tenant_rows(ctx.services, rows, tenant)?;
        let summary = generate_tenant(&ctx.outs[0], tenant, n, seed, as_of)?;
        let mut facts = Map::new();
        facts.insert("rows".into(), summary.rows.into());
        facts.insert("positives".into(), summary.positives.into());
        Ok(RunReport { facts })
    }
}
