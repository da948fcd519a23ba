//! `dagrun pull [PIPELINE] [--remote URL] [--tenant T…]`: fetch the action
//! entries and cache objects the local workspace lacks from the remote cache;
//! and the `run --pull` hook ([`RemoteHit`]) that fetches one stage's key.
//!
//! Rules:
//! - Everything read from the remote is untrusted. A record is refused unless
//!   it parses as a stage record, is at most 1 MiB, its name is its cache key
//!   and its ingredients hash to that key, its stage's tenant is the prefix's
//!   tenant, every output path is plain and relative, every hash is a blake3
//!   digest, and no sensitive output claims to be cached. Directory listings
//!   (tree objects) are checked the same way before their files are fetched.
//! - Every object is verified (blake3 = name) before it lands in the local
//!   cache, atomically; an action entry is written only after all its objects.
//! - Sensitive outputs are never fetched (they were never pushed).
//! - An object the local cache already holds is not stored again, but the
//!   record's prefix on the remote must hold it too, the same bytes (read
//!   and hashed, then dropped): a record may only name objects pushed
//!   beside it. Otherwise a record sealed by an insider in one tenant's
//!   prefix could name another tenant's object held here, and this
//!   workspace's next `push` would upload that object into the first
//!   tenant's prefix.
//! - Nothing local is overwritten: what the workspace has is kept.
//! - A pulled record must carry a MAC that verifies under this workspace's
//!   integrity key: the workspaces sharing a remote share their keys (README,
//!   "Sharing a cache"), so a record the pushing workspace wrote verifies,
//!   and one forged or altered by whoever can write to the bucket does not.
//!   It is checked before any of its fields is used, and a refused record
//!   is dropped at once (nothing of it is kept while the rest is pulled).
//! - A record's outputs are exactly the outputs its ingredients declare, and
//!   the tenant its ingredients name (`tenant` param) is its stage's; an
//!   entry is used only for a stage of its own tenant (`engine::decide`).
//! - An object's size must be the size its record gives, and no more bytes
//!   than that are read: a lying server cannot fill the disk. A directory's
//!   listing may be at most what its entry count allows; a file inside a
//!   directory must be the size its (verified) listing gives (a listing of
//!   an older dagrun, `dagrun-tree/2`, gives none: then its hash alone
//!   checks it).
//! - Stage names and server messages are printed with control characters
//!   escaped: a record cannot rewrite the terminal.
//! - `run --pull` stops asking a remote prefix for the rest of the run once
//!   a request to it failed (unreachable, or access denied): one wait, not one
//!   per stage; a record is read with a timeout of the retry time plus 30 s.
//! - `pull` holds the workspace lock while it writes.

use crate::config::{DagrunConfig, RemoteConfig};
use crate::engine::RemoteSource;
use crate::pipeline::{Pipeline, Stage};
use crate::remote::{Download, RECORD_MAX, Remote, SizeBound, check_relative_path, is_hash};
use crate::workspace::cas::Cas;
use crate::workspace::hashing::{TreeEntry, decode_tree};
use crate::workspace::state::{Loaded, StageState, StateStore};
use crate::workspace::{ContentHash, Workspace};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// Open the remote: `--remote URL` if given, else `remote:` of `config/dagrun.yaml`.
/// `--remote` replaces the URL only; the file's `endpoint:` etc. still apply.
pub fn open_remote(workspace: &Path, flag: Option<&str>) -> Result<Remote> {
    let cfg = DagrunConfig::load(workspace)?;
    let rc = match (flag, cfg.remote) {
        (Some(url), Some(file)) => RemoteConfig { url: url.to_string(), ..file },
        (Some(url), None) => RemoteConfig::from_url(url),
        (None, Some(file)) => file,
        (None, None) => {
            return Err(crate::error::config(format!(
                "no remote: give --remote URL, or add to {}/{}:\n  remote:\n    url: s3://BUCKET/PREFIX",
                workspace.display(),
                crate::config::CONFIG_FILE
            )));
        }
    };
    Remote::open(&rc)
}

pub use crate::pipeline::tenants::tenant_of_stage as tenant_of;

