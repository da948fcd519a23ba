//! `dagrun status PIPELINE` (and `dagrun run --dry-run`): each selected stage
//! fresh or stale, with the exact reasons. Reads only: it runs nothing.

use crate::engine::Engine;
use crate::engine::scheduler;
use crate::engine::status::{self, StageStatus, State};
use crate::error::exit;
use crate::pipeline::Pipeline;
use anyhow::Result;

/// Evaluate the selected stages and print them (text or JSON).
pub fn show(p: Pipeline, stages: &[String], force: &Option<Vec<String>>, json: bool) -> Result<i32> {
    let selected = scheduler::select(&p, stages)?;
    let forced = scheduler::forced(&p, force, &selected)?;
    // It saves the hash memo in `.dagrun/`: never through a link planted there.
    crate::workspace::own_dirs::check(&p.workspace)?;
    let mut engine = Engine::read_only(p)?;
    engine.forced = forced;
    let rows = status::status(&engine, &selected)?;
    let _ = engine.memo.save();
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "stages": rows }))?);
    } else {
        print(&rows);
    }
    Ok(exit::OK)
}

fn print(rows: &[StageStatus]) {
    for r in rows {
        let mark = match r.state {
            State::Fresh => "fresh",
            State::Stale => "STALE",
        };
        crate::outln!("{mark}  {}", r.stage);
        for reason in &r.reasons {
            // A reason may quote a file name from the workspace: shown, never obeyed.
            crate::outln!("         {}", crate::util::escape_controls(reason));
        }
    }
    let stale = rows.iter().filter(|r| r.state == State::Stale).count();
    crate::outln!("{}: {} fresh, {stale} stale", crate::util::count(rows.len(), "stage", "stages"), rows.len() - stale);
}
