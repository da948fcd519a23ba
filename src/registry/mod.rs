//! The model registry: every model `train` made, one champion per tenant,
//! promotion, rollback and an append-only history.
//!
//! Layout, per tenant, under `.dagrun/registry/TENANT/`:
//! - `versions/VERSION.json`: the model artifact, byte for byte as `train`
//!   wrote it (a copy, so a version stays servable after `models/T/model.json`
//!   is overwritten by the next training);
//! - `index.json`: one entry per registered version (time, blake3 of the
//!   artifact, AUC, feature version, lineage hash);
//! - `champion.json`: the champion and the stack of earlier champions
//!   (`rollback` pops it);
//! - `history.jsonl`: one line per promotion or rollback (who, when, from, to,
//!   why), only ever appended.
//!
//! Rules:
//! - Every file here is untrusted input when read back: it is parsed, the
//!   tenant and version names are checked against the id rules (a version
//!   names a file, so it can never hold `/` or `..`), and an artifact is
//!   loaded only through [`Registry::load`], which checks its blake3 against
//!   the index, then its MAC under the workspace integrity key, its tenant and
//!   its version ([`crate::model::artifact::load_verified`]). A model failing
//!   any check is never returned. The index and champion files carry no MAC
//!   of their own: editing them can at most name another authentic model of
//!   the same tenant (which `history.jsonl` and `models list` show), never
//!   serve a forged or foreign one.
//! - Writers (`register`, `promote`, `rollback`) must hold the workspace lock
//!   (the caller takes it: `train` runs under the run's lock, the `models`
//!   commands take it). Each file is replaced atomically (temp file, fsync,
//!   rename), so a reader — such as a running server polling `champion.json` —
//!   sees the old champion or the new one, never a torn file.
//! - The champion is written last: a version is registered (artifact, then
//!   index) before it can be promoted.
//! - A promotion or rollback appends its history line, then replaces the
//!   champion. When the champion cannot be written (a full disk), the line
//!   is cut off again, as is a line whose own write failed: the history
//!   names no change that did not happen. A command stopped between the two
//!   writes (SIGKILL) leaves a line whose change never took effect:
//!   [`applied`] tells (the next line starts from another champion, or the
//!   last line's change is not the champion), and `models history` says so.
//!   The next append cuts off the unfinished end of a line a stopped write
//!   left, and reading skips it.

use crate::model::ModelArtifact;
use crate::util::atomic::{Durability, write_atomic, write_atomic_with};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Folder of the registry under `.dagrun/`.
pub const REGISTRY_DIR: &str = "registry";
/// Format tag of `index.json`.
pub const INDEX_FORMAT: &str = "dagrun-registry-index/1";
/// Format tag of `champion.json`.
pub const CHAMPION_FORMAT: &str = "dagrun-registry-champion/1";
/// Largest registry file dagrun reads back (index, champion, history).
const MAX_FILE: u64 = 16 << 20;

/// One registered model version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VersionEntry {
    pub version: String,
    /// RFC 3339 UTC.
    pub registered_at: String,
    /// blake3 hex of the artifact bytes.
    pub blake3: String,
    pub auc: f64,
    pub feature_version: String,
    /// Lineage hash of the feature version the model was trained on.
    pub lineage_hash: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Index {
    format: String,
    tenant: String,
    versions: Vec<VersionEntry>,
}

/// The champion of a tenant and the champions before it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Champion {
    pub format: String,
    pub tenant: String,
    pub version: String,
    /// blake3 hex of the champion's artifact.
    pub blake3: String,
    pub since: String,
    /// Earlier champions, oldest first; `rollback` returns to the last one.
    pub previous: Vec<String>,
}

/// What a history line records (JSON: `promote`, `rollback`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistoryAction {
    Promote,
    Rollback,
}

impl std::fmt::Display for HistoryAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            HistoryAction::Promote => "promote",
            HistoryAction::Rollback => "rollback",
        })
    }
}

/// One line of `history.jsonl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub time: String,
    pub who: String,
    pub action: HistoryAction,
    pub from: Option<String>,
    pub to: String,
    pub why: String,
}

/// A loaded, verified model version.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub artifact: ModelArtifact,
    /// blake3 hex of the artifact bytes.
    pub blake3: String,
}

