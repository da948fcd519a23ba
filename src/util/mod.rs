//! Small helpers shared by every module.
pub mod alloc;
pub mod atomic;
pub mod capture;
pub mod child_env;
pub mod nofollow;
pub mod par;
pub mod prometheus;
pub mod spawn;

/// Remove a file, symlink (never its target) or directory tree if present.
pub fn fs_remove(p: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).with_context(|| format!("cannot remove {}", p.display())),
        Ok(_) => std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display())),
        Err(_) => Ok(()),
    }
}
