//! Stage kinds. Every kind — the shell `cmd` kind and the built-in MLOps
//! kinds — implements [`StageKind`]; the engine knows nothing else about them.
//! Adding a kind = one file here + one line in [`registry`].

use crate::crypto::{IntegrityKey, Keyring};
use crate::pipeline::{Stage, Tenants};
use crate::workspace::Workspace;
use crate::workspace::state::StateStore;
use anyhow::{Result, anyhow};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub mod afe;
pub mod cmd;
pub mod drift;
pub mod encrypt;
pub mod generate;
pub mod ingest;
pub mod params;
pub mod serve_check;
pub mod store;
pub mod train;

/// Largest JSON report or statistics file a stage wrote that dagrun reads
/// back (drift and serve-check reports, `afe`'s statistics): far above what
/// any of them holds.
pub const MAX_REPORT_BYTES: u64 = 16 << 20;

/// Shared services a stage kind may use, handed in by the engine: stages
/// never open engine state themselves.
pub struct Services {
    /// The workspace root.
    pub workspace: PathBuf,
    /// Its paths.
    pub ws: Workspace,
    pub tenants: Option<Tenants>,
    /// The authenticated state records (read them, e.g. a stage's last extras).
    pub states: Arc<StateStore>,
    keyring: OnceLock<std::result::Result<Arc<Keyring>, String>>,
}

impl Services {
    /// `keyring`: an already opened keyring (else opened on first use,
    /// unless `read_only`: status and dry runs never create a key, so there
    /// the keyring is what `keyring` says, or an error).
    pub fn new(ws: &Workspace, tenants: Option<Tenants>, states: Arc<StateStore>, keyring: Option<Arc<Keyring>>, read_only: bool) -> Services {
        let cell = OnceLock::new();
        match keyring {
            Some(k) => {
                let _ = cell.set(Ok(k));
            }
            None if read_only => {
                let _ = cell.set(Err("no master key in this workspace yet (nothing is created by a read-only command)".to_string()));
            }
            None => {}
        }
        Services { workspace: ws.root().to_path_buf(), ws: ws.clone(), tenants, states, keyring: cell }
    }

    /// The workspace keyring, opened once per run (master key from the
    /// environment or the key file; see `crypto::keyring`).
    pub fn keyring(&self) -> Result<Arc<Keyring>> {
        self.keyring.get_or_init(|| Keyring::open(&self.workspace).map(Arc::new).map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
    }

    /// The workspace integrity key (MACs of models and feature manifests).
    pub fn integrity_key(&self) -> Result<Arc<IntegrityKey>> {
        Ok(self.keyring()?.integrity_key())
    }
}

pub use crate::pipeline::kind::{Declared, DeclaredOut, KindDecl, StageError};

/// Everything a stage sees while it runs.
pub struct RunCtx<'a> {
    pub workspace: &'a Path,
    pub stage: &'a Stage,
    /// Absolute input paths, in declaration order.
    pub deps: Vec<PathBuf>,
    /// Absolute output paths, in declaration order.
    pub outs: Vec<PathBuf>,
    /// Content hashes of the inputs (workspace-relative path -> blake3 hex).
    pub input_hashes: &'a BTreeMap<String, String>,
    /// The stage's cache key (blake3 hex).
    pub cache_key: &'a str,
    pub services: &'a Services,
    /// Set when the run is interrupted; long loops should check it.
    pub cancel: &'a AtomicBool,
    pub timeout: Option<Duration>,
}

impl<'a> RunCtx<'a> {
    /// The content hash the engine computed (or vouched for from its hash
    /// memo) for declared input `i` in this run's cache key.
    pub fn input_hash(&self, i: usize) -> Option<&str> {
        self.input_hashes.get(self.stage.deps.get(i)?).map(String::as_str)
    }
    /// The resolved `with:` params, as a map (what the cache key holds).
    pub fn with(&self) -> &Map<String, Value> {
        &self.stage.with
    }
    /// The kind's typed `with:` params (checked when the pipeline loaded).
    pub fn params<T: std::any::Any>(&self) -> Result<&'a T> {
        params::of(self.stage)
    }
    /// The workspace-relative form of an absolute path under the workspace.
    pub fn rel<'p>(&self, p: &'p Path) -> std::borrow::Cow<'p, str> {
        p.strip_prefix(self.workspace).unwrap_or(p).to_string_lossy()
    }
}

/// What a finished stage reports (shown in the run record and summary).
#[derive(Debug, Default)]
pub struct RunReport {
    /// Small, PII-free facts (row counts, AUC, ...).
    pub facts: Map<String, Value>,
}

/// A stage's failure that still has small, PII-free facts worth recording
/// in its (failed) run record: a model below its AUC gate has an AUC, which
/// the run metrics compare with the gate (`engine::run_metrics`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FailedWithFacts {
    pub message: String,
    pub facts: Map<String, Value>,
}

/// The facts a failure carries ([`FailedWithFacts`] anywhere in its chain).
pub fn facts_of_failure(e: &anyhow::Error) -> Option<&Map<String, Value>> {
    e.chain().find_map(|c| c.downcast_ref::<FailedWithFacts>()).map(|f| &f.facts)
}

