//! Deciding a stage: its cache key, and whether it is fresh, restorable
//! (from the local cache, or the remote with `run --pull`) or must run, with
//! the exact reasons (the rules are in the engine's top comment and in
//! [`super::fingerprint`]).
//!
//! Rules: deciding never runs a stage's work and never writes an output; the
//! only writes are restores from the cache and, when a consumer must rerun,
//! the regeneration of a sensitive input that was deleted (its producer reruns).
//! An action entry (a cache hit by key) is used only for a stage of the
//! tenant that made it: entries pulled from a shared remote are keyed by
//! content alone, and one filed under another tenant's name must never
//! become this tenant's outputs.

use super::*;

/// Whether an action entry was made by a stage of `s`'s tenant (or both are
/// not tenant-fanned).
fn same_tenant(s: &Stage, act: &StageState) -> bool {
    crate::pipeline::instance_tenant(&act.stage) == s.tenant.as_deref()
}

impl Engine {
    pub(super) fn producer_name(&self, path: &str) -> Option<String> {
        self.pipeline.producer_of(path).map(|j| self.pipeline.stages[j].name.clone())
    }

    /// Compute a stage's ingredients given a way to hash its inputs.
    pub fn ingredients(&self, i: usize, input: &mut dyn FnMut(&str) -> Result<InputHash>) -> Result<(Ingredients, Vec<String>)> {
        let s = self.stage(i);
        let mut inputs = BTreeMap::new();
        let mut unknown = Vec::new();
        for d in &s.deps {
            match input(d)? {
                InputHash::Known(h) => {
                    inputs.insert(d.clone(), h.to_string());
                }
                InputHash::Unknown(why) => {
                    unknown.push(why);
                    inputs.insert(d.clone(), String::new());
                }
            }
        }
        let extras = self.kind(i)?.extra_ingredients(s, &self.services)?;
        let ing = Ingredients {
            kind: s.kind.name().to_string(),
            kind_version: s.kind.version(),
            params: s.with.clone(),
            cmd: s.cmd.clone(),
            env: s.env.clone(),
            inputs,
            outs: s.outs.iter().map(|o| o.path.clone()).collect(),
            extras,
        };
        Ok((ing, unknown))
    }

    /// Hash an input on disk; a consumed sensitive input counts with its recorded hash.
    pub fn hash_input(&self, dep: &str, missing_sensitive: &mut Vec<usize>) -> Result<InputHash> {
        let abs = self.pipeline.abs(dep);
        if let Some(h) = self.memo.hash_input(&abs, &self.pipeline.workspace)? {
            return Ok(InputHash::Known(h));
        }
        if let Some(p) = self.pipeline.producer_of(dep) {
            let producer = self.stage(p);
            if producer.outs.iter().any(|o| o.path == dep && o.sensitive)
                && let Some(rec) = self.states.get(&producer.name).and_then(|st| st.outputs.get(dep).cloned())
            {
                missing_sensitive.push(p);
                return Ok(InputHash::Known(rec.hash));
            }
            bail!("input {dep} does not exist: its producer, stage {}, has not written it", producer.name);
        }
        // Paths are the workspace's: say which, when it is not where the user stands.
        let ws = &self.pipeline.workspace;
        let place = if crate::workspace::is_current_folder(ws) {
            String::new()
        } else {
            format!(
                " in the workspace {} (a pipeline's paths are relative to its workspace: the nearest folder above the pipeline file holding `.dagrun/` or `config/`, else the file's own folder; `-C DIR` names another)",
                ws.display()
            )
        };
        bail!("input {dep} does not exist{place}; create it, or declare the stage that makes it (as one of its `outs:`)")
    }

    /// Decide what to do with stage `i` now.
    pub fn evaluate(&self, i: usize) -> Result<Evaluation> {
        let mut missing_sensitive = Vec::new();
        let (ingredients, _) = self.ingredients(i, &mut |d| self.hash_input(d, &mut missing_sensitive))?;
        let mut ev = self.evaluate_with(i, ingredients)?;
        ev.missing_sensitive = missing_sensitive;
        Ok(ev)
    }

