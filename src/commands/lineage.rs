//! `dagrun lineage PATH`: the chain of stages, inputs, params and code versions
//! that produced an artifact, back to its source files (from the state files).

use crate::engine::lineage;
use crate::engine::state::StateStore;
use crate::error;
use anyhow::Result;
use std::path::Path;

/// Print the lineage of `path`. The workspace is `workspace`, else the
/// nearest folder above `path` holding `.dagrun/`.
pub fn show(workspace: Option<&Path>, path: &Path, json: bool) -> Result<()> {
    let abs = std::path::absolute(path)?;
    let ws = match workspace {
        Some(w) => std::path::absolute(w)?,
        None => abs
            .parent()
            .and_then(super::dagrun_ancestor)
            .ok_or_else(|| error::config(format!("{}: not inside a dagrun workspace (no .dagrun/ above it)", path.display())))?,
    };
    let rel = abs.strip_prefix(&ws).map(|r| r.to_string_lossy().into_owned()).unwrap_or_else(|_| path.display().to_string());
    let states = StateStore::new(&ws.join(crate::engine::DAGRUN_DIR));
    let tree = lineage::trace(&ws, &states, &rel)
        .ok_or_else(|| error::config(format!("{rel}: no stage in {} has produced this path; is it an output of a pipeline that ran?", ws.display())))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tree)?);
    } else {
        print!("{}", lineage::render(&tree));
    }
    Ok(())
}
