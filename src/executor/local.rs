//! The local executor: a member's work runs on the calling thread of the
//! `dagrun run` process (the default, and what `--executor local` forces).

use super::{Batch, Done, Executor};
use anyhow::Result;

pub struct Local;

impl Executor for Local {
    fn name(&self) -> &'static str {
        "local"
    }
    fn execute(&self, batch: &Batch) -> Vec<(usize, Result<Done>)> {
        let mut out = Vec::with_capacity(batch.members.len());
        for m in &batch.members {
            let r = (m.local)();
            let failed = r.is_err();
            out.push((m.index, r));
            if failed {
                break;
            }
        }
        out
    }
}
