//! Content hashes of files and directories, memoized so a no-op run reads no data.
//!
//! A file's hash is blake3 of its bytes. A directory's hash is blake3 of its
//! *tree listing*: the line `dagrun-tree/1`, then one line per regular file
//! below it, sorted by relative path: `F <exec 0|1> <blake3> <relative/path>`,
//! and `L <target> <relative/path>` for a symlink (not followed). Empty
//! directories and dagrun's temporary files are not listed. The listing is also
//! the directory's object in the content-addressed store.
//!
//! The memo (`.dagrun/hashmemo.json`) maps an absolute path to
//! (size, mtime ns, ctime ns, inode, hash). An entry is trusted only if the file
//! was last modified clearly before it was hashed (a "racy" entry, modified in
//! the same clock tick as the hashing, is re-read next time, as git does with its
//! index), so an edit that keeps the size is still seen.
//!
//! Exception, [`HashMemo::settle`]: an output that dagrun itself wrote (built-in
//! kinds write to a temp file and rename it into place; the stage has finished,
//! so nothing else writes it) and hashed after it was complete is trusted at
//! once, even though it was hashed within the racy window, and its entry
//! follows the ctime change of dagrun's own chmod/hard link into the cache.
//! So the first no-op run after a cold run reads no data. `cmd` outputs are
//! never settled: a process the command left behind could still write them.

use crate::util::atomic::{Durability, is_temp_name, write_atomic_with};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Files modified less than this before hashing are re-read next time.
const RACY_NS: i128 = 50_000_000;

/// A hashed path.
#[derive(Debug, Clone, PartialEq)]
pub struct Hashed {
    pub hash: String,
    pub size: u64,
    pub dir: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemoEntry {
    size: u64,
    mtime: i128,
    ctime: i128,
    ino: u64,
    hash: String,
    hashed_at: i128,
}

/// The file-hash memo of one workspace.
pub struct HashMemo {
    file: PathBuf,
    entries: Mutex<HashMap<String, MemoEntry>>,
    dirty: AtomicBool,
}

pub fn now_ns() -> i128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

#[cfg(unix)]
fn stamp(m: &std::fs::Metadata) -> (i128, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        m.ino(),
    )
}

#[cfg(unix)]
fn is_exec(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o111 != 0
}

