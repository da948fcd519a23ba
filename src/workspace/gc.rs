//! Garbage collection of the cache: action-cache entries and the objects
//! only they name.
//!
//! Rules:
//! - **What is live.** Every stage's current state record (`.dagrun/state/`)
//!   and every action-cache entry whose key the caller asks to keep (`dagrun
//!   gc` passes the keys of the stages of the newest runs) are live, with
//!   every cache object their outputs name: a file's object, a directory's
//!   listing object and each file object the listing names; so is every
//!   object a live record's extra ingredient names (drift's
//!   `reference_features`: the feature file a measurement compared with),
//!   and every object the caller names (`dagrun gc` passes the feature files
//!   the registry's champions were trained on: drift's next reference).
//!   Nothing else is.
//! - **Forgotten tenants** (`keys forget`). Nothing of theirs is live: the
//!   state records of their stages (`NAME[TENANT]`) are removed, with every
//!   entry of those stages (even one a kept run names) and the objects only
//!   they name; the caller keeps no champion feature file of theirs and
//!   removes their registry folder.
//! - **What goes.** Action-cache entries that are not live, then objects no
//!   live record names. Entries first: a crash in between leaves objects that
//!   nothing names (the next `gc` removes them), never an entry whose object
//!   is gone (which would only mean a rerun, but is avoided anyway).
//! - **Refusals.** Records are read with their MAC. A record that does not
//!   verify (no master key, tampering) could name objects we cannot know, so
//!   `plan` refuses instead of guessing (exit 4): `dagrun verify --repair` first. Names
//!   in `objects/` that are not hashes and temporary files are not touched
//!   (`verify` reports the former; the sweep of a run removes the latter).
//! - Only [`ContentHash`]es read from verified records or parsed from object
//!   names build the paths that are deleted (`Cas::object_path`).
//! - The caller holds the workspace lock: no run adds entries meanwhile.

use super::ContentHash;
use super::cas::Cas;
use super::hashing::TreeEntry;
use super::state::{Loaded, OutputRecord, StageState, StateStore};
use anyhow::Result;
use std::collections::HashSet;
use std::path::PathBuf;

/// What a collection removes (or, planned, would remove) and keeps.
#[derive(Debug, Default)]
pub struct Plan {
    /// State records to delete (forgotten tenants' stages).
    pub states: Vec<PathBuf>,
    /// Action-cache entries to delete.
    pub entries: Vec<PathBuf>,
    /// Objects to delete, with their sizes.
    pub objects: Vec<(ContentHash, u64)>,
    pub entries_kept: usize,
    pub objects_kept: usize,
    pub bytes_kept: u64,
}

impl Plan {
    /// Bytes the objects to delete take.
    pub fn bytes_removed(&self) -> u64 {
        self.objects.iter().map(|(_, size)| size).sum()
    }
}

/// Every object `o` needs: its own, and for a directory each file's.
fn mark(cas: &Cas, o: &OutputRecord, live: &mut HashSet<ContentHash>) {
    if !o.cached || o.sensitive || !live.insert(o.hash.clone()) || !o.dir {
        return;
    }
    // A listing that does not read (missing, corrupted) names nothing we can
    // keep; its record is not restorable anyway.
    if let Ok(entries) = cas.read_listing(&o.hash) {
        for e in entries {
            if let TreeEntry::File { hash, .. } = e {
                live.insert(hash);
            }
        }
    }
}

fn size_of(cas: &Cas, h: &ContentHash) -> u64 {
    std::fs::symlink_metadata(cas.object_path(h)).map(|m| m.len()).unwrap_or(0)
}

/// Decide what goes, deleting nothing. `keep` are the action keys to keep
/// besides the current state records'; `keep_objects` objects to keep besides
/// those the live records name; `forgotten(stage)`: the stage is a
/// forgotten tenant's (nothing of it is live).
pub fn plan(
    states: &StateStore,
    cas: &Cas,
    keep: &HashSet<ContentHash>,
    keep_objects: &HashSet<ContentHash>,
    forgotten: &dyn Fn(&str) -> bool,
) -> Result<Plan> {
    let mut bad = Vec::new();
    let mut live_records: Vec<StageState> = Vec::new();
    let mut keys: HashSet<ContentHash> = keep.clone();
    let mut p = Plan::default();
    for (path, l) in states.scan_states() {
        match l {
            Loaded::Valid(st) if forgotten(&st.stage) => p.states.push(path),
            Loaded::Valid(st) => {
                keys.insert(st.key.clone());
                live_records.push(st);
            }
            Loaded::Missing => {}
            Loaded::Invalid(e) => bad.push(e.to_string()),
        }
    }
    for (path, l) in states.scan_actions() {
        match l {
            Loaded::Valid(st) if keys.contains(&st.key) && !forgotten(&st.stage) => {
                p.entries_kept += 1;
                live_records.push(st);
            }
            Loaded::Valid(_) => p.entries.push(path),
            Loaded::Missing => {}
            Loaded::Invalid(e) => bad.push(e.to_string()),
        }
    }
    if !bad.is_empty() {
        return Err(crate::error::Failure::Integrity(format!(
            "{} record(s) cannot be verified, so what they name in the cache is unknown and nothing is collected; first: {}. Run `dagrun verify --repair` (it removes untrustworthy records), then `dagrun gc` again",
            bad.len(),
            bad[0]
        ))
        .into());
    }
    let mut live = HashSet::new();
    for st in &live_records {
        for o in st.outputs.values() {
            mark(cas, o, &mut live);
        }
    }
    // After the outputs (`mark` descends into a listing it meets first).
    live.extend(keep_objects.iter().cloned());
    live.extend(live_records.iter().flat_map(|st| st.ingredients.extras.values()).filter_map(|v| ContentHash::parse(v).ok()));
    for h in cas.list() {
        let size = size_of(cas, &h);
        if live.contains(&h) {
            p.objects_kept += 1;
            p.bytes_kept += size;
        } else {
            p.objects.push((h, size));
        }
    }
    Ok(p)
}

