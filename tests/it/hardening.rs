//! Secrets, child environment, symlinks, file modes and input bounds (issue 9,
//! findings 3, 5, 7–12), on the real binary:
//! - a `cmd` stage never sees the master key variables or the pipeline's
//!   `secrets:`, and param values are data, not shell code;
//! - `status` and `--dry-run` create no key; dagrun runs with core dumps off;
//! - logs and outputs are never written through a planted symlink, outputs
//!   never land in `.dagrun/` or `config/`, plaintext PII files are 0600;
//! - a data file's unexpected header or tenant id is described, never echoed
//!   (stderr and run record);
//! - deeply nested YAML, an oversized tenant list, a huge CSV field and an
//!   absurd `rows` are refused quickly with a clear error, never an abort.

use crate::common::{Bg, HANG, Out, Ws, ok, signal, spawn};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MASTER: &str = "5f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f5";

/// A workspace with the shipped pipelines and a tenant list.
fn shipped(tenants: &str) -> Ws {
    crate::common::shipped_workspace(tenants)
}

const ONE: &str = "tenants:\n  - id: Tenant_A\n";
const TWO: &str = "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n";

fn cmd(ws: &Ws, args: &[&str]) -> Command {
    let mut c = ws.cmd(args);
    c.env_remove("DAGRUN_MASTER_KEY").env_remove("DAGRUN_MASTER_KEY_FILE");
    c
}

fn dg(ws: &Ws, args: &[&str]) -> Out {
    let o = spawn(cmd(ws, args)).wait(HANG);
    assert!(!o.stderr.contains("panicked"), "dagrun {args:?} panicked:\n{}", o.stderr);
    o
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every file under the workspace, as one byte string per file.
fn all_files(ws: &Ws) -> Vec<(String, Vec<u8>)> {
    ws.walk().into_iter().filter(|p| ws.path(p).is_file()).map(|p| (p.clone(), std::fs::read(ws.path(&p)).unwrap())).collect()
}

fn holds(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn cmd_stages_never_see_the_master_key_or_the_pipelines_secrets() {
    let ws = Ws::new();
    ws.pipeline(
        "secrets: [MY_API_TOKEN, AWS_SECRET_*]\nstages:\n  dump:\n    cmd: env > env.txt; env\n    outs: [env.txt]\n    env: { DECLARED: yes-declared }\n",
    );
    let mut c = cmd(&ws, &["run", "pipeline.yaml"]);
    c.env("DAGRUN_MASTER_KEY", MASTER)
        .env("DAGRUN_MASTER_KEY_FILE", "/nonexistent/master.key")
        .env("DAGRUN_MASTER_KEY_PIN", "pin-4711-secret")
        .env("MY_API_TOKEN", "tok-secret-value-1")
        .env("AWS_SECRET_ACCESS_KEY", "aws-secret-value-2")
        .env("KEEP_ME", "visible-value");
    let o = spawn(c).wait(HANG);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let env = ws.read("env.txt");
    for secret in [MASTER, "/nonexistent/master.key", "pin-4711-secret", "tok-secret-value-1", "aws-secret-value-2"] {
        assert!(!env.contains(secret), "a secret reached the command's environment:\n{env}");
        for (p, bytes) in all_files(&ws) {
            assert!(!holds(&bytes, secret), "{p} holds a secret");
        }
    }
    for name in ["DAGRUN_MASTER_KEY", "MY_API_TOKEN=", "AWS_SECRET_ACCESS_KEY="] {
        assert!(!env.contains(name), "{name} reached the command:\n{env}");
    }
    for seen in ["KEEP_ME=visible-value", "DECLARED=yes-declared", "DAGRUN_STAGE=dump", "DAGRUN_WORKSPACE="] {
        assert!(env.lines().any(|l| l.starts_with(seen)), "{seen} missing:\n{env}");
    }
    // Declaring a withheld variable is refused at load time.
    ws.pipeline("secrets: [MY_API_TOKEN]\nstages:\n  a:\n    cmd: echo\n    env: { MY_API_TOKEN: x }\n");
    let o = dg(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("MY_API_TOKEN") && o.stderr.contains("withheld"), "{}", o.stderr);
    ws.pipeline("stages:\n  a:\n    cmd: echo\n    env: { DAGRUN_MASTER_KEY: x }\n");
    assert_eq!(dg(&ws, &["run", "pipeline.yaml"]).code, 2);
    // So is one dagrun sets itself: the run's mark (by which a later run
    // finds a killed run's processes) or a param's variable.
    for (name, pipeline) in [
        ("DAGRUN_RUN_MARK", "stages:\n  a:\n    cmd: echo\n    env: { DAGRUN_RUN_MARK: x }\n"),
        ("DAGRUN_PARAM_N", "params: { n: 'a b' }\nstages:\n  a:\n    cmd: echo ${params.n}\n    env: { DAGRUN_PARAM_N: x }\n"),
    ] {
        ws.pipeline(pipeline);
        let o = dg(&ws, &["run", "pipeline.yaml"]);
        assert_eq!(o.code, 2, "{}", o.stderr);
        assert!(o.stderr.contains(name) && o.stderr.contains("dagrun sets itself") && o.stderr.contains("pipeline.yaml"), "{}", o.stderr);
    }
}

#[test]
fn cloud_credentials_reach_a_command_only_when_the_pipeline_passes_them() {
    let ws = Ws::new();
    let creds = [
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-value-1"),
        ("AWS_SESSION_TOKEN", "aws-session-value-2"),
        ("AZURE_STORAGE_ACCOUNT_KEY", "azure-key-value-3"),
        ("GOOGLE_SERVICE_ACCOUNT_KEY", "gcp-key-value-4"),
        ("GOOGLE_BEARER_TOKEN", "gcp-bearer-value-5"),
        ("AWS_PROXY_URL", "http://u:proxy-pass-value-6@proxy"),
    ];
    let run = |ws: &Ws| {
        let mut c = cmd(ws, &["run", "pipeline.yaml", "--force"]);
        for (k, v) in creds {
            c.env(k, v);
        }
        c.env("AWS_ACCESS_KEY_ID", "AKIDVISIBLE").env("AWS_REGION", "eu-west-1");
        let o = spawn(c).wait(HANG);
        assert_eq!(o.code, 0, "{}", o.stderr);
        ws.read("env.txt")
    };
    ws.pipeline("stages:\n  dump:\n    cmd: env > env.txt\n    outs: [env.txt]\n");
    let env = run(&ws);
    for (k, v) in creds {
        assert!(!env.contains(k) && !env.contains(v), "{k} reached the command:\n{env}");
    }
    for seen in ["AWS_ACCESS_KEY_ID=AKIDVISIBLE", "AWS_REGION=eu-west-1"] {
        assert!(env.lines().any(|l| l == seen), "{seen} missing:\n{env}");
    }
    // Passed by name: those two, and only those.
    ws.pipeline("pass_env: [AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN]\nstages:\n  dump:\n    cmd: env > env.txt\n    outs: [env.txt]\n");
    let env = run(&ws);
    for seen in ["AWS_SECRET_ACCESS_KEY=aws-secret-value-1", "AWS_SESSION_TOKEN=aws-session-value-2"] {
        assert!(env.lines().any(|l| l == seen), "{seen} missing:\n{env}");
    }
    assert!(!env.contains("azure-key-value-3") && !env.contains("gcp-key-value-4") && !env.contains("proxy-pass-value-6"), "{env}");
    // A pass for what is not withheld, or for the master key, is a mistake (exit 2, naming it).
    for bad in ["DAGRUN_MASTER_KEY", "HOME", "AWS_REGION"] {
        ws.pipeline(&format!("pass_env: [\"{bad}\"]\nstages:\n  a:\n    cmd: echo\n"));
        let o = dg(&ws, &["run", "pipeline.yaml"]);
        assert_eq!(o.code, 2, "{}", o.stderr);
        assert!(o.stderr.contains("pipeline.yaml") && o.stderr.contains(bad) && o.stderr.contains("needs no pass"), "{}", o.stderr);
    }
    // And declaring a withheld credential under `env:` is refused as any secret is.
    ws.pipeline("stages:\n  a:\n    cmd: echo\n    env: { AWS_SECRET_ACCESS_KEY: x }\n");
    let o = dg(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("AWS_SECRET_ACCESS_KEY") && o.stderr.contains("withheld"), "{}", o.stderr);
}

#[test]
fn param_values_are_data_not_shell_code() {
    let ws = Ws::new();
    ws.pipeline(
        "params:\n  name: plain\nstages:\n  a:\n    cmd: echo ${params.name} > out.txt; echo \"[${params.name}]\" >> out.txt; printf '%s\\n' \"$DAGRUN_PARAM_NAME\" >> out.txt\n    outs: [out.txt]\n",
    );
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    assert_eq!(ws.read("out.txt"), "plain\n[plain]\nplain\n");
    for evil in ["x; touch injected #", "$(touch injected)", "`touch injected`", "'; touch injected; '", "\"; touch injected; \""] {
        let o = dg(&ws, &["run", "pipeline.yaml", "-p", &format!("name={evil}")]);
        assert_eq!(o.code, 0, "{evil}: {}", o.stderr);
        assert!(!ws.exists("injected"), "-p name={evil} ran shell code");
        assert_eq!(ws.read("out.txt"), format!("{evil}\n[{evil}]\n{evil}\n"), "{evil}");
    }
    // Review 40: places where the earlier quoting let a value run (a
    // here-document line read as a comment, quotes nested in `${V:-"…"}`,
    // `"…"` in backticks, the word `case`, `(` in `${V%% (*}`, `#` after
    // `$( … )`): a value that is not a plain word never enters the command.
    for tmpl in [
        "cat > out.txt <<EOF\n      # config for ${params.name}\n      EOF",
        "echo \"hello ${NAME:-\"${params.name}\"}\" > out.txt",
        "echo `echo \"${params.name}\"` > out.txt",
        "echo \"$(printf '%s' lower case)\" ${params.name} > out.txt",
        "N=\"a (b)\"; echo \"$(echo ${N%% (*})\" ${params.name} > out.txt",
        "echo \"$(echo v)\"#${params.name} > out.txt",
    ] {
        ws.pipeline(&format!("params:\n  name: plain\nstages:\n  a:\n    cmd: |\n      {tmpl}\n    outs: [out.txt]\n"));
        for evil in ["$(touch injected)", "x; touch injected;", "x\ntouch injected #"] {
            let o = dg(&ws, &["run", "pipeline.yaml", "-p", &format!("name={evil}")]);
            assert!(o.code == 0 || o.code == 2, "{tmpl} / {evil}: {}", o.stderr);
            assert!(!ws.exists("injected"), "-p name={evil} ran shell code in {tmpl:?}: {}", o.stderr);
        }
    }
}

#[test]
fn status_and_dry_run_create_no_keys_and_agree_with_the_run() {
    let ws = shipped(TWO);
    let p = "pipelines/propensity.yaml";
    ok(dg(&ws, &["status", p, "-p", "rows=3000"]));
    ok(dg(&ws, &["status", p, "-p", "rows=3000", "--json"]));
    let dry = ok(dg(&ws, &["run", p, "-p", "rows=3000", "--dry-run", "--json"]));
    assert!(!ws.exists(".dagrun/keys/master.key") && !ws.exists(".dagrun/keys/keyring.json"), "status or --dry-run created a key: {:?}", ws.walk());
    assert!(dry.stdout.contains("encrypt[Tenant_A]"));
    let run = ws.run_cmd(cmd(&ws, &["run", p, "-p", "rows=3000", "--json"])).ok();
    assert!(ws.exists(".dagrun/keys/master.key") && ws.exists(".dagrun/keys/keyring.json"));
    // The key id the cache key used before the key existed is the one the run created.
    let key_of = |name: &str| run.stage(name)["key"].as_str().unwrap().to_string();
    let st = ok(dg(&ws, &["status", p, "-p", "rows=3000", "--json"])).json();
    assert!(st["stages"].as_array().unwrap().iter().all(|s| s["state"] == "fresh"), "{st:#}");
    let state: serde_json::Value = serde_json::from_str(&ws.read(".dagrun/state/encrypt[Tenant_A].json")).unwrap();
    assert_eq!(state["key"].as_str().unwrap(), key_of("encrypt[Tenant_A]"));
    assert!(state.to_string().contains("Tenant_A-dk-1"));
    // A rotation: status still writes nothing to the keyring and names the rerun.
    ok(dg(&ws, &["keys", "rotate", "Tenant_A"]));
    let ring = ws.read(".dagrun/keys/keyring.json");
    let st = ok(dg(&ws, &["status", p, "-p", "rows=3000"]));
    assert!(st.stdout.contains("Tenant_A-dk-2"), "{}", st.stdout);
    assert_eq!(ws.read(".dagrun/keys/keyring.json"), ring, "status changed the keyring");
}

#[test]
fn dagrun_runs_with_core_dumps_off_and_gives_commands_their_limit_back() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo $$ > child.pid; sleep 30\n");
    let mut c = cmd(&ws, &["run", "pipeline.yaml"]);
    c.env("DAGRUN_MASTER_KEY", MASTER);
    // SAFETY: the closure runs in the forked child before exec: it only calls
    // setrlimit (async-signal-safe) on a local; no allocation, no lock.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
            libc::setrlimit(libc::RLIMIT_CORE, &unlimited);
            Ok(())
        });
    }
    let bg: Bg = spawn(c);
    let pid = bg.pid();
    let t0 = std::time::Instant::now();
    while !ws.exists("child.pid") || ws.read("child.pid").trim().is_empty() {
        assert!(t0.elapsed() < HANG, "the command never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let core_limit = |pid: &str| -> String {
        let l = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        l.lines().find(|l| l.starts_with("Max core file size")).unwrap().split_whitespace().nth(4).unwrap().to_string()
    };
    assert_eq!(core_limit(&pid.to_string()), "0", "dagrun may dump core (and the keys in its memory)");
    assert_eq!(core_limit(ws.read("child.pid").trim()), "unlimited", "the command did not get the user's core limit back");
    // SIGABRT, which dumps core by default: no core file appears.
    signal(pid as i32, libc::SIGABRT);
    let o = bg.wait(HANG);
    assert_eq!(o.code, 128 + libc::SIGABRT, "{}", o.stderr);
    std::thread::sleep(Duration::from_millis(200));
    let cores: Vec<String> = ws.walk().into_iter().filter(|p| p.starts_with("core")).collect();
    assert!(cores.is_empty(), "core files written: {cores:?}");
}

