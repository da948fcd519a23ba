//! Values substituted into a `cmd:` string are data, never shell code.
//!
//! # Rules
//! `${params.NAME}` and `${tenant}` in a `cmd:` are replaced by their value
//! **quoted for the place they appear in**, found by scanning the command the
//! way `sh` reads it:
//! - unquoted (also inside `$( … )`): a value of only `A-Z a-z 0-9 _ - . / : = @ % + ,`
//!   is inserted as is (so ordinary commands and their cache keys are
//!   unchanged); any other value is wrapped in single quotes, a `'` in it
//!   written `'\''`;
//! - inside `'…'`: a `'` in the value is written `'\''`;
//! - inside `"…"`: `\`, `"`, `$` and `` ` `` are escaped with a backslash;
//! - inside a comment: line breaks become spaces (a value cannot end the comment);
//! - inside `$(( … ))` arithmetic, which expands what quotes would hide
//!   (`x[$(cmd)]`), a value that needs quoting is refused as in backticks;
//! - inside `case … esac` a pattern's `)` ends no `$( … )` (it once made a
//!   value in `"$(case a in a) echo ${params.v};; esac)"` quoted for the
//!   double quotes while the shell read it unquoted);
//! - a list param (of strings, numbers or booleans) standing as a word of its
//!   own (unquoted, between word breaks, not a redirection's target) is one
//!   word per item (`cat ${params.files}` → `cat a.csv 'b c.csv'`; an empty
//!   list is no word, and what follows starts a word as before); anywhere
//!   else (`X=${…}`, `x${…}`, `> ${…}`, quotes, a comment) its items joined by
//!   spaces are one value; any other list or a mapping is its JSON text;
//! - inside backticks or after a here-document operator (`<<`), where quoting
//!   rules differ, a value that needs quoting is refused at load time with the
//!   fix: use `$(…)`, or read the value from `$DAGRUN_PARAM_NAME`.
//!
//! So `-p 'name=x; touch /tmp/injected #'` makes `echo ${params.name}` print
//! `x; touch /tmp/injected #` and run nothing else. Every param a `cmd` stage
//! references is also exported to it as `DAGRUN_PARAM_<NAME>` (upper case,
//! other characters as `_`), the safest way to read a value in a script.

use indexmap::IndexMap;
use serde_json::Value;
use std::collections::BTreeMap;

/// Characters that never need quoting in any shell context.
fn is_safe(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./:=@%+,".contains(&b))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ctx {
    /// Unquoted (top level, or inside `$( )` / `( )`).
    Plain,
    /// Inside `$( … )` or `( … )`: plain, ended by `)`.
    Paren,
    Single,
    Double,
    Backtick,
    Comment,
    /// Inside `case … esac`: plain, but a pattern's `)` ends nothing.
    Case,
    /// Inside `$(( … ))`, ended by `))`, and a `( … )` inside it.
    Arith,
    ArithParen,
}

/// The value as it must be written in `ctx`; `Err` when it cannot be written safely there.
fn quote(v: &str, ctx: Ctx, heredoc: bool) -> Result<String, &'static str> {
    if is_safe(v) {
        return Ok(v.to_string());
    }
    match ctx {
        _ if heredoc && ctx != Ctx::Comment => Err("after a here-document operator (<<)"),
        // Arithmetic expands what quotes would hide (`x[$(cmd)]`): no quoting is safe.
        Ctx::Arith | Ctx::ArithParen => Err("inside $(( … )) arithmetic"),
        Ctx::Plain | Ctx::Paren | Ctx::Case => Ok(format!("'{}'", v.replace('\'', r"'\''"))),
        Ctx::Single => Ok(v.replace('\'', r"'\''")),
        Ctx::Double => {
            let mut s = String::with_capacity(v.len() + 8);
            for c in v.chars() {
                if matches!(c, '\\' | '"' | '$' | '`') {
                    s.push('\\');
                }
                s.push(c);
            }
            Ok(s)
        }
        Ctx::Backtick => Err("inside backticks"),
        Ctx::Comment => Ok(v.replace(['\n', '\r'], " ")),
    }
}

