//! The two files between the coordinator and a job, both in
//! `.dagrun/slurm/RUN_ID/` on the shared filesystem:
//!
//! - the **job spec** (`NAME.aN.spec.json`), written by the coordinator and
//!   read by `dagrun exec-stage`: which pipeline (file, workspace, `--param`
//!   overrides) and which stages, in order, with the cache key the
//!   coordinator computed for each when it could (see [`super::Member::key`]).
//!   It is sealed under the workspace integrity key (domain `JOB_SPEC`): the
//!   job runs nothing a spec edited on the shared filesystem asks for (another
//!   pipeline, other params, no key to check), and its result file must sit
//!   beside it under the same name (`NAME.aN.result.json`);
//! - the **result file** (`NAME.aN.result.json`), written atomically by the
//!   job after every member it finishes or fails, and read back by the
//!   coordinator as *untrusted input*: bounded size, a record sealed by the
//!   job under the workspace integrity key (`workspace::record`, domain
//!   `JOB_RESULT`; the job reads the master key from its file, so whoever
//!   can write the shared folder but holds no key cannot forge a result or
//!   its facts, which go into the MAC'd state record), naming this run and
//!   this spec (a result of another job or run is refused), exact format,
//!   members in the order asked, keys as 64 lowercase hex characters,
//!   bounded error texts and facts. Outputs are never taken from it: the
//!   coordinator hashes them on disk.
//!
//! Neither file holds a secret or a plaintext value.

use crate::crypto::IntegrityKey;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const SPEC_FORMAT: &str = "dagrun-job-spec/v2";
pub const RESULT_FORMAT: &str = "dagrun-job-result/v2";
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
    /// The record's MAC (`workspace::record`), checked before anything is used.
    #[serde(default, skip_serializing)]
    pub mac: Option<String>,
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
    /// The run and the job spec (file name) it answers.
    pub run_id: String,
    pub spec: String,
    pub stages: Vec<StageResult>,
    /// The record's MAC (`workspace::record`), checked before anything else.
    #[serde(default, skip_serializing)]
    pub mac: Option<String>,
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

/// Write a job spec (coordinator side), sealed under the workspace integrity key.
pub fn write_spec(path: &Path, spec: &JobSpec, key: &IntegrityKey) -> Result<()> {
    let bytes = crate::workspace::record::seal(key, crate::workspace::record::JOB_SPEC, spec)?;
    crate::util::atomic::write_atomic(path, &bytes).with_context(|| format!("cannot write the job spec {}", path.display()))
}

