//! `dagrun keys list | rotate | forget | export | init | rewrap | audit`. Key bytes
//! are printed only by `export`, and only with its explicit confirmation flag.
//! Every key operation is appended to the audit log (`crypto::audit`).

use crate::crypto::keyring::{KeyError, Keyring, Rewrapped, keys_dir};
use crate::crypto::master::MasterKeySource;
use crate::workspace::Workspace;
use anyhow::Result;
use std::path::Path;

pub fn list(workspace: &Path, json: bool) -> Result<()> {
    let ring = Keyring::open(workspace)?;
    let keys = ring.list();
    let rec = ring.master_record();
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "master": rec, "keys": keys }))?);
        return Ok(());
    }
    crate::outln!("master key: {} (wrapping: {})", ring.master_key_source(), rec.mechanism);
    if keys.is_empty() {
        crate::outln!("no keys yet (they are created when a tenant's data is first encrypted)");
    }
    crate::outln!("{:<24} {:<28} {:<10} {:<9} CREATED", "TENANT", "KEY ID", "KIND", "STATE");
    for k in keys {
        crate::outln!(
            "{:<24} {:<28} {:<10} {:<9} {}",
            k.tenant,
            k.key_id,
            format!("{:?}", k.kind).to_lowercase(),
            format!("{:?}", k.state).to_lowercase(),
            k.created
        );
    }
    Ok(())
}

/// The workspace lock for a key command, with the copies of the keyring a
/// killed key command left removed first (`keyring::stale_copies`).
fn lock_for_keys(workspace: &Path, wait: Option<std::time::Duration>, what: &str) -> Result<crate::workspace::lock::WorkspaceLock> {
    let l = Workspace::at(workspace).lock(wait, what)?;
    crate::crypto::keyring::remove_stale_copies(workspace);
    Ok(l)
}

pub fn rotate(workspace: &Path, tenant: &str, wait: Option<std::time::Duration>) -> Result<()> {
    let _l = lock_for_keys(workspace, wait, "dagrun keys rotate")?;
    let ring = Keyring::open(workspace)?;
    super::check_known_tenant(workspace, tenant, holds_keys(&ring, tenant), "the keyring holds no key of it")?;
    let id = ring.rotate(tenant).map_err(|e| refuse_forgotten(e, tenant, "rotate"))?;
    crate::doneln!(
        "tenant {tenant}: new active data key {id}; older keys stay available to decrypt existing data until it is re-encrypted (the next run re-encrypts it)"
    );
    Ok(())
}

pub fn forget(workspace: &Path, tenant: &str, yes: bool, wait: Option<std::time::Duration>) -> Result<()> {
    if !yes {
        return Err(crate::error::config(format!(
            "`dagrun keys forget {tenant}` destroys tenant {tenant}'s keys for good: its encrypted data becomes unreadable. Add --yes to confirm"
        )));
    }
    // A copy of the keyring left by a killed key operation would still hold
    // the keys this destroys: before and after, none may remain.
    let _l = lock_for_keys(workspace, wait, "dagrun keys forget")?;
    let ring = Keyring::open(workspace)?;
    super::check_known_tenant(workspace, tenant, holds_keys(&ring, tenant), "the keyring holds no key of it")?;
    ring.forget(tenant)?;
    if let Some(p) = crate::crypto::keyring::remove_stale_copies(workspace).first() {
        return Err(anyhow::anyhow!(
            "tenant {tenant}'s keys are destroyed in the keyring, but {} (a copy left by a killed key operation) could not be removed: remove it by hand, it may still hold them",
            p.display()
        ));
    }
    crate::doneln!(
        "tenant {tenant}: data and pseudonym keys destroyed (crypto-shredded); its encrypted data, including copies in the cache, can no longer be decrypted. Other tenants are unaffected."
    );
    // The operator's next step, said under `-q` too (review 66 #4).
    crate::util::stdout::warn(format_args!(
        "note: remove {tenant} from config/tenants.yaml (its next run fails otherwise); its features and models stay readable here until you delete its folders (featurestore/{tenant}/, models/{tenant}/, its reports) and run `dagrun gc`, which removes its records, cache entries and registry; the next `dagrun push` erases what earlier pushes put on the shared remote, and push and pull skip it from now on"
    ));
    Ok(())
}

