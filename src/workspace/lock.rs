//! The workspace lock: two overlapping runs never interleave.
//!
//! `.dagrun/lock` is held with an OS file lock (`flock`), which the kernel
//! releases when the holder exits, however it dies: a lock left by a killed
//! process is simply free again. The file's content names the holder (pid,
//! command, start time) for the message the second run prints.
//!
//! Every command that takes the lock without waiting (`wait` None: exit 75 at
//! once) accepts `--wait SECONDS`, which that message suggests: `run`, `gc`,
//! `pull`, `verify --repair`, the `keys` commands that write. `models
//! promote|rollback` wait 10 s unless told otherwise, `tokens create|revoke`
//! 10 s; `push` only reads and takes no lock.
//!
//! # Clean release: the sweep mark
//! The content also says whether the last holder ended cleanly, so that a run
//! sweeps temporary files of killed writers (`engine::sweep`) only when there
//! can be some (listing every cache folder and run record on every run was
//! ~9 % of a no-op run of 200 stages):
//! - a holder that ends normally (error returns and panics unwind too, and
//!   every `util::atomic` temp file is removed when its writer is dropped)
//!   replaces the content with `released BOOT_ID` (the kernel's
//!   `/proc/sys/kernel/random/boot_id`);
//! - a holder that dies without unwinding (SIGKILL, abort, OOM kill) leaves
//!   its `pid …` line; an empty file (dagrun before this mark) or a mark of
//!   another boot (a power cut or crash: the mark is not fsynced, and a temp
//!   file not yet written back may still have reached the disk) counts as
//!   unclean too: [`WorkspaceLock::found_unclean`];
//! - an unclean mark stays until a run has swept ([`WorkspaceLock::swept`]):
//!   other commands that take the lock and end cleanly leave it as they found
//!   it; a holder whose own writers may have died out of process (Slurm jobs)
//!   calls [`WorkspaceLock::keep_unclean`].
//!
//! # Run marks: the processes a killed holder left
//! A holder's second line, `marks M …`, holds the marks it found in an
//! unclean lock (carried until a run has swept, at most [`MAX_MARKS`]) and,
//! for `dagrun run` ([`acquire_run`]: only runs start stage commands), a
//! random mark of its own first ([`run_mark`], which every `cmd` stage's
//! process gets as `DAGRUN_RUN_MARK`, and its children inherit): killed
//! `gc`s cannot push a killed run's mark out. Each is written `MARK@DEV:INODE`,
//! bound to the workspace folder: marks in a lock copied with its workspace
//! (`cp -a`, a backup restored into another folder, `mv ws old; cp -a old ws`)
//! are another folder's and ignored, since their run may be alive there. A
//! holder that ends without a clean mark leaves only the carried ones (its
//! own processes are not a killed run's). A run
//! that finds the lock unclean stops the processes that still carry one of
//! those marks ([`WorkspaceLock::dead_marks`], [`super::orphans`]) before it
//! sweeps: a killed run's stage command dies with it (`PR_SET_PDEATHSIG`),
//! but what that command started does not. The content is untrusted: only
//! 32-hex-digit words are taken as marks.

use crate::error::Failure;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// A held workspace lock; released on drop.
pub struct WorkspaceLock {
    file: File,
    /// The last holder did not end cleanly (see the module doc).
    found_unclean: bool,
    /// Not swept yet (leave the unclean mark when released).
    unclean: std::cell::Cell<bool>,
    /// [`WorkspaceLock::keep_unclean`] was called.
    keep: std::cell::Cell<bool>,
    /// [`WorkspaceLock::keep_own_marks`] was called.
    own: std::cell::Cell<bool>,
    boot_id: Option<String>,
    /// Marks of holders that died (only when `found_unclean`).
    dead_marks: Vec<String>,
    /// The holder's line (pid, command, start).
    info: String,
    /// The workspace folder's identity its marks are bound to.
    folder: Option<String>,
}

