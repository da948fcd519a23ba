//! `uses: afe` — automated feature engineering, feature set `v1.0` (spec §4).
//!
//! Two separate steps, both from `features::v1` (the only copy of the
//! formulas): *fit* the tenant statistics over the tenant's rows, then
//! *transform* every row with them. Outputs: the feature rows (Parquet) and
//! the fitted statistics (JSON), which the feature store keeps with the version.

use super::params::{self, Date, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::data::featurize;
use crate::features;
use crate::util::atomic::write_json_atomic;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub struct Afe;

/// `with:` of `uses: afe`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AfeWith {
    pub input: Text,
    /// A feature set this build implements (`features::KNOWN_VERSIONS`).
    pub feature_set: Text,
    pub as_of: Date,
    pub features: Text,
    pub stats: Text,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
}

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
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: AfeWith = params::parse(with)?;
        per_tenant("afe", tenant)?;
        let fs = &p.feature_set.0;
        if !features::KNOWN_VERSIONS.contains(&fs.as_str()) {
            return Err(StageError::at_key(
                "feature_set",
                format!("`with.feature_set: {fs}` is unknown; this build has: {}", features::KNOWN_VERSIONS.join(", ")),
            ));
        }
        Ok(Declared {
            deps: vec![p.input.0.clone()],
            outs: vec![DeclaredOut { path: p.features.0.clone(), sensitive: false }, DeclaredOut { path: p.stats.0.clone(), sensitive: false }],
            params: params::keep(p),
        })
    }
}

impl StageKind for Afe {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let p: &AfeWith = ctx.params()?;
        let (as_of_s, as_of) = (p.as_of.text.clone(), p.as_of.days);
        let fs = p.feature_set.0.clone();
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