/// What [`Registry::promote`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Promotion {
    /// The version is the champion now; `from` was (None: the tenant had none).
    Changed { from: Option<String> },
    /// The version was the champion already: nothing was written.
    AlreadyChampion,
}

/// The registry of one workspace.
#[derive(Clone, Debug)]
pub struct Registry {
    root: PathBuf,
}

/// True for a well-formed version name: 1-128 characters of `A-Z a-z 0-9 _ - .`,
/// not starting with `.` (it names a file).
pub fn is_valid_version(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && !v.starts_with('.') && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A blake3 digest as stored (`workspace::ContentHash`'s shape).
fn is_hash(s: &str) -> bool {
    crate::workspace::ContentHash::parse(s).is_ok()
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The user running this command, for the history (`$USER`, else the uid).
pub fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty() && u.len() <= 64 && u.chars().all(|c| !c.is_control()))
        // SAFETY: getuid has no preconditions and cannot fail.
        .unwrap_or_else(|| format!("uid {}", unsafe { libc::getuid() }))
}

/// A registry file, read through one handle that never waits on a FIFO and
/// refuses anything but a regular file of at most [`MAX_FILE`] bytes
/// (`util::read_capped`); `None` when it does not exist.
fn read_small(path: &Path) -> Result<Option<Vec<u8>>> {
    match crate::util::read_capped(path, MAX_FILE) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(e).with_context(|| format!("cannot read {}; restore it from a backup (or remove it)", path.display()))
        }
        // A descriptor limit, a permission, an I/O error: nothing to restore.
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        Ok(b) => Ok(Some(b)),
    }
}

impl Registry {
    /// The registry of the workspace whose `.dagrun/` folder is `dagrun_dir`.
    pub fn new(dagrun_dir: &Path) -> Registry {
        Registry { root: dagrun_dir.join(REGISTRY_DIR) }
    }

    /// The registry of `workspace`.
    pub fn of_workspace(workspace: &Path) -> Registry {
        Registry::new(&workspace.join(crate::workspace::DAGRUN_DIR))
    }

    fn check_tenant(tenant: &str) -> Result<()> {
        if !crate::data::is_valid_tenant_id(tenant) {
            bail!("invalid tenant id {}; a tenant id is 1-64 characters of A-Z a-z 0-9 _ -", crate::data::show_tenant(tenant));
        }
        Ok(())
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.root.join(tenant)
    }

    /// Path of `champion.json` (a server polls it).
    pub fn champion_path(&self, tenant: &str) -> PathBuf {
        self.tenant_dir(tenant).join("champion.json")
    }

    fn index_path(&self, tenant: &str) -> PathBuf {
        self.tenant_dir(tenant).join("index.json")
    }

    fn history_path(&self, tenant: &str) -> PathBuf {
        self.tenant_dir(tenant).join("history.jsonl")
    }

    /// Path of a registered version's artifact.
    pub fn artifact_path(&self, tenant: &str, version: &str) -> PathBuf {
        self.tenant_dir(tenant).join("versions").join(format!("{version}.json"))
    }