/// `rotate` or `export` of a tenant `keys forget` shredded: exit 2, saying
/// so and what is left to do (the run's advice, to remove its rows from the
/// input data, is not this command's).
fn refuse_forgotten(e: anyhow::Error, tenant: &str, what: &str) -> anyhow::Error {
    match e.downcast_ref::<KeyError>() {
        Some(KeyError::Forgotten { at, .. }) => crate::error::config(format!(
            "tenant {tenant} was forgotten on {at} (`dagrun keys forget`): its keys are destroyed, so there is no key to {what}, and no new key is ever \
             made for {tenant}; its encrypted data can no longer be decrypted. To run the pipeline without it, remove {tenant} from config/tenants.yaml"
        )),
        _ => e,
    }
}

/// Whether the keyring has (or had: forgotten tenants keep their mark) keys of `tenant`.
pub(crate) fn holds_keys(ring: &Keyring, tenant: &str) -> bool {
    ring.list().iter().any(|k| k.tenant == tenant)
}

pub fn export(workspace: &Path, tenant: &str, key_id: Option<&str>, confirmed: bool) -> Result<()> {
    if !confirmed {
        return Err(crate::error::config(
            "`dagrun keys export` prints a secret data key on stdout; pass --i-understand-this-prints-a-secret to confirm, and keep the output out of logs"
                .to_string(),
        ));
    }
    let ring = Keyring::open(workspace)?;
    super::check_known_tenant(workspace, tenant, holds_keys(&ring, tenant), "the keyring holds no key of it")?;
    let hex = ring.export_data_key_hex(tenant, key_id).map_err(|e| refuse_forgotten(e, tenant, "export"))?;
    crate::outln!("{hex}");
    Ok(())
}

/// `dagrun keys init --master URI`: start a new workspace's keyring under a PKCS#11
/// master key (generated non-extractable inside the token when missing).
pub fn init(workspace: &Path, master: &str, wait: Option<std::time::Duration>) -> Result<()> {
    let source = MasterKeySource::from_argument(master, "--master")?;
    let _l = lock_for_keys(workspace, wait, "dagrun keys init")?;
    // Records sealed under another key (a workspace keyed by
    // DAGRUN_MASTER_KEY without a keyring: cmd stages only) would all fail
    // their check under the new one and every stage rerun (review 67 #7).
    // A key the token does not hold yet is refused before it is generated.
    let (ring, created) = Keyring::init(workspace, source, |key| {
        let ws = Workspace::at(workspace);
        let states = crate::workspace::state::StateStore::new(&ws, key.cloned());
        let scanned = states.scan_states();
        let valid = scanned.iter().filter(|(_, l)| matches!(l, crate::workspace::state::Loaded::Valid(_))).count();
        if !scanned.is_empty() && (key.is_none() || valid == 0) {
            return Err(crate::error::config(format!(
                "the stage records in {} were sealed with another master key: under {} every record would fail its check and every stage rerun. Keep the key they were sealed with (nothing to init), or, to start afresh under the new key, remove {} first (in {})",
                ws.state_dir().display(),
                if key.is_none() { "a key generated now" } else { "this one" },
                crate::crypto::master::SEALED_RECORDS,
                ws.dagrun_dir().display()
            )));
        }
        Ok(())
    })?;
    crate::doneln!(
        "{} {}; keyring {} now wraps tenant keys with it ({}). Point dagrun at it with DAGRUN_MASTER_KEY_URI or \
         master_key: in config/dagrun.yaml (the keyring also records the URI, without any PIN)",
        if created { "created the non-extractable master key" } else { "using the existing master key" },
        ring.master_key_source(),
        ring.path().display(),
        ring.master_record().mechanism
    );
    Ok(())
}

