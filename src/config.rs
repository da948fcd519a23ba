//! `config/dagrun.yaml`: optional workspace settings (the file may be absent).
//!
//! ```yaml
//! remote:                          # the shared remote cache (see src/remote/)
//!   url: s3://dagrun-cache/team-a  # s3://, gs://, az://, file:///abs/path
//!   endpoint: http://127.0.0.1:8333   # S3-compatible stores (MinIO, SeaweedFS, Ceph…)
//!   region: us-east-1
//!   jobs: 8                        # parallel transfers
//!   retry_timeout: 20              # seconds a failing request is retried before giving up
//! ```
//!
//! Rules: the parser is strict — an unknown key, a wrong type or invalid YAML
//! is an error naming `config/dagrun.yaml:LINE:COLUMN` and the fix (exit 2).
//! The file holds no secrets: credentials come from the environment
//! (`AWS_ACCESS_KEY_ID`, …), never from here.

use crate::error::config;
use anyhow::Result;
use serde::Deserialize;
use std::path::Path;

/// Where the settings live, relative to the workspace.
pub const CONFIG_FILE: &str = "config/dagrun.yaml";

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceConfig {
    #[serde(default)]
    pub remote: Option<RemoteConfig>,
}

/// `remote:`: where `dagrun push`/`pull`/`run --pull` send and fetch cache entries.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub url: String,
    /// Endpoint of an S3-compatible store (`http://` allows plain HTTP).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Parallel transfers (default 8).
    #[serde(default)]
    pub jobs: Option<usize>,
    /// Seconds a failing request is retried (default 20).
    #[serde(default)]
    pub retry_timeout: Option<f64>,
}

impl RemoteConfig {
    /// A remote given on the command line (`--remote URL`): the URL with no options.
    pub fn from_url(url: &str) -> RemoteConfig {
        RemoteConfig { url: url.to_string(), endpoint: None, region: None, jobs: None, retry_timeout: None }
    }
}

impl WorkspaceConfig {
    /// Load `<workspace>/config/dagrun.yaml`; a missing file is the default.
    pub fn load(workspace: &Path) -> Result<WorkspaceConfig> {
        let path = workspace.join(CONFIG_FILE);
        match std::fs::read(&path) {
            Ok(b) => Self::parse(&b, CONFIG_FILE),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WorkspaceConfig::default()),
            Err(e) => Err(config(format!("{CONFIG_FILE}: cannot read it ({e})"))),
        }
    }

    /// Parse and check the file's bytes; `shown` names the file in errors.
    pub fn parse(bytes: &[u8], shown: &str) -> Result<WorkspaceConfig> {
        if bytes.len() > 1 << 20 {
            return Err(config(format!("{shown}: larger than 1 MiB; this file holds a few settings")));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| config(format!("{shown}: not valid UTF-8 (byte {})", e.valid_up_to())))?;
        let err = |e: yaml_serde::Error| {
            let msg = crate::pipeline::explain_yaml_message(&e.to_string());
            let clean = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            let hint = if clean.contains("unknown field") { " (the keys are: remote: {url, endpoint, region, jobs, retry_timeout})" } else { "" };
            match e.location() {
                Some(loc) => config(format!("{shown}:{}:{}: {clean}{hint}", loc.line(), loc.column())),
                None => config(format!("{shown}: {clean}{hint}")),
            }
        };
        crate::pipeline::check_yaml_budget(text).map_err(err)?;
        if text.trim().is_empty() || text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            return Ok(WorkspaceConfig::default());
        }
        let cfg: WorkspaceConfig = yaml_serde::from_str(text).map_err(err)?;
        if let Some(r) = &cfg.remote {
            if r.url.trim().is_empty() {
                return Err(config(format!("{shown}: remote.url is empty; give a URL such as s3://BUCKET/PREFIX")));
            }
            if r.jobs == Some(0) {
                return Err(config(format!("{shown}: remote.jobs must be at least 1")));
            }
            if let Some(t) = r.retry_timeout {
                if !(t.is_finite() && t >= 0.0) {
                    return Err(config(format!("{shown}: remote.retry_timeout must be a number of seconds ≥ 0")));
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_empty_and_full() {
        let d = tempfile::tempdir().unwrap();
        assert!(WorkspaceConfig::load(d.path()).unwrap().remote.is_none());
        assert!(WorkspaceConfig::parse(b"# nothing\n", "f").unwrap().remote.is_none());
        let c = WorkspaceConfig::parse(b"remote:\n  url: s3://b/p\n  endpoint: http://127.0.0.1:1\n  jobs: 4\n", "f").unwrap();
        let r = c.remote.unwrap();
        assert_eq!((r.url.as_str(), r.endpoint.as_deref(), r.jobs), ("s3://b/p", Some("http://127.0.0.1:1"), Some(4)));
    }

    #[test]
    fn unknown_keys_are_refused_with_file_and_line() {
        let e = WorkspaceConfig::parse(b"remote:\n  url: s3://b/p\n  endpiont: x\n", "config/dagrun.yaml").unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:3:"), "{e}");
        assert!(e.contains("endpiont"), "{e}");
        let e = WorkspaceConfig::parse(b"remotes: {}\n", "config/dagrun.yaml").unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:1:"), "{e}");
        let e = WorkspaceConfig::parse(b"remote:\n  url: s3://b/p\n  jobs: 0\n", "config/dagrun.yaml").unwrap_err().to_string();
        assert!(e.contains("jobs"), "{e}");
    }
}
