//! Text made safe to show: what dagrun puts in messages, logs, run records,
//! reports and events when the text comes from somewhere that may hold a
//! secret or personal data.
//!
//! Rules:
//! - A parse error about a file dagrun reads (YAML or JSON: pipelines,
//!   settings, run records, registry files, records, job files) goes through
//!   [`without_values`] before it is shown: serde quotes the offending value,
//!   and a file that is not what it should be (a key or PIN file, a CSV of
//!   customers, reached by mistake or through an edited record or a planted
//!   link) would have its content printed. The kind of value, its length
//!   and where it is (file, line, column) are kept.
//!   A JSON file read back is parsed with [`from_json`], which does both.
//! - A URL the user configured (an OpenLineage endpoint, a remote cache) is
//!   shown through [`redact_url`]: no `user:password@`, no query string.
//! - A command line shown whole (`dagrun lineage`) goes through
//!   [`credentials_in_command`]: URL credentials and queries, `Bearer`
//!   tokens and `--password=`-like option values are masked.
//! - So does every parameter value dagrun shows or exports ([`param_value`]:
//!   rerun reasons, `dagrun lineage`, run records, the report, OpenLineage
//!   `executionParameters`): a value that is not a plain word reaches a
//!   command through `DAGRUN_PARAM_*`, so a credential passed as a param
//!   (`-p src=https://user:pw@host/x`) is one the command text never shows
//!   (review 69). The stage itself gets the value whole; only sealed state
//!   records keep it, to compare with the next run's.

/// An error message (serde's, for YAML or JSON) with the values it quotes
/// left out: serde writes the offending value into its message (``invalid type: string "…"``,
/// ``integer `…` ``), and a file that is not what it should be (a CSV of
/// customers, a key or PIN file given as a pipeline or named by an edited
/// run record) would have its content printed, logged or put in a report.
/// The message keeps the value's kind and, for a string, its length; the
/// file, line and column say where it is. A key name (``unknown field `…` ``,
/// `` `…` is written twice``) is kept when it looks like one (at most 64
/// letters, digits, `_`, `-`, `.`, `$`, `{`, `}`, `[`, `]`), else described.
pub fn without_values(msg: &str) -> String {
    const KINDS: [&str; 5] = ["integer `", "floating point `", "boolean `", "character `", "unsigned integer `"];
    let looks_like_key = |k: &str| k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.${}[]".contains(c));
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    'scan: while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("string \"") {
            // serde writes it as Rust's Debug does: `\"` and `\\` inside.
            let mut chars = after.char_indices();
            let mut n = 0usize;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => {
                        out.push_str(&format!("string ({n} character{})", if n == 1 { "" } else { "s" }));
                        rest = &after[i + 1..];
                        continue 'scan;
                    }
                    _ => {}
                }
                n += 1;
            }
            out.push_str("string (not shown)");
            return out;
        }
        for kind in KINDS {
            if let Some(after) = rest.strip_prefix(kind) {
                let Some(end) = after.find('`') else { break };
                out.push_str(kind.trim_end_matches(" `"));
                rest = &after[end + 1..];
                continue 'scan;
            }
        }
        if let Some(after) = rest.strip_prefix('`')
            && let Some(end) = after.find('`')
        {
            let name = &after[..end];
            if looks_like_key(name) {
                out.push('`');
                out.push_str(name);
                out.push('`');
            } else {
                out.push_str(&format!("(a name of {} characters, not shown: it is not a key name)", name.chars().count()));
            }
            rest = &after[end + 1..];
            continue;
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    plain_types(&out)
}

/// Serde's Rust type names in "expected …" said in words: `expected f64` is
/// `expected a number`, `expected u64` `expected a whole number (0 or more)`.
fn plain_types(msg: &str) -> String {
    const NAMES: [(&str, &str); 12] = [
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected u8", "expected a whole number (0 or more)"),
        ("expected u16", "expected a whole number (0 or more)"),
        ("expected u32", "expected a whole number (0 or more)"),
        ("expected u64", "expected a whole number (0 or more)"),
        ("expected usize", "expected a whole number (0 or more)"),
        ("expected i8", "expected a whole number"),
        ("expected i16", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected isize", "expected a whole number"),
    ];
    let mut out = msg.to_string();
    for (rust, words) in NAMES {
        // Whole words only (`expected u8` is not the start of `expected u64`).
        let mut from = 0;
        while let Some(k) = out[from..].find(rust).map(|k| k + from) {
            let end = k + rust.len();
            if out[end..].chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                from = end;
                continue;
            }
            out.replace_range(k..end, words);
            from = k + words.len();
        }
    }
    out
}

