//! The content-addressed store: `.dagrun/cache/objects/AB/CDEF…`, one file per
//! blake3 hash. Objects are written atomically and read back only after their
//! hash is checked, so a corrupted object is never served. A directory is
//! stored as its files plus its tree listing (see `hashing`).
//!
//! Sensitive outputs (plaintext PII) are never stored here.
//!
//! Rules: an object's path is built only from a [`ContentHash`] (never from
//! text read from disk); objects are opened without following symlinks; a
//! directory listing is decoded and every entry validated before a restore
//! writes anything, and a restore builds the directory in a fresh staging
//! folder, never writing through a symlink.

use super::hash::ContentHash;
use super::hashing::{HashMemo, TreeEntry, decode_tree, encode_tree};
use crate::util::atomic::{AtomicFile, Durability, sync_parent};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A store rooted at a directory.
pub struct Cas {
    root: PathBuf,
    /// Remove damage (a non-file at an object's path) when met.
    heal: bool,
}

/// Open a file for reading without following a symlink at its last component.
fn open_nofollow(p: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW);
    }
    o.open(p)
}

/// Copy `src` to `dst` (a new temporary file) while hashing; returns the hash.
fn copy_hashing(src: &Path, dst: &mut AtomicFile) -> Result<ContentHash> {
    // A regular file only: a FIFO swapped in after the output was hashed is
    // refused, never waited on while the run holds the lock.
    let mut f = crate::util::open_regular(src).with_context(|| format!("cannot read {}", src.display()))?;
    copy_from(&mut f, src, dst)
}

fn copy_from(f: &mut std::fs::File, src: &Path, dst: &mut AtomicFile) -> Result<ContentHash> {
    let mut h = blake3::Hasher::new();
    // Sized to the file (one read for a small one): a fresh zeroed 256 KiB
    // buffer per small output was most of the cost of storing it.
    let len = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    let mut buf = vec![0u8; len.saturating_add(1).clamp(4096, 256 * 1024) as usize];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", src.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        dst.writer().write_all(&buf[..n]).with_context(|| format!("cannot write {}", dst.temp_path().display()))?;
    }
    Ok(ContentHash::from(h.finalize()))
}

impl Cas {
    pub fn new(ws: &super::Workspace) -> Cas {
        Cas { root: ws.objects_dir(), heal: true }
    }

    /// Path of an object: `objects/AB/CDEF…` from a checked hash only.
    pub fn object_path(&self, hash: &ContentHash) -> PathBuf {
        let (a, b) = hash.as_str().split_at(2);
        self.root.join(a).join(b)
    }

    /// A store that never changes anything while checking (for `verify`).
    pub fn read_only(ws: &super::Workspace) -> Cas {
        Cas { root: ws.objects_dir(), heal: false }
    }

    /// Is there a regular file at the object's path?
    pub fn has(&self, hash: &ContentHash) -> bool {
        self.heal(hash);
        std::fs::symlink_metadata(self.object_path(hash)).is_ok_and(|m| m.is_file())
    }

    /// Anything but a regular file at an object's path (a directory, a
    /// symlink: the store never makes those) is damage: remove it with a
    /// warning, so the object is recomputed and stored again instead of
    /// blocking its name forever. (Not in a read-only store.)
    fn heal(&self, hash: &ContentHash) {
        if !self.heal {
            return;
        }
        let p = self.object_path(hash);
        let Ok(m) = std::fs::symlink_metadata(&p) else { return };
        if m.is_file() {
            return;
        }
        let what = if m.is_dir() { "a directory" } else { "not a regular file" };
        let removed = if m.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        let short = hash.short();
        match removed {
            Ok(()) => tracing::warn!("cache object {short} is {what}, not a file: removed it (what needs it is recomputed)"),
            Err(e) => tracing::warn!("cache object {short} is {what}, not a file, and cannot be removed: {e}"),
        }
    }

    /// Store a file whose hash is expected to be `hash`.
    pub fn put_file(&self, src: &Path, hash: &ContentHash) -> Result<()> {
        if self.has(hash) {
            return Ok(());
        }
        let dest = self.object_path(hash);
        let mut tmp = AtomicFile::create_unbuffered(&dest, Durability::Verified)?;
        let got = copy_hashing(src, &mut tmp)?;
        if &got != hash {
            bail!("{} changed while it was being stored in the cache; rerun", src.display());
        }
        tmp.commit()?;
        set_readonly(&dest);
        Ok(())
    }