/// Parse and check a stage record (an action entry or state record) read
/// from disk (its MAC was checked by the state store); returns it with its tenant.
pub fn validate_record(bytes: &[u8], expected_key: Option<&str>) -> Result<(StageState, Option<String>)> {
    check_record_size(bytes)?;
    // Every hash field parses as a `ContentHash` (or the record is refused).
    let st: StageState = crate::util::redact::from_json(bytes).map_err(|why| anyhow!("not a stage record ({})", why))?;
    let tenant = check_record(&st, expected_key)?;
    Ok((st, tenant))
}

/// Check a record read from a remote: its MAC under this workspace's
/// integrity key first, then everything [`validate_record`] checks.
pub fn open_pulled(bytes: &[u8], key: &crate::crypto::IntegrityKey, expected_key: &str) -> Result<(StageState, Option<String>)> {
    check_record_size(bytes)?;
    let st: StageState = crate::workspace::record::open(Some(key), crate::workspace::record::STAGE_RECORD, bytes, "record").map_err(|e| {
        anyhow!(
            "{e}: a record pulled must verify under this workspace's integrity key: it was written by a workspace with other keys, or altered on the remote (workspaces sharing a remote share .dagrun/keys/ or the HSM token)"
        )
    })?;
    let tenant = check_record(&st, Some(expected_key))?;
    Ok((st, tenant))
}

/// A record is at most [`RECORD_MAX`] bytes.
fn check_record_size(bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 > RECORD_MAX {
        bail!("record is {} bytes, over the {} limit", bytes.len(), RECORD_MAX);
    }
    Ok(())
}

/// The checks of a parsed record's fields; returns its stage's tenant.
fn check_record(st: &StageState, expected_key: Option<&str>) -> Result<Option<String>> {
    if let Some(k) = expected_key
        && st.key.as_str() != k
    {
        bail!("record is stored under key {} but holds key {}", &k[..12.min(k.len())], st.key.short());
    }
    let recomputed = st.ingredients.key();
    if recomputed != st.key {
        bail!("record's ingredients hash to {}, not to its key {}: altered or corrupted", recomputed.short(), st.key.short());
    }
    let tenant = tenant_of(&st.stage)?;
    if let (Some(t), Some(own)) = (st.ingredients.params.get("tenant"), tenant.as_deref())
        && t.as_str() != Some(own)
    {
        bail!("record of stage {} holds the ingredients of another tenant's stage: refused", shown(&st.stage));
    }
    let declared: BTreeSet<&str> = st.ingredients.outs.iter().map(String::as_str).collect();
    if !st.outputs.keys().map(String::as_str).eq(declared.iter().copied()) {
        bail!("record of stage {} lists outputs its ingredients do not declare (or lacks some): refused", shown(&st.stage));
    }
    for (path, o) in &st.outputs {
        check_relative_path(path).with_context(|| "output of the record")?;
        if o.sensitive && o.cached {
            bail!("output {path} is marked sensitive and cached at once: refused");
        }
    }
    Ok(tenant)
}

/// A name read from elsewhere, for a message: control characters escaped,
/// at most 80 characters.
fn shown(name: &str) -> String {
    crate::crypto::escape_for_message(name)
}

/// Validate a tree listing read from the remote or the cache.
pub fn validate_tree(bytes: &[u8]) -> Result<Vec<TreeEntry>> {
    // Paths are checked by `decode_tree` (relative, no `..`, no NUL, sorted).
    let entries = decode_tree(bytes).map_err(|e| anyhow!("directory listing: {e}"))?;
    for (i, e) in entries.iter().enumerate() {
        if let TreeEntry::Link { target, .. } = e
            && (target.starts_with('/') || target.split('/').any(|c| c == ".."))
        {
            bail!("directory listing entry {}: symlink points outside the directory", i + 1);
        }
    }
    Ok(entries)
}

/// A validated record from the remote, with where it came from.
struct Fetched {
    tenant: Option<String>,
    key: ContentHash,
    st: StageState,
}

