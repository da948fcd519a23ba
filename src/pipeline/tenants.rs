//! `config/tenants.yaml`: the tenants a pipeline fans out over.
//!
//! ```yaml
//! tenants:
//!   - id: Tenant_A
//!     share: 0.6
//!   - id: Tenant_B
//!     share: 0.4
//! ```
//! The file names tenants (and optionally key ids), never key material.

use crate::error::config;
use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where the tenant list lives, relative to the workspace.
pub const TENANTS_FILE: &str = "config/tenants.yaml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: Vec<Tenant>,
}

/// One tenant.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    /// Share of generated rows (shares sum to 1).
    #[serde(default)]
    pub share: Option<f64>,
    /// Optional label of the tenant's key in the keyring (never the key).
    #[serde(default)]
    pub key_id: Option<String>,
}

/// The validated tenant list.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenants {
    pub list: Vec<Tenant>,
}

/// Check a tenant id against `[A-Za-z0-9_-]{1,64}`; the error shows the id
/// escaped and shortened, so control characters never reach a terminal.
pub fn validate_tenant_id(id: &str) -> std::result::Result<(), String> {
    if crate::data::is_valid_tenant_id(id) {
        return Ok(());
    }
    let shown: String = id.chars().take(40).collect::<String>();
    let more = if id.chars().count() > 40 { format!("… ({} characters)", id.chars().count()) } else { String::new() };
    Err(format!("invalid tenant id {shown:?}{more}: a tenant id is 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'"))
}

impl Tenants {
    /// Load and validate `<workspace>/config/tenants.yaml`.
    pub fn load(workspace: &Path) -> Result<Tenants> {
        let path = workspace.join(TENANTS_FILE);
        let shown = TENANTS_FILE;
        let cannot =
            |e: std::io::Error| config(format!("{shown}: cannot read the tenant list ({e}); create it with a `tenants:` list of `- id: NAME` entries"));
        // The same caps as a pipeline file: size before reading, then depth and aliases.
        let bytes = crate::util::read_at_most(&path, super::MAX_PIPELINE_BYTES).map_err(cannot)?;
        Self::parse(&bytes, shown)
    }

    /// Parse and validate tenant-list bytes; `shown` names the file in errors.
    pub fn parse(bytes: &[u8], shown: &str) -> Result<Tenants> {
        if bytes.len() as u64 > super::MAX_PIPELINE_BYTES {
            return Err(config(format!(
                "{shown}: the file is over {} bytes (1 MiB); a tenant list is far smaller. Is this the right file?",
                super::MAX_PIPELINE_BYTES
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| config(format!("{shown}: not valid UTF-8 (byte {})", e.valid_up_to())))?;
        super::check_yaml_limits(text, shown)?;
        let yaml_err = |e: yaml_serde::Error| config(format!("{shown}: {}", super::explain_yaml_message(&e.to_string())));
        super::check_yaml_budget(text).map_err(yaml_err)?;
        let file: TenantsFile = yaml_serde::from_str(text).map_err(yaml_err)?;
        if file.tenants.is_empty() {
            return Err(config(format!("{shown}: `tenants` is empty; list at least one tenant")));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in file.tenants.iter().enumerate() {
            validate_tenant_id(&t.id).map_err(|m| config(format!("{shown}: tenants[{i}]: {m}")))?;
            if !seen.insert(t.id.clone()) {
                return Err(config(format!("{shown}: tenants[{i}]: tenant {} is listed twice; remove the duplicate", t.id)));
            }
            if let Some(s) = t.share
                && (!s.is_finite() || s <= 0.0 || s > 1.0)
            {
                return Err(config(format!("{shown}: tenants[{i}] ({}): share {s} is not in (0, 1]", t.id)));
            }
        }
        let with_share = file.tenants.iter().filter(|t| t.share.is_some()).count();
        if with_share != 0 && with_share != file.tenants.len() {
            return Err(config(format!("{shown}: give every tenant a `share`, or none")));
        }
        if with_share > 0 {
            let sum: f64 = file.tenants.iter().map(|t| t.share.unwrap_or(0.0)).sum();
            if (sum - 1.0).abs() > 1e-6 {
                return Err(config(format!("{shown}: shares sum to {}, not 1; adjust them so they add up to 1", crate::util::short_float(sum))));
            }
        }
        Ok(Tenants { list: file.tenants })
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|t| t.id.as_str())
    }

    pub fn get(&self, id: &str) -> Option<&Tenant> {
        self.list.iter().find(|t| t.id == id)
    }
}

/// The tenant of a stage name: `NAME[TENANT]` → Some(TENANT), `NAME` → None.
pub fn tenant_of_stage(stage: &str) -> Result<Option<String>> {
    let Some(open) = stage.find('[') else {
        if stage.is_empty() || stage.contains(']') {
            bail!("stage name {:?} is malformed", stage.chars().take(80).collect::<String>());
        }
        return Ok(None);
    };
    let t = stage[open + 1..].strip_suffix(']').ok_or_else(|| anyhow!("stage name {:?} is malformed", stage.chars().take(80).collect::<String>()))?;
    if open == 0 || !crate::data::is_valid_tenant_id(t) {
        bail!("stage name {:?} does not name a valid tenant", stage.chars().take(80).collect::<String>());
    }
    Ok(Some(t.to_string()))
}

/// Is `stage` (`NAME[TENANT]`) a stage of one of `tenants`?
pub fn is_stage_of_any(stage: &str, tenants: &[String]) -> bool {
    tenant_of_stage(stage).ok().flatten().is_some_and(|t| tenants.contains(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<Tenants, String> {
        Tenants::parse(s.as_bytes(), "config/tenants.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn default_two_tenants() {
        let t = parse("tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n").unwrap();
        assert_eq!(t.ids().collect::<Vec<_>>(), ["Tenant_A", "Tenant_B"]);
    }

    #[test]
    fn rejects_bad_ids_duplicates_and_shares() {
        for (yaml, needle) in [
            ("tenants:\n  - id: a/b\n", "invalid tenant id \"a/b\""),
            ("tenants:\n  - id: ..\n", "invalid tenant id"),
            ("tenants:\n  - id: a b\n", "invalid tenant id"),
            ("tenants:\n  - id: \"a\\u0007\"\n", "\\u{7}"),
            ("tenants:\n  - id: A\n  - id: A\n", "listed twice"),
            ("tenants:\n  - id: A\n    share: 0.5\n  - id: B\n    share: 0.4\n", "sum to 0.9"),
            ("tenants: []\n", "empty"),
            ("tenants:\n  - id: A\n    colour: red\n", "unknown field `colour`"),
        ] {
            let err = parse(yaml).unwrap_err();
            assert!(err.contains(needle), "{yaml:?}: {err}");
            assert!(err.starts_with("config/tenants.yaml"), "{err}");
        }
        let long = format!("tenants:\n  - id: {}\n", "x".repeat(10_000));
        let err = parse(&long).unwrap_err();
        assert!(err.contains("10000 characters") && err.len() < 300, "{err}");
    }
}
