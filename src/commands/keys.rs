//! `dagrun keys list | rotate | forget | export`. Key bytes are printed only by
//! `export`, and only with its explicit confirmation flag.
//!
//! Every command needs an existing workspace (`main` refuses with exit 2
//! otherwise); `list` and `export` create nothing (no master key, no
//! keyring); `rotate` and `forget` change the keyring only under the
//! workspace lock.

use crate::crypto::keyring::Keyring;
use crate::workspace::Workspace;
use anyhow::{Result, anyhow};
use std::path::Path;

pub fn list(workspace: &Path, json: bool) -> Result<()> {
    let keys = match Keyring::open_existing(workspace)? {
        Some(ring) => ring.list(),
        None => Vec::new(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "keys": keys }))?);
        return Ok(());
    }
    if keys.is_empty() {
        println!("no keys yet (they are created when a tenant's data is first encrypted)");
    }
    println!("{:<24} {:<28} {:<10} {:<9} CREATED", "TENANT", "KEY ID", "KIND", "STATE");
    for k in keys {
        println!(
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

pub fn rotate(workspace: &Path, tenant: &str, wait: Option<std::time::Duration>) -> Result<()> {
    let _l = Workspace::at(workspace).lock(wait, "dagrun keys rotate")?;
    let ring = Keyring::open(workspace)?;
    let id = ring.rotate(tenant)?;
    println!("tenant {tenant}: new active data key {id}; older keys stay available to decrypt existing data until it is re-encrypted (the next run re-encrypts it)");
    Ok(())
}

pub fn forget(workspace: &Path, tenant: &str, yes: bool, wait: Option<std::time::Duration>) -> Result<()> {
    if !yes {
        return Err(crate::error::config(format!(
            "`dagrun keys forget {tenant}` destroys tenant {tenant}'s keys for good: its encrypted data becomes unreadable. Add --yes to confirm"
        )));
    }
    let _l = Workspace::at(workspace).lock(wait, "dagrun keys forget")?;
    let ring = Keyring::open(workspace)?;
    ring.forget(tenant)?;
    println!(
        "tenant {tenant}: data and pseudonym keys destroyed (crypto-shredded); its encrypted data, including copies in the cache, can no longer be decrypted. Other tenants are unaffected. Remove {tenant} from config/tenants.yaml"
    );
    Ok(())
}

pub fn export(workspace: &Path, tenant: &str, key_id: Option<&str>, confirmed: bool) -> Result<()> {
    if !confirmed {
        return Err(crate::error::config(
            "`dagrun keys export` prints a secret data key on stdout; pass --i-understand-this-prints-a-secret to confirm, and keep the output out of logs".to_string(),
        ));
    }
    let ring = Keyring::open_existing(workspace)?
        .ok_or_else(|| anyhow!("{} has no master key, so it holds no tenant keys to export", workspace.display()))?;
    let hex = ring.export_data_key_hex(tenant, key_id)?;
    println!("{hex}");
    Ok(())
}
