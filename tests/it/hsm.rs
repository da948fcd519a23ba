//! The master key in a PKCS#11 token (SoftHSM2, made per test by
//! `../shared/tools/softhsm-token.sh`): the pipeline, `keys init`, `keys rewrap`
//! (SIGKILLed at random instants), every refusal, and the key audit log.
//! Nothing here is skipped: a missing SoftHSM2 is installed by the script (root)
//! or `.ci/run`, and a missing script is a failure.

use crate::common::{Out, Ws, ok, signal, spawn};
use arrow_array::{Array, BinaryArray, Int64Array};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ROWS: &str = "3000";
const TENANTS: &str = "tenants:\n  - id: Tenant_A\n    share: 0.5\n  - id: Tenant_B\n    share: 0.3\n  - id: Tenant_C\n    share: 0.2\n";

fn script() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("DAGRUN_SOFTHSM_TOKEN_SH").map(PathBuf::from),
        Some(root.join("../shared/tools/softhsm-token.sh")),
        Some(root.join("../../shared/tools/softhsm-token.sh")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("softhsm-token.sh not found beside the repository (../shared/tools); set DAGRUN_SOFTHSM_TOKEN_SH"))
}

/// A SoftHSM2 token in a temp dir with key `dagrun-master`.
struct Token {
    dir: tempfile::TempDir,
    conf: String,
    uri: String,
}