#[test]
fn logs_are_never_written_through_a_planted_link() {
    let ws = Ws::new();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    ws.pipeline("stages:\n  a:\n    cmd: echo to-the-log; echo to-stderr >&2\n");
    std::fs::create_dir_all(ws.path(".dagrun/logs")).unwrap();
    std::os::unix::fs::symlink(&victim, ws.path(".dagrun/logs/a.out")).unwrap();
    std::fs::hard_link(&victim, ws.path(".dagrun/logs/a.err")).unwrap();
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "a log was written through a planted link");
    assert_eq!(ws.read(".dagrun/logs/a.out"), "to-the-log\n");
    assert_eq!(ws.read(".dagrun/logs/a.err"), "to-stderr\n");
    assert!(!ws.path(".dagrun/logs/a.out").symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(mode(&ws.path(".dagrun/logs/a.out")), 0o600);
    // A linked logs folder is refused, naming it; nothing is written outside.
    std::fs::remove_dir_all(ws.path(".dagrun/logs")).unwrap();
    std::os::unix::fs::symlink(outside.path(), ws.path(".dagrun/logs")).unwrap();
    let o = dg(&ws, &["run", "pipeline.yaml", "--force"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains(".dagrun/logs") && o.stderr.contains("symlink"), "{}", o.stderr);
    assert!(!outside.path().join("a.out").exists());
}

#[test]
fn lineage_masks_the_credentials_of_a_url_in_a_command() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo https://me:hunter2-secret@example.invalid/x > a.txt\n    outs: [a.txt]\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    for args in [&["lineage", "a.txt"][..], &["lineage", "a.txt", "--json"]] {
        let o = ok(dg(&ws, args));
        assert!(!o.stdout.contains("hunter2") && !o.stdout.contains("me:"), "{args:?}:\n{}", o.stdout);
        assert!(o.stdout.contains("https://***@example.invalid/x"), "{args:?}:\n{}", o.stdout);
    }
    let j: serde_json::Value = serde_json::from_str(&ok(dg(&ws, &["lineage", "a.txt", "--json"])).stdout).unwrap();
    let cmd = "echo https://me:hunter2-secret@example.invalid/x > a.txt";
    assert_eq!(j["cmd_blake3"], blake3::hash(cmd.as_bytes()).to_hex().as_str(), "{j}");
}

