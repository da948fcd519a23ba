//! Shared helpers for the integration tests: temp workspaces, running the real
//! `dagrun` binary, reading run records.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dagrun");

/// Any single dagrun invocation taking longer than this is a hang.
pub const HANG: Duration = Duration::from_secs(60);

/// What a finished dagrun process printed.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// A process started in the background with its output going to temp files.
pub struct Bg {
    pub child: Child,
    out: std::fs::File,
    err: std::fs::File,
    t0: Instant,
}

impl Bg {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Watch the process until `after` has passed since it started: `Some(how
    /// long it ran)` when it exited before that (to within a millisecond),
    /// `None` when it is still running at `after`.
    pub fn exited_within(&mut self, after: Duration) -> Option<Duration> {
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return Some(self.t0.elapsed());
            }
            let left = after.saturating_sub(self.t0.elapsed());
            if left.is_zero() {
                return None;
            }
            std::thread::sleep(left.min(Duration::from_millis(1)));
        }
    }
    /// Wait (at most `limit`; kill and panic past it).
    pub fn wait(mut self, limit: Duration) -> Out {
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Out { code: code_of(st), stdout: read_all(&mut self.out), stderr: read_all(&mut self.err), elapsed: self.t0.elapsed() };
            }
            if self.t0.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("dagrun did not finish within {limit:?}; stderr so far:\n{}", read_all(&mut self.err));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn code_of(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn read_all(f: &mut std::fs::File) -> String {
    let mut s = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut s).unwrap();
    String::from_utf8_lossy(&s).into_owned()
}

/// Start `cmd` with stdout/stderr captured in anonymous temp files.
pub fn spawn(mut cmd: Command) -> Bg {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(err.try_clone().unwrap());
    let t0 = Instant::now();
    let child = cmd.spawn().expect("cannot start dagrun");
    Bg { child, out, err, t0 }
}

/// Send `sig` to process `pid` (a negative pid: that process group; sig 0
/// only checks that it exists); true when delivered.
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill takes plain integers and touches no memory of ours. The
    // tests pass pids of children they started (and have not reaped) or read
    // from a test daemon's pid file; a stale pid at worst gets ESRCH.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// A temp workspace. `.dagrun/` is created up front so the workspace is the
/// temp dir itself, whatever folders exist above it.
pub struct Ws {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl Default for Ws {
    fn default() -> Self {
        Self::new()
    }
}

impl Ws {
    pub fn new() -> Ws {
        let tmp = tempfile::Builder::new().prefix("dagrun-it-").tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join(".dagrun")).unwrap();
        Ws { _tmp: tmp, root }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Write a file (parents created).
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(p, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).symlink_metadata().is_ok()
    }

    /// Number of lines in a counter file (0 if absent).
    pub fn count(&self, rel: &str) -> usize {
        std::fs::read_to_string(self.path(rel)).map(|s| s.lines().count()).unwrap_or(0)
    }

    /// Write `pipeline.yaml`.
    pub fn pipeline(&self, yaml: &str) {
        self.write("pipeline.yaml", yaml);
    }

    /// A dagrun command run in the workspace, logging reduced to dagrun's own.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(&self.root).env_remove("RUST_LOG").env("NO_COLOR", "1");
        c
    }

    /// Run dagrun with `args` in the workspace and wait for it.
    pub fn dagrun(&self, args: &[&str]) -> Out {
        spawn(self.cmd(args)).wait(HANG)
    }

    /// Run records on disk (file names).
    pub fn record_files(&self) -> BTreeSet<PathBuf> {
        match std::fs::read_dir(self.path("runs")) {
            Ok(rd) => rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect(),
            Err(_) => BTreeSet::new(),
        }
    }

    /// `dagrun run pipeline.yaml ARGS…` with the record it wrote (if any).
    pub fn run(&self, args: &[&str]) -> Run {
        let mut a = vec!["run", "pipeline.yaml"];
        a.extend_from_slice(args);
        self.run_cmd(self.cmd(&a))
    }

    /// Run any command that should write one run record; return it.
    pub fn run_cmd(&self, cmd: Command) -> Run {
        let before = self.record_files();
        let out = spawn(cmd).wait(HANG);
        let new: Vec<PathBuf> = self.record_files().difference(&before).cloned().collect();
        assert!(new.len() <= 1, "one run wrote {} records: {new:?}", new.len());
        let record = new.first().map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap());
        Run { out, record }
    }

    /// Every path under the workspace (relative), recursively.
    pub fn walk(&self) -> Vec<String> {
        fn go(base: &Path, d: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                if e.file_type().unwrap().is_dir() {
                    go(base, &p, out);
                }
            }
        }
        let mut v = Vec::new();
        go(&self.root, &self.root, &mut v);
        v.sort();
        v
    }
}

