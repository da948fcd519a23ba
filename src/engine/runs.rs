//! Run records: `runs/RUN_ID.json`, one per `dagrun run`, written atomically
//! when the run ends. The `stages` items `{stage, status, seconds}` are a
//! stable interface for scripts. Fields are only ever added, as optional
//! (`serde(default)`), so records of older versions still read; readers that
//! draw from a record (`report`) check its values (`validate_timing`).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a stage ended in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Executed.
    Ran,
    /// Up to date: nothing done.
    Cached,
    /// Outputs copied back from the cache without executing.
    Restored,
    Failed,
    /// Not attempted because an upstream stage failed (or the run was interrupted).
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::Restored => "restored",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a whole run ended (the record's `status`; the exit code says the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Every selected stage ran, was cached or was restored (exit 0).
    Ok,
    /// A stage failed (exit 1).
    Failed,
    /// The run was interrupted (exit 130).
    Interrupted,
}

impl RunStatus {
    pub const ALL: [RunStatus; 3] = [RunStatus::Ok, RunStatus::Failed, RunStatus::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }

    /// The status a run with this exit code has.
    pub fn of_exit_code(code: i32) -> RunStatus {
        match code {
            crate::error::exit::OK => RunStatus::Ok,
            crate::error::exit::INTERRUPTED => RunStatus::Interrupted,
            _ => RunStatus::Failed,
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One stage in a run record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    pub status: Status,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Output path -> blake3.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Why it ran (or was restored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// For `ran`: whether any output differs from the previous execution
    /// (false = early cutoff: dependents stay cached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_changed: Option<bool>,
    /// `Some(false)` for a stage that ran but was left out of its state and
    /// the cache (an input changed while it ran): the next run decides it
    /// again. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub facts: Map<String, Value>,
    /// CPU time (user+sys) of the stage, where measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// The Slurm job that ran the stage's work (`executor: slurm`), for a
    /// failed stage the job it failed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
    /// When the stage started and ended, in seconds since the run started
    /// (absent in records of older versions and for stages never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_s: Option<f64>,
    /// The scheduler slot (0 .. jobs-1) that ran the stage: stages sharing a
    /// slot never overlap in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
}

impl StageRecord {
    /// A record with nothing but a stage name and a status.
    pub fn new(stage: &str, status: Status) -> StageRecord {
        StageRecord {
            stage: stage.to_string(),
            status,
            seconds: 0.0,
            key: None,
            outputs: BTreeMap::new(),
            reasons: vec![],
            outputs_changed: None,
            recorded: None,
            error: None,
            facts: Map::new(),
            cpu_seconds: None,
            slurm_job: None,
            start_s: None,
            end_s: None,
            worker: None,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline: String,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
    pub status: RunStatus,
    pub exit_code: i32,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub forced: Vec<String>,
    pub stages: Vec<StageRecord>,
    /// The pipeline's params as this run resolved them (after `-p` overrides).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// `-j`: how many stages could run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<u32>,
    /// OpenLineage delivery: `{file, events, endpoint?, delivered?, rejected?,
    /// dropped?, pending, pending_other_endpoints, error?}` (`pending` = events
    /// spooled for the next run with this run's endpoint; `pending_other_endpoints`
    /// = events waiting for other endpoints; `dropped` = events given up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openlineage: Option<Value>,
}

/// A new, sortable, unique run id: `YYYYMMDD-HHMMSS-mmm-XXXX`.
pub fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&now.timestamp_nanos_opt().unwrap_or(0).to_le_bytes());
    format!("{}-{}", now.format("%Y%m%d-%H%M%S-%3f"), &h.finalize().to_hex()[..4])
}

/// Whether `s` has the shape [`new_run_id`] gives (so it can name a file in
/// `runs/` and nothing else: no `/`, no `..`).
pub fn is_run_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 15 | 19 => c == b'-',
            20..=23 => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
            _ => c.is_ascii_digit(),
        })
}

pub fn runs_dir(workspace: &Path) -> PathBuf {
    workspace.join("runs")
}

