//! The YAML budget: the limits every pipeline and tenant file is held to
//! before anything is built from it.
//!
//! Rules:
//! - Depth and alias count are checked in one linear pass over the text
//!   before parsing ([`super::yaml_limits`]); then the number of values with
//!   aliases expanded is counted without storing them ([`MAX_YAML_NODES`]).
//! - Every error names the file, the line and column where known, and says
//!   how to fix it (exit 2).

use super::*;

/// Most YAML values a pipeline or tenant file may hold once anchors/aliases
/// are expanded. A 1 MiB file holds far fewer without aliases; past this it is
/// an alias bomb ("billion laughs"), refused before anything is built in memory.
pub const MAX_YAML_NODES: usize = 1_000_000;

pub(super) const TOO_MANY_NODES: &str = "the YAML expands to more than 1000000 values through anchors and aliases (an alias bomb?); use fewer aliases";

/// Counts YAML values (aliases expanded) without storing them.
pub(super) struct NodeBudget<'a>(&'a std::cell::Cell<usize>);

impl NodeBudget<'_> {
    fn tick<E: serde::de::Error>(&self) -> std::result::Result<(), E> {
        let n = self.0.get() + 1;
        self.0.set(n);
        if n > MAX_YAML_NODES { Err(E::custom(TOO_MANY_NODES)) } else { Ok(()) }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for NodeBudget<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NodeBudget<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_i128<E: serde::de::Error>(self, _: i128) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_u128<E: serde::de::Error>(self, _: u128) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<(), E> {
        self.tick()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        self.tick()?;
        while seq.next_element_seed(NodeBudget(self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        self.tick()?;
        while map.next_key_seed(NodeBudget(self.0))?.is_some() {
            map.next_value_seed(NodeBudget(self.0))?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> std::result::Result<(), A::Error> {
        use serde::de::VariantAccess;
        self.tick()?;
        let ((), v) = data.variant_seed(NodeBudget(self.0))?;
        v.newtype_variant_seed(NodeBudget(self.0))
    }
}

/// Whether [`check_yaml_budget`] could refuse `text`: only through aliases.
/// A text without a `*` byte has no alias, and without aliases every value
/// is written out: a scalar takes at least one byte, an empty value (`key:`,
/// `- `) or a block collection stands on an indicator (`:`, `-`, `?`, `,`)
/// or an indentation byte; counted generously, at most 4 values per byte.
/// Such a text under [`MAX_YAML_NODES`] / 4 bytes (256 KiB) stays within the
/// budget, and its second parse (half of loading a 200-stage pipeline's
/// YAML) is skipped.
pub fn yaml_budget_can_be_exceeded(text: &str) -> bool {
    text.contains('*') || text.len() >= MAX_YAML_NODES / 4
}

/// Refuse YAML that expands (through aliases) to more than [`MAX_YAML_NODES`]
/// values, before deserializing it for real. Costs no memory per value.
pub fn check_yaml_budget(text: &str) -> std::result::Result<(), yaml_serde::Error> {
    let count = std::cell::Cell::new(0);
    serde::de::DeserializeSeed::deserialize(NodeBudget(&count), yaml_serde::Deserializer::from_str(text))
}

/// yaml_serde's terse limit errors, explained, and without the values the
/// file holds (see [`without_values`]).
pub fn explain_yaml_message(msg: &str) -> String {
    without_values(msg).replacen("recursion limit exceeded", "recursion limit exceeded (the YAML is nested too deeply)", 1).replacen(
        "repetition limit exceeded",
        "repetition limit exceeded (anchors and aliases expand to too much data: an alias bomb?); use fewer aliases",
        1,
    )
}

/// A YAML error message with the values it quotes left out: serde writes the
/// offending value into its message (``invalid type: string "…"``,
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
    out
}

/// `text`'s YAML error as `FILE:LINE:COL: message`. A key written twice is
/// placed on its second occurrence (the parser reports the mapping's start).
pub(super) fn yaml_error(shown: &str, text: &str, e: &yaml_serde::Error) -> anyhow::Error {
    let msg = explain_yaml_message(&e.to_string());
    match e.location() {
        Some(loc) => {
            let clean = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            let (line, column) = second_key(text, &clean, loc.line(), loc.column()).unwrap_or((loc.line(), loc.column()));
            config(format!("{shown}:{line}:{column}: {clean}"))
        }
        None => config(format!("{shown}: {msg}")),
    }
}

/// Where the key that `msg` (``… `KEY` is written twice …``) names appears
/// the second time in the block mapping that starts at `line`:`column`
/// (1-based): lines indented as the mapping's first key, until the mapping
/// ends. None for a flow mapping (`{a: 1, a: 2}`) or anything unexpected.
fn second_key(text: &str, msg: &str, line: usize, column: usize) -> Option<(usize, usize)> {
    let key = msg.split_once('`')?.1.split_once("` is written twice")?.0;
    let indent = column.checked_sub(1)?;
    let mut seen = 0;
    for (i, l) in text.lines().enumerate().skip(line.checked_sub(1)?) {
        let body = l.trim_start_matches(' ');
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let at = l.len() - body.len();
        if at < indent {
            return None;
        }
        if at > indent {
            continue;
        }
        let written = [key.to_string(), format!("\"{key}\""), format!("'{key}'")];
        if written.iter().any(|w| body.strip_prefix(w.as_str()).is_some_and(|r| r.trim_start().starts_with(':'))) {
            seen += 1;
            if seen == 2 {
                return Some((i + 1, column));
            }
        }
    }
    None
}

/// Depth and alias limits, checked in linear time before any parsing
/// ([`yaml_limits`]); the error names the file and line.
pub fn check_yaml_limits(text: &str, shown: &str) -> Result<()> {
    yaml_limits::check(text).map_err(|(line, m)| config(format!("{shown}:{line}: {m}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn messages_keep_kinds_and_key_names_but_not_values() {
        use super::without_values as w;
        assert_eq!(
            w("invalid type: string \"Customer_ID,Email 1,jane.doe@example.com\", expected struct PipelineFile"),
            "invalid type: string (40 characters), expected struct PipelineFile"
        );
        assert_eq!(w(r#"invalid type: string "a\"b\\c", expected u64"#), "invalid type: string (5 characters), expected u64");
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

    use super::*;

    #[test]
    fn a_key_written_twice_is_placed_on_its_second_occurrence() {
        let msg = "stages: `a` is written twice in one mapping (YAML would keep only the last one); rename or remove one of them";
        let text = "stages:\n  a:\n    cmd: x\n  # a: no\n  b: {cmd: y}\n  \"a\" :\n    cmd: z\n";
        assert_eq!(second_key(text, msg, 2, 3), Some((6, 3)));
        assert_eq!(second_key("stages: {a: 1, a: 2}\n", msg, 1, 9), None);
        assert_eq!(second_key("x:\n  a: 1\ny:\n  a: 2\n", msg, 2, 3), None);
    }

    fn values(text: &str) -> usize {
        let count = std::cell::Cell::new(0);
        serde::de::DeserializeSeed::deserialize(NodeBudget(&count), yaml_serde::Deserializer::from_str(text)).unwrap();
        count.get()
    }

    #[test]
    fn without_aliases_a_text_holds_at_most_four_values_per_byte() {
        // The densest forms: empty values, empty keys, compact nested lists, flow collections.
        let dense = [
            "a:\n".repeat(500),
            "-\n".repeat(500),
            format!("[{}]", "a,".repeat(500)),
            format!("{{{}}}", "a,".repeat(500)),
            format!("[{}]", "[],".repeat(500)),
            format!("[{}]", "{},".repeat(500)),
            "- - - - - - - - - - x\n".repeat(50),
            "? a\n".repeat(500),
            "a: {b: [c, {d: }]}\n".repeat(100),
            "a:\n b:\n  c:\n   d:\n".repeat(100),
            String::new(),
        ];
        for t in &dense {
            assert!(values(t) <= 4 * t.len().max(1), "{} values in {} bytes: {:?}", values(t), t.len(), &t[..t.len().min(40)]);
        }
        // Only aliases (or a text of a quarter of the budget in bytes) need the counting pass.
        assert!(!yaml_budget_can_be_exceeded(&"a: {b: [c, {d: }]}\n".repeat(1000)));
        assert!(yaml_budget_can_be_exceeded("a: &x [1]\nb: *x\n"));
        assert!(yaml_budget_can_be_exceeded(&"a:\n".repeat(MAX_YAML_NODES / 12 + 1)));
    }
}
