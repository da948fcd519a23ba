//! A master key inside a PKCS#11 token (a hardware HSM, a cloud HSM, a cloud KMS's
//! PKCS#11 library, or SoftHSM2 for tests), used through the `cryptoki` crate.
//!
//! # Rules
//! - The key never leaves the token. Two wrapping mechanisms ([`Mech`]), whichever
//!   the token offers, detected with `C_GetMechanismList` / `C_GetMechanismInfo`:
//!   1. `CKM_AES_GCM` (preferred): `C_Encrypt` / `C_Decrypt` of the 32-byte tenant
//!      key (12-byte nonce chosen by dagrun, 128-bit tag, the keyring's associated
//!      data);
//!   2. `CKM_AES_KEY_WRAP_PAD` (RFC 5649), when the token does not offer AES-GCM
//!      for encrypt and decrypt: the key bytes are put in a short-lived session
//!      object (`CKK_GENERIC_SECRET`, never a token object) and `C_WrapKey`ped;
//!      `C_UnwrapKey` makes such a session object again, whose value is read and
//!      which is destroyed at once. Key wrap has no associated data, so the
//!      wrapped value is `key || blake3-derive(associated data)` and the second
//!      half is checked after unwrapping (see `crypto::master`).
//!
//!   `DAGRUN_MASTER_KEY_MECHANISM` / `master_key_mechanism:` force one; the
//!   mechanism of every wrapped key is recorded in the keyring.
//! - Refused before any use: a key that is extractable (`CKA_EXTRACTABLE`), not
//!   sensitive, or lacking the permission its mechanism needs (`CKA_ENCRYPT` and
//!   `CKA_DECRYPT` for AES-GCM, `CKA_WRAP` and `CKA_UNWRAP` for key wrap) — a
//!   master key that can leave the token protects nothing.
//! - `dagrun keys init --master` generates a missing key inside the token with
//!   `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`.
//! - One logged-in session per opened key, behind a mutex; each module is loaded
//!   and `C_Initialize`d once per process.
//! - Every failure names the module, token, key and what to do: a missing module,
//!   an absent token, a wrong or locked PIN (never shown), a missing key, a lost
//!   session (the stage fails; a rerun opens a new session).

use super::uri::Pkcs11Uri;
use anyhow::{Result, anyhow, bail};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Name recorded in the keyring for AES-GCM inside the token.
pub const MECH_GCM: &str = "CKM_AES_GCM";
/// Name recorded in the keyring for AES key wrap with padding (RFC 5649).
pub const MECH_KWP: &str = "CKM_AES_KEY_WRAP_PAD";

/// How a token wraps tenant keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mech {
    /// `CKM_AES_GCM` with `C_Encrypt` / `C_Decrypt`.
    Gcm,
    /// `CKM_AES_KEY_WRAP_PAD` with `C_WrapKey` / `C_UnwrapKey`.
    Kwp,
}

impl Mech {
    /// The name recorded in the keyring.
    pub fn name(self) -> &'static str {
        match self {
            Mech::Gcm => MECH_GCM,
            Mech::Kwp => MECH_KWP,
        }
    }

    /// The mechanism a recorded name stands for.
    pub fn from_name(s: &str) -> Option<Mech> {
        match s {
            MECH_GCM => Some(Mech::Gcm),
            MECH_KWP => Some(Mech::Kwp),
            _ => None,
        }
    }

    /// What the token must allow for it, for messages.
    fn needs(self) -> &'static str {
        match self {
            Mech::Gcm => "encrypt and decrypt",
            Mech::Kwp => "wrap and unwrap",
        }
    }
}

/// A key inside a token, with a logged-in session.
pub struct HsmKey {
    session: Mutex<Session>,
    key: ObjectHandle,
    uri: Pkcs11Uri,
    desc: String,
    token: String,
    /// The mechanism new wraps use.
    mech: Mech,
    /// Was it forced by a setting (rather than detected)?
    forced: bool,
    /// What the token offers (for the keyring's recorded mechanism).
    offers_gcm: bool,
    offers_kwp: bool,
}

