//! Data parallelism inside a stage: split `0..n` into one contiguous chunk
//! per thread, run them on scoped threads, and account the workers' CPU time
//! to the stage that asked (so run records can report CPU utilisation per
//! stage): the engine sets a per-thread counter with [`account_to`].
//!
//! Rule: a stage takes only the cores no other running stage needs. The
//! engine marks each stage it runs in this process with [`running`];
//! [`threads`] is one thread plus the cores no running stage occupies. With
//! both workers of a 2-core machine busy every stage runs on one thread (two
//! threads each would only share the cores, and the thread count would decide
//! which tenant's chain gets the CPU, not the critical path); when one worker
//! has nothing left to run, the other's stages take both cores. Outside the
//! engine (nothing marked running) a caller gets every core.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

thread_local! {
    static STAGE_CPU: RefCell<Option<Arc<AtomicU64>>> = const { RefCell::new(None) };
}

/// Resets the calling thread's CPU counter when dropped.
pub struct Accounting(());

impl Drop for Accounting {
    fn drop(&mut self) {
        STAGE_CPU.with(|c| *c.borrow_mut() = None);
    }
}

/// Add the CPU time of worker threads started from this thread (by
/// [`map_chunks`]) to `counter`, until the guard is dropped.
pub fn account_to(counter: Arc<AtomicU64>) -> Accounting {
    STAGE_CPU.with(|c| *c.borrow_mut() = Some(counter));
    Accounting(())
}

/// Stages running in this process now (see [`running`]).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Marks one running stage until dropped.
pub struct Running(());

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Count the calling stage as running until the guard is dropped.
pub fn running() -> Running {
    RUNNING.fetch_add(1, Ordering::Relaxed);
    Running(())
}

/// The machine's cores.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
}

/// Threads a stage may use now: its own plus every core no other running
/// stage occupies (all cores when no stage is marked running).
pub fn threads() -> usize {
    threads_for(cores(), RUNNING.load(Ordering::Relaxed))
}

fn threads_for(cores: usize, running: usize) -> usize {
    cores.saturating_sub(running.saturating_sub(1)).max(1)
}

/// CPU time (user+sys) of the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    #[cfg(target_os = "linux")]
    // SAFETY: `timespec` is plain integers, so all-zero is a valid value;
    // clock_gettime only writes through the pointer, which points at that
    // live local for the whole call; CLOCK_THREAD_CPUTIME_ID needs no setup.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        if libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) == 0 {
            return ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        }
    }
    0
}

/// Apply `f` to contiguous chunks of `0..n` on up to `threads` threads
/// (at least `min_chunk` items each); results come back in order. Worker CPU
/// time goes to the counter set with [`account_to`], if any.
pub fn map_chunks<R, F>(n: usize, threads: usize, min_chunk: usize, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(Range<usize>) -> R + Sync,
{
    let t = threads.max(1).min(n.div_ceil(min_chunk.max(1)).max(1));
    if t == 1 {
        return vec![f(0..n)];
    }
    let chunk = n.div_ceil(t);
    let counter = STAGE_CPU.with(|c| c.borrow().clone());
    let cpu_ns = counter.as_deref();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..t)
            .map(|i| {
                let f = &f;
                s.spawn(move || {
                    let start = thread_cpu_ns();
                    let r = f((i * chunk).min(n)..((i + 1) * chunk).min(n));
                    if let Some(c) = cpu_ns {
                        c.fetch_add(thread_cpu_ns().saturating_sub(start), Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_range_in_order() {
        let cpu = Arc::new(AtomicU64::new(0));
        let _g = account_to(cpu.clone());
        let parts = map_chunks(10_001, 3, 10, |r| r.collect::<Vec<_>>());
        let all: Vec<usize> = parts.into_iter().flatten().collect();
        assert_eq!(all, (0..10_001).collect::<Vec<_>>());
        assert_eq!(map_chunks(5, 4, 100, |r| r.len()), vec![5]);
        assert_eq!(map_chunks(0, 4, 1, |r| r.len()), vec![0]);
        let busy =
            map_chunks(4_000, 2, 1, |r| r.map(|i| (0..2_000u64).fold(i as u64, |a, b| a.wrapping_mul(31).wrapping_add(b))).fold(0u64, u64::wrapping_add));
        assert_eq!(busy.len(), 2);
        assert!(cpu.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_stage_takes_the_cores_no_other_stage_runs_on() {
        assert_eq!(threads_for(2, 0), 2); // outside the engine: every core
        assert_eq!(threads_for(2, 1), 2); // the only running stage
        assert_eq!(threads_for(2, 2), 1); // both workers busy
        assert_eq!(threads_for(2, 5), 1);
        assert_eq!(threads_for(8, 3), 6);
        assert_eq!(threads_for(1, 0), 1);
    }
}
