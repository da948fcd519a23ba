//! Content hashes of files and directories, memoized so a no-op run reads no data.
//!
//! A file's hash is blake3 of its bytes. A directory's hash is blake3 of its
//! *tree listing*, compact JSON:
//! `{"format":"dagrun-tree/3","entries":[{"type":"file","path":P,"hash":H,"size":N,"exec":B} | {"type":"link","path":P,"target":T}, …]}`
//! with one entry per regular file and symlink (not followed) below it, sorted
//! by relative path. Empty directories and dagrun's temporary files are not
//! listed. The listing is also the directory's object in the
//! content-addressed store.
//!
//! A file entry carries its size, so that whoever fetches the file's object
//! (`pull` from a remote cache) knows exactly how many bytes to accept before
//! reading one. History: `dagrun-tree/2` had no sizes; its listings are still
//! read (a cache made by an older dagrun restores), but every directory now
//! hashes differently, so a stage with a directory input or output reruns
//! once after the upgrade.
//!
//! Listings are unambiguous and checked ([`decode_tree`]): JSON strings cannot
//! forge an entry (a file name holding a newline is just a name), and every
//! entry is validated before a restore writes anything: a path is relative,
//! UTF-8, without `..`, `.` or empty components, without NUL, at most 4096
//! bytes; paths are sorted and unique; no entry lies below a symlink entry or
//! below a file entry; every hash is a [`ContentHash`]. A listing is trusted
//! because its blake3 is recorded in an authenticated state record and the
//! object is verified against it on every use.
//!
//! Inputs ([`HashMemo::hash_input`]): a file hashes as its content, a folder
//! as its listing — unless links inside it lead out of the workspace to a
//! regular file or a folder (a dataset kept elsewhere,
//! `data/train.csv -> /datasets/…`): then as blake3 of
//! `dagrun-input-links/1\n`, the listing's hash, and for each such link (in
//! listing order) `\n`, its path, NUL and the input hash of what it leads to
//! (each place hashed once per input; a link back to a folder being hashed
//! is a cycle, left out). An edit behind such a link reruns the stage, as an
//! edit behind a link named as the input itself does. Any other link is its
//! target text: one to a place in the workspace (what is there is another
//! stage's business: declare it as an input to depend on it), to a folder
//! holding the workspace (`/`, the home folder), to a device or a FIFO, into
//! `/proc`, `/sys` or `/dev`, or a dangling one; and one whose place cannot
//! be hashed (a FIFO in the folder it leads to, a folder it may not read),
//! with a warning. Outputs are never followed (a link an output holds is
//! restored as a link).
//!
//! The memo (`.dagrun/hashmemo.json`) maps an absolute path to
//! (size, mtime ns, ctime ns, inode, hash). An entry is trusted only if the file
//! was last changed clearly before it was hashed (a "racy" entry, changed in
//! the same clock tick as the hashing, is re-read next time, as git does with its
//! index), so an edit that keeps the size is still seen. "Changed" is the
//! ctime, which the kernel sets on every write and which no user tool sets back
//! (an mtime may be put in the future by `touch -d`: that file would be re-read
//! on every run). "Clearly before" is 50 ms, or the file system's timestamp
//! granularity if coarser, read from the ctime itself: whole seconds (ext3,
//! ext4 with 128-byte inodes, many NFS/SMB servers; FAT's 2 s) show as zero
//! nanoseconds, and a granularity of 10^k ns as k trailing zeros (a fine
//! timestamp ends in k zeros once in 10^k: such a file is merely re-read once
//! more). Without it, a same-size edit in the second the file was hashed in
//! left size, mtime and ctime unchanged, and was never seen. The memo is an
//! authenticated record (`workspace::record`): a memo edited outside dagrun is
//! ignored (every file is hashed again), so it cannot make a changed input
//! look unchanged.
//!
//! Exception, [`HashMemo::settle`]: an output that dagrun itself wrote (built-in
//! kinds write to a temp file and rename it into place; the stage has finished,
//! so nothing else writes it) and hashed after it was complete is trusted at
//! once, even though it was hashed within the racy window, and its entry
//! follows the ctime change of dagrun's own chmod/hard link into the cache.
//! So the first no-op run after a cold run reads no data. `cmd` outputs are
//! never settled: a process the command left behind could still write them.

use super::hash::ContentHash;
use super::record;
use crate::crypto::IntegrityKey;
use crate::util::atomic::{Durability, is_temp_name, write_atomic_with};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Files changed less than this before hashing are re-read next time
/// (more on a file system with coarser timestamps: [`racy_window`]).
const RACY_NS: i128 = 50_000_000;

