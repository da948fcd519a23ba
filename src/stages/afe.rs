//! `uses: afe` — automated feature engineering, feature set `v1.0` (spec §4).
//!
//! Two separate steps, both from `features::v1` (the only copy of the
//! formulas): *fit* the tenant statistics over the tenant's rows, then
//! *transform* every row with them. Outputs: the feature rows (Parquet) and
//! the fitted statistics (JSON), which the feature store keeps with the version.

use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageKind, check_keys, param_str};
use crate::data::featurize;
use crate::data::schema::parse_date;
use crate::features;
use crate::util::atomic::write_json_atomic;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub struct Afe;

/// The fitted statistics file written beside the features.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsFile {
    pub feature_set_version: String,
    pub tenant: String,
    pub as_of: String,
    pub stats: features::v1::TenantStats,
}

impl KindDecl for Afe {
    fn name(&self) -> &'static str {
        "afe"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, String> {
        check_keys(with, &["input", "feature_set", "as_of", "features", "stats", "tenant"])?;
        if tenant.is_none() {
            return Err("`uses: afe` runs per tenant: add `foreach: tenants`".into());
        }
        let fs = param_str(with, "feature_set")?;
        if !features::KNOWN_VERSIONS.contains(&fs.as_str()) {
            return Err(format!("`with.feature_set: {fs}` is unknown; this build has: {}", features::KNOWN_VERSIONS.join(", ")));
        }
        parse_date(&param_str(with, "as_of")?).map_err(|e| format!("`with.as_of`: {e:#}"))?;
        Ok(Declared {
            deps: vec![param_str(with, "input")?],
            outs: vec![DeclaredOut { path: param_str(with, "features")?, sensitive: false }, DeclaredOut { path: param_str(with, "stats")?, sensitive: false }],
        })
    }
}

impl StageKind for Afe {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let w = ctx.with();
        let as_of_s = param_str(w, "as_of").map_err(|e| anyhow!(e))?;
        let as_of = parse_date(&as_of_s)?;
        let fs = param_str(w, "feature_set").map_err(|e| anyhow!(e))?;
        if fs != features::v1::VERSION {
            bail!("feature set {fs} is not implemented");
        }
        // Step 1: fit (reads two columns; keeps the purchase column for the quantile).
        let stats = featurize::fit_stats(&ctx.deps[0])?;
        if stats.rows == 0 {
            bail!("tenant {tenant} has no rows in {}: nothing to fit", ctx.rel(&ctx.deps[0]));
        }
        // Step 2: transform, batch by batch.
        let kv = vec![
            ("dagrun.dataset".to_string(), "features".to_string()),
            ("dagrun.tenant".to_string(), tenant.to_string()),
            ("dagrun.feature_set_version".to_string(), fs.clone()),
            ("dagrun.as_of".to_string(), as_of_s.clone()),
        ];
        let rows = featurize::transform_file(&ctx.deps[0], &ctx.outs[0], &stats, as_of, kv)?;
        write_json_atomic(&ctx.outs[1], &StatsFile { feature_set_version: fs.clone(), tenant: tenant.to_string(), as_of: as_of_s, stats })?;
        let mut facts = Map::new();
        facts.insert("rows".into(), rows.into());
        facts.insert("feature_set_version".into(), fs.into());
        facts.insert("mean_login".into(), stats.mean_login.into());
        facts.insert("p80_purchase".into(), stats.p80_purchase.into());
        Ok(RunReport { facts })
    }
}
