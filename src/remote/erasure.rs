//! A forgotten tenant on the shared remote: its prefix emptied and a sealed
//! tombstone left in it, which every workspace sharing the remote obeys.
//!
//! Rules:
//! - The tombstone is `PREFIX/tenants/T/erased.json`, a record sealed under
//!   the integrity key the workspaces sharing a remote share (domain
//!   `dagrun-record/remote-erasure/1`): whoever can write to the bucket
//!   without the keys can neither forge one (to stop a tenant's pushes) nor
//!   alter one. It lives in the tenant's own prefix, so a credential scoped
//!   to that prefix reads and writes it; its `tenant` must be the prefix's.
//! - It is written last, after everything it speaks for is deleted: a push
//!   killed mid-erasure leaves no tombstone, and the next push erases again
//!   (deleting is idempotent). `elsewhere` says whether the records outside
//!   the prefix that derive from the tenant were deleted too (a push limited
//!   by `--tenant` cannot look there; a later push without it does).
//! - [`erase_prefix`] deletes every file under the prefix but the
//!   tombstone, whatever its name (on a `file://` remote also the staging
//!   files of a killed push, which the store does not list), the action
//!   entries first: a reader never finds a record whose objects are
//!   already gone.
//! - Only an erasure this workspace proved (`Keyring::erasures`: its own
//!   sealed tombstone, no key of the tenant left) ever deletes; a tombstone
//!   on the remote only ever withholds (push, pull and `run --pull` leave
//!   the tenant alone and say so). One that cannot be read (access denied, a
//!   link loop) withholds too: whether the tenant was erased is unknown. One
//!   that does not verify withholds nothing.

use super::Remote;
use crate::crypto::IntegrityKey;
use crate::workspace::record;
use anyhow::Result;

/// The tombstone's file name in the tenant's prefix.
pub const TOMBSTONE: &str = "erased.json";
/// A tombstone is a few hundred bytes; more is not one.
const TOMBSTONE_MAX: u64 = 4096;

/// What `PREFIX/tenants/T/erased.json` says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    pub format: String,
    pub tenant: String,
    /// When `keys forget` destroyed the tenant's keys (the erasing workspace's tombstone).
    pub forgotten_at: String,
    /// When this remote's copy was erased.
    pub erased_at: String,
    /// Whether records outside the prefix derived from the tenant were deleted too.
    pub elsewhere: bool,
    /// The record's MAC (`workspace::record`), checked before anything is used.
    #[serde(default, skip_serializing)]
    pub mac: Option<String>,
}

const FORMAT: &str = "dagrun-remote-erasure/1";

/// The tenant's tombstone on the remote, as read.
#[derive(Debug)]
pub enum Found {
    None,
    Valid(Tombstone),
    /// A file is there that is not a tombstone this workspace's keys sealed
    /// for this tenant (why): it withholds nothing and proves nothing.
    Untrusted(String),
    /// It could not be read (why: access denied, no answer, a link loop on
    /// a folder remote): whether the tenant was erased is unknown, so it is
    /// withheld, never failing the command.
    Unreadable(String),
}

/// Read tenant `t`'s tombstone.
pub fn read(remote: &Remote, key: &IntegrityKey, t: &str) -> Found {
    let loc = remote.tenant_file(t, TOMBSTONE);
    let bytes = match remote.get_small(&loc, TOMBSTONE_MAX, "a tombstone") {
        Ok(Some(b)) => b,
        Ok(None) => return Found::None,
        Err(e) if super::is_untrusted(&e) => return Found::Untrusted(format!("{e:#}")),
        Err(e) => return Found::Unreadable(format!("{e:#}")),
    };
    let shown = format!("{loc} on {}", remote.shown());
    match record::open::<Tombstone>(Some(key), record::REMOTE_ERASURE, &bytes, &shown) {
        Ok(ts) if ts.format == FORMAT && ts.tenant == t => Found::Valid(ts),
        Ok(_) => Found::Untrusted(format!("{shown} is sealed for another tenant or format")),
        Err(e) => Found::Untrusted(e.to_string()),
    }
}

/// Write tenant `t`'s tombstone (after the erasure it speaks for).
pub fn write(remote: &Remote, key: &IntegrityKey, t: &str, forgotten_at: &str, elsewhere: bool) -> Result<Tombstone> {
    let ts = Tombstone {
        format: FORMAT.to_string(),
        tenant: t.to_string(),
        forgotten_at: forgotten_at.to_string(),
        erased_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        elsewhere,
        mac: None,
    };
    remote.put_small(&remote.tenant_file(t, TOMBSTONE), &record::seal(key, record::REMOTE_ERASURE, &ts)?)?;
    Ok(ts)
}

