use super::*;
use crate::crypto::aead::{decrypt_field, encrypt_field};
use std::os::unix::fs::PermissionsExt;

const HEX_A: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const HEX_B: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn env(h: &str) -> MasterKeySource {
    MasterKeySource::Env(h.to_string())
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn assert_no_secret(msg: &str, secrets: &[&str]) {
    let low = msg.to_lowercase();
    for s in secrets {
        let s = s.to_lowercase();
        for w in s.as_bytes().windows(16) {
            assert!(!low.contains(std::str::from_utf8(w).unwrap()), "secret leaked in: {msg}");
        }
    }
}

#[test]
fn default_master_key_is_created_private_and_keys_persist() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), MasterKeySource::Default).unwrap();
    let mk = default_master_key_path(ws.path());
    assert_eq!(mode(&mk), 0o600);
    assert_eq!(mode(&keys_dir(ws.path())), 0o700);
    assert_eq!(fs::read_to_string(&mk).unwrap().trim().len(), 64);
    assert!(kr.master_key_source().starts_with("file ") && kr.master_key_source().ends_with("master.key"));
    assert_eq!(kr.active_key_id("Tenant_A").unwrap(), None);
    let (id, k) = kr.active_data_key("Tenant_A").unwrap();
    assert_eq!(id, "Tenant_A-dk-1");
    let p = kr.pseudonym_key("Tenant_A").unwrap();
    assert_ne!(p.bytes(), k.bytes(), "pseudonym key must not be the data key");
    assert_eq!(mode(kr.path()), 0o600);
    let k_bytes = *k.as_bytes();
    let p_bytes = *p.bytes();
    drop(kr);

    // reopen: same master (file), same keys, no new key created
    let kr = Keyring::open_with(ws.path(), MasterKeySource::Default).unwrap();
    assert_eq!(kr.active_key_id("Tenant_A").unwrap().as_deref(), Some("Tenant_A-dk-1"));
    let (id2, k2) = kr.active_data_key("Tenant_A").unwrap();
    assert_eq!((id2.as_str(), k2.as_bytes()), ("Tenant_A-dk-1", &k_bytes));
    assert_eq!(kr.pseudonym_key("Tenant_A").unwrap().bytes(), &p_bytes);
    assert_eq!(kr.list().len(), 2);
    // no temp files left behind, and the file holds no raw key hex
    let names: Vec<String> = fs::read_dir(keys_dir(ws.path())).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["audit.head", "audit.jsonl", "keyring.json", "keyring.lock", "master.key"], "{names:?}");
    // both key creations are in the audit log, which verifies and holds no key
    let audit = fs::read_to_string(keys_dir(ws.path()).join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 2);
    assert!(audit.contains("\"key_id\":\"Tenant_A-dk-1\"") && audit.contains("\"op\":\"create\""));
    assert!(!audit.contains(&hex::encode(k_bytes)) && !audit.contains(&hex::encode(p_bytes)));
    assert_eq!(crate::crypto::audit::verify(&keys_dir(ws.path())).unwrap().lines, 2);
    let json = fs::read_to_string(kr.path()).unwrap();
    assert!(!json.contains(&hex::encode(k_bytes)) && !json.contains(&hex::encode(p_bytes)));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["format"], KEYRING_FORMAT);
    assert_eq!(v["tenants"]["Tenant_A"]["data_keys"][0]["state"], "active");
    assert_eq!(v["tenants"]["Tenant_A"]["data_keys"][0]["wrapped"].as_str().unwrap().len(), 120);
}

#[test]
fn wrong_master_key_is_named_not_shown() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let (_, k) = kr.active_data_key("Tenant_A").unwrap();
    let dk = hex::encode(k.as_bytes());
    drop(kr);
    let e = Keyring::open_with(ws.path(), env(HEX_B)).unwrap_err();
    assert!(matches!(e.downcast_ref::<KeyError>(), Some(KeyError::WrongMasterKey { .. })));
    let msg = format!("{e:#} {e:?}");
    assert!(msg.contains("the master key (from DAGRUN_MASTER_KEY) does not open the keyring at"), "{msg}");
    assert!(msg.contains("keyring.json") && msg.contains("Set DAGRUN_MASTER_KEY"), "{msg}");
    assert_no_secret(&msg, &[HEX_A, HEX_B, &dk]);

    // the same through a key file: the message names the file
    let kf = ws.path().join("other.key");
    fs::write(&kf, format!("{HEX_B}\n")).unwrap();
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o600)).unwrap();
    let e = Keyring::open_with(ws.path(), MasterKeySource::File(kf.clone())).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(&format!("(from file {})", kf.display())), "{msg}");
    assert_no_secret(&msg, &[HEX_A, HEX_B, &dk]);

    // the right key still opens it
    Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
}