/// How long after a file's ctime its hash can be trusted: [`RACY_NS`] past
/// the timestamp's granularity, guessed from its trailing decimal zeros
/// (0 ns past the second: whole seconds, or FAT's two).
fn racy_window(ctime: i128) -> i128 {
    let nsec = ctime.rem_euclid(1_000_000_000);
    let granularity = if nsec == 0 {
        2_000_000_000
    } else {
        let mut g = 1;
        while nsec % (g * 10) == 0 {
            g *= 10;
        }
        g
    };
    RACY_NS + granularity
}

/// Was a file whose ctime is `ctime` changed clearly before `hashed_at`?
fn settled_before(ctime: i128, hashed_at: i128) -> bool {
    hashed_at - ctime > racy_window(ctime)
}

/// A hashed path.
#[derive(Debug, Clone, PartialEq)]
pub struct Hashed {
    pub hash: ContentHash,
    pub size: u64,
    pub dir: bool,
    /// A file with an execute bit (a folder's files carry theirs in its listing).
    pub exec: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemoEntry {
    size: u64,
    mtime: i128,
    ctime: i128,
    ino: u64,
    hash: ContentHash,
    hashed_at: i128,
}

/// The memo file's shape (plus its `mac`).
#[derive(Serialize, Deserialize)]
struct MemoFile {
    entries: HashMap<String, MemoEntry>,
}

#[derive(Serialize)]
struct MemoFileRef<'a> {
    entries: &'a HashMap<String, MemoEntry>,
}

/// The file-hash memo of one workspace.
pub struct HashMemo {
    file: PathBuf,
    key: Option<Arc<IntegrityKey>>,
    entries: Mutex<HashMap<String, MemoEntry>>,
    dirty: AtomicBool,
}

pub fn now_ns() -> i128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

#[cfg(unix)]
fn stamp(m: &std::fs::Metadata) -> (i128, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128, m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128, m.ino())
}

/// Does the file have an execute bit (for anyone)?
#[cfg(unix)]
pub fn is_exec(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o111 != 0
}

/// The error for an input or output that is neither a regular file nor a
/// folder: a FIFO would block the run (and its lock) forever, a device such as
/// `/dev/zero` would never end.
fn not_a_file(path: &Path, meta: &std::fs::Metadata) -> anyhow::Error {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    anyhow::anyhow!(
        "{} is {what} (or a link to one); dagrun hashes only regular files and folders: replace it with the file (and check who put it there)",
        path.display()
    )
}

/// The metadata of `path` (links followed) if it is a regular file or a
/// folder; None if nothing is there; an error naming anything else.
fn file_or_folder(path: &Path) -> Result<Option<std::fs::Metadata>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if !meta.is_dir() && !meta.is_file() {
        return Err(not_a_file(path, &meta));
    }
    Ok(Some(meta))
}

