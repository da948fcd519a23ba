//! Pipelines: the YAML model, validation, params, per-tenant expansion and the DAG.
//!
//! Loading goes file → [`schema::PipelineFile`] (serde, unknown keys denied) →
//! params resolved (`${params.X}`, `${tenant}`) → `foreach: tenants` expanded into
//! `NAME[TENANT]` instances → paths checked → edges from `needs:` and from
//! outs feeding deps → cycle check. Every error names the file, the YAML
//! location where known, and the fix, and is a [`Failure::Config`] (exit 2).
//!
//! Files: `schema.rs` (the YAML file format), `budget.rs` + `yaml_limits.rs` (size,
//! depth, alias and value limits), `parse.rs` (text to stages), `interpolate.rs`
//! (`${params.X}`, `${tenant}`), `paths.rs` (input/output path rules),
//! `graph.rs` (cycles, run order), `tenants.rs` (`config/tenants.yaml`),
//! `shell.rs` (quoting values into `cmd`), `kind.rs` (what loading needs of a
//! stage kind). This file: the types and `load`.

mod budget;
mod graph;
mod interpolate;
pub mod kind;
mod parse;
mod paths;
pub mod schema;
pub mod shell;
pub mod tenants;
pub mod yaml_limits;

use crate::error::config;
use anyhow::Result;
use indexmap::IndexMap;
pub use kind::{Declared, DeclaredOut, KindDecl, Kinds, StageError};
use petgraph::graph::{DiGraph, NodeIndex};
pub use schema::{ExecutorKind, Resources, SlurmDef};
use schema::{OutDef, PipelineFile, StageDef};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
pub use tenants::{Tenant, Tenants};

use budget::*;
pub use budget::{MAX_YAML_NODES, check_yaml_budget, check_yaml_limits, explain_yaml_message, yaml_budget_can_be_exceeded};
use graph::*;
use interpolate::*;
use parse::*;
use paths::*;
pub use paths::{PROTECTED_DIRS, check_output_at_write, normalize_dep, normalize_out};

/// Longest `timeout:` (and `--wait`) accepted, in seconds (about 31 years):
/// larger values cannot be represented as a deadline.
pub const MAX_SECONDS: f64 = 1e9;
/// Most parallel stages (`run -j`); a run record naming more, or a worker
/// slot beyond it, was not written by dagrun (`engine::runs`).
pub const MAX_JOBS: usize = 1024;
/// The most `retries:` a stage may have.
pub const MAX_RETRIES: u32 = 100;

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
    /// Resolved `with:` params (what the cache key and lineage record).
    pub with: Map<String, Value>,
    /// The same params as its kind typed them when it declared the stage
    /// (`Declared::params`; read with `stages::params::of`).
    pub typed_with: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// Pipeline params this stage references, with their values.
    pub param_refs: BTreeMap<String, Value>,
    /// Digests of its `cmd:` and `with:` as written (for explanations only).
    pub written: crate::workspace::state::Written,
    /// Workspace-relative inputs (or absolute paths outside the workspace).
    pub deps: Vec<String>,
    pub outs: Vec<Out>,
    pub env: BTreeMap<String, String>,
    /// Variables withheld from the stage's command besides the master-key
    /// ones: the pipeline's `secrets:` and the cloud variables it does not
    /// pass (see `util::child_env`).
    pub secrets: Arc<crate::util::child_env::Withheld>,
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
    /// `secrets:` and `pass_env:`: environment variables no command may see.
    pub secrets: Arc<crate::util::child_env::Withheld>,
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

/// The tenant of a stage instance's name (`train[Tenant_A]` → `Tenant_A`;
/// None for a stage that is not tenant-fanned). Names read back from disk or
/// a remote are checked elsewhere; this only splits.
pub fn instance_tenant(stage: &str) -> Option<&str> {
    stage.strip_suffix(']').and_then(|r| r.split_once('[')).map(|(_, t)| t)
}

/// Load, expand and validate a pipeline. `overrides` replace pipeline params
/// (`--param NAME=VALUE`); `kinds` are the stage kinds `uses:` may name
/// (`stages::kinds()` for the built-in ones).
pub fn load(file: &Path, workspace: Option<&Path>, overrides: &[(String, String)], kinds: &Kinds) -> Result<Pipeline> {
    load_from(file, workspace, overrides, kinds, Source::Named)
}