fn exports(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

impl Token {
    fn new() -> Token {
        let dir = tempfile::Builder::new().prefix("dagrun-hsm-").tempdir().unwrap();
        let o = Command::new("bash").arg(script()).arg("init").arg(dir.path()).output().unwrap();
        assert!(o.status.success(), "softhsm-token.sh init failed: {}", String::from_utf8_lossy(&o.stderr));
        let env = exports(&String::from_utf8_lossy(&o.stdout));
        Token { conf: env["SOFTHSM2_CONF"].clone(), uri: env["DAGRUN_MASTER_KEY_URI"].clone(), dir }
    }

    /// A second non-extractable key; its URI.
    fn add_key(&self, label: &str) -> String {
        let o = Command::new("bash").arg(script()).arg("addkey").arg(self.dir.path()).arg(label).output().unwrap();
        assert!(o.status.success(), "addkey failed: {}", String::from_utf8_lossy(&o.stderr));
        exports(&String::from_utf8_lossy(&o.stdout))["DAGRUN_MASTER_KEY_URI"].clone()
    }

    fn pin(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pin")).unwrap()
    }

    fn uri_for(&self, label: &str) -> String {
        self.uri.replace("object=dagrun-master", &format!("object={label}"))
    }

    /// The token's files (SoftHSM2 keeps each token in a folder of files).
    fn save(&self) -> Vec<(PathBuf, Vec<u8>)> {
        all_bytes(&self.dir.path().join("tokens"))
    }

    /// SoftHSM2 rewrites `token.object` in place (truncate, then write) at every
    /// login, so a SIGKILL of *any* SoftHSM client at that instant leaves it empty
    /// and the token unusable — a SoftHSM2 limitation (a hardware HSM keeps its
    /// state inside the device), not a dagrun one. After such a kill the token's
    /// files (never the workspace's) are put back as they were; no key object
    /// changes during a rewrap, so nothing else is undone.
    fn restore_if_torn(&self, saved: &[(PathBuf, Vec<u8>)]) -> bool {
        let torn = all_bytes(&self.dir.path().join("tokens")).iter().any(|(p, b)| p.ends_with("token.object") && b.is_empty());
        if torn {
            eprintln!("SoftHSM2's token.object was torn by the kill; restoring the token files");
            for (p, b) in saved {
                std::fs::write(p, b).unwrap();
            }
        }
        torn
    }

    /// pkcs11-tool on the token, logged in.
    fn tool(&self, args: &[&str]) -> std::process::Output {
        Command::new("pkcs11-tool")
            .args(["--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "dagrun-test", "--login", "--pin", &self.pin()])
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap()
    }
}

fn workspace() -> Ws {
    let ws = Ws::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ws.write("pipelines/propensity.yaml", std::fs::read(root.join("pipelines/propensity.yaml")).unwrap());
    ws.write("config/tenants.yaml", TENANTS);
    ws
}

/// dagrun in `ws` with the token's config and exactly the given master-key variables.
fn dg(ws: &Ws, tok: Option<&Token>, args: &[&str], env: &[(&str, &str)]) -> Out {
    spawn(cmd(ws, tok, args, env)).wait(Duration::from_secs(300))
}

fn cmd(ws: &Ws, tok: Option<&Token>, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = ws.cmd(args);
    c.env("DAGRUN_PLAIN", "1");
    for v in ["DAGRUN_MASTER_KEY", "DAGRUN_MASTER_KEY_FILE", "DAGRUN_MASTER_KEY_URI"] {
        c.env_remove(v);
    }
    if let Some(t) = tok {
        c.env("SOFTHSM2_CONF", &t.conf);
    }
    c.envs(env.iter().copied());
    c
}

fn run_pipeline(ws: &Ws, tok: Option<&Token>, env: &[(&str, &str)]) -> Out {
    ok(dg(ws, tok, &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}")], env))
}

/// Every tenant's plaintext `Sensitive_Data` by Customer_ID, decrypted with the key
/// `keys export` prints (the way an outside tool would).
fn plaintexts(ws: &Ws, tok: Option<&Token>, env: &[(&str, &str)]) -> BTreeMap<String, BTreeMap<i64, Vec<u8>>> {
    let mut all = BTreeMap::new();
    for t in ["Tenant_A", "Tenant_B", "Tenant_C"] {
        let hex = ok(dg(ws, tok, &["keys", "export", t, "--i-understand-this-prints-a-secret"], env)).stdout.trim().to_string();
        let key = dagrun::crypto::DataKey::from_bytes(hex::decode(&hex).unwrap().try_into().unwrap());
        let mut rows = BTreeMap::new();
        let path = ws.path(&format!("data/encrypted/{t}.parquet"));
        for b in dagrun::data::parquet_io::open_batches(&path, 4096).unwrap() {
            let b = b.unwrap();
            let ids = b.column_by_name("Customer_ID").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
            let enc = b.column_by_name("Sensitive_Data_Enc").unwrap().as_any().downcast_ref::<BinaryArray>().unwrap().clone();
            for i in 0..b.num_rows() {
                let p = dagrun::crypto::aead::decrypt_field(&key, t, "Sensitive_Data", ids.value(i), enc.value(i)).unwrap();
                rows.insert(ids.value(i), p);
            }
        }
        assert!(!rows.is_empty(), "{t} has no rows");
        all.insert(t.to_string(), rows);
    }
    all
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if e.file_type().unwrap().is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn keyring_json(ws: &Ws) -> serde_json::Value {
    serde_json::from_str(&ws.read(".dagrun/keys/keyring.json")).unwrap()
}

#[test]
fn pipeline_with_an_hsm_master_key_decrypts_exactly_like_a_file_key() {
    let tok = Token::new();
    // A known key imported into the token (sensitive, not extractable), so the test
    // can look for its bytes; `keys init` then also works with an existing key.
    let known: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let kfile = tok.dir.path().join("known.bin");
    std::fs::write(&kfile, known).unwrap();
    let o = tok.tool(&[
        "--write-object",
        kfile.to_str().unwrap(),
        "--type",
        "secrkey",
        "--key-type",
        "AES:32",
        "--label",
        "known",
        "--sensitive",
        "--usage-decrypt",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&kfile).unwrap();
    let uri = tok.uri_for("known");

    let hsm = workspace();
    let init = ok(dg(&hsm, Some(&tok), &["keys", "init", "--master", &uri], &[]));
    assert!(init.stdout.contains("using the existing master key"), "{}", init.stdout);
    let env = [("DAGRUN_MASTER_KEY_URI", uri.as_str())];
    let run = run_pipeline(&hsm, Some(&tok), &env);
    let verbose = ok(dg(&hsm, Some(&tok), &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}"), "-vv", "--force", "encrypt"], &env));
    let kr = keyring_json(&hsm);
    assert_eq!(kr["master"]["kind"], "pkcs11");
    assert_eq!(kr["master"]["mechanism"], "CKM_AES_GCM");
    assert!(kr["key_check"].as_str().unwrap().starts_with("pkcs11-gcm:"));
    assert!(!hsm.exists(".dagrun/keys/master.key"), "no file master key is created");
    let list = ok(dg(&hsm, Some(&tok), &["keys", "list"], &env)).stdout;
    assert!(list.contains("PKCS#11 key pkcs11:token=dagrun-test;object=known") && list.contains("CKM_AES_GCM"), "{list}");

    // The same pipeline with a file master key: same plaintexts, same columns.
    let file = workspace();
    run_pipeline(&file, None, &[]);
    let from_hsm = plaintexts(&hsm, Some(&tok), &env);
    assert_eq!(from_hsm, plaintexts(&file, None, &[]));

    // The master key's bytes (raw, hex either case) are nowhere in the workspace or output.
    let needles = [known.to_vec(), hex::encode(known).into_bytes(), hex::encode_upper(known).into_bytes()];
    for (p, bytes) in all_bytes(&hsm.root) {
        for n in &needles {
            assert!(!contains(&bytes, n), "master key bytes found in {}", p.display());
        }
    }
    for text in [&run.stdout, &run.stderr, &verbose.stdout, &verbose.stderr, &list] {
        for n in &needles {
            assert!(!contains(text.as_bytes(), n), "master key bytes in dagrun output");
        }
    }
    assert!(!verbose.stderr.contains(tok.pin().as_str()), "the PIN was printed");

    // pkcs11-tool: the generated master key is never extractable, and reading it fails.
    let made = ok(dg(&workspace(), Some(&tok), &["keys", "init", "--master", &tok.uri_for("fresh")], &[]));
    assert!(made.stdout.contains("created the non-extractable master key"), "{}", made.stdout);
    let show = String::from_utf8_lossy(&tok.tool(&["--list-objects", "--type", "secrkey"]).stdout).into_owned();
    let fresh = show.split("Secret Key Object").find(|s| s.contains("label:      fresh")).expect("fresh key listed");
    let access: Vec<&str> = fresh.lines().find(|l| l.contains("Access:")).unwrap().split(':').nth(1).unwrap().split(',').map(str::trim).collect();
    assert!(access.contains(&"never extractable") && access.contains(&"sensitive") && !access.contains(&"extractable"), "{fresh}");
    let read = tok.tool(&["--read-object", "--type", "secrkey", "--label", "fresh"]);
    assert!(!read.status.success() || read.stdout.is_empty(), "the key's value could be read");
}

/// SIGKILL `keys rewrap --to to` at `kills` pseudo-random instants, checking after
/// each that exactly one of the two master keys opens the keyring; then finish it.
fn rewrap_with_kills(ws: &Ws, tok: &Token, from: &[(&str, &str)], to: &str, seed: u64, kills: usize) {
    let mut x = seed;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // How long an uninterrupted rewrap takes, to spread the kills over it.
    let probe = ws.path(".dagrun/keys/keyring.json");
    let before = std::fs::read(&probe).unwrap();
    let t0 = std::time::Instant::now();
    let full = ok(dg(ws, Some(tok), &["-q", "keys", "rewrap", "--to", to], from));
    let span = t0.elapsed().as_micros() as u64;
    assert_eq!(full.stdout, "", "-q: the report of the change is not printed");
    // Review 27: the old key still makes the integrity key, and the message says so.
    // On stderr: said under `-q` (review 66 #4).
    assert!(full.stderr.contains("can still forge this workspace's records"), "{}", full.stderr);
    // Put the old keyring back (the rewrap changed no data) to kill real rewraps.
    std::fs::write(&probe, &before).unwrap();
    let mut outcomes = [0usize; 2];
    for _ in 0..kills {
        let saved = tok.save();
        let mut bg = spawn(cmd(ws, Some(tok), &["keys", "rewrap", "--to", to], from));
        std::thread::sleep(Duration::from_micros(next() % (span + span / 5 + 1)));
        signal(bg.pid() as i32, libc::SIGKILL);
        let _ = bg.child.wait();
        tok.restore_if_torn(&saved);
        let old = dg(ws, Some(tok), &["keys", "list"], from).code == 0;
        let new = dg(ws, Some(tok), &["keys", "list"], &[("DAGRUN_MASTER_KEY_URI", to)]).code == 0;
        assert!(old ^ new, "after a kill exactly one master key must open the keyring (old {old}, new {new})");
        outcomes[new as usize] += 1;
        if new {
            std::fs::write(&probe, &before).unwrap();
        }
    }
    eprintln!("rewrap kills: {} before the switch, {} after", outcomes[0], outcomes[1]);
    // Resume: finish (or find finished) the interrupted rewrap.
    let saved = tok.save();
    let mut bg = spawn(cmd(ws, Some(tok), &["keys", "rewrap", "--to", to], from));
    std::thread::sleep(Duration::from_micros(next() % (span + 1)));
    signal(bg.pid() as i32, libc::SIGKILL);
    let _ = bg.child.wait();
    tok.restore_if_torn(&saved);
    let resumed = ok(dg(ws, Some(tok), &["keys", "rewrap", "--to", to], from));
    assert!(resumed.stdout.contains("rewrapped") || resumed.stdout.contains("already wrapped"), "{}", resumed.stdout);
    assert_eq!(dg(ws, Some(tok), &["keys", "list"], from).code, 1, "the old master key no longer opens the keyring");
}

#[test]
fn rewrap_file_to_hsm_and_hsm_to_hsm_survives_sigkill_at_any_instant() {
    let tok = Token::new();
    let ws = workspace();
    run_pipeline(&ws, None, &[]);
    let before = plaintexts(&ws, None, &[]);

    // file -> HSM (the old source named explicitly: without any variable dagrun
    // would follow the keyring's record to the HSM key once it is switched)
    let mk = ws.path(".dagrun/keys/master.key").display().to_string();
    let file_key = [("DAGRUN_MASTER_KEY_FILE", mk.as_str())];
    rewrap_with_kills(&ws, &tok, &file_key, &tok.uri, 0x9e37_79b9_7f4a_7c15, 8);
    let hsm1 = [("DAGRUN_MASTER_KEY_URI", tok.uri.as_str())];
    assert_eq!(plaintexts(&ws, Some(&tok), &hsm1), before);
    assert_eq!(keyring_json(&ws)["master"]["kind"], "pkcs11");
    // The pipeline is still up to date: no data was re-encrypted.
    let again = run_pipeline(&ws, Some(&tok), &hsm1);
    assert!(again.stdout.contains("up to date"), "{}", again.stdout);

    // HSM key -> a second HSM key (master-key rotation)
    let second = tok.add_key("dagrun-master-2");
    rewrap_with_kills(&ws, &tok, &hsm1, &second, 0x2545_f491_4f6c_dd1d, 8);
    let hsm2 = [("DAGRUN_MASTER_KEY_URI", second.as_str())];
    assert_eq!(plaintexts(&ws, Some(&tok), &hsm2), before);
    // Without any variable, the URI recorded in the keyring is used.
    assert_eq!(plaintexts(&ws, Some(&tok), &[]), before);

    let audit = ok(dg(&ws, Some(&tok), &["keys", "audit", "--verify"], &[])).stdout;
    assert!(audit.contains("hash chain intact"), "{audit}");
    let log = ws.read(".dagrun/keys/audit.jsonl");
    for op in ["\"op\":\"create\"", "\"op\":\"rewrap\"", "\"op\":\"export\""] {
        assert!(log.contains(op), "{op} missing from the audit log");
    }
    assert!(!log.contains(&tok.pin()));
}

/// The key files of a workspace, byte for byte.
fn key_files(ws: &Ws) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = all_bytes(&ws.path(".dagrun/keys"));
    v.sort();
    v
}

#[test]
fn hsm_failures_exit_1_name_the_problem_and_change_nothing() {
    let tok = Token::new();
    let ws = workspace();
    let env = [("DAGRUN_MASTER_KEY_URI", tok.uri.as_str())];
    run_pipeline(&ws, Some(&tok), &env);
    let pin = tok.pin();
    let wrong_pin = tok.dir.path().join("wrong-pin");
    std::fs::write(&wrong_pin, "999999999999").unwrap();
    let loose_pin = tok.dir.path().join("loose-pin");
    std::fs::write(&loose_pin, &pin).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrong_pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&loose_pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let o = tok.tool(&["--keygen", "--key-type", "AES:32", "--label", "leaky", "--extractable", "--usage-decrypt"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    make_key_without_encrypt(&tok, "noencrypt");
    let pin_file = tok.dir.path().join("pin").display().to_string();
    // Review 27: a module others could change runs inside dagrun with the PIN
    // and the keys; a PIN file is a few bytes, never read whole if huge.
    let module = std::fs::canonicalize("/usr/lib/softhsm/libsofthsm2.so").unwrap();
    let copy_module = |dir: &str, dir_mode: u32, file_mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let d = tok.dir.path().join(dir);
        std::fs::create_dir(&d).unwrap();
        let m = d.join("libsofthsm2.so");
        std::fs::copy(&module, &m).unwrap();
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(file_mode)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(dir_mode)).unwrap();
        m.display().to_string()
    };
    let open_dir = copy_module("open-dir", 0o777, 0o755);
    let open_file = copy_module("open-file", 0o755, 0o666);
    let huge_pin = tok.dir.path().join("huge-pin");
    std::fs::write(&huge_pin, "1".repeat(5000)).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&huge_pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut cases: Vec<(String, &str)> = vec![
        (tok.uri.replace("/usr/lib/softhsm/libsofthsm2.so", &open_dir), "writable by group or others (mode 0777)"),
        (tok.uri.replace("/usr/lib/softhsm/libsofthsm2.so", &open_file), "writable by group or others (mode 0666)"),
        (tok.uri.replace("/usr/lib/softhsm/libsofthsm2.so", "usr/lib/softhsm/libsofthsm2.so"), "not an absolute path"),
        (tok.uri.replace(&pin_file, &huge_pin.display().to_string()), "at most 1024 bytes"),
        (tok.uri.replace("/usr/lib/softhsm/libsofthsm2.so", "/nonexistent/libpkcs11.so"), "does not exist"),
        (tok.uri.replace(&pin_file, &wrong_pin.display().to_string()), "wrong PIN"),
        (tok.uri.replace(&pin_file, &loose_pin.display().to_string()), "chmod 600"),
        (tok.uri.replace("token=dagrun-test", "token=absent-token"), "is not present"),
        (tok.uri_for("no-such-key"), "was not found"),
        (tok.uri_for("leaky"), "extractable"),
        (tok.uri_for("noencrypt"), "CKA_ENCRYPT and CKA_DECRYPT"),
        (tok.uri.replace("pin-source", "pin-sauce"), "unknown attribute"),
    ];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Another user's module (only root can give a file away).
        let theirs = copy_module("theirs", 0o755, 0o755);
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        cases.push((tok.uri.replace("/usr/lib/softhsm/libsofthsm2.so", &theirs), "belongs to user id 65534, neither root nor you"));
    }
    let snapshot = key_files(&ws);
    for (uri, want) in &cases {
        let e = [("DAGRUN_MASTER_KEY_URI", uri.as_str())];
        for args in [
            &["keys", "list"][..],
            &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"],
            &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}"), "--force", "encrypt"],
        ] {
            let o = dg(&ws, Some(&tok), args, &e);
            assert_eq!(o.code, 1, "{args:?} with {uri}: {}", o.stderr);
            assert!(o.stderr.contains(want), "{args:?} with {uri}: want {want:?} in\n{}", o.stderr);
            assert!(!o.stderr.contains(&pin) && !o.stderr.contains("999999999999"), "a PIN was printed:\n{}", o.stderr);
            assert!(o.stdout.trim().len() != 64, "a key was printed");
        }
        assert_eq!(key_files(&ws), snapshot, "{uri} changed the key files");
        // keys init and rewrap refuse the same way, writing nothing.
        let o = dg(&ws, Some(&tok), &["keys", "rewrap", "--to", uri], &env);
        assert_eq!(o.code, 1, "rewrap to {uri}: {}", o.stderr);
        assert!(o.stderr.contains(want), "rewrap to {uri}: {}", o.stderr);
        assert_eq!(key_files(&ws), snapshot, "rewrap to {uri} changed the key files");
    }
    // keys init refuses a workspace that already has keys.
    let o = dg(&ws, Some(&tok), &["keys", "init", "--master", &tok.uri], &env);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("already holds keys") && o.stderr.contains("keys rewrap"), "{}", o.stderr);
    // The wrong one of two good keys: named, with the keyring's own record.
    let other = tok.add_key("other");
    let o = dg(&ws, Some(&tok), &["keys", "list"], &[("DAGRUN_MASTER_KEY_URI", other.as_str())]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("does not open the keyring") && o.stderr.contains("object=dagrun-master"), "{}", o.stderr);
    assert_eq!(key_files(&ws), snapshot);
    // And everything still works with the right key.
    let again = run_pipeline(&ws, Some(&tok), &env);
    assert!(again.stdout.contains("up to date"), "{}", again.stdout);
}

/// `keys init --master URI` in a workspace whose stage records were sealed
/// under another master key (cmd stages run with DAGRUN_MASTER_KEY, no
/// keyring) is refused before the token generates a key: a key no record
/// verifies under is never left behind in the token; the token's existing key
/// is refused after it is opened, and nothing is written either way.
#[test]
fn keys_init_refuses_before_generating_a_key_no_record_verifies_under() {
    let tok = Token::new();
    let ws = Ws::new();
    ws.pipeline("stages:\n  a:\n    cmd: echo hi > a.txt\n    outs: [a.txt]\n");
    let env_key = [("DAGRUN_MASTER_KEY", "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")];
    ok(dg(&ws, Some(&tok), &["run", "pipeline.yaml"], &env_key));
    let labels = || String::from_utf8_lossy(&tok.tool(&["--list-objects", "--type", "secrkey"]).stdout).into_owned();
    let before = labels();
    for (uri, why) in [(tok.uri_for("brand-new"), "a key generated now"), (tok.uri.clone(), "this one")] {
        let o = dg(&ws, Some(&tok), &["keys", "init", "--master", &uri], &[]);
        assert_eq!(o.code, 2, "{uri}: {}", o.stderr);
        assert!(o.stderr.contains("were sealed with another master key") && o.stderr.contains(why), "{uri}: {}", o.stderr);
        assert!(!ws.exists(".dagrun/keys/keyring.json"), "a refused init wrote a keyring");
    }
    let after = labels();
    assert_eq!(before, after, "a refused init changed the token's keys");
    assert!(!after.contains("brand-new"), "{after}");
    // The records are untouched: the stage is still up to date under its key.
    let again = ok(dg(&ws, Some(&tok), &["run", "pipeline.yaml"], &env_key));
    assert!(again.stdout.contains("up to date"), "{}", again.stdout);
}

/// Generate an AES key with CKA_ENCRYPT and CKA_DECRYPT false. pkcs11-tool cannot,
/// so the test binary runs itself as a helper under the token's SOFTHSM2_CONF
/// (SoftHSM reads it once per process) and makes the key with cryptoki.
fn make_key_without_encrypt(tok: &Token, label: &str) {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["hsm::helper_makes_a_key_without_encrypt_permission", "--exact", "--test-threads=1", "--nocapture"])
        .env("SOFTHSM2_CONF", &tok.conf)
        .env("DAGRUN_IT_MAKE_KEY", format!("{}\n{label}", tok.pin()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let show = String::from_utf8_lossy(&tok.tool(&["--list-objects", "--type", "secrkey"]).stdout).into_owned();
    assert!(show.contains(&format!("label:      {label}")), "{show}");
}

#[test]
fn helper_makes_a_key_without_encrypt_permission() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    // Run directly (not as the helper): make a token and a key of our own, and
    // check through pkcs11-tool that the helper really produced such a key.
    let Ok(spec) = std::env::var("DAGRUN_IT_MAKE_KEY") else {
        let tok = Token::new();
        make_key_without_encrypt(&tok, "probe");
        let show = String::from_utf8_lossy(&tok.tool(&["--list-objects", "--type", "secrkey"]).stdout).into_owned();
        let probe = show.split("Secret Key Object").find(|s| s.contains("label:      probe")).unwrap().to_string();
        let usage = probe.lines().find(|l| l.contains("Usage:")).unwrap_or("");
        assert!(!usage.contains("encrypt") && !usage.contains("decrypt"), "{probe}");
        return;
    };
    let (pin, label) = spec.split_once('\n').unwrap();
    let ctx = Pkcs11::new("/usr/lib/softhsm/libsofthsm2.so").unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&cryptoki::types::AuthPin::from(pin.to_string()))).unwrap();
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Verify(false),
            Attribute::Sign(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )
    .unwrap();
}

#[test]
fn master_key_in_config_dagrun_yaml_and_strict_parsing() {
    let tok = Token::new();
    let ws = workspace();
    ws.write("config/dagrun.yaml", format!("# the workspace's master key\nmaster_key: \"{}\"\n", tok.uri));
    run_pipeline(&ws, Some(&tok), &[]);
    assert_eq!(keyring_json(&ws)["master"]["kind"], "pkcs11");
    assert!(!ws.exists(".dagrun/keys/master.key"));
    // An unknown key is refused with file:line, exit 2, nothing runs.
    ws.write("config/dagrun.yaml", format!("master_key: \"{}\"\nmaster_kee: x\n", tok.uri));
    let o = dg(&ws, Some(&tok), &["run", "pipelines/propensity.yaml", "-p", &format!("rows={ROWS}"), "--force", "encrypt"], &[]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("config/dagrun.yaml:2:") && o.stderr.contains("master_kee"), "{}", o.stderr);
    // A PIN in config/ is refused and not echoed.
    let pinned = tok.uri.replace(&format!("pin-source=file:{}", tok.dir.path().join("pin").display()), &format!("pin-value={}", tok.pin()));
    assert!(pinned.contains("pin-value"));
    ws.write("config/dagrun.yaml", format!("master_key: \"{pinned}\"\n"));
    let o = dg(&ws, Some(&tok), &["keys", "list"], &[]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("config/dagrun.yaml:1:") && o.stderr.contains("pin-source") && !o.stderr.contains(&tok.pin()), "{}", o.stderr);
    // So is one on the command line (`ps` shows it to every user), before anything is read or written.
    let keys = key_files(&ws);
    for args in [&["keys", "rewrap", "--to", &pinned][..], &["keys", "init", "--master", &pinned]] {
        let o = dg(&ws, Some(&tok), args, &[]);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("command line is visible") && !o.stderr.contains(&tok.pin()), "{}", o.stderr);
    }
    // Review 27: a module the workspace ships (a cloned repository's) is
    // never loaded because a workspace file names it.
    let inside = ws.path("vendor/libsofthsm2.so");
    std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
    std::fs::copy("/usr/lib/softhsm/libsofthsm2.so", &inside).unwrap();
    ws.write("config/dagrun.yaml", format!("master_key: \"{}\"\n", tok.uri.replace("/usr/lib/softhsm/libsofthsm2.so", &inside.display().to_string())));
    for args in [&["keys", "list"][..], &["status", "pipelines/propensity.yaml"]] {
        let o = dg(&ws, Some(&tok), args, &[]);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("lies inside the workspace") && o.stderr.contains("vendor/libsofthsm2.so"), "{}", o.stderr);
    }
    // Review 28: nor one reached through `..` or /proc (`/proc/self/cwd/..` reached a
    // library shipped beside the workspace, wherever it was cloned).
    for module in ["/usr/lib/softhsm/../softhsm/libsofthsm2.so", "/proc/self/root/usr/lib/softhsm/libsofthsm2.so"] {
        ws.write("config/dagrun.yaml", format!("master_key: \"{}\"\n", tok.uri.replace("/usr/lib/softhsm/libsofthsm2.so", module)));
        let o = dg(&ws, Some(&tok), &["keys", "list"], &[]);
        assert_eq!(o.code, 2, "{module}: {}", o.stderr);
        assert!(o.stderr.contains("through `..` or /proc"), "{}", o.stderr);
    }
    assert_eq!(key_files(&ws), keys, "a refused command changed the key files");
}