/// blake3 of a file's bytes (memory-mapped for large files).
pub fn hash_file_bytes(path: &Path) -> Result<ContentHash> {
    let mut h = blake3::Hasher::new();
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len >= 1 << 20 {
        h.update_mmap(path).with_context(|| format!("cannot read {}", path.display()))?;
    } else {
        // O_NONBLOCK: a FIFO swapped in after the caller's type check
        // reads as empty instead of blocking the run (and its lock) forever.
        let mut f = crate::util::open_nonblocking(path).with_context(|| format!("cannot read {}", path.display()))?;
        // Sized to the file (a zeroed 64 KiB buffer per small input was
        // most of the cost of hashing it); one read more finds its end.
        let mut buf = vec![0u8; (len as usize).saturating_add(1).clamp(512, 64 * 1024)];
        loop {
            let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(ContentHash::from(h.finalize()))
}

/// First line of the hash of a folder input with links leading out of it.
const INPUT_LINKS_FORMAT: &str = "dagrun-input-links/1";

/// Format string of a tree listing.
pub const TREE_FORMAT: &str = "dagrun-tree/3";
/// The format before file entries carried sizes (read, never written).
const TREE_FORMAT_2: &str = "dagrun-tree/2";

/// One entry of a directory tree listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum TreeEntry {
    File {
        path: String,
        hash: ContentHash,
        /// Bytes of the file; `None` only in a `dagrun-tree/2` listing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        exec: bool,
    },
    Link {
        path: String,
        target: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeListing {
    format: String,
    entries: Vec<TreeEntry>,
}

/// Longest path a listing entry may have.
pub const MAX_ENTRY_PATH: usize = 4096;

/// Is `p` a safe relative path for a listing entry? (The reason if not.)
pub fn check_entry_path(p: &str) -> std::result::Result<(), String> {
    if p.is_empty() {
        return Err("an empty path".into());
    }
    if p.len() > MAX_ENTRY_PATH {
        return Err(format!("a path of {} bytes (at most {MAX_ENTRY_PATH})", p.len()));
    }
    if p.contains('\0') {
        return Err("a path with a NUL byte".into());
    }
    if p.starts_with('/') {
        return Err("an absolute path".into());
    }
    for c in p.split('/') {
        match c {
            "" => return Err("a path with an empty component".into()),
            "." => return Err("a path with a `.` component".into()),
            ".." => return Err("a path with a `..` component (outside the directory)".into()),
            _ => {}
        }
    }
    Ok(())
}

/// Largest directory listing read back from the cache.
pub const MAX_LISTING_BYTES: u64 = 1 << 30;

/// Encode a tree listing (entries must be sorted by path).
pub fn encode_tree(entries: &[TreeEntry]) -> Vec<u8> {
    // Plain strings, bools and hashes: serialising cannot fail.
    serde_json::to_vec(&TreeListing { format: TREE_FORMAT.to_string(), entries: entries.to_vec() }).expect("a tree listing serializes")
}

/// Does `bytes` look like a tree listing at all? (verify: which objects to check)
pub fn looks_like_tree(bytes: &[u8]) -> bool {
    bytes.starts_with(b"{\"format\":\"dagrun-tree/")
}

/// Decode and validate a tree listing (see the module rules); the error says
/// which entry is wrong and why, never echoing its path.
pub fn decode_tree(bytes: &[u8]) -> std::result::Result<Vec<TreeEntry>, String> {
    let listing: TreeListing = record::typed(crate::util::redact::from_json(bytes).map_err(|why| format!("not a directory listing ({})", why))?, "listing")
        .map_err(|e| e.to_string())?;
    let sized = match listing.format.as_str() {
        TREE_FORMAT => true,
        TREE_FORMAT_2 => false,
        _ => return Err(format!("unknown listing format (this build reads {TREE_FORMAT} and {TREE_FORMAT_2})")),
    };
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut prev: Option<&str> = None;
    for (i, e) in listing.entries.iter().enumerate() {
        let p = e.path();
        check_entry_path(p).map_err(|why| format!("entry {} is {why}", i + 1))?;
        if let TreeEntry::Link { target, .. } = e
            && (target.is_empty() || target.contains('\0'))
        {
            return Err(format!("entry {} is a symlink with an empty target or a NUL byte", i + 1));
        }
        if let TreeEntry::File { size, .. } = e
            && size.is_some() != sized
        {
            return Err(format!(
                "entry {} is a file {} a size, which its format ({}) does not allow",
                i + 1,
                if sized { "without" } else { "with" },
                listing.format
            ));
        }
        if prev.is_some_and(|q| q >= p) {
            return Err(format!("entry {} is out of order or repeated", i + 1));
        }
        prev = Some(p);
        seen.insert(p);
    }
    for (i, e) in listing.entries.iter().enumerate() {
        let p = e.path();
        let mut at = 0;
        while let Some(j) = p[at..].find('/') {
            let parent = &p[..at + j];
            if seen.contains(parent) {
                return Err(format!("entry {} lies below another entry (a file or symlink), so restoring it would write through it", i + 1));
            }
            at += j + 1;
        }
    }
    Ok(listing.entries)
}

impl HashMemo {
    /// Load the memo of a workspace (a missing or unreadable memo is empty).
    /// Load the memo of a workspace. A missing, unreadable or unauthenticated
    /// memo is empty (files are hashed again); without `key` it is never saved.
    pub fn load(ws: &super::Workspace, key: Option<Arc<IntegrityKey>>) -> HashMemo {
        let file = ws.memo_file();
        let entries = match (&key, crate::util::read_capped(&file, 1 << 30)) {
            (Some(k), Ok(b)) => match record::open::<MemoFile>(Some(k), record::HASH_MEMO, &b, &ws.rel(&file)) {
                Ok(m) => m.entries,
                Err(e) => {
                    if e.is_tampering() {
                        tracing::warn!("{e}: ignoring it (inputs are hashed again)");
                    }
                    HashMap::new()
                }
            },
            _ => HashMap::new(),
        };
        HashMemo { file, key, entries: Mutex::new(entries), dirty: AtomicBool::new(false) }
    }

    /// An empty memo that is never saved.
    pub fn in_memory() -> HashMemo {
        HashMemo { file: PathBuf::new(), key: None, entries: Mutex::new(HashMap::new()), dirty: AtomicBool::new(false) }
    }

    /// Save the memo if it changed (atomically, MAC'd).
    pub fn save(&self) -> Result<()> {
        let Some(key) = &self.key else { return Ok(()) };
        if self.file.as_os_str().is_empty() || !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let bytes = {
            let e = self.entries.lock().unwrap();
            let v = record::seal_value(key, record::HASH_MEMO, &MemoFileRef { entries: &e })?;
            serde_json::to_vec(&v)?
        };
        write_atomic_with(&self.file, &bytes, Durability::Verified)
    }

    /// Hash a regular file, using the memo when the file is unchanged.
    pub fn hash_file(&self, path: &Path, meta: &std::fs::Metadata) -> Result<ContentHash> {
        if let Some(hash) = self.trusted(path, meta) {
            return Ok(hash);
        }
        let key = path.to_string_lossy().into_owned();
        let (mtime, ctime, ino) = stamp(meta);
        let hashed_at = now_ns();
        let hash = hash_file_bytes(path)?;
        self.entries.lock().unwrap().insert(key, MemoEntry { size: meta.len(), mtime, ctime, ino, hash: hash.clone(), hashed_at });
        self.dirty.store(true, Ordering::Release);
        Ok(hash)
    }

    /// The memo's hash of `path` if its entry matches `meta` and is not racy.
    fn trusted(&self, path: &Path, meta: &std::fs::Metadata) -> Option<ContentHash> {
        let (mtime, ctime, ino) = stamp(meta);
        let entries = self.entries.lock().unwrap();
        let e = entries.get(path.to_string_lossy().as_ref())?;
        (e.size == meta.len() && e.mtime == mtime && e.ctime == ctime && e.ino == ino && settled_before(ctime, e.hashed_at)).then(|| e.hash.clone())
    }

    /// Record a hash computed elsewhere (e.g. while copying the file into the
    /// cache); `hashed_at` is when reading started (see the racy rule above).
    pub fn record(&self, path: &Path, meta: &std::fs::Metadata, hash: &ContentHash, hashed_at: i128) {
        let (mtime, ctime, ino) = stamp(meta);
        let e = MemoEntry { size: meta.len(), mtime, ctime, ino, hash: hash.clone(), hashed_at };
        self.entries.lock().unwrap().insert(path.to_string_lossy().into_owned(), e);
        self.dirty.store(true, Ordering::Release);
    }

    /// Trust the memo entries of `path` (a file, or every file below a
    /// directory) whose content dagrun wrote itself and hashed after it was
    /// complete (see the module doc). An entry whose size, mtime or inode no
    /// longer match is dropped instead (re-read next time).
    pub fn settle(&self, path: &Path) {
        let key = path.to_string_lossy();
        let mut entries = self.entries.lock().unwrap();
        let under: Vec<String> = entries.keys().filter(|k| k.as_str() == key.as_ref() || crate::util::path_within(k, &key)).cloned().collect();
        for k in under {
            let now = std::fs::symlink_metadata(&k).ok().filter(|m| m.is_file()).map(|m| (m.len(), stamp(&m)));
            let e = entries.get_mut(&k).expect("key listed above");
            match now {
                Some((size, (mtime, ctime, ino))) if size == e.size && mtime == e.mtime && ino == e.ino => {
                    e.ctime = ctime;
                    e.hashed_at = e.hashed_at.max(ctime + racy_window(ctime) + 1);
                }
                _ => {
                    entries.remove(&k);
                }
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Forget what is known about `path` (after dagrun rewrites it).
    pub fn forget(&self, path: &Path) {
        let key = path.to_string_lossy();
        let mut e = self.entries.lock().unwrap();
        e.retain(|k, _| !(k == key.as_ref() || crate::util::path_within(k, &key)));
        self.dirty.store(true, Ordering::Release);
    }

    /// Hash a file or directory; `Ok(None)` if it does not exist.
    pub fn hash_path(&self, path: &Path) -> Result<Option<Hashed>> {
        let Some(meta) = file_or_folder(path)? else { return Ok(None) };
        if meta.is_dir() {
            let entries = self.tree(path)?;
            let size = entries.len() as u64;
            let bytes = encode_tree(&entries);
            Ok(Some(Hashed { hash: ContentHash::of_bytes(&bytes), size, dir: true, exec: false }))
        } else {
            Ok(Some(Hashed { hash: self.hash_file(path, &meta)?, size: meta.len(), dir: false, exec: is_exec(&meta) }))
        }
    }

    /// The hash of an input (a stage's dep) in the workspace `workspace`: a
    /// file's content; a folder's listing, or, when links inside it lead out
    /// of the workspace, the listing and what each of those links leads to
    /// (see the module doc, "Inputs").
    pub fn hash_input(&self, path: &Path, workspace: &Path) -> Result<Option<ContentHash>> {
        let mut followed = HashMap::new();
        self.input_hash(path, workspace, &mut followed)
    }

    /// `followed`: the folders and files reached through links so far in
    /// this input (canonical path → its hash's text, empty if gone; None
    /// while a folder is being hashed, so a link back to it is a cycle, left
    /// out).
    fn input_hash(&self, path: &Path, workspace: &Path, followed: &mut HashMap<PathBuf, Option<String>>) -> Result<Option<ContentHash>> {
        let Some(meta) = file_or_folder(path)? else { return Ok(None) };
        if meta.is_file() {
            return self.hash_file(path, &meta).map(Some);
        }
        let entries = self.tree(path)?;
        let listing = ContentHash::of_bytes(&encode_tree(&entries));
        if !entries.iter().any(|e| matches!(e, TreeEntry::Link { .. })) {
            return Ok(Some(listing));
        }
        // Links to a regular file or a folder outside the workspace and not
        // holding it, nor in /proc, /sys or /dev; anything else is its target
        // text (in the listing). A relative target that stays in the folder
        // through no other link is known to without a system call.
        let links: HashSet<&str> = entries.iter().filter(|e| matches!(e, TreeEntry::Link { .. })).map(TreeEntry::path).collect();
        let ws = workspace.canonicalize().unwrap_or_else(|_| workspace.to_path_buf());
        let leads_out = |t: &Path| !t.starts_with(&ws) && !ws.starts_with(t) && !["/proc", "/sys", "/dev"].iter().any(|p| t.starts_with(p));
        let mut leaving = Vec::new();
        for e in &entries {
            if let TreeEntry::Link { path: rel, target } = e
                && !stays_inside(rel, target, &links)
                && let Ok(canonical) = path.join(rel).canonicalize()
                && leads_out(&canonical)
                && std::fs::metadata(&canonical).is_ok_and(|m| m.is_file() || m.is_dir())
            {
                leaving.push((rel.as_str(), canonical));
            }
        }
        if leaving.is_empty() {
            return Ok(Some(listing));
        }
        let mut h = blake3::Hasher::new();
        h.update(INPUT_LINKS_FORMAT.as_bytes());
        h.update(b"\n");
        h.update(listing.to_string().as_bytes());
        for (rel, target) in leaving {
            let behind = match followed.get(&target) {
                Some(Some(known)) => known.clone(),
                // A link back to a folder being hashed: a cycle.
                Some(None) => continue,
                None => {
                    followed.insert(target.clone(), None);
                    // What cannot be hashed there (a FIFO in a shared folder, a
                    // folder it may not read) leaves the link its target text.
                    match self.input_hash(&target, workspace, followed) {
                        Ok(b) => {
                            let b = b.map(|b| b.to_string()).unwrap_or_default();
                            followed.insert(target.clone(), Some(b.clone()));
                            b
                        }
                        Err(e) => {
                            tracing::warn!("{}: counted as the text of its link, not what it leads to: {e:#}", path.join(rel).display());
                            followed.remove(&target);
                            continue;
                        }
                    }
                }
            };
            h.update(b"\n");
            h.update(rel.as_bytes());
            h.update(b"\0");
            h.update(behind.as_bytes());
        }
        Ok(Some(ContentHash::from(h.finalize())))
    }

    /// The sorted tree listing of a directory.
    pub fn tree(&self, dir: &Path) -> Result<Vec<TreeEntry>> {
        let mut out = Vec::new();
        self.walk(dir, "", &mut out)?;
        out.sort_by(|a, b| a.path().cmp(b.path()));
        Ok(out)
    }

    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<TreeEntry>) -> Result<()> {
        let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for ent in rd {
            let ent = ent.with_context(|| format!("cannot list {}", dir.display()))?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                bail!(
                    "{} holds a file whose name is not UTF-8 ({}); dagrun cannot list it unambiguously: rename it",
                    dir.display(),
                    ent.file_name().to_string_lossy()
                );
            };
            if is_temp_name(&name) {
                continue;
            }
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            let p = ent.path();
            let ft = ent.file_type()?;
            if ft.is_symlink() {
                let target = std::fs::read_link(&p)?.to_string_lossy().into_owned();
                out.push(TreeEntry::Link { path: rel, target });
            } else if ft.is_dir() {
                self.walk(&p, &rel, out)?;
            } else {
                let meta = ent.metadata()?;
                if !meta.is_file() {
                    return Err(not_a_file(&p, &meta));
                }
                out.push(TreeEntry::File { hash: self.hash_file(&p, &meta)?, size: Some(meta.len()), exec: is_exec(&meta), path: rel });
            }
        }
        Ok(())
    }
}

/// Does the link at `rel` in a folder's listing, whose target text is
/// `target`, lead to a place in that folder by its text alone: relative,
/// never above the folder, through no folder that is itself one of the
/// listing's `links`? (Then what it leads to is in the listing already.)
fn stays_inside(rel: &str, target: &str, links: &HashSet<&str>) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut at: Vec<&str> = rel.split('/').collect();
    at.pop();
    let parts: Vec<&str> = target.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    for (k, c) in parts.iter().enumerate() {
        if *c == ".." {
            if at.pop().is_none() {
                return false;
            }
            continue;
        }
        at.push(c);
        if k + 1 < parts.len() && links.contains(at.join("/").as_str()) {
            return false;
        }
    }
    true
}

impl TreeEntry {
    /// The entry's path inside its folder (`/`-separated).
    pub fn path(&self) -> &str {
        match self {
            TreeEntry::File { path, .. } | TreeEntry::Link { path, .. } => path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_outputs_are_trusted_at_once_and_follow_dagruns_own_ctime_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("out.parquet");
        std::fs::write(&f, b"written by a built-in kind").unwrap();
        let memo = HashMemo::in_memory();
        memo.hash_path(&f).unwrap().unwrap();
        // Hashed right after it was written: racy, so not trusted yet.
        assert!(memo.trusted(&f, &std::fs::metadata(&f).unwrap()).is_none());
        // dagrun's own chmod (and hard link into the cache) changes the ctime.
        let mut perm = std::fs::metadata(&f).unwrap().permissions();
        perm.set_readonly(true);
        std::fs::set_permissions(&f, perm).unwrap();
        std::fs::hard_link(&f, dir.path().join("object")).unwrap();
        memo.settle(&f);
        let want = ContentHash::of_bytes(b"written by a built-in kind");
        assert_eq!(memo.trusted(&f, &std::fs::metadata(&f).unwrap()), Some(want));
        // A later edit (new mtime, size) is still seen.
        let mut perm = std::fs::metadata(&f).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&f, perm).unwrap();
        std::fs::write(&f, b"edited").unwrap();
        assert!(memo.trusted(&f, &std::fs::metadata(&f).unwrap()).is_none());
        assert_eq!(memo.hash_path(&f).unwrap().unwrap().hash, ContentHash::of_bytes(b"edited"));
    }

    #[test]
    fn settle_drops_an_entry_whose_file_changed_since_it_was_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("out");
        std::fs::write(&f, b"one").unwrap();
        let memo = HashMemo::in_memory();
        memo.hash_path(&f).unwrap().unwrap();
        std::fs::write(&f, b"three").unwrap();
        memo.settle(&f);
        assert!(memo.trusted(&f, &std::fs::metadata(&f).unwrap()).is_none());
        assert_eq!(memo.hash_path(&f).unwrap().unwrap().hash, ContentHash::of_bytes(b"three"));
    }

    #[test]
    fn memo_skips_rereads_but_sees_edits() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"hello").unwrap();
        let memo = HashMemo::in_memory();
        let h1 = memo.hash_path(&f).unwrap().unwrap();
        assert_eq!(h1.hash, ContentHash::of_bytes(b"hello"));
        std::fs::write(&f, b"jello").unwrap(); // same size, same tick
        let h2 = memo.hash_path(&f).unwrap().unwrap();
        assert_eq!(h2.hash, ContentHash::of_bytes(b"jello"));
        assert!(memo.hash_path(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn tree_roundtrip_and_dir_hash_changes_with_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d/sub")).unwrap();
        std::fs::write(dir.path().join("d/x"), b"1").unwrap();
        std::fs::write(dir.path().join("d/sub/y"), b"2").unwrap();
        let memo = HashMemo::in_memory();
        let t = memo.tree(&dir.path().join("d")).unwrap();
        assert_eq!(decode_tree(&encode_tree(&t)).unwrap(), t);
        // The listing's bytes, pinned: a change to them changes every directory's hash.
        let (h1, h2) = (ContentHash::of_bytes(b"1"), ContentHash::of_bytes(b"2"));
        assert_eq!(
            String::from_utf8(encode_tree(&t)).unwrap(),
            format!(
                r#"{{"format":"dagrun-tree/3","entries":[{{"type":"file","path":"sub/y","hash":"{h2}","size":1,"exec":false}},{{"type":"file","path":"x","hash":"{h1}","size":1,"exec":false}}]}}"#
            )
        );
        // A name with a newline is just a name: it forges nothing.
        std::fs::write(dir.path().join("d/a\nF 1 x run_me.sh"), b"3").unwrap();
        let t = memo.tree(&dir.path().join("d")).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(decode_tree(&encode_tree(&t)).unwrap(), t);
        let h1 = memo.hash_path(&dir.path().join("d")).unwrap().unwrap();
        assert!(h1.dir);
        std::fs::write(dir.path().join("d/sub/y"), b"3").unwrap();
        let h2 = memo.hash_path(&dir.path().join("d")).unwrap().unwrap();
        assert_ne!(h1.hash, h2.hash);
    }

    #[test]
    fn listings_with_unsafe_entries_are_refused() {
        let h = ContentHash::of_bytes(b"1");
        let f = |p: &str| TreeEntry::File { path: p.into(), hash: h.clone(), size: Some(1), exec: false };
        let l = |p: &str, t: &str| TreeEntry::Link { path: p.into(), target: t.into() };
        for (entries, why) in [
            (vec![f("/etc/passwd")], "absolute"),
            (vec![f("../x")], ".."),
            (vec![f("a/../../x")], ".."),
            (vec![f("a//b")], "empty component"),
            (vec![f("./a")], "`.`"),
            (vec![f("")], "empty path"),
            (vec![f("a\0b")], "NUL"),
            (vec![f("b"), f("a")], "out of order"),
            (vec![f("a"), f("a")], "out of order"),
            (vec![l("l", "/etc"), f("l/passwd")], "below another entry"),
            (vec![f("a"), f("a/b")], "below another entry"),
        ] {
            let e = decode_tree(&encode_tree(&entries)).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
            assert!(!e.contains("passwd"), "{e}");
        }
        let bad_hash = br#"{"format":"dagrun-tree/3","entries":[{"type":"file","path":"a","hash":"xx/tmp/victim","size":1,"exec":false}]}"#;
        assert!(decode_tree(bad_hash).unwrap_err().contains("64 lowercase hex"));
        // Sizes: required in /3, absent in /2 (still read), never negative or fractional.
        let entry = |format: &str, size: &str| {
            format!(r#"{{"format":"dagrun-tree/{format}","entries":[{{"type":"file","path":"a","hash":"{h}"{size},"exec":false}}]}}"#)
        };
        assert!(decode_tree(entry("3", "").as_bytes()).unwrap_err().contains("without a size"));
        assert!(decode_tree(entry("2", r#","size":1"#).as_bytes()).unwrap_err().contains("with a size"));
        assert_eq!(decode_tree(entry("2", "").as_bytes()).unwrap(), vec![TreeEntry::File { path: "a".into(), hash: h.clone(), size: None, exec: false }]);
        assert_eq!(decode_tree(entry("3", r#","size":1"#).as_bytes()).unwrap(), vec![f("a")]);
        for bad in [r#","size":-1"#, r#","size":1.5"#, r#","size":"1""#] {
            assert!(decode_tree(entry("3", bad).as_bytes()).is_err(), "{bad}");
        }
        assert!(decode_tree(entry("4", r#","size":1"#).as_bytes()).unwrap_err().contains("unknown listing format"));
        assert!(decode_tree(b"dagrun-tree/1\nF 0 abc /etc/x\n").is_err());
        assert!(decode_tree(&encode_tree(&[l("a", "../../etc"), f("b/c")])).is_ok());
    }

    /// Review 36 #3 and #11: the racy window is the timestamp's granularity
    /// (whole seconds on ext3, small ext4 inodes, many network file systems)
    /// past 50 ms, and it starts at the ctime (an mtime `touch -d` put in the
    /// future no longer makes a file be read on every run).
    #[test]
    fn racy_window_follows_the_timestamp_granularity() {
        const S: i128 = 1_000_000_000;
        assert_eq!(racy_window(5 * S), RACY_NS + 2 * S);
        assert_eq!(racy_window(5 * S + 123_000_000), RACY_NS + 1_000_000);
        assert_eq!(racy_window(5 * S + 123_456_789), RACY_NS + 1);
        // Hashed 0.5 s after a whole-second ctime: a same-size edit later in
        // that second keeps size, mtime and ctime: not trusted.
        assert!(!settled_before(5 * S, 5 * S + S / 2));
        assert!(settled_before(5 * S, 7 * S + RACY_NS + 1));
        assert!(settled_before(5 * S + 123_456_789, 5 * S + 123_456_789 + RACY_NS + 2));
    }

    #[test]
    fn a_file_whose_mtime_is_in_the_future_is_trusted_once_its_ctime_settled() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"hello").unwrap();
        let file = std::fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(86_400)).unwrap();
        drop(file);
        let meta = std::fs::metadata(&f).unwrap();
        let window = racy_window(stamp(&meta).1);
        std::thread::sleep(std::time::Duration::from_nanos(window as u64 + 1_000_000));
        let memo = HashMemo::in_memory();
        memo.hash_path(&f).unwrap().unwrap();
        assert_eq!(memo.trusted(&f, &std::fs::metadata(&f).unwrap()), Some(ContentHash::of_bytes(b"hello")));
    }

    /// Review 36 #4 and review 37: links that lead out of the workspace
    /// from a folder input are followed (each place once; a cycle is left
    /// out); links inside the workspace, to a folder holding it, to a device,
    /// and a folder without links, hash as the listing (no key changes).
    #[test]
    fn a_folder_inputs_links_out_of_the_workspace_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        let (d, shared) = (ws.join("d"), dir.path().join("shared"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(d.join("local"), b"l").unwrap();
        std::fs::write(ws.join("other"), b"o").unwrap();
        for (link, to) in [("inner", "local"), ("sibling", "../other"), ("up", ".."), ("root", "/"), ("null", "/dev/null"), ("dangling", "../../nowhere")] {
            std::os::unix::fs::symlink(to, d.join(link)).unwrap();
        }
        let memo = HashMemo::in_memory();
        let listing = |memo: &HashMemo| memo.hash_path(&d).unwrap().unwrap().hash;
        assert_eq!(memo.hash_input(&d, &ws).unwrap().unwrap(), listing(&memo));
        std::fs::write(shared.join("t.csv"), b"v1").unwrap();
        std::os::unix::fs::symlink("../../shared/t.csv", d.join("train.csv")).unwrap();
        let v1 = memo.hash_input(&d, &ws).unwrap().unwrap();
        assert_ne!(v1, listing(&memo));
        std::fs::write(shared.join("t.csv"), b"v2").unwrap();
        let v2 = memo.hash_input(&d, &ws).unwrap().unwrap();
        assert_ne!(v1, v2);
        // Editing a file in the workspace that a link leads to is not this input's change.
        std::fs::write(ws.join("other"), b"p").unwrap();
        assert_eq!(memo.hash_input(&d, &ws).unwrap().unwrap(), v2);
        // A cycle of links between two folders outside: hashed, once, no error.
        std::os::unix::fs::symlink(&d, shared.join("back")).unwrap();
        std::os::unix::fs::symlink(&shared, d.join("out")).unwrap();
        let c = memo.hash_input(&d, &ws).unwrap().unwrap();
        assert_eq!(memo.hash_input(&d, &ws).unwrap().unwrap(), c);
    }

    /// Review 38: a link whose text keeps it in the folder costs no system
    /// call; one climbing out, absolute, or passing through another link is
    /// resolved.
    #[test]
    fn stays_inside_reads_the_link_text() {
        let links: HashSet<&str> = ["a/l", "b/link", "b/to-dir"].into_iter().collect();
        assert!(stays_inside("a/l", "x", &links));
        assert!(stays_inside("a/l", "../b/x", &links));
        assert!(stays_inside("a/l", "./../b/./x", &links));
        assert!(stays_inside("b/link", "to-dir", &links), "a link to a link: that one is resolved on its own");
        assert!(!stays_inside("a/l", "../../x", &links));
        assert!(!stays_inside("a/l", "/etc/x", &links));
        assert!(!stays_inside("a/l", "../b/to-dir/x", &links));
        assert!(!stays_inside("a/l", "../b/to-dir/../x", &links));
    }
}