/// A kind of stage.
pub trait StageKind: KindDecl {
    /// Extra cache-key ingredients read at run time (e.g. the id of the tenant's
    /// active data key). Values must not be secret.
    fn extra_ingredients(&self, _stage: &Stage, _services: &Services) -> Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }
    /// Do the work. Runs on a blocking thread.
    fn run(&self, ctx: &RunCtx) -> Result<RunReport>;
    /// Publish what a finished run made where others look for it (the model
    /// registry), once the engine has stored its outputs in the cache and
    /// right before it records the run, in the coordinating process (a
    /// Slurm job's work is published by the run that waits for it). An error
    /// fails the stage and its outputs are put back (`engine::execute`):
    /// nothing is published for a run that is not recorded, and nothing is
    /// recorded that could not be published. `report` is the run's, for facts.
    fn publish(&self, _ctx: &RunCtx, _report: &mut RunReport) -> Result<()> {
        Ok(())
    }
    /// One line for the end-of-run summary, read from the (fresh) outputs
    /// (and, through `services`, the workspace's other records).
    fn summarize(&self, _stage: &Stage, _outs: &[PathBuf], _services: &Services) -> Option<String> {
        None
    }
}

/// The built-in kinds' declarations, for loading a pipeline
/// (`pipeline::load`).
pub fn kinds() -> crate::pipeline::Kinds {
    registry().into_iter().map(|(n, k)| (n, k as Arc<dyn KindDecl>)).collect()
}

/// All built-in kinds by name.
pub fn registry() -> BTreeMap<&'static str, Arc<dyn StageKind>> {
    let kinds: Vec<Arc<dyn StageKind>> = vec![
        Arc::new(cmd::Cmd),
        Arc::new(generate::Generate),
        Arc::new(ingest::Ingest),
        Arc::new(encrypt::Encrypt),
        Arc::new(afe::Afe),
        Arc::new(store::Store),
        Arc::new(train::Train),
        Arc::new(serve_check::ServeCheck),
        Arc::new(drift::Drift),
    ];
    kinds.into_iter().map(|k| (k.name(), k)).collect()
}

/// `uses: KIND` runs per tenant: the error when a stage lacks `foreach: tenants`.
pub fn per_tenant(kind: &str, tenant: Option<&str>) -> std::result::Result<(), String> {
    match tenant {
        Some(_) => Ok(()),
        None => Err(format!("`uses: {kind}` runs per tenant: add `foreach: tenants`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Each built-in kind names the keys it takes, in the order its
    /// messages always listed them, and refuses any other key.
    #[test]
    fn every_kind_refuses_an_unknown_with_key_naming_its_keys() {
        let expected: [(&str, &[&str]); 8] = [
            ("generate", &["rows", "seed", "as_of", "output", "tenant"]),
            ("ingest", &["input", "output", "as_of", "tenant"]),
            ("encrypt", &["input", "output", "tenant"]),
            ("afe", &["input", "feature_set", "as_of", "features", "stats", "tenant"]),
            ("store", &["features", "stats", "dir", "tenant"]),
            ("train", &["store", "C", "min_auc", "output", "tenant", "promote"]),
            ("serve-check", &["data", "store", "model", "output", "tenant"]),
            ("drift", &["model", "current", "output", "max_psi", "warn_psi", "tenant"]),
        ];
        let kinds = registry();
        assert_eq!(kinds.len(), expected.len() + 1, "a kind was added: list its keys here");
        for (name, keys) in expected {
            let mut with = Map::new();
            with.insert("tenant".into(), json!("Tenant_A"));
            with.insert("colour".into(), json!("blue"));
            let e = kinds[name].declare(&with, Some("Tenant_A")).unwrap_err();
            assert_eq!(e, StageError::at_key("colour", format!("unknown `with.colour`; this kind takes: {}", keys.join(", "))), "{name}");
        }
        // `cmd` takes no `with:` at all (besides the tenant a foreach adds).
        let e = kinds["cmd"].declare(&json!({"x": 1}).as_object().unwrap().clone(), None).unwrap_err();
        assert!(e.key.is_none() && e.message.starts_with("`with:` is for built-in kinds"), "{e}");
    }

    #[test]
    fn train_params_are_typed_once_and_kept_on_the_declaration() {
        let with = json!({"store": "fs/A/v1.0", "C": "0.5", "min_auc": 0.6, "output": "m/A.json", "tenant": "A", "promote": "manual"});
        let d = train::Train.declare(with.as_object().unwrap(), Some("A")).unwrap();
        let p = d.params.as_deref().and_then(|p| p.downcast_ref::<train::TrainWith>()).unwrap();
        assert_eq!((p.c.0, p.min_auc.0, p.promote), (0.5, 0.6, train::Promote::Manual));
        assert_eq!(d.outs[1].path, "m/A.eval.json");
        let mut bad = with.as_object().unwrap().clone();
        bad.insert("promote".into(), json!("sometimes"));
        assert_eq!(train::Train.declare(&bad, Some("A")).unwrap_err(), StageError::at_key("promote", "`with.promote` = \"sometimes\": use auto or manual"));
        bad.remove("promote");
        bad.insert("C".into(), json!(0));
        assert_eq!(train::Train.declare(&bad, Some("A")).unwrap_err(), StageError::at_key("C", "`with.C` = 0: C must be a positive number"));
        assert_eq!(train::Train.declare(with.as_object().unwrap(), None).unwrap_err(), "`uses: train` runs per tenant: add `foreach: tenants`".into());
    }
}