    /// Decide what to do with stage `i` given its ingredients.
    pub fn evaluate_with(&self, i: usize, ingredients: Ingredients) -> Result<Evaluation> {
        let s = self.stage(i);
        let missing_sensitive = Vec::new();
        let key = ingredients.key();
        if self.forced.contains(&i) {
            let prev = self.states.get(&s.name);
            return Ok(Evaluation { key, ingredients, decision: Decision::Run { reasons: vec!["forced (--force)".into()] }, missing_sensitive, prev });
        }
        let (prev, distrust) = match self.states.load(&s.name) {
            Loaded::Valid(st) => (Some(st), None),
            Loaded::Missing => (None, None),
            Loaded::Invalid(e) => {
                tracing::warn!("{e}: stage {} is recomputed", s.name);
                (None, Some(format!("{e}: recomputing")))
            }
        };
        let decision = match &prev {
            Some(st) if st.key == key => {
                let (bad, reasons) = self.check_outputs(s, st)?;
                let restorable = |bad: &[String]| bad.iter().all(|p| st.outputs.get(p).is_some_and(|o| o.cached && self.cas.restorable(&o.hash, o.dir)));
                if bad.is_empty() {
                    Decision::Fresh
                } else if restorable(&bad) || (self.pull_from_remote(s, &key) && restorable(&bad)) {
                    Decision::Restore { outs: bad, reasons, from: Box::new(st.clone()) }
                } else {
                    let mut reasons = reasons;
                    reasons.push("(not in the cache: the stage must run)".into());
                    Decision::Run { reasons }
                }
            }
            _ => {
                let mut reasons = match (&prev, distrust) {
                    (Some(st), _) => fingerprint::explain(&st.ingredients, &ingredients, (&st.param_refs, &st.written), (&s.param_refs, &s.written), &|p| {
                        self.producer_name(p)
                    }),
                    (None, Some(why)) => vec![why],
                    (None, None) => vec![self.no_record_reason(&s.name)],
                };
                match self.states.load_action(&key).valid() {
                    Some(act) if self.action_restorable(s, &act) => {
                        reasons.push("an earlier run with these exact inputs is in the cache: restoring its outputs".into());
                        let outs = s.outs.iter().filter(|o| !o.sensitive).map(|o| o.path.clone()).collect();
                        Decision::Restore { outs, reasons, from: Box::new(act) }
                    }
                    _ => match self.remote_action(s, &key) {
                        Some((act, shown)) => {
                            reasons.push(format!("an earlier run with these exact inputs is in the remote cache {shown}: restoring its outputs"));
                            let outs = s.outs.iter().filter(|o| !o.sensitive).map(|o| o.path.clone()).collect();
                            Decision::Restore { outs, reasons, from: Box::new(act) }
                        }
                        None => Decision::Run { reasons },
                    },
                }
            }
        };
        Ok(Evaluation { key, ingredients, decision, missing_sensitive, prev })
    }

