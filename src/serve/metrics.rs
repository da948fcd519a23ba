//! `/metrics`: Prometheus text format (version 0.0.4).
//!
//! Rules: labels are the token's tenant (never a tenant named only in the
//! URL, so an unauthenticated caller cannot create label values or learn
//! which tenants exist from their own requests: those count as tenant `-`),
//! a fixed route name and the status code. A request only takes a shared
//! (read) lock on the tenant table and adds to atomics: no request waits
//! for another, and nothing allocates once its tenant has been seen.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// Routes, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Live,
    Ready,
    ModelMeta,
    ModelReady,
    Infer,
    InferVersion,
    Invocations,
    Ping,
    Health,
    Version,
    Metrics,
    Other,
}

pub const ROUTES: [Route; 12] = [
    Route::Live,
    Route::Ready,
    Route::ModelMeta,
    Route::ModelReady,
    Route::Infer,
    Route::InferVersion,
    Route::Invocations,
    Route::Ping,
    Route::Health,
    Route::Version,
    Route::Metrics,
    Route::Other,
];

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Live => "/v2/health/live",
            Route::Ready => "/v2/health/ready",
            Route::ModelMeta => "/v2/models/{tenant}",
            Route::ModelReady => "/v2/models/{tenant}/ready",
            Route::Infer => "/v2/models/{tenant}/infer",
            Route::InferVersion => "/v2/models/{tenant}/versions/{version}/infer",
            Route::Invocations => "/invocations",
            Route::Ping => "/ping",
            Route::Health => "/health",
            Route::Version => "/version",
            Route::Metrics => "/metrics",
            Route::Other => "other",
        }
    }
    /// True for the routes that score rows (and get an audit line).
    pub fn scores(self) -> bool {
        matches!(self, Route::Infer | Route::InferVersion | Route::Invocations)
    }
}

const STATUSES: [u16; 13] = [200, 400, 401, 403, 404, 405, 408, 413, 415, 500, 503, 504, 0];

fn status_idx(s: u16) -> usize {
    STATUSES.iter().position(|&x| x == s).unwrap_or(STATUSES.len() - 1)
}

const BUCKETS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Hist {
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

struct PerTenant {
    requests: [[AtomicU64; 13]; 12],
    rows: AtomicU64,
}

impl PerTenant {
    fn new() -> PerTenant {
        PerTenant { requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))), rows: AtomicU64::new(0) }
    }
}

/// A model the server holds, for `dagrun_serve_model_info`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub tenant: String,
    pub version: String,
    pub champion: bool,
}

/// All counters of one server.
#[derive(Default)]
pub struct Metrics {
    tenants: RwLock<BTreeMap<String, Box<PerTenant>>>,
    latency: [Hist; 12],
    pub audit_write_failures: AtomicU64,
    pub audit_lines: AtomicU64,
    load_failures: Mutex<BTreeMap<String, (u64, String)>>,
    models: Mutex<Vec<ModelInfo>>,
    pub model_switches: AtomicU64,
    pub token_reload_failures: AtomicU64,
    /// Connections closed at accept because `--max-connections` were open,
    /// every one of them in a request.
    pub connections_refused: AtomicU64,
    /// Connections not in a request closed to make room for a new one.
    pub connections_evicted: AtomicU64,
}

