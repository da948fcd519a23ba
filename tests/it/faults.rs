//! The FAULTS half of the reliability suite: crashes at any instant,
//! corrupted cache objects, failing writes (immutable directory, file-size
//! limit, full disk), overlapping runs, hangs combined with retries.
//! Everything drives the real binary; every random choice uses a fixed seed.
//! (Plain failures, timeouts, retries, the lock and one SIGKILL of a `cmd`
//! chain are in tests/failures.rs.)

use crate::common::*;
use arrow_array::RecordBatch;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MASTER_KEY: &str = "5eed5eed00112233445566778899aabbccddeeff00112233445566778899aabb";
const TENANTS: [&str; 2] = ["Tenant_A", "Tenant_B"];
const TWO: &str = "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n";
const PIPE: &str = "pipelines/propensity.yaml";

// ---------------------------------------------------------------- helpers

/// A dagrun command in `root` with a fixed master key.
fn dagrun_in(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(root)
        .env_remove("RUST_LOG")
        .env_remove("DAGRUN_MASTER_KEY_FILE")
        .env("DAGRUN_MASTER_KEY", MASTER_KEY)
        .env("DAGRUN_PLAIN", "1")
        .env("NO_COLOR", "1");
    c
}

fn run_args(rows: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["run", PIPE, "-p", &format!("rows={rows}")].iter().map(|s| s.to_string()).collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `dagrun run pipelines/propensity.yaml -p rows=ROWS EXTRA…` in `root`.
fn prun(root: &Path, rows: &str, extra: &[&str]) -> Out {
    spawn(dagrun_in(root, &refs(&run_args(rows, extra)))).wait(HANG)
}

fn dr(root: &Path, args: &[&str]) -> Out {
    spawn(dagrun_in(root, args)).wait(HANG)
}

/// Lay out the propensity pipeline in `root` (optionally with a copy of another workspace's keyring).
fn setup_propensity(root: &Path, keys_from: Option<&Path>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    std::fs::create_dir_all(root.join("config")).unwrap();
    std::fs::create_dir_all(root.join(".dagrun")).unwrap();
    std::fs::copy(src.join(PIPE), root.join(PIPE)).unwrap();
    std::fs::write(root.join("config/tenants.yaml"), TWO).unwrap();
    if let Some(from) = keys_from {
        use std::os::unix::fs::DirBuilderExt;
        let to = root.join(".dagrun/keys");
        std::fs::DirBuilder::new().mode(0o700).create(&to).unwrap();
        for e in std::fs::read_dir(from.join(".dagrun/keys")).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap(); // keeps mode 0600
        }
    }
}

fn propensity_ws(keys_from: Option<&Path>) -> Ws {
    let ws = Ws::new();
    setup_propensity(&ws.root, keys_from);
    ws
}

/// Every regular file and directory under `root` (relative path -> blake3 or "dir"),
/// leaving out paths starting with one of `skip`.
fn snapshot(root: &Path, skip: &[&str]) -> BTreeMap<String, String> {
    fn go(base: &Path, d: &Path, skip: &[&str], out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if skip.iter().any(|s| rel.starts_with(s)) {
                continue;
            }
            let t = e.file_type().unwrap();
            if t.is_dir() {
                out.insert(rel, "dir".into());
                go(base, &p, skip, out);
            } else {
                out.insert(rel, if t.is_file() { b3(&p) } else { "other".into() });
            }
        }
    }
    let mut m = BTreeMap::new();
    go(root, root, skip, &mut m);
    m
}

/// What a run may change even when it fails: its own record, the hash memo, the lock.
const VOLATILE: &[&str] = &["runs", ".dagrun/hashmemo.json", ".dagrun/lock", ".dagrun/logs"];

fn temp_files(root: &Path) -> Vec<String> {
    snapshot(root, &[]).into_keys().filter(|p| p.contains(".dagrun-tmp.")).collect()
}

/// Every JSON file (not temp files) under the state, action cache and run records parses.
fn assert_json_intact(root: &Path, when: &str) {
    for d in [".dagrun/state", ".dagrun/cache/actions", "runs"] {
        let Ok(rd) = std::fs::read_dir(root.join(d)) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                let b = std::fs::read(&p).unwrap();
                if let Err(err) = serde_json::from_slice::<Value>(&b) {
                    panic!("{when}: torn JSON {} ({err}): {:?}", p.display(), String::from_utf8_lossy(&b));
                }
            }
        }
    }
}

/// `dagrun status --json` calls a stage fresh only when every output on disk has its recorded hash.
fn assert_fresh_is_true(root: &Path, rows: &str, when: &str) {
    let o = dr(root, &["status", PIPE, "-p", &format!("rows={rows}"), "--json"]);
    assert_eq!(o.code, 0, "{when}: status failed: {}", o.stderr);
    for s in o.json()["stages"].as_array().unwrap() {
        if s["state"] != "fresh" {
            continue;
        }
        let name = s["stage"].as_str().unwrap();
        let st: Value = serde_json::from_slice(&std::fs::read(root.join(format!(".dagrun/state/{name}.json"))).unwrap()).unwrap();
        for (path, rec) in st["outputs"].as_object().unwrap() {
            let p = root.join(path);
            if !p.exists() {
                assert!(rec["sensitive"] == true, "{when}: {name} is reported fresh but its output {path} is missing");
                continue;
            }
            assert_eq!(b3(&p), rec["hash"].as_str().unwrap(), "{when}: {name} is reported fresh but {path} differs from its record");
        }
    }
}

fn tenant_key(root: &Path, tenant: &str) -> dagrun::crypto::DataKey {
    let o = ok(dr(root, &["keys", "export", tenant, "--i-understand-this-prints-a-secret"]));
    dagrun::crypto::DataKey::from_bytes(hex::decode(o.stdout.trim()).unwrap().try_into().unwrap())
}

/// Files whose bytes are deterministic given the same inputs and keyring.
fn deterministic_outputs() -> Vec<String> {
    let mut v = Vec::new();
    for t in TENANTS {
        v.push(format!("data/afe/{t}/v1.0/features.parquet"));
        v.push(format!("data/afe/{t}/v1.0/stats.json"));
        v.push(format!("featurestore/{t}/v1.0/features.parquet"));
        v.push(format!("featurestore/{t}/v1.0/manifest.json"));
        v.push(format!("models/{t}/model.json"));
        v.push(format!("reports/serve-check/{t}.json"));
    }
    v
}

/// The results of a workspace as they must be: deterministic files by bytes,
/// encrypted files decrypted.
struct Results {
    files: BTreeMap<String, Vec<u8>>,
    encrypted: BTreeMap<String, (String, Vec<RecordBatch>, Vec<Vec<u8>>)>,
}

fn results(root: &Path, keys: &BTreeMap<&str, dagrun::crypto::DataKey>) -> Results {
    let files = deterministic_outputs()
        .into_iter()
        .map(|p| {
            let b = std::fs::read(root.join(&p)).unwrap_or_else(|e| panic!("cannot read {p}: {e}"));
            (p, b)
        })
        .collect();
    let encrypted = TENANTS.iter().map(|t| (t.to_string(), decrypted(&root.join(format!("data/encrypted/{t}.parquet")), &keys[t], t))).collect();
    Results { files, encrypted }
}

