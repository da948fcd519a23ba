//! Cache keys ("fingerprints") of stages.
//!
//! A stage's cache key is the blake3 hash of the canonical JSON encoding
//! (object keys sorted, no whitespace), prefixed by the line
//! `dagrun-cache-key/3\n`, of exactly these ingredients — nothing else:
//!
//! 1. `kind` — the stage kind (`cmd`, `generate`, `train`, ...);
//! 2. `kind_version` — that kind's code version (`StageKind::version`), bumped
//!    whenever the kind's code would write different bytes for the same inputs;
//! 3. `params` — the stage's resolved `with:` params (after `${params.X}` and
//!    `${tenant}` substitution). A stage sees only the pipeline params it
//!    references, so changing an unrelated param changes no key;
//! 4. `cmd` and `env` — for `cmd` stages, the resolved command string and the
//!    declared environment variables (the rest of the environment is not part of
//!    the key: declare what matters), with, among them, each param value the
//!    command reads through its `DAGRUN_PARAM_<NAME>` variable because it is
//!    not a plain word (`pipeline::shell`: such a value is not in the text);
//! 5. `inputs` — for every declared input (`deps:` and inputs named by the kind),
//!    its workspace-relative path and the blake3 hash of its content (a directory
//!    hashes as its tree listing, plus what links leading out of it lead to,
//!    see `hashing`, "Inputs"). Inputs are hashed before the stage runs, never
//!    after (hashed again after it ran: a stage whose inputs changed while it
//!    ran is not recorded, `execute`);
//! 6. `outs` — the declared output paths (renaming an output reruns the stage);
//! 7. `extras` — run-time facts a kind adds, never secrets: e.g. `encrypt` adds
//!    the id of the tenant's active data key, so rotating or destroying the key
//!    reruns encryption. Extras are read-only: the key id is read from the
//!    keyring file without the master key, and a tenant with no key yet gets
//!    the id its first key will have, so computing a key (`status`,
//!    `--dry-run`) never creates or changes a key, and a dry run agrees with
//!    the run.
//!
//! Not in the key: the stage's name (renaming a stage keeps its cache), the wall
//! clock, file modification times (the memo of `hashing` uses them only to skip
//! re-reading unchanged files), the environment beyond `env:`, and `timeout` /
//! `retries`, `executor`, `resources` and `group` (they change how or where a
//! stage is run, not what it computes).
//!
//! Bump [`FORMAT`] when this list or its encoding changes: every key changes.
//!
//! History: `/1` first format; `/2` directory listings became JSON
//! (`dagrun-tree/2`, see `workspace::hashing`), so a directory input hashes
//! differently, and state records became MAC'd (`workspace::record`): every
//! stage of a workspace made by an older dagrun reruns once. `/3`: listings
//! became `dagrun-tree/3` (each file's size in its entry), so a directory
//! hashes differently; the ingredients are the same, but without a new key a
//! recorded `/2` listing would be restored, hashed as `/3`, found "modified"
//! and restored again on every run. Every stage reruns once.

use crate::workspace::ContentHash;
use serde_json::Value;
use std::collections::BTreeMap;

/// Version line hashed before the ingredients.
pub const FORMAT: &str = "dagrun-cache-key/3";

pub use crate::workspace::record::canonical_json;
pub use crate::workspace::state::{Ingredients, Written};

impl Ingredients {
    /// The cache key: blake3 hex of the canonical encoding.
    pub fn key(&self) -> ContentHash {
        let mut h = blake3::Hasher::new();
        h.update(FORMAT.as_bytes());
        h.update(b"\n");
        h.update(&self.canonical_bytes());
        ContentHash::from(h.finalize())
    }

    /// `canonical_json(&serde_json::to_value(self))`, written directly: the
    /// struct's fields in sorted key order, each value by serde_json (every
    /// map inside is a `BTreeMap` or a `serde_json::Map`, whose order is the
    /// same sorted order; `tests::direct_encoding_is_the_canonical_json`
    /// checks the bytes against the general encoding). No `Value` tree: it
    /// was a tenth of a no-op run's instructions.
    fn canonical_bytes(&self) -> Vec<u8> {
        fn member<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, name: &str, v: &T) {
            out.push(if out.is_empty() { b'{' } else { b',' });
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            serde_json::to_writer(&mut *out, v).expect("writing JSON to memory cannot fail");
        }
        let mut out = Vec::with_capacity(512);
        if let Some(c) = &self.cmd {
            member(&mut out, "cmd", c);
        }
        member(&mut out, "env", &self.env);
        member(&mut out, "extras", &self.extras);
        member(&mut out, "inputs", &self.inputs);
        member(&mut out, "kind", &self.kind);
        member(&mut out, "kind_version", &self.kind_version);
        member(&mut out, "outs", &self.outs);
        member(&mut out, "params", &self.params);
        out.push(b'}');
        out
    }
}

fn short(h: &str) -> &str {
    crate::workspace::hash::short(h)
}

