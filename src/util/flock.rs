//! Short-lived file locks (`flock`) taken with a bound on the wait.
//!
//! Rules:
//! - The locks taken here guard a few writes and reads that last well under a
//!   second: the key audit log (`.dagrun/keys/audit.jsonl`, exclusive to
//!   append, shared to verify) and the keyring (`.dagrun/keys/keyring.lock`).
//!   A process that holds one longer is stuck or hostile (Linux grants an
//!   exclusive `flock` on a read-only descriptor: whoever can open the file
//!   can hold it, review 23).
//! - So nobody waits on them forever: after [`ANNOUNCE_AFTER`] the wait is
//!   logged once (the file named), and after [`SHORT_LOCK_WAIT`] the command
//!   fails with [`Failure::Locked`] (exit 75, like a locked workspace: try
//!   again later), naming the file and how to find the holder, having changed
//!   nothing. A nightly cron job reports the stall instead of hanging.
//! - The workspace lock (`.dagrun/lock`) is not taken here: a run holds it
//!   for its whole length and `run --wait` chooses how long to wait for it
//!   (`workspace::lock`).

use crate::error::Failure;
use anyhow::{Context, Result};
use std::fs::{File, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a short-lived lock is waited for before the command gives up.
pub const SHORT_LOCK_WAIT: Duration = Duration::from_secs(60);

/// How long a wait lasts before it is logged.
pub const ANNOUNCE_AFTER: Duration = Duration::from_secs(1);

/// Which kind of `flock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Exclusive,
    Shared,
}

/// Lock `file` (opened from `path`) in `mode`, waiting at most [`SHORT_LOCK_WAIT`].
pub fn lock_short(file: &File, path: &Path, mode: Mode) -> Result<()> {
    lock_within(file, path, mode, SHORT_LOCK_WAIT)
}

/// Lock `file` (opened from `path`, which only names it in messages) in
/// `mode`, waiting at most `wait` (see the module's rules).
pub fn lock_within(file: &File, path: &Path, mode: Mode, wait: Duration) -> Result<()> {
    let start = Instant::now();
    let mut announced = false;
    let mut pause = Duration::from_millis(1);
    loop {
        let tried = match mode {
            Mode::Exclusive => file.try_lock(),
            Mode::Shared => file.try_lock_shared(),
        };
        match tried {
            Ok(()) => return Ok(()),
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
            Err(TryLockError::WouldBlock) => {}
        }
        let waited = start.elapsed();
        if waited >= wait {
            return Err(Failure::Locked(format!(
                "cannot lock {}: another process has held it for {:.0}s, and it is held only for moments by key operations; \
                 find the holder with `fuser -v {}` (or `lsof {}`), stop it, and try again",
                path.display(),
                waited.as_secs_f64(),
                path.display(),
                path.display()
            ))
            .into());
        }
        if !announced && waited >= ANNOUNCE_AFTER {
            tracing::info!("waiting for the lock of {} (held by another process; giving up after {}s)", path.display(), wait.as_secs());
            announced = true;
        }
        std::thread::sleep(pause.min(wait.saturating_sub(waited)));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_elsewhere_is_waited_for_then_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"").unwrap();
        // Two open file descriptions conflict even in one process (flock).
        let holder = File::open(&path).unwrap();
        holder.lock().unwrap();
        let other = File::open(&path).unwrap();
        let start = Instant::now();
        let e = lock_within(&other, &path, Mode::Shared, Duration::from_millis(200)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(matches!(e.downcast_ref::<Failure>(), Some(Failure::Locked(_))), "{e:#}");
        let msg = format!("{e:#}");
        assert!(msg.contains(&path.display().to_string()) && msg.contains("fuser"), "{msg}");
        assert!(lock_within(&other, &path, Mode::Exclusive, Duration::from_millis(50)).is_err());

        // Released while waiting: taken.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(holder);
        });
        lock_within(&other, &path, Mode::Exclusive, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        // Shared locks do not exclude each other.
        let third = File::open(&path).unwrap();
        other.unlock().unwrap();
        other.lock_shared().unwrap();
        lock_within(&third, &path, Mode::Shared, Duration::from_millis(10)).unwrap();
    }
}
