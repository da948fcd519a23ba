//! One file per command. `main.rs` parses arguments and calls these; they
//! print, and return the exit code or an error (see `crate::error`).
pub mod dag;
pub mod erasure;
pub mod exec_stage;
pub mod features;
pub mod gc;
pub mod keys;
pub mod lineage;
pub mod models;
pub mod predict;
pub mod pull;
pub mod push;
pub mod report;
pub mod run;
pub mod runs;
pub mod sample;
pub mod serve;
pub mod status;
pub mod tokens;
pub mod verify;

use std::path::{Path, PathBuf};

/// The existing workspace for commands that take no pipeline (see
/// [`crate::workspace::Workspace::existing`]: exit 2 when there is none,
/// nothing created).
pub fn find_workspace(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(crate::workspace::Workspace::existing_from_cwd(given)?.root().to_path_buf())
}

/// Refuse (exit 2) a tenant that `config/tenants.yaml` does not list and
/// that `also_known` does not vouch for (its keys in the keyring): a typo
/// must not create keys for a tenant nobody has, nor leave a "destroyed"
/// mark on a name a tenant may need later.
pub fn check_known_tenant(workspace: &Path, tenant: &str, also_known: bool, where_else: &str) -> anyhow::Result<()> {
    crate::pipeline::tenants::validate_tenant_id(tenant).map_err(crate::error::config)?;
    let listed = crate::pipeline::tenants::Tenants::load(workspace);
    if also_known || listed.as_ref().is_ok_and(|t| t.get(tenant).is_some()) {
        return Ok(());
    }
    let known = match &listed {
        Ok(t) => format!("config/tenants.yaml lists {}", some_ids(t.ids(), tenant)),
        Err(e) => format!("config/tenants.yaml cannot be read: {e:#}"),
    };
    Err(crate::error::config(format!("no tenant {tenant}: {known}, and {where_else}; check the spelling")))
}

/// Tenant ids for a message about `wanted`: those equal to it but for letter
/// case first, then the others, at most [`SHOWN_IDS`] of them and a count of the rest.
fn some_ids<'a>(ids: impl Iterator<Item = &'a str>, wanted: &str) -> String {
    let (mut shown, rest): (Vec<&str>, Vec<&str>) = ids.partition(|i| i.eq_ignore_ascii_case(wanted));
    let all = shown.len() + rest.len();
    shown.extend(rest.into_iter().take(SHOWN_IDS.saturating_sub(shown.len())));
    match all - shown.len() {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// Most tenant ids one message lists.
const SHOWN_IDS: usize = 8;

pub use crate::pipeline::{MAX_JOBS, MAX_SECONDS};

/// clap parser for a number of seconds: finite, ≥ 0, at most [`MAX_SECONDS`]
/// (a negative, NaN or huge value would otherwise abort the process).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=MAX_SECONDS).contains(&v) {
        return Err(format!("{s:?}: give a number of seconds from 0 to {MAX_SECONDS:.0}"));
    }
    Ok(v)
}

/// The flags of the commands that delete under the workspace lock (`gc`,
/// `runs prune`).
#[derive(clap::Args)]
pub struct DeleteFlags {
    /// Print what would be removed; remove nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Wait up to SECONDS for a running run to release the workspace (default: exit 75 at once).
    #[arg(long, value_name = "SECONDS", value_parser = crate::commands::parse_seconds)]
    pub wait: Option<f64>,
    /// Print what was removed (or would be) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// clap parser for `-j`: 1 to [`MAX_JOBS`].
pub fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_JOBS).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: give a number of parallel stages from 1 to {MAX_JOBS}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_lists_a_few_ids_the_likely_one_first() {
        let ids: Vec<String> = (0..20).map(|i| format!("T{i:02}")).collect();
        assert_eq!(some_ids(ids.iter().map(String::as_str), "t15"), "T15, T00, T01, T02, T03, T04, T05, T06 and 12 more");
        assert_eq!(some_ids(["Tenant_A", "Tenant_B"].into_iter(), "tenant_b"), "Tenant_B, Tenant_A");
        assert_eq!(some_ids(["A", "B"].into_iter(), "C"), "A, B");
    }
}
