//! Cleaning up after a run: plaintext (sensitive) outputs deleted, temporary
//! files of interrupted writes removed.
//!
//! Rules: only dagrun's own temporary names (`util::atomic::is_temp_name`)
//! are swept, and only in the folders dagrun writes to: this pipeline's and
//! those of the run that was killed (`workspace::places`, which also names
//! the sensitive outputs that run may have left).

use super::*;
use crate::workspace::places::{self, Places};

/// What [`Engine::prepare_places`] recorded for the run.
pub(super) struct PlacesState {
    mine: Places,
    key: Arc<crate::crypto::IntegrityKey>,
    /// This run marked the record open (it is making plaintext).
    opened: bool,
}

fn save_places(ws: &Workspace, key: &crate::crypto::IntegrityKey, p: &Places) {
    if let Err(e) = places::save(ws, key, p) {
        tracing::warn!("cannot record where this run writes ({e:#}): if it is killed, the next run of another pipeline may not clean up after it");
    }
}

impl Engine {
    /// Delete every sensitive output on disk (plaintext never outlives a run).
    pub fn shred_sensitive(&self) {
        for s in &self.pipeline.stages {
            for o in s.outs.iter().filter(|o| o.sensitive) {
                let abs = self.pipeline.abs(&o.path);
                if abs.symlink_metadata().is_ok() {
                    if let Err(e) = remove_path(&abs) {
                        tracing::error!("cannot delete sensitive output {}: {e:#}", o.path);
                    } else {
                        tracing::debug!("deleted sensitive output {}", o.path);
                    }
                    self.memo.forget(&abs);
                }
            }
        }
    }

    /// Note files this run wrote (state records, outputs) for [`Engine::sync_written`].
    pub(super) fn wrote(&self, paths: impl IntoIterator<Item = PathBuf>) {
        self.written.lock().unwrap_or_else(|e| e.into_inner()).extend(paths);
    }

    /// Make the state records and outputs this run wrote durable, in one
    /// batch (`util::atomic::sync_files`). Called once at the end of a run,
    /// before the hash memo and the run record are written; why this
    /// replaces an fsync per record is in `workspace::state` ("Durability").
    pub fn sync_written(&self) {
        let mut paths = std::mem::take(&mut *self.written.lock().unwrap_or_else(|e| e.into_inner()));
        if paths.is_empty() {
            return;
        }
        paths.sort();
        paths.dedup();
        if let Err(e) = crate::util::atomic::sync_files(&self.pipeline.workspace, &paths) {
            tracing::error!("{e:#}: what this run wrote may not survive a power cut (the next run checks every record and output it uses)");
        }
    }

    /// This run's places: its outputs' folders and its sensitive outputs.
    fn places(&self) -> Places {
        let mut p = Places::default();
        for o in self.pipeline.stages.iter().flat_map(|s| &s.outs) {
            let parent = Path::new(&o.path).parent().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
            p.dirs.insert(parent);
            if o.sensitive {
                p.sensitive.insert(o.path.clone());
            }
        }
        p
    }

    /// Before the first stage: record where this run writes, and when the
    /// last run did not end cleanly (`unclean`), remove what it left — its
    /// temporary files, and, if it was making plaintext, its sensitive
    /// outputs — wherever they are, then narrow the record to this run's
    /// places (rules: `workspace::places`).
    ///
    /// Returns whether the clean-up is done (the lock may be marked swept):
    /// not when the record is there but cannot be trusted — it may be the
    /// killed run's, sealed under the master key this shell lacks.
    pub fn prepare_places(&self, unclean: bool) -> bool {
        let mine = self.places();
        let Ok(key) = self.services.integrity_key() else {
            if unclean {
                self.sweep_temp_files(&mine);
            }
            return !self.ws.places_file().exists();
        };
        let prev = match places::load(&self.ws, &key) {
            places::Loaded::Missing => None,
            places::Loaded::Valid(p) => Some(Places { workspace: String::new(), folder: None, ..p }),
            places::Loaded::Elsewhere(other) => {
                let file = self.ws.rel(&self.ws.places_file());
                if !unclean {
                    tracing::info!("{file}: written for the workspace at {other} (this one is a copy of it?): replaced by this workspace's");
                    None
                } else {
                    tracing::warn!(
                        "{file}: written for another workspace ({other}): not obeyed (nothing it names is deleted) and kept; runs there clean up after a killed run of theirs. Delete it if this workspace has no killed run to clean up after"
                    );
                    self.sweep_temp_files(&mine);
                    return false;
                }
            }
            places::Loaded::Untrusted(why) => {
                if !unclean {
                    tracing::warn!(
                        "{why}: not obeyed (nothing it names is deleted); replaced by this run's (the last run ended cleanly: nothing of it is left to clean up)"
                    );
                    None
                } else {
                    tracing::warn!(
                        "{why}: not obeyed (nothing it names is deleted) and kept; runs with this workspace's master key clean up after a killed run. Delete it if it is not this workspace's"
                    );
                    self.sweep_temp_files(&mine);
                    return false;
                }
            }
        };
        if unclean {
            let all = prev.as_ref().map_or_else(|| mine.clone(), |p| p.union(&mine));
            if prev.as_ref() != Some(&all) {
                save_places(&self.ws, &key, &all);
            }
            self.sweep_temp_files(&all);
            if all.open {
                self.shred_left(&all, &mine);
            }
            if all != mine {
                save_places(&self.ws, &key, &mine);
            }
        } else if prev.as_ref() != Some(&mine) {
            save_places(&self.ws, &key, &mine);
        }
        *self.places.lock().unwrap_or_else(|e| e.into_inner()) = Some(PlacesState { mine, key, opened: false });
        true
    }

