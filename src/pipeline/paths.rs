//! Paths of inputs and outputs.
//!
//! Rules:
//! - Outputs are workspace-relative, normalised, never absolute, never `..`,
//!   never inside a protected folder ([`PROTECTED_DIRS`]), and no symlink on
//!   their way may lead outside the workspace or into a protected folder.
//! - That is checked when the pipeline loads and again when each output is
//!   written ([`check_output_at_write`]), so a link planted since is caught.
//! - Inputs may be outside the workspace (absolute paths), and are kept as
//!   given there; inside, they are workspace-relative.

use super::*;

pub use crate::workspace::PROTECTED_DIRS;

/// The write-time check of an output (run before a stage runs, before its
/// outputs are recorded, before a restore): no symlink on the way may lead
/// outside the workspace or into [`PROTECTED_DIRS`]. `final_link_ok` when the
/// writer replaces or removes the last component instead of following it.
pub fn check_output_at_write(workspace: &Path, out: &str, final_link_ok: bool) -> Result<()> {
    crate::util::nofollow::check_write_path(workspace, out, PROTECTED_DIRS, final_link_ok).map_err(anyhow::Error::msg)
}

/// Normalise a workspace-relative output path; reject escapes.
pub fn normalize_out(path: &str) -> std::result::Result<String, String> {
    if path.trim().is_empty() {
        return Err("an output path is empty".into());
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Err(format!("output {path:?} is an absolute path; outputs must be relative paths inside the workspace"));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("output {path:?} contains `..`; outputs must stay inside the workspace"));
            }
            _ => return Err(format!("output {path:?} is not a plain relative path")),
        }
    }
    if parts.is_empty() {
        return Err(format!("output {path:?} names the workspace itself"));
    }
    if PROTECTED_DIRS.contains(&parts[0].as_str()) {
        return Err(format!("output {path:?} is inside {}/, which dagrun, git or the workspace configuration owns", parts[0]));
    }
    Ok(parts.join("/"))
}

/// Normalise an input path (relative paths are workspace-relative; absolute
/// paths outside the workspace are allowed for inputs).
pub fn normalize_dep(path: &str, workspace: &Path) -> std::result::Result<String, String> {
    if path.trim().is_empty() {
        return Err("an input path is empty".into());
    }
    let p = Path::new(path);
    if p.is_absolute() {
        if let Ok(rel) = p.strip_prefix(workspace) {
            return normalize_dep(&rel.to_string_lossy(), workspace);
        }
        return Ok(path.to_string());
    }
    let parts: Vec<String> = p.components().filter(|c| !matches!(c, Component::CurDir)).map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if parts.is_empty() {
        return Err(format!("input {path:?} names the whole workspace; name the files or folders the stage reads"));
    }
    Ok(parts.join("/"))
}

/// Reject an output that reaches outside the workspace (or into a protected
/// folder) through a symlink, or is itself a symlink. `seen`: the folders
/// already checked while loading this pipeline (each is looked at once).
pub(super) fn check_symlinks(workspace: &Path, out: &str, seen: &mut crate::util::nofollow::CheckedDirs) -> std::result::Result<(), String> {
    crate::util::nofollow::check_write_paths(workspace, out, PROTECTED_DIRS, false, seen)
}
