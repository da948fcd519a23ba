//! What the server holds in memory, and how it follows the disk.
//!
//! Rules:
//! - Models are loaded only through [`crate::registry::Registry::load`] (hash
//!   checked against the registry index, artifact parsed and validated,
//!   tenant and version checked). A model that fails is never served: the
//!   tenant keeps the model it had, the failure is logged and counted in
//!   `/metrics`, and it is not retried until the registry files change again.
//! - All models of all tenants sit in one immutable map behind an
//!   [`ArcSwap`]. A request takes one snapshot of the map, picks one model
//!   from it and scores every row with that model, and names that model's
//!   version in its answer: a promotion swaps the pointer and never changes a
//!   model a request already holds (no request mixes versions, none fails).
//! - A reload thread polls `tokens.json` and every tenant's `champion.json`
//!   and `index.json` every 200 ms (by size, mtime, ctime and inode): a
//!   revoked token stops working, and a new champion starts answering,
//!   within about 200 ms, without a restart.
//! - A file's verdict is remembered (not read again until it changes) only
//!   when it was read: loaded, or refused for what it holds (a bad MAC, a
//!   parse error, an older token generation). A read that failed for a
//!   reason outside the file (too many open files, a permission, an I/O
//!   error) is tried again at every poll, logged once until it succeeds
//!   (review 26: one failed read under a flood of idle connections kept a
//!   revoked token working, and a rolled-back champion, for good).
//! - A token file that is removed takes every token with it: no token is
//!   accepted until a new one is written (`dagrun tokens create` starts it at
//!   a generation of at least the current time, so it is newer than any copy
//!   of the old one).

use crate::registry::Registry;
use crate::scoring::Deployed;
use crate::serve::audit::Audit;
use crate::serve::metrics::{Metrics, ModelInfo};
use crate::serve::tokens::{self, TokenSet};
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the reload thread looks at the disk.
pub const POLL: Duration = Duration::from_millis(200);

/// One servable model version.
pub struct Model {
    pub version: String,
    pub deployed: Deployed,
}

/// A tenant's models.
#[derive(Default)]
pub struct TenantModels {
    /// Answers `/infer` and `/invocations`; None → 503.
    pub champion: Option<Arc<Model>>,
    /// Every registered version that loaded (answers `/versions/V/infer`).
    pub versions: BTreeMap<String, Arc<Model>>,
}

/// Limits of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: usize,
    pub max_rows: usize,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub drain_timeout: Duration,
    /// Connections held open at once; one more is closed as soon as it is
    /// accepted (and counted), so idle or slow clients cannot take every
    /// descriptor the process has.
    pub max_connections: usize,
}

/// Everything the handlers share.
pub struct Shared {
    pub workspace: PathBuf,
    pub dagrun_dir: PathBuf,
    /// The workspace integrity key: every model is verified (MAC, tenant)
    /// before it is served. None: the workspace has no master key yet, so no
    /// model can be verified and every tenant answers 503.
    pub integrity: Option<Arc<crate::crypto::IntegrityKey>>,
    pub models: ArcSwap<HashMap<String, Arc<TenantModels>>>,
    pub tokens: ArcSwap<TokenSet>,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
    pub limits: Limits,
    pub draining: AtomicBool,
    pub request_prefix: String,
    pub request_counter: std::sync::atomic::AtomicU64,
    /// Random per process: request ids are a keyed hash of the counter.
    pub request_key: [u8; 32],
    /// Request bodies held at once, in KiB: a body's declared length (or
    /// `max_body` when it declares none) is taken before it is read and
    /// given back when its request is answered ([`body_budget_kib`]).
    pub bodies: tokio::sync::Semaphore,
    /// The same per tenant ([`TENANT_BODIES_AT_ONCE`] bodies of `max_body`),
    /// taken first: one tenant's slow uploads cannot hold every other
    /// tenant's share.
    pub tenant_bodies: std::sync::Mutex<HashMap<Arc<str>, Arc<tokio::sync::Semaphore>>>,
    /// Requests parsed and scored at once (one per runtime worker): the
    /// work runs on its own thread (`block_in_place`), so health checks and
    /// other tenants' small requests are answered meanwhile.
    pub scoring: tokio::sync::Semaphore,
}

/// Bodies of the largest size (`--max-body`) a server holds at once.
pub const BODIES_AT_ONCE: usize = 16;
/// Bodies of the largest size one tenant's requests hold at once.
pub const TENANT_BODIES_AT_ONCE: usize = 4;

