//! `uses: store` — the versioned feature store (spec §6): one Parquet file per
//! tenant per feature version plus a manifest (schema, rows, fitted statistics,
//! as_of, blake3 of the file, lineage). Versions live in separate folders
//! (`featurestore/TENANT/VERSION/`), so a new version never overwrites another.

use super::afe::StatsFile;
use super::params::{self, Text, present};
use super::{Declared, DeclaredOut, KindDecl, RunCtx, RunReport, StageError, StageKind, per_tenant};
use crate::store::{self, Lineage};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

pub struct Store;

/// Code version of the store layout, recorded in lineage.
pub const CODE_VERSION: &str = "dagrun-store/1";

/// `with:` of `uses: store` (the run reads its paths from the stage's
/// declared inputs and outputs).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreWith {
    pub features: Text,
    pub stats: Text,
    /// The feature-store version directory written.
    pub dir: Text,
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Text>,
}

impl KindDecl for Store {
    fn name(&self) -> &'static str {
        "store"
    }
    fn version(&self) -> u32 {
        1
    }
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError> {
        let p: StoreWith = params::parse(with)?;
        per_tenant("store", tenant)?;
        let dir = &p.dir.0;
        Ok(Declared {
            deps: vec![p.features.0.clone(), p.stats.0.clone()],
            outs: vec![
                DeclaredOut { path: format!("{dir}/{}", store::FEATURES_FILE), sensitive: false },
                DeclaredOut { path: format!("{dir}/{}", store::MANIFEST_FILE), sensitive: false },
            ],
            params: params::keep(p),
        })
    }
}

impl StageKind for Store {
    fn run(&self, ctx: &RunCtx) -> Result<RunReport> {
        let tenant = ctx.stage.tenant.as_deref().context("no tenant")?;
        let stats_bytes = crate::util::read_capped(&ctx.deps[1], super::MAX_REPORT_BYTES).with_context(|| format!("cannot read {}", ctx.rel(&ctx.deps[1])))?;
        let sf: StatsFile =
            crate::util::redact::from_json(&stats_bytes).map_err(|why| anyhow::anyhow!("{} is not a statistics file ({})", ctx.rel(&ctx.deps[1]), why))?;
        if sf.tenant != tenant {
            bail!("{} holds statistics of tenant {}, not {tenant}", ctx.rel(&ctx.deps[1]), sf.tenant);
        }
        let dir = ctx.outs[0].parent().context("store dir")?.to_path_buf();
        let lineage = Lineage {
            lineage_hash: String::new(),
            inputs: ctx.input_hashes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            params: Value::Object(ctx.with().clone()),
            code_version: format!("{CODE_VERSION}; features {}", sf.feature_set_version),
        };
        let as_of = crate::data::schema::parse_date(&sf.as_of)?;
        // The feature file's pages are copied as they are (no decode/encode);
        // only the footer gains the version and lineage hash.
        let manifest =
            store::write_version_from_file(&*ctx.services.integrity_key()?, &dir, tenant, &sf.feature_set_version, as_of, &sf.stats, lineage, &ctx.deps[0])?;
        let mut facts = Map::new();
        facts.insert("rows".into(), manifest.rows.into());
        facts.insert("feature_set_version".into(), manifest.feature_set_version.clone().into());
        facts.insert("file_blake3".into(), manifest.file_blake3.clone().into());
        Ok(RunReport { facts })
    }
}
