//! Executing stages: outputs prepared, the work run by the stage's executor
//! (in this process or as a Slurm job), retries, and each finished stage
//! recorded — outputs hashed and cached, state and action entry written —
//! as soon as it is known.
//!
//! Rules: a stage's outputs are checked at write time (no link may redirect
//! them); a `cmd` stage starts from no outputs on every attempt, and one that
//! fails for good after its work ran leaves none (what is there is its failed
//! attempt's; never removed through a folder link); a job's
//! result is accepted only under the key dagrun decided on; a member of a
//! job group that cannot run is `skipped`, never silently cached; a stage
//! whose inputs changed while it ran (hashed again after it, through the
//! memo: a file whose size, mtime, ctime and inode are those it was hashed
//! with, clearly after its last change, is not read) is not recorded or
//! cached, with a warning: its outputs may come from either version, and
//! recorded under the key of the one it was decided on they would be
//! restored for it for good. The next run decides it again (its last record,
//! if any, still holds: its outputs are restored if its key is the same).

use super::*;

impl Engine {
    /// Evaluate and then cache, restore or run stage `i`. Never panics on
    /// stage errors: they become a `failed` record.
    pub fn execute(&self, i: usize) -> StageRecord {
        let t0 = Instant::now();
        let name = self.stage(i).name.clone();
        let cpu0 = crate::util::par::thread_cpu_ns();
        let mut rec = match self.execute_inner(i) {
            Ok(r) => r,
            Err(e) => failed_record(&name, &e),
        };
        rec.seconds = t0.elapsed().as_secs_f64();
        if rec.status == Status::Ran && rec.slurm_job.is_none() {
            // This thread's CPU time plus the stage's worker threads' (set by the local work).
            let own = crate::util::par::thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e9;
            rec.cpu_seconds = Some(own + rec.cpu_seconds.unwrap_or(0.0));
        }
        rec
    }