/// A URL (an OpenLineage endpoint, a remote cache) as shown in messages and
/// run records: without any `user:password@` (even one whose password holds an unencoded `/`: all up
/// to the last `@` goes), and with a query string or fragment replaced by
/// `?…` (`?api_key=…` is a credential too).
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") {
        return not_a_path(url);
    }
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    let (rest, hidden) = match rest.find(['?', '#']) {
        Some(i) => (&rest[..i], "?…"),
        None => (rest, ""),
    };
    if scheme.is_empty() { format!("{rest}{hidden}") } else { format!("{scheme}://{rest}{hidden}") }
}

/// A parameter value as dagrun shows or exports it: strings (also inside
/// lists and maps) through [`credentials_in_command`]; numbers and booleans
/// as they are.
pub fn param_value(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(credentials_in_command(s)),
        Value::Array(a) => Value::Array(a.iter().map(param_value).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), param_value(x))).collect()),
        other => other.clone(),
    }
}

/// `text` (a command line) with the credential-shaped parts masked: a URL's
/// `user:password@` (`https://***@host/x`) and query string (`?…`, which may
/// carry a signature or key), the word after `Bearer`, and the value of an
/// option whose name says it holds a secret (`--password=***`; names with
/// `password`, `passwd`, `token`, `secret`, `key` or `auth`). Only these forms
/// are recognised: a credential given another way stays, so commands should
/// take credentials from the environment (`secrets:`, `pass_env:`).
pub fn credentials_in_command(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The URL ends at a space or quote; all up to its last `@` goes (a
        // password may hold an unencoded `/`; an `@` in a path masks more
        // than needed, never less), and so does its query.
        let end = tail.find(|c: char| "\"'` \t\n".contains(c)).unwrap_or(tail.len());
        let mut url = &tail[..end];
        if let Some(at) = url.rfind('@') {
            out.push_str("***");
            url = &url[at..];
        }
        match url.find(['?', '#']) {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?…");
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    // Words: `Bearer X` and `--password=X`.
    let secret_name = |n: &str| {
        let n = n.to_ascii_lowercase();
        ["password", "passwd", "token", "secret", "key", "auth"].iter().any(|w| n.contains(w))
    };
    let mut masked = String::with_capacity(out.len());
    let mut after_bearer = false;
    for (i, word) in out.split(' ').enumerate() {
        if i > 0 {
            masked.push(' ');
        }
        if after_bearer && !word.is_empty() {
            // A closing quote or bracket of the argument stays (`'… Bearer ***'`).
            let kept = word.len() - word.trim_end_matches(['"', '\'', ')', ']', '}', ',', ';']).len();
            masked.push_str("***");
            masked.push_str(&word[word.len() - kept..]);
            after_bearer = false;
            continue;
        }
        after_bearer = word.trim_start_matches(['"', '\'']).eq_ignore_ascii_case("bearer");
        match word.split_once('=') {
            Some((name, value)) if name.starts_with('-') && secret_name(name) && !value.is_empty() => {
                masked.push_str(name);
                masked.push_str("=***");
            }
            _ => masked.push_str(word),
        }
    }
    masked
}

/// Parse JSON that dagrun reads back from disk; the error is serde's message
/// through [`without_values`] (the caller names the file and what to do).
pub fn from_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| without_values(&e.to_string()))
}

/// A path from a variable, as a message shows it: as given when it starts
/// like a path (`/`, `.`, `~`) or is short; otherwise — a key or token put in
/// the wrong variable (the master key in `DAGRUN_MASTER_KEY_FILE`; a base64
/// token, which may hold a `/`) — described, never shown.
pub fn shown_path(value: &str) -> String {
    if value.starts_with(['/', '.', '~']) { format!("{value:?}") } else { not_a_path(value) }
}