/// What a pull did.
#[derive(Debug, Default, serde::Serialize)]
pub struct PullReport {
    pub remote: String,
    pub records_fetched: usize,
    pub records_present: usize,
    pub objects_fetched: usize,
    pub bytes_fetched: u64,
    pub objects_present: usize,
    /// Records refused or whose objects could not be fetched, with why.
    pub problems: Vec<String>,
    /// What was not pulled, with why (not an error): a forgotten tenant.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    pub seconds: f64,
    /// How many of `problems` are the remote's data failing a check (a
    /// record that does not verify, a size or hash that is wrong): retrying
    /// changes nothing, so `pull` exits 4 for them, 1 for failed transfers only.
    pub refused: usize,
}

/// A pull's problems as they are found: each with why, the refusals counted.
#[derive(Default)]
struct Problems {
    list: Vec<String>,
    refused: usize,
}

impl Problems {
    /// A transfer or a local write failed: running again may succeed.
    fn failed(&mut self, why: String) {
        self.list.push(why);
    }
    /// The remote's data failed a check.
    fn refused(&mut self, why: String) {
        self.refused += 1;
        self.list.push(why);
    }
    /// An error of the remote: refused when its data failed a check.
    fn of(&mut self, e: &anyhow::Error, why: String) {
        if crate::remote::is_untrusted(e) { self.refused(why) } else { self.failed(why) }
    }
}

/// The most bytes a directory listing of `entries` entries can take: each
/// entry's path (and a link's target) at most `MAX_ENTRY_PATH` bytes, every
/// byte escaped (6 bytes in JSON), a hash and the field names; and the header.
fn listing_bound(entries: u64) -> u64 {
    entries.saturating_mul(2 * 6 * crate::workspace::hashing::MAX_ENTRY_PATH as u64 + 256).saturating_add(256)
}

