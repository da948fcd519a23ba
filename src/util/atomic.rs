//! Crash-safe file writes: write to a temporary file in the destination's
//! directory, fsync it, rename it over the destination. A reader (or a run
//! after a SIGKILL) sees either the old file or the new one, never a torn mix.
//!
//! How much is flushed is chosen per kind of file ([`Durability`]): files
//! are fsynced before the rename; key material and run
//! records also fsync the directory (the rename itself survives a power cut);
//! cache objects, cache metadata and per-stage state records are not fsynced
//! one by one, because every use verifies them (by hash, by MAC) and a lost
//! or torn one only costs a recomputation. A run makes its state records and
//! outputs durable in one batch at its end ([`sync_files`]), before it writes
//! the hash memo and its run record: see `workspace::state` for why that is
//! as safe as one fsync per record. The outputs a built-in stage writes
//! in the run's own process join that batch too: the engine runs the stage
//! under [`defer_sync_of`] its outputs, so their writes skip the per-file
//! fsync (`Content` becomes `Verified` for those paths only; the same
//! argument holds, since outputs are trusted only by hash), and plaintext
//! outputs, deleted when the run ends, are never flushed at all. So that
//! batch does not wait for the disk at the end, the engine starts each large
//! output's writeback as soon as its stage is recorded ([`start_writeback`],
//! a background thread, never for plaintext): the device writes while later
//! stages compute, and the batch only confirms.
//!
//! Temporary files are named `.NAME.dagrun-tmp.PID.N`; [`is_temp_name`] lets
//! the engine sweep leftovers of killed runs (they may hold plaintext).

use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static DEFERRED: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Clears the calling thread's deferred paths when dropped.
pub struct DeferredSync(());

impl Drop for DeferredSync {
    fn drop(&mut self) {
        DEFERRED.with(|d| d.borrow_mut().clear());
    }
}

/// Until the guard is dropped, `Content` writes on this thread to one of
/// `paths` (or below one of them, for folder outputs) are not fsynced one
/// by one: the caller promises to make them durable in one batch later
/// ([`sync_files`]; the engine's end-of-run sync). Writes elsewhere (the
/// model registry, keys, records) keep their own durability.
pub fn defer_sync_of(paths: Vec<PathBuf>) -> DeferredSync {
    DEFERRED.with(|d| *d.borrow_mut() = paths);
    DeferredSync(())
}

fn is_deferred(dest: &Path) -> bool {
    DEFERRED.with(|d| d.borrow().iter().any(|p| dest.starts_with(p)))
}

/// Marker that every temporary file name contains.
pub const TEMP_MARKER: &str = ".dagrun-tmp.";

/// True when `name` is a temporary file left by [`AtomicFile`].
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

/// A fresh temporary path beside `dest`, named as [`is_temp_name`] knows
/// (swept after a killed run, never listed or cached).
pub fn temp_path_for(dest: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dest.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    dest.with_file_name(format!(".{name}{TEMP_MARKER}{}.{n}", std::process::id()))
}

/// Remove dagrun's temporary files in `dir` for destinations named `*.{ext}`
/// (or named `ext` itself) that nothing has written to for `age`: what a
/// writer stopped by SIGKILL left where no sweep after an unclean lock looks
/// (`report` writes `runs/RUN.html` and `sample` its `--out` file without the
/// workspace lock). By age, not by process id: the writer may be on another
/// host sharing the folder.
pub fn sweep_stale_temp_files(dir: &Path, ext: &str, age: std::time::Duration) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let suffix = format!(".{ext}{TEMP_MARKER}");
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(is_temp_name(&name) && name.contains(&suffix)) {
            continue;
        }
        let stale = e.metadata().ok().filter(fs::Metadata::is_file).and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok()).is_some_and(|d| d >= age);
        if stale {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// What [`AtomicFile::commit`] flushes before and after the rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// No fsync: content verified by hash on every use (cache objects, memo).
    Verified,
    /// fsync the file before the rename (outputs, state files).
    Content,
    /// fsync the file, rename, fsync the directory (keys, run records).
    Full,
}

