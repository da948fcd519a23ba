//! `config/dagrun.yaml`: optional workspace settings (absent file = all defaults).
//!
//! ```yaml
//! master_key: "pkcs11:token=dagrun-test;object=dagrun-master;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dagrun/pin"
//! master_key_mechanism: auto         # or CKM_AES_GCM, CKM_AES_KEY_WRAP_PAD
//! metrics_file: /var/lib/node_exporter/textfile_collector/dagrun.prom
//! remote:                            # the shared remote cache (src/remote/)
//!   url: s3://dagrun-cache/team-a    # s3://, gs://, az://, file:///ABSOLUTE/PATH
//!   endpoint: http://127.0.0.1:8333  # S3-compatible stores (MinIO, SeaweedFS, Ceph…)
//!   region: us-east-1
//!   jobs: 8                          # parallel transfers
//!   retry_timeout: 20                # seconds a failing request is retried
//! ```
//!
//! # Rules
//! - One strict parser for every setting: an unknown key, a wrong type or invalid
//!   YAML is an error naming `config/dagrun.yaml:LINE:COLUMN` (exit 2). Add new
//!   settings as fields of [`DagrunConfig`], never a second parser.
//! - The file is shared and versioned: it never holds key material or a PIN
//!   (`master_key` is a PKCS#11 URI; a `pin-value` in it is refused; remote
//!   credentials come from the environment, `AWS_ACCESS_KEY_ID` etc.).
//! - Relative paths in it (`metrics_file`) are relative to the workspace.

use crate::crypto::master::{Mech, Pkcs11Uri};
use crate::error::config;
use anyhow::Result;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the settings live, relative to the workspace.
pub const CONFIG_FILE: &str = "config/dagrun.yaml";

/// The most bytes of it read (a few settings; a FIFO or device gives no size).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    master_key: Option<String>,
    #[serde(default)]
    master_key_mechanism: Option<String>,
    #[serde(default, deserialize_with = "text_only")]
    metrics_file: Option<PathBuf>,
    #[serde(default)]
    remote: Option<RemoteConfig>,
}

/// A path written as YAML text: `metrics_file: 5` or `true` is a mistake, not
/// a file named `5` (serde would take any scalar as a path).
fn text_only<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<PathBuf>, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = Option<PathBuf>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a file path as text, e.g. /var/lib/node_exporter/textfile_collector/dagrun.prom")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
            Ok(Some(PathBuf::from(v)))
        }
        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Text)
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

/// The validated settings.
#[derive(Debug, Default)]
pub struct DagrunConfig {
    /// The master key as an RFC 7512 PKCS#11 URI (see `crypto::master`).
    pub master_key: Option<Pkcs11Uri>,
    /// The wrapping mechanism forced for a PKCS#11 master key (`None`: detect;
    /// see `crypto::master::pkcs11`). `DAGRUN_MASTER_KEY_MECHANISM` overrides it.
    pub master_key_mechanism: Option<Mech>,
    /// Write each run's metrics (Prometheus text format) to this file,
    /// atomically (see `engine::run_metrics`); `--metrics-file` overrides it.
    /// Made absolute by [`DagrunConfig::load`].
    pub metrics_file: Option<PathBuf>,
    /// The shared remote cache (see `remote`).
    pub remote: Option<RemoteConfig>,
}

impl DagrunConfig {
    /// The metrics file a command other than `run` writes into: `flag`
    /// (its `--metrics-file`), else `metrics_file:` of a settings file that
    /// loads (a broken one names none here: `run` reports it).
    pub fn metrics_file_or(workspace: &Path, flag: Option<&Path>) -> Option<std::path::PathBuf> {
        match flag {
            Some(p) => Some(p.to_path_buf()),
            None => DagrunConfig::load(workspace).ok().and_then(|s| s.metrics_file),
        }
    }

    /// Load `<workspace>/config/dagrun.yaml`; a missing file gives the defaults.
    pub fn load(workspace: &Path) -> Result<DagrunConfig> {
        let path = workspace.join(CONFIG_FILE);
        match crate::util::read_at_most(&path, MAX_CONFIG_BYTES) {
            Ok(bytes) => {
                let mut c = Self::parse(&bytes, CONFIG_FILE)?;
                c.metrics_file = c.metrics_file.map(|m| workspace.join(m));
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DagrunConfig::default()),
            Err(e) => Err(config(format!("{CONFIG_FILE}: cannot read it ({e})"))),
        }
    }