pub fn write(workspace: &Path, rec: &RunRecord) -> Result<PathBuf> {
    // `runs/` may have become a link while the run went on (a stage's command).
    crate::workspace::own_dirs::check_fixed(workspace)?;
    let p = runs_dir(workspace).join(format!("{}.json", rec.run_id));
    // Private (0600), like the stage logs it quotes: a failed stage's error
    // holds the last lines its command wrote to stderr, which may show data.
    let mut bytes = serde_json::to_vec_pretty(rec)?;
    bytes.push(b'\n');
    crate::util::atomic::write_atomic_mode(&p, &bytes, 0o600)?;
    Ok(p)
}

/// A run record file larger than this is not one dagrun wrote.
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// Read one run record file strictly: any value that is not one dagrun
/// writes (an unknown status, a missing field, a wrong type, a negative or
/// non-finite time, a run id not of dagrun's shape or not the file's name, a
/// control character in a stage name or key) is an error naming the file.
/// (Paths, a stage's `error` and its `reasons` may hold any character a file
/// name or a command's stderr holds, colours and all: readers that print them
/// escape control characters.)
pub fn read(path: &Path) -> Result<RunRecord> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read run record {}", path.display()))?;
    if meta.len() > MAX_RECORD_BYTES {
        anyhow::bail!("{}: {} bytes is more than a run record can be; it is not one dagrun wrote: move it out of runs/", path.display(), meta.len());
    }
    let bytes = crate::util::read_capped(path, MAX_RECORD_BYTES).with_context(|| format!("cannot read run record {}", path.display()))?;
    let rec: RunRecord = crate::util::redact::from_json(&bytes)
        .map_err(|why| anyhow::anyhow!("{}: not a run record dagrun can read: {}; move it out of runs/", path.display(), why))?;
    rec.check_values().map_err(|e| anyhow::anyhow!("{}: not a run record dagrun wrote: {e}; move it out of runs/", path.display()))?;
    if path.file_stem().is_some_and(|s| *s != *rec.run_id) {
        anyhow::bail!("{}: not a run record dagrun wrote: its run_id is not its file name; move it out of runs/", path.display());
    }
    Ok(rec)
}

/// The run records of a workspace, oldest first, and the files under
/// `runs/` named like records that do not read as one (with the reason).
pub struct Listing {
    pub records: Vec<RunRecord>,
    pub unreadable: Vec<(PathBuf, anyhow::Error)>,
}

/// All run records, oldest first; files that do not parse are returned apart
/// (see [`Listing`]) so a caller can name them.
pub fn list(workspace: &Path) -> Listing {
    let mut records: Vec<RunRecord> = Vec::new();
    let mut unreadable = Vec::new();
    if let Ok(rd) = std::fs::read_dir(runs_dir(workspace)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && !name.starts_with('.') {
                match read(&e.path()) {
                    Ok(r) => records.push(r),
                    Err(err) => unreadable.push((e.path(), err)),
                }
            }
        }
    }
    records.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    unreadable.sort_by(|a, b| a.0.cmp(&b.0));
    Listing { records, unreadable }
}

/// The newest run record, read alone (its name is the largest run id under
/// `runs/`); None when there is none, or it does not read.
pub fn newest(workspace: &Path) -> Option<RunRecord> {
    let name = std::fs::read_dir(runs_dir(workspace))
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.strip_suffix(".json").is_some_and(is_run_id))
        .max()?;
    read(&runs_dir(workspace).join(name)).ok()
}

/// Why a stage without a state record runs: "no earlier run recorded", or,
/// when the newest run record has it failed (a failed stage leaves no
/// record, and one that failed after writing its outputs drops its earlier
/// one), that run's failure. `newest`: [`newest`]'s record.
pub fn no_record_reason(newest: Option<&RunRecord>, stage: &str) -> String {
    match newest.and_then(|r| r.stages.iter().find(|s| s.stage == stage && s.status == Status::Failed).map(|_| &r.run_id)) {
        Some(id) => format!("its last run failed (run {id}; `dagrun runs show {id}` says why): no successful run recorded"),
        None => "no earlier run recorded".into(),
    }
}

