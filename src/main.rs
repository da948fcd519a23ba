//! The `dagrun` command line: parses arguments, calls the library, maps errors
//! to exit codes (see `dagrun::error::exit`).

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use dagrun::engine::report::Verbosity;
use dagrun::engine::scheduler::{self, RunOptions};
use dagrun::engine::{Engine, lineage, runs, status};
use dagrun::commands;
use dagrun::error::{self, exit};
use dagrun::pipeline;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "dagrun", version, about = "Run multi-tenant ML pipelines as a DAG, with a content-addressed cache, lineage and per-tenant encryption")]
struct Cli {
    /// More output (repeat for debug logs); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Workspace folder (default: found from the pipeline file, or the current folder).
    #[arg(short = 'C', long = "workspace", global = true, value_name = "DIR")]
    workspace: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline: bring every (or every named) stage up to date.
    Run {
        pipeline: PathBuf,
        /// Stages to run (with what they need). `train` means all its tenants, `train[Tenant_A]` one.
        stages: Vec<String>,
        /// Rerun everything selected, or `--force STAGE` that stage and its downstream.
        #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "STAGE")]
        force: Vec<String>,
        /// Stages run at once (default: number of cores).
        #[arg(short, long)]
        jobs: Option<usize>,
        /// Wait up to SECONDS for another run to release the workspace (default: exit 75 at once).
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
        /// Show what would run and why; run nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Override a pipeline param: -p rows=1000.
        #[arg(short = 'p', long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Print the run record as JSON on stdout when done.
        #[arg(long)]
        json: bool,
        /// Where every stage's work runs, overriding the pipeline's `executor:`.
        #[arg(long, value_enum, value_name = "local|slurm")]
        executor: Option<ExecutorArg>,
        /// Also POST OpenLineage events to URL/api/v1/lineage (default: $DAGRUN_OPENLINEAGE_URL).
        #[arg(long, value_name = "URL")]
        openlineage_url: Option<String>,
        /// Write the run's metrics (Prometheus text format) to PATH (default: `metrics_file:` in config/dagrun.yaml).
        #[arg(long, value_name = "PATH")]
        metrics_file: Option<PathBuf>,
    },
    /// Run stages' work inside a Slurm job (started by `dagrun run`; see README "Running on Slurm").
    ExecStage {
        /// The job spec written by the coordinator.
        spec: PathBuf,
    },
    /// Show each stage as fresh or stale, and why.
    Status {
        pipeline: PathBuf,
        stages: Vec<String>,
        #[arg(short = 'p', long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the DAG.
    Dag {
        pipeline: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// Show how an artifact was made, back to its sources.
    Lineage {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Score raw rows of one tenant with its model (Models-as-a-Service).
    Predict {
        #[arg(long)]
        tenant: String,
        /// Raw rows: .csv or .parquet with the spec's columns (Converted optional).
        #[arg(long)]
        input: PathBuf,
        /// Where to write scores (default: stdout). `.csv` or `.jsonl`.
        #[arg(long)]
        output: Option<PathBuf>,
        /// csv or jsonl (default: from the output's extension, else csv).
        #[arg(long)]
        format: Option<String>,
        /// A model version (default: the tenant's current model).
        #[arg(long)]
        model: Option<String>,
    },
    /// Tenant keys: list, rotate, forget (crypto-shredding), export.
    Keys {
        #[command(subcommand)]
        action: KeysCmd,
    },
    /// Show a tenant's feature version: manifest, statistics, lineage.
    Features {
        tenant: String,
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check the cache, state files and recorded outputs; exit 4 on problems.
    Verify {
        /// Delete corrupted cache objects (the next run recomputes or restores).
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write synthetic raw data for one tenant (.csv or .parquet), e.g. for `ingest`.
    Sample {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value_t = 1000)]
        rows: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value = "2026-01-01")]
        as_of: String,
        /// Leave out the Converted label (as at prediction time).
        #[arg(long)]
        no_label: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// List runs, or show one (`dagrun runs show ID|last`).
    Runs {
        #[command(subcommand)]
        action: Option<RunsCmd>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RunsCmd {
    /// One run's record.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Key ids, kinds, states and dates (never key bytes).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Give a tenant a new active data key (old keys still decrypt).
    Rotate {
        tenant: String,
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
    },
    /// Destroy a tenant's keys: its encrypted data becomes unreadable (GDPR art. 17).
    Forget {
        tenant: String,
        /// Confirm: this cannot be undone.
        #[arg(long)]
        yes: bool,
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
    },
    /// Print a tenant's data key as hex (for recovery or reading data with other tools).
    Export {
        tenant: String,
        #[arg(long)]
        key_id: Option<String>,
        /// Required: the key is printed on stdout.
        #[arg(long)]
        i_understand_this_prints_a_secret: bool,
    },
    /// Start a new workspace's keyring under a master key in an HSM (PKCS#11 URI).
    Init {
        #[arg(long, value_name = "URI")]
        master: String,
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
    },
    /// Re-wrap every tenant key under another master key (file -> HSM, HSM -> HSM).
    Rewrap {
        #[arg(long, value_name = "URI")]
        to: String,
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
    },
    /// Show the audit log of key operations; --verify checks its hash chain.
    Audit {
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

fn parse_params(list: &[String]) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(error::config(format!("--param {s:?}: expected NAME=VALUE"))),
        })
        .collect()
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = if cli.quiet {
        "dagrun=error"
    } else {
        match cli.verbose {
            0 => "dagrun=info",
            1 => "dagrun=info",
            _ => "dagrun=debug",
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .without_time()
        .try_init();
}

/// The workspace of commands that take no pipeline (see `commands::find_workspace`).
fn workspace_from_cwd(cli: &Cli) -> Result<PathBuf> {
    Ok(commands::find_workspace(cli.workspace.as_deref())?)
}

fn verbosity(cli: &Cli) -> Verbosity {
    if cli.quiet {
        Verbosity::Quiet
    } else if cli.verbose > 0 {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    }
}

fn main() {
    // A write past RLIMIT_FSIZE (`ulimit -f`) must fail with EFBIG, so the
    // stage fails with a message naming the file and the temp file is
    // cleaned up, instead of SIGXFSZ killing dagrun mid-write. `cmd` stages
    // get the default disposition back (see stages/cmd.rs).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    init_logging(&cli);
    let code = match real_main(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            error::exit_code_of(&e)
        }
    };
    std::process::exit(code);
}

fn load(cli: &Cli, file: &Path, params: &[String]) -> Result<pipeline::Pipeline> {
    pipeline::load(file, cli.workspace.as_deref(), &parse_params(params)?)
}

/// `dagrun status` and `dagrun run --dry-run`.
fn show_status(p: pipeline::Pipeline, stages: &[String], force: &Option<Vec<String>>, json: bool) -> Result<i32> {
    let selected = scheduler::select(&p, stages)?;
    let forced = scheduler::forced(&p, force, &selected)?;
    let mut engine = Engine::new(p);
    engine.forced = forced;
    let rows = status::status(&engine, &selected)?;
    let _ = engine.memo.save();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "stages": rows }))?);
    } else {
        print_status(&rows);
    }
    Ok(exit::OK)
}