    /// Every folder the registry writes into (for sweeping temporary files
    /// left by killed processes).
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut v = vec![self.root.clone()];
        for t in self.tenants() {
            v.push(self.tenant_dir(&t));
            v.push(self.tenant_dir(&t).join("versions"));
        }
        v
    }

    /// Remove tenant `tenant`'s registry folder (its versions, champion and
    /// history): for a forgotten tenant (`dagrun gc`). Through handles opened
    /// without following a link, from the workspace down
    /// (`util::nofollow::Dir::remove_tree`): nothing outside it is deleted,
    /// whatever is swapped in meanwhile.
    pub fn remove_tenant(&self, tenant: &str) -> Result<()> {
        Self::check_tenant(tenant)?;
        let (Some(dagrun_dir), Some(reg_name)) = (self.root.parent(), self.root.file_name()) else { bail!("{}: not a registry folder", self.root.display()) };
        let (Some(ws), Some(dagrun_name)) = (dagrun_dir.parent(), dagrun_dir.file_name()) else { bail!("{}: not a registry folder", self.root.display()) };
        let dir = match crate::util::nofollow::Dir::open(ws, &Path::new(dagrun_name).join(reg_name)) {
            Ok(d) => d,
            Err(_) if !self.root.exists() => return Ok(()),
            Err(e) => return Err(e),
        };
        dir.remove_tree(std::ffi::OsStr::new(tenant))
    }

    /// Tenants with a registry folder (sorted; folders with invalid names are skipped).
    pub fn tenants(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.root)
            .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).filter(|n| crate::data::is_valid_tenant_id(n)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The registered versions of `tenant`, oldest first (empty when none).
    pub fn versions(&self, tenant: &str) -> Result<Vec<VersionEntry>> {
        Self::check_tenant(tenant)?;
        let path = self.index_path(tenant);
        let Some(bytes) = read_small(&path)? else { return Ok(vec![]) };
        let idx: Index = crate::util::redact::from_json(&bytes)
            .map_err(|why| anyhow::anyhow!("{}: not a valid registry index ({}); restore it from a backup", path.display(), why))?;
        if idx.format != INDEX_FORMAT {
            bail!("{}: unsupported format {:?} (expected {INDEX_FORMAT:?})", path.display(), idx.format);
        }
        if idx.tenant != tenant {
            bail!("{}: the index is tenant {}'s, not {tenant}'s; it was moved: restore it", path.display(), crate::data::show_tenant(&idx.tenant));
        }
        for (i, e) in idx.versions.iter().enumerate() {
            if !is_valid_version(&e.version) {
                bail!("{}: entry {}: invalid version name {:?}", path.display(), i + 1, crate::data::show_tenant(&e.version));
            }
            if !is_hash(&e.blake3) {
                bail!("{}: entry {} ({}): blake3 is not 64 lower-case hex digits", path.display(), i + 1, e.version);
            }
            // Shown by `models list`: values dagrun writes, nothing a terminal would obey.
            if !(e.lineage_hash.is_empty() || is_hash(&e.lineage_hash)) {
                bail!("{}: entry {} ({}): lineage_hash is not 64 lower-case hex digits", path.display(), i + 1, e.version);
            }
            if chrono::DateTime::parse_from_rfc3339(&e.registered_at).is_err() {
                bail!("{}: entry {} ({}): registered_at is not an RFC 3339 time", path.display(), i + 1, e.version);
            }
            if !crate::util::is_plain_label(&e.feature_version, 200) {
                bail!("{}: entry {} ({}): feature_version holds a control character or is too long", path.display(), i + 1, e.version);
            }
        }
        Ok(idx.versions)
    }

    /// The champion of `tenant` (None when none was ever promoted).
    pub fn champion(&self, tenant: &str) -> Result<Option<Champion>> {
        Self::check_tenant(tenant)?;
        let path = self.champion_path(tenant);
        let Some(bytes) = read_small(&path)? else { return Ok(None) };
        let c: Champion = crate::util::redact::from_json(&bytes)
            .map_err(|why| anyhow::anyhow!("{}: not a valid champion record ({}); restore it from a backup or promote again", path.display(), why))?;
        if c.format != CHAMPION_FORMAT {
            bail!("{}: unsupported format {:?} (expected {CHAMPION_FORMAT:?})", path.display(), c.format);
        }
        if c.tenant != tenant {
            bail!("{}: the champion record is tenant {}'s, not {tenant}'s", path.display(), crate::data::show_tenant(&c.tenant));
        }
        if !is_valid_version(&c.version) || c.previous.iter().any(|v| !is_valid_version(v)) {
            bail!("{}: invalid version name in the champion record", path.display());
        }
        if !is_hash(&c.blake3) {
            bail!("{}: blake3 is not 64 lower-case hex digits", path.display());
        }
        Ok(Some(c))
    }

    /// The promotion history of `tenant`, oldest first.
    pub fn history(&self, tenant: &str) -> Result<Vec<HistoryEntry>> {
        Self::check_tenant(tenant)?;
        let path = self.history_path(tenant);
        let Some(bytes) = read_small(&path)? else { return Ok(vec![]) };
        // After the last newline: a whole entry counts; anything else is the
        // end of a write that was stopped (it may end inside a character; the
        // next append cuts it off): skipped.
        let (whole, last) = split_unfinished(&bytes);
        let text = std::str::from_utf8(&bytes[..whole]).with_context(|| format!("{}: not UTF-8", path.display()))?;
        let mut out = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let e: HistoryEntry = crate::util::redact::from_json(line.as_bytes())
                .map_err(|why| anyhow::anyhow!("{}: line {}: not a valid history entry ({})", path.display(), i + 1, why))?;
            out.push(e);
        }
        out.extend(last);
        Ok(out)
    }

    /// Load `version` of `tenant`, verified: the artifact's blake3 equals the
    /// index's, it parses and validates, and it is this tenant's model of
    /// this version. Nothing that fails a check is returned.
    pub fn load(&self, tenant: &str, version: &str, key: &crate::crypto::IntegrityKey) -> Result<LoadedModel> {
        Self::check_tenant(tenant)?;
        if !is_valid_version(version) {
            bail!("invalid model version {:?}", crate::data::show_tenant(version));
        }
        let entry = self
            .versions(tenant)?
            .into_iter()
            .find(|e| e.version == version)
            .ok_or_else(|| crate::error::config(format!("tenant {tenant} has no registered model version {version}; see `dagrun models list {tenant}`")))?;
        let path = self.artifact_path(tenant, version);
        let bytes = read_small(&path)?.with_context(|| format!("{}: the registered model file is missing; promote another version", path.display()))?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if hash != entry.blake3 {
            bail!(
                "{}: the model does not match its registry record (blake3 {} recorded, file is {}): it was modified; refusing to load it",
                path.display(),
                &entry.blake3[..12],
                &hash[..12]
            );
        }
        let artifact = crate::model::artifact::load_verified(&bytes, &path.display().to_string(), key, tenant)?;
        if artifact.tenant != tenant || artifact.model_version != version {
            bail!(
                "{}: the file holds model {} of tenant {}, not {version} of {tenant}",
                path.display(),
                artifact.model_version,
                crate::data::show_tenant(&artifact.tenant)
            );
        }
        Ok(LoadedModel { artifact, blake3: hash })
    }

    /// The champion of `tenant`, loaded and verified (None: no champion). The
    /// champion record's hash must equal the index's.
    pub fn load_champion(&self, tenant: &str, key: &crate::crypto::IntegrityKey) -> Result<Option<LoadedModel>> {
        let Some(c) = self.champion(tenant)? else { return Ok(None) };
        let m = self.load(tenant, &c.version, key)?;
        if m.blake3 != c.blake3 {
            bail!(
                "{}: the champion record names blake3 {} but version {} is {}; refusing to load it",
                self.champion_path(tenant).display(),
                &c.blake3[..12],
                c.version,
                &m.blake3[..12]
            );
        }
        Ok(Some(m))
    }

    /// Register a model artifact (its exact bytes). Idempotent: the same
    /// version with the same bytes is registered once; the same version with
    /// other bytes is an error. The caller holds the workspace lock.
    pub fn register(&self, bytes: &[u8], key: &crate::crypto::IntegrityKey) -> Result<VersionEntry> {
        let claimed = ModelArtifact::from_json_bytes(bytes, "the model to register")?;
        Self::check_tenant(&claimed.tenant)?;
        let artifact = crate::model::artifact::load_verified(bytes, "the model to register", key, &claimed.tenant)?;
        let tenant = artifact.tenant.clone();
        let version = artifact.model_version.clone();
        if !is_valid_version(&version) {
            bail!("cannot register model version {:?}: a version is 1-128 characters of A-Z a-z 0-9 _ - .", crate::data::show_tenant(&version));
        }
        let hash = blake3::hash(bytes).to_hex().to_string();
        let mut versions = self.versions(&tenant)?;
        if let Some(e) = versions.iter().find(|e| e.version == version) {
            if e.blake3 != hash {
                bail!("model version {version} of tenant {tenant} is already registered with other content (blake3 {} vs {})", &e.blake3[..12], &hash[..12]);
            }
            // Re-write the artifact if it went missing or was damaged.
            if self.load(&tenant, &version, key).is_err() {
                write_atomic(&self.artifact_path(&tenant, &version), bytes)?;
            }
            return Ok(e.clone());
        }
        write_atomic(&self.artifact_path(&tenant, &version), bytes)?;
        let lineage_hash = artifact.lineage.get("feature_lineage_hash").and_then(|v| v.as_str()).unwrap_or("").to_string();
        let entry = VersionEntry {
            version,
            registered_at: now(),
            blake3: hash,
            auc: artifact.metrics.auc,
            feature_version: artifact.feature_set_version.clone(),
            lineage_hash,
        };
        versions.push(entry.clone());
        let idx = Index { format: INDEX_FORMAT.into(), tenant: tenant.clone(), versions };
        write_atomic(&self.index_path(&tenant), &pretty(&idx)?)?;
        Ok(entry)
    }

    /// Append `e` to the history; returns the file's length before it (to
    /// cut the line off again with [`Self::cut_history`]).
    fn append_history(&self, tenant: &str, e: &HistoryEntry) -> Result<u64> {
        let path = self.history_path(tenant);
        let what = || format!("cannot append to {}", path.display());
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        let mut f = crate::util::nofollow::open_own_file(std::fs::OpenOptions::new().create(true).read(true).append(true), &path).with_context(what)?;
        // After the last newline: a whole entry is finished (review 22: an
        // editor may drop the final newline), the end of a line a stopped
        // write left is cut off.
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut text).with_context(what)?;
        let (whole, last) = split_unfinished(&text);
        let mut before = whole as u64;
        if last.is_some() {
            line.insert(0, b'\n');
            before = text.len() as u64;
        } else if whole < text.len() {
            tracing::warn!("{}: removed {} byte(s) of a line a stopped write left", path.display(), text.len() - whole);
            f.set_len(before).with_context(what)?;
        }
        if let Err(e) = f.write_all(&line).and_then(|()| f.sync_all()) {
            let _ = f.set_len(before).and_then(|()| f.sync_all());
            return Err(e).with_context(what);
        }
        Ok(before)
    }

    /// Cut the history back to `len` bytes (the line of a change that failed).
    fn cut_history(&self, tenant: &str, len: u64) {
        let path = self.history_path(tenant);
        let cut = crate::util::nofollow::open_own_file(std::fs::OpenOptions::new().write(true), &path)
            .and_then(|f| Ok(f.set_len(len).and_then(|()| f.sync_all())?));
        if let Err(e) = cut {
            tracing::warn!("{}: cannot remove the line of the change that failed: {e}", path.display());
        }
    }

    /// Append the history line of champion `c`, then write `c`; when `c`
    /// cannot be written the line is cut off again.
    fn change_champion(&self, c: &Champion, e: &HistoryEntry) -> Result<()> {
        let before = self.append_history(&c.tenant, e)?;
        self.write_champion(c).inspect_err(|_| self.cut_history(&c.tenant, before))
    }

    fn write_champion(&self, c: &Champion) -> Result<()> {
        write_atomic_with(&self.champion_path(&c.tenant), &pretty(c)?, Durability::Full)
    }

    /// Make `version` the champion of `tenant`. The version is loaded and
    /// verified first: a model that fails its checks is never promoted. The
    /// caller holds the workspace lock. Promoting the champion changes
    /// nothing and writes no history line ([`Promotion::AlreadyChampion`]:
    /// a script that makes sure a version is promoted may run twice).
    pub fn promote(&self, tenant: &str, version: &str, who: &str, why: &str, key: &crate::crypto::IntegrityKey) -> Result<Promotion> {
        check_reason(why)?;
        let m = self.load(tenant, version, key)?;
        let current = self.champion(tenant)?;
        let mut previous = current.as_ref().map(|c| c.previous.clone()).unwrap_or_default();
        match &current {
            Some(c) if c.version == version && c.blake3 == m.blake3 => return Ok(Promotion::AlreadyChampion),
            // The record names this version with another hash (altered or
            // damaged: `predict` and `serve` refuse it): written again, its
            // earlier champions kept (review 66 #5).
            Some(c) if c.version == version => {}
            Some(c) => previous.push(c.version.clone()),
            None => {}
        }
        let from = current.map(|c| c.version);
        let c = Champion { format: CHAMPION_FORMAT.into(), tenant: tenant.into(), version: version.into(), blake3: m.blake3, since: now(), previous };
        self.change_champion(
            &c,
            &HistoryEntry { time: c.since.clone(), who: who.into(), action: HistoryAction::Promote, from: from.clone(), to: version.into(), why: why.into() },
        )?;
        Ok(Promotion::Changed { from })
    }

    /// Return `tenant` to its previous champion. The caller holds the
    /// workspace lock. Returns (from, to).
    pub fn rollback(&self, tenant: &str, who: &str, why: &str, key: &crate::crypto::IntegrityKey) -> Result<(String, String)> {
        check_reason(why)?;
        let Some(cur) = self.champion(tenant)? else {
            bail!("tenant {tenant} has no champion: nothing to roll back (see `dagrun models list {tenant}`)");
        };
        let mut previous = cur.previous.clone();
        let Some(to) = previous.pop() else {
            bail!("tenant {tenant}'s champion {} is its first: there is no previous champion to roll back to", cur.version);
        };
        let m = self.load(tenant, &to, key).with_context(|| format!("cannot roll back tenant {tenant} to {to}"))?;
        let c = Champion { format: CHAMPION_FORMAT.into(), tenant: tenant.into(), version: to.clone(), blake3: m.blake3, since: now(), previous };
        self.change_champion(
            &c,
            &HistoryEntry {
                time: c.since.clone(),
                who: who.into(),
                action: HistoryAction::Rollback,
                from: Some(cur.version.clone()),
                to: to.clone(),
                why: why.into(),
            },
        )?;
        Ok((cur.version, to))
    }
}