#[test]
fn audit_log_chain_detects_an_edited_and_a_deleted_line() {
    let ws = workspace();
    run_pipeline(&ws, None, &[]);
    ok(dg(&ws, None, &["keys", "rotate", "Tenant_A"], &[]));
    ok(dg(&ws, None, &["keys", "export", "Tenant_B", "--i-understand-this-prints-a-secret"], &[]));
    ok(dg(&ws, None, &["keys", "forget", "Tenant_C", "--yes"], &[]));
    let good = ws.read(".dagrun/keys/audit.jsonl");
    let lines: Vec<&str> = good.lines().collect();
    for op in ["create", "rotate", "export", "forget"] {
        assert!(lines.iter().any(|l| l.contains(&format!("\"op\":\"{op}\""))), "no {op} line:\n{good}");
    }
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for f in ["time", "op", "tenant", "key_id", "user", "host", "result", "prev", "hash"] {
            assert!(v.get(f).is_some(), "{f} missing in {l}");
        }
    }
    let o = ok(dg(&ws, None, &["keys", "audit", "--verify"], &[]));
    assert!(o.stdout.contains(&format!("{} line(s), hash chain intact", lines.len())), "{}", o.stdout);
    let table = ok(dg(&ws, None, &["keys", "audit"], &[])).stdout;
    assert!(table.contains("rotate") && table.contains("Tenant_A-dk-2"), "{table}");

    // An edited line (the export made to look like another tenant's).
    let edited =
        good.replacen("\"tenant\":\"Tenant_B\",\"key_id\":\"Tenant_B-dk-1\",\"user\"", "\"tenant\":\"Tenant_A\",\"key_id\":\"Tenant_B-dk-1\",\"user\"", 1);
    assert_ne!(edited, good);
    ws.write(".dagrun/keys/audit.jsonl", &edited);
    let o = dg(&ws, None, &["keys", "audit", "--verify"], &[]);
    assert_eq!(o.code, 4, "{}", o.stdout);
    assert!(o.stderr.contains("was edited"), "{}", o.stderr);

    // A deleted line in the middle, and the last line.
    let mut l = lines.clone();
    l.remove(2);
    ws.write(".dagrun/keys/audit.jsonl", l.join("\n") + "\n");
    let o = dg(&ws, None, &["keys", "audit", "--verify"], &[]);
    assert_eq!(o.code, 4);
    assert!(o.stderr.contains("deleted"), "{}", o.stderr);
    let mut l = lines.clone();
    l.pop();
    ws.write(".dagrun/keys/audit.jsonl", l.join("\n") + "\n");
    let o = dg(&ws, None, &["keys", "audit", "--verify"], &[]);
    assert_eq!(o.code, 4);
    assert!(o.stderr.contains("deleted from the end"), "{}", o.stderr);

    ws.write(".dagrun/keys/audit.jsonl", &good);
    ok(dg(&ws, None, &["keys", "audit", "--verify"], &[]));
}

