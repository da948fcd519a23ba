//! `dagrun dag PIPELINE`: the DAG as text, Graphviz DOT or Mermaid. Stage names
//! are quoted or mapped to safe node ids in the DOT and Mermaid forms.

use crate::pipeline::Pipeline;

/// Output formats of `dagrun dag`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// A Mermaid node id: the name with every non-alphanumeric character as `_`.
fn node_id(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
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
                s.push_str(&format!("  {}[\"{} ({})\"]\n", node_id(&st.name), st.name.replace('"', "'"), st.kind.name()));
            }
            for &i in &p.topo {
                for d in p.downstream(i) {
                    s.push_str(&format!("  {} --> {}\n", node_id(&p.stages[i].name), node_id(&p.stages[d].name)));
                }
            }
        }
    }
    s
}
