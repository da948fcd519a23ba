//! `dagrun serve`: run the HTTP server (see `crate::serve`) until SIGTERM or
//! SIGINT, then drain and exit 0.

use crate::serve::{ServeOptions, check_workers, state::Limits};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: String,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (e.g. behind a TLS proxy).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Worker threads (default: number of cores).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Largest request body in bytes (default 8 MiB); larger → 413.
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    pub max_body: usize,
    /// Most rows per request; more → 413.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub max_rows: usize,
    /// A request's body must arrive within this (else 408), and its scoring
    /// start within it (else 503: the server is busy).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub request_timeout: f64,
    /// Request headers (and a TLS handshake) must arrive within this.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub header_timeout: f64,
    /// On SIGTERM, wait at most this for in-flight requests.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub drain_timeout: f64,
    /// Connections held open at once; one more is closed as soon as it is
    /// accepted (and counted in /metrics).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
    /// Folder of the audit log (default .dagrun/audit/).
    #[arg(long, value_name = "DIR")]
    pub audit_dir: Option<PathBuf>,
}

fn secs(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(crate::error::config(format!("--{flag} {v}: give a number of seconds greater than 0 and at most 86400")));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Run the server in the foreground.
pub fn run(workspace: &Path, a: &ServeArgs) -> Result<()> {
    let workers = match a.workers {
        Some(n) => check_workers(n).map_err(|e| crate::error::config(e.to_string()))?,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
    };
    for (flag, v) in [("--max-body", a.max_body), ("--max-rows", a.max_rows), ("--max-connections", a.max_connections)] {
        if v == 0 {
            return Err(crate::error::config(format!("{flag} 0: give at least 1")));
        }
    }
    let opts = ServeOptions {
        workspace: workspace.to_path_buf(),
        listen: a.listen.clone(),
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        insecure_plaintext: a.insecure_plaintext,
        audit_dir: a.audit_dir.clone(),
        limits: Limits {
            max_body: a.max_body,
            max_rows: a.max_rows,
            request_timeout: secs("request-timeout", a.request_timeout)?,
            header_timeout: secs("header-timeout", a.header_timeout)?,
            drain_timeout: secs("drain-timeout", a.drain_timeout)?,
            max_connections: a.max_connections,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("dagrun-serve")
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        // The handlers are installed before the server starts (and says it
        // is listening): a SIGTERM right after that line must drain, not
        // kill the process with the default action.
        use tokio::signal::unix::{SignalKind, signal};
        // The first SIGTERM or SIGINT drains; a second one stops the drain
        // (requests in flight are cut off; the audit log is still flushed).
        let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        let (signals, mut seen) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                signals.send_modify(|n| *n += 1);
            }
        });
        let mut seen2 = seen.clone();
        let shutdown = async move {
            let _ = seen.wait_for(|n| *n >= 1).await;
            tracing::info!("shutting down: no new connections; finishing requests in flight (a second signal stops at once)");
        };
        let force = async move {
            let _ = seen2.wait_for(|n| *n >= 2).await;
            tracing::warn!("second signal: not waiting for the requests in flight");
        };
        let insecure = a.insecure_plaintext;
        crate::serve::serve(opts, shutdown, force, |r, notes| {
            let scheme = if r.tls { "https" } else { "http" };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "dagrun serve: listening on {scheme}://{} ({workers} workers)", r.addr);
            for n in notes {
                let _ = writeln!(out, "  {n}");
            }
            if !r.tls && insecure && !r.addr.ip().is_loopback() {
                let _ = writeln!(out, "  WARNING: plain HTTP on a non-loopback address (--insecure-plaintext): tokens and data cross the network unencrypted");
            }
            let _ = out.flush();
        })
        .await
    })?;
    crate::engine::report::say("dagrun serve: stopped");
    Ok(())
}
