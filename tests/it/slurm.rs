//! The Slurm executor against a real single-node Slurm cluster
//! (`shared/tools/slurm-single-node.sh`; `.ci/run` starts it, and these tests
//! start it themselves when `slurmctld` is not running). Each test skips with a
//! loud message only when the cluster cannot be started (not root, no apt).
//!
//! Jobs run on the shared filesystem, which here is simply the local one.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TWO: &str = "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n";
const TENANTS: [&str; 2] = ["Tenant_A", "Tenant_B"];
const PIPE: &str = "pipelines/propensity.yaml";
const ROWS: &str = "3000";
/// A dagrun run under Slurm may queue behind other tests' jobs on 2 CPUs.
const SLURM_HANG: Duration = Duration::from_secs(180);

fn scontrol_up() -> bool {
    Command::new("scontrol").arg("ping").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("is UP"))
}

/// The cluster script: `shared/tools/slurm-single-node.sh` in the nearest
/// ancestor of the repository that has it (CI: `../shared`).
fn cluster_script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DAGRUN_SLURM_CLUSTER_SCRIPT") {
        return Some(PathBuf::from(p));
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().map(|d| d.join("shared/tools/slurm-single-node.sh")).find(|p| p.is_file())
}

/// True when a Slurm cluster answers; starts the test cluster once if needed.
fn cluster() -> bool {
    static UP: OnceLock<bool> = OnceLock::new();
    *UP.get_or_init(|| {
        if scontrol_up() {
            return true;
        }
        let why = match cluster_script() {
            None => "no shared/tools/slurm-single-node.sh above the repository (set DAGRUN_SLURM_CLUSTER_SCRIPT)".to_string(),
            Some(script) => match Command::new("bash").arg(&script).arg("up").output() {
                Ok(o) if o.status.success() && scontrol_up() => return true,
                Ok(o) => format!("{} up failed: {}{}", script.display(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
                Err(e) => format!("cannot run {}: {e}", script.display()),
            },
        };
        eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("!!! SKIPPING the Slurm tests: no Slurm cluster could be started: {why}");
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
        false
    })
}

macro_rules! need_cluster {
    () => {
        if !cluster() {
            return;
        }
    };
}

/// dagrun in `root`, master key from the workspace's key file (never a variable under Slurm).
fn dagrun_in(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(root)
        .env_remove("RUST_LOG")
        .env_remove("DAGRUN_MASTER_KEY")
        .env_remove("DAGRUN_MASTER_KEY_FILE")
        .env("DAGRUN_PLAIN", "1")
        .env("NO_COLOR", "1");
    c
}

fn run_in(root: &Path, args: &[&str]) -> Out {
    spawn(dagrun_in(root, args)).wait(SLURM_HANG)
}

fn last_record(root: &Path) -> serde_json::Value {
    let o = ok(run_in(root, &["runs", "show", "last", "--json"]));
    o.json()
}

/// Distinct Slurm jobs of a run record, and the stages that ran.
fn jobs_of(rec: &serde_json::Value) -> (std::collections::BTreeSet<String>, usize) {
    let stages = rec["stages"].as_array().unwrap();
    let jobs = stages.iter().filter_map(|s| s["slurm_job"].as_str().map(str::to_string)).collect();
    (jobs, stages.iter().filter(|s| s["status"] == "ran").count())
}

fn propensity_ws(keys_from: Option<&Path>) -> Ws {
    let ws = Ws::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(ws.path("pipelines")).unwrap();
    std::fs::create_dir_all(ws.path("config")).unwrap();
    std::fs::copy(src.join(PIPE), ws.path(PIPE)).unwrap();
    std::fs::write(ws.path("config/tenants.yaml"), TWO).unwrap();
    if let Some(from) = keys_from {
        use std::os::unix::fs::DirBuilderExt;
        let to = ws.path(".dagrun/keys");
        std::fs::DirBuilder::new().mode(0o700).create(&to).unwrap();
        for e in std::fs::read_dir(from.join(".dagrun/keys")).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap(); // keeps mode 0600
        }
    }
    ws
}

fn tenant_key(root: &Path, tenant: &str) -> dagrun::crypto::DataKey {
    let o = ok(run_in(root, &["keys", "export", tenant, "--i-understand-this-prints-a-secret"]));
    dagrun::crypto::DataKey::from_bytes(hex::decode(o.stdout.trim()).unwrap().try_into().unwrap())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn propensity_under_slurm_equals_a_local_run() {
    need_cluster!();
    let local = propensity_ws(None);
    ok(run_in(&local.root, &["run", PIPE, "-p", &format!("rows={ROWS}")]));
    let remote = propensity_ws(Some(&local.root));
    let o = ok(run_in(&remote.root, &["run", PIPE, "-p", &format!("rows={ROWS}"), "--executor", "slurm", "-j", "4"]));
    assert!(o.stdout.contains("14 stages: 14 ran"), "{}", o.stdout);
    assert!(o.stdout.contains("serve-check ok"), "{}", o.stdout);
    let rec = last_record(&remote.root);
    let (jobs, ran) = jobs_of(&rec);
    assert_eq!(ran, 14);
    // Per tenant: generate, the encrypt→train chain (one job), serve-check.
    assert_eq!(jobs.len(), 6, "jobs: {jobs:?}");
    for s in rec["stages"].as_array().unwrap() {
        assert!(s["slurm_job"].is_string(), "{} ran outside Slurm: {s}", s["stage"]);
    }
    let chain: std::collections::BTreeSet<&str> = ["encrypt", "afe", "store", "train"]
        .iter()
        .map(|b| rec["stages"].as_array().unwrap().iter().find(|s| s["stage"] == format!("{b}[Tenant_A]")).unwrap()["slurm_job"].as_str().unwrap())
        .collect();
    assert_eq!(chain.len(), 1, "Tenant_A's chain ran in one job: {chain:?}");
    // Each member recorded separately: state and lineage.
    for b in ["encrypt", "afe", "store", "train"] {
        assert!(remote.exists(&format!(".dagrun/state/{b}[Tenant_A].json")), "no state for {b}");
    }
    let lin = ok(run_in(&remote.root, &["lineage", "models/Tenant_A/model.json"]));
    assert!(lin.stdout.contains("afe[Tenant_A]") && lin.stdout.contains("encrypt[Tenant_A]"), "{}", lin.stdout);

    // Byte-identical outputs; encrypted files equal once decrypted.
    for t in TENANTS {
        for p in [
            format!("data/afe/{t}/v1.0/features.parquet"),
            format!("data/afe/{t}/v1.0/stats.json"),
            format!("featurestore/{t}/v1.0/features.parquet"),
            format!("featurestore/{t}/v1.0/manifest.json"),
            format!("models/{t}/model.json"),
            format!("reports/serve-check/{t}.json"),
        ] {
            assert!(std::fs::read(local.path(&p)).unwrap() == std::fs::read(remote.path(&p)).unwrap(), "{p} differs between the local and the Slurm run");
        }
        let enc = format!("data/encrypted/{t}.parquet");
        let key = tenant_key(&local.root, t);
        let (a, b) = (decrypted(&local.path(&enc), &key, t), decrypted(&remote.path(&enc), &key, t));
        assert_eq!(a.0, b.0, "key id of {enc}");
        assert!(a.1 == b.1, "clear columns of {enc} differ");
        assert!(a.2 == b.2, "decrypted Sensitive_Data of {enc} differs");
        assert!(!remote.exists(&format!("data/raw/{t}.parquet")), "plaintext left after the run");
    }

    // The job files are the owner's only, and so is the folder of all runs' folders.
    for d in std::fs::read_dir(remote.path(".dagrun/slurm")).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()).chain([remote.path(".dagrun/slurm")]) {
        use std::os::unix::fs::PermissionsExt;
        if d.file_name().is_some_and(|n| n != "active") {
            assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700, "{}", d.display());
        }
    }
    // No secret in any job file (scripts, specs, logs, results).
    let master = std::fs::read_to_string(remote.path(".dagrun/keys/master.key")).unwrap();
    let master = master.trim();
    let job_files = files_under(&remote.path(".dagrun/slurm"));
    assert!(job_files.iter().any(|p| p.extension().is_some_and(|e| e == "sh")));
    for f in &job_files {
        let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).to_lowercase();
        assert!(!text.contains(master), "{} holds the master key", f.display());
        assert!(!text.contains("dagrun_master_key="), "{} passes a key in a variable", f.display());
        // Job files' names show in `scontrol show job` (StdOut=, Command=): no tenant there (review 13).
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(!name.contains("Tenant") && !name.contains("generate"), "{} names a stage or tenant", f.display());
    }
    // A finished run's specs are gone and each job claimed its own: none can
    // be run again (reviews 13 and 14: a replay brought back the plaintext
    // raw data the run had deleted).
    assert!(!job_files.iter().any(|p| p.to_string_lossy().ends_with(".spec.json")), "a spec outlived its job: {job_files:?}");
    let claims = job_files.iter().filter(|p| p.to_string_lossy().ends_with(".claim")).count();
    let results = job_files.iter().filter(|p| p.to_string_lossy().ends_with(".result.json")).count();
    assert!(claims > 0 && claims == results, "{claims} claims for {results} results: {job_files:?}");

    // Nothing to do again: no job at all. `resources:` is not part of the key.
    let again = ok(run_in(&remote.root, &["run", PIPE, "-p", &format!("rows={ROWS}"), "--executor", "slurm"]));
    assert!(again.stdout.contains("all 14 stages up to date"), "{}", again.stdout);
    assert!(jobs_of(&last_record(&remote.root)).0.is_empty());
    let yaml = std::fs::read_to_string(remote.path(PIPE)).unwrap();
    let yaml = yaml.replace("  train:\n", "  train:\n    resources: { cpus: 1, mem: 500M, time: 10 }\n");
    std::fs::write(remote.path(PIPE), yaml).unwrap();
    let again = ok(run_in(&remote.root, &["run", PIPE, "-p", &format!("rows={ROWS}"), "--executor", "slurm"]));
    assert!(again.stdout.contains("all 14 stages up to date"), "resources changed the cache key:\n{}", again.stdout);
    // A param change reruns train (and serve-check), in one job each per tenant: no chain for the fresh members.
    let c = ok(run_in(&remote.root, &["run", PIPE, "-p", &format!("rows={ROWS}"), "-p", "C=0.5", "--executor", "slurm"]));
    let rec = last_record(&remote.root);
    let ran: std::collections::BTreeSet<String> =
        rec["stages"].as_array().unwrap().iter().filter(|s| s["status"] == "ran").map(|s| s["stage"].as_str().unwrap().to_string()).collect();
    assert_eq!(ran, set(&["train[Tenant_A]", "train[Tenant_B]", "serve-check[Tenant_A]", "serve-check[Tenant_B]"]), "{}", c.stdout);
    assert_eq!(jobs_of(&rec).0.len(), 4);
    // A model below its AUC gate fails in its job, and the failed record
    // keeps the facts the job sent back (the AUC-below-gate alert reads them),
    // as a local run's does.
    let gate = run_in(&remote.root, &["run", PIPE, "-p", &format!("rows={ROWS}"), "-p", "min_auc=0.99", "--executor", "slurm"]);
    assert_eq!(gate.code, 1, "{}\n{}", gate.stdout, gate.stderr);
    let rec = last_record(&remote.root);
    let train = rec["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "train[Tenant_A]").unwrap();
    assert_eq!(train["status"], "failed", "{train:#}");
    assert!(train["slurm_job"].is_string(), "{train:#}");
    let auc = train["facts"]["auc"].as_f64().unwrap_or_else(|| panic!("no AUC in the failed Slurm train record: {train:#}"));
    assert!(auc < 0.99 && train["facts"]["model_version"].as_str().unwrap().starts_with("Tenant_A-"), "{train:#}");
}