    /// Execute a job group's members (`members`, in dependency order) as one
    /// batch: each member is decided on its own (cached, restored or run);
    /// the members that must run — and every member downstream of one of them,
    /// whose inputs are only known once it ran — go to the executor together.
    /// Each member gets its own record, state, cache entry and lineage.
    pub fn execute_group(&self, members: &[usize]) -> Vec<StageRecord> {
        if members.len() == 1 {
            return vec![self.execute(members[0])];
        }
        let t0 = Instant::now();
        let mut done: BTreeMap<usize, StageRecord> = BTreeMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut failed: Option<String> = None;
        for &i in members {
            let s = self.stage(i);
            if let Some(f) = &failed {
                done.insert(i, StageRecord { error: Some(format!("stage {f} of the same job group failed")), ..StageRecord::new(&s.name, Status::Skipped) });
                continue;
            }
            let ups = self.pipeline.upstream(i);
            if let Some(p) = pending.iter().find(|p| ups.contains(&p.i)) {
                let why = format!("upstream stage {} will rerun (in the same job)", self.stage(p.i).name);
                pending.push(Pending { i, ev: None, reasons: vec![why], rec: StageRecord::new(&s.name, Status::Ran) });
                continue;
            }
            match self.decide(i) {
                Ok(Step::Done(r)) => {
                    done.insert(i, r);
                }
                Ok(Step::Run(p)) => pending.push(p),
                Err(e) => {
                    done.insert(i, StageRecord { error: Some(format!("{e:#}")), ..StageRecord::new(&s.name, Status::Failed) });
                    failed = Some(s.name.clone());
                }
            }
        }
        if !pending.is_empty() {
            let names: Vec<String> = pending.iter().map(|p| self.stage(p.i).name.clone()).collect();
            for (p, r) in names.iter().zip(self.run_batch(pending)) {
                let i = self.pipeline.stages.iter().position(|s| &s.name == p).expect("member");
                let r = r.unwrap_or_else(|e| failed_record(p, &e));
                done.insert(i, r);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        members
            .iter()
            .map(|i| {
                let mut r = done.remove(i).expect("every member has a record");
                if r.status != Status::Ran {
                    r.seconds = secs.min(r.seconds.max(0.0));
                }
                r
            })
            .collect()
    }

    pub(super) fn execute_inner(&self, i: usize) -> Result<StageRecord> {
        match self.decide(i)? {
            Step::Done(r) => Ok(r),
            Step::Run(p) => self.run_batch(vec![p]).pop().expect("one result per member"),
        }
    }

    /// The executor of stage `i`.
    pub(super) fn executor_for(&self, i: usize) -> &dyn Executor {
        match (self.stage(i).executor, &self.slurm) {
            (crate::pipeline::ExecutorKind::Slurm, Some(x)) => x.as_ref(),
            _ => &crate::executor::local::Local,
        }
    }

    /// Outputs are written in place by commands: they start from nothing, on
    /// every attempt, so a stale file (of an earlier run, or of an attempt that
    /// timed out half-way) is never mistaken for a fresh one. Before the
    /// first attempt (`first`), removing one that no recorded run of the
    /// stage made (a file that was there before it was declared an output)
    /// is said in a warning, naming it.
    pub(super) fn prepare_outputs(&self, i: usize, first: bool) -> Result<()> {
        let s = self.stage(i);
        let mut recorded: Option<Option<crate::workspace::state::StageState>> = None;
        for o in &s.outs {
            // Checked at write time, not only at load time: a link planted
            // since (by an earlier stage, or anyone) must not redirect a write.
            crate::pipeline::check_output_at_write(&self.pipeline.workspace, &o.path, true).with_context(|| format!("stage {}", s.name))?;
            let rel = &o.path;
            let o = self.pipeline.abs(rel);
            if s.kind.name() == "cmd" {
                if first
                    && o.symlink_metadata().is_ok()
                    && !recorded.get_or_insert_with(|| self.states.get(&s.name)).as_ref().is_some_and(|st| st.outputs.contains_key(rel))
                {
                    tracing::warn!(
                        "stage {}: removing {rel} before the command runs: it is a declared output, but no recorded run of the stage made it",
                        s.name
                    );
                }
                remove_path(&o)?;
            }
            if let Some(parent) = o.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create directory {}", parent.display()))?;
            }
        }
        Ok(())
    }

    /// The work of stage `i` in this process, under the key and input hashes
    /// of `ev` (also what `dagrun exec-stage` runs inside a job).
    pub fn local_work(&self, i: usize, ev: &Evaluation) -> Result<Done> {
        let t0 = Instant::now();
        // Worker threads the stage starts (util::par) report their CPU time here.
        let worker_cpu = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _accounting = crate::util::par::account_to(worker_cpu.clone());
        // Stages started in this process share the cores (util::par's rule).
        let _running = crate::util::par::running();
        let report = self.kind(i)?.run(&self.run_ctx(i, ev))?;
        Ok(Done { report, key: None, seconds: t0.elapsed().as_secs_f64(), cpu_seconds: Some(worker_cpu.load(Ordering::Relaxed) as f64 / 1e9), job: None })
    }

    /// What stage `i`'s kind gets to run (and publish) under the key and
    /// input hashes of `ev`.
    fn run_ctx<'a>(&'a self, i: usize, ev: &'a Evaluation) -> RunCtx<'a> {
        let s = self.stage(i);
        RunCtx {
            workspace: &self.pipeline.workspace,
            stage: s,
            deps: s.deps.iter().map(|d| self.pipeline.abs(d)).collect(),
            outs: s.outs.iter().map(|o| self.pipeline.abs(&o.path)).collect(),
            input_hashes: &ev.ingredients.inputs,
            cache_key: ev.key.as_str(),
            services: &self.services,
            cancel: &self.cancel,
            timeout: s.timeout.map(Duration::from_secs_f64),
        }
    }

    /// Execute `pending` (one stage, or a group's members in order) with their
    /// executor, retrying a failed member (`retries:`) with the members that
    /// did not finish, and record each finished member as soon as it is known.
    /// One result per member, in order; members after a failure are `skipped`.
    pub(super) fn run_batch(&self, mut pending: Vec<Pending>) -> Vec<Result<StageRecord>> {
        let mut results: Vec<Result<StageRecord>> = Vec::with_capacity(pending.len());
        let exec = self.executor_for(pending[0].i);
        let mut start = 0;
        let mut attempt = 1u32;
        let mut tries = 0u32; // retries used by the current first member
        for p in &pending {
            self.observers.iter().for_each(|o| o.stage_working(self, p.i));
        }
        let prepare = |from: &[Pending], first: bool| -> Result<()> { from.iter().try_for_each(|p| self.prepare_outputs(p.i, first)) };
        let mut error = prepare(&pending, true).err();
        // Whether the work ran (an attempt's outputs are then its own; a
        // retry whose preparation failed may have left some), and whether
        // the current member's work succeeded and only what followed failed.
        let mut worked = false;
        let mut after_work = false;
        while error.is_none() && start < pending.len() {
            let works: Vec<Box<LocalWork>> = pending[start..]
                .iter()
                .map(|p| {
                    let i = p.i;
                    let ev = p.ev.as_ref();
                    Box::new(move || match ev {
                        // In this process: the outputs join the run's end-of-run fsync batch.
                        Some(ev) => {
                            let _batched = crate::util::atomic::defer_sync_of(self.stage(i).outs.iter().map(|o| self.pipeline.abs(&o.path)).collect());
                            self.local_work(i, ev)
                        }
                        None => Err(anyhow!("internal error: stage {} has no key to run under in this process", self.stage(i).name)),
                    }) as Box<LocalWork>
                })
                .collect();
            let batch = Batch {
                members: pending[start..]
                    .iter()
                    .zip(&works)
                    .map(|(p, w)| Member { index: p.i, stage: self.stage(p.i), key: p.ev.as_ref().map(|e| e.key.to_string()), local: w.as_ref() })
                    .collect(),
                attempt,
                cancel: Some(&self.cancel),
            };
            let outcomes = exec.execute(&batch);
            worked = true;
            drop(batch);
            drop(works);
            let mut failure = None;
            for (i, r) in outcomes {
                if start >= pending.len() || pending[start].i != i {
                    failure = Some(anyhow!("internal error: the {} executor answered for an unexpected stage", exec.name()));
                    break;
                }
                let recorded = match r {
                    Ok(done) => self.record_run(&mut pending[start], done).inspect_err(|_| after_work = true),
                    Err(e) => Err(e),
                };
                match recorded {
                    Ok(rec) => {
                        results.push(Ok(rec));
                        start += 1;
                        tries = 0;
                        after_work = false;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if start == pending.len() {
                break;
            }
            let e = failure.unwrap_or_else(|| anyhow!("the {} executor returned no result", exec.name()));
            let s = self.stage(pending[start].i);
            if tries < s.retries && !self.cancel.load(Ordering::Relaxed) && !crate::executor::may_still_run(&e) {
                tries += 1;
                attempt += 1;
                tracing::warn!("{} failed (attempt {tries} of {}): {e:#}; retrying", s.name, s.retries.saturating_add(1));
                error = prepare(&pending[start..], false).err();
                continue;
            }
            error = Some(if s.retries > 0 && tries < s.retries && crate::executor::may_still_run(&e) {
                e.context(format!("not retried (attempt {} of {}): a job of it may still run", tries.saturating_add(1), s.retries.saturating_add(1)))
            } else if s.retries > 0 {
                e.context(format!("failed after {} attempts", tries.saturating_add(1)))
            } else {
                e
            });
        }
        if let Some(e) = error {
            let p = &mut pending[start];
            let failed = self.stage(p.i).name.clone();
            if worked {
                self.remove_partial_outputs(p.i, after_work);
            }
            // The record keeps what was known before it ran: key and reasons.
            let mut rec = std::mem::replace(&mut p.rec, StageRecord::new(&failed, Status::Failed));
            rec.status = Status::Failed;
            rec.key = p.ev.as_ref().map(|ev| ev.key.to_string()).or(rec.key);
            rec.reasons = std::mem::take(&mut p.reasons);
            rec.error = Some(format!("{e:#}"));
            rec.slurm_job = crate::executor::failed_job(&e);
            if let Some(facts) = crate::executor::facts_of_failure(&e) {
                rec.facts = facts.clone();
            }
            results.push(Ok(rec));
            for p in &pending[start + 1..] {
                let name = &self.stage(p.i).name;
                results
                    .push(Ok(StageRecord { error: Some(format!("stage {failed} of the same job group failed")), ..StageRecord::new(name, Status::Skipped) }));
            }
        }
        results
    }

    /// A `cmd` stage failed after its work ran: what is at its outputs was
    /// written by the failed attempt (each attempt starts from none), so it
    /// goes — not left to be taken for the user's edit by the next run, nor
    /// read by anyone as a result. Removed only where no folder on its path
    /// is a link (an output that is itself a link is unlinked, never
    /// followed); named in a warning.
    fn remove_partial_outputs(&self, i: usize, after_work: bool) {
        let s = self.stage(i);
        if s.kind.name() != "cmd" {
            // A built-in kind's own failure leaves what it chose to write
            // (a drift report that failed its gate is read by the operator).
            if after_work {
                self.put_back_outputs(i);
            } else {
                self.drop_outdated_record(i);
            }
            return;
        }
        let mut removed = Vec::new();
        let ws = &self.pipeline.workspace;
        // No folder on the way may be a link, even one inside the workspace:
        // one swapped in while the stage ran would lead to a user's file.
        let through_a_link = |rel: &str| Path::new(rel).parent().is_some_and(|dir| crate::util::nofollow::Dir::open(ws, dir).is_err());
        for o in &s.outs {
            let abs = self.pipeline.abs(&o.path);
            if abs.symlink_metadata().is_err() || through_a_link(&o.path) || crate::pipeline::check_output_at_write(ws, &o.path, true).is_err() {
                continue;
            }
            match remove_path(&abs) {
                Ok(()) => removed.push(o.path.as_str()),
                Err(e) => tracing::warn!("stage {}: cannot remove {}, written by its failed attempt: {e:#}", s.name, o.path),
            }
            self.memo.forget(&abs);
        }
        if !removed.is_empty() {
            tracing::warn!("stage {} failed: removed what its attempt had written at {} (the next run makes it again)", s.name, removed.join(", "));
        }
    }

    /// A built-in stage failed on purpose after writing an output (a drift
    /// report over its gate, for the operator to read): its state record
    /// describes the earlier output no more, so it goes (helper-72: every
    /// night with drift, `verify` called the report modified outside dagrun
    /// and `--repair` could not fix it). The next run reruns the stage; the
    /// earlier execution stays in the cache.
    fn drop_outdated_record(&self, i: usize) {
        let s = self.stage(i);
        let Some(recorded) = self.states.get(&s.name) else { return };
        let outdated = s.outs.iter().any(|o| {
            let abs = self.pipeline.abs(&o.path);
            self.memo.forget(&abs);
            // Written by this attempt: there, and not what the record says.
            // (A missing one was not: a sensitive output is shredded after
            // every run, and a failure before writing leaves none.)
            let now = self.memo.hash_path(&abs).ok().flatten().map(|h| h.hash);
            now.is_some() && now.as_ref() != recorded.outputs.get(&o.path).map(|r| &r.hash)
        });
        if outdated {
            self.states.remove(&s.name);
            tracing::debug!("stage {} failed after writing its outputs: its earlier state record no longer describes them and was removed", s.name);
        }
    }

    /// A built-in stage failed after its work succeeded. It writes each output
    /// whole (an atomic rename), so a failure during its work leaves the
    /// earlier outputs as they were (or what it wrote on purpose before
    /// failing: a drift report over its gate); one after it (storing an output in the cache,
    /// writing its record or the registry's: a full disk, a read-only cache)
    /// left the new output under the old record (review 68: `verify` then
    /// called it modified outside dagrun, and a model nobody registered
    /// stood where the champion's was). Each output that differs from the
    /// stage's record is put back from the cache (the record's copy), or
    /// removed when the cache has none: the earlier outputs stay
    /// byte-identical wherever the cache can give them back, and no output is
    /// left that its record does not describe. Named in a warning.
    fn put_back_outputs(&self, i: usize) {
        let s = self.stage(i);
        let recorded = self.states.get(&s.name);
        let ws = &self.pipeline.workspace;
        let (mut back, mut removed) = (Vec::new(), Vec::new());
        for o in &s.outs {
            let abs = self.pipeline.abs(&o.path);
            if abs.symlink_metadata().is_err() || crate::pipeline::check_output_at_write(ws, &o.path, true).is_err() {
                continue;
            }
            let rec = recorded.as_ref().and_then(|st| st.outputs.get(&o.path));
            if let Some(r) = rec
                && self.memo.hash_path(&abs).ok().flatten().is_some_and(|h| h.hash == r.hash)
            {
                continue; // as recorded: the failure came before it was replaced
            }
            self.memo.forget(&abs);
            if let Some(r) = rec.filter(|r| self.cas.has(&r.hash)) {
                match self.cas.restore(&r.hash, r.dir, r.exec == Some(true), &abs) {
                    Ok(()) => {
                        back.push(o.path.as_str());
                        continue;
                    }
                    Err(e) => tracing::warn!("stage {}: cannot put back the recorded {} from the cache: {e:#}", s.name, o.path),
                }
            }
            match remove_path(&abs) {
                Ok(()) => removed.push(o.path.as_str()),
                Err(e) => tracing::warn!("stage {}: cannot remove {}, written by its failed attempt: {e:#}", s.name, o.path),
            }
        }
        if !back.is_empty() {
            tracing::warn!("stage {} failed: put back the recorded {} from the cache (what its attempt wrote is gone)", s.name, back.join(", "));
        }
        if !removed.is_empty() {
            tracing::warn!("stage {} failed: removed what its attempt had written at {} (the next run makes it again)", s.name, removed.join(", "));
        }
    }

    /// Are a stage's inputs still what they were when its key (`ev`) was
    /// computed (see the module rules)? Why not, if not: the first that changed.
    fn input_changed_while_running(&self, ev: &Evaluation) -> Result<Option<String>> {
        for (dep, before) in &ev.ingredients.inputs {
            // Unknown (not hashed). A deleted sensitive input counted with its
            // recorded hash was regenerated before the stage ran (`with_inputs`)
            // and its key computed again: one still missing is a change.
            if before.is_empty() {
                continue;
            }
            let now = self.memo.hash_input(&self.pipeline.abs(dep), &self.pipeline.workspace)?;
            if now.map(|h| h.to_string()).as_deref() != Some(before.as_str()) {
                return Ok(Some(format!(
                    "not recorded or cached: input {dep} changed while the stage ran (it was hashed before it started, so its outputs may come from either version); the next run decides the stage again"
                )));
            }
        }
        Ok(None)
    }

    /// Record a finished member: hash and store its outputs, write its state
    /// and action-cache entry. A member whose key was not known before it ran
    /// (downstream in a group) gets it now, from its inputs on disk; a key the
    /// job reports must equal the engine's.
    pub(super) fn record_run(&self, p: &mut Pending, mut done: Done) -> Result<StageRecord> {
        let i = p.i;
        let s = self.stage(i);
        // A command may have swapped one of dagrun's own folders for a link
        // while it ran (the lock-time check is over by then): nothing of
        // this stage is stored or recorded through it.
        crate::workspace::own_dirs::check_fixed(&self.pipeline.workspace).with_context(|| format!("after {} ran", s.name))?;
        let hashed_before = p.ev.is_some();
        let ev = match p.ev.take() {
            Some(ev) => ev,
            None => {
                let mut ms = Vec::new();
                let (ingredients, _) = self.ingredients(i, &mut |d| self.hash_input(d, &mut ms))?;
                let key = ingredients.key();
                Evaluation { key, ingredients, decision: Decision::Fresh, missing_sensitive: vec![], prev: self.states.get(&s.name) }
            }
        };
        if let Some(k) = &done.key
            && k.as_str() != ev.key.as_str()
        {
            bail!(
                "{} computed the stage's cache key as {} but dagrun computes {}: its inputs changed while it ran; run again",
                done.job.as_deref().unwrap_or("the job"),
                crate::workspace::hash::short(k),
                ev.key.short()
            );
        }
        let input_changed = if hashed_before { self.input_changed_while_running(&ev)? } else { None };
        let prev = ev.prev.as_ref();
        let outs: Vec<PathBuf> = s.outs.iter().map(|o| self.pipeline.abs(&o.path)).collect();
        let mut rec = std::mem::replace(&mut p.rec, StageRecord::new(&s.name, Status::Ran));
        let mut reasons = std::mem::take(&mut p.reasons);
        // Hash and store outputs.
        let mut outputs = BTreeMap::new();
        for (o, abs) in s.outs.iter().zip(&outs) {
            crate::pipeline::check_output_at_write(&self.pipeline.workspace, &o.path, false)
                .with_context(|| format!("stage {} wrote its output through a link; it is not recorded or cached", s.name))?;
            self.memo.forget(abs);
            let meta = std::fs::metadata(abs).map_err(|_| {
                anyhow!("the stage finished but did not write its declared output {}; fix the stage so it writes it (or remove it from `outs:`)", o.path)
            })?;
            let store = o.cache && !o.sensitive;
            let h = if store && meta.is_file() {
                // Large files written by built-in kinds are hard-linked into the
                // cache (no copy); anything else is copied while being hashed.
                let (hash, size) = if s.kind.name() != "cmd" && meta.len() >= LINK_THRESHOLD {
                    self.cas.link_file(abs, &self.memo)
                } else {
                    self.cas.ingest_file(abs, &self.memo)
                }
                .with_context(|| format!("storing {} in the cache", o.path))?;
                hashing::Hashed { hash, size, dir: false, exec: hashing::is_exec(&meta) }
            } else {
                let h = self.memo.hash_path(abs)?.with_context(|| format!("output {} vanished", o.path))?;
                if store {
                    self.cas.put(abs, &h.hash, h.dir, &self.memo).with_context(|| format!("storing {} in the cache", o.path))?;
                }
                h
            };
            if s.kind.name() != "cmd" {
                // dagrun wrote it and the stage is done: no re-read on the next run.
                self.memo.settle(abs);
            }
            let exec = (!h.dir).then_some(h.exec);
            outputs
                .insert(o.path.clone(), OutputRecord { hash: h.hash, size: h.size, dir: h.dir, sensitive: o.sensitive, cached: o.cache && !o.sensitive, exec });
        }
        let changed = match prev {
            Some(p) => p.outputs.iter().map(|(k, v)| (k, &v.hash)).ne(outputs.iter().map(|(k, v)| (k, &v.hash))),
            None => true,
        };
        // Stored: now published (the registry), and then recorded; a run
        // that is not recorded publishes nothing.
        if input_changed.is_none() {
            self.kind(i)?.publish(&self.run_ctx(i, &ev), &mut done.report)?;
        }
        let st = StageState {
            stage: s.name.clone(),
            key: ev.key.clone(),
            ingredients: ev.ingredients,
            param_refs: s.param_refs.clone(),
            written: s.written.clone(),
            outputs,
            run_id: self.run_id.clone(),
            finished_at: now_rfc3339(),
            seconds: done.seconds,
            facts: done.report.facts.clone(),
        };
        if let Some(why) = input_changed {
            tracing::warn!("stage {}: {why}", s.name);
            reasons.push(why);
            rec.recorded = Some(false);
            self.wrote(outs.iter().cloned());
        } else {
            self.states.put(&st)?;
            // The end-of-run fsync batch will flush these; the disk can start now.
            crate::util::atomic::start_writeback(
                self.pipeline.workspace.clone(),
                s.outs.iter().filter(|o| !o.sensitive).map(|o| PathBuf::from(&o.path)).collect(),
            );
            self.wrote(outs.iter().cloned().chain([self.states.record_path(&st.stage)]));
            if st.outputs.values().all(|o| o.cached || o.sensitive) {
                self.states.put_action(&st)?;
            }
        }
        rec.status = Status::Ran;
        rec.key = Some(st.key.to_string());
        rec.reasons = reasons;
        rec.outputs = st.outputs.iter().map(|(k, v)| (k.clone(), v.hash.to_string())).collect();
        rec.outputs_changed = Some(changed);
        rec.facts = done.report.facts;
        rec.cpu_seconds = done.cpu_seconds;
        rec.seconds = done.seconds;
        rec.slurm_job = done.job;
        Ok(rec)
    }
}

/// The record of a stage that failed with `e` (naming the job it failed in,
/// when it ran in one).
fn failed_record(stage: &str, e: &anyhow::Error) -> StageRecord {
    StageRecord { error: Some(format!("{e:#}")), slurm_job: crate::executor::failed_job(e), ..StageRecord::new(stage, Status::Failed) }
}
