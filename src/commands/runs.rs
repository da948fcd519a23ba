//! `dagrun runs`, `dagrun runs show ID|last` and `dagrun runs prune`: the
//! run history from `runs/`.
//!
//! Pruning rules (`runs prune --keep N` and/or `--older-than AGE`): run
//! records are history, kept until the owner says otherwise (`gc` never
//! removes one). Under the workspace lock, a run's files (`ID.json`, its
//! `ID.openlineage.jsonl` events and `ID.html` report) go when the run is
//! beyond the newest N **and** (with both given) started more than AGE ago.
//! A killed run has events and no record: it counts as a run, started when
//! its id says.
//! Never removed, whatever the flags: a run that made an output of the
//! current state (`dagrun lineage` and `status` name it: the history of
//! what is on disk stays whole), a run whose OpenLineage events are not
//! closed yet (`.dagrun/openlineage/open/ID`: the next run appends its
//! `ABORT`s to that file), and a file under `runs/` that does not read as a
//! record (named, never guessed at). Without the master key the state
//! records cannot be verified, and when `.dagrun/openlineage/open/` cannot
//! be listed the open runs are unknown: then nothing is pruned (exit 2).
//! Files are removed through a handle of `runs/` opened without following
//! links, the record last: a prune stopped half-way is finished by the next,
//! and a file that cannot be removed keeps the rest of its run (exit 1).

use crate::engine::runs;
use crate::util::escape_controls;
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// Widest pipeline path `runs` shows in full.
const MAX_PIPELINE_SHOWN: usize = 48;

/// `s` in at most `max` characters: its end, after `…`, when longer.
fn shorten_front(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max { s.to_string() } else { format!("…{}", s.chars().skip(n + 1 - max).collect::<String>()) }
}

/// One line per recorded run, newest last (or JSON).
pub fn list(workspace: &Path, json: bool) -> Result<()> {
    let dir = runs::runs_dir(workspace);
    if dir.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
        return Err(crate::error::config(format!(
            "{} is not a folder, so it holds no run records; move it aside (dagrun writes its run records there)",
            dir.display()
        )));
    }
    let listing = runs::list(workspace);
    // A file that does not read as a record is named, not silently dropped.
    for (_, e) in &listing.unreadable {
        crate::util::stdout::warn(format_args!("warning: {e:#}; not listed"));
    }
    let all = listing.records;
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|r| serde_json::json!({"run_id": r.run_id, "pipeline": r.pipeline, "started_at": r.started_at, "seconds": r.seconds, "status": r.status, "exit_code": r.exit_code}))
            .collect();
        crate::outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "runs": v }))?);
    } else if all.is_empty() {
        crate::outln!("no runs recorded in {}", runs::runs_dir(workspace).display());
    } else {
        // The PIPELINE column as wide as the longest path shown, at most
        // MAX_PIPELINE_SHOWN characters: a longer path keeps its end (the file name).
        let pipelines: Vec<String> = all.iter().map(|r| shorten_front(&escape_controls(&r.pipeline), MAX_PIPELINE_SHOWN)).collect();
        let w = pipelines.iter().map(|p| p.chars().count()).max().unwrap_or(0).max("PIPELINE".len());
        crate::outln!("{:<26} {:<11} {:>8}  {:<w$} STAGES", "RUN", "STATUS", "SECONDS", "PIPELINE");
        for (r, pipeline) in all.iter().zip(&pipelines) {
            crate::outln!("{:<26} {:<11} {:>8.2}  {:<w$} {}", r.run_id, r.status, r.seconds, pipeline, r.counts());
        }
    }
    Ok(())
}

/// One run's record: stages with status, seconds, Slurm job, reasons and
/// errors (or JSON).
pub fn show(workspace: &Path, id: &str, json: bool) -> Result<()> {
    let r = runs::find(workspace, id)?;
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    crate::outln!("run {}  {}  exit {}  {:.2}s  {}", r.run_id, r.status, r.exit_code, r.seconds, escape_controls(&r.pipeline));
    crate::outln!("started {}  finished {}", escape_controls(&r.started_at), escape_controls(&r.finished_at));
    for s in &r.stages {
        let job = s.slurm_job.as_deref().map(|j| format!("  {}", escape_controls(j))).unwrap_or_default();
        let unrecorded = if s.recorded == Some(false) { "  not recorded" } else { "" };
        crate::outln!("  {:<9} {:<28} {:>7.2}s{job}{unrecorded}", s.status.as_str(), s.stage, s.seconds);
        // A command's stderr (colours, cursor moves) is shown, never obeyed.
        for l in s.reasons.iter().flat_map(|r| r.lines()).chain(s.error.iter().flat_map(|e| e.lines())) {
            crate::outln!("            {}", escape_controls(l));
        }
    }
    Ok(())
}

