//! `dagrun verify`: checks the whole content-addressed store, the state files,
//! the action cache, the hash memo, models, feature manifests and the recorded
//! outputs, and reports each problem by file (exit 4).
//!
//! Found: a cache object whose content does not match its name, or whose name
//! is not a hash; a directory listing with an unsafe entry (absolute, `..`,
//! NUL, below a symlink) or a malformed hash; a state file, action-cache
//! entry or the hash memo whose MAC fails (modified outside dagrun), that has
//! a malformed hash, or that sits under the wrong name; a temporary copy of
//! the keyring a killed key command left (it may hold destroyed keys); a model or feature
//! manifest that fails its MAC or names another tenant; a registered model
//! version (`.dagrun/registry/`) whose file differs from its index entry,
//! fails its MAC or is not its tenant's; an output missing or modified since
//! it was produced; plaintext a killed run left (a sensitive output named by
//! an open `.dagrun/places.json` while no run holds the workspace lock).
//!
//! With `--repair` (under the workspace lock) what can be fixed is: bad cache
//! objects, untrustworthy state files and action-cache entries (the stage
//! reruns), stale keyring copies, a tampered memo and a killed run's
//! plaintext are deleted. Registered models are reported,
//! never deleted (`train` rewrites a damaged one when it runs again; `dagrun
//! models promote` picks another champion). Outputs are not touched: the next
//! run restores or recomputes them. Without a master key nothing can be
//! verified, and that is reported. A store folder that is a symlink is refused
//! before anything is read (`workspace::own_dirs`, exit 2).

use crate::crypto::{IntegrityKey, Keyring};
use crate::workspace::ContentHash;
use crate::workspace::Workspace;
use crate::workspace::cas::Cas;
use crate::workspace::hashing::{HashMemo, decode_tree, looks_like_tree};
use crate::workspace::record;
use crate::workspace::state::{Loaded, StateStore};
use anyhow::Result;
use std::path::Path;
use std::sync::Arc;

/// What verification found.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub stages_checked: usize,
    pub problems: Vec<String>,
    /// What `--repair` removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
    /// Outputs `--repair` stored in the cache again (their cached copy was
    /// gone or damaged; the workspace's had the recorded hash).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restored: Vec<String>,
    /// State records of forgotten tenants' stages, not checked (`dagrun gc` removes them).
    #[serde(skip_serializing_if = "is_zero")]
    pub forgotten_records: usize,
    /// What is worth knowing and is no problem.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl VerifyReport {
    /// Problems `--repair` did not fix (all of them without it): each
    /// removal in `repaired` fixes the one problem that named it ([`remove`]).
    pub fn remaining(&self) -> usize {
        self.problems.len().saturating_sub(self.repaired.len())
    }
}

/// Remove what a found problem names (the problem is then fixed).
fn remove(r: &mut VerifyReport, ws: &Workspace, p: &Path) {
    if crate::util::fs_remove(p).is_ok() {
        r.repaired.push(ws.rel(p));
    }
}

