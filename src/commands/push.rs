//! `dagrun push [PIPELINE] [--remote URL] [--tenant T…]`: upload the cache
//! objects and records (action entries and state records) the remote lacks.
//!
//! Rules:
//! - Only records whose every output is either cached (not sensitive) or
//!   sensitive (never cached) are pushed: those can be restored elsewhere.
//!   A state record travels as the action entry of its key (stage names
//!   collide between workspaces, keys do not).
//! - Sensitive outputs are never pushed: their bytes are not in the cache,
//!   and with a PIPELINE a record that calls an output the pipeline declares
//!   `sensitive` anything else is refused. Only the record (hashes, facts)
//!   travels, so the other side knows the producer is up to date.
//! - Local records and objects are validated before they leave (the same
//!   checks `pull` applies); an object whose bytes no longer match its name is
//!   not uploaded, and neither is any record that needs it.
//! - Objects first (in parallel), records after: the remote never holds a
//!   record whose objects are missing. Uploading what is there is skipped (a
//!   listing per prefix, compared by name and size), so a push is idempotent
//!   and an interrupted push is completed by the next one.
//! - Nothing of a forgotten tenant (`dagrun keys forget`) leaves: its
//!   features, models and other readable outputs are what shredding leaves
//!   behind in this workspace; a push must not copy them to a shared place
//!   after the erasure (one "skipped" line names the tenant). What earlier
//!   pushes put there is erased, once, and a tombstone left
//!   (`commands::erasure`); a tenant whose tombstone is on the remote is
//!   withheld as if forgotten here, with a line saying to forget it here too.
//! - Only records whose MAC verifies under this workspace's integrity key
//!   leave it (a record modified outside dagrun is reported, not pushed). The
//!   exact bytes are uploaded; a puller checks their shape and key binding and
//!   seals them under its own key (`pull`'s rules).

use super::pull::{validate_record, validate_tree};
use crate::pipeline::Pipeline;
use crate::remote::erasure::Found;
use crate::remote::{Remote, Upload};
use crate::util::human_bytes;
use crate::workspace::cas::Cas;
use crate::workspace::hashing::TreeEntry;
use crate::workspace::state::{Loaded, StateStore};
use crate::workspace::{ContentHash, Workspace};
use anyhow::{Result, bail};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::time::Instant;

/// What a push did.
#[derive(Debug, Default, serde::Serialize)]
pub struct PushReport {
    pub remote: String,
    pub records_sent: usize,
    pub records_present: usize,
    pub objects_sent: usize,
    pub bytes_sent: u64,
    pub objects_present: usize,
    /// Records that were not pushed, with why (not an error).
    pub skipped: Vec<String>,
    /// Uploads and deletions that failed (an error: exit 1).
    pub failed: Vec<String>,
    /// Tenants forgotten here whose data this push erased from the remote.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub erased: Vec<super::erasure::TenantErasure>,
    pub seconds: f64,
}

struct Local {
    tenant: Option<String>,
    key: ContentHash,
    stage: String,
    bytes: Vec<u8>,
    objects: Vec<ContentHash>,
    /// Its inputs and outputs (whether it derives from a forgotten tenant).
    st: crate::workspace::state::StageState,
}