#[test]
fn bad_master_key_values_are_not_echoed() {
    let ws = tempfile::tempdir().unwrap();
    let bad = format!("{}xyz", &HEX_A[..61]);
    let e = format!("{:#}", Keyring::open_with(ws.path(), env(&bad)).unwrap_err());
    assert!(e.contains("DAGRUN_MASTER_KEY") && e.contains("64 hex"), "{e}");
    assert_no_secret(&e, &[&bad]);
    let missing = ws.path().join("nope.key");
    let e = format!("{:#}", Keyring::open_with(ws.path(), MasterKeySource::File(missing.clone())).unwrap_err());
    assert!(e.contains(&missing.display().to_string()) && e.contains("does not exist"), "{e}");
    assert!(format!("{:?}", env(HEX_A)).contains("[redacted]"));
    assert!(!format!("{:?}", env(HEX_A)).contains(&HEX_A[..8]));
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let d = format!("{kr:?}");
    assert!(d.contains("[redacted]") && !d.contains(&HEX_A[..8]), "{d}");
}

#[test]
fn open_key_file_modes_are_refused() {
    let ws = tempfile::tempdir().unwrap();
    let kf = ws.path().join("master.hex");
    fs::write(&kf, HEX_A).unwrap();
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o644)).unwrap();
    let e = format!("{:#}", Keyring::open_with(ws.path(), MasterKeySource::File(kf.clone())).unwrap_err());
    let p = kf.display().to_string();
    assert!(e.contains(&format!("key file {p} has mode 0644")), "{e}");
    assert!(e.contains(&format!("chmod 600 {p}")), "{e}");
    assert_no_secret(&e, &[HEX_A]);
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(Keyring::open_with(ws.path(), MasterKeySource::File(kf.clone())).is_err());
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o600)).unwrap();
    Keyring::open_with(ws.path(), MasterKeySource::File(kf.clone())).unwrap();

    // the default file too
    let ws2 = tempfile::tempdir().unwrap();
    drop(Keyring::open_with(ws2.path(), MasterKeySource::Default).unwrap());
    let mk = default_master_key_path(ws2.path());
    fs::set_permissions(&mk, fs::Permissions::from_mode(0o644)).unwrap();
    let e = format!("{:#}", Keyring::open_with(ws2.path(), MasterKeySource::Default).unwrap_err());
    assert!(e.contains("mode 0644") && e.contains(&format!("chmod 600 {}", mk.display())), "{e}");
}

#[test]
fn key_file_in_config_is_refused() {
    let ws = tempfile::tempdir().unwrap();
    fs::create_dir_all(ws.path().join("config/keys")).unwrap();
    let kf = ws.path().join("config/keys/master.key");
    fs::write(&kf, HEX_A).unwrap();
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o600)).unwrap();
    let e = format!("{:#}", Keyring::open_with(ws.path(), MasterKeySource::File(kf.clone())).unwrap_err());
    assert!(e.contains("config/") && e.contains(&kf.display().to_string()), "{e}");
    // also through a path that only resolves into config/
    let sneaky = ws.path().join(".dagrun/../config/keys/master.key");
    assert!(Keyring::open_with(ws.path(), MasterKeySource::File(sneaky)).is_err());
}