/// A file being written atomically. Dropped without [`AtomicFile::commit`],
/// the temporary file is removed and the destination is untouched.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    durability: Durability,
}

impl AtomicFile {
    /// Start writing `dest` (its parent directories are created).
    pub fn create(dest: &Path) -> Result<Self> {
        Self::open(dest, None, Durability::Content)
    }

    /// Like [`AtomicFile::create`] with the given durability.
    pub fn create_with(dest: &Path, durability: Durability) -> Result<Self> {
        Self::open(dest, None, durability)
    }

    /// Like [`AtomicFile::create`] for plaintext PII: the temporary file (and
    /// so the file renamed into place) is mode 0600 from its first byte.
    pub fn create_private(dest: &Path) -> Result<Self> {
        Self::open(dest, Some(0o600), Durability::Content)
    }

    /// Like [`AtomicFile::create`], with Unix permission bits (e.g. 0o600) set
    /// on the temporary file before any byte is written, and full durability.
    pub fn create_with_mode(dest: &Path, mode: Option<u32>) -> Result<Self> {
        Self::open(dest, mode, Durability::Full)
    }

    fn open(dest: &Path, mode: Option<u32>, durability: Durability) -> Result<Self> {
        Self::open_buffered(dest, mode, durability, 1 << 20)
    }

    /// Like [`AtomicFile::create_with`] with no write buffer: for callers
    /// that write whole buffers (a small record, a copy loop), so no
    /// 1 MiB buffer is allocated (and mapped, and unmapped) per file.
    pub fn create_unbuffered(dest: &Path, durability: Durability) -> Result<Self> {
        Self::open_buffered(dest, None, durability, 0)
    }