/// How many times the token list is read when the token is not in it and an
/// unlabelled token is (see `open_session`).
const TOKEN_LOOKUPS: u64 = 6;

/// One loaded, initialised module per path for the whole process.
fn context(module: &Path) -> Result<Pkcs11> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(module) {
        return Ok(c.clone());
    }
    // The file checked is the file loaded: a link swapped after the check changes nothing.
    let real = check_module(module, false)?;
    let ctx =
        Pkcs11::new(&real).map_err(|e| anyhow!("cannot load the PKCS#11 module {} ({e}): is it a PKCS#11 library for this machine?", module.display()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => bail!("the PKCS#11 module {} failed to initialise ({})", module.display(), short(&e)),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Refuse a module that someone other than root or this user could have put
/// or changed there: loading it runs its code inside dagrun, which holds the
/// PIN and every unwrapped tenant key (review 27). The path must be absolute
/// (a relative one would be found from the current folder); the file it
/// resolves to must be owned by root or this user and writable by neither
/// group nor others, and so must every folder above it, except that a folder
/// with the sticky bit (`/tmp`) may be writable by all, since only an entry's
/// owner can replace it there (and that owner is checked one level down).
/// With `root_only` (a module named by a file of the workspace, which a
/// cloned repository can set: review 28 reached a library it shipped through
/// `/proc/self/cwd/..`), the file and its folders must be root's.
/// Returns the resolved path: the one to load.
pub(crate) fn check_module(module: &Path, root_only: bool) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if !module.is_absolute() {
        bail!(
            "module-path={} is not an absolute path: a relative one would load whatever library the current folder \
             holds; give the module's full path (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)",
            module.display()
        );
    }
    if !module.exists() {
        bail!(
            "the PKCS#11 module {} does not exist: install the HSM vendor's PKCS#11 library (SoftHSM2: apt-get \
             install softhsm2) or fix module-path= in the URI",
            module.display()
        );
    }
    let real = std::fs::canonicalize(module).map_err(|e| anyhow!("cannot resolve the PKCS#11 module {} ({e})", module.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let fix = "install the module owned by root (or you) with mode 0755 or 0644, in folders only root (or you) can write";
    let meta = std::fs::metadata(&real).map_err(|e| anyhow!("cannot read the PKCS#11 module {} ({e})", real.display()))?;
    if !meta.is_file() {
        bail!("the PKCS#11 module {} is not a regular file", real.display());
    }
    let mut at: Option<&Path> = Some(&real);
    while let Some(p) = at {
        let m = std::fs::metadata(p).map_err(|e| anyhow!("cannot read {} ({e})", p.display()))?;
        let what = if p == real {
            format!("the PKCS#11 module {}", p.display())
        } else {
            format!("{}, a folder above the PKCS#11 module {},", p.display(), real.display())
        };
        if root_only && m.uid() != 0 {
            bail!(
                "{what} belongs to user id {}, not root: a module named by a file of the workspace must be installed by root (a \
                 repository could ship one); name a module of your own in DAGRUN_MASTER_KEY_URI instead",
                m.uid()
            );
        }
        if m.uid() != 0 && m.uid() != me {
            bail!("{what} belongs to user id {}, neither root nor you: that user could make dagrun run their code with your keys; {fix}", m.uid());
        }
        let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
        if m.mode() & 0o022 != 0 && !sticky_dir {
            bail!("{what} is writable by group or others (mode {:04o}): they could make dagrun run their code with your keys; {fix}", m.mode() & 0o7777);
        }
        at = p.parent();
    }
    Ok(real)
}

/// A PKCS#11 error in a few words: the return value's name and the function.
fn short(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, f) => format!("{} in {f:?}", rv_name(*rv)),
        other => other.to_string(),
    }
}

fn rv_name(rv: RvError) -> String {
    let name = format!("{rv:?}");
    // CamelCase -> CKR_SNAKE_CASE, as the standard spells it.
    let mut out = String::from("CKR_");
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Is this the token (or its session) going away rather than a refusal?
fn is_lost(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::GeneralError
                | RvError::DeviceMemory
                // the key object vanished under an open session (token reset/removed)
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        )
    )
}