/// Every local record worth pushing, validated, deduplicated by key.
/// `seen` gets the tenant of every record read, before any filter.
fn local_records(
    ws: &Workspace,
    states: &StateStore,
    cas: &Cas,
    pipeline: Option<&Pipeline>,
    tenants: &[String],
    skipped: &mut Vec<String>,
    seen_tenants: &mut BTreeSet<String>,
) -> Vec<Local> {
    let mut files: Vec<(std::path::PathBuf, Option<String>)> = super::pull::local_keys(states).into_iter().map(|(k, p)| (p, Some(k))).collect();
    if let Ok(rd) = std::fs::read_dir(states.state_dir()) {
        let mut v: Vec<_> = rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
        v.sort();
        files.extend(v.into_iter().map(|p| (p, None)));
    }
    let declared: Option<BTreeMap<&str, &crate::pipeline::Stage>> = pipeline.map(|p| p.stages.iter().map(|s| (s.name.as_str(), s)).collect());
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (path, key) in files {
        let shown = ws.rel(&path);
        // Read once: the bytes checked are the bytes pushed.
        let (loaded, bytes) = states.read_record_bytes(&path);
        match loaded {
            Loaded::Valid(_) => {}
            Loaded::Missing => continue,
            Loaded::Invalid(e) => {
                skipped.push(format!("{e}; not pushed (`dagrun verify` checks the workspace)"));
                continue;
            }
        }
        let (st, tenant) = match validate_record(&bytes, key.as_deref()) {
            Ok(v) => v,
            Err(e) => {
                skipped.push(format!("{shown}: {e:#}; not pushed (`dagrun verify` checks the workspace)"));
                continue;
            }
        };
        if let Some(t) = &tenant {
            seen_tenants.insert(t.clone());
        }
        if seen.contains(&st.key) {
            continue;
        }
        if !tenants.is_empty() && !tenant.as_ref().is_some_and(|t| tenants.contains(t)) {
            continue;
        }
        if let Some(d) = &declared {
            let Some(stage) = d.get(st.stage.as_str()) else { continue };
            if let Some(o) = stage.outs.iter().find(|o| o.sensitive && st.outputs.get(&o.path).is_some_and(|r| !r.sensitive || r.cached)) {
                skipped.push(format!("{shown}: output {} is declared sensitive but recorded as not; never pushed", o.path));
                continue;
            }
        }
        if let Some((p, _)) = st.outputs.iter().find(|(_, o)| !o.sensitive && !o.cached) {
            // `cache: false` output: nothing to restore it from elsewhere.
            tracing::debug!("{shown}: output {p} is not cached; record not pushed");
            continue;
        }
        let mut objects = Vec::new();
        let mut bad = None;
        for (p, o) in st.outputs.iter().filter(|(_, o)| o.cached && !o.sensitive) {
            if !cas.has(&o.hash) {
                bad = Some(format!("output {p}: object {} is not in the local cache", o.hash.short()));
                break;
            }
            objects.push(o.hash.clone());
            if o.dir {
                let listing = crate::util::read_capped(&cas.object_path(&o.hash), crate::workspace::hashing::MAX_LISTING_BYTES)
                    .map_err(anyhow::Error::from)
                    .and_then(|b| {
                        if ContentHash::of_bytes(&b) != o.hash {
                            bail!("its directory listing is corrupted");
                        }
                        validate_tree(&b)
                    });
                match listing {
                    Ok(entries) => {
                        for e in entries {
                            if let TreeEntry::File { hash, .. } = e {
                                if !cas.has(&hash) {
                                    bad = Some(format!("output {p}: object {} is not in the local cache", hash.short()));
                                }
                                objects.push(hash);
                            }
                        }
                    }
                    Err(e) => bad = Some(format!("output {p}: {e:#}")),
                }
            }
        }
        if let Some(why) = bad {
            skipped.push(format!("{shown} ({}): {why}; not pushed", st.stage));
            continue;
        }
        seen.insert(st.key.clone());
        out.push(Local { tenant, key: st.key.clone(), stage: st.stage.clone(), bytes, objects, st });
    }
    out
}