    fn open_buffered(dest: &Path, mode: Option<u32>, durability: Durability, capacity: usize) -> Result<Self> {
        if let Some(parent) = dest.parent()
            && !parent.as_os_str().is_empty()
        {
            fs::create_dir_all(parent).with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        let tmp = temp_path_for(dest);
        let durability = if durability == Durability::Content && is_deferred(dest) { Durability::Verified } else { durability };
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode.unwrap_or(0o644));
        }
        let file = opts.open(&tmp).with_context(|| format!("cannot write {} (creating its temporary file {} failed)", dest.display(), tmp.display()))?;
        Ok(AtomicFile { dest: dest.to_path_buf(), tmp, file: Some(BufWriter::with_capacity(capacity, file)), durability })
    }

    /// Path of the temporary file (for writers that need a `File`).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// The buffered writer.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.file.as_mut().expect("AtomicFile used after commit")
    }

    /// Flush, fsync, rename over the destination and fsync the directory.
    /// On any failure the temporary file is removed (a full disk must not
    /// stay full of half-written temporaries) and the destination is untouched.
    pub fn commit(mut self) -> Result<()> {
        let w = self.file.take().expect("AtomicFile committed twice");
        let durability = self.durability;
        let res = (|| {
            let file = w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", self.dest.display()))?;
            if durability != Durability::Verified {
                file.sync_all().with_context(|| format!("cannot write {} (fsync failed)", self.dest.display()))?;
            }
            drop(file);
            fs::rename(&self.tmp, &self.dest).with_context(|| format!("cannot move a finished write into place at {}", self.dest.display()))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        res?;
        if durability == Durability::Full {
            sync_parent(&self.dest);
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.file = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// fsync the directory holding `path`, so a rename survives a power cut.
pub fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

/// Make `paths` (files or folders below `root`) durable in one batch:
/// writeback of every file is started first (`sync_file_range`), then every
/// file and every distinct parent folder (so renames into them last too) is
/// fsynced, from up to 16 threads at once: a journalling file system groups
/// concurrent fsyncs into a few commits, so the batch costs a few fsyncs, not
/// one per file, and unlike `syncfs` it never waits for other programs'
/// writes. The walk that opens the files (two opens and two `fstat`s each:
/// for a few hundred small files, most of the batch's time) is shared out
/// among the cores (at most [`SYNC_WALK_THREADS_MAX`] threads, each with a
/// contiguous run of at least [`SYNC_WALK_MIN`] paths sorted by folder). A
/// folder in `paths` is synced with everything below it. Paths that no
/// longer exist are skipped; at most [`SYNC_OPEN_MAX`] files and folders are
/// held open for the fsyncs at once, whatever the number of paths and
/// folders (a folder output of many thousand files cannot exhaust the
/// descriptors), plus the folders each thread's walk is inside; anything
/// that could not be flushed (no descriptor left, a folder deeper than the
/// walk goes, a link on the way that leads out of the workspace) is an
/// error, after everything else was flushed. Below `root` the walk follows
/// no symlink ([`walk_nofollow`]): a link or FIFO swapped in by a command is
/// neither followed (to a plaintext file, say) nor opened. A folder on the
/// way that is a link the pipeline allows (one inside the workspace) is
/// resolved first, and the walk starts from where it leads; `root` itself,
/// and a path outside it, is reached as the user named it.
pub fn sync_files<P: AsRef<Path>>(root: &Path, paths: &[P]) -> Result<()> {
    // By folder: each is opened once (by each thread its entries go to) and
    // fsynced after its entries were opened.
    let mut by_dir: std::collections::BTreeMap<(&Path, &Path), Vec<&std::ffi::OsStr>> = std::collections::BTreeMap::new();
    for p in paths {
        let p = p.as_ref();
        let (base, rel) = match p.strip_prefix(root) {
            Ok(rel) if !rel.as_os_str().is_empty() => (root, rel),
            _ => match (p.parent(), p.file_name()) {
                (Some(dir), Some(name)) => (dir, Path::new(name)),
                _ => continue,
            },
        };
        if let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) {
            by_dir.entry((base, parent)).or_default().push(name);
        }
    }
    let failed: std::sync::Mutex<Option<anyhow::Error>> = std::sync::Mutex::new(None);
    let fail = |e: anyhow::Error| {
        failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
    };
    let groups: Vec<((&Path, &Path), Vec<&std::ffi::OsStr>)> = by_dir.into_iter().collect();
    let entries: Vec<(usize, &std::ffi::OsStr)> = groups.iter().enumerate().flat_map(|(g, (_, names))| names.iter().map(move |&n| (g, n))).collect();
    // One contiguous run of entries per thread, each holding one folder open
    // at a time (a folder split between two threads is opened and fsynced
    // by both). The files and folders held for the fsyncs are counted over
    // all threads: the thread whose push reaches SYNC_OPEN_MAX flushes its
    // own batch, and each flushes what it holds when its run is done (the
    // threads' last flushes overlap). So at most SYNC_OPEN_MAX descriptors
    // are held, plus, per thread, the folders `walk_nofollow` is inside (at
    // most WALK_DEPTH_MAX).
    let threads = (entries.len() / SYNC_WALK_MIN).clamp(1, crate::util::par::cores().min(SYNC_WALK_THREADS_MAX));
    let held = std::sync::atomic::AtomicUsize::new(0);
    let flush = |batch: &mut Vec<(PathBuf, File)>| {
        let flushed = std::mem::take(batch);
        let n = flushed.len();
        if let Err(e) = fsync_all(flushed) {
            fail(e);
        }
        held.fetch_sub(n, Ordering::Relaxed);
    };
    let push = |batch: &mut Vec<(PathBuf, File)>, item: (PathBuf, File)| {
        batch.push(item);
        if held.fetch_add(1, Ordering::Relaxed) + 1 >= SYNC_OPEN_MAX {
            flush(batch);
        }
    };
    let walk = |run: &[(usize, &std::ffi::OsStr)]| {
        let mut batch: Vec<(PathBuf, File)> = Vec::new();
        // The open folder: its group, shown path and descriptor (None: gone
        // or refused, its entries are skipped).
        let mut open: Option<(usize, Option<(PathBuf, crate::util::nofollow::Dir)>)> = None;
        for &(g, name) in run {
            if open.as_ref().map(|o| o.0) != Some(g) {
                if let Some((_, Some((shown, dir)))) = open.take() {
                    push(&mut batch, (shown, dir.into_file()));
                }
                let ((base, parent), _) = &groups[g];
                let dir = match crate::util::nofollow::Dir::open(base, parent) {
                    Ok(d) => Some(d),
                    Err(_) => match resolve_linked_dir(base, parent) {
                        Ok(d) => d, // None: gone
                        Err(e) => {
                            fail(e);
                            None
                        }
                    },
                };
                open = Some((g, dir.map(|d| (base.join(parent), d))));
            }
            let Some((_, Some((shown, dir)))) = &open else { continue };
            let Ok(cname) = crate::util::nofollow::cstr(name) else { continue };
            let mut visit = |path: PathBuf, f: File, is_dir: bool| {
                if !is_dir {
                    start_file_writeback(&f);
                }
                push(&mut batch, (path, f));
            };
            if let Err(e) = walk_nofollow(dir.as_raw_fd(), &cname, &shown.join(name), 0, &|_| true, true, &mut visit) {
                fail(e);
            }
        }
        if let Some((_, Some((shown, dir)))) = open {
            push(&mut batch, (shown, dir.into_file()));
        }
        flush(&mut batch);
    };
    if threads == 1 {
        walk(&entries);
    } else {
        std::thread::scope(|sc| {
            let walkers: Vec<_> = entries.chunks(entries.len().div_ceil(threads)).map(|run| sc.spawn(move || walk(run))).collect();
            for w in walkers {
                w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
        });
    }
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Start writing `f`'s dirty pages to disk, without waiting for them to be
/// written (a full device queue may still make the call wait).
fn start_file_writeback(f: &File) {
    // SAFETY: a valid descriptor; the call only starts writeback of its pages.
    unsafe {
        libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Most files [`sync_files`] holds open at once.
const SYNC_OPEN_MAX: usize = 256;

/// Fewest paths per walking thread in [`sync_files`] (below this a thread's
/// start costs more than its share of the walk saves).
const SYNC_WALK_MIN: usize = 32;

/// Most walking threads in [`sync_files`] (on 2 cores, 4 or 8 walkers were
/// no faster than 2; each may hold up to [`WALK_DEPTH_MAX`] folders open
/// while it is inside a folder output).
const SYNC_WALK_THREADS_MAX: usize = 4;

/// `base/parent` when a folder on the way is a symlink: resolved now, and
/// opened from the resolved workspace root with no link followed (a link
/// swapped in after the resolution is refused, not followed). `None` when
/// it no longer exists; an error when it leads outside `base`.
fn resolve_linked_dir(base: &Path, parent: &Path) -> Result<Option<crate::util::nofollow::Dir>> {
    use crate::util::nofollow::{Resolved, open_resolved};
    let shown = base.join(parent);
    match open_resolved(base, parent).with_context(|| format!("cannot flush what is in {} to disk", shown.display()))? {
        Resolved::Missing => Ok(None),
        Resolved::Inside(dir, _) => Ok(Some(dir)),
        Resolved::Outside(target) => {
            anyhow::bail!("{} leads outside the workspace (to {}): what is in it was not flushed to disk", shown.display(), target.display())
        }
    }
}

/// fsync every file of `files` (files and folders), from up to 16 threads at
/// once: fsyncs issued together share journal commits (a file's commit often
/// carries the others'). The first failure, after all were tried.
fn fsync_all(files: Vec<(PathBuf, File)>) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed: std::sync::Mutex<Option<anyhow::Error>> = std::sync::Mutex::new(None);
    let threads = files.len().clamp(1, 16);
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((p, f)) = files.get(i) else { break };
                    if let Err(e) = f.sync_all() {
                        let e = anyhow::Error::new(e).context(format!("cannot flush {} to disk (fsync failed)", p.display()));
                        failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Deepest folder level below a path that [`walk_nofollow`] visits.
const WALK_DEPTH_MAX: u32 = 64;

/// Visit `name` in the directory `dir` (shown as `shown`) and, for a folder,
/// everything below it (at most [`WALK_DEPTH_MAX`] levels), without following
/// a symlink anywhere: each entry is looked at first as `O_PATH |
/// O_NOFOLLOW` (which opens nothing for I/O: no side effect even on a device
/// or FIFO) and checked with `fstat`; a regular file for which
/// `want_file(size)` holds, and every folder, is then opened read-only
/// relative to `dir` (`O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`) and kept only if
/// it is still the same inode (a FIFO swapped in meanwhile is opened without
/// blocking and dropped), and handed to `visit` with its path and whether it
/// is a folder (folders only with `want_dirs`, after what is below them);
/// anything else (a link, a FIFO, a device, a socket) is skipped. A folder's
/// entries are listed from its descriptor. Needs no `/proc`. Errors: a
/// descriptor or memory the system refused, a folder deeper than the limit
/// (what is below it was not visited). The shared walk of [`sync_files`] and
/// [`start_writeback`].
fn walk_nofollow(
    dir: std::os::fd::RawFd,
    name: &std::ffi::CStr,
    shown: &Path,
    depth: u32,
    want_file: &dyn Fn(u64) -> bool,
    want_dirs: bool,
    visit: &mut dyn FnMut(PathBuf, File, bool),
) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let refused = |e: std::io::Error| -> Result<()> {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM) => Err(anyhow::Error::new(e).context(format!("cannot open {}", shown.display()))),
            _ => Ok(()), // gone, or swapped for a link: nothing to flush
        }
    };
    let stat = |fd: &OwnedFd| -> Option<libc::stat> {
        // SAFETY: all-zero is a valid `stat`; fstat writes it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a pointer to a live `stat`.
        (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0).then_some(st)
    };
    // SAFETY: a valid directory descriptor and a NUL-terminated name; O_PATH
    // opens nothing for I/O.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return refused(std::io::Error::last_os_error());
    }
    // SAFETY: just returned by openat, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let Some(st) = stat(&fd) else { return Ok(()) };
    let is_dir = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG if want_file(st.st_size as u64) => false,
        libc::S_IFDIR => true,
        _ => return Ok(()),
    };
    if is_dir && depth >= WALK_DEPTH_MAX {
        anyhow::bail!("{}: more than {WALK_DEPTH_MAX} folder levels below an output; what is below was not flushed to disk", shown.display());
    }
    drop(fd);
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC | if is_dir { libc::O_DIRECTORY } else { 0 };
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return refused(std::io::Error::last_os_error());
    }
    // SAFETY: just returned by openat, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    match stat(&fd) {
        Some(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => {}
        _ => return Ok(()), // swapped since the look
    }
    if !is_dir {
        visit(shown.to_path_buf(), File::from(fd), false);
        return Ok(());
    }
    let mut result = Ok(());
    for n in dir_names(fd.as_raw_fd()).with_context(|| format!("cannot list {}", shown.display()))? {
        let below = shown.join(std::ffi::OsStr::from_bytes(n.to_bytes()));
        if let Err(e) = walk_nofollow(fd.as_raw_fd(), &n, &below, depth + 1, want_file, want_dirs, visit) {
            result = result.and(Err(e));
        }
    }
    if want_dirs {
        visit(shown.to_path_buf(), File::from(fd), true);
    }
    result
}

/// The names in the open directory `fd` (not `.` and `..`), read through a
/// duplicate of the descriptor.
fn dir_names(fd: std::os::fd::RawFd) -> std::io::Result<Vec<std::ffi::CString>> {
    // SAFETY: duplicating a valid descriptor; the copy is handed to fdopendir.
    let d = unsafe { libc::dup(fd) };
    if d < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `d` is a directory descriptor this function owns; on success
    // the stream owns it (closedir closes it).
    let stream = unsafe { libc::fdopendir(d) };
    if stream.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `d` is still ours to close.
        unsafe { libc::close(d) };
        return Err(e);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: a valid, open directory stream.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid entry whose `d_name` is
        // NUL-terminated and lives until the next readdir on this stream.
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: the stream is open and closed exactly once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// Files smaller than this are left to [`sync_files`] alone: starting
/// their writeback early saves nothing worth a system call.
const EARLY_WRITEBACK_MIN: u64 = 1 << 20;

/// Start writing the large files among `rels` (workspace-relative files,
/// or folders: the files below them) back to disk now, from a background
/// thread, without waiting for the disk: the run goes on computing while the
/// device writes, and the end-of-run [`sync_files`] finds little left to
/// flush (it still flushes everything; this only moves the device's work
/// earlier). Only for files that will be made durable anyway: never plaintext
/// outputs, which are deleted at the end of the run and must not be written
/// out at all. The walk follows no symlink (every component is opened with
/// `O_NOFOLLOW`, entries first as `O_PATH` and checked with `fstat`): a link
/// or FIFO a command swaps in while the run goes on is skipped, never
/// followed to another file (a plaintext one) or opened.
pub fn start_writeback(root: PathBuf, rels: Vec<PathBuf>) {
    use std::sync::OnceLock;
    use std::sync::mpsc::{Sender, channel};
    type Job = (PathBuf, Vec<PathBuf>);
    static QUEUE: OnceLock<Option<Sender<Job>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                for (root, rels) in rx {
                    for rel in rels {
                        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else { continue };
                        let Ok(dir) = crate::util::nofollow::Dir::open(&root, parent) else { continue };
                        let Ok(name) = crate::util::nofollow::cstr(name) else { continue };
                        // Best effort: what is not started here is flushed by sync_files.
                        let _ = walk_nofollow(dir.as_raw_fd(), &name, &root.join(&rel), 0, &|size| size >= EARLY_WRITEBACK_MIN, false, &mut |_, f, _| {
                            start_file_writeback(&f)
                        });
                    }
                }
            })
            .ok()
            .map(|_| tx)
    });
    if let Some(q) = queue {
        let _ = q.send((root, rels));
    }
}

