//! `dagrun features TENANT [--version V]`: a feature version's manifest,
//! statistics and lineage, read from the store stage's recorded outputs.

use crate::crypto::IntegrityKey;
use crate::store::Manifest;
use crate::workspace::Workspace;
use crate::workspace::state::{Loaded, StateStore};
use anyhow::{Result, anyhow};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn key_of(workspace: &Path) -> Result<Arc<IntegrityKey>> {
    let ring = crate::crypto::Keyring::open_existing(workspace)?
        .ok_or_else(|| anyhow!("no master key in {}: feature manifests cannot be verified", workspace.display()))?;
    Ok(ring.integrity_key())
}

/// A tenant's feature versions as the store stages' (authenticated) state
/// records them.
#[derive(Default)]
struct Found {
    /// Versions whose manifest verifies (MAC, tenant, and the blake3 its
    /// store stage recorded), sorted, with the manifest read.
    versions: Vec<(String, PathBuf, Manifest)>,
    /// Manifests of this tenant that were recorded but fail their check (why, naming the file).
    refused: Vec<String>,
    /// State records that fail their own check: whose they are is unknown.
    untrusted_states: usize,
}

fn find_versions(workspace: &Path, key: &Arc<IntegrityKey>, tenant: &str) -> Found {
    let states = StateStore::new(&Workspace::at(workspace), Some(key.clone()));
    let mut found = Found::default();
    for (_, loaded) in states.scan_states() {
        let s = match loaded {
            Loaded::Valid(s) => s,
            Loaded::Invalid(_) => {
                found.untrusted_states += 1;
                continue;
            }
            Loaded::Missing => continue,
        };
        if s.ingredients.kind != "store" || s.ingredients.params.get("tenant").and_then(|t| t.as_str()) != Some(tenant) {
            continue;
        }
        for (out, rec) in &s.outputs {
            if out.ends_with(crate::store::MANIFEST_FILE) {
                let dir = workspace.join(out).parent().map(Path::to_path_buf).unwrap_or_default();
                match crate::store::read_recorded_manifest(&dir, key, tenant, &rec.hash) {
                    Ok(m) => found.versions.push((m.feature_set_version.clone(), dir, m)),
                    Err(e) => found.refused.push(format!("{e:#}")),
                }
            }
        }
    }
    found.versions.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    found
}

impl Found {
    /// What a "no such version" message adds: the manifests refused, or how
    /// many state records could not be followed.
    fn why_missing(&self) -> String {
        let mut why = String::new();
        if let Some(first) = self.refused.first() {
            why += &format!("; {} recorded manifest(s) of it could not be trusted ({first})", self.refused.len());
        }
        if self.untrusted_states > 0 {
            why += &format!(
                "; {} state record(s) could not be trusted and were not followed (`dagrun verify` lists them, and the next run recomputes those stages)",
                self.untrusted_states
            );
        }
        why
    }
}

pub fn show(workspace: &Path, tenant: &str, version: Option<&str>, json: bool) -> Result<()> {
    let key = key_of(workspace)?;
    let found = find_versions(workspace, &key, tenant);
    let all = &found.versions;
    if all.is_empty() {
        let why = found.why_missing();
        if why.is_empty() {
            // A typo is not a tenant still to be run.
            super::check_known_tenant(workspace, tenant, false, "no store stage recorded a feature version of it")?;
        }
        let ws = workspace.display();
        return Err(crate::error::config(if why.is_empty() {
            format!("tenant {tenant} has no feature versions in {ws}: run the pipeline first")
        } else {
            format!("tenant {tenant} has no feature version dagrun can trust in {ws}{why}")
        }));
    }
    let (v, dir, m) = match version {
        Some(v) => all.iter().find(|(x, _, _)| x == v).cloned().ok_or_else(|| {
            crate::error::config(format!(
                "tenant {tenant} has no feature version {v} (it has: {}){}",
                all.iter().map(|x| x.0.as_str()).collect::<Vec<_>>().join(", "),
                found.why_missing()
            ))
        })?,
        None => all.last().cloned().unwrap(),
    };
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