/// A value that is neither a URL nor a path: shown only when short.
fn not_a_path(value: &str) -> String {
    let n = value.chars().count();
    if n < 20 {
        return format!("{:?}", crate::util::escape_controls(value));
    }
    let hex = value.chars().all(|c| c.is_ascii_hexdigit());
    format!("(a value of {n} {}characters, not shown: a key or token in the wrong variable?)", if hex { "hexadecimal " } else { "" })
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_key_or_token_in_a_path_variable_is_described_not_shown() {
        let key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let shown = shown_path(key);
        assert!(!shown.contains("0001020304") && shown.contains("64 hexadecimal characters"), "{shown}");
        assert_eq!(shown_path("/etc/dagrun/master.key"), "\"/etc/dagrun/master.key\"");
        assert_eq!(shown_path("master.key"), "\"master.key\"");
        // A base64 token holds `/` and `+`: still not shown.
        let b64 = "dGhpcyBpcyBhIHRva2Vu/QkFTRTY0+c2VjcmV0PQ==";
        assert!(!shown_path(b64).contains("dGhpcyBp") && !redact_url(b64).contains("dGhpcyBp"));
        assert_eq!(shown_path("./keys/master.key"), "\"./keys/master.key\"");
        let url = redact_url("oltok_S3cr3tBearerValue_0123456789");
        assert!(!url.contains("S3cr3t"), "{url}");
        assert_eq!(redact_url("http://u:p@h:1/x?k=v"), "http://h:1/x?…");
    }
    use super::*;

    #[test]
    fn urls_in_a_command_lose_their_credentials() {
        assert_eq!(credentials_in_command("curl https://me:hunter2@host.example/x?y=1 -o a"), "curl https://***@host.example/x?… -o a");
        assert_eq!(
            credentials_in_command("curl 'https://h/x?sig=abc&se=1' -H 'Authorization: Bearer tok123' --password=pw1 --token=t2 -v"),
            "curl 'https://h/x?…' -H 'Authorization: Bearer ***' --password=*** --token=*** -v"
        );
        assert_eq!(credentials_in_command("run --keep=3 --name=x"), "run --keep=3 --name=x");
        assert_eq!(credentials_in_command("psql 'postgres://u:p@db:5432/x' && scp s3://a/b ."), "psql 'postgres://***@db:5432/x' && scp s3://a/b .");
        assert_eq!(credentials_in_command("echo a@b https://h/p"), "echo a@b https://h/p");
        assert_eq!(credentials_in_command("curl https://u:pa/ss@h/x"), "curl https://***@h/x");
        assert_eq!(credentials_in_command("x://u:p@"), "x://***@");
        assert_eq!(credentials_in_command("no urls"), "no urls");
    }

    #[test]
    fn messages_keep_kinds_and_key_names_but_not_values() {
        use super::without_values as w;
        assert_eq!(
            w("invalid type: string \"Customer_ID,Email 1,jane.doe@example.com\", expected struct PipelineFile"),
            "invalid type: string (40 characters), expected struct PipelineFile"
        );
        assert_eq!(w(r#"invalid type: string "a\"b\\c", expected u64"#), "invalid type: string (5 characters), expected a whole number (0 or more)");
        assert_eq!(w(r#"invalid type: string "abc", expected f64"#), "invalid type: string (3 characters), expected a number");
        assert_eq!(w("invalid value: integer `-1`, expected u32"), "invalid value: integer, expected a whole number (0 or more)");
        assert_eq!(w("expected u8x"), "expected u8x");
        assert_eq!(w("invalid type: integer `314584655242`, expected struct PipelineFile"), "invalid type: integer, expected struct PipelineFile");
        assert_eq!(w("invalid type: floating point `1.5`, expected a string"), "invalid type: floating point, expected a string");
        assert_eq!(w("invalid type: boolean `true`, expected a string"), "invalid type: boolean, expected a string");
        assert_eq!(w("unknown field `stagse`, expected one of `params`, `stages`"), "unknown field `stagse`, expected one of `params`, `stages`");
        assert_eq!(
            w("unknown field `jane.doe@example.com`, expected one of `params`"),
            "unknown field (a name of 20 characters, not shown: it is not a key name), expected one of `params`"
        );
        assert_eq!(w("unknown variant `CKM_X`, expected `a`"), "unknown variant `CKM_X`, expected `a`");
        assert_eq!(w("`train[${tenant}]` is written twice in one mapping"), "`train[${tenant}]` is written twice in one mapping");
        assert_eq!(w("invalid type: string \"unterminated"), "invalid type: string (not shown)");
        assert_eq!(w("did not find expected key at line 3 column 1"), "did not find expected key at line 3 column 1");
    }

    #[test]
    fn json_errors_name_no_value() {
        let e = from_json::<std::collections::BTreeMap<String, u64>>(b"31415926").unwrap_err();
        assert_eq!(e, "invalid type: integer, expected a map at line 1 column 8");
        assert_eq!(from_json::<Vec<u8>>(b"[1,2]").unwrap(), [1, 2]);
    }

    #[test]
    fn urls_lose_credentials_and_queries() {
        assert_eq!(redact_url("https://user:secret@h:1/x"), "https://h:1/x");
        assert_eq!(redact_url("http://alice:S3cret/PW@127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(redact_url("http://127.0.0.1:9/base?api_key=S3cretQ"), "http://127.0.0.1:9/base?…");
        assert_eq!(redact_url("http://h/x#S3cret"), "http://h/x?…");
        assert_eq!(redact_url("s3://AKIAX:SECRETPW@bucket/p?X-Amz-Signature=z"), "s3://bucket/p?…");
        assert_eq!(redact_url("file:///srv/cache"), "file:///srv/cache");
    }
}