    /// Hash a file while copying it into the store, in one read; returns
    /// (hash, size). The file's memo entry is recorded on the way.
    pub fn ingest_file(&self, src: &Path, memo: &HashMemo) -> Result<(ContentHash, u64)> {
        let before = std::fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
        let started = super::hashing::now_ns();
        std::fs::create_dir_all(&self.root)?;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging = self.root.join(format!(".ingest{}{}.{seq}", crate::util::atomic::TEMP_MARKER, std::process::id()));
        let mut tmp = AtomicFile::create_unbuffered(&staging, Durability::Verified)?;
        let hash = copy_hashing(src, &mut tmp)?;
        let after = std::fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
        if before.len() != after.len() || before.modified().ok() != after.modified().ok() {
            bail!("{} changed while it was being stored in the cache; rerun", src.display());
        }
        let dest = self.object_path(&hash);
        if self.has(&hash) {
            drop(tmp);
        } else {
            // Commit under the (unique) staging name, then move to the object's name.
            tmp.commit()?;
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create the cache folder {}", parent.display()))?;
            }
            std::fs::rename(&staging, &dest).with_context(|| format!("cannot store {} in the cache", src.display()))?;
            set_readonly(&dest);
        }
        memo.record(src, &after, &hash, started);
        Ok((hash, after.len()))
    }

    /// Store a file that dagrun itself wrote (built-in kinds replace their
    /// outputs by rename, never in place) by hard-linking it into the store:
    /// no copy. The shared inode is made read-only. Falls back to a copy
    /// across file systems. Returns (hash, size).
    pub fn link_file(&self, src: &Path, memo: &HashMemo) -> Result<(ContentHash, u64)> {
        let meta = std::fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
        let hash = memo.hash_file(src, &meta)?;
        let dest = self.object_path(&hash);
        if !self.has(&hash) {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create the cache folder {}", parent.display()))?;
            }
            set_readonly(src);
            match std::fs::hard_link(src, &dest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(_) => return self.ingest_file(src, memo),
            }
        }
        Ok((hash, meta.len()))
    }

    /// Store bytes (a tree listing) under their hash.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<ContentHash> {
        let hash = ContentHash::of_bytes(bytes);
        if !self.has(&hash) {
            let dest = self.object_path(&hash);
            crate::util::atomic::write_atomic_with(&dest, bytes, Durability::Verified)?;
            set_readonly(&dest);
        }
        Ok(hash)
    }

    /// Store a file or directory output; `hash`/`dir` as computed by `hashing`.
    pub fn put(&self, src: &Path, hash: &ContentHash, dir: bool, memo: &HashMemo) -> Result<()> {
        if !dir {
            return self.put_file(src, hash);
        }
        let entries = memo.tree(src)?;
        for e in &entries {
            if let TreeEntry::File { path, hash, .. } = e {
                self.put_file(&src.join(path), hash)?;
            }
        }
        let got = self.put_bytes(&encode_tree(&entries))?;
        if &got != hash {
            bail!("{} changed while it was being stored in the cache; rerun", src.display());
        }
        Ok(())
    }

    /// Is the object present and intact? Corrupted objects are removed.
    pub fn check(&self, hash: &ContentHash) -> Result<bool> {
        let p = self.object_path(hash);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => {}
            Ok(m) => {
                // Something that is not a file sits where the object should be.
                if self.heal {
                    let _ = if m.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                }
                return Ok(false);
            }
            Err(_) => return Ok(false),
        }
        let got = super::hashing::hash_file_bytes(&p)?;
        if &got != hash {
            let _ = std::fs::remove_file(&p);
            return Ok(false);
        }
        Ok(true)
    }

    /// Can `hash` (a file, or a directory with all its files) be restored?
    pub fn restorable(&self, hash: &ContentHash, dir: bool) -> bool {
        if !self.has(hash) {
            return false;
        }
        if !dir {
            return true;
        }
        match self.read_listing(hash) {
            Ok(entries) => entries.iter().all(|e| match e {
                TreeEntry::File { hash, .. } => self.has(hash),
                TreeEntry::Link { .. } => true,
            }),
            Err(_) => false,
        }
    }

    /// Read a directory listing object: its bytes must hash to `hash` and
    /// every entry must be valid (`hashing::decode_tree`).
    pub fn read_listing(&self, hash: &ContentHash) -> Result<Vec<TreeEntry>> {
        let p = self.object_path(hash);
        let mut f = open_nofollow(&p).with_context(|| format!("cache object {} is missing", hash.short()))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).with_context(|| format!("cache object {} is unreadable", hash.short()))?;
        if &ContentHash::of_bytes(&bytes) != hash {
            if self.heal {
                let _ = std::fs::remove_file(&p);
            }
            bail!("cache object {} (a directory listing) is corrupted; it was removed", hash.short());
        }
        decode_tree(&bytes).map_err(|why| anyhow::anyhow!("cache object {} is not a valid directory listing: {why}", hash.short()))
    }

    /// Copy object `hash` to `dest` atomically, verifying its hash on the way.
    /// A corrupted object is deleted and reported as an error.
    pub fn restore_file(&self, hash: &ContentHash, dest: &Path, exec: bool) -> Result<()> {
        let obj = self.object_path(hash);
        let mut f = open_nofollow(&obj).with_context(|| format!("cache object {hash} is missing or not a file"))?;
        let mut tmp = AtomicFile::create(dest)?;
        let got = copy_from(&mut f, &obj, &mut tmp).with_context(|| format!("cache object {hash} is unreadable"))?;
        if &got != hash {
            drop(tmp);
            let _ = std::fs::remove_file(&obj);
            bail!("cache object {} is corrupted (its content hashes to {}); it was removed", hash.short(), got.short());
        }
        // The execute bit where the file is readable (as `chmod +x` under the
        // umask: 0644 → 0755, 0600 → 0700), never wider than the umask made it.
        #[cfg(unix)]
        if exec {
            use std::os::unix::fs::PermissionsExt;
            let f = tmp.writer().get_ref();
            if let Ok(m) = f.metadata() {
                let mode = m.permissions().mode() & 0o777;
                let _ = f.set_permissions(std::fs::Permissions::from_mode(mode | ((mode & 0o444) >> 2)));
            }
        }
        tmp.commit()
    }

    /// Restore a file or directory output at `dest`.
    pub fn restore(&self, hash: &ContentHash, dir: bool, exec: bool, dest: &Path) -> Result<()> {
        if !dir {
            if std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir_all(dest)?;
            }
            return self.restore_file(hash, dest, exec);
        }
        // Every entry is validated before anything is written.
        let entries = self.read_listing(hash)?;
        // Build beside the destination in a fresh folder, then swap it in.
        let name = dest.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let staging = dest.with_file_name(format!(".{name}{}restore.{}", crate::util::atomic::TEMP_MARKER, std::process::id()));
        let _ = crate::util::fs_remove(&staging);
        if let Some(parent) = staging.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // create_dir (not _all): fails rather than reuse anything planted there.
        std::fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        for e in &entries {
            match e {
                TreeEntry::File { path, hash, exec, .. } => self.restore_file(hash, &staging.join(path), *exec)?,
                TreeEntry::Link { path, target } => {
                    let p = staging.join(path);
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
                    }
                    #[cfg(unix)]
                    std::os::unix::fs::symlink(target, &p)?;
                }
            }
        }
        if dest.symlink_metadata().is_ok() {
            let trash = dest.with_file_name(format!(".{name}{}old.{}", crate::util::atomic::TEMP_MARKER, std::process::id()));
            std::fs::rename(dest, &trash)?;
            std::fs::rename(&staging, dest)?;
            let _ = crate::util::fs_remove(&trash);
        } else {
            std::fs::rename(&staging, dest)?;
        }
        sync_parent(dest);
        Ok(())
    }

    /// Every object hash in the store (names that are not hashes are left
    /// out; `verify` reports them).
    pub fn list(&self) -> Vec<ContentHash> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for d in rd.flatten() {
                let a = d.file_name().to_string_lossy().into_owned();
                if let Ok(rd2) = std::fs::read_dir(d.path()) {
                    for f in rd2.flatten() {
                        let b = f.file_name().to_string_lossy().into_owned();
                        if !crate::util::atomic::is_temp_name(&b)
                            && let Ok(h) = ContentHash::parse(&format!("{a}{b}"))
                        {
                            out.push(h);
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }
}

fn set_readonly(p: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_restore_and_detect_corruption() {
        let ws = tempfile::tempdir().unwrap();
        let cas = Cas::new(&crate::workspace::Workspace::at(ws.path()));
        let memo = HashMemo::in_memory();
        let f = ws.path().join("out.txt");
        std::fs::write(&f, b"payload").unwrap();
        let h = memo.hash_path(&f).unwrap().unwrap();
        cas.put(&f, &h.hash, false, &memo).unwrap();
        std::fs::remove_file(&f).unwrap();
        cas.restore(&h.hash, false, false, &f).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"payload");
        // Flip a byte of the object: restore must refuse and drop it.
        let obj = cas.object_path(&h.hash);
        let mut perms = std::fs::metadata(&obj).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&obj, perms).unwrap();
        std::fs::write(&obj, b"pazload").unwrap();
        std::fs::remove_file(&f).unwrap();
        let err = cas.restore(&h.hash, false, false, &f).unwrap_err().to_string();
        assert!(err.contains("corrupted"), "{err}");
        assert!(!f.exists() && !cas.has(&h.hash));
    }

    #[test]
    fn directories_roundtrip() {
        let ws = tempfile::tempdir().unwrap();
        let cas = Cas::new(&crate::workspace::Workspace::at(ws.path()));
        let memo = HashMemo::in_memory();
        let d = ws.path().join("d");
        std::fs::create_dir_all(d.join("s")).unwrap();
        std::fs::write(d.join("a"), b"1").unwrap();
        std::fs::write(d.join("s/b"), b"2").unwrap();
        let h = memo.hash_path(&d).unwrap().unwrap();
        cas.put(&d, &h.hash, true, &memo).unwrap();
        assert!(cas.restorable(&h.hash, true));
        std::fs::write(d.join("a"), b"edited").unwrap();
        std::fs::write(d.join("extra"), b"x").unwrap();
        cas.restore(&h.hash, true, false, &d).unwrap();
        assert_eq!(memo.hash_path(&d).unwrap().unwrap().hash, h.hash);
        assert!(!d.join("extra").exists());
    }
}
