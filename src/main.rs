//! The `dagrun` command line: parses arguments, calls the library, maps errors
//! to exit codes (see `dagrun::error::exit`).

use anyhow::Result;
use clap::{Parser, Subcommand};
use dagrun::commands;
use dagrun::commands::dag::DagFormat;
use dagrun::engine::report::Verbosity;
use dagrun::error::{self, exit};
use dagrun::pipeline;
use dagrun::workspace::Workspace;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "dagrun", version, about = "Run multi-tenant ML pipelines as a DAG, with a content-addressed cache, lineage and per-tenant encryption")]
struct Cli {
    /// More output (repeat for debug logs); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors and warnings (and what a command was asked for).
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
        #[arg(short, long, value_parser = commands::parse_jobs)]
        jobs: Option<usize>,
        /// Wait up to SECONDS for another run to release the workspace (default: exit 75 at once).
        #[arg(long, value_name = "SECONDS", value_parser = commands::parse_seconds)]
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
        /// Consult the remote cache for stages whose key is not in the local cache.
        #[arg(long)]
        pull: bool,
        /// The remote for --pull (default: `remote:` in config/dagrun.yaml).
        #[arg(long, value_name = "URL", requires = "pull")]
        remote: Option<String>,
        /// Also POST OpenLineage events to URL/api/v1/lineage (default: $DAGRUN_OPENLINEAGE_URL).
        #[arg(long, value_name = "URL")]
        openlineage_url: Option<String>,
        /// Write the run's metrics (Prometheus text format) to PATH (default: `metrics_file:` in config/dagrun.yaml).
        #[arg(long, value_name = "PATH")]
        metrics_file: Option<PathBuf>,
        /// Where every stage's work runs, overriding the pipeline's `executor:`.
        #[arg(long, value_enum, value_name = "local|slurm")]
        executor: Option<commands::run::ExecutorArg>,
    },
    /// Run stages' work inside a Slurm job (started by `dagrun run`; see README "Running on Slurm").
    ExecStage {
        /// The job spec written by the coordinator.
        spec: PathBuf,
    },
    /// Upload cache objects and records the remote cache lacks.
    Push(commands::push::Args),
    /// Fetch cache objects and records the local workspace lacks (verified).
    Pull(commands::push::PullArgs),
    /// Show each stage as fresh or stale, and why.
    Status {
        pipeline: PathBuf,
        /// Only these stages (and what they need).
        stages: Vec<String>,
        /// Override a pipeline param, as `run -p` would: -p rows=1000.
        #[arg(short = 'p', long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Print `{"stages": [{"stage", "state", "reasons", "action"}]}` (README "Results as JSON").
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
        /// Print the tree of nodes as JSON (README "Results as JSON").
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
        /// Where to write scores (default: stdout). `.csv`, `.jsonl` or `.parquet`.
        #[arg(long)]
        output: Option<PathBuf>,
        /// csv, jsonl or parquet (default: from the output's extension, else csv).
        #[arg(long)]
        format: Option<String>,
        /// A model version: registered, or an earlier output of train in the cache (default: the tenant's champion; with no registered model, train's current output).
        #[arg(long)]
        model: Option<String>,
    },
    /// Keys: list, rotate, forget (crypto-shredding), export; init and rewrap (master key, HSM), audit.
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
    /// Remove cache entries and objects that neither the current state nor the newest runs use.
    Gc(commands::gc::Args),
    /// Check the cache, state files and recorded outputs; exit 4 on problems.
    Verify {
        /// Under the workspace lock: delete what the next run rebuilds (corrupted cache objects and records) and store an intact output whose cached copy is gone back in the cache.
        #[arg(long)]
        repair: bool,
        /// With --repair: wait up to SECONDS for a run holding the workspace (default: exit 75 at once).
        #[arg(long, value_name = "SECONDS", value_parser = commands::parse_seconds, requires = "repair")]
        wait: Option<f64>,
        /// Print the report as JSON.
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
    /// Write one run as a self-contained HTML report (DAG, timeline, model cards, drift).
    Report {
        /// Run id (or unique prefix), or `last`.
        #[arg(default_value = "last")]
        run: String,
        /// Output file (default: runs/RUN_ID.html).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// DAG layout: Graphviz `dot` when installed (auto), or the built-in one.
        #[arg(long, value_enum, default_value = "auto")]
        layout: ReportLayout,
    },
    /// Serve models over HTTP (Open Inference Protocol V2 and MLflow /invocations).
    Serve(commands::serve::ServeArgs),
    /// API tokens of `dagrun serve`: create, list, revoke.
    Tokens {
        #[command(subcommand)]
        action: commands::tokens::TokensCmd,
    },
    /// The model registry: list, promote, rollback, history.
    Models {
        #[command(subcommand)]
        action: commands::models::ModelsCmd,
    },
    /// List runs, show one (`dagrun runs show ID|last`), or remove old records (`dagrun runs prune`).
    Runs {
        #[command(subcommand)]
        action: Option<RunsCmd>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportLayout {
    Auto,
    Dot,
    Builtin,
}

#[derive(Subcommand)]
enum RunsCmd {
    /// One run's record.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove old run records (kept: the newest N, runs that made current outputs, runs with open lineage).
    Prune(commands::runs::PruneArgs),
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
        #[arg(long, value_name = "SECONDS", value_parser = commands::parse_seconds)]
        wait: Option<f64>,
    },
    /// Destroy a tenant's keys: its encrypted data becomes unreadable (GDPR art. 17).
    Forget {
        tenant: String,
        /// Confirm: this cannot be undone.
        #[arg(long)]
        yes: bool,
        #[arg(long, value_name = "SECONDS", value_parser = commands::parse_seconds)]
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
        #[arg(long, value_name = "SECONDS", value_parser = commands::parse_seconds)]
        wait: Option<f64>,
    },
    /// Re-wrap every tenant key under another master key (file -> HSM, HSM -> HSM).
    Rewrap {
        #[arg(long, value_name = "URI")]
        to: String,
        #[arg(long, value_name = "SECONDS", value_parser = commands::parse_seconds)]
        wait: Option<f64>,
    },
    /// Show the audit log of key operations; --verify checks its hash chain.
    Audit {
        #[arg(long)]
        verify: bool,
    },
}

/// The value `--force` took in `args` when it names a pipeline file (ends
/// in `.yaml`/`.yml`, or is a file), if any.
fn force_took_the_pipeline(args: Vec<String>) -> Option<String> {
    let i = args.iter().position(|a| a == "--force")?;
    let v = args.get(i + 1)?;
    (v.ends_with(".yaml") || v.ends_with(".yml") || std::path::Path::new(v).is_file()).then(|| v.clone())
}

fn parse_params(list: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(list.len());
    for s in list {
        let Some((k, v)) = s.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
            return Err(error::config(format!("--param {s:?}: expected NAME=VALUE")));
        };
        let k = k.trim().to_string();
        // One value each: the last of two would win silently (as a key twice in YAML would).
        if let Some((_, first)) = out.iter().find(|(n, _)| *n == k) {
            return Err(error::config(format!("--param {k} is given twice ({k}={first:?}, {k}={v:?}); give it once")));
        }
        out.push((k, v.to_string()));
    }
    Ok(out)
}

