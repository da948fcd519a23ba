//! dagrun's own folders in a workspace are real folders, never links.
//!
//! # Rules
//! - The folders dagrun keeps its files in ([`OWN_DIRS`]: `.dagrun/` and its
//!   state, cache, key, log, registry, lineage, Slurm, audit and metrics
//!   folders, and `runs/`), plus the per-tenant registry folders (and their
//!   `versions/`) and the cache's two-hex object folders, must each be a
//!   directory reached without
//!   a symlink. A folder that is a link (or not a folder) is refused with an
//!   error naming it, before anything is written: a link planted there (by a
//!   checkout, an unpacked archive, a group member of a shared folder) would
//!   send run records, lineage events, cache objects or keys wherever it
//!   points, and the files there would be read back as dagrun's own.
//! - A folder that does not exist yet is fine: dagrun creates it as a folder.
//! - The check runs whenever a command takes the workspace lock (every command
//!   that writes workspace state), and before `verify`, `serve`, `report` and
//!   `status` (`run --dry-run`: it saves the hash memo) write or read there.
//!   It costs one `lstat` per folder and one listing each of the object and
//!   registry folders (the file types come with the listing). After each
//!   stage runs, before anything of it is stored or recorded, the fixed
//!   folders are checked again ([`check_fixed`]): a
//!   command that swapped one for a link fails its stage. What this does not
//!   stop: a process outside the run that swaps a folder between that check
//!   and a write (only writes relative to open folder handles would).
//! - The workspace root itself may be reached through links: the user chose it.

use anyhow::Result;
use std::path::Path;

/// dagrun's own folders, relative to the workspace root, parents first.
pub const OWN_DIRS: &[&str] = &[
    ".dagrun",
    ".dagrun/cache",
    ".dagrun/cache/objects",
    ".dagrun/cache/actions",
    ".dagrun/state",
    ".dagrun/keys",
    ".dagrun/logs",
    ".dagrun/registry",
    ".dagrun/openlineage",
    ".dagrun/openlineage/open",
    ".dagrun/slurm",
    // Job registrations: every run reads it and removes what is not one
    // (review 13: a link here made a local run delete files it led to).
    ".dagrun/slurm/active",
    ".dagrun/audit",
    ".dagrun/metrics",
    "runs",
];

/// Folders whose every sub-folder is dagrun's too (object fan-out, registry
/// tenants), with the folders each sub-folder holds in turn.
const OWN_PARENTS: &[(&str, &[&str])] = &[(".dagrun/cache/objects", &[]), (".dagrun/registry", &["versions"])];

/// Refuse (exit 2) when one of dagrun's own folders under `root` is a
/// symlink or not a folder (see the module's rules).
pub fn check(root: &Path) -> Result<()> {
    check_fixed(root)?;
    check_nested(root)
}

/// The [`OWN_DIRS`] part of [`check`] only (one `lstat` each, no listing):
/// what the engine checks again after each stage ran, since a command may
/// have swapped a folder for a link while it ran.
pub fn check_fixed(root: &Path) -> Result<()> {
    for rel in OWN_DIRS {
        let p = root.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => return Err(refuse(&p, "a symlink")),
            Ok(m) if !m.is_dir() => return Err(refuse(&p, "not a folder")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::error::config(format!("cannot look at {}: {e}", p.display()))),
        }
    }
    Ok(())
}

fn check_nested(root: &Path) -> Result<()> {
    for (rel, inner) in OWN_PARENTS {
        let Ok(rd) = std::fs::read_dir(root.join(rel)) else { continue };
        for entry in rd.flatten() {
            let Ok(t) = entry.file_type() else { continue };
            if t.is_symlink() {
                return Err(refuse(&entry.path(), "a symlink"));
            }
            for sub in inner.iter().filter(|_| t.is_dir()) {
                let p = entry.path().join(sub);
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(refuse(&p, "a symlink"));
                }
            }
        }
    }
    Ok(())
}

fn refuse(p: &Path, what: &str) -> anyhow::Error {
    crate::error::config(format!(
        "{} is {what}; dagrun keeps its own files there and never follows a link for them (it could send run records, keys or cache objects elsewhere): replace it with a real folder, e.g. `rm {0} && mkdir {0}`, and check who put it there",
        p.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn own_folders_that_are_links_or_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let outside = tempfile::tempdir().unwrap();
        check(root).unwrap(); // nothing there yet
        for rel in OWN_DIRS {
            std::fs::create_dir_all(root.join(rel)).unwrap();
        }
        std::fs::create_dir_all(root.join(".dagrun/cache/objects/ab")).unwrap();
        std::fs::create_dir_all(root.join(".dagrun/registry/Tenant_A")).unwrap();
        check(root).unwrap();
        let refused = |rel: &str| {
            let e = check(root).expect_err(rel);
            assert_eq!(crate::error::exit_code_of(&e), crate::error::exit::CONFIG, "{e}");
            assert!(e.to_string().contains(&root.join(rel).display().to_string()), "{e}");
            e.to_string()
        };
        std::fs::create_dir_all(root.join(".dagrun/registry/Tenant_A/versions")).unwrap();
        for rel in OWN_DIRS.iter().copied().chain([".dagrun/cache/objects/ab", ".dagrun/registry/Tenant_A", ".dagrun/registry/Tenant_A/versions"]) {
            let p = root.join(rel);
            std::fs::rename(&p, outside.path().join("moved")).unwrap();
            symlink(outside.path().join("moved"), &p).unwrap();
            assert!(refused(rel).contains("is a symlink"));
            std::fs::remove_file(&p).unwrap();
            std::fs::rename(outside.path().join("moved"), &p).unwrap();
            check(root).unwrap();
        }
        std::fs::remove_dir_all(root.join("runs")).unwrap();
        std::fs::write(root.join("runs"), b"").unwrap();
        assert!(refused("runs").contains("is not a folder"));
        std::fs::remove_file(root.join("runs")).unwrap();
        // A new tenant's folder that is a link, and a file among the object folders, which dagrun ignores.
        symlink(outside.path(), root.join(".dagrun/registry/Tenant_B")).unwrap();
        refused(".dagrun/registry/Tenant_B");
        std::fs::remove_file(root.join(".dagrun/registry/Tenant_B")).unwrap();
        std::fs::write(root.join(".dagrun/cache/objects/.clean"), b"").unwrap();
        check(root).unwrap();
        // The root itself may be a link.
        let link = outside.path().join("ws");
        symlink(root, &link).unwrap();
        check(&link).unwrap();
    }
}
