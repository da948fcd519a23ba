//! Prometheus text exposition format (version 0.0.4), as read by
//! node_exporter's textfile collector and checked by `promtool check metrics`.
//!
//! Rules: one `# HELP` and one `# TYPE` line per metric family, before its
//! samples, each family written once; label values escaped (`\\`, `\"`,
//! `\n`); samples of one family with distinct label sets; values are
//! finite numbers, `NaN`, `+Inf` or `-Inf`.

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

    #[test]
    fn special_values_and_names() {
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(-0.5), "-0.5");
        assert_eq!(value(1e-7), "0.0000001");
        assert!(valid_name("dagrun_run_status") && !valid_name("9x") && !valid_name("a-b"));
    }
}
