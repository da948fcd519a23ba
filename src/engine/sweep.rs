//! Cleaning up after a run: plaintext (sensitive) outputs deleted, temporary
//! files of interrupted writes removed.
//!
//! Rules: only dagrun's own temporary names (`util::atomic::is_temp_name`)
//! are swept, and only in the folders dagrun writes to.

use super::*;

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

    /// Remove temporary files left next to outputs by killed runs.
    pub fn sweep_temp_files(&self) {
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        for s in &self.pipeline.stages {
            for o in &s.outs {
                if let Some(parent) = self.pipeline.abs(&o.path).parent() {
                    dirs.insert(parent.to_path_buf());
                }
            }
        }
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
