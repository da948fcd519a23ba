//! `dagrun models list | promote | rollback | history`: the model registry
//! (see `crate::registry`). Promotion and rollback take the workspace lock,
//! verify the model, and are written atomically and to the history.
//! Promoting the champion again changes nothing and succeeds (exit 0, no
//! history line). A tenant that `config/tenants.yaml` does not list and the
//! registry has no folder of is refused (exit 2), naming the listed tenants.

use crate::engine::lock;
use crate::registry::{Promotion, Registry, current_user};
use anyhow::{Context, Result};
use std::path::Path;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ModelsCmd {
    /// Registered versions (time, AUC, feature version, lineage hash, alias).
    List {
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make VERSION the tenant's champion (a running server switches to it).
    Promote {
        tenant: String,
        version: String,
        /// Why (kept in the history).
        #[arg(long, default_value = "manual promotion")]
        reason: String,
        /// Wait up to SECONDS for a run holding the workspace.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = crate::commands::parse_seconds)]
        wait: f64,
        /// Mark the new champion in this metrics file (default: `metrics_file:` in config/dagrun.yaml).
        #[arg(long, value_name = "PATH")]
        metrics_file: Option<std::path::PathBuf>,
    },
    /// Return the tenant to its previous champion.
    Rollback {
        tenant: String,
        #[arg(long, default_value = "manual rollback")]
        reason: String,
        /// Wait up to SECONDS for a run holding the workspace.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = crate::commands::parse_seconds)]
        wait: f64,
        /// Mark the new champion in this metrics file (default: `metrics_file:` in config/dagrun.yaml).
        #[arg(long, value_name = "PATH")]
        metrics_file: Option<std::path::PathBuf>,
    },
    /// Promotions and rollbacks: who, when, from, to, why.
    History {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
}

/// A tenant `config/tenants.yaml` lists or the registry has a folder of;
/// anything else is refused (exit 2) naming the configured tenants: a typo
/// must not read as "no registered models".
fn check_tenant(workspace: &Path, reg: &Registry, t: &str) -> Result<()> {
    crate::pipeline::tenants::validate_tenant_id(t).map_err(|m| crate::error::config(format!("tenant: {m}")))?;
    super::check_known_tenant(workspace, t, reg.tenants().iter().any(|r| r == t), "the model registry holds no model of it")
}

/// The new champion, marked in the metrics file when one is known
/// (`engine::run_metrics::mark_champion`).
fn mark_in_metrics(workspace: &Path, flag: Option<&Path>, tenant: &str, version: &str) {
    if let Some(p) = crate::config::DagrunConfig::metrics_file_or(workspace, flag) {
        crate::engine::run_metrics::mark_champion(&p, workspace, tenant, version);
    }
}

pub fn run(workspace: &Path, cmd: &ModelsCmd) -> Result<()> {
    let dir = workspace.join(crate::engine::DAGRUN_DIR);
    let reg = Registry::new(&dir);
    let ws = crate::workspace::Workspace::at(workspace);
    // Promotion and rollback verify the model they name (MAC, tenant).
    let key = || crate::scoring::integrity_key_of(&ws);
    match cmd {
        ModelsCmd::List { tenant, json } => {
            let tenants = match tenant {
                Some(t) => {
                    check_tenant(workspace, &reg, t)?;
                    vec![t.clone()]
                }
                None => reg.tenants(),
            };
            let mut out = vec![];
            for t in &tenants {
                let champ = reg.champion(t)?;
                let prev = champ.as_ref().and_then(|c| c.previous.last().cloned());
                for e in reg.versions(t)? {
                    let alias = if champ.as_ref().is_some_and(|c| c.version == e.version) {
                        "champion"
                    } else if prev.as_deref() == Some(e.version.as_str()) {
                        "previous"
                    } else {
                        ""
                    };
                    out.push((t.clone(), e, alias));
                }
            }
            if *json {
                let v: Vec<_> = out
                    .iter()
                    .map(|(t, e, a)| serde_json::json!({"tenant": t, "version": e.version, "registered_at": e.registered_at, "auc": e.auc,
                        "feature_version": e.feature_version, "lineage_hash": e.lineage_hash, "blake3": e.blake3, "alias": if a.is_empty() { None } else { Some(a) }}))
                    .collect();
                crate::outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "models": v }))?);
                return Ok(());
            }
            if out.is_empty() {
                crate::outln!("no registered models (train registers them; see `dagrun run`)");
                return Ok(());
            }
            crate::outln!("{:<16} {:<28} {:<24} {:>7}  {:<8} {:<14} ALIAS", "TENANT", "VERSION", "REGISTERED", "AUC", "FEATURES", "LINEAGE");
            for (t, e, a) in &out {
                crate::outln!(
                    "{:<16} {:<28} {:<24} {:>7.4}  {:<8} {:<14} {}",
                    t,
                    e.version,
                    e.registered_at,
                    e.auc,
                    e.feature_version,
                    crate::workspace::hash::short(&e.lineage_hash),
                    a
                );
            }
        }
        ModelsCmd::Promote { tenant, version, reason, wait, metrics_file } => {
            check_tenant(workspace, &reg, tenant)?;
            let _l = lock::acquire(&dir, Some(std::time::Duration::from_secs_f64(*wait)), "dagrun models promote")?;
            if !reg.versions(tenant)?.iter().any(|e| &e.version == version) {
                // A model trained before the registry existed: register the
                // train stage's current output, verified against its lineage record.
                if let Ok(d) = crate::scoring::load_trained(&ws, key()?, tenant, None)
                    && &d.artifact.model_version == version
                {
                    let bytes = crate::util::read_capped(&d.model_path, crate::model::artifact::MAX_MODEL_BYTES)
                        .with_context(|| format!("cannot read {}", d.model_path.display()))?;
                    if blake3::hash(&bytes).to_hex().as_str() == d.model_hash {
                        reg.register(&bytes, &*key()?)?;
                    }
                }
            }
            match reg.promote(tenant, version, &current_user(), reason, &*key()?)? {
                Promotion::Changed { from } => {
                    mark_in_metrics(workspace, metrics_file.as_deref(), tenant, version);
                    crate::doneln!("tenant {tenant}: champion {} -> {version}", from.as_deref().unwrap_or("(none)"))
                }
                Promotion::AlreadyChampion => crate::doneln!("tenant {tenant}: {version} is already the champion; nothing changed"),
            }
        }
        ModelsCmd::Rollback { tenant, reason, wait, metrics_file } => {
            check_tenant(workspace, &reg, tenant)?;
            let _l = lock::acquire(&dir, Some(std::time::Duration::from_secs_f64(*wait)), "dagrun models rollback")?;
            let (from, to) = reg.rollback(tenant, &current_user(), reason, &*key()?)?;
            mark_in_metrics(workspace, metrics_file.as_deref(), tenant, &to);
            crate::doneln!("tenant {tenant}: champion {from} -> {to} (rolled back)");
        }
        ModelsCmd::History { tenant, json } => {
            check_tenant(workspace, &reg, tenant)?;
            let h = reg.history(tenant)?;
            let applied = crate::registry::applied(&h, reg.champion(tenant)?.as_ref());
            if *json {
                let mut entries = Vec::new();
                for (e, &ok) in h.iter().zip(&applied) {
                    let mut v = serde_json::to_value(e)?;
                    v["applied"] = ok.into();
                    entries.push(v);
                }
                crate::outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "history": entries }))?);
                return Ok(());
            }
            if h.is_empty() {
                crate::outln!("tenant {tenant}: no promotions yet");
            }
            // The fields come from a file anyone with write access may edit:
            // control characters are escaped, never sent to the terminal.
            let esc = crate::util::escape_controls;
            for (e, &ok) in h.iter().zip(&applied) {
                crate::outln!(
                    "{}  {:<8} {:<28} -> {:<28} by {}: {}{}",
                    esc(&e.time),
                    e.action,
                    esc(e.from.as_deref().unwrap_or("(none)")),
                    esc(&e.to),
                    esc(&e.who),
                    esc(&e.why),
                    if ok { "" } else { "  (not applied: the command was stopped before it changed the champion)" }
                );
            }
        }
    }
    Ok(())
}