fn assert_same_results(got: &Results, want: &Results, when: &str) {
    for (p, b) in &want.files {
        assert!(got.files[p] == *b, "{when}: {p} differs from the uninterrupted run's");
    }
    for (t, w) in &want.encrypted {
        let g = &got.encrypted[t];
        assert_eq!(g.0, w.0, "{when}: key id of data/encrypted/{t}.parquet");
        assert!(g.1 == w.1, "{when}: clear columns of data/encrypted/{t}.parquet differ");
        assert!(g.2 == w.2, "{when}: decrypted Sensitive_Data of data/encrypted/{t}.parquet differs");
    }
}

fn keys_of(root: &Path) -> BTreeMap<&'static str, dagrun::crypto::DataKey> {
    TENANTS.iter().map(|t| (*t, tenant_key(root, t))).collect()
}

/// splitmix64: a fixed-seed pseudo-random sequence.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn state_count(root: &Path) -> usize {
    std::fs::read_dir(root.join(".dagrun/state")).map(|rd| rd.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count()).unwrap_or(0)
}

// ---------------------------------------------------------------- 1. crashes

/// 25 SIGKILLs spread over [0, 1.2 × an uninterrupted run]. Each episode is a
/// fresh workspace (a finished workspace has nothing left to crash in); every
/// second episode also kills the first resume, so recovering from a crash is
/// itself crashed. After each kill: no torn JSON, no stage called fresh that is
/// not. After the final resume: exit 0, results equal to the reference run's,
/// `verify` clean, no temp files, no plaintext left.
///
/// "An uninterrupted run" is measured as the test goes: the suite's other tests
/// load the machine unevenly, so a run can take three times as long while the
/// first durations are measured as later. Every run that finishes before its
/// kill is one more measurement, and the window is 1.2 × the median of the
/// last five.
#[test]
fn sigkill_at_any_instant_then_resume_equals_an_uninterrupted_run() {
    const ROWS: &str = "3000";
    const KILLS: usize = 25;
    let reference = propensity_ws(None);
    ok(prun(&reference.root, ROWS, &[]));
    // Uninterrupted runs' durations, newest last: three on fresh workspaces
    // like the episodes' (the reference run also made the keyring) to begin.
    let mut durs: Vec<Duration> = (0..3).map(|_| ok(prun(&propensity_ws(Some(&reference.root)).root, ROWS, &[])).elapsed).collect();
    let window_us = |durs: &[Duration]| {
        let mut last: Vec<Duration> = durs[durs.len().saturating_sub(5)..].to_vec();
        last.sort();
        (last[last.len() / 2].as_micros() as u64) * 12 / 10
    };
    let keys = keys_of(&reference.root);
    let want = results(&reference.root, &keys);

    let mut rng = Rng(0xFA17_5EED);
    let mut kills = 0;
    let mut live = 0;
    let mut progress = BTreeSet::new();
    let mut episode = 0;
    let t_all = Instant::now();
    while kills < KILLS {
        let ws = propensity_ws(Some(&reference.root));
        let n = if episode % 2 == 1 && kills + 2 <= KILLS { 2 } else { 1 };
        for k in 0..n {
            let delay = Duration::from_micros(rng.below(window_us(&durs)));
            let when = format!("episode {episode}, kill {k} after {delay:?}");
            let mut bg = spawn(dagrun_in(&ws.root, &refs(&run_args(ROWS, &[]))));
            match bg.exited_within(delay) {
                None => live += 1,
                // Finished before its kill: an uninterrupted run when it was
                // the episode's first (a resume has less to do).
                Some(ran) if k == 0 => durs.push(ran),
                Some(_) => {}
            }
            signal(bg.pid() as i32, libc::SIGKILL);
            let _ = bg.child.wait();
            kills += 1;
            progress.insert(state_count(&ws.root));
            assert_json_intact(&ws.root, &when);
            assert_fresh_is_true(&ws.root, ROWS, &when);
        }
        let when = format!("episode {episode}, resumed");
        let r = ok(prun(&ws.root, ROWS, &[]));
        assert!(r.stdout.contains("serve-check ok"), "{when}: {}", r.stdout);
        assert_same_results(&results(&ws.root, &keys), &want, &when);
        let v = dr(&ws.root, &["verify"]);
        assert_eq!(v.code, 0, "{when}: verify:\n{}{}", v.stdout, v.stderr);
        assert_eq!(temp_files(&ws.root), Vec::<String>::new(), "{when}");
        for t in TENANTS {
            assert!(!ws.path(&format!("data/raw/{t}.parquet")).exists(), "{when}: plaintext data/raw/{t}.parquet survived");
        }
        episode += 1;
    }
    eprintln!("{kills} kills in {episode} episodes (runs measured: {durs:?}), {live} during a run, progress points {progress:?}, {:?}", t_all.elapsed());
    // The kills really landed during runs, at many different points.
    // (Delays reach 1.2x the run, and the machine's load varies: not all of them.)
    assert!(live >= KILLS / 3, "only {live} of {kills} kills hit a running dagrun");
    assert!(progress.len() >= 4, "kills landed at too few points of the run: {progress:?}");
}

// ---------------------------------------------------------------- 2. corruption

#[derive(Clone, Copy, Debug)]
enum Corrupt {
    FlipByte,
    Truncate,
    Directory,
}

fn object_path(root: &Path, hash: &str) -> PathBuf {
    root.join(".dagrun/cache/objects").join(&hash[..2]).join(&hash[2..])
}

fn corrupt(obj: &Path, how: Corrupt) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(obj, std::fs::Permissions::from_mode(0o644));
    match how {
        Corrupt::FlipByte => {
            let mut b = std::fs::read(obj).unwrap();
            let i = b.len() / 2;
            b[i] ^= 0x20;
            std::fs::write(obj, b).unwrap(); // in place: same inode
        }
        Corrupt::Truncate => {
            let f = std::fs::OpenOptions::new().write(true).open(obj).unwrap();
            let n = f.metadata().unwrap().len();
            f.set_len(n / 2).unwrap();
        }
        Corrupt::Directory => {
            std::fs::remove_file(obj).unwrap();
            std::fs::create_dir(obj).unwrap();
            std::fs::write(obj.join("junk"), "x").unwrap();
        }
    }
}