/// Most marks a lock carries (holders that died in a row without a sweep).
pub const MAX_MARKS: usize = 16;
/// The variable a `cmd` stage's process gets this run's mark in.
pub const RUN_MARK_ENV: &str = "DAGRUN_RUN_MARK";

/// This process's run mark: 32 random hex digits, the same for its life.
pub fn run_mark() -> &'static str {
    static MARK: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARK.get_or_init(|| {
        use rand::TryRng;
        let mut b = [0u8; 16];
        if rand::rngs::SysRng.try_fill_bytes(&mut b).is_err() {
            // Unique is enough (it names, it does not guard): pid and time.
            let mut h = blake3::Hasher::new();
            h.update(&std::process::id().to_le_bytes());
            h.update(&chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0).to_le_bytes());
            b.copy_from_slice(&h.finalize().as_bytes()[..16]);
        }
        hex::encode(b)
    })
}

/// A mark for one attempt of a `cmd` stage: `RUN_MARK.N`, N counting this
/// process's attempts. Stopping the run's mark stops it too (`super::orphans`).
pub fn attempt_mark() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}.{}", run_mark(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The identity of the workspace folder (`DEV:INODE`) its marks are bound to.
fn folder_id(dagrun_dir: &Path) -> Option<String> {
    let (dev, ino) = super::folder_id(dagrun_dir.parent()?)?;
    Some(format!("{dev}:{ino}"))
}

/// The marks in a lock's content bound to folder `id` (its `marks` line,
/// words `MARK@DEV:INODE`; anything else ignored).
fn marks_in(content: &str, id: &str) -> Vec<String> {
    content
        .lines()
        .filter_map(|l| l.strip_prefix("marks "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.split_once('@').filter(|(m, at)| *at == id && crate::util::is_lower_hex(m, 32)).map(|(m, _)| m.to_string()))
        .take(MAX_MARKS)
        .collect()
}

/// The `marks` line of `marks` bound to folder `id` (none without an id).
fn marks_line(marks: &[String], id: Option<&str>) -> String {
    match id {
        Some(id) if !marks.is_empty() => format!("marks {}\n", marks.iter().map(|m| format!("{m}@{id}")).collect::<Vec<_>>().join(" ")),
        _ => String::new(),
    }
}

/// Prefix of the content a clean release leaves.
const RELEASED: &str = "released ";

/// This boot's id (None where the kernel does not say: every release then
/// counts as unclean, and every run sweeps).
fn boot_id() -> Option<String> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let s = s.trim();
    (!s.is_empty() && s.len() <= 64).then(|| s.to_string())
}

impl WorkspaceLock {
    /// The previous holder died without unwinding, or the machine restarted
    /// since: temporary files of killed writers may exist; sweep them.
    pub fn found_unclean(&self) -> bool {
        self.found_unclean
    }

    /// The run marks of the holders that died without unwinding since the
    /// last sweep (empty when the lock was found clean).
    pub fn dead_marks(&self) -> &[String] {
        &self.dead_marks
    }

    /// The temporary files of killed writers are swept: a clean end of this
    /// holder may now leave a clean mark.
    pub fn swept(&self) {
        self.unclean.set(false);
    }

    /// This holder's writers may die out of process (Slurm jobs): leave the
    /// unclean mark, so the next run sweeps (even after [`WorkspaceLock::swept`]).
    pub fn keep_unclean(&self) {
        self.keep.set(true);
    }