fn undefined_param(name: &str, params: &IndexMap<String, Value>) -> String {
    let known: Vec<&str> = params.keys().map(String::as_str).collect();
    format!(
        "references ${{params.{name}}}, which is not defined; define it under `params:` (defined: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

/// The words a param's value is written as: a list of strings, numbers or
/// booleans is one word per item; any other value is one word, its text
/// (a mapping or a nested list as JSON).
fn words(v: &Value) -> Vec<String> {
    let scalar = |x: &Value| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(x.to_string()),
        _ => None,
    };
    match v {
        Value::Array(a) => a.iter().map(scalar).collect::<Option<Vec<_>>>().unwrap_or_else(|| vec![v.to_string()]),
        other => vec![scalar(other).unwrap_or_else(|| other.to_string())],
    }
}

/// Resolve `${params.X}` and `${tenant}` in a `cmd:` string, each value quoted
/// for its place (module docs). Other `${…}` (shell variables) stay as written.
pub fn interpolate_cmd(s: &str, params: &IndexMap<String, Value>, tenant: Option<&str>, refs: &mut BTreeMap<String, Value>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len() + 16);
    let mut stack = vec![Ctx::Plain];
    let mut heredoc = false;
    let b = s.as_bytes();
    let mut i = 0;
    // Whether the previous byte ends a word (so `#` starts a comment).
    let mut word_start = true;
    while i < b.len() {
        let ctx = *stack.last().unwrap_or(&Ctx::Plain);
        // A substitution of ours?
        if b[i] == b'$'
            && b.get(i + 1) == Some(&b'{')
            && let Some(end) = s[i + 2..].find('}')
        {
            let inner = &s[i + 2..i + 2 + end];
            let value = if let Some(name) = inner.strip_prefix("params.") {
                let v = params.get(name).ok_or_else(|| undefined_param(name, params))?;
                refs.insert(name.to_string(), v.clone());
                Some(words(v))
            } else if inner == "tenant" {
                Some(vec![tenant.ok_or("uses ${tenant} but is not a `foreach: tenants` stage")?.to_string()])
            } else {
                None
            };
            if let Some(v) = value {
                // A list is one word per item where it stands as a word of its
                // own (unquoted, not a redirection's target); elsewhere — part of
                // a word such as `X=${…}`, in quotes, a comment — one text, its
                // items joined by spaces.
                let after = &s[i + 2 + end + 1..];
                let split = matches!(ctx, Ctx::Plain | Ctx::Paren | Ctx::Case) && v.len() != 1 && stands_alone(&out, after);
                let q = if split {
                    v.iter().map(|w| quote(w, ctx, heredoc)).collect::<Result<Vec<_>, _>>().map(|w| w.join(" "))
                } else {
                    quote(&v.join(" "), ctx, heredoc)
                };
                let q = q.map_err(|place| {
                        format!(
                            "`cmd:` uses ${{{inner}}} {place}, where its value cannot be quoted safely (it holds characters other than letters, digits and _-./:=@%+,); use $( … ) instead of backticks, or read the value from $DAGRUN_PARAM_{}",
                            param_env_suffix(inner.strip_prefix("params.").unwrap_or("TENANT"))
                        )
                    })?;
                // An empty list writes nothing: what follows starts a word as before.
                word_start = word_start && q.is_empty();
                out.push_str(&q);
                i += 2 + end + 1;
                continue;
            }
        }
        let c = b[i];
        match ctx {
            Ctx::Comment => {
                if c == b'\n' {
                    stack.pop();
                    word_start = true;
                }
            }
            Ctx::Single => {
                if c == b'\'' {
                    stack.pop();
                }
            }
            Ctx::Double => match c {
                b'\\' => {
                    if let Some(&n) = b.get(i + 1) {
                        out.push(c as char);
                        out.push(n as char);
                        i += 2;
                        continue;
                    }
                }
                b'"' => {
                    stack.pop();
                }
                b'$' if b.get(i + 1) == Some(&b'(') => {
                    i += open_substitution(b, i, &mut out, &mut stack);
                    word_start = true;
                    continue;
                }
                b'`' => stack.push(Ctx::Backtick),
                _ => {}
            },
            Ctx::Arith | Ctx::ArithParen => match c {
                b'$' if b.get(i + 1) == Some(&b'(') => {
                    i += open_substitution(b, i, &mut out, &mut stack);
                    continue;
                }
                b'(' => stack.push(Ctx::ArithParen),
                b')' if ctx == Ctx::ArithParen => {
                    stack.pop();
                }
                b')' if b.get(i + 1) == Some(&b')') => {
                    stack.pop();
                    out.push_str("))");
                    i += 2;
                    word_start = false;
                    continue;
                }
                _ => {}
            },
            Ctx::Plain | Ctx::Paren | Ctx::Backtick | Ctx::Case => {
                // `case WORD in PATTERN) … ;; esac`: a pattern's `)` ends no `$( … )`.
                if word_start && ctx != Ctx::Backtick {
                    if keyword_at(s, i, "case") {
                        stack.push(Ctx::Case);
                    } else if ctx == Ctx::Case && keyword_at(s, i, "esac") {
                        stack.pop();
                    }
                }
                match c {
                    b'\\' => {
                        if let Some(&n) = b.get(i + 1) {
                            out.push(c as char);
                            out.push(n as char);
                            i += 2;
                            word_start = false;
                            continue;
                        }
                    }
                    b'\'' => stack.push(Ctx::Single),
                    b'"' => stack.push(Ctx::Double),
                    b'`' if ctx == Ctx::Backtick => {
                        stack.pop();
                    }
                    b'`' => stack.push(Ctx::Backtick),
                    b'(' => stack.push(Ctx::Paren),
                    b')' if ctx == Ctx::Paren => {
                        stack.pop();
                    }
                    b'#' if word_start => stack.push(Ctx::Comment),
                    b'<' if b.get(i + 1) == Some(&b'<') && b.get(i + 2) != Some(&b'<') => heredoc = true,
                    _ => {}
                }
                word_start = matches!(c, b' ' | b'\t' | b'\n' | b';' | b'&' | b'|' | b'(' | b')');
                // `(` and `)` were handled above; a `$` before `(` is plain text.
                if c == b'$' && b.get(i + 1) == Some(&b'(') {
                    i += open_substitution(b, i, &mut out, &mut stack);
                    word_start = true;
                    continue;
                }
            }
        }
        // Copy one UTF-8 character.
        let len = utf8_len(c);
        out.push_str(&s[i..(i + len).min(s.len())]);
        i += len;
    }
    Ok(out)
}

