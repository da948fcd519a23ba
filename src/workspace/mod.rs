//! The workspace: the one owner of dagrun's paths, of the workspace lock, of
//! content hashes and of the authenticated records dagrun reads back.
//!
//! Rules:
//! - **Paths.** Every path under `.dagrun/` (cache objects, action cache,
//!   state, logs, keys, hash memo, lock) and `runs/` comes from a
//!   [`Workspace`] method; nobody else joins `.dagrun` by hand.
//! - **Finding it, one way.** The workspace is `-C DIR` when given; else the
//!   nearest folder at or above a start folder (the pipeline file's folder
//!   for pipeline commands, the artifact's folder for `lineage`, the current
//!   folder otherwise) that holds `.dagrun/` or `config/`. Pipeline commands
//!   fall back to the pipeline file's folder (a new workspace);
//!   `keys init` ([`Workspace::new_or_existing`]) to the current folder;
//!   every other command ([`Workspace::existing`]) needs a `.dagrun/` there
//!   and refuses with exit 2 otherwise, creating nothing.
//! - **The lock.** Every command that writes workspace state (`run`,
//!   `keys rotate|forget`, `verify --repair`, `gc`) holds [`Workspace::lock`] while
//!   it writes. Read-only commands take no lock. The processes a run's
//!   commands started carry its mark: what a killed run, a timed-out or a
//!   failed attempt left running is found and stopped by it ([`orphans`]).
//! - **Own folders are folders.** Taking the lock first checks that none of
//!   dagrun's own folders (`.dagrun/…`, `runs/`) is a symlink ([`own_dirs`]).
//! - **Hashes.** Hashes read from disk are [`ContentHash`]es, parsed once
//!   ([`hash`]); cache object paths are built only from them ([`cas`]).
//! - **Files a user names.** A file a command writes where its user says
//!   (`--metrics-file`, `predict --output`, `report -o`) is refused when it
//!   lies, by name or through a symlink on its way, in `.dagrun/`, `.git/` or
//!   `config/`, or is a run record in `runs/` ([`Workspace::check_user_output`]):
//!   a typo there could replace the keyring, and with it every tenant's data.
//! - **Records.** State files, action-cache entries, the hash memo, model
//!   artifacts and feature-store manifests carry a MAC under the workspace
//!   integrity key ([`record`]); a record whose MAC fails was modified outside
//!   dagrun and is never trusted.

pub mod cas;
pub mod gc;
pub mod hash;
pub mod hashing;
pub mod lock;
pub mod orphans;
pub mod own_dirs;
pub mod places;
pub mod record;
pub mod state;

pub use hash::ContentHash;

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The variable every `cmd` stage's process gets the workspace folder in
/// ([`orphans`] also finds a killed run's processes by it).
pub const WORKSPACE_ENV: &str = "DAGRUN_WORKSPACE";

/// Name of dagrun's own folder in a workspace.
pub const DAGRUN_DIR: &str = ".dagrun";

/// Top-level folders of a workspace that no output may be in, lexically or
/// through a symlink: dagrun's state and keys, git, run records, and the
/// configuration (tenant list).
pub const PROTECTED_DIRS: &[&str] = &[DAGRUN_DIR, ".git", "runs", "config"];

/// Env var holding the path of a file with the master key (read by
/// `crypto::master`; used here because that file, kept outside the
/// workspace, is one a user-named output must never replace).
pub use crate::crypto::master::ENV_MASTER_KEY_FILE;

/// A workspace-relative path read from an untrusted file (a record, a model,
/// a run record): not empty, and only plain names — no root, no `..`, no `.`.
pub fn is_safe_rel(p: &str) -> bool {
    !p.is_empty() && Path::new(p).components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// A workspace root and every path dagrun keeps in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    root: PathBuf,
}

/// Whether `a` and `b` name the same existing folder, however spelt (`ws/`,
/// `ws/../ws`, a link to it): the same device and inode, not the same text.
/// A folder copied elsewhere is another one. A path that does not exist is
/// no folder's.
pub fn same_folder(a: &Path, b: &Path) -> bool {
    folder_id(a).is_some_and(|x| folder_id(b) == Some(x))
}

