//! `dagrun tokens create | list | revoke`: the API tokens of `dagrun serve`
//! (see `crate::serve::tokens`). The token is printed once, by `create`.

use crate::engine::lock;
use crate::serve::tokens;
use anyhow::Result;
use std::path::Path;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum TokensCmd {
    /// Create a token for TENANT; prints it once, as the last line.
    Create {
        tenant: String,
        /// A label for the token (who or what uses it).
        #[arg(long, default_value = "")]
        name: String,
        /// The token stops working after this many days.
        #[arg(long, value_name = "DAYS")]
        expires_in: Option<f64>,
    },
    /// Tokens: id, tenant, name, created, expires, last used (never the token).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id: a running server refuses it within a second.
    Revoke { id: String },
}

/// Is `f` a device nobody reads a token from: a character device that is
/// not a terminal (`/dev/null`, `/dev/zero`; helper-73)?
fn is_sink_device(f: &std::fs::File) -> bool {
    use std::io::IsTerminal;
    use std::os::unix::fs::FileTypeExt;
    f.metadata().is_ok_and(|m| m.file_type().is_char_device()) && !f.is_terminal()
}

/// The workspace integrity key, which seals the token file (the keyring is
/// made on first use, as a run makes it).
fn key(workspace: &Path) -> Result<std::sync::Arc<crate::crypto::IntegrityKey>> {
    Ok(crate::crypto::Keyring::open(workspace)?.integrity_key())
}

pub fn run(workspace: &Path, cmd: &TokensCmd) -> Result<()> {
    let dir = workspace.join(crate::engine::DAGRUN_DIR);
    match cmd {
        TokensCmd::Create { tenant, name, expires_in } => {
            // Where the token will be shown, checked before it exists: a
            // closed stdout (`>&-`) is /dev/null by then (Rust's runtime opens
            // it for a closed standard descriptor), and a token written there
            // is shown to nobody (helper-71: exit 0, the token active).
            let mut out = {
                use std::os::fd::AsFd;
                let out = std::io::stdout().as_fd().try_clone_to_owned().map(std::fs::File::from);
                let out = out.map_err(|e| anyhow::anyhow!("standard output is not open ({e}): a token is shown once, there; nothing was created"))?;
                if is_sink_device(&out) {
                    anyhow::bail!(
                        "standard output is /dev/null or another device that is not a terminal (or was closed): a token is shown once, there, and would be seen by nobody; nothing was created. Redirect it to a file only you can read (`umask 077; dagrun tokens create … > token.txt`) or a secret store"
                    );
                }
                out
            };
            let _l = lock::acquire(&dir, Some(std::time::Duration::from_secs(10)), "dagrun tokens create")?;
            let key = key(workspace)?;
            let (rec, token) = tokens::create(&dir, &key, tenant, name, *expires_in)?;
            let exp = rec.expires.map(|e| format!(", expires {}", e.format("%Y-%m-%dT%H:%M:%SZ"))).unwrap_or_default();
            eprintln!("token {} for tenant {}{exp}; it is shown once and stored only as a hash:", rec.id, rec.tenant);
            // Shown once: a token that cannot be printed (stdout closed or
            // full) is revoked at once, never left working and unknown.
            let shown = {
                use std::io::Write;
                out.write_all(format!("{token}\n").as_bytes())
            };
            if let Err(e) = shown {
                tokens::revoke(&dir, &key, &rec.id)?;
                anyhow::bail!("cannot print token {} ({e}); it is revoked: create another", rec.id);
            }
        }
        TokensCmd::List { json } => {
            // No token file, nothing to verify: listing makes no keyring.
            let all = if tokens::tokens_path(&dir).exists() { tokens::load(&dir, &*key(workspace)?)?.tokens } else { vec![] };
            let used = tokens::last_used(&dir);
            let now = chrono::Utc::now();
            let state = |t: &tokens::TokenRecord| {
                if t.revoked.is_some() {
                    "revoked"
                } else if t.expires.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                }
            };
            if *json {
                let v: Vec<_> = all
                    .iter()
                    .map(|t| {
                        serde_json::json!({"id": t.id, "tenant": t.tenant, "name": t.name, "created": t.created, "expires": t.expires,
                            "revoked": t.revoked, "last_used": used.get(&t.id), "state": state(t)})
                    })
                    .collect();
                crate::outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "tokens": v }))?);
                return Ok(());
            }
            if all.is_empty() {
                crate::outln!("no tokens (dagrun tokens create TENANT)");
                return Ok(());
            }
            let ts = |d: Option<&chrono::DateTime<chrono::Utc>>| d.map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| "-".into());
            crate::outln!("{:<8}  {:<20} {:<16} {:<8} {:<20}  {:<20}  LAST USED", "ID", "TENANT", "NAME", "STATE", "CREATED", "EXPIRES");
            for t in &all {
                crate::outln!(
                    "{:<8}  {:<20} {:<16} {:<8} {:<20}  {:<20}  {}",
                    t.id,
                    t.tenant,
                    if t.name.is_empty() { "-" } else { &t.name },
                    state(t),
                    ts(Some(&t.created)),
                    ts(t.expires.as_ref()),
                    ts(used.get(&t.id))
                );
            }
        }
        TokensCmd::Revoke { id } => {
            let _l = lock::acquire(&dir, Some(std::time::Duration::from_secs(10)), "dagrun tokens revoke")?;
            let t = tokens::revoke(&dir, &*key(workspace)?, id)?;
            crate::doneln!("token {} of tenant {} revoked; a running server refuses it within a second", t.id, t.tenant);
        }
    }
    Ok(())
}