/// [`load`] of a pipeline file a record names (a run record's `pipeline`,
/// for `report`): read only if it is a regular file (a link to one is fine);
/// a FIFO or device put in its place is refused, never waited on.
pub fn load_recorded(file: &Path, workspace: &Path, overrides: &[(String, String)], kinds: &Kinds) -> Result<Pipeline> {
    load_from(file, Some(workspace), overrides, kinds, Source::Recorded)
}

/// Who named the pipeline file: the user (a pipe is fine) or a record.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    Named,
    Recorded,
}

/// How a pipeline file (absolute) is named in messages, records and metric
/// labels: relative to its workspace (absolute); a device or a pipe
/// (`/dev/zero`, `<(…)` under /dev/fd) is named whole.
pub fn shown_name(file: &Path, workspace: &Path) -> String {
    let special = file.starts_with("/dev") || file.starts_with("/proc");
    file.strip_prefix(workspace).ok().filter(|_| !special).map(|p| p.display().to_string()).unwrap_or_else(|| file.display().to_string())
}

fn load_from(file: &Path, workspace: Option<&Path>, overrides: &[(String, String)], kinds: &Kinds, source: Source) -> Result<Pipeline> {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let workspace = match workspace {
        Some(w) => std::path::absolute(w).unwrap_or_else(|_| w.to_path_buf()),
        None => find_workspace(&file),
    };
    let shown = shown_name(&file, &workspace);
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
    // The file the user named: a pipe (`dagrun run <(make-pipeline)`,
    // `/dev/stdin`) is read to its end, as `cat` would; nothing is locked yet.
    // Read no further than the cap: `/dev/zero` is refused, never read whole.
    let bytes = {
        use std::io::Read;
        let mut b = Vec::new();
        let opened = match source {
            Source::Named => std::fs::File::open(&file),
            Source::Recorded => crate::util::open_regular(&file),
        };
        opened.and_then(|f| f.take(MAX_PIPELINE_BYTES + 1).read_to_end(&mut b)).map_err(|e| config(format!("{shown}: cannot read the pipeline file: {e}")))?;
        b
    };
    if bytes.len() as u64 > MAX_PIPELINE_BYTES {
        return Err(config(format!(
            "{shown}: more than {MAX_PIPELINE_BYTES} bytes (1 MiB) could be read from it; a pipeline file may be at most that. Is this the right file?"
        )));
    }
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

    /// `-p` keeps a param's type: a list param takes a list, never the string it was given.
    #[test]
    fn overrides_keep_the_params_type() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, "params:\n  files: [a.csv]\n  n: 1\n  name: x\nstages:\n  a:\n    cmd: echo ${params.files}\n").unwrap();
        let with = |k: &str, v: &str| load(&f, Some(dir.path()), &[(k.to_string(), v.to_string())], &crate::stages::kinds()).map_err(|e| e.to_string());
        let p = with("files", "[a.csv, b.csv]").unwrap();
        assert_eq!(p.params["files"], serde_json::json!(["a.csv", "b.csv"]));
        assert_eq!(with("files", "[]").unwrap().params["files"], serde_json::json!([]));
        for bad in ["3", "a.csv", "{a: 1}", "[a", "*x"] {
            let e = with("files", bad).unwrap_err();
            assert!(e.contains("`files` is a list in p.yaml; give a list, e.g. --param 'files=[a, b]'"), "{bad}: {e}");
        }
        assert!(with("n", "x").unwrap_err().contains("give a number"));
        assert_eq!(with("name", "[1]").unwrap().params["name"], serde_json::json!("[1]"));
    }

    #[test]
    fn an_instance_names_its_tenant() {
        assert_eq!(instance_tenant("train[Tenant_A]"), Some("Tenant_A"));
        assert_eq!(instance_tenant("generate"), None);
        assert_eq!(instance_tenant("x[Tenant_A"), None);
        assert_eq!(instance_tenant("x]"), None);
    }

    #[test]
    fn stage_line_is_found() {
        let t = "params:\n  a: 1\nstages:\n  gen:\n    cmd: x\n  \"train\":\n    cmd: y\n";
        assert_eq!(stage_line(t, "gen"), Some(4));
        assert_eq!(stage_line(t, "train"), Some(6));
    }
}