#[test]
fn the_master_key_uri_and_its_pin_source_never_reach_a_child() {
    // A real token: every run opens the master key (it authenticates dagrun's
    // records, `crypto::integrity`), cmd-only pipelines too.
    let tok = Token::new();
    let ws = Ws::new();
    // A stage may not declare it (util::child_env): refused before anything runs.
    ws.pipeline("stages:\n  show:\n    cmd: env > seen.txt\n    outs: [seen.txt]\n    env: { DAGRUN_MASTER_KEY_URI: leaked }\n");
    let o = dg(&ws, Some(&tok), &["run", "pipeline.yaml"], &[("DAGRUN_MASTER_KEY_URI", tok.uri.as_str())]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("DAGRUN_MASTER_KEY_URI") && !ws.exists("seen.txt"), "{}", o.stderr);
    // Inherited from dagrun's environment, it is withheld.
    ws.pipeline("stages:\n  show:\n    cmd: env > seen.txt\n    outs: [seen.txt]\n");
    let o = dg(&ws, Some(&tok), &["run", "pipeline.yaml"], &[("DAGRUN_MASTER_KEY_URI", tok.uri.as_str())]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let seen = ws.read("seen.txt");
    assert!(seen.contains("DAGRUN_STAGE=show"), "{seen}");
    let pin_file = tok.uri.rsplit("pin-source=file:").next().unwrap();
    assert!(!seen.contains("DAGRUN_MASTER_KEY_URI") && !seen.contains(pin_file) && !seen.contains("pkcs11:"), "{seen}");
}

#[test]
fn a_session_lost_mid_run_fails_the_stage_and_a_rerun_works() {
    let tok = Token::new();
    let ws = workspace();
    ws.write("config/tenants.yaml", "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n");
    // enc1 opens the HSM session and uses it; `lose` takes the token away (its
    // files, as a pulled or reset HSM would); enc2 then needs the session again.
    let tokens = tok.dir.path().join("tokens").display().to_string();
    let yaml = r#"stages:
  generate:
    foreach: tenants
    uses: generate
    with:
      rows: 2000
      seed: 1
      as_of: 2026-01-01
      output: data/raw/${tenant}.parquet
  enc1:
    foreach: tenants
    uses: encrypt
    with:
      input: data/raw/${tenant}.parquet
      output: data/enc1/${tenant}.parquet
  lose:
    cmd: mv TOKENS TOKENS.gone && touch lost
    outs: [lost]
    needs: [enc1]
  enc2:
    foreach: tenants
    uses: encrypt
    with:
      input: data/raw/${tenant}.parquet
      output: data/enc2/${tenant}.parquet
    needs: [lose]
"#;
    ws.write("pipelines/lose.yaml", yaml.replace("TOKENS", &tokens));
    let env = [("DAGRUN_MASTER_KEY_URI", tok.uri.as_str())];
    let o = dg(&ws, Some(&tok), &["run", "pipelines/lose.yaml"], &env);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("enc2[Tenant_A]") && o.stderr.contains("was lost") && o.stderr.contains("rerun"), "{}", o.stderr);
    assert!(!o.stderr.contains(&tok.pin()));
    assert!(ws.exists("data/enc1/Tenant_A.parquet") && !ws.exists("data/enc2/Tenant_A.parquet"));
    // The token comes back: the rerun finishes the work, both copies decrypt alike.
    std::fs::rename(format!("{tokens}.gone"), &tokens).unwrap();
    ok(dg(&ws, Some(&tok), &["run", "pipelines/lose.yaml"], &env));
    assert!(ws.exists("data/enc2/Tenant_A.parquet") && ws.exists("data/enc2/Tenant_B.parquet"));
}