fn label_of(info_label: &str) -> &str {
    info_label.trim_end_matches([' ', '\0'])
}

impl HsmKey {
    /// Open the key the URI names in one read-only session; with `create`, when
    /// the token has no such key, generate it inside the token first (in a
    /// read-write session). Returns the key and whether it was generated.
    /// `want` forces a wrapping mechanism (`from` names the setting); `None` picks
    /// AES-GCM when the token offers it for encrypt and decrypt, else AES key wrap
    /// with padding when it offers that for wrap and unwrap.
    pub fn open(uri: &Pkcs11Uri, from: &str, create: Option<&mut dyn FnMut() -> Result<()>>, want: Option<(Mech, &str)>) -> Result<(HsmKey, bool)> {
        let (mut session, slot, token) = open_session(uri, from, false)?;
        let ctx = context(uri.module_path.as_deref().expect("checked by the parser"))?;
        let mechs = ctx.get_mechanism_list(slot).map_err(|e| anyhow!("cannot list the mechanisms of token {token} ({})", short(&e)))?;
        let offers = |t: MechanismType, ok: fn(&cryptoki::mechanism::MechanismInfo) -> bool| {
            mechs.contains(&t) && ctx.get_mechanism_info(slot, t).map(|i| ok(&i)).unwrap_or(false)
        };
        let offers_gcm = offers(MechanismType::AES_GCM, |i| i.encrypt() && i.decrypt());
        let offers_kwp = offers(MechanismType::AES_KEY_WRAP_PAD, |i| i.wrap() && i.unwrap());
        let offered = |m: Mech| match m {
            Mech::Gcm => offers_gcm,
            Mech::Kwp => offers_kwp,
        };
        let (mech, forced) = match want {
            Some((m, _)) if offered(m) => (m, true),
            Some((m, setting)) => bail!(
                "{setting} asks for {} but token {token} does not offer it for {} (it offers: {}); remove the \
                 setting to let dagrun pick what the token supports",
                m.name(),
                m.needs(),
                offered_list(offers_gcm, offers_kwp)
            ),
            None if offers_gcm => (Mech::Gcm, false),
            None if offers_kwp => (Mech::Kwp, false),
            None => bail!(
                "token {token} offers neither {MECH_GCM} (for encrypt and decrypt) nor {MECH_KWP} (for wrap and \
                 unwrap), one of which dagrun needs to wrap tenant keys inside the token; use a token or HSM \
                 firmware that supports one"
            ),
        };
        let shown = uri.shown();
        let mut keys = find_keys(&session, uri, &token, from)?;
        let created = keys.is_empty() && create.is_some();
        if let (true, Some(allowed)) = (keys.is_empty(), create) {
            allowed()?;
            session = open_session(uri, from, true)?.0;
            let label = uri.object.clone().ok_or_else(|| anyhow!("to create a key the URI must name it with object=LABEL"))?;
            let mut template = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::from(32)),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Label(label.into_bytes()),
            ];
            if let Some(id) = &uri.id {
                template.push(Attribute::Id(id.clone()));
            }
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(|e| anyhow!("token {token} could not generate the master key {shown} ({}); is the token writable?", short(&e)))?;
            keys = find_keys(&session, uri, &token, from)?;
        }
        let key = match keys.as_slice() {
            [] => bail!(
                "the key {shown} (from {from}) was not found: token {token} has no AES secret key with that \
                 label/id. Check object= in the URI; a new workspace's key is made by `dagrun keys init --master URI`, \
                 a key to `dagrun keys rewrap --to` with the token's own tools (`pkcs11-tool --keygen --key-type AES:32`)"
            ),
            [k] => *k,
            _ => bail!("token {token} holds {} keys matching {shown}: add id= to the URI to pick one", keys.len()),
        };
        check_attributes(&session, key, &shown, mech)?;
        let desc = format!("PKCS#11 key {shown}");
        Ok((HsmKey { session: Mutex::new(session), key, uri: clone_uri(uri)?, desc, token, mech, forced, offers_gcm, offers_kwp }, created))
    }

    pub fn describe(&self) -> String {
        self.desc.clone()
    }

    /// The mechanism new wraps use.
    pub fn mech(&self) -> Mech {
        self.mech
    }

    /// Keep wrapping with the mechanism an existing keyring records, unless a
    /// setting forced one or the token does not offer it (its key permissions are
    /// checked again).
    pub fn adopt(&mut self, m: Mech) -> Result<()> {
        let offered = match m {
            Mech::Gcm => self.offers_gcm,
            Mech::Kwp => self.offers_kwp,
        };
        if self.forced || m == self.mech || !offered {
            return Ok(());
        }
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if check_attributes(&s, self.key, &self.uri.shown(), m).is_ok() {
            drop(s);
            self.mech = m;
        }
        Ok(())
    }

    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    fn lost(&self, e: &P11Error) -> anyhow::Error {
        anyhow!(
            "the session with token {} was lost ({}): the HSM or its module stopped answering. Nothing was \
             written with this key; make the token available again and rerun",
            self.token,
            short(e)
        )
    }

    /// `C_Encrypt` with AES-GCM inside the token: returns ciphertext || tag.
    pub fn encrypt(&self, nonce: &[u8; 12], aad: &[u8], data: &[u8; 32]) -> Result<Vec<u8>> {
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, Ulong::from(128)).map_err(|e| anyhow!("cannot build AES-GCM parameters ({e})"))?;
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        s.encrypt(&Mechanism::AesGcm(params), self.key, data)
            .map_err(|e| if is_lost(&e) { self.lost(&e) } else { anyhow!("token {} refused to wrap a key with {} ({})", self.token, self.desc, short(&e)) })
    }

    /// `C_Decrypt` with AES-GCM inside the token; `None` when the blob does not
    /// authenticate under this key and `aad`.
    pub fn decrypt(&self, nonce: &[u8; 12], aad: &[u8], ct_tag: &[u8]) -> Result<Option<[u8; 32]>> {
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, Ulong::from(128)).map_err(|e| anyhow!("cannot build AES-GCM parameters ({e})"))?;
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        match s.decrypt(&Mechanism::AesGcm(params), self.key, ct_tag) {
            Ok(mut plain) => {
                let out = <[u8; 32]>::try_from(plain.as_slice()).ok();
                crate::crypto::wipe(&mut plain);
                Ok(out)
            }
            Err(P11Error::Pkcs11(RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange | RvError::DataInvalid | RvError::DataLenRange, _)) => Ok(None),
            // Some tokens (SoftHSM2) report a GCM tag mismatch as a general failure:
            // if the session still answers, it was the tag; otherwise the session is gone.
            Err(e @ P11Error::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _)) => match s.get_session_info() {
                Ok(_) => Ok(None),
                Err(_) => Err(self.lost(&e)),
            },
            Err(e) if is_lost(&e) => Err(self.lost(&e)),
            Err(e) => Err(anyhow!("token {} refused to unwrap a key with {} ({})", self.token, self.desc, short(&e))),
        }
    }

    /// `C_WrapKey` with `CKM_AES_KEY_WRAP_PAD`: `data` goes into a session
    /// object (never a token object) that is destroyed right after.
    pub fn kwp_wrap(&self, data: &[u8]) -> Result<Vec<u8>> {
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let mut template = transient_secret();
        template.push(Attribute::Value(data.to_vec()));
        let made = s.create_object(&template);
        for a in template.iter_mut() {
            if let Attribute::Value(v) = a {
                crate::crypto::wipe(v);
            }
        }
        let refused = |e: P11Error, what: &str| {
            if is_lost(&e) { self.lost(&e) } else { anyhow!("token {} refused to {what} with {MECH_KWP} under {} ({})", self.token, self.desc, short(&e)) }
        };
        let obj = made.map_err(|e| refused(e, "take a key to wrap"))?;
        let out = s.wrap_key(&Mechanism::AesKeyWrapPad, self.key, obj);
        let _ = s.destroy_object(obj);
        out.map_err(|e| refused(e, "wrap a key"))
    }

    /// `C_UnwrapKey` with `CKM_AES_KEY_WRAP_PAD` into a session object whose
    /// value is read and which is destroyed at once; `None` when the blob does
    /// not unwrap under this key. The caller wipes the returned bytes.
    pub fn kwp_unwrap(&self, blob: &[u8]) -> Result<Option<Vec<u8>>> {
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let template = transient_secret();
        let obj = match s.unwrap_key(&Mechanism::AesKeyWrapPad, self.key, blob, &template) {
            Ok(o) => o,
            Err(P11Error::Pkcs11(
                RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::DataInvalid
                | RvError::DataLenRange,
                _,
            )) => return Ok(None),
            Err(e @ P11Error::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _)) => {
                return match s.get_session_info() {
                    Ok(_) => Ok(None),
                    Err(_) => Err(self.lost(&e)),
                };
            }
            Err(e) if is_lost(&e) => return Err(self.lost(&e)),
            Err(e) => {
                return Err(anyhow!("token {} refused to unwrap a key with {MECH_KWP} under {} ({})", self.token, self.desc, short(&e)));
            }
        };
        let got = s.get_attributes(obj, &[AttributeType::Value]);
        let _ = s.destroy_object(obj);
        let attrs = got.map_err(|e| {
            if is_lost(&e) { self.lost(&e) } else { anyhow!("token {} would not give back a key it unwrapped with {MECH_KWP} ({})", self.token, short(&e)) }
        })?;
        let mut out = None;
        for a in attrs {
            if let Attribute::Value(v) = a {
                out = Some(v);
            }
        }
        Ok(out)
    }
}

