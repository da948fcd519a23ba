//! Master keys held in software: the environment (`DAGRUN_MASTER_KEY`, 64 hex
//! characters), a file (`DAGRUN_MASTER_KEY_FILE`), or the workspace's default file
//! `<workspace>/.dagrun/keys/master.key`.
//!
//! # Key files must be private: refuse, don't warn
//! A master key file (or the keyring) whose mode gives group or other any access
//! is refused with an error naming the file, its mode and the `chmod 600` fix.
//! A warning would scroll past in a pipeline log while the key that protects every
//! tenant's data stays readable by other local users; refusing costs one `chmod`.
//! A key file inside `<workspace>/config/` is refused too: config is shared and
//! versioned, key material never lives there.
//!
//! # The default file
//! Created (mode 0600 from the first byte, never overwriting an existing file) with
//! a one-time warning when none exists; never created when a keyring already
//! exists, because a new key could not open the keys wrapped in it.

use super::MasterKeySource;
use crate::crypto::keyring::{keyring_path, keys_dir};
use crate::crypto::keys::MasterKey;
use crate::crypto::wipe_string;
use crate::util::atomic::{TEMP_MARKER, sync_parent};
use anyhow::{Context, Result, anyhow, bail};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Env var holding the master key as 64 hex characters.
pub const ENV_MASTER_KEY: &str = "DAGRUN_MASTER_KEY";
/// Env var holding the path of a file with the master key.
pub const ENV_MASTER_KEY_FILE: &str = "DAGRUN_MASTER_KEY_FILE";

/// `<workspace>/.dagrun/keys/master.key`
pub fn default_master_key_path(workspace: &Path) -> PathBuf {
    keys_dir(workspace).join("master.key")
}

/// Refuse a key file whose mode lets group or other do anything with it.
pub(crate) fn check_private(path: &Path, what: &str) -> Result<()> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        // A link whose target is gone: name both, not "no such file" for a
        // path that `ls` shows.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(path).is_ok() => {
            let to = fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
            bail!(
                "{what} {} is a symbolic link to {to}, which does not exist: restore that file (from a backup) or \
                 replace the link with the file itself",
                path.display()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {what} {}", path.display())),
    };
    if !meta.is_file() {
        bail!("{what} {} is not a regular file; point dagrun at the file itself", path.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            bail!("{what} {p} has mode {mode:04o}; it must be readable only by its owner: run `chmod 600 {p}`", p = path.display());
        }
    }
    Ok(())
}

/// Refuse a master key file that lies inside `<workspace>/config/`.
fn refuse_if_in_config(workspace: &Path, path: &Path) -> Result<()> {
    let config = workspace.join("config");
    let lexical = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let inside = match (fs::canonicalize(path), fs::canonicalize(&config)) {
        (Ok(p), Ok(c)) => p.starts_with(c),
        (Ok(p), Err(_)) => p.starts_with(lexical(&config)),
        _ => lexical(path).starts_with(lexical(&config)),
    };
    if inside {
        bail!(
            "the master key file {} is inside {}: key material must never live in config/ (it is shared \
             and versioned). Move the file outside config/ (e.g. to {}) with mode 0600 and point \
             DAGRUN_MASTER_KEY_FILE at it, or set DAGRUN_MASTER_KEY",
            path.display(),
            config.display(),
            default_master_key_path(workspace).display()
        );
    }
    Ok(())
}

fn read_master_file(path: &Path) -> Result<MasterKey> {
    check_private(path, "key file")?;
    // One read of a regular file of a few bytes, never waited on: a FIFO or a
    // device swapped in after the check is refused, not read (`util::read_capped`).
    let bytes = zeroize::Zeroizing::new(
        crate::util::read_capped(path, 4096).with_context(|| format!("cannot read key file {} (it must hold 64 hex characters)", path.display()))?,
    );
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    let key = MasterKey::from_hex(&text).map_err(|e| anyhow!("key file {} does not hold a valid master key: {e}", path.display()));
    wipe_string(&mut text);
    key
}

/// Create `path` holding a new random master key, mode 0600 from the first byte,
/// without ever replacing an existing file (temp file + hard link). Returns `None`
/// when another process created it first (the caller then reads that one).
fn create_master_file(path: &Path) -> Result<Option<MasterKey>> {
    use std::fs::OpenOptions;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;

    let key = MasterKey::generate()?;
    let mut text = hex::encode(key.bytes());
    text.push('\n');
    let write_new = |p: &Path, text: &str| -> std::io::Result<()> {
        let mut o = OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        o.mode(0o600);
        let mut f = o.open(p)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = chrono::Utc::now().timestamp_subsec_nanos();
    let tmp = path.with_file_name(format!(".{name}{TEMP_MARKER}{}.{nanos}", std::process::id()));
    let result = (|| -> Result<bool> {
        write_new(&tmp, &text).with_context(|| format!("cannot create {}", tmp.display()))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(_) => {
                // Filesystem without hard links: exclusive create in place.
                match write_new(path, &text) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e).with_context(|| format!("cannot create the master key file {}", path.display())),
                }
            }
        }
    })();
    let _ = fs::remove_file(&tmp);
    wipe_string(&mut text);
    if result? {
        sync_parent(path);
        // Said once, and whatever the verbosity: `-q` (cron, a service unit)
        // hides logs, not this.
        let _ = writeln!(
            std::io::stderr(),
            "warning: created a new local master key at {p}. Back it up now (without it no tenant's encrypted data can \
             be decrypted), or move it out of the workspace and set DAGRUN_MASTER_KEY_FILE (or \
             DAGRUN_MASTER_KEY) to it",
            p = path.display()
        );
        Ok(Some(key))
    } else {
        Ok(None)
    }
}

