//! The environment a child process may see: the one rule for every process
//! dagrun starts (`cmd` stages today; job scripts and `sbatch` tomorrow).
//!
//! # Rules
//! - A child gets dagrun's own environment **minus**:
//!   - every variable whose name starts with `DAGRUN_MASTER_KEY`
//!     (`DAGRUN_MASTER_KEY`, `DAGRUN_MASTER_KEY_FILE`, `DAGRUN_MASTER_KEY_URI`
//!     with its PIN, and any later one: name every new master-key variable
//!     with that prefix and it is withheld automatically);
//!   - dagrun's own credentials in [`ALWAYS_DENIED`] (the OpenLineage token,
//!     and its endpoint URL, which may carry a password or a query key);
//!   - the cloud credentials in [`CLOUD_CREDENTIALS`] (those the remote
//!     cache's `object_store` reads: `AWS_SECRET_ACCESS_KEY`, Azure account
//!     keys and SAS tokens, a Google service account key), unless the pipeline
//!     lets one through by name under `pass_env:` (a stage that runs `aws s3
//!     cp` itself); [`effective_secrets`] folds them into the `secrets:` list;
//!   - every variable the pipeline lists under `secrets:` (exact names, or a
//!     prefix ending in `*`, e.g. `AWS_SECRET_*`).
//! - The caller then adds what it declares (e.g. `DAGRUN_STAGE`, a stage's
//!   `env:`); [`check_declared`] refuses a declared name that is denied, so a
//!   pipeline cannot hand a secret's name back to a child by accident.
//! - The environment is rebuilt from scratch ([`apply`] calls `env_clear`), so
//!   nothing reaches a child by inheritance that this module did not pass.

use std::ffi::{OsStr, OsString};
use std::process::Command;

/// Names with this prefix never reach a child.
pub const ALWAYS_DENIED_PREFIX: &str = "DAGRUN_MASTER_KEY";
/// dagrun's own credentials that never reach a child (`lineage::TOKEN_ENV`).
pub const ALWAYS_DENIED: &[&str] = &["DAGRUN_OPENLINEAGE_TOKEN", "DAGRUN_OPENLINEAGE_URL"];

/// Cloud credentials withheld from children unless the pipeline names them
/// under `pass_env:` (their values, not the paths of credential files; ids
/// and regions, which grant nothing alone, pass).
pub const CLOUD_CREDENTIALS: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
];

/// The withheld list of a pipeline: its `secrets:` plus every cloud
/// credential it does not pass (`pass_env:`). A `pass_env:` entry must be one
/// of [`CLOUD_CREDENTIALS`] and not also a secret: anything else is a mistake
/// (a variable that is not withheld needs no pass).
pub fn effective_secrets(secrets: &[String], pass: &[String]) -> Result<Vec<String>, String> {
    for p in pass {
        if !CLOUD_CREDENTIALS.contains(&p.as_str()) {
            return Err(format!(
                "`pass_env:` entry {p:?} is not a withheld cloud credential, so it needs no pass (the master key and OpenLineage variables can never be passed); the ones it may name: {}",
                CLOUD_CREDENTIALS.join(", ")
            ));
        }
        if is_denied(OsStr::new(p), secrets) {
            return Err(format!("`pass_env:` entry {p} is also withheld by `secrets:`; keep it in one of the two"));
        }
    }
    let mut out = secrets.to_vec();
    out.extend(CLOUD_CREDENTIALS.iter().filter(|c| !pass.iter().any(|p| p == *c)).map(|c| c.to_string()));
    Ok(out)
}

/// True when `name` must not reach a child: the master-key prefix, or a
/// `secrets:` entry (exact name, or `PREFIX*`).
pub fn is_denied(name: &OsStr, secrets: &[String]) -> bool {
    let Some(name) = name.to_str() else {
        // Not UTF-8: cannot be a secret's declared name, but it cannot be the
        // master key prefix either unless its start matches byte for byte.
        return name.as_encoded_bytes().starts_with(ALWAYS_DENIED_PREFIX.as_bytes());
    };
    if name.starts_with(ALWAYS_DENIED_PREFIX) || ALWAYS_DENIED.contains(&name) {
        return true;
    }
    secrets.iter().any(|s| match s.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == s,
    })
}

/// dagrun's environment with every denied variable removed.
pub fn inherited(secrets: &[String]) -> Vec<(OsString, OsString)> {
    std::env::vars_os().filter(|(k, _)| !is_denied(k, secrets)).collect()
}