    /// Parse and validate; `shown` names the file in errors.
    pub fn parse(bytes: &[u8], shown: &str) -> Result<DagrunConfig> {
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(config(format!("{shown}: the file is over 1 MiB; it holds a few settings")));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| config(format!("{shown}: not valid UTF-8 (byte {})", e.valid_up_to())))?;
        let yaml_err = |e: yaml_serde::Error| {
            let msg = crate::pipeline::explain_yaml_message(&e.to_string());
            let clean = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            let known = "known keys: master_key, master_key_mechanism, metrics_file, remote: {url, endpoint, region, jobs, retry_timeout}";
            match e.location() {
                Some(l) => config(format!("{shown}:{}:{}: {clean} ({known})", l.line(), l.column())),
                None => config(format!("{shown}: {clean} ({known})")),
            }
        };
        crate::pipeline::check_yaml_budget(text).map_err(yaml_err)?;
        let raw: RawConfig = if text.trim().is_empty() { RawConfig::default() } else { yaml_serde::from_str(text).map_err(yaml_err)? };
        let line_of = |key: &str| text.lines().position(|l| l.trim_start().starts_with(&format!("{key}:"))).map(|i| i + 1).unwrap_or(1);
        let master_key = match raw.master_key {
            None => None,
            Some(s) => {
                let at = line_of("master_key");
                let uri = Pkcs11Uri::parse(s.trim()).map_err(|e| config(format!("{shown}:{at}: master_key is not a valid PKCS#11 URI: {e:#}")))?;
                if uri.has_pin_value() {
                    return Err(config(format!(
                        "{shown}:{at}: master_key carries the PIN itself (pin-value): a PIN must never be in config/ \
                         (it is shared and versioned). Put the PIN in a file readable only by you and use \
                         pin-source=file:/path/to/pin instead"
                    )));
                }
                Some(uri)
            }
        };
        let master_key_mechanism = match raw.master_key_mechanism.as_deref() {
            None => None,
            Some(s) => crate::crypto::master::parse_mechanism_setting(s).ok_or_else(|| {
                config(format!(
                    "{shown}:{}: master_key_mechanism is \"{}\": it must be auto, CKM_AES_GCM or CKM_AES_KEY_WRAP_PAD",
                    line_of("master_key_mechanism"),
                    crate::crypto::escape_for_message(s)
                ))
            })?,
        };
        if let Some(r) = &raw.remote {
            let at = line_of("remote");
            if r.url.trim().is_empty() {
                return Err(config(format!("{shown}:{at}: remote.url is empty; give a URL such as s3://BUCKET/PREFIX")));
            }
            if r.jobs.is_some_and(|j| !(1..=64).contains(&j)) {
                return Err(config(format!("{shown}:{at}: remote.jobs must be from 1 to 64 (transfers at once)")));
            }
            if r.retry_timeout.is_some_and(|t| !(t.is_finite() && (0.0..=86_400.0).contains(&t))) {
                return Err(config(format!("{shown}:{at}: remote.retry_timeout must be a number of seconds from 0 to 86400 (a day)")));
            }
        }
        if let Some(m) = &raw.metrics_file
            && (m.as_os_str().is_empty() || m.to_string_lossy().ends_with('/'))
        {
            let at = line_of("metrics_file");
            return Err(config(format!("{shown}:{at}: metrics_file must name a file, e.g. /var/lib/node_exporter/textfile_collector/dagrun.prom")));
        }
        Ok(DagrunConfig { master_key, master_key_mechanism, metrics_file: raw.metrics_file, remote: raw.remote })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "pkcs11:token=t;object=k;type=secret-key?module-path=/m.so&pin-source=file:/p";

