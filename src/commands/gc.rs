//! `dagrun gc [--keep-runs N] [--dry-run] [--json]`: remove the cache
//! entries and objects that neither the current state nor the newest runs
//! use (what is live: `workspace::gc`).
//!
//! Rules: runs under the workspace lock (exit 75 when a run holds it, or
//! waits with `--wait`); the keys of every stage of the newest `--keep-runs`
//! run records are kept, whatever the stage's status; a run record that does
//! not read is an error naming it (exit 2), nothing deleted, since the keys
//! it holds are unknown. Run records themselves are history and are kept.
//! The feature files each tenant's champion and its `--keep-runs` latest
//! earlier champions (what `models rollback` returns to) were trained on are
//! kept: they are what `drift` compares new data with. A registry model that
//! does not verify names nothing (it is never used); a warning says so.
//! A forgotten tenant's (`keys forget`) state records, cache entries (kept
//! runs' too), champion feature files and registry folder are removed
//! (`workspace::gc`'s rules): what `keys forget` says stays readable until
//! its folders are deleted and `gc` runs (helper-72: nothing of it ever went,
//! and `verify` failed on its records every night). Before they go, what
//! they output (paths and hashes) is kept in `.dagrun/forgotten-outputs.json`
//! (`remote::forgotten`), so push and pull still know what derives from it.

use crate::crypto::Keyring;
use crate::engine::runs;
use crate::error::exit;
use crate::workspace::cas::Cas;
use crate::workspace::gc;
use crate::workspace::state::StateStore;
use crate::workspace::{ContentHash, Workspace};
use anyhow::Result;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// Runs whose stages' cache entries are kept by default.
pub const DEFAULT_KEEP_RUNS: usize = 10;

#[derive(clap::Args)]
pub struct Args {
    /// Keep the cache entries of every stage of the newest N runs (besides the current state).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP_RUNS)]
    pub keep_runs: usize,
    #[command(flatten)]
    pub delete: crate::commands::DeleteFlags,
}

/// `--json`'s object (README "Keeping the cache in bounds").
#[derive(serde::Serialize)]
struct Report {
    dry_run: bool,
    keep_runs: usize,
    runs_read: usize,
    /// Forgotten tenants whose records and registry were removed (or would be).
    forgotten_tenants: Vec<String>,
    state_records_removed: usize,
    entries_removed: usize,
    objects_removed: usize,
    bytes_removed: u64,
    entries_kept: usize,
    objects_kept: usize,
    bytes_kept: u64,
}

