//! Where runs write: `.dagrun/places.json`, so the clean-up after a killed
//! run covers what *that* run wrote, whatever pipeline the next run is.
//!
//! A killed run leaves temporary files beside its outputs and, when it dies
//! before its end, its sensitive (plaintext) outputs. The next run sweeps and
//! shreds; but the next run may be of another pipeline, or of the same one
//! with another tenant list, and its own outputs do not name those places.
//!
//! Rules:
//! - The record holds the output folders and the sensitive outputs
//!   (workspace-relative) of the runs that may have left something: written
//!   before the first stage of a run starts, only when it names something the
//!   record lacks (a no-op run of the same pipeline writes nothing).
//! - `open` says a run is making plaintext: set (durably) before the first
//!   stage that writes a sensitive output runs, cleared when the run has
//!   shredded its plaintext, whatever its end. A run that writes no plaintext
//!   (a no-op run) never writes it.
//! - A run that finds the workspace lock clean (the last run ended and swept)
//!   replaces the record with its own places; one that finds it unclean first
//!   adds its own to it (a death during the sweep loses nothing), sweeps the
//!   temporary files of every folder in it, deletes its sensitive outputs only
//!   if it is `open` (a run making plaintext was killed: not after a mere
//!   restart, or a killed `gc`, when the last run had shredded its own), then
//!   narrows it to its own places.
//! - A sealed record (MAC under the workspace integrity key, domain
//!   [`record::PLACES`]): it names files dagrun deletes, so one not written by
//!   dagrun — shipped in a repository, edited, sealed under another master
//!   key — is never obeyed: kept (with a warning) after an unclean end, when
//!   it may be a killed run's under the key this shell lacks; replaced (with a
//!   warning, once) after a clean one. Entries must be plain relative paths outside `.dagrun/`;
//!   any other entry voids the record.
//! - A sensitive output of the record is deleted only if the current pipeline
//!   does not declare it as a plain output or read it as an input (then it is
//!   the user's file now), and only where every folder on its way is a real
//!   folder or a link inside the workspace (`util::nofollow`).

use super::{Workspace, record};
use crate::crypto::IntegrityKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// Most entries a record may hold (a bound on what a run reads back).
const MAX_ENTRIES: usize = 100_000;
/// Largest record read.
const MAX_BYTES: u64 = 16 << 20;

/// The places of one run, or of the runs that may have left something.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Places {
    /// Folders outputs are written in (temporary files appear there).
    pub dirs: BTreeSet<String>,
    /// Sensitive outputs (deleted at the end of every run that ends).
    pub sensitive: BTreeSet<String>,
    /// A run making plaintext is (or was, when it was killed) under way.
    #[serde(default)]
    pub open: bool,
    /// The workspace root it was written for (set by [`save`]).
    #[serde(default)]
    pub workspace: String,
    /// That folder's identity, `DEVICE:INODE` (set by [`save`]): a workspace
    /// moved with `mv` keeps it, so its record stays its own (absent in
    /// records of dagrun before 2026-12-07).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
}

impl Places {
    /// Does `self` name everything `other` names?
    pub fn covers(&self, other: &Places) -> bool {
        other.dirs.is_subset(&self.dirs) && other.sensitive.is_subset(&self.sensitive)
    }

    /// Both records' places; open if `self` is.
    pub fn union(&self, other: &Places) -> Places {
        Places {
            dirs: self.dirs.union(&other.dirs).cloned().collect(),
            sensitive: self.sensitive.union(&other.sensitive).cloned().collect(),
            open: self.open,
            workspace: self.workspace.clone(),
            folder: self.folder.clone(),
        }
    }

    fn valid(&self) -> Result<(), String> {
        if self.dirs.len() + self.sensitive.len() > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        for p in self.dirs.iter().filter(|p| !p.is_empty()).chain(&self.sensitive) {
            if !plain_rel(p) {
                return Err(format!("entry {:?} is not a plain relative path outside .dagrun/", crate::util::escape_controls(p)));
            }
        }
        Ok(())
    }
}

/// A plain relative path ([`super::is_safe_rel`]) not inside `.dagrun/`.
fn plain_rel(p: &str) -> bool {
    super::is_safe_rel(p) && std::path::Path::new(p).components().next().is_some_and(|c| c.as_os_str() != super::DAGRUN_DIR)
}

/// The record as read back.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No record (a new workspace, or one of an older dagrun).
    Missing,
    Valid(Places),
    /// There, but not to be trusted or not readable (why). Never obeyed. A
    /// run that finds the lock clean replaces it with its own places (the
    /// runs before it ended, so nothing of theirs is left to clean up; kept,
    /// a run under another key would warn on every run and record nothing
    /// of its own); one that finds it unclean keeps it and leaves the
    /// workspace marked unclean, so the run with the right key still cleans
    /// up after the killed one.
    Untrusted(String),
    /// Sealed under this workspace's key for another workspace folder (this
    /// one is a copy of it, or shares its keys): never obeyed. A run that
    /// finds the lock clean replaces it with its own places (a copy of an
    /// idle workspace would warn on every run otherwise); one that finds it
    /// unclean treats it as [`Loaded::Untrusted`] (kept).
    Elsewhere(String),
}

