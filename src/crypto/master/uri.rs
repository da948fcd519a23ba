//! RFC 7512 PKCS#11 URIs, e.g.
//! `pkcs11:token=dagrun-test;object=dagrun-master;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dagrun/pin`.
//!
//! # Rules
//! - Path attributes (`;`-separated) and query attributes (`&`-separated) are
//!   percent-decoded; an attribute given twice, an unknown attribute (other than the
//!   RFC's vendor `x-` ones) or a `type` other than `secret-key` is an error, so a
//!   typo never silently selects another key.
//! - `token` and `object` (or `id`) are required, and so is `module-path`: dagrun
//!   loads no module the URI does not name.
//! - The PIN comes from `pin-source` (`file:PATH` or a path; the file must be
//!   private, like a key file) or `pin-value`. A `pin-value` is a secret: it is
//!   wiped on drop and never shown ([`Pkcs11Uri::shown`]) nor recorded
//!   ([`Pkcs11Uri::recorded`]).

use anyhow::{Result, anyhow, bail};
use std::path::PathBuf;

/// A parsed PKCS#11 URI. `Debug` hides the PIN.
#[derive(Default)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub module_path: Option<PathBuf>,
    pub pin_source: Option<String>,
    pin_value: Option<String>,
}

impl std::fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pkcs11Uri({})", self.shown())
    }
}

impl Drop for Pkcs11Uri {
    fn drop(&mut self) {
        if let Some(p) = &mut self.pin_value {
            crate::crypto::wipe_string(p);
        }
    }
}

const PATH_ATTRS: &[&str] = &[
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "object",
    "type",
    "id",
    "slot-description",
    "slot-manufacturer",
    "slot-id",
];
/// The longest PIN file read (PKCS#11 PINs are a few dozen bytes at most).
const MAX_PIN_FILE_BYTES: u64 = 1024;
const QUERY_ATTRS: &[&str] = &["pin-source", "pin-value", "module-name", "module-path"];