/// A workspace with a `cmd` pipeline under Slurm.
fn cmd_ws(yaml: &str) -> Ws {
    let ws = Ws::new();
    ws.pipeline(&format!("executor: slurm\nslurm:\n  poll_interval: 0.3\n{yaml}"));
    ws
}

/// The id of the (one) job the run in `root` has registered as running; waits for it to run.
fn running_job(root: &Path, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(rd) = std::fs::read_dir(root.join(".dagrun/slurm/active")) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if id.bytes().all(|b| b.is_ascii_digit()) && job_state(&id).as_deref() == Some("RUNNING") {
                    return id;
                }
            }
        }
        assert!(t0.elapsed() < limit, "no running job registered after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn job_state(id: &str) -> Option<String> {
    let o = Command::new("squeue").args(["-h", "-t", "all", "-j", id, "-o", "%T"]).output().ok()?;
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn wait_state(id: &str, want: &str, limit: Duration) {
    let t0 = Instant::now();
    while job_state(id).as_deref() != Some(want) {
        assert!(t0.elapsed() < limit, "job {id} is {:?}, not {want}, after {limit:?}", job_state(id));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn failing_jobs_name_the_job_and_retries_resubmit() {
    need_cluster!();
    let ws = cmd_ws(
        "stages:\n  bad:\n    cmd: echo attempt >> attempts.txt; echo 'cannot frobnicate the widget' >&2; exit 3\n    retries: 1\n  good:\n    cmd: env > env.txt; date +%s.%N > good.start; sleep 1; date +%s.%N > good.end\n    outs: [env.txt, good.start, good.end]\n  other:\n    cmd: date +%s.%N > other.start; sleep 1; date +%s.%N > other.end\n    outs: [other.start, other.end]\n",
    );
    let o = spawn({
        let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml", "-j", "1"]);
        c.env("SECRET_TOKEN", "hunter2-do-not-leak");
        c
    })
    .wait(SLURM_HANG);
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("stage bad failed"), "{}", o.stderr);
    assert!(o.stderr.contains("cannot frobnicate the widget"), "the end of the stage's stderr is shown:\n{}", o.stderr);
    assert!(o.stderr.contains("Slurm job "), "the job id is named:\n{}", o.stderr);
    assert!(o.stderr.contains("failed after 2 attempts"), "{}", o.stderr);
    assert_eq!(ws.count("attempts.txt"), 2, "retries: 1 resubmits once");
    let rec = last_record(&ws.root);
    let st = |n: &str| rec["stages"].as_array().unwrap().iter().find(|s| s["stage"] == n).unwrap()["status"].as_str().unwrap().to_string();
    assert_eq!((st("bad"), st("good"), st("other")), ("failed".into(), "ran".into(), "ran".into()));
    // The failed stage's record names the job it failed in (its last attempt's), as `runs show` does.
    let bad = rec["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "bad").unwrap();
    let job = bad["slurm_job"].as_str().unwrap_or_else(|| panic!("no slurm_job in the failed stage's record: {bad}"));
    let id = job.strip_prefix("slurm:").unwrap();
    assert!(!id.is_empty() && id.chars().all(|c| c.is_ascii_digit()), "{job}");
    assert!(bad["error"].as_str().unwrap().contains(&format!("Slurm job {id}")), "{bad}");
    let show = ok(run_in(&ws.root, &["runs", "show", rec["run_id"].as_str().unwrap()])).stdout;
    assert!(show.lines().any(|l| l.contains("failed") && l.contains(" bad ") && l.ends_with(job)), "{show}");
    // The job saw none of the submitting environment.
    let env = ws.read("env.txt");
    assert!(!env.contains("hunter2") && !env.contains("SECRET_TOKEN"), "the job saw the submitting environment:\n{env}");
    assert!(env.contains("SLURM_JOB_ID="), "{env}");
    // -j 1: one job at a time.
    let t = |f: &str| ws.read(f).trim().parse::<f64>().unwrap();
    assert!(t("good.end") <= t("other.start") || t("other.end") <= t("good.start"), "-j 1 but two jobs overlapped");
}

#[test]
fn a_job_over_its_time_limit_fails_as_timeout() {
    need_cluster!();
    let ws = cmd_ws("stages:\n  slow:\n    cmd: sleep 600 > slow.txt\n    outs: [slow.txt]\n    resources: { time: 1 }\n");
    let o = spawn(dagrun_in(&ws.root, &["run", "pipeline.yaml"])).wait(Duration::from_secs(300));
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("TIMEOUT") && o.stderr.contains("time limit (1 min"), "{}", o.stderr);
    assert!(o.stderr.contains("DUE TO TIME LIMIT"), "the end of the job's log is shown:\n{}", o.stderr);
    assert!(!ws.exists(".dagrun/state/slow.json"));
}

#[test]
fn a_job_that_cannot_meet_its_deadline_fails_as_deadline() {
    need_cluster!();
    // Held until `--begin`, then it can no longer finish its 1-minute limit before `--deadline`: Slurm ends it DEADLINE.
    let ws = cmd_ws(
        "stages:\n  late:\n    cmd: echo x > late.txt\n    outs: [late.txt]\n    resources: { time: 1, sbatch_args: [\"--begin=now+2\", \"--deadline=now+30\"] }\n",
    );
    let o = spawn(dagrun_in(&ws.root, &["run", "pipeline.yaml"])).wait(SLURM_HANG);
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let id: String = o.stderr.split("submitted Slurm job ").nth(1).expect("a job was submitted").chars().take_while(char::is_ascii_digit).collect();
    assert!(o.stderr.contains(&format!("stage late failed: Slurm job {id} ended DEADLINE")), "{}", o.stderr);
    assert!(o.stderr.contains("is empty"), "the job never ran, so its log is empty:\n{}", o.stderr);
    assert_eq!(job_state(&id).as_deref(), Some("DEADLINE"));
    assert!(!ws.exists("late.txt"));
}

#[test]
fn scancel_from_outside_fails_the_stage() {
    need_cluster!();
    // `&&`: when Slurm signals the job's processes one by one, the shell can outlive a killed `sleep` for an instant.
    let ws = cmd_ws("stages:\n  long:\n    cmd: sleep 120 && echo x > long.txt\n    outs: [long.txt]\n");
    let bg = spawn(dagrun_in(&ws.root, &["run", "pipeline.yaml"]));
    let id = running_job(&ws.root, SLURM_HANG);
    let st = Command::new("scancel").arg(&id).status().unwrap();
    assert!(st.success());
    let o = bg.wait(SLURM_HANG);
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains(&format!("Slurm job {id} was CANCELLED (not by dagrun")), "{}", o.stderr);
    assert!(!ws.exists("long.txt"));
}

#[test]
fn sigint_of_dagrun_cancels_its_jobs() {
    need_cluster!();
    let ws = cmd_ws("stages:\n  long:\n    cmd: sleep 120; echo x > long.txt\n    outs: [long.txt]\n");
    let bg = spawn(dagrun_in(&ws.root, &["run", "pipeline.yaml"]));
    let id = running_job(&ws.root, SLURM_HANG);
    // Its name in squeue (which every cluster user reads) names no stage.
    let name = Command::new("squeue").args(["-h", "-j", &id, "-o", "%j"]).output().unwrap();
    let name = String::from_utf8_lossy(&name.stdout).trim().to_string();
    assert!(name.starts_with("dagrun-") && name.ends_with("-s0") && !name.contains("long"), "job name {name:?}");
    signal(bg.pid() as i32, libc::SIGINT);
    let o = bg.wait(Duration::from_secs(60));
    assert_eq!(o.code, 130, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    // dagrun waited until Slurm confirmed: the job is over when dagrun exits.
    let st = job_state(&id).unwrap_or_default();
    assert!(st == "CANCELLED", "job {id} is {st:?} after dagrun exited");
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none(), "job still registered");
}

/// Review 69 M3: SIGTERM while slurmctld does not answer took ~63 s (the
/// 30 s wait began after a `scancel` that blocked, and every query blocked
/// too). Slurm's clients are here made to hang once a flag is set (as they
/// do for a controller that is down); dagrun exits 130 within its 30 s and
/// one bounded query (10 s). The job it could not cancel stays registered
/// for the next run (cancelled here by hand).
#[test]
fn sigterm_while_slurm_does_not_answer_ends_within_its_bound() {
    need_cluster!();
    let ws = cmd_ws("stages:\n  long:\n    cmd: sleep 120; echo x > long.txt\n    outs: [long.txt]\n");
    let bin = ws.path("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let flag = ws.path("slurm-down");
    for tool in ["squeue", "scancel", "sacct", "scontrol"] {
        let real = String::from_utf8(Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().stdout).unwrap();
        ws.write(
            &format!("fakebin/{tool}"),
            format!("#!/bin/sh\nif [ -e {f} ]; then sleep 300; fi\nexec {real} \"$@\"\n", f = flag.display(), real = real.trim()),
        );
        std::fs::set_permissions(bin.join(tool), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", &path);
    let bg = spawn(c);
    let id = running_job(&ws.root, SLURM_HANG);
    ws.write("slurm-down", "");
    let t0 = std::time::Instant::now();
    signal(bg.pid() as i32, libc::SIGTERM);
    let o = bg.wait(Duration::from_secs(120));
    let took = t0.elapsed();
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(o.code, 130, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(took < Duration::from_secs(45), "took {took:?}:\n{}", o.stderr);
    assert!(ws.exists(&format!(".dagrun/slurm/active/{id}")), "the job it could not cancel is registered for the next run");
    let _ = Command::new("scancel").arg(&id).status();
    wait_state(&id, "CANCELLED", Duration::from_secs(60));
}

#[test]
fn sigkill_of_dagrun_then_rerun_abandons_the_orphan_and_reruns() {
    need_cluster!();
    let ws = cmd_ws("stages:\n  work:\n    cmd: if [ -f slow ]; then touch sleeping; sleep 120; fi; echo done > work.txt\n    outs: [work.txt]\n");
    ws.write("slow", "");
    let mut bg = spawn(dagrun_in(&ws.root, &["run", "pipeline.yaml"]));
    let id = running_job(&ws.root, SLURM_HANG);
    // A job Slurm calls RUNNING may not have reached its first line yet (a
    // loaded CI machine saw it pass the test of `slow` after the file was
    // removed below, and finish instead of being cancelled): wait until the
    // job is in its sleep.
    let t0 = Instant::now();
    while !ws.exists("sleeping") {
        assert!(t0.elapsed() < SLURM_HANG, "job {id} did not reach its sleep after {SLURM_HANG:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    bg.child.kill().unwrap();
    bg.child.wait().unwrap();
    assert_eq!(job_state(&id).as_deref(), Some("RUNNING"), "the job outlives a SIGKILLed dagrun");
    // Slurm not answering about the orphan: nothing may start while it may
    // write; a temporary failure (exit 75), nothing ran (review 69 M2: exit 1).
    let fake = tempfile::tempdir().unwrap();
    std::fs::write(fake.path().join("squeue"), "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2\nexit 1\n")
        .unwrap();
    std::fs::set_permissions(fake.path().join("squeue"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", format!("{}:{}", fake.path().display(), std::env::var("PATH").unwrap_or_default()));
    let down = spawn(c).wait(SLURM_HANG);
    assert_eq!(down.code, 75, "{}", down.stderr);
    assert!(
        down.stderr.contains("cannot ask Slurm about the jobs of an earlier run") && down.stderr.contains("try again when Slurm answers"),
        "{}",
        down.stderr
    );
    assert!(!ws.exists("work.txt"));
    // The rerun's own job must not sleep; the orphan is past the test of `slow`.
    std::fs::remove_file(ws.path("slow")).unwrap();
    let o = ok(run_in(&ws.root, &["run", "pipeline.yaml"]));
    assert!(o.stderr.contains(&format!("Slurm jobs {id} of an earlier run")), "the orphan is named:\n{}", o.stderr);
    wait_state(&id, "CANCELLED", Duration::from_secs(30));
    assert_eq!(ws.read("work.txt"), "done\n");
    assert!(o.stdout.contains("1 ran"), "{}", o.stdout);
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// A file in `.dagrun/slurm/active/` is not a licence to cancel: a job that
/// dagrun did not submit for that run from this workspace (here another job
/// of the same user) is left running, and a file that is no registration is
/// removed without a word to Slurm.
#[test]
fn a_planted_registration_cancels_nobodys_job() {
    need_cluster!();
    struct Cancel(String);
    impl Drop for Cancel {
        fn drop(&mut self) {
            let _ = Command::new("scancel").arg(&self.0).status();
        }
    }
    let out = Command::new("sbatch").args(["--parsable", "--job-name=someone-elses-work", "--output=/dev/null", "--wrap=sleep 300"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string();
    let _cancel = Cancel(id.clone());
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    ws.write(&format!(".dagrun/slurm/active/{id}"), format!("{{\"job_id\":\"{id}\",\"run_id\":\"20261205-000000-000-abcd\",\"label\":\"x\"}}"));
    ws.write(".dagrun/slurm/active/4242", "not a registration");
    let o = ok(run_in(&ws.root, &["run", "pipeline.yaml"]));
    assert!(o.stderr.contains(&format!("Slurm job {id} is registered")) && o.stderr.contains("not cancelled"), "{}", o.stderr);
    assert!(o.stderr.contains("not a job registration dagrun wrote"), "{}", o.stderr);
    let st = job_state(&id).unwrap_or_default();
    assert!(st == "RUNNING" || st == "PENDING", "job {id} is {st:?}: a planted registration cancelled it");
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none(), "the planted files are removed");
}

#[test]
fn a_failing_sbatch_is_retried_with_backoff() {
    need_cluster!();
    let ws = cmd_ws("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    // An sbatch in front of the real one that fails twice as a busy controller does.
    let path = fake_sbatch(
        &ws,
        "if [ $(wc -l < \"$CALLS\") -le 2 ]; then echo 'sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)' >&2; exit 1; fi\nexec \"$REAL\" \"$@\"\n",
    );
    let o = spawn({
        let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
        c.env("PATH", &path);
        c
    })
    .wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(ws.count("sbatch-calls"), 3);
    assert!(o.stderr.contains("submitting it again in 1s (1 of 5)") && o.stderr.contains("submitting it again in 2s (2 of 5)"), "{}", o.stderr);
    assert_eq!(ws.read("a.txt"), "a\n");
    // A controller that never answers refused nothing: said so (review 69).
    fake_sbatch(&ws, "echo 'sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)' >&2\nexit 1\n");
    ws.pipeline("executor: slurm\nslurm:\n  poll_interval: 0.3\n  submit_retries: 1\nstages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let o = spawn({
        let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml", "--force", "a"]);
        c.env("PATH", &path);
        c
    })
    .wait(SLURM_HANG);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("could not submit the job to Slurm (after 2 attempts)") && !o.stderr.contains("refused"), "{}", o.stderr);
}

/// An `sbatch` in front of the real one, at `ws/fakebin/sbatch`, running
/// `body` (a shell script; `$REAL` is the real sbatch, `$CALLS` counts calls);
/// the PATH that finds it first.
fn fake_sbatch(ws: &Ws, body: &str) -> String {
    let bin = ws.path("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = String::from_utf8(Command::new("sh").args(["-c", "command -v sbatch"]).output().unwrap().stdout).unwrap();
    ws.write(
        "fakebin/sbatch",
        format!("#!/bin/sh\nREAL={real}\nCALLS={calls}\necho x >> \"$CALLS\"\n{body}", real = real.trim(), calls = ws.path("sbatch-calls").display()),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("sbatch"), std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

/// A `squeue` in `ws`'s `fakebin` (see [`fake_sbatch`]) that fails as an
/// unreachable controller fails while the file `down` exists (and then
/// leaves `DOWN.asked` behind: it was asked).
fn squeue_down_while(ws: &Ws, down: &Path) {
    fake_squeue(
        ws,
        &format!(
            "if [ -e {d} ]; then touch {d}.asked; echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2; exit 1; fi",
            d = down.display()
        ),
    );
}

/// A `squeue` in `ws`'s `fakebin` that runs the shell line `first`, then the real squeue.
fn fake_squeue(ws: &Ws, first: &str) {
    let real = String::from_utf8(Command::new("sh").args(["-c", "command -v squeue"]).output().unwrap().stdout).unwrap();
    ws.write("fakebin/squeue", format!("#!/bin/sh\n{first}\nexec {real} \"$@\"\n", real = real.trim()));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ws.path("fakebin/squeue"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The first line of a `--parsable` answer saved in `p`: the job id.
fn saved_id(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap().trim().split(';').next().unwrap().to_string()
}

/// An `sbatch` that submits the job and then never answers (a controller
/// that accepted the job and hung, a munge or NFS stall) is killed after
/// `slurm.submit_timeout`. Its spec is claimed, so its job runs nothing;
/// the job is cancelled and the work submitted again, under a new name. If
/// the job has started first (it claimed its spec), it is watched instead.
/// Either way the work runs once.
#[test]
fn an_sbatch_that_does_not_answer_is_killed_and_its_job_never_runs_twice() {
    need_cluster!();
    let ws = cmd_ws("  submit_timeout: 5\nstages:\n  a:\n    cmd: touch started; echo a >> runs.txt; echo a > a.txt\n    outs: [a.txt]\n");
    let (first, second, started) = (ws.path("first"), ws.path("second"), ws.path("started"));
    // 1st call: a job that may not start for ten minutes, then no answer.
    // 2nd: a job, and no answer once it has started (or after 60 s).
    // Later calls: the real sbatch.
    let path = fake_sbatch(
        &ws,
        &format!(
            "n=$(wc -l < \"$CALLS\")\nif [ \"$n\" -eq 1 ]; then\n  \"$REAL\" --begin=now+600 \"$@\" > {first} || exit 1\n  exec sleep 300\nfi\nif [ \"$n\" -eq 2 ]; then\n  \"$REAL\" \"$@\" > {second} || exit 1\n  i=0; while [ ! -e {started} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n  exec sleep 300\nfi\nexec \"$REAL\" \"$@\"\n",
            first = first.display(),
            second = second.display(),
            started = started.display()
        ),
    );
    let t0 = Instant::now();
    let o = spawn({
        let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
        c.env("PATH", &path);
        c
    })
    .wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(ws.read("a.txt"), "a\n");
    assert_eq!(ws.count("runs.txt"), 1, "the work ran once:\n{}", o.stderr);
    let id_of = |p: &Path| std::fs::read_to_string(p).unwrap().trim().split(';').next().unwrap().to_string();
    let (j1, j2) = (id_of(&first), id_of(&second));
    assert!(
        o.stderr.contains("sbatch did not answer within 5s (`slurm.submit_timeout`)")
            && o.stderr.contains(&format!("it had submitted job {j1}, cancelled now; submitting it again in 1s (1 of 5)")),
        "{}",
        o.stderr
    );
    wait_state(&j1, "CANCELLED", Duration::from_secs(30));
    let rec = last_record(&ws.root);
    let job = rec["stages"][0]["slurm_job"].as_str().unwrap().to_string();
    if o.stderr.contains(&format!("but its job {j2} has started: watching it")) {
        // The second job started before its sbatch was given up: watched.
        assert_eq!(job, format!("slurm:{j2}"));
        assert_eq!(ws.count("sbatch-calls"), 2);
    } else {
        // It had not: it runs nothing, is cancelled, and a third job does the work.
        assert!(o.stderr.contains(&format!("it had submitted job {j2}")), "{}", o.stderr);
        assert_eq!(ws.count("sbatch-calls"), 3);
        assert_ne!(job, format!("slurm:{j2}"));
    }
    assert!(t0.elapsed() < Duration::from_secs(120), "{:?}", t0.elapsed());
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// An `sbatch` that submits and hangs while Slurm cannot say which job it
/// made (a controller in trouble): the job has started, so it is asked
/// again until Slurm answers, then watched; never submitted a second time.
/// A SIGKILL of dagrun in that state leaves the job registered by its name:
/// the next run cancels it before anything runs.
#[test]
fn a_started_job_of_an_unanswered_sbatch_is_never_run_beside_another() {
    need_cluster!();
    let ws = cmd_ws(
        "  submit_timeout: 20\nstages:\n  a:\n    cmd: touch started; echo a >> runs.txt; if [ -f slow ]; then sleep 120; fi; echo a > a.txt\n    outs: [a.txt]\n",
    );
    // (20 s: the job must start before sbatch is given up, also while the
    // test cluster's two CPUs are busy with other tests' jobs.)
    let (started, down) = (ws.path("started"), ws.path("squeue-down"));
    let path = fake_sbatch(
        &ws,
        &format!(
            "echo $$ > {pid}\n\"$REAL\" \"$@\" > {job} || exit 1\ni=0; while [ ! -e {started} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\ntouch {down}\nexec sleep 300\n",
            pid = ws.path("sbatch.pid").display(),
            job = ws.path("job").display(),
            started = started.display(),
            down = down.display()
        ),
    );
    squeue_down_while(&ws, &down);
    // 1. Slurm comes back after a few seconds: the started job is watched.
    let bg = spawn({
        let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
        c.env("PATH", &path);
        c
    });
    // Slurm comes back once dagrun, having given sbatch up, asked it in vain.
    let t0 = Instant::now();
    while !ws.path("squeue-down.asked").exists() {
        assert!(t0.elapsed() < SLURM_HANG, "the job did not start, or dagrun never asked squeue");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    std::fs::remove_file(&down).unwrap();
    let o = bg.wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let job = ws.read("job").trim().split(';').next().unwrap().to_string();
    assert!(o.stderr.contains("has started (it claimed its spec), but Slurm does not confirm which job it is"), "{}", o.stderr);
    assert!(o.stderr.contains(&format!("but its job {job} has started: watching it")), "{}", o.stderr);
    assert_eq!((ws.count("runs.txt"), ws.count("sbatch-calls")), (1, 1), "{}", o.stderr);
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
    // 2. dagrun SIGKILLed while its sbatch hangs and the job runs: the next
    //    run finds the job by the name it registered and cancels it.
    std::fs::remove_file(&started).unwrap();
    ws.write("slow", "");
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml", "--force", "a"]);
    c.env("PATH", &path);
    let mut bg = spawn(c);
    let t0 = Instant::now();
    while !started.exists() {
        assert!(t0.elapsed() < SLURM_HANG, "the job did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    bg.child.kill().unwrap();
    bg.child.wait().unwrap();
    let _ = std::fs::remove_file(&down);
    if let Ok(pid) = ws.read("sbatch.pid").trim().parse::<i32>() {
        signal(pid, libc::SIGKILL);
    }
    let orphan = ws.read("job").trim().split(';').next().unwrap().to_string();
    assert_ne!(orphan, job);
    assert_eq!(job_state(&orphan).as_deref(), Some("RUNNING"));
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("n-dagrun-")));
    std::fs::remove_file(ws.path("slow")).unwrap();
    let o = ok(run_in(&ws.root, &["run", "pipeline.yaml"]));
    assert!(o.stderr.contains(&format!("Slurm jobs {orphan} of an earlier run")), "the orphan is named:\n{}", o.stderr);
    wait_state(&orphan, "CANCELLED", Duration::from_secs(30));
    // Its output comes back from the cache (the forced run's key is the first run's).
    assert_eq!(ws.read("a.txt"), "a\n");
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// An `sbatch` that sends its request twice (a client retrying on its own)
/// and then fails as a timed-out controller fails: Slurm lists two jobs under the submission's
/// name. The one that claimed the spec (the claim holds its id) is
/// watched; the other, which runs nothing, is cancelled. (Taking the
/// higher id would watch a job that never runs the work.)
#[test]
fn of_two_jobs_under_one_name_the_one_holding_the_claim_is_watched() {
    need_cluster!();
    let ws = cmd_ws(
        "  submit_timeout: 60\nstages:\n  a:\n    cmd: echo $SLURM_JOB_ID > who; touch started; echo a >> runs.txt; echo a > a.txt\n    outs: [a.txt]\n",
    );
    let (first, second, started) = (ws.path("first"), ws.path("second"), ws.path("started"));
    let path = fake_sbatch(
        &ws,
        &format!(
            "\"$REAL\" \"$@\" > {first} || exit 1\n\"$REAL\" --begin=now+600 \"$@\" > {second} || exit 1\ni=0; while [ ! -e {started} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\necho 'sbatch: error: Batch job submission failed: Socket timed out on send/recv operation' >&2\nexit 1\n",
            first = first.display(),
            second = second.display(),
            started = started.display()
        ),
    );
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", &path);
    let o = spawn(c).wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let (j1, j2) = (saved_id(&first), saved_id(&second));
    assert_eq!(ws.read("who").trim(), j1);
    assert_eq!(last_record(&ws.root)["stages"][0]["slurm_job"].as_str(), Some(format!("slurm:{j1}").as_str()));
    assert!(o.stderr.contains(&format!("but its job {j1} has started: watching it")), "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!("Slurm job {j2} of dagrun-")) && o.stderr.contains("runs nothing (its spec is claimed by another): cancelled"),
        "{}",
        o.stderr
    );
    wait_state(&j2, "CANCELLED", Duration::from_secs(30));
    assert_eq!((ws.count("runs.txt"), ws.count("sbatch-calls")), (1, 1));
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// `sbatch` repeating one request (its first answer lost) makes two jobs
/// and answers with the second's id: the first claims the spec and runs
/// the work while the watched one finds it claimed and fails. The job that
/// holds the claim is then watched, the stage is not retried beside it,
/// and the work runs once. And one empty listing by name (a stale answer)
/// is no proof that a started job has ended: its id is asked.
#[test]
fn a_second_job_of_one_request_or_a_stale_listing_never_runs_the_work_twice() {
    need_cluster!();
    let ws = cmd_ws(
        "  submit_timeout: 60\nstages:\n  a:\n    cmd: touch started; echo $SLURM_JOB_ID >> runs.txt; if [ -f slow ]; then sleep 12; fi; echo a > a.txt\n    outs: [a.txt]\n    retries: 1\n",
    );
    ws.write("slow", "");
    let (first, job, started, once) = (ws.path("first"), ws.path("job"), ws.path("started"), ws.path("listed-once"));
    let path = fake_sbatch(
        &ws,
        &format!(
            "n=$(wc -l < \"$CALLS\")\nif [ \"$n\" -eq 1 ]; then\n  \"$REAL\" \"$@\" > {first} || exit 1\n  exec \"$REAL\" --begin=now+3 \"$@\"\nfi\n\"$REAL\" \"$@\" > {job} || exit 1\ni=0; while [ ! -e {started} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\necho 'Submitted.'\n",
            first = first.display(),
            job = job.display(),
            started = started.display()
        ),
    );
    // The first listing by name after `once` appears answers nothing.
    fake_squeue(
        &ws,
        &format!(
            "case \"$*\" in *--name*) if [ -e {armed} ] && [ ! -e {once} ]; then touch {once}; exit 0; fi;; esac",
            armed = ws.path("armed").display(),
            once = once.display()
        ),
    );
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", &path);
    let o = spawn(c).wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let a = saved_id(&first);
    assert_eq!(ws.read("runs.txt").trim(), a, "the work ran once, in the first job:\n{}", o.stderr);
    assert_eq!(last_record(&ws.root)["stages"][0]["slurm_job"].as_str(), Some(format!("slurm:{a}").as_str()));
    assert!(o.stderr.contains(&format!("job {a}, made by the same submission, holds its spec; watching that job")), "{}", o.stderr);
    assert!(!o.stderr.contains("retrying"), "{}", o.stderr);
    assert_eq!(ws.count("sbatch-calls"), 1);
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
    // 2. sbatch answers no id once its job has started, and the listing
    //    that should name the job comes back empty once.
    std::fs::remove_file(ws.path("slow")).unwrap();
    std::fs::remove_file(&started).unwrap();
    ws.write("armed", "");
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml", "--force", "a"]);
    c.env("PATH", &path);
    let o = spawn(c).wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let j = saved_id(&job);
    assert!(once.exists());
    assert_eq!(ws.read("runs.txt"), format!("{a}\n{j}\n"), "{}", o.stderr);
    assert!(o.stderr.contains(&format!("but its job {j} has started: watching it")), "{}", o.stderr);
    assert_eq!(ws.count("sbatch-calls"), 2);
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// A claim file naming another job (planted, or a job id reused) never
/// makes dagrun watch or cancel that job: a claimed job is taken only as
/// this submission's (its name and work folder). Unknown as such for five
/// answers, it is given up: the jobs of the submission's name are
/// cancelled, the other job is left alone.
#[test]
fn a_planted_claim_never_makes_dagrun_watch_or_cancel_another_job() {
    need_cluster!();
    let ws = cmd_ws("  submit_timeout: 60\nstages:\n  a:\n    cmd: echo a >> runs.txt; echo a > a.txt\n    outs: [a.txt]\n");
    let other = ws.path("other.log");
    let o = Command::new("sbatch")
        .args(["--parsable", "--job-name=someone-else", &format!("--output={}", other.display()), "--wrap", "sleep 120"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let foreign = String::from_utf8_lossy(&o.stdout).trim().split(';').next().unwrap().to_string();
    wait_state(&foreign, "RUNNING", Duration::from_secs(60));
    // sbatch makes a held job, plants a claim naming the other job, answers no id.
    let path = fake_sbatch(
        &ws,
        &format!(
            "for last; do :; done\n\"$REAL\" --begin=now+600 \"$@\" > {job} || exit 1\nprintf {foreign} > \"${{last%.sh}}.claim\"\necho junk\n",
            job = ws.path("job").display()
        ),
    );
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", &path);
    let o = spawn(c).wait(SLURM_HANG);
    let still = job_state(&foreign);
    let _ = Command::new("scancel").arg(&foreign).output();
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let error = last_record(&ws.root)["stages"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains(&format!("the job its spec's claim names ({foreign}) is not known to Slurm as a job of dagrun-"))
            && error.contains("every job of it was cancelled, and Slurm reports them ended"),
        "{error}\n{}",
        o.stderr
    );
    assert_eq!(still.as_deref(), Some("RUNNING"), "the other job was left alone");
    wait_state(&saved_id(&ws.path("job")), "CANCELLED", Duration::from_secs(30));
    assert!(!ws.exists("runs.txt"));
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// Answers of `sbatch` that are neither a job id nor a plain refusal:
/// killed by a signal after the job was made (the job is cancelled and the
/// work submitted again); an id printed by a wrapper whose helper keeps
/// the output open (used after a short grace, not turned into a timeout);
/// an error printed after the job was made (the job is cancelled, the
/// stage fails with the error). No job is left running unwatched.
#[test]
fn sbatch_answers_without_a_job_id_never_leave_a_job_unwatched() {
    need_cluster!();
    let ws = cmd_ws("  submit_timeout: 120\nstages:\n  a:\n    cmd: echo a >> runs.txt; echo a > a.txt\n    outs: [a.txt]\n");
    let (first, third) = (ws.path("first"), ws.path("third"));
    let path = fake_sbatch(
        &ws,
        &format!(
            "n=$(wc -l < \"$CALLS\")\nif [ \"$n\" -eq 1 ]; then\n  \"$REAL\" --begin=now+600 \"$@\" > {first} || exit 1\n  kill -9 $$\nfi\nif [ \"$n\" -eq 2 ]; then\n  \"$REAL\" \"$@\" || exit 1\n  sleep 300 &\n  exit 0\nfi\n\"$REAL\" --begin=now+600 \"$@\" > {third} || exit 1\necho 'sbatch: error: Batch job submission failed: Protocol authentication error' >&2\nexit 1\n",
            first = first.display(),
            third = third.display()
        ),
    );
    let t0 = Instant::now();
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", &path);
    let o = spawn(c).wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(t0.elapsed() < Duration::from_secs(60), "the wrapper's answer waited for its helper: {:?}", t0.elapsed());
    let j1 = saved_id(&first);
    assert!(
        o.stderr.contains("sbatch was killed (signal: 9") && o.stderr.contains(&format!("it had submitted job {j1}, cancelled now; submitting it again")),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("did not answer"), "{}", o.stderr);
    wait_state(&j1, "CANCELLED", Duration::from_secs(30));
    assert_eq!((ws.count("runs.txt"), ws.count("sbatch-calls")), (1, 2));
    // An error after the job was made: that job is cancelled, the stage fails.
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml", "--force", "a"]);
    c.env("PATH", &path);
    let o = spawn(c).wait(SLURM_HANG);
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let j3 = saved_id(&third);
    assert!(
        o.stderr.contains(&format!(
            "sbatch refused the job: sbatch: error: Batch job submission failed: Protocol authentication error; it had submitted job {j3}, cancelled now"
        )),
        "{}",
        o.stderr
    );
    wait_state(&j3, "CANCELLED", Duration::from_secs(30));
    assert_eq!(ws.count("runs.txt"), 1);
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// SIGINT while a started job of a failed `sbatch` cannot be named
/// (squeue down): every job of that submission's name is cancelled
/// (`scancel --name`) and waited for, so nothing writes after dagrun exits.
#[test]
fn an_interrupt_cancels_a_started_job_that_slurm_cannot_name() {
    need_cluster!();
    let ws = cmd_ws("  submit_timeout: 60\nstages:\n  a:\n    cmd: touch started; if [ -f slow ]; then sleep 120; fi; echo a > a.txt\n    outs: [a.txt]\n");
    ws.write("slow", "");
    let (started, down) = (ws.path("started"), ws.path("squeue-down"));
    let path = fake_sbatch(
        &ws,
        &format!(
            "\"$REAL\" \"$@\" > {job} || exit 1\ni=0; while [ ! -e {started} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\ntouch {down}\necho 'sbatch: error: Batch job submission failed: Socket timed out on send/recv operation' >&2\nexit 1\n",
            job = ws.path("job").display(),
            started = started.display(),
            down = down.display()
        ),
    );
    squeue_down_while(&ws, &down);
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", &path);
    let bg = spawn(c);
    let t0 = Instant::now();
    while !down.exists() {
        assert!(t0.elapsed() < SLURM_HANG, "the job did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // sbatch failed: dagrun asks squeue which job started, in vain.
    std::thread::sleep(Duration::from_secs(2));
    signal(bg.pid() as i32, libc::SIGINT);
    std::thread::sleep(Duration::from_secs(2));
    std::fs::remove_file(&down).unwrap();
    let o = bg.wait(Duration::from_secs(120));
    assert_eq!(o.code, 130, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    let job = saved_id(&ws.path("job"));
    let rec = last_record(&ws.root);
    let error = rec["stages"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("interrupted while asking Slurm which job of dagrun-") && error.contains("every job of it was cancelled, and Slurm reports them ended"),
        "{rec}\n{}",
        o.stderr
    );
    // Ended before dagrun exited: asked at once, not waited for.
    let st = job_state(&job);
    assert!(st.as_deref() == Some("CANCELLED"), "job {job} is {st:?} after dagrun exited");
    assert!(!ws.exists("a.txt"));
    // The next run finds nothing of it running and does the work.
    std::fs::remove_file(ws.path("slow")).unwrap();
    let o = ok(run_in(&ws.root, &["run", "pipeline.yaml"]));
    assert!(!o.stderr.contains("of an earlier run"), "{}", o.stderr);
    assert_eq!(ws.read("a.txt"), "a\n");
    assert!(std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

/// SIGINT while `sbatch` does not answer: it is killed at once (not after
/// `submit_timeout`), the run ends with 130, nothing is left registered.
#[test]
fn an_interrupt_does_not_wait_for_an_sbatch_that_does_not_answer() {
    need_cluster!();
    let ws = cmd_ws("  submit_timeout: 600\nstages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let path = fake_sbatch(&ws, "exec sleep 600\n");
    let mut c = dagrun_in(&ws.root, &["run", "pipeline.yaml"]);
    c.env("PATH", &path);
    let bg = spawn(c);
    let t0 = Instant::now();
    while ws.count("sbatch-calls") == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "sbatch was not called");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t1 = Instant::now();
    signal(bg.pid() as i32, libc::SIGINT);
    let o = bg.wait(Duration::from_secs(120));
    assert_eq!(o.code, 130, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(t1.elapsed() < Duration::from_secs(30), "took {:?}", t1.elapsed());
    let rec = last_record(&ws.root);
    let error = rec["stages"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("could not submit the job to Slurm: sbatch was stopped by the interrupt before it answered"), "{rec}");
    assert!(!ws.exists("a.txt"));
    assert_eq!(ws.count("sbatch-calls"), 1, "not submitted again after the interrupt");
}

#[test]
fn executor_and_resources_are_checked_when_loading() {
    // No cluster needed: validation only.
    let ws = Ws::new();
    for (yaml, want) in [
        ("executor: cloud\nstages:\n  a:\n    cmd: echo\n", "unknown variant `cloud`"),
        ("stages:\n  a:\n    cmd: echo\n    resources: { mem: lots }\n", "resources.mem: lots` is not a Slurm memory size"),
        ("stages:\n  a:\n    cmd: echo\n    resources: { sbatch_args: [\"--export=ALL\"] }\n", "sets an option dagrun sets itself"),
        ("stages:\n  a:\n    cmd: echo\n    resources: { cpus: 0 }\n", "cpus` must be at least 1"),
        ("slurm:\n  binary: dagrun\nstages:\n  a:\n    cmd: echo\n", "must be an absolute path"),
        ("slurm:\n  submit_timeout: 0\nstages:\n  a:\n    cmd: echo\n", "submit_timeout: 0` must be between 1 and 3600 seconds"),
        (
            "stages:\n  a:\n    cmd: echo > a\n    outs: [a]\n    group: g\n  b:\n    cmd: cat a > b\n    deps: [a]\n    outs: [b]\n  c:\n    cmd: cat b > c\n    deps: [b]\n    outs: [c]\n    group: g\n",
            "stage b is not in the group but lies between two of its stages",
        ),
    ] {
        ws.pipeline(yaml);
        let o = ws.dagrun(&["status", "pipeline.yaml"]);
        assert_eq!(o.code, 2, "{yaml}\n{}", o.stderr);
        assert!(o.stderr.contains(want), "{yaml}\nwant {want:?} in:\n{}", o.stderr);
    }
    // A master key in a variable never goes to a job: refused before sbatch,
    // once, as a setting (exit 2: review 69 had one failed stage per root).
    ws.pipeline("executor: slurm\nstages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n  b:\n    cmd: echo b > b.txt\n    outs: [b.txt]\n");
    let mut c = ws.cmd(&["run", "pipeline.yaml"]);
    c.env("DAGRUN_MASTER_KEY", "5eed5eed00112233445566778899aabbccddeeff00112233445566778899aabb");
    let o = spawn(c).wait(HANG);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(o.stderr.matches("DAGRUN_MASTER_KEY is set, but a Slurm job never receives a secret").count(), 1, "{}", o.stderr);
    assert!(!o.stderr.contains("5eed5eed"), "{}", o.stderr);
    assert!(!ws.exists(".dagrun/slurm/active") || std::fs::read_dir(ws.path(".dagrun/slurm/active")).unwrap().next().is_none());
}

// ---------------------------------------------------------------------------
// Failure states that need a cluster configured for them (memory enforced by
// cgroups, preemption) or that take its node down (NODE_FAIL): a private
// single-node cluster per test, started beside the shared one (its own
// slurm.conf, ports, state, logs and job ids; the same munge), and stopped at
// the end of the test. The shared cluster and other tests' jobs are untouched.
// ---------------------------------------------------------------------------

/// One private cluster at a time (they are heavy on 2 cores).
static PRIVATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Private {
    dir: Ws,
    conf: PathBuf,
    /// Memory is enforced (task/cgroup with ConstrainRAMSpace).
    cgroups: bool,
    _one: std::sync::MutexGuard<'static, ()>,
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// cgroup v1 memory controller we may create groups in (what Slurm 22.05's
/// cgroup/v1 plugin needs to enforce `--mem`).
fn memory_cgroup_usable() -> bool {
    let probe = Path::new("/sys/fs/cgroup/memory").join(format!("dagrun-probe-{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok() && probe.join("memory.limit_in_bytes").exists();
    let _ = std::fs::remove_dir(&probe);
    ok
}

impl Private {
    /// Start a private cluster: node `localhost` (2 CPUs, 2000 MB), partitions
    /// `low` (default) and `high` (higher PriorityTier; preempts `low` with
    /// PreemptMode=CANCEL). With `cgroups`, memory is enforced.
    fn start(cgroups: bool) -> Private {
        Private::start_with(cgroups, 300)
    }

    /// `start`, with slurmctld forgetting finished jobs after `min_job_age` seconds.
    fn start_with(cgroups: bool, min_job_age: u32) -> Private {
        let one = PRIVATE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = Ws::new();
        let d = dir.root.display().to_string();
        for sub in ["ctld", "slurmd"] {
            std::fs::create_dir_all(dir.path(sub)).unwrap();
        }
        let (ctld_port, slurmd_port) = (free_port(), free_port());
        // Job ids apart from the shared cluster's and from an earlier private one (cgroup paths carry them).
        let first_job = 10_000_000 + (std::process::id() % 1000) * 10_000 + (SystemTimeSecs::now() % 10) * 1000;
        let task = if cgroups { "task/cgroup" } else { "task/none" };
        let conf = format!(
            "ClusterName=dagrun-private\nSlurmctldHost=localhost\nSlurmctldPort={ctld_port}\nSlurmdPort={slurmd_port}\nSlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nCryptoType=crypto/munge\nMpiDefault=none\nMailProg=/bin/true\n\
             StateSaveLocation={d}/ctld\nSlurmdSpoolDir={d}/slurmd\nSlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin={task}\nJobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/filetxt\nJobCompLoc={d}/jobcomp.log\n\
             SchedulerType=sched/backfill\nSchedulerParameters=batch_sched_delay=0,sched_min_interval=0\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\nDefMemPerCPU=100\n\
             PreemptType=preempt/partition_prio\nPreemptMode=CANCEL\n\
             ReturnToService=2\nMinJobAge={min_job_age}\nFirstJobId={first_job}\n\
             NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN\n\
             PartitionName=low Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1\n\
             PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=2\n"
        );
        dir.write("slurm.conf", conf);
        dir.write("cgroup.conf", "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nConstrainRAMSpace=yes\n");
        let p = Private { conf: dir.path("slurm.conf"), dir, cgroups, _one: one };
        let daemon = |prog: &str, extra: &[&str]| {
            let o = p.cmd(prog).arg("-f").arg(&p.conf).args(extra).output().unwrap();
            assert!(o.status.success(), "{prog} of the private cluster did not start: {}\n{}", String::from_utf8_lossy(&o.stderr), p.logs());
        };
        daemon("slurmctld", &[]);
        daemon("slurmd", &["-N", "localhost"]);
        let t0 = Instant::now();
        while p.node_state() != "idle" {
            assert!(t0.elapsed() < Duration::from_secs(60), "private cluster not ready (node {:?})\n{}", p.node_state(), p.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
        // If this test process is killed (no Drop), a watchdog stops the daemons once it is gone.
        let pids: Vec<String> = ["slurmd", "slurmctld"]
            .iter()
            .filter_map(|n| std::fs::read_to_string(p.dir.path(&format!("{n}.pid"))).ok())
            .map(|s| s.trim().to_string())
            .collect();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 2; done; for p in {}; do case $(cat /proc/$p/comm 2>/dev/null) in slurm*) kill $p;; esac; done",
                std::process::id(),
                pids.join(" ")
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        p
    }

    /// A Slurm client command aimed at this cluster.
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// dagrun in `root`, talking to this cluster.
    fn dagrun(&self, root: &Path, args: &[&str]) -> Command {
        let mut c = dagrun_in(root, args);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn node_state(&self) -> String {
        let o = self.cmd("sinfo").args(["-h", "-n", "localhost", "-o", "%t"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string()
    }

    fn job_state(&self, id: &str) -> String {
        let o = self.cmd("squeue").args(["-h", "-t", "all", "-j", id, "-o", "%T"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// The job the dagrun run in `root` has registered, once Slurm runs it.
    fn running_job(&self, root: &Path) -> String {
        let t0 = Instant::now();
        loop {
            if let Ok(rd) = std::fs::read_dir(root.join(".dagrun/slurm/active")) {
                for e in rd.flatten() {
                    let id = e.file_name().to_string_lossy().into_owned();
                    if id.bytes().all(|b| b.is_ascii_digit()) && self.job_state(&id) == "RUNNING" {
                        return id;
                    }
                }
            }
            assert!(t0.elapsed() < SLURM_HANG, "no running job registered after {SLURM_HANG:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        let tail = |f: &str| {
            let t = std::fs::read_to_string(self.dir.path(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!("--- slurmctld.log:\n{}\n--- slurmd.log:\n{}", tail("slurmctld.log"), tail("slurmd.log"))
    }
}

/// Seconds since the epoch.
struct SystemTimeSecs;
impl SystemTimeSecs {
    fn now() -> u32 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as u32
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--full", "--user=root"]).output();
        // slurmd first (it ends its jobs' steps), then slurmctld; by their pid files.
        for name in ["slurmd", "slurmctld"] {
            let Ok(pid) = std::fs::read_to_string(self.dir.path(&format!("{name}.pid"))) else { continue };
            let Ok(pid) = pid.trim().parse::<i32>() else { continue };
            signal(pid, libc::SIGTERM);
            let t0 = Instant::now();
            while signal(pid, 0) && t0.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if signal(pid, 0) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// A `cmd` workspace for the private cluster.
fn private_ws(stages: &str) -> Ws {
    let ws = Ws::new();
    ws.pipeline(&format!("executor: slurm\nslurm:\n  poll_interval: 0.3\nstages:\n{stages}"));
    ws
}

#[test]
fn a_job_over_its_memory_limit_fails_as_out_of_memory_and_is_retried() {
    need_cluster!(); // starts munge
    if !memory_cgroup_usable() {
        eprintln!(
            "\n!!! SKIPPING the OUT_OF_MEMORY test: no writable cgroup v1 memory controller at /sys/fs/cgroup/memory, so Slurm cannot enforce `mem:` here\n"
        );
        return;
    }
    let pc = Private::start(true);
    assert!(pc.cgroups);
    let ws = private_ws(
        "  small:\n    cmd: echo run >> small-runs.txt; echo small > small.txt\n    outs: [small.txt]\n    group: g\n  hungry:\n    deps: [small.txt]\n    group: g\n    cmd: echo attempt >> attempts.txt; python3 -c 'b = bytearray(400 * 1024 * 1024); open(\"hungry.txt\", \"w\").write(str(len(b)))'\n    outs: [hungry.txt]\n    resources: { mem: 60M }\n    retries: 1\n",
    );
    let o = spawn(pc.dagrun(&ws.root, &["run", "pipeline.yaml"])).wait(SLURM_HANG);
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}\n{}", o.stdout, o.stderr, pc.logs());
    assert_eq!(ws.count("attempts.txt"), 2, "retries: 1 resubmits after OUT_OF_MEMORY:\n{}", o.stderr);
    assert!(o.stderr.contains("failed (attempt 1 of 2)") && o.stderr.contains("failed after 2 attempts"), "{}", o.stderr);
    // Both attempts: the job id, the state, the fix, the end of the job's log (slurmstepd's oom-kill line).
    let mut ids: Vec<String> = o.stderr.split("submitted Slurm job ").skip(1).map(|t| t.chars().take_while(char::is_ascii_digit).collect()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 2, "{}", o.stderr);
    for id in &ids {
        assert_eq!(pc.job_state(id), "OUT_OF_MEMORY", "job {id}");
        assert!(o.stderr.contains(&format!("Slurm job {id} ended OUT_OF_MEMORY")), "{}", o.stderr);
    }
    assert!(o.stderr.contains("raise `resources.mem`"), "{}", o.stderr);
    assert!(o.stderr.contains("oom-kill event"), "the end of the job's log is shown:\n{}", o.stderr);
    assert!(!ws.exists("hungry.txt") && !ws.exists(".dagrun/state/hungry.json"));
    // small ran in the same job as hungry's first attempt and finished: it is recorded, and the retry job did not rerun it.
    assert!(ws.exists(".dagrun/state/small.json"), "the member the job finished is recorded");
    assert_eq!(ws.count("small-runs.txt"), 1);
    let rec = last_record(&ws.root);
    let st = |n: &str| rec["stages"].as_array().unwrap().iter().find(|s| s["stage"] == n).unwrap().clone();
    assert_eq!(st("small")["status"], "ran");
    assert_eq!(st("small")["slurm_job"], format!("slurm:{}", ids[0]), "small and hungry's first attempt shared a job");
    assert_eq!(st("hungry")["status"], "failed");
}

#[test]
fn a_node_failure_fails_the_job_as_node_fail_and_retries_resubmit() {
    need_cluster!();
    let pc = Private::start(false);
    // Attempt 1 waits to be killed; attempt 2 finishes.
    let ws = private_ws(
        "  work:\n    cmd: echo attempt >> attempts.txt; if [ $(wc -l < attempts.txt) -eq 1 ]; then echo waiting; sleep 120; fi; echo done > work.txt\n    outs: [work.txt]\n    retries: 1\n",
    );
    let bg = spawn(pc.dagrun(&ws.root, &["run", "pipeline.yaml"]));
    let id = pc.running_job(&ws.root);
    // The job script has started (so the job has a log to show).
    let t0 = Instant::now();
    while !ws.exists("attempts.txt") {
        assert!(t0.elapsed() < SLURM_HANG, "job {id} never started its command");
        std::thread::sleep(Duration::from_millis(100));
    }
    let down = pc.cmd("scontrol").args(["update", "nodename=localhost", "state=down", "reason=dagrun-test-node-fail"]).output().unwrap();
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    let t0 = Instant::now();
    while pc.job_state(&id) != "NODE_FAIL" {
        assert!(t0.elapsed() < Duration::from_secs(30), "job {id} is {:?}, not NODE_FAIL", pc.job_state(&id));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Bring the node back; the retry runs on it.
    let _ = pc.cmd("scontrol").args(["update", "nodename=localhost", "state=resume"]).output();
    let o = bg.wait(SLURM_HANG);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}\n{}", o.stdout, o.stderr, pc.logs());
    assert!(o.stderr.contains(&format!("Slurm job {id} ended NODE_FAIL")), "{}", o.stderr);
    assert!(o.stderr.contains("failed (attempt 1 of 2)"), "{}", o.stderr);
    assert!(o.stderr.contains("DUE TO NODE FAILURE"), "the end of the job's log is shown:\n{}", o.stderr);
    assert_eq!(ws.count("attempts.txt"), 2);
    assert_eq!(ws.read("work.txt"), "done\n");
    // dagrun submits with --no-requeue: Slurm did not run the failed job again behind its back.
    assert_eq!(pc.job_state(&id), "NODE_FAIL");
    let rec = ok(spawn(pc.dagrun(&ws.root, &["runs", "show", "last", "--json"])).wait(HANG)).json();
    let job = rec["stages"][0]["slurm_job"].as_str().unwrap().to_string();
    assert_ne!(job, format!("slurm:{id}"), "the stage is recorded with the retry's job");
}

#[test]
fn a_preempted_job_fails_as_preempted() {
    need_cluster!();
    let pc = Private::start(false);
    // `&&`: when Slurm signals the job's processes one by one, the shell can outlive a killed `sleep` for an instant.
    let ws = private_ws(
        "  low:\n    cmd: echo started > started.txt; sleep 120 && echo x > low.txt\n    outs: [low.txt]\n    resources: { cpus: 2, mem: 100M, partition: low }\n",
    );
    let bg = spawn({
        let mut c = pc.dagrun(&ws.root, &["run", "pipeline.yaml"]);
        c.env("RUST_LOG", "dagrun::executor=debug");
        c
    });
    let id = pc.running_job(&ws.root);
    let t0 = Instant::now();
    while !ws.exists("started.txt") {
        assert!(t0.elapsed() < SLURM_HANG, "job {id} never started its command");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A job in the higher-priority partition needs the node's CPUs: Slurm preempts ours.
    let hi = pc.cmd("sbatch").args(["--parsable", "-p", "high", "-c", "2", "--mem=100M", "-o", "/dev/null", "--wrap", "sleep 1"]).output().unwrap();
    assert!(hi.status.success(), "{}", String::from_utf8_lossy(&hi.stderr));
    let o = bg.wait(SLURM_HANG);
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}\n{}", o.stdout, o.stderr, pc.logs());
    assert!(o.stderr.contains("stage low failed"), "{}", o.stderr);
    assert!(o.stderr.contains(&format!("Slurm job {id} ended PREEMPTED")), "{}", o.stderr);
    assert!(o.stderr.contains("DUE TO PREEMPTION"), "the end of the job's log is shown:\n{}", o.stderr);
    assert_eq!(pc.job_state(&id), "PREEMPTED", "--no-requeue: not requeued");
    // This cluster has no accounting database: sacct said so, and states came from squeue.
    assert!(o.stderr.contains("job states from squeue: sacct: Slurm accounting storage is disabled"), "{}", o.stderr);
    assert!(!ws.exists("low.txt"));
}

#[test]
fn a_job_slurmctld_has_forgotten_is_found_in_the_job_completion_log() {
    need_cluster!();
    // slurmctld forgets finished jobs after 2 s (MinJobAge); there is no accounting database.
    let pc = Private::start_with(false, 2);
    let ws = private_ws("  quick:\n    cmd: echo started > started.txt; sleep 2; echo 'no such widget' >&2; exit 3\n    outs: [quick.txt]\n");
    let bg = spawn(pc.dagrun(&ws.root, &["run", "pipeline.yaml"]));
    let id = pc.running_job(&ws.root);
    // Freeze dagrun while its job runs, fails and is purged from slurmctld's memory.
    signal(bg.pid() as i32, libc::SIGSTOP);
    let t0 = Instant::now();
    loop {
        let o = pc.cmd("scontrol").args(["-o", "show", "job", &id]).output().unwrap();
        if !o.status.success() {
            break; // "Invalid job id specified": purged
        }
        if t0.elapsed() > Duration::from_secs(60) {
            signal(bg.pid() as i32, libc::SIGCONT);
            panic!("job {id} still known to slurmctld after 60 s: {}", String::from_utf8_lossy(&o.stdout));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let listed = pc.job_state(&id);
    signal(bg.pid() as i32, libc::SIGCONT);
    assert_eq!(listed, "", "squeue no longer lists job {id}");
    let o = bg.wait(SLURM_HANG);
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}\n{}", o.stdout, o.stderr, pc.logs());
    // squeue and scontrol no longer know the job: its final state came from the job-completion log.
    assert!(o.stderr.contains(&format!("(Slurm job {id}, FAILED;")), "{}", o.stderr);
    assert!(o.stderr.contains("no such widget"), "{}", o.stderr);
    assert!(!o.stderr.contains("LOST"), "{}", o.stderr);
}

/// A fresh workspace under Slurm: each tenant's encrypt job is its own
/// process and makes its tenant's first keys at the same time as the other's
/// (review 12: each wrote back its own copy of the keyring, and one tenant's
/// keys were lost while the audit log said they were made). Both tenants'
/// keys are kept, the audit log verifies, and a local run finds all fresh.
#[test]
fn jobs_making_their_tenants_first_keys_at_once_keep_each_others() {
    need_cluster!();
    let ws = propensity_ws(None);
    let o = ok(run_in(&ws.root, &["run", PIPE, "-p", &format!("rows={ROWS}"), "--executor", "slurm", "-j", "4"]));
    assert!(o.stdout.contains("14 stages: 14 ran"), "{}", o.stdout);
    let keys = ok(run_in(&ws.root, &["keys", "list"])).stdout;
    for t in TENANTS {
        for id in [format!("{t}-dk-1"), format!("{t}-pk-1")] {
            assert!(keys.contains(&id), "{id} is not in the keyring:\n{keys}");
        }
    }
    ok(run_in(&ws.root, &["keys", "audit", "--verify"]));
    let again = ok(run_in(&ws.root, &["run", PIPE, "-p", &format!("rows={ROWS}")]));
    assert!(again.stdout.contains("all 14 stages up to date"), "{}", again.stdout);
}
