//! Pipelines: the YAML model, validation, params, per-tenant expansion and the DAG.
//!
//! Loading goes file → [`model::PipelineFile`] (serde, unknown keys denied) →
//! params resolved (`${params.X}`, `${tenant}`) → `foreach: tenants` expanded into
//! `NAME[TENANT]` instances → paths checked → edges from `needs:` and from
//! outs feeding deps → cycle check. Every error names the file, the YAML
//! location where known, and the fix, and is a [`Failure::Config`] (exit 2).

pub mod kind;
pub mod model;
pub mod shell;
pub mod tenants;
pub mod yaml_limits;

use crate::error::config;
use anyhow::Result;
use indexmap::IndexMap;
pub use kind::{Declared, DeclaredOut, KindDecl, Kinds};
pub use model::{ExecutorKind, Resources, SlurmDef};
use model::{OutDef, PipelineFile, StageDef};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
pub use tenants::{Tenant, Tenants};

/// Longest `timeout:` (and `--wait`) accepted, in seconds (about 31 years):
/// larger values cannot be represented as a deadline.
pub const MAX_SECONDS: f64 = 1e9;

/// Largest pipeline file accepted.
pub const MAX_PIPELINE_BYTES: u64 = 1 << 20;

/// One output of a stage instance.
#[derive(Debug, Clone)]
pub struct Out {
    /// Workspace-relative, normalised path.
    pub path: String,
    pub sensitive: bool,
    pub cache: bool,
}

/// One runnable stage instance (a `foreach` stage gives one per tenant).
#[derive(Clone)]
pub struct Stage {
    /// `NAME` or `NAME[TENANT]`.
    pub name: String,
    /// The name in the file.
    pub base: String,
    pub tenant: Option<String>,
    /// Its kind's declaration (the engine runs the kind of this name).
    pub kind: Arc<dyn KindDecl>,
    /// Resolved command (cmd stages).
    pub cmd: Option<String>,
    /// Resolved `with:` params.
    pub with: Map<String, Value>,
    /// Pipeline params this stage references, with their values.
    pub param_refs: BTreeMap<String, Value>,
    /// Workspace-relative inputs (or absolute paths outside the workspace).
    pub deps: Vec<String>,
    pub outs: Vec<Out>,
    pub env: BTreeMap<String, String>,
    /// Variables withheld from the stage's command besides the master-key
    /// ones: the pipeline's `secrets:` (see `util::child_env`).
    pub secrets: Arc<Vec<String>>,
    pub timeout: Option<f64>,
    pub retries: u32,
    pub desc: Option<String>,
    /// 1-based line of the stage in the pipeline file.
    pub line: Option<usize>,
    /// Where the stage's work executes (stage `executor:`, else the pipeline's).
    pub executor: ExecutorKind,
    /// Slurm resources (stage `resources:` over `slurm.resources`); not in the cache key.
    pub resources: Resources,
    /// Job group: stages sharing it (and their tenant) run in one Slurm job.
    pub group: Option<String>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").field("name", &self.name).field("kind", &self.kind.name()).finish()
    }
}

/// A loaded, validated pipeline.
#[derive(Debug)]
pub struct Pipeline {
    /// Absolute path of the pipeline file.
    pub file: PathBuf,
    /// The file as shown in messages (relative to the workspace when inside it).
    pub shown: String,
    pub workspace: PathBuf,
    pub params: IndexMap<String, Value>,
    /// `secrets:`: environment variables no command may see.
    pub secrets: Arc<Vec<String>>,
    pub stages: Vec<Stage>,
    pub tenants: Option<Tenants>,
    /// Edges upstream → downstream, over indexes into `stages`.
    pub graph: DiGraph<usize, ()>,
    /// Stage indexes in a topological order (file order where free).
    pub topo: Vec<usize>,
    /// The `--param NAME=VALUE` overrides this pipeline was loaded with.
    pub overrides: Vec<(String, String)>,
    /// `slurm:` settings.
    pub slurm: SlurmDef,
}

/// Find the workspace of a pipeline file: the nearest ancestor of its folder
/// holding `.dagrun/` or `config/`, else the file's own folder.
pub fn find_workspace(pipeline_file: &Path) -> PathBuf {
    let dir = pipeline_file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let mut cur = Some(dir.as_path());
    while let Some(d) = cur {
        if d.join(".dagrun").is_dir() || d.join("config").is_dir() {
            return d.to_path_buf();
        }
        cur = d.parent();
    }
    dir
}

/// Where a stage name is written in the file (1-based line), found by text.
fn stage_line(text: &str, name: &str) -> Option<usize> {
    let mut in_stages = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("stages:") {
            in_stages = true;
            continue;
        }
        if in_stages {
            let t = line.trim_start();
            if line.len() > t.len() {
                let key = t.trim_start_matches(['"', '\'']);
                if let Some(rest) = key.strip_prefix(name) {
                    let rest = rest.trim_start_matches(['"', '\'']);
                    if rest.trim_start().starts_with(':') {
                        return Some(i + 1);
                    }
                }
            } else if !t.is_empty() && !t.starts_with('#') {
                in_stages = false;
            }
        }
    }
    None
}

