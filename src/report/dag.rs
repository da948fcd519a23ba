//! The DAG picture: Graphviz `dot` when it is installed (the layout tool the
//! `dag --format dot` output is made for), else a built-in layered layout
//! drawn with plotters.
//!
//! Rules: node ids given to `dot` are numbers, labels are DOT-escaped
//! (backslash and quote), so no stage name can change the graph; `dot` gets
//! 20 s and its SVG is used only if it is a complete `<svg>…</svg>`; any
//! failure falls back to the built-in layout. The built-in layout puts each
//! stage in the column of its longest path from a source (left to right),
//! stages of a column in pipeline order.

use super::StatusColors;
use super::charts::{self, NodeBox};
use crate::engine::runs::Status;
use anyhow::Result;
use std::time::Duration;

/// Which layout to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `dot` when on PATH, else built-in.
    Auto,
    Dot,
    Builtin,
}

/// Draw the graph; returns the SVG and the name of the layout used.
pub fn draw(names: &[String], status: &[Option<Status>], edges: &[(usize, usize)], layout: Layout, colors: &StatusColors) -> Result<(String, &'static str)> {
    if layout != Layout::Builtin {
        match with_dot(names, status, edges, colors) {
            Ok(svg) => return Ok((svg, "Graphviz dot")),
            Err(err) if layout == Layout::Dot => return Err(err.context("--layout dot")),
            Err(err) => tracing::debug!("dot layout unavailable ({err:#}); using the built-in layout"),
        }
    }
    Ok((builtin(names, status, edges, colors)?, "built-in layered layout"))
}

fn dot_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\\' => "\\\\".to_string(),
            '"' => "\\\"".to_string(),
            c if c.is_control() => " ".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The DOT text of the graph (ids `n0`, `n1`, …).
pub fn dot_source(names: &[String], status: &[Option<Status>], edges: &[(usize, usize)], colors: &StatusColors) -> String {
    let mut s = String::from(
        "digraph dagrun {\n  rankdir=LR;\n  bgcolor=\"white\";\n  node [shape=box, style=\"rounded,filled\", fontname=\"sans-serif\", fontsize=11];\n  edge [color=\"#555555\"];\n",
    );
    for (i, n) in names.iter().enumerate() {
        let (fill, font) = match status[i] {
            Some(st) => (colors.hex(st), "white"),
            None => ("#ffffff".to_string(), "black"),
        };
        let what = status[i].map(|s| s.as_str()).unwrap_or("not in this run");
        s.push_str(&format!("  n{i} [label=\"{}\", tooltip=\"{} ({what})\", fillcolor=\"{fill}\", fontcolor=\"{font}\"];\n", dot_escape(n), dot_escape(n)));
    }
    for (a, b) in edges {
        s.push_str(&format!("  n{a} -> n{b};\n"));
    }
    s.push_str("}\n");
    s
}

fn with_dot(names: &[String], status: &[Option<Status>], edges: &[(usize, usize)], colors: &StatusColors) -> Result<String> {
    let src = dot_source(names, status, edges, colors);
    let mut dot = crate::util::child_env::tool("dot");
    dot.arg("-Tsvg");
    let out = crate::util::child_env::output_within(dot, src.as_bytes(), Duration::from_secs(20)).map_err(|e| anyhow::anyhow!("running Graphviz dot: {e}"))?;
    if !out.status.success() {
        anyhow::bail!("dot exited with {}", out.status);
    }
    let text = String::from_utf8(out.stdout)?;
    let start = text.find("<svg").ok_or_else(|| anyhow::anyhow!("dot wrote no <svg>"))?;
    let end = text.rfind("</svg>").ok_or_else(|| anyhow::anyhow!("dot's SVG is incomplete"))? + "</svg>".len();
    Ok(text[start..end].to_string())
}

/// Column of each node: its longest path from a source.
pub fn layers(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut layer = vec![0usize; n];
    // Bellman-style relaxation; the graph is acyclic, n rounds suffice.
    for _ in 0..n {
        let mut changed = false;
        for &(a, b) in edges {
            if a < n && b < n && layer[b] < layer[a] + 1 {
                layer[b] = layer[a] + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

fn builtin(names: &[String], status: &[Option<Status>], edges: &[(usize, usize)], colors: &StatusColors) -> Result<String> {
    let layer = layers(names.len(), edges);
    let w = names.iter().map(|s| s.chars().count()).max().unwrap_or(4) as i32 * 8 + 20;
    let (h, gap_x, gap_y, pad) = (30, 56, 12, 12);
    let mut row = vec![0i32; layer.iter().max().map(|m| m + 1).unwrap_or(1)];
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let l = layer[i];
        nodes.push(NodeBox { label: name.clone(), status: status[i], x: pad + l as i32 * (w + gap_x), y: pad + row[l] * (h + gap_y), w, h });
        row[l] += 1;
    }
    let width = pad * 2 + row.len() as i32 * (w + gap_x) - gap_x;
    let height = pad * 2 + row.iter().max().copied().unwrap_or(1) * (h + gap_y) - gap_y;
    charts::dag(&nodes, edges, width as u32, height as u32, colors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_longest_paths() {
        // a -> b -> d, a -> d, c alone
        assert_eq!(layers(4, &[(0, 1), (1, 3), (0, 3)]), vec![0, 1, 0, 2]);
    }

    #[test]
    fn dot_labels_cannot_break_out() {
        let names = vec!["a\" ]; x -> y; [\\".to_string()];
        let src = dot_source(&names, &[None], &[], &StatusColors);
        assert!(src.contains("label=\"a\\\" ]; x -> y; [\\\\\""), "{src}");
        assert!(!src.contains("\nx -> y"));
    }
}