/// The workspace folder's identity as the record holds it.
fn folder_of(ws: &Workspace) -> Option<String> {
    super::folder_id(ws.root()).map(|(dev, ino)| format!("{dev}:{ino}"))
}

/// Read the record back (see [`Loaded`]).
pub fn load(ws: &Workspace, key: &IntegrityKey) -> Loaded {
    let file = ws.places_file();
    let bytes = match crate::util::read_capped(&file, MAX_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Untrusted(format!("cannot read {}: {e}", ws.rel(&file))),
    };
    let root = ws.root().to_string_lossy();
    let places = record::open::<Places>(Some(key), record::PLACES, &bytes, &ws.rel(&file))
        .map_err(|e| e.to_string())
        .and_then(|p| p.valid().map(|()| p).map_err(|why| format!("{}: {why}", ws.rel(&file))));
    match places {
        // Sealed for this workspace (at this path, or moved here: the same
        // folder), not copied from another sharing its keys.
        Ok(p)
            if p.workspace == root
                || super::same_folder(std::path::Path::new(&p.workspace), ws.root())
                || (p.folder.is_some() && p.folder == folder_of(ws)) =>
        {
            Loaded::Valid(p)
        }
        Ok(p) => Loaded::Elsewhere(p.workspace),
        Err(why) => Loaded::Untrusted(why),
    }
}

/// Write the record (sealed, atomically; written only when it changes). An
/// open record is made durable (file and folder fsynced) before it returns:
/// it must be on disk before the plaintext it announces, and it names every
/// place of the run. A closed one is not (a power cut may bring back the open
/// one, whose paths the run had shredded: at worst a second delete).
pub fn save(ws: &Workspace, key: &IntegrityKey, places: &Places) -> anyhow::Result<()> {
    let mut p = places.clone();
    p.workspace = ws.root().to_string_lossy().into_owned();
    p.folder = folder_of(ws);
    let v = record::seal_value(key, record::PLACES, &p)?;
    let durability = if p.open { crate::util::atomic::Durability::Full } else { crate::util::atomic::Durability::Verified };
    crate::util::atomic::write_atomic_with(&ws.places_file(), &serde_json::to_vec(&v)?, durability)
}

/// Where `rel`, a sensitive output a killed run may have left, is: its
/// folder, opened without following a link, and its name there; `Ok(None)`
/// when nothing is there. Links on the way are allowed where the run allows
/// them (inside the workspace, outside its protected folders: `util::nofollow`
/// rules); the folder is resolved once and then opened component by
/// component with `O_NOFOLLOW`, so a link swapped in meanwhile makes the
/// open fail instead of leading elsewhere (helper-75: a check-then-delete by
/// path was raced into deleting outside the workspace).
pub fn find_left_plaintext(root: &Path, rel: &str) -> anyhow::Result<Option<(crate::util::nofollow::Dir, std::ffi::OsString)>> {
    use crate::util::nofollow::{Resolved, open_resolved};
    use anyhow::Context;
    let r = Path::new(rel);
    let (Some(parent), Some(name)) = (r.parent(), r.file_name()) else { anyhow::bail!("{rel}: not a plain relative path") };
    crate::util::nofollow::check_write_path(root, rel, super::PROTECTED_DIRS, false).map_err(|why| anyhow::anyhow!("{rel}: {why}"))?;
    let (dir, inside) = match open_resolved(root, parent).with_context(|| format!("cannot resolve the folder of {rel}"))? {
        Resolved::Missing => return Ok(None),
        Resolved::Outside(target) => anyhow::bail!("{rel}: its folder leads outside the workspace (to {})", target.display()),
        Resolved::Inside(dir, inside) => (dir, inside),
    };
    let top = |p: &Path| p.components().next().and_then(|c| c.as_os_str().to_str()).is_some_and(|t| super::PROTECTED_DIRS.contains(&t));
    if top(r) || top(&inside.join(name)) {
        anyhow::bail!("{rel}: in a folder dagrun keeps its own files in (.dagrun/, .git/, runs/, config/)");
    }
    Ok(dir.has(name).then(|| (dir, name.to_os_string())))
}

