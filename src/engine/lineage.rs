//! Lineage: the chain of executions that produced an artifact, back to its
//! source files, read from the per-stage state records.

use super::state::{StageState, StateStore};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Build the lineage tree of `path` (workspace-relative) as JSON.
///
/// Shape: `{path, hash, current_hash, modified, source, stage, kind,
/// kind_version, key, run_id, finished_at, params, param_refs, extras,
/// inputs: [<same shape>…]}`; a source file has `source: true` and no stage.
pub fn trace(workspace: &Path, states: &StateStore, path: &str) -> Option<Value> {
    let all = states.all();
    let by_out: HashMap<&str, &StageState> = all.iter().flat_map(|s| s.outputs.keys().map(move |k| (k.as_str(), s))).collect();
    if !by_out.contains_key(path) {
        return None;
    }
    let mut seen = HashSet::new();
    Some(node(workspace, &by_out, path, None, &mut seen))
}

fn current_hash(workspace: &Path, path: &str) -> Option<String> {
    let memo = super::hashing::HashMemo::in_memory();
    memo.hash_path(&workspace.join(path)).ok().flatten().map(|h| h.hash.to_string())
}

fn node(workspace: &Path, by_out: &HashMap<&str, &StageState>, path: &str, recorded: Option<&str>, seen: &mut HashSet<String>) -> Value {
    let cur = current_hash(workspace, path);
    match by_out.get(path) {
        Some(st) if seen.insert(st.stage.clone()) => {
            let out = &st.outputs[path];
            let inputs: Vec<Value> = st.ingredients.inputs.iter().map(|(p, h)| node(workspace, by_out, p, Some(h), seen)).collect();
            json!({
                "path": path,
                "hash": out.hash,
                "current_hash": cur,
                "modified": cur.as_ref().is_some_and(|c| out.hash != *c),
                "sensitive": out.sensitive,
                "source": false,
                "stage": st.stage,
                "kind": st.ingredients.kind,
                "kind_version": st.ingredients.kind_version,
                "key": st.key,
                "run_id": st.run_id,
                "finished_at": st.finished_at,
                "params": st.ingredients.params,
                "param_refs": st.param_refs,
                "cmd": st.ingredients.cmd,
                "extras": st.ingredients.extras,
                "inputs": inputs,
            })
        }
        _ => json!({
            "path": path,
            "hash": recorded,
            "current_hash": cur,
            "modified": match (recorded, &cur) { (Some(r), Some(c)) => r != c, _ => false },
            "source": by_out.get(path).is_none(),
            "inputs": [],
        }),
    }
}

/// Render a lineage tree as indented text.
pub fn render(v: &Value) -> String {
    let mut s = String::new();
    render_into(v, 0, &mut s);
    s
}

fn short(v: &Value) -> String {
    v.as_str().map(|h| h[..h.len().min(16)].to_string()).unwrap_or_else(|| "-".into())
}

fn render_into(v: &Value, depth: usize, s: &mut String) {
    let pad = "  ".repeat(depth);
    let path = v["path"].as_str().unwrap_or("?");
    let modified =
        if v["modified"].as_bool() == Some(true) { "  (modified since: now blake3 ".to_string() + &short(&v["current_hash"]) + ")" } else { String::new() };
    if v.get("stage").is_some() {
        s.push_str(&format!("{pad}{path}  blake3 {}{modified}\n", short(&v["hash"])));
        s.push_str(&format!(
            "{pad}  ← stage {} (kind {} v{}), run {}, {}\n",
            v["stage"].as_str().unwrap_or("?"),
            v["kind"].as_str().unwrap_or("?"),
            v["kind_version"],
            v["run_id"].as_str().unwrap_or("?"),
            v["finished_at"].as_str().unwrap_or("?")
        ));
        s.push_str(&format!("{pad}    key {}\n", v["key"].as_str().unwrap_or("?")));
        if let Some(m) = v["param_refs"].as_object().filter(|m| !m.is_empty()) {
            let ps: Vec<String> = m.iter().map(|(k, x)| format!("{k}={x}")).collect();
            s.push_str(&format!("{pad}    params {}\n", ps.join(", ")));
        }
        if let Some(c) = v["cmd"].as_str() {
            s.push_str(&format!("{pad}    cmd {c}\n"));
        }
        if let Some(m) = v["extras"].as_object().filter(|m| !m.is_empty()) {
            let ps: Vec<String> = m.iter().map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or(""))).collect();
            s.push_str(&format!("{pad}    {}\n", ps.join(", ")));
        }
        for i in v["inputs"].as_array().into_iter().flatten() {
            render_into(i, depth + 2, s);
        }
    } else {
        let kind = if v["source"].as_bool() == Some(true) { "source" } else { "see above" };
        s.push_str(&format!("{pad}{path}  blake3 {}  ({kind}){modified}\n", short(&v["hash"])));
    }
}
