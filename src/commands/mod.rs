//! One file per command. `main.rs` parses arguments and calls these; they
//! print, and return the exit code or an error (see `crate::error`).
pub mod dag;
pub mod features;
pub mod keys;
pub mod lineage;
pub mod predict;
pub mod run;
pub mod runs;
pub mod sample;
pub mod status;
pub mod verify;

use std::path::{Path, PathBuf};

/// The existing workspace for commands that take no pipeline (see
/// [`crate::workspace::Workspace::existing`]: exit 2 when there is none,
/// nothing created).
pub fn find_workspace(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(crate::workspace::Workspace::existing_from_cwd(given)?.root().to_path_buf())
}