/// Read a job spec (exec-stage side): `key_of(workspace)` gives the integrity
/// key of the workspace the spec names (whose master key the job reads from
/// the file its script names, so a spec naming another workspace fails too).
pub fn read_spec(path: &Path, key_of: impl FnOnce(&Path) -> Result<std::sync::Arc<IntegrityKey>>) -> Result<JobSpec> {
    let b = read_bounded(path, "job spec")?;
    let unverified: JobSpec = crate::util::redact::from_json(&b).map_err(|why| anyhow::anyhow!("the job spec {} is not valid ({})", path.display(), why))?;
    if unverified.format != SPEC_FORMAT {
        bail!(
            "the job spec {} has format {:?}; this dagrun reads {SPEC_FORMAT} (is the job running another dagrun version? set `slurm.binary`)",
            path.display(),
            unverified.format
        );
    }
    let key = key_of(&unverified.workspace)?;
    let spec: JobSpec = crate::workspace::record::open(Some(&key), crate::workspace::record::JOB_SPEC, &b, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("the job spec is not to be trusted: {e}; nothing was run"))?;
    let name = |p: &Path, ext: &str| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(ext)).map(str::to_string);
    if name(path, ".spec.json").is_none() || name(path, ".spec.json") != name(&spec.result, ".result.json") || path.parent() != spec.result.parent() {
        bail!("the job spec {} names a result file that is not its own; nothing was run", path.display());
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

/// The claim file of the spec whose result file is `result` (`X.aN.claim`
/// beside `X.aN.result.json`): made once, by the job that runs the spec or,
/// when its job has ended, by the coordinator. A spec whose claim exists is
/// never run (`exec-stage`).
pub fn claim_path(result: &Path) -> std::path::PathBuf {
    beside(result, ".claim")
}

/// The file of the same spec as the result file `result`, with `ext` for `.result.json`.
fn beside(result: &Path, ext: &str) -> std::path::PathBuf {
    let name = result.file_name().map(|n| n.to_string_lossy().replace(".result.json", ext)).unwrap_or_default();
    result.with_file_name(name)
}

/// Claim the spec of `result`: true if this call made the claim, false if it
/// existed (`O_EXCL`; a link there counts as a claim and is never followed).
pub fn claim(result: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(claim_path(result)) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Claim the spec of `result` for the Slurm job `job_id` (`exec-stage`,
/// before it runs anything): as [`claim`], but the claim file appears
/// holding the job's id (written to a file of its own, then linked into
/// place: `link` fails on an existing name as `O_EXCL` does, also on NFS).
/// A coordinator that finds the claim made learns which job holds it
/// ([`claimed_by`]), even when Slurm lists two jobs under one name.
pub fn claim_for_job(result: &Path, job_id: &str) -> std::io::Result<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = claim_path(result);
    let tmp = path.with_file_name(format!(".{}.{job_id}.{}.tmp", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
    let written = f.write_all(job_id.as_bytes()).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let linked = std::fs::hard_link(&tmp, &path);
    // NFS may answer a retransmitted `link` that succeeded with EEXIST: the
    // temporary file's link count tells.
    let ours = || std::fs::metadata(&tmp).is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 2);
    let outcome = match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(ours()),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&tmp);
    match outcome {
        // A file system without hard links (some FUSE mounts): the claim is
        // made as the coordinator makes it, then given the id (a coordinator
        // reading it in between finds no id: `claimed_by` is `None`).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS | libc::EXDEV | libc::EMLINK)) => {
            if !claim(result)? {
                return Ok(false);
            }
            let mut f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&path)?;
            f.write_all(job_id.as_bytes())?;
            Ok(true)
        }
        other => other,
    }
}

/// The Slurm job id the claim of `result`'s spec holds ([`claim_for_job`]);
/// `None` when there is no claim, it is not a regular file (never
/// followed), or it holds no job id (the coordinator's claim, a spec run
/// by hand).
pub fn claimed_by(result: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(claim_path(result)).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    f.take(64).read_to_string(&mut text).ok()?;
    Some(text.trim().to_string()).filter(|id| is_job_id(id))
}

/// A Slurm job id as dagrun submits them: 1 to 20 digits (no array or
/// het-job suffix).
pub fn is_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())
}

/// The spec file whose result file is `result` (`X.aN.spec.json` beside `X.aN.result.json`).
pub fn spec_path(result: &Path) -> std::path::PathBuf {
    beside(result, ".spec.json")
}

