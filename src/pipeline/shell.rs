//! Values substituted into a `cmd:` string are data, never shell code.
//!
//! # Rules
//! `${params.NAME}` and `${tenant}` in a `cmd:` are replaced so that **no
//! byte of a value that could mean anything to the shell enters the
//! command text**:
//! - a value of only `A-Z a-z 0-9 _ - . / : = @ % + ,` (no space, quote,
//!   `$`, backquote, bracket, `;`, `&`, `|`, `<`, `>`, `#`, `\`, `*`, `?`,
//!   `~`, line break) is inserted as is: it means the same in every place
//!   of a command, so ordinary commands and their cache keys are unchanged;
//! - any other value is replaced by a reference to the variable that holds
//!   it, `DAGRUN_PARAM_<NAME>` (`DAGRUN_TENANT`), set for the command: the
//!   shell expands it once and never reads the value as code. The form is
//!   chosen for the place the scanner below finds (`"${V}"` unquoted and in
//!   a comment, `${V}` inside `"…"`), so the command sees the exact value; where the scanner is wrong about the
//!   place (shell grammar is large: review 40 found eight such places in the
//!   quoting this replaced — here-document bodies, `${V:-"…"}`, `"…"` in
//!   backticks, `(` in `${V%(*}`, …), the value may come out with quotes
//!   around it or split, but it still never runs;
//! - refused at load time, with the fix (read `"$DAGRUN_PARAM_NAME"`), where
//!   a reference cannot give the exact value or something would read it as
//!   code (review 41): inside `'…'` (usually another program's code: `sh -c
//!   '…'`, awk, sed); inside `"…"` in a command handing text to another
//!   shell (`-c`, `eval`, `trap`); in a builtin's variable-name word (`read`,
//!   `unset`, `printf -v`, …); anywhere in a command using arithmetic bash
//!   evaluates values in (`((`, `$[`, `[[`, `let`, `declare`, `${V:N}`,
//!   `a[…]`, `${!V}`: bash, `/bin/sh` on some systems, runs `$(cmd)` in an
//!   array subscript); after a here-document operator (`<<`: a quoted
//!   delimiter expands nothing). Inside `$(( … ))` / `(( … ))` only a whole
//!   number stands (a name there is evaluated); a number written right
//!   before `<` or `>` is a reference too (else `2>f` names a descriptor);
//! - a list param (of strings, numbers or booleans) may stand only as words
//!   of its own (unquoted, between word breaks, not a redirection's target),
//!   one word per item (`cat ${params.files}` → `cat a.csv b.csv`; an empty
//!   list is no word), and each item must be a plain word as above; anywhere
//!   else, or with an item that is not, it is refused (review 39: after
//!   `FILES=` its second item ran as a command);
//! - two params whose names give the same variable (`a-b`, `a_b`) are
//!   refused where a reference to one is needed.
//!
//! So `-p 'name=x; touch /tmp/injected #'` makes `echo ${params.name}` run
//! `echo "${DAGRUN_PARAM_NAME}"`, which prints `x; touch /tmp/injected #`.

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

/// Where a value goes, beyond the scanner's context.
#[derive(Clone, Copy, Default)]
struct Place {
    /// After `<<` (a here-document).
    heredoc: bool,
    /// The command uses arithmetic bash evaluates variables in.
    arithmetic: bool,
    /// The command hands text to another shell (`-c`, `eval`, `trap`).
    handoff: bool,
    /// The word where a builtin takes a variable's name (`read`, `unset`,
    /// `printf -v`, …): bash evaluates a subscript in it.
    name: bool,
}