/// Load, expand and validate a pipeline. `overrides` replace pipeline params
/// (`--param NAME=VALUE`); `kinds` are the stage kinds `uses:` may name
/// (`stages::kinds()` for the built-in ones).
pub fn load(file: &Path, workspace: Option<&Path>, overrides: &[(String, String)], kinds: &Kinds) -> Result<Pipeline> {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let workspace = match workspace {
        Some(w) => std::path::absolute(w).unwrap_or_else(|_| w.to_path_buf()),
        None => find_workspace(&file),
    };
    let shown = file.strip_prefix(&workspace).map(|p| p.display().to_string()).unwrap_or_else(|_| file.display().to_string());
    let meta = std::fs::metadata(&file).map_err(|e| config(format!("{shown}: cannot read the pipeline file: {e}")))?;
    if meta.is_dir() {
        return Err(config(format!("{shown}: is a directory; give the path of a pipeline YAML file")));
    }
    if meta.len() > MAX_PIPELINE_BYTES {
        return Err(config(format!(
            "{shown}: the file is {} bytes; a pipeline file may be at most {} bytes (1 MiB). Is this the right file?",
            meta.len(),
            MAX_PIPELINE_BYTES
        )));
    }
    let bytes = std::fs::read(&file).map_err(|e| config(format!("{shown}: cannot read the pipeline file: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        config(format!("{shown}:{line}: the file is not valid UTF-8 (bad byte at offset {at}); save it as UTF-8"))
    })?;
    parse(&text, shown, file, workspace, overrides, kinds)
}

/// Parse and validate pipeline text without reading a pipeline file (fuzzing,
/// tools). `shown` names the text in messages; paths resolve against
/// `workspace`, whose `config/tenants.yaml` is read only if a stage uses
/// `foreach: tenants`. Nothing is written.
pub fn parse_str(text: &str, shown: &str, workspace: &Path, overrides: &[(String, String)], kinds: &Kinds) -> Result<Pipeline> {
    if text.len() as u64 > MAX_PIPELINE_BYTES {
        return Err(config(format!("{shown}: the text is {} bytes; a pipeline may be at most {MAX_PIPELINE_BYTES} bytes (1 MiB)", text.len())));
    }
    parse(text, shown.to_string(), workspace.join(shown), workspace.to_path_buf(), overrides, kinds)
}

/// Most YAML values a pipeline or tenant file may hold once anchors/aliases
/// are expanded. A 1 MiB file holds far fewer without aliases; past this it is
/// an alias bomb ("billion laughs"), refused before anything is built in memory.
pub const MAX_YAML_NODES: usize = 1_000_000;

const TOO_MANY_NODES: &str = "the YAML expands to more than 1000000 values through anchors and aliases (an alias bomb?); use fewer aliases";

/// Counts YAML values (aliases expanded) without storing them.
struct NodeBudget<'a>(&'a std::cell::Cell<usize>);

