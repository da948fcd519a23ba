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
//! - A refusal is a [`StageError`]: its message names the `with.KEY` it is
//!   about, and its `key` says which, so the loader names that key's own
//!   line (never by reading the message's text).
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

/// Why a stage cannot be declared: the message (it names the file's words,
/// e.g. ``unknown `with.KEY` ``), and the `with:` key it is about, if one is.
/// The loader adds the file, the line (that key's, else the stage's) and the
/// stage (`pipeline::parse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    /// The `with:` key at fault (top level: `files`, not `files[0]`).
    pub key: Option<String>,
    pub message: String,
}

impl StageError {
    /// An error about `with.KEY`.
    pub fn at_key(key: &str, message: impl Into<String>) -> Self {
        StageError { key: Some(key.to_string()), message: message.into() }
    }
}

/// An error about the stage as a whole.
impl From<String> for StageError {
    fn from(message: String) -> Self {
        StageError { key: None, message }
    }
}

impl From<&str> for StageError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The declaration half of a stage kind.
pub trait KindDecl: Send + Sync {
    /// Name used in `uses:` (or `cmd`).
    fn name(&self) -> &'static str;
    /// Code version: bump whenever the kind's outputs for the same inputs change.
    /// It is part of every cache key of the kind.
    fn version(&self) -> u32;
    /// Check `with:` and declare the inputs/outputs they name.
    fn declare(&self, with: &Map<String, Value>, tenant: Option<&str>) -> std::result::Result<Declared, StageError>;
}

/// The kinds a pipeline may use, by name (`cmd` for shell commands).
pub type Kinds = BTreeMap<&'static str, Arc<dyn KindDecl>>;
