//! Lineage: the chain of executions that produced an artifact, back to its
//! source files, read from the per-stage state records.
//!
//! Rules:
//! - The tree is made of [`LineageNode`]s; `dagrun lineage --json` prints it
//!   as is, so the JSON shape is a stable interface: the fields of each node
//!   struct are declared in the alphabetical order the JSON has always had
//!   (see the test `json_shape_is_unchanged`), and fields are only added.
//! - A stage appears once, in full, where it is first reached; later
//!   references to its outputs are leaves (`source: false`, no `stage`).
//! - A `cmd` stage's command is shown with its credential-shaped parts
//!   masked (`util::redact::credentials_in_command`), beside the blake3 of the
//!   exact command (`cmd_blake3`, what the cache key was made with).

use super::state::{StageState, StateStore};
use crate::workspace::ContentHash;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// One artifact in a lineage tree.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum LineageNode {
    /// An output of a recorded stage, with the execution that produced it.
    Produced(Box<Produced>),
    /// A source file, or an output whose stage is shown above.
    Leaf(Leaf),
}

/// An output and the stage execution that produced it (JSON fields in
/// alphabetical order: see the module rules).
#[derive(Debug, Clone, Serialize)]
pub struct Produced {
    /// The command (`cmd` stages), credential-shaped parts masked.
    pub cmd: Option<String>,
    /// blake3 of the command as it ran (the cache key's ingredient).
    pub cmd_blake3: Option<String>,
    /// blake3 of the file as it is now (None: missing).
    pub current_hash: Option<String>,
    pub extras: BTreeMap<String, String>,
    pub finished_at: String,
    /// blake3 the stage recorded for the output.
    pub hash: ContentHash,
    pub inputs: Vec<LineageNode>,
    pub key: ContentHash,
    pub kind: String,
    pub kind_version: u32,
    /// The file differs from what the stage wrote.
    pub modified: bool,
    pub param_refs: BTreeMap<String, Value>,
    pub params: Map<String, Value>,
    pub path: String,
    pub run_id: String,
    pub sensitive: bool,
    /// Always false (kept in the JSON for scripts that test it).
    pub source: bool,
    pub stage: String,
}

/// A file with no stage shown at this place (JSON fields in alphabetical order).
#[derive(Debug, Clone, Serialize)]
pub struct Leaf {
    pub current_hash: Option<String>,
    /// The blake3 the consuming stage recorded for it.
    pub hash: Option<String>,
    /// Always empty (kept in the JSON for a uniform tree).
    pub inputs: Vec<LineageNode>,
    pub modified: bool,
    pub path: String,
    /// True for a source file (no stage produced it); false for an output
    /// whose producing stage appears above.
    pub source: bool,
}

/// Build the lineage tree of `path` (workspace-relative); None when no
/// recorded stage produced it.
pub fn trace(workspace: &Path, states: &StateStore, path: &str) -> Option<LineageNode> {
    let all = states.all();
    let by_out: HashMap<&str, &StageState> = all.iter().flat_map(|s| s.outputs.keys().map(move |k| (k.as_str(), s))).collect();
    if !by_out.contains_key(path) {
        return None;
    }
    let mut seen = HashSet::new();
    Some(node(workspace, &by_out, path, None, &mut seen))
}

/// The hash `path` has now: as an output (what a stage recorded), or as an
/// input (what a key was computed from: `hashing`, "Inputs").
fn current_hash(workspace: &Path, path: &str, as_input: bool) -> Option<String> {
    let memo = super::hashing::HashMemo::in_memory();
    let abs = workspace.join(path);
    if as_input {
        memo.hash_input(&abs, workspace).ok().flatten().map(|h| h.to_string())
    } else {
        memo.hash_path(&abs).ok().flatten().map(|h| h.hash.to_string())
    }
}