    /// Processes this run's commands started may still run (an attempt's
    /// leftovers that did not stop: `super::orphans::stop_attempt`): leave
    /// the unclean mark with this run's own mark among the dead ones, so the
    /// next run stops them before it sweeps.
    pub fn keep_own_marks(&self) {
        self.keep.set(true);
        self.own.set(true);
    }
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        use std::os::unix::fs::FileExt;
        if !self.unclean.get()
            && !self.keep.get()
            && let Some(b) = &self.boot_id
        {
            // Cut first: a death in between leaves an empty file (unclean).
            let _ = self.file.set_len(0);
            let _ = self.file.write_all_at(format!("{RELEASED}{b}\n").as_bytes(), 0);
        } else {
            // Ended, but unclean (not swept, or kept so): its own processes are
            // not a killed run's (unless some of an attempt's did not stop);
            // the dead holders' marks stay until a sweep.
            let mut marks: Vec<String> = self.own.get().then(|| run_mark().to_string()).into_iter().collect();
            if self.unclean.get() {
                marks.extend(self.dead_marks.iter().cloned());
            }
            marks.truncate(MAX_MARKS);
            let carried = marks_line(&marks, self.folder.as_deref());
            let content = format!("{}\n{carried}", self.info);
            let _ = self.file.set_len(0);
            let _ = self.file.write_all_at(content.as_bytes(), 0);
        }
        let _ = self.file.unlock();
    }
}

