//! One file per command. `main.rs` parses arguments and calls these; they
//! print, and return the exit code or an error (see `crate::error`).
pub mod dag;
pub mod exec_stage;
pub mod features;
pub mod gc;
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

/// The existing workspace for commands that take no pipeline (see
/// [`crate::workspace::Workspace::existing`]: exit 2 when there is none,
/// nothing created).
pub fn find_workspace(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(crate::workspace::Workspace::existing_from_cwd(given)?.root().to_path_buf())
}

pub use crate::pipeline::MAX_SECONDS;
/// Most parallel stages (`-j`).
pub const MAX_JOBS: usize = 1024;

/// clap parser for a number of seconds: finite, ≥ 0, at most [`MAX_SECONDS`]
/// (a negative, NaN or huge value would otherwise abort the process).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=MAX_SECONDS).contains(&v) {
        return Err(format!("{s:?}: give a number of seconds from 0 to {MAX_SECONDS:.0}"));
    }
    Ok(v)
}

/// clap parser for `-j`: 1 to [`MAX_JOBS`].
pub fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_JOBS).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: give a number of parallel stages from 1 to {MAX_JOBS}")),
    }
}