/// One run by id (or unique id prefix, or `last`). A record file that
/// matches but does not parse is an error naming it (exit 2), never skipped.
pub fn find(workspace: &Path, id: &str) -> Result<RunRecord> {
    let Listing { records, unreadable } = list(workspace);
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let bad = |(_, e): (PathBuf, anyhow::Error)| crate::error::config(format!("{e:#}"));
    if id == "last" || id == "latest" {
        let newest_ok = records.last().map(|r| r.run_id.clone());
        // Run ids sort by time: a newer record that does not read is the last run.
        if let Some(b) = unreadable.into_iter().filter(|(p, _)| newest_ok.as_ref().is_none_or(|n| stem(p) > *n)).max_by(|a, b| a.0.cmp(&b.0)) {
            return Err(bad(b));
        }
        return records.into_iter().last().context("no runs recorded yet");
    }
    let mut bad_matches: Vec<(PathBuf, anyhow::Error)> = unreadable.into_iter().filter(|(p, _)| stem(p).starts_with(id)).collect();
    let matches: Vec<RunRecord> = records.into_iter().filter(|r| r.run_id.starts_with(id)).collect();
    match (matches.len(), bad_matches.len()) {
        (0, 0) => Err(crate::error::config(format!("no run with id {id:?} under {}", runs_dir(workspace).display()))),
        (1, 0) => Ok(matches.into_iter().next().unwrap()),
        (0, 1) => Err(bad(bad_matches.remove(0))),
        (n, b) => Err(crate::error::config(format!("{} runs match {id:?}; give more of the id", n + b))),
    }
}

impl RunRecord {
    /// How many stages did what: `14 stages: 3 ran, 0 restored, 10 cached`,
    /// then `, N failed` and `, N skipped` when there are any (the line a
    /// run prints when it ends, and the head of a failed run's error).
    pub fn tally(&self) -> String {
        format!("{}: {}", crate::util::count(self.stages.len(), "stage", "stages"), self.counts())
    }

    /// How many stages ran, were restored, cached (always shown), failed and
    /// were skipped (shown when any): `3 ran, 0 restored, 1 cached, 1 failed`.
    pub fn counts(&self) -> String {
        let count = |s: Status| self.stages.iter().filter(|r| r.status == s).count();
        let mut line = format!("{} ran, {} restored, {} cached", count(Status::Ran), count(Status::Restored), count(Status::Cached));
        for s in [Status::Failed, Status::Skipped] {
            let n = count(s);
            if n > 0 {
                line.push_str(&format!(", {n} {}", s.as_str()));
            }
        }
        line
    }