fn print_status(rows: &[status::StageStatus]) {
    for r in rows {
        let mark = if r.state == "fresh" { "fresh" } else { "STALE" };
        println!("{mark}  {}", r.stage);
        for reason in &r.reasons {
            println!("         {reason}");
        }
    }
    let stale = rows.iter().filter(|r| r.state == "stale").count();
    println!("{} stages: {} fresh, {stale} stale", rows.len(), rows.len() - stale);
}

fn real_main(cli: &Cli) -> Result<i32> {
    match &cli.command {
        Cmd::Run { pipeline, stages, force, jobs, wait, dry_run, params, json, executor, openlineage_url, metrics_file } => {
            let p = load(cli, pipeline, params)?;
            let force = if force.is_empty() {
                None
            } else if force.iter().any(|f| f.is_empty()) {
                Some(vec![])
            } else {
                Some(force.clone())
            };
            if *dry_run {
                return show_status(p, stages, &force, *json);
            }
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
            let opts = RunOptions {
                targets: stages.clone(),
                force,
                jobs,
                wait: wait.map(Duration::from_secs_f64),
                verbosity: if *json { Verbosity::Quiet } else { verbosity(cli) },
                executor: executor.map(|e| match e {
                    ExecutorArg::Local => pipeline::ExecutorKind::Local,
                    ExecutorArg::Slurm => pipeline::ExecutorKind::Slurm,
                }),
                openlineage_url: openlineage_url.clone(),
                metrics_file: metrics_file.clone(),
            };
            let out = scheduler::run(p, &opts)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&out.record)?);
                return Ok(exit::OK);
            }
            if !cli.quiet {
                let count = |s: runs::Status| out.record.stages.iter().filter(|r| r.status == s).count();
                let (ran, cached, restored) = (count(runs::Status::Ran), count(runs::Status::Cached), count(runs::Status::Restored));
                if ran + restored == 0 {
                    println!("all {} stages up to date ({:.3}s, run {})", out.record.stages.len(), out.record.seconds, out.record.run_id);
                } else {
                    println!(
                        "{} stages: {ran} ran, {restored} restored, {cached} cached ({:.2}s, run {})",
                        out.record.stages.len(),
                        out.record.seconds,
                        out.record.run_id
                    );
                }
                for line in &out.summary {
                    println!("{line}");
                }
            }
            Ok(exit::OK)
        }
        Cmd::ExecStage { spec } => commands::exec_stage::exec_stage(spec),
        Cmd::Status { pipeline, stages, params, json } => {
            let p = load(cli, pipeline, params)?;
            show_status(p, stages, &None, *json)
        }
        Cmd::Dag { pipeline, format } => {
            let p = load(cli, pipeline, &[])?;
            print!("{}", render_dag(&p, *format));
            Ok(exit::OK)
        }
        Cmd::Lineage { path, json } => {
            let abs = std::path::absolute(path)?;
            let ws = match &cli.workspace {
                Some(w) => std::path::absolute(w)?,
                None => abs
                    .parent()
                    .and_then(commands::dagrun_ancestor)
                    .ok_or_else(|| error::config(format!("{}: not inside a dagrun workspace (no .dagrun/ above it)", path.display())))?,
            };
            let rel = abs.strip_prefix(&ws).map(|r| r.to_string_lossy().into_owned()).unwrap_or_else(|_| path.display().to_string());
            let states = dagrun::engine::state::StateStore::new(&ws.join(".dagrun"));
            let tree = lineage::trace(&ws, &states, &rel)
                .ok_or_else(|| error::config(format!("{rel}: no stage in {} has produced this path; is it an output of a pipeline that ran?", ws.display())))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&tree)?);
            } else {
                print!("{}", lineage::render(&tree));
            }
            Ok(exit::OK)
        }
        Cmd::Predict { tenant, input, output, format, model } => {
            let ws = workspace_from_cwd(cli)?;
            let args = commands::predict::PredictArgs { tenant: tenant.clone(), input: input.clone(), output: output.clone(), format: format.clone(), model: model.clone() };
            let n = commands::predict::predict(&ws, &args)?;
            if let Some(o) = output {
                if !cli.quiet {
                    eprintln!("scored {n} rows of tenant {tenant} into {}", o.display());
                }
            }
            Ok(exit::OK)
        }
        Cmd::Keys { action } => {
            let ws = workspace_from_cwd(cli)?;
            let secs = |w: &Option<f64>| w.map(Duration::from_secs_f64);
            match action {
                KeysCmd::List { json } => commands::keys::list(&ws, *json)?,
                KeysCmd::Rotate { tenant, wait } => commands::keys::rotate(&ws, tenant, secs(wait))?,
                KeysCmd::Forget { tenant, yes, wait } => commands::keys::forget(&ws, tenant, *yes, secs(wait))?,
                KeysCmd::Export { tenant, key_id, i_understand_this_prints_a_secret } => {
                    commands::keys::export(&ws, tenant, key_id.as_deref(), *i_understand_this_prints_a_secret)?
                }
                KeysCmd::Init { master, wait } => commands::keys::init(&ws, master, secs(wait))?,
                KeysCmd::Rewrap { to, wait } => commands::keys::rewrap(&ws, to, secs(wait))?,
                KeysCmd::Audit { verify } => commands::keys::audit(&ws, *verify)?,
            }
            Ok(exit::OK)
        }
        Cmd::Features { tenant, version, json } => {
            let ws = workspace_from_cwd(cli)?;
            commands::features::show(&ws, tenant, version.as_deref(), *json)?;
            Ok(exit::OK)
        }
        Cmd::Verify { repair, json } => {
            let ws = workspace_from_cwd(cli)?;
            let r = commands::verify::verify(&ws, *repair)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                println!("checked {} cache objects and {} stages: {} problems", r.objects_checked, r.stages_checked, r.problems.len());
            }
            Ok(if r.problems.is_empty() { exit::OK } else { exit::INTEGRITY })
        }
        Cmd::Sample { tenant, rows, seed, as_of, no_label, out } => {
            let as_of = dagrun::data::schema::parse_date(as_of).map_err(|e| error::config(format!("--as-of: {e:#}")))?;
            commands::sample::sample(out, tenant, *rows, *seed, as_of, !*no_label)?;
            Ok(exit::OK)
        }
        Cmd::Runs { action, json } => {
            let ws = workspace_from_cwd(cli)?;
            match action {
                None => {
                    let all = runs::list(&ws);
                    if *json {
                        let v: Vec<_> = all
                            .iter()
                            .map(|r| serde_json::json!({"run_id": r.run_id, "pipeline": r.pipeline, "started_at": r.started_at, "seconds": r.seconds, "status": r.status, "exit_code": r.exit_code}))
                            .collect();
                        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "runs": v }))?);
                    } else if all.is_empty() {
                        println!("no runs recorded in {}", ws.join("runs").display());
                    } else {
                        println!("{:<26} {:<11} {:>8}  {:<24} stages", "RUN", "STATUS", "SECONDS", "PIPELINE");
                        for r in &all {
                            let c = |s| r.stages.iter().filter(|x| x.status == s).count();
                            println!(
                                "{:<26} {:<11} {:>8.2}  {:<24} {} ran, {} cached, {} restored, {} failed",
                                r.run_id,
                                r.status,
                                r.seconds,
                                r.pipeline,
                                c(runs::Status::Ran),
                                c(runs::Status::Cached),
                                c(runs::Status::Restored),
                                c(runs::Status::Failed)
                            );
                        }
                    }
                }
                Some(RunsCmd::Show { id, json: json2 }) => {
                    let r = runs::find(&ws, id)?;
                    if *json || *json2 {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        println!("run {}  {}  exit {}  {:.2}s  {}", r.run_id, r.status, r.exit_code, r.seconds, r.pipeline);
                        println!("started {}  finished {}", r.started_at, r.finished_at);
                        for s in &r.stages {
                            println!("  {:<9} {:<28} {:>7.2}s", s.status.as_str(), s.stage, s.seconds);
                            for reason in &s.reasons {
                                println!("            {reason}");
                            }
                            if let Some(e) = &s.error {
                                for l in e.lines() {
                                    println!("            {l}");
                                }
                            }
                        }
                    }
                }
            }
            Ok(exit::OK)
        }
    }
}

fn node_id(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

fn render_dag(p: &pipeline::Pipeline, format: DagFormat) -> String {
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