fn offered_list(gcm: bool, kwp: bool) -> String {
    let l: Vec<&str> = [gcm.then_some(MECH_GCM), kwp.then_some(MECH_KWP)].into_iter().flatten().collect();
    if l.is_empty() { "neither mechanism dagrun can use".into() } else { l.join(", ") }
}

fn clone_uri(uri: &Pkcs11Uri) -> Result<Pkcs11Uri> {
    // Keep only what is recorded (never a pin-value) for later messages and records.
    Pkcs11Uri::parse(&uri.recorded())
}

/// Load the module, find the token, open a session and log in.
fn open_session(uri: &Pkcs11Uri, from: &str, rw: bool) -> Result<(Session, Slot, String)> {
    let module = uri.module_path.as_deref().expect("checked by the parser");
    let ctx = context(module)?;
    let want = uri.token.as_deref().unwrap_or_default();
    let token = format!("\"{}\"", crate::crypto::escape_for_message(want));
    // A token another process is writing can show up for a moment without
    // its label (SoftHSM2 rewrites its token file at each login; review 27:
    // 8 of 120 parallel `keys list` found no token): looked for again a few
    // times before giving up, and never called uninitialised.
    let mut attempt = 0;
    let slot = loop {
        let slots = ctx.get_slots_with_token().map_err(|e| anyhow!("cannot list the tokens of the PKCS#11 module {} ({})", module.display(), short(&e)))?;
        let mut present = Vec::new();
        let mut found = None;
        let mut unlabelled = false;
        for slot in slots {
            let Ok(info) = ctx.get_token_info(slot) else {
                unlabelled = true;
                continue;
            };
            let label = label_of(info.label()).to_string();
            let matches = label == want
                && uri.serial.as_deref().is_none_or(|s| label_of(info.serial_number()) == s)
                && uri.manufacturer.as_deref().is_none_or(|m| label_of(info.manufacturer_id()) == m)
                && uri.model.as_deref().is_none_or(|m| label_of(info.model()) == m)
                && uri.slot_id.is_none_or(|id| slot.id() == id);
            if matches && found.is_none() {
                found = Some(slot);
            }
            if label.is_empty() {
                unlabelled = true;
                present.push("(a token without a label: not set up, or being written by another process right now)".to_string());
            } else {
                present.push(format!("\"{}\"", crate::crypto::escape_for_message(&label)));
            }
        }
        if let Some(slot) = found {
            break slot;
        }
        attempt += 1;
        if (unlabelled || present.is_empty()) && attempt < TOKEN_LOOKUPS {
            std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
            continue;
        }
        bail!(
            "token {token} (from {from}) is not present in the PKCS#11 module {}: {}. Check that the token is \
             connected and that token= in the URI is its label; if another process may be using the token, try \
             again (do not re-initialise a token: that destroys its keys)",
            module.display(),
            if present.is_empty() { "the module has no token".to_string() } else { format!("tokens present: {}", present.join(", ")) }
        );
    };
    let session = if rw { ctx.open_rw_session(slot) } else { ctx.open_ro_session(slot) }
        .map_err(|e| anyhow!("cannot open a session with token {token} ({})", short(&e)))?;
    let pin = uri.pin()?;
    let Some(pin) = pin else {
        bail!(
            "the URI of token {token} (from {from}) gives no PIN: add ?pin-source=file:/path/to/pin-file (mode \
             0600) to the URI"
        );
    };
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => bail!(
            "token {token} refused the PIN from {}: wrong PIN (the PIN is not shown). Put the token's user PIN in \
             that file; repeated wrong PINs lock the token",
            uri.pin_source.as_deref().map(crate::crypto::escape_for_message).unwrap_or_else(|| "pin-value".into())
        ),
        Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
            bail!("the user PIN of token {token} is locked after too many wrong tries: the token's security officer must unlock it")
        }
        Err(P11Error::Pkcs11(rv @ (RvError::PinLenRange | RvError::PinInvalid), _)) => {
            bail!("token {token} refused the PIN as malformed ({}; the PIN is not shown): check the PIN file", rv_name(rv))
        }
        Err(e) => bail!("cannot log in to token {token} ({})", short(&e)),
    }
    Ok((session, slot, token))
}

