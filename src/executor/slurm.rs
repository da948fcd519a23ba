//! The Slurm executor: a stage's work (or a job group's chain) runs in a
//! Slurm job that executes the same binary, `dagrun exec-stage SPEC`, on the
//! shared filesystem. The coordinator (`dagrun run`) keeps deciding, hashing
//! and recording (see the engine); this module only submits, watches and
//! cancels jobs.
//!
//! # Rules
//! - **Submission**: `sbatch --parsable --job-name=dagrun-RUN_ID-sN
//!   --export=NONE --output=LOG --chdir=WORKSPACE` plus the stage's
//!   `resources:` (`--cpus-per-task`, `--mem`, `--time`, `--partition`,
//!   `--account`, `sbatch_args`) and `--no-requeue` (last, so it wins:
//!   retries are dagrun's; a job Slurm requeued itself after NODE_FAIL or
//!   preemption would run again behind the coordinator's back, racing the
//!   resubmitted one), then a batch script that exports the few
//!   variables a job needs (`PATH`, `LANG`, `LC_ALL`, `TZ`, and
//!   `DAGRUN_MASTER_KEY_FILE`: a *path*) and execs the binary. A failing
//!   `sbatch` whose message says the controller is busy or unreachable is
//!   retried with backoff (1, 2, 4 … 30 s, `slurm.submit_retries` times, as
//!   a submission whose job may exist: see below);
//!   any other refusal fails the stage with sbatch's message. `N` is the
//!   pipeline index of the job's first stage: stage and tenant names stay
//!   out of the job name, which every user of the cluster can read in
//!   `squeue`; the run record maps stages to job ids (`slurm_job`).
//! - **An `sbatch` whose job may exist unannounced** — killed because it did
//!   not answer within `slurm.submit_timeout` (default 120 s) or the run was
//!   interrupted, failed as an unreachable controller fails, or answered no
//!   job id — is followed by [`Slurm::settle`]: the spec is claimed, so such
//!   a job runs nothing; the jobs Slurm lists under that submission's name
//!   (unique: `…-sNrK` for the K-th submission again, `…aM` in the engine's
//!   retry M; this user's, in this workspace) are cancelled, and the work is
//!   submitted again with a new spec, up to `submit_retries` times. A claim
//!   already there means the job started first: the job whose id the claim
//!   holds (`exec-stage` writes its `SLURM_JOB_ID`) is watched as if sbatch
//!   had answered, any other of that name cancelled (asked again every poll
//!   interval while Slurm does not answer). A plain refusal is made sure of
//!   the same way (an error may come after the job was made). Where a job
//!   may run the work and cannot be watched (the claim failed, an interrupt
//!   while Slurm does not answer), every job of the name is cancelled and
//!   waited for; unconfirmed, the failure is one the engine does not retry
//!   (`MayStillRun`). So the work runs once.
//! - **No secret in a job's environment**: `--export=NONE` keeps the
//!   submitting environment out of the job (and out of slurmctld's state
//!   directory, which stores every job's environment and script). The job
//!   reads the master key from its file on the shared filesystem (mode 0600).
//!   A coordinator whose key is in `DAGRUN_MASTER_KEY` refuses to submit.
//!   Slurm gives an `--export=NONE` job the user's login environment, which
//!   could hold a `DAGRUN_MASTER_KEY` of its own: the batch script unsets
//!   every `DAGRUN_` variable before it exports its own.
//! - **Polling** is batched and rate-limited: at most one status call per
//!   `slurm.poll_interval` (default 1 s) for all jobs of the run, made by
//!   whichever waiting thread finds it due. The first poll of a run tries
//!   `sacct -n -P -X -j ID,ID,… -o JobID,State`: where accounting exists it
//!   is the source from then on (it keeps a job's final state after
//!   slurmctld purges the job, so a finished job is never lost); jobs it does
//!   not list yet (the database lags) are asked of `squeue` in the same poll.
//!   When `sacct` says accounting storage is disabled, or fails at the
//!   first poll (or 3 times in a row later), the run polls `squeue -h -t all -j
//!   ID,ID,… -o "%i %T"`; a job squeue no longer knows (purged after
//!   MinJobAge) is looked up with `scontrol -o show job ID`, then in the
//!   job-completion log (`sacct -c`). A job no source knows for
//!   `LOST_AFTER` (5) polls in a row is LOST.
//! - **Failure states** (FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY,
//!   NODE_FAIL, PREEMPTED, BOOT_FAIL, DEADLINE, and LOST) fail the member the
//!   job was working on with one message per state (`end_message`): the job
//!   id, the state, what to do, and the last 10 lines of the job's log. For a
//!   state Slurm imposed (anything but COMPLETED and FAILED) dagrun first
//!   waits up to 5 s for slurmstepd's note (`*** JOB … DUE TO
//!   …`, `oom-kill event`) to reach the log; the stage's own error, when the
//!   job reported one, follows the state. Members the job finished before (in
//!   its result file) are recorded. The engine resubmits per `retries:`.
//! - **Interrupts**: when the run is interrupted (SIGINT/SIGTERM/SIGHUP) every
//!   waiting thread `scancel`s its job and waits (up to 30 s) until Slurm
//!   reports it ended, so no job writes after dagrun exits.
//! - **SIGKILL of dagrun**: jobs keep running (Slurm does not know the
//!   coordinator died). Each submission is registered by its job name in
//!   `.dagrun/slurm/active/n-JOB_NAME` before `sbatch` runs, and each
//!   submitted job in `.dagrun/slurm/active/JOB_ID`, both until its end is
//!   seen (or no job of it can be left); the next `dagrun
//!   run` (under the workspace lock) first claims and removes earlier runs'
//!   specs (a job made late by a request still queued runs nothing), then
//!   cancels every job still registered,
//!   waits until they ended, and reruns their stages: orphans are
//!   **abandoned**, never re-attached ([`abandon_orphans`]).

use super::spec::{self, JobSpec, SpecStage};
use super::{Batch, Done, Executor, JobFailure, MayStillRun};
use crate::pipeline::{Pipeline, Resources};
use crate::stages::RunReport;
use crate::workspace::state::StateStore;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Slurm states in which a job is still queued or running.
const ACTIVE: &[&str] = &[
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
];
/// How long to wait for a cancelled job to end.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// After this many polls in which no Slurm command knows a job, it counts as lost.
const LOST_AFTER: u32 = 5;

/// `.dagrun/slurm`
pub fn slurm_dir(workspace: &Path) -> PathBuf {
    workspace.join(crate::workspace::DAGRUN_DIR).join("slurm")
}

fn active_dir(workspace: &Path) -> PathBuf {
    slurm_dir(workspace).join("active")
}

/// The environment a job gets: names and values that are never secret.
/// (`--export=NONE` keeps everything else out.)
pub fn job_environment() -> Vec<(String, String)> {
    let mut env = Vec::new();
    for k in ["PATH", "LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(k) {
            env.push((k.to_string(), v));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    env
}

/// The batch script's first line: unset every `DAGRUN_` variable the job's
/// (login) environment holds.
const UNSET_DAGRUN_VARS: &str = "for v in $(env | sed -n 's/^\\(DAGRUN_[A-Za-z0-9_]*\\)=.*/\\1/p'); do unset \"$v\"; done\n";

/// Where a job finds the master key: the coordinator's source, as a place
/// (a file path, or a PKCS#11 URI without its PIN), never the key. A key in
/// `DAGRUN_MASTER_KEY`, or a URI carrying its `pin-value`, is refused: it would
/// have to travel in the job's environment. With the default source the job
/// is pointed at the default file, so it never creates a master key of its own.
pub fn master_key_env(workspace: &Path) -> Result<Vec<(String, String)>> {
    use crate::crypto::master::{self, MasterKeySource};
    let refuse = |what: &str| {
        anyhow!(
            "{what}, but a Slurm job never receives a secret through its environment: put the master key in a file (mode 0600) on the shared filesystem and set {} to its path, or use a PKCS#11 URI with pin-source (or use `--executor local`)",
            master::ENV_MASTER_KEY_FILE
        )
    };
    let source = MasterKeySource::resolve(workspace)?;
    Ok(match &source {
        MasterKeySource::Env(_) => return Err(refuse(&format!("{} is set", master::ENV_MASTER_KEY))),
        MasterKeySource::File(p) => vec![(master::ENV_MASTER_KEY_FILE.into(), std::path::absolute(p)?.to_string_lossy().into_owned())],
        MasterKeySource::Default => {
            vec![(master::ENV_MASTER_KEY_FILE.into(), master::default_master_key_path(workspace).to_string_lossy().into_owned())]
        }
        MasterKeySource::Pkcs11 { uri, from } => {
            if uri.has_pin_value() {
                return Err(refuse(&format!("the master key's PKCS#11 URI (from {from}) carries its PIN (pin-value)")));
            }
            if from.as_str() == master::ENV_MASTER_KEY_URI {
                vec![(master::ENV_MASTER_KEY_URI.into(), uri.recorded())]
            } else {
                vec![] // config/dagrun.yaml or the keyring: the job resolves it the same way
            }
        }
    })
}

/// Quote for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Job names, labels and file names: `[A-Za-z0-9_.-]`, the rest as `_`.
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' }).collect()
}

