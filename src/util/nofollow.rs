//! Writing without following symlinks.
//!
//! # Rules
//! - [`Dir`] opens a directory below a root one component at a time with
//!   `openat(O_DIRECTORY | O_NOFOLLOW)`: a symlink anywhere on the way is an
//!   error naming it, never followed. Files are then created relative to that
//!   directory handle, so a link planted after the check cannot redirect them.
//! - [`Dir::create_fresh`] removes whatever has the name (a planted symlink or
//!   hard link, an old log) and creates a new file with `O_CREAT | O_EXCL |
//!   O_NOFOLLOW` and the given mode: it never writes into an existing inode.
//! - [`check_write_path`] is the write-time check for paths that dagrun (or a
//!   command it starts) is about to write: every symlink on the way must
//!   resolve inside the root and outside its protected folders.
//!   [`check_write_paths`] checks many paths in one pass (a pipeline's
//!   outputs when it loads): a folder met on the way of several paths is
//!   looked at once ([`CheckedDirs`]), not once per path below it.
//! - [`open_own_file`] opens a file dagrun keeps writing to in place (an
//!   append-only log, the lock): never through a symlink (`O_NOFOLLOW`),
//!   never a FIFO or device (`O_NONBLOCK`, then a regular-file check: a FIFO
//!   there would block a run forever, holding the lock), and never a file
//!   with another name elsewhere (a hard link: one link only).
//! - [`Dir::remove_tree`] deletes a folder below a directory handle with
//!   `unlinkat` and `openat(O_NOFOLLOW)` only: a link met anywhere (swapped
//!   in while it runs) is unlinked itself, never followed, so nothing outside
//!   the folder is ever deleted (helper-73: `remove_dir_all` by path went
//!   through a parent swapped for a link).

use anyhow::{Context, Result, anyhow, bail};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Open `path` with `opts` as a file of dagrun's own (see the module's rules).
pub fn open_own_file(opts: &mut std::fs::OpenOptions, path: &Path) -> Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            anyhow!("{} is a symlink; dagrun never writes through a link there: remove it (and check who planted it)", path.display())
        } else if e.raw_os_error() == Some(libc::ENXIO) {
            // A FIFO opened for writing without a reader (O_NONBLOCK).
            anyhow!("{} is not a regular file (a FIFO); remove it (and check who put it there)", path.display())
        } else {
            anyhow::Error::from(e).context(format!("cannot open {}", path.display()))
        }
    })?;
    let meta = f.metadata().with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file; remove it (and check who put it there)", path.display());
    }
    if meta.nlink() != 1 {
        bail!(
            "{} has {} names (a hard link to a file elsewhere); dagrun never writes to it: remove it (and check who made the link)",
            path.display(),
            meta.nlink()
        );
    }
    Ok(f)
}

/// An open directory reached without following symlinks.
pub struct Dir {
    fd: OwnedFd,
    shown: PathBuf,
}

/// `name` as a C string (for `openat` and friends); a NUL byte is an error.
pub(crate) fn cstr(name: &std::ffi::OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| anyhow!("a path component holds a NUL byte"))
}

impl Dir {
    /// Open `root/rel`, creating missing directories (mode 0755 & umask);
    /// `root` itself may be reached through links (the user chose it), no
    /// component of `rel` may be a symlink.
    pub fn open_or_create(root: &Path, rel: &Path) -> Result<Dir> {
        Self::walk(root, rel, true)
    }

    /// Open `root/rel` without creating anything.
    pub fn open(root: &Path, rel: &Path) -> Result<Dir> {
        Self::walk(root, rel, false)
    }

