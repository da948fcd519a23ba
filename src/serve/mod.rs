//! `dagrun serve`: Models-as-a-Service over HTTP.
//!
//! Two protocols on one listener, both scoring with [`crate::scoring`] (the
//! path `predict` uses, so the scores are bit-identical): the Open Inference
//! Protocol (KServe V2 REST, model name = tenant id) and MLflow's scoring
//! server (`/invocations`). Per-tenant bearer tokens ([`tokens`]); models from
//! the registry, switched without a restart ([`state`]); `/metrics`
//! ([`metrics`]); an audit line per scoring request ([`audit`]).
//!
//! Rules of this module (the listener):
//! - `--listen` is an IP address and port, or a host name that resolves and a
//!   port ([`listen_addr`]). Start-up errors, an address that cannot be bound
//!   included, are exit 2 with the fix ([`bind_error`]); an `--audit-dir` is
//!   held to `Workspace::check_user_output`. No usable token is warned of.
//! - Plain HTTP only on a loopback address unless `insecure_plaintext` is
//!   set; TLS is rustls (ring), HTTP/1.1.
//! - At most `max_connections` connections are held at once (fewer when the
//!   open-file limit cannot hold them with descriptors to spare for files:
//!   [`fit_connections`]). A connection accepted when they are all open
//!   closes, at once, the oldest one that is idle ([`idle`]: waiting for its
//!   first bytes, headers or a body that trickle in, or an idle keep-alive;
//!   not one whose answer is being made or written) and takes its place
//!   (`dagrun_serve_connections_evicted_total`): idle connections, however
//!   many one client opens, cannot lock everyone else out (reviews 26, 28,
//!   29). Only when no connection is idle is the new one closed at once
//!   (`dagrun_serve_connections_refused_total`).
//! - Slow clients: request headers must arrive within `header_timeout`
//!   (else the connection is closed), a whole request within
//!   `request_timeout` (else 408); a TLS handshake within `header_timeout`;
//!   a client that takes no byte of its answers for `request_timeout` is
//!   disconnected ([`send_timeout`]). A connection's slot is freed however
//!   its task ends.
//! - Shutdown (SIGTERM/SIGINT, see `commands::serve`): stop accepting at once
//!   (the listening socket is closed), mark not ready, let every in-flight
//!   request finish (its answer written), for at most `drain_timeout`, and
//!   close at once the connections with no request started (idle keep-alive,
//!   half-sent headers: [`unstarted`]); then flush the audit log and return.

pub mod audit;
pub mod input;
pub mod metrics;
pub mod router;
pub mod send_timeout;
pub mod state;
pub mod tokens;

use anyhow::{Context, Result, bail};
use hyper_util::rt::{TokioIo, TokioTimer};
use state::{Limits, Shared, Watch};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Everything `dagrun serve` is given.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub workspace: PathBuf,
    pub listen: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_plaintext: bool,
    pub audit_dir: Option<PathBuf>,
    pub limits: Limits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 8 << 20,
            max_rows: 100_000,
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Largest certificate chain or key file read (a chain of a few certificates is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A PEM file named by `flag`: a regular file (a link to one is fine) of at
/// most [`MAX_PEM_BYTES`], read without waiting, so a FIFO or a device in its
/// place is refused, never waited on nor read without end. A key file must
/// not be readable by others (group-readable is the `ssl-cert` convention).
fn read_pem(path: &std::path::Path, flag: &str, private: bool) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| crate::error::config(format!("{flag} {shown}: cannot read it ({e})")))?;
    if !meta.is_file() {
        return Err(crate::error::config(format!("{flag} {shown}: not a regular file (a FIFO, a device or a folder); give the PEM file itself")));
    }
    if private {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(crate::error::config(format!(
                "{flag} {shown} has mode {mode:04o}: the private key is readable by every user; run `chmod 600 {shown}` (or 640 with a group such as ssl-cert)"
            )));
        }
    }
    let bytes = crate::util::read_capped(path, MAX_PEM_BYTES)
        .map_err(|e| crate::error::config(format!("{flag} {shown}: cannot read it ({e}); a PEM file is at most 1 MiB")))?;
    Ok(zeroize::Zeroizing::new(bytes))
}

fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_pem = read_pem(cert, "--tls-cert", false)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| crate::error::config(format!("--tls-cert {}: not a PEM certificate chain ({e})", cert.display())))?;
    if certs.is_empty() {
        return Err(crate::error::config(format!("--tls-cert {}: no CERTIFICATE block found; give a PEM certificate chain", cert.display())));
    }
    let key_pem = read_pem(key, "--tls-key", true)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| crate::error::config(format!("--tls-key {}: not a PEM private key ({e})", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| crate::error::config(format!("--tls-cert/--tls-key: the key does not fit the certificate or is unsupported ({e})")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The address of `--listen`: an IP address and port, or a host name and
/// port that resolves (`localhost:8080`); of a name's addresses the first
/// IPv4 one (what a client of `http://localhost` tries first), else the
/// first. Every other check (loopback or TLS) applies to that address.
fn listen_addr(listen: &str) -> Result<SocketAddr> {
    if let Ok(a) = listen.parse() {
        return Ok(a);
    }
    let bad =
        |why: String| crate::error::config(format!("--listen {listen}: {why}; give an address and port such as 127.0.0.1:8080, [::1]:8080 or localhost:8080"));
    let Some((host, port)) = listen.rsplit_once(':').filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) else {
        return Err(bad("not an address and port".into()));
    };
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port.parse::<u16>().unwrap_or(0)))
        .map_err(|e| bad(format!("the host name {host} does not resolve ({e})")))?
        .collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| bad(format!("the host name {host} has no address")))
}

/// A start-up error (exit 2) for a `--listen` address that cannot be bound,
/// with what to do.
fn bind_error(addr: SocketAddr, e: &std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    let fix = match e.kind() {
        ErrorKind::AddrInUse => format!(
            "another process listens on port {} (`ss -ltnp 'sport = :{}'` names it): stop it, or give another port with --listen",
            addr.port(),
            addr.port()
        ),
        ErrorKind::PermissionDenied => "ports below 1024 need privileges: give a port of 1024 or more with --listen (a proxy in front may take 443)".into(),
        ErrorKind::AddrNotAvailable => "that address is not one of this machine's: give one of its addresses with --listen, or 0.0.0.0 for all".into(),
        _ => "give another address or port with --listen".into(),
    };
    crate::error::config(format!("--listen {addr}: cannot listen there ({e}); {fix}"))
}