/// The KiB of request bodies a server with `max_body` holds at once.
pub fn body_budget_kib(max_body: usize) -> usize {
    max_body.div_ceil(1024).saturating_mul(BODIES_AT_ONCE).min(tokio::sync::Semaphore::MAX_PERMITS)
}

impl Shared {
    /// The body budget of one tenant (made on first use).
    pub fn body_budget_of(&self, tenant: &Arc<str>) -> Arc<tokio::sync::Semaphore> {
        let mut m = self.tenant_bodies.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(tenant.clone())
            .or_insert_with(|| {
                let kib = self.limits.max_body.div_ceil(1024).saturating_mul(TENANT_BODIES_AT_ONCE).min(body_budget_kib(self.limits.max_body));
                Arc::new(tokio::sync::Semaphore::new(kib))
            })
            .clone()
    }
}

/// File identity for change detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Sig(u64, i64, i64, i64, i64, u64);

fn sig(p: &Path) -> Option<Sig> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| Sig(m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec(), m.ino()))
}

/// The reload thread's memory of what it loaded.
#[derive(Default)]
pub struct Watch {
    tokens: Option<Option<Sig>>,
    /// The generation of the token file loaded: an older one is refused.
    token_generation: u64,
    tenants: BTreeMap<String, (Option<Sig>, Option<Sig>)>,
    /// (version, blake3) pairs that failed: not retried until they change.
    failed: BTreeMap<(String, String), String>,
    /// Files whose last read failed for a reason outside them (`tokens`, or a
    /// tenant): tried again at every poll; the error is logged once.
    retrying: BTreeMap<String, String>,
}

/// An error that says nothing about a file's content (a descriptor limit, a
/// permission, an I/O error), as opposed to a bad MAC, a parse error or a
/// file that is not a regular file of a sensible size (`InvalidData`).
fn transient(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::{InvalidData, NotFound, UnexpectedEof};
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| !matches!(io.kind(), InvalidData | NotFound | UnexpectedEof)))
}

impl Watch {
    /// A read of `what` failed for a reason outside the file: logged (and
    /// counted by `count`) the first time only; tried again at the next poll.
    fn failed_for_now(&mut self, what: &str, e: &anyhow::Error, count: impl FnOnce()) {
        let msg = format!("{e:#}");
        if self.retrying.get(what) != Some(&msg) {
            let first = !self.retrying.contains_key(what);
            if first {
                count();
            }
            tracing::error!("cannot read the {} for now: {msg}; keeping what is held and trying again every {} ms", shown(what), POLL.as_millis());
            self.retrying.insert(what.to_string(), msg);
        }
    }

    /// `what` was read (loaded, or refused for what it holds).
    fn read_again(&mut self, what: &str) {
        if self.retrying.remove(what).is_some() {
            tracing::info!("the {} could be read again", shown(what));
        }
    }
}

fn shown(what: &str) -> String {
    if what == "tokens" { "token file".into() } else { format!("registry files of tenant {what}") }
}

impl Shared {
    /// The second half of request `n`'s id: 16 hex digits of a keyed hash
    /// of `n` (unique in practice, and telling nothing about other requests).
    pub fn request_suffix(&self, n: u64) -> String {
        hex::encode(&blake3::keyed_hash(&self.request_key, &n.to_le_bytes()).as_bytes()[..8])
    }

    /// Reload the tokens if their file changed. Returns an error message on failure.
    pub fn reload_tokens(&self, w: &mut Watch) {
        let path = tokens::tokens_path(&self.dagrun_dir);
        let s = sig(&path);
        if w.tokens == Some(s) {
            return;
        }
        if s.is_none() && matches!(path.try_exists(), Ok(false)) {
            // Removed: every token goes with it (fail closed).
            if matches!(w.tokens, Some(Some(_))) {
                self.metrics.token_reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!("the token file {} was removed: every token is refused until a new one is written (`dagrun tokens create`)", path.display());
            }
            self.tokens.store(Arc::new(TokenSet::new(vec![])));
            w.read_again("tokens");
            w.tokens = Some(None);
            return;
        }
        let loaded = match &self.integrity {
            Some(k) => tokens::load(&self.dagrun_dir, k),
            None => Err(anyhow::anyhow!("the workspace has no master key, so the token file cannot be verified")),
        };
        self.take_tokens(w, s, loaded);
    }