    fn walk(root: &Path, rel: &Path, create: bool) -> Result<Dir> {
        let croot = cstr(root.as_os_str())?;
        // SAFETY: a valid NUL-terminated path; the fd is owned below.
        let fd = unsafe { libc::open(croot.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot open directory {}", root.display()));
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let mut dir = Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) }, shown: root.to_path_buf() };
        for c in rel.components() {
            let Component::Normal(name) = c else {
                bail!("{}: not a plain relative path below {}", rel.display(), root.display());
            };
            let cname = cstr(name)?;
            let shown = dir.shown.join(name);
            if create {
                // SAFETY: valid dirfd and NUL-terminated name.
                let r = unsafe { libc::mkdirat(dir.fd.as_raw_fd(), cname.as_ptr(), 0o755) };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(e).with_context(|| format!("cannot create directory {}", shown.display()));
                    }
                }
            }
            dir = match dir.child(&cname, shown.clone()) {
                Ok(d) => d,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    bail!("{} is a symlink or not a directory; dagrun never writes through a link there: remove it (and check who planted it)", shown.display())
                }
                Err(e) => return Err(e).with_context(|| format!("cannot open directory {}", shown.display())),
            };
        }
        Ok(dir)
    }

    /// The folder `name` in this one, opened without following a link
    /// (`openat(O_DIRECTORY | O_NOFOLLOW)`), shown as `shown`.
    fn child(&self, name: &std::ffi::CStr, shown: PathBuf) -> std::io::Result<Dir> {
        // SAFETY: valid dirfd and NUL-terminated name.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by openat and is owned by nobody else.
        Ok(Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) }, shown })
    }

    /// `unlinkat(name, flags)` in this folder (never through a link); a
    /// missing `name` is fine.
    fn unlink_at(&self, name: &std::ffi::CStr, flags: libc::c_int) -> std::io::Result<()> {
        // SAFETY: valid dirfd and NUL-terminated name.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), flags) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The directory's descriptor.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// The directory's descriptor as a file (read-only), e.g. to fsync it.
    pub fn into_file(self) -> File {
        File::from(self.fd)
    }

    /// The directory as shown in messages.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Is there an entry `name` (of any type; a link is not followed)?
    pub fn has(&self, name: &std::ffi::OsStr) -> bool {
        let Ok(cname) = cstr(name) else { return false };
        // SAFETY: a zeroed stat is a valid out-buffer for fstatat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid dirfd, NUL-terminated name, a live out-buffer.
        unsafe { libc::fstatat(self.fd.as_raw_fd(), cname.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0 }
    }

    /// Delete the file (or link) `name` in this directory: `unlinkat`, never
    /// through a link. A missing one is fine.
    pub fn unlink(&self, name: &std::ffi::OsStr) -> Result<()> {
        self.unlink_at(&cstr(name)?, 0).with_context(|| format!("cannot delete {}", self.shown.join(name).display()))
    }

    /// Delete `name` (below this directory) and, when it is a folder,
    /// everything in it, never following a link (module rules). A missing
    /// `name` is fine.
    pub fn remove_tree(&self, name: &std::ffi::OsStr) -> Result<()> {
        let cname = cstr(name)?;
        let shown = self.shown.join(name);
        // A plain unlink never follows a link.
        match self.unlink_at(&cname, 0) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR) | Some(libc::EPERM)) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot delete {}", shown.display())),
        }
        // A folder: open it without following a link, empty it, remove it.
        let sub = self.child(&cname, shown.clone()).with_context(|| format!("cannot open {} (a link swapped in?)", shown.display()))?;
        // The names, read through this very handle.
        let names: Vec<std::ffi::OsString> = std::fs::read_dir(format!("/proc/self/fd/{}", sub.fd.as_raw_fd()))
            .with_context(|| format!("cannot list {}", shown.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("cannot list {}", shown.display()))?;
        for n in names {
            sub.remove_tree(&n)?;
        }
        drop(sub);
        self.unlink_at(&cname, libc::AT_REMOVEDIR).with_context(|| format!("cannot delete {}", shown.display()))
    }

    /// Remove `name` if present (a file or a symlink; a directory is an
    /// error), then create it new, empty, with `mode`, not following links.
    pub fn create_fresh(&self, name: &str, mode: u32) -> Result<File> {
        let shown = self.shown.join(name);
        let cname = cstr(std::ffi::OsStr::new(name))?;
        // SAFETY: valid dirfd and NUL-terminated name.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), cname.as_ptr(), 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("cannot replace {}", shown.display()));
            }
        }
        // SAFETY: valid dirfd and NUL-terminated name; the fd is owned below.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                cname.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot create {}", shown.display()));
        }
        // SAFETY: fd is a fresh, owned file descriptor.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// What [`open_resolved`] found.
pub enum Resolved {
    /// `root/rel` does not exist (now).
    Missing,
    /// It leads outside `root`, to this real path.
    Outside(PathBuf),
    /// It is inside: opened from `root`'s real path with no link followed,
    /// with its real path relative to that root.
    Inside(Dir, PathBuf),
}

/// `root/rel`, a folder that may be reached through links: resolved now and,
/// when inside `root`, opened component by component from `root`'s real
/// path without following a link, so a link swapped in after the resolution
/// is refused, not followed.
pub fn open_resolved(root: &Path, rel: &Path) -> Result<Resolved> {
    let target = match root.join(rel).canonicalize() {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Resolved::Missing),
        Err(e) => return Err(e.into()),
    };
    let croot = root.canonicalize()?;
    match target.strip_prefix(&croot) {
        Ok(inside) => Ok(Resolved::Inside(Dir::open(&croot, inside)?, inside.to_path_buf())),
        Err(_) => Ok(Resolved::Outside(target)),
    }
}