/// Fetch the objects of validated records into the local cache and then
/// write their action entries. Returns (objects fetched, bytes, objects
/// already present) and the keys that succeeded; problems are appended.
fn install(remote: &Remote, cas: &Cas, states: &StateStore, recs: Vec<Fetched>, problems: &mut Problems) -> (usize, u64, usize, Vec<ContentHash>) {
    let (mut fetched, mut bytes, mut present) = (0usize, 0u64, 0usize);
    let mut failed: HashSet<ContentHash> = HashSet::new();
    let mut fetch_wave = |wanted: Vec<(usize, Option<String>, ContentHash, SizeBound)>, failed: &mut HashSet<ContentHash>, problems: &mut Problems| {
        // Dedupe by (scope, hash). An object the local cache holds is not
        // stored again, only checked against the remote's copy (read and
        // hashed, not kept: see the rules).
        let mut ris_of: Vec<Vec<usize>> = Vec::new();
        let mut downloads: Vec<Download> = Vec::new();
        let mut at: HashMap<(Option<String>, ContentHash), usize> = HashMap::new();
        for (ri, tenant, hash, size) in wanted {
            match at.entry((tenant.clone(), hash.clone())) {
                std::collections::hash_map::Entry::Occupied(e) => ris_of[*e.get()].push(ri),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(downloads.len());
                    ris_of.push(vec![ri]);
                    // A local object is checked first (hashed): a corrupted
                    // one is removed and fetched again, never blamed on the
                    // remote (review 13); an intact one is compared against
                    // the remote's copy under the record's size bound.
                    let intact = cas.has(&hash)
                        && match cas.check(&hash) {
                            Ok(true) => true,
                            _ => {
                                tracing::warn!("the local cache's object {} was corrupted (removed); fetching it from the remote", hash.short());
                                false
                            }
                        };
                    downloads.push(if intact {
                        Download { dest: None, tenant, hash: hash.to_string(), size }
                    } else {
                        Download { dest: Some(cas.object_path(&hash)), tenant, hash: hash.to_string(), size }
                    });
                }
            }
        }
        for ((ris, d), r) in ris_of.iter().zip(&downloads).zip(remote.download(&downloads)) {
            let held = d.dest.is_none();
            match r {
                Ok(_) if held => present += 1,
                Ok(n) => {
                    fetched += 1;
                    bytes += n;
                }
                Err(e) => {
                    if !held {
                        problems.of(&e, format!("{e:#}"));
                    }
                    for &ri in ris {
                        if held {
                            problems.refused(format!(
                                "record {} ({}): the local cache holds one of its objects, but the remote's copy does not match it: {e:#}; a record may only name objects pushed beside it; refused",
                                recs[ri].key.short(),
                                shown(&recs[ri].st.stage)
                            ));
                        }
                        failed.insert(recs[ri].key.clone());
                    }
                }
            }
        }
    };
    // Wave 1: file outputs and directory listings.
    let mut wave1 = Vec::new();
    for (ri, r) in recs.iter().enumerate() {
        for o in r.st.outputs.values().filter(|o| o.cached && !o.sensitive) {
            // A file's size is in its record; a directory's listing is bounded by its entry count.
            let bound = if o.dir { SizeBound::AtMost(listing_bound(o.size)) } else { SizeBound::Exactly(o.size) };
            wave1.push((ri, r.tenant.clone(), o.hash.clone(), bound));
        }
    }
    fetch_wave(wave1, &mut failed, problems);
    // Wave 2: the files of directory outputs (their listings are now local and verified).
    let mut wave2 = Vec::new();
    for (ri, r) in recs.iter().enumerate() {
        if failed.contains(&r.key) {
            continue;
        }
        for (path, o) in r.st.outputs.iter().filter(|(_, o)| o.dir && o.cached && !o.sensitive) {
            let listing =
                crate::util::read_capped(&cas.object_path(&o.hash), crate::workspace::hashing::MAX_LISTING_BYTES).map_err(anyhow::Error::from).and_then(|b| {
                    if ContentHash::of_bytes(&b) != o.hash {
                        bail!("cache object {} is corrupted", o.hash.short());
                    }
                    validate_tree(&b)
                });
            match listing {
                Ok(entries) => {
                    for e in entries {
                        if let TreeEntry::File { hash, size, .. } = e {
                            // A listing made by an older dagrun (`dagrun-tree/2`) gives no size.
                            wave2.push((ri, r.tenant.clone(), hash, size.map_or(SizeBound::Unknown, SizeBound::Exactly)));
                        }
                    }
                }
                Err(e) => {
                    problems.refused(format!("record {} ({}): directory output {path}: {e:#}; refused", r.key.short(), shown(&r.st.stage)));
                    failed.insert(r.key.clone());
                }
            }
        }
    }
    fetch_wave(wave2, &mut failed, problems);
    let mut done = Vec::new();
    for r in &recs {
        if failed.contains(&r.key) {
            continue;
        }
        match states.import_action(&r.st) {
            Ok(()) => done.push(r.key.clone()),
            Err(e) => problems.failed(format!("cannot write action entry {}: {e:#}", r.key.short())),
        }
    }
    (fetched, bytes, present, done)
}