#[test]
fn rotate_keeps_old_keys_readable() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let (id1, k1) = kr.active_data_key("Tenant_A").unwrap();
    let p1 = *kr.pseudonym_key("Tenant_A").unwrap().bytes();
    let blob = encrypt_field(&k1, "Tenant_A", "Sensitive_Data", 7, b"x@example.org");
    let id2 = kr.rotate("Tenant_A").unwrap();
    assert_eq!(id2, "Tenant_A-dk-2");
    assert_ne!(id1, id2);
    // Logged before and after the keyring changed.
    let audit = fs::read_to_string(keys_dir(ws.path()).join("audit.jsonl")).unwrap();
    let rotate: Vec<&str> = audit.lines().filter(|l| l.contains("\"op\":\"rotate\"")).collect();
    assert_eq!(rotate.len(), 2, "{audit}");
    assert!(rotate[0].contains("\"result\":\"started: new data key\"") && rotate[1].contains("\"result\":\"ok: data key\""), "{audit}");
    drop(kr);
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    assert_eq!(kr.active_key_id("Tenant_A").unwrap().as_deref(), Some("Tenant_A-dk-2"));
    let (aid, k2) = kr.active_data_key("Tenant_A").unwrap();
    assert_eq!(aid, id2);
    assert_ne!(k2, k1);
    let old = kr.data_key("Tenant_A", &id1).unwrap();
    assert_eq!(old, k1);
    assert_eq!(decrypt_field(&old, "Tenant_A", "Sensitive_Data", 7, &blob).unwrap(), b"x@example.org");
    assert_eq!(kr.pseudonym_key("Tenant_A").unwrap().bytes(), &p1, "pseudonym key is not rotated");
    let states: Vec<(String, KeyState)> = kr.list().into_iter().filter(|i| i.kind == KeyKind::Data).map(|i| (i.key_id, i.state)).collect();
    assert_eq!(states, vec![(id1, KeyState::Retired), (id2, KeyState::Active)]);
    let e = kr.data_key("Tenant_A", "Tenant_A-dk-9").unwrap_err();
    assert!(matches!(e.downcast_ref::<KeyError>(), Some(KeyError::UnknownKey { .. })), "{e}");
}

#[test]
fn a_tenants_first_data_key_comes_with_its_pseudonym_key_in_one_write() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let audit = || fs::read_to_string(keys_dir(ws.path()).join("audit.jsonl")).unwrap_or_default();
    let before = audit().lines().count();
    let id = kr.active_data_key_id("Tenant_A").unwrap();
    let on_disk = fs::read_to_string(kr.path()).unwrap();
    assert!(on_disk.contains("Tenant_A-pk-1"), "{on_disk}");
    let log = audit();
    let new: Vec<&str> = log.lines().skip(before).collect();
    assert_eq!(new.len(), 2, "{log}");
    assert!(new[0].contains(&format!("\"key_id\":\"{id}\"")) && new[0].contains("ok: data key"), "{log}");
    assert!(new[1].contains("\"key_id\":\"Tenant_A-pk-1\"") && new[1].contains("ok: pseudonym key"), "{log}");
    // Asking for the pseudonym key later changes nothing on disk.
    let p = *kr.pseudonym_key("Tenant_A").unwrap().bytes();
    assert_eq!(fs::read_to_string(kr.path()).unwrap(), on_disk);
    assert_eq!(audit().lines().count(), before + 2);
    drop(kr);
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    assert_eq!(kr.pseudonym_key("Tenant_A").unwrap().bytes(), &p);
    // A rotation makes no second pseudonym key.
    kr.rotate("Tenant_A").unwrap();
    assert_eq!(audit().matches("Tenant_A-pk-").count(), 1);
    crate::crypto::audit::verify(&keys_dir(ws.path())).unwrap();
}