    /// `run --pull`: fetch `key` from the remote; true when something was fetched.
    /// A remote that fails is a warning, never a failed stage: the stage runs.
    pub(super) fn pull_from_remote(&self, s: &Stage, key: &ContentHash) -> bool {
        let Some(r) = &self.remote else { return false };
        // Nothing of a forgotten tenant comes back (`remote::forgotten`): its
        // own stages are not asked for, other stages' records are checked.
        let forgotten = self.forgotten.get_or_init(|| {
            std::sync::Mutex::new(match self.services.keyring() {
                Ok(ring) => crate::remote::forgotten::Forgotten::of_workspace(ring.forgotten_tenants(), &self.states, Cas::read_only(&self.services.ws)),
                Err(_) => crate::remote::forgotten::Forgotten::none(),
            })
        });
        if let Some(t) = &s.tenant
            && forgotten.lock().unwrap_or_else(|e| e.into_inner()).when(t).is_some()
        {
            tracing::debug!("{}: tenant {t} was forgotten here: not asking the remote cache", s.name);
            return false;
        }
        match r.fetch(s, key, &self.states, &self.cas, forgotten) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("{}: remote cache {}: {e:#}; running the stage instead", s.name, r.shown());
                false
            }
        }
    }

    /// `run --pull`: the action entry for `key`, from the local cache or
    /// fetched from the remote, when its outputs can be restored. Sensitive
    /// outputs (plaintext, never cached nor pushed) are left absent, exactly
    /// as after a local run: a consumer that needs one reruns its producer.
    pub(super) fn remote_action(&self, s: &Stage, key: &ContentHash) -> Option<(StageState, String)> {
        let r = self.remote.as_ref()?;
        let adoptable = |act: &StageState| {
            same_tenant(s, act)
                && s.outs.iter().all(|o| match act.outputs.get(&o.path) {
                    Some(rec) if o.sensitive => rec.sensitive && !rec.cached,
                    Some(rec) => !rec.sensitive && rec.cached && self.cas.restorable(&rec.hash, rec.dir),
                    None => false,
                })
        };
        if let Some(act) = self.states.action(key).filter(|a| adoptable(a)) {
            return Some((act, r.shown()));
        }
        if !self.pull_from_remote(s, key) {
            return None;
        }
        self.states.action(key).filter(|a| adoptable(a)).map(|a| (a, r.shown()))
    }

    pub(super) fn action_restorable(&self, s: &Stage, act: &StageState) -> bool {
        same_tenant(s, act)
            && s.outs.iter().all(|o| {
                if o.sensitive {
                    return false; // cannot restore plaintext: must recompute
                }
                act.outputs.get(&o.path).is_some_and(|r| r.cached && self.cas.restorable(&r.hash, r.dir))
            })
    }

    /// Outputs that are missing or differ from the record (sensitive outputs may be absent).
    pub(super) fn check_outputs(&self, s: &Stage, st: &StageState) -> Result<(Vec<String>, Vec<String>)> {
        let mut bad = Vec::new();
        let mut reasons = Vec::new();
        for o in &s.outs {
            let Some(rec) = st.outputs.get(&o.path) else {
                bad.push(o.path.clone());
                reasons.push(format!("output {} was never recorded", o.path));
                continue;
            };
            match self.memo.hash_path(&self.pipeline.abs(&o.path))? {
                None if o.sensitive => {}
                None => {
                    bad.push(o.path.clone());
                    reasons.push(format!("output {} is missing", o.path));
                }
                Some(h) if h.hash != rec.hash => {
                    bad.push(o.path.clone());
                    reasons.push(format!("output {} was modified outside dagrun (blake3 {} → {})", o.path, rec.hash.short(), h.hash.short()));
                }
                Some(h) if !h.dir && rec.exec.is_some_and(|x| x != h.exec) => {
                    bad.push(o.path.clone());
                    let (was, now) = if h.exec { ("without", "has one") } else { ("with", "has none") };
                    reasons.push(format!("output {} was written {was} an execute bit and now {now} (chmod outside dagrun)", o.path));
                }
                Some(_) => {}
            }
        }
        Ok((bad, reasons))
    }

    /// Decide what to do with stage `i`: done (cached or restored here), or
    /// run (after regenerating any sensitive input that is gone).
    pub(super) fn decide(&self, i: usize) -> Result<Step> {
        let s = self.stage(i);
        let mut ev = self.evaluate(i)?;
        let mut rec = StageRecord { key: Some(ev.key.to_string()), ..StageRecord::new(&s.name, Status::Cached) };
        match std::mem::replace(&mut ev.decision, Decision::Fresh) {
            Decision::Fresh => {
                if let Some(st) = ev.prev.take() {
                    rec.outputs = st.outputs.iter().map(|(k, v)| (k.clone(), v.hash.to_string())).collect();
                    rec.facts = st.facts;
                }
                Ok(Step::Done(rec))
            }
            Decision::Restore { outs, reasons, from } => match self.restore(i, &ev, &outs, &from) {
                Ok(()) => {
                    rec.status = Status::Restored;
                    rec.reasons = reasons;
                    rec.outputs = from.outputs.iter().map(|(k, v)| (k.clone(), v.hash.to_string())).collect();
                    rec.facts = from.facts.clone();
                    Ok(Step::Done(rec))
                }
                Err(e) => {
                    tracing::warn!("{}: cannot restore from the cache ({e:#}); running the stage instead", s.name);
                    let mut reasons = reasons;
                    reasons.push(format!("cache restore failed: {e:#}"));
                    // Running needs the real inputs, sensitive ones included.
                    self.with_inputs(i, ev, reasons, rec).map(Step::Run)
                }
            },
            Decision::Run { reasons } => self.with_inputs(i, ev, reasons, rec).map(Step::Run),
        }
    }

    /// Prepare to run stage `i`: first regenerate any sensitive input that is gone.
    pub(super) fn with_inputs(&self, i: usize, mut ev: Evaluation, mut reasons: Vec<String>, mut rec: StageRecord) -> Result<Pending> {
        self.about_to_write_plaintext(i, !ev.missing_sensitive.is_empty());
        let s = self.stage(i);
        if !ev.missing_sensitive.is_empty() {
            let producers = std::mem::take(&mut ev.missing_sensitive);
            for p in producers {
                if self.rematerialize(p, &s.name)? {
                    // The producer was reported `cached` earlier in this run; say here that it executed.
                    reasons.push(format!("reran {} first to regenerate its sensitive output (deleted after the last run)", self.stage(p).name));
                }
            }
            // Inputs now exist: recompute the key from the real bytes.
            let again = self.evaluate(i)?;
            ev.key = again.key;
            ev.ingredients = again.ingredients;
            rec.key = Some(ev.key.to_string());
        }
        Ok(Pending { i, ev: Some(ev), reasons, rec })
    }

    pub(super) fn restore(&self, i: usize, ev: &Evaluation, outs: &[String], from: &StageState) -> Result<()> {
        let s = self.stage(i);
        for p in outs {
            let r = from.outputs.get(p).with_context(|| format!("no cached copy of {p}"))?;
            let abs = self.pipeline.abs(p);
            crate::pipeline::check_output_at_write(&self.pipeline.workspace, p, true)?;
            if r.dir {
                self.name_what_a_restore_removes(&s.name, p, &abs, &r.hash);
            }
            self.cas.restore(&r.hash, r.dir, r.exec == Some(true), &abs).with_context(|| format!("restoring {p}"))?;
            self.memo.forget(&abs);
        }
        let mut st = from.clone();
        st.stage = s.name.clone();
        st.key = ev.key.clone();
        st.ingredients = ev.ingredients.clone();
        st.param_refs = s.param_refs.clone();
        st.written = s.written.clone();
        self.states.put(&st)?;
        self.wrote([self.states.record_path(&s.name)]);
        Ok(())
    }

    /// A folder output is restored whole: files put in it since its stage
    /// ran go with the rest. Say which (a warning; the first few by name).
    fn name_what_a_restore_removes(&self, stage: &str, rel: &str, abs: &Path, hash: &ContentHash) {
        if !abs.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            return;
        }
        let (Ok(listing), Ok(now)) = (self.cas.read_listing(hash), self.memo.tree(abs)) else { return };
        let made: HashSet<&str> = listing.iter().map(|e| e.path()).collect();
        let extra: Vec<&str> = now.iter().map(|e| e.path()).filter(|p| !made.contains(p)).collect();
        if extra.is_empty() {
            return;
        }
        let mut named = extra.iter().take(5).map(|p| crate::util::escape_controls(p).into_owned()).collect::<Vec<_>>().join(", ");
        if extra.len() > 5 {
            named.push_str(&format!(" and {} more", extra.len() - 5));
        }
        tracing::warn!("stage {stage}: restoring its folder output {rel} from the cache removes what its recorded run did not make in it: {named}");
    }

    /// Regenerate a consumed sensitive output of stage `p` for `consumer`;
    /// true if the producer executed.
    pub(super) fn rematerialize(&self, p: usize, consumer: &str) -> Result<bool> {
        let _g = self.stage_locks[p].lock().unwrap_or_else(|e| e.into_inner());
        let s = self.stage(p);
        if s.outs.iter().filter(|o| o.sensitive).all(|o| self.pipeline.abs(&o.path).exists()) {
            return Ok(false);
        }
        tracing::info!("{}: regenerating its sensitive output for {consumer}", s.name);
        let ev = self.evaluate(p)?;
        // Its own sensitive inputs, gone too, are regenerated first (a chain
        // of them: review 38), and its key is computed from their real bytes.
        let pending = self.with_inputs(
            p,
            ev,
            vec![format!("regenerated for stage {consumer}, which reruns: its sensitive output is deleted at the end of every run")],
            StageRecord::new(&s.name, Status::Ran),
        )?;
        let rec = self
            .run_batch(vec![pending])
            .pop()
            .expect("one result per member")
            .with_context(|| format!("regenerating the input of {consumer} with stage {}", s.name))?;
        let failed = (rec.status == Status::Failed).then(|| rec.error.clone().unwrap_or_else(|| "it failed".into()));
        // Recorded either way: the producer ran in this run (`scheduler` reports it).
        self.regenerated.lock().unwrap_or_else(|e| e.into_inner()).push((p, rec));
        if let Some(e) = failed {
            bail!("regenerating the input of {consumer} with stage {}: {e}", s.name);
        }
        Ok(true)
    }
}