/// How a value is written in `ctx`: as is when it is a plain word (see
/// [`is_safe`]); else as a reference to `var`, the variable that holds it
/// (module rules). `Err` (the place) where no reference gives it exactly or
/// a shell or another program would read it as code.
fn write_value(v: &str, var: &str, ctx: Ctx, place: Place) -> Result<String, &'static str> {
    if matches!(ctx, Ctx::Arith | Ctx::ArithParen) {
        // A name there is evaluated (its variable's value, recursively): numbers only.
        let digits = v.strip_prefix('-').unwrap_or(v);
        return if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            Ok(v.to_string())
        } else {
            Err("inside arithmetic, where a name is evaluated: only a whole number may stand there")
        };
    }
    if is_safe(v) {
        return Ok(v.to_string());
    }
    if place.arithmetic {
        return Err(
            "in a command that uses arithmetic (`((`, `$[`, `[[`, `let`, `declare`, `${V:N}`, `a[…]`, `${!V}`: bash evaluates what a variable holds there)",
        );
    }
    if place.name {
        return Err("where a command takes a variable's name (`read`, `unset`, `printf -v`, `local`, `export`, …)");
    }
    match ctx {
        _ if place.heredoc && ctx != Ctx::Comment => Err("after a here-document operator (<<)"),
        Ctx::Single => Err("inside '…', text another program usually reads as its code (`sh -c '…'`, awk, sed, python: it would read the value as code)"),
        Ctx::Double if place.handoff => {
            Err("inside \"…\" in a command that hands text to another shell (`-c`, `eval`, `trap`: it would read the value as code)")
        }
        Ctx::Arith | Ctx::ArithParen => unreachable!("handled above"),
        Ctx::Double => Ok(format!("${{{var}}}")),
        Ctx::Plain | Ctx::Paren | Ctx::Case | Ctx::Backtick | Ctx::Comment => Ok(format!("\"${{{var}}}\"")),
    }
}

/// Whether the command uses a bash construct that evaluates what a variable
/// holds (arithmetic, an array subscript, a substring offset, indirection).
fn uses_arithmetic(s: &str) -> bool {
    if s.contains("((") || s.contains("$[") || s.contains("[[") || s.contains("${!") || ["let", "declare", "typeset"].iter().any(|w| has_word(s, w)) {
        return true;
    }
    let b = s.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    // `a[…]`: a subscript.
    if b.windows(2).any(|w| word(w[0]) && w[1] == b'[') {
        return true;
    }
    // `${NAME:…}` other than `:-`, `:=`, `:?`, `:+`: a substring, whose offsets are arithmetic.
    s.match_indices("${").any(|(k, _)| {
        let rest = &b[k + 2..];
        let n = rest.iter().take_while(|&&c| word(c)).count();
        n > 0 && rest.get(n) == Some(&b':') && !matches!(rest.get(n + 1), Some(b'-' | b'=' | b'?' | b'+'))
    })
}

/// Whether a word starting after `before` is where a builtin takes a
/// variable's name: after `read`, `unset`, `export`, `local`, `readonly`,
/// `declare`, `typeset`, `getopts`, `mapfile`, `readarray` (and their
/// options), or after `-v` (`printf -v`, `test -v`).
fn name_position(before: &str) -> bool {
    const NAMES: [&str; 10] = ["read", "unset", "export", "local", "readonly", "declare", "typeset", "getopts", "mapfile", "readarray"];
    if !before.ends_with([' ', '\t']) {
        return false;
    }
    for t in before.split([' ', '\t', '\n']).rev().filter(|t| !t.is_empty()).take(6) {
        if t == "-v" {
            return true;
        }
        if t.starts_with('-') {
            continue;
        }
        return NAMES.contains(&t.trim_start_matches([';', '&', '|', '(', '{']));
    }
    false
}

/// Whether the command hands text to another shell: `-c` (sh, bash, su),
/// `eval` or `trap`.
fn hands_off(s: &str) -> bool {
    has_word(s, "eval") || has_word(s, "trap") || s.split([' ', '\t', '\n']).any(|w| w == "-c")
}