/// blake3 of a file's bytes (memory-mapped for large files).
pub fn hash_file_bytes(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len >= 1 << 20 {
        h.update_mmap(path).with_context(|| format!("cannot read {}", path.display()))?;
    } else {
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// One entry of a directory tree listing.
#[derive(Debug, Clone, PartialEq)]
pub enum TreeEntry {
    File { path: String, hash: String, exec: bool },
    Link { path: String, target: String },
}

/// Encode a tree listing (entries must be sorted by path).
pub fn encode_tree(entries: &[TreeEntry]) -> Vec<u8> {
    let mut s = String::from("dagrun-tree/1\n");
    for e in entries {
        match e {
            TreeEntry::File { path, hash, exec } => s.push_str(&format!("F {} {hash} {path}\n", u8::from(*exec))),
            TreeEntry::Link { path, target } => s.push_str(&format!("L {target} {path}\n")),
        }
    }
    s.into_bytes()
}

/// Decode a tree listing.
pub fn decode_tree(bytes: &[u8]) -> Option<Vec<TreeEntry>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "dagrun-tree/1" {
        return None;
    }
    let mut out = Vec::new();
    for l in lines {
        let mut it = l.splitn(4, ' ');
        match it.next()? {
            "F" => {
                let exec = it.next()? == "1";
                let hash = it.next()?.to_string();
                out.push(TreeEntry::File { path: it.next()?.to_string(), hash, exec });
            }
            "L" => {
                let mut it = l[2..].splitn(2, ' ');
                let target = it.next()?.to_string();
                out.push(TreeEntry::Link { path: it.next()?.to_string(), target });
            }
            _ => return None,
        }
    }
    Some(out)
}

impl HashMemo {
    /// Load the memo of a workspace (a missing or unreadable memo is empty).
    pub fn load(dagrun_dir: &Path) -> HashMemo {
        let file = dagrun_dir.join("hashmemo.json");
        let entries = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        HashMemo { file, entries: Mutex::new(entries), dirty: AtomicBool::new(false) }
    }

    /// An empty memo that is never saved.
    pub fn in_memory() -> HashMemo {
        HashMemo { file: PathBuf::new(), entries: Mutex::new(HashMap::new()), dirty: AtomicBool::new(false) }
    }

    /// Save the memo if it changed (atomically).
    pub fn save(&self) -> Result<()> {
        if self.file.as_os_str().is_empty() || !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let bytes = {
            let e = self.entries.lock().unwrap();
            serde_json::to_vec(&*e)?
        };
        write_atomic_with(&self.file, &bytes, Durability::Verified)
    }

    /// Hash a regular file, using the memo when the file is unchanged.
    pub fn hash_file(&self, path: &Path, meta: &std::fs::Metadata) -> Result<String> {
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
    fn trusted(&self, path: &Path, meta: &std::fs::Metadata) -> Option<String> {
        let (mtime, ctime, ino) = stamp(meta);
        let entries = self.entries.lock().unwrap();
        let e = entries.get(path.to_string_lossy().as_ref())?;
        (e.size == meta.len() && e.mtime == mtime && e.ctime == ctime && e.ino == ino && e.hashed_at - mtime.max(ctime) > RACY_NS)
            .then(|| e.hash.clone())
    }

    /// Record a hash computed elsewhere (e.g. while copying the file into the
    /// cache); `hashed_at` is when reading started (see the racy rule above).
    pub fn record(&self, path: &Path, meta: &std::fs::Metadata, hash: &str, hashed_at: i128) {
        let (mtime, ctime, ino) = stamp(meta);
        let e = MemoEntry { size: meta.len(), mtime, ctime, ino, hash: hash.to_string(), hashed_at };
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
        let under: Vec<String> = entries
            .keys()
            .filter(|k| k.as_str() == key.as_ref() || (k.starts_with(key.as_ref()) && k.as_bytes().get(key.len()) == Some(&b'/')))
            .cloned()
            .collect();
        for k in under {
            let now = std::fs::symlink_metadata(&k).ok().filter(|m| m.is_file()).map(|m| (m.len(), stamp(&m)));
            let e = entries.get_mut(&k).expect("key listed above");
            match now {
                Some((size, (mtime, ctime, ino))) if size == e.size && mtime == e.mtime && ino == e.ino => {
                    e.ctime = ctime;
                    e.hashed_at = e.hashed_at.max(mtime.max(ctime) + RACY_NS + 1);
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
        e.retain(|k, _| !(k == key.as_ref() || (k.starts_with(key.as_ref()) && k.as_bytes().get(key.len()) == Some(&b'/'))));
        self.dirty.store(true, Ordering::Release);
    }

    /// Hash a file or directory; `Ok(None)` if it does not exist.
    pub fn hash_path(&self, path: &Path) -> Result<Option<Hashed>> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if meta.is_dir() {
            let entries = self.tree(path)?;
            let size = entries.len() as u64;
            let bytes = encode_tree(&entries);
            Ok(Some(Hashed { hash: blake3::hash(&bytes).to_hex().to_string(), size, dir: true }))
        } else {
            Ok(Some(Hashed { hash: self.hash_file(path, &meta)?, size: meta.len(), dir: false }))
        }
    }

    /// The sorted tree listing of a directory.
    pub fn tree(&self, dir: &Path) -> Result<Vec<TreeEntry>> {
        let mut out = Vec::new();
        self.walk(dir, "", &mut out)?;
        out.sort_by(|a, b| tree_path(a).cmp(tree_path(b)));
        Ok(out)
    }

    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<TreeEntry>) -> Result<()> {
        let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for ent in rd {
            let ent = ent.with_context(|| format!("cannot list {}", dir.display()))?;
            let name = ent.file_name().to_string_lossy().into_owned();
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
                out.push(TreeEntry::File { hash: self.hash_file(&p, &meta)?, exec: is_exec(&meta), path: rel });
            }
        }
        Ok(())
    }
}

fn tree_path(e: &TreeEntry) -> &str {
    match e {
        TreeEntry::File { path, .. } | TreeEntry::Link { path, .. } => path,
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
        let want = blake3::hash(b"written by a built-in kind").to_hex().to_string();
        assert_eq!(memo.trusted(&f, &std::fs::metadata(&f).unwrap()), Some(want));
        // A later edit (new mtime, size) is still seen.
        let mut perm = std::fs::metadata(&f).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&f, perm).unwrap();
        std::fs::write(&f, b"edited").unwrap();
        assert!(memo.trusted(&f, &std::fs::metadata(&f).unwrap()).is_none());
        assert_eq!(memo.hash_path(&f).unwrap().unwrap().hash, blake3::hash(b"edited").to_hex().to_string());
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
        assert_eq!(memo.hash_path(&f).unwrap().unwrap().hash, blake3::hash(b"three").to_hex().to_string());
    }

    #[test]
    fn memo_skips_rereads_but_sees_edits() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"hello").unwrap();
        let memo = HashMemo::in_memory();
        let h1 = memo.hash_path(&f).unwrap().unwrap();
        assert_eq!(h1.hash, blake3::hash(b"hello").to_hex().to_string());
        std::fs::write(&f, b"jello").unwrap(); // same size, same tick
        let h2 = memo.hash_path(&f).unwrap().unwrap();
        assert_eq!(h2.hash, blake3::hash(b"jello").to_hex().to_string());
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
        let h1 = memo.hash_path(&dir.path().join("d")).unwrap().unwrap();
        assert!(h1.dir);
        std::fs::write(dir.path().join("d/sub/y"), b"3").unwrap();
        let h2 = memo.hash_path(&dir.path().join("d")).unwrap().unwrap();
        assert_ne!(h1.hash, h2.hash);
    }
}