/// `dagrun runs prune`'s flags.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["keep", "older_than"])))]
pub struct PruneArgs {
    /// Keep the newest N run records.
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Remove only records of runs that started more than AGE ago (`90d`, `12h`, `30m`, `2w`).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<Duration>,
    #[command(flatten)]
    pub delete: crate::commands::DeleteFlags,
}

/// clap parser for `--older-than`: a whole number and a unit, s m h d or w.
pub fn parse_age(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?}: give an age as a whole number and a unit: 90d, 12h, 30m, 45s or 2w");
    let unit = t.chars().last().ok_or_else(bad)?;
    let secs: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 604_800,
        _ => return Err(bad()),
    };
    let n: u64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(secs).filter(|&v| v <= 100 * 365 * 86_400).map(Duration::from_secs).ok_or_else(|| format!("{s:?}: more than 100 years"))
}

/// The runs to remove: oldest first, beyond the newest `keep` (all when
/// None), started before `cutoff` (any time when None), none of `pinned`.
/// `runs` is oldest first, each (run id, start time).
fn to_prune<'a>(
    runs: &'a [(String, Option<chrono::DateTime<chrono::Utc>>)],
    keep: Option<usize>,
    cutoff: Option<chrono::DateTime<chrono::Utc>>,
    pinned: &BTreeSet<String>,
) -> Vec<&'a str> {
    let beyond = runs.len().saturating_sub(keep.unwrap_or(0));
    runs[..beyond]
        .iter()
        // A start time that does not read is never old enough.
        .filter(|(_, started)| cutoff.is_none_or(|c| started.is_some_and(|t| t < c)))
        .filter(|(id, _)| !pinned.contains(id))
        .map(|(id, _)| id.as_str())
        .collect()
}

