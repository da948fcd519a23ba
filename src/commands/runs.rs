//! `dagrun runs` and `dagrun runs show ID|last`: the run history from `runs/`.

use crate::engine::runs;
use crate::util::escape_controls;
use anyhow::Result;
use std::path::Path;

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

#[cfg(test)]
mod tests {
    #[test]
    fn long_pipeline_paths_keep_their_end() {
        assert_eq!(super::shorten_front("p.yaml", 8), "p.yaml");
        assert_eq!(super::shorten_front("/a/very/long/p.yaml", 8), "…/p.yaml");
        assert_eq!(super::shorten_front("/a/very/long/p.yaml", 8).chars().count(), 8);
    }
}