/// A workspace with the shipped pipelines (`pipelines/propensity*.yaml`) and
/// the given `config/tenants.yaml`.
pub fn shipped_workspace(tenants: &str) -> Ws {
    let ws = Ws::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for p in ["propensity.yaml", "propensity-ingest.yaml"] {
        ws.write(&format!("pipelines/{p}"), std::fs::read(root.join("pipelines").join(p)).unwrap());
    }
    ws.write("config/tenants.yaml", tenants);
    ws
}

/// One `dagrun run`.
#[derive(Debug)]
pub struct Run {
    pub out: Out,
    pub record: Option<Value>,
}

impl Run {
    /// Panic with the output unless the run exited 0.
    pub fn ok(self) -> Run {
        assert_eq!(self.out.code, 0, "dagrun run failed:\nstdout:\n{}\nstderr:\n{}", self.out.stdout, self.out.stderr);
        assert!(self.record.is_some(), "no run record written");
        self
    }
    pub fn rec(&self) -> &Value {
        self.record.as_ref().expect("no run record written")
    }
    pub fn stages(&self) -> &Vec<Value> {
        self.rec()["stages"].as_array().expect("record has a stages list")
    }
    /// Stage name -> status.
    pub fn statuses(&self) -> BTreeMap<String, String> {
        self.stages().iter().map(|s| (s["stage"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string())).collect()
    }
    /// The stages with a given status.
    pub fn with(&self, status: &str) -> BTreeSet<String> {
        self.statuses().into_iter().filter(|(_, s)| s == status).map(|(n, _)| n).collect()
    }
    pub fn ran(&self) -> BTreeSet<String> {
        self.with("ran")
    }
    /// One stage's record.
    pub fn stage(&self, name: &str) -> &Value {
        self.stages().iter().find(|s| s["stage"] == name).unwrap_or_else(|| panic!("stage {name} not in the record: {:#}", self.rec()))
    }
    /// Stage -> its outputs (path -> hash).
    pub fn outputs(&self) -> BTreeMap<String, Value> {
        self.stages().iter().map(|s| (s["stage"].as_str().unwrap().to_string(), s["outputs"].clone())).collect()
    }
}

/// A set of names, for comparisons.
pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// blake3 hex of a file.
pub fn b3(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap()).to_hex().to_string()
}

/// An encrypted file with its ciphertexts decrypted: (key id, every other column, plaintexts).
pub fn decrypted(path: &Path, key: &dagrun::crypto::DataKey, tenant: &str) -> (String, Vec<arrow_array::RecordBatch>, Vec<Vec<u8>>) {
    use arrow_array::{Array, BinaryArray, Int64Array};
    use dagrun::data::parquet_io::{open_batches, read_footer_kv};
    let key_id = read_footer_kv(path).unwrap().get("dagrun.key_id").cloned().unwrap_or_default();
    let mut rest = Vec::new();
    let mut plain = Vec::new();
    for b in open_batches(path, 4096).unwrap() {
        let b = b.unwrap();
        let schema = b.schema();
        let ids = b.column_by_name("Customer_ID").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
        let enc_idx = schema.index_of("Sensitive_Data_Enc").unwrap();
        let enc = b.column(enc_idx).as_any().downcast_ref::<BinaryArray>().unwrap().clone();
        for i in 0..b.num_rows() {
            plain.push(dagrun::crypto::aead::decrypt_field(key, tenant, "Sensitive_Data", ids.value(i), enc.value(i)).unwrap());
        }
        let keep: Vec<usize> = (0..b.num_columns()).filter(|&i| i != enc_idx).collect();
        rest.push(b.project(&keep).unwrap());
    }
    (key_id, rest, plain)
}

/// `o`, after asserting that dagrun exited 0 (else both streams are shown).
pub fn ok(o: Out) -> Out {
    assert_eq!(o.code, 0, "dagrun failed:\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    o
}