/// Give `cmd` exactly the inherited, filtered environment (declared
/// variables are added by the caller afterwards).
pub fn apply(cmd: &mut Command, secrets: &[String]) {
    cmd.env_clear();
    cmd.envs(inherited(secrets));
}

/// Check a `secrets:` entry: a variable name (`[A-Za-z_][A-Za-z0-9_]*`),
/// optionally ending in `*` (a prefix).
pub fn check_secret_pattern(p: &str) -> Result<(), String> {
    let name = p.strip_suffix('*').unwrap_or(p);
    let ok = name.chars().enumerate().all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
    if (name.is_empty() && !p.ends_with('*')) || !ok || p == "*" {
        return Err(format!(
            "`secrets:` entry {p:?} is not an environment variable name (letters, digits, '_', not starting with a digit), optionally ending in '*' for a prefix"
        ));
    }
    Ok(())
}

/// Refuse a declared variable (a stage's `env:`) whose name is denied.
pub fn check_declared(name: &str, secrets: &[String]) -> Result<(), String> {
    if is_denied(OsStr::new(name), secrets) {
        return Err(format!(
            "`env:` sets {name}, which is withheld from commands (the master key variables, cloud credentials not under `pass_env:`, and the pipeline's `secrets:`); remove it from `env:`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_variables_and_secrets_are_denied() {
        let s = vec!["API_TOKEN".to_string(), "AWS_SECRET_*".to_string()];
        assert!(ALWAYS_DENIED.contains(&crate::lineage::TOKEN_ENV));
        assert!(ALWAYS_DENIED.contains(&crate::lineage::URL_ENV));
        for n in [
            "DAGRUN_MASTER_KEY",
            "DAGRUN_MASTER_KEY_FILE",
            "DAGRUN_MASTER_KEY_URI",
            "DAGRUN_MASTER_KEY_PIN",
            "DAGRUN_OPENLINEAGE_TOKEN",
            "API_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(is_denied(OsStr::new(n), &s), "{n}");
        }
        for n in ["PATH", "HOME", "API_TOKEN_X", "AWS_REGION", "DAGRUN_STAGE", "DAGRUN_MASTER"] {
            assert!(!is_denied(OsStr::new(n), &s), "{n}");
        }
        assert!(check_declared("DAGRUN_MASTER_KEY", &s).is_err());
        assert!(check_declared("AWS_SECRET_X", &s).is_err());
        assert!(check_declared("LC_ALL", &s).is_ok());
    }

    #[test]
    fn cloud_credentials_are_withheld_unless_passed_by_name() {
        let s = effective_secrets(&["API_TOKEN".to_string()], &[]).unwrap();
        for n in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY", "GOOGLE_SERVICE_ACCOUNT_KEY", "API_TOKEN"] {
            assert!(is_denied(OsStr::new(n), &s), "{n}");
        }
        for n in ["AWS_ACCESS_KEY_ID", "AWS_REGION", "AWS_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS", "HOME"] {
            assert!(!is_denied(OsStr::new(n), &s), "{n}");
        }
        let s = effective_secrets(&[], &["AWS_SECRET_ACCESS_KEY".to_string(), "AWS_SESSION_TOKEN".to_string()]).unwrap();
        assert!(!is_denied(OsStr::new("AWS_SECRET_ACCESS_KEY"), &s));
        assert!(!is_denied(OsStr::new("AWS_SESSION_TOKEN"), &s));
        assert!(is_denied(OsStr::new("AZURE_CLIENT_SECRET"), &s));
        for bad in ["DAGRUN_MASTER_KEY", "DAGRUN_OPENLINEAGE_TOKEN", "HOME", "AWS_*"] {
            let e = effective_secrets(&[], &[bad.to_string()]).unwrap_err();
            assert!(e.contains("needs no pass") && e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
        }
        let e = effective_secrets(&["AWS_SECRET_*".to_string()], &["AWS_SECRET_ACCESS_KEY".to_string()]).unwrap_err();
        assert!(e.contains("also withheld by `secrets:`"), "{e}");
    }

    #[test]
    fn secret_patterns_are_names() {
        for ok in ["A", "_X", "AWS_*", "a1", "X*"] {
            check_secret_pattern(ok).unwrap();
        }
        for bad in ["", "*", "1A", "A-B", "A B", "A*B", "$X"] {
            assert!(check_secret_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn apply_rebuilds_the_environment() {
        let mut c = Command::new("/bin/true");
        c.env("DAGRUN_MASTER_KEY", "x");
        apply(&mut c, &[]);
        assert!(c.get_envs().all(|(k, _)| !k.to_string_lossy().starts_with("DAGRUN_MASTER_KEY")));
    }
}