    #[test]
    fn parses_master_key_and_empty_files() {
        let c = DagrunConfig::parse(format!("master_key: \"{URI}\"\n").as_bytes(), CONFIG_FILE).unwrap();
        assert_eq!(c.master_key.unwrap().token.as_deref(), Some("t"));
        assert!(DagrunConfig::parse(b"", CONFIG_FILE).unwrap().master_key.is_none());
        assert!(DagrunConfig::parse(b"# nothing\n", CONFIG_FILE).unwrap().master_key.is_none());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let e = DagrunConfig::parse(b"# settings\nmaster_kye: x\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:2:") && e.contains("master_kye"), "{e}");
        let e = DagrunConfig::parse(b"\nmaster_key: file:/x\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:2:") && e.contains("pkcs11:"), "{e}");
        let pinned = format!("master_key: \"{}\"\n", URI.replace("pin-source=file:/p", "pin-value=12345678"));
        let e = DagrunConfig::parse(pinned.as_bytes(), CONFIG_FILE).unwrap_err().to_string();
        assert!(e.contains("pin-value") && !e.contains("12345678"), "{e}");
        assert_eq!(crate::error::exit_code_of(&DagrunConfig::parse(b"x: 1", CONFIG_FILE).unwrap_err()), 2);
    }

    #[test]
    fn metrics_file_is_text() {
        let c = DagrunConfig::parse(b"metrics_file: m/dagrun.prom\n", CONFIG_FILE).unwrap();
        assert_eq!(c.metrics_file.as_deref(), Some(Path::new("m/dagrun.prom")));
        assert_eq!(DagrunConfig::parse(b"metrics_file: \"5\"\n", CONFIG_FILE).unwrap().metrics_file.as_deref(), Some(Path::new("5")));
        assert!(DagrunConfig::parse(b"metrics_file:\n", CONFIG_FILE).unwrap().metrics_file.is_none());
        for bad in ["metrics_file: 5\n", "metrics_file: true\n", "metrics_file: 1.5\n", "metrics_file: [a]\n", "metrics_file: {a: b}\n"] {
            let e = DagrunConfig::parse(bad.as_bytes(), CONFIG_FILE).unwrap_err().to_string();
            assert!(e.starts_with("config/dagrun.yaml:1:") && e.contains("a file path as text"), "{bad}: {e}");
        }
    }

    #[test]
    fn remote_settings_parse_strictly() {
        let c = DagrunConfig::parse(b"remote:\n  url: s3://b/p\n  endpoint: http://127.0.0.1:1\n  jobs: 4\n", CONFIG_FILE).unwrap();
        let r = c.remote.unwrap();
        assert_eq!((r.url.as_str(), r.endpoint.as_deref(), r.jobs), ("s3://b/p", Some("http://127.0.0.1:1"), Some(4)));
        let e = DagrunConfig::parse(b"remote:\n  url: s3://b/p\n  endpiont: x\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:3:") && e.contains("endpiont"), "{e}");
        let e = DagrunConfig::parse(b"# x\nremote:\n  url: s3://b/p\n  jobs: 0\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:2:") && e.contains("jobs"), "{e}");
        // A retry time no Duration holds is refused, not a panic (review 17).
        for t in ["1e30", "-1", ".inf", ".nan"] {
            let e = DagrunConfig::parse(format!("remote:\n  url: s3://b/p\n  retry_timeout: {t}\n").as_bytes(), CONFIG_FILE).unwrap_err().to_string();
            assert!(e.contains("retry_timeout must be a number of seconds from 0 to 86400"), "{t}: {e}");
        }
        let both = format!("master_key: \"{URI}\"\nremote:\n  url: file:///tmp/x\n");
        let c = DagrunConfig::parse(both.as_bytes(), CONFIG_FILE).unwrap();
        assert!(c.master_key.is_some() && c.remote.is_some());
    }

    #[test]
    fn master_key_mechanism_parses_strictly() {
        let c = DagrunConfig::parse(b"master_key_mechanism: CKM_AES_KEY_WRAP_PAD\n", CONFIG_FILE).unwrap();
        assert_eq!(c.master_key_mechanism, Some(Mech::Kwp));
        assert_eq!(DagrunConfig::parse(b"master_key_mechanism: auto\n", CONFIG_FILE).unwrap().master_key_mechanism, None);
        let e = DagrunConfig::parse(b"# m\nmaster_key_mechanism: CKM_DES\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:2:") && e.contains("CKM_AES_KEY_WRAP_PAD"), "{e}");
    }

    #[test]
    fn metrics_file_is_read_checked_and_relative_to_the_workspace() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(DagrunConfig::load(d.path()).unwrap().metrics_file, None);
        std::fs::create_dir_all(d.path().join("config")).unwrap();
        std::fs::write(d.path().join(CONFIG_FILE), "metrics_file: out/dagrun.prom\n").unwrap();
        assert_eq!(DagrunConfig::load(d.path()).unwrap().metrics_file, Some(d.path().join("out/dagrun.prom")));
        let c = DagrunConfig::parse(b"metrics_file: /abs/x.prom\n", CONFIG_FILE).unwrap();
        assert_eq!(c.metrics_file, Some(PathBuf::from("/abs/x.prom")));
        let e = DagrunConfig::parse(b"# m\nmetrics_fiel: b.prom\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:2:") && e.contains("metrics_fiel") && e.contains("metrics_file"), "{e}");
        let e = DagrunConfig::parse(b"metrics_file: [1, 2]\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:1:"), "{e}");
        let e = DagrunConfig::parse(b"\nmetrics_file: \"\"\n", CONFIG_FILE).unwrap_err().to_string();
        assert!(e.starts_with("config/dagrun.yaml:2:") && e.contains("must name a file"), "{e}");
    }
}
