//! From YAML text to expanded, validated stages: `schema::PipelineFile` →
//! params → `foreach: tenants` instances → kinds' declarations → paths →
//! edges → cycle check. Every error names the file, the stage's line and the
//! fix, and is a config error (exit 2).

use super::*;

/// The key lines of the `stages:` block: (1-based line, the line's text from
/// its key on, leading quotes removed). The block ends at the next line that
/// is neither indented, empty nor a comment.
fn stage_key_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut in_stages = false;
    text.lines().enumerate().filter_map(move |(i, line)| {
        if line.starts_with("stages:") {
            in_stages = true;
            return None;
        }
        if !in_stages {
            return None;
        }
        let t = line.trim_start();
        if line.len() > t.len() {
            return Some((i + 1, t.trim_start_matches(['"', '\''])));
        }
        if !t.is_empty() && !t.starts_with('#') {
            in_stages = false;
        }
        None
    })
}

/// Where a stage name is written in the file (1-based line), found by text.
pub(super) fn stage_line(text: &str, name: &str) -> Option<usize> {
    stage_key_lines(text).find_map(|(line, key)| {
        let rest = key.strip_prefix(name)?.trim_start_matches(['"', '\'']);
        rest.trim_start().starts_with(':').then_some(line)
    })
}

/// Where every stage name is written (first line of each key in the
/// `stages:` block), found in one pass: [`stage_line`] per stage rescans the
/// file, which made loading a pipeline quadratic in its length.
pub(super) struct StageLines<'a> {
    text: &'a str,
    first: HashMap<&'a str, usize>,
}

impl<'a> StageLines<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let mut first = HashMap::new();
        // `name:`, `"name":`, `'name' :` (as stage_line matches them).
        for (line, key) in stage_key_lines(text) {
            if let Some(colon) = key.find(':') {
                first.entry(key[..colon].trim_end().trim_end_matches(['"', '\''])).or_insert(line);
            }
        }
        StageLines { text, first }
    }

    /// Same answer as [`stage_line`]: by look-up for a valid stage name,
    /// by scanning for anything else (only error messages ask for those).
    pub(super) fn get(&self, name: &str) -> Option<usize> {
        if valid_stage_name(name) { self.first.get(name).copied() } else { stage_line(self.text, name) }
    }
}

/// The line of `key:` inside the block of the stage written at `stage_line`
/// (1-based): the first line below it, more indented than it, that starts
/// with the key; None past the block. (Also the line of a key inside any
/// other block mapping, given the line that opens it.)
fn key_line(text: &str, stage_line: usize, key: &str) -> Option<usize> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = text.lines().enumerate().skip(stage_line.checked_sub(1)?);
    let (_, first) = lines.next()?;
    let base = indent(first);
    for (i, l) in lines {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if indent(l) <= base {
            return None;
        }
        if t.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with(':')) {
            return Some(i + 1);
        }
    }
    None
}

/// The line of `with.KEY` in the stage written at `stage_line`: its own line
/// in a block mapping, the `with:` line in a flow one (`with: {KEY: …}`);
/// None when the stage has no `with:` (the key came from elsewhere, e.g. the
/// `tenant` a `foreach` adds).
fn with_key_line(text: &str, stage_line: usize, key: &str) -> Option<usize> {
    let with = key_line(text, stage_line, "with")?;
    Some(key_line(text, with, key).unwrap_or(with))
}