pub fn run(workspace: &Path, args: &Args) -> Result<i32> {
    let ws = Workspace::at(workspace);
    let _lock = ws.lock(args.delete.wait.map(Duration::from_secs_f64), "dagrun gc")?;
    let Some(keyring) = Keyring::open_existing(ws.root())? else {
        return Err(crate::error::config(format!(
            "no master key for {}: cache records cannot be verified, so nothing can be collected safely (set the master key dagrun runs with)",
            ws.root().display()
        )));
    };
    let states = StateStore::new(&ws, Some(keyring.integrity_key()));
    let cas = Cas::read_only(&ws);

    let listing = runs::list(ws.root());
    if let Some((_, e)) = listing.unreadable.first() {
        return Err(crate::error::config(format!("{e:#}; its cache entries are unknown, so nothing was collected")));
    }
    let newest: Vec<_> = listing.records.iter().rev().take(args.keep_runs).collect();
    let keep: HashSet<ContentHash> =
        newest.iter().flat_map(|r| &r.stages).filter_map(|s| s.key.as_deref()).filter_map(|k| ContentHash::parse(k).ok()).collect();
    // Only a proven erasure: a sealed tombstone, no key left (helper-73).
    let erasures = keyring.erasures();
    let forgotten = &erasures.proven;
    for (t, has_keys) in &erasures.unproven {
        let why = if *has_keys { "its keys are still there" } else { "no seal of this workspace's `keys forget`: an older dagrun's, or added by hand" };
        tracing::warn!("the keyring names tenant {t} forgotten without proof ({why}): nothing of {t} is removed (delete what is left of it by hand)");
    }
    let is_forgotten = |stage: &str| crate::pipeline::tenants::is_stage_of_any(stage, forgotten);
    let registry = crate::registry::Registry::of_workspace(ws.root());
    let forgotten_registries: Vec<String> = registry.tenants().into_iter().filter(|t| forgotten.contains(t)).collect();
    let champions = champions_features(&registry, &keyring.integrity_key(), args.keep_runs, forgotten);
    let plan = gc::plan(&states, &cas, &keep, &champions, &is_forgotten)?;
    let forgotten_touched: Vec<String> = forgotten
        .iter()
        .filter(|t| {
            forgotten_registries.contains(t)
                || plan
                    .states
                    .iter()
                    .any(|p| p.file_stem().is_some_and(|s| crate::pipeline::tenants::is_stage_of_any(&s.to_string_lossy(), std::slice::from_ref(t))))
        })
        .cloned()
        .collect();
    // Planned figures for a dry run; what was removed otherwise.
    let done = if args.delete.dry_run {
        gc::Applied {
            states_removed: plan.states.len(),
            entries_removed: plan.entries.len(),
            objects_removed: plan.objects.len(),
            bytes_removed: plan.bytes_removed(),
            ..Default::default()
        }
    } else {
        if !forgotten_touched.is_empty() {
            // What the records about to go say of the forgotten tenants'
            // data (paths and hashes) is kept first: push and pull still
            // know a record derived from it (`remote::forgotten`).
            let proven: std::collections::BTreeMap<String, String> = keyring.forgotten_tenants().into_iter().filter(|(t, _)| forgotten.contains(t)).collect();
            // (A context keeps the exit code: `error::exit_code_of` reads the chain.)
            crate::remote::forgotten::Forgotten::of_workspace(proven, &states, Cas::read_only(&ws))
                .remember(&states)
                .map_err(|e| e.context("cannot keep what the forgotten tenants' records output; nothing was collected"))?;
        }
        let mut done = gc::apply(ws.root(), &cas, &plan);
        // A forgotten tenant's registry: its models and history (derived from its data).
        for t in &forgotten_registries {
            if let Err(e) = registry.remove_tenant(t) {
                done.failed += 1;
                done.first_error.get_or_insert(format!("{e:#}"));
            }
        }
        done
    };

    let r = Report {
        dry_run: args.delete.dry_run,
        keep_runs: args.keep_runs,
        runs_read: newest.len(),
        forgotten_tenants: forgotten_touched.clone(),
        state_records_removed: done.states_removed,
        entries_removed: done.entries_removed,
        objects_removed: done.objects_removed,
        bytes_removed: done.bytes_removed,
        entries_kept: plan.entries_kept + plan.entries.len() - done.entries_removed,
        objects_kept: plan.objects_kept + plan.objects.len() - done.objects_removed,
        bytes_kept: plan.bytes_kept + plan.bytes_removed() - done.bytes_removed,
    };
    if args.delete.json {
        crate::engine::report::say(&serde_json::to_string_pretty(&r)?);
    } else if !crate::util::stdout::quiet() {
        let hb = crate::util::human_bytes;
        let verb = if args.delete.dry_run { "would remove" } else { "removed" };
        crate::engine::report::say(&format!(
            "{verb} {} cache entries and {} objects ({}); kept {} entries and {} objects ({}) used by the current state, the newest {} run(s) and the registry's champions",
            r.entries_removed,
            r.objects_removed,
            hb(r.bytes_removed),
            r.entries_kept,
            r.objects_kept,
            hb(r.bytes_kept),
            r.runs_read,
        ));
        if !forgotten_touched.is_empty() {
            let verb = if args.delete.dry_run { "would remove" } else { "removed" };
            crate::engine::report::say(&format!(
                "{verb} what was left of forgotten tenant(s) {}: {} and their registry folders",
                forgotten_touched.join(", "),
                crate::util::count(r.state_records_removed, "state record", "state records"),
            ));
        }
    }
    if let Some(e) = done.first_error {
        return Err(anyhow::anyhow!("{} file(s) could not be removed; first: {e}", done.failed));
    }
    Ok(exit::OK)
}

/// The blake3 of the feature files that each tenant's champion and its
/// `earlier` latest earlier champions were trained on: drift's references,
/// now and after a `models rollback`. None of a `forgotten` tenant's.
fn champions_features(registry: &crate::registry::Registry, key: &crate::crypto::IntegrityKey, earlier: usize, forgotten: &[String]) -> HashSet<ContentHash> {
    let mut out = HashSet::new();
    for tenant in registry.tenants().into_iter().filter(|t| !forgotten.contains(t)) {
        let champion = match registry.champion(&tenant) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("gc: {e:#}; the feature files of tenant {tenant}'s champions are not kept");
                continue;
            }
        };
        for version in champion.previous.iter().rev().take(earlier).chain([&champion.version]) {
            match registry.load(&tenant, version, key) {
                Ok(m) => out.extend(ContentHash::parse(&m.artifact.feature_file_hash).ok()),
                Err(e) => tracing::warn!("gc: {e:#}; the feature file model {version} was trained on is not kept"),
            }
        }
    }
    out
}