/// `dagrun keys rewrap --to URI`: move every tenant key to another master key.
pub fn rewrap(workspace: &Path, to: &str, wait: Option<std::time::Duration>) -> Result<()> {
    let to = MasterKeySource::from_argument(to, "--to")?;
    let _l = lock_for_keys(workspace, wait, "dagrun keys rewrap")?;
    let from = MasterKeySource::resolve(workspace)?;
    let old_default_file = match from {
        MasterKeySource::Default => crate::crypto::master::default_master_key_path(workspace),
        _ => std::path::PathBuf::new(),
    };
    match Keyring::rewrap(workspace, from, to)? {
        Rewrapped::Done(n) => {
            let ring_path = crate::crypto::keyring::keyring_path(workspace);
            let rec = crate::crypto::keyring::recorded_master(workspace);
            crate::doneln!(
                "rewrapped {n} key(s) in {} under {} ({}); no data was re-encrypted. Point dagrun at the new master key \
                 (DAGRUN_MASTER_KEY_URI or master_key: in config/dagrun.yaml).",
                ring_path.display(),
                rec.clone()
                    .and_then(|r| r.uri)
                    .map(|u| crate::crypto::master::Pkcs11Uri::parse(&u).map(|u| u.shown()).unwrap_or(u))
                    .unwrap_or_else(|| "the new key".into()),
                rec.map(|r| r.mechanism).unwrap_or_default(),
            );
            // What the operator must still do, on stderr: said under `-q` too
            // (review 66 #4).
            crate::util::stdout::warn(format_args!(
                "warning: the old master key no longer opens this keyring, but it still makes this workspace's integrity key \
                 (kept across a rewrap so that every record stays valid): whoever holds it can still forge this workspace's \
                 records. Destroy it once backups of the old keyring are gone{}",
                if old_default_file.exists() { format!(" (it is still in {}: `shred -u` it then)", old_default_file.display()) } else { String::new() }
            ));
        }
        Rewrapped::AlreadyDone => crate::doneln!("the keyring is already wrapped under the new master key: nothing to do"),
    }
    Ok(())
}

/// `dagrun keys audit [--verify]`: print the audit log, or check its hash chain
/// (exit 4 when a line was edited or deleted).
pub fn audit(workspace: &Path, verify: bool) -> Result<()> {
    let dir = keys_dir(workspace);
    if verify {
        let v = crate::crypto::audit::verify(&dir).map_err(|e| anyhow::Error::from(crate::error::Failure::Integrity(format!("{e:#}"))))?;
        crate::outln!("audit log {}: {} line(s), hash chain intact", dir.join(crate::crypto::audit::AUDIT_FILE).display(), v.lines);
        if v.cut_short > 0 {
            crate::outln!(
                "the log ends in {} byte(s) of a line cut short (a write that was stopped): no line; the next key operation removes them and logs that",
                v.cut_short
            );
        }
        if v.unconfirmed > 0 {
            crate::outln!(
                "the last {} line(s) are not yet confirmed by {}: the command that wrote them could not update it (a full disk, or it was stopped); the next key operation confirms them",
                v.unconfirmed,
                crate::crypto::audit::HEAD_FILE
            );
        }
        // Not a break of the chain, but an erasure its last `started` line
        // promised and that did not happen (`dagrun verify` counts it).
        let view = crate::crypto::keyring::KeyringView::read(workspace)?;
        if let Some(u) = crate::crypto::keyring::unfinished_forget(workspace, |t| view.is_forgotten(t).is_some()) {
            crate::outln!("{}", crate::crypto::keyring::unfinished_forget_message(workspace, &u));
        }
        return Ok(());
    }
    let path = dir.join(crate::crypto::audit::AUDIT_FILE);
    // As `--verify` reads it: a regular file, never waited on nor read without end.
    let text = match crate::util::read_capped(&path, crate::crypto::audit::MAX_LOG_BYTES).map(|b| String::from_utf8_lossy(&b).into_owned()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::outln!("no key operations recorded yet ({} does not exist)", path.display());
            return Ok(());
        }
        Err(e) => return Err(anyhow::Error::from(e).context(format!("cannot read {}", path.display()))),
    };
    crate::outln!("{:<5} {:<25} {:<7} {:<20} {:<22} {:<12} RESULT", "SEQ", "TIME", "OP", "TENANT", "KEY ID", "USER");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let f = |k: &str| crate::crypto::escape_for_message(v.get(k).and_then(|x| x.as_str()).unwrap_or("?"));
        crate::outln!(
            "{:<5} {:<25} {:<7} {:<20} {:<22} {:<12} {}",
            v.get("seq").and_then(|x| x.as_u64()).map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            f("time"),
            f("op"),
            f("tenant"),
            f("key_id"),
            format!("{}@{}", f("user"), f("host")),
            f("result")
        );
    }
    crate::outln!("(check the chain with `dagrun keys audit --verify`)");
    Ok(())
}
