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
}

impl Shared {
    /// A fresh request id.
    pub fn next_request_id(&self) -> String {
        format!("{}-{}", self.request_prefix, self.request_counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Reload the tokens if their file changed. Returns an error message on failure.
    pub fn reload_tokens(&self, w: &mut Watch) {
        let s = sig(&tokens::tokens_path(&self.dagrun_dir));
        if w.tokens == Some(s) {
            return;
        }
        let loaded = match &self.integrity {
            Some(k) => tokens::load(&self.dagrun_dir, k),
            None => Err(anyhow::anyhow!("the workspace has no master key, so the token file cannot be verified")),
        };
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
            Err(e) => {
                // Keep the previous tokens; try again when the file changes.
                self.metrics.token_reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!("cannot reload the tokens: {e:#}; keeping the previous ones");
                w.tokens = Some(s);
            }
        }
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
            w.tenants.insert(t.clone(), s);
            let old = current.get(t).cloned().unwrap_or_default();
            let tm = self.load_tenant(&reg, t, &old, w, &mut notes);
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

    fn load_tenant(&self, reg: &Registry, t: &str, old: &TenantModels, w: &mut Watch, notes: &mut Vec<String>) -> TenantModels {
        let mut tm = TenantModels { champion: old.champion.clone(), versions: BTreeMap::new() };
        let entries = match reg.versions(t) {
            Ok(v) => v,
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