impl NodeBudget<'_> {
    fn tick<E: serde::de::Error>(&self) -> std::result::Result<(), E> {
        let n = self.0.get() + 1;
        self.0.set(n);
        if n > MAX_YAML_NODES { Err(E::custom(TOO_MANY_NODES)) } else { Ok(()) }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for NodeBudget<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NodeBudget<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_i128<E: serde::de::Error>(self, _: i128) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_u128<E: serde::de::Error>(self, _: u128) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        self.tick()?;
        while seq.next_element_seed(NodeBudget(self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        self.tick()?;
        while map.next_key_seed(NodeBudget(self.0))?.is_some() {
            map.next_value_seed(NodeBudget(self.0))?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> std::result::Result<(), A::Error> {
        use serde::de::VariantAccess;
        self.tick()?;
        let ((), v) = data.variant_seed(NodeBudget(self.0))?;
        v.newtype_variant_seed(NodeBudget(self.0))
    }
}

/// Refuse YAML that expands (through aliases) to more than [`MAX_YAML_NODES`]
/// values, before deserializing it for real. Costs no memory per value.
pub fn check_yaml_budget(text: &str) -> std::result::Result<(), yaml_serde::Error> {
    let count = std::cell::Cell::new(0);
    serde::de::DeserializeSeed::deserialize(NodeBudget(&count), yaml_serde::Deserializer::from_str(text))
}

/// yaml_serde's terse limit errors, explained.
pub fn explain_yaml_message(msg: &str) -> String {
    msg.replacen("recursion limit exceeded", "recursion limit exceeded (the YAML is nested too deeply)", 1).replacen(
        "repetition limit exceeded",
        "repetition limit exceeded (anchors and aliases expand to too much data: an alias bomb?); use fewer aliases",
        1,
    )
}

fn yaml_error(shown: &str, e: &yaml_serde::Error) -> anyhow::Error {
    let msg = explain_yaml_message(&e.to_string());
    match e.location() {
        Some(loc) => {
            let clean = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            config(format!("{shown}:{}:{}: {clean}", loc.line(), loc.column()))
        }
        None => config(format!("{shown}: {msg}")),
    }
}

fn to_json(v: &yaml_serde::Value, what: &str) -> std::result::Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("{what}: unsupported value ({e})"))
}

/// Resolve `${params.X}` and `${tenant}` in a string. A string that is exactly
/// one `${params.X}` keeps the param's type.
fn interpolate(
    s: &str,
    params: &IndexMap<String, Value>,
    tenant: Option<&str>,
    refs: &mut BTreeMap<String, Value>,
) -> std::result::Result<Value, String> {
    let trimmed = s.trim();
    if let Some(name) = trimmed.strip_prefix("${params.").and_then(|r| r.strip_suffix('}')) {
        if !name.contains(['{', '}', '$']) {
            let v = params.get(name).ok_or_else(|| undefined_param(name, params))?;
            refs.insert(name.to_string(), v.clone());
            return Ok(v.clone());
        }
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let inner = &after[..end];
        if let Some(name) = inner.strip_prefix("params.") {
            let v = params.get(name).ok_or_else(|| undefined_param(name, params))?;
            refs.insert(name.to_string(), v.clone());
            match v {
                Value::String(s) => out.push_str(s),
                other => out.push_str(&other.to_string()),
            }
        } else if inner == "tenant" {
            let t = tenant.ok_or("uses ${tenant} but is not a `foreach: tenants` stage")?;
            out.push_str(t);
        } else {
            // Not ours (e.g. a shell ${VAR}): keep it as written.
            out.push_str(&rest[start..start + 2 + end + 1]);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

fn undefined_param(name: &str, params: &IndexMap<String, Value>) -> String {
    let known: Vec<&str> = params.keys().map(String::as_str).collect();
    format!(
        "references ${{params.{name}}}, which is not defined; define it under `params:` (defined: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

fn interpolate_value(
    v: &Value,
    params: &IndexMap<String, Value>,
    tenant: Option<&str>,
    refs: &mut BTreeMap<String, Value>,
) -> std::result::Result<Value, String> {
    Ok(match v {
        Value::String(s) => interpolate(s, params, tenant, refs)?,
        Value::Array(a) => Value::Array(a.iter().map(|x| interpolate_value(x, params, tenant, refs)).collect::<std::result::Result<_, _>>()?),
        Value::Object(o) => {
            let mut m = Map::new();
            for (k, x) in o {
                m.insert(k.clone(), interpolate_value(x, params, tenant, refs)?);
            }
            Value::Object(m)
        }
        other => other.clone(),
    })
}

fn interp_str(
    s: &str,
    params: &IndexMap<String, Value>,
    tenant: Option<&str>,
    refs: &mut BTreeMap<String, Value>,
) -> std::result::Result<String, String> {
    Ok(match interpolate(s, params, tenant, refs)? {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

/// Top-level folders of a workspace that no output may be in, lexically or
/// through a symlink: dagrun's state and keys, git, run records, and the
/// configuration (tenant list).
pub const PROTECTED_DIRS: &[&str] = &[".dagrun", ".git", "runs", "config"];

/// The write-time check of an output (run before a stage runs, before its
/// outputs are recorded, before a restore): no symlink on the way may lead
/// outside the workspace or into [`PROTECTED_DIRS`]. `final_link_ok` when the
/// writer replaces or removes the last component instead of following it.
pub fn check_output_at_write(workspace: &Path, out: &str, final_link_ok: bool) -> Result<()> {
    crate::util::nofollow::check_write_path(workspace, out, PROTECTED_DIRS, final_link_ok).map_err(anyhow::Error::msg)
}

/// Normalise a workspace-relative output path; reject escapes.
pub fn normalize_out(path: &str) -> std::result::Result<String, String> {
    if path.trim().is_empty() {
        return Err("an output path is empty".into());
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Err(format!("output {path:?} is an absolute path; outputs must be relative paths inside the workspace"));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("output {path:?} contains `..`; outputs must stay inside the workspace"));
            }
            _ => return Err(format!("output {path:?} is not a plain relative path")),
        }
    }
    if parts.is_empty() {
        return Err(format!("output {path:?} names the workspace itself"));
    }
    if PROTECTED_DIRS.contains(&parts[0].as_str()) {
        return Err(format!("output {path:?} is inside {}/, which dagrun, git or the workspace configuration owns", parts[0]));
    }
    Ok(parts.join("/"))
}

/// Normalise an input path (relative paths are workspace-relative; absolute
/// paths outside the workspace are allowed for inputs).
pub fn normalize_dep(path: &str, workspace: &Path) -> std::result::Result<String, String> {
    if path.trim().is_empty() {
        return Err("an input path is empty".into());
    }
    let p = Path::new(path);
    if p.is_absolute() {
        if let Ok(rel) = p.strip_prefix(workspace) {
            return normalize_dep(&rel.to_string_lossy(), workspace);
        }
        return Ok(path.to_string());
    }
    let parts: Vec<String> = p
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.is_empty() {
        return Err(format!("input {path:?} names the whole workspace; name the files or folders the stage reads"));
    }
    Ok(parts.join("/"))
}

/// Reject an output that reaches outside the workspace (or into a protected
/// folder) through a symlink, or is itself a symlink.
fn check_symlinks(workspace: &Path, out: &str) -> std::result::Result<(), String> {
    crate::util::nofollow::check_write_path(workspace, out, PROTECTED_DIRS, false)
}

fn valid_stage_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Depth and alias limits, checked in linear time before any parsing
/// ([`yaml_limits`]); the error names the file and line.
pub fn check_yaml_limits(text: &str, shown: &str) -> Result<()> {
    yaml_limits::check(text).map_err(|(line, m)| config(format!("{shown}:{line}: {m}")))
}

fn parse(text: &str, shown: String, file: PathBuf, workspace: PathBuf, overrides: &[(String, String)], kinds: &Kinds) -> Result<Pipeline> {
    check_yaml_limits(text, &shown)?;
    check_yaml_budget(text).map_err(|e| yaml_error(&shown, &e))?;
    let pf: PipelineFile = yaml_serde::from_str(text).map_err(|e| yaml_error(&shown, &e))?;
    let at = |name: &str| match stage_line(text, name) {
        Some(l) => format!("{shown}:{l}: stage `{name}`"),
        None => format!("{shown}: stage `{name}`"),
    };

    let mut params = IndexMap::new();
    for (k, v) in &pf.params {
        let v = to_json(v, &format!("params.{k}")).map_err(|m| config(format!("{shown}: {m}")))?;
        if v.is_object() || v.is_null() {
            return Err(config(format!("{shown}: params.{k} must be a number, string, boolean or list")));
        }
        params.insert(k.clone(), v);
    }
    for (k, v) in overrides {
        let Some(old) = params.get(k) else {
            return Err(config(format!(
                "--param {k}={v}: the pipeline {shown} has no param `{k}` (it has: {})",
                params.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let new = match old {
            Value::Number(_) => serde_json::from_str::<Value>(v)
                .ok()
                .filter(Value::is_number)
                .ok_or_else(|| config(format!("--param {k}={v}: `{k}` is a number in {shown}; give a number")))?,
            Value::Bool(_) => Value::Bool(v.parse::<bool>().map_err(|_| config(format!("--param {k}={v}: give true or false")))?),
            _ => Value::String(v.clone()),
        };
        params.insert(k.clone(), new);
    }

    if pf.stages.is_empty() {
        return Err(config(format!("{shown}: `stages` is empty; define at least one stage")));
    }
    for p in &pf.secrets {
        crate::util::child_env::check_secret_pattern(p).map_err(|m| config(format!("{shown}: {m}")))?;
    }
    let secrets = Arc::new(pf.secrets.clone());

    // The workspace settings are checked before anything runs (exit 2 on a bad key).
    crate::config::DagrunConfig::load(&workspace)?;

    // Only a valid `foreach: tenants` needs the tenant list; any other list is
    // reported below as unknown (not as a missing config/tenants.yaml).
    let needs_tenants = pf.stages.values().any(|s| s.foreach.as_deref() == Some("tenants"));
    let tenants = if needs_tenants { Some(Tenants::load(&workspace)?) } else { None };

    let mut stages: Vec<Stage> = Vec::new();
    let mut instances_of: HashMap<String, Vec<usize>> = HashMap::new();
    let mut raw_needs: Vec<Vec<String>> = Vec::new();
    for (base, def) in &pf.stages {
        if !valid_stage_name(base) {
            return Err(config(format!(
                "{}: invalid stage name; use 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-' (no '/', '.', spaces)",
                at(base)
            )));
        }
        let kind = match (&def.uses, &def.cmd) {
            (Some(_), Some(_)) => return Err(config(format!("{}: has both `uses:` and `cmd:`; a stage is one or the other", at(base)))),
            (None, None) => return Err(config(format!("{}: has neither `uses:` (a built-in kind) nor `cmd:` (a shell command)", at(base)))),
            (None, Some(_)) => kinds["cmd"].clone(),
            (Some(u), None) => match kinds.get(u.as_str()) {
                Some(k) if k.name() != "cmd" => k.clone(),
                _ => {
                    let names: Vec<&str> = kinds.keys().copied().filter(|k| *k != "cmd").collect();
                    let known = if names.is_empty() {
                        "this build has no built-in kinds; use `cmd:` for a shell command".to_string()
                    } else {
                        format!("built-in kinds are: {} (or use `cmd:` for a shell command)", names.join(", "))
                    };
                    return Err(config(format!("{}: unknown stage kind `uses: {u}`; {known}", at(base))));
                }
            },
        };
        if def.cmd.is_none() && !def.env.is_empty() {
            return Err(config(format!("{}: `env:` applies to `cmd:` stages only", at(base))));
        }
        if let Some(t) = def.timeout {
            if !t.is_finite() || t <= 0.0 || t > MAX_SECONDS {
                return Err(config(format!("{}: timeout must be a positive number of seconds, at most 1e9", at(base))));
            }
        }
        let fan: Vec<Option<String>> = match def.foreach.as_deref() {
            None => vec![None],
            Some("tenants") => tenants.as_ref().expect("loaded above").ids().map(|t| Some(t.to_string())).collect(),
            Some(other) => {
                return Err(config(format!(
                    "{}: `foreach: {other}` is unknown; the only list is `tenants` (from config/tenants.yaml)",
                    at(base)
                )));
            }
        };
        for tenant in fan {
            let idx = stages.len();
            let stage = expand(base, def, tenant.as_deref(), &params, kind.clone(), &workspace, &secrets).map_err(|m| config(format!("{}: {m}", at(base))))?;
            let mut stage = stage;
            stage.line = stage_line(text, base);
            stage.executor = def.executor.or(pf.executor).unwrap_or_default();
            stage.resources = merge_resources(pf.slurm.as_ref().and_then(|s| s.resources.as_ref()), def.resources.as_ref());
            check_resources(&stage.resources).map_err(|m| config(format!("{}: `resources.{m}", at(base))))?;
            if let Some(g) = &def.group {
                if !valid_stage_name(g) {
                    return Err(config(format!("{}: `group: {g}` is not a valid group name; use 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'", at(base))));
                }
            }
            stage.group = def.group.clone();
            instances_of.entry(base.clone()).or_default().push(idx);
            raw_needs.push(def.needs.clone());
            stages.push(stage);
        }
    }

    // Outputs: unique, not nested in one another, no symlink escapes.
    let mut out_owner: HashMap<&str, usize> = HashMap::new();
    for (i, s) in stages.iter().enumerate() {
        for o in &s.outs {
            check_symlinks(&workspace, &o.path).map_err(|m| config(format!("{}: {m}", at(&s.base))))?;
            if let Some(&j) = out_owner.get(o.path.as_str()) {
                let other = &stages[j].name;
                let msg = if *other == s.name {
                    format!("{}: declares output {:?} twice", at(&s.base), o.path)
                } else {
                    format!("{}: output {:?} is already an output of stage `{other}`; each path has one producing stage", at(&s.base), o.path)
                };
                return Err(config(msg));
            }
            out_owner.insert(&o.path, i);
        }
    }
    let mut all_outs: Vec<(&str, usize)> = out_owner.iter().map(|(k, v)| (*k, *v)).collect();
    all_outs.sort();
    for w in all_outs.windows(2) {
        let (a, ia) = w[0];
        let (b, ib) = w[1];
        if b.starts_with(a) && b.as_bytes().get(a.len()) == Some(&b'/') {
            return Err(config(format!(
                "{}: output {b:?} lies inside output {a:?} of stage `{}`; outputs may not nest",
                at(&stages[ib].base),
                stages[ia].name
            )));
        }
    }

    // Edges.
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    let mut edges: HashSet<(usize, usize)> = HashSet::new();
    for (i, s) in stages.iter().enumerate() {
        for d in &s.deps {
            if let Some(&j) = out_owner.get(d.as_str()) {
                edges.insert((j, i));
                continue;
            }
            // A dep inside an output directory, or a directory holding outputs.
            for (o, &j) in &out_owner {
                let inside = d.starts_with(o) && d.as_bytes().get(o.len()) == Some(&b'/');
                let holds = o.starts_with(d.as_str()) && o.as_bytes().get(d.len()) == Some(&b'/');
                if inside || holds {
                    edges.insert((j, i));
                }
            }
        }
        for n in &raw_needs[i] {
            let targets: Vec<usize> = if let Some(list) = instances_of.get(n) {
                // Same-tenant instance when both fan out; else all instances.
                match (&s.tenant, list.iter().find(|&&j| stages[j].tenant == s.tenant && s.tenant.is_some())) {
                    (Some(_), Some(&j)) => vec![j],
                    _ => list.clone(),
                }
            } else if let Some(j) = stages.iter().position(|x| &x.name == n) {
                vec![j]
            } else {
                let mut names: Vec<&str> = pf.stages.keys().map(String::as_str).collect();
                names.sort();
                return Err(config(format!(
                    "{}: `needs: {n}` names no stage; stages are: {}",
                    at(&s.base),
                    names.join(", ")
                )));
            };
            for j in targets {
                if j == i {
                    return Err(config(format!("{}: needs itself", at(&s.base))));
                }
                edges.insert((j, i));
            }
        }
    }
    let mut edge_list: Vec<_> = edges.into_iter().collect();
    edge_list.sort();
    for (a, b) in edge_list {
        if a == b {
            return Err(config(format!("{}: reads its own output", at(&stages[a].base))));
        }
        graph.add_edge(nodes[a], nodes[b], ());
    }

    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<&str> = cycle.iter().map(|&i| stages[i].name.as_str()).collect();
        return Err(config(format!(
            "{shown}: the stages form a cycle: {} → {}; remove one of these dependencies",
            names.join(" → "),
            names[0]
        )));
    }
    let topo = topo_order(&graph, stages.len());
    let slurm = pf.slurm.clone().unwrap_or_default();
    check_slurm(&slurm).map_err(|m| config(format!("{shown}: `slurm.{m}")))?;
    let p = Pipeline { file, shown, workspace, params, secrets, stages, tenants, graph, topo, overrides: overrides.to_vec(), slurm };
    if let Some(m) = p.check_groups() {
        return Err(config(format!("{}: {m}", p.shown)));
    }
    Ok(p)
}

fn expand(
    base: &str,
    def: &StageDef,
    tenant: Option<&str>,
    params: &IndexMap<String, Value>,
    kind: Arc<dyn KindDecl>,
    workspace: &Path,
    secrets: &Arc<Vec<String>>,
) -> std::result::Result<Stage, String> {
    let name = match tenant {
        Some(t) => format!("{base}[{t}]"),
        None => base.to_string(),
    };
    let mut refs = BTreeMap::new();
    // Values in a command are shell-quoted for their place (see `shell`).
    let cmd = def.cmd.as_deref().map(|c| shell::interpolate_cmd(c, params, tenant, &mut refs)).transpose()?;
    let mut with = Map::new();
    for (k, v) in &def.with {
        let v = to_json(v, &format!("with.{k}"))?;
        with.insert(k.clone(), interpolate_value(&v, params, tenant, &mut refs)?);
    }
    if let Some(t) = tenant {
        with.entry("tenant".to_string()).or_insert_with(|| Value::String(t.to_string()));
    }
    let mut env = BTreeMap::new();
    for (k, v) in &def.env {
        crate::util::child_env::check_declared(k, secrets)?;
        env.insert(k.clone(), interp_str(v, params, tenant, &mut refs)?);
    }
    let declared = kind.declare(&with, tenant)?;
    let mut deps = Vec::new();
    for d in &def.deps {
        deps.push(normalize_dep(&interp_str(d, params, tenant, &mut refs)?, workspace)?);
    }
    for d in declared.deps {
        deps.push(normalize_dep(&d, workspace)?);
    }
    let mut seen = HashSet::new();
    deps.retain(|d| seen.insert(d.clone()));
    let mut outs = Vec::new();
    for o in &def.outs {
        let path = normalize_out(&interp_str(o.path(), params, tenant, &mut refs)?)?;
        outs.push(Out { path, sensitive: o.sensitive(), cache: o.cache() && !o.sensitive() });
    }
    for o in declared.outs {
        let path = normalize_out(&o.path)?;
        outs.push(Out { path, sensitive: o.sensitive, cache: !o.sensitive });
    }
    if kind.name() == "cmd" && outs.is_empty() && deps.is_empty() {
        // Allowed (an always-cached side-effect-free command), but say nothing.
    }
    for d in &deps {
        if outs.iter().any(|o| &o.path == d) {
            return Err(format!("{d:?} is both an input and an output of the stage"));
        }
    }
    let _ = OutDef::Path(String::new());
    Ok(Stage {
        name,
        base: base.to_string(),
        tenant: tenant.map(str::to_string),
        kind,
        cmd,
        with,
        param_refs: refs,
        deps,
        outs,
        env,
        secrets: secrets.clone(),
        timeout: def.timeout,
        retries: def.retries,
        desc: def.desc.clone(),
        line: None,
        executor: ExecutorKind::Local,
        resources: Resources::default(),
        group: None,
    })
}

/// Stage resources over pipeline defaults, field by field (`sbatch_args` appended).
fn merge_resources(base: Option<&Resources>, over: Option<&Resources>) -> Resources {
    let mut r = base.cloned().unwrap_or_default();
    if let Some(o) = over {
        r.cpus = o.cpus.or(r.cpus);
        r.mem = o.mem.clone().or(r.mem);
        r.time = o.time.or(r.time);
        r.partition = o.partition.clone().or(r.partition);
        r.account = o.account.clone().or(r.account);
        r.sbatch_args.extend(o.sbatch_args.iter().cloned());
    }
    r
}

/// `sbatch` flags dagrun sets itself; `sbatch_args` may not override them.
const RESERVED_SBATCH: &[&str] = &[
    "--export", "--export-file", "--output", "-o", "--error", "-e", "--job-name", "-J", "--parsable", "--chdir", "-D", "--wrap", "--get-user-env",
    "--open-mode", "--input", "-i",
];

/// Check resources; the error starts with the field name.
fn check_resources(r: &Resources) -> std::result::Result<(), String> {
    if r.cpus == Some(0) {
        return Err("cpus` must be at least 1".into());
    }
    if r.time == Some(0) {
        return Err("time` must be at least 1 (minutes)".into());
    }
    if let Some(m) = &r.mem {
        let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || m.len() - digits.len() > 1 {
            return Err(format!("mem: {m}` is not a Slurm memory size; write e.g. 4G, 500M or 1024 (megabytes)"));
        }
    }
    let name_ok = |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.,".contains(&b));
    for (k, v) in [("partition", &r.partition), ("account", &r.account)] {
        if let Some(v) = v {
            if !name_ok(v) {
                return Err(format!("{k}: {v:?}` is not a valid Slurm name (letters, digits, '_', '-', '.', ',')"));
            }
        }
    }
    for a in &r.sbatch_args {
        if !a.starts_with('-') {
            return Err(format!("sbatch_args` entry {a:?} is not an option; write each as one word, e.g. \"--qos=low\""));
        }
        let flag = a.split('=').next().unwrap_or(a);
        if RESERVED_SBATCH.contains(&flag) || (flag.len() > 2 && !flag.starts_with("--") && RESERVED_SBATCH.contains(&&flag[..2])) {
            return Err(format!("sbatch_args` entry {a:?} sets an option dagrun sets itself (job name, output, environment, directory); remove it"));
        }
        if a.contains(['\n', '\0']) {
            return Err(format!("sbatch_args` entry {a:?} contains a control character"));
        }
    }
    Ok(())
}

/// Check `slurm:`; the error starts with the field name.
fn check_slurm(s: &SlurmDef) -> std::result::Result<(), String> {
    if let Some(p) = s.poll_interval {
        if !(0.1..=600.0).contains(&p) {
            return Err(format!("poll_interval: {p}` must be between 0.1 and 600 seconds"));
        }
    }
    if let Some(b) = &s.binary {
        if !Path::new(b).is_absolute() {
            return Err(format!("binary: {b}` must be an absolute path (the dagrun binary as the compute nodes see it)"));
        }
    }
    if let Some(r) = &s.resources {
        check_resources(r).map_err(|m| format!("resources.{m}"))?;
    }
    Ok(())
}

/// A cycle as stage indexes, if the graph has one.
fn find_cycle(graph: &DiGraph<usize, ()>) -> Option<Vec<usize>> {
    for scc in petgraph::algo::tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let set: HashSet<NodeIndex> = scc.iter().copied().collect();
        // Walk inside the SCC from its smallest node until a node repeats.
        let start = *scc.iter().min_by_key(|n| graph[**n]).unwrap();
        let mut path = vec![start];
        let mut pos: HashMap<NodeIndex, usize> = HashMap::from([(start, 0)]);
        let mut cur = start;
        loop {
            let mut next: Vec<NodeIndex> = graph.neighbors(cur).filter(|n| set.contains(n)).collect();
            next.sort_by_key(|n| graph[*n]);
            let n = next[0];
            if let Some(&p) = pos.get(&n) {
                return Some(path[p..].iter().map(|n| graph[*n]).collect());
            }
            pos.insert(n, path.len());
            path.push(n);
            cur = n;
        }
    }
    None
}

/// Kahn's algorithm, always taking the lowest (file-order) ready stage.
fn topo_order(graph: &DiGraph<usize, ()>, n: usize) -> Vec<usize> {
    let mut indeg = vec![0usize; n];
    for e in graph.raw_edges() {
        indeg[graph[e.target()]] += 1;
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(&i) = ready.iter().next() {
        ready.remove(&i);
        order.push(i);
        for m in graph.neighbors(NodeIndex::new(i)) {
            let j = graph[m];
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.insert(j);
            }
        }
    }
    order
}

impl Pipeline {
    /// Upstream stage indexes of `i`.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.graph.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming).map(|n| self.graph[n]).collect();
        v.sort();
        v
    }
    /// Downstream stage indexes of `i`.
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.graph.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing).map(|n| self.graph[n]).collect();
        v.sort();
        v
    }
    /// Indexes matching a user-given name: `train` (all instances), `train[Tenant_A]`.
    pub fn select(&self, name: &str) -> Result<Vec<usize>> {
        let found: Vec<usize> = (0..self.stages.len()).filter(|&i| self.stages[i].name == name || self.stages[i].base == name).collect();
        if found.is_empty() {
            let mut names: Vec<&str> = self.stages.iter().map(|s| s.base.as_str()).collect();
            names.dedup();
            return Err(config(format!("{}: no stage named `{name}` (stages: {})", self.shown, names.join(", "))));
        }
        Ok(found)
    }
    /// `roots` and everything upstream of them.
    pub fn with_ancestors(&self, roots: &[usize]) -> HashSet<usize> {
        self.closure(roots, petgraph::Direction::Incoming)
    }
    /// `roots` and everything downstream of them.
    pub fn with_descendants(&self, roots: &[usize]) -> HashSet<usize> {
        self.closure(roots, petgraph::Direction::Outgoing)
    }
    fn closure(&self, roots: &[usize], dir: petgraph::Direction) -> HashSet<usize> {
        let mut seen: HashSet<usize> = roots.iter().copied().collect();
        let mut stack = roots.to_vec();
        while let Some(i) = stack.pop() {
            for n in self.graph.neighbors_directed(NodeIndex::new(i), dir) {
                if seen.insert(self.graph[n]) {
                    stack.push(self.graph[n]);
                }
            }
        }
        seen
    }
    /// The stage producing a workspace-relative path, if any.
    pub fn producer_of(&self, path: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.outs.iter().any(|o| o.path == path))
    }
    /// Absolute path of a workspace-relative (or absolute) path.
    pub fn abs(&self, p: &str) -> PathBuf {
        self.workspace.join(p)
    }
    /// The job group of stage `i`: its `group:` and tenant; `None` when it runs alone.
    pub fn group_of(&self, i: usize) -> Option<(&str, Option<&str>)> {
        let s = &self.stages[i];
        s.group.as_deref().map(|g| (g, s.tenant.as_deref()))
    }
    /// A group must be a connected chain: no stage outside it may sit on a path
    /// between two of its members (one job could not run them without waiting
    /// for another). Returns the error, if any.
    fn check_groups(&self) -> Option<String> {
        let mut groups: BTreeMap<(&str, Option<&str>), Vec<usize>> = BTreeMap::new();
        for i in 0..self.stages.len() {
            if let Some(k) = self.group_of(i) {
                groups.entry(k).or_default().push(i);
            }
        }
        for ((g, t), members) in groups {
            let set: HashSet<usize> = members.iter().copied().collect();
            let down = self.with_descendants(&members);
            let up = self.with_ancestors(&members);
            if let Some(&x) = self.topo.iter().find(|x| !set.contains(x) && down.contains(x) && up.contains(x)) {
                let t = t.map(|t| format!(" (tenant {t})")).unwrap_or_default();
                return Some(format!(
                    "group `{g}`{t}: stage {} is not in the group but lies between two of its stages; a group must be a connected chain: add {} to the group or remove the group from the stages around it",
                    self.stages[x].name, self.stages[x].base
                ));
            }
            let ex: HashSet<ExecutorKind> = members.iter().map(|&i| self.stages[i].executor).collect();
            if ex.len() > 1 {
                return Some(format!("group `{g}`: its stages name different executors; a group runs in one place"));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(yaml: &str) -> std::result::Result<Pipeline, String> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, yaml).unwrap();
        load(&f, Some(dir.path()), &[], &crate::stages::kinds()).map_err(|e| e.to_string())
    }

    #[test]
    fn interpolation_keeps_types_and_tracks_refs() {
        let params: IndexMap<String, Value> = [("rows".to_string(), Value::from(10)), ("name".into(), Value::from("x"))].into_iter().collect();
        let mut refs = BTreeMap::new();
        assert_eq!(interpolate("${params.rows}", &params, None, &mut refs).unwrap(), Value::from(10));
        assert_eq!(interpolate("a-${params.name}-${HOME}-${tenant}", &params, Some("T"), &mut refs).unwrap(), Value::from("a-x-${HOME}-T"));
        assert_eq!(refs.len(), 2);
        assert!(interpolate("${params.nope}", &params, None, &mut refs).unwrap_err().contains("not defined"));
    }

    #[test]
    fn out_paths_must_stay_inside() {
        assert_eq!(normalize_out("./a//b").unwrap(), "a/b");
        assert!(normalize_out("../x").unwrap_err().contains(".."));
        assert!(normalize_out("/etc/x").unwrap_err().contains("absolute"));
        assert!(normalize_out(".dagrun/x").is_err());
    }

    #[test]
    fn edges_from_outs_and_needs() {
        let p = load_str("stages:\n  a:\n    cmd: echo\n    outs: [x]\n  b:\n    cmd: echo\n    deps: [x]\n  c:\n    cmd: echo\n    needs: [b]\n").unwrap();
        assert_eq!(p.topo, vec![0, 1, 2]);
        assert_eq!(p.upstream(1), vec![0]);
        assert_eq!(p.upstream(2), vec![1]);
    }

    #[test]
    fn cycle_is_printed() {
        let e = load_str("stages:\n  a:\n    cmd: echo\n    deps: [y]\n    outs: [x]\n  b:\n    cmd: echo\n    deps: [x]\n    outs: [y]\n").unwrap_err();
        assert!(e.contains("cycle: a → b → a"), "{e}");
    }

    #[test]
    fn unknown_key_has_location() {
        let e = load_str("stages:\n  a:\n    cmd: echo\n    outz: [x]\n").unwrap_err();
        assert!(e.starts_with("p.yaml:4:") && e.contains("unknown field `outz`"), "{e}");
    }

    #[test]
    fn stage_line_is_found() {
        let t = "params:\n  a: 1\nstages:\n  gen:\n    cmd: x\n  \"train\":\n    cmd: y\n";
        assert_eq!(stage_line(t, "gen"), Some(4));
        assert_eq!(stage_line(t, "train"), Some(6));
    }
}
