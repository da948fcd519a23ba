//! Prometheus text exposition format (version 0.0.4), as read by
//! node_exporter's textfile collector and checked by `promtool check metrics`.
//!
//! Rules: one `# HELP` and one `# TYPE` line per metric family, before its
//! samples, each family written once; label values escaped (`\\`, `\"`,
//! `\n`); samples of one family with distinct label sets; values are
//! finite numbers, `NaN`, `+Inf` or `-Inf`. [`Exposition::parse`] reads back
//! exactly what [`Exposition::render`] writes (a file read back is untrusted:
//! anything else is refused, and the caller starts afresh).

use std::collections::BTreeMap;
use std::fmt::Write;

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

struct Family {
    help: String,
    kind: Kind,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

/// A set of metric families, written in the order they were first used.
#[derive(Default)]
pub struct Exposition {
    order: Vec<String>,
    families: BTreeMap<String, Family>,
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// A valid metric or label name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn valid_name(n: &str) -> bool {
    let mut cs = n.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':') && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Declare a family (idempotent) so it is written even with no samples.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name), "bad metric name {name}");
        if !self.families.contains_key(name) {
            self.order.push(name.to_string());
            self.families.insert(name.to_string(), Family { help: help.to_string(), kind, samples: Vec::new() });
        }
    }

    /// Add a sample to a declared family. A sample with the same label set
    /// as an earlier one replaces it.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let f = self.families.get_mut(name).unwrap_or_else(|| panic!("metric family {name} used before it was declared"));
        let labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(s) = f.samples.iter_mut().find(|(l, _)| *l == labels) {
            s.1 = v;
        } else {
            f.samples.push((labels, v));
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for name in &self.order {
            let f = &self.families[name];
            let kind = match f.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in &f.samples {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, lv)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(lv));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", value(*v));
            }
        }
        out
    }
}

impl Exposition {
    /// Every sample: family name, its kind and help, labels, value.
    pub fn samples(&self) -> impl Iterator<Item = (&str, Kind, &str, &[(String, String)], f64)> {
        self.order.iter().flat_map(move |name| {
            let f = &self.families[name];
            f.samples.iter().map(move |(l, v)| (name.as_str(), f.kind, f.help.as_str(), l.as_slice(), *v))
        })
    }

    /// Whether the family has a sample with exactly these labels.
    pub fn has_sample(&self, name: &str, labels: &[(String, String)]) -> bool {
        self.families.get(name).is_some_and(|f| f.samples.iter().any(|(l, _)| l == labels))
    }

    /// Read back text [`Exposition::render`] wrote: `# HELP`, `# TYPE`
    /// (gauge or counter) and sample lines only, each family declared before
    /// its samples; names checked, label values unescaped. `Err` names the
    /// first line that is not of that form.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::new();
        let mut help: BTreeMap<String, String> = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |why: &str| format!("line {}: {why}", n + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
                if !valid_name(name) {
                    return Err(bad("not a metric name"));
                }
                help.insert(name.to_string(), unescape_help(h));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| bad("a TYPE line without a type"))?;
                let kind = match kind {
                    "gauge" => Kind::Gauge,
                    "counter" => Kind::Counter,
                    _ => return Err(bad("a type other than gauge or counter")),
                };
                if !valid_name(name) {
                    return Err(bad("not a metric name"));
                }
                e.family(name, kind, help.get(name).map(String::as_str).unwrap_or(""));
            } else {
                let (name, labels, value) = parse_sample(line).ok_or_else(|| bad("not a sample line"))?;
                if !e.families.contains_key(&name) {
                    return Err(bad("a sample before its family's TYPE line"));
                }
                let f = e.families.get_mut(&name).expect("declared");
                if f.samples.iter().any(|(l, _)| *l == labels) {
                    return Err(bad("a second sample with the same labels"));
                }
                f.samples.push((labels, value));
            }
        }
        Ok(e)
    }
}

/// [`escape_help`] undone (`\\n` a line break, `\\\\` a backslash).
fn unescape_help(h: &str) -> String {
    let mut out = String::with_capacity(h.len());
    let mut cs = h.chars();
    while let Some(c) = cs.next() {
        match (c, c == '\\') {
            (_, true) => match cs.next() {
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

/// `name{k="v",…} value` or `name value`.
fn parse_sample(line: &str) -> Option<(String, Vec<(String, String)>, f64)> {
    let end = line.find(['{', ' '])?;
    let name = &line[..end];
    if !valid_name(name) {
        return None;
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let eq = r.find("=\"")?;
            let k = &r[..eq];
            if !valid_name(k) {
                return None;
            }
            let mut v = String::new();
            let mut chars = r[eq + 2..].char_indices();
            let close = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => v.push('\n'),
                        c @ ('\\' | '"') => v.push(c),
                        _ => return None,
                    },
                    (i, '"') => break eq + 2 + i,
                    (_, c) => v.push(c),
                }
            };
            labels.push((k.to_string(), v));
            r = &r[close + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
        rest = r;
    }
    let value = match rest.strip_prefix(' ')? {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().ok().filter(|x| x.is_finite())?,
    };
    Some((name.to_string(), labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_with_escaped_labels() {
        let mut e = Exposition::new();
        e.family("dagrun_x", Kind::Gauge, "An x.\nSecond line");
        e.sample("dagrun_x", &[("stage", "a\"b\\c\nd")], 1.5);
        e.sample("dagrun_x", &[("stage", "ok")], f64::NAN);
        e.sample("dagrun_x", &[("stage", "ok")], 2.0);
        e.family("dagrun_empty", Kind::Counter, "none");
        let t = e.render();
        assert_eq!(
            t,
            "# HELP dagrun_x An x.\\nSecond line\n# TYPE dagrun_x gauge\ndagrun_x{stage=\"a\\\"b\\\\c\\nd\"} 1.5\ndagrun_x{stage=\"ok\"} 2\n# HELP dagrun_empty none\n# TYPE dagrun_empty counter\n"
        );
    }

    /// What `render` writes, `parse` reads back as it was; anything else is refused.
    #[test]
    fn parse_reads_back_what_render_writes_and_nothing_else() {
        let mut e = Exposition::new();
        e.family("dagrun_x", Kind::Gauge, "An x.\nSecond \\ line");
        e.sample("dagrun_x", &[("pipeline", "p\"q\\r\ns"), ("stage", "a,b}")], 1.5);
        e.sample("dagrun_x", &[], f64::INFINITY);
        e.family("dagrun_c", Kind::Counter, "c");
        e.sample("dagrun_c", &[("k", "")], 1e-7);
        let t = e.render();
        let back = Exposition::parse(&t).unwrap();
        assert_eq!(back.render(), t);
        assert!(back.has_sample("dagrun_x", &[("pipeline".into(), "p\"q\\r\ns".into()), ("stage".into(), "a,b}".into())]));
        for bad in [
            "dagrun_x 1\n",
            "# TYPE dagrun_x histogram\n",
            "# TYPE dagrun_x gauge\ndagrun_x{a=\"b} 1\n",
            "# TYPE dagrun_x gauge\ndagrun_x{a=\"b\"} one\n",
            "# TYPE dagrun_x gauge\ndagrun_x{a=\"b\"} 1\ndagrun_x{a=\"b\"} 2\n",
            "# TYPE 9x gauge\n",
            "hello\n",
        ] {
            assert!(Exposition::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn special_values_and_names() {
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(-0.5), "-0.5");
        assert_eq!(value(1e-7), "0.0000001");
        assert!(valid_name("dagrun_run_status") && !valid_name("9x") && !valid_name("a-b"));
    }
}