fn node(workspace: &Path, by_out: &HashMap<&str, &StageState>, path: &str, recorded: Option<&str>, seen: &mut HashSet<String>) -> LineageNode {
    match by_out.get(path) {
        Some(st) if seen.insert(st.stage.clone()) => {
            let cur = current_hash(workspace, path, false);
            let out = &st.outputs[path];
            let inputs: Vec<LineageNode> = st.ingredients.inputs.iter().map(|(p, h)| node(workspace, by_out, p, Some(h), seen)).collect();
            LineageNode::Produced(Box::new(Produced {
                cmd_blake3: st.ingredients.cmd.as_deref().map(|c| blake3::hash(c.as_bytes()).to_hex().to_string()),
                cmd: st.ingredients.cmd.as_deref().map(crate::util::redact::credentials_in_command),
                modified: cur.as_ref().is_some_and(|c| out.hash != *c),
                current_hash: cur,
                extras: st.ingredients.extras.clone(),
                finished_at: st.finished_at.clone(),
                hash: out.hash.clone(),
                inputs,
                key: st.key.clone(),
                kind: st.ingredients.kind.clone(),
                kind_version: st.ingredients.kind_version,
                param_refs: st.param_refs.iter().map(|(k, v)| (k.clone(), crate::util::redact::param_value(v))).collect(),
                params: st.ingredients.params.iter().map(|(k, v)| (k.clone(), crate::util::redact::param_value(v))).collect(),
                path: path.to_string(),
                run_id: st.run_id.clone(),
                sensitive: out.sensitive,
                source: false,
                stage: st.stage.clone(),
            }))
        }
        _ => {
            let cur = current_hash(workspace, path, by_out.get(path).is_none());
            LineageNode::Leaf(Leaf {
                modified: match (recorded, &cur) {
                    (Some(r), Some(c)) => r != c,
                    _ => false,
                },
                current_hash: cur,
                hash: recorded.map(str::to_string),
                inputs: vec![],
                path: path.to_string(),
                source: by_out.get(path).is_none(),
            })
        }
    }
}

/// Render a lineage tree as indented text.
pub fn render(n: &LineageNode) -> String {
    let mut s = String::new();
    render_into(n, 0, &mut s);
    s
}

fn short(h: Option<&str>) -> String {
    h.map(|h| h[..h.len().min(16)].to_string()).unwrap_or_else(|| "-".into())
}