/// Check, now, where writing `rel` below `root` would land: every existing
/// component that is a symlink must resolve (exist) inside `root` and not
/// into one of `protected` (root-relative folder names such as `.dagrun`).
/// `final_link_ok`: whether the last component may itself be a symlink
/// (writers that replace it by rename, or remove it first, never follow it).
pub fn check_write_path(root: &Path, rel: &str, protected: &[&str], final_link_ok: bool) -> std::result::Result<(), String> {
    check_write_paths(root, rel, protected, final_link_ok, &mut CheckedDirs::default())
}

/// Folders below one root already checked in this pass of
/// [`check_write_paths`]: `passed` = every component up to it is a real
/// folder or a link that stays inside the root and outside the protected
/// folders; `missing` = it does not exist (nothing below it does either).
/// Valid for one pass only (a link may be planted later): the write-time
/// checks start with a new one.
#[derive(Default)]
pub struct CheckedDirs {
    passed: std::collections::HashSet<String>,
    missing: std::collections::HashSet<String>,
}

/// [`check_write_path`] for one of several paths checked together: the
/// folders on its way that `seen` holds are not looked at again.
pub fn check_write_paths(root: &Path, rel: &str, protected: &[&str], final_link_ok: bool, seen: &mut CheckedDirs) -> std::result::Result<(), String> {
    // The root's real path is only needed when a link is met (most checks meet none).
    let mut croot: Option<PathBuf> = None;
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    let mut cur = root.to_path_buf();
    let mut prefix = String::new();
    for (i, part) in parts.iter().enumerate() {
        cur.push(part);
        let last = i + 1 == parts.len();
        if !last {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if seen.passed.contains(&prefix) {
                continue;
            }
            if seen.missing.contains(&prefix) {
                break;
            }
        }
        let folder = (!last).then(|| prefix.clone());
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                if last && final_link_ok {
                    return Ok(());
                }
                let shown = cur.strip_prefix(root).unwrap_or(&cur).display().to_string();
                let Ok(target) = cur.canonicalize() else {
                    return Err(format!(
                        "output {rel:?} goes through the symlink {shown}, whose target does not exist; outputs must be real paths inside the workspace"
                    ));
                };
                if croot.is_none() {
                    let Ok(c) = root.canonicalize() else { return Ok(()) };
                    croot = Some(c);
                }
                let inside = croot.as_deref().and_then(|c| target.strip_prefix(c).ok());
                let into = inside.and_then(|r| r.components().next()).and_then(|c| c.as_os_str().to_str()).filter(|top| protected.contains(top));
                match (inside, into) {
                    (None, _) => {
                        return Err(format!(
                            "output {rel:?} goes through the symlink {shown} (→ {}), outside the workspace; outputs must be real paths inside the workspace",
                            target.display()
                        ));
                    }
                    (Some(_), Some(top)) => {
                        return Err(format!(
                            "output {rel:?} goes through the symlink {shown} (→ {}) into {top}/, which no stage may write; remove the link",
                            target.display()
                        ));
                    }
                    _ if last => {
                        return Err(format!("output {rel:?} is a symlink ({shown} → {}); outputs must be real files or folders", target.display()));
                    }
                    // A link to the workspace root itself (`work -> .`): the
                    // rest of the path decides where it lands (`work/config/…`
                    // is config/, review 33), so it is checked for every path
                    // through the link, never cached as passed.
                    (Some(inside), None) if inside.as_os_str().is_empty() => {
                        if let Some(top) = parts.get(i + 1).filter(|top| protected.contains(*top)) {
                            return Err(format!(
                                "output {rel:?} goes through the symlink {shown} (→ {}) into {top}/, which no stage may write; remove the link",
                                target.display()
                            ));
                        }
                    }
                    _ => seen.passed.extend(folder),
                }
            }
            Ok(_) => seen.passed.extend(folder),
            Err(_) => {
                seen.missing.extend(folder);
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// helper-73: a folder removed by path went through a link swapped in.
    #[test]
    fn remove_tree_never_follows_a_link() {
        let d = tempfile::tempdir().unwrap();
        let (ws, outside) = (d.path().join("ws"), d.path().join("outside"));
        std::fs::create_dir_all(ws.join("reg/T/versions")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep.txt"), "x").unwrap();
        std::fs::write(ws.join("reg/T/index.json"), "{}").unwrap();
        std::fs::write(ws.join("reg/T/versions/v.json"), "{}").unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("reg/T/versions/link")).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("reg/U")).unwrap();
        let reg = Dir::open(&ws, Path::new("reg")).unwrap();
        reg.remove_tree(std::ffi::OsStr::new("T")).unwrap();
        reg.remove_tree(std::ffi::OsStr::new("U")).unwrap();
        reg.remove_tree(std::ffi::OsStr::new("missing")).unwrap();
        assert!(!ws.join("reg/T").exists() && ws.join("reg/U").symlink_metadata().is_err());
        assert_eq!(std::fs::read_to_string(outside.join("keep.txt")).unwrap(), "x", "deleted through a link");
    }

    use super::*;

    #[test]
    fn own_files_are_never_links_fifos_or_hard_links() {
        let d = tempfile::tempdir().unwrap();
        let open =
            |name: &str| open_own_file(std::fs::OpenOptions::new().append(true).create(true), &d.path().join(name)).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(open("log"), Ok(()));
        assert_eq!(open("log"), Ok(()));
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("link")).unwrap();
        assert!(open("link").unwrap_err().contains("is a symlink"));
        std::fs::hard_link(&victim, d.path().join("hard")).unwrap();
        assert!(open("hard").unwrap_err().contains("has 2 names"));
        let fifo = cstr(d.path().join("fifo").as_os_str()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(open("fifo").unwrap_err().contains("not a regular file"), "a FIFO must be refused at once, not waited on");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }

    #[test]
    fn links_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let victim = root.join("victim.txt");
        std::fs::write(&victim, "keep").unwrap();
        let d = Dir::open_or_create(root, Path::new(".dagrun/logs")).unwrap();
        std::os::unix::fs::symlink(&victim, root.join(".dagrun/logs/a.out")).unwrap();
        std::fs::hard_link(&victim, root.join(".dagrun/logs/b.out")).unwrap();
        use std::io::Write;
        d.create_fresh("a.out", 0o600).unwrap().write_all(b"new").unwrap();
        d.create_fresh("b.out", 0o600).unwrap().write_all(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(root.join(".dagrun/logs/a.out")).unwrap(), "new");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(root.join(".dagrun/logs/a.out")).unwrap().permissions().mode() & 0o777, 0o600);
        // A symlinked directory on the way is refused.
        std::fs::create_dir(root.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("linked")).unwrap();
        let e = Dir::open_or_create(root, Path::new("linked/logs")).err().unwrap().to_string();
        assert!(e.contains("symlink"), "{e}");
        assert!(!root.join("elsewhere/logs").exists());
    }

    #[test]
    fn write_paths_through_links() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join(".dagrun/keys")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::os::unix::fs::symlink(".dagrun/keys", root.join("cfgkeys")).unwrap();
        std::os::unix::fs::symlink("data", root.join("d2")).unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("tmp")).unwrap();
        let p = &[".dagrun", "config"];
        assert!(check_write_path(root, "cfgkeys/keyring.json", p, false).unwrap_err().contains(".dagrun/"));
        assert!(check_write_path(root, "tmp/x", p, false).unwrap_err().contains("outside"));
        check_write_path(root, "d2/x", p, false).unwrap();
        check_write_path(root, "data/new/x", p, false).unwrap();
        assert!(check_write_path(root, "d2", p, false).is_err());
        check_write_path(root, "d2", p, true).unwrap();
        // A link to the root itself, then a protected folder (review 33).
        std::fs::create_dir_all(root.join("config")).unwrap();
        std::os::unix::fs::symlink(".", root.join("work")).unwrap();
        let mut seen = CheckedDirs::default();
        check_write_paths(root, "work/data/x", p, false, &mut seen).unwrap();
        assert!(check_write_paths(root, "work/config/dagrun.yaml", p, false, &mut seen).unwrap_err().contains("into config/"));
        assert!(check_write_path(root, "work/.dagrun/keys/k", p, false).unwrap_err().contains("into .dagrun/"));
    }

    #[test]
    fn one_pass_looks_at_each_folder_once_with_the_same_verdicts() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join(".dagrun/keys")).unwrap();
        std::fs::create_dir_all(root.join("data/a")).unwrap();
        std::os::unix::fs::symlink(".dagrun", root.join("data/a/k")).unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("data/t")).unwrap();
        std::os::unix::fs::symlink("a", root.join("data/b")).unwrap();
        let p = &[".dagrun", "config"];
        let paths = ["data/a/x", "data/a/k/y", "data/t/z", "data/b/x", "data/b/k/y", "new/q/r", "new/q/s", "data/a", "data/b", "x"];
        let mut seen = CheckedDirs::default();
        for rel in paths {
            for final_ok in [false, true] {
                let alone = check_write_path(root, rel, p, final_ok);
                assert_eq!(check_write_paths(root, rel, p, final_ok, &mut seen), alone, "{rel} {final_ok}");
            }
        }
        assert!(seen.passed.contains("data") && seen.passed.contains("data/a") && seen.passed.contains("data/b"));
        assert!(!seen.passed.contains("data/t") && !seen.passed.contains("data/a/k"), "a refused link never passes");
        assert!(seen.missing.contains("new"));
    }
}