/// A started server: its address and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Serve until `shutdown` resolves, then drain (until `force` resolves, at
/// most the drain timeout). `on_start` is called once the socket is bound
/// (the address is printed by the caller).
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
    force: impl std::future::Future<Output = ()>,
    on_start: impl FnOnce(&Running, &[String]),
) -> Result<()> {
    let addr = listen_addr(&opts.listen)?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(tokio_rustls::TlsAcceptor::from(tls_config(c, k)?)),
        (None, None) => None,
        _ => return Err(crate::error::config("--tls-cert and --tls-key go together: give both or neither")),
    };
    if tls.is_none() && !addr.ip().is_loopback() && !opts.insecure_plaintext {
        return Err(crate::error::config(format!(
            "--listen {addr}: not a loopback address, and no TLS: tokens and data would cross the network in clear. Give --tls-cert and --tls-key, or --insecure-plaintext if a TLS proxy in front of dagrun does this"
        )));
    }
    let dagrun_dir = opts.workspace.join(crate::engine::DAGRUN_DIR);
    if !dagrun_dir.is_dir() {
        return Err(crate::error::config(format!("{}: not a dagrun workspace (no .dagrun/); run a pipeline first or pass -C DIR", opts.workspace.display())));
    }
    // The audit log and last-used times go to dagrun's own folders.
    crate::workspace::own_dirs::check(&opts.workspace)?;
    // Models are verified with the workspace integrity key. Without a master
    // key (no pipeline has run here) the server starts and answers 503.
    let integrity = crate::crypto::Keyring::open_existing(&opts.workspace)?.map(|r| r.integrity_key());
    if integrity.is_none() {
        tracing::warn!("no master key in {}: no model can be verified; every tenant answers 503 until a pipeline has run here", opts.workspace.display());
    }
    let mut opts = opts;
    opts.limits.max_connections = fit_connections(opts.limits.max_connections)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let default_audit = dagrun_dir.join("audit");
    let audit_dir = match &opts.audit_dir {
        // The default, written out (review 66): as if left out.
        Some(d) if std::path::absolute(d).ok() == std::path::absolute(&default_audit).ok() => default_audit,
        // Where `report -o` and `predict --output` may write: not in config/, .dagrun/, .git/, on a run record.
        Some(d) => {
            crate::workspace::Workspace::at(&opts.workspace)
                .check_user_output(&audit::file_for(d, chrono::Utc::now().date_naive()), "--audit-dir: its log file")?;
            d.clone()
        }
        None => default_audit,
    };
    let audit = audit::Audit::start(audit_dir, metrics.clone())?;
    let (prefix, request_key) = {
        let mut b = [0u8; 4];
        let mut k = [0u8; 32];
        use rand::TryRng;
        rand::rngs::SysRng.try_fill_bytes(&mut b).context("the operating system's random number generator failed")?;
        rand::rngs::SysRng.try_fill_bytes(&mut k).context("the operating system's random number generator failed")?;
        (hex::encode(b), k)
    };
    let shared = Arc::new(Shared {
        workspace: opts.workspace.clone(),
        dagrun_dir: dagrun_dir.clone(),
        integrity,
        models: Default::default(),
        tokens: Default::default(),
        metrics,
        audit,
        limits: opts.limits.clone(),
        draining: AtomicBool::new(false),
        request_prefix: prefix,
        request_counter: Default::default(),
        request_key,
        bodies: tokio::sync::Semaphore::new(state::body_budget_kib(opts.limits.max_body)),
        tenant_bodies: Default::default(),
        scoring: tokio::sync::Semaphore::new(tokio::runtime::Handle::current().metrics().num_workers().max(1)),
    });
    let mut watch = Watch::default();
    shared.reload_tokens(&mut watch);
    let mut notes = shared.reload_models(&mut watch);
    if shared.tokens.load().usable(chrono::Utc::now()) == 0 {
        notes.push(
            "WARNING: no valid API token: every scoring request gets 401 until one is made with `dagrun tokens create TENANT` (picked up without a restart)"
                .into(),
        );
    }
    let listener = TcpListener::bind(addr).await.map_err(|e| bind_error(addr, &e))?;
    let running = Running { addr: listener.local_addr()?, tls: tls.is_some() };
    on_start(&running, &notes);

    let stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (s, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new().name("dagrun-reload".into()).spawn(move || state::reload_loop(s, st, watch))?
    };

    let app = router::router(shared.clone());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let active = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(std::sync::Mutex::new(OpenConns::default()));
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off briefly instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let n = active.load(Ordering::SeqCst);
        if n >= shared.limits.max_connections {
            // Make room by closing the oldest connection not in a request;
            // if every one is in a request (or too many are being closed
            // already), this one is closed at once (the client sees a reset
            // or end of stream): never queued, never a descriptor held for it.
            let victim = if n < shared.limits.max_connections + MAX_CLOSING { open.lock().unwrap_or_else(|e| e.into_inner()).evict_idle() } else { None };
            match victim {
                Some(v) => {
                    v.notify_one();
                    shared.metrics.connections_evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    shared.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                }
            }
        }
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let mut rx = rx.clone();
        let limits = shared.limits.clone();
        let stream = send_timeout::SendTimeout::new(stream, limits.request_timeout);
        let conn = OpenConns::register(&open, stream.blocked());
        let slot = Slot::take(&active);
        tokio::spawn(async move {
            // Freed when the task ends, however it ends (a panic too).
            let _slot = slot;
            let evict = conn.evict.clone();
            let busy = conn.busy.clone();
            let blocked = conn.blocked.clone();
            let started = Arc::new(AtomicUsize::new(0));
            let _conn = conn;
            let in_request = busy.clone();
            let requests = started.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                // Started (headers read) until its answer is written: shutdown lets it finish.
                let begun = Slot::take(&requests);
                // "In a request" (not evicted) while its handler makes the
                // answer: from the headers for a request without a body, from
                // the body's last byte for one with a body (the handler takes
                // it then, `InRequest`): a body that trickles in or never
                // comes protects nothing (review 28).
                let has_body = req.headers().contains_key(hyper::header::TRANSFER_ENCODING)
                    || req.headers().get(hyper::header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
                let held = if has_body {
                    req.extensions_mut().insert(InRequest(in_request.clone()));
                    None
                } else {
                    Some(Slot::take(&in_request))
                };
                let answer = app.clone().oneshot(req.map(axum::body::Body::new));
                let in_request = in_request.clone();
                async move {
                    let r = answer.await;
                    // ... and on until its answer's last byte has been taken
                    // (review 29: an answer being written was cut off).
                    let answering = Slot::take(&in_request);
                    drop(held);
                    r.map(|resp| resp.map(|body| axum::body::Body::new(Answering { body, _in_request: answering, _started: begun })))
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
            match tls {
                None => {
                    drive(b.serve_connection(TokioIo::new(stream), svc), &mut rx, &evict, &|| idle(&busy, &blocked), &|| unstarted(&started, &blocked)).await
                }
                Some(acc) => {
                    let handshake = tokio::time::timeout(limits.header_timeout, acc.accept(stream));
                    let s = tokio::select! {
                        r = handshake => r,
                        _ = evict.notified() => return,
                    };
                    if let Ok(Ok(s)) = s {
                        drive(b.serve_connection(TokioIo::new(s), svc), &mut rx, &evict, &|| idle(&busy, &blocked), &|| unstarted(&started, &blocked)).await
                    }
                }
            }
        });
    }
    // Drain: close the socket, tell every connection, wait (bounded).
    drop(listener);
    shared.draining.store(true, Ordering::SeqCst);
    let _ = tx.send(true);
    let t0 = Instant::now();
    tokio::pin!(force);
    while active.load(Ordering::SeqCst) > 0 && t0.elapsed() < opts.limits.drain_timeout {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = &mut force => break,
        }
    }
    let left = active.load(Ordering::SeqCst);
    if left > 0 {
        tracing::warn!("{left} connections still open after the drain (timeout or a second signal); closing them");
    }
    stop.store(true, Ordering::SeqCst);
    let _ = reloader.join();
    // Flush the audit log: every answered request has its line.
    if let Some(s) = Arc::into_inner(shared) {
        let mut s = s;
        s.audit.close();
    }
    Ok(())
}