    /// The values [`read`] refuses besides what does not parse (see there).
    fn check_values(&self) -> Result<()> {
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            anyhow::bail!("seconds must be finite and ≥ 0");
        }
        self.validate_timing("the stages")?;
        let plain = |what: &str, v: &str| {
            if v.chars().any(char::is_control) {
                anyhow::bail!("{what} holds a control character");
            }
            Ok(())
        };
        if !is_run_id(&self.run_id) {
            anyhow::bail!("run_id {:?} is not of the form YYYYMMDD-HHMMSS-mmm-xxxx", self.run_id);
        }
        for (what, v) in [("started_at", &self.started_at), ("finished_at", &self.finished_at)] {
            if chrono::DateTime::parse_from_rfc3339(v).is_err() {
                anyhow::bail!("{what} {:?} is not an RFC 3339 time", v.chars().take(40).collect::<String>());
            }
        }
        for s in &self.stages {
            plain("a stage name", &s.stage)?;
            for v in s.key.iter().chain(s.outputs.values()) {
                plain(&format!("a key or output hash of stage {}", s.stage.escape_debug()), v)?;
            }
        }
        Ok(())
    }

    /// Check the timing fields a reader relies on: finite, non-negative,
    /// `start_s ≤ end_s`, `jobs` from 1 to `-j`'s most
    /// ([`crate::pipeline::MAX_JOBS`]), and a worker slot below `jobs` (below
    /// that most when `jobs` is absent): a report draws a row per slot.
    /// `origin` is named in the error.
    pub fn validate_timing(&self, origin: &str) -> Result<()> {
        let most = crate::pipeline::MAX_JOBS as u32;
        if let Some(j) = self.jobs
            && !(1..=most).contains(&j)
        {
            anyhow::bail!("{origin}: jobs {j} is not from 1 to {most} (`run -j` allows no more)");
        }
        for s in &self.stages {
            if let Some(w) = s.worker
                && w >= most
            {
                anyhow::bail!("{origin}: stage {}: worker {w} is not below {most} (`run -j` allows no more)", s.stage);
            }
            let ok = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v >= 0.0);
            if !(ok(s.start_s) && ok(s.end_s) && s.seconds.is_finite() && s.seconds >= 0.0) {
                anyhow::bail!("{origin}: stage {}: timing values must be finite and ≥ 0", s.stage);
            }
            if let (Some(a), Some(b)) = (s.start_s, s.end_s)
                && b < a
            {
                anyhow::bail!("{origin}: stage {}: end_s {b} is before start_s {a}", s.stage);
            }
            if let (Some(w), Some(j)) = (s.worker, self.jobs)
                && w >= j
            {
                anyhow::bail!("{origin}: stage {}: worker {w} is not below jobs {j}", s.stage);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON forms are the stable interface of the README: pinned.
    #[test]
    fn statuses_keep_their_json_and_unknown_ones_are_refused() {
        for (s, j) in [(RunStatus::Ok, "\"ok\""), (RunStatus::Failed, "\"failed\""), (RunStatus::Interrupted, "\"interrupted\"")] {
            assert_eq!(serde_json::to_string(&s).unwrap(), j);
            assert_eq!(serde_json::from_str::<RunStatus>(j).unwrap(), s);
            assert_eq!(s.to_string(), s.as_str());
        }
        for s in [Status::Ran, Status::Cached, Status::Restored, Status::Failed, Status::Skipped] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        assert!(serde_json::from_str::<RunStatus>("\"OK\"").is_err());
        assert_eq!(format!("[{:<7}]", RunStatus::Ok), "[ok     ]");
        assert_eq!(RunStatus::of_exit_code(crate::error::exit::INTERRUPTED), RunStatus::Interrupted);
        assert_eq!(RunStatus::of_exit_code(crate::error::exit::FAILED), RunStatus::Failed);
    }

    #[test]
    fn a_record_file_that_does_not_parse_is_named_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(runs_dir(dir.path())).unwrap();
        let p = runs_dir(dir.path()).join("20990101-000000-000-abcd.json");
        let rec = r#"{"run_id":"20990101-000000-000-abcd","pipeline":"p.yaml","started_at":"2099-01-01T00:00:00.000Z","finished_at":"2099-01-01T00:00:01.000Z","seconds":0.0,"status":"weird","exit_code":0,"stages":[]}"#;
        std::fs::write(&p, rec).unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("20990101-000000-000-abcd.json") && e.contains("unknown variant `weird`"), "{e}");
        std::fs::write(&p, rec.replace("weird", "ok")).unwrap();
        assert_eq!(read(&p).unwrap().status, RunStatus::Ok);
        std::fs::write(&p, b"\xff{").unwrap();
        assert!(format!("{:#}", find(dir.path(), "last").unwrap_err()).contains("20990101-000000-000-abcd.json"));
        assert_eq!(list(dir.path()).unreadable.len(), 1);
    }

    /// An edited record must not reach a terminal with escape sequences in
    /// its names, or with absurd times; a command's coloured stderr in a
    /// stage's error is a value dagrun writes, and reads.
    #[test]
    fn a_record_with_values_dagrun_never_writes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("20990101-000000-000-abcd.json");
        let stage = r#"{"stage":"a","status":"failed","seconds":0.5,"error":"exit 3; stderr:\n\u001b[31mred\u001b[0m"}"#;
        let rec = |seconds: &str, stage: &str| {
            format!(
                r#"{{"run_id":"20990101-000000-000-abcd","pipeline":"p.yaml","started_at":"2099-01-01T00:00:00.000Z","finished_at":"2099-01-01T00:00:01.000Z","seconds":{seconds},"status":"failed","exit_code":1,"stages":[{stage}]}}"#
            )
        };
        std::fs::write(&p, rec("1.0", stage)).unwrap();
        assert!(read(&p).unwrap().stages[0].error.as_deref().unwrap().contains('\u{1b}'));
        for (seconds, st, why) in [
            ("-1e308", stage.to_string(), "seconds must be finite"),
            ("1.0", stage.replace(r#""stage":"a""#, r#""stage":"a\u001b]0;pwned\u0007""#), "a stage name holds a control character"),
            ("1.0", stage.replace("0.5", "-2"), "timing values must be finite"),
        ] {
            std::fs::write(&p, rec(seconds, &st)).unwrap();
            let e = format!("{:#}", read(&p).unwrap_err());
            assert!(e.contains("20990101-000000-000-abcd.json: not a run record dagrun wrote") && e.contains(why), "{e}");
        }
        // A report draws a row per scheduler slot: `jobs` and `worker` stay within `-j`'s bound
        // (review 13: `jobs: 300000` made a 152 MB page; `worker: 4294967295` overflowed).
        let timed = r#"{"stage":"a","status":"ran","seconds":0.5,"start_s":0.1,"end_s":0.6,"worker":W}"#;
        for (jobs, worker, why) in [
            (Some("300000"), "0", "jobs 300000 is not from 1 to 1024"),
            (Some("0"), "0", "jobs 0 is not from 1 to 1024"),
            (None, "4294967295", "worker 4294967295 is not below 1024"),
            (None, "1024", "worker 1024 is not below 1024"),
        ] {
            let mut text = rec("1.0", &timed.replace('W', worker));
            if let Some(j) = jobs {
                text = text.replace(r#""exit_code":1"#, &format!(r#""exit_code":1,"jobs":{j}"#));
            }
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", read(&p).unwrap_err());
            assert!(e.contains(why), "{e}");
        }
        std::fs::write(&p, rec("1.0", &timed.replace('W', "1023")).replace(r#""exit_code":1"#, r#""exit_code":1,"jobs":1024"#)).unwrap();
        assert_eq!(read(&p).unwrap().jobs, Some(1024));
        // Times are RFC 3339 (printed by `runs show`): never an escape sequence.
        for (field, why) in [("started_at", "started_at \"\\u{1b}]0;x\\u{7}\" is not an RFC 3339 time"), ("finished_at", "finished_at \"yesterday\" is not")] {
            let bad = if field == "started_at" { r#""started_at":"\u001b]0;x\u0007""# } else { r#""finished_at":"yesterday""# };
            let text = rec("1.0", stage);
            let start = text.find(&format!("\"{field}\"")).unwrap();
            let end = start + text[start..].find(',').unwrap();
            std::fs::write(&p, format!("{}{bad}{}", &text[..start], &text[end..])).unwrap();
            let e = format!("{:#}", read(&p).unwrap_err());
            assert!(e.contains(why), "{e}");
        }
        // A pipeline path may hold any character a file name holds (printed escaped).
        std::fs::write(&p, rec("1.0", stage).replace(r#""pipeline":"p.yaml""#, r#""pipeline":"p\u001b[2J.yaml""#)).unwrap();
        assert!(read(&p).unwrap().pipeline.contains('\u{1b}'));
        // A run id names a file in runs/ (`report` writes RUN_ID.html there): dagrun's shape only, and the file's name.
        for id in ["zz/../../.dagrun/keys/evil", "20990101-000000-000-abcd/x", "20990101-000000-000-ABCD"] {
            std::fs::write(&p, rec("1.0", stage).replace("20990101-000000-000-abcd", id)).unwrap();
            assert!(format!("{:#}", read(&p).unwrap_err()).contains("is not of the form YYYYMMDD-HHMMSS-mmm-xxxx"), "{id}");
        }
        std::fs::write(&p, rec("1.0", stage).replace("000-abcd", "000-abce")).unwrap();
        assert!(format!("{:#}", read(&p).unwrap_err()).contains("its run_id is not its file name"));
        assert!(is_run_id(&new_run_id()));
    }
}