/// With `repair`, waits up to `wait` for the workspace lock (None: exit 75 at once).
pub fn verify(workspace: &Path, repair: bool, wait: Option<std::time::Duration>) -> Result<VerifyReport> {
    let ws = Workspace::at(workspace);
    // A linked store folder would have verify hash, and repair delete, what it
    // points at: refused before anything is listed (taking the lock checks it).
    let lock = if repair {
        Some(ws.lock(wait, "dagrun verify --repair")?)
    } else {
        crate::workspace::own_dirs::check(ws.root())?;
        None
    };
    let ring = Keyring::open_existing(ws.root())?;
    let key: Option<Arc<IntegrityKey>> = ring.as_ref().map(|k| k.integrity_key());
    let cas = Cas::read_only(&ws);
    let states = StateStore::new(&ws, key.clone());
    let mut r = VerifyReport::default();
    check_objects(&ws, &cas, repair, &mut r);
    // Copies of the keyring a killed key operation left (they may hold keys
    // that `keys forget` destroyed since).
    for p in crate::crypto::keyring::stale_copies(ws.root()) {
        r.problems.push(format!(
            "{}: a temporary copy left by a killed key operation; it may hold keys that were destroyed since (`verify --repair` or the next key command removes it)",
            ws.rel(&p)
        ));
        if repair {
            remove(&mut r, &ws, &p);
        }
    }
    // An erasure that did not finish (a killed `keys forget`).
    if let Some(u) = ring.as_ref().and_then(|k| k.unfinished_forget()) {
        r.problems.push(crate::crypto::keyring::unfinished_forget_message(ws.root(), &u));
    }
    // Every tenant key unwraps (not only when a run needs it).
    for p in ring.iter().flat_map(|k| k.check_all_keys()) {
        r.problems.push(format!("{p} (a run that needs the key fails)"));
    }
    if key.is_none() && (ws.state_dir().is_dir() || ws.actions_dir().is_dir()) {
        r.problems.push(format!(
            "no master key in {}: state records, models and manifests cannot be verified (set the master key dagrun runs with, or restore .dagrun/keys/master.key from a backup)",
            ws.root().display()
        ));
    }
    if let Some(k) = &key {
        check_left_plaintext(&ws, k, lock.as_ref(), &mut r)?;
    }
    // Only a proven erasure leaves records unchecked (helper-73).
    let erasures = ring.as_ref().map(|k| k.erasures()).unwrap_or_default();
    let forgotten = &erasures.proven;
    // A tombstone whose tenant still has keys was not made by a forget that
    // finished: a problem (`keys forget T --yes` destroys the keys). One
    // without a seal of this workspace (an older dagrun's, or copied in) is
    // not proof enough for `gc`: said, not a problem.
    for (t, has_keys) in &erasures.unproven {
        if *has_keys {
            r.problems.push(format!(
                "the keyring names tenant {t} forgotten, but its keys are still there (added by hand, or a forget that did not finish): `dagrun keys forget {t} --yes` destroys them"
            ));
        } else {
            r.notes.push(format!(
                "tenant {t} is forgotten without this workspace's seal (forgotten by an older dagrun, in another folder, or added by hand): its records are checked and `dagrun gc` removes nothing of it"
            ));
        }
    }
    // State files: authentic, well-formed, in their place; outputs intact.
    for (path, l) in states.scan_states() {
        let st = match l {
            Loaded::Valid(st) => st,
            Loaded::Missing => continue,
            Loaded::Invalid(e) => {
                if key.is_some() {
                    r.problems.push(format!("{e} (the stage will rerun)"));
                    if repair {
                        remove(&mut r, &ws, &path);
                    }
                }
                continue;
            }
        };
        // A forgotten tenant's outputs are meant to go (its folders deleted
        // by hand, its records by `gc`): not problems (helper-72).
        if crate::pipeline::tenants::is_stage_of_any(&st.stage, forgotten) {
            r.forgotten_records += 1;
            continue;
        }
        r.stages_checked += 1;
        let memo = HashMemo::in_memory();
        for (rel, o) in &st.outputs {
            let here = (!o.sensitive).then(|| memo.hash_path(&ws.abs(rel)));
            let intact_here = matches!(&here, Some(Ok(Some(h))) if h.hash == o.hash);
            if o.cached && !cas.restorable(&o.hash, o.dir) {
                if repair && intact_here {
                    // The workspace's copy has the recorded hash: the cache gets it back.
                    match Cas::new(&ws).put(&ws.abs(rel), &o.hash, o.dir, &memo) {
                        Ok(()) => r.restored.push(rel.clone()),
                        Err(e) => {
                            r.problems.push(format!("{}: output {rel} has no intact copy in the cache, and storing the workspace's failed: {e:#}", st.stage))
                        }
                    }
                } else {
                    let fix = if intact_here {
                        "`dagrun verify --repair` stores the workspace's intact copy in the cache again".to_string()
                    } else {
                        format!("`dagrun run --force '{}'` recomputes it", st.stage)
                    };
                    r.problems.push(format!("{}: output {rel} has no intact copy in the cache ({fix})", st.stage));
                }
            }
            let Some(here) = here else { continue };
            match here {
                Ok(Some(h)) if h.hash == o.hash => {}
                Ok(Some(_)) => r.problems.push(format!("{}: output {rel} was modified since it was produced (the next run restores it)", st.stage)),
                Ok(None) => r.problems.push(format!("{}: output {rel} is missing (the next run restores it)", st.stage)),
                Err(e) => r.problems.push(format!("{}: output {rel}: {e:#}", st.stage)),
            }
        }
        // Signed artifacts this stage made: models and feature manifests.
        if let Some(k) = &key {
            let tenant = st.ingredients.params.get("tenant").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            for rel in st.outputs.keys() {
                let p = ws.abs(rel);
                match st.ingredients.kind.as_str() {
                    "train" if st.ingredients.params.get("output").and_then(|v| v.as_str()).is_none_or(|m| m == rel) => {
                        if let Ok(b) = crate::util::read_capped(&p, crate::model::artifact::MAX_MODEL_BYTES)
                            && let Err(e) = crate::model::artifact::load_verified(&b, rel, k, &tenant)
                        {
                            r.problems.push(format!("{}: {e:#}", st.stage));
                        }
                    }
                    "store" if rel.ends_with(crate::store::MANIFEST_FILE) && p.exists() => {
                        if let Err(e) = crate::store::read_manifest_of(p.parent().unwrap_or(&p), k, &tenant) {
                            r.problems.push(format!("{}: {e:#}", st.stage));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    // Action-cache entries.
    for (path, l) in states.scan_actions() {
        if let Loaded::Invalid(e) = l
            && key.is_some()
        {
            r.problems.push(format!("action cache entry {e}"));
            if repair {
                remove(&mut r, &ws, &path);
            }
        }
    }
    // Registered model versions (what `serve` and `predict` use).
    if let Some(k) = &key {
        let reg = crate::registry::Registry::of_workspace(ws.root());
        for t in reg.tenants() {
            match reg.versions(&t) {
                Ok(entries) => {
                    for e in entries {
                        if let Err(err) = reg.load(&t, &e.version, k) {
                            r.problems.push(format!("model registry, tenant {t}, version {}: {err:#}", e.version));
                        }
                    }
                }
                Err(err) => r.problems.push(format!("model registry, tenant {t}: {err:#}")),
            }
            if let Err(err) = reg.load_champion(&t, k) {
                r.problems.push(format!("model registry, tenant {t}, champion: {err:#}"));
            }
        }
    }
    // The hash memo.
    if let (Some(k), Ok(b)) = (&key, crate::util::read_capped(&ws.memo_file(), 1 << 30)) {
        #[derive(serde::Deserialize)]
        struct Memo {
            #[allow(dead_code)]
            entries: std::collections::HashMap<String, serde_json::Value>,
        }
        if let Err(e) = record::open::<Memo>(Some(k), record::HASH_MEMO, &b, &ws.rel(&ws.memo_file())) {
            r.problems.push(format!("{e} (it is ignored; files are hashed again)"));
            if repair {
                remove(&mut r, &ws, &ws.memo_file());
            }
        }
    }
    Ok(r)
}

/// Plaintext a killed run left: the places record is open (a run was making
/// plaintext and did not end) while no run holds the lock, and a sensitive
/// output it names is on disk (found as the run finds it, no link followed
/// outside the workspace: `places::find_left_plaintext`). The next run
/// deletes it; `--repair` (holding the lock) now, after stopping what the
/// killed run left running (its stage commands' children, its Slurm jobs),
/// as a run does, so nothing writes it again. Without `--repair`, checked
/// under a shared probe of the lock: a run at work makes plaintext by design
/// (a note); another holder (`gc`, `runs prune`) makes none. A record that
/// cannot be trusted, or is another workspace's, is a problem: neither
/// `verify` nor a run obeys it, so what it names is left to the owner.
fn check_left_plaintext(ws: &Workspace, key: &IntegrityKey, lock: Option<&crate::workspace::lock::WorkspaceLock>, r: &mut VerifyReport) -> Result<()> {
    use crate::workspace::lock::Probe;
    use crate::workspace::places::{self, Loaded};
    let file = ws.rel(&ws.places_file());
    // Each sensitive output of an open record that is there (or cannot be
    // looked at); `scan` reads the record again.
    let found = |loaded: Loaded| -> Vec<(String, Result<()>)> {
        match loaded {
            Loaded::Valid(p) if p.open => p
                .sensitive
                .into_iter()
                .filter_map(|rel| match places::find_left_plaintext(ws.root(), &rel) {
                    Ok(None) => None,
                    Ok(Some(_)) => Some((rel, Ok(()))),
                    Err(e) => Some((rel, Err(e))),
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let scan = || found(places::load(ws, key));
    match places::load(ws, key) {
        Loaded::Untrusted(why) => {
            r.problems.push(format!(
                "{why}: not trusted, so no run and no verify looks for the plaintext a killed run it names may have left (if it is sealed under another master key, verify with that key; if not, look for plaintext among your pipelines' sensitive outputs by hand, then delete {file})"
            ));
            return Ok(());
        }
        Loaded::Elsewhere(other) => {
            r.problems.push(format!(
                "{file}: written for the workspace at {} (this one is a copy of it, or was restored from a backup): not obeyed here, so no run and no verify looks for the plaintext a run killed there may have left (look among your pipelines' sensitive outputs by hand, then delete {file})",
                crate::util::escape_controls(&other)
            ));
            return Ok(());
        }
        loaded => {
            if found(loaded).is_empty() {
                return Ok(());
            }
        }
    }
    let _guard = if let Some(lock) = lock {
        if !crate::workspace::orphans::stop_killed_runs(lock, ws.root()) {
            r.problems.push(
                "processes a killed run left could not all be stopped: its plaintext may be written again (`dagrun verify --repair` again, or the next run, stops them)".to_string(),
            );
        }
        if let Err(e) = crate::executor::slurm::abandon_orphans(ws.root()) {
            r.problems.push(format!("cannot cancel the Slurm jobs of a killed run ({e:#}): its plaintext is not deleted (a job could write it again); the next `dagrun run` tries again"));
            return Ok(());
        }
        None
    } else {
        match crate::workspace::lock::probe(&ws.dagrun_dir())? {
            Probe::Held { who, run: true } => {
                r.notes.push(format!("{who} holds the workspace lock: the plaintext a run makes is there until it ends (not checked)"));
                return Ok(());
            }
            // `gc`, `runs prune`, `verify --repair`, a key command: none makes plaintext.
            Probe::Held { run: false, .. } => None,
            Probe::Free(guard) => guard,
        }
    };
    let left = "plaintext (a sensitive output) left by a run that was killed before it could delete it";
    for (rel, found) in scan() {
        match found {
            Ok(()) if lock.is_none() => r.problems.push(format!(
                "{rel}: {left} (`dagrun verify --repair` deletes it now; so does the next `dagrun run` here, unless its pipeline reads that path or writes it as a plain output)"
            )),
            Ok(()) => match places::delete_left_plaintext(ws.root(), &rel) {
                Ok(_) => {
                    r.problems.push(format!("{rel}: {left}"));
                    r.repaired.push(rel);
                }
                Err(e) => r.problems.push(format!("{rel}: {left}; not deleted: {e:#}")),
            },
            Err(e) => r.problems.push(format!("a sensitive output a killed run may have left was not looked at: {e:#}")),
        }
    }
    // A process that slipped through (one handing itself over faster than
    // a scan) may write it again: stopped once more, and what is back said.
    if let Some(lock) = lock.filter(|_| !r.repaired.is_empty()) {
        crate::workspace::orphans::stop_killed_runs(lock, ws.root());
        for (rel, found) in scan() {
            if found.is_ok() && r.repaired.contains(&rel) {
                r.problems
                    .push(format!("{rel}: written again after it was deleted: a process of the killed run is still at work (`dagrun verify --repair` again)"));
            }
        }
    }
    Ok(())
}

/// Every object's name is a hash and its content matches; listings are safe.
fn check_objects(ws: &Workspace, cas: &Cas, repair: bool, r: &mut VerifyReport) {
    let root = ws.objects_dir();
    let Ok(rd) = std::fs::read_dir(&root) else { return };
    let mut dirs: Vec<_> = rd.flatten().collect();
    dirs.sort_by_key(|d| d.file_name());
    for d in dirs {
        let dname = d.file_name().to_string_lossy().into_owned();
        if crate::util::atomic::is_temp_name(&dname) {
            continue; // a staging file of a run in progress or killed (swept by the next run)
        }
        let Ok(rd2) = std::fs::read_dir(d.path()) else {
            r.problems.push(format!("cache: {} is not a directory", ws.rel(&d.path())));
            if repair {
                remove(r, ws, &d.path());
            }
            continue;
        };
        let mut files: Vec<_> = rd2.flatten().collect();
        files.sort_by_key(|f| f.file_name());
        for f in files {
            let fname = f.file_name().to_string_lossy().into_owned();
            if crate::util::atomic::is_temp_name(&fname) {
                continue;
            }
            r.objects_checked += 1;
            let p = f.path();
            let Ok(hash) = ContentHash::parse(&format!("{dname}{fname}")) else {
                r.problems.push(format!("cache: {} is not named by a content hash", ws.rel(&p)));
                if repair {
                    remove(r, ws, &p);
                }
                continue;
            };
            let short = hash.short().to_string();
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => {}
                Ok(m) => {
                    r.problems.push(format!(
                        "cache object {short} ({}) is {}, not a file",
                        ws.rel(&p),
                        if m.is_dir() { "a directory" } else { "a symlink or special file" }
                    ));
                    if repair {
                        remove(r, ws, &p);
                    }
                    continue;
                }
                Err(_) => continue,
            }
            match crate::workspace::hashing::hash_file_bytes(&p) {
                Ok(h) if h == hash => {}
                Ok(h) => {
                    r.problems.push(format!("cache object {short} ({}) is corrupted (content hashes to {})", ws.rel(&p), h.short()));
                    if repair {
                        remove(r, ws, &p);
                    }
                    continue;
                }
                Err(e) => {
                    r.problems.push(format!("cache object {short} ({}): {e:#}", ws.rel(&p)));
                    continue;
                }
            }
            // A directory listing: every entry must be safe to restore.
            let head = crate::util::read_at_most(&p, 31).unwrap_or_default();
            if looks_like_tree(&head) {
                let bytes = crate::util::read_capped(&p, crate::workspace::hashing::MAX_LISTING_BYTES).unwrap_or_default();
                if let Err(why) = decode_tree(&bytes) {
                    r.problems.push(format!("cache object {short} ({}, a directory listing): {why}", ws.rel(&p)));
                    if repair {
                        remove(r, ws, &p);
                    }
                }
            }
        }
    }
    let _ = cas;
}

/// `dagrun verify [--repair] [--json]`: print what [`verify`] found; exit 4 on
/// any problem `--repair` did not fix (every problem without it).
pub fn run(workspace: &Path, repair: bool, wait: Option<std::time::Duration>, json: bool) -> Result<i32> {
    let r = verify(workspace, repair, wait)?;
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for p in &r.problems {
            // File names from the workspace: shown, never obeyed by the terminal.
            crate::outln!("problem: {}", crate::util::escape_controls_in_lines(p));
        }
        for p in &r.restored {
            crate::outln!("repaired: stored {} in the cache again (the workspace's copy is intact)", crate::util::escape_controls(p));
        }
        let fixed = match (repair, r.repaired.len()) {
            (false, _) => String::new(),
            (true, _) if r.problems.is_empty() => String::new(),
            (true, n) if n == r.problems.len() => format!(", {}", if n == 1 { "repaired" } else { "all repaired" }),
            (true, n) => format!(", {n} repaired, {} not", r.remaining()),
        };
        if !crate::util::stdout::quiet() {
            for n in &r.notes {
                crate::outln!("note: {}", crate::util::escape_controls_in_lines(n));
            }
            if r.forgotten_records > 0 {
                crate::outln!(
                    "note: {} of forgotten tenants are not checked; `dagrun gc` removes them",
                    crate::util::count(r.forgotten_records, "state record", "state records")
                );
            }
        }
        if !crate::util::stdout::quiet() || r.remaining() > 0 {
            crate::outln!(
                "checked {} and {}: {}{fixed}",
                crate::util::count(r.objects_checked, "cache object", "cache objects"),
                crate::util::count(r.stages_checked, "stage", "stages"),
                crate::util::count(r.problems.len(), "problem", "problems")
            );
        }
    }
    Ok(if r.remaining() == 0 { crate::error::exit::OK } else { crate::error::exit::INTEGRITY })
}
