//! Cleaning up after a run: plaintext (sensitive) outputs deleted, temporary
//! files of interrupted writes removed.
//!
//! Rules: only dagrun's own temporary names (`util::atomic::is_temp_name`)
//! are swept, and only in the folders dagrun writes to: this pipeline's and
//! those of the run that was killed (`workspace::places`, which also names
//! the sensitive outputs that run may have left).

use super::*;
use crate::workspace::places::{self, Places};

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
    /// temporary files and its sensitive outputs — wherever they are, then
    /// narrow the record to this run's places (rules: `workspace::places`).
    pub fn prepare_places(&self, unclean: bool) {
        let mine = self.places();
        let Ok(key) = self.services.integrity_key() else {
            if unclean {
                self.sweep_temp_files(&mine);
            }
            return;
        };
        let prev = places::load(&self.ws, &key);
        let save = |p: &Places| {
            if let Err(e) = places::save(&self.ws, &key, p) {
                tracing::warn!("cannot record where this run writes ({e:#}): if it is killed, the next run of another pipeline may not clean up after it");
            }
        };
        if !unclean {
            if prev.as_ref() != Some(&mine) {
                save(&mine);
            }
            return;
        }
        let all = prev.as_ref().map_or_else(|| mine.clone(), |p| p.union(&mine));
        if prev.as_ref() != Some(&all) {
            save(&all);
        }
        self.sweep_temp_files(&all);
        self.shred_left(&all, &mine);
        if all != mine {
            save(&mine);
        }
    }

    /// Delete the sensitive outputs a killed run of another pipeline (or of
    /// this one with other tenants) may have left: those of `all` this run
    /// does not declare, unless this pipeline declares the path as a plain
    /// output or reads it (it is the user's file now).
    fn shred_left(&self, all: &Places, mine: &Places) {
        let used: HashSet<&str> =
            self.pipeline.stages.iter().flat_map(|s| s.deps.iter().map(String::as_str).chain(s.outs.iter().map(|o| o.path.as_str()))).collect();
        let root = &self.pipeline.workspace;
        for rel in all.sensitive.iter().filter(|p| !mine.sensitive.contains(*p) && !used.contains(p.as_str())) {
            let abs = root.join(rel);
            if abs.symlink_metadata().is_err() {
                continue;
            }
            if let Err(why) = crate::util::nofollow::check_write_path(root, rel, crate::workspace::PROTECTED_DIRS, false) {
                tracing::warn!("not deleting {rel}, a sensitive output a killed run may have left: {why}");
                continue;
            }
            match remove_path(&abs) {
                Ok(()) => tracing::warn!("deleted {rel}: a sensitive output a killed run left"),
                Err(e) => tracing::error!("cannot delete {rel}, a sensitive output a killed run left: {e:#}"),
            }
            self.memo.forget(&abs);
        }
    }

    /// Remove temporary files left next to outputs by killed runs: in this
    /// pipeline's output folders and those of `places`.
    pub fn sweep_temp_files(&self, places: &Places) {
        let root = &self.pipeline.workspace;
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        for s in &self.pipeline.stages {
            for o in &s.outs {
                if let Some(parent) = self.pipeline.abs(&o.path).parent() {
                    dirs.insert(parent.to_path_buf());
                }
            }
        }
        // Another pipeline's folders were not checked when this one loaded.
        dirs.extend(
            places
                .dirs
                .iter()
                .filter(|d| d.is_empty() || crate::util::nofollow::check_write_path(root, d, crate::workspace::PROTECTED_DIRS, false).is_ok())
                .map(|d| root.join(d)),
        );
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
