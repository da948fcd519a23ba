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
/// file holds (see [`crate::util::redact::without_values`]).
pub fn explain_yaml_message(msg: &str) -> String {
    crate::util::redact::without_values(msg).replacen("recursion limit exceeded", "recursion limit exceeded (the YAML is nested too deeply)", 1).replacen(
        "repetition limit exceeded",
        "repetition limit exceeded (anchors and aliases expand to too much data: an alias bomb?); use fewer aliases",
        1,
    )
}

/// `text`'s YAML error as `FILE:LINE:COL: message`. A key written twice is
/// placed on its second occurrence (the parser reports the mapping's start).
pub(super) fn yaml_error(shown: &str, text: &str, e: &yaml_serde::Error) -> anyhow::Error {
    let msg = explain_yaml_message(&e.to_string());
    match e.location() {
        Some(loc) => {
            let clean = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            let (line, column) = second_key(text, &clean, loc.line(), loc.column()).unwrap_or((loc.line(), loc.column()));
            let hint = flow_hint(text, line);
            config(format!("{shown}:{line}:{column}: {clean}{hint}"))
        }
        None => config(format!("{shown}: {msg}")),
    }
}

/// The fix for the most common flow-list mistake: `${…}` unquoted inside
/// `[ … ]` (`outs: [out/${tenant}.txt]`), where `{` opens a mapping.
fn flow_hint(text: &str, line: usize) -> &'static str {
    let Some(l) = line.checked_sub(1).and_then(|i| text.lines().nth(i)) else { return "" };
    match (l.find('['), l.find("${")) {
        (Some(b), Some(d)) if b < d => {
            "; inside `[ … ]` a value with `${…}` must be quoted (`outs: ['out/${tenant}.txt']`), or write the list one `- item` per line"
        }
        _ => "",
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