/// `dagrun pull`: everything the remote has that the workspace lacks
/// (restricted to a pipeline's stages and/or some tenants' prefixes).
/// Waits up to `wait` for the workspace lock (None: exit 75 at once).
pub fn pull(workspace: &Path, remote: &Remote, pipeline: Option<&Pipeline>, tenants: &[String], wait: Option<std::time::Duration>) -> Result<PullReport> {
    let t0 = Instant::now();
    let ws = Workspace::at(workspace);
    let _lock = ws.lock(wait, "dagrun pull")?;
    let ring = crate::crypto::Keyring::open(ws.root())?;
    let cas = Cas::new(&ws);
    let integrity = ring.integrity_key();
    let states = StateStore::new(&ws, Some(integrity.clone()));
    let mut report = PullReport { remote: remote.shown().to_string(), ..Default::default() };
    for t in tenants {
        crate::pipeline::tenants::validate_tenant_id(t).map_err(|e| crate::error::config(format!("--tenant: {e}")))?;
    }
    let scopes: Vec<Option<String>> = if !tenants.is_empty() {
        tenants.iter().cloned().map(Some).collect()
    } else if let Some(p) = pipeline {
        let mut v: Vec<Option<String>> = vec![None];
        let ts: BTreeSet<String> = p.stages.iter().filter_map(|s| s.tenant.clone()).collect();
        v.extend(ts.into_iter().map(Some));
        v
    } else {
        let mut v = vec![None];
        v.extend(remote.list_tenants()?.into_iter().map(Some));
        v
    };
    let mut problems = Problems::default();
    // Nothing of a forgotten tenant is brought back (`remote::forgotten`):
    // not its prefix, nor what this workspace's records or this pull's show
    // derived from its data.
    // Nor of a tenant another workspace erased from the remote (its tombstone there).
    // A tombstone that cannot be read withholds too: whether it is there is unknown.
    let forgotten_here = ring.forgotten_tenants();
    let asked = scopes.iter().flatten().filter(|t| !forgotten_here.contains_key(*t)).map(String::as_str);
    let super::erasure::Withheld { tenants: withheld, unreadable, untrusted } =
        super::erasure::withheld(&forgotten_here, super::erasure::tombstones(remote, &integrity, asked));
    for (_, why) in untrusted {
        report.skipped.push(format!("{why}: not a tombstone sealed under this workspace's keys; ignored"));
    }
    let mut gone = crate::remote::forgotten::Forgotten::of_workspace(withheld, &states, Cas::read_only(&ws));
    if let Some(why) = gone.damaged() {
        return Err(crate::error::Failure::Integrity(format!("{why}; nothing was pulled")).into());
    }
    let scopes: Vec<Option<String>> = scopes
        .into_iter()
        .filter(|s| match s.as_deref().and_then(|t| gone.when(t).map(|at| (t, at))) {
            Some((t, at)) if forgotten_here.contains_key(t) => {
                report.skipped.push(format!("tenant {t} was forgotten here (`dagrun keys forget`, {at}): nothing of it is pulled"));
                false
            }
            Some((t, _)) if unreadable.contains_key(t) => {
                let line = format!(
                    "{}: whether tenant {t} was erased from the remote is unknown, so nothing of it is pulled; pull again when its tombstone can be read",
                    unreadable[t]
                );
                // Asked for by name: a failure (exit 1); found by listing: a note.
                if tenants.iter().any(|x| x == t) {
                    problems.failed(line)
                } else {
                    report.skipped.push(line)
                }
                false
            }
            Some((t, at)) => {
                report.skipped.push(format!(
                    "tenant {t} was erased from the remote ({at}, by a workspace that ran `dagrun keys forget {t}`): nothing of it is pulled{}",
                    super::erasure::forget_here_too(&ring, t)
                ));
                false
            }
            None => true,
        })
        .collect();
    let names: Option<HashSet<&str>> = pipeline.map(|p| p.stages.iter().map(|s| s.name.as_str()).collect());
    let mut recs = Vec::new();
    for scope in &scopes {
        let keys = remote.list_actions(scope.as_deref())?;
        for key in keys {
            let Ok(key) = ContentHash::parse(&key) else { continue };
            if matches!(states.load_action(&key), Loaded::Valid(_)) {
                report.records_present += 1;
                continue;
            }
            let bytes = match remote.get_action(scope.as_deref(), key.as_str()) {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) if crate::remote::is_untrusted(&e) => {
                    problems.refused(format!("{e:#}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (st, tenant) = match open_pulled(&bytes, &integrity, key.as_str()) {
                Ok(v) => v,
                Err(e) => {
                    problems.refused(format!("{}: {e:#}; refused", remote.action_location(scope.as_deref(), key.as_str())));
                    continue;
                }
            };
            if tenant != *scope {
                problems.refused(format!(
                    "{}: record of stage {} is under the wrong prefix; refused",
                    remote.action_location(scope.as_deref(), key.as_str()),
                    shown(&st.stage)
                ));
                continue;
            }
            if names.as_ref().is_some_and(|n| !n.contains(st.stage.as_str())) {
                continue;
            }
            recs.push(Fetched { tenant, key, st });
        }
    }
    gone.trace(recs.iter().map(|f| &f.st));
    let mut derived: BTreeMap<String, usize> = BTreeMap::new();
    recs.retain(|f| match gone.claims(&f.st) {
        Some(t) => {
            *derived.entry(t).or_default() += 1;
            false
        }
        None => true,
    });
    for (t, n) in derived {
        let why = if forgotten_here.contains_key(&t) {
            "was forgotten here (`dagrun keys forget`)"
        } else if unreadable.contains_key(&t) {
            "may have been erased from the remote (its tombstone could not be read)"
        } else {
            "was erased from the remote"
        };
        report.skipped.push(format!("{} derived from tenant {t}, which {why}: not pulled", crate::util::count(n, "record", "records")));
    }
    let (f, b, p, done) = install(remote, &cas, &states, recs, &mut problems);
    report.problems = problems.list;
    report.refused = problems.refused;
    report.objects_fetched = f;
    report.bytes_fetched = b;
    report.objects_present = p;
    report.records_fetched = done.len();
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The `run --pull` hook for a workspace (`--remote URL` or the config's).
pub fn hook(workspace: &Path, flag: Option<&str>) -> Result<std::sync::Arc<dyn RemoteSource>> {
    Ok(std::sync::Arc::new(RemoteHit {
        remote: open_remote(workspace, flag)?,
        failed_scopes: Mutex::new(HashSet::new()),
        erased: Mutex::new(HashMap::new()),
        warned_damaged: Default::default(),
    }))
}

/// The `run --pull` hook: fetch one stage's key from the remote into the
/// run's own stores.
pub struct RemoteHit {
    remote: Remote,
    /// Prefixes (None: the root) a request to which failed in this run: not asked again.
    failed_scopes: Mutex<HashSet<Option<String>>>,
    /// Tenant → whether the remote holds its tombstone (asked once a run).
    erased: Mutex<HashMap<String, bool>>,
    /// Whether the damaged `.dagrun/forgotten-outputs.json` was named (once a run).
    warned_damaged: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RemoteHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHit").field("remote", &self.remote.shown()).finish()
    }
}

impl RemoteSource for RemoteHit {
    fn fetch(&self, stage: &Stage, key: &ContentHash, states: &StateStore, cas: &Cas, forgotten: &Mutex<crate::remote::forgotten::Forgotten>) -> Result<bool> {
        let tenant = stage.tenant.as_deref();
        let scope = tenant.map(str::to_string);
        if self.failed_scopes.lock().unwrap_or_else(|e| e.into_inner()).contains(&scope) {
            tracing::debug!("{}: not asking the remote cache again (a request to this prefix failed earlier in this run)", stage.name);
            return Ok(false);
        }
        let Some(integrity) = states.integrity_key() else { bail!("no workspace integrity key to verify the record with") };
        if let Some(t) = tenant {
            let known = self.erased.lock().unwrap_or_else(|e| e.into_inner()).get(t).copied();
            let erased = match known {
                Some(e) => e,
                None => {
                    // Once a run (a tenant has several stages).
                    let e = match crate::remote::erasure::read(&self.remote, integrity, t) {
                        crate::remote::erasure::Found::Valid(_) => {
                            tracing::warn!(
                                "tenant {t} was erased from the remote (by a workspace that ran `dagrun keys forget {t}`): nothing of it is fetched and its stages run here; if this workspace holds its keys, run `dagrun keys forget {t} --yes` here too"
                            );
                            true
                        }
                        crate::remote::erasure::Found::Unreadable(why) => {
                            tracing::warn!("{why}: whether tenant {t} was erased from the remote is unknown, so nothing of it is fetched; its stages run here");
                            true
                        }
                        crate::remote::erasure::Found::Untrusted(why) => {
                            tracing::warn!("{why}: not a tombstone sealed under this workspace's keys; ignored");
                            false
                        }
                        crate::remote::erasure::Found::None => false,
                    };
                    self.erased.lock().unwrap_or_else(|e| e.into_inner()).insert(t.to_string(), e);
                    e
                }
            };
            if erased {
                tracing::debug!("{}: tenant {t} was erased from the remote: not fetched", stage.name);
                return Ok(false);
            }
        }
        let bytes = match self.remote.get_action(tenant, key.as_str()) {
            Ok(Some(b)) => b,
            Ok(None) => {
                tracing::debug!("{}: key {} is not in the remote cache", stage.name, key.short());
                return Ok(false);
            }
            Err(e) => {
                self.failed_scopes.lock().unwrap_or_else(|e| e.into_inner()).insert(scope);
                return Err(e.context("not asking this prefix again in this run"));
            }
        };
        let (st, t) =
            open_pulled(&bytes, integrity, key.as_str()).with_context(|| format!("{}: refused", self.remote.action_location(tenant, key.as_str())))?;
        if t.as_deref() != tenant {
            bail!("{}: record of stage {} is under the wrong prefix; refused", self.remote.action_location(tenant, key.as_str()), shown(&st.stage));
        }
        if let Some(why) = forgotten.lock().unwrap_or_else(|e| e.into_inner()).damaged() {
            if !self.warned_damaged.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("{why}; the stages run here");
            }
            return Ok(false);
        }
        if let Some(f) = forgotten.lock().unwrap_or_else(|e| e.into_inner()).note(&st) {
            tracing::info!("{}: the remote's record derives from tenant {f}, which was forgotten here: not fetched; the stage runs here", stage.name);
            return Ok(false);
        }
        let mut problems = Problems::default();
        let (n, bytes_in, _, done) = install(&self.remote, cas, states, vec![Fetched { tenant: t, key: key.clone(), st }], &mut problems);
        if done.is_empty() {
            // A download that failed or stalled (review 13: a server trickling
            // bytes held each stage for two 300 s attempts): the prefix is not
            // asked again in this run, as after a failed record read.
            self.failed_scopes.lock().unwrap_or_else(|e| e.into_inner()).insert(scope);
            bail!("{}; not asking this prefix again in this run", problems.list.join("; "));
        }
        tracing::info!("{}: fetched its cache entry from {} ({n} objects, {bytes_in} bytes)", stage.name, self.remote.shown());
        Ok(true)
    }

    fn shown(&self) -> String {
        self.remote.shown().to_string()
    }
}

/// Print a pull's report (stderr for problems).
pub fn print(r: &PullReport) {
    crate::doneln!(
        "pulled {} records and {} objects ({}) from {} in {:.2}s; {} records and {} objects were already here",
        r.records_fetched,
        r.objects_fetched,
        crate::util::human_bytes(r.bytes_fetched),
        r.remote,
        r.seconds,
        r.records_present,
        r.objects_present
    );
    for s in &r.skipped {
        crate::util::stdout::warn(format_args!("skipped: {s}"));
    }
    for p in &r.problems {
        crate::util::stdout::warn(format_args!("problem: {p}"));
    }
}

/// Keys of records a workspace holds (for tests and `push`).
pub fn local_keys(states: &StateStore) -> BTreeMap<String, std::path::PathBuf> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(states.actions_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(k) = name.strip_suffix(".json").filter(|k| is_hash(k)) {
                out.insert(k.to_string(), e.path());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_tenants() {
        assert_eq!(tenant_of("train[Tenant_A]").unwrap().as_deref(), Some("Tenant_A"));
        assert_eq!(tenant_of("generate").unwrap(), None);
        for bad in ["train[../x]", "[A]", "train[A", "train]", "x[a b]", ""] {
            assert!(tenant_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trees_with_escaping_paths_are_refused() {
        let h = "a".repeat(64);
        let tree = |entries: &str| format!("{{\"format\":\"dagrun-tree/3\",\"entries\":[{entries}]}}");
        assert!(validate_tree(tree(&format!("{{\"type\":\"file\",\"path\":\"a/b\",\"hash\":\"{h}\",\"size\":1,\"exec\":false}}")).as_bytes()).is_ok());
        assert!(validate_tree(tree(&format!("{{\"type\":\"file\",\"path\":\"../b\",\"hash\":\"{h}\",\"size\":1,\"exec\":false}}")).as_bytes()).is_err());
        assert!(validate_tree(tree(&format!("{{\"type\":\"file\",\"path\":\"/etc/x\",\"hash\":\"{h}\",\"size\":1,\"exec\":false}}")).as_bytes()).is_err());
        assert!(validate_tree(tree("{\"type\":\"link\",\"path\":\"x\",\"target\":\"/etc/passwd\"}").as_bytes()).is_err());
        assert!(validate_tree(tree("{\"type\":\"link\",\"path\":\"x\",\"target\":\"../../y\"}").as_bytes()).is_err());
        assert!(validate_tree(b"garbage").is_err());
    }
}