/// What [`erase_prefix`] deleted.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Erased {
    pub records: usize,
    pub objects: usize,
    /// Files that are neither (a staging file of a killed upload, anything else).
    pub other_files: usize,
    pub bytes: u64,
}

/// Delete every file under tenant `t`'s prefix except its tombstone, the
/// action entries first. Returns what went, and the deletions that failed.
pub fn erase_prefix(remote: &Remote, t: &str) -> Result<(Erased, Vec<String>)> {
    if let Some(dir) = remote.local_dir() {
        return Ok(erase_folder(dir, t));
    }
    let tombstone = remote.tenant_file(t, TOMBSTONE);
    let actions = remote.tenant_file(t, "actions");
    let base = format!("{}/", remote.tenant_dir(t));
    let files: Vec<(object_store::path::Path, u64)> = remote.list_tenant_files(t)?.into_iter().filter(|(p, _)| *p != tombstone).collect();
    let mut erased = Erased::default();
    let mut failed = Vec::new();
    // Action entries first.
    let (first, rest): (Vec<_>, Vec<_>) = files.into_iter().partition(|(p, _)| p.prefix_matches(&actions));
    for wave in [first, rest] {
        let locs: Vec<_> = wave.iter().map(|(p, _)| p.clone()).collect();
        for ((p, size), r) in wave.iter().zip(remote.delete(&locs)) {
            match r {
                Ok(()) => {
                    erased.count(p.as_ref().strip_prefix(base.as_str()).unwrap_or_default(), *size);
                }
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if !failed.is_empty() {
            // No object goes while a record naming it may still be there.
            break;
        }
    }
    Ok((erased, failed))
}

impl Erased {
    /// Count the deleted file `rel` (relative to the tenant's prefix) of `size` bytes.
    fn count(&mut self, rel: &str, size: u64) {
        self.bytes += size;
        match rel.split_once('/') {
            Some(("actions", n)) if n.strip_suffix(".json").is_some_and(super::is_hash) => self.records += 1,
            Some(("objects", n)) if super::is_hash(n) => self.objects += 1,
            _ => self.other_files += 1,
        }
    }
}

/// [`erase_prefix`] on a `file://` remote: the tenant's folder is opened
/// without following a link on the way (a link planted in a shared folder
/// must not lead the erasure elsewhere), and everything in it is deleted
/// through that handle (`Dir::remove_tree`: links unlinked, never followed),
/// the store's unlisted staging files (`objects/…/HASH#N` of a killed push)
/// too.
fn erase_folder(dir: &std::path::Path, t: &str) -> (Erased, Vec<String>) {
    use crate::util::nofollow::Dir;
    let rel = std::path::Path::new("tenants").join(t);
    let mut erased = Erased::default();
    let d = match Dir::open(dir, &rel) {
        Ok(d) => d,
        Err(_) if std::fs::symlink_metadata(dir.join(&rel)).is_err() && std::fs::symlink_metadata(dir.join("tenants")).map_or(true, |m| m.is_dir()) => {
            return (erased, Vec::new());
        }
        Err(e) => {
            return (
                erased,
                vec![format!("{e:#}: a link on the way to {} is never followed; delete the tenant's folder there by hand", dir.join(&rel).display())],
            );
        }
    };
    // Counted first, by a walk that follows no link.
    let mut stack = vec![String::new()];
    while let Some(sub) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(format!("/proc/self/fd/{}/{sub}", d.as_raw_fd())) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if sub.is_empty() { name } else { format!("{sub}/{name}") };
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(r),
                Ok(m) if r != TOMBSTONE => erased.count(&r, m.len()),
                _ => {}
            }
        }
    }
    let names: Vec<std::ffi::OsString> = match std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd())) {
        Ok(rd) => rd.flatten().map(|e| e.file_name()).filter(|n| n != TOMBSTONE && n != "actions").collect(),
        Err(e) => return (Erased::default(), vec![format!("cannot list {}: {e}", dir.join(&rel).display())]),
    };
    // Action entries first.
    if let Err(e) = d.remove_tree(std::ffi::OsStr::new("actions")) {
        return (Erased::default(), vec![format!("{e:#}")]);
    }
    let failed: Vec<String> = names.iter().filter_map(|n| d.remove_tree(n).err().map(|e| format!("{e:#}"))).collect();
    (erased, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_remote(d: &std::path::Path) -> Remote {
        Remote::open(&crate::config::RemoteConfig::from_url(&format!("file://{}", d.display()))).unwrap()
    }

    #[test]
    fn a_tombstone_verifies_only_for_its_tenant_and_under_its_key() {
        let d = tempfile::tempdir().unwrap();
        let r = folder_remote(d.path());
        let k = IntegrityKey::from_bytes([5; 32]);
        assert!(matches!(read(&r, &k, "Tenant_B"), Found::None));
        write(&r, &k, "Tenant_B", "2026-12-07T00:00:00Z", true).unwrap();
        match read(&r, &k, "Tenant_B") {
            Found::Valid(ts) => assert!(ts.tenant == "Tenant_B" && ts.elsewhere && ts.forgotten_at == "2026-12-07T00:00:00Z"),
            f => panic!("{f:?}"),
        }
        // Under other keys, or copied into another tenant's prefix: proves nothing.
        assert!(matches!(read(&r, &IntegrityKey::from_bytes([6; 32]), "Tenant_B"), Found::Untrusted(_)));
        let b = d.path().join("tenants/Tenant_B/erased.json");
        std::fs::create_dir_all(d.path().join("tenants/Tenant_A")).unwrap();
        std::fs::copy(&b, d.path().join("tenants/Tenant_A/erased.json")).unwrap();
        assert!(matches!(read(&r, &k, "Tenant_A"), Found::Untrusted(w) if w.contains("another tenant")));
        // Altered, or far too large to be one.
        std::fs::write(&b, std::fs::read_to_string(&b).unwrap().replace("true", "false")).unwrap();
        assert!(matches!(read(&r, &k, "Tenant_B"), Found::Untrusted(w) if w.contains("MAC")));
        std::fs::write(&b, vec![b' '; 10_000]).unwrap();
        assert!(matches!(read(&r, &k, "Tenant_B"), Found::Untrusted(w) if w.contains("larger than a tombstone")));
    }

    #[test]
    fn erasing_a_prefix_deletes_every_file_but_the_tombstone_and_counts_them() {
        let d = tempfile::tempdir().unwrap();
        let r = folder_remote(d.path());
        let k = IntegrityKey::from_bytes([5; 32]);
        let t = d.path().join("tenants/Tenant_B");
        let h = "a".repeat(64);
        for (f, body) in
            [(format!("actions/{h}.json"), "{}"), (format!("objects/{h}"), "12345"), (format!("objects/{h}#3"), "123"), ("notes.txt".to_string(), "x")]
        {
            std::fs::create_dir_all(t.join(&f).parent().unwrap()).unwrap();
            std::fs::write(t.join(&f), body).unwrap();
        }
        write(&r, &k, "Tenant_B", "2026-12-07T00:00:00Z", false).unwrap();
        std::fs::create_dir_all(d.path().join("tenants/Tenant_A/objects")).unwrap();
        std::fs::write(d.path().join(format!("tenants/Tenant_A/objects/{h}")), "12345").unwrap();
        let (e, failed) = erase_prefix(&r, "Tenant_B").unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!((e.records, e.objects, e.other_files, e.bytes), (1, 1, 2, 2 + 5 + 3 + 1));
        let left: Vec<_> = walk(&t);
        assert_eq!(left, vec!["erased.json".to_string()]);
        assert!(d.path().join(format!("tenants/Tenant_A/objects/{h}")).exists(), "another tenant's prefix is untouched");
        assert!(matches!(read(&r, &k, "Tenant_B"), Found::Valid(_)));
    }

    #[test]
    fn a_link_planted_in_a_folder_remote_leads_the_erasure_nowhere() {
        let d = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(victim.path().join("objects")).unwrap();
        std::fs::write(victim.path().join("objects/precious"), "keep").unwrap();
        std::fs::write(victim.path().join("precious"), "keep").unwrap();
        let r = folder_remote(d.path());
        // The tenant's folder itself a link: refused, nothing deleted.
        std::fs::create_dir_all(d.path().join("tenants")).unwrap();
        std::os::unix::fs::symlink(victim.path(), d.path().join("tenants/Tenant_B")).unwrap();
        let (_, failed) = erase_prefix(&r, "Tenant_B").unwrap();
        assert!(failed.len() == 1 && failed[0].contains("never followed"), "{failed:?}");
        // A link inside it: unlinked, not followed.
        std::fs::remove_file(d.path().join("tenants/Tenant_B")).unwrap();
        std::fs::create_dir_all(d.path().join("tenants/Tenant_B")).unwrap();
        std::os::unix::fs::symlink(victim.path().join("objects"), d.path().join("tenants/Tenant_B/objects")).unwrap();
        std::os::unix::fs::symlink(victim.path(), d.path().join("tenants/Tenant_B/actions")).unwrap();
        let (e, failed) = erase_prefix(&r, "Tenant_B").unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(e.other_files, 2);
        assert!(victim.path().join("objects/precious").exists() && victim.path().join("precious").exists());
        assert!(walk(&d.path().join("tenants/Tenant_B")).is_empty());
        // Nothing there at all: nothing to do.
        let (e, failed) = erase_prefix(&r, "Tenant_C").unwrap();
        assert!(failed.is_empty() && e.bytes == 0);
    }

    fn walk(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out
    }
}