/// `dagrun push`.
pub fn push(workspace: &Path, remote: &Remote, pipeline: Option<&Pipeline>, tenants: &[String]) -> Result<PushReport> {
    let t0 = Instant::now();
    for t in tenants {
        crate::pipeline::tenants::validate_tenant_id(t).map_err(|e| crate::error::config(format!("--tenant: {e}")))?;
    }
    let ws = Workspace::at(workspace);
    let ring = crate::crypto::Keyring::open_existing(ws.root())?
        .ok_or_else(|| crate::error::config(format!("{}: no master key, so no record here can be verified: nothing to push", ws.root().display())))?;
    let states = StateStore::new(&ws, Some(ring.integrity_key()));
    let cas = Cas::read_only(&ws);
    let mut report = PushReport { remote: remote.shown().to_string(), ..Default::default() };
    let mut seen_tenants = BTreeSet::new();
    let mut recs = local_records(&ws, &states, &cas, pipeline, tenants, &mut report.skipped, &mut seen_tenants);
    // The remote's tombstones of the tenants this push has records of, or
    // forgot here (`remote::erasure`).
    let integrity = ring.integrity_key();
    let forgotten_here = ring.forgotten_tenants();
    let proven: BTreeSet<String> = ring.erasures().proven.into_iter().filter(|t| tenants.is_empty() || tenants.contains(t)).collect();
    // Every tenant this workspace holds records of, whatever this push is
    // limited to: a record derived from an erased tenant may be any stage's.
    let found = super::erasure::tombstones(remote, &integrity, proven.iter().chain(&seen_tenants).map(String::as_str));
    // What earlier pushes put there of a tenant forgotten here goes, once.
    let limited = !tenants.is_empty();
    let todo: BTreeMap<String, String> = proven
        .iter()
        .filter(|t| !matches!(found.get(*t), Some(Found::Valid(ts)) if ts.elsewhere || limited))
        .map(|t| (t.clone(), forgotten_here.get(t).cloned().unwrap_or_default()))
        .collect();
    if !todo.is_empty() {
        report.erased = super::erasure::erase(remote, &states, &ws, &integrity, &todo, limited, &mut report.failed)?;
    }
    // A tenant another workspace erased from the remote is withheld as if
    // forgotten here; one whose tombstone cannot be read too (unknown).
    let super::erasure::Withheld { tenants: withheld, unreadable, untrusted } = super::erasure::withheld(&forgotten_here, found);
    for (t, why) in untrusted {
        report.skipped.push(format!("{why}: not a tombstone sealed under this workspace's keys; ignored (tenant {t}'s records are pushed)"));
    }
    // Nothing of a forgotten tenant leaves, its own stages' records or what
    // other stages derived from them (`forgotten`).
    let gone = crate::remote::forgotten::Forgotten::of_workspace(withheld, &states, Cas::read_only(&ws));
    if let Some(why) = gone.damaged() {
        return Err(crate::error::Failure::Integrity(format!("{why}; nothing was pushed")).into());
    }
    let mut forgotten: BTreeMap<String, (String, usize)> = BTreeMap::new();
    recs.retain(|r| match gone.claims(&r.st) {
        Some(t) => {
            let at = gone.when(&t).unwrap_or_default().to_string();
            forgotten.entry(t).or_insert((at, 0)).1 += 1;
            false
        }
        None => true,
    });
    for (t, (at, n)) in forgotten {
        let n = crate::util::count(n, "record", "records");
        if forgotten_here.contains_key(&t) {
            report.skipped.push(format!("tenant {t} was forgotten (`dagrun keys forget`, {at}): {n} of it or derived from it not pushed"));
        } else if let Some(why) = unreadable.get(&t) {
            let line = format!(
                "{why}: whether tenant {t} was erased from the remote is unknown, so {n} of it or derived from it not pushed; push again when its tombstone can be read"
            );
            // Asked for by name: a failure (exit 1); otherwise a note.
            if tenants.contains(&t) { report.failed.push(line) } else { report.skipped.push(line) }
        } else {
            report.skipped.push(format!(
                "tenant {t} was erased from the remote ({at}, by a workspace that ran `dagrun keys forget {t}`): {n} of it or derived from it not pushed{}",
                super::erasure::forget_here_too(&ring, &t)
            ));
        }
    }
    let scopes: BTreeSet<Option<String>> = recs.iter().map(|r| r.tenant.clone()).collect();
    // One listing per prefix: what is there already.
    let mut there: BTreeMap<Option<String>, (BTreeMap<String, u64>, BTreeSet<String>)> = BTreeMap::new();
    for s in &scopes {
        there.insert(s.clone(), (remote.list_objects(s.as_deref())?, remote.list_actions(s.as_deref())?));
    }
    let mut uploads: Vec<Upload> = Vec::new();
    let mut planned: HashSet<(Option<String>, String)> = HashSet::new();
    for r in &recs {
        let (objs, _) = &there[&r.tenant];
        for h in &r.objects {
            let local = cas.object_path(h);
            let size = std::fs::metadata(&local).map(|m| m.len()).unwrap_or(0);
            if objs.get(h.as_str()) == Some(&size) {
                if planned.insert((r.tenant.clone(), h.to_string())) {
                    report.objects_present += 1;
                }
                continue;
            }
            if planned.insert((r.tenant.clone(), h.to_string())) {
                uploads.push(Upload { tenant: r.tenant.clone(), hash: h.to_string(), file: local });
            }
        }
    }
    let mut failed_objects: HashSet<(Option<String>, String)> = HashSet::new();
    for (u, res) in uploads.iter().zip(remote.upload(&uploads)) {
        match res {
            Ok(n) => {
                report.objects_sent += 1;
                report.bytes_sent += n;
            }
            Err(e) => {
                report.failed.push(format!("{e:#}"));
                failed_objects.insert((u.tenant.clone(), u.hash.clone()));
            }
        }
    }
    for r in &recs {
        let (_, actions) = &there[&r.tenant];
        if actions.contains(r.key.as_str()) {
            report.records_present += 1;
            continue;
        }
        if r.objects.iter().any(|h| failed_objects.contains(&(r.tenant.clone(), h.to_string()))) {
            report.failed.push(format!("record {} ({}) not pushed: one of its objects failed to upload", r.key.short(), r.stage));
            continue;
        }
        match remote.put_action(r.tenant.as_deref(), r.key.as_str(), &r.bytes) {
            Ok(()) => report.records_sent += 1,
            Err(e) => report.failed.push(format!("{e:#}")),
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Arguments of `dagrun push` and `dagrun pull`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the records of this pipeline's stages (default: every record of the workspace / remote).
    pub pipeline: Option<std::path::PathBuf>,
    /// The remote (default: `remote:` in config/dagrun.yaml): s3://BUCKET/PREFIX, gs://, az://, file:///PATH.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Only this tenant's prefix (repeatable), e.g. with a tenant-scoped credential.
    #[arg(long = "tenant", value_name = "TENANT")]
    pub tenants: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `dagrun pull`: those of push, and `--wait` (pull writes
/// under the workspace lock; push only reads).
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub common: Args,
    /// Wait up to SECONDS for a run holding the workspace (default: exit 75 at once).
    #[arg(long, value_name = "SECONDS", value_parser = crate::commands::parse_seconds)]
    pub wait: Option<f64>,
}

/// What `command` does: a push, or a pull waiting up to `wait` for the lock.
pub enum Transfer {
    Push,
    Pull { wait: Option<std::time::Duration> },
}

/// Run `dagrun push` or `dagrun pull`; exit 1 when a transfer failed, 4 when
/// `pull` refused data the remote holds (it failed a check).
pub fn command(workspace_flag: Option<&Path>, a: &Args, what: Transfer) -> Result<i32> {
    let pipeline = match &a.pipeline {
        Some(f) => Some(crate::pipeline::load(f, workspace_flag, &[], &crate::stages::kinds())?),
        None => None,
    };
    let ws = match &pipeline {
        Some(p) => p.workspace.clone(),
        None => super::find_workspace(workspace_flag)?,
    };
    let remote = super::pull::open_remote(&ws, a.remote.as_deref())?;
    let mut refused = 0;
    let pull = matches!(what, Transfer::Pull { .. });
    let (failures, json) = if let Transfer::Pull { wait } = what {
        let r = super::pull::pull(&ws, &remote, pipeline.as_ref(), &a.tenants, wait)?;
        if !a.json {
            super::pull::print(&r);
        }
        refused = r.refused;
        (r.problems.len(), serde_json::to_string_pretty(&r)?)
    } else {
        let r = push(&ws, &remote, pipeline.as_ref(), &a.tenants)?;
        if !a.json {
            print(&r);
        }
        (r.failed.len(), serde_json::to_string_pretty(&r)?)
    };
    if a.json {
        // Asked for: printed under `-q` too.
        crate::util::stdout::print_done(format_args!("{json}\n"));
    }
    if refused > 0 {
        // Exit 4: the remote holds data that fails its checks; a retry fetches the same.
        return Err(crate::error::Failure::Integrity(format!(
            "{failures} problem(s) (see above), {refused} of them data the remote holds that failed its checks: a refused record stays refused whatever you retry (it is not to be trusted); a failed transfer may succeed if you run the same command again"
        ))
        .into());
    }
    if failures > 0 && pull {
        bail!("{failures} problem(s) (see above): transfers failed; they may succeed if you run the same command again");
    }
    if failures > 0 {
        bail!("{failures} transfer(s) failed (see above); run the same command again to complete it");
    }
    Ok(crate::error::exit::OK)
}

/// Print a push's report (stderr for what was skipped or failed).
pub fn print(r: &PushReport) {
    crate::doneln!(
        "pushed {} records and {} objects ({}) to {} in {:.2}s; {} records and {} objects were already there",
        r.records_sent,
        r.objects_sent,
        human_bytes(r.bytes_sent),
        r.remote,
        r.seconds,
        r.records_present,
        r.objects_present
    );
    for e in &r.erased {
        let mut line = format!(
            "erased tenant {} (forgotten here) from {}: {} and {} ({}) under tenants/{}/",
            e.tenant,
            r.remote,
            crate::util::count(e.prefix.records, "record", "records"),
            crate::util::count(e.prefix.objects, "object", "objects"),
            human_bytes(e.prefix.bytes),
            e.tenant
        );
        if e.prefix.other_files > 0 {
            line += &format!(" and {} other", crate::util::count(e.prefix.other_files, "file", "files"));
        }
        if e.elsewhere {
            line += &format!(
                "; {} and {} ({}) derived from it elsewhere",
                crate::util::count(e.derived_records, "record", "records"),
                crate::util::count(e.derived_objects, "object", "objects"),
                human_bytes(e.derived_bytes)
            );
            if e.uncertain_records > 0 {
                line += &format!(
                    "; {} that may derive from it left (a folder input whose listing is unknown here, and this workspace does not hold {})",
                    crate::util::count(e.uncertain_records, "record", "records"),
                    if e.uncertain_records == 1 { "it" } else { "them" }
                );
            }
        } else {
            line += "; records derived from it outside its prefix were not looked for (this push is limited by --tenant): push without --tenant to erase them";
        }
        if e.done {
            line += &format!(
                "; its tombstone tenants/{}/{} keeps every workspace sharing the remote from pushing or pulling it",
                e.tenant,
                crate::remote::erasure::TOMBSTONE
            );
            crate::doneln!("{line}");
        } else {
            line += "; NOT complete (see the failures): the next push erases again";
            crate::util::stdout::warn(format_args!("{line}"));
        }
    }
    for s in &r.skipped {
        crate::util::stdout::warn(format_args!("skipped: {s}"));
    }
    for f in &r.failed {
        crate::util::stdout::warn(format_args!("failed: {f}"));
    }
}