#[test]
fn forget_shreds_one_tenant_only() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let mut before = Vec::new();
    for t in ["Tenant_A", "Tenant_B", "Tenant_C"] {
        let (id, k) = kr.active_data_key(t).unwrap();
        before.push((t, id, *k.as_bytes(), *kr.pseudonym_key(t).unwrap().bytes()));
    }
    kr.rotate("Tenant_A").unwrap();
    let json_before = fs::read_to_string(kr.path()).unwrap();
    let a_wrapped: Vec<String> = {
        let v: serde_json::Value = serde_json::from_str(&json_before).unwrap();
        let a = &v["tenants"]["Tenant_A"];
        let mut w: Vec<String> = a["data_keys"].as_array().unwrap().iter().map(|k| k["wrapped"].as_str().unwrap().to_string()).collect();
        w.push(a["pseudonym_key"]["wrapped"].as_str().unwrap().to_string());
        w
    };
    assert_eq!(a_wrapped.len(), 3);
    kr.forget("Tenant_A").unwrap();
    kr.forget("Tenant_A").unwrap(); // idempotent
    drop(kr);

    let json = fs::read_to_string(keyring_path(ws.path())).unwrap();
    for w in &a_wrapped {
        assert!(!json.contains(w.as_str()), "wrapped key of the forgotten tenant still in the file");
    }
    assert_eq!(mode(&keyring_path(ws.path())), 0o600);
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let at = kr.is_forgotten("Tenant_A").expect("tombstone");
    assert!(chrono::DateTime::parse_from_rfc3339(&at).is_ok(), "{at}");
    assert_eq!(kr.is_forgotten("Tenant_B"), None);

    // other tenants unwrap to the same bytes
    for (t, id, k, p) in &before[1..] {
        assert_eq!(kr.data_key(t, id).unwrap().as_bytes(), k);
        assert_eq!(kr.active_data_key(t).unwrap().1.as_bytes(), k);
        assert_eq!(kr.pseudonym_key(t).unwrap().bytes(), p);
    }

    // the forgotten tenant errors with the Forgotten variant and gets no new key
    let (_, id_a, _, _) = &before[0];
    let errs = [
        kr.active_data_key("Tenant_A").map(|_| ()).unwrap_err(),
        kr.data_key("Tenant_A", id_a).map(|_| ()).unwrap_err(),
        kr.pseudonym_key("Tenant_A").map(|_| ()).unwrap_err(),
        kr.rotate("Tenant_A").map(|_| ()).unwrap_err(),
        kr.active_key_id("Tenant_A").map(|_| ()).unwrap_err(),
        kr.export_data_key_hex("Tenant_A", None).map(|_| ()).unwrap_err(),
    ];
    for e in errs {
        match e.downcast_ref::<KeyError>() {
            Some(KeyError::Forgotten { tenant, at: when }) => {
                assert!(tenant == "Tenant_A" && when == &at)
            }
            _ => panic!("not Forgotten: {e:#}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&format!("tenant Tenant_A's keys were destroyed on {at} (dagrun keys forget)")), "{msg}");
        assert!(msg.contains("config/tenants.yaml"), "{msg}");
    }
    let json_after = fs::read_to_string(kr.path()).unwrap();
    assert_eq!(json, json_after, "a request for a forgotten tenant must not write keys");
    let destroyed: Vec<KeyInfo> = kr.list().into_iter().filter(|i| i.tenant == "Tenant_A").collect();
    assert_eq!(destroyed.len(), 3);
    assert!(destroyed.iter().all(|i| i.state == KeyState::Destroyed));
}

#[test]
fn wrapped_key_moved_to_another_place_does_not_unwrap() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    kr.active_data_key("Tenant_A").unwrap();
    kr.active_data_key("Tenant_B").unwrap();
    kr.pseudonym_key("Tenant_B").unwrap();
    drop(kr);
    let p = keyring_path(ws.path());
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    let b = v["tenants"]["Tenant_B"]["data_keys"][0]["wrapped"].clone();
    let bp = v["tenants"]["Tenant_B"]["pseudonym_key"]["wrapped"].clone();
    v["tenants"]["Tenant_A"]["data_keys"][0]["wrapped"] = b;
    v["tenants"]["Tenant_B"]["data_keys"][0]["wrapped"] = bp;
    write_atomic_mode(&p, serde_json::to_string(&v).unwrap().as_bytes(), 0o600).unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let e = format!("{:#}", kr.active_data_key("Tenant_A").unwrap_err());
    assert!(e.contains("does not unwrap"), "{e}");
    assert!(kr.data_key("Tenant_B", "Tenant_B-dk-1").is_err(), "pseudonym key accepted as a data key");
    assert!(kr.pseudonym_key("Tenant_B").is_ok());
}

