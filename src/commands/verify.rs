//! `dagrun verify`: checks the whole content-addressed store, the state files,
//! the action cache and the recorded outputs, and reports what is wrong.
//! With `--repair`, corrupted cache objects are deleted (the next run
//! recomputes or restores what needed them).

use crate::engine::cas::Cas;
use crate::engine::hashing::HashMemo;
use crate::engine::state::StateStore;
use anyhow::Result;
use std::path::Path;

/// What verification found.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub stages_checked: usize,
    pub problems: Vec<String>,
}

pub fn verify(workspace: &Path, repair: bool) -> Result<VerifyReport> {
    let dd = workspace.join(crate::engine::DAGRUN_DIR);
    let cas = Cas::read_only(&dd);
    let states = StateStore::new(&dd);
    let mut r = VerifyReport::default();
    // 1. Every object's content matches its name.
    let root = dd.join("cache").join("objects");
    if let Ok(rd) = std::fs::read_dir(&root) {
        for d in rd.flatten() {
            if crate::util::atomic::is_temp_name(&d.file_name().to_string_lossy()) {
                continue; // a staging file of a run in progress or killed (swept by the next run)
            }
            let Ok(rd2) = std::fs::read_dir(d.path()) else {
                r.problems.push(format!("cache: {} is not a directory", d.path().display()));
                continue;
            };
            for f in rd2.flatten() {
                let name = format!("{}{}", d.file_name().to_string_lossy(), f.file_name().to_string_lossy());
                if crate::util::atomic::is_temp_name(&f.file_name().to_string_lossy()) {
                    continue;
                }
                r.objects_checked += 1;
                let p = f.path();
                if p.is_dir() {
                    r.problems.push(format!("cache object {name} is a directory, not a file"));
                    if repair {
                        let _ = std::fs::remove_dir_all(&p);
                    }
                    continue;
                }
                match crate::engine::hashing::hash_file_bytes(&p) {
                    Ok(h) if h == name => {}
                    Ok(h) => {
                        r.problems.push(format!("cache object {} is corrupted (content hashes to {})", &name[..12.min(name.len())], &h[..12]));
                        if repair {
                            let _ = std::fs::remove_file(&p);
                        }
                    }
                    Err(e) => r.problems.push(format!("cache object {name}: {e:#}")),
                }
            }
        }
    }
    // 2. State files parse; recorded outputs are on disk and in the cache.
    if let Ok(rd) = std::fs::read_dir(states.state_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if crate::util::atomic::is_temp_name(&name) {
                continue;
            }
            let parsed = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice::<crate::engine::state::StageState>(&b).ok());
            let Some(st) = parsed else {
                r.problems.push(format!("state file .dagrun/state/{name} is unreadable (the stage will rerun)"));
                continue;
            };
            r.stages_checked += 1;
            let memo = HashMemo::in_memory();
            for (path, o) in &st.outputs {
                if o.cached && !cas.restorable(&o.hash, o.dir) {
                    r.problems.push(format!("{}: output {path} has no intact copy in the cache", st.stage));
                }
                if o.sensitive {
                    continue;
                }
                match memo.hash_path(&workspace.join(path)) {
                    Ok(Some(h)) if h.hash == o.hash => {}
                    Ok(Some(_)) => r.problems.push(format!("{}: output {path} was modified since it was produced (the next run restores it)", st.stage)),
                    Ok(None) => r.problems.push(format!("{}: output {path} is missing (the next run restores it)", st.stage)),
                    Err(e) => r.problems.push(format!("{}: output {path}: {e:#}", st.stage)),
                }
            }
        }
    }
    // 3. Action-cache entries parse.
    if let Ok(rd) = std::fs::read_dir(states.actions_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if crate::util::atomic::is_temp_name(&name) {
                continue;
            }
            if std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice::<crate::engine::state::StageState>(&b).ok()).is_none() {
                r.problems.push(format!("action cache entry {name} is unreadable"));
                if repair {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(r)
}

/// `dagrun verify [--repair] [--json]`: print what [`verify`] found; exit 4 on
/// any problem.
pub fn run(workspace: &Path, repair: bool, json: bool) -> Result<i32> {
    let r = verify(workspace, repair)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for p in &r.problems {
            println!("problem: {p}");
        }
        println!("checked {} cache objects and {} stages: {} problems", r.objects_checked, r.stages_checked, r.problems.len());
    }
    Ok(if r.problems.is_empty() { crate::error::exit::OK } else { crate::error::exit::INTEGRITY })
}