/// Descriptors kept for everything but connections: the listener, the
/// runtime, and the files a request or a reload opens (tokens, registry,
/// audit log).
const FD_RESERVE: u64 = 128;

/// `max_connections` that fit the open-file limit with [`FD_RESERVE`] to
/// spare, after raising the soft limit to the hard one. When connections
/// took every descriptor, every file open failed (EMFILE), reloads of the
/// token file and the registry included (review 26): so fewer connections are
/// held than asked (with a warning), and a limit too low to serve is an error.
fn fit_connections(want: usize) -> Result<usize> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `r`, a valid local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Ok(want);
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r = raised;
        }
    }
    // (RLIM_INFINITY is u64::MAX: no limit.)
    let limit: u64 = r.rlim_cur;
    let room = usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if room < 16 {
        return Err(crate::error::config(format!(
            "the open-file limit of this process is {limit}: too low to serve ({FD_RESERVE} descriptors are kept for files); raise it \
             (`ulimit -n 4096`, LimitNOFILE= in a systemd unit)"
        )));
    }
    if want > room {
        tracing::warn!(
            "--max-connections {want}: the open-file limit is {limit}, so at most {room} connections are held ({FD_RESERVE} descriptors \
             are kept for files); raise the limit (LimitNOFILE= in a systemd unit, `ulimit -n`) to hold more"
        );
        return Ok(room);
    }
    Ok(want)
}

/// Connections that may be closed beyond `max_connections` while they are
/// being closed to make room (each closes within moments).
const MAX_CLOSING: usize = 64;

/// The open connections, oldest first: whether each is in a request, and
/// how to ask it to close.
#[derive(Default)]
struct OpenConns {
    next: u64,
    conns: std::collections::BTreeMap<u64, Conn>,
}

/// What the accept loop knows of a connection.
#[derive(Clone)]
struct Conn {
    /// Requests in progress ([`InRequest`], and answers being written).
    busy: Arc<AtomicUsize>,
    /// Its last write waits for the client ([`send_timeout::SendTimeout::blocked`]).
    blocked: Arc<AtomicBool>,
    /// Told to close.
    evict: Arc<tokio::sync::Notify>,
}

/// A connection that can be closed without losing anything: no request in
/// progress (a body still arriving does not count), no answer being written,
/// no byte of one waiting in a buffer for the client.
fn idle(busy: &AtomicUsize, blocked: &AtomicBool) -> bool {
    busy.load(Ordering::SeqCst) == 0 && !blocked.load(Ordering::SeqCst)
}

/// A connection with no request started (none whose headers were read and
/// whose answer is not written yet) and nothing waiting for its client: what
/// shutdown closes at once (review 29: one with half a header held the
/// shutdown for the header timeout).
fn unstarted(started: &AtomicUsize, blocked: &AtomicBool) -> bool {
    started.load(Ordering::SeqCst) == 0 && !blocked.load(Ordering::SeqCst)
}

/// A connection's entry in [`OpenConns`], removed when its task ends.
struct ConnEntry {
    id: u64,
    open: Arc<std::sync::Mutex<OpenConns>>,
    busy: Arc<AtomicUsize>,
    blocked: Arc<AtomicBool>,
    evict: Arc<tokio::sync::Notify>,
}