    /// What [`Self::reload_tokens`] does with a read of the token file whose
    /// identity is `s`.
    fn take_tokens(&self, w: &mut Watch, s: Option<Sig>, loaded: anyhow::Result<tokens::Tokens>) {
        match loaded {
            Ok(t) if t.generation < w.token_generation => {
                // A copy of an older file (one from before a revocation, say).
                self.metrics.token_reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "cannot reload the tokens: the token file is of generation {}, older than the one loaded ({}): an old copy was put back; keeping the current tokens",
                    t.generation,
                    w.token_generation
                );
                w.tokens = Some(s);
            }
            Ok(t) => {
                self.flush_last_used();
                let n = t.tokens.len();
                w.token_generation = t.generation;
                self.tokens.store(Arc::new(TokenSet::new(t.tokens)));
                if w.tokens.is_some() {
                    tracing::info!("tokens reloaded ({n} tokens)");
                }
                w.tokens = Some(s);
            }
            Err(e) if transient(&e) => {
                // Keep the previous tokens and read again at the next poll.
                w.failed_for_now("tokens", &e, || {
                    self.metrics.token_reload_failures.fetch_add(1, Ordering::Relaxed);
                });
                return;
            }
            Err(e) => {
                // Keep the previous tokens; try again when the file changes.
                self.metrics.token_reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!("cannot reload the tokens: {e:#}; keeping the previous ones");
                w.tokens = Some(s);
            }
        }
        w.read_again("tokens");
    }

    /// Write the tokens' last-use times (informational, for `tokens list`).
    pub fn flush_last_used(&self) {
        let used = self.tokens.load().used();
        if !used.is_empty()
            && let Err(e) = tokens::record_last_used(&self.dagrun_dir, &used)
        {
            tracing::debug!("cannot record token last use: {e:#}");
        }
    }

    /// Reload the models of every tenant whose registry files changed.
    /// Returns lines describing what changed (for the log).
    pub fn reload_models(&self, w: &mut Watch) -> Vec<String> {
        let reg = Registry::new(&self.dagrun_dir);
        let mut tenants = reg.tenants();
        for t in self.tokens.load().tenants() {
            if !tenants.contains(&t) {
                tenants.push(t);
            }
        }
        let current = self.models.load_full();
        let mut next: Option<HashMap<String, Arc<TenantModels>>> = None;
        let mut notes = vec![];
        for t in &tenants {
            let s = (sig(&reg.champion_path(t)), sig(&reg.champion_path(t).with_file_name("index.json")));
            if w.tenants.get(t) == Some(&s) {
                continue;
            }
            let old = current.get(t).cloned().unwrap_or_default();
            let mut for_now = None;
            let tm = self.load_tenant(&reg, t, &old, w, &mut notes, &mut for_now);
            match for_now {
                // Not remembered: read again at the next poll.
                Some((e, what)) => w.failed_for_now(t, &e, || self.metrics.load_failed(t, &what)),
                None => {
                    w.tenants.insert(t.clone(), s);
                    w.read_again(t);
                }
            }
            next.get_or_insert_with(|| (*current).clone()).insert(t.clone(), Arc::new(tm));
        }
        if let Some(map) = next {
            let mut info = vec![];
            for (t, tm) in &map {
                for v in tm.versions.keys() {
                    info.push(ModelInfo { tenant: t.clone(), version: v.clone(), champion: tm.champion.as_ref().is_some_and(|c| &c.version == v) });
                }
            }
            info.sort_by(|a, b| (&a.tenant, &a.version).cmp(&(&b.tenant, &b.version)));
            self.metrics.set_models(info);
            self.models.store(Arc::new(map));
        }
        notes
    }

    /// The models of tenant `t` as its registry files say now. A read that
    /// failed for a reason outside the files is put in `for_now` (and what
    /// could not be read is kept as held), with the metrics label of what it
    /// was, never remembered as a verdict.
    fn load_tenant(
        &self,
        reg: &Registry,
        t: &str,
        old: &TenantModels,
        w: &mut Watch,
        notes: &mut Vec<String>,
        for_now: &mut Option<(anyhow::Error, String)>,
    ) -> TenantModels {
        let mut tm = TenantModels { champion: old.champion.clone(), versions: BTreeMap::new() };
        let entries = match reg.versions(t) {
            Ok(v) => v,
            Err(e) if transient(&e) => {
                *for_now = Some((e, "index".into()));
                return TenantModels { champion: old.champion.clone(), versions: old.versions.clone() };
            }
            Err(e) => {
                tracing::error!("tenant {t}: cannot read the registry index: {e:#}; keeping the models held");
                self.metrics.load_failed(t, "index");
                return TenantModels { champion: old.champion.clone(), versions: old.versions.clone() };
            }
        };
        for e in &entries {
            if let Some(m) = old.versions.get(&e.version)
                && m.deployed.model_hash == e.blake3
            {
                tm.versions.insert(e.version.clone(), m.clone());
                continue;
            }
            let key = (e.version.clone(), e.blake3.clone());
            if w.failed.contains_key(&key) {
                continue;
            }
            match self
                .integrity
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("the workspace has no master key, so no model can be verified"))
                .and_then(|k| reg.load(t, &e.version, k))
                .and_then(|m| Deployed::from_registry(m, reg.artifact_path(t, &e.version)))
            {
                Ok(d) => {
                    tm.versions.insert(e.version.clone(), Arc::new(Model { version: e.version.clone(), deployed: d }));
                }
                Err(err) if transient(&err) => {
                    // Kept as held (if it was) and read again at the next poll.
                    if let Some(m) = old.versions.get(&e.version) {
                        tm.versions.insert(e.version.clone(), m.clone());
                    }
                    *for_now = Some((err, e.version.clone()));
                }
                Err(err) => {
                    let msg = format!("{err:#}");
                    tracing::error!("tenant {t}: model {} refused: {msg}", e.version);
                    self.metrics.load_failed(t, &e.version);
                    w.failed.insert(key, msg);
                }
            }
        }
        match reg.champion(t) {
            Ok(None) => {
                if tm.champion.is_none() {
                    notes.push(format!("{t}: no champion yet: its requests get 503 until one is promoted (dagrun models promote {t} VERSION)"));
                }
            }
            Ok(Some(c)) => match tm.versions.get(&c.version) {
                Some(m) if m.deployed.model_hash == c.blake3 => {
                    if tm.champion.as_ref().map(|x| &x.version) != Some(&c.version) {
                        if let Some(prev) = &tm.champion {
                            self.metrics.model_switches.fetch_add(1, Ordering::Relaxed);
                            notes.push(format!("{t}: champion {} -> {}", prev.version, c.version));
                        } else {
                            notes.push(format!("{t}: champion {}", c.version));
                        }
                        tm.champion = Some(m.clone());
                    }
                }
                // Its file could not be read for now (logged once, read again
                // at the next poll): not a failed check (review 28: this said
                // so, and counted it, five times a second).
                None if for_now.as_ref().is_some_and(|(_, what)| what == &c.version) => {}
                _ => {
                    let kept = tm.champion.as_ref().map(|m| m.version.clone()).unwrap_or_else(|| "none".into());
                    tracing::error!("tenant {t}: champion {} failed its checks and is not loaded; still serving {kept}", c.version);
                    if tm.versions.contains_key(&c.version) || !w.failed.keys().any(|(v, _)| v == &c.version) {
                        // (A version that failed to load was counted already.)
                        self.metrics.load_failed(t, &c.version);
                    }
                    notes.push(format!("{t}: champion {} refused (see the error above); still serving {kept}", c.version));
                }
            },
            Err(e) if transient(&e) => {
                *for_now = Some((e, "champion".into()));
            }
            Err(e) => {
                tracing::error!("tenant {t}: cannot read the champion record: {e:#}; keeping the champion held");
                self.metrics.load_failed(t, "champion");
            }
        }
        // Keep serving a champion that left the index only if it is still held.
        if let Some(c) = &tm.champion {
            tm.versions.entry(c.version.clone()).or_insert_with(|| c.clone());
        }
        tm
    }
}