/// Load the master key; returns it with a description of its source for messages.
/// Check a software master-key source as [`load_master`] would (a valid
/// `DAGRUN_MASTER_KEY`; a key file that exists, is private and is outside
/// `config/`), without reading the key file or creating anything.
pub(super) fn check_source(workspace: &Path, source: &MasterKeySource) -> Result<()> {
    match source {
        MasterKeySource::Env(s) => {
            MasterKey::from_hex(s).map_err(|e| anyhow!("{ENV_MASTER_KEY} does not hold a valid master key: {e}"))?;
        }
        MasterKeySource::File(p) => {
            check_named_key_file(workspace, p)?;
            check_private(p, "key file")?;
        }
        MasterKeySource::Default => {
            let p = default_master_key_path(workspace);
            if fs::symlink_metadata(&p).is_ok() {
                refuse_if_in_config(workspace, &p)?;
                check_private(&p, "key file")?;
            }
        }
        MasterKeySource::Pkcs11 { .. } => {}
    }
    Ok(())
}

/// The file `DAGRUN_MASTER_KEY_FILE` names must exist and lie outside `config/`.
fn check_named_key_file(workspace: &Path, p: &Path) -> Result<()> {
    if !p.exists() {
        bail!(
            "the master key file {} does not exist (named by {ENV_MASTER_KEY_FILE}, or as a file by {}): point the variable at \
             the master key file (64 hex characters, mode 0600), or unset it to use {}",
            crate::util::redact::shown_path(&p.to_string_lossy()),
            super::ENV_MASTER_KEY_URI,
            default_master_key_path(workspace).display()
        );
    }
    refuse_if_in_config(workspace, p)
}

/// What of a workspace's `.dagrun/` is sealed under its master key besides
/// the keyring (the evidence [`keyed_before`] looks for), as the fix says
/// it: removing these starts afresh under a new key.
pub const SEALED_RECORDS: &str = "its state/ and cache/ folders and its hashmemo.json and places.json";

/// Whether a master key was used in `workspace` before, when no key is
/// given and the default file is missing: the error to give (a setting to
/// fix, exit 2) if so. The evidence: a keyring (a new key could never open
/// its wrapped keys) or stage records (sealed under a key: a new one would
/// take every record for tampered and rerun everything, and the next run
/// under the real key would do it again). A cron job that lost
/// `DAGRUN_MASTER_KEY` is told so, by every command.
pub fn keyed_before(workspace: &Path) -> Option<anyhow::Error> {
    let p = default_master_key_path(workspace);
    let unset = format!("{ENV_MASTER_KEY} and {ENV_MASTER_KEY_FILE} are unset and {} does not exist", p.display());
    let set = format!(
        "Set {ENV_MASTER_KEY} to the master key (64 hex characters) or {ENV_MASTER_KEY_FILE} to the file holding it, or restore {} from a backup",
        p.display()
    );
    let ring = keyring_path(workspace);
    if fs::symlink_metadata(&ring).is_ok() {
        return Some(crate::error::config(format!(
            "the keyring {} exists but its master key was not found: {unset}. {set}; do not delete the keyring",
            ring.display()
        )));
    }
    // Records sealed under the key: stage records, action-cache entries, the
    // hash memo, the places record (review 66 #6: not only the first).
    let dagrun = workspace.join(".dagrun");
    let json_in = |d: &Path| fs::read_dir(d).is_ok_and(|rd| rd.flatten().any(|e| e.file_name().as_encoded_bytes().ends_with(b".json")));
    let sealed = json_in(&dagrun.join("state"))
        || json_in(&dagrun.join("cache").join("actions"))
        || ["hashmemo.json", "places.json"].iter().any(|f| fs::symlink_metadata(dagrun.join(f)).is_ok());
    sealed.then(|| {
        crate::error::config(format!(
            "the records in {} were sealed with a master key that was not found: {unset}. {set}; if that key is lost, remove {SEALED_RECORDS} (every stage then runs again)",
            dagrun.display()
        ))
    })
}

pub(super) fn load_master(workspace: &Path, source: &MasterKeySource) -> Result<(MasterKey, String)> {
    match source {
        MasterKeySource::Env(s) => {
            let k = MasterKey::from_hex(s).map_err(|e| anyhow!("{ENV_MASTER_KEY} does not hold a valid master key: {e}"))?;
            Ok((k, ENV_MASTER_KEY.to_string()))
        }
        MasterKeySource::File(p) => {
            check_named_key_file(workspace, p)?;
            Ok((read_master_file(p)?, format!("file {}", p.display())))
        }
        MasterKeySource::Default => {
            let p = default_master_key_path(workspace);
            refuse_if_in_config(workspace, &p)?;
            let desc = format!("file {}", p.display());
            let missing = fs::symlink_metadata(&p).is_err();
            if missing && let Some(e) = keyed_before(workspace) {
                return Err(e);
            }
            if missing && let Some(k) = create_master_file(&p)? {
                return Ok((k, desc));
            }
            Ok((read_master_file(&p)?, desc))
        }
        MasterKeySource::Pkcs11 { uri, .. } => {
            bail!("internal error: {} is a PKCS#11 key, not a key file", uri.shown())
        }
    }
}