/// Megabytes of a Slurm memory size (`4G`, `500M`, `1024`).
fn mem_mb(m: &str) -> Option<u64> {
    let (digits, unit) = match m.chars().last()? {
        c if c.is_ascii_digit() => (m, 'M'),
        c => (&m[..m.len() - 1], c),
    };
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'K' => n.div_ceil(1024),
        'M' => n,
        'G' => n * 1024,
        'T' => n * 1024 * 1024,
        _ => return None,
    })
}

/// Resources of a job running several members: the most CPUs and memory any
/// member asks for, the sum of their time limits, the first partition and
/// account named, every extra argument once.
pub fn combine(rs: &[&Resources]) -> Resources {
    let mut out = Resources::default();
    for r in rs {
        out.cpus = out.cpus.max(r.cpus);
        if let Some(m) = &r.mem
            && out.mem.as_deref().and_then(mem_mb) < mem_mb(m)
        {
            out.mem = Some(m.clone());
        }
        out.time = match (out.time, r.time) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        out.partition = out.partition.clone().or(r.partition.clone());
        out.account = out.account.clone().or(r.account.clone());
        for a in &r.sbatch_args {
            if !out.sbatch_args.contains(a) {
                out.sbatch_args.push(a.clone());
            }
        }
    }
    out
}

