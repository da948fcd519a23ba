//! `dagrun features TENANT [--version V]`: a feature version's manifest,
//! statistics and lineage, read from the store stage's recorded outputs.

use crate::crypto::IntegrityKey;
use crate::workspace::Workspace;
use crate::workspace::state::StateStore;
use anyhow::{Result, anyhow};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn key_of(workspace: &Path) -> Result<Arc<IntegrityKey>> {
    let ring = crate::crypto::Keyring::open_existing(workspace)?
        .ok_or_else(|| anyhow!("no master key in {}: feature manifests cannot be verified", workspace.display()))?;
    Ok(ring.integrity_key())
}

/// Feature-store version folders of a tenant, from the store stages'
/// (authenticated) state; only manifests whose MAC verifies.
pub fn versions(workspace: &Path, tenant: &str) -> Vec<(String, PathBuf)> {
    let Ok(key) = key_of(workspace) else { return Vec::new() };
    versions_with(workspace, &key, tenant)
}

fn versions_with(workspace: &Path, key: &Arc<IntegrityKey>, tenant: &str) -> Vec<(String, PathBuf)> {
    let states = StateStore::new(&Workspace::at(workspace), Some(key.clone()));
    let mut v: Vec<(String, PathBuf)> = Vec::new();
    for s in states.all() {
        if s.ingredients.kind != "store" || s.ingredients.params.get("tenant").and_then(|t| t.as_str()) != Some(tenant) {
            continue;
        }
        for out in s.outputs.keys() {
            if out.ends_with(crate::store::MANIFEST_FILE) {
                let dir = workspace.join(out).parent().map(Path::to_path_buf).unwrap_or_default();
                if let Ok(m) = crate::store::read_manifest(&dir, key) {
                    v.push((m.feature_set_version, dir));
                }
            }
        }
    }
    v.sort();
    v
}

pub fn show(workspace: &Path, tenant: &str, version: Option<&str>, json: bool) -> Result<()> {
    let key = key_of(workspace)?;
    let all = versions_with(workspace, &key, tenant);
    if all.is_empty() {
        return Err(crate::error::config(format!("tenant {tenant} has no feature versions in {}: run the pipeline first", workspace.display())));
    }
    let (v, dir) = match version {
        Some(v) => all.iter().find(|(x, _)| x == v).cloned().ok_or_else(|| {
            crate::error::config(format!(
                "tenant {tenant} has no feature version {v} (it has: {})",
                all.iter().map(|x| x.0.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?,
        None => all.last().cloned().unwrap(),
    };
    let m = crate::store::read_manifest(&dir, &key)?;
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let rel = dir.strip_prefix(workspace).unwrap_or(&dir).display().to_string();
    crate::outln!("tenant {tenant}, feature set {v}  ({rel}/)");
    crate::outln!("  versions: {}", all.iter().map(|x| x.0.as_str()).collect::<Vec<_>>().join(", "));
    crate::outln!("  rows {}  as_of {}  file {} blake3 {}", m.rows, m.as_of, m.file, m.file_blake3);
    crate::outln!("  statistics: mean_login {}  p80_purchase {}  (fitted on {} rows)", m.stats.mean_login, m.stats.p80_purchase, m.stats.rows);
    crate::outln!("  schema: {}", m.schema.iter().map(|c| format!("{}:{}", c.name, c.data_type)).collect::<Vec<_>>().join(", "));
    crate::outln!("  lineage {}  ({})", m.lineage.lineage_hash, m.lineage.code_version);
    for (p, h) in &m.lineage.inputs {
        crate::outln!("    input {p}  blake3 {}", &h[..h.len().min(16)]);
    }
    Ok(())
}