/// For each kind of damage, one small output (copied into the cache) and one
/// large one (>= 1 MiB: hard-linked into the cache) lose their workspace copy
/// and have their cache object damaged. `verify` reports both (exit 4); the
/// next run never serves them: it warns, recomputes, and ends with the right
/// results; `verify --repair` and one more run leave `verify` clean.
#[test]
fn corrupted_cache_objects_are_reported_never_served_and_repaired() {
    const ROWS: &str = "30000"; // encrypted files > 1 MiB: linked into the cache
    let ws = propensity_ws(None);
    ok(prun(&ws.root, ROWS, &[]));
    let keys = keys_of(&ws.root);
    let want = results(&ws.root, &keys);
    let cases = [
        (Corrupt::FlipByte, "models/Tenant_A/model.json", "data/encrypted/Tenant_A.parquet"),
        (Corrupt::Truncate, "featurestore/Tenant_B/v1.0/manifest.json", "data/encrypted/Tenant_B.parquet"),
        (Corrupt::Directory, "reports/serve-check/Tenant_A.json", "data/encrypted/Tenant_A.parquet"),
    ];
    for (how, small, large) in cases {
        let when = format!("{how:?}");
        let mut hashes = Vec::new();
        for (rel, linked) in [(small, false), (large, true)] {
            use std::os::unix::fs::MetadataExt;
            let p = ws.path(rel);
            let h = b3(&p);
            let obj = object_path(&ws.root, &h);
            let (mo, mp) = (std::fs::metadata(&obj).unwrap(), std::fs::metadata(&p).unwrap());
            assert_eq!(mo.ino() == mp.ino(), linked, "{when}: {rel}: expected {} in the cache", if linked { "a hard link" } else { "a copy" });
            std::fs::remove_file(&p).unwrap();
            corrupt(&obj, how);
            hashes.push((rel, h));
        }
        let v = dr(&ws.root, &["verify"]);
        assert_eq!(v.code, 4, "{when}: verify must fail:\n{}{}", v.stdout, v.stderr);
        for (rel, h) in &hashes {
            assert!(v.stdout.contains(&h[..12]), "{when}: verify does not report the object of {rel} ({}):\n{}", &h[..12], v.stdout);
        }
        // Without --repair, verify changes nothing.
        assert_eq!(dr(&ws.root, &["verify"]).stdout, v.stdout, "{when}: verify without --repair changed the store");

        let r = prun(&ws.root, ROWS, &[]);
        assert_eq!(r.code, 0, "{when}: run after corruption failed:\n{}", r.stderr);
        for (rel, h) in &hashes {
            assert!(
                r.stderr.contains(&h[..12]) && r.stderr.to_lowercase().contains("warn"),
                "{when}: no warning naming the damaged object of {rel} ({}):\n{}",
                &h[..12],
                r.stderr
            );
        }
        assert_same_results(&results(&ws.root, &keys), &want, &when);

        let rep = dr(&ws.root, &["verify", "--repair"]);
        assert!(rep.code == 0 || rep.code == 4, "{when}: verify --repair: {}{}", rep.stdout, rep.stderr);
        ok(prun(&ws.root, ROWS, &[]));
        let v = dr(&ws.root, &["verify"]);
        assert_eq!(v.code, 0, "{when}: verify after repair and a run:\n{}{}", v.stdout, v.stderr);
        assert_same_results(&results(&ws.root, &keys), &want, &when);
        assert_eq!(temp_files(&ws.root), Vec::<String>::new(), "{when}");
    }
}

/// A cache object damaged while the workspace's copy stays intact: the run
/// has nothing to do (the output is as recorded), so the damage would stay
/// for good; `verify` names the fix and `verify --repair` stores the intact
/// copy again, after which `verify` is clean.
#[test]
fn a_damaged_cache_copy_of_an_intact_output_is_stored_again_by_repair() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo 'some result' > a.txt\n    outs: [a.txt]\n");
    ws.run(&[]).ok();
    let obj = object_path(&ws.root, &b3(&ws.path("a.txt")));
    corrupt(&obj, Corrupt::FlipByte);
    let v = ws.dagrun(&["verify"]);
    assert_eq!(v.code, 4, "{}{}", v.stdout, v.stderr);
    let h = b3(&ws.path("a.txt"));
    assert!(
        v.stdout.contains(&format!("({}) is corrupted", Path::new(".dagrun/cache/objects").join(&h[..2]).join(&h[2..]).display())),
        "named by its path: {}",
        v.stdout
    );
    let r = ws.dagrun(&["verify", "--repair"]);
    assert!(r.stdout.contains("repaired: stored a.txt in the cache again"), "{}{}", r.stdout, r.stderr);
    let v = ws.dagrun(&["verify"]);
    assert_eq!(v.code, 0, "after --repair:\n{}{}", v.stdout, v.stderr);
    assert_eq!(std::fs::read(&obj).unwrap(), b"some result\n");
    // A lost cache copy (removed by hand): the fix is named, then made.
    std::fs::remove_file(&obj).unwrap();
    let v = ws.dagrun(&["verify"]);
    assert!(v.stdout.contains("a: output a.txt has no intact copy in the cache (`dagrun verify --repair` stores"), "{}", v.stdout);
    ws.dagrun(&["verify", "--repair"]);
    assert_eq!(ws.dagrun(&["verify"]).code, 0);
    // With the workspace's copy gone too, the fix named is a forced run.
    std::fs::remove_file(ws.path("a.txt")).unwrap();
    std::fs::remove_file(&obj).unwrap();
    let v = ws.dagrun(&["verify"]);
    assert!(v.stdout.contains("(`dagrun run --force 'a'` recomputes it)"), "{}", v.stdout);
}

// ---------------------------------------------------------------- 3. failing writes

