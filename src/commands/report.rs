//! `dagrun report [RUN_ID|last] [-o FILE.html] [--layout auto|dot|builtin]`:
//! write one run as a self-contained HTML page (see `report`). The page is
//! written atomically; the command prints its path. A run that cannot be
//! found, or a record whose values do not check, is an error (exit 2).

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
    let view = crate::pipeline::load(&workspace.join(&rec.pipeline), Some(workspace), &overrides, &crate::stages::kinds())
        .map(|p| PipelineView::from_pipeline(&p))
        .map_err(|e| format!("{e:#}"));
    let html = report::render(workspace, &rec, view, layout)?;
    let dest = match out {
        Some(p) => std::path::absolute(p)?,
        None => runs::runs_dir(workspace).join(format!("{}.html", rec.run_id)),
    };
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", d.display()))?;
    }
    crate::util::atomic::write_atomic(&dest, html.as_bytes())?;
    Ok(dest)
}