/// Run the reload loop until `stop` is set.
pub fn reload_loop(shared: Arc<Shared>, stop: Arc<AtomicBool>, mut w: Watch) {
    let mut ticks = 0u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(POLL);
        shared.reload_tokens(&mut w);
        for n in shared.reload_models(&mut w) {
            tracing::info!("{n}");
        }
        ticks += 1;
        if ticks.is_multiple_of(25) {
            shared.flush_last_used();
        }
    }
    shared.flush_last_used();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(dir: &Path) -> Shared {
        let metrics = Arc::new(Metrics::default());
        Shared {
            workspace: dir.to_path_buf(),
            dagrun_dir: dir.to_path_buf(),
            integrity: None,
            models: Default::default(),
            tokens: Default::default(),
            audit: Audit::start(dir.join("audit"), metrics.clone()).unwrap(),
            metrics,
            limits: crate::serve::state::Limits {
                max_body: 1024,
                max_rows: 10,
                request_timeout: Duration::from_secs(1),
                header_timeout: Duration::from_secs(1),
                drain_timeout: Duration::from_secs(1),
                max_connections: 1,
            },
            draining: AtomicBool::new(false),
            request_prefix: String::new(),
            request_counter: Default::default(),
            request_key: [3u8; 32],
            bodies: tokio::sync::Semaphore::new(1),
            tenant_bodies: Default::default(),
            scoring: tokio::sync::Semaphore::new(1),
        }
    }

    fn token(id: &str, revoked: bool) -> tokens::TokenRecord {
        tokens::TokenRecord {
            id: id.into(),
            tenant: "Tenant_A".into(),
            name: "t".into(),
            created: chrono::Utc::now(),
            expires: None,
            revoked: revoked.then(chrono::Utc::now),
            sha256: hex::encode(tokens::digest(b"tok-secret")),
        }
    }

    #[test]
    fn only_errors_about_what_a_file_holds_are_remembered() {
        let emfile = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EMFILE)).context("cannot read tokens.json");
        let eacces = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EACCES)).context("cannot read index.json");
        assert!(transient(&emfile) && transient(&eacces));
        let odd = anyhow::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file")).context("x");
        assert!(!transient(&odd));
        assert!(!transient(&anyhow::anyhow!("tokens.json: the MAC does not verify")));
    }

    /// Review 26: one read that failed for want of a descriptor was taken as
    /// the file's verdict, and a revocation written just before it never took
    /// effect. Now the file is read again at the next poll.
    #[test]
    fn a_token_file_that_could_not_be_read_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let sh = shared(dir.path());
        let mut w = Watch::default();
        let s1 = Some(Sig(1, 1, 1, 1, 1, 1));
        sh.take_tokens(&mut w, s1, Ok(tokens::Tokens { generation: 5, tokens: vec![token("0000000a", false)] }));
        assert_eq!(w.tokens, Some(s1));
        assert!(sh.tokens.load().check(b"tok-secret", chrono::Utc::now()).is_ok());
        // The file changes (a revocation) but cannot be read now.
        let s2 = Some(Sig(2, 2, 2, 2, 2, 2));
        let emfile = || Err(anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EMFILE)).context("cannot read tokens.json"));
        sh.take_tokens(&mut w, s2, emfile());
        sh.take_tokens(&mut w, s2, emfile());
        assert_eq!(w.tokens, Some(s1), "a failed read was remembered as the file's verdict");
        assert_eq!(sh.metrics.token_reload_failures.load(Ordering::Relaxed), 1, "counted once, not at every poll");
        assert!(w.retrying.contains_key("tokens"));
        // Next poll: it reads, and the revocation holds.
        sh.take_tokens(&mut w, s2, Ok(tokens::Tokens { generation: 6, tokens: vec![token("0000000a", true)] }));
        assert_eq!(w.tokens, Some(s2));
        assert!(w.retrying.is_empty());
        assert!(sh.tokens.load().check(b"tok-secret", chrono::Utc::now()).is_err(), "the revocation did not take effect");
        // A bad file is remembered (not read 5 times a second).
        let s3 = Some(Sig(3, 3, 3, 3, 3, 3));
        sh.take_tokens(&mut w, s3, Err(anyhow::anyhow!("tokens.json: the MAC does not verify")));
        assert_eq!(w.tokens, Some(s3));
    }

    /// Review 26: removing the token file kept every token working.
    #[test]
    fn a_removed_token_file_takes_every_token_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut sh = shared(dir.path());
        let key = Arc::new(crate::crypto::IntegrityKey::from_bytes([7u8; 32]));
        sh.integrity = Some(key.clone());
        let mut w = Watch::default();
        tokens::create(dir.path(), &key, "Tenant_A", "t", None).unwrap();
        sh.reload_tokens(&mut w);
        assert_eq!(sh.tokens.load().len(), 1);
        std::fs::remove_file(tokens::tokens_path(dir.path())).unwrap();
        sh.reload_tokens(&mut w);
        assert_eq!(sh.tokens.load().len(), 0, "a removed token file left its tokens working");
        // A new file (`tokens create` after the removal) is taken.
        tokens::create(dir.path(), &key, "Tenant_A", "u", None).unwrap();
        sh.reload_tokens(&mut w);
        assert_eq!(sh.tokens.load().len(), 1);
    }
}