/// Delete `rel`, a sensitive output a killed run may have left (the run
/// after it, or `dagrun verify --repair`), where [`find_left_plaintext`]
/// finds it, through its folder's handle (a folder output with everything in
/// it, never following a link). `Ok(false)`: nothing there.
pub fn delete_left_plaintext(root: &Path, rel: &str) -> anyhow::Result<bool> {
    let Some((dir, name)) = find_left_plaintext(root, rel).map_err(|e| anyhow::anyhow!("not deleting {e:#}"))? else { return Ok(false) };
    dir.remove_tree(&name).map_err(|e| anyhow::anyhow!("cannot delete {rel}: {e:#}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_plaintext_is_found_through_links_inside_and_never_outside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("ws");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("real/p.txt"), "pii").unwrap();
        std::fs::write(outside.join("p.txt"), "theirs").unwrap();
        std::os::unix::fs::symlink("real", root.join("in")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        // Through a link inside the workspace: found and deleted there.
        assert!(find_left_plaintext(&root, "in/p.txt").unwrap().is_some());
        assert!(find_left_plaintext(&root, "in/none.txt").unwrap().is_none());
        assert!(find_left_plaintext(&root, "gone/p.txt").unwrap().is_none());
        assert!(delete_left_plaintext(&root, "in/p.txt").unwrap());
        assert!(!root.join("real/p.txt").exists());
        // Through a link outside it: refused, nothing deleted.
        assert!(find_left_plaintext(&root, "out/p.txt").is_err());
        assert!(delete_left_plaintext(&root, "out/p.txt").is_err());
        assert_eq!(std::fs::read_to_string(outside.join("p.txt")).unwrap(), "theirs");
        // Nor into a protected folder, nor as a path that climbs.
        std::fs::create_dir_all(root.join(".dagrun")).unwrap();
        assert!(find_left_plaintext(&root, ".dagrun/keys").is_err());
        assert!(find_left_plaintext(&root, "../outside/p.txt").is_err());
        // A folder output goes whole, a link inside it is removed, not followed.
        std::fs::create_dir_all(root.join("real/batch")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("real/batch/l")).unwrap();
        assert!(delete_left_plaintext(&root, "in/batch").unwrap());
        assert!(!root.join("real/batch").exists() && outside.join("p.txt").exists());
    }

    fn places(dirs: &[&str], sensitive: &[&str]) -> Places {
        Places {
            dirs: dirs.iter().map(|s| s.to_string()).collect(),
            sensitive: sensitive.iter().map(|s| s.to_string()).collect(),
            open: false,
            workspace: String::new(),
            folder: None,
        }
    }

    #[test]
    fn a_record_is_obeyed_only_when_sealed_here_and_plain() {
        let d = tempfile::tempdir().unwrap();
        let ws = Workspace::at(d.path());
        std::fs::create_dir_all(ws.dagrun_dir()).unwrap();
        let key = IntegrityKey::from_bytes([7; 32]);
        assert_eq!(load(&ws, &key), Loaded::Missing);
        let p = places(&["", "data/raw"], &["data/raw/Tenant_B.parquet"]);
        save(&ws, &key, &p).unwrap();
        let here = Places { workspace: ws.root().to_string_lossy().into_owned(), folder: folder_of(&ws), ..p.clone() };
        assert_eq!(load(&ws, &key), Loaded::Valid(here));
        // Another workspace's key (a record shipped in a repository): not obeyed.
        assert!(matches!(load(&ws, &IntegrityKey::from_bytes([8; 32])), Loaded::Untrusted(why) if why.contains("MAC")));
        // The same key, another workspace (one sharing its keys): not obeyed.
        let d2 = tempfile::tempdir().unwrap();
        let ws2 = Workspace::at(d2.path());
        std::fs::create_dir_all(ws2.dagrun_dir()).unwrap();
        std::fs::copy(ws.places_file(), ws2.places_file()).unwrap();
        assert_eq!(load(&ws2, &key), Loaded::Elsewhere(ws.root().to_string_lossy().into_owned()));
        // This workspace spelt another way (`-C ws/`, a link to it): obeyed.
        let link = d2.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        for other in [Workspace::at(&d.path().join("")), Workspace::at(&link)] {
            assert_ne!(other.root().as_os_str(), ws.root().as_os_str());
            save(&other, &key, &p).unwrap();
            assert!(matches!(load(&ws, &key), Loaded::Valid(_)), "{}", other.root().display());
        }
        // Sealed, but naming a path outside the workspace or inside .dagrun: void.
        for bad in ["../x", "/etc/passwd", ".dagrun/keys/keyring.json", "a/../../b"] {
            save(&ws, &key, &places(&[], &[bad])).unwrap();
            assert!(matches!(load(&ws, &key), Loaded::Untrusted(_)), "{bad}");
        }
    }

    #[test]
    fn covers_and_union() {
        let a = places(&["a"], &["a/x"]);
        let b = places(&["b"], &[]);
        let u = a.union(&b);
        assert!(u.covers(&a) && u.covers(&b) && !a.covers(&b) && a.covers(&Places::default()));
    }
}
