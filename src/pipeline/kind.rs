//! What loading a pipeline needs to know about a stage kind: its name, code
//! version and what its `with:` params declare.
//!
//! Rules:
//! - The pipeline never imports the stage kinds: the caller hands the table
//!   of kinds ([`Kinds`]) to [`crate::pipeline::load`], so dependencies run
//!   one way (`stages` implements [`KindDecl`] and builds on `pipeline`, not
//!   the reverse).
//! - A kind's `declare` is pure: it checks `with:` and names the inputs and
//!   outputs it implies; it reads no file and no key.
//! - Running a stage is the stage layer's business (`stages::StageKind`,
//!   which extends this trait); the engine finds a stage's runnable kind by
//!   [`KindDecl::name`].

use serde_json::{Map, Value};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a kind declares about a stage from its `with:` params, before running.
#[derive(Debug, Default)]
pub struct Declared {
    /// Extra input paths (relative to the workspace).
    pub deps: Vec<String>,
    /// Extra output paths.
    pub outs: Vec<DeclaredOut>,
    /// The kind's typed `with:` params, checked once here and kept on the
    /// stage for its run (`Stage::typed_with`; see `stages::params`).
    pub params: Option<Arc<dyn Any + Send + Sync>>,
}

/// One output a kind declares.
#[derive(Debug, Clone)]
pub struct DeclaredOut {
    pub path: String,
    /// Holds plaintext PII (see `engine` docs on sensitive outputs).
    pub sensitive: bool,
}

/// The declaration half of a stage kind.
pub trait KindDecl: Send + Sync {
    /// Name used in `uses:` (or `cmd`).
    fn name(&self) -> &'static str;
    /// Code version: bump whenever the kind's outputs for the same inputs change.
    /// It is part of every cache key of the kind.
    fn version(&self) -> u32;
    /// Check `with:` and declare the inputs/outputs they name.
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, String>;
}

/// The kinds a pipeline may use, by name (`cmd` for shell commands).
pub type Kinds = BTreeMap<&'static str, Arc<dyn KindDecl>>;
