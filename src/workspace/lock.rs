//! The workspace lock: two overlapping runs never interleave.
//!
//! `.dagrun/lock` is held with an OS file lock (`flock`), which the kernel
//! releases when the holder exits, however it dies: a lock left by a killed
//! process is simply free again. The file's content names the holder (pid,
//! command, start time) for the message the second run prints.

use crate::error::Failure;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// A held workspace lock; released on drop.
pub struct WorkspaceLock {
    file: File,
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

fn holder(file: &mut File) -> String {
    // The holder writes its name just after taking the lock: a run that
    // looks in between finds the file empty, so look again briefly.
    for _ in 0..20 {
        let mut s = String::new();
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.read_to_string(&mut s);
        let s = s.trim();
        if !s.is_empty() {
            return s.to_string();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    "another dagrun process".to_string()
}

/// Take the lock of `dagrun_dir`, waiting up to `wait` (None: fail at once).
pub fn acquire(dagrun_dir: &Path, wait: Option<Duration>, what: &str) -> Result<WorkspaceLock> {
    std::fs::create_dir_all(dagrun_dir).with_context(|| format!("cannot create {}", dagrun_dir.display()))?;
    let path = dagrun_dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the workspace lock {}", path.display()))?;
    let start = Instant::now();
    let mut announced = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                let who = holder(&mut file);
                match wait {
                    Some(w) if start.elapsed() < w => {
                        if !announced {
                            tracing::info!("workspace is locked by {who}; waiting up to {}s", w.as_secs_f64());
                            announced = true;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Some(w) => {
                        return Err(Failure::Locked(format!(
                            "the workspace {} is still locked by {who} after waiting {}s; try again later",
                            dagrun_dir.parent().unwrap_or(dagrun_dir).display(),
                            w.as_secs_f64()
                        ))
                        .into());
                    }
                    None => {
                        return Err(Failure::Locked(format!(
                            "the workspace {} is locked by {who}; wait for it to finish, or pass --wait SECONDS",
                            dagrun_dir.parent().unwrap_or(dagrun_dir).display()
                        ))
                        .into());
                    }
                }
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
    }
    let info = format!("pid {} ({what}, started {})", std::process::id(), chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(info.as_bytes())?;
    Ok(WorkspaceLock { file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_then_succeeds_after_release() {
        let d = tempfile::tempdir().unwrap();
        let l = acquire(d.path(), None, "test").unwrap();
        let err = acquire(d.path(), None, "test2").err().unwrap();
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        assert_eq!(crate::error::exit_code_of(&err), crate::error::exit::LOCKED);
        drop(l);
        acquire(d.path(), Some(Duration::from_millis(10)), "test3").unwrap();
    }
}
