//! The pipeline file as written by the user: typed serde structs that deny
//! unknown keys, so a typo is an error with a line number, not a silent no-op.
//! A key written twice in one mapping (two stages of one name, a param, an
//! `env:` variable or a `with:` parameter) is an error too: YAML would keep
//! the last one and drop the other without a word.

use indexmap::IndexMap;
use serde::Deserialize;
use std::collections::BTreeMap;

/// A whole pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Pipeline-level params, referenced from stages as `${params.NAME}`.
    #[serde(default, deserialize_with = "unique_keys")]
    pub params: IndexMap<String, yaml_serde::Value>,
    /// Environment variables no `cmd` may see (exact names, or `PREFIX*`),
    /// besides the master-key variables, which are always withheld.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Cloud variables (withheld by default) this pipeline's commands may
    /// see, by exact name (`util::child_env::CLOUD_PREFIXES`).
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// The stages, by name, in file order.
    #[serde(deserialize_with = "unique_keys")]
    pub stages: IndexMap<String, StageDef>,
    /// Where stages execute by default: `local` (this process) or `slurm` (a job each).
    pub executor: Option<ExecutorKind>,
    /// Settings of the Slurm executor (see `executor::slurm`).
    pub slurm: Option<SlurmDef>,
}

/// A mapping whose keys must all differ (see the module's rules).
fn unique_keys<'de, D: serde::Deserializer<'de>, V: Deserialize<'de>>(d: D) -> Result<IndexMap<String, V>, D::Error> {
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = IndexMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = IndexMap::new();
            while let Some(k) = map.next_key::<String>()? {
                let v = map.next_value()?;
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "`{k}` is written twice in one mapping (YAML would keep only the last one); rename or remove one of them"
                    )));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}

/// `env:`, with its names all different.
fn unique_env<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    unique_keys(d).map(|m| m.into_iter().collect())
}

/// Where a stage's work executes.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// In the `dagrun run` process (the default).
    #[default]
    Local,
    /// In a Slurm job running `dagrun exec-stage` on the shared filesystem.
    Slurm,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

/// `slurm:` at pipeline level.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct SlurmDef {
    /// Path of the dagrun binary on the compute nodes (default: this binary).
    pub binary: Option<String>,
    /// Seconds between two status polls (one `squeue` call for all jobs; default 1).
    pub poll_interval: Option<f64>,
    /// How often a failing `sbatch` is retried, with backoff (default 5).
    pub submit_retries: Option<u32>,
    /// Seconds one `sbatch` call may take before it is killed (default 120).
    pub submit_timeout: Option<f64>,
    /// Resources every stage gets unless it says otherwise.
    pub resources: Option<Resources>,
}

/// `resources:` of a stage: mapped to `sbatch` flags; never part of the cache key.
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `--cpus-per-task`.
    pub cpus: Option<u32>,
    /// `--mem`, e.g. `4G`, `500M`.
    pub mem: Option<String>,
    /// `--time`, in minutes.
    pub time: Option<u32>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// More `sbatch` arguments, passed as written (e.g. `["--qos=low"]`).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

/// One stage as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StageDef {
    /// A built-in stage kind (`generate`, `encrypt`, ...).
    pub uses: Option<String>,
    /// A shell command (run with `sh -c` in the workspace).
    pub cmd: Option<String>,
    /// Parameters of a built-in kind; values may reference `${params.X}` and `${tenant}`.
    #[serde(default, deserialize_with = "unique_keys")]
    pub with: IndexMap<String, yaml_serde::Value>,
    /// Input files or directories (relative to the workspace).
    #[serde(default)]
    pub deps: Vec<String>,
    /// Output files or directories (relative to the workspace, inside it).
    #[serde(default)]
    pub outs: Vec<OutDef>,
    /// Stages that must finish first (besides those implied by deps/outs).
    #[serde(default)]
    pub needs: Vec<String>,
    /// Fan out once per item of a list; only `tenants` exists.
    pub foreach: Option<String>,
    /// Environment variables for `cmd` (part of the cache key).
    #[serde(default, deserialize_with = "unique_env")]
    pub env: BTreeMap<String, String>,
    /// Give up on the stage after this many seconds (cmd stages: the process group is killed).
    pub timeout: Option<f64>,
    /// Rerun a failed stage this many times before giving up.
    #[serde(default)]
    pub retries: u32,
    /// Free text: the job's description in its OpenLineage `documentation` facet.
    pub desc: Option<String>,
    /// Overrides the pipeline's `executor:` for this stage.
    pub executor: Option<ExecutorKind>,
    /// Slurm resources of this stage (merged over `slurm.resources`).
    pub resources: Option<Resources>,
    /// Stages with the same group (and, for `foreach` stages, the same tenant)
    /// run in one Slurm job.
    pub group: Option<String>,
}

/// An output: a path, or a path with options.
#[derive(Debug, Clone)]
pub enum OutDef {
    Path(String),
    Detailed(OutDetailed),
}

/// By hand rather than `untagged`, so that a bad option is named
/// (``unknown field `sensitiv` ``, ``invalid type: string "maybe", expected a
/// boolean``) instead of "did not match any variant".
impl<'de> Deserialize<'de> for OutDef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OutDef;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an output path, or {path: P, sensitive: true|false, cache: true|false}")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<OutDef, E> {
                Ok(OutDef::Path(s.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<OutDef, A::Error> {
                OutDetailed::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(OutDef::Detailed)
            }
        }
        d.deserialize_any(V)
    }
}

/// An output with options.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutDetailed {
    pub path: String,
    /// Holds plaintext PII: never copied into the cache, deleted once its
    /// consumers have finished, regenerated on demand (see README).
    #[serde(default)]
    pub sensitive: bool,
    /// Keep a copy in the content-addressed cache (default true).
    #[serde(default = "yes")]
    pub cache: bool,
}

fn yes() -> bool {
    true
}

impl OutDef {
    pub fn path(&self) -> &str {
        match self {
            OutDef::Path(p) => p,
            OutDef::Detailed(d) => &d.path,
        }
    }
    pub fn sensitive(&self) -> bool {
        matches!(self, OutDef::Detailed(d) if d.sensitive)
    }
    pub fn cache(&self) -> bool {
        match self {
            OutDef::Path(_) => true,
            OutDef::Detailed(d) => d.cache,
        }
    }
}
