//! `config/dagrun.yaml`: optional workspace settings.
//!
//! ```yaml
//! # config/dagrun.yaml
//! metrics_file: /var/lib/node_exporter/textfile_collector/dagrun.prom
//! ```
//!
//! Rules:
//! - The file is optional: absent (or empty, or only comments) means every
//!   setting has its default.
//! - It is parsed strictly: an unknown key, a wrong type, invalid YAML, more
//!   than 64 KiB or an alias bomb is a configuration error naming
//!   `config/dagrun.yaml:LINE:COLUMN` and the fix (exit 2); nothing runs.
//! - It holds settings, never secrets: tokens and keys come from the
//!   environment (e.g. `DAGRUN_OPENLINEAGE_TOKEN`), so the file can be
//!   committed.
//! - Relative paths in it are relative to the workspace.
//! - Adding a setting = one field in [`DagrunConfig`] (with `#[serde(default)]`)
//!   and a line in the README.

use crate::error::config;
use anyhow::Result;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the settings live, relative to the workspace.
pub const CONFIG_FILE: &str = "config/dagrun.yaml";

/// Largest settings file accepted.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// The settings of `config/dagrun.yaml`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DagrunConfig {
    /// Write each run's metrics (Prometheus text format) to this file,
    /// atomically; `--metrics-file` overrides it.
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
}

impl DagrunConfig {
    /// Load `<workspace>/config/dagrun.yaml` (defaults when absent).
    pub fn load(workspace: &Path) -> Result<DagrunConfig> {
        let path = workspace.join(CONFIG_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DagrunConfig::default()),
            Err(e) => return Err(config(format!("{CONFIG_FILE}: cannot read the settings file: {e}"))),
        };
        if !meta.is_file() {
            return Err(config(format!("{CONFIG_FILE}: is not a regular file; make it a YAML file or remove it")));
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(config(format!("{CONFIG_FILE}: the file is {} bytes; a settings file may be at most {MAX_CONFIG_BYTES} bytes", meta.len())));
        }
        let bytes = std::fs::read(&path).map_err(|e| config(format!("{CONFIG_FILE}: cannot read the settings file: {e}")))?;
        let mut c = Self::parse(&bytes, CONFIG_FILE)?;
        if let Some(m) = &c.metrics_file {
            c.metrics_file = Some(workspace.join(m));
        }
        Ok(c)
    }

    /// Parse settings bytes; `shown` names the file in errors.
    pub fn parse(bytes: &[u8], shown: &str) -> Result<DagrunConfig> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            config(format!("{shown}:{line}: not valid UTF-8; save the file as UTF-8"))
        })?;
        let yaml_err = |e: yaml_serde::Error| {
            let msg = crate::pipeline::explain_yaml_message(&e.to_string());
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            let fix = if msg.contains("unknown field") { "; remove it or fix its spelling (see README: config/dagrun.yaml)" } else { "" };
            match e.location() {
                Some(loc) => config(format!("{shown}:{}:{}: {msg}{fix}", loc.line(), loc.column())),
                None => config(format!("{shown}: {msg}{fix}")),
            }
        };
        crate::pipeline::check_yaml_budget(text).map_err(yaml_err)?;
        let c: Option<DagrunConfig> = yaml_serde::from_str(text).map_err(yaml_err)?;
        let c = c.unwrap_or_default();
        if let Some(m) = &c.metrics_file {
            if m.as_os_str().is_empty() || m.to_string_lossy().ends_with('/') {
                return Err(config(format!("{shown}: `metrics_file` must name a file, e.g. /var/lib/node_exporter/textfile_collector/dagrun.prom")));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_empty_and_comment_only_files_mean_defaults() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(DagrunConfig::load(d.path()).unwrap(), DagrunConfig::default());
        assert_eq!(DagrunConfig::parse(b"", "c").unwrap(), DagrunConfig::default());
        assert_eq!(DagrunConfig::parse(b"# nothing here\n", "c").unwrap(), DagrunConfig::default());
    }

    #[test]
    fn metrics_file_is_read_and_relative_to_the_workspace() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("config")).unwrap();
        std::fs::write(d.path().join(CONFIG_FILE), "metrics_file: out/dagrun.prom\n").unwrap();
        let c = DagrunConfig::load(d.path()).unwrap();
        assert_eq!(c.metrics_file, Some(d.path().join("out/dagrun.prom")));
        let c = DagrunConfig::parse(b"metrics_file: /abs/x.prom\n", "c").unwrap();
        assert_eq!(c.metrics_file, Some(PathBuf::from("/abs/x.prom")));
    }

    #[test]
    fn unknown_keys_are_refused_with_file_and_line() {
        let e = DagrunConfig::parse(b"# settings\nmetrics_file: a.prom\nmetrics_fiel: b.prom\n", "config/dagrun.yaml").unwrap_err();
        let m = format!("{e:#}");
        assert!(m.starts_with("config/dagrun.yaml:3:"), "{m}");
        assert!(m.contains("metrics_fiel") && m.contains("remove it or fix its spelling"), "{m}");
        assert_eq!(crate::error::exit_code_of(&e), crate::error::exit::CONFIG);
    }

    #[test]
    fn wrong_types_and_bad_yaml_are_refused() {
        let m = format!("{:#}", DagrunConfig::parse(b"metrics_file: [1, 2]\n", "config/dagrun.yaml").unwrap_err());
        assert!(m.starts_with("config/dagrun.yaml:1:"), "{m}");
        let m = format!("{:#}", DagrunConfig::parse(b"metrics_file: a\n  b: : c\n", "config/dagrun.yaml").unwrap_err());
        assert!(m.starts_with("config/dagrun.yaml:"), "{m}");
        let m = format!("{:#}", DagrunConfig::parse(b"- a\n- b\n", "config/dagrun.yaml").unwrap_err());
        assert!(m.starts_with("config/dagrun.yaml"), "{m}");
        let m = format!("{:#}", DagrunConfig::parse(b"metrics_file: \"\"\n", "config/dagrun.yaml").unwrap_err());
        assert!(m.contains("must name a file"), "{m}");
    }
}