/// Split `history.jsonl`'s bytes after the last newline: where the lines
/// that end in one stop, and the entry the rest holds when it is a whole one
/// missing only its newline (else the rest is what a stopped write left).
fn split_unfinished(bytes: &[u8]) -> (usize, Option<HistoryEntry>) {
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let last = if whole < bytes.len() { crate::util::redact::from_json(&bytes[whole..]).ok() } else { None };
    (whole, last)
}

/// Which entries of `history` took effect, given the tenant's champion now:
/// a line's change took effect when the next line starts from its champion
/// (the last line: when it is the champion now, since its time). A command
/// stopped between its history line and the champion's write leaves a line
/// that did not.
pub fn applied(history: &[HistoryEntry], champion: Option<&Champion>) -> Vec<bool> {
    (0..history.len())
        .map(|i| match history.get(i + 1) {
            Some(next) => next.from.as_deref() == Some(history[i].to.as_str()),
            None => champion.is_some_and(|c| c.version == history[i].to && c.since == history[i].time),
        })
        .collect()
}

fn pretty<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v)?;
    b.push(b'\n');
    Ok(b)
}

/// A promotion's `--reason`: at most 1,000 bytes, no control characters
/// (`models history` shows it in terminals).
fn check_reason(why: &str) -> Result<()> {
    if !crate::util::is_plain_label(why, 1000) {
        return Err(crate::error::config("--reason: at most 1000 bytes, no control characters (no line breaks, no escape sequences)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(time: &str, action: HistoryAction, from: Option<&str>, to: &str) -> HistoryEntry {
        HistoryEntry { time: time.into(), who: "me".into(), action, from: from.map(String::from), to: to.into(), why: String::new() }
    }

    fn champion(version: &str, since: &str) -> Champion {
        Champion {
            format: CHAMPION_FORMAT.into(),
            tenant: "Tenant_A".into(),
            version: version.into(),
            blake3: "0".repeat(64),
            since: since.into(),
            previous: vec![],
        }
    }

    /// Review 21: a promotion stopped between its history line and the
    /// champion's write is shown as not applied.
    #[test]
    fn history_lines_whose_change_never_took_effect_are_told_apart() {
        use HistoryAction::*;
        let h = [
            entry("t1", Promote, None, "v1"),
            entry("t2", Promote, Some("v1"), "v2"), // stopped: the champion stayed v1
            entry("t3", Promote, Some("v1"), "v3"),
            entry("t4", Rollback, Some("v3"), "v1"), // stopped: the champion stayed v3
        ];
        assert_eq!(applied(&h, Some(&champion("v3", "t3"))), [true, false, true, false]);
        assert_eq!(applied(&h, Some(&champion("v1", "t4"))), [true, false, true, true]);
        assert_eq!(applied(&h[..1], None), [false]);
        assert!(applied(&[], None).is_empty());
    }

    /// Review 21: a failed champion write left a promotion in the history, and
    /// a line cut short broke `models history` for good.
    #[test]
    fn the_history_names_no_change_that_failed_and_survives_a_torn_line() {
        let d = tempfile::tempdir().unwrap();
        let reg = Registry::new(d.path());
        std::fs::create_dir_all(reg.tenant_dir("Tenant_A")).unwrap();
        let c1 = champion("v1", "t1");
        reg.change_champion(&c1, &entry("t1", HistoryAction::Promote, None, "v1")).unwrap();
        assert_eq!(reg.champion("Tenant_A").unwrap(), Some(c1.clone()));
        let one = std::fs::read(reg.history_path("Tenant_A")).unwrap();

        // The champion cannot be written (a folder in its place): no line stays.
        let blocked = reg.champion_path("Tenant_A").with_extension("blocked");
        std::fs::rename(reg.champion_path("Tenant_A"), &blocked).unwrap();
        std::fs::create_dir_all(reg.champion_path("Tenant_A").join("x")).unwrap();
        assert!(reg.change_champion(&champion("v2", "t2"), &entry("t2", HistoryAction::Promote, Some("v1"), "v2")).is_err());
        assert_eq!(std::fs::read(reg.history_path("Tenant_A")).unwrap(), one);
        std::fs::remove_dir_all(reg.champion_path("Tenant_A")).unwrap();
        std::fs::rename(&blocked, reg.champion_path("Tenant_A")).unwrap();

        // A whole line missing only its newline: kept, and finished by the next append.
        let mut unfinished = std::fs::read(reg.history_path("Tenant_A")).unwrap();
        assert_eq!(unfinished.pop(), Some(b'\n'));
        std::fs::write(reg.history_path("Tenant_A"), &unfinished).unwrap();
        reg.change_champion(&champion("v1b", "t1b"), &entry("t1b", HistoryAction::Promote, Some("v1"), "v1b")).unwrap();
        assert_eq!(reg.history("Tenant_A").unwrap().iter().map(|e| e.to.as_str()).collect::<Vec<_>>(), ["v1", "v1b"]);
        reg.change_champion(&c1, &entry("t1c", HistoryAction::Rollback, Some("v1b"), "v1")).unwrap_or_else(|e| panic!("{e:#}"));
        let one = std::fs::read(reg.history_path("Tenant_A")).unwrap();

        // A line cut short: skipped when read, cut off by the next append.
        let mut torn = one.clone();
        torn.extend_from_slice(b"{\"time\":\"t2\",\"who\":\"Ren\xc3");
        std::fs::write(reg.history_path("Tenant_A"), &torn).unwrap();
        assert_eq!(reg.history("Tenant_A").unwrap().len(), 3);
        reg.change_champion(&champion("v3", "t3"), &entry("t3", HistoryAction::Promote, Some("v1"), "v3")).unwrap();
        let h = reg.history("Tenant_A").unwrap();
        assert_eq!(h.iter().map(|e| e.to.as_str()).collect::<Vec<_>>(), ["v1", "v1b", "v1", "v3"]);
        assert_eq!(applied(&h, reg.champion("Tenant_A").unwrap().as_ref()), [true, true, true, true]);
        // A damaged line that is not the last one is still an error.
        let mut bad = b"{\"nope\":1}\n".to_vec();
        bad.extend_from_slice(&std::fs::read(reg.history_path("Tenant_A")).unwrap());
        std::fs::write(reg.history_path("Tenant_A"), bad).unwrap();
        assert!(reg.history("Tenant_A").unwrap_err().to_string().contains("line 1: not a valid history entry"));
        // Review 23: a damaged line as long as an unfinished last line was
        // taken for it, and it and every line after it were skipped.
        let good = std::fs::read_to_string(reg.history_path("Tenant_A")).unwrap().lines().nth(1).unwrap().to_string();
        std::fs::write(reg.history_path("Tenant_A"), format!("{good}\n{{\"x\":1}}\n{good}\n{{\"x\":2}}")).unwrap();
        assert!(reg.history("Tenant_A").unwrap_err().to_string().contains("line 2: not a valid history entry"));
    }
}