/// The mechanism of every wrapped key in the keyring (data, pseudonym, stored integrity key).
fn key_mechanisms(ws: &Ws) -> Vec<String> {
    let kr = keyring_json(ws);
    let mut out = Vec::new();
    for (_, e) in kr["tenants"].as_object().unwrap() {
        for k in e["data_keys"].as_array().unwrap().iter().chain(e.get("pseudonym_key")) {
            out.push(k["mechanism"].as_str().unwrap_or("(none)").to_string());
        }
    }
    if let Some(k) = kr.get("integrity") {
        out.push(k["mechanism"].as_str().unwrap_or("(none)").to_string());
    }
    out
}

#[test]
fn key_wrap_with_padding_fallback_decrypts_the_same_and_survives_rewrap_both_ways() {
    const KWP: &str = "CKM_AES_KEY_WRAP_PAD";
    const GCM: &str = "CKM_AES_GCM";
    let tok = Token::new();
    // SoftHSM2 offers both mechanisms; the setting forces the fallback a token
    // without AES-GCM would get.
    let kwp = [("DAGRUN_MASTER_KEY_URI", tok.uri.as_str()), ("DAGRUN_MASTER_KEY_MECHANISM", KWP)];
    let ws = workspace();
    run_pipeline(&ws, Some(&tok), &kwp);
    let kr = keyring_json(&ws);
    assert_eq!(kr["master"]["mechanism"], KWP);
    assert!(kr["key_check"].as_str().unwrap().starts_with("pkcs11-kwp:"), "{}", kr["key_check"]);
    let mechs = key_mechanisms(&ws);
    assert_eq!(mechs.len(), 6, "3 data + 3 pseudonym keys: {mechs:?}");
    assert!(mechs.iter().all(|m| m == KWP), "{mechs:?}");
    let wrapped = kr["tenants"]["Tenant_A"]["data_keys"][0]["wrapped"].as_str().unwrap();
    assert_eq!(wrapped.len(), 2 * 72, "RFC 5649 wrap of key || bound associated data");
    let list = ok(dg(&ws, Some(&tok), &["keys", "list"], &kwp)).stdout;
    assert!(list.contains("(wrapping: CKM_AES_KEY_WRAP_PAD)"), "{list}");

    // The same data as with a file master key.
    let before = plaintexts(&ws, Some(&tok), &kwp);
    let file = workspace();
    run_pipeline(&file, None, &[]);
    assert_eq!(before, plaintexts(&file, None, &[]));

    // Without the setting dagrun would detect AES-GCM, but an existing keyring keeps
    // its recorded mechanism (and its integrity key: every record still verifies).
    let uri_only = [("DAGRUN_MASTER_KEY_URI", tok.uri.as_str())];
    let again = run_pipeline(&ws, Some(&tok), &uri_only);
    assert!(again.stdout.contains("up to date"), "{}", again.stdout);
    ok(dg(&ws, Some(&tok), &["keys", "rotate", "Tenant_C"], &uri_only));
    assert!(key_mechanisms(&ws).iter().all(|m| m == KWP), "{:?}", key_mechanisms(&ws));
    assert_eq!(keyring_json(&ws)["master"]["mechanism"], KWP);
    // Tenant_C's data is re-encrypted under its new key; the rest is unchanged.
    run_pipeline(&ws, Some(&tok), &uri_only);
    let before = plaintexts(&ws, Some(&tok), &uri_only);
    assert_eq!(before, plaintexts(&file, None, &[]));

    // Rewrap to a second key with AES-GCM (the old keys unwrap with their recorded
    // key wrap), then back to the first key with key wrap.
    let second = tok.add_key("dagrun-master-2");
    let o = ok(dg(&ws, Some(&tok), &["keys", "rewrap", "--to", &second], &[("DAGRUN_MASTER_KEY_MECHANISM", GCM)]));
    assert!(o.stdout.contains("rewrapped 7 key(s)"), "{}", o.stdout);
    let kr = keyring_json(&ws);
    assert_eq!(kr["master"]["mechanism"], GCM);
    assert!(kr["key_check"].as_str().unwrap().starts_with("pkcs11-gcm:"));
    let mechs = key_mechanisms(&ws);
    assert_eq!(mechs.len(), 8, "7 tenant keys + the stored integrity key: {mechs:?}");
    assert!(mechs.iter().all(|m| m == GCM), "{mechs:?}");
    assert_eq!(plaintexts(&ws, Some(&tok), &[]), before);
    let up = run_pipeline(&ws, Some(&tok), &[]);
    assert!(up.stdout.contains("up to date"), "records verify after the rewrap: {}", up.stdout);

    ok(dg(&ws, Some(&tok), &["keys", "rewrap", "--to", &tok.uri], &[("DAGRUN_MASTER_KEY_MECHANISM", KWP)]));
    let kr = keyring_json(&ws);
    assert_eq!(kr["master"]["mechanism"], KWP);
    assert!(kr["master"]["uri"].as_str().unwrap().contains("object=dagrun-master;"));
    assert!(key_mechanisms(&ws).iter().all(|m| m == KWP), "{:?}", key_mechanisms(&ws));
    assert_eq!(plaintexts(&ws, Some(&tok), &[]), before);
    let up = run_pipeline(&ws, Some(&tok), &[]);
    assert!(up.stdout.contains("up to date"), "{}", up.stdout);
    let audit = ok(dg(&ws, Some(&tok), &["keys", "audit", "--verify"], &[])).stdout;
    assert!(audit.contains("hash chain intact"), "{audit}");

    // A keyring naming a mechanism this dagrun does not know is refused, naming
    // the key, the mechanism and the file; nothing changes.
    let path = ws.path(".dagrun/keys/keyring.json");
    let good = std::fs::read(&path).unwrap();
    let mut kr = keyring_json(&ws);
    kr["tenants"]["Tenant_B"]["data_keys"][0]["mechanism"] = serde_json::json!("CKM_AES_KEY_WRAP_PAD_V9");
    std::fs::write(&path, serde_json::to_vec_pretty(&kr).unwrap()).unwrap();
    let edited = std::fs::read(&path).unwrap();
    let o = dg(&ws, Some(&tok), &["keys", "export", "Tenant_A", "--i-understand-this-prints-a-secret"], &[]);
    assert_ne!(o.code, 0, "{}", o.stdout);
    for want in ["\"CKM_AES_KEY_WRAP_PAD_V9\"", "does not know", "key Tenant_B-dk-1 of tenant Tenant_B", "keyring.json"] {
        assert!(o.stderr.contains(want), "{want} missing from: {}", o.stderr);
    }
    assert!(o.stdout.trim().is_empty(), "no key was printed");
    assert_eq!(std::fs::read(&path).unwrap(), edited, "the keyring was not rewritten");
    std::fs::write(&path, &good).unwrap();
    ok(dg(&ws, Some(&tok), &["keys", "list"], &[]));

    // A bad setting is refused before the token is touched.
    let o = dg(&ws, Some(&tok), &["keys", "list"], &[("DAGRUN_MASTER_KEY_MECHANISM", "CKM_AES_KEY_WRAP")]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("DAGRUN_MASTER_KEY_MECHANISM") && o.stderr.contains("CKM_AES_KEY_WRAP_PAD"), "{}", o.stderr);
}

#[test]
fn master_key_mechanism_in_config_dagrun_yaml_forces_key_wrap() {
    let tok = Token::new();
    let ws = workspace();
    ws.write("config/dagrun.yaml", format!("master_key: \"{}\"\nmaster_key_mechanism: CKM_AES_KEY_WRAP_PAD\n", tok.uri));
    let o = ok(dg(&ws, Some(&tok), &["keys", "init", "--master", &tok.uri], &[]));
    assert!(o.stdout.contains("CKM_AES_KEY_WRAP_PAD") || keyring_json(&ws)["master"]["mechanism"] == "CKM_AES_KEY_WRAP_PAD", "{}", o.stdout);
    run_pipeline(&ws, Some(&tok), &[]);
    assert!(key_mechanisms(&ws).iter().all(|m| m == "CKM_AES_KEY_WRAP_PAD"), "{:?}", key_mechanisms(&ws));
    // The environment overrides the file for new keyrings.
    let other = workspace();
    ok(dg(&other, Some(&tok), &["keys", "init", "--master", &tok.uri], &[("DAGRUN_MASTER_KEY_MECHANISM", "auto")]));
    assert_eq!(keyring_json(&other)["master"]["mechanism"], "CKM_AES_GCM");
}