/// `chattr +i` on a directory: nobody, not even root, can create files in it.
struct Immutable(PathBuf);
impl Immutable {
    fn new(p: PathBuf) -> Immutable {
        let st = Command::new("chattr").arg("+i").arg(&p).status().expect("chattr (e2fsprogs) is needed for this test");
        assert!(st.success(), "chattr +i {} failed: this test needs a file system with the immutable attribute (ext4, xfs, btrfs)", p.display());
        Immutable(p)
    }
}
impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// After a failed write: exit 1, a message naming the file, everything but
/// the run record byte-identical, no temp files.
fn assert_failed_cleanly(root: &Path, o: &Out, before: &BTreeMap<String, String>, file: &str, why: &str, when: &str) {
    assert_eq!(o.code, 1, "{when}: expected exit 1:\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains(file) && o.stderr.contains(why), "{when}: the message must name {file} and say {why:?}:\n{}", o.stderr);
    assert_eq!(snapshot(root, VOLATILE), *before, "{when}: outputs, state or cache changed");
    assert_eq!(temp_files(root), Vec::<String>::new(), "{when}: temp files left");
}

#[test]
fn write_into_an_immutable_output_directory_fails_cleanly() {
    let ws = propensity_ws(None);
    ok(prun(&ws.root, "3000", &[]));
    let before = snapshot(&ws.root, VOLATILE);
    {
        let _ro = Immutable::new(ws.path("models/Tenant_A"));
        let o = prun(&ws.root, "3000", &["-p", "C=0.5", "train[Tenant_A]"]);
        assert_failed_cleanly(&ws.root, &o, &before, "models/Tenant_A/model.json", "Operation not permitted", "immutable models/Tenant_A");
        assert!(o.stderr.contains("stage train[Tenant_A] failed"), "{}", o.stderr);
    }
    ok(prun(&ws.root, "3000", &["-p", "C=0.5", "train[Tenant_A]"]));
    let last = ok(dr(&ws.root, &["runs", "show", "last", "--json"])).json();
    let train = last["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "train[Tenant_A]").unwrap().clone();
    assert_eq!(train["status"], "ran", "{last:#}");
    let model: Value = serde_json::from_slice(&std::fs::read(ws.path("models/Tenant_A/model.json")).unwrap()).unwrap();
    assert_eq!(model["c"], 0.5);
    assert_eq!(dr(&ws.root, &["verify"]).code, 0);
}

/// Review 68: a built-in stage that fails after its output is in place
/// (storing it in the cache, writing its record: here a cache nobody may
/// write) left the new output under the old record (`verify` called it
/// modified outside dagrun, `--repair` could not fix it). The recorded
/// output is put back from the cache: everything is as before the run.
#[test]
fn a_built_in_stage_failing_after_its_output_is_in_place_puts_back_the_recorded_one() {
    let ws = propensity_ws(None);
    ok(prun(&ws.root, "3000", &[]));
    let before = snapshot(&ws.root, VOLATILE);
    {
        let _ro = Immutable::new(ws.path(".dagrun/cache/objects"));
        let o = prun(&ws.root, "3000", &["-p", "C=0.5", "train[Tenant_A]"]);
        assert_failed_cleanly(&ws.root, &o, &before, "storing models/Tenant_A/model.json in the cache", "Operation not permitted", "immutable cache");
        assert!(o.stderr.contains(".dagrun/cache/objects/"), "the refused cache path is named:\n{}", o.stderr);
        assert!(o.stderr.contains("put back the recorded models/Tenant_A/model.json"), "{}", o.stderr);
    }
    let v = dr(&ws.root, &["verify"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
    ok(prun(&ws.root, "3000", &["-p", "C=0.5", "train[Tenant_A]"]));
    assert_eq!(dr(&ws.root, &["verify"]).code, 0);
}

/// RLIMIT_FSIZE (what `ulimit -f` sets): a write past the limit gets SIGXFSZ,
/// which kills a process that does not ignore it.
#[test]
fn file_size_limit_fails_the_stage_not_the_process() {
    let ws = propensity_ws(None);
    ok(prun(&ws.root, "3000", &[]));
    let before = snapshot(&ws.root, VOLATILE);
    let o = dagrun_with_file_size_limit(&ws.root, &refs(&run_args("3000", &["--force", "store"])), 32 << 10);
    assert_failed_cleanly(&ws.root, &o, &before, "featurestore/Tenant_A/v1.0/features.parquet", "File too large", "RLIMIT_FSIZE 32 KiB");
    assert!(o.stderr.contains("stage store[Tenant_A] failed"), "{}", o.stderr);
    let o = ok(prun(&ws.root, "3000", &["--force", "store"]));
    assert!(o.stdout.contains("serve-check ok"), "{}", o.stdout);
    assert_eq!(dr(&ws.root, &["verify"]).code, 0);
    assert_eq!(snapshot(&ws.root, &["runs", ".dagrun"]), before.into_iter().filter(|(k, _)| !k.starts_with("runs") && !k.starts_with(".dagrun")).collect());
}

/// `dagrun ARGS` in `root` with RLIMIT_FSIZE at `limit` bytes (`ulimit -f`).
fn dagrun_with_file_size_limit(root: &Path, args: &[&str], limit: u64) -> Out {
    use std::os::unix::process::CommandExt;
    let mut c = dagrun_in(root, args);
    // SAFETY: the closure runs in the forked child before exec: it only calls
    // setrlimit (async-signal-safe) on a local, and reads errno; no allocation.
    unsafe {
        c.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn(c).wait(HANG)
}

/// A file the user names (`sample --out`, `predict --output`) that cannot be
/// written whole: the error names it, the exit is non-zero and neither the
/// file nor its temporary file is left.
#[test]
fn user_named_outputs_that_cannot_be_written_name_the_file_and_leave_nothing() {
    let ws = propensity_ws(None);
    ok(prun(&ws.root, "3000", &[]));
    ok(dr(&ws.root, &["sample", "--tenant", "Tenant_A", "--rows", "2000", "--out", "rows.csv"]));
    // (400 rows: the generator's temporary Parquet file, 22 kB, fits under
    // 24 kB and the CSV, 28 kB, does not; 20000 rows: the generator fails.)
    let cases: [(&str, &[&str], u64); 4] = [
        ("sample.csv", &["sample", "--tenant", "Tenant_A", "--rows", "400", "--out", "sample.csv"], 24_000),
        ("sample.csv", &["sample", "--tenant", "Tenant_A", "--rows", "20000", "--out", "sample.csv"], 16 << 10),
        ("sample.parquet", &["sample", "--tenant", "Tenant_A", "--rows", "20000", "--out", "sample.parquet"], 16 << 10),
        ("scores.csv", &["predict", "--tenant", "Tenant_A", "--input", "rows.csv", "--output", "scores.csv"], 16 << 10),
    ];
    for (file, args, limit) in cases {
        let o = dagrun_with_file_size_limit(&ws.root, args, limit);
        assert_eq!(o.code, 1, "{file}: expected exit 1:\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
        assert!(o.stderr.contains(file) && o.stderr.contains("File too large"), "{file}: the message must name the file and the cause:\n{}", o.stderr);
        if limit == 24_000 {
            assert!(!o.stderr.contains(".sample"), "{file}: the CSV writer, not the generator, was to fail:\n{}", o.stderr);
        }
        assert!(!ws.path(file).exists(), "{file} was left behind");
        assert_eq!(temp_files(&ws.root), Vec::<String>::new(), "{file}: temp files left");
    }
}

/// A small tmpfs (as root) filled up: ENOSPC.
struct Tmpfs(tempfile::TempDir);
impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let d = tempfile::Builder::new().prefix("dagrun-fault-fs-").tempdir().unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(d.path()).status().expect("mount");
        assert!(st.success(), "mount -t tmpfs failed: this test needs root (CAP_SYS_ADMIN)");
        Tmpfs(d)
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().to_string_lossy().as_bytes()).unwrap();
    // SAFETY: statvfs is plain integers, so all-zero is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to that live local.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Fill the file system of `dir` to its last byte; the returned files free it.
fn fill(dir: &Path) -> [PathBuf; 2] {
    let files = [dir.join("filler"), dir.join("filler2")];
    std::fs::write(&files[0], vec![0u8; free_bytes(dir) as usize]).unwrap();
    // Whatever is left (tmpfs rounds to pages), a block at a time.
    let mut f = std::fs::File::create(&files[1]).unwrap();
    while std::io::Write::write_all(&mut f, &[0u8; 1024]).is_ok() {}
    files
}

/// Review 21: on a full disk a promotion that failed stayed in the history,
/// and key commands that failed left the audit log so that every later key
/// operation (`keys forget` included) was refused or `--verify` cried tampering.
#[test]
fn key_and_registry_commands_on_a_full_disk_leave_no_false_record() {
    let fs = Tmpfs::new("24m");
    let root = fs.0.path().join("ws");
    setup_propensity(&root, None);
    ok(prun(&root, "3000", &[]));
    ok(prun(&root, "3000", &["-p", "C=0.5"]));
    let models = ok(dr(&root, &["models", "list", "Tenant_A", "--json"])).json();
    let version = |alias: &str| models["models"].as_array().unwrap().iter().find(|m| m["alias"] == alias).unwrap()["version"].as_str().unwrap().to_string();
    let (champion, previous) = (version("champion"), version("previous"));
    let history = || ok(dr(&root, &["models", "history", "Tenant_A", "--json"])).json()["history"].as_array().unwrap().clone();
    let before = history();
    assert!(before.iter().all(|e| e["applied"] == true), "{before:?}");

    let filled = fill(fs.0.path());
    let o = dr(&root, &["models", "promote", "Tenant_A", &previous, "--reason", "back"]);
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("No space left on device"), "{}", o.stderr);
    for _ in 0..2 {
        let o = dr(&root, &["keys", "rotate", "Tenant_A"]);
        assert_ne!(o.code, 0, "keys rotate on a full disk: {}{}", o.stdout, o.stderr);
    }
    for f in &filled {
        std::fs::remove_file(f).unwrap();
    }
    assert_eq!(history(), before, "a promotion that failed is in the history");
    let champ = ok(dr(&root, &["models", "list", "Tenant_A", "--json"])).json();
    assert!(champ["models"].as_array().unwrap().iter().any(|m| m["alias"] == "champion" && m["version"] == champion.as_str()));
    let v = dr(&root, &["keys", "audit", "--verify"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    ok(dr(&root, &["keys", "forget", "Tenant_A", "--yes"]));
    ok(dr(&root, &["models", "promote", "Tenant_A", &previous, "--reason", "back"]));
    let after = history();
    assert_eq!(after.len(), before.len() + 1);
    assert!(after.iter().all(|e| e["applied"] == true), "{after:?}");
    let v = dr(&root, &["keys", "audit", "--verify"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    assert!(!v.stdout.contains("not yet confirmed"), "{}", v.stdout);
}

#[test]
fn full_disk_fails_the_stage_and_keeps_everything_intact() {
    let fs = Tmpfs::new("16m");
    let root = fs.0.path().join("ws");
    setup_propensity(&root, None);
    ok(prun(&root, "3000", &[]));
    let before = snapshot(&root, VOLATILE);
    // Leave 48 KiB: enough for state and records, not for a 100 KB feature file.
    let filler = fs.0.path().join("filler");
    let n = free_bytes(fs.0.path()).saturating_sub(48 << 10);
    std::fs::write(&filler, vec![0u8; n as usize]).unwrap();
    let o = prun(&root, "3000", &["--force", "store[Tenant_A]"]);
    assert_failed_cleanly(&root, &o, &before, "featurestore/Tenant_A/v1.0/features.parquet", "No space left on device", "full tmpfs");
    std::fs::remove_file(&filler).unwrap();
    ok(prun(&root, "3000", &["--force", "store[Tenant_A]"]));
    assert_eq!(dr(&root, &["verify"]).code, 0);
    assert_eq!(temp_files(&root), Vec::<String>::new());
}

/// A pipeline whose stage writes plaintext and a temporary file beside it,
/// then kills dagrun (SIGKILL: nothing unwinds, nothing is shredded).
const KILLED: &str = r#"
stages:
  raw:
    cmd: echo 'jane.doe.4711@example.com' > raw/pii.txt; echo 'jane.doe.4711@example.com' > raw/.pii.txt.dagrun-tmp.1.0; kill -9 $PPID; sleep 5
    outs: [{path: raw/pii.txt, sensitive: true}]
"#;

/// What a killed run left — its temporary files and its plaintext outputs —
/// is removed by the next run whatever pipeline that is (another one, or
/// this one with a tenant fewer: its outputs no longer name those files).
#[test]
fn a_killed_runs_leftovers_are_removed_by_the_next_run_whatever_its_pipeline() {
    let ws = Ws::new();
    ws.write("killed.yaml", KILLED);
    ws.write("other.yaml", "stages:\n  hello:\n    cmd: echo hi > out/hello.txt\n    outs: [out/hello.txt]\n");
    let o = ws.dagrun(&["run", "killed.yaml"]);
    assert_ne!(o.code, 0, "the stage kills dagrun: {}", o.stderr);
    assert!(ws.exists("raw/pii.txt") && ws.exists("raw/.pii.txt.dagrun-tmp.1.0"), "{:?}", ws.walk());
    let o = ok(ws.dagrun(&["run", "other.yaml"]));
    assert!(!ws.exists("raw/pii.txt"), "the killed run's plaintext output survived another pipeline's run: {:?}", ws.walk());
    assert!(!ws.exists("raw/.pii.txt.dagrun-tmp.1.0"), "its temporary file survived: {:?}", ws.walk());
    assert!(o.stderr.contains("deleted raw/pii.txt: a sensitive output a killed run left"), "{}", o.stderr);
    // A file the current pipeline reads is the user's now: never deleted.
    ws.dagrun(&["run", "killed.yaml"]);
    ws.write("reads.yaml", "stages:\n  use:\n    cmd: cat raw/pii.txt > out/n.txt\n    deps: [raw/pii.txt]\n    outs: [out/n.txt]\n");
    ok(ws.dagrun(&["run", "reads.yaml"]));
    assert!(ws.exists("raw/pii.txt") && !ws.exists("raw/.pii.txt.dagrun-tmp.1.0"), "{:?}", ws.walk());
    // Nor a folder output holding a file the current pipeline reads.
    ws.write(
        "killdir.yaml",
        "stages:\n  raw:\n    cmd: mkdir -p scr; echo pii > scr/pii.txt; kill -9 $PPID; sleep 5\n    outs: [{path: scr, sensitive: true}]\n",
    );
    assert_ne!(ws.dagrun(&["run", "killdir.yaml"]).code, 0);
    ws.write("readsdir.yaml", "stages:\n  use:\n    cmd: cat scr/pii.txt > out/m.txt\n    deps: [scr/pii.txt]\n    outs: [out/m.txt]\n");
    ok(ws.dagrun(&["run", "readsdir.yaml"]));
    assert!(ws.exists("scr/pii.txt"), "{:?}", ws.walk());

    // Unclean only because the machine restarted since a run that ended (and
    // shredded its plaintext): a file the user put at that path since is
    // theirs; only a run killed while making plaintext has its outputs deleted.
    ws.write("ends.yaml", "stages:\n  raw:\n    cmd: echo pii > raw/p2.txt\n    outs: [{path: raw/p2.txt, sensitive: true}]\n");
    ok(ws.dagrun(&["run", "ends.yaml"]));
    assert!(!ws.exists("raw/p2.txt"), "shredded at the end of its run");
    ws.write("raw/p2.txt", "the user's own file\n");
    ws.write(".dagrun/lock", "released 00000000-0000-0000-0000-000000000000\n");
    ok(ws.dagrun(&["run", "other.yaml"]));
    assert_eq!(ws.read("raw/p2.txt"), "the user's own file\n");
}

/// `verify` says when a killed run left plaintext (exit 4), not while a run
/// holds the lock (its plaintext is there by design), and `--repair` deletes
/// it at once instead of leaving it for the next night's run.
#[test]
fn verify_reports_a_killed_runs_plaintext_and_repair_deletes_it() {
    let ws = Ws::new();
    ws.write("killed.yaml", KILLED);
    assert_ne!(ws.dagrun(&["run", "killed.yaml"]).code, 0);
    assert!(ws.exists("raw/pii.txt"));
    let v = ws.dagrun(&["verify"]);
    assert_eq!(v.code, 4, "{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains("raw/pii.txt: plaintext (a sensitive output) left by a run that was killed"), "{}", v.stdout);
    assert!(!v.stdout.contains("jane.doe") && !v.stderr.contains("jane.doe"), "{}{}", v.stdout, v.stderr);
    {
        // A run at work (holding the lock) makes plaintext by design.
        let lock = std::fs::File::open(ws.path(".dagrun/lock")).unwrap();
        lock.lock().unwrap();
        let v = ws.dagrun(&["verify"]);
        assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
        assert!(v.stdout.contains("holds the workspace lock: the plaintext a run makes is there until it ends"), "{}", v.stdout);
    }
    {
        // Another holder (a `gc`) makes no plaintext: reported all the same (helper-75).
        let killed_line = ws.read(".dagrun/lock");
        ws.write(".dagrun/lock", "pid 1 (dagrun gc, started 2026-12-07T00:00:00Z)\n");
        let lock = std::fs::File::open(ws.path(".dagrun/lock")).unwrap();
        lock.lock().unwrap();
        let v = ws.dagrun(&["verify"]);
        assert_eq!(v.code, 4, "{}{}", v.stdout, v.stderr);
        assert!(v.stdout.contains("raw/pii.txt: plaintext (a sensitive output) left by a run that was killed"), "{}", v.stdout);
        drop(lock);
        ws.write(".dagrun/lock", killed_line);
    }
    let v = ws.dagrun(&["verify", "--repair"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    assert!(!ws.exists("raw/pii.txt"), "{:?}", ws.walk());
    let v = ws.dagrun(&["verify"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    // What the killed run left running (writing the plaintext again and
    // again) is stopped first, so the deletion lasts.
    ws.write(
        "respawn.yaml",
        "stages:\n  raw:\n    cmd: (while true; do echo alice > raw/pii.txt; sleep 0.05; done) >/dev/null 2>&1 & echo $! > orphan.pid; sleep 0.2; kill -9 $PPID; sleep 5\n    outs: [{path: raw/pii.txt, sensitive: true}]\n",
    );
    assert_ne!(ws.dagrun(&["run", "respawn.yaml"]).code, 0);
    let orphan = ws.read("orphan.pid").trim().to_string();
    assert_eq!(ws.dagrun(&["verify"]).code, 4);
    let v = ws.dagrun(&["verify", "--repair"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    assert!(v.stderr.contains("a killed run had left running (pid ") && v.stderr.contains(&orphan), "{}", v.stderr);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!ws.exists("raw/pii.txt"), "the killed run's process wrote its plaintext again: {:?}", ws.walk());
    // A run that ended deleted its own: nothing is reported.
    ws.write("ends.yaml", "stages:\n  raw:\n    cmd: echo pii > raw/p2.txt\n    outs: [{path: raw/p2.txt, sensitive: true}]\n");
    ok(ws.dagrun(&["run", "ends.yaml"]));
    ws.write("raw/p2.txt", "the user's own file\n");
    assert_eq!(ws.dagrun(&["verify"]).code, 0);
}

/// A killed run's plaintext is not lost track of: after a second kill before
/// the next run made any plaintext (that run deletes it first), in a
/// workspace moved with `mv` (its record is still its own), and an
/// untrusted record is a problem `verify` names (helper-75 #2–#4).
#[test]
fn a_killed_runs_plaintext_survives_no_second_kill_or_move_and_an_untrusted_record_is_named() {
    let ws = Ws::new();
    ws.write(
        "p.yaml",
        "stages:\n  pre:\n    cmd: if [ -f killpre ]; then kill -9 $PPID; sleep 5; fi; cat trigger.txt > pre/out.txt\n    deps: [trigger.txt]\n    outs: [pre/out.txt]\n  raw:\n    cmd: echo 'jane.doe.4711@example.com' > raw/pii.txt; if [ -f killraw ]; then kill -9 $PPID; sleep 5; fi\n    deps: [pre/out.txt]\n    outs: [{path: raw/pii.txt, sensitive: true}]\n",
    );
    ws.write("trigger.txt", "1");
    ws.write("killraw", "");
    assert_ne!(ws.dagrun(&["run", "p.yaml"]).code, 0);
    assert!(ws.exists("raw/pii.txt"));
    std::fs::remove_file(ws.path("killraw")).unwrap();
    ws.write("killpre", "");
    ws.write("trigger.txt", "2");
    let o = ws.dagrun(&["run", "p.yaml"]);
    assert_ne!(o.code, 0);
    assert!(!ws.exists("raw/pii.txt"), "the first killed run's plaintext outlived the second run: {:?}", ws.walk());
    std::fs::remove_file(ws.path("killpre")).unwrap();

    // Killed, then the workspace moved (`mv`): its record is still its own.
    ws.write("killraw", "");
    assert_ne!(ws.dagrun(&["run", "p.yaml"]).code, 0);
    assert!(ws.exists("raw/pii.txt"));
    let moved = ws.root.with_file_name(format!("{}-moved", ws.root.file_name().unwrap().to_string_lossy()));
    std::fs::rename(&ws.root, &moved).unwrap();
    let v = spawn({
        let mut c = std::process::Command::new(BIN);
        c.args(["verify"]).current_dir(&moved).env_remove("RUST_LOG").env("NO_COLOR", "1");
        c
    })
    .wait(HANG);
    std::fs::rename(&moved, &ws.root).unwrap();
    assert_eq!(v.code, 4, "{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains("raw/pii.txt: plaintext (a sensitive output) left by a run that was killed"), "{}", v.stdout);

    // A record that does not verify is named, not passed over.
    let rec = ws.read(".dagrun/places.json");
    ws.write(".dagrun/places.json", rec.replacen("raw/pii.txt", "raw/pii.txx", 1));
    let v = ws.dagrun(&["verify"]);
    assert_eq!(v.code, 4, "{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains(".dagrun/places.json fails its MAC check") && v.stdout.contains("not trusted"), "{}", v.stdout);
}

/// A places record sealed under another master key (a shell with another
/// `DAGRUN_MASTER_KEY`) is never obeyed: after a killed run it is kept until a
/// run with that key cleans up; after a clean end it is replaced once, not
/// warned about on every run.
#[test]
fn a_places_record_under_another_key_is_kept_after_a_killed_run_and_replaced_after_a_clean_one() {
    const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    let ws = Ws::new();
    ws.write("killed.yaml", KILLED);
    ws.write("other.yaml", "stages:\n  hello:\n    cmd: echo hi > out/hello.txt\n    outs: [out/hello.txt]\n");
    let with = |key: &str, file: &str| {
        let mut c = ws.cmd(&["run", file]);
        c.env_remove("DAGRUN_MASTER_KEY_FILE").env("DAGRUN_MASTER_KEY", key);
        spawn(c).wait(HANG)
    };
    assert_ne!(with(K1, "killed.yaml").code, 0, "the stage kills dagrun");
    assert!(ws.exists("raw/pii.txt"));
    for _ in 0..2 {
        let o = ok(with(K2, "other.yaml"));
        assert!(o.stderr.contains("places.json fails its MAC check") && o.stderr.contains("and kept"), "{}", o.stderr);
        assert!(ws.exists("raw/pii.txt"), "deleted on the word of a record this key cannot verify");
    }
    let o = ok(with(K1, "other.yaml"));
    assert!(o.stderr.contains("deleted raw/pii.txt: a sensitive output a killed run left"), "{}", o.stderr);
    let o = ok(with(K2, "other.yaml"));
    assert!(o.stderr.contains("places.json fails its MAC check") && o.stderr.contains("replaced by this run's"), "{}", o.stderr);
    let o = ok(with(K2, "other.yaml"));
    assert!(!o.stderr.contains("places.json"), "{}", o.stderr);
}

/// Review 33: a stage command's shell dies with a SIGKILLed dagrun, but a
/// process it started ran on and wrote plaintext after the next run (of
/// another pipeline) had cleaned up, where no later run looked. The next run
/// stops the processes carrying the killed run's mark first; a process a run
/// that ended cleanly left on purpose carries another mark and runs on.
#[test]
fn processes_a_killed_run_left_are_stopped_before_the_next_run_cleans_up() {
    let ws = Ws::new();
    ws.write("bg.yaml", "stages:\n  server:\n    cmd: (sleep 2; echo bg > out/bg.txt) >/dev/null 2>&1 & echo ok > out/s.txt\n    outs: [out/s.txt]\n");
    ok(ws.dagrun(&["run", "bg.yaml"]));
    ws.write(
        "killed.yaml",
        "stages:\n  raw:\n    cmd: (sleep 3; echo alice > raw/late.txt) >/dev/null 2>&1 & echo $! > orphan.pid; kill -9 $PPID; sleep 5\n    outs: [{path: raw/late.txt, sensitive: true}]\n",
    );
    // Named another way (`-C ws/`, as tab completion writes it): the same workspace.
    let o = ws.dagrun(&["-C", &format!("{}/", ws.root.display()), "run", "killed.yaml"]);
    assert_ne!(o.code, 0, "the stage kills dagrun: {}", o.stderr);
    let orphan = ws.read("orphan.pid").trim().to_string();
    assert!(std::path::Path::new(&format!("/proc/{orphan}")).exists(), "the orphan runs");
    ws.write("other.yaml", "stages:\n  hello:\n    cmd: echo hi > out/hello.txt\n    outs: [out/hello.txt]\n");
    let o = ok(ws.dagrun(&["run", "other.yaml"]));
    assert!(o.stderr.contains("a killed run had left running (pid ") && o.stderr.contains(&orphan), "{}", o.stderr);
    // The orphan would have written 3 s after it started (a margin for a busy machine).
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert!(!ws.exists("raw/late.txt"), "the killed run's orphan wrote its plaintext after the clean-up: {:?}", ws.walk());
    assert_eq!(ws.read("out/bg.txt"), "bg\n", "the process a clean run left on purpose was stopped");
    assert!(!o.stderr.contains("not obeyed"), "the places record of `-C ws/` is this workspace's: {}", o.stderr);
    // Stopped once: the next run finds the lock clean and says nothing.
    let o = ok(ws.dagrun(&["run", "other.yaml"]));
    assert!(!o.stderr.contains("left running"), "{}", o.stderr);
}

/// A workspace copied while a run was under way carries that run's lock line
/// and mark: a run in the copy finds it unclean but never stops the original
/// run's processes (they are of another workspace).
#[test]
fn a_run_in_a_copied_workspace_leaves_the_original_runs_processes_alone() {
    let ws = Ws::new();
    ws.pipeline("stages:\n  slow:\n    cmd: touch started; sleep 2; echo done > out/done.txt\n    outs: [out/done.txt]\n");
    let original = spawn(ws.cmd(&["run", "pipeline.yaml"]));
    let t = Instant::now();
    while !ws.exists("started") && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ws.exists("started"), "the original run's stage started");
    let copy = Ws::new();
    let cp = Command::new("cp").arg("-a").arg(ws.root.join(".")).arg(&copy.root).status().unwrap();
    assert!(cp.success());
    assert!(copy.read(".dagrun/lock").contains("\nmarks "), "the copy holds the original run's mark");
    let o = ok(copy.dagrun(&["run", "pipeline.yaml"]));
    assert!(!o.stderr.contains("left running"), "{}", o.stderr);
    let o = original.wait(HANG);
    assert_eq!(o.code, 0, "the original run was disturbed: {}", o.stderr);
    assert_eq!(ws.read("out/done.txt"), "done\n");
}

// ---------------------------------------------------------------- 4. overlap

const OVERLAP: &str = r#"
stages:
  a:
    cmd: echo "start a $PPID" >> log.txt; sleep 0.05; echo a > out/a.txt; echo "end a $PPID" >> log.txt
    outs: [out/a.txt]
  c:
    cmd: echo "start c $PPID" >> log.txt; sleep 0.05; echo c > out/c.txt; echo "end c $PPID" >> log.txt
    outs: [out/c.txt]
  b:
    cmd: echo "start b $PPID" >> log.txt; sleep 0.05; cat out/a.txt out/c.txt > out/b.txt; echo "end b $PPID" >> log.txt
    deps: [out/a.txt, out/c.txt]
    outs: [out/b.txt]
"#;

fn outputs_of(root: &Path) -> BTreeMap<String, String> {
    ["out/a.txt", "out/b.txt", "out/c.txt"].iter().map(|p| (p.to_string(), std::fs::read_to_string(root.join(p)).unwrap())).collect()
}

/// Two forced runs started together, 20 times: with `--wait` the second waits,
/// without it exits 75; the stages of two runs never interleave.
#[test]
fn overlapping_runs_never_interleave() {
    let reference = Ws::new();
    reference.pipeline(OVERLAP);
    reference.run(&[]).ok();
    let want = outputs_of(&reference.root);

    let ws = Ws::new();
    ws.pipeline(OVERLAP);
    let mut refused = 0;
    let mut nowait_rounds = 0;
    for round in 0..20 {
        let waits = match round % 3 {
            0 => [true, true],
            1 => [false, false],
            _ => [true, false],
        };
        if waits == [false, false] {
            nowait_rounds += 1;
        }
        let _ = std::fs::remove_file(ws.path("log.txt"));
        let before = ws.record_files();
        let runs: Vec<Bg> = waits
            .iter()
            .map(|&w| {
                let mut a = vec!["run", "pipeline.yaml", "--force"];
                if w {
                    a.extend(["--wait", "30"]);
                }
                spawn(ws.cmd(&a))
            })
            .collect();
        let pids: Vec<u32> = runs.iter().map(|b| b.pid()).collect();
        let outs: Vec<Out> = runs.into_iter().map(|b| b.wait(HANG)).collect();
        let when = format!("round {round} (waits {waits:?}, pids {pids:?})");
        let log = ws.read("log.txt");
        let seq: Vec<(String, String, u32)> = log
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 3, "{when}: bad log line {l:?}");
                (f[0].to_string(), f[1].to_string(), f[2].parse().unwrap())
            })
            .collect();
        // Blocks: once a pid's lines stop, that pid never appears again.
        let mut blocks: Vec<u32> = Vec::new();
        for (_, _, pid) in &seq {
            if blocks.last() != Some(pid) {
                assert!(!blocks.contains(pid), "{when}: the stages of two runs interleave:\n{log}");
                blocks.push(*pid);
            }
        }
        let mut n_ok = 0;
        for (i, o) in outs.iter().enumerate() {
            match o.code {
                0 => {
                    n_ok += 1;
                    let lines: Vec<_> = seq.iter().filter(|(_, _, p)| *p == pids[i]).collect();
                    assert_eq!(lines.len(), 6, "{when}: run {} did not run its 3 stages:\n{log}", pids[i]);
                }
                75 => {
                    assert!(!waits[i], "{when}: a run with --wait exited 75:\n{}", o.stderr);
                    refused += 1;
                    assert!(o.stderr.contains("locked by pid"), "{when}: {}", o.stderr);
                    assert!(!blocks.contains(&pids[i]), "{when}: a refused run ran stages");
                }
                c => panic!("{when}: run {} exited {c}:\n{}", pids[i], o.stderr),
            }
        }
        assert!(n_ok >= 1, "{when}: no run succeeded");
        assert_eq!(ws.record_files().difference(&before).count(), n_ok, "{when}: one record per run that went ahead");
        assert_eq!(outputs_of(&ws.root), want, "{when}");
        assert_eq!(temp_files(&ws.root), Vec::<String>::new(), "{when}");
    }
    // Started together without --wait, one is almost always refused.
    assert!(refused * 2 >= nowait_rounds, "only {refused} refusals in {nowait_rounds} rounds without --wait");
    let r = ws.run(&[]).ok();
    assert_eq!(r.with("cached").len(), 3, "{:#}", r.rec());
}

// ---------------------------------------------------------------- 5. hangs

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next().unwrap_or('?')).unwrap_or('?');
            state != 'Z' && state != 'X'
        }
        Err(_) => false,
    }
}

/// A first attempt that writes part of its output and hangs is killed by its
/// timeout; the retry starts from a clean slate and its result is recorded.
#[test]
fn retry_after_a_timeout_starts_clean() {
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  flaky:\n    timeout: 1\n    retries: 1\n    cmd: n=$(cat tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > tries; if [ $n -eq 1 ]; then echo partial > out.txt; sleep 30; fi; echo complete > out.txt\n    outs: [out.txt]\n",
    );
    let t0 = Instant::now();
    let r = ws.run(&[]).ok();
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
    assert_eq!(r.statuses()["flaky"], "ran");
    assert_eq!(ws.read("tries").trim(), "2");
    assert_eq!(ws.read("out.txt"), "complete\n");
    assert!(r.out.stderr.contains("timed out"), "the first attempt's timeout is not reported:\n{}", r.out.stderr);

    // A retry that "succeeds" without writing: the first attempt's partial file
    // must not be taken for its output.
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  flaky:\n    timeout: 1\n    retries: 1\n    cmd: n=$(cat tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > tries; if [ $n -eq 1 ]; then echo partial > out.txt; sleep 30; fi; true\n    outs: [out.txt]\n  after:\n    cmd: cp out.txt after.txt\n    deps: [out.txt]\n    outs: [after.txt]\n",
    );
    let r = ws.run(&[]);
    assert_eq!(r.out.code, 1, "a partial output of a timed-out attempt was recorded:\n{}\n{:#}", r.out.stderr, r.rec());
    assert!(r.out.stderr.contains("did not write its declared output out.txt"), "{}", r.out.stderr);
    assert!(!ws.exists("after.txt"));
}

/// Review 68: a process that left the attempt's process group (`setsid`, as
/// daemonising tools do) outlived the timeout that killed the group and
/// wrote the timed-out attempt's output over the retry's, which was recorded
/// and cached; and one started by an interrupted run wrote plaintext after
/// the run's clean-up. Each attempt's processes carry its own mark: a
/// timed-out, interrupted or failed attempt's are stopped however they left.
#[test]
fn what_a_timed_out_interrupted_or_failed_attempt_started_outside_its_group_is_stopped() {
    // Timeout, then a retry that writes the right answer.
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  s:\n    timeout: 1\n    retries: 1\n    cmd: \"if [ -e attempted ]; then echo RIGHT > out.txt; else touch attempted; setsid sh -c 'echo $$ > late.pid; sleep 1.5; echo WRONG > out.txt' & sleep 10; fi\"\n    outs: [out.txt]\n  use:\n    cmd: cat out.txt > final.txt\n    deps: [out.txt]\n    outs: [final.txt]\n",
    );
    let r = ws.run(&[]).ok();
    assert!(r.out.stderr.contains("timed out") && r.out.stderr.contains("started outside its process group"), "{}", r.out.stderr);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ws.read("out.txt"), "RIGHT\n");
    assert_eq!(ws.read("final.txt"), "RIGHT\n");
    assert!(!alive(ws.read("late.pid").trim().parse().unwrap()));
    assert!(ws.dagrun(&["status", "pipeline.yaml"]).stdout.contains("2 fresh"));

    // A failed attempt: what it left writing is stopped before its partial
    // output is removed.
    let ws = Ws::new();
    ws.pipeline("stages:\n  f:\n    cmd: \"setsid sh -c 'echo $$ > late.pid; sleep 1; echo late > out.txt' & sleep 0.2; exit 3\"\n    outs: [out.txt]\n");
    let r = ws.run(&[]);
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    assert!(r.out.stderr.contains("exit status 3; 2 processes it had started outside its process group were stopped (no stderr)"), "{}", r.out.stderr);
    std::thread::sleep(Duration::from_millis(1300));
    assert!(!ws.exists("out.txt"), "a failed attempt's process wrote after the run");

    // SIGTERM: the sensitive output a detached process would write later never appears.
    let ws = Ws::new();
    ws.pipeline("stages:\n  raw:\n    cmd: \"setsid sh -c 'echo $$ > late.pid; sleep 2; echo PII > pii.csv' & sleep 30\"\n    outs: [{path: pii.csv, sensitive: true}]\n");
    let run = spawn(ws.cmd(&["run", "pipeline.yaml"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ws.exists("late.pid") || ws.read("late.pid").trim().is_empty() {
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(run.pid() as i32, libc::SIGTERM);
    let out = run.wait(HANG);
    assert_eq!(out.code, 130, "{}", out.stderr);
    assert!(!alive(ws.read("late.pid").trim().parse().unwrap()), "the detached process outlived the interrupt");
    std::thread::sleep(Duration::from_millis(2200));
    assert!(!ws.exists("pii.csv"), "plaintext written after the interrupted run's clean-up");
}

/// A command that ignores SIGTERM is SIGKILLed after the grace period, on
/// every attempt; the stage fails after all attempts, within bounded time, and
/// nothing of it survives.
#[test]
fn timeout_with_retries_kills_a_command_that_ignores_sigterm() {
    let ws = Ws::new();
    ws.pipeline(
        "stages:\n  stubborn:\n    timeout: 1\n    retries: 1\n    cmd: trap '' TERM; echo $$ >> pids; sleep 30 & echo $! >> pids; wait; wait; echo done > out.txt\n    outs: [out.txt]\n  other:\n    cmd: echo ok > other.txt\n    outs: [other.txt]\n",
    );
    let t0 = Instant::now();
    let r = ws.run(&[]);
    let took = t0.elapsed();
    assert_eq!(r.out.code, 1, "{}", r.out.stderr);
    // Two attempts of 1 s + 2 s grace each, plus slack.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(r.statuses()["stubborn"], "failed");
    assert_eq!(r.statuses()["other"], "ran");
    let err = r.stage("stubborn")["error"].as_str().unwrap().to_string();
    assert!(err.contains("failed after 2 attempts") && err.contains("timed out"), "{err}");
    assert!(!ws.exists("out.txt"));
    let pids: Vec<i32> = ws.read("pids").lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(pids.len(), 4, "two attempts, a shell and a sleep each: {pids:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<i32> = pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "processes survived the timeout: {left:?}");
}