fn holder(file: &mut File) -> String {
    // The holder writes its name just after taking the lock: a run that
    // looks in between finds the file empty (or a release mark), so look
    // again briefly.
    for _ in 0..20 {
        let mut s = String::new();
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.read_to_string(&mut s);
        let s = s.lines().next().unwrap_or("").trim();
        if !s.is_empty() && !s.starts_with(RELEASED) {
            return s.to_string();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    "another dagrun process".to_string()
}

/// What [`probe`] found.
pub enum Probe {
    /// No one holds the lock. The guard (None: there is no lock file yet)
    /// holds it shared until dropped: no holder can start meanwhile.
    Free(Option<File>),
    /// Held, by whom (the holder's line), and whether that is a run
    /// ([`RUN_HOLDER`]: the one holder that makes plaintext).
    Held { who: String, run: bool },
}

/// What `dagrun run` names itself as, holding the lock (`dagrun run PIPELINE`).
pub const RUN_HOLDER: &str = "dagrun run";

/// For a command that reads without taking the lock (`verify`): is a holder
/// (a run) at work right now? Probed with a shared `flock`, which writes
/// nothing and leaves the sweep mark alone; drop the guard at once (a run
/// starting while it is held fails, or waits with `--wait`).
pub fn probe(dagrun_dir: &Path) -> Result<Probe> {
    let path = dagrun_dir.join("lock");
    let mut file = match crate::util::nofollow::open_own_file(OpenOptions::new().read(true), &path) {
        Ok(f) => f,
        Err(_) if path.symlink_metadata().is_err() => return Ok(Probe::Free(None)),
        Err(e) => return Err(e.context("cannot check whether a run holds the workspace lock")),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Probe::Free(Some(file))),
        Err(std::fs::TryLockError::WouldBlock) => {
            let who = holder(&mut file);
            let run = who.contains(&format!("({RUN_HOLDER} "));
            Ok(Probe::Held { who, run })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::Error::from(e).context(format!("cannot lock {}", path.display()))),
    }
}

/// Take the lock of `dagrun_dir`, waiting up to `wait` (None: fail at once).
pub fn acquire(dagrun_dir: &Path, wait: Option<Duration>, what: &str) -> Result<WorkspaceLock> {
    acquire_as(dagrun_dir, wait, what, false)
}

/// [`acquire`] for `dagrun run`: the lock also names this process's run mark.
pub fn acquire_run(dagrun_dir: &Path, wait: Option<Duration>, what: &str) -> Result<WorkspaceLock> {
    acquire_as(dagrun_dir, wait, what, true)
}

fn acquire_as(dagrun_dir: &Path, wait: Option<Duration>, what: &str, runs_commands: bool) -> Result<WorkspaceLock> {
    if let Some(root) = dagrun_dir.parent() {
        super::own_dirs::check(root)?;
    }
    std::fs::create_dir_all(dagrun_dir).with_context(|| format!("cannot create {}", dagrun_dir.display()))?;
    let path = dagrun_dir.join("lock");
    let mut file = crate::util::nofollow::open_own_file(OpenOptions::new().read(true).write(true).create(true).truncate(false), &path)
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
    let boot_id = boot_id();
    // From the start: waiting for the lock read the holder's line, which left
    // the position at its end (review 22: every run that had waited found
    // the lock unclean and swept temporary files of live writers).
    let mut previous = String::new();
    file.seek(SeekFrom::Start(0))?;
    let _ = file.read_to_string(&mut previous);
    let found_unclean = match &boot_id {
        Some(b) => previous.trim().strip_prefix(RELEASED) != Some(b.as_str()),
        None => true,
    };
    // A release mark of another boot carries no marks: its processes are gone.
    // Its own mark is never a dead one (a process that takes the lock twice).
    // Marks bound to another folder came with a copy (`cp -a`, a backup
    // restored elsewhere): their run may be alive in the original.
    let folder = folder_id(dagrun_dir);
    let dead_marks: Vec<String> = match (&folder, found_unclean) {
        (Some(id), true) => marks_in(&previous, id).into_iter().filter(|m| m != run_mark()).collect(),
        _ => Vec::new(),
    };
    let mut marks: Vec<String> = runs_commands.then(|| run_mark().to_string()).into_iter().collect();
    let room = MAX_MARKS - marks.len();
    marks.extend(dead_marks.iter().take(room).cloned());
    let info = format!("pid {} ({what}, started {})", std::process::id(), chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    let content = format!("{info}\n{}", marks_line(&marks, folder.as_deref()));
    file.write_all(content.as_bytes())?;
    Ok(WorkspaceLock {
        file,
        found_unclean,
        unclean: std::cell::Cell::new(found_unclean),
        keep: std::cell::Cell::new(false),
        own: std::cell::Cell::new(false),
        boot_id,
        dead_marks,
        info,
        folder,
    })
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

    #[test]
    fn only_a_holder_that_died_or_a_restart_leaves_the_lock_unclean() {
        let d = tempfile::tempdir().unwrap();
        // No mark yet (a new workspace, or one of an older dagrun): unclean.
        let l = acquire(d.path(), None, "a").unwrap();
        assert!(l.found_unclean());
        // Not swept: a clean end keeps it unclean.
        drop(l);
        let l = acquire(d.path(), None, "b").unwrap();
        assert!(l.found_unclean());
        l.swept();
        drop(l);
        let l = acquire(d.path(), None, "c").unwrap();
        assert!(!l.found_unclean(), "a clean release after a sweep");
        // A holder that dies without unwinding (no drop) leaves its line. (The
        // forgotten handle keeps its flock in this process: look at the line
        // in a copy of the folder.)
        std::mem::forget(l);
        let held = std::fs::read_to_string(d.path().join("lock")).unwrap();
        assert!(held.starts_with("pid "), "{held}");
        let fresh = tempfile::tempdir().unwrap();
        std::fs::write(fresh.path().join("lock"), &held).unwrap();
        let l = acquire(fresh.path(), None, "d").unwrap();
        assert!(l.found_unclean(), "a holder killed while it held the lock");
        l.swept();
        drop(l);
        // A release mark of another boot (a power cut since): unclean.
        let mark = std::fs::read_to_string(fresh.path().join("lock")).unwrap();
        assert!(mark.starts_with(RELEASED), "{mark}");
        std::fs::write(fresh.path().join("lock"), "released 00000000-0000-0000-0000-000000000000\n").unwrap();
        let l = acquire(fresh.path(), None, "e").unwrap();
        assert!(l.found_unclean());
        // A holder whose writers may die out of process keeps it unclean.
        l.keep_unclean();
        l.swept();
        drop(l);
        assert!(acquire(fresh.path(), None, "f").unwrap().found_unclean());
    }

    /// Review 22: a run that waited for the lock read the previous holder's
    /// mark from where waiting left the file position (its end) and found
    /// nothing, so a clean release counted as unclean.
    #[test]
    fn a_clean_release_is_clean_for_a_run_that_waited() {
        let d = tempfile::tempdir().unwrap();
        let l = acquire(d.path(), None, "a").unwrap();
        l.swept();
        drop(l);
        let l = acquire(d.path(), None, "b").unwrap();
        assert!(!l.found_unclean());
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(l);
        });
        let waited = acquire(d.path(), Some(Duration::from_secs(10)), "c").unwrap();
        releaser.join().unwrap();
        assert!(!waited.found_unclean(), "a clean release, seen by a run that waited for it");
    }

    /// The marks of a holder that died are handed to the next holder, carried
    /// by holders that do not sweep, and dropped once a run has swept; the
    /// file is untrusted: only mark-shaped words count, at most MAX_MARKS.
    #[test]
    fn a_dead_holders_marks_reach_the_run_that_sweeps() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210");
        let id = folder_id(d.path()).unwrap();
        let other = "0123456789abcdef0123456789abcde0";
        std::fs::write(
            d.path().join("lock"),
            format!("pid 1 (dagrun run p.yaml, started x)\nmarks {a}@{id} {b}@{id} {other}@1:2 {other} ../etc@{id} ABCDEF0123456789ABCDEF0123456789@{id} {a}x@{id}\n"),
        )
        .unwrap();
        let l = acquire(d.path(), None, "gc").unwrap();
        assert_eq!(l.dead_marks(), [a, b]);
        let line = std::fs::read_to_string(d.path().join("lock")).unwrap();
        assert_eq!(
            line.lines().nth(1).unwrap(),
            format!("marks {a}@{id} {b}@{id}"),
            "a holder that runs no command adds no mark; another folder's are dropped"
        );
        // The message of a second run shows the holder, not its marks.
        let err = acquire(d.path(), None, "other").err().unwrap().to_string();
        assert!(err.contains("(gc, started") && !err.contains("marks"), "{err}");
        drop(l); // not swept: the marks stay for the run that sweeps, not its own
        assert_eq!(std::fs::read_to_string(d.path().join("lock")).unwrap().lines().nth(1).unwrap(), format!("marks {a}@{id} {b}@{id}"));
        let l = acquire_run(d.path(), None, "run").unwrap();
        assert_eq!(l.dead_marks(), [a, b]);
        let line = std::fs::read_to_string(d.path().join("lock")).unwrap();
        assert_eq!(line.lines().nth(1).unwrap(), format!("marks {}@{id} {a}@{id} {b}@{id}", run_mark()), "a run names its own mark first");
        assert!(!l.dead_marks().iter().any(|m| m == run_mark()), "its own mark is not a dead one");
        l.swept();
        drop(l);
        let l = acquire_run(d.path(), None, "next").unwrap();
        assert!(!l.found_unclean() && l.dead_marks().is_empty());
        // A holder that keeps the lock unclean (Slurm) but ended names no process.
        l.keep_unclean();
        drop(l);
        let l = acquire(d.path(), None, "after-slurm").unwrap();
        assert!(l.found_unclean() && l.dead_marks().is_empty(), "{:?}", l.dead_marks());
        drop(l);
        let many: Vec<String> = (0..40).map(|i| format!("{i:032x}@{id}")).collect();
        std::fs::write(d.path().join("lock"), format!("pid 1 (x)\nmarks {}\n", many.join(" "))).unwrap();
        assert_eq!(acquire(d.path(), None, "y").unwrap().dead_marks().len(), MAX_MARKS);
        // The same lock in a copy of the workspace (another folder): no dead marks.
        let copy = tempfile::tempdir().unwrap();
        let copy_dir = copy.path().join(".dagrun");
        std::fs::create_dir(&copy_dir).unwrap();
        std::fs::write(copy_dir.join("lock"), format!("pid 1 (x)\nmarks {a}@{id}\n")).unwrap();
        let l = acquire_run(&copy_dir, None, "in the copy").unwrap();
        assert!(l.found_unclean() && l.dead_marks().is_empty(), "{:?}", l.dead_marks());
    }
}