/// Write `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::open_buffered(dest, None, Durability::Content, 0)?;
    f.writer().write_all(bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    f.commit()
}

/// Write `bytes` to `dest` atomically with permission bits `mode` (e.g. 0o600).
pub fn write_atomic_mode(dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = AtomicFile::open_buffered(dest, Some(mode), Durability::Full, 0)?;
    f.writer().write_all(bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    f.commit()
}

/// Write `bytes` to `dest` atomically with the given durability.
pub fn write_atomic_with(dest: &Path, bytes: &[u8], durability: Durability) -> Result<()> {
    let mut f = AtomicFile::create_unbuffered(dest, durability)?;
    f.writer().write_all(bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    f.commit()
}

/// Serialize `value` as pretty JSON (with a trailing newline) and write it atomically.
pub fn write_json_atomic<T: serde::Serialize>(dest: &Path, value: &T) -> Result<()> {
    write_json_with(dest, value, Durability::Content)
}

/// [`write_json_atomic`] with the given durability.
pub fn write_json_with<T: serde::Serialize>(dest: &Path, value: &T, durability: Durability) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic_with(dest, &bytes, durability)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_report_temp_files_are_swept_by_age() {
        let d = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let make = |name: &str, stale: bool| {
            let f = File::create(d.path().join(name)).unwrap();
            if stale {
                f.set_modified(old).unwrap();
            }
        };
        make(".r1.html.dagrun-tmp.7.0", true); // what a killed report left
        make(".r2.html.dagrun-tmp.8.0", false); // a report writing now
        make(".r3.json.dagrun-tmp.9.0", true); // another writer's: not this sweep's
        make("r4.html", true);
        sweep_stale_temp_files(d.path(), "html", std::time::Duration::from_secs(600));
        let mut left: Vec<String> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [".r2.html.dagrun-tmp.8.0", ".r3.json.dagrun-tmp.9.0", "r4.html"]);
        // By destination name: a killed `sample --out big.csv` (its staging
        // file and its output's temporary file), not another file's.
        make(".sample.dagrun-tmp.41", true);
        make(".big.csv.dagrun-tmp.41.0", true);
        make(".small.csv.dagrun-tmp.42.0", true);
        sweep_stale_temp_files(d.path(), "sample", std::time::Duration::from_secs(600));
        sweep_stale_temp_files(d.path(), "big.csv", std::time::Duration::from_secs(600));
        let mut left: Vec<String> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [".r2.html.dagrun-tmp.8.0", ".r3.json.dagrun-tmp.9.0", ".small.csv.dagrun-tmp.42.0", "r4.html"]);
    }

    #[test]
    fn write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failed_commit_removes_its_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("keep"), b"k").unwrap(); // a non-empty directory: the rename fails
        let mut f = AtomicFile::create(&p).unwrap();
        f.writer().write_all(b"data").unwrap();
        let err = f.commit().unwrap_err().to_string();
        assert!(err.contains("cannot move a finished write into place"), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left");
    }

    #[test]
    fn dropped_write_leaves_destination_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        write_atomic(&p, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.writer().write_all(b"partial").unwrap();
            assert!(is_temp_name(&f.temp_path().file_name().unwrap().to_string_lossy()));
        }
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn deferred_sync_covers_the_named_outputs_on_this_thread_only() {
        let d = tempfile::tempdir().unwrap();
        let (out, dir) = (d.path().join("a.parquet"), d.path().join("store"));
        {
            let _g = defer_sync_of(vec![out.clone(), dir.clone()]);
            assert!(is_deferred(&out) && is_deferred(&dir.join("features.parquet")));
            assert!(!is_deferred(&d.path().join("registry.json")) && !is_deferred(d.path()));
            // another thread (a stage's helper) keeps per-file fsyncs
            let o = out.clone();
            assert!(!std::thread::spawn(move || is_deferred(&o)).join().unwrap());
            // the write itself still lands atomically
            write_atomic(&dir.join("m.json"), b"{}").unwrap();
            assert_eq!(fs::read(dir.join("m.json")).unwrap(), b"{}");
        }
        assert!(!is_deferred(&out));
    }

    #[test]
    fn sync_files_flushes_files_and_folders_and_skips_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a/f.txt");
        write_atomic_with(&f, b"x", Durability::Verified).unwrap();
        fs::create_dir_all(dir.path().join("d/e")).unwrap();
        fs::write(dir.path().join("d/e/g"), b"y").unwrap();
        let ro = dir.path().join("ro");
        fs::write(&ro, b"z").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o444)).unwrap();
        }
        sync_files(dir.path(), &[f, dir.path().join("d"), ro, dir.path().join("missing")]).unwrap();
        sync_files::<PathBuf>(dir.path(), &[]).unwrap();
    }

    #[test]
    fn the_walk_follows_no_link_and_opens_no_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("a"), b"a").unwrap();
        fs::write(out.join("sub/b"), b"b").unwrap();
        // Plaintext elsewhere, reachable only through links.
        fs::create_dir(dir.path().join("plain")).unwrap();
        fs::write(dir.path().join("plain/pii.csv"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("plain/pii.csv"), out.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("plain"), out.join("dirlink")).unwrap();
        let fifo = crate::util::nofollow::cstr(out.join("fifo").as_os_str()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let root = crate::util::nofollow::Dir::open(dir.path(), Path::new("")).unwrap();
        let walk = |want_dirs: bool, min: u64| {
            let mut seen = Vec::new();
            walk_nofollow(root.as_raw_fd(), c"out", &out, 0, &|size| size >= min, want_dirs, &mut |p, _, is_dir| {
                seen.push((p.strip_prefix(dir.path()).unwrap().to_path_buf(), is_dir))
            })
            .unwrap();
            seen.sort();
            seen
        };
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(walk(true, 0), vec![(p("out"), true), (p("out/a"), false), (p("out/sub"), true), (p("out/sub/b"), false)]);
        assert_eq!(walk(false, 0), vec![(p("out/a"), false), (p("out/sub/b"), false)]);
        assert_eq!(walk(false, 2), vec![]);
        // A folder on the way that is a link leading out of the root: an
        // error, and nothing below it is reached (the rest is flushed).
        let e = sync_files(&out, &[out.join("dirlink/pii.csv"), out.join("fifo"), out.join("a")]).unwrap_err();
        assert!(format!("{e:#}").contains("leads outside the workspace"), "{e:#}");
        // One inside the root (outputs may be written through such links):
        // resolved, flushed, no error.
        sync_files(dir.path(), &[out.join("dirlink/pii.csv"), out.join("fifo"), out.join("a")]).unwrap();
    }

    #[test]
    fn many_files_are_flushed_a_batch_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("many");
        fs::create_dir_all(out.join("deep")).unwrap();
        for i in 0..(SYNC_OPEN_MAX * 2 + 3) {
            fs::write(out.join(format!("f{i}")), b"x").unwrap();
        }
        sync_files(dir.path(), &[&out]).unwrap();
        // A folder output nested deeper than the walk goes: an error.
        let mut deep = out.join("deep");
        for _ in 0..WALK_DEPTH_MAX {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        let e = sync_files(dir.path(), &[&out]).unwrap_err();
        assert!(format!("{e:#}").contains("folder levels"), "{e:#}");
    }

    #[test]
    fn many_paths_in_several_folders_and_an_error_in_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..(SYNC_WALK_MIN * 3 + 1) {
            let p = dir.path().join(format!("d{}/f{i}", i % 3));
            write_atomic_with(&p, b"x", Durability::Verified).unwrap();
            paths.push(p);
        }
        paths.push(dir.path().join("missing"));
        sync_files(dir.path(), &paths).unwrap();
        // One of the paths is a folder nested deeper than the walk goes.
        let mut deep = dir.path().join("d1/deep");
        for _ in 0..=WALK_DEPTH_MAX {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        paths.push(dir.path().join("d1/deep"));
        let e = sync_files(dir.path(), &paths).unwrap_err();
        assert!(format!("{e:#}").contains("folder levels"), "{e:#}");
    }

    /// Env var under which the test below runs its body (in a child process
    /// of the test binary, with a low descriptor limit).
    const LOW_NOFILE_CHILD: &str = "DAGRUN_TEST_SYNC_LOW_NOFILE";

    #[test]
    fn paths_in_more_folders_than_the_descriptor_limit_are_flushed() {
        if std::env::var_os(LOW_NOFILE_CHILD).is_none() {
            // The limit is lowered in a child process of this test binary
            // running only this test: lowering it here would starve the
            // tests that run beside this one.
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "util::atomic::tests::paths_in_more_folders_than_the_descriptor_limit_are_flushed", "--test-threads=1", "--nocapture"])
                .env(LOW_NOFILE_CHILD, "1")
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        let limit: u64 = 2 * SYNC_OPEN_MAX as u64;
        let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
        // SAFETY: a valid rlimit struct; lowers this (child) process's limit only.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * limit as usize;
        let paths: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("d{i:05}/f"))).collect();
        for p in &paths {
            write_atomic_with(p, b"x", Durability::Verified).unwrap();
        }
        // The first two thirds of the listed files are gone by the time of
        // the sync: their folders are opened one after the other while no
        // file in them is.
        for p in &paths[..2 * limit as usize] {
            fs::remove_file(p).unwrap();
        }
        sync_files(dir.path(), &paths).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn mode_is_applied() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_atomic_mode(&p, b"s", 0o600).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