/// What [`apply`] removed, and what it could not.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub states_removed: usize,
    pub entries_removed: usize,
    pub objects_removed: usize,
    pub bytes_removed: u64,
    /// Files that could not be removed.
    pub failed: usize,
    /// The first error, naming its file (and, when entries stayed, that the
    /// objects were kept).
    pub first_error: Option<String>,
}

/// Delete what `plan` chose: state records, then entries, then objects.
/// When a record or an entry cannot be deleted no object is: the one that
/// stays may name any of them (the next `gc` removes them once it can go).
/// Every file is deleted through a handle of its folder opened from `root`
/// (the workspace) without following a link (`util::nofollow`): a folder of
/// `.dagrun/` swapped for a link while gc runs leads nowhere outside
/// (helper-74: records of another workspace were deleted through one).
pub fn apply(root: &std::path::Path, cas: &Cas, plan: &Plan) -> Applied {
    let mut a = Applied::default();
    let mut dirs: std::collections::HashMap<PathBuf, crate::util::nofollow::Dir> = std::collections::HashMap::new();
    let mut remove = |path: &std::path::Path, a: &mut Applied| {
        let r = (|| -> anyhow::Result<()> {
            let rel = path.strip_prefix(root).map_err(|_| anyhow::anyhow!("{} is not inside the workspace {}", path.display(), root.display()))?;
            let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else { anyhow::bail!("{}: not a file's path", path.display()) };
            let dir = match dirs.entry(parent.to_path_buf()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(crate::util::nofollow::Dir::open(root, parent)?),
            };
            dir.unlink(name)
        })();
        match r {
            Ok(()) => true,
            Err(e) => {
                a.failed += 1;
                a.first_error.get_or_insert(format!("{e:#}"));
                false
            }
        }
    };
    for path in &plan.states {
        if remove(path, &mut a) {
            a.states_removed += 1;
        }
    }
    for path in &plan.entries {
        if remove(path, &mut a) {
            a.entries_removed += 1;
        }
    }
    if a.failed > 0 {
        if let Some(e) = &mut a.first_error {
            e.push_str("; no cache object was removed, since the records and entries that stay may name them (run `dagrun gc` again once they can be deleted)");
        }
        return a;
    }
    for (h, size) in &plan.objects {
        if remove(&cas.object_path(h), &mut a) {
            a.objects_removed += 1;
            a.bytes_removed += size;
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 21: an entry that could not be deleted kept naming objects that
    /// were deleted anyway, and the report gave the planned figures.
    #[test]
    fn no_object_goes_while_an_entry_to_remove_stays() {
        let d = tempfile::tempdir().unwrap();
        let ws = crate::workspace::Workspace::at(d.path());
        let cas = Cas::new(&ws);
        let h = ContentHash::of_bytes(b"x");
        let obj = cas.object_path(&h);
        std::fs::create_dir_all(obj.parent().unwrap()).unwrap();
        std::fs::write(&obj, b"x").unwrap();
        let gone = d.path().join("entry-a");
        std::fs::write(&gone, b"{}").unwrap();
        // An entry that cannot be deleted (a folder with something in it).
        let stuck = d.path().join("entry-b");
        std::fs::create_dir_all(stuck.join("x")).unwrap();
        let plan = Plan { entries: vec![gone.clone(), stuck.clone()], objects: vec![(h.clone(), 1)], ..Plan::default() };
        let a = apply(d.path(), &cas, &plan);
        assert_eq!((a.entries_removed, a.objects_removed, a.bytes_removed, a.failed), (1, 0, 0, 1));
        assert!(a.first_error.unwrap().contains("no cache object was removed"));
        assert!(obj.exists() && !gone.exists());
        std::fs::remove_dir_all(&stuck).unwrap();
        let a = apply(d.path(), &cas, &plan);
        assert_eq!(a, Applied { states_removed: 0, entries_removed: 2, objects_removed: 1, bytes_removed: 1, failed: 0, first_error: None });
        assert!(!obj.exists());
    }
}
