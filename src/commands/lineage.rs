//! `dagrun lineage PATH`: the chain of stages, inputs, params and code versions
//! that produced an artifact, back to its source files (from the state files).

use crate::engine::lineage;
use crate::error;
use crate::workspace::Workspace;
use crate::workspace::state::StateStore;
use anyhow::Result;
use std::path::Path;

/// Print the lineage of `path`. The workspace is `workspace`, else the
/// existing workspace at or above `path` (exit 2 when none; see `workspace`).
/// Only authenticated state records are followed.
pub fn show(workspace: Option<&Path>, path: &Path, json: bool) -> Result<()> {
    let abs = std::path::absolute(path)?;
    let w = Workspace::existing(workspace, abs.parent().unwrap_or(&abs))?;
    let ws = w.root().to_path_buf();
    let rel = abs.strip_prefix(&ws).map(|r| r.to_string_lossy().into_owned()).unwrap_or_else(|_| path.display().to_string());
    let key = crate::crypto::Keyring::open_existing(&ws)?.map(|k| k.integrity_key());
    let states = StateStore::new(&w, key);
    let Some(tree) = lineage::trace(&ws, &states, &rel) else {
        // A record that fails its check is not followed: say so, naming it.
        let refused: Vec<String> = states
            .scan_states()
            .into_iter()
            .filter_map(|(_, l)| match l {
                crate::workspace::state::Loaded::Invalid(e) => Some(e.to_string()),
                _ => None,
            })
            .collect();
        let why = match refused.first() {
            None => "is it an output of a pipeline that ran?".to_string(),
            Some(first) => format!(
                "{} state record(s) could not be trusted and were not followed ({first}{}); `dagrun verify` lists them, and the next run recomputes those stages",
                refused.len(),
                if refused.len() > 1 { "; …" } else { "" }
            ),
        };
        return Err(error::config(format!("{rel}: no stage in {} has produced this path; {why}", ws.display())));
    };
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&tree)?);
    } else {
        crate::out!("{}", lineage::render(&tree));
    }
    Ok(())
}