pub(super) fn valid_stage_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(super) fn parse(text: &str, shown: String, file: PathBuf, workspace: PathBuf, overrides: &[(String, String)], kinds: &Kinds) -> Result<Pipeline> {
    check_yaml_limits(text, &shown)?;
    if yaml_budget_can_be_exceeded(text) {
        check_yaml_budget(text).map_err(|e| yaml_error(&shown, text, &e))?;
    }
    let pf: PipelineFile = yaml_serde::from_str(text).map_err(|e| {
        // A syntax error anywhere in the file is named before a wrong type
        // (the untyped pass reads the whole file; skipped above when it
        // could not exceed the budget, it runs here on the error path).
        let first = check_yaml_budget(text).err().unwrap_or(e);
        yaml_error(&shown, text, &first)
    })?;
    let lines = StageLines::new(text);
    // `FILE:LINE: stage `NAME``: at the stage's line, or (`at_key`) at its
    // `key:` line when it has its own.
    let place = |name: &str, line: Option<usize>| match line {
        Some(l) => format!("{shown}:{l}: stage `{name}`"),
        None => format!("{shown}: stage `{name}`"),
    };
    let at = |name: &str| place(name, lines.get(name));
    let at_key = |name: &str, key: &str| place(name, lines.get(name).map(|l| key_line(text, l, key).unwrap_or(l)));

    let mut params = IndexMap::new();
    for (k, v) in &pf.params {
        let v = to_json(v, &format!("params.{k}")).map_err(|m| config(format!("{shown}: {m}")))?;
        if v.is_object() || v.is_null() {
            return Err(config(format!("{shown}: params.{k} must be a number, string, boolean or list")));
        }
        params.insert(k.clone(), v);
    }
    for (k, v) in overrides {
        let Some(old) = params.get(k) else {
            return Err(config(format!(
                "--param {k}={v}: the pipeline {shown} has no param `{k}` (it has: {})",
                params.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let new = match old {
            Value::Number(_) => serde_json::from_str::<Value>(v)
                .ok()
                .filter(Value::is_number)
                .ok_or_else(|| config(format!("--param {k}={v}: `{k}` is a number in {shown}; give a number")))?,
            Value::Bool(_) => Value::Bool(v.parse::<bool>().map_err(|_| config(format!("--param {k}={v}: give true or false")))?),
            // A list param takes a YAML flow list (`-p 'files=[a.csv, b.csv]'`),
            // never a string in its place.
            Value::Array(_) => super::check_yaml_budget(v)
                .ok()
                .and_then(|_| yaml_serde::from_str::<yaml_serde::Value>(v).ok())
                .and_then(|y| to_json(&y, k).ok())
                .filter(Value::is_array)
                .ok_or_else(|| config(format!("--param {k}={v}: `{k}` is a list in {shown}; give a list, e.g. --param '{k}=[a, b]'")))?,
            _ => Value::String(v.clone()),
        };
        params.insert(k.clone(), new);
    }

    if pf.stages.is_empty() {
        return Err(config(format!("{shown}: `stages` is empty; define at least one stage")));
    }
    for p in &pf.secrets {
        crate::util::child_env::check_secret_pattern(p).map_err(|m| config(format!("{shown}: {m}")))?;
    }
    let secrets = Arc::new(crate::util::child_env::Withheld::new(&pf.secrets, &pf.pass_env).map_err(|m| config(format!("{shown}: {m}")))?);

    // The workspace settings are checked before anything runs (exit 2 on a bad key).
    crate::config::DagrunConfig::load(&workspace)?;

    // Only a valid `foreach: tenants` needs the tenant list; any other list is
    // reported below as unknown (not as a missing config/tenants.yaml).
    let needs_tenants = pf.stages.values().any(|s| s.foreach.as_deref() == Some("tenants"));
    let tenants = if needs_tenants { Some(Tenants::load(&workspace)?) } else { None };

    let mut stages: Vec<Stage> = Vec::new();
    let mut instances_of: HashMap<String, Vec<usize>> = HashMap::new();
    let mut raw_needs: Vec<Vec<String>> = Vec::new();
    for (base, def) in &pf.stages {
        if !valid_stage_name(base) {
            return Err(config(format!("{}: invalid stage name; use 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-' (no '/', '.', spaces)", at(base))));
        }
        let kind = match (&def.uses, &def.cmd) {
            (Some(_), Some(_)) => return Err(config(format!("{}: has both `uses:` and `cmd:`; a stage is one or the other", at(base)))),
            (None, None) => return Err(config(format!("{}: has neither `uses:` (a built-in kind) nor `cmd:` (a shell command)", at(base)))),
            (None, Some(_)) => kinds["cmd"].clone(),
            (Some(u), None) => match kinds.get(u.as_str()) {
                Some(k) if k.name() != "cmd" => k.clone(),
                _ => {
                    let names: Vec<&str> = kinds.keys().copied().filter(|k| *k != "cmd").collect();
                    let known = if names.is_empty() {
                        "this build has no built-in kinds; use `cmd:` for a shell command".to_string()
                    } else {
                        format!("built-in kinds are: {} (or use `cmd:` for a shell command)", names.join(", "))
                    };
                    return Err(config(format!("{}: unknown stage kind `uses: {u}`; {known}", at_key(base, "uses"))));
                }
            },
        };
        if def.cmd.is_none() && !def.env.is_empty() {
            return Err(config(format!("{}: `env:` applies to `cmd:` stages only", at_key(base, "env"))));
        }
        if let Some(t) = def.timeout
            && (!t.is_finite() || t <= 0.0 || t > MAX_SECONDS)
        {
            return Err(config(format!("{}: timeout must be a positive number of seconds, at most 1e9", at_key(base, "timeout"))));
        }
        if def.retries > super::MAX_RETRIES {
            return Err(config(format!(
                "{}: `retries: {}` is more than {}; a stage that fails that often needs fixing, not retrying",
                at_key(base, "retries"),
                def.retries,
                super::MAX_RETRIES
            )));
        }
        let fan: Vec<Option<String>> = match def.foreach.as_deref() {
            None => vec![None],
            Some("tenants") => tenants.as_ref().expect("loaded above").ids().map(|t| Some(t.to_string())).collect(),
            Some(other) => {
                return Err(config(format!(
                    "{}: `foreach: {other}` is unknown; the only list is `tenants` (from config/tenants.yaml)",
                    at_key(base, "foreach")
                )));
            }
        };
        for tenant in fan {
            let idx = stages.len();
            let stage = expand(base, def, tenant.as_deref(), &params, kind.clone(), &workspace, &secrets).map_err(|e| {
                // An error about one `with:` key is placed on that key's line.
                match e.key.as_deref().and_then(|k| with_key_line(text, lines.get(base)?, k)) {
                    Some(l) => config(format!("{shown}:{l}: stage `{base}`: {}", e.message)),
                    None => config(format!("{}: {}", at(base), e.message)),
                }
            })?;
            let mut stage = stage;
            stage.line = lines.get(base);
            stage.executor = def.executor.or(pf.executor).unwrap_or_default();
            stage.resources = merge_resources(pf.slurm.as_ref().and_then(|s| s.resources.as_ref()), def.resources.as_ref());
            check_resources(&stage.resources).map_err(|m| config(format!("{}: `resources.{m}", at_key(base, "resources"))))?;
            if let Some(g) = &def.group
                && !valid_stage_name(g)
            {
                return Err(config(format!(
                    "{}: `group: {g}` is not a valid group name; use 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'",
                    at_key(base, "group")
                )));
            }
            stage.group = def.group.clone();
            instances_of.entry(base.clone()).or_default().push(idx);
            raw_needs.push(def.needs.clone());
            stages.push(stage);
        }
    }

    // Outputs: unique, not nested in one another, no symlink escapes, and
    // neither the pipeline file nor a folder holding it (a `cmd` stage's
    // outputs are removed before it runs).
    let mut out_owner: HashMap<&str, usize> = HashMap::new();
    let mut seen_dirs = crate::util::nofollow::CheckedDirs::default();
    // (Resolved: the file may be reached through a symlink, or be one.)
    let own_file = match (file.canonicalize(), workspace.canonicalize()) {
        (Ok(f), Ok(w)) => f.strip_prefix(&w).map(Path::to_path_buf).ok(),
        _ => file.strip_prefix(&workspace).map(Path::to_path_buf).ok(),
    }
    .and_then(|r| normalize_out(&r.to_string_lossy()).ok());
    for (i, s) in stages.iter().enumerate() {
        for o in &s.outs {
            check_symlinks(&workspace, &o.path, &mut seen_dirs).map_err(|m| config(format!("{}: {m}", at_key(&s.base, "outs"))))?;
            if let Some(f) = &own_file
                && (*f == o.path || crate::util::path_within(f, &o.path))
            {
                return Err(config(format!("{}: output {:?} would replace this pipeline file ({f}); name another path", at_key(&s.base, "outs"), o.path)));
            }
            if let Some(&j) = out_owner.get(o.path.as_str()) {
                let other = &stages[j].name;
                let msg = if *other == s.name {
                    format!("{}: declares output {:?} twice", at_key(&s.base, "outs"), o.path)
                } else if stages[j].base == s.base && s.tenant.is_some() {
                    format!(
                        "{}: output {:?} is the same for every tenant (the stage runs once per tenant: `foreach: tenants`); put ${{tenant}} in its path, e.g. out/${{tenant}}/…",
                        at_key(&s.base, "outs"),
                        o.path
                    )
                } else {
                    format!("{}: output {:?} is already an output of stage `{other}`; each path has one producing stage", at_key(&s.base, "outs"), o.path)
                };
                return Err(config(msg));
            }
            out_owner.insert(&o.path, i);
        }
    }
    // Every folder above each output is looked up (not only the neighbour in
    // sorted order: `data-x` sorts between `data` and `data/pii.csv`).
    let mut all_outs: Vec<(&str, usize)> = out_owner.iter().map(|(k, v)| (*k, *v)).collect();
    all_outs.sort();
    for &(b, ib) in &all_outs {
        if let Some((a, ia)) = b.match_indices('/').find_map(|(pos, _)| out_owner.get(&b[..pos]).map(|&ia| (&b[..pos], ia))) {
            return Err(config(format!(
                "{}: output {b:?} lies inside output {a:?} of stage `{}`; outputs may not nest",
                at_key(&stages[ib].base, "outs"),
                stages[ia].name
            )));
        }
    }

    // Edges.
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    let mut edges: HashSet<(usize, usize)> = HashSet::new();
    for (i, s) in stages.iter().enumerate() {
        for d in &s.deps {
            if let Some(&j) = out_owner.get(d.as_str()) {
                edges.insert((j, i));
                continue;
            }
            // A dep inside an output directory, or a directory holding outputs.
            for (o, &j) in &out_owner {
                let inside = crate::util::path_within(d, o);
                let holds = crate::util::path_within(o, d);
                if inside || holds {
                    edges.insert((j, i));
                }
            }
        }
        for n in &raw_needs[i] {
            let targets: Vec<usize> = if let Some(list) = instances_of.get(n) {
                // Same-tenant instance when both fan out; else all instances.
                match (&s.tenant, list.iter().find(|&&j| stages[j].tenant == s.tenant && s.tenant.is_some())) {
                    (Some(_), Some(&j)) => vec![j],
                    _ => list.clone(),
                }
            } else if let Some(j) = stages.iter().position(|x| &x.name == n) {
                vec![j]
            } else {
                let mut names: Vec<&str> = pf.stages.keys().map(String::as_str).collect();
                names.sort();
                return Err(config(format!("{}: `needs: {n}` names no stage; stages are: {}", at_key(&s.base, "needs"), names.join(", "))));
            };
            for j in targets {
                if j == i {
                    return Err(config(format!("{}: needs itself", at_key(&s.base, "needs"))));
                }
                edges.insert((j, i));
            }
        }
    }
    let mut edge_list: Vec<_> = edges.into_iter().collect();
    edge_list.sort();
    for (a, b) in edge_list {
        if a == b {
            // Name the pair: a dep that is, lies in or holds one of its outputs.
            let st = &stages[a];
            let pair = st.deps.iter().find_map(|d| {
                st.outs.iter().find(|o| o.path == *d || crate::util::path_within(d, &o.path) || crate::util::path_within(&o.path, d)).map(|o| (d, &o.path))
            });
            let what = match pair {
                Some((d, o)) if d == o => format!("reads its own output {d:?}"),
                Some((d, o)) if crate::util::path_within(d, o) => format!("reads {d:?}, inside its own output {o:?}"),
                Some((d, o)) => format!("reads {d:?}, which holds its own output {o:?}"),
                None => "reads its own output".to_string(),
            };
            return Err(config(format!(
                "{}: {what}; a stage's inputs and outputs must be apart (move the output out of that folder, or read the files, not the folder)",
                at(&st.base)
            )));
        }
        graph.add_edge(nodes[a], nodes[b], ());
    }

    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<&str> = cycle.iter().map(|&i| stages[i].name.as_str()).collect();
        return Err(config(format!("{shown}: the stages form a cycle: {} → {}; remove one of these dependencies", names.join(" → "), names[0])));
    }
    let topo = topo_order(&graph, stages.len());
    let slurm = pf.slurm.clone().unwrap_or_default();
    check_slurm(&slurm).map_err(|m| config(format!("{shown}: `slurm.{m}")))?;
    let p = Pipeline { file, shown, workspace, params, secrets, stages, tenants, graph, topo, overrides: overrides.to_vec(), slurm };
    if let Some(m) = p.check_groups() {
        return Err(config(format!("{}: {m}", p.shown)));
    }
    Ok(p)
}

pub(super) fn expand(
    base: &str,
    def: &StageDef,
    tenant: Option<&str>,
    params: &IndexMap<String, Value>,
    kind: Arc<dyn KindDecl>,
    workspace: &Path,
    secrets: &Arc<crate::util::child_env::Withheld>,
) -> std::result::Result<Stage, StageError> {
    let name = match tenant {
        Some(t) => format!("{base}[{t}]"),
        None => base.to_string(),
    };
    let mut refs = BTreeMap::new();
    // A value in a command is written as is, or as a reference to the
    // variable that holds it (see `shell`): those values join the stage's
    // environment, and so its cache key.
    let mut passed = BTreeMap::new();
    let cmd = def.cmd.as_deref().map(|c| shell::interpolate_cmd(c, params, tenant, &mut refs, &mut passed)).transpose()?;
    let mut with = Map::new();
    let mut with_written = Map::new();
    for (k, v) in &def.with {
        let v = to_json(v, &format!("with.{k}")).map_err(|m| StageError::at_key(k, m))?;
        with.insert(k.clone(), interpolate_value(&v, params, tenant, &mut refs).map_err(|m| StageError::at_key(k, m))?);
        with_written.insert(k.clone(), v);
    }
    let written = crate::workspace::state::Written {
        cmd: def.cmd.as_deref().map(|c| crate::workspace::ContentHash::of_bytes(c.as_bytes())),
        with: (!with_written.is_empty())
            .then(|| crate::workspace::ContentHash::of_bytes(crate::workspace::record::canonical_json(&Value::Object(with_written)).as_bytes())),
    };
    if let Some(t) = tenant {
        with.entry("tenant".to_string()).or_insert_with(|| Value::String(t.to_string()));
    }
    let mut env = BTreeMap::new();
    for (k, v) in &def.env {
        crate::util::child_env::check_declared(k, secrets)?;
        env.insert(k.clone(), interp_str(v, params, tenant, &mut refs)?);
    }
    // The command reads these through its variables (an `env:` entry may not
    // name one: `check_declared`).
    env.extend(passed);
    let declared = kind.declare(&with, tenant)?;
    let mut deps = Vec::new();
    for d in &def.deps {
        deps.push(normalize_dep(&interp_str(d, params, tenant, &mut refs)?, workspace)?);
    }
    for d in declared.deps {
        deps.push(normalize_dep(&d, workspace)?);
    }
    let mut seen = HashSet::new();
    deps.retain(|d| seen.insert(d.clone()));
    let mut outs = Vec::new();
    for o in &def.outs {
        let path = normalize_out(&interp_str(o.path(), params, tenant, &mut refs)?)?;
        outs.push(Out { path, sensitive: o.sensitive(), cache: o.cache() && !o.sensitive() });
    }
    for o in declared.outs {
        let path = normalize_out(&o.path)?;
        outs.push(Out { path, sensitive: o.sensitive, cache: !o.sensitive });
    }
    if kind.name() == "cmd" && outs.is_empty() && deps.is_empty() {
        // Allowed (an always-cached side-effect-free command), but say nothing.
    }
    for d in &deps {
        if outs.iter().any(|o| &o.path == d) {
            return Err(format!("{d:?} is both an input and an output of the stage").into());
        }
    }
    let _ = OutDef::Path(String::new());
    Ok(Stage {
        name,
        base: base.to_string(),
        tenant: tenant.map(str::to_string),
        kind,
        cmd,
        with,
        typed_with: declared.params,
        param_refs: refs,
        written,
        deps,
        outs,
        env,
        secrets: secrets.clone(),
        timeout: def.timeout,
        retries: def.retries,
        desc: def.desc.clone(),
        line: None,
        executor: ExecutorKind::Local,
        resources: Resources::default(),
        group: None,
    })
}

/// Stage resources over pipeline defaults, field by field (`sbatch_args` appended).
pub(super) fn merge_resources(base: Option<&Resources>, over: Option<&Resources>) -> Resources {
    let mut r = base.cloned().unwrap_or_default();
    if let Some(o) = over {
        r.cpus = o.cpus.or(r.cpus);
        r.mem = o.mem.clone().or(r.mem);
        r.time = o.time.or(r.time);
        r.partition = o.partition.clone().or(r.partition);
        r.account = o.account.clone().or(r.account);
        r.sbatch_args.extend(o.sbatch_args.iter().cloned());
    }
    r
}

/// `sbatch` flags dagrun sets itself; `sbatch_args` may not override them.
pub(super) const RESERVED_SBATCH: &[&str] = &[
    "--export",
    "--export-file",
    "--output",
    "-o",
    "--error",
    "-e",
    "--job-name",
    "-J",
    "--parsable",
    "--chdir",
    "-D",
    "--wrap",
    "--get-user-env",
    "--open-mode",
    "--input",
    "-i",
];

/// Check resources; the error starts with the field name.
pub(super) fn check_resources(r: &Resources) -> std::result::Result<(), String> {
    if r.cpus == Some(0) {
        return Err("cpus` must be at least 1".into());
    }
    if r.time == Some(0) {
        return Err("time` must be at least 1 (minutes)".into());
    }
    if let Some(m) = &r.mem {
        let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || m.len() - digits.len() > 1 {
            return Err(format!("mem: {m}` is not a Slurm memory size; write e.g. 4G, 500M or 1024 (megabytes)"));
        }
    }
    let name_ok = |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.,".contains(&b));
    for (k, v) in [("partition", &r.partition), ("account", &r.account)] {
        if let Some(v) = v
            && !name_ok(v)
        {
            return Err(format!("{k}: {v:?}` is not a valid Slurm name (letters, digits, '_', '-', '.', ',')"));
        }
    }
    for a in &r.sbatch_args {
        if !a.starts_with('-') {
            return Err(format!("sbatch_args` entry {a:?} is not an option; write each as one word, e.g. \"--qos=low\""));
        }
        let flag = a.split('=').next().unwrap_or(a);
        if RESERVED_SBATCH.contains(&flag) || (flag.len() > 2 && !flag.starts_with("--") && RESERVED_SBATCH.contains(&&flag[..2])) {
            return Err(format!("sbatch_args` entry {a:?} sets an option dagrun sets itself (job name, output, environment, directory); remove it"));
        }
        if a.contains(['\n', '\0']) {
            return Err(format!("sbatch_args` entry {a:?} contains a control character"));
        }
    }
    Ok(())
}

/// Check `slurm:`; the error starts with the field name.
pub(super) fn check_slurm(s: &SlurmDef) -> std::result::Result<(), String> {
    if let Some(p) = s.poll_interval
        && !(0.1..=600.0).contains(&p)
    {
        return Err(format!("poll_interval: {p}` must be between 0.1 and 600 seconds"));
    }
    if let Some(t) = s.submit_timeout
        && !(1.0..=3600.0).contains(&t)
    {
        return Err(format!("submit_timeout: {t}` must be between 1 and 3600 seconds"));
    }
    if let Some(b) = &s.binary
        && !Path::new(b).is_absolute()
    {
        return Err(format!("binary: {b}` must be an absolute path (the dagrun binary as the compute nodes see it)"));
    }
    if let Some(r) = &s.resources {
        check_resources(r).map_err(|m| format!("resources.{m}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod stage_lines_tests {
    use super::*;

    #[test]
    fn one_pass_lines_equal_the_scan() {
        let t = "params:\n  x: 1\nstages:\n  gen:\n    cmd: echo s1: x\n  \"s1\" :\n    cmd: a\n  s10:\n    cmd: b\n  'q':\n    cmd: c\n  s1 \":\n# note\n  tr-ain:\nother: 1\n  late:\n";
        let lines = StageLines::new(t);
        for name in ["gen", "s1", "s10", "q", "tr-ain", "cmd", "late", "missing", "a:b", "", "s1 "] {
            assert_eq!(lines.get(name), stage_line(t, name), "{name:?}");
        }
        assert_eq!(lines.get("s1"), Some(6));
        let t2 = "stages:\n  a:\n    uses: train\n    with:\n      C: 1\n      promot: auto\n  b:\n    cmd: x\n    promot: 1\n";
        assert_eq!(key_line(t2, 2, "promot"), Some(6));
        assert_eq!(key_line(t2, 2, "missing"), None);
        assert_eq!(lines.get("late"), None);
    }
}