/// Whether the current folder is workspace `ws` (its paths read as the user's).
pub fn is_current_folder(ws: &Path) -> bool {
    std::env::current_dir().is_ok_and(|d| same_folder(&d, ws))
}

/// `p` (a path in workspace `ws`) as a user should read it: relative to
/// the workspace when that is the current folder, else whole.
pub fn shown_path<'a>(ws: &Path, p: &'a Path) -> std::borrow::Cow<'a, Path> {
    match p.strip_prefix(ws) {
        Ok(rel) if is_current_folder(ws) => rel.into(),
        _ => p.into(),
    }
}

/// The identity of folder `p` (device and inode; links followed), if it is one.
pub fn folder_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok().filter(|m| m.is_dir())?;
    Some((m.dev(), m.ino()))
}

impl Workspace {
    /// The workspace rooted at `root` (made absolute; nothing is checked or created).
    pub fn at(root: &Path) -> Workspace {
        Workspace { root: std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf()) }
    }

    /// The nearest of `start` and its ancestors that holds `.dagrun/` or `config/`.
    pub fn locate(start: &Path) -> Option<Workspace> {
        let start = std::path::absolute(start).unwrap_or_else(|_| start.to_path_buf());
        start.ancestors().find(|d| d.join(DAGRUN_DIR).is_dir() || d.join("config").is_dir()).map(Workspace::at)
    }

    /// The workspace of a pipeline file: `given`, else [`Workspace::locate`]
    /// from the file's folder, else that folder (a new workspace).
    pub fn for_pipeline(given: Option<&Path>, pipeline_file: &Path) -> Workspace {
        if let Some(w) = given {
            return Workspace::at(w);
        }
        let file = std::path::absolute(pipeline_file).unwrap_or_else(|_| pipeline_file.to_path_buf());
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Workspace::locate(&dir).unwrap_or_else(|| Workspace::at(&dir))
    }

    /// An existing workspace (one that holds `.dagrun/`): `given`, else
    /// [`Workspace::locate`] from `start`. None found is a configuration error
    /// (exit 2) and nothing is created.
    pub fn existing(given: Option<&Path>, start: &Path) -> Result<Workspace> {
        let ws = match given {
            Some(w) => Workspace::at(w),
            None => Workspace::locate(start).ok_or_else(|| {
                crate::error::config(format!(
                    "{} is not inside a dagrun workspace (no .dagrun/ or config/ in it or above it): run a pipeline there first, or pass -C DIR",
                    start.display()
                ))
            })?,
        };
        if !ws.root.is_dir() {
            return Err(crate::error::config(format!("{} is not a folder (-C names a workspace's folder)", ws.root.display())));
        }
        if !ws.dagrun_dir().is_dir() {
            return Err(crate::error::config(format!(
                "{} is not a dagrun workspace (it has no .dagrun/ folder): run a pipeline there first, or pass -C DIR",
                ws.root.display()
            )));
        }
        Ok(ws)
    }

    /// The workspace a command that may start one (`keys init`) works in:
    /// `given`, else [`Workspace::locate`] from the current folder, else the
    /// current folder.
    pub fn new_or_existing(given: Option<&Path>) -> Result<Workspace> {
        if let Some(w) = given {
            return Ok(Workspace::at(w));
        }
        let cwd = std::env::current_dir()?;
        Ok(Workspace::locate(&cwd).unwrap_or_else(|| Workspace::at(&cwd)))
    }

    /// The existing workspace of a command run from the current folder.
    pub fn existing_from_cwd(given: Option<&Path>) -> Result<Workspace> {
        let cwd = std::env::current_dir()?;
        Workspace::existing(given, &cwd)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `.dagrun/`
    pub fn dagrun_dir(&self) -> PathBuf {
        self.root.join(DAGRUN_DIR)
    }
    /// `.dagrun/cache/objects/`
    pub fn objects_dir(&self) -> PathBuf {
        self.dagrun_dir().join("cache").join("objects")
    }
    /// `.dagrun/cache/actions/`
    pub fn actions_dir(&self) -> PathBuf {
        self.dagrun_dir().join("cache").join("actions")
    }
    /// `.dagrun/state/`
    pub fn state_dir(&self) -> PathBuf {
        self.dagrun_dir().join("state")
    }
    /// `.dagrun/logs/`
    pub fn logs_dir(&self) -> PathBuf {
        self.dagrun_dir().join("logs")
    }
    /// `.dagrun/keys/`
    pub fn keys_dir(&self) -> PathBuf {
        self.dagrun_dir().join("keys")
    }
    /// `.dagrun/hashmemo.json`
    pub fn memo_file(&self) -> PathBuf {
        self.dagrun_dir().join("hashmemo.json")
    }
    /// `.dagrun/places.json` (`places`)
    pub fn places_file(&self) -> PathBuf {
        self.dagrun_dir().join("places.json")
    }
    /// `runs/`
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }
    /// An absolute path for a workspace-relative one.
    pub fn abs(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    /// The workspace-relative form of a path under the workspace (else as given).
    pub fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.root).unwrap_or(p).to_string_lossy().into_owned()
    }

    /// Refuse `path`, a file a command is about to write where its user said
    /// (`what` names the option in the message: exit 2), when it would land in
    /// `.dagrun/`, `.git/` or `config/` of this workspace, or on a run record
    /// (`runs/*.json`, `runs/*.jsonl`). Its folders are resolved as the
    /// writer will meet them: symlinks followed in the part that exists; in
    /// the part that does not yet (writers create it) a `..` is refused. The
    /// last component is not followed: writers replace it (rename); so it must
    /// not be a device, FIFO or socket, or a link to one.
    pub fn check_user_output(&self, path: &Path, what: &str) -> Result<()> {
        use std::path::Component;
        let abs = std::path::absolute(path)?;
        let refuse = |why: &str| crate::error::config(format!("{what} {}: {why}; write it elsewhere, e.g. in a reports/ folder", path.display()));
        let Some(name) = abs.file_name().map(|n| n.to_os_string()) else {
            return Err(refuse("it names a folder, not a file"));
        };
        // The longest existing ancestor of the folder, resolved; then the rest by name.
        let mut rest = Vec::new();
        let mut dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut real = loop {
            match dir.canonicalize() {
                Ok(r) => break r,
                // Anything but "not there yet" (a name too long to resolve,
                // a loop of links, a file on the way) is refused: taken by
                // name, its links would go unresolved (review 19: a working
                // folder longer than PATH_MAX switched every check off).
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(refuse(&format!("it cannot be resolved to check where it lands ({e})")));
                }
                Err(_) => match (dir.components().next_back(), dir.parent()) {
                    (Some(last), Some(up)) => {
                        rest.push(last.as_os_str().to_os_string());
                        dir = up.to_path_buf();
                    }
                    _ => break dir,
                },
            }
        };
        for c in Path::new(&rest.into_iter().rev().collect::<PathBuf>()).components() {
            match c {
                // `missing/..` is resolved only once the writer made `missing`,
                // and what follows may then lead anywhere (review 18: through
                // a link that `missing` brings to life, onto config/): refused.
                Component::ParentDir => {
                    return Err(refuse("`..` follows a folder that does not exist yet; name the path without it"));
                }
                Component::Normal(n) => real.push(n),
                _ => {}
            }
        }
        // The folders it would land in, checked by name (any workspace's, in
        // any letter case: a case-insensitive file system) and by identity
        // (this workspace's, however they are reached: a symlinked config/).
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        let owned: Vec<(&str, (u64, u64))> = PROTECTED_DIRS.iter().filter_map(|d| id(&self.root.join(d)).map(|i| (*d, i))).collect();
        let named = |p: &Path, n: &str| p.file_name().is_some_and(|f| f.to_string_lossy().eq_ignore_ascii_case(n));
        // A workspace: `.dagrun/`, or a tenant list before its first run
        // (reviews 19 and 20).
        let holds_workspace = |p: &Path| p.parent().is_some_and(|up| up.join(DAGRUN_DIR).is_dir() || up.join("config/tenants.yaml").is_file());
        // A folder of that name in a workspace (`.dagrun` anywhere).
        let protected_name = |p: &Path| PROTECTED_DIRS.iter().copied().find(|d| named(p, d) && (*d == DAGRUN_DIR || holds_workspace(p)));
        // The path as written, too (each `..` taking back the name before it):
        // a symlinked `config/` of another workspace loses its name once
        // resolved (review 19); `config/../reports/x` is not in config/ (review 20).
        let mut written = PathBuf::new();
        for c in abs.components() {
            match c {
                Component::ParentDir => {
                    written.pop();
                }
                c => written.push(c),
            }
        }
        if let Some(d) = written.ancestors().skip(1).find_map(|a| protected_name(a).filter(|d| *d != "runs")) {
            return Err(refuse(&format!("it is inside {d}/ of a workspace, which dagrun, git or the workspace configuration owns (keys, state, tenant list)")));
        }
        let record = {
            let n = name.to_string_lossy().to_ascii_lowercase();
            n.ends_with(".json") || n.ends_with(".jsonl")
        };
        let target = real.join(&name);
        // Which of this workspace's protected folders `p` is (one stat).
        let owned_as = |p: &Path| id(p).and_then(|here| owned.iter().find(|(_, i)| *i == here).map(|(d, _)| *d));
        if let Some(d) = protected_name(&target).or_else(|| owned_as(&target)) {
            return Err(refuse(&format!("it names the {d}/ folder itself")));
        }
        // The master key file kept elsewhere: the name it is read by, or the
        // file a symlink there leads to (a writer replaces the name it is given).
        if let Some(key_file) = std::env::var_os(ENV_MASTER_KEY_FILE).filter(|k| !k.is_empty()) {
            let key_file = Path::new(&key_file);
            let named = key_file.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }).and_then(|d| d.canonicalize().ok());
            let named = named.zip(key_file.file_name()).map(|(d, n)| d.join(n));
            if [named, key_file.canonicalize().ok()].contains(&Some(target.clone())) {
                return Err(refuse(&format!("it is the master key file that {ENV_MASTER_KEY_FILE} names")));
            }
        }
        for (depth, dir) in real.ancestors().enumerate() {
            let which = owned_as(dir).or_else(|| protected_name(dir));
            match which {
                Some("runs") if depth == 0 && record => return Err(refuse("it would replace a run record in runs/")),
                Some("runs") | None => {}
                Some(d) => {
                    return Err(refuse(&format!(
                        "it is inside {d}/ of a workspace, which dagrun, git or the workspace configuration owns (keys, state, tenant list)"
                    )));
                }
            }
        }
        // A device, FIFO or socket there (or a link to one, e.g. /dev/stdout)
        // would be replaced by the rename that puts the new file in place
        // (review 17: `--output /dev/null` as root replaced the device node).
        // /dev/stdout and its kin are links to what stdout is (a file, a
        // pipe): replacing them would break every program on the machine.
        // (/dev/shm is an ordinary shared-memory file system: allowed.)
        if let Some(sys) = ["/dev", "/proc", "/sys"].iter().find(|d| target.starts_with(d) && !target.starts_with("/dev/shm")) {
            return Err(refuse(&format!("it is in {sys}, the system's folder of devices and processes")));
        }
        let there = match std::fs::symlink_metadata(&target) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(refuse(&format!("it cannot be checked ({e})"))),
        };
        if there.as_ref().is_some_and(|m| m.is_dir()) {
            // The one fix: a file in that folder (not "write it elsewhere").
            return Err(crate::error::config(format!("{what} {}: it is a folder; name a file in it, e.g. {}", path.display(), path.join("NAME").display())));
        }
        if let Some(m) = there {
            let special = |t: std::fs::FileType| !(t.is_file() || t.is_dir() || t.is_symlink());
            let what_it_is = |t: std::fs::FileType| {
                use std::os::unix::fs::FileTypeExt;
                if t.is_fifo() {
                    "a FIFO"
                } else if t.is_socket() {
                    "a socket"
                } else {
                    "a device"
                }
            };
            if special(m.file_type()) {
                return Err(refuse(&format!("it is {}, not a regular file, and writing would replace it", what_it_is(m.file_type()))));
            }
            if m.file_type().is_symlink()
                && let Ok(to) = std::fs::metadata(&target)
                && special(to.file_type())
            {
                return Err(refuse(&format!("it is a link to {}, and writing would replace the link", what_it_is(to.file_type()))));
            }
        }
        Ok(())
    }

    /// Take the workspace lock (`.dagrun/lock`), waiting up to `wait`
    /// (None: exit 75 at once when another process holds it).
    pub fn lock(&self, wait: Option<Duration>, what: &str) -> Result<lock::WorkspaceLock> {
        lock::acquire(&self.dagrun_dir(), wait, what)
    }

    /// The lock for `dagrun run`, which starts stage commands: it also names
    /// this process's run mark (see `lock`, "Run marks").
    pub fn lock_run(&self, wait: Option<Duration>, what: &str) -> Result<lock::WorkspaceLock> {
        lock::acquire_run(&self.dagrun_dir(), wait, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_a_user_names_never_land_in_dagrun_config_git_or_on_run_records() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let other = tempfile::tempdir().unwrap();
        for dir in [".dagrun/keys", "config", "runs", ".git", "reports"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::os::unix::fs::symlink(root.join(".dagrun/keys"), root.join("reports/keys")).unwrap();
        std::os::unix::fs::symlink(root.join(".dagrun/keys"), other.path().join("keys")).unwrap();
        std::os::unix::fs::symlink(root.join(".dagrun/keys/keyring.json"), root.join("reports/m.prom")).unwrap();
        let ws = Workspace::at(&root);
        let refused = |p: PathBuf| {
            let e = ws.check_user_output(&p, "--output").expect_err(&p.display().to_string());
            assert_eq!(crate::error::exit_code_of(&e), crate::error::exit::CONFIG, "{e}");
            assert!(e.to_string().starts_with(&format!("--output {}: ", p.display())), "{e}");
            e.to_string()
        };
        assert!(refused(root.join(".dagrun/keys/keyring.json")).contains("inside .dagrun/"));
        assert!(refused(root.join("config/tenants.yaml")).contains("inside config/"));
        refused(root.join(".git/config"));
        assert!(refused(root.join("runs/20261205-000000-000-abcd.json")).contains("run record"));
        refused(root.join("runs/20261205-000000-000-abcd.openlineage.jsonl"));
        refused(root.join(".dagrun/new/deeper/file.prom")); // folders that do not exist yet
        refused(root.join("nothing/../.dagrun/keys/keyring.json")); // `..` after a folder a writer would create
        refused(root.join("reports/keys/keyring.json")); // a symlinked folder inside the workspace
        refused(other.path().join("keys/keyring.json")); // and from outside it
        refused(root.join(".dagrun"));
        // Protected folders reached through a symlink, and another workspace's.
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::rename(root.join("config"), elsewhere.path().join("cfg")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("cfg"), root.join("config")).unwrap();
        assert!(refused(root.join("config/tenants.yaml")).contains("inside config/"));
        let other_ws = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other_ws.path().join(".dagrun/keys")).unwrap();
        std::fs::create_dir_all(other_ws.path().join("config")).unwrap();
        refused(other_ws.path().join(".dagrun/keys/keyring.json"));
        refused(other_ws.path().join("config/tenants.yaml"));
        refused(root.join(".DAGRUN/keys/keyring.json")); // a case-insensitive file system
        refused(root.join("runs/20261205-000000-000-abcd.JSON"));
        for fine in [
            root.join("reports/m.prom"), // a symlink as the last part is replaced, not followed
            root.join("reports/new/r.html"),
            root.join("runs/20261205-000000-000-abcd.html"),
            root.join("scores.csv"),
            other.path().join("config"), // a file named like a protected folder, outside any workspace
            other.path().join("runs/x.json"),
            other.path().join("m.prom"),
            PathBuf::from("/nonexistent-dagrun-test/x.prom"),
        ] {
            ws.check_user_output(&fine, "--output").unwrap_or_else(|e| panic!("{}: {e}", fine.display()));
        }
    }

    #[test]
    fn existing_refuses_and_creates_nothing() {
        let d = tempfile::tempdir().unwrap();
        let e = Workspace::existing(None, d.path()).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&e), crate::error::exit::CONFIG);
        let e = Workspace::existing(Some(d.path()), d.path()).unwrap_err();
        assert!(e.to_string().contains("no .dagrun/"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        std::fs::create_dir_all(d.path().join(".dagrun")).unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        let ws = Workspace::existing(None, &d.path().join("a/b")).unwrap();
        assert_eq!(ws.root(), d.path());
        assert_eq!(ws.state_dir(), d.path().join(".dagrun/state"));
    }
}