/// Review 69 H4: a credential passed as a param value (which reaches the
/// command through `DAGRUN_PARAM_*`, not its text) was shown whole in the
/// rerun reasons, `dagrun lineage`, the run record, the report and the
/// OpenLineage `executionParameters` facet. The command still gets it whole.
#[test]
fn a_credential_in_a_param_value_is_masked_wherever_dagrun_shows_it() {
    let ws = Ws::new();
    ws.pipeline("params:\n  src: https://example.invalid/x\nstages:\n  fetch:\n    cmd: echo ${params.src} > src.txt\n    outs: [src.txt]\n");
    ok(dg(&ws, &["run", "pipeline.yaml", "-p", "src=https://alice:S3cr3tPw@db.example.invalid/x.csv?token=tkn123"]));
    let again = ok(dg(&ws, &["run", "pipeline.yaml", "-p", "src=https://alice:0therPw@db.example.invalid/x.csv"]));
    assert_eq!(ws.read("src.txt"), "https://alice:0therPw@db.example.invalid/x.csv\n", "the command gets the value whole");
    let mut shown = vec![again.stdout.clone(), again.stderr.clone()];
    assert!(again.stdout.contains("param src: https://***@db.example.invalid/x.csv?… → https://***@db.example.invalid/x.csv"), "{}", again.stdout);
    for args in [&["lineage", "src.txt"][..], &["lineage", "src.txt", "--json"], &["runs", "show", "last", "--json"], &["status", "pipeline.yaml", "--json"]] {
        shown.push(ok(dg(&ws, args)).stdout);
    }
    ok(dg(&ws, &["report", "-o", "report.html"]));
    shown.push(ws.read("report.html"));
    for f in ws.walk().into_iter().filter(|p| p.starts_with("runs/")) {
        shown.push(String::from_utf8_lossy(&std::fs::read(ws.path(&f)).unwrap()).into_owned());
    }
    for text in &shown {
        for secret in ["S3cr3tPw", "0therPw", "tkn123", "alice"] {
            assert!(!text.contains(secret), "{secret} shown:\n{text}");
        }
    }
    assert!(shown.iter().any(|t| t.contains("openlineage") && t.contains("executionParameters")), "the run's OpenLineage events were not checked");
}

#[test]
fn own_folders_planted_as_links_are_refused_before_anything_is_written() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo hi > a.txt\n    outs: [a.txt]\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    for rel in [".dagrun", "runs", ".dagrun/openlineage/open", ".dagrun/state", ".dagrun/registry/Tenant_A"] {
        let outside = tempfile::tempdir().unwrap();
        let p = ws.path(rel);
        if p.is_dir() {
            std::fs::rename(&p, outside.path().join("moved")).unwrap();
        } else {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::create_dir(outside.path().join("moved")).unwrap();
        }
        std::os::unix::fs::symlink(outside.path().join("moved"), &p).unwrap();
        let before = std::fs::read_dir(outside.path().join("moved")).unwrap().count();
        // `status` and `run -n` save the hash memo: read-only views, refused alike (review 10).
        for args in [&["run", "pipeline.yaml", "--force"][..], &["gc"], &["report", "last"], &["status", "pipeline.yaml"], &["run", "-n", "pipeline.yaml"]] {
            let o = dg(&ws, args);
            assert_eq!(o.code, 2, "{rel} {args:?}: {}", o.stderr);
            assert!(o.stderr.contains(&p.display().to_string()) && o.stderr.contains("is a symlink"), "{rel} {args:?}: {}", o.stderr);
        }
        assert_eq!(std::fs::read_dir(outside.path().join("moved")).unwrap().count(), before, "{rel}: something was written through the link");
        std::fs::remove_file(&p).unwrap();
        std::fs::rename(outside.path().join("moved"), &p).unwrap();
    }
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    // A command that swaps a folder for a link while it runs fails its stage;
    // nothing of it, and no run record, goes through the link.
    let outside = tempfile::tempdir().unwrap();
    for rel in ["runs", ".dagrun/state"] {
        let target = outside.path().join(rel.replace('/', "_"));
        std::fs::create_dir(&target).unwrap();
        ws.pipeline(&format!("stages:\n  s:\n    cmd: mv {rel} {rel}.real && ln -s {} {rel} && echo x > s.txt\n    outs: [s.txt]\n", target.display()));
        let o = dg(&ws, &["run", "pipeline.yaml"]);
        assert_ne!(o.code, 0, "{rel}: {}", o.stderr);
        assert!(o.stderr.contains(&format!("{} is a symlink", ws.path(rel).display())), "{rel}: {}", o.stderr);
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{rel}: something was written through the link");
        std::fs::remove_file(ws.path(rel)).unwrap();
        std::fs::rename(ws.path(&format!("{rel}.real")), ws.path(rel)).unwrap();
    }
}

#[test]
fn outputs_never_land_in_dagrun_or_config_through_a_link() {
    let ws = Ws::new();
    ws.write("config/tenants.yaml", ONE);
    // A first run makes the workspace's master key.
    ws.pipeline("stages:\n  hello:\n    cmd: echo hi > hi.txt\n    outs: [hi.txt]\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    let master = std::fs::read(ws.path(".dagrun/keys/master.key")).unwrap();
    ws.pipeline(
        "stages:\n  mklink:\n    cmd: ln -s .dagrun/keys cfgkeys && ln -s config cfg\n  overwrite:\n    cmd: echo pwned > cfgkeys/master.key\n    outs: [cfgkeys/master.key]\n    needs: [mklink]\n  tenants:\n    cmd: echo pwned > cfg/tenants.yaml\n    outs: [cfg/tenants.yaml]\n    needs: [mklink]\n",
    );
    let o = dg(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("into .dagrun/") && o.stderr.contains("into config/"), "{}", o.stderr);
    assert_eq!(std::fs::read(ws.path(".dagrun/keys/master.key")).unwrap(), master);
    assert_eq!(ws.read("config/tenants.yaml"), ONE);
    // With the links in place, loading refuses the pipeline (exit 2).
    let o = dg(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("symlink cfgkeys"), "{}", o.stderr);
    // And config/ is not an output folder even without a link.
    ws.pipeline("stages:\n  a:\n    cmd: echo x > config/tenants.yaml\n    outs: [config/tenants.yaml]\n");
    let o = dg(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("inside config/"), "{}", o.stderr);
    assert_eq!(ws.read("config/tenants.yaml"), ONE);
}

#[test]
fn plaintext_pii_files_are_private_while_they_exist() {
    let ws = shipped(ONE);
    ws.pipeline(
        "stages:\n  generate:\n    foreach: tenants\n    uses: generate\n    with:\n      rows: 300\n      seed: 1\n      as_of: 2026-01-01\n      output: data/raw/${tenant}.parquet\n  mode:\n    cmd: stat -c %a data/raw/Tenant_A.parquet > mode.txt\n    deps: [data/raw/Tenant_A.parquet]\n    outs: [mode.txt]\n",
    );
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    assert_eq!(ws.read("mode.txt").trim(), "600", "generated plaintext PII was readable by others");
    // Ingest's plaintext, and `dagrun sample`'s files.
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "300", "--out", "incoming/Tenant_A.csv"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "30", "--out", "s.parquet"]));
    assert_eq!(mode(&ws.path("incoming/Tenant_A.csv")), 0o600);
    assert_eq!(mode(&ws.path("s.parquet")), 0o600);
    ws.pipeline(
        "stages:\n  ingest:\n    foreach: tenants\n    uses: ingest\n    with:\n      input: incoming/${tenant}.csv\n      output: data/raw/${tenant}.parquet\n  mode:\n    cmd: stat -c %a data/raw/Tenant_A.parquet > mode.txt\n    deps: [data/raw/Tenant_A.parquet]\n    outs: [mode.txt]\n",
    );
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    assert_eq!(ws.read("mode.txt").trim(), "600", "ingested plaintext PII was readable by others");
}

/// The e-mail addresses of a sample CSV.
fn emails(csv: &str) -> Vec<String> {
    csv.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().to_string()).collect()
}

#[test]
fn data_errors_describe_values_never_echo_them() {
    let ws = shipped(ONE);
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "200", "--out", "good.csv"]));
    let good = ws.read("good.csv");
    let pii = emails(&good);
    let check = |o: &Out, rec: &serde_json::Value, needles: &[&str], what: &str| {
        for n in needles {
            assert!(o.stderr.contains(n), "{what}: stderr lacks {n:?}:\n{}", o.stderr);
        }
        let text = format!("{}{}{rec}", o.stdout, o.stderr);
        for e in &pii {
            assert!(!text.contains(e.as_str()), "{what}: a Sensitive_Data value was echoed:\n{}", o.stderr);
        }
    };
    // A headerless file: its first row becomes the header.
    let headerless: String = good.lines().skip(1).map(|l| format!("{l}\n")).collect();
    ws.write("incoming/Tenant_A.csv", &headerless);
    let r = ws.run_cmd(cmd(&ws, &["run", "pipelines/propensity-ingest.yaml"]));
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    check(&r.out, r.rec(), &["line 1 (header), column 1", "unexpected column name (8 characters, text)", "lack its header line"], "headerless");
    // Tenant_ID and Sensitive_Data swapped in the header.
    let swapped = good.replacen("Tenant_ID,Customer_ID,Sensitive_Data", "Sensitive_Data,Customer_ID,Tenant_ID", 1);
    ws.write("incoming/Tenant_A.csv", &swapped);
    let r = ws.run_cmd(cmd(&ws, &["run", "pipelines/propensity-ingest.yaml"]));
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    check(&r.out, r.rec(), &["column Tenant_ID", "invalid tenant id (", "looks like an e-mail address"], "swapped");
}