/// Crates whose verbose logs would quote secrets (see `init_logging`).
const HTTP_LOG_TARGETS: &[&str] = &["ureq", "ureq_proto", "hyper", "hyper_util", "h2", "reqwest", "rustls", "object_store"];

/// `RUST_LOG` without its directives that name a capped crate (or one of its
/// modules): `hyper=trace,dagrun=debug` → `dagrun=debug`.
fn without_capped_targets(rust_log: &str) -> String {
    rust_log
        .split(',')
        .filter(|d| {
            let target = d.trim().trim_start_matches('[').split(['=', '[', ':']).next().unwrap_or("");
            !HTTP_LOG_TARGETS.iter().any(|t| target == *t || target.replace('-', "_") == *t)
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    // `-q` keeps warnings: a cron job's log is where an undelivered event,
    // an orphan job cancelled or a file dagrun removed is seen (review 69).
    let default = if cli.quiet {
        "dagrun=warn"
    } else {
        match cli.verbose {
            0 => "dagrun=info",
            1 => "dagrun=info",
            _ => "dagrun=debug",
        }
    };
    // The HTTP crates' debug and trace output quotes request heads: an
    // `Authorization: Bearer` token (OpenLineage, a serve client's), S3
    // signatures, a URL's query. Capped whatever RUST_LOG asks: its
    // directives for those crates or their modules (`ureq_proto::util=trace`
    // would be more specific than a cap) are dropped, then the caps added.
    let from_env = std::env::var("RUST_LOG").ok().map(|v| without_capped_targets(&v));
    let mut filter = from_env.and_then(|v| EnvFilter::try_new(v).ok()).unwrap_or_else(|| EnvFilter::new(default));
    for target in HTTP_LOG_TARGETS {
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).with_target(false).without_time().try_init();
}

/// The existing workspace of commands that take no pipeline (exit 2 when
/// there is none; see `dagrun::workspace`).
fn workspace_from_cwd(cli: &Cli) -> Result<PathBuf> {
    Ok(Workspace::existing_from_cwd(cli.workspace.as_deref())?.root().to_path_buf())
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
    // Before anything can load a key: no core dumps, not ptrace-able.
    dagrun::crypto::harden_process();
    dagrun::util::alloc::limit_malloc_arenas();
    // A write past RLIMIT_FSIZE (`ulimit -f`) must fail with EFBIG, so the
    // stage fails with a message naming the file and the temp file is
    // cleaned up, instead of SIGXFSZ killing dagrun mid-write. `cmd` stages
    // get the default disposition back (see stages/cmd.rs).
    #[cfg(unix)]
    // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety
    // question arises; this runs first in main, before any thread is spawned.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // `dagrun run --force p.yaml`: `--force` took the file as the stage it
        // reruns, and the pipeline is missing. Say so, with the fix.
        if e.kind() == clap::error::ErrorKind::MissingRequiredArgument
            && let Some(file) = force_took_the_pipeline(std::env::args().collect())
        {
            let _ = writeln!(
                std::io::stderr(),
                "error: `--force {file}` took {file} as the stage to rerun, so no pipeline was given; put the pipeline before `--force`: `dagrun run {file} … --force` (everything) or `… --force STAGE`"
            );
            std::process::exit(exit::CONFIG);
        }
        e.exit()
    });
    // SIGPIPE stays ignored (Rust's default): a command whose stdout reader
    // goes away (`dagrun status | head`) ends quietly through `outln!`
    // (`util::stdout`), while a write to a closed socket stays an error.
    init_logging(&cli);
    dagrun::util::stdout::set_quiet(cli.quiet);
    let code = match real_main(&cli) {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn exit 1 or 2 into a panic's 101.
            // A message may quote a file name or a field dagrun did not write:
            // its escape sequences are shown, never obeyed by the terminal.
            let _ = writeln!(std::io::stderr(), "error: {}", dagrun::util::escape_controls_in_lines(&format!("{e:#}")));
            error::exit_code_of(&e)
        }
    };
    std::process::exit(code);
}