/// `dagrun runs prune` (rules: the module's).
pub fn prune(workspace: &Path, a: &PruneArgs, json: bool) -> Result<()> {
    let ws = crate::workspace::Workspace::at(workspace);
    let _lock = ws.lock(a.delete.wait.map(Duration::from_secs_f64), "dagrun runs prune")?;
    let listing = runs::list(ws.root());
    for (_, e) in &listing.unreadable {
        crate::util::stdout::warn(format_args!("warning: {e:#}; left alone"));
    }
    // Runs that made what is on disk now (only records this workspace sealed).
    let Some(keyring) = crate::crypto::Keyring::open_existing(ws.root())? else {
        return Err(crate::error::config(format!(
            "no master key for {}: the state records that name the runs which made the current outputs cannot be verified, so nothing was pruned (set the master key dagrun runs with)",
            ws.root().display()
        )));
    };
    let made_current: BTreeSet<String> =
        crate::workspace::state::StateStore::new(&ws, Some(keyring.integrity_key())).all().into_iter().map(|st| st.run_id).collect();
    // Runs whose lineage is still open (marked, sealed or not: kept either way).
    let open_dir = ws.dagrun_dir().join("openlineage").join("open");
    let open: BTreeSet<String> = match std::fs::read_dir(&open_dir) {
        Ok(rd) => rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => {
            return Err(crate::error::config(format!(
                "cannot list {} ({e}): the runs whose OpenLineage events are not closed yet are unknown, so nothing was pruned",
                ws.rel(&open_dir)
            )));
        }
    };
    let pinned: BTreeSet<String> = made_current.union(&open).cloned().collect();
    let mut all: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> = listing
        .records
        .iter()
        .map(|r| (r.run_id.clone(), chrono::DateTime::parse_from_rfc3339(&r.started_at).ok().map(|t| t.with_timezone(&chrono::Utc))))
        .collect();
    // A killed run's events (and a report) with no record: timed by the run id.
    let recorded: BTreeSet<String> = all.iter().map(|(id, _)| id.clone()).collect();
    let mut orphans: BTreeSet<String> = BTreeSet::new();
    for e in std::fs::read_dir(ws.runs_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(".openlineage.jsonl").or_else(|| name.strip_suffix(".html"))
            && runs::is_run_id(id)
            && !recorded.contains(id)
            && ws.runs_dir().join(format!("{id}.json")).symlink_metadata().is_err()
        {
            orphans.insert(id.to_string());
        }
    }
    all.extend(orphans.into_iter().map(|id| {
        let t = chrono::NaiveDateTime::parse_from_str(&id[..15], "%Y%m%d-%H%M%S").ok().map(|t| t.and_utc());
        (id, t)
    }));
    all.sort();
    let cutoff = a.older_than.map(|d| chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX));
    let gone = to_prune(&all, a.keep, cutoff, &pinned);
    let kept_for_outputs = all.iter().filter(|(id, _)| made_current.contains(id)).count();
    let kept_open = all.iter().filter(|(id, _)| open.contains(id) && !made_current.contains(id)).count();
    // Each run's files, the record last.
    let dir = if gone.is_empty() || a.delete.dry_run { None } else { Some(crate::util::nofollow::Dir::open(ws.root(), Path::new("runs"))?) };
    let (mut files, mut bytes, mut failed, mut removed) = (0usize, 0u64, Vec::new(), Vec::new());
    'runs: for id in gone {
        for ext in ["html", "openlineage.jsonl", "json"] {
            let name = format!("{id}.{ext}");
            let Ok(meta) = ws.runs_dir().join(&name).symlink_metadata() else { continue };
            if let Some(d) = &dir
                && let Err(e) = d.unlink(std::ffi::OsStr::new(&name))
            {
                // The rest of this run stays, its record with it (listed again next time).
                failed.push(format!("runs/{name}: {e:#}"));
                continue 'runs;
            }
            files += 1;
            bytes += meta.len();
        }
        removed.push(id);
    }
    let gone = removed;
    let kept = all.len() - gone.len();
    if json {
        let v = serde_json::json!({
            "dry_run": a.delete.dry_run,
            "removed": gone,
            "files_removed": files,
            "bytes_removed": bytes,
            "kept": kept,
            "kept_for_current_outputs": kept_for_outputs,
            "kept_open_lineage": kept_open,
            "failed": failed,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if a.delete.dry_run {
            for id in &gone {
                crate::outln!("would remove {id}");
            }
        }
        let what = if a.delete.dry_run { "would remove" } else { "removed" };
        let mut why = Vec::new();
        if kept_for_outputs > 0 {
            why.push(format!("{kept_for_outputs} made current outputs"));
        }
        if kept_open > 0 {
            why.push(format!("{kept_open} with OpenLineage events not closed yet"));
        }
        let why = if why.is_empty() { String::new() } else { format!(" (always kept: {})", why.join(", ")) };
        crate::outln!(
            "{what} {} ({}, {}); kept {kept}{why}",
            crate::util::count(gone.len(), "run", "runs"),
            crate::util::count(files, "file", "files"),
            crate::util::human_bytes(bytes)
        );
    }
    if let Some(first) = failed.first() {
        return Err(anyhow::anyhow!("{} file(s) could not be removed, first: {first}", failed.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: u32) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::NaiveDate::from_ymd_opt(2026, 12, day).map(|d| d.and_hms_opt(0, 0, 0).unwrap().and_utc())
    }

    #[test]
    fn prune_removes_only_runs_beyond_the_newest_n_and_older_than_the_cutoff_and_never_a_pinned_one() {
        let runs: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> =
            vec![("r1".into(), at(1)), ("r2".into(), None), ("r3".into(), at(3)), ("r4".into(), at(4)), ("r5".into(), at(5))];
        let none = BTreeSet::new();
        assert_eq!(to_prune(&runs, Some(2), None, &none), ["r1", "r2", "r3"]);
        assert_eq!(to_prune(&runs, Some(9), None, &none), Vec::<&str>::new());
        assert_eq!(to_prune(&runs, Some(0), None, &none).len(), 5);
        // Both: beyond the newest 1 and started before the 4th; a time that does not read is never old.
        assert_eq!(to_prune(&runs, Some(1), at(4), &none), ["r1", "r3"]);
        assert_eq!(to_prune(&runs, None, at(5), &none), ["r1", "r3", "r4"]);
        let pinned: BTreeSet<String> = ["r1".to_string()].into();
        assert_eq!(to_prune(&runs, Some(2), None, &pinned), ["r2", "r3"]);
    }

    #[test]
    fn ages_read_as_a_number_and_a_unit() {
        assert_eq!(parse_age("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for bad in ["", "d", "90", "9.5d", "-1d", "5x", "1e3d", "99999999999999999999d", "40000d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn long_pipeline_paths_keep_their_end() {
        assert_eq!(super::shorten_front("p.yaml", 8), "p.yaml");
        assert_eq!(super::shorten_front("/a/very/long/p.yaml", 8), "…/p.yaml");
        assert_eq!(super::shorten_front("/a/very/long/p.yaml", 8).chars().count(), 8);
    }
}