/// Every recorded value is shown with its control characters escaped
/// (`util::escape_controls`): a path, a param or a command line (from a
/// `-p` value) must not move the cursor, retitle the terminal or forge a line.
fn render_into(n: &LineageNode, depth: usize, s: &mut String) {
    use crate::util::escape_controls as e;
    let pad = "  ".repeat(depth);
    let modified = |is: bool, current: &Option<String>| {
        if is { "  (modified since: now blake3 ".to_string() + &short(current.as_deref()) + ")" } else { String::new() }
    };
    fn pairs<V: std::fmt::Display>(m: &BTreeMap<String, V>) -> String {
        m.iter().map(|(k, x)| format!("{}={}", e(k), e(&x.to_string()))).collect::<Vec<String>>().join(", ")
    }
    match n {
        LineageNode::Produced(p) => {
            s.push_str(&format!("{pad}{}  blake3 {}{}\n", e(&p.path), short(Some(p.hash.as_ref())), modified(p.modified, &p.current_hash)));
            s.push_str(&format!("{pad}  ← stage {} (kind {} v{}), run {}, {}\n", e(&p.stage), e(&p.kind), p.kind_version, e(&p.run_id), e(&p.finished_at)));
            s.push_str(&format!("{pad}    key {}\n", p.key));
            if !p.param_refs.is_empty() {
                s.push_str(&format!("{pad}    params {}\n", pairs(&p.param_refs)));
            }
            if let Some(c) = &p.cmd {
                s.push_str(&format!("{pad}    cmd {}\n", e(c)));
            }
            if let Some(h) = &p.cmd_blake3 {
                s.push_str(&format!("{pad}    cmd blake3 {}\n", e(&h[..h.len().min(12)])));
            }
            if !p.extras.is_empty() {
                s.push_str(&format!("{pad}    {}\n", pairs(&p.extras)));
            }
            for i in &p.inputs {
                render_into(i, depth + 2, s);
            }
        }
        LineageNode::Leaf(l) => {
            let kind = if l.source { "source" } else { "see above" };
            s.push_str(&format!("{pad}{}  blake3 {}  ({kind}){}\n", e(&l.path), short(l.hash.as_deref()), modified(l.modified, &l.current_hash)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn h(c: char) -> ContentHash {
        ContentHash::parse(&c.to_string().repeat(64)).unwrap()
    }

    fn sample() -> LineageNode {
        let leaf = LineageNode::Leaf(Leaf {
            current_hash: Some("c".repeat(64)),
            hash: Some("b".repeat(64)),
            inputs: vec![],
            modified: true,
            path: "data/raw.csv".into(),
            source: true,
        });
        let mut params = Map::new();
        params.insert("rows".into(), json!(1000));
        params.insert("alpha".into(), json!(0.5));
        LineageNode::Produced(Box::new(Produced {
            cmd: None,
            cmd_blake3: None,
            current_hash: None,
            extras: [("model".to_string(), "x".to_string())].into(),
            finished_at: "2026-12-05T00:00:00.000Z".into(),
            hash: h('a'),
            inputs: vec![leaf],
            key: h('d'),
            kind: "train".into(),
            kind_version: 3,
            modified: false,
            param_refs: [("c".to_string(), json!("1.0"))].into(),
            params,
            path: "models/m.json".into(),
            run_id: "20261205-000000-000-abcd".into(),
            sensitive: false,
            source: false,
            stage: "train".into(),
        }))
    }

    /// The JSON the tree had when it was built with `json!` (keys sorted, the
    /// same values): the struct must print the same bytes.
    #[test]
    fn json_shape_is_unchanged() {
        let old = json!({
            "path": "models/m.json", "hash": "a".repeat(64), "current_hash": null, "modified": false, "sensitive": false,
            "source": false, "stage": "train", "kind": "train", "kind_version": 3, "key": "d".repeat(64),
            "run_id": "20261205-000000-000-abcd", "finished_at": "2026-12-05T00:00:00.000Z",
            "params": {"rows": 1000, "alpha": 0.5}, "param_refs": {"c": "1.0"}, "cmd": null, "cmd_blake3": null, "extras": {"model": "x"},
            "inputs": [json!({"path": "data/raw.csv", "hash": "b".repeat(64), "current_hash": "c".repeat(64), "modified": true, "source": true, "inputs": []})],
        });
        let n = sample();
        assert_eq!(serde_json::to_string_pretty(&n).unwrap(), serde_json::to_string_pretty(&old).unwrap());
        assert_eq!(serde_json::to_string(&n).unwrap(), serde_json::to_string(&old).unwrap());
    }

    #[test]
    fn text_names_stage_inputs_and_modification() {
        let t = render(&sample());
        assert!(
            t.starts_with("models/m.json  blake3 aaaaaaaaaaaaaaaa\n  ← stage train (kind train v3), run 20261205-000000-000-abcd, 2026-12-05T00:00:00.000Z\n"),
            "{t}"
        );
        assert!(t.contains("    params c=\"1.0\"\n"), "{t}");
        assert!(t.contains("    model=x\n"), "{t}");
        assert!(t.contains("    data/raw.csv  blake3 bbbbbbbbbbbbbbbb  (source)  (modified since: now blake3 cccccccccccccccc)\n"), "{t}");
    }

    /// Review 17: a `-p` value in a command line reached the terminal raw.
    #[test]
    fn text_shows_recorded_values_with_their_control_characters_escaped() {
        let mut n = sample();
        let LineageNode::Produced(p) = &mut n else { unreachable!() };
        p.cmd = Some("echo 'x\x1b]0;PWNED\x07\x1b[2K\rFORGED' > out.txt".into());
        p.path = "out\nforged  blake3 0000".into();
        p.extras.insert("k\x1b".into(), "v\r".into());
        if let LineageNode::Leaf(l) = &mut p.inputs[0] {
            l.path = "in\x1b[1A.csv".into();
        }
        let t = render(&n);
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert_eq!(t.lines().count(), 7, "one line per fact, none forged:\n{t}");
        assert!(t.contains("cmd echo 'x\\u{1b}]0;PWNED\\u{7}\\u{1b}[2K\\rFORGED' > out.txt\n"), "{t}");
        assert!(t.starts_with("out\\nforged  blake3 0000  blake3 aaaa"), "{t}");
    }
}