fn load(cli: &Cli, file: &Path, params: &[String]) -> Result<pipeline::Pipeline> {
    let ws = Workspace::for_pipeline(cli.workspace.as_deref(), file);
    pipeline::load(file, Some(ws.root()), &parse_params(params)?, &dagrun::stages::kinds())
}

fn real_main(cli: &Cli) -> Result<i32> {
    match &cli.command {
        Cmd::Push(a) => commands::push::command(cli.workspace.as_deref(), a, commands::push::Transfer::Push),
        Cmd::Pull(a) => {
            commands::push::command(cli.workspace.as_deref(), &a.common, commands::push::Transfer::Pull { wait: a.wait.map(Duration::from_secs_f64) })
        }
        Cmd::ExecStage { spec } => commands::exec_stage::exec_stage(spec),
        Cmd::Run { pipeline, stages, force, jobs, wait, dry_run, params, json, pull, remote, openlineage_url, metrics_file, executor } => {
            let p = load(cli, pipeline, params).inspect_err(|e| {
                // Only for a pipeline file that is there: a mistyped path is no pipeline
                // (its series would stay in the file for good: helper-73).
                if dagrun::error::exit_code_of(e) == exit::CONFIG && !*dry_run && pipeline.is_file() {
                    let ws = Workspace::for_pipeline(cli.workspace.as_deref(), pipeline);
                    let file = std::path::absolute(pipeline).unwrap_or_else(|_| pipeline.clone());
                    let root = std::path::absolute(ws.root()).unwrap_or_else(|_| ws.root().to_path_buf());
                    commands::run::note_failed_start(&root, &dagrun::pipeline::shown_name(&file, &root), metrics_file.as_deref());
                }
            })?;
            let args = commands::run::RunArgs {
                stages: stages.clone(),
                force: force.clone(),
                jobs: *jobs,
                wait: *wait,
                dry_run: *dry_run,
                json: *json,
                verbosity: verbosity(cli),
                remote: if *pull { Some(commands::pull::hook(&p.workspace, remote.as_deref())?) } else { None },
                openlineage_url: openlineage_url.clone(),
                metrics_file: metrics_file.clone(),
                executor: *executor,
            };
            commands::run::run(p, &args)
        }
        Cmd::Status { pipeline, stages, params, json } => commands::status::show(load(cli, pipeline, params)?, stages, &None, *json),
        Cmd::Dag { pipeline, format } => {
            dagrun::out!("{}", commands::dag::render(&load(cli, pipeline, &[])?, *format));
            Ok(exit::OK)
        }
        Cmd::Lineage { path, json } => {
            commands::lineage::show(cli.workspace.as_deref(), path, *json)?;
            Ok(exit::OK)
        }
        Cmd::Predict { tenant, input, output, format, model } => {
            let ws = workspace_from_cwd(cli)?;
            let args = commands::predict::PredictArgs {
                tenant: tenant.clone(),
                input: input.clone(),
                output: output.clone(),
                format: format.clone(),
                model: model.clone(),
            };
            let n = commands::predict::predict(&ws, &args)?;
            if let Some(o) = output
                && !cli.quiet
            {
                eprintln!("scored {n} rows of tenant {tenant} into {}", o.display());
            }
            Ok(exit::OK)
        }
        Cmd::Keys { action } => {
            // `keys init` may start a workspace; every other key command needs one.
            let ws = match action {
                KeysCmd::Init { .. } => Workspace::new_or_existing(cli.workspace.as_deref())?.root().to_path_buf(),
                _ => workspace_from_cwd(cli)?,
            };
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
            commands::features::show(&workspace_from_cwd(cli)?, tenant, version.as_deref(), *json)?;
            Ok(exit::OK)
        }
        Cmd::Gc(a) => commands::gc::run(&workspace_from_cwd(cli)?, a),
        Cmd::Verify { repair, wait, json } => commands::verify::run(&workspace_from_cwd(cli)?, *repair, wait.map(Duration::from_secs_f64), *json),
        Cmd::Sample { tenant, rows, seed, as_of, no_label, out } => {
            let as_of = dagrun::data::schema::parse_date(as_of).map_err(|e| error::config(format!("--as-of: {e:#}")))?;
            commands::sample::sample(out, tenant, *rows, *seed, as_of, !*no_label)?;
            Ok(exit::OK)
        }
        Cmd::Report { run, output, layout } => {
            let ws = workspace_from_cwd(cli)?;
            let l = match layout {
                ReportLayout::Auto => dagrun::report::Layout::Auto,
                ReportLayout::Dot => dagrun::report::Layout::Dot,
                ReportLayout::Builtin => dagrun::report::Layout::Builtin,
            };
            dagrun::outln!("{}", commands::report::report(&ws, run, output.as_deref(), l)?.display());
            Ok(exit::OK)
        }
        Cmd::Serve(a) => commands::serve::run(&workspace_from_cwd(cli)?, a).map(|_| exit::OK),
        Cmd::Tokens { action } => commands::tokens::run(&workspace_from_cwd(cli)?, action).map(|_| exit::OK),
        Cmd::Models { action } => commands::models::run(&workspace_from_cwd(cli)?, action).map(|_| exit::OK),
        Cmd::Runs { action, json } => {
            let ws = workspace_from_cwd(cli)?;
            match action {
                None => commands::runs::list(&ws, *json)?,
                Some(RunsCmd::Show { id, json: json2 }) => commands::runs::show(&ws, id, *json || *json2)?,
                Some(RunsCmd::Prune(a)) => commands::runs::prune(&ws, a, *json || a.delete.json)?,
            }
            Ok(exit::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rust_log_directives_for_the_http_crates_are_dropped() {
        assert_eq!(super::without_capped_targets("hyper=trace,dagrun=debug"), "dagrun=debug");
        assert_eq!(super::without_capped_targets("ureq_proto::util=trace"), "");
        assert_eq!(super::without_capped_targets("trace"), "trace");
        assert_eq!(super::without_capped_targets("dagrun::engine=trace,object_store=debug,h2=trace"), "dagrun::engine=trace");
    }
}
