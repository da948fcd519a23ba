//! Process-wide tuning of the C allocator (glibc malloc, which Rust's global
//! allocator calls on Linux).
//!
//! Rule: one call, first thing in `main`, before any thread exists; nothing
//! here changes what the program computes, only how much memory it keeps.

/// Cap glibc's malloc arenas at the number of cores (glibc's default is 8
/// per core). Every thread that allocates gets an arena, and memory freed
/// in one arena is reused only by threads on that arena: a run starts short
/// scoped worker threads per stage and per tenant (`util::par`), and with
/// up to 16 arenas on 2 cores the memory a finished stage freed sat in
/// arenas the next stage's threads did not use, so the process kept it
/// (1M-row propensity run: peak RSS 144–171 MiB uncapped, 127–134 MiB capped
/// at 2 arenas, same CPU time). One arena per core keeps allocation free of
/// contention between the cores that can run at once.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 64) as libc::c_int;
        // SAFETY: mallopt only sets a tuning parameter of the allocator; it is
        // called before any other thread exists (first thing in main), and a
        // value it rejects is ignored (return value 0), never undefined.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, cores);
        }
    }
}