fn find_keys(session: &Session, uri: &Pkcs11Uri, token: &str, from: &str) -> Result<Vec<ObjectHandle>> {
    let mut template = vec![Attribute::Class(ObjectClass::SECRET_KEY)];
    if let Some(l) = &uri.object {
        template.push(Attribute::Label(l.clone().into_bytes()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    session.find_objects(&template).map_err(|e| anyhow!("cannot search token {token} for the key named by {from} ({})", short(&e)))
}

/// Refuse a key that could leave the token or cannot do the job.
fn check_attributes(session: &Session, key: ObjectHandle, shown: &str, mech: Mech) -> Result<()> {
    let (use_a, use_b, names) = match mech {
        Mech::Gcm => (AttributeType::Encrypt, AttributeType::Decrypt, ["CKA_ENCRYPT", "CKA_DECRYPT", "C_Encrypt/C_Decrypt"]),
        Mech::Kwp => (AttributeType::Wrap, AttributeType::Unwrap, ["CKA_WRAP", "CKA_UNWRAP", "C_WrapKey/C_UnwrapKey"]),
    };
    let attrs = session
        .get_attributes(key, &[AttributeType::KeyType, AttributeType::Extractable, AttributeType::Sensitive, use_a, use_b])
        .map_err(|e| anyhow!("cannot read the attributes of the key {shown} ({})", short(&e)))?;
    let (mut aes, mut extractable, mut sensitive, mut enc, mut dec) = (false, true, false, false, false);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => aes = t == KeyType::AES,
            Attribute::Extractable(b) => extractable = b,
            Attribute::Sensitive(b) => sensitive = b,
            Attribute::Encrypt(b) | Attribute::Wrap(b) => enc = b,
            Attribute::Decrypt(b) | Attribute::Unwrap(b) => dec = b,
            _ => {}
        }
    }
    if !aes {
        bail!("the key {shown} is not an AES key: the master key must be an AES-256 secret key");
    }
    if extractable || !sensitive {
        bail!(
            "the key {shown} is {}: a master key that can leave the token protects nothing, so dagrun refuses \
             it. Use a key created with CKA_EXTRACTABLE=false and CKA_SENSITIVE=true (`dagrun keys init --master \
             URI` creates one)",
            if extractable { "extractable (CKA_EXTRACTABLE=true)" } else { "not sensitive (CKA_SENSITIVE=false)" }
        );
    }
    if !enc || !dec {
        let missing: Vec<&str> = [(!enc).then_some(names[0]), (!dec).then_some(names[1])].into_iter().flatten().collect();
        bail!(
            "the key {shown} may not wrap/unwrap tenant keys: it lacks {} permission (dagrun wraps keys with \
             {} using {}). Use a key with {} and {} set",
            missing.join(" and "),
            names[2],
            mech.name(),
            names[0],
            names[1]
        );
    }
    Ok(())
}

/// The template of the short-lived session object that carries a tenant key
/// through `C_WrapKey` / `C_UnwrapKey` with key wrap: never a token object,
/// readable only so dagrun can take the value out and destroy it at once.
fn transient_secret() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 27 and 28: which modules may be loaded. (The folders above a
    /// temporary folder are root's, `/tmp` with its sticky bit.)
    #[test]
    fn modules_others_could_change_are_refused_and_workspace_named_ones_must_be_roots() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("libvendor.so");
        std::fs::write(&m, b"not really a library").unwrap();
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            // A file of another user: refused either way.
            std::os::unix::fs::chown(&m, Some(65534), None).unwrap();
            let e = format!("{:#}", check_module(&m, false).unwrap_err());
            assert!(e.contains("neither root nor you"), "{e}");
        } else {
            // Yours: fine when you name it, not when a workspace file does.
            assert_eq!(check_module(&m, false).unwrap(), std::fs::canonicalize(&m).unwrap());
        }
        let e = format!("{:#}", check_module(&m, true).unwrap_err());
        assert!(e.contains("not root") && e.contains("DAGRUN_MASTER_KEY_URI"), "{e}");
        // A link is followed and the file it names is the one checked and returned.
        if root {
            std::os::unix::fs::chown(&m, Some(0), None).unwrap();
        }
        let link = d.path().join("link.so");
        std::os::unix::fs::symlink(&m, &link).unwrap();
        if root {
            assert_eq!(check_module(&link, true).unwrap(), std::fs::canonicalize(&m).unwrap());
        }
        // Writable by others, or in a folder others can write (no sticky bit): refused.
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o757)).unwrap();
        assert!(format!("{:#}", check_module(&m, false).unwrap_err()).contains("writable by group or others (mode 0757)"));
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(format!("{:#}", check_module(&m, false).unwrap_err()).contains("a folder above the PKCS#11 module"));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        if root {
            assert!(check_module(&m, false).is_ok(), "a sticky folder is fine");
        }
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // Relative: refused before anything is looked up.
        assert!(format!("{:#}", check_module(Path::new("lib/libvendor.so"), false).unwrap_err()).contains("not an absolute path"));
    }
}