fn pct_decode(s: &str, what: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = h
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| anyhow!("attribute {what} has a broken percent-escape (write a byte as %XX with two hex digits)"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(bytes: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|_| anyhow!("attribute {what} is not UTF-8 text"))
}

/// Percent-encode for output: everything but RFC 3986 unreserved characters and `/` `:`.
fn pct_encode(s: &[u8]) -> String {
    let mut out = String::new();
    for &c in s {
        if c.is_ascii_alphanumeric() || b"-._~/:".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl Pkcs11Uri {
    /// Parse an RFC 7512 URI. Errors never quote a `pin-value`.
    pub fn parse(s: &str) -> Result<Pkcs11Uri> {
        let rest = s.strip_prefix("pkcs11:").ok_or_else(|| anyhow!("a PKCS#11 URI starts with `pkcs11:` (RFC 7512)"))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut u = Pkcs11Uri::default();
        let mut seen: Vec<String> = Vec::new();
        let mut each = |part: &str, allowed: &[&str], sep: &str, u: &mut Pkcs11Uri| -> Result<()> {
            if part.is_empty() {
                return Ok(());
            }
            // Not quoted: a PIN written without its `pin-value=` would be shown.
            let (name, value) = part.split_once('=').ok_or_else(|| {
                anyhow!(
                    "one attribute of the URI's {} part is not an attribute=value pair ({} characters; not shown, it could be a PIN: give a PIN as pin-source=file:/PATH)",
                    if sep == ";" { "path" } else { "query" },
                    part.chars().count()
                )
            })?;
            let name = name.to_ascii_lowercase();
            if !allowed.contains(&name.as_str()) && !name.starts_with("x-") {
                let other = if sep == ";" { QUERY_ATTRS } else { PATH_ATTRS };
                if other.contains(&name.as_str()) {
                    bail!(
                        "attribute `{name}` belongs in the {} part of the URI (after {})",
                        if sep == ";" { "query" } else { "path" },
                        if sep == ";" { "`?`, separated by `&`" } else { "`pkcs11:`, separated by `;`" }
                    );
                }
                // Shown only when it looks like a mistyped attribute: text
                // after an unencoded `&` or `;` inside a PIN lands here too.
                let known = PATH_ATTRS.iter().chain(QUERY_ATTRS);
                let like_attr = name.len() <= 24
                    && name.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    && (name.contains('-') || known.clone().any(|a| a.len() >= 3 && name.len() >= 3 && a[..3] == name[..3]));
                let shown = if like_attr {
                    format!("`{name}`")
                } else {
                    format!(
                        "({} characters; not shown, it could be part of a PIN: percent-encode `&` and `;` in a value, or give the PIN as pin-source=file:/PATH)",
                        name.chars().count()
                    )
                };
                bail!("unknown attribute {shown} (RFC 7512 path attributes: {}; query attributes: {})", PATH_ATTRS.join(", "), QUERY_ATTRS.join(", "));
            }
            if seen.contains(&name) {
                bail!("attribute `{name}` is given twice");
            }
            seen.push(name.clone());
            let raw = pct_decode(value, &name)?;
            match name.as_str() {
                "token" => u.token = Some(text(raw, &name)?),
                "manufacturer" => u.manufacturer = Some(text(raw, &name)?),
                "serial" => u.serial = Some(text(raw, &name)?),
                "model" => u.model = Some(text(raw, &name)?),
                "object" => u.object = Some(text(raw, &name)?),
                "id" => u.id = Some(raw),
                "slot-id" => {
                    let t = text(raw, &name)?;
                    u.slot_id = Some(t.parse().map_err(|_| anyhow!("slot-id must be a decimal number"))?);
                }
                "type" => {
                    let t = text(raw, &name)?;
                    if t != "secret-key" {
                        bail!("type={} cannot be a master key: it must be an AES secret key (type=secret-key)", crate::crypto::escape_for_message(&t));
                    }
                }
                "module-path" => u.module_path = Some(PathBuf::from(text(raw, &name)?)),
                "module-name" => bail!(
                    "module-name is not supported: give the module's full path with module-path= (e.g. \
                     module-path=/usr/lib/softhsm/libsofthsm2.so)"
                ),
                "pin-source" => u.pin_source = Some(text(raw, &name)?),
                "pin-value" => u.pin_value = Some(String::from_utf8(raw).map_err(|_| anyhow!("pin-value is not UTF-8 text"))?),
                _ => {} // library-*, slot-description/manufacturer, x-*: accepted, not used for selection
            }
            Ok(())
        };
        for part in path.split(';') {
            each(part, PATH_ATTRS, ";", &mut u)?;
        }
        if let Some(q) = query {
            for part in q.split('&') {
                each(part, QUERY_ATTRS, "&", &mut u)?;
            }
        }
        if u.token.is_none() {
            bail!("the URI names no token: add token=LABEL (the token's label)");
        }
        if u.object.is_none() && u.id.is_none() {
            bail!("the URI names no key: add object=LABEL (the key's label) or id=%XX...");
        }
        if u.module_path.is_none() {
            bail!(
                "the URI names no PKCS#11 module: add ?module-path=/path/to/the/vendor/module.so (SoftHSM2: \
                 /usr/lib/softhsm/libsofthsm2.so)"
            );
        }
        if u.pin_source.is_some() && u.pin_value.is_some() {
            bail!("the URI has both pin-source and pin-value: keep one (pin-source=file:PATH is preferred)");
        }
        Ok(u)
    }

    /// The URI for messages: selection attributes and module, no PIN and no PIN source.
    pub fn shown(&self) -> String {
        let mut path = Vec::new();
        let mut push = |k: &str, v: Option<&[u8]>| {
            if let Some(v) = v {
                path.push(format!("{k}={}", pct_encode(v)));
            }
        };
        push("token", self.token.as_deref().map(str::as_bytes));
        push("manufacturer", self.manufacturer.as_deref().map(str::as_bytes));
        push("serial", self.serial.as_deref().map(str::as_bytes));
        push("model", self.model.as_deref().map(str::as_bytes));
        let slot = self.slot_id.map(|s| s.to_string());
        push("slot-id", slot.as_deref().map(str::as_bytes));
        push("object", self.object.as_deref().map(str::as_bytes));
        push("id", self.id.as_deref());
        path.push("type=secret-key".into());
        let module = self.module_path.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        format!("pkcs11:{}?module-path={}", path.join(";"), pct_encode(module.as_bytes()))
    }

    /// The URI as the keyring records it: [`Pkcs11Uri::shown`] plus the `pin-source`
    /// (a place, not a secret); never a `pin-value`.
    pub fn recorded(&self) -> String {
        match &self.pin_source {
            Some(p) => format!("{}&pin-source={}", self.shown(), pct_encode(p.as_bytes())),
            None => self.shown(),
        }
    }

    /// True when the URI carries the PIN itself (`pin-value`).
    pub fn has_pin_value(&self) -> bool {
        self.pin_value.is_some()
    }

    /// The PIN: `pin-value`, or the content of the `pin-source` file (which must be
    /// private), without one trailing newline. Errors never contain the PIN.
    pub(crate) fn pin(&self) -> Result<Option<cryptoki::types::AuthPin>> {
        if let Some(v) = &self.pin_value {
            return Ok(Some(cryptoki::types::AuthPin::from(v.clone())));
        }
        let Some(src) = &self.pin_source else { return Ok(None) };
        let path = std::path::Path::new(src.strip_prefix("file:").unwrap_or(src));
        if !path.is_absolute() {
            // Not quoted: a PIN given in place of the path would be shown.
            bail!(
                "pin-source must be file:/ABSOLUTE/PATH of a file holding the PIN; the value given is not an absolute path (not shown: it could be the PIN itself)"
            );
        }
        super::file::check_private(path, "PIN file")?;
        // One capped read of a regular file, never waited on: a huge file, a
        // FIFO or a device swapped in after the check is refused (review 27:
        // a 1 GiB file was read whole and sent to the token as the PIN).
        let bytes = crate::util::read_capped(path, MAX_PIN_FILE_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => anyhow!(
                "the PIN file {} named by pin-source is not a regular file of at most {MAX_PIN_FILE_BYTES} bytes: it must hold the \
                 token's user PIN and nothing else",
                path.display()
            ),
            _ => anyhow!("cannot read the PIN file {} ({e}) named by pin-source", path.display()),
        })?;
        let mut s = String::from_utf8(bytes).map_err(|e| {
            let mut b = e.into_bytes();
            crate::crypto::wipe(&mut b);
            anyhow!("the PIN file {} named by pin-source is not UTF-8 text", path.display())
        })?;
        let trimmed_len = s.trim_end_matches(['\n', '\r']).len();
        let pin = s[..trimmed_len].to_string();
        crate::crypto::wipe_string(&mut s);
        Ok(Some(cryptoki::types::AuthPin::from(pin)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_in_the_wrong_place_is_never_quoted() {
        let base = "pkcs11:token=t;object=k?module-path=/m.so";
        let e = Pkcs11Uri::parse(&format!("{base}&314584655242")).unwrap_err().to_string();
        assert!(e.contains("not an attribute=value pair (12 characters; not shown") && !e.contains("314584655242"), "{e}");
        for (uri, hidden) in [(format!("{base}&pin-value=Xk7&Qz9=Lp"), "qz9"), (format!("{base}&pin-value=ab&SecretPart4711="), "secretpart4711")] {
            let e = Pkcs11Uri::parse(&uri).unwrap_err().to_string();
            assert!(e.contains("not shown, it could be part of a PIN") && !e.to_lowercase().contains(hidden), "{e}");
        }
        let e = Pkcs11Uri::parse(&format!("{base}&modle-path=/x.so")).unwrap_err().to_string();
        assert!(e.contains("unknown attribute `modle-path`"), "{e}");
        let u = Pkcs11Uri::parse(&format!("{base}&pin-source=314584655242")).unwrap();
        let e = u.pin().unwrap_err().to_string();
        assert!(e.contains("must be file:/ABSOLUTE/PATH") && !e.contains("314584655242"), "{e}");
    }

    #[test]
    fn parses_the_softhsm_example() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=dagrun-test;object=dagrun-master;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dagrun/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("dagrun-test"));
        assert_eq!(u.object.as_deref(), Some("dagrun-master"));
        assert_eq!(u.module_path.as_deref(), Some(std::path::Path::new("/usr/lib/softhsm/libsofthsm2.so")));
        assert_eq!(u.pin_source.as_deref(), Some("file:/etc/dagrun/pin"));
        assert_eq!(u.shown(), "pkcs11:token=dagrun-test;object=dagrun-master;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so");
        assert!(u.recorded().ends_with("&pin-source=file:/etc/dagrun/pin"));
        // recorded form parses back to the same
        assert_eq!(Pkcs11Uri::parse(&u.recorded()).unwrap().recorded(), u.recorded());
    }

    #[test]
    fn percent_escapes_and_ids() {
        let u = Pkcs11Uri::parse("pkcs11:token=My%20Token;id=%01%02?module-path=/m.so").unwrap();
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2][..]));
        assert!(u.shown().contains("token=My%20Token") && u.shown().contains("id=%01%02"));
    }

    #[test]
    fn pin_value_is_never_shown() {
        let u = Pkcs11Uri::parse("pkcs11:token=t;object=k?module-path=/m.so&pin-value=s3cr3t-991").unwrap();
        assert!(u.has_pin_value());
        for s in [u.shown(), u.recorded(), format!("{u:?}")] {
            assert!(!s.contains("s3cr3t"), "{s}");
        }
    }

    #[test]
    fn bad_uris_are_explained() {
        for (bad, want) in [
            ("file:/x", "starts with `pkcs11:`"),
            ("pkcs11:object=k?module-path=/m.so", "no token"),
            ("pkcs11:token=t?module-path=/m.so", "no key"),
            ("pkcs11:token=t;object=k", "no PKCS#11 module"),
            ("pkcs11:token=t;object=k;tokn=x?module-path=/m.so", "unknown attribute `tokn`"),
            ("pkcs11:token=t;token=u;object=k?module-path=/m.so", "twice"),
            ("pkcs11:token=t;object=k;type=private?module-path=/m.so", "secret-key"),
            ("pkcs11:token=t;object=k;module-path=/m.so", "query part"),
            ("pkcs11:token=t%zz;object=k?module-path=/m.so", "percent-escape"),
            ("pkcs11:token=t;object=k?module-path=/m.so&pin-value=zz-secret&pin-source=file:/p", "both"),
        ] {
            let e = format!("{:#}", Pkcs11Uri::parse(bad).unwrap_err());
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains("zz-secret"), "{e}");
        }
    }
}
