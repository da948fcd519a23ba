//! `dagrun report [RUN_ID|last] [-o FILE.html] [--layout auto|dot|builtin]`:
//! write one run as a self-contained HTML page (see `report`). The page is
//! written atomically; the command prints its path. A run that cannot be
//! found, or a record whose values do not check, is an error (exit 2).
//!
//! The run record is not trusted input: the pipeline file it names is loaded
//! (for the page's graph) only if it is a `.yaml`/`.yml` file outside the
//! workspace's `.dagrun/`, by its name and through any link, and a regular
//! file (a FIFO there is never waited on: `pipeline::load_recorded`); the
//! page says why otherwise. A load error on the page quotes no value of the file
//! (`util::redact::without_values`).

use crate::engine::runs;
use crate::report::{self, Layout, PipelineView};
use anyhow::Result;
use std::path::{Path, PathBuf};

/// Write the report of run `id` (`last` = newest) of `workspace` to `out`
/// (default `runs/RUN_ID.html`); returns the path written.
pub fn report(workspace: &Path, id: &str, out: Option<&Path>, layout: Layout) -> Result<PathBuf> {
    if let Some(o) = out {
        crate::workspace::Workspace::at(workspace).check_user_output(o, "-o")?;
    }
    // Read strictly: timing, run id and names are checked (`runs::read`).
    let rec = runs::find(workspace, id)?;
    let overrides: Vec<(String, String)> = rec
        .params
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            )
        })
        .collect();
    let view = pipeline_file(workspace, &rec.pipeline).and_then(|file| {
        crate::pipeline::load_recorded(&file, workspace, &overrides, &crate::stages::kinds())
            .map(|p| {
                // Graphviz `dot` gets the pipeline's `secrets:` withheld too.
                crate::util::child_env::withhold_from_tools(&p.secrets);
                PipelineView::from_pipeline(&p)
            })
            .map_err(|e| format!("{e:#}"))
    });
    let html = report::render(workspace, &rec, view, layout)?;
    let dest = match out {
        Some(p) => std::path::absolute(p)?,
        None => {
            crate::workspace::own_dirs::check(workspace)?; // runs/ is dagrun's
            runs::runs_dir(workspace).join(format!("{}.html", rec.run_id))
        }
    };
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", d.display()))?;
        // What a report stopped by SIGKILL left (a report takes seconds).
        crate::util::atomic::sweep_stale_temp_files(d, "html", std::time::Duration::from_secs(600));
    }
    // Private, like the run record it shows (a failed command's stderr).
    crate::util::atomic::write_atomic_mode(&dest, html.as_bytes(), 0o600)?;
    Ok(dest)
}

/// The pipeline file a run record names, if the report may read it (see the
/// module's rules); else why not, for the page.
fn pipeline_file(workspace: &Path, named: &str) -> std::result::Result<PathBuf, String> {
    let file = workspace.join(named);
    let is_yaml = |p: &Path| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml"));
    // The name and, through any link, the file itself.
    let real = file.canonicalize().ok();
    let yaml = is_yaml(&file) && real.as_deref().is_none_or(is_yaml);
    let dagrun_dir = workspace.join(crate::workspace::DAGRUN_DIR).canonicalize().ok();
    let inside_dagrun = real.zip(dagrun_dir).is_some_and(|(f, d)| f.starts_with(d))
        || Path::new(named).components().any(|c| c.as_os_str().eq_ignore_ascii_case(crate::workspace::DAGRUN_DIR));
    if !yaml || inside_dagrun {
        return Err(format!(
            "the run record names {} as its pipeline, which is not a pipeline file (.yaml or .yml outside .dagrun/); not read",
            crate::util::escape_controls(named)
        ));
    }
    Ok(file)
}
