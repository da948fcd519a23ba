//! Commands beyond running pipelines: serving, keys, the feature store,
//! integrity checks and sample data. `main.rs` parses arguments and calls these.
pub mod features;
pub mod keys;
pub mod predict;
pub mod sample;
pub mod verify;

use std::path::{Path, PathBuf};

/// The existing workspace for commands that take no pipeline (see
/// [`crate::workspace::Workspace::existing`]: exit 2 when there is none,
/// nothing created).
pub fn find_workspace(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(crate::workspace::Workspace::existing_from_cwd(given)?.root().to_path_buf())
}