#[test]
fn deeply_nested_yaml_is_refused_in_well_under_a_second() {
    let ws = shipped(ONE);
    ws.write("deep.yaml", "[".repeat((1 << 20) - 1));
    let o = spawn(cmd(&ws, &["status", "deep.yaml"])).wait(Duration::from_secs(10));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("deep.yaml:1:") && o.stderr.contains("nested too deeply"), "{}", o.stderr);
    assert!(o.elapsed < Duration::from_secs(5), "took {:?}", o.elapsed);
    // Block nesting, compact sequences, and an alias flood.
    let mut block = String::from("stages:\n");
    for i in 1..200 {
        block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
    }
    ws.write("deep.yaml", &block);
    let o = spawn(cmd(&ws, &["status", "deep.yaml"])).wait(Duration::from_secs(10));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("nested too deeply"), "{}", o.stderr);
    ws.write("deep.yaml", format!("params:\n  x: {}\nstages: {{}}\n", "- ".repeat(400_000)));
    let o = spawn(cmd(&ws, &["status", "deep.yaml"])).wait(Duration::from_secs(10));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("deep.yaml:2:"), "{}", o.stderr);
    // The tenant list gets the same caps, and a size cap.
    ws.write("config/tenants.yaml", format!("tenants: {}", "[".repeat(500_000)));
    let o = spawn(cmd(&ws, &["status", "pipelines/propensity.yaml"])).wait(Duration::from_secs(10));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("config/tenants.yaml:1:") && o.stderr.contains("nested"), "{}", o.stderr);
    ws.write("config/tenants.yaml", format!("{}{ONE}", "# padding padding padding padding padding padding padding\n".repeat(40_000)));
    let o = dg(&ws, &["status", "pipelines/propensity.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("config/tenants.yaml") && o.stderr.contains("1 MiB"), "{}", o.stderr);
}

#[test]
fn huge_csv_fields_and_absurd_row_counts_fail_cleanly() {
    let ws = shipped(ONE);
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "300", "--out", "good.csv"]));
    let good = ws.read("good.csv");
    let mut lines: Vec<String> = good.lines().map(String::from).collect();
    let mut f: Vec<String> = lines[5].split(',').map(String::from).collect();
    f[2] = format!("{}@example.org", "a".repeat(8 << 20));
    lines[5] = f.join(",");
    ws.write("incoming/Tenant_A.csv", lines.join("\n") + "\n");
    let r = ws.run_cmd(cmd(&ws, &["run", "pipelines/propensity-ingest.yaml"]));
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    assert!(
        r.out.stderr.contains("incoming/Tenant_A.csv") && r.out.stderr.contains("row 5") && r.out.stderr.contains("longer than 1048576 bytes"),
        "{}",
        r.out.stderr
    );
    f[2] = format!("{}@example.org", "b".repeat(100_000));
    lines[5] = f.join(",");
    ws.write("incoming/Tenant_A.csv", lines.join("\n") + "\n");
    let r = ws.run_cmd(cmd(&ws, &["run", "pipelines/propensity-ingest.yaml"]));
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    assert!(r.out.stderr.contains("row 5 (line 6), column 3 (Sensitive_Data)") && r.out.stderr.contains("at most 65536 bytes"), "{}", r.out.stderr);
    // rows = 10^12: a failed run record with a clear error, not an allocation abort.
    let r = ws.run_cmd(cmd(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=1000000000000"]));
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    assert!(r.out.stderr.contains("at most 100000000"), "{}", r.out.stderr);
    assert_eq!(r.rec()["status"], "failed");
    let g = r.stage("generate[Tenant_A]");
    assert_eq!(g["status"], "failed");
    assert!(g["error"].as_str().unwrap().contains("lower `rows`"), "{g:#}");
    let o = dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "1000000000000", "--out", "x.csv"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--rows") && !ws.exists("x.csv"), "{}", o.stderr);
}

#[test]
fn absurd_numbers_on_the_command_line_are_errors_not_panics() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo hi\n");
    for args in [
        &["run", "pipeline.yaml", "--wait", "-1"][..],
        &["run", "pipeline.yaml", "--wait", "NaN"],
        &["run", "pipeline.yaml", "--wait", "1e300"],
        &["run", "pipeline.yaml", "-j", "0"],
        &["run", "pipeline.yaml", "-j", "18446744073709551615"],
        &["keys", "rotate", "Tenant_A", "--wait", "inf"],
        // Review 17: these panicked (exit 101) or took NaN as 0.
        &["models", "promote", "Tenant_A", "v1", "--wait", "inf"],
        &["models", "promote", "Tenant_A", "v1", "--wait", "1e30"],
        &["models", "rollback", "Tenant_A", "--wait", "NaN"],
        &["keys", "init", "--master", "pkcs11:token=x", "--wait", "1e30"],
        &["keys", "rewrap", "--to", "pkcs11:token=x", "--wait", "-1"],
        // Review 13: a header-only sample (which `predict` then refuses), and a date the generator cannot use (exit 1).
        &["sample", "--tenant", "T", "--rows", "0", "--out", "s.csv"],
        &["sample", "--tenant", "T", "--rows", "5", "--as-of", "0001-01-01", "--out", "s.csv"],
    ] {
        let o = dg(&ws, args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{args:?}: {}", o.stderr);
    }
    ws.pipeline("stages:\n  a:\n    cmd: echo hi\n    timeout: 1e300\n");
    let o = dg(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("timeout") && o.stderr.contains("at most 1e9"), "{}", o.stderr);
    assert!(!ws.exists(".dagrun/keys"), "a refused command created keys");
    assert!(!ws.exists("s.csv"), "a refused sample was written");
}

/// Files a command writes where its user says (`--metrics-file` or
/// `metrics_file:`, `predict --output`, `report -o`) never land in
/// `.dagrun/` or `config/` (they once replaced the keyring, and with it every
/// tenant's data keys, with exit 0); key commands refuse a tenant nobody has
/// (a typo once made keys and "destroyed" marks for it).
#[test]
fn user_named_files_and_unknown_tenants_cannot_harm_the_workspace() {
    let ws = shipped(TWO);
    let p = "pipelines/propensity.yaml";
    ok(dg(&ws, &["run", p, "-p", "rows=1000", "-q"]));
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "5", "--out", "in.csv"]));
    let before = all_files(&ws);
    let ring_before = std::fs::read(ws.path(".dagrun/keys/keyring.json")).unwrap();
    let refused = |args: &[&str], needle: &str| {
        let o = dg(&ws, args);
        assert_eq!(o.code, 2, "dagrun {args:?}:\n{}\n{}", o.stdout, o.stderr);
        assert!(o.stderr.contains(needle), "dagrun {args:?}: stderr lacks {needle:?}:\n{}", o.stderr);
        o.stderr
    };
    let keyring = ".dagrun/keys/keyring.json";
    refused(&["run", p, "-p", "rows=1000", "--metrics-file", keyring], &format!("--metrics-file {keyring}: it is inside .dagrun/"));
    refused(&["report", "last", "-o", keyring], &format!("-o {keyring}: it is inside .dagrun/"));
    refused(&["predict", "--tenant", "Tenant_A", "--input", "in.csv", "--output", keyring], &format!("--output {keyring}: it is inside .dagrun/"));
    refused(&["predict", "--tenant", "Tenant_A", "--input", "in.csv", "--output", "config/tenants.yaml"], "it is inside config/");
    refused(&["sample", "--tenant", "Tenant_A", "--rows", "5", "--out", ".dagrun/keys/x.csv"], "--out .dagrun/keys/x.csv: it is inside .dagrun/");
    refused(&["sample", "--tenant", "Tenant_A", "--rows", "5", "--out", ".dagrun/registry/Tenant_A/m.parquet"], "it is inside .dagrun/");
    refused(&["sample", "--tenant", "Tenant_A", "--rows", "5", "--out", "in.txt"], "use a .csv or .parquet file name");
    for args in [&["keys", "rotate", "tenant_a"][..], &["keys", "forget", "Nope", "--yes"], &["keys", "export", "Nope", "--i-understand-this-prints-a-secret"]]
    {
        refused(args, "config/tenants.yaml lists Tenant_A, Tenant_B");
    }
    ws.write("config/dagrun.yaml", "metrics_file: config/tenants.yaml\n");
    refused(&["run", p, "-p", "rows=1000"], "`metrics_file:` of config/dagrun.yaml, ");
    refused(&["run", p, "-p", "rows=1000"], "config/tenants.yaml: it is inside config/");
    std::fs::remove_file(ws.path("config/dagrun.yaml")).unwrap();
    assert_eq!(
        all_files(&ws).into_iter().filter(|(f, _)| !f.starts_with("runs/") && f != ".dagrun/lock").collect::<Vec<_>>(),
        before.into_iter().filter(|(f, _)| !f.starts_with("runs/") && f != ".dagrun/lock").collect::<Vec<_>>()
    );
    // A stage that plants a link after the run's start does not redirect the metrics file.
    ws.write("plant.yaml", "stages:\n  plant: {cmd: ln -sfn .dagrun/keys m && echo > planted.txt, outs: [planted.txt]}\n");
    let o = ok(dg(&ws, &["run", "plant.yaml", "--metrics-file", "m/keyring.json"]));
    assert!(o.stderr.contains("not writing the metrics file") && o.stderr.contains("it is inside .dagrun/"), "{}", o.stderr);
    assert_eq!(std::fs::read(ws.path(keyring)).unwrap(), ring_before);
    // A CSV with Windows line ends, or one that mixes line ends (rows pasted
    // from two systems; a lone CR of an old Mac file): a bad value is
    // reported on its own line (the csv crate counts a row after a CRLF one
    // line short).
    let all_crlf = ["\r\n"; 5];
    let mixed: [[&str; 5]; 3] = [["\r\n", "\n", "\n", "\n", "\n"], ["\n", "\r\n", "\r\n", "\n", "\r"], ["\n", "\r\n", "\n", "\r\n", "\n"]];
    for (file, ends, bad_line) in [("crlf.csv", all_crlf, 3), ("mixed.csv", mixed[0], 5), ("mixed.csv", mixed[1], 5), ("mixed.csv", mixed[2], 4)] {
        let lines: Vec<String> = ws
            .read("in.csv")
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let mut f: Vec<&str> = l.split(',').collect();
                if i + 1 == bad_line {
                    f[3] = "bad";
                }
                f.join(",") + ends[i % ends.len()]
            })
            .collect();
        ws.write(file, lines.concat());
        refused(&["predict", "--tenant", "Tenant_A", "--input", file], &format!("{file}: row {} (line {bad_line}), column Login_Count", bad_line - 1));
    }
    // Review 13: `--output` naming the input itself (or a hard link to it)
    // would replace the raw rows by their scores.
    std::fs::hard_link(ws.path("in.csv"), ws.path("in-link.csv")).unwrap();
    for out in ["in.csv", "in-link.csv"] {
        refused(&["predict", "--tenant", "Tenant_A", "--input", "in.csv", "--output", out], "is the input file in.csv: the scores would replace the rows");
        assert!(ws.read("in.csv").starts_with("Tenant_ID,"), "the rows were replaced");
    }
    // A FIFO (or a link to a device) given as input is refused at once,
    // naming it, never waited on (a nightly `predict` would hang forever).
    for input in ["fifo.csv", "fifo.parquet", "zero.csv"] {
        if input == "zero.csv" {
            std::os::unix::fs::symlink("/dev/zero", ws.path(input)).unwrap();
        } else {
            let c = std::ffi::CString::new(ws.path(input).as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        }
        let o = spawn(cmd(&ws, &["predict", "--tenant", "Tenant_A", "--input", input])).wait(Duration::from_secs(30));
        assert_eq!(o.code, 2, "{input}: {}", o.stderr);
        assert!(o.stderr.contains(&format!("{input} is not a regular file (a FIFO, socket or device)")), "{input}: {}", o.stderr);
        std::fs::remove_file(ws.path(input)).unwrap();
    }
    // Review 17: an output that is a FIFO, or a link to a device, is not
    // replaced by the rename that puts the new file in place; /dev is refused
    // by name (/dev/stdout is a link to whatever stdout is).
    let c = std::ffi::CString::new(ws.path("out-fifo.csv").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink("/dev/null", ws.path("null.parquet")).unwrap();
    let refused_output = |out: &str, needle: &str| refused(&["predict", "--tenant", "Tenant_A", "--input", "in.csv", "--output", out], needle);
    for (out, needle) in [
        ("out-fifo.csv", "--output out-fifo.csv: it is a FIFO, not a regular file"),
        ("null.parquet", "--output null.parquet: it is a link to a device"),
        ("/dev/null", "--output /dev/null: it is in /dev"),
        ("/dev/stdout", "--output /dev/stdout: it is in /dev"),
    ] {
        refused_output(out, needle);
    }
    refused(&["report", "last", "-o", "out-fifo.csv"], "-o out-fifo.csv: it is a FIFO");
    // Review 18: `missing/..` resolves only once the writer made `missing`, and
    // a link dangling until then led onto config/ (or any FIFO or device).
    std::os::unix::fs::symlink("nx/../config", ws.path("cfg")).unwrap();
    refused_output("nx/../cfg/tenants.yaml", "`..` follows a folder that does not exist yet");
    assert!(!ws.exists("nx") && ws.read("config/tenants.yaml").starts_with("tenants:"));
    // Review 19: another workspace's config/ reached through a link (its name
    // is gone once resolved), or one with a tenant list but no run yet.
    for (other, has_runs) in [("other1", true), ("other2", false)] {
        std::fs::create_dir_all(ws.path(&format!("{other}/real-config"))).unwrap();
        ws.write(&format!("{other}/real-config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n");
        if has_runs {
            std::fs::create_dir_all(ws.path(&format!("{other}/.dagrun"))).unwrap();
            std::os::unix::fs::symlink("real-config", ws.path(&format!("{other}/config"))).unwrap();
        } else {
            std::fs::rename(ws.path(&format!("{other}/real-config")), ws.path(&format!("{other}/config"))).unwrap();
        }
        let out = format!("{other}/config/tenants.yaml");
        refused_output(&out, "it is inside config/ of a workspace");
        assert!(ws.read(&out).starts_with("tenants:"), "{out} was replaced");
    }
    // Review 20: so is its .git/ (a hook written there runs on the next checkout).
    std::fs::create_dir_all(ws.path("other2/.git/hooks")).unwrap();
    refused_output("other2/.git/hooks/post-checkout", "it is inside .git/ of a workspace");
    assert!(!ws.exists("other2/.git/hooks/post-checkout"));
    // Review 20: a path that only passes through config/ on its way out is not
    // in it (a user in config/ writing ../reports/…), and a folder is named as one.
    let mut c = cmd(&ws, &["predict", "--tenant", "Tenant_A", "--input", "../in.csv", "--output", "../scores/from-config.csv"]);
    c.current_dir(ws.path("config"));
    ok(spawn(c).wait(HANG));
    assert!(ws.read("scores/from-config.csv").starts_with("Customer_ID,score"));
    std::fs::create_dir_all(ws.path("scores/dir.csv")).unwrap();
    let o = refused_output("scores/dir.csv", "it is a folder; name a file in it, e.g. scores/dir.csv/NAME");
    assert!(!o.contains("elsewhere"), "one fix: {o}");
    // Review 19: from a working folder longer than PATH_MAX nothing resolved,
    // so every check was off and a link led onto config/: refused now.
    {
        let root = std::ffi::CString::new(ws.root.as_os_str().as_encoded_bytes()).unwrap();
        let name = std::ffi::CString::new("d".repeat(200)).unwrap();
        // SAFETY: valid NUL-terminated strings and descriptors this block owns.
        let deep = unsafe {
            let mut fd = libc::open(root.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
            for _ in 0..21 {
                assert_eq!(libc::mkdirat(fd, name.as_ptr(), 0o755), 0);
                let next = libc::openat(fd, name.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
                libc::close(fd);
                fd = next;
            }
            let cfg = std::ffi::CString::new(ws.path("config").as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(libc::symlinkat(cfg.as_ptr(), fd, c"cfg".as_ptr()), 0);
            fd
        };
        let input = ws.path("in.csv").to_str().unwrap().to_string();
        let mut c = cmd(&ws, &["-C", ws.root.to_str().unwrap(), "predict", "--tenant", "Tenant_A", "--input", &input, "--output", "cfg/tenants.yaml"]);
        // SAFETY: only fchdir() between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || if libc::fchdir(deep) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
        }
        let o = spawn(c).wait(HANG);
        // SAFETY: the descriptor opened above.
        unsafe { libc::close(deep) };
        assert_eq!(o.code, 2, "{}", o.stderr);
        assert!(o.stderr.contains("it cannot be resolved to check where it lands"), "{}", o.stderr);
        assert!(ws.read("config/tenants.yaml").starts_with("tenants:"));
        std::fs::remove_dir_all(ws.path(&"d".repeat(200))).unwrap();
    }
    refused(&["run", p, "-p", "rows=1000", "--metrics-file", "null.parquet"], "--metrics-file null.parquet: it is a link to a device");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(ws.path("out-fifo.csv")).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(ws.path("null.parquet")).unwrap().file_type().is_symlink());
    // Elsewhere they are written as before.
    ok(dg(&ws, &["predict", "--tenant", "Tenant_A", "--input", "in.csv", "--output", "scores/a.csv"]));
    assert_eq!(ws.read("scores/a.csv").lines().count(), 6);
    // Helper-65: a key command on a forgotten tenant says it was forgotten
    // and what is left to do (exit 2), not the run's "remove its rows".
    ok(dg(&ws, &["keys", "forget", "Tenant_B", "--yes"]));
    for (args, what) in [(&["keys", "rotate", "Tenant_B"][..], "rotate"), (&["keys", "export", "Tenant_B", "--i-understand-this-prints-a-secret"], "export")] {
        let e = refused(args, "tenant Tenant_B was forgotten on ");
        assert!(e.contains(&format!("its keys are destroyed, so there is no key to {what}")) && e.contains("remove Tenant_B from config/tenants.yaml"), "{e}");
        assert!(!e.contains("input data"), "{e}");
    }
}

/// A pipeline or settings file with no size to check first (a device, a
/// FIFO) is read only up to the 1 MiB cap, never without end.
#[test]
fn a_pipeline_or_settings_file_without_end_is_refused() {
    let ws = shipped(ONE);
    // Under a 4 GiB address-space limit: if the cap regressed, dagrun fails
    // to allocate (and this test fails) instead of taking the machine's memory.
    let capped = |args: &[&str]| {
        let mut c = Command::new("sh");
        c.arg("-c").arg("ulimit -v 4194304 && exec \"$0\" \"$@\"").arg(crate::common::BIN).args(args).current_dir(&ws.root);
        c.env_remove("DAGRUN_MASTER_KEY").env_remove("DAGRUN_MASTER_KEY_FILE").env_remove("RUST_LOG").env("NO_COLOR", "1");
        spawn(c).wait(HANG)
    };
    let o = capped(&["run", "/dev/zero"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("more than 1048576 bytes (1 MiB) could be read from it"), "{}", o.stderr);
    std::os::unix::fs::symlink("/dev/zero", ws.path("config/dagrun.yaml")).unwrap();
    let o = capped(&["run", "pipelines/propensity.yaml", "-p", "rows=1000"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("config/dagrun.yaml: the file is over 1 MiB"), "{}", o.stderr);
    // A pipeline through a pipe whose writer is slow is read to its end
    // (review 12: read without waiting, it was taken for an empty file).
    std::fs::remove_file(ws.path("config/dagrun.yaml")).unwrap();
    let mut c = cmd(&ws, &["dag", "/dev/stdin", "-C", ws.root.to_str().unwrap()]);
    c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let text = ws.read("pipelines/propensity.yaml");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::io::Write::write_all(&mut stdin, text.as_bytes()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("train[Tenant_A]"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// The master key kept outside the workspace (`DAGRUN_MASTER_KEY_FILE`) is a
/// file no user-named output may replace either: by its name, or through a
/// symlinked folder on the way.
#[test]
fn a_master_key_file_kept_elsewhere_is_never_replaced() {
    let ws = Ws::new();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("master.key");
    std::fs::write(&key, MASTER).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(keys.path(), ws.path("kd")).unwrap();
    ws.pipeline("stages:\n  a: {cmd: echo hi > a.txt, outs: [a.txt]}\n");
    let with_key = |args: &[&str]| {
        let mut c = cmd(&ws, args);
        c.env("DAGRUN_MASTER_KEY_FILE", &key);
        let o = spawn(c).wait(HANG);
        assert!(!o.stderr.contains("panicked"), "dagrun {args:?} panicked:\n{}", o.stderr);
        o
    };
    ok(with_key(&["run", "pipeline.yaml"]));
    let k = key.to_str().unwrap();
    for args in [&["report", "last", "-o", k][..], &["report", "last", "-o", "kd/master.key"], &["run", "pipeline.yaml", "--metrics-file", k]] {
        let o = with_key(args);
        assert_eq!(o.code, 2, "dagrun {args:?}:\n{}", o.stderr);
        assert!(o.stderr.contains("it is the master key file that DAGRUN_MASTER_KEY_FILE names"), "dagrun {args:?}:\n{}", o.stderr);
        assert!(!o.stderr.contains(MASTER));
    }
    assert_eq!(std::fs::read_to_string(&key).unwrap(), MASTER);
    ok(with_key(&["report", "last", "-o", "kd/report.html"]));
    assert!(keys.path().join("report.html").is_file());
    ok(with_key(&["run", "pipeline.yaml"]));
}

/// A file dagrun reads back that holds something else (here a PIN: a bare
/// number is valid JSON) is refused without its content in the message:
/// serde quotes the value it did not expect, and that text would reach the
/// terminal, run records and OpenLineage events.
#[test]
fn files_read_back_are_refused_without_quoting_them() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a: {cmd: echo hi > a.txt, outs: [a.txt]}\n");
    let r = ws.run(&[]);
    assert_eq!(r.out.code, 0, "{}", r.out.stderr);
    let pin = "31415926";
    ws.write("runs/20991231-000000-000-aaaa.json", pin);
    ws.write(".dagrun/registry/Tenant_A/index.json", pin);
    ws.write(".dagrun/registry/Tenant_A/champion.json", format!("{{\"format\": \"{pin}x\"}}"));
    for args in [&["runs"][..], &["report", "last"], &["models", "list", "Tenant_A"]] {
        let o = spawn(cmd(&ws, args)).wait(HANG);
        let all = format!("{}{}", o.stdout, o.stderr);
        assert!(!all.contains(pin), "dagrun {args:?} showed the file's content:\n{all}");
        assert!(all.contains("invalid type: integer") || all.contains("not a") || all.contains("invalid"), "dagrun {args:?}: no reason given:\n{all}");
    }
}

/// A FIFO put where dagrun keeps a file it reads back never makes a command
/// wait for a writer (a run holds the workspace lock while it waits): each
/// is read without blocking and refused or ignored.
#[test]
fn a_fifo_in_place_of_a_file_read_back_never_hangs() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a: {cmd: echo hi > a.txt, outs: [a.txt]}\n");
    assert_eq!(ws.run(&[]).out.code, 0);
    for (file, args) in [
        (".dagrun/state/a.json", &["run", "pipeline.yaml"][..]),
        (".dagrun/hashmemo.json", &["run", "pipeline.yaml"]),
        (".dagrun/openlineage/workspace-id", &["run", "pipeline.yaml"]),
        (".dagrun/openlineage/pending.jsonl", &["run", "pipeline.yaml"]),
        (".dagrun/openlineage/pending-0123456789abcdef0123456789abcdef.jsonl", &["run", "pipeline.yaml"]),
        ("runs/20991231-000000-000-aaaa.json", &["runs"]),
        ("config/dagrun.yaml", &["run", "pipeline.yaml"]),
        // Review 11: read with a blocking open (the run hung at its end, holding the lock).
        (".dagrun/metrics/last-success.json", &["run", "pipeline.yaml", "--metrics-file", "m.prom"]),
        (".dagrun/keys/audit.jsonl", &["keys", "audit"]),
    ] {
        let p = ws.path(file);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let o = spawn(cmd(&ws, args)).wait(Duration::from_secs(30));
        assert!(!o.stderr.contains("panicked"), "{file}: {}", o.stderr);
        std::fs::remove_file(&p).unwrap();
    }
    // Review 13: the pipeline file a run record names, read by `report` for
    // its graph: a FIFO there is refused (the page says so), never waited on.
    let rec = ws.walk().into_iter().find(|p| p.starts_with("runs/") && p.ends_with(".json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&ws.read(&rec)).unwrap();
    v["pipeline"] = serde_json::Value::from("runs/p.yaml");
    ws.write(&rec, serde_json::to_vec(&v).unwrap());
    let c = std::ffi::CString::new(ws.path("runs/p.yaml").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let id = Path::new(&rec).file_stem().unwrap().to_str().unwrap().to_string();
    let o = spawn(cmd(&ws, &["report", &id, "-o", "r.html", "--layout", "builtin"])).wait(Duration::from_secs(30));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(ws.read("r.html").contains("not a regular file"), "the page should say why the pipeline was not read");
    std::fs::remove_file(ws.path("runs/p.yaml")).unwrap();
    std::fs::remove_file(ws.path(&rec)).unwrap();
    // A stage's input or output: refused, naming it, never waited on (the
    // run holds the lock); a link to a device is refused the same way.
    ws.pipeline("stages:\n  a: {cmd: echo hi > a.txt, outs: [a.txt]}\n  b: {cmd: cat in.txt > b.txt, deps: [in.txt], outs: [b.txt]}\n");
    for (file, make_fifo) in [("in.txt", true), ("a.txt", true), ("in.txt", false)] {
        let p = ws.path(file);
        let _ = std::fs::remove_file(&p);
        if make_fifo {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        } else {
            std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        }
        let o = spawn(cmd(&ws, &["run", "pipeline.yaml"])).wait(Duration::from_secs(30));
        assert_eq!(o.code, 1, "{file}: {}", o.stderr);
        let what = if make_fifo { "is a FIFO" } else { "is a device" };
        assert!(o.stderr.contains(&format!("{file} {what} (or a link to one)")), "{file}: {}", o.stderr);
        std::fs::remove_file(&p).unwrap();
    }
    // A failing command that replaces its own stderr log (by a FIFO: the run
    // once waited on it forever, holding the lock; by a link: the message
    // once quoted the file it leads to) is reported with what it wrote.
    ws.write("secret.txt", "the linked file's own line\n");
    for plant in ["mkfifo .dagrun/logs/f.err", "ln -s ../../secret.txt .dagrun/logs/f.err"] {
        ws.pipeline(&format!("stages:\n  f:\n    cmd: echo boom >&2; rm -f .dagrun/logs/f.err; {plant}; exit 1\n    outs: [f.txt]\n    timeout: 20\n"));
        let o = spawn(cmd(&ws, &["run", "pipeline.yaml"])).wait(Duration::from_secs(15));
        assert_eq!(o.code, 1, "{plant}: {}", o.stderr);
        assert!(o.stderr.contains("end of stderr") && o.stderr.contains("boom"), "{plant}: {}", o.stderr);
        assert!(!o.stderr.contains("the linked file's own line"), "{plant}: {}", o.stderr);
    }
}

/// Text from files someone else can write in the workspace (file names in an
/// input folder, under `.dagrun/`, a run record's times) reaches the terminal
/// with its escape sequences shown, never obeyed (review 10): `status`, `run
/// -n`, `verify`, the top-level error printer and `runs show`.
#[test]
fn escape_sequences_from_workspace_files_are_shown_never_obeyed() {
    let esc = "Z\u{1b}]0;PWNED\u{7}\u{1b}[2J";
    let raw = |o: &Out| o.stdout.contains('\u{1b}') || o.stderr.contains('\u{1b}');
    let ws = Ws::new();
    std::fs::create_dir_all(ws.path("in")).unwrap();
    ws.write("in/a.txt", "a\n");
    ws.pipeline("stages:\n  count:\n    cmd: ls in | wc -l > out.txt\n    deps: [in]\n    outs: [out.txt]\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    // A FIFO in an input folder is refused, by a name holding escapes.
    let fifo = std::ffi::CString::new(ws.path(&format!("in/{esc}")).to_str().unwrap()).unwrap();
    // SAFETY: `fifo` is a valid NUL-terminated path for the call's duration.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    for args in [&["status", "pipeline.yaml"][..], &["run", "-n", "pipeline.yaml"], &["run", "pipeline.yaml"]] {
        let o = dg(&ws, args);
        assert!(!raw(&o), "{args:?} printed a raw escape:\n{}\n{}", o.stdout, o.stderr);
        assert!(o.stdout.contains("\\u{1b}]0;PWNED") || o.stderr.contains("\\u{1b}]0;PWNED"), "{args:?}:\n{}\n{}", o.stdout, o.stderr);
    }
    std::fs::remove_file(ws.path(&format!("in/{esc}"))).unwrap();
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    // A file under .dagrun/state named with escapes: `verify` lists it, `lineage` names it in its error.
    ws.write(&format!(".dagrun/state/{esc}.json"), "{}");
    for (args, code) in [(&["verify"][..], 4), (&["lineage", "no/such/file"], 2)] {
        let o = dg(&ws, args);
        assert_eq!(o.code, code, "{args:?}:\n{}", o.stderr);
        assert!(!raw(&o), "{args:?} printed a raw escape:\n{}\n{}", o.stdout, o.stderr);
    }
    std::fs::remove_file(ws.path(&format!(".dagrun/state/{esc}.json"))).unwrap();
    // A run record whose time holds escapes is not one dagrun wrote.
    let rec = ws.walk().into_iter().find(|p| p.starts_with("runs/") && p.ends_with(".json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&ws.read(&rec)).unwrap();
    v["started_at"] = serde_json::Value::from(esc);
    ws.write(&rec, serde_json::to_vec(&v).unwrap());
    let id = Path::new(&rec).file_stem().unwrap().to_str().unwrap().to_string();
    let o = dg(&ws, &["runs", "show", &id]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("started_at") && o.stderr.contains("is not an RFC 3339 time") && !raw(&o), "{}", o.stderr);
    let o = dg(&ws, &["runs"]);
    assert!(o.stderr.contains("not listed") && !raw(&o), "{}", o.stderr);
}

/// Outside tools dagrun starts for itself get the environment a `cmd` stage
/// gets: no master key, no OpenLineage token, no cloud secret, none of the
/// pipeline's `secrets:` (reviews 13 and 14: `report` gave Graphviz `dot` its
/// whole environment).
#[test]
fn outside_tools_never_see_the_master_key() {
    let ws = Ws::new();
    ws.pipeline("secrets: [MY_API_TOKEN]\nstages:\n  a: {cmd: echo hi > a.txt, outs: [a.txt]}\n");
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    let bin = ws.path("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let dump = ws.path("dot-env.txt");
    ws.write("fakebin/dot", format!("#!/bin/sh\nenv > '{}'\ncat > /dev/null\necho '<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>'\n", dump.display()));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ws.path("fakebin/dot"), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Review 14: the pipeline's own `secrets:` too; review 15: also once the
    // pipeline no longer loads (the report draws from the record alone).
    for broken in [false, true] {
        if broken {
            ws.write("pipeline.yaml", "stages: [unclosed\n");
        }
        let _ = std::fs::remove_file(&dump);
        let mut c = cmd(&ws, &["report", "last", "-o", "r.html", "--layout", "dot"]);
        c.env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
            .env("DAGRUN_MASTER_KEY", MASTER)
            .env("DAGRUN_MASTER_KEY_PIN", "pin-4711-secret")
            .env("DAGRUN_OPENLINEAGE_TOKEN", "ol-token-secret-3")
            .env("AWS_SECRET_ACCESS_KEY", "aws-secret-value-2")
            .env("MY_API_TOKEN", "tok-secret-value-1")
            .env("KEEP_ME", "visible-value");
        let o = spawn(c).wait(HANG);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let env = std::fs::read_to_string(&dump).expect("the fake dot was not run");
        for secret in [MASTER, "pin-4711-secret", "ol-token-secret-3", "aws-secret-value-2", "tok-secret-value-1", "visible-value"] {
            assert!(!env.contains(secret), "broken pipeline {broken}: {secret} reached dot's environment:\n{env}");
        }
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    }
}

/// A keyring edited outside dagrun (its names and times are printed by `keys
/// list` and in messages) is refused, naming what is wrong, with escapes
/// shown, never obeyed (review 13).
#[test]
fn a_keyring_edited_outside_dagrun_is_refused_before_it_is_printed() {
    let ws = shipped(ONE);
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=1000", "-q"]));
    let path = ".dagrun/keys/keyring.json";
    let good = ws.read(path);
    assert!(ok(dg(&ws, &["keys", "list"])).stdout.contains("Tenant_A-dk-1"));
    let esc = "\u{1b}]0;PWNED\u{7}\u{1b}[2J";
    let edits: [(&str, Box<dyn Fn(&mut serde_json::Value)>); 3] = [
        ("is not an RFC 3339 time", Box::new(|v| v["tenants"]["Tenant_A"]["data_keys"][0]["created"] = format!("2026-01-01{esc}").into())),
        ("a key id", Box::new(|v| v["tenants"]["Tenant_A"]["data_keys"][0]["id"] = format!("Tenant_A-dk-1{esc}").into())),
        (
            "a tenant",
            Box::new(|v| {
                let t = v["tenants"].as_object_mut().unwrap().remove("Tenant_A").unwrap();
                v["tenants"][format!("Tenant{esc}")] = t;
            }),
        ),
    ];
    for (why, edit) in edits {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        edit(&mut v);
        ws.write(path, serde_json::to_vec(&v).unwrap());
        let o = dg(&ws, &["keys", "list"]);
        assert_ne!(o.code, 0, "{why}: {}", o.stdout);
        assert!(o.stderr.contains(why) && o.stderr.contains("edited outside dagrun"), "{why}: {}", o.stderr);
        assert!(!o.stdout.contains('\u{1b}') && !o.stderr.contains('\u{1b}'), "{why}: a raw escape was printed:\n{}\n{}", o.stdout, o.stderr);
    }
    ws.write(path, &good);
    ok(dg(&ws, &["keys", "list"]));
}

/// Review 17: Ctrl-C (or SIGTERM, SIGHUP) during `predict --output` or
/// `sample --out` left the hidden temporary file behind (for `sample`,
/// plaintext `Sensitive_Data`). Now the writer stops at its next batch, the
/// temporary files go, nothing appears at the destination, and dagrun exits 130.
#[test]
fn an_interrupted_predict_or_sample_leaves_no_file_behind() {
    let ws = shipped(ONE);
    ok(dg(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=1000", "-q"]));
    std::fs::create_dir(ws.path("in")).unwrap();
    ok(dg(&ws, &["sample", "--tenant", "Tenant_A", "--rows", "2000000", "--no-label", "--out", "in/big.parquet"]));
    let listing = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(ws.path(dir)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    for (sig, args) in [
        (libc::SIGINT, &["predict", "--tenant", "Tenant_A", "--input", "in/big.parquet", "--output", "out/scores.csv"][..]),
        (libc::SIGTERM, &["predict", "--tenant", "Tenant_A", "--input", "in/big.parquet", "--output", "out/scores.parquet"]),
        // Review 18: the first signal waited for the whole generation (seconds).
        (libc::SIGHUP, &["sample", "--tenant", "Tenant_A", "--rows", "10000000", "--out", "out/raw.csv"]),
    ] {
        std::fs::create_dir_all(ws.path("out")).unwrap();
        let mut c = cmd(&ws, args);
        // As from a terminal: the test may run under `nohup` or in a
        // background job, which hand their children SIGHUP or SIGINT ignored
        // (and an ignored signal stays ignored: util::interrupt).
        // SAFETY: only async-signal-safe signal() between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::signal(s, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let mut bg = spawn(c);
        // Writing has begun once a temporary file is there.
        let t0 = std::time::Instant::now();
        while listing("out").is_empty() {
            assert!(bg.child.try_wait().unwrap().is_none(), "{args:?} ended before writing anything");
            assert!(t0.elapsed() < HANG, "{args:?} wrote nothing");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(bg.child.try_wait().unwrap().is_none(), "{args:?} finished before the signal: give it more rows");
        assert!(signal(bg.pid() as i32, sig));
        let t_signal = std::time::Instant::now();
        let o = bg.wait(HANG);
        // Not a benchmark: the first signal must not wait for the whole work
        // (seconds here), only for the batch under way.
        assert!(t_signal.elapsed() < Duration::from_millis(1500), "{args:?} took {:?} to stop", t_signal.elapsed());
        assert_eq!(o.code, 130, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("interrupted"), "{args:?}: {}", o.stderr);
        assert_eq!(listing("out"), Vec::<String>::new(), "{args:?} left files behind");
        std::fs::remove_dir(ws.path("out")).unwrap();
    }
}

/// Review 23 left alone: whoever could open the key audit log could hold its
/// `flock` and stall every key operation without a word. The short-lived key
/// locks are waited for with a message, and (past `util::flock`'s bound,
/// unit-tested there) refused with exit 75; here, held by this test for two
/// seconds, a rotation and a verify say what they wait for, then go on.
#[test]
fn key_locks_held_by_another_process_are_waited_for_with_a_message() {
    let ws = shipped(ONE);
    let mut run = cmd(&ws, &["run", "pipelines/propensity.yaml", "-p", "rows=2000", "encrypt"]);
    run.env("DAGRUN_MASTER_KEY", MASTER);
    ok(spawn(run).wait(crate::common::HANG));
    for (lock, args) in [
        (".dagrun/keys/audit.jsonl", &["keys", "rotate", "Tenant_A"][..]),
        (".dagrun/keys/audit.jsonl", &["keys", "audit", "--verify"]),
        (".dagrun/keys/keyring.lock", &["keys", "rotate", "Tenant_A"]),
    ] {
        let held = std::fs::File::open(ws.path(lock)).unwrap();
        held.lock().unwrap();
        let mut c = cmd(&ws, args);
        c.env("DAGRUN_MASTER_KEY", MASTER);
        let mut bg = spawn(c);
        assert_eq!(bg.exited_within(Duration::from_millis(1800)), None, "{args:?} did not wait for {lock}");
        drop(held);
        let o = ok(bg.wait(crate::common::HANG));
        assert!(o.stderr.contains("waiting for the lock of") && o.stderr.contains(lock.rsplit('/').next().unwrap()), "{args:?}: {}", o.stderr);
    }
    ok(dg(&ws, &["keys", "audit", "--verify"]));
}

/// The one-time "back up your new master key" warning is said under `-q`
/// too (the cron line and the service unit run quiet), once.
#[test]
fn the_new_master_key_warning_is_said_once_even_quiet() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo hi > a.txt\n    outs: [a.txt]\n");
    let o = ws.dagrun(&["-q", "run", "pipeline.yaml"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("created a new local master key") && o.stderr.contains("Back it up now"), "{}", o.stderr);
    let o = ws.dagrun(&["-q", "run", "pipeline.yaml", "--force", ""]);
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
}

/// A cron job that lost `DAGRUN_MASTER_KEY` (helper-64 #4): every command
/// that needs the key says the key its records were sealed with was not
/// found, exit 2 (a run once made a new key and reran everything) — `status`
/// once showed every stage stale ("no master key yet: a run recomputes it")
/// and `lineage` said no stage had made the file.
#[test]
fn a_keyring_whose_master_key_is_not_found_is_named_by_every_command() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let keyed = |args: &[&str]| {
        let mut c = cmd(&ws, args);
        c.env("DAGRUN_MASTER_KEY", MASTER);
        ok(spawn(c).wait(HANG))
    };
    keyed(&["run", "pipeline.yaml"]);
    assert!(!ws.exists(".dagrun/keys/master.key"));
    for args in [&["run", "pipeline.yaml"][..], &["status", "pipeline.yaml"], &["run", "pipeline.yaml", "-n"], &["lineage", "a.txt"], &["verify"], &["gc"]] {
        let o = dg(&ws, args);
        assert_eq!(o.code, 2, "{args:?}: {}{}", o.stdout, o.stderr);
        assert!(
            o.stderr.contains("were sealed with a master key that was not found") && o.stderr.contains("Set DAGRUN_MASTER_KEY to the master key"),
            "{args:?}: {}",
            o.stderr
        );
    }
    assert!(!ws.exists(".dagrun/keys/master.key"), "no key was made up");
    keyed(&["status", "pipeline.yaml"]);
    // `keys init` with another key would start a keyring under which every
    // record fails (review 67 #7): refused, nothing written; with the key the
    // records were sealed with, it goes ahead.
    let keys = tempfile::tempdir().unwrap();
    let write_key = |name: &str, hex: &str| {
        let p = keys.path().join(name);
        std::fs::write(&p, format!("{hex}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        format!("file:{}", p.display())
    };
    let o = dg(&ws, &["keys", "init", "--master", &write_key("other.key", &"11".repeat(32))]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("were sealed with another master key"), "{}", o.stderr);
    assert!(!ws.exists(".dagrun/keys/keyring.json"), "a refused init wrote a keyring");
    ok(dg(&ws, &["keys", "init", "--master", &write_key("same.key", MASTER)]));
    assert!(ws.exists(".dagrun/keys/keyring.json"));
    std::fs::remove_file(ws.path(".dagrun/keys/keyring.json")).unwrap();
    // Any record sealed under the key is evidence (review 66 #6): here the
    // action cache and the hash memo without the state records.
    std::fs::rename(ws.path(".dagrun/state"), ws.path("state-aside")).unwrap();
    let o = dg(&ws, &["run", "pipeline.yaml"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("if that key is lost, remove its state/ and cache/ folders"), "{}", o.stderr);
    // Removing what the message names starts afresh under a new key.
    for p in [".dagrun/cache", ".dagrun/hashmemo.json", ".dagrun/places.json"] {
        let p = ws.path(p);
        if p.is_dir() { std::fs::remove_dir_all(p).unwrap() } else { std::fs::remove_file(p).unwrap() }
    }
    ok(dg(&ws, &["run", "pipeline.yaml"]));
    assert!(ws.exists(".dagrun/keys/master.key"));
}
