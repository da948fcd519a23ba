//! One file per command. `main.rs` parses arguments and calls these; they
//! print, and return the exit code or an error (see `crate::error`).
pub mod dag;
pub mod exec_stage;
pub mod features;
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

/// The workspace for commands that take no pipeline: the given one, else the
/// nearest ancestor of the current folder holding `.dagrun/`, else the
/// current folder.
pub fn find_workspace(given: Option<&Path>) -> std::io::Result<PathBuf> {
    if let Some(w) = given {
        return std::path::absolute(w);
    }
    let cwd = std::env::current_dir()?;
    Ok(dagrun_ancestor(&cwd).unwrap_or(cwd))
}

/// The nearest of `start` and its ancestors that holds `.dagrun/`.
pub fn dagrun_ancestor(start: &Path) -> Option<PathBuf> {
    start.ancestors().find(|d| d.join(crate::engine::DAGRUN_DIR).is_dir()).map(Path::to_path_buf)
}