fn undefined_param(name: &str, params: &IndexMap<String, Value>) -> String {
    let known: Vec<&str> = params.keys().map(String::as_str).collect();
    format!(
        "references ${{params.{name}}}, which is not defined; define it under `params:` (defined: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

/// A param's value as the command sees it: one text (a string, a number,
/// a boolean; a mapping as JSON), or a list's items (strings, numbers,
/// booleans; a list holding anything else is one text, its JSON).
enum Substituted {
    One(String),
    Items(Vec<String>),
}

fn substituted(v: &Value) -> Substituted {
    let scalar = |x: &Value| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(x.to_string()),
        _ => None,
    };
    match v {
        Value::Array(a) => a.iter().map(scalar).collect::<Option<Vec<_>>>().map_or_else(|| Substituted::One(v.to_string()), Substituted::Items),
        other => Substituted::One(scalar(other).unwrap_or_else(|| other.to_string())),
    }
}

/// Resolve `${params.X}` and `${tenant}` in a `cmd:` string (module rules);
/// other `${…}` (shell variables) stay as written. `passed` gets every
/// variable a value was written as a reference to, with the value: the
/// command text no longer holds those values, so they must enter the cache
/// key beside it (as the stage's environment, which they are).
pub fn interpolate_cmd(
    s: &str,
    params: &IndexMap<String, Value>,
    tenant: Option<&str>,
    refs: &mut BTreeMap<String, Value>,
    passed: &mut BTreeMap<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len() + 16);
    let mut stack = vec![Ctx::Plain];
    let mut heredoc = false;
    // Arithmetic anywhere (bash evaluates what a variable holds there), and
    // text handed to another shell.
    let arithmetic = uses_arithmetic(s);
    let handoff = hands_off(s);
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
                Some((substituted(v), format!("DAGRUN_PARAM_{}", param_env_suffix(name)), Some(name)))
            } else if inner == "tenant" {
                Some((Substituted::One(tenant.ok_or("uses ${tenant} but is not a `foreach: tenants` stage")?.to_string()), "DAGRUN_TENANT".to_string(), None))
            } else {
                None
            };
            if let Some((v, var, name)) = value {
                let after = &s[i + 2 + end + 1..];
                let q = match v {
                    Substituted::One(v) => {
                        if !is_safe(&v)
                            && let Some(name) = name
                            && let Some(other) = params.keys().find(|k| k.as_str() != name && param_env_suffix(k) == param_env_suffix(name))
                        {
                            return Err(format!(
                                "`cmd:` uses ${{{inner}}}, whose value is passed to the command in {var}, which param `{other}` would set too; rename one of them"
                            ));
                        }
                        let place = Place { heredoc, arithmetic, handoff, name: name_position(&out) };
                        // A number written just before `<` or `>` would be read as a file
                        // descriptor (`echo ${x}>f`, x=2: `echo 2>f`): its variable instead.
                        let fd = matches!(ctx, Ctx::Plain | Ctx::Paren | Ctx::Case)
                            && !v.is_empty()
                            && v.bytes().all(|c| c.is_ascii_digit())
                            && after.starts_with(['<', '>'])
                            && out.chars().next_back().is_none_or(|c| c.is_ascii_whitespace() || matches!(c, ';' | '&' | '|' | '('));
                        let w = if fd { Ok(format!("\"${{{var}}}\"")) } else { write_value(&v, &var, ctx, place) };
                        let w = w.map_err(|place| {
                            format!(
                                "`cmd:` uses ${{{inner}}} {place}, and its value may not stand there; read it from \"${var}\" instead (a value of letters, digits and _-./:=@%+, only may stand anywhere else)"
                            )
                        })?;
                        if w != v {
                            passed.insert(var.clone(), v);
                        }
                        w
                    }
                    Substituted::Items(items) => {
                        // Words of their own only, each a plain word (module rules).
                        if !(matches!(ctx, Ctx::Plain | Ctx::Paren | Ctx::Case) && !heredoc && stands_alone(&out, after)) {
                            return Err(format!(
                                "`cmd:` uses the list ${{{inner}}} where it is not a word of its own (part of a word such as `X=${{{inner}}}`, a redirection's target, inside quotes, a comment or a here-document); write it between spaces (`cat ${{{inner}}}`), or read \"${var}\" (its JSON)"
                            ));
                        }
                        if let Some((k, item)) = items.iter().enumerate().find(|(_, w)| !is_safe(w)) {
                            return Err(format!(
                                "`cmd:` uses the list ${{{inner}}}, whose item {} ({:?}) is not a plain word (letters, digits and _-./:=@%+, only); read the items from \"${var}\" (its JSON) instead",
                                k + 1,
                                crate::util::escape_controls(&item.chars().take(40).collect::<String>())
                            ));
                        }
                        items.join(" ")
                    }
                };
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
                    // `(( … ))`, bash's arithmetic command: as `$(( … ))`.
                    b'(' if word_start && b.get(i + 1) == Some(&b'(') => {
                        out.push_str("((");
                        stack.push(Ctx::Arith);
                        i += 2;
                        continue;
                    }
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

/// Whether `w` is a word of `s` (between non-word characters).
fn has_word(s: &str, w: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    s.match_indices(w).any(|(k, _)| !s[..k].chars().next_back().is_some_and(word) && !s[k + w.len()..].chars().next().is_some_and(word))
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

    /// The command for `tmpl` with `params`, and what `sh -c` prints for it
    /// with the stage's `DAGRUN_PARAM_*` set (as `stages/cmd.rs` sets them).
    fn run_with(tmpl: &str, params: &IndexMap<String, Value>) -> Result<(String, String), String> {
        let mut refs = BTreeMap::new();
        let cmd = interpolate_cmd(tmpl, params, Some("Tenant_A"), &mut refs, &mut BTreeMap::new())?;
        let o = std::process::Command::new("/bin/sh").arg("-c").arg(&cmd).env("DAGRUN_TENANT", "Tenant_A").envs(param_env(&refs)).output().unwrap();
        assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
        Ok((cmd.clone(), String::from_utf8(o.stdout).unwrap()))
    }

    fn one(name: &str, value: Value) -> IndexMap<String, Value> {
        [(name.to_string(), value), ("n".to_string(), Value::from(10))].into_iter().collect()
    }

    fn cmd_of(tmpl: &str, value: &str) -> Result<String, String> {
        interpolate_cmd(tmpl, &one("v", Value::from(value)), Some("Tenant_A"), &mut BTreeMap::new(), &mut BTreeMap::new())
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
        "}\"'$(touch /tmp/dagrun-injected-{})",
    ];

    #[test]
    fn safe_values_are_unchanged() {
        assert_eq!(
            cmd_of("echo ${params.n} ${tenant} ${HOME} ${params.v}", "a-b_c.d/e:f=g@h%i+j,k").unwrap(),
            "echo 10 Tenant_A ${HOME} a-b_c.d/e:f=g@h%i+j,k"
        );
    }

    /// Any other value never enters the command: it is a reference to its
    /// variable, in the form that gives the exact value in each place.
    #[test]
    fn every_context_prints_the_value_and_runs_nothing_else() {
        let tag = std::process::id();
        for evil in EVIL {
            let evil = evil.replace("{}", &tag.to_string());
            for (tmpl, want) in [
                ("printf '%s|' ${params.v}", format!("{evil}|")),
                ("printf '%s|' \"${params.v}\"", format!("{evil}|")),
                ("printf '%s|' \"x${params.v}y\"", format!("x{evil}y|")),
                ("printf '%s|' \"$(printf '%s' ${params.v})\"", format!("{evil}|")),
                ("printf '%s|' \"$(printf '%s' \"${params.v}\")\"", format!("{evil}|")),
                ("printf '%s|' ok # ${params.v}", "ok|".to_string()),
            ] {
                let (cmd, got) = run_with(tmpl, &one("v", Value::from(evil.as_str()))).unwrap();
                assert_eq!(got, want, "template {tmpl:?} value {evil:?} became {cmd:?}");
            }
        }
        assert!(!std::path::Path::new(&format!("/tmp/dagrun-injected-{tag}")).exists(), "a value ran as shell code");
    }

    /// Review 40: eight places where the earlier quoting (values written into
    /// the command, quoted for the place the scanner thought they were in)
    /// ran a value as code. With references, none does.
    #[test]
    fn review_40_places_run_nothing() {
        let tag = std::process::id();
        let mark = format!("/tmp/dagrun-injected-r40-{tag}");
        let evil = format!("$(touch {mark})");
        let templates = [
            "cat > /dev/null <<EOF\n# config for ${params.v}\nname = demo\nEOF",
            "echo \"$(echo host)\"#${params.v} > /dev/null",
            "echo \"hello ${NAME:-\"${params.v}\"}\" > /dev/null",
            "echo `echo \"${params.v}\"` > /dev/null",
            "echo \"$(printf '%s' lower case)\" ${params.v} > /dev/null",
            "N=\"a (b)\"; echo \"$(echo ${N%% (*})\" ${params.v} > /dev/null",
            "F=data/x.csv; echo \"${F#${params.v}}\" > /dev/null",
            "echo \"$(case a in a) echo ${params.v} ;; esac)\" > /dev/null",
        ];
        for t in templates {
            for v in [evil.clone(), format!("x; touch {mark};"), format!("x\ntouch {mark} #"), "'".to_string(), format!("}}\"'{evil}")] {
                match run_with(t, &one("v", Value::from(v.as_str()))) {
                    Ok((cmd, _)) => assert!(!cmd.contains(&mark), "{t:?} with {v:?} put the value in the command: {cmd}"),
                    Err(e) => assert!(e.contains("here-document"), "{t:?}: {e}"),
                }
                assert!(!std::path::Path::new(&mark).exists(), "{t:?} with {v:?} ran the value");
            }
        }
    }

    /// Review 41: text in `'…'` is usually another program's code (`sh -c
    /// '…'`, awk, sed, python), as is `"…"` in a command handing text to
    /// another shell; a builtin's variable-name word and bash's arithmetic
    /// places evaluate what they get: values that are not plain words are
    /// refused there, with the fix. Plain words still go in.
    #[test]
    fn review_41_places_refuse_values_that_are_not_plain_words() {
        for (t, place) in [
            ("sh -c 'echo ${params.v}'", "inside '…'"),
            ("echo 'x${params.v}y'", "inside '…'"),
            ("sh -c \"echo ${params.v}\"", "hands text to another shell"),
            ("eval \"echo ${params.v}\"", "hands text to another shell"),
            ("trap \"echo ${params.v}\" EXIT", "hands text to another shell"),
            ("X=hello; echo ${X:${params.v}}", "arithmetic"),
            ("a[${params.v}]=1", "arithmetic"),
            ("N=${params.v}; echo ${!N}", "arithmetic"),
            ("printf -v ${params.v} %s hi", "variable's name"),
            ("echo hi | read -r ${params.v}", "variable's name"),
            ("f() { local ${params.v}; }", "variable's name"),
        ] {
            let e = cmd_of(t, "a[$(id)]").unwrap_err();
            assert!(e.contains(place) && e.contains("DAGRUN_PARAM_V"), "{t}: {e}");
            assert!(cmd_of(t, "plain").is_ok(), "{t}");
        }
        // In arithmetic only a number: a name would be evaluated (its variable's value).
        assert_eq!(cmd_of("echo $((10 * ${params.v}))", "-3").unwrap(), "echo $((10 * -3))");
        let e = cmd_of("echo $((10 * ${params.v}))", "LABEL").unwrap_err();
        assert!(e.contains("only a whole number"), "{e}");
        let e = cmd_of("((x = ${params.v}))", "LABEL").unwrap_err();
        assert!(e.contains("only a whole number"), "{e}");
        // Ordinary commands are unaffected.
        assert_eq!(cmd_of("echo \"hello ${params.v}\" | wc -l", "Jane Doe").unwrap(), "echo \"hello ${DAGRUN_PARAM_V}\" | wc -l");
        assert_eq!(cmd_of("while read line; do echo ${params.v}; done", "a b").unwrap(), "while read line; do echo \"${DAGRUN_PARAM_V}\"; done");
    }

    #[test]
    fn heredocs_and_arithmetic_refuse_values_that_need_quoting() {
        let e = cmd_of("cat <<EOF\n${params.v}\nEOF", "$(id)").unwrap_err();
        assert!(e.contains("here-document") && e.contains("DAGRUN_PARAM_V"), "{e}");
        assert_eq!(cmd_of("cat <<EOF\n${params.v}\nEOF", "ab").unwrap(), "cat <<EOF\nab\nEOF");
        let e = cmd_of("echo $((${params.v} + 1))", "x[$(id)]").unwrap_err();
        assert!(e.contains("arithmetic"), "{e}");
        for t in ["echo $((1 + 1)) ${params.v}", "[[ ${params.v} -gt 1 ]] && echo", "let x=${params.v}", "echo $[${params.v}]"] {
            let e = cmd_of(t, "a[$(id)]").unwrap_err();
            assert!(e.contains("arithmetic"), "{t}: {e}");
        }
        assert_eq!(cmd_of("letter=${params.v}", "a b").unwrap(), "letter=\"${DAGRUN_PARAM_V}\"");
        assert_eq!(run_with("echo $((${params.n} + 1))", &one("v", Value::from("x"))).unwrap().1, "11\n");
    }

    /// A list is one word per item where it stands alone; each item a plain
    /// word; anywhere else refused (review 39: after `FILES=` its second item
    /// ran as a command).
    #[test]
    fn a_list_param_is_one_word_per_item_where_it_stands_alone() {
        let params: IndexMap<String, Value> = [
            ("files".to_string(), serde_json::json!(["a.csv", "b.csv", 3, true])),
            ("none".to_string(), serde_json::json!([])),
            ("spaced".to_string(), serde_json::json!(["a.csv", "b c.csv"])),
            ("nested".to_string(), serde_json::json!([[1], {"a": 2}])),
        ]
        .into_iter()
        .collect();
        let cmd = |t: &str| interpolate_cmd(t, &params, None, &mut BTreeMap::new(), &mut BTreeMap::new());
        assert_eq!(run_with("printf '%s|' ${params.files}", &params).unwrap().1, "a.csv|b.csv|3|true|");
        assert_eq!(run_with("printf '%s|' x ${params.none} y", &params).unwrap().1, "x|y|");
        assert_eq!(run_with("printf '%s|' $(echo ${params.files})", &params).unwrap().1, "a.csv|b.csv|3|true|");
        for t in [
            "FILES=${params.files}",
            "cat <${params.files}",
            "cat 2>> ${params.files}",
            "cat x${params.files}",
            "echo \"${params.files}\"",
            "echo '${params.files}'",
            "echo ok # ${params.files}",
        ] {
            let e = cmd(t).unwrap_err();
            assert!(e.contains("not a word of its own"), "{t}: {e}");
        }
        let e = cmd("cat ${params.spaced}").unwrap_err();
        assert!(e.contains("item 2 (\"b c.csv\") is not a plain word"), "{e}");
        // A list holding lists or mappings is one text, its JSON: a reference.
        assert_eq!(run_with("printf '%s|' ${params.nested}", &params).unwrap().1, "[[1],{\"a\":2}]|");
        // An empty list before `#`: what follows starts a word as before, for both.
        assert_eq!(run_with("echo a ${params.none} # b", &params).unwrap().1, "a\n");
    }

    #[test]
    fn two_params_that_share_a_variable_are_refused_where_a_reference_is_needed() {
        let params: IndexMap<String, Value> = [("a-b".to_string(), Value::from("x y")), ("a_b".to_string(), Value::from("z"))].into_iter().collect();
        let e = interpolate_cmd("echo ${params.a-b}", &params, None, &mut BTreeMap::new(), &mut BTreeMap::new()).unwrap_err();
        assert!(e.contains("DAGRUN_PARAM_A_B") && e.contains("`a_b`"), "{e}");
        assert_eq!(interpolate_cmd("echo ${params.a_b}", &params, None, &mut BTreeMap::new(), &mut BTreeMap::new()).unwrap(), "echo z");
    }

    /// Review 41: a number right before `<` or `>` is not a file descriptor.
    #[test]
    fn a_number_before_a_redirection_stays_a_word() {
        assert_eq!(cmd_of("echo ${params.v}>/dev/null", "2").unwrap(), "echo \"${DAGRUN_PARAM_V}\">/dev/null");
        assert_eq!(run_with("echo ${params.v}>&1", &one("v", Value::from("2"))).unwrap().1, "2\n");
        assert_eq!(cmd_of("echo ${params.v} >/dev/null", "2").unwrap(), "echo 2 >/dev/null");
        assert_eq!(cmd_of("echo a${params.v}>/dev/null", "2").unwrap(), "echo a2>/dev/null");
    }

    #[test]
    fn param_env_names() {
        let refs: BTreeMap<String, Value> = [("rows".to_string(), Value::from(5)), ("my-name".to_string(), Value::from("x y"))].into_iter().collect();
        assert_eq!(param_env(&refs), vec![("DAGRUN_PARAM_MY_NAME".to_string(), "x y".to_string()), ("DAGRUN_PARAM_ROWS".to_string(), "5".to_string())]);
    }
}