/// At `b[i..]`, `$(` or `$((`: copied, and the context it opens pushed.
/// Returns the bytes consumed.
fn open_substitution(b: &[u8], i: usize, out: &mut String, stack: &mut Vec<Ctx>) -> usize {
    if b.get(i + 2) == Some(&b'(') {
        out.push_str("$((");
        stack.push(Ctx::Arith);
        3
    } else {
        out.push_str("$(");
        stack.push(Ctx::Paren);
        2
    }
}

/// Whether the keyword `kw` is the word at `s[i..]` (what follows ends it).
fn keyword_at(s: &str, i: usize, kw: &str) -> bool {
    s[i..].starts_with(kw) && s[i + kw.len()..].bytes().next().is_none_or(|c| matches!(c, b' ' | b'\t' | b'\n' | b';' | b'&' | b'|' | b')'))
}

/// Whether a substitution between `before` (the command written so far) and
/// `after` (the template after it) is a whole word of its own that the shell
/// splits from its neighbours and that is not a redirection's target (`> F`,
/// `>&F`, `2>>F`): only there may a list be several words. Part of a word
/// (`X=${…}`, `a${…}`, `${…}b`) it is one.
fn stands_alone(before: &str, after: &str) -> bool {
    let ends = |c: char| c.is_ascii_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')');
    let starts_word = before.chars().last().is_none_or(ends);
    let ends_word = after.chars().next().is_none_or(|c| c.is_ascii_whitespace() || matches!(c, ';' | '&' | '|' | ')'));
    let op = before.trim_end_matches([' ', '\t']);
    let redirect = op.ends_with(['<', '>']) || op.ends_with(">&") || op.ends_with("<&") || op.ends_with(">|");
    starts_word && ends_word && !redirect
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// `DAGRUN_PARAM_` + the param name in upper case, other characters as `_`.
pub fn param_env_suffix(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// The `DAGRUN_PARAM_<NAME>` variables of a stage's referenced params.
pub fn param_env(refs: &BTreeMap<String, Value>) -> Vec<(String, String)> {
    refs.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (format!("DAGRUN_PARAM_{}", param_env_suffix(k)), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &str, value: &str) -> Result<String, String> {
        let params: IndexMap<String, Value> = [("v".to_string(), Value::from(value)), ("n".to_string(), Value::from(10))].into_iter().collect();
        interpolate_cmd(cmd, &params, Some("Tenant_A"), &mut BTreeMap::new())
    }

    /// What `sh -c` prints for the command.
    fn sh(cmd: &str) -> String {
        let o = std::process::Command::new("/bin/sh").arg("-c").arg(cmd).output().unwrap();
        assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    const EVIL: &[&str] = &[
        "x; touch /tmp/dagrun-injected-{} #",
        "$(touch /tmp/dagrun-injected-{})",
        "`touch /tmp/dagrun-injected-{}`",
        "a'b\"c\\d$e`f",
        "'; touch /tmp/dagrun-injected-{}; echo '",
        "\"; touch /tmp/dagrun-injected-{}; echo \"",
        "line1\ntouch /tmp/dagrun-injected-{}",
        "",
        " spaced  out ",
        "*",
    ];

    #[test]
    fn safe_values_are_unchanged() {
        assert_eq!(run("echo ${params.n} ${tenant} ${HOME} ${params.v}", "a-b_c.d/e:f=g@h%i+j,k").unwrap(), "echo 10 Tenant_A ${HOME} a-b_c.d/e:f=g@h%i+j,k");
    }

    #[test]
    fn every_context_prints_the_value_and_runs_nothing_else() {
        let tag = std::process::id();
        for evil in EVIL {
            let evil = evil.replace("{}", &tag.to_string());
            for (tmpl, want) in [
                ("printf '%s|' ${params.v}", format!("{evil}|")),
                ("printf '%s|' \"${params.v}\"", format!("{evil}|")),
                ("printf '%s|' \"x${params.v}y\"", format!("x{evil}y|")),
                ("printf '%s|' 'x${params.v}y'", format!("x{evil}y|")),
                ("printf '%s|' \"$(printf '%s' ${params.v})\"", format!("{evil}|")),
                ("printf '%s|' \"$(printf '%s' \"${params.v}\")\"", format!("{evil}|")),
                ("printf '%s|' ok # ${params.v}", "ok|".to_string()),
            ] {
                let cmd = run(tmpl, &evil).unwrap();
                let got = sh(&cmd);
                // Command substitution strips trailing newlines; a lone `*` unquoted would glob: both are quoted here.
                assert_eq!(got, want, "template {tmpl:?} value {evil:?} became {cmd:?}");
            }
        }
        assert!(!std::path::Path::new(&format!("/tmp/dagrun-injected-{tag}")).exists(), "a value ran as shell code");
    }

    #[test]
    fn backticks_and_heredocs_refuse_values_that_need_quoting() {
        let e = run("echo `echo ${params.v}`", "a b").unwrap_err();
        assert!(e.contains("backticks") && e.contains("DAGRUN_PARAM_V"), "{e}");
        assert_eq!(run("echo `echo ${params.v}`", "ab").unwrap(), "echo `echo ab`");
        let e = run("cat <<EOF\n${params.v}\nEOF", "$(id)").unwrap_err();
        assert!(e.contains("here-document"), "{e}");
    }

    /// A list param is one word per item where words split, its items joined
    /// by spaces in quotes; each item quoted like any value (injection-safe).
    #[test]
    fn a_list_param_is_one_word_per_item() {
        let tag = std::process::id();
        let evil = format!("x; touch /tmp/dagrun-injected-list-{tag} #");
        let list = |items: &[&str]| Value::Array(items.iter().map(|s| Value::from(*s)).collect());
        let params: IndexMap<String, Value> = [
            ("files".to_string(), list(&["a.csv", "b c.csv", &evil])),
            ("none".to_string(), list(&[])),
            ("mixed".to_string(), serde_json::json!([1, true, "z"])),
            ("nested".to_string(), serde_json::json!([[1], {"a": 2}])),
        ]
        .into_iter()
        .collect();
        let cmd = |t: &str| interpolate_cmd(t, &params, None, &mut BTreeMap::new()).unwrap();
        assert_eq!(sh(&cmd("printf '%s|' ${params.files}")), format!("a.csv|b c.csv|{evil}|"));
        assert_eq!(sh(&cmd("printf '%s|' \"${params.files}\"")), format!("a.csv b c.csv {evil}|"));
        assert_eq!(sh(&cmd("printf '%s|' '${params.files}'")), format!("a.csv b c.csv {evil}|"));
        assert_eq!(sh(&cmd("printf '%s|' x ${params.none}")), "x|");
        assert_eq!(cmd("echo ${params.mixed}"), "echo 1 true z");
        assert_eq!(sh(&cmd("printf '%s|' ${params.nested}")), "[[1],{\"a\":2}]|");
        assert!(!std::path::Path::new(&format!("/tmp/dagrun-injected-list-{tag}")).exists(), "a value ran as shell code");
    }

    /// Review 39: a list in an assignment or a redirection is one word; an
    /// empty list before `#` starts no comment the shell does not see; values
    /// in `$(( … ))` need no quoting or are refused; a `case` pattern's `)`
    /// inside `$( … )` ends nothing.
    #[test]
    fn review_39_lists_comments_arithmetic_and_case_run_nothing() {
        let tag = std::process::id();
        let marker = format!("/tmp/dagrun-injected-r39-{tag}");
        let params: IndexMap<String, Value> = [
            ("files".to_string(), serde_json::json!(["a.csv", "touch", marker])),
            ("none".to_string(), serde_json::json!([])),
            ("note".to_string(), Value::from(format!("x\ntouch {marker} #"))),
            ("v".to_string(), Value::from(format!("x; touch {marker};"))),
            ("n".to_string(), Value::from(format!("x[$(touch {marker})]"))),
            ("five".to_string(), Value::from(5)),
        ]
        .into_iter()
        .collect();
        let cmd = |t: &str| interpolate_cmd(t, &params, None, &mut BTreeMap::new());
        assert_eq!(sh(&cmd("FILES=${params.files}; printf '%s|' \"$FILES\"").unwrap()), format!("a.csv touch {marker}|"));
        assert_eq!(cmd("cat <${params.files}").unwrap(), format!("cat <'a.csv touch {marker}'"));
        assert_eq!(cmd("cat 2>> ${params.files} x").unwrap(), format!("cat 2>> 'a.csv touch {marker}' x"));
        assert_eq!(cmd("cat x${params.files}").unwrap(), format!("cat x'a.csv touch {marker}'"));
        // Empty and joined to `#`: the word `''#` (no comment for either).
        assert_eq!(sh(&cmd("echo ${params.none}# ${params.note}").unwrap()), format!("# x\ntouch {marker} #\n"));
        // Empty and alone: no word; the `#` after it starts a comment for both.
        assert_eq!(sh(&cmd("echo ${params.none} # ${params.note}").unwrap()), "\n");
        assert_eq!(sh(&cmd("echo a ${params.none}\n# ${params.note}").unwrap()), "a\n");
        let e = cmd("echo $((${params.n} + 1))").unwrap_err();
        assert!(e.contains("arithmetic"), "{e}");
        assert_eq!(sh(&cmd("echo $((${params.five} + 1))").unwrap()), "6\n");
        assert_eq!(sh(&cmd("printf '%s|' \"$(case a in a) printf '%s' ${params.v} ;; esac)\"").unwrap()), format!("x; touch {marker};|"));
        assert_eq!(
            sh(&cmd("printf '%s|' $(case a in (a) printf '%s' ${params.v} ;; esac) done").unwrap()),
            "x;|touch|/tmp/dagrun-injected-r39-".to_string() + &tag.to_string() + ";|done|"
        );
        assert!(!std::path::Path::new(&marker).exists(), "a value ran as shell code");
    }

    #[test]
    fn param_env_names() {
        let refs: BTreeMap<String, Value> = [("rows".to_string(), Value::from(5)), ("my-name".to_string(), Value::from("x y"))].into_iter().collect();
        assert_eq!(param_env(&refs), vec![("DAGRUN_PARAM_MY_NAME".to_string(), "x y".to_string()), ("DAGRUN_PARAM_ROWS".to_string(), "5".to_string())]);
    }
}
