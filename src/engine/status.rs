//! `dagrun status` and `dagrun run --dry-run`: what would run, and exactly why,
//! without running anything or taking the lock.
//!
//! Stages are evaluated in dependency order. An upstream stage that would be
//! restored (or whose new key is in the action cache) has known outputs, so its
//! dependents are judged precisely; an upstream stage that must execute makes
//! its dependents' inputs unknown, and they are reported stale because of it.

use super::fingerprint::explain;
use super::state::Loaded;
use super::{Decision, Engine, InputHash};
use crate::workspace::ContentHash;
use anyhow::Result;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// Whether a stage is up to date (JSON: `"fresh"` / `"stale"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Fresh,
    Stale,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Stale => "stale",
        }
    }
}

/// What a run would do with a stage (JSON: `"none"`, `"restore"`, `"run"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Nothing: the stage is fresh.
    #[serde(rename = "none")]
    Nothing,
    /// Copy its outputs back from the cache.
    Restore,
    /// Execute it.
    Run,
}

/// One stage's status (the JSON shape is a stable interface).
#[derive(Debug, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub state: State,
    pub reasons: Vec<String>,
    /// What a run would do.
    pub action: Action,
}

/// Evaluate the selected stages.
pub fn status(engine: &Engine, selected: &HashSet<usize>) -> Result<Vec<StageStatus>> {
    let p = &engine.pipeline;
    // Output path -> predicted hash after a run (None: unknown until it runs),
    // for the outputs a run would rewrite; the others are read from disk, as
    // the run reads them (`hashing`, "Inputs").
    let mut predicted: HashMap<String, Option<ContentHash>> = HashMap::new();
    let mut out = Vec::new();
    // Stage index → its row in `out`.
    let mut row: HashMap<usize, usize> = HashMap::new();
    for &i in &p.topo {
        if !selected.contains(&i) {
            continue;
        }
        let s = engine.stage(i);
        let mut unknown_from: Vec<String> = Vec::new();
        let (prev, distrust) = match engine.states.load(&s.name) {
            Loaded::Valid(st) => (Some(st), None),
            Loaded::Missing => (None, None),
            Loaded::Invalid(e) => (None, Some(format!("{e}: a run recomputes it"))),
        };
        let eval = {
            let mut lookup = |dep: &str| -> Result<InputHash> {
                if let Some(pred) = predicted.get(dep) {
                    return Ok(match pred {
                        Some(h) => InputHash::Known(h.clone()),
                        None => {
                            let producer = p.producer_of(dep).map(|j| p.stages[j].name.clone()).unwrap_or_default();
                            let why = format!("upstream stage {producer} will rerun (its output {dep} may change)");
                            unknown_from.push(why.clone());
                            InputHash::Unknown(why)
                        }
                    });
                }
                // A dep inside an output a run would rewrite, or a folder dep
                // holding one, changes with it (the first by path is named).
                let nested = |o: &&String| crate::util::path_within(dep, o) || crate::util::path_within(o, dep);
                if let Some(o) = predicted.keys().filter(nested).min() {
                    let producer = p.producer_of(o).map(|j| p.stages[j].name.as_str()).unwrap_or_default();
                    let why = format!("upstream stage {producer} will rerun or restore (its output {o} may change {dep})");
                    unknown_from.push(why.clone());
                    return Ok(InputHash::Unknown(why));
                }
                let mut ms = Vec::new();
                match engine.hash_input(dep, &mut ms) {
                    Ok(h) => Ok(h),
                    Err(e) => Ok(InputHash::Unknown(format!("{e:#}"))),
                }
            };
            engine.ingredients(i, &mut lookup)
        };
        let (mut ing, unknown) = match eval {
            Ok(x) => x,
            Err(e) => {
                out.push(StageStatus { stage: s.name.clone(), state: State::Stale, reasons: vec![format!("cannot evaluate: {e:#}")], action: Action::Run });
                for o in &s.outs {
                    predicted.insert(o.path.clone(), None);
                }
                continue;
            }
        };
        let forced = engine.forced.contains(&i);
        let (state, reasons, action, outputs): (State, Vec<String>, Action, Option<HashMap<String, ContentHash>>) = if forced {
            (State::Stale, vec!["forced (--force)".into()], Action::Run, None)
        } else if !unknown.is_empty() {
            // Explain what else differs, with the unknown inputs as they were.
            let mut reasons = unknown.clone();
            if let Some(st) = &prev {
                for (k, v) in ing.inputs.iter_mut() {
                    if v.is_empty()
                        && let Some(old) = st.ingredients.inputs.get(k)
                    {
                        v.clone_from(old);
                    }
                }
                if ing.key() != st.key {
                    reasons.extend(explain(&st.ingredients, &ing, (&st.param_refs, &st.written), (&s.param_refs, &s.written), &|x| {
                        p.producer_of(x).map(|j| p.stages[j].name.clone())
                    }));
                }
            } else if let Some(why) = &distrust {
                reasons.push(why.clone());
            } else {
                reasons.push(engine.no_record_reason(&s.name));
            }
            reasons.dedup();
            let _ = &unknown_from;
            (State::Stale, reasons, Action::Run, None)
        } else {
            let ev = engine.evaluate_with(i, ing)?;
            match ev.decision {
                Decision::Fresh => (State::Fresh, vec![], Action::Nothing, None),
                Decision::Restore { reasons, from, .. } => {
                    let outs = Some(from.outputs.iter().map(|(k, v)| (k.clone(), v.hash.clone())).collect());
                    (State::Stale, reasons, Action::Restore, outs)
                }
                Decision::Run { reasons } => (State::Stale, reasons, Action::Run, None),
            }
        };
        if action != Action::Nothing {
            for o in &s.outs {
                predicted.insert(o.path.clone(), outputs.as_ref().and_then(|m| m.get(&o.path).cloned()));
            }
        }
        row.insert(i, out.len());
        out.push(StageStatus { stage: s.name.clone(), state, reasons, action });
    }
    regenerations(engine, &row, &mut out);
    Ok(out)
}