    /// Stage `i` is about to run (or to have a sensitive input made again):
    /// if it writes plaintext, the record says so first (once a run).
    pub(super) fn about_to_write_plaintext(&self, i: usize, remakes_sensitive: bool) {
        if !(remakes_sensitive || self.stage(i).outs.iter().any(|o| o.sensitive)) {
            return;
        }
        self.open_places();
    }

    /// Mark the record open (see [`Engine::about_to_write_plaintext`]);
    /// Slurm runs do it before the first job (a job decides its later
    /// members itself).
    pub fn open_places(&self) {
        let mut g = self.places.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = g.as_mut().filter(|st| !st.opened) {
            st.opened = true;
            save_places(&self.ws, &st.key, &Places { open: true, ..st.mine.clone() });
        }
    }

    /// The run has shredded its plaintext ([`Engine::shred_sensitive`]): the
    /// record is closed again, if this run opened it.
    pub fn close_places(&self) {
        let g = self.places.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = g.as_ref().filter(|st| st.opened) {
            save_places(&self.ws, &st.key, &st.mine);
        }
    }

    /// Delete the sensitive outputs a killed run may have left, before the
    /// first stage: this run's own (plaintext never outlives a run, so one on
    /// disk now is the killed run's; left until this run's end, a second kill
    /// before this run opened the record lost track of it: helper-75), and
    /// those of `all` that another pipeline (or this one with other tenants)
    /// declared, unless this pipeline declares the path as a plain output or
    /// reads it (it is the user's file now).
    fn shred_left(&self, all: &Places, mine: &Places) {
        let used: Vec<&Path> =
            self.pipeline.stages.iter().flat_map(|s| s.deps.iter().map(Path::new).chain(s.outs.iter().map(|o| Path::new(&o.path)))).collect();
        // A path this pipeline uses, or one inside or around it (a folder).
        let in_use = |rel: &str| {
            let r = Path::new(rel);
            used.iter().any(|u| u.starts_with(r) || r.starts_with(u))
        };
        let root = &self.pipeline.workspace;
        for rel in all.sensitive.iter().filter(|p| mine.sensitive.contains(*p) || !in_use(p)) {
            match places::delete_left_plaintext(root, rel) {
                Ok(false) => continue,
                Ok(true) => tracing::warn!("deleted {rel}: a sensitive output a killed run left"),
                Err(e) => tracing::error!("{e:#} (a sensitive output a killed run may have left)"),
            }
            self.memo.forget(&root.join(rel));
        }
    }

    /// Remove temporary files left next to outputs by killed runs: in the
    /// output folders of `places` (this run's, and the killed run's).
    fn sweep_temp_files(&self, places: &Places) {
        let root = &self.pipeline.workspace;
        // Another pipeline's folders were not checked when this one loaded.
        let mut dirs: HashSet<PathBuf> = places
            .dirs
            .iter()
            .filter(|d| d.is_empty() || crate::util::nofollow::check_write_path(root, d, crate::workspace::PROTECTED_DIRS, false).is_ok())
            .map(|d| root.join(d))
            .collect();
        dirs.insert(self.ws.dagrun_dir()); // the hash memo
        dirs.insert(self.ws.keys_dir()); // a killed key write's copy of the keyring
        dirs.insert(self.ws.state_dir());
        dirs.insert(self.ws.dagrun_dir().join("openlineage")); // workspace id, spool
        dirs.insert(self.ws.dagrun_dir().join("metrics")); // last successful run
        dirs.insert(self.ws.actions_dir());
        dirs.insert(self.ws.objects_dir()); // ingest staging files
        if let Ok(rd) = std::fs::read_dir(self.ws.objects_dir()) {
            dirs.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
        dirs.insert(self.ws.runs_dir());
        dirs.extend(crate::registry::Registry::new(&self.ws.dagrun_dir()).dirs()); // registered models
        for d in dirs {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                if crate::util::atomic::is_temp_name(&e.file_name().to_string_lossy()) {
                    let _ = remove_path(&e.path());
                }
            }
        }
    }
}