#[test]
fn export_matches_and_decrypts() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    assert!(kr.export_data_key_hex("Tenant_A", None).is_err(), "export must not create a key");
    assert_eq!(kr.active_key_id("Tenant_A").unwrap(), None);
    let (id, k) = kr.active_data_key("Tenant_A").unwrap();
    let blob = encrypt_field(&k, "Tenant_A", "Sensitive_Data", 3, b"a@b.c");
    let h = kr.export_data_key_hex("Tenant_A", None).unwrap();
    assert_eq!(h, kr.export_data_key_hex("Tenant_A", Some(&id)).unwrap());
    let mut b = [0u8; 32];
    hex::decode_to_slice(&h, &mut b).unwrap();
    assert_eq!(decrypt_field(&DataKey::from_bytes(b), "Tenant_A", "Sensitive_Data", 3, &blob).unwrap(), b"a@b.c");
}

/// Helper-65: the pseudonym key's id (which `keys list` shows) is refused as
/// a pseudonym key (exit 2), not as a key "encrypted with another
/// workspace's keyring"; nothing of it is printed.
#[test]
fn exporting_the_pseudonym_key_id_says_export_takes_data_keys() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let (id, _) = kr.active_data_key("Tenant_A").unwrap();
    kr.pseudonym_key("Tenant_A").unwrap();
    let e = kr.export_data_key_hex("Tenant_A", Some("Tenant_A-pk-1")).unwrap_err();
    assert_eq!(crate::error::exit_code_of(&e), crate::error::exit::CONFIG);
    let e = e.to_string();
    assert!(e.contains("Tenant_A-pk-1 is tenant Tenant_A's pseudonym key") && e.contains("data keys only") && e.contains(&id), "{e}");
    assert!(!e.contains("another workspace"), "{e}");
    let log = fs::read_to_string(keys_dir(ws.path()).join("audit.jsonl")).unwrap();
    assert!(log.lines().last().unwrap().contains("refused: not a data key"), "{log}");
}

#[test]
fn invalid_tenants_are_rejected() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    for t in ["", "a b", "../etc", "x|y", "t\u{7}"] {
        let e = kr.active_data_key(t).map(|_| ()).unwrap_err();
        assert!(matches!(e.downcast_ref::<KeyError>(), Some(KeyError::InvalidTenant { .. })));
        assert!(!e.to_string().contains('\u{7}'));
    }
    assert!(kr.forget("a b").is_err());
    assert!(kr.list().is_empty());
}