/// A stage that runs first regenerates the deleted sensitive outputs it
/// reads: their producer runs, though it is fresh (`decide.rs`,
/// `rematerialize`), and so, back along a chain of them, do theirs.
fn regenerations(engine: &Engine, row: &HashMap<usize, usize>, out: &mut [StageStatus]) {
    let p = &engine.pipeline;
    for &i in p.topo.iter().rev() {
        let Some(&k) = row.get(&i) else { continue };
        if out[k].action != Action::Run {
            continue;
        }
        for d in &p.stages[i].deps {
            let Some(j) = p.producer_of(d) else { continue };
            let producer = &p.stages[j];
            // As the run decides: the dep itself is a sensitive output that is gone.
            let gone = producer.outs.iter().any(|o| &o.path == d && o.sensitive) && p.abs(d).symlink_metadata().is_err();
            if let Some(&pk) = row.get(&j)
                && gone
                && out[pk].action != Action::Run
            {
                out[pk].action = Action::Run;
                out[pk].reasons.push(format!(
                    "runs to regenerate its sensitive output {d} (deleted at the end of every run) for stage {}, which reruns",
                    p.stages[i].name
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status --json` is a stable interface (README): these strings stay.
    #[test]
    fn state_and_action_keep_their_json() {
        let row = StageStatus { stage: "a".into(), state: State::Fresh, reasons: vec![], action: Action::Nothing };
        assert_eq!(serde_json::to_string(&row).unwrap(), r#"{"stage":"a","state":"fresh","reasons":[],"action":"none"}"#);
        assert_eq!(serde_json::to_string(&[State::Stale]).unwrap(), r#"["stale"]"#);
        assert_eq!(serde_json::to_string(&[Action::Restore, Action::Run]).unwrap(), r#"["restore","run"]"#);
        assert_eq!(State::Stale.as_str(), "stale");
    }
}