fn show(v: &Value) -> String {
    // Reasons are printed, recorded and exported: no credential in them.
    let s = match crate::util::redact::param_value(v) {
        Value::String(s) => s,
        other => other.to_string(),
    };
    if s.chars().count() > 80 { format!("{}…", s.chars().take(80).collect::<String>()) } else { s }
}

/// Why `new` differs from `old`, one human sentence per difference.
/// The refs are the pipeline params the stage referenced, so a change is
/// named after the param (`param rows: 1000 → 2000`), and its `cmd:` and
/// `with:` as written, so an edit of them that came with a param change is
/// named too (the resolved text cannot tell the two apart).
pub fn explain(
    old: &Ingredients,
    new: &Ingredients,
    (old_refs, old_written): (&BTreeMap<String, Value>, &Written),
    (new_refs, new_written): (&BTreeMap<String, Value>, &Written),
    producer_of: &dyn Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut r = Vec::new();
    if old.kind != new.kind {
        r.push(format!("stage kind changed: {} → {}", old.kind, new.kind));
    } else if old.kind_version != new.kind_version {
        r.push(format!("code version of stage kind `{}` changed: {} → {}", new.kind, old.kind_version, new.kind_version));
    }
    let mut param_named = false;
    for (k, v) in new_refs {
        match old_refs.get(k) {
            Some(o) if o != v => {
                r.push(format!("param {k}: {} → {}", show(o), show(v)));
                param_named = true;
            }
            None => {
                r.push(format!("now uses param {k} = {}", show(v)));
                param_named = true;
            }
            _ => {}
        }
    }
    for k in old_refs.keys() {
        if !new_refs.contains_key(k) {
            r.push(format!("no longer uses param {k}"));
            param_named = true;
        }
    }
    // Both records hold what was written (records before 2026-12-07 do not).
    let edited = |o: &Option<ContentHash>, n: &Option<ContentHash>| o.is_some() && n.is_some() && o != n;
    if param_named {
        if edited(&old_written.cmd, &new_written.cmd) {
            r.push(format!(
                "command changed as well (its text, besides the params it uses): blake3 {} → {}",
                old_written.cmd.as_ref().map_or("", |h| h.short()),
                new_written.cmd.as_ref().map_or("", |h| h.short())
            ));
        }
        if edited(&old_written.with, &new_written.with) {
            r.push("`with:` changed as well (its text, besides the params it uses)".into());
        }
    } else {
        for (k, v) in &new.params {
            match old.params.get(k) {
                Some(o) if o != v => r.push(format!("with.{k}: {} → {}", show(o), show(v))),
                None => r.push(format!("with.{k} added: {}", show(v))),
                _ => {}
            }
        }
        for k in old.params.keys() {
            if !new.params.contains_key(k) {
                r.push(format!("with.{k} removed"));
            }
        }
        if old.cmd != new.cmd {
            // Named by hash: a command line may carry a credential, and
            // reasons go to run records, reports and OpenLineage events.
            let h = |c: &Option<String>| blake3::hash(c.as_deref().unwrap_or_default().as_bytes()).to_hex();
            r.push(format!("command changed: blake3 {} → {}", short(&h(&old.cmd)), short(&h(&new.cmd))));
        }
    }
    for (k, v) in &new.env {
        match old.env.get(k) {
            // The variable's name only, never its value (see the command above).
            Some(o) if o != v => r.push(format!("env {k} changed")),
            None => r.push(format!("env {k} added")),
            _ => {}
        }
    }
    for k in old.env.keys() {
        if !new.env.contains_key(k) {
            r.push(format!("env {k} removed"));
        }
    }
    for (p, h) in &new.inputs {
        let by = producer_of(p).map(|s| format!(" (output of stage {s})")).unwrap_or_default();
        match old.inputs.get(p) {
            Some(o) if o != h => r.push(format!("input {p} changed{by}: blake3 {} → {}", short(o), short(h))),
            None => r.push(format!("new input {p}")),
            _ => {}
        }
    }
    for p in old.inputs.keys() {
        if !new.inputs.contains_key(p) {
            r.push(format!("input {p} is no longer declared"));
        }
    }
    if old.outs != new.outs {
        r.push(format!("declared outputs changed: [{}] → [{}]", old.outs.join(", "), new.outs.join(", ")));
    }
    for (k, v) in &new.extras {
        match old.extras.get(k) {
            Some(o) if o != v => r.push(format!("{k}: {o} → {v}")),
            None => r.push(format!("{k}: {v} (new)")),
            _ => {}
        }
    }
    if r.is_empty() {
        r.push("cache key format changed".into());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn ing() -> Ingredients {
        Ingredients {
            kind: "cmd".into(),
            kind_version: 1,
            params: Map::new(),
            cmd: Some("echo 1".into()),
            env: BTreeMap::new(),
            inputs: BTreeMap::from([("a".to_string(), "00".repeat(32))]),
            outs: vec!["b".into()],
            extras: BTreeMap::new(),
        }
    }

    #[test]
    fn reasons_name_commands_and_env_without_their_text() {
        let a = ing();
        let mut b = ing();
        b.cmd = Some("curl -H 'Authorization: Bearer SECRET2' x".into());
        b.env.insert("API_KEY".into(), "SECRET3".into());
        let mut c = b.clone();
        c.env.insert("API_KEY".into(), "SECRET4".into());
        let (none, w) = (BTreeMap::new(), Written::default());
        let ab = explain(&a, &b, (&none, &w), (&none, &w), &|_| None);
        let bc = explain(&b, &c, (&none, &w), (&none, &w), &|_| None);
        let h = |s: &str| blake3::hash(s.as_bytes()).to_hex().to_string();
        assert_eq!(
            ab,
            [format!("command changed: blake3 {} → {}", &h("echo 1")[..12], &h("curl -H 'Authorization: Bearer SECRET2' x")[..12]), "env API_KEY added".into()]
        );
        assert_eq!(bc, ["env API_KEY changed"]);
    }

    #[test]
    fn key_is_stable_and_sensitive_to_each_ingredient() {
        let a = ing();
        assert_eq!(a.key(), ing().key());
        assert_eq!(a.key().as_str().len(), 64);
        let mut b = ing();
        b.kind_version = 2;
        assert_ne!(a.key(), b.key());
        let mut b = ing();
        b.inputs.insert("a".into(), "11".repeat(32));
        assert_ne!(a.key(), b.key());
        let mut b = ing();
        b.env.insert("X".into(), "1".into());
        assert_ne!(a.key(), b.key());
        let mut b = ing();
        b.outs.push("c".into());
        assert_ne!(a.key(), b.key());
        let mut b = ing();
        b.extras.insert("key".into(), "k2".into());
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn direct_encoding_is_the_canonical_json() {
        let general = |i: &Ingredients| canonical_json(&serde_json::to_value(i).unwrap()).into_bytes();
        let mut i = ing();
        assert_eq!(i.canonical_bytes(), general(&i));
        i.cmd = None;
        assert_eq!(i.canonical_bytes(), general(&i));
        i.cmd = Some("é \" \\ \u{1} \u{2028} ${x}".into());
        i.kind = "train".into();
        i.params = serde_json::from_str(
            r#"{"z":[1,-2.5,1e300,0.1,0.30000000000000004,true,null],"a":{"y":{"q":1},"b":"x"},"m":18446744073709551615,"n":-9223372036854775808}"#,
        )
        .unwrap();
        i.env = BTreeMap::from([("Z".into(), "1".into()), ("A".into(), "\n".into())]);
        i.extras = BTreeMap::from([("key".into(), "k2".into()), ("b".into(), "".into())]);
        i.inputs.insert("Z/é".into(), "11".repeat(32));
        i.outs = vec!["z".into(), "a".into()];
        assert_eq!(String::from_utf8(i.canonical_bytes()).unwrap(), String::from_utf8(general(&i)).unwrap());
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":[1,2],"c":"x"}}"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":{"c":"x","d":[1,2]},"b":1}"#);
    }

    #[test]
    fn explain_names_param_with_old_and_new() {
        let mut old = ing();
        old.cmd = Some("gen 1000".into());
        let mut new = ing();
        new.cmd = Some("gen 2000".into());
        let o = BTreeMap::from([("rows".to_string(), Value::from(1000))]);
        let n = BTreeMap::from([("rows".to_string(), Value::from(2000))]);
        let written = |cmd: &str| Written { cmd: Some(ContentHash::of_bytes(cmd.as_bytes())), with: None };
        let w = written("gen ${params.rows}");
        let r = explain(&old, &new, (&o, &w), (&n, &w), &|_| None);
        assert_eq!(r, vec!["param rows: 1000 → 2000"]);
        // The command's text changed too: named, not hidden by the param.
        let w2 = written("rm -f x; gen ${params.rows}");
        let r = explain(&old, &new, (&o, &w), (&n, &w2), &|_| None);
        assert_eq!(r[0], "param rows: 1000 → 2000");
        assert_eq!(
            r[1],
            format!("command changed as well (its text, besides the params it uses): blake3 {} → {}", w.cmd.unwrap().short(), w2.cmd.unwrap().short())
        );
        // A record from before the text was kept: the param alone.
        let r = explain(&old, &new, (&o, &Written::default()), (&n, &written("x")), &|_| None);
        assert_eq!(r, vec!["param rows: 1000 → 2000"]);
        let mut new2 = ing();
        new2.inputs.insert("a".into(), "ff".repeat(32));
        let none = (&BTreeMap::new(), &Written::default());
        let r = explain(&ing(), &new2, none, none, &|_| Some("gen".into()));
        assert_eq!(r, vec![format!("input a changed (output of stage gen): blake3 000000000000 → ffffffffffff")]);
    }
}