/// A blake3 hex key.
pub fn is_key(k: &str) -> bool {
    k.len() == 64 && k.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Write a result file (job side), sealed under the workspace integrity key.
pub fn write_result(path: &Path, result: &JobResult, key: &IntegrityKey) -> Result<()> {
    let bytes = crate::workspace::record::seal(key, crate::workspace::record::JOB_RESULT, result)?;
    crate::util::atomic::write_atomic(path, &bytes).with_context(|| format!("cannot write the job result file {}", path.display()))
}

/// Read a result file (coordinator side): sealed under `key`, answering run
/// `run_id`'s spec `spec` (file name). `expected` are the member names in
/// order; the result may cover a prefix of them (the job died or a member
/// failed). `Ok(None)` when there is no result file.
pub fn read_result(path: &Path, expected: &[&str], key: &IntegrityKey, run_id: &str, spec: &str) -> Result<Option<Vec<StageResult>>> {
    if !path.exists() {
        return Ok(None);
    }
    let b = read_bounded(path, "job result file")?;
    let r: JobResult = crate::workspace::record::open(Some(key), crate::workspace::record::JOB_RESULT, &b, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("the job result file is not to be trusted: {e}"))?;
    if r.format != RESULT_FORMAT {
        bail!("the job result file {} has format {:?}, expected {RESULT_FORMAT}", path.display(), r.format);
    }
    if r.run_id != run_id || r.spec != spec {
        bail!("the job result file {} answers another job (run {}, spec {}); not used", path.display(), truncate(&r.run_id, 80), truncate(&r.spec, 120));
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
    fn specs_are_sealed_and_name_their_own_result() {
        use crate::workspace::record::{JOB_SPEC, seal};
        let d = tempfile::tempdir().unwrap();
        let k = std::sync::Arc::new(IntegrityKey::from_bytes([7; 32]));
        let spec = |result: &str| JobSpec {
            format: SPEC_FORMAT.into(),
            run_id: "R1".into(),
            pipeline: "/ws/p.yaml".into(),
            workspace: "/ws".into(),
            overrides: vec![("rows".into(), "5".into())],
            stages: vec![SpecStage { stage: "a".into(), key: Some("b".repeat(64)) }],
            result: d.path().join(result),
            mac: None,
        };
        let path = d.path().join("a.a1.spec.json");
        let read = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read_spec(&path, |ws| {
                assert_eq!(ws, Path::new("/ws"));
                Ok(k.clone())
            })
        };
        let good = seal(&k, JOB_SPEC, &spec("a.a1.result.json")).unwrap();
        let s = read(&good).unwrap();
        assert_eq!((s.run_id.as_str(), s.overrides.len(), s.stages[0].key.is_some()), ("R1", 1, true));
        // Edited on the shared filesystem: another pipeline, no key to check.
        let text = String::from_utf8(good.clone()).unwrap();
        for edited in [text.replace("/ws/p.yaml", "/ws/evil.yaml"), text.replace(&format!("\"{}\"", "b".repeat(64)), "null")] {
            assert!(read(edited.as_bytes()).unwrap_err().to_string().contains("fails its MAC"), "{edited}");
        }
        assert!(read(&serde_json::to_vec(&spec("a.a1.result.json")).unwrap()).unwrap_err().to_string().contains("no MAC"));
        let other = seal(&IntegrityKey::from_bytes([8; 32]), JOB_SPEC, &spec("a.a1.result.json")).unwrap();
        assert!(read(&other).unwrap_err().to_string().contains("fails its MAC"));
        // Sealed, but pointing at another job's result file.
        assert!(read(&seal(&k, JOB_SPEC, &spec("b.a1.result.json")).unwrap()).unwrap_err().to_string().contains("not its own"));
    }

    #[test]
    fn a_claim_is_made_once_and_names_the_job_that_made_it() {
        let dir = tempfile::tempdir().unwrap();
        let result = dir.path().join("s0.a1.result.json");
        assert_eq!(claimed_by(&result), None);
        assert!(claim_for_job(&result, "1402").unwrap());
        assert_eq!(claimed_by(&result).as_deref(), Some("1402"));
        // Once: neither another job nor the coordinator claims it again.
        assert!(!claim_for_job(&result, "1403").unwrap());
        assert!(!claim(&result).unwrap());
        assert_eq!(claimed_by(&result).as_deref(), Some("1402"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        // The coordinator's claim, or a spec run by hand, names no job.
        let other = dir.path().join("s1.a1.result.json");
        assert!(claim(&other).unwrap());
        assert_eq!(claimed_by(&other), None);
        let by_hand = dir.path().join("s2.a1.result.json");
        assert!(claim_for_job(&by_hand, "").unwrap());
        assert_eq!(claimed_by(&by_hand), None);
        // A link is a claim, never followed; what a claim holds is checked.
        let target = dir.path().join("target");
        std::fs::write(&target, "77").unwrap();
        let linked = dir.path().join("s3.a1.result.json");
        std::os::unix::fs::symlink(&target, claim_path(&linked)).unwrap();
        assert!(!claim_for_job(&linked, "1404").unwrap());
        assert_eq!(claimed_by(&linked), None);
        let odd = dir.path().join("s4.a1.result.json");
        std::fs::write(claim_path(&odd), "12_3").unwrap();
        assert_eq!(claimed_by(&odd), None);
        assert_eq!(spec_path(&odd), dir.path().join("s4.a1.spec.json"));
        assert!(is_job_id("1") && !is_job_id("") && !is_job_id("123456789012345678901") && !is_job_id("12_3"));
    }

    #[test]
    fn result_files_are_checked() {
        use crate::workspace::record::{JOB_RESULT, seal};
        use serde_json::json;
        let d = tempfile::tempdir().unwrap();
        let k = IntegrityKey::from_bytes([7; 32]);
        let sealed = |v: Value| write(d.path(), std::str::from_utf8(&seal(&k, JOB_RESULT, &v).unwrap()).unwrap());
        let key = "a".repeat(64);
        let body = |stages: Value| json!({"format": RESULT_FORMAT, "run_id": "R1", "spec": "s.a1.spec.json", "stages": stages});
        let ok =
            body(json!([{"stage": "a", "ok": true, "key": key, "seconds": 1.5, "facts": {"auc": 0.75}}, {"stage": "b", "ok": false, "error": "boom\u{7}"}]));
        let read = |p: &Path| read_result(p, &["a", "b", "c"], &k, "R1", "s.a1.spec.json");
        let r = read(&sealed(ok.clone())).unwrap().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].facts["auc"], 0.75);
        assert_eq!(r[1].error.as_deref(), Some("boom?"));
        assert!(read(&d.path().join("none.json")).unwrap().is_none());
        // Written by whoever holds no key: unsealed, or sealed under another key, or edited after sealing.
        let plain = write(d.path(), &ok.to_string());
        assert!(read(&plain).unwrap_err().to_string().contains("not to be trusted"));
        let other = IntegrityKey::from_bytes([8; 32]);
        let foreign = write(d.path(), std::str::from_utf8(&seal(&other, JOB_RESULT, &ok).unwrap()).unwrap());
        assert!(read(&foreign).unwrap_err().to_string().contains("fails its MAC"));
        let edited = std::fs::read_to_string(sealed(ok.clone())).unwrap().replace("0.75", "0.999");
        assert!(read(&write(d.path(), &edited)).unwrap_err().to_string().contains("fails its MAC"));
        // Genuine, but of another run or spec.
        assert!(read_result(&sealed(ok.clone()), &["a", "b"], &k, "R2", "s.a1.spec.json").unwrap_err().to_string().contains("answers another job"));
        assert!(read_result(&sealed(ok), &["a", "b"], &k, "R1", "s.a2.spec.json").unwrap_err().to_string().contains("answers another job"));
        for bad in [
            body(json!([{"stage": "x", "ok": true, "key": key}])),
            body(json!([{"stage": "a", "ok": true, "key": "XYZ"}])),
            body(json!([{"stage": "a", "ok": true}])),
            json!({"format": "other", "run_id": "R1", "spec": "s.a1.spec.json", "stages": []}),
            json!({"format": RESULT_FORMAT, "run_id": "R1", "spec": "s.a1.spec.json", "stages": [], "extra": 1}),
        ] {
            assert!(read(&sealed(bad.clone())).is_err(), "{bad}");
        }
        assert!(read(&write(d.path(), "not json")).is_err());
        let big = "x".repeat(MAX_FILE_BYTES as usize + 10);
        assert!(read(&write(d.path(), &big)).unwrap_err().to_string().contains("larger"));
    }
}
