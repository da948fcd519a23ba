//! `dagrun dag PIPELINE`: the DAG as text, Graphviz DOT or Mermaid. Stage names
//! are quoted in the DOT form; Mermaid nodes are `n` and the stage's index
//! (one id per stage: a name mapped to an id could make `a-b` and `a_b` one
//! node), with the name as the label.

use crate::pipeline::Pipeline;

/// Output formats of `dagrun dag`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// The pipeline's DAG in `format`, stages in topological order.
pub fn render(p: &Pipeline, format: DagFormat) -> String {
    let mut s = String::new();
    match format {
        DagFormat::Text => {
            for &i in &p.topo {
                let st = &p.stages[i];
                let up: Vec<&str> = p.upstream(i).iter().map(|&u| p.stages[u].name.as_str()).collect();
                s.push_str(&format!("{} ({})", st.name, st.kind.name()));
                if !up.is_empty() {
                    s.push_str(&format!(" ← {}", up.join(", ")));
                }
                s.push('\n');
            }
        }
        DagFormat::Dot => {
            s.push_str("digraph dagrun {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
            for &i in &p.topo {
                let st = &p.stages[i];
                s.push_str(&format!("  \"{}\" [label=\"{}\\n({})\"];\n", st.name, st.name, st.kind.name()));
            }
            for &i in &p.topo {
                for d in p.downstream(i) {
                    s.push_str(&format!("  \"{}\" -> \"{}\";\n", p.stages[i].name, p.stages[d].name));
                }
            }
            s.push_str("}\n");
        }
        DagFormat::Mermaid => {
            s.push_str("graph LR\n");
            for &i in &p.topo {
                let st = &p.stages[i];
                s.push_str(&format!("  n{i}[\"{} ({})\"]\n", st.name.replace('"', "'"), st.kind.name()));
            }
            for &i in &p.topo {
                for d in p.downstream(i) {
                    s.push_str(&format!("  n{i} --> n{d}\n"));
                }
            }
        }
    }
    s
}