/// `sbatch` flags for resources.
pub fn resource_flags(r: &Resources) -> Vec<String> {
    let mut f = Vec::new();
    if let Some(c) = r.cpus {
        f.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &r.mem {
        f.push(format!("--mem={m}"));
    }
    if let Some(t) = r.time {
        f.push(format!("--time={t}"));
    }
    if let Some(p) = &r.partition {
        f.push(format!("--partition={p}"));
    }
    if let Some(a) = &r.account {
        f.push(format!("--account={a}"));
    }
    f.extend(r.sbatch_args.iter().cloned());
    f
}

/// Default of `slurm.submit_timeout`: how long one `sbatch` call may take.
const SUBMIT_TIMEOUT_DEFAULT: f64 = 120.0;

/// What one `sbatch` call came to.
enum Sbatch {
    /// Slurm's job id.
    Id(String),
    /// Refused (a bad partition, …): its message. No job should exist, but
    /// it is made sure of as for [`Sbatch::Unsure`] (an authentication error
    /// may come after the controller made the job).
    Refused(String),
    /// Killed before it answered (or by a signal), failed as an unreachable
    /// or busy controller fails (`transient`), or answered no job id: the
    /// job may exist all the same ([`Slurm::settle`]).
    Unsure { why: String, transient: bool },
}

/// What [`Slurm::settle`] found.
enum Settled {
    /// The job had started: its id, to watch.
    Adopted(String),
    /// No job of that submission runs the work: what became of the jobs
    /// Slurm listed under its name (`None`: it listed none), and whether
    /// none is left queued (else its name stays registered).
    NoJob { made: Option<String>, gone: bool },
}

/// An sbatch refusal worth retrying (controller busy, restarting or unreachable).
fn transient(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "unable to contact slurm controller",
        "socket timed out",
        "temporarily unavailable",
        "temporarily unable",
        "connection refused",
        "connection timed out",
        "transport endpoint",
        "try again",
        "slurmctld is busy",
        "communication connection failure",
        "zero bytes were transmitted",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// What the poller knows of one job.
#[derive(Debug, Clone)]
struct Seen {
    state: Option<String>,
    misses: u32,
}

struct Poll {
    last: Option<Instant>,
    jobs: HashMap<String, Seen>,
    warned: bool,
    source: Source,
}

/// The Slurm executor of one run.
pub struct Slurm {
    workspace: PathBuf,
    run_id: String,
    run_dir: PathBuf,
    binary: PathBuf,
    pipeline_file: PathBuf,
    overrides: Vec<(String, String)>,
    poll_interval: Duration,
    submit_retries: u32,
    /// How long one `sbatch` call may take (`slurm.submit_timeout`).
    submit_timeout: Duration,
    poll: Mutex<Poll>,
    /// Set when the run is interrupted (the engine's cancel flag is copied here by the waiter).
    cancel: AtomicBool,
    /// Its integrity key verifies the jobs' result files (`spec::read_result`).
    states: Arc<StateStore>,
    /// Where every job finds the master key ([`master_key_env`], resolved once).
    key_env: Vec<(String, String)>,
}

impl Slurm {
    pub fn new(p: &Pipeline, run_id: &str, states: Arc<StateStore>) -> Result<Slurm> {
        let binary = match &p.slurm.binary {
            Some(b) => PathBuf::from(b),
            None => std::env::current_exe().context("cannot find the path of this dagrun binary; set `slurm.binary` in the pipeline")?,
        };
        let run_dir = slurm_dir(&p.workspace).join(sanitize(run_id));
        // A master key no job could be given is a setting nothing can run
        // with: said once, exit 2, before any stage (review 69: every root
        // stage failed with it, exit 1, one error per tenant).
        let key_env = master_key_env(&p.workspace).map_err(|e| crate::error::config(format!("{e:#}")))?;
        Ok(Slurm {
            workspace: p.workspace.clone(),
            run_id: run_id.to_string(),
            run_dir,
            binary,
            pipeline_file: p.file.clone(),
            overrides: p.overrides.clone(),
            poll_interval: Duration::from_secs_f64(p.slurm.poll_interval.unwrap_or(1.0)),
            submit_retries: p.slurm.submit_retries.unwrap_or(5),
            submit_timeout: Duration::from_secs_f64(p.slurm.submit_timeout.unwrap_or(SUBMIT_TIMEOUT_DEFAULT)),
            poll: Mutex::new(Poll { last: None, jobs: HashMap::new(), warned: false, source: Source::default() }),
            cancel: AtomicBool::new(false),
            states,
            key_env,
        })
    }

    /// Tell the executor the run was interrupted.
    pub fn interrupt(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Write the spec and script of a batch; return (script, log, result) paths and the spec.
    fn prepare(&self, batch: &Batch, file_label: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
        std::fs::create_dir_all(&self.run_dir).with_context(|| format!("cannot create {}", self.run_dir.display()))?;
        // The run's specs, scripts, logs and results, and the folder of all
        // runs' (where a group member could otherwise swap a run's folder):
        // the owner's only.
        #[cfg(unix)]
        for dir in self.run_dir.parent().into_iter().chain([self.run_dir.as_path()]) {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("cannot make {} private", dir.display()))?;
        }
        let base = self.run_dir.join(format!("{file_label}.a{}", batch.attempt));
        let with_ext = |e: &str| PathBuf::from(format!("{}.{e}", base.display()));
        let (spec_path, script, log, result) = (with_ext("spec.json"), with_ext("sh"), with_ext("log"), with_ext("result.json"));
        for p in [&log, &result, &with_ext("claim")] {
            let _ = std::fs::remove_file(p);
        }
        let spec = JobSpec {
            format: spec::SPEC_FORMAT.into(),
            run_id: self.run_id.clone(),
            pipeline: self.pipeline_file.clone(),
            workspace: self.workspace.clone(),
            overrides: self.overrides.clone(),
            stages: batch.members.iter().map(|m| SpecStage { stage: m.stage.name.clone(), key: m.key.clone() }).collect(),
            result: result.clone(),
            mac: None,
        };
        let key = self.states.integrity_key().ok_or_else(|| anyhow!("no workspace integrity key to seal the job spec with"))?;
        spec::write_spec(&spec_path, &spec, key)?;
        let mut text = String::from("#!/bin/sh\n");
        text.push_str(&format!("# dagrun run {}: {}\n", self.run_id, batch.members.iter().map(|m| m.stage.name.as_str()).collect::<Vec<_>>().join(", ")));
        // With --export=NONE Slurm gives the job the user's login environment
        // (SLURM_GET_USER_ENV), which may hold a DAGRUN_MASTER_KEY (or any
        // DAGRUN_ setting) that would win over what the run decided: every
        // DAGRUN_ variable is removed before the script sets its own.
        text.push_str(UNSET_DAGRUN_VARS);
        for (k, v) in job_environment().into_iter().chain(self.key_env.iter().cloned()) {
            text.push_str(&format!("export {k}={}\n", sh_quote(&v)));
        }
        text.push_str(&format!("exec {} exec-stage {}\n", sh_quote(&self.binary.to_string_lossy()), sh_quote(&spec_path.to_string_lossy())));
        crate::util::atomic::write_atomic(&script, text.as_bytes())?;
        Ok((script, log, result))
    }

    /// One `sbatch` call for the job `job_name` running `script`. It is
    /// killed when it has not answered within `submit_timeout`, or as soon
    /// as `stop()` holds (the run is interrupted).
    fn sbatch(&self, job_name: &str, script: &Path, log: &Path, res: &Resources, stop: &dyn Fn() -> bool) -> Result<Sbatch> {
        let mut args: Vec<String> = vec![
            "--parsable".into(),
            format!("--job-name={job_name}"),
            "--export=NONE".into(),
            format!("--output={}", log.display()),
            format!("--chdir={}", self.workspace.display()),
        ];
        args.extend(resource_flags(res));
        // Retries are dagrun's: a job Slurm requeued itself (after NODE_FAIL or
        // preemption) would run again behind the coordinator's back.
        args.push("--no-requeue".into());
        args.push(script.display().to_string());
        // sbatch sees only what the job may see, plus its own SLURM_*/SBATCH_* settings.
        let own = std::env::vars().filter(|(k, _)| k.starts_with("SLURM_") || k.starts_with("SBATCH_"));
        let mut sbatch = Command::new("sbatch");
        sbatch.args(&args).env_clear().envs(job_environment()).envs(own);
        let out = match crate::util::child_env::output_within_unless(sbatch, b"", self.submit_timeout, stop) {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                return Ok(Sbatch::Unsure { why: "sbatch was stopped by the interrupt before it answered".into(), transient: false });
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                let why = format!("sbatch did not answer within {}s (`slurm.submit_timeout`)", self.submit_timeout.as_secs_f64());
                return Ok(Sbatch::Unsure { why, transient: false });
            }
            // sbatch ran, then its output or its end was lost: it may have made the job.
            Err(e) if crate::util::child_env::had_started(&e) => {
                return Ok(Sbatch::Unsure { why: format!("sbatch ran, but its answer was lost ({e})"), transient: false });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("`sbatch` is not on PATH: run dagrun on a Slurm submit host, or use `--executor local`")
            }
            Err(e) => bail!("cannot start sbatch: {e}"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() {
            // `--parsable`: `ID` or `ID;CLUSTER`, on the last line (a site's
            // job_submit plugin may print a notice before it).
            let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            let id = last.split(';').next().unwrap_or("").trim();
            if !spec::is_job_id(id) {
                let why = format!("sbatch succeeded but printed {:?} instead of a job id", spec::truncate(stdout.trim(), 200));
                return Ok(Sbatch::Unsure { why, transient: false });
            }
            return Ok(Sbatch::Id(id.to_string()));
        }
        if out.status.code().is_none() {
            // Killed (by the OOM killer, an administrator): not a refusal.
            let why = format!("sbatch was killed ({}) before it answered", out.status);
            return Ok(Sbatch::Unsure { why, transient: false });
        }
        if transient(&stderr) {
            // A controller that does not answer refused nothing (review 69),
            // and may have made the job all the same.
            return Ok(Sbatch::Unsure { why: format!("sbatch failed ({})", spec::truncate(&stderr, 2000)), transient: true });
        }
        Ok(Sbatch::Refused(format!("sbatch refused the job: {}", spec::truncate(&stderr, 2000))))
    }

    /// After an `sbatch` call that gave no job id (see [`Sbatch`]): make
    /// sure no job of it runs the work unwatched.
    /// - The spec is claimed, so such a job runs nothing (`exec-stage`
    ///   refuses a claimed spec), and the jobs Slurm lists by the
    ///   submission's name (unique to it) are cancelled: [`Settled::NoJob`],
    ///   submit again with a new spec.
    /// - If the claim exists, a job has started and claimed it first: the
    ///   job the claim names (`exec-stage` writes its `SLURM_JOB_ID` there)
    ///   is watched ([`Settled::Adopted`]), any other of that name (sbatch
    ///   repeating its request) cancelled. While Slurm does not answer, it
    ///   is asked again every poll interval ([`Slurm::find_started`]: a
    ///   job the listing misses is asked by its id, never taken for ended
    ///   on one empty answer). The same holds when a job sbatch did name
    ///   ends without having run the work: the job holding the claim (made
    ///   by the same request, sent twice) is watched next.
    /// - When a job may run the work and cannot be watched (the claim
    ///   failed, the run was interrupted while Slurm did not answer, two
    ///   jobs and a claim naming neither), every job of that name is
    ///   cancelled and waited for ([`Slurm::cancel_named`]); unless Slurm
    ///   confirms they ended, the error is [`MayStillRun`] (the engine does
    ///   not retry beside it). After any error the submission stays
    ///   registered by its name: the next run cancels what is left.
    fn settle(&self, job_name: &str, result: &Path, stop: &dyn Fn() -> bool) -> Result<Settled> {
        match spec::claim(result) {
            Ok(true) => {
                let _ = std::fs::remove_file(spec::spec_path(result));
                Ok(match named_jobs(job_name, &self.workspace) {
                    Ok(jobs) if jobs.is_empty() => Settled::NoJob { made: None, gone: true },
                    Ok(jobs) => {
                        let ids: Vec<String> = jobs.into_keys().collect();
                        match scancel(&ids) {
                            Ok(()) => Settled::NoJob { made: Some(format!("it had submitted job {}, cancelled now", ids.join(", "))), gone: true },
                            Err(e) => Settled::NoJob {
                                made: Some(format!(
                                    "it had submitted job {}, which runs nothing (its spec is claimed); cancelling it failed ({e:#}), the next run cancels it",
                                    ids.join(", ")
                                )),
                                gone: false,
                            },
                        }
                    }
                    Err(e) => Settled::NoJob {
                        made: Some(format!(
                            "whether it submitted job {job_name} is unknown ({e:#}); if it did, that job runs nothing (its spec is claimed) and the next run cancels it"
                        )),
                        gone: false,
                    },
                })
            }
            Ok(false) => self.find_started(job_name, result, stop).map(Settled::Adopted),
            Err(e) => {
                // Unclaimed, the spec can still be run by a job of this submission.
                let cancelled = self.cancel_named(job_name, None, Instant::now() + CANCEL_WAIT);
                Err(MayStillRun(format!(
                    "its spec could not be claimed ({e}): {}; a job made from it later (a request still queued in Slurm) could run it; the next run removes the spec and cancels any job left under {job_name}",
                    describe_cancel(&cancelled)
                ))
                .into())
            }
        }
    }

    /// The job of submission `job_name` that claimed the spec of `result`
    /// (see [`Slurm::settle`]): the one the claim names, among those Slurm
    /// lists under the name (the others run nothing: cancelled). A claimed
    /// job the listing misses (purged, or a stale answer) is asked by its
    /// id, and taken only as this submission's (its name and work folder):
    /// a claim file cannot make dagrun adopt another job. One that no
    /// source knows for [`LOST_AFTER`] answers in a row is lost: every job
    /// of the name is cancelled. A failed Slurm call counts for nothing:
    /// asked again every poll interval until an interrupt.
    fn find_started(&self, job_name: &str, result: &Path, stop: &dyn Fn() -> bool) -> Result<String> {
        let mut warned = false;
        let mut unknown = 0;
        // Every job of the name cancelled: the error to return.
        let give_up = |why: String, known: Option<&str>| -> anyhow::Error {
            self.cancel_all(job_name, &why, known, Instant::now() + CANCEL_WAIT).map_or_else(|e| e, |done| anyhow!(done))
        };
        loop {
            let claimed = spec::claimed_by(result);
            let e = match named_jobs_within(job_name, &self.workspace, SLURM_CALL_LIMIT, stop) {
                Ok(jobs) => {
                    let holder = match &claimed {
                        Some(c) => jobs.contains_key(c).then(|| c.clone()),
                        None if jobs.len() == 1 => jobs.keys().next().cloned(),
                        None => None,
                    };
                    if claimed.is_none() && jobs.len() != 1 {
                        let listed: Vec<&str> = jobs.keys().map(String::as_str).collect();
                        return Err(give_up(
                            format!(
                                "its spec's claim names no job, and Slurm lists {} under {job_name}; what they did is not used",
                                if listed.is_empty() { "none".to_string() } else { format!("jobs {}", listed.join(", ")) },
                            ),
                            None,
                        ));
                    }
                    // The others run nothing (the spec is claimed): sbatch repeated its request.
                    let others: Vec<String> = jobs.iter().filter(|(i, st)| Some(*i) != holder.as_ref() && !is_final(st)).map(|(i, _)| i.clone()).collect();
                    if !others.is_empty() {
                        match scancel(&others) {
                            Ok(()) => tracing::warn!("Slurm job {} of {job_name} runs nothing (its spec is claimed by another): cancelled", others.join(", ")),
                            Err(e) => tracing::warn!(
                                "Slurm job {} of {job_name} runs nothing (its spec is claimed by another) and could not be cancelled ({e:#})",
                                others.join(", ")
                            ),
                        }
                    }
                    if let Some(id) = holder {
                        return Ok(id);
                    }
                    // The claim's job is not listed: purged, or a stale answer. Asked by its id.
                    let c = claimed.clone().unwrap_or_default();
                    match self.job_by_id(&c, job_name, SLURM_CALL_LIMIT, stop) {
                        Ok(Some(_)) => return Ok(c),
                        Ok(None) => {
                            unknown += 1;
                            if unknown >= LOST_AFTER {
                                return Err(give_up(
                                    format!("the job its spec's claim names ({c}) is not known to Slurm as a job of {job_name}; what it did is not used"),
                                    Some(&c),
                                ));
                            }
                            anyhow!("Slurm does not list job {c}, which claimed the spec, under {job_name}")
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if stop() {
                return Err(give_up(format!("interrupted while asking Slurm which job of {job_name} runs the work ({e:#})"), claimed.as_deref()));
            }
            if !warned {
                tracing::warn!(
                    "its job {job_name} has started (it claimed its spec), but Slurm does not confirm which job it is ({e:#}); asking again every {:.1}s",
                    self.poll_interval.as_secs_f64()
                );
                warned = true;
            }
            nap(self.poll_interval, stop);
        }
    }

    /// After `why`, cancel every job of the submission `job_name`
    /// ([`Slurm::cancel_named`], by `until`): once Slurm confirms they
    /// ended, the name registration is removed and the message returned;
    /// else a [`MayStillRun`] error (the name stays registered).
    fn cancel_all(&self, job_name: &str, why: &str, known: Option<&str>, until: Instant) -> Result<String> {
        let cancelled = self.cancel_named(job_name, known, until);
        let why = format!("{why}: {}", describe_cancel(&cancelled));
        match cancelled {
            Ok(()) => {
                unregister_name(&self.workspace, job_name);
                Ok(why)
            }
            Err(_) => Err(MayStillRun(format!("{why}; it stays registered by its name, and the next run cancels it")).into()),
        }
    }

    /// Cancel every job of this user named `job_name` (`scancel --name`:
    /// also those Slurm could not list) and wait until Slurm reports them
    /// ended, by `until` (every Slurm call fits into what is left). `Ok`
    /// only when confirmed: two listings in a row (one empty answer may be
    /// stale) in which every job of the name has ended, and in which `known`
    /// (the job the claim names), asked by its id when not listed, is not a
    /// job of this submission still active.
    fn cancel_named(&self, job_name: &str, known: Option<&str>, until: Instant) -> Result<()> {
        // Past `until` (an interrupted run's wait used it up), one short try.
        let budget = || until.saturating_duration_since(Instant::now()).clamp(Duration::from_secs(2), SLURM_CALL_LIMIT);
        scancel_within(&["--user", &uid(), "--name", job_name], budget())?;
        let mut ended_once = false;
        loop {
            let seen = named_jobs_within(job_name, &self.workspace, budget(), &|| false).and_then(|jobs| {
                let running: Vec<String> = jobs.iter().filter(|(_, st)| !is_final(st)).map(|(id, _)| id.clone()).collect();
                if !running.is_empty() {
                    bail!("Slurm job {} has not ended", running.join(", "));
                }
                match known.filter(|k| !jobs.contains_key(*k)) {
                    Some(k) if self.job_by_id(k, job_name, budget(), &|| false)?.is_some_and(|st| !is_final(&st)) => {
                        bail!("Slurm job {k} has not ended")
                    }
                    _ => Ok(()),
                }
            });
            match seen {
                Ok(()) if ended_once => return Ok(()),
                Ok(()) => ended_once = true,
                Err(_) => ended_once = false,
            }
            if Instant::now() + Duration::from_millis(300) >= until {
                return Err(seen.err().unwrap_or_else(|| anyhow!("Slurm answered once")).context(format!("not confirmed within {}s", CANCEL_WAIT.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The state of job `id` if it is this submission's (named `job_name`,
    /// working in this workspace), asked by its id: `squeue`, then `sacct`
    /// (which keeps it after slurmctld purged it). `None` when neither
    /// knows it as this submission's; an error when `squeue` failed.
    fn job_by_id(&self, id: &str, job_name: &str, limit: Duration, stop: &dyn Fn() -> bool) -> Result<Option<String>> {
        let out = squeue_within(&["-h", "-t", "all", "-j", id, "-o", "%i|%T|%j|%Z"], limit, stop)?;
        if let Some(st) = parse_named(&out, job_name, &self.workspace).remove(id) {
            return Ok(Some(st));
        }
        let mut c = crate::util::child_env::tool("sacct");
        c.args(["-n", "-P", "-X", "-j", id, "-o", "JobID,State,JobName,WorkDir"]);
        let Ok(out) = crate::util::child_env::output_within_unless(c, b"", limit, stop) else { return Ok(None) };
        let text = String::from_utf8_lossy(&out.stdout);
        // `CANCELLED by 0`: the first word is the state.
        Ok(parse_named(&text, job_name, &self.workspace).remove(id).and_then(|st| st.split_whitespace().next().map(str::to_string)))
    }

    /// Refresh every registered job's state with one `sacct` or `squeue` call, at most once per poll interval.
    fn refresh(&self) {
        let mut poll = self.poll.lock().unwrap_or_else(|e| e.into_inner());
        if poll.last.is_some_and(|t| t.elapsed() < self.poll_interval) {
            return;
        }
        poll.last = Some(Instant::now());
        let ids: Vec<String> = poll.jobs.iter().filter(|(_, s)| !s.state.as_deref().is_some_and(is_final)).map(|(id, _)| id.clone()).collect();
        if ids.is_empty() {
            return;
        }
        let mut source = poll.source;
        let states = job_states(&ids, &mut source);
        poll.source = source;
        match states {
            Ok(found) => {
                for id in &ids {
                    let seen = poll.jobs.get_mut(id).expect("registered");
                    match found.get(id) {
                        Some(st) => {
                            seen.state = Some(st.clone());
                            seen.misses = 0;
                        }
                        None => seen.misses += 1,
                    }
                }
                poll.warned = false;
            }
            Err(e) => {
                if !poll.warned {
                    tracing::warn!("cannot read job states from Slurm ({e:#}); retrying every {:.1}s", self.poll_interval.as_secs_f64());
                    poll.warned = true;
                }
            }
        }
    }

    fn seen(&self, id: &str) -> Seen {
        self.poll.lock().unwrap_or_else(|e| e.into_inner()).jobs.get(id).cloned().unwrap_or(Seen { state: None, misses: 0 })
    }

    /// Wait until job `id` ends; its final state, and when the run's
    /// interrupt was seen (the job was then cancelled).
    fn wait(&self, id: &str, cancel: &AtomicBool) -> (String, Option<Instant>) {
        let step = (self.poll_interval / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        let mut cancelled_at: Option<Instant> = None;
        loop {
            if cancelled_at.is_none() && (cancel.load(Ordering::Relaxed) || self.cancelled()) {
                // The 30 s count from the interrupt, `scancel` included.
                cancelled_at = Some(Instant::now());
                self.interrupt();
                tracing::info!("cancelling Slurm job {id}");
                if let Err(e) = scancel(&[id.to_string()]) {
                    tracing::error!("cannot cancel Slurm job {id}: {e:#}");
                }
            }
            if cancelled_at.is_some_and(|t| t.elapsed() > CANCEL_WAIT) {
                return ("CANCELLED (not confirmed by Slurm)".into(), cancelled_at);
            }
            self.refresh();
            let s = self.seen(id);
            if let Some(st) = s.state.as_deref().filter(|s| is_final(s)) {
                return (st.to_string(), cancelled_at);
            }
            if s.misses >= LOST_AFTER {
                return ("LOST".into(), cancelled_at);
            }
            if cancelled_at.is_some_and(|t| t.elapsed() > CANCEL_WAIT) {
                return ("CANCELLED (not confirmed by Slurm)".into(), cancelled_at);
            }
            std::thread::sleep(step);
        }
    }
}

/// A state in which a job will not change any more.
fn is_final(state: &str) -> bool {
    !ACTIVE.contains(&state)
}

/// Where job states come from. Detected at the first poll of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Source {
    /// Not tried yet: try `sacct` first.
    #[default]
    Unknown,
    /// The accounting database answers (`sacct` works): it keeps a job's
    /// final state after slurmctld has purged the job.
    Sacct,
    /// No accounting (`sacct` says "accounting storage is disabled", or kept
    /// failing): `squeue`, then `scontrol`, then the job-completion log.
    Squeue,
}

/// After this many `sacct` failures in a row (accounting configured but its
/// database unreachable), polling stays with `squeue` for the run.
const SACCT_GIVE_UP: u32 = 3;

static SACCT_FAILURES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// States of `ids` with one call: `sacct` where accounting exists, else
/// `squeue` (jobs squeue does not know are looked up with `scontrol`, then in
/// the job-completion log). Jobs `sacct` does not list yet (the database lags
/// behind slurmctld) are asked of `squeue` in the same poll.
fn job_states(ids: &[String], source: &mut Source) -> Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    if *source != Source::Squeue {
        match sacct_states(ids) {
            Ok(f) => {
                if *source == Source::Unknown {
                    tracing::debug!("job states from sacct (Slurm accounting is available)");
                }
                *source = Source::Sacct;
                SACCT_FAILURES.store(0, Ordering::Relaxed);
                found = f;
            }
            Err(SacctError::Disabled(msg)) => {
                tracing::debug!("job states from squeue: {msg}");
                *source = Source::Squeue;
            }
            Err(SacctError::Failed(msg)) => {
                let n = SACCT_FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= SACCT_GIVE_UP || *source == Source::Unknown {
                    tracing::warn!("sacct failed ({msg}); polling job states with squeue instead");
                    *source = Source::Squeue;
                }
            }
        }
        if found.len() == ids.len() {
            return Ok(found);
        }
    }
    let missing: Vec<String> = ids.iter().filter(|id| !found.contains_key(*id)).cloned().collect();
    found.extend(squeue_states(&missing)?);
    Ok(found)
}

enum SacctError {
    /// No accounting on this cluster.
    Disabled(String),
    /// Accounting configured but the call failed.
    Failed(String),
}

/// `sacct -n -P -X -j ID,ID,… -o JobID,State`: one line per job allocation.
fn sacct_states(ids: &[String]) -> std::result::Result<BTreeMap<String, String>, SacctError> {
    let mut c = crate::util::child_env::tool("sacct");
    c.args(["-n", "-P", "-X", "-j", &ids.join(","), "-o", "JobID,State"]);
    let out = crate::util::child_env::output_within(c, b"", SLURM_CALL_LIMIT).map_err(|e| {
        // Once it ran (a timeout, output lost or too long) accounting exists but failed.
        if crate::util::child_env::had_started(&e) { SacctError::Failed(format!("sacct: {e}")) } else { SacctError::Disabled(format!("cannot run sacct: {e}")) }
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let msg = format!("{} {}", stderr.trim(), stdout.trim());
        let msg = spec::truncate(msg.trim(), 300);
        return Err(if sacct_disabled(&msg) { SacctError::Disabled(format!("sacct: {msg}")) } else { SacctError::Failed(msg) });
    }
    Ok(parse_sacct(&stdout, ids))
}

/// `sacct`'s refusal when the cluster keeps no accounting database.
fn sacct_disabled(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("accounting storage is disabled") || m.contains("accounting_storage/none")
}

/// Lines `ID|STATE` (`sacct -P -o JobID,State`); a state may carry words
/// (`CANCELLED by 0`): the first is kept. Only `ids` are returned; the last
/// line of a job wins (a requeued job has one line per run).
fn parse_sacct(out: &str, ids: &[String]) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for line in out.lines() {
        let Some((id, st)) = line.split_once('|') else { continue };
        let (id, st) = (id.trim(), st.split_whitespace().next().unwrap_or(""));
        if !st.is_empty() && ids.iter().any(|x| x == id) {
            found.insert(id.to_string(), st.to_string());
        }
    }
    found
}

/// Lines `ID STATE` (`squeue -h -o "%i %T"`); only `ids` are returned.
fn parse_squeue(out: &str, ids: &[String]) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for line in out.lines() {
        let mut it = line.split_whitespace();
        if let (Some(id), Some(st)) = (it.next(), it.next()) {
            // Array/het jobs print `ID_N`; ours are plain ids.
            if ids.iter().any(|x| x == id) {
                found.insert(id.to_string(), st.to_string());
            }
        }
    }
    found
}

/// `JobState=…` of `scontrol -o show job ID`.
fn parse_scontrol(out: &str) -> Option<String> {
    out.split_whitespace().find_map(|w| w.strip_prefix("JobState=")).filter(|s| !s.is_empty()).map(str::to_string)
}

/// States of `ids` without accounting: one `squeue` call; jobs it does not
/// know are looked up with `scontrol`, then in the job-completion log.
fn squeue_states(ids: &[String]) -> Result<BTreeMap<String, String>> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut found = parse_squeue(&squeue(&["-h", "-t", "all", "-j", &ids.join(","), "-o", "%i %T"])?, ids);
    let missing: Vec<&String> = ids.iter().filter(|id| !found.contains_key(*id)).collect();
    for id in missing {
        if let Some(st) = scontrol_state(id).or_else(|| jobcomp_state(id)) {
            found.insert(id.clone(), st);
        }
    }
    Ok(found)
}

fn scontrol_state(id: &str) -> Option<String> {
    let mut c = crate::util::child_env::tool("scontrol");
    c.args(["-o", "show", "job", id]);
    let out = crate::util::child_env::output_within(c, b"", SLURM_CALL_LIMIT).ok()?;
    if !out.status.success() {
        return None;
    }
    parse_scontrol(&String::from_utf8_lossy(&out.stdout))
}

/// The final state from the job-completion log (`jobcomp/filetxt`), read by `sacct -c`.
fn jobcomp_state(id: &str) -> Option<String> {
    let mut c = crate::util::child_env::tool("sacct");
    c.args(["-c", "-j", id, "-n", "-P", "-o", "jobid,state"]);
    let out = crate::util::child_env::output_within(c, b"", SLURM_CALL_LIMIT).ok()?;
    if !out.status.success() {
        return None;
    }
    parse_sacct(&String::from_utf8_lossy(&out.stdout), &[id.to_string()]).remove(id)
}

/// Why a job that ended before finishing member `stage` failed it: names the
/// job, its state, what to do, and the end of its log (`log_tail`).
fn end_message(id: &str, state: &str, stage: &str, time_limit: Option<u32>, log_tail: &str) -> String {
    match state {
        "COMPLETED" => format!("Slurm job {id} ended COMPLETED but reported no result for {stage}; {log_tail}"),
        "FAILED" => format!("Slurm job {id} ended FAILED before {stage} reported a result (the job script or `dagrun exec-stage` failed); {log_tail}"),
        "TIMEOUT" => format!(
            "Slurm job {id} ended TIMEOUT: it ran past its time limit ({}; raise `resources.time`); {log_tail}",
            time_limit.map(|t| format!("{t} min")).unwrap_or_else(|| "the partition's default".into()),
        ),
        "OUT_OF_MEMORY" => format!("Slurm job {id} ended OUT_OF_MEMORY: it used more memory than it asked for (raise `resources.mem`); {log_tail}"),
        "CANCELLED" => format!("Slurm job {id} was CANCELLED (not by dagrun: scancel or an administrator); {log_tail}"),
        "NODE_FAIL" => format!("Slurm job {id} ended NODE_FAIL: its node failed or was set down while it ran (`retries:` resubmits it); {log_tail}"),
        "PREEMPTED" => format!("Slurm job {id} ended PREEMPTED: a higher-priority job took its resources (`retries:` resubmits it); {log_tail}"),
        "BOOT_FAIL" => format!("Slurm job {id} ended BOOT_FAIL: its node could not be booted (`retries:` resubmits it); {log_tail}"),
        "DEADLINE" => format!("Slurm job {id} ended DEADLINE: it could not finish before its --deadline; {log_tail}"),
        "LOST" => format!("Slurm job {id} is LOST: no longer known to Slurm (sacct, squeue, scontrol and the job-completion log do not list it); {log_tail}"),
        st => format!("Slurm job {id} ended {st}; {log_tail}"),
    }
}

/// Longest a Slurm query or `scancel` may take (Slurm's own default
/// `MessageTimeout` is 10 s): a controller that does not answer makes the
/// clients retry for much longer, which held an interrupted run for a
/// minute past its 30 s (review 69). One that takes longer is killed and
/// counts as a failed call.
const SLURM_CALL_LIMIT: Duration = Duration::from_secs(10);

/// `scancel` jobs (one call).
pub fn scancel(ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    scancel_within(&ids.iter().map(String::as_str).collect::<Vec<_>>(), SLURM_CALL_LIMIT)
}

/// `scancel ARGS` (job ids, or filters such as `--name`), killed after `limit`.
fn scancel_within(args: &[&str], limit: Duration) -> Result<()> {
    let mut c = crate::util::child_env::tool("scancel");
    c.args(args);
    let out = crate::util::child_env::output_within(c, b"", limit).context("cannot run scancel")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Already finished jobs are not an error.
    if !out.status.success() && !stderr.contains("already completing or completed") && !stderr.contains("Invalid job id") {
        bail!("scancel failed: {}", spec::truncate(stderr.trim(), 300));
    }
    Ok(())
}

/// One line of `.dagrun/slurm/active/JOB_ID`.
#[derive(serde::Serialize, serde::Deserialize)]
struct ActiveJob {
    job_id: String,
    run_id: String,
    label: String,
}

fn register(workspace: &Path, id: &str, run_id: &str, label: &str) -> Result<()> {
    let a = ActiveJob { job_id: id.into(), run_id: run_id.into(), label: label.into() };
    crate::util::atomic::write_json_atomic(&active_dir(workspace).join(id), &a)
}

fn unregister(workspace: &Path, id: &str) {
    let _ = std::fs::remove_file(active_dir(workspace).join(id));
}

/// How [`Slurm::cancel_named`] went, for a message.
fn describe_cancel(r: &Result<()>) -> String {
    match r {
        Ok(()) => "every job of it was cancelled, and Slurm reports them ended".into(),
        Err(e) => format!("cancelling its jobs by name could not be confirmed ({e:#})"),
    }
}

/// This process's user id, as Slurm's `--user` takes it.
fn uid() -> String {
    // SAFETY: getuid cannot fail and has no preconditions.
    unsafe { libc::getuid() }.to_string()
}

/// Sleep `d`, or less once `stop()` holds (checked every 50 ms).
fn nap(d: Duration, stop: &dyn Fn() -> bool) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stop() {
        std::thread::sleep(Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())));
    }
}

/// `.dagrun/slurm/active/n-JOB_NAME`: a submission, by its job name:
/// written before `sbatch`, removed once its job has ended or no job of it
/// can be left (sbatch may make a job it does not name, or two for one
/// request); the next run cancels the jobs Slurm lists under that name
/// ([`cancel_orphans`]).
fn register_name(workspace: &Path, job_name: &str, run_id: &str, label: &str) -> Result<()> {
    std::fs::create_dir_all(active_dir(workspace)).with_context(|| format!("cannot create {}", active_dir(workspace).display()))?;
    let a = ActiveJob { job_id: String::new(), run_id: run_id.into(), label: label.into() };
    crate::util::atomic::write_json_atomic(&active_dir(workspace).join(format!("n-{job_name}")), &a)
}

fn unregister_name(workspace: &Path, job_name: &str) {
    let _ = std::fs::remove_file(active_dir(workspace).join(format!("n-{job_name}")));
}

/// Cancel the jobs of earlier runs that were killed before they saw their
/// jobs end (SIGKILL, power cut), and wait until Slurm reports them ended.
/// Called by `dagrun run` under the workspace lock, before anything runs.
/// Returns the job ids abandoned.
pub fn abandon_orphans(workspace: &Path) -> Result<Vec<String>> {
    // Specs first: a request still queued in slurmctld can make a job after
    // squeue answered; with its spec claimed and gone, it runs nothing.
    forget_specs(workspace);
    cancel_orphans(workspace)
}

/// Remove the job specs of earlier runs (their jobs have ended, or were just
/// cancelled): a spec runs once, in the job its run submitted, and one left
/// on disk could be run again by hand (`exec-stage`), bringing back outputs
/// its run deleted (review 14). Run folders are looked at without following
/// links; a link is removed, never followed.
fn forget_specs(workspace: &Path) {
    let Ok(rd) = std::fs::read_dir(slurm_dir(workspace)) else { return };
    for run in rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "active") {
        let Ok(files) = std::fs::read_dir(run.path()) else { continue };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(base) = name.strip_suffix(".spec.json")
                && f.file_type().is_ok_and(|t| !t.is_dir())
            {
                // Claimed first: a copy of the spec put back later runs nothing.
                let _ = spec::claim(&run.path().join(format!("{base}.result.json")));
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

fn cancel_orphans(workspace: &Path) -> Result<Vec<String>> {
    let dir = active_dir(workspace);
    let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(vec![]) };
    let mut ids = Vec::new();
    let mut runs = Vec::new();
    // Submissions registered by their job name: (name, run id).
    let mut by_name: Vec<(String, String)> = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if crate::util::atomic::is_temp_name(&name) {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        // dagrun writes regular files here: a link is removed (never
        // followed, its target never touched), anything else left alone.
        match e.file_type() {
            Ok(t) if t.is_symlink() => {
                tracing::warn!("ignoring {} (a link, not a job registration dagrun wrote); removed, nothing cancelled", e.path().display());
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            Ok(t) if t.is_file() => {}
            _ => {
                tracing::warn!("ignoring {} (not a job registration)", e.path().display());
                continue;
            }
        }
        if let Some(job_name) = name.strip_prefix("n-") {
            let reg = crate::util::read_at_most(&e.path(), 64 * 1024).ok().and_then(|b| serde_json::from_slice::<ActiveJob>(&b).ok());
            match reg.filter(|a| a.job_id.is_empty() && job_name.starts_with(&format!("dagrun-{}-", sanitize(&a.run_id))) && job_name.len() <= 200) {
                Some(a) => by_name.push((job_name.to_string(), a.run_id)),
                None => {
                    tracing::warn!("ignoring {} (not a job registration dagrun wrote); removed, nothing cancelled", e.path().display());
                    let _ = std::fs::remove_file(e.path());
                }
            }
            continue;
        }
        if !spec::is_job_id(&name) {
            tracing::warn!("ignoring {} (not a job registration)", e.path().display());
            continue;
        }
        let reg = crate::util::read_at_most(&e.path(), 64 * 1024).ok().and_then(|b| serde_json::from_slice::<ActiveJob>(&b).ok());
        let Some(a) = reg.filter(|a| a.job_id == name) else {
            tracing::warn!("ignoring {} (not a job registration dagrun wrote); removed, nothing cancelled", e.path().display());
            unregister(workspace, &name);
            continue;
        };
        ids.push((name, a.run_id));
    }
    // Nothing may start while those jobs may still write: a Slurm that does
    // not answer is a temporary failure (exit 75, EX_TEMPFAIL: try again).
    let unreachable = |e: anyhow::Error, what: &str| -> anyhow::Error {
        crate::error::Failure::Locked(format!(
            "{what} of an earlier run, which may still be writing this workspace: {e:#}. Nothing ran; try again when Slurm answers (is slurmctld up?)"
        ))
        .into()
    };
    // A submission whose job id was never known: the jobs Slurm lists under
    // its name (this user's, working in this workspace) join the others.
    for (job_name, run_id) in &by_name {
        let found = named_jobs(job_name, workspace).map_err(|e| unreachable(e, "cannot ask Slurm about the jobs"))?;
        for id in found.into_keys() {
            if !ids.iter().any(|(i, _)| *i == id) {
                ids.push((id, run_id.clone()));
            }
        }
    }
    if ids.is_empty() {
        for (job_name, _) in &by_name {
            unregister_name(workspace, job_name);
        }
        return Ok(vec![]);
    }
    // Only jobs dagrun submitted for that run from this workspace: a file in
    // active/ must not be able to cancel anyone's other jobs.
    let listed: Vec<String> = ids.iter().map(|(id, _)| id.clone()).collect();
    let live = live_jobs(&listed).map_err(|e| unreachable(e, "cannot ask Slurm about the jobs"))?;
    let here = workspace.canonicalize().unwrap_or_else(|_| workspace.to_path_buf());
    let mut ours = Vec::new();
    for (id, run_id) in ids {
        match live.get(&id) {
            None => unregister(workspace, &id), // ended: nothing to cancel
            Some((name, dir))
                if name.starts_with(&format!("dagrun-{}-", sanitize(&run_id))) && Path::new(dir).canonicalize().ok().as_deref() == Some(here.as_path()) =>
            {
                if !runs.contains(&run_id) {
                    runs.push(run_id);
                }
                ours.push(id);
            }
            Some(_) => {
                tracing::warn!(
                    "Slurm job {id} is registered in {} but is not a job dagrun submitted for run {} from this workspace; not cancelled (registration removed)",
                    dir.display(),
                    spec::truncate(&run_id, 80)
                );
                unregister(workspace, &id);
            }
        }
    }
    let mut ids = ours;
    if ids.is_empty() {
        for (job_name, _) in &by_name {
            unregister_name(workspace, job_name);
        }
        return Ok(ids);
    }
    ids.sort();
    tracing::warn!(
        "Slurm jobs {} of an earlier run ({}) are still there (it was killed, or could not cancel them): cancelling them; their stages run again",
        ids.join(", "),
        if runs.is_empty() { "unknown".to_string() } else { runs.join(", ") }
    );
    scancel(&ids).map_err(|e| unreachable(e, "cannot cancel the jobs"))?;
    let t0 = Instant::now();
    let mut left = ids.clone();
    let mut source = Source::default();
    while !left.is_empty() {
        let states = job_states(&left, &mut source).unwrap_or_default();
        left.retain(|id| states.get(id).is_some_and(|s| !is_final(s)));
        if left.is_empty() {
            break;
        }
        if t0.elapsed() > CANCEL_WAIT * 2 {
            bail!(
                "Slurm jobs {} of an earlier run did not end within {}s after scancel; wait for them (squeue -j {}) and run again",
                left.join(", "),
                (CANCEL_WAIT * 2).as_secs(),
                left.join(",")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for id in &ids {
        unregister(workspace, id);
    }
    for (job_name, _) in &by_name {
        unregister_name(workspace, job_name);
    }
    Ok(ids)
}

/// The jobs named `name` (`dagrun-RUN_ID-…`, unique to one submission)
/// that Slurm lists (any state) as this user's, with `workspace` as their
/// work folder (another user's job of that name is never taken for ours):
/// id → state.
fn named_jobs(name: &str, workspace: &Path) -> Result<BTreeMap<String, String>> {
    named_jobs_within(name, workspace, SLURM_CALL_LIMIT, &|| false)
}

/// [`named_jobs`] with the `squeue` call killed after `limit` or as soon as `stop()` holds.
fn named_jobs_within(name: &str, workspace: &Path, limit: Duration, stop: &dyn Fn() -> bool) -> Result<BTreeMap<String, String>> {
    let out = squeue_within(&["-h", "-t", "all", "--user", &uid(), "--name", name, "-o", "%i|%T|%j|%Z"], limit, stop)?;
    Ok(parse_named(&out, name, workspace))
}

/// `squeue -o "%i|%T|%j|%Z"` lines of jobs named `name` working in
/// `workspace`: id → state. The name is dagrun's (no `|` in it), so the
/// work folder is everything after the third `|` (a folder name may hold one).
fn parse_named(out: &str, name: &str, workspace: &Path) -> BTreeMap<String, String> {
    let here = workspace.canonicalize().unwrap_or_else(|_| workspace.to_path_buf());
    out.lines()
        .filter_map(|l| {
            let (id, rest) = job_line(l)?;
            let (state, rest) = rest.split_once('|')?;
            let dir = rest.strip_prefix(name)?.strip_prefix('|')?;
            (Path::new(dir).canonicalize().ok().as_deref() == Some(here.as_path())).then(|| (id.to_string(), state.to_string()))
        })
        .collect()
}

/// A squeue line printed with `-o "%i|…"`: the job id (checked: one of
/// dagrun's plain ids) and the rest of the line.
fn job_line(l: &str) -> Option<(&str, &str)> {
    let (id, rest) = l.trim_start().split_once('|')?;
    spec::is_job_id(id).then_some((id, rest.strip_suffix('\r').unwrap_or(rest)))
}

/// The jobs among `ids` Slurm still has queued or running: id → (job name, work dir).
fn live_jobs(ids: &[String]) -> Result<BTreeMap<String, (String, String)>> {
    Ok(parse_live(&squeue(&["-h", "-j", &ids.join(","), "-o", "%i|%j|%Z"])?, ids))
}

/// `squeue ARGS`' output; "Invalid job id" (every job asked for is gone) is
/// an empty answer, any other failure an error.
fn squeue(args: &[&str]) -> Result<String> {
    squeue_within(args, SLURM_CALL_LIMIT, &|| false)
}

/// [`squeue`], killed after `limit` or as soon as `stop()` holds.
fn squeue_within(args: &[&str], limit: Duration, stop: &dyn Fn() -> bool) -> Result<String> {
    let mut c = crate::util::child_env::tool("squeue");
    c.args(args);
    let out = crate::util::child_env::output_within_unless(c, b"", limit, stop).context("cannot run squeue")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains("Invalid job id") {
        bail!("squeue failed: {}", spec::truncate(stderr.trim(), 300));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `squeue -o "%i|%j|%Z"` lines for the asked `ids`. dagrun's job names
/// hold no `|`, so the work folder is everything after the second `|` (a
/// folder name may hold one); a job whose own name holds one is read with a
/// wrong name and folder, and so is never taken for one of dagrun's.
fn parse_live(text: &str, ids: &[String]) -> BTreeMap<String, (String, String)> {
    text.lines()
        .filter_map(|l| {
            let (id, rest) = job_line(l)?;
            let (name, dir) = rest.split_once('|')?;
            ids.iter().any(|i| i == id).then(|| (id.to_string(), (name.to_string(), dir.to_string())))
        })
        .collect()
}

/// Delete the job files of all but the `keep` most recent runs.
pub fn prune_runs(workspace: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(slurm_dir(workspace)) else { return };
    let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "active")).collect();
    dirs.sort();
    let n = dirs.len().saturating_sub(keep);
    for d in &dirs[..n] {
        let _ = std::fs::remove_dir_all(d);
    }
}

impl Executor for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn execute(&self, batch: &Batch) -> Vec<(usize, Result<Done>)> {
        let first = batch.members[0].index;
        let fail = |e: anyhow::Error| vec![(first, Err(e))];
        if self.cancelled() {
            return fail(anyhow!("interrupted before the job was submitted"));
        }
        let label = batch.label();
        // No stage or tenant name in the job's name or its files' names
        // (`--output`, the script's path): every user of the cluster can read
        // them in squeue and `scontrol show job` (review 13).
        let res = combine(&batch.members.iter().map(|m| &m.stage.resources).collect::<Vec<_>>());
        let t0 = Instant::now();
        // A submission whose job may exist unannounced (sbatch did not answer,
        // failed as an unreachable controller fails, or printed no job id) is
        // made again with a new spec and job name (`rN`) once `settle` made
        // sure no job of it runs the work unwatched.
        let stop = || self.cancelled() || batch_cancel(batch).is_some_and(|c| c.load(Ordering::Relaxed));
        let mut again = 0;
        let tried = |again: u32| if again > 0 { format!(" (after {} attempts)", again + 1) } else { String::new() };
        let mut delay = Duration::from_secs(1);
        let (mut id, log, result, job_name) = loop {
            let file_label = if again == 0 { format!("s{first}") } else { format!("s{first}r{again}") };
            // Unique to this submission: `a` the engine's retry, `r` a submission made again.
            let retry = if batch.attempt > 1 { format!("a{}", batch.attempt) } else { String::new() };
            let job_name = format!("dagrun-{}-{file_label}{retry}", sanitize(&self.run_id));
            let (script, log, result) = match self.prepare(batch, &file_label) {
                Ok(x) => x,
                Err(e) => return fail(e.context("cannot write the job's files")),
            };
            // Registered by its name before sbatch: a job sbatch makes without
            // saying so, or that a SIGKILL of dagrun leaves, is found and
            // cancelled by the next run.
            if let Err(e) = register_name(&self.workspace, &job_name, &self.run_id, &label) {
                return fail(e.context("cannot register the job before submitting it"));
            }
            // Every answer but a job id is followed by `settle`: even a
            // refusal may come after the controller made the job.
            let (why, transient, refused) = match self.sbatch(&job_name, &script, &log, &res, &stop) {
                Ok(Sbatch::Id(id)) => break (id, log, result, job_name),
                Ok(Sbatch::Refused(msg)) => (msg, false, true),
                Ok(Sbatch::Unsure { why, transient }) => (why, transient, false),
                Err(e) => {
                    // sbatch never started: no job.
                    unregister_name(&self.workspace, &job_name);
                    return fail(e);
                }
            };
            let made = match self.settle(&job_name, &result, &stop) {
                Ok(Settled::Adopted(id)) => {
                    tracing::warn!("{label}: {why}, but its job {id} has started: watching it");
                    break (id, log, result, job_name);
                }
                Ok(Settled::NoJob { made, gone }) => {
                    if gone {
                        unregister_name(&self.workspace, &job_name);
                    }
                    made
                }
                Err(e) => return fail(e.context(why)),
            };
            if refused {
                return fail(anyhow!("{why}{}{}", tried(again), made.map(|m| format!("; {m}")).unwrap_or_default()));
            }
            let made = made.unwrap_or_else(|| format!("Slurm has no job {job_name} (one made later runs nothing: its spec is claimed)"));
            if again >= self.submit_retries || stop() {
                return fail(anyhow!("could not submit the job to Slurm{}: {why}; {made}", tried(again)));
            }
            again += 1;
            tracing::warn!("{label}: {why}; {made}; submitting it again in {}s ({again} of {})", delay.as_secs(), self.submit_retries);
            nap(delay, &stop);
            // A controller that refuses while busy gets more time each try;
            // one that did not answer has had its `submit_timeout` already.
            delay = if transient { (delay * 2).min(Duration::from_secs(30)) } else { delay };
        };
        tracing::info!("{label}: submitted Slurm job {id}");
        let never = AtomicBool::new(false);
        let (state, cancelled) = loop {
            // Registered by its id, and by its name until it has ended (a job
            // sbatch made twice for one request is found by the name).
            if let Err(e) = register(&self.workspace, &id, &self.run_id, &label) {
                tracing::warn!("cannot register Slurm job {id} (it stays registered by its name, {job_name}): {e:#}");
            }
            self.poll.lock().unwrap_or_else(|e| e.into_inner()).jobs.insert(id.clone(), Seen { state: None, misses: 0 });
            let (state, cancelled_at) = self.wait(&id, batch_cancel(batch).unwrap_or(&never));
            self.poll.lock().unwrap_or_else(|e| e.into_inner()).jobs.remove(&id);
            let confirmed = !state.starts_with("CANCELLED (not") && state != "LOST";
            if confirmed {
                unregister(&self.workspace, &id);
            }
            // The job has ended: its spec is claimed now if no job did, so none
            // runs it from here on (reviews 14 and 15). A claim that names
            // another job means sbatch made a second job for its one request
            // (its first answer lost): that job runs the work.
            let holder = match spec::claim(&result) {
                Ok(false) => {
                    // Made without a link (no hard links), a claim gets its id just after.
                    let mut c = spec::claimed_by(&result);
                    for _ in 0..10 {
                        if c.is_some() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        c = spec::claimed_by(&result);
                    }
                    (c.as_deref() != Some(id.as_str())).then_some(c)
                }
                // No job ran it, and none can now (or the claim failed: the spec is removed below).
                Ok(true) | Err(_) => None,
            };
            match holder {
                None => {
                    if confirmed {
                        unregister_name(&self.workspace, &job_name);
                    }
                }
                Some(Some(c)) if cancelled_at.is_none() => {
                    tracing::warn!(
                        "{label}: Slurm job {id} ended {state} without running the work: job {c}, made by the same submission, holds its spec; watching that job"
                    );
                    match self.find_started(&job_name, &result, &stop) {
                        Ok(next) => {
                            id = next;
                            continue;
                        }
                        Err(e) => return fail(e.context(format!("Slurm job {id} ended {state} without running the work"))),
                    }
                }
                Some(c) => {
                    let until = cancelled_at.unwrap_or_else(Instant::now) + CANCEL_WAIT;
                    let why = match &c {
                        Some(c) => format!("interrupted: Slurm job {c}, made by the same submission as job {id}, holds its spec"),
                        None => format!("Slurm job {id} ended {state}, and its spec's claim names no job: which job ran the work is unknown"),
                    };
                    match self.cancel_all(&job_name, &why, c.as_deref(), until) {
                        // Every job of it has ended: what the spec's result says is used.
                        Ok(done) if c.is_none() => tracing::warn!("{label}: {done}"),
                        Ok(done) => return fail(anyhow!(done)),
                        Err(e) => return fail(e),
                    }
                }
            }
            break (state, cancelled_at.is_some());
        };
        let wall = t0.elapsed().as_secs_f64();
        let job = format!("slurm:{id}");
        let rel_log = log.strip_prefix(&self.workspace).unwrap_or(&log).display().to_string();
        let log_tail = || {
            let t = crate::stages::cmd::tail(&log, 10);
            if t.trim().is_empty() { format!("its log ({rel_log}) is empty") } else { format!("end of its log ({rel_log}):\n{t}") }
        };
        if !cancelled && !["COMPLETED", "FAILED"].contains(&state.as_str()) {
            await_kill_note(&log);
        }
        let names: Vec<&str> = batch.members.iter().map(|m| m.stage.name.as_str()).collect();
        let spec_file = spec::spec_path(&result);
        let spec_name = spec_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // The job has ended and the spec is claimed (above): removed, so a
        // copy of it cannot be run by hand either (reviews 14 and 15).
        let _ = std::fs::remove_file(&spec_file);
        let failure = |message: String| anyhow::Error::new(JobFailure { job: job.clone(), message, facts: Default::default() });
        let Some(integrity) = self.states.integrity_key() else {
            return fail(failure(format!("no workspace integrity key to verify Slurm job {id}'s result with")));
        };
        let results = match spec::read_result(&result, &names, integrity, &self.run_id, &spec_name) {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => return fail(failure(format!("Slurm job {id} ({state}): {e:#}"))),
        };
        let mut out = Vec::new();
        for (m, r) in batch.members.iter().zip(&results) {
            if r.ok {
                let report = RunReport { facts: r.facts.clone() };
                out.push((m.index, Ok(Done { report, key: r.key.clone(), seconds: r.seconds, cpu_seconds: r.cpu_seconds, job: Some(job.clone()) })));
            } else {
                let e = r.error.clone().unwrap_or_else(|| "failed".into());
                // A job Slurm ended (OUT_OF_MEMORY, NODE_FAIL, …) while the stage
                // ran: the state is the cause, the stage's error its symptom.
                let msg = if ["COMPLETED", "FAILED"].contains(&state.as_str()) || cancelled {
                    format!("{e}\n(Slurm job {id}, {state}; log: {rel_log})")
                } else {
                    format!("{}\nthe stage's own error: {e}", end_message(&id, &state, &m.stage.name, res.time, &log_tail()))
                };
                out.push((m.index, Err(anyhow::Error::new(JobFailure { job: job.clone(), message: msg, facts: r.facts.clone() }))));
                return out;
            }
        }
        if out.len() == batch.members.len() {
            return out;
        }
        // The job ended before it finished the next member.
        let m = &batch.members[out.len()];
        let why = if cancelled {
            format!("interrupted: Slurm job {id} was cancelled by dagrun")
        } else {
            end_message(&id, &state, &m.stage.name, res.time, &log_tail())
        };
        tracing::debug!("{label}: Slurm job {id} ended {state} after {wall:.1}s");
        out.push((m.index, Err(failure(why))));
        out
    }
}

/// How long to wait for the line slurmstepd writes into a job's log when
/// Slurm ends the job (`*** JOB … CANCELLED AT … DUE TO …`, `oom-kill`).
const KILL_NOTE_WAIT: Duration = Duration::from_secs(5);

/// Slurm records a job's end state before slurmstepd has written its note
/// into the job's log: wait (briefly) for it, so the failure shows it. A node
/// that is really gone never writes it; then the log is shown as it is.
fn await_kill_note(log: &Path) {
    let t0 = Instant::now();
    while t0.elapsed() < KILL_NOTE_WAIT {
        // The note is at the log's end: its last 4 KiB, read without following
        // a link or waiting on a FIFO (the job's command may have replaced it).
        if crate::stages::cmd::tail(log, 50).contains("slurmstepd") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn batch_cancel<'a>(batch: &'a Batch) -> Option<&'a AtomicBool> {
    batch.cancel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_jobs_are_read_by_id_name_and_work_dir() {
        let ids = ["12".to_string(), "13".to_string()];
        let m = parse_live("12|dagrun-R-a|/w|s\n13|odd|name|/w s\n14|x|/y\n", &ids);
        assert_eq!(m["12"], ("dagrun-R-a".to_string(), "/w|s".to_string()));
        assert_eq!(m["13"], ("odd".to_string(), "name|/w s".to_string()), "never one of dagrun's");
        assert!(!m.contains_key("14"));
    }

    #[test]
    fn named_jobs_are_this_name_in_this_workspace_only() {
        let root = tempfile::tempdir().unwrap();
        let ws = root.path().join("a|b");
        std::fs::create_dir_all(&ws).unwrap();
        let other = root.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        let name = "dagrun-R-s0";
        let out = format!(
            "12|RUNNING|{name}|{w}\n13|PENDING|{name}x|{w}\n14|RUNNING|{name}|{o}\n1x|RUNNING|{name}|{w}\n15|CANCELLED|{name}|{w}\r\n12|RUNNING|{name}|{w}\n16|{name}|{w}\n",
            w = ws.display(),
            o = other.display()
        );
        let found = parse_named(&out, name, &ws);
        assert_eq!(found.iter().map(|(i, s)| (i.as_str(), s.as_str())).collect::<Vec<_>>(), [("12", "RUNNING"), ("15", "CANCELLED")]);
    }

    #[test]
    fn resources_combine_and_map_to_flags() {
        let a = Resources {
            cpus: Some(2),
            mem: Some("2G".into()),
            time: Some(10),
            partition: Some("debug".into()),
            account: None,
            sbatch_args: vec!["--qos=low".into()],
        };
        let b = Resources {
            cpus: Some(1),
            mem: Some("3000M".into()),
            time: Some(5),
            partition: Some("other".into()),
            account: Some("ml".into()),
            sbatch_args: vec!["--qos=low".into(), "--nice=5".into()],
        };
        let c = combine(&[&a, &b]);
        assert_eq!(
            resource_flags(&c),
            ["--cpus-per-task=2", "--mem=3000M", "--time=15", "--partition=debug", "--account=ml", "--qos=low", "--nice=5"].map(String::from).to_vec()
        );
        assert!(resource_flags(&Resources::default()).is_empty());
    }

    #[test]
    fn only_controller_trouble_is_retried() {
        assert!(transient("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"));
        assert!(transient("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"));
        assert!(!transient("sbatch: error: Batch job submission failed: Invalid partition name specified"));
    }

    #[test]
    fn names_and_quotes_are_safe() {
        assert_eq!(sanitize("train[Tenant_A]+3"), "train_Tenant_A__3");
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
        assert_eq!(mem_mb("4G"), Some(4096));
        assert_eq!(mem_mb("512"), Some(512));
    }

    #[test]
    fn every_failure_state_names_the_job_the_state_and_the_log() {
        let tail = "end of its log (.dagrun/slurm/r/s.a1.log):\nslurmstepd: error: *** JOB 42 ***";
        for (state, hint) in [
            ("FAILED", "exec-stage"),
            ("CANCELLED", "scancel or an administrator"),
            ("TIMEOUT", "raise `resources.time`"),
            ("OUT_OF_MEMORY", "raise `resources.mem`"),
            ("NODE_FAIL", "node failed"),
            ("PREEMPTED", "higher-priority job"),
            ("BOOT_FAIL", "could not be booted"),
            ("DEADLINE", "--deadline"),
            ("COMPLETED", "reported no result for train"),
            ("LOST", "no longer known to Slurm"),
            ("SOMETHING_NEW", "ended SOMETHING_NEW"),
        ] {
            let m = end_message("42", state, "train", Some(5), tail);
            assert!(m.starts_with("Slurm job 42 "), "{state}: {m}");
            assert!(m.contains(state), "{state}: {m}");
            assert!(m.contains(hint), "{state}: {m}");
            assert!(m.ends_with(tail), "{state}: the end of the log is shown: {m}");
            assert!(is_final(state), "{state} is final");
        }
        assert!(end_message("7", "TIMEOUT", "s", Some(5), "").contains("(5 min;"));
        assert!(end_message("7", "TIMEOUT", "s", None, "").contains("the partition's default"));
        for st in ["PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"] {
            assert!(!is_final(st), "{st}");
        }
    }

    #[test]
    fn sacct_output_is_parsed() {
        let ids: Vec<String> = ["101", "102", "103", "104"].map(String::from).to_vec();
        let out = "101|COMPLETED\n102|CANCELLED by 0\n103|NODE_FAIL\n103|OUT_OF_MEMORY\n999|FAILED\n101_1|FAILED\ngarbage\n104|\n";
        let got = parse_sacct(out, &ids);
        assert_eq!(got.get("101").map(String::as_str), Some("COMPLETED"));
        assert_eq!(got.get("102").map(String::as_str), Some("CANCELLED"), "`CANCELLED by UID` is CANCELLED");
        assert_eq!(got.get("103").map(String::as_str), Some("OUT_OF_MEMORY"), "the last line of a job wins");
        assert!(!got.contains_key("104"), "an empty state is no state");
        assert!(!got.contains_key("999") && got.len() == 3, "only the jobs asked for: {got:?}");
        // The job-completion log (`sacct -c`) prints the same format.
        assert_eq!(parse_sacct("251|NODE_FAIL\n", &["251".into()]).get("251").map(String::as_str), Some("NODE_FAIL"));
        assert!(sacct_disabled("Slurm accounting storage is disabled"));
        assert!(!sacct_disabled("sacct: error: Problem talking to the database: Connection refused"));
    }

    #[test]
    fn squeue_and_scontrol_output_is_parsed() {
        let ids: Vec<String> = ["7", "8"].map(String::from).to_vec();
        let got = parse_squeue("7 RUNNING\n8 PREEMPTED\n8_1 FAILED\n9 COMPLETED\n\n", &ids);
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![("7".into(), "RUNNING".into()), ("8".into(), "PREEMPTED".into())]);
        assert!(parse_squeue("", &ids).is_empty());
        let sc = "JobId=251 JobName=wrap UserId=root(0) JobState=NODE_FAIL Reason=NodeDown Dependency=(null) Requeue=0 ExitCode=0:15";
        assert_eq!(parse_scontrol(sc).as_deref(), Some("NODE_FAIL"));
        assert_eq!(parse_scontrol("JobId=1 JobState= Reason=None"), None);
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified"), None);
    }

    #[test]
    fn the_batch_script_drops_every_dagrun_variable_of_the_login_environment() {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{UNSET_DAGRUN_VARS}env"))
            .env("DAGRUN_MASTER_KEY", "00".repeat(32))
            .env("DAGRUN_MASTER_KEY_URI", "pkcs11:x")
            .env("DAGRUN_OTHER_1", "y")
            .env("KEEP_ME", "1")
            .output()
            .unwrap();
        let env = String::from_utf8_lossy(&out.stdout);
        assert!(!env.contains("DAGRUN_"), "{env}");
        assert!(env.contains("KEEP_ME=1"), "{env}");
    }

    #[test]
    fn job_environment_holds_no_secret() {
        let env = job_environment();
        assert!(env.iter().all(|(k, _)| ["PATH", "LANG", "LC_ALL", "TZ"].contains(&k.as_str())));
    }
}