impl Metrics {
    /// Count one finished request.
    pub fn record(&self, tenant: &str, route: Route, status: u16, rows: u64, seconds: f64) {
        let ri = ROUTES.iter().position(|&r| r == route).unwrap_or(ROUTES.len() - 1);
        let si = status_idx(status);
        let add = |e: &PerTenant| {
            e.requests[ri][si].fetch_add(1, Ordering::Relaxed);
            if rows > 0 {
                e.rows.fetch_add(rows, Ordering::Relaxed);
            }
        };
        let seen = {
            let t = self.tenants.read().unwrap_or_else(|e| e.into_inner());
            t.get(tenant).map(|e| add(e)).is_some()
        };
        if !seen {
            let mut t = self.tenants.write().unwrap_or_else(|e| e.into_inner());
            add(t.entry(tenant.to_string()).or_insert_with(|| Box::new(PerTenant::new())));
        }
        let h = &self.latency[ri];
        if let Some(b) = BUCKETS.iter().position(|&b| seconds <= b) {
            h.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_ns.fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    /// A model that failed its checks and was not loaded.
    pub fn load_failed(&self, tenant: &str, version: &str) {
        let mut m = self.load_failures.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(tenant.to_string()).or_insert((0, String::new()));
        e.0 += 1;
        e.1 = version.to_string();
    }

    /// The models held now.
    pub fn set_models(&self, models: Vec<ModelInfo>) {
        *self.models.lock().unwrap_or_else(|e| e.into_inner()) = models;
    }

    /// Rows scored for `tenant` so far (for tests and the log).
    pub fn rows(&self, tenant: &str) -> u64 {
        self.tenants.read().unwrap_or_else(|e| e.into_inner()).get(tenant).map(|t| t.rows.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let t = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        s.push_str("# HELP dagrun_serve_requests_total HTTP requests by tenant (of the token; - without one), route and status.\n# TYPE dagrun_serve_requests_total counter\n");
        for (tenant, e) in t.iter() {
            for (ri, r) in ROUTES.iter().enumerate() {
                for (si, st) in STATUSES.iter().enumerate() {
                    let n = e.requests[ri][si].load(Ordering::Relaxed);
                    if n > 0 {
                        let st = if *st == 0 { "other".to_string() } else { st.to_string() };
                        let _ = writeln!(s, "dagrun_serve_requests_total{{tenant=\"{tenant}\",route=\"{}\",status=\"{st}\"}} {n}", r.name());
                    }
                }
            }
        }
        s.push_str("# HELP dagrun_serve_rows_scored_total Rows scored, by tenant.\n# TYPE dagrun_serve_rows_scored_total counter\n");
        for (tenant, e) in t.iter().filter(|(k, _)| k.as_str() != "-") {
            let _ = writeln!(s, "dagrun_serve_rows_scored_total{{tenant=\"{tenant}\"}} {}", e.rows.load(Ordering::Relaxed));
        }
        drop(t);
        s.push_str(
            "# HELP dagrun_serve_request_duration_seconds Time from request to response, by route.\n# TYPE dagrun_serve_request_duration_seconds histogram\n",
        );
        for (ri, r) in ROUTES.iter().enumerate() {
            let h = &self.latency[ri];
            let count = h.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let mut cum = 0;
            for (b, le) in BUCKETS.iter().enumerate() {
                cum += h.buckets[b].load(Ordering::Relaxed);
                let _ = writeln!(s, "dagrun_serve_request_duration_seconds_bucket{{route=\"{}\",le=\"{le}\"}} {cum}", r.name());
            }
            let _ = writeln!(s, "dagrun_serve_request_duration_seconds_bucket{{route=\"{}\",le=\"+Inf\"}} {count}", r.name());
            let _ = writeln!(s, "dagrun_serve_request_duration_seconds_sum{{route=\"{}\"}} {}", r.name(), h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
            let _ = writeln!(s, "dagrun_serve_request_duration_seconds_count{{route=\"{}\"}} {count}", r.name());
        }
        s.push_str("# HELP dagrun_serve_model_info Models held in memory (champion=\"true\": answers /infer and /invocations).\n# TYPE dagrun_serve_model_info gauge\n");
        for m in self.models.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(s, "dagrun_serve_model_info{{tenant=\"{}\",version=\"{}\",champion=\"{}\"}} 1", m.tenant, m.version, m.champion);
        }
        s.push_str("# HELP dagrun_serve_model_load_failures_total Models refused at load (integrity or format check failed); the previous model stays.\n# TYPE dagrun_serve_model_load_failures_total counter\n");
        for (tenant, (n, v)) in self.load_failures.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(s, "dagrun_serve_model_load_failures_total{{tenant=\"{tenant}\",last_version=\"{v}\"}} {n}");
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter("dagrun_serve_model_switches_total", "Champion switches applied without a restart.", self.model_switches.load(Ordering::Relaxed));
        counter("dagrun_serve_audit_lines_total", "Audit log lines written.", self.audit_lines.load(Ordering::Relaxed));
        counter(
            "dagrun_serve_audit_write_failures_total",
            "Audit log lines that could not be written (the responses were still sent).",
            self.audit_write_failures.load(Ordering::Relaxed),
        );
        counter(
            "dagrun_serve_token_reload_failures_total",
            "Failed reloads of the token file (the previous tokens stay).",
            self.token_reload_failures.load(Ordering::Relaxed),
        );
        counter(
            "dagrun_serve_connections_refused_total",
            "Connections closed as soon as they were accepted: --max-connections were open, every one in a request.",
            self.connections_refused.load(Ordering::Relaxed),
        );
        counter(
            "dagrun_serve_connections_evicted_total",
            "Connections not in a request (idle, or still sending headers) closed to make room for a new one.",
            self.connections_evicted.load(Ordering::Relaxed),
        );
        s
    }
}
