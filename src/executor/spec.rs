//! The two files between the coordinator and a job, both in
//! `.dagrun/slurm/RUN_ID/` on the shared filesystem:
//!
//! - the **job spec** (`NAME.aN.spec.json`), written by the coordinator and
//!   read by `dagrun exec-stage`: which pipeline (file, workspace, `--param`
//!   overrides) and which stages, in order, with the cache key the
//!   coordinator computed for each when it could (see [`super::Member::key`]);
//! - the **result file** (`NAME.aN.result.json`), written atomically by the
//!   job after every member it finishes or fails, and read back by the
//!   coordinator as *untrusted input*: bounded size, exact format, members in
//!   the order asked, keys as 64 lowercase hex characters, bounded error
//!   texts and facts. Outputs are never taken from it: the coordinator hashes
//!   them on disk.
//!
//! Neither file holds a secret or a plaintext value.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const SPEC_FORMAT: &str = "dagrun-job-spec/v1";
pub const RESULT_FORMAT: &str = "dagrun-job-result/v1";
/// Largest spec or result file read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest error text kept from a result file.
pub const MAX_ERROR_CHARS: usize = 8192;
/// Largest facts object kept from a result file (serialized bytes).
pub const MAX_FACTS_BYTES: usize = 64 * 1024;

/// What a job is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub format: String,
    pub run_id: String,
    /// Absolute path of the pipeline file.
    pub pipeline: PathBuf,
    pub workspace: PathBuf,
    /// `--param NAME=VALUE` overrides of the run.
    #[serde(default)]
    pub overrides: Vec<(String, String)>,
    pub stages: Vec<SpecStage>,
    /// Where the job writes its result file.
    pub result: PathBuf,
}

/// One stage of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecStage {
    pub stage: String,
    /// The key the coordinator computed; the job refuses to run under another.
    #[serde(default)]
    pub key: Option<String>,
}

/// What a job reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResult {
    pub format: String,
    pub stages: Vec<StageResult>,
}

/// One member's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageResult {
    pub stage: String,
    pub ok: bool,
    /// The key the member ran under.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    #[serde(default)]
    pub facts: Map<String, Value>,
    #[serde(default)]
    pub error: Option<String>,
}

fn read_bounded(path: &Path, what: &str) -> Result<Vec<u8>> {
    let buf = crate::util::read_at_most(path, MAX_FILE_BYTES).with_context(|| format!("cannot read the {what} {}", path.display()))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        bail!("the {what} {} is larger than {MAX_FILE_BYTES} bytes; it is not one dagrun wrote", path.display());
    }
    Ok(buf)
}

/// Read a job spec (exec-stage side).
pub fn read_spec(path: &Path) -> Result<JobSpec> {
    let b = read_bounded(path, "job spec")?;
    let spec: JobSpec = serde_json::from_slice(&b).with_context(|| format!("the job spec {} is not valid", path.display()))?;
    if spec.format != SPEC_FORMAT {
        bail!(
            "the job spec {} has format {:?}; this dagrun reads {SPEC_FORMAT} (is the job running another dagrun version? set `slurm.binary`)",
            path.display(),
            spec.format
        );
    }
    if spec.stages.is_empty() {
        bail!("the job spec {} names no stage", path.display());
    }
    for s in &spec.stages {
        if let Some(k) = &s.key
            && !is_key(k)
        {
            bail!("the job spec {} has an invalid key for stage {}", path.display(), s.stage);
        }
    }
    Ok(spec)
}

/// A blake3 hex key.
pub fn is_key(k: &str) -> bool {
    k.len() == 64 && k.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Read a result file (coordinator side). `expected` are the member names in
/// order; the result may cover a prefix of them (the job died or a member
/// failed). `Ok(None)` when there is no result file.
pub fn read_result(path: &Path, expected: &[&str]) -> Result<Option<Vec<StageResult>>> {
    if !path.exists() {
        return Ok(None);
    }
    let b = read_bounded(path, "job result file")?;
    let r: JobResult = serde_json::from_slice(&b).with_context(|| format!("the job result file {} is not valid", path.display()))?;
    if r.format != RESULT_FORMAT {
        bail!("the job result file {} has format {:?}, expected {RESULT_FORMAT}", path.display(), r.format);
    }
    if r.stages.len() > expected.len() {
        bail!("the job result file {} reports {} stages; the job ran {}", path.display(), r.stages.len(), expected.len());
    }
    let mut out = Vec::with_capacity(r.stages.len());
    for (n, (mut s, want)) in r.stages.into_iter().zip(expected).enumerate() {
        if s.stage != *want {
            bail!("the job result file {} names stage {:?} at position {}; the job was asked to run {want}", path.display(), truncate(&s.stage, 80), n + 1);
        }
        if s.ok {
            match &s.key {
                Some(k) if is_key(k) => {}
                _ => bail!("the job result file {} has no valid key for stage {want}", path.display()),
            }
        }
        if !s.seconds.is_finite() || s.seconds < 0.0 {
            s.seconds = 0.0;
        }
        s.cpu_seconds = s.cpu_seconds.filter(|c| c.is_finite() && *c >= 0.0);
        if serde_json::to_vec(&s.facts).map(|v| v.len()).unwrap_or(usize::MAX) > MAX_FACTS_BYTES {
            bail!("the job result file {} reports more than {MAX_FACTS_BYTES} bytes of facts for stage {want}", path.display());
        }
        s.error = s.error.map(|e| truncate(&e, MAX_ERROR_CHARS));
        let failed = !s.ok;
        out.push(s);
        if failed {
            break; // nothing runs after a failed member
        }
    }
    Ok(Some(out))
}

/// At most `n` characters of `s`, control characters other than newlines and tabs shown as `?`.
pub fn truncate(s: &str, n: usize) -> String {
    let mut t: String = s.chars().take(n).map(|c| if c.is_control() && c != '\n' && c != '\t' { '?' } else { c }).collect();
    if s.chars().count() > n {
        t.push('…');
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("r.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn result_files_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let key = "a".repeat(64);
        let ok = format!(
            r#"{{"format":"{RESULT_FORMAT}","stages":[{{"stage":"a","ok":true,"key":"{key}","seconds":1.5}},{{"stage":"b","ok":false,"error":"boom\u0007"}}]}}"#
        );
        let r = read_result(&write(d.path(), &ok), &["a", "b", "c"]).unwrap().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].error.as_deref(), Some("boom?"));
        assert!(read_result(&d.path().join("none.json"), &["a"]).unwrap().is_none());
        for bad in [
            format!(r#"{{"format":"{RESULT_FORMAT}","stages":[{{"stage":"x","ok":true,"key":"{key}"}}]}}"#),
            format!(r#"{{"format":"{RESULT_FORMAT}","stages":[{{"stage":"a","ok":true,"key":"XYZ"}}]}}"#),
            format!(r#"{{"format":"{RESULT_FORMAT}","stages":[{{"stage":"a","ok":true}}]}}"#),
            r#"{"format":"other","stages":[]}"#.to_string(),
            format!(r#"{{"format":"{RESULT_FORMAT}","stages":[],"extra":1}}"#),
            "not json".to_string(),
        ] {
            assert!(read_result(&write(d.path(), &bad), &["a", "b"]).is_err(), "{bad}");
        }
        let big = "x".repeat(MAX_FILE_BYTES as usize + 10);
        assert!(read_result(&write(d.path(), &big), &["a"]).unwrap_err().to_string().contains("larger"));
    }
}