impl OpenConns {
    fn register(open: &Arc<std::sync::Mutex<OpenConns>>, blocked: Arc<AtomicBool>) -> ConnEntry {
        let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
        let id = o.next;
        o.next += 1;
        let c = Conn { busy: Arc::new(AtomicUsize::new(0)), blocked, evict: Arc::new(tokio::sync::Notify::new()) };
        o.conns.insert(id, c.clone());
        ConnEntry { id, open: open.clone(), busy: c.busy, blocked: c.blocked, evict: c.evict }
    }

    /// Take the oldest idle connection ([`idle`]) out of the list, to close it.
    fn evict_idle(&mut self) -> Option<Arc<tokio::sync::Notify>> {
        let id = self.conns.iter().find(|(_, c)| idle(&c.busy, &c.blocked)).map(|(id, _)| *id)?;
        self.conns.remove(&id).map(|c| c.evict)
    }
}

impl Drop for ConnEntry {
    fn drop(&mut self) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).conns.remove(&self.id);
    }
}

/// An answer's body, holding its connection "in a request" until hyper has
/// taken its last byte (or dropped it).
struct Answering {
    body: axum::body::Body,
    _in_request: Slot,
    _started: Slot,
}

impl hyper::body::Body for Answering {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's count of requests in progress, put in the extensions of a
/// request with a body: the handler takes a [`Slot`] of it once the body has
/// arrived ([`InRequest::enter`]), held until its answer is made.
#[derive(Clone)]
pub(crate) struct InRequest(Arc<AtomicUsize>);

impl InRequest {
    /// The request's body has arrived: in a request until the returned slot goes.
    pub(crate) fn enter(&self) -> Slot {
        Slot::take(&self.0)
    }
}

/// One unit of a counter, given back however its holder ends (a panic too):
/// one of the `max_connections` slots, held while its connection lives, and
/// a connection's request in progress, held until its handler answers.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Slot {
        active.fetch_add(1, Ordering::SeqCst);
        Slot(active.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serve one connection. Evicted, or at shutdown, a connection that is idle
/// ([`idle`]) is closed at once (review 28: hyper's graceful shutdown left one
/// with half its headers open until the header timeout, so evicted
/// connections piled up, and shutdown waited for them, review 29); one that
/// is in a request finishes it (its answer written) first.
async fn drive<I, S>(
    conn: hyper::server::conn::http1::Connection<I, S>,
    rx: &mut tokio::sync::watch::Receiver<bool>,
    evict: &tokio::sync::Notify,
    idle: &(dyn Fn() -> bool + Sync),
    unstarted: &(dyn Fn() -> bool + Sync),
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let evicted = !*rx.borrow()
        && tokio::select! {
            _ = conn.as_mut() => return,
            _ = rx.changed() => false,
            _ = evict.notified() => true,
        };
    // Evicted: close unless in a request. At shutdown: close unless a request
    // has started (one whose body is still arriving finishes, as before).
    if if evicted { idle() } else { unstarted() } {
        return;
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Refuse `--workers 0` and the like.
pub fn check_workers(n: usize) -> Result<usize> {
    if n == 0 || n > 1024 {
        bail!("--workers {n}: give a number between 1 and 1024");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_connection_not_in_a_request_is_evicted_and_none_when_all_are_in_one() {
        let open = Arc::new(std::sync::Mutex::new(OpenConns::default()));
        let a = OpenConns::register(&open, Default::default());
        let b = OpenConns::register(&open, Default::default());
        let c = OpenConns::register(&open, Default::default());
        let d = OpenConns::register(&open, Default::default());
        let in_a = InRequest(a.busy.clone()).enter();
        // b's answer waits in a buffer for its client (review 29).
        b.blocked.store(true, Ordering::SeqCst);
        // a is in a request, b is writing: c (the oldest idle) goes first, then d.
        let first = open.lock().unwrap().evict_idle().unwrap();
        assert!(Arc::ptr_eq(&first, &c.evict));
        let second = open.lock().unwrap().evict_idle().unwrap();
        assert!(Arc::ptr_eq(&second, &d.evict));
        // Only a and b are left, neither idle: nothing to evict (the new connection is refused).
        assert!(open.lock().unwrap().evict_idle().is_none());
        drop(in_a);
        assert!(open.lock().unwrap().evict_idle().is_some_and(|e| Arc::ptr_eq(&e, &a.evict)));
        b.blocked.store(false, Ordering::SeqCst);
        assert!(open.lock().unwrap().evict_idle().is_some_and(|e| Arc::ptr_eq(&e, &b.evict)));
        // Entries go when their connections end.
        drop((a, b, c, d));
        assert!(open.lock().unwrap().conns.is_empty());
    }
}