#[test]
fn concurrent_tenants_all_persist() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Keyring>();
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let got: Vec<(String, [u8; 32], [u8; 32])> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let kr = &kr;
                s.spawn(move || {
                    let t = format!("T{i}");
                    let (id, k) = kr.active_data_key(&t).unwrap();
                    let (id_again, _) = kr.active_data_key(&t).unwrap();
                    assert_eq!(id, id_again);
                    let p = *kr.pseudonym_key(&t).unwrap().bytes();
                    (t, *k.as_bytes(), p)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    drop(kr);
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    assert_eq!(kr.list().len(), 16);
    for (t, k, p) in got {
        assert_eq!(kr.active_data_key(&t).unwrap().1.as_bytes(), &k);
        assert_eq!(kr.pseudonym_key(&t).unwrap().bytes(), &p);
    }
}

#[test]
fn damaged_keyring_is_a_clear_error() {
    let ws = tempfile::tempdir().unwrap();
    drop(Keyring::open_with(ws.path(), env(HEX_A)).unwrap().active_data_key("T").unwrap());
    let p = keyring_path(ws.path());
    write_atomic_mode(&p, b"{ not json", 0o600).unwrap();
    let e = format!("{:#}", Keyring::open_with(ws.path(), env(HEX_A)).unwrap_err());
    assert!(e.contains("not valid keyring JSON") && e.contains("restore"), "{e}");
    write_atomic_mode(&p, b"{}", 0o644).unwrap();
    let e = format!("{:#}", Keyring::open_with(ws.path(), env(HEX_A)).unwrap_err());
    assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
}

#[test]
fn lost_default_master_key_is_not_silently_replaced() {
    let ws = tempfile::tempdir().unwrap();
    let kr = Keyring::open_with(ws.path(), MasterKeySource::Default).unwrap();
    kr.active_data_key("Tenant_A").unwrap();
    drop(kr);
    let mk = default_master_key_path(ws.path());
    let saved = fs::read_to_string(&mk).unwrap();
    fs::remove_file(&mk).unwrap();
    let e = format!("{:#}", Keyring::open_with(ws.path(), MasterKeySource::Default).unwrap_err());
    assert!(e.contains("master key was not found") && e.contains("DAGRUN_MASTER_KEY"), "{e}");
    assert!(!mk.exists(), "a new master key must not be created beside an existing keyring");
    // the saved key, given through the environment, still opens it
    let kr = Keyring::open_with(ws.path(), env(saved.trim())).unwrap();
    assert_eq!(kr.active_key_id("Tenant_A").unwrap().as_deref(), Some("Tenant_A-dk-1"));
}

#[test]
fn view_reads_without_creating_and_predicts_the_next_key_id() {
    let ws = tempfile::tempdir().unwrap();
    // No workspace keys at all: nothing is created, the first id is predicted.
    let v = KeyringView::read(ws.path()).unwrap();
    assert_eq!(v.data_key_ingredient("Tenant_A").unwrap(), "Tenant_A-dk-1");
    assert!(v.is_forgotten("Tenant_A").is_none() && !v.holds_data_key("Tenant_A", "Tenant_A-dk-1"));
    assert!(!ws.path().join(".dagrun").exists(), "a read-only view created files");
    // The prediction is what the keyring then creates, for a first key and after a rotation.
    let kr = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let (id, _) = kr.active_data_key("Tenant_A").unwrap();
    assert_eq!(id, "Tenant_A-dk-1");
    kr.pseudonym_key("Tenant_B").unwrap(); // a tenant with a pseudonym key but no data key
    let v = KeyringView::read(ws.path()).unwrap();
    assert_eq!(v.data_key_ingredient("Tenant_A").unwrap(), "Tenant_A-dk-1");
    assert_eq!(v.data_key_ingredient("Tenant_B").unwrap(), "Tenant_B-dk-1");
    assert!(v.holds_data_key("Tenant_A", "Tenant_A-dk-1"));
    let before = fs::read(kr.path()).unwrap();
    let _ = KeyringView::read(ws.path()).unwrap().data_key_ingredient("Tenant_C").unwrap();
    assert_eq!(fs::read(kr.path()).unwrap(), before, "the view wrote the keyring");
    assert_eq!(kr.active_data_key("Tenant_B").unwrap().0, "Tenant_B-dk-1");
    assert_eq!(kr.rotate("Tenant_A").unwrap(), "Tenant_A-dk-2");
    assert_eq!(KeyringView::read(ws.path()).unwrap().data_key_ingredient("Tenant_A").unwrap(), "Tenant_A-dk-2");
    kr.forget("Tenant_A").unwrap();
    assert!(KeyringView::read(ws.path()).unwrap().is_forgotten("Tenant_A").is_some());
    assert!(KeyringView::read(ws.path()).unwrap().data_key_ingredient("bad id").is_err());
}

/// Two processes with the keyring open at once (the jobs of a Slurm run, each
/// an `exec-stage`): each makes its tenant's first keys from the copy it read
/// at start. Review 12: the second write dropped the first one's keys (both
/// logged as made, one tenant's data never decryptable again). Every change
/// now reads the file again under the keyring lock.
#[test]
fn keyrings_open_in_two_processes_keep_each_others_keys() {
    let ws = tempfile::tempdir().unwrap();
    Keyring::open_with(ws.path(), env(HEX_A)).unwrap().active_data_key("Tenant_C").unwrap();
    let a = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let b = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let (ia, ka) = a.active_data_key("Tenant_A").unwrap();
    let pa = *a.pseudonym_key("Tenant_A").unwrap().bytes();
    let ib = b.active_data_key_id("Tenant_B").unwrap();
    // `b` read the file before `a` made Tenant_A's keys: it finds them, never makes others.
    let (ia2, ka2) = b.active_data_key("Tenant_A").unwrap();
    assert_eq!((ia2.as_str(), ka2.as_bytes()), (ia.as_str(), ka.as_bytes()));
    assert_eq!(b.pseudonym_key("Tenant_A").unwrap().bytes(), &pa);
    assert_eq!(b.data_key("Tenant_A", &ia).unwrap().as_bytes(), ka.as_bytes());
    // `a` rotates Tenant_B's key, which it has never seen, from the file as it is now.
    let rotated = a.rotate("Tenant_B").unwrap();
    assert_eq!(rotated, "Tenant_B-dk-2");
    assert!(b.data_key("Tenant_B", &rotated).is_ok(), "a key made by the other process is looked up in the file");
    let fresh = Keyring::open_with(ws.path(), env(HEX_A)).unwrap();
    let ids: Vec<String> = fresh.list().into_iter().map(|k| k.key_id).collect();
    for id in [ia.as_str(), ib.as_str(), rotated.as_str(), "Tenant_A-pk-1", "Tenant_C-dk-1"] {
        assert!(ids.iter().any(|i| i == id), "{id} was lost: {ids:?}");
    }
    // `b` forgets Tenant_A: `a`, which still holds Tenant_A's keys in memory, makes none again.
    b.forget("Tenant_A").unwrap();
    assert!(a.rotate("Tenant_A").is_err(), "a forgotten tenant got a new key from a stale copy");
    // Nor does `a` export a key it still holds in memory (review 21: a racing
    // export printed a key after forget reported it destroyed).
    let e = a.export_data_key_hex("Tenant_A", Some(&ia)).unwrap_err().to_string();
    assert!(e.contains("were destroyed"), "{e}");
    let log = fs::read_to_string(keys_dir(ws.path()).join("audit.jsonl")).unwrap();
    assert!(log.lines().last().unwrap().contains("refused: the tenant was forgotten"), "{log}");
    assert_eq!(crate::crypto::audit::verify(&keys_dir(ws.path())).unwrap().lines, fresh_lines(ws.path()));
}

fn fresh_lines(ws: &Path) -> u64 {
    fs::read_to_string(keys_dir(ws).join("audit.jsonl")).unwrap().lines().count() as u64
}

/// helper-73/74: a tombstone proves an erasure only when this workspace's
/// `keys forget` sealed it and no key of the tenant is left: one added by
/// hand, or copied from another workspace sharing the master key, does not;
/// and `keys forget` of a tenant with a planted tombstone destroys its keys.
#[test]
fn only_a_sealed_tombstone_of_this_workspace_proves_an_erasure() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ka = Keyring::open_with(a.path(), env(HEX_A)).unwrap();
    let kb = Keyring::open_with(b.path(), env(HEX_A)).unwrap();
    for k in [&ka, &kb] {
        k.active_data_key_id("T").unwrap();
        k.active_data_key_id("U").unwrap();
    }
    ka.forget("T").unwrap();
    assert_eq!(ka.erasures().proven, ["T"]);
    assert!(ka.erasures().unproven.is_empty());
    // A's tombstone copied into B (same master key), with B's keys of T removed by hand.
    let ring = |d: &Path| -> serde_json::Value { serde_json::from_slice(&fs::read(d.join(".dagrun/keys/keyring.json")).unwrap()).unwrap() };
    let mut rb = ring(b.path());
    rb["forgotten"] = ring(a.path())["forgotten"].clone();
    rb["tenants"].as_object_mut().unwrap().remove("T");
    fs::write(b.path().join(".dagrun/keys/keyring.json"), serde_json::to_vec(&rb).unwrap()).unwrap();
    let kb = Keyring::open_with(b.path(), env(HEX_A)).unwrap();
    assert!(kb.erasures().proven.is_empty(), "a tombstone of another workspace counted");
    assert_eq!(kb.erasures().unproven, [("T".to_string(), false)]);
    // A tombstone added by hand for U, whose keys are still there: unproven,
    // and forgetting U destroys its keys (it reported success and kept them).
    let mut rb = ring(b.path());
    rb["forgotten"].as_array_mut().unwrap().push(serde_json::json!({"tenant": "U", "forgotten_at": "2024-01-01T00:00:00Z"}));
    fs::write(b.path().join(".dagrun/keys/keyring.json"), serde_json::to_vec(&rb).unwrap()).unwrap();
    let kb = Keyring::open_with(b.path(), env(HEX_A)).unwrap();
    assert!(kb.erasures().unproven.contains(&("U".to_string(), true)));
    kb.forget("U").unwrap();
    assert!(ring(b.path())["tenants"].get("U").is_none(), "forget kept U's keys");
    assert_eq!(kb.erasures().proven, ["U"]);
}
