//! A short scheduler slice for the server's threads.
//!
//! On a machine whose cores are busy (the load generator on the same two
//! cores, a pipeline run beside the server), a request that arrives while
//! its worker thread waits for a core waits for whatever runs there to use
//! up its slice: Linux's EEVDF scheduler gives every task 3 ms by default,
//! which is most of a 5 ms p99 budget. Since Linux 6.12 a task may ask for a
//! shorter slice (`sched_attr.sched_runtime` of a `SCHED_OTHER` task, 0.1 to
//! 100 ms); a task with a shorter slice gets an earlier virtual deadline and
//! may preempt a task with a longer one when it wakes. It does not get more
//! CPU time than its fair share: only sooner, in smaller pieces.
//!
//! Rules:
//! - Only the calling thread's slice changes; its policy, nice value and
//!   every other attribute are read first and written back unchanged.
//! - Unprivileged; on an older kernel, another OS, or any error, nothing
//!   changes and the server runs as before (the call reports `false`).

/// The slice the server's threads ask for.
pub const SLICE: std::time::Duration = std::time::Duration::from_micros(300);

/// Ask for `slice` as the calling thread's scheduler slice. `true` when the
/// kernel took it.
#[cfg(target_os = "linux")]
pub fn request(slice: std::time::Duration) -> bool {
    /// `struct sched_attr` of sched_setattr(2) (SCHED_ATTR_SIZE_VER1).
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
        sched_util_min: u32,
        sched_util_max: u32,
    }
    const SIZE: u32 = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr { size: SIZE, ..Default::default() };
    // SAFETY: sched_getattr writes at most `SIZE` bytes into `attr`, a live,
    // properly aligned repr(C) struct of that size; pid 0 is this thread.
    let got = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, SIZE, 0) };
    if got != 0 || attr.sched_policy != libc::SCHED_OTHER as u32 {
        return false;
    }
    attr.size = SIZE;
    attr.sched_runtime = slice.as_nanos() as u64;
    // SAFETY: sched_setattr only reads `attr` (a valid struct of `SIZE`
    // bytes); pid 0 is this thread; flags 0.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) == 0 }
}

#[cfg(not(target_os = "linux"))]
pub fn request(_slice: std::time::Duration) -> bool {
    false
}

#[cfg(test)]
mod tests {
    /// On this kernel or not, the call never fails the caller and keeps the
    /// thread's nice value.
    #[test]
    fn keeps_the_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: getpriority/setpriority on this thread (PRIO_PROCESS with tid 0 = caller).
            let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            let _ = super::request(super::SLICE);
            let after = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!(before, after);
        })
        .join()
        .unwrap();
    }
}
