//! `dagrun serve` over loopback with a real HTTP client (ureq), and the model
//! registry: the auth matrix, both protocols bit-identical to `dagrun
//! predict`, every validation error, limits, promotion and rollback under
//! load, a model failing its integrity check, SIGTERM drain, TLS.

use crate::common::{BIN, Ws, ok, signal};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TENANTS: &str = "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n";

/// A workspace with the shipped pipeline, trained on `rows` rows.
fn trained(rows: u32) -> Ws {
    let ws = Ws::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    ws.write("pipelines/propensity.yaml", std::fs::read(root.join("pipelines/propensity.yaml")).unwrap());
    ws.write("config/tenants.yaml", TENANTS);
    ok(ws.dagrun(&["run", "pipelines/propensity.yaml", "-p", &format!("rows={rows}")]));
    ws
}

fn token(ws: &Ws, tenant: &str, extra: &[&str]) -> String {
    let mut a = vec!["tokens", "create", tenant];
    a.extend_from_slice(extra);
    let o = ok(ws.dagrun(&a));
    o.stdout.lines().last().unwrap().to_string()
}

/// A running `dagrun serve`; killed on drop if still running.
struct Server {
    child: Child,
    addr: String,
    log: Arc<std::sync::Mutex<String>>,
}

impl Server {
    fn start(ws: &Ws, extra: &[&str]) -> Server {
        Server::start_listen(ws, "127.0.0.1:0", extra)
    }

    fn start_listen(ws: &Ws, listen: &str, extra: &[&str]) -> Server {
        let mut c = Command::new(BIN);
        c.args(["serve", "-C", ws.root.to_str().unwrap(), "--listen", listen]).args(extra).env("RUST_LOG", "dagrun=info").env("NO_COLOR", "1");
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let l3 = log.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                l3.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = first
            .split("://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {first:?}; log:\n{}", log.lock().unwrap()))
            .to_string();
        Server { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait (up to 5 s) until the server's output contains `what`.
    fn wait_log(&self, what: &str) {
        let t0 = Instant::now();
        while !self.log().contains(what) {
            assert!(t0.elapsed() < Duration::from_secs(5), "the server never said {what:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        signal(self.child.id() as i32, libc::SIGTERM);
    }

    /// Wait for exit (at most `limit`).
    fn wait(&mut self, limit: Duration) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(t0.elapsed() < limit, "server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build())
}

struct Resp {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn error(&self) -> String {
        let v = self.json();
        v["error"].as_str().or(v["message"].as_str()).unwrap_or_else(|| panic!("no error in {}", self.body)).to_string()
    }
}

fn post(a: &ureq::Agent, url: &str, tok: Option<&str>, ctype: &str, body: &[u8]) -> Resp {
    let mut r = a.post(url).header("Content-Type", ctype);
    if let Some(t) = tok {
        r = r.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = r.send(body).unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
    Resp { status, headers, body }
}

fn get(a: &ureq::Agent, url: &str, tok: Option<&str>) -> Resp {
    let mut r = a.get(url);
    if let Some(t) = tok {
        r = r.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = r.call().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.body_mut().read_to_string().unwrap();
    Resp { status, headers, body }
}

/// Rows of a raw CSV (header + rows), as JSON for both protocols.
struct Input {
    csv: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

fn input(ws: &Ws, tenant: &str, rows: u32, seed: u32) -> Input {
    let f = format!("in-{tenant}-{rows}-{seed}.csv");
    ok(ws.dagrun(&["sample", "--tenant", tenant, "--rows", &rows.to_string(), "--seed", &seed.to_string(), "--no-label", "--out", &f]));
    let csv = ws.read(&f);
    let mut lines = csv.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    Input { csv, header, rows }
}

fn typed(col: &str, v: &str) -> Value {
    match col {
        "Customer_ID" | "Login_Count" => json!(v.parse::<i64>().unwrap()),
        "Purchase_Amount" => json!(v.parse::<f64>().unwrap()),
        _ => json!(v),
    }
}

const SCORED: [&str; 4] = ["Customer_ID", "Login_Count", "Purchase_Amount", "Last_Visit_Date"];

impl Input {
    fn col(&self, name: &str) -> usize {
        self.header.iter().position(|h| h == name).unwrap()
    }
    fn oip(&self, id: &str) -> Value {
        let inputs: Vec<Value> = SCORED
            .iter()
            .map(|c| {
                let i = self.col(c);
                let dt = match *c {
                    "Purchase_Amount" => "FP64",
                    "Last_Visit_Date" => "BYTES",
                    _ => "INT64",
                };
                json!({"name": c, "shape": [self.rows.len()], "datatype": dt, "data": self.rows.iter().map(|r| typed(c, &r[i])).collect::<Vec<_>>()})
            })
            .collect();
        json!({"id": id, "inputs": inputs})
    }
    fn split(&self) -> Value {
        let data: Vec<Vec<Value>> = self.rows.iter().map(|r| SCORED.iter().map(|c| typed(c, &r[self.col(c)])).collect()).collect();
        json!({"dataframe_split": {"columns": SCORED, "index": (0..self.rows.len()).collect::<Vec<_>>(), "data": data}})
    }
    fn records(&self) -> Value {
        let recs: Vec<Value> = self.rows.iter().map(|r| Value::Object(SCORED.iter().map(|c| (c.to_string(), typed(c, &r[self.col(c)]))).collect())).collect();
        json!({"dataframe_records": recs})
    }
}

/// `dagrun predict` on the same rows: (Customer_ID, score bits, model_version).
fn predicted(ws: &Ws, tenant: &str, csv: &str, model: Option<&str>) -> (Vec<(i64, u64)>, String) {
    ws.write("predict-in.csv", csv);
    let mut a = vec!["predict", "--tenant", tenant, "--input", "predict-in.csv"];
    if let Some(m) = model {
        a.extend_from_slice(&["--model", m]);
    }
    let o = ok(ws.dagrun(&a));
    let mut version = String::new();
    let rows = o
        .stdout
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            version = f[2].to_string();
            (f[0].parse().unwrap(), f[1].parse::<f64>().unwrap().to_bits())
        })
        .collect();
    (rows, version)
}

fn oip_scores(v: &Value) -> Vec<(i64, u64)> {
    let ids = v["outputs"][0]["data"].as_array().unwrap();
    let sc = v["outputs"][1]["data"].as_array().unwrap();
    assert_eq!(v["outputs"][1]["name"], "score");
    ids.iter().zip(sc).map(|(i, s)| (i.as_i64().unwrap(), s.as_f64().unwrap().to_bits())).collect()
}

fn mlflow_scores(v: &Value) -> Vec<(i64, u64)> {
    v["predictions"].as_array().unwrap().iter().map(|p| (p["Customer_ID"].as_i64().unwrap(), p["score"].as_f64().unwrap().to_bits())).collect()
}

fn champion(ws: &Ws, tenant: &str) -> String {
    let o = ok(ws.dagrun(&["models", "list", tenant, "--json"]));
    o.json()["models"].as_array().unwrap().iter().find(|m| m["alias"] == "champion").unwrap()["version"].as_str().unwrap().to_string()
}

#[test]
fn auth_matrix_identical_scores_validation_limits_metrics_audit() {
    let ws = trained(4000);
    let tok_a = token(&ws, "Tenant_A", &["--name", "ci"]);
    let tok_b = token(&ws, "Tenant_B", &[]);
    let tok_z = token(&ws, "Tenant_Z", &[]);
    let revoked = token(&ws, "Tenant_A", &[]);
    let expiring = token(&ws, "Tenant_A", &["--expires-in", "0.0001"]); // 8.64 s
    let expiring_t0 = Instant::now();
    let list = ok(ws.dagrun(&["tokens", "list", "--json"])).json();
    assert_eq!(list["tokens"].as_array().unwrap().len(), 5);
    for t in [&tok_a, &tok_b, &revoked] {
        assert!(!ws.read(".dagrun/tokens.json").contains(&t[4..]), "a token is stored in clear");
        assert!(!list.to_string().contains(&t[4..]));
    }
    let mut srv = Server::start(&ws, &["--max-rows", "1000", "--max-body", "200000"]);
    let a = agent();
    let inp = input(&ws, "Tenant_A", 300, 7);
    let infer = srv.url("/v2/models/Tenant_A/infer");
    let body = inp.oip("req-1").to_string();

    // --- health and MLflow's unauthenticated routes
    assert_eq!(get(&a, &srv.url("/v2/health/live"), None).status, 200);
    assert_eq!(get(&a, &srv.url("/v2/health/ready"), None).status, 200);
    assert_eq!(get(&a, &srv.url("/ping"), None).status, 200);
    assert_eq!(get(&a, &srv.url("/health"), None).status, 200);
    assert!(get(&a, &srv.url("/version"), None).body.starts_with("dagrun "));

    assert_eq!(post(&a, &infer, Some(&expiring), "application/json", body.as_bytes()).status, 200, "before expiry");
    // --- auth matrix: none / bad / revoked / expired / other tenant / right tenant
    let revoked_id = list["tokens"].as_array().unwrap()[3]["id"].as_str().unwrap().to_string();
    assert_eq!(post(&a, &infer, Some(&revoked), "application/json", body.as_bytes()).status, 200, "before revocation");
    ok(ws.dagrun(&["tokens", "revoke", &revoked_id]));
    let t0 = Instant::now();
    loop {
        let s = post(&a, &infer, Some(&revoked), "application/json", body.as_bytes()).status;
        if s == 401 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "revoked token still accepted after 1 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut bad = tok_a.clone().into_bytes();
    bad[20] = if bad[20] == b'a' { b'b' } else { b'a' };
    let bad = String::from_utf8(bad).unwrap();
    for (tok, route, want) in [
        (None, "/v2/models/Tenant_A/infer", 401),
        (Some(bad.as_str()), "/v2/models/Tenant_A/infer", 401),
        (Some(revoked.as_str()), "/v2/models/Tenant_A/infer", 401),
        (Some(tok_b.as_str()), "/v2/models/Tenant_A/infer", 403),
        (Some(tok_b.as_str()), "/v2/models/No_Such_Tenant/infer", 403),
        (Some(tok_a.as_str()), "/v2/models/Tenant_A/infer", 200),
        (Some(tok_z.as_str()), "/v2/models/Tenant_Z/infer", 503),
        (Some(tok_z.as_str()), "/v2/models/Tenant_A/infer", 403),
        (None, "/invocations", 401),
        (Some(bad.as_str()), "/invocations", 401),
        (Some(tok_z.as_str()), "/invocations", 503),
    ] {
        let ct = "application/json";
        let b = if route == "/invocations" { inp.split().to_string() } else { body.clone() };
        let r = post(&a, &srv.url(route), tok, ct, b.as_bytes());
        assert_eq!(r.status, want, "{tok:?} {route}: {}", r.body);
        if want == 403 {
            // Neither answer says whether the tenant exists.
            assert_eq!(r.error(), "this token may not use this model");
        }
    }
    assert_eq!(get(&a, &srv.url("/v2/models/Tenant_A"), None).status, 401);
    assert_eq!(get(&a, &srv.url("/v2/models/Tenant_A"), Some(&tok_b)).status, 403);
    let meta = get(&a, &srv.url("/v2/models/Tenant_A"), Some(&tok_a)).json();
    assert_eq!(meta["name"], "Tenant_A");
    assert_eq!(meta["inputs"][3]["datatype"], "BYTES");
    assert_eq!(get(&a, &srv.url("/v2/models/Tenant_A/ready"), Some(&tok_a)).status, 200);
    assert_eq!(get(&a, &srv.url("/v2/models/Tenant_Z/ready"), Some(&tok_z)).status, 503);
    let remaining = Duration::from_millis(9000).saturating_sub(expiring_t0.elapsed());
    std::thread::sleep(remaining);
    assert_eq!(post(&a, &infer, Some(&expiring), "application/json", body.as_bytes()).status, 401, "expired token accepted");

    // --- bit-identical to `dagrun predict`, both protocols, every input shape
    let (want, version) = predicted(&ws, "Tenant_A", &inp.csv, None);
    assert_eq!(version, champion(&ws, "Tenant_A"));
    let r = post(&a, &infer, Some(&tok_a), "application/json", body.as_bytes());
    let v = r.json();
    assert_eq!(v["id"], "req-1");
    assert_eq!(v["model_name"], "Tenant_A");
    assert_eq!(v["model_version"], version.as_str());
    assert_eq!(oip_scores(&v), want);
    let vinfer = srv.url(&format!("/v2/models/Tenant_A/versions/{version}/infer"));
    assert_eq!(oip_scores(&post(&a, &vinfer, Some(&tok_a), "application/json", body.as_bytes()).json()), want);
    assert_eq!(post(&a, &srv.url("/v2/models/Tenant_A/versions/Tenant_A-000000000000/infer"), Some(&tok_a), "application/json", body.as_bytes()).status, 404);
    for (ct, b) in
        [("application/json", inp.split().to_string()), ("application/json; charset=utf-8", inp.records().to_string()), ("text/csv", inp.csv.clone())]
    {
        let r = post(&a, &srv.url("/invocations"), Some(&tok_a), ct, b.as_bytes());
        assert_eq!(r.status, 200, "{ct}: {}", r.body);
        assert_eq!(r.headers.get("model_version").unwrap().to_str().unwrap(), version);
        assert_eq!(mlflow_scores(&r.json()), want, "{ct}");
    }

    // --- validation: predict's rules and messages, row and column named, nothing scored
    // (0-based row, column, value, reason): the place is "request: row R (line L), column C" for
    // CSV (predict names its file instead), "request: row R, column C" for JSON.
    let cases: Vec<(usize, &str, &str, &str)> = vec![
        (3, "Login_Count", "-4", "negative value; Login_Count must be >= 0"),
        (0, "Login_Count", "2000000", "value above the bound 1000000"),
        (5, "Purchase_Amount", "-1.5", "negative value; Purchase_Amount must be >= 0"),
        (5, "Purchase_Amount", "2e9", "value above the bound 1e9"),
        (5, "Purchase_Amount", "NaN", "NaN; Purchase_Amount must be a finite number >= 0"),
        (5, "Purchase_Amount", "inf", "infinite value"),
        (2, "Last_Visit_Date", "2031-01-01", "date in the future relative to as_of"),
        (2, "Last_Visit_Date", "1969-12-31", "date before 1970-01-01"),
        (2, "Last_Visit_Date", "alice@example.com", "not a date in YYYY-MM-DD form"),
        (7, "Customer_ID", "x7", "not an integer (int64)"),
        (7, "Login_Count", "1.5", "not an integer"),
        (6, "Purchase_Amount", "lots", "not a number"),
        (1, "Customer_ID", "DUP", "duplicate Customer_ID"),
        (1, "Tenant_ID", "Tenant_B", "row belongs to tenant \"Tenant_B\""),
        (4, "Sensitive_Data", "", "empty value (nulls are not allowed)"),
        (4, "Login_Count", "", "empty value (nulls are not allowed)"),
    ];
    for (row, col, val, reason) in &cases {
        let mut rows = inp.rows.clone();
        let val = if *val == "DUP" { rows[0][inp.col("Customer_ID")].clone() } else { val.to_string() };
        rows[*row][inp.col(col)] = val.clone();
        let csv = std::iter::once(inp.header.join(",")).chain(rows.iter().map(|r| r.join(","))).collect::<Vec<_>>().join("\n") + "\n";
        let (r1, line) = (row + 1, row + 2);
        // predict refuses the same rows with the same message.
        ws.write("bad.csv", &csv);
        let p = ws.dagrun(&["predict", "--tenant", "Tenant_A", "--input", "bad.csv"]);
        assert_eq!(p.code, 2, "predict accepted {col}={val}");
        let place = format!("row {r1} (line {line}), column {col}: {reason}");
        assert!(p.stderr.contains(&format!("bad.csv: {place}")), "predict: {}\nexpected: {place}", p.stderr);
        assert!(p.stdout.is_empty());
        let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "text/csv", csv.as_bytes());
        assert_eq!(r.status, 400, "{col}={val}: {}", r.body);
        // A caller is never told another tenant's name (nor whether it
        // exists here): the row's tenant is only described, as for any value.
        let place = place.replace("row belongs to tenant \"Tenant_B\"", "row belongs to tenant (8 characters");
        assert!(r.error().starts_with(&format!("request: {place}")), "{} vs request: {place}", r.error());
        assert!(!r.body.contains("Tenant_B"), "another tenant was named: {}", r.body);
        assert!(!r.body.contains("alice@example.com") && !r.body.contains("example.org"), "a value was echoed: {}", r.body);
        assert!(r.json().get("predictions").is_none());
        if !SCORED.contains(col) || val.is_empty() || val == "DUP" || val == "NaN" || val == "inf" || val == "1.5" || val == "lots" {
            continue;
        }
        // The JSON shapes: the same message (without CSV line numbers).
        let json_place = format!("request: row {r1}, column {col}: {reason}");
        let mut i2 = Input { csv: String::new(), header: inp.header.clone(), rows: rows.clone() };
        if *col == "Customer_ID" {
            i2.rows[*row][inp.col(col)] = "0".into();
            let mut v = i2.split();
            v["dataframe_split"]["data"][*row][0] = json!(val);
            let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "application/json", v.to_string().as_bytes());
            assert!(r.error().starts_with(&json_place), "{} vs {json_place}", r.error());
            continue;
        }
        let r = post(&a, &infer, Some(&tok_a), "application/json", i2.oip("bad").to_string().as_bytes());
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.error().starts_with(&json_place), "OIP: {} vs {json_place}", r.error());
        let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "application/json", i2.records().to_string().as_bytes());
        assert!(r.error().starts_with(&json_place), "records: {} vs {json_place}", r.error());
    }
    // Columns and shapes.
    let mut v = inp.split();
    v["dataframe_split"]["columns"][1] = json!("Logins");
    let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "application/json", v.to_string().as_bytes());
    assert!(r.status == 400 && r.error().starts_with("request: column 2: unknown column name (6 characters"), "{}", r.body);
    let mut v = inp.oip("x");
    v["inputs"].as_array_mut().unwrap().remove(2);
    let r = post(&a, &infer, Some(&tok_a), "application/json", v.to_string().as_bytes());
    assert!(r.status == 400 && r.error().starts_with("request: missing column Purchase_Amount"), "{}", r.body);
    let mut v = inp.oip("x");
    v["inputs"][1]["datatype"] = json!("FP32");
    assert!(post(&a, &infer, Some(&tok_a), "application/json", v.to_string().as_bytes()).error().contains("input Login_Count has datatype FP32 but INT64"));
    let mut v = inp.oip("x");
    v["inputs"][1]["data"].as_array_mut().unwrap().pop();
    assert!(post(&a, &infer, Some(&tok_a), "application/json", v.to_string().as_bytes()).error().contains("has shape"));
    let r = post(&a, &infer, Some(&tok_a), "application/json", b"{\"inputs\": [\"alice@example.com\"");
    assert!(r.status == 400 && !r.body.contains("alice") && r.error().contains("(line 1, column "), "{}", r.body);
    let r = post(&a, &infer, Some(&tok_a), "application/json", b"{\"inputs\": [");
    assert!(r.status == 400 && r.error().contains("not valid JSON"), "{}", r.body);
    let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "application/json", br#"{"instances": [[1, 2]]}"#);
    assert!(r.status == 400 && r.error().contains("tensor input"), "{}", r.body);
    let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "text/csv", b"Customer_ID,Login_Count,Purchase_Amount,Last_Visit_Date\n");
    assert!(r.status == 400 && r.error().contains("no data rows"), "{}", r.body);

    // --- content type, body and row limits
    assert_eq!(post(&a, &srv.url("/invocations"), Some(&tok_a), "text/plain", inp.csv.as_bytes()).status, 415);
    assert_eq!(post(&a, &infer, Some(&tok_a), "application/xml", body.as_bytes()).status, 415);
    let big = input(&ws, "Tenant_A", 1001, 8);
    let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "text/csv", big.csv.as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("limit is 1000 rows"), "{}", r.body);
    let r = post(&a, &infer, Some(&tok_a), "application/json", big.oip("big").to_string().as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("limit is 1000 rows"), "{}", r.body);
    // A body over --max-body: 413 as soon as the headers announce it (the body is never read),
    // and when it arrives without a length (chunked) once the limit is passed.
    let mut st = TcpStream::connect(&srv.addr).unwrap();
    write!(st, "POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok_a}\r\nContent-Type: application/json\r\nContent-Length: 210000\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    st.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    let mut st = TcpStream::connect(&srv.addr).unwrap();
    write!(
        st,
        "POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok_a}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    for _ in 0..3 {
        // The server may answer 413 and close as soon as the body passes the
        // limit, before the last chunk is sent: then writing fails (broken
        // pipe) and the answer is read below.
        if write!(st, "{:x}\r\n{}\r\n", 100_000, " ".repeat(100_000)).is_err() {
            break;
        }
    }
    st.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");

    // --- metrics and audit log
    let m = get(&a, &srv.url("/metrics"), None).body;
    assert!(m.contains("dagrun_serve_requests_total{tenant=\"Tenant_A\",route=\"/v2/models/{tenant}/infer\",status=\"200\"}"), "{m}");
    assert!(m.contains("dagrun_serve_requests_total{tenant=\"-\",route=\"/invocations\",status=\"401\"}"), "{m}");
    assert!(m.contains("dagrun_serve_requests_total{tenant=\"Tenant_Z\",route=\"/invocations\",status=\"503\"}"), "{m}");
    assert!(m.contains("dagrun_serve_rows_scored_total{tenant=\"Tenant_A\"}"), "{m}");
    assert!(m.contains(&format!("dagrun_serve_model_info{{tenant=\"Tenant_A\",version=\"{version}\",champion=\"true\"}} 1")), "{m}");
    assert!(m.contains("dagrun_serve_request_duration_seconds_bucket{route=\"/invocations\",le=\"+Inf\"}"), "{m}");
    assert!(!m.contains("No_Such_Tenant"), "a tenant named only in a URL became a label");
    srv.sigterm();
    assert_eq!(srv.wait(Duration::from_secs(20)), 0, "{}", srv.log());
    let day = chrono::Utc::now().format("%Y-%m-%d");
    let audit = ws.read(&format!(".dagrun/audit/serve-audit-{day}.jsonl"));
    let lines: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() > 30, "{} audit lines", lines.len());
    let first_ok = lines.iter().find(|l| l["status"] == 200 && l["rows"] == 300).unwrap();
    for k in ["time", "request_id", "token_id", "tenant", "model_version", "rows", "status", "latency_ms"] {
        assert!(!first_ok[k].is_null(), "audit line without {k}: {first_ok}");
    }
    assert!(lines.iter().any(|l| l["status"] == 401 && l["token_id"].is_null()));
    assert!(lines.iter().any(|l| l["status"] == 400));
    for secret in [&tok_a[4..], "alice@example.com"] {
        assert!(!audit.contains(secret));
        assert!(!srv.log().contains(secret));
    }
    // Sample rows' Sensitive_Data values never reach the audit log or the server log.
    let si = inp.col("Sensitive_Data");
    for r in inp.rows.iter().take(50) {
        assert!(!audit.contains(&r[si]) && !srv.log().contains(&r[si]));
    }
    let used = ok(ws.dagrun(&["tokens", "list", "--json"])).json();
    let a_rec = used["tokens"].as_array().unwrap().iter().find(|t| t["name"] == "ci").unwrap().clone();
    assert!(!a_rec["last_used"].is_null(), "{a_rec}");
}

#[test]
fn predict_like_serve_refuses_a_tenant_whose_models_are_registered_but_not_promoted() {
    let ws = Ws::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("pipelines/propensity.yaml"))
        .unwrap()
        .replace("      min_auc: ${params.min_auc}\n", "      min_auc: ${params.min_auc}\n      promote: manual\n");
    assert!(yaml.contains("promote: manual"), "the pipeline's train stage changed shape: {yaml}");
    ws.write("pipelines/propensity.yaml", yaml);
    ws.write("config/tenants.yaml", TENANTS);
    let run = ok(ws.dagrun(&["run", "pipelines/propensity.yaml", "-p", "rows=2000", "--metrics-file", "m.prom"]));
    let list = ok(ws.dagrun(&["models", "list", "Tenant_A", "--json"])).json();
    let v = list["models"][0]["version"].as_str().unwrap().to_string();
    // The run's summary says the model it names serves nothing yet, and how to change that.
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains(&format!(
            "no champion (`promote: manual`): `serve` answers 503 for Tenant_A and `predict` refuses until one is promoted (`dagrun models promote Tenant_A {v}` to serve this one)"
        )),
        "{said}"
    );
    // The metric agrees: no champion.
    let prom = ws.read("m.prom");
    let line = prom.lines().find(|l| l.starts_with("dagrun_model_champion{") && l.contains("tenant=\"Tenant_A\"")).unwrap_or_else(|| panic!("{prom}"));
    assert!(line.contains(&v) && line.ends_with(" 0"), "{line}");
    let inp = input(&ws, "Tenant_A", 20, 1);
    ws.write("predict-in.csv", &inp.csv);
    let o = ws.dagrun(&["predict", "--tenant", "Tenant_A", "--input", "predict-in.csv"]);
    assert_eq!(o.code, 2, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("no champion") && o.stderr.contains(&format!("`dagrun models promote Tenant_A {v}`")), "{}", o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    // A tenant the workspace does not have is named as such (a typo), not as untrained.
    let o = ws.dagrun(&["predict", "--tenant", "Tenant_Q", "--input", "predict-in.csv"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("no tenant Tenant_Q in config/tenants.yaml (tenants: Tenant_A"), "{}", o.stderr);
    // Named, it scores; promoted, it is the default.
    let (named, _) = predicted(&ws, "Tenant_A", &inp.csv, Some(&v));
    ok(ws.dagrun(&["models", "promote", "Tenant_A", &v]));
    let (champion, version) = predicted(&ws, "Tenant_A", &inp.csv, None);
    assert_eq!((champion, version), (named, v));
}

#[test]
fn promote_and_rollback_under_load_never_fail_or_mix_versions() {
    let ws = trained(3000);
    let v1 = champion(&ws, "Tenant_A");
    // A second model with another C, registered but not promoted (promote: manual).
    let yaml = ws.read("pipelines/propensity.yaml").replace("      min_auc: ${params.min_auc}\n", "      min_auc: ${params.min_auc}\n      promote: manual\n");
    assert!(yaml.contains("promote: manual"), "the pipeline's train stage changed shape: {yaml}");
    ws.write("pipelines/propensity.yaml", yaml);
    let run = ok(ws.dagrun(&["run", "pipelines/propensity.yaml", "-p", "rows=3000", "-p", "C=0.01"]));
    assert_eq!(champion(&ws, "Tenant_A"), v1, "promote: manual changed the champion");
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(said.contains(&format!("not the champion: `predict` and `serve` use {v1} (`dagrun models promote Tenant_A ")), "{said}");
    let list = ok(ws.dagrun(&["models", "list", "Tenant_A", "--json"])).json();
    let versions: Vec<String> = list["models"].as_array().unwrap().iter().map(|m| m["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(versions.len(), 2, "{list}");
    let v2 = versions.iter().find(|v| **v != v1).unwrap().clone();

    let inp = input(&ws, "Tenant_A", 50, 3);
    let expect: std::collections::HashMap<String, Vec<(i64, u64)>> =
        [v1.clone(), v2.clone()].into_iter().map(|v| (v.clone(), predicted(&ws, "Tenant_A", &inp.csv, Some(&v)).0)).collect();
    assert_ne!(expect[&v1], expect[&v2]);

    let tok = token(&ws, "Tenant_A", &[]);
    let srv = Server::start(&ws, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut loaders = vec![];
    for k in 0..3 {
        let (stop, counts, expect) = (stop.clone(), counts.clone(), expect.clone());
        let (url_oip, url_ml, tok) = (srv.url("/v2/models/Tenant_A/infer"), srv.url("/invocations"), tok.clone());
        let (oip, split) = (inp.oip("load").to_string(), inp.split().to_string());
        let (v1, v2) = (v1.clone(), v2.clone());
        loaders.push(std::thread::spawn(move || {
            let a = agent();
            let mut failures = vec![];
            while !stop.load(Ordering::Relaxed) {
                let (version, scores) = if k % 2 == 0 {
                    let r = post(&a, &url_oip, Some(&tok), "application/json", oip.as_bytes());
                    if r.status != 200 {
                        failures.push(format!("OIP {}: {}", r.status, r.body));
                        continue;
                    }
                    let v = r.json();
                    (v["model_version"].as_str().unwrap().to_string(), oip_scores(&v))
                } else {
                    let r = post(&a, &url_ml, Some(&tok), "application/json", split.as_bytes());
                    if r.status != 200 {
                        failures.push(format!("MLflow {}: {}", r.status, r.body));
                        continue;
                    }
                    (r.headers.get("model_version").unwrap().to_str().unwrap().to_string(), mlflow_scores(&r.json()))
                };
                match expect.get(&version) {
                    Some(e) if *e == scores => {}
                    _ => failures.push(format!("response names {version} but its scores are not that model's")),
                }
                counts[if version == v1 {
                    0
                } else if version == v2 {
                    1
                } else {
                    2
                }]
                .fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let wait_for = |v: &str| {
        let a = agent();
        let t0 = Instant::now();
        loop {
            let r = post(&a, &srv.url("/v2/models/Tenant_A/infer"), Some(&tok), "application/json", inp.oip("w").to_string().as_bytes());
            if r.json()["model_version"] == v {
                return t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(3), "the server did not switch to {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        ok(ws.dagrun(&["models", "promote", "Tenant_A", &v2, "--reason", &format!("round {round}")]));
        wait_for(&v2);
        std::thread::sleep(Duration::from_millis(200));
        ok(ws.dagrun(&["models", "rollback", "Tenant_A"]));
        wait_for(&v1);
        std::thread::sleep(Duration::from_millis(200));
    }
    // A model failing its integrity check is never loaded: the server keeps the previous one.
    let reg = format!(".dagrun/registry/Tenant_A/versions/{v2}.json");
    let good = std::fs::read(ws.path(&reg)).unwrap();
    let mut tampered: Value = serde_json::from_slice(&good).unwrap();
    tampered["intercept"] = json!(tampered["intercept"].as_f64().unwrap() + 1.0);
    ws.write(&reg, serde_json::to_vec_pretty(&tampered).unwrap());
    let o = ws.dagrun(&["models", "promote", "Tenant_A", &v2]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("does not match its registry record"), "{}", o.stderr);
    // Forge the champion record behind dagrun's back: still refused by the server.
    let cpath = ".dagrun/registry/Tenant_A/champion.json";
    let mut c: Value = serde_json::from_str(&ws.read(cpath)).unwrap();
    c["version"] = json!(v2);
    c["blake3"] = json!(blake3::hash(&serde_json::to_vec_pretty(&tampered).unwrap()).to_hex().to_string());
    ws.write(cpath, serde_json::to_vec_pretty(&c).unwrap());
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = loaders.into_iter().flat_map(|l| l.join().unwrap()).collect();
    assert!(failures.is_empty(), "{} failed or mixed responses, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let (n1, n2, other) = (counts[0].load(Ordering::Relaxed), counts[1].load(Ordering::Relaxed), counts[2].load(Ordering::Relaxed));
    assert!(n1 > 10 && n2 > 10 && other == 0, "v1 {n1}, v2 {n2}, other {other}");
    let a = agent();
    let r = post(&a, &srv.url("/v2/models/Tenant_A/infer"), Some(&tok), "application/json", inp.oip("after").to_string().as_bytes());
    assert_eq!(r.json()["model_version"], v1.as_str(), "the tampered model was loaded");
    let m = get(&a, &srv.url("/metrics"), None).body;
    assert!(m.contains("dagrun_serve_model_load_failures_total{tenant=\"Tenant_A\""), "{m}");
    assert!(m.contains("dagrun_serve_model_switches_total 6"), "{m}");
    assert!(srv.log().contains("refused"), "{}", srv.log());
    // The history: append-only, who/when/from/to/why.
    let h = ok(ws.dagrun(&["models", "history", "Tenant_A", "--json"])).json();
    let h = h["history"].as_array().unwrap();
    assert_eq!(h.len(), 7, "{h:?}");
    assert_eq!(h[0]["action"], "promote");
    assert!(h[0]["why"].as_str().unwrap().contains("promote: auto"));
    assert_eq!(h[1]["from"], v1.as_str());
    assert_eq!(h[1]["to"], v2.as_str());
    assert_eq!(h[1]["why"], "round 0");
    assert_eq!(h[2]["action"], "rollback");
    assert!(h.iter().all(|e| !e["who"].as_str().unwrap().is_empty() && !e["time"].as_str().unwrap().is_empty()));
    // Nothing to roll back to: a clear error, exit non-zero.
    ws.write(&reg, &good);
    let o = ws.dagrun(&["models", "rollback", "Tenant_B"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("no previous champion"), "{}", o.stderr);
    // A reason cannot carry escape sequences to whoever reads the history,
    // and a history line edited to carry them is shown escaped.
    let o = ws.dagrun(&["models", "rollback", "Tenant_A", "--reason", "ok\x1b]0;pwned\x07"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("no control characters"), "{}", o.stderr);
    let hpath = ".dagrun/registry/Tenant_A/history.jsonl";
    let edited = ws.read(hpath).replacen("round 0", "round 0\\u001b[2J\\u001b]52;c;cGF5bG9hZA==\\u0007", 1);
    ws.write(hpath, edited);
    let shown = ws.dagrun(&["models", "history", "Tenant_A"]);
    assert!(shown.stdout.contains("round 0") && !shown.stdout.contains('\x1b') && !shown.stdout.contains('\x07'), "{:?}", shown.stdout);
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_0() {
    let ws = trained(3000);
    let tok = token(&ws, "Tenant_A", &[]);
    let mut srv = Server::start(&ws, &[]);
    let inp = input(&ws, "Tenant_A", 20, 4);
    let body = inp.oip("drain").to_string();
    // A request in flight: headers and half the body sent.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    write!(
        s,
        "POST /v2/models/Tenant_A/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let half = body.len() / 2;
    s.write_all(&body.as_bytes()[..half]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    srv.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    // No new connections once draining.
    assert!(TcpStream::connect(&srv.addr).is_err(), "the server still accepts connections after SIGTERM");
    assert!(srv.child.try_wait().unwrap().is_none(), "the server exited with a request in flight");
    s.write_all(&body.as_bytes()[half..]).unwrap();
    let mut resp = String::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"id\":\"drain\""), "{resp}");
    assert_eq!(srv.wait(Duration::from_secs(10)), 0, "{}", srv.log());
    // The server has exited; its last line may still be on its way through
    // the reader thread (CI once checked before it arrived).
    srv.wait_log("dagrun serve: stopped");
}

#[test]
fn slow_clients_time_out_and_a_tenant_without_model_gets_503() {
    let ws = Ws::new();
    let tok = token(&ws, "Tenant_A", &[]);
    let srv = Server::start(&ws, &["--header-timeout", "0.5", "--request-timeout", "1"]);
    srv.wait_log("Tenant_A: no champion yet");
    let a = agent();
    let r = post(&a, &srv.url("/v2/models/Tenant_A/infer"), Some(&tok), "application/json", b"{}");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(get(&a, &srv.url("/v2/health/live"), None).status, 200);
    // Headers never finished: the connection is closed.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(t0.elapsed() < Duration::from_secs(4), "slow headers were not cut off");
    // A body that never completes: 408 after the request timeout (or the connection is closed).
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    write!(s, "POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Type: text/csv\r\nContent-Length: 1000\r\n\r\nCustomer_ID")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(t0.elapsed() < Duration::from_secs(4), "a slow body held the connection");
}

#[test]
fn tls_with_a_self_signed_certificate_and_plaintext_only_on_loopback() {
    let ws = trained(3000);
    let tok = token(&ws, "Tenant_A", &[]);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    ws.write("tls/cert.pem", ck.cert.pem());
    ws.write("tls/key.pem", ck.signing_key.serialize_pem());
    let cert = ws.path("tls/cert.pem");
    let key = ws.path("tls/key.pem");
    use std::os::unix::fs::PermissionsExt;
    // A private key every user can read is refused, naming the fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = ws.dagrun(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("readable by every user") && o.stderr.contains("chmod 600"), "{}", o.stderr);
    // A FIFO or a device in place of a PEM file: refused at once (a FIFO
    // once held the start forever, /dev/zero was read without end).
    let fifo = ws.path("tls/fifo.pem");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (c, k) in [(fifo.to_str().unwrap(), key.to_str().unwrap()), ("/dev/zero", key.to_str().unwrap()), (cert.to_str().unwrap(), fifo.to_str().unwrap())] {
        let o = crate::common::spawn(ws.cmd(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", c, "--tls-key", k])).wait(Duration::from_secs(20));
        assert_eq!(o.code, 2, "{c} {k}: {}", o.stderr);
        assert!(o.stderr.contains("not a regular file"), "{c} {k}: {}", o.stderr);
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let srv = Server::start(&ws, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let tls =
        ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&[ureq::tls::Certificate::from_der(ck.cert.der()).to_owned()])).build();
    let a = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).tls_config(tls).build());
    let port = srv.addr.rsplit(':').next().unwrap();
    let base = format!("https://localhost:{port}");
    let inp = input(&ws, "Tenant_A", 25, 5);
    let (want, _) = predicted(&ws, "Tenant_A", &inp.csv, None);
    let r = post(&a, &format!("{base}/v2/models/Tenant_A/infer"), Some(&tok), "application/json", inp.oip("tls").to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(oip_scores(&r.json()), want);
    let r = post(&a, &format!("{base}/invocations"), Some(&tok), "text/csv", inp.csv.as_bytes());
    assert_eq!(mlflow_scores(&r.json()), want);
    // Plain HTTP to the TLS port gets no HTTP answer; a client without the CA refuses the server.
    assert!(agent().get(&srv.url("/v2/health/live")).call().is_err());
    assert!(agent().get(&format!("{base}/v2/health/live")).call().is_err());
    // No TLS on a non-loopback address needs --insecure-plaintext, and says so.
    let o = ws.dagrun(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--insecure-plaintext"), "{}", o.stderr);
    let mut insecure = Server::start_listen(&ws, "0.0.0.0:0", &["--insecure-plaintext"]);
    insecure.wait_log("WARNING: plain HTTP");
    insecure.sigterm();
    assert_eq!(insecure.wait(Duration::from_secs(10)), 0);
    // Bad certificate files: a clear error, exit 2.
    ws.write("tls/junk.pem", "not a certificate");
    let o = ws.dagrun(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", ws.path("tls/junk.pem").to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--tls-cert"), "{}", o.stderr);
}

/// The token file is sealed (review 8 forged a Tenant_B token by appending
/// a record): a running server refuses a forged or altered file and keeps
/// its tokens, and refuses an older copy put back to lift a revocation.
#[test]
fn a_forged_or_replayed_token_file_is_refused_by_a_running_server() {
    let ws = trained(2000);
    let tok_a = token(&ws, "Tenant_A", &[]);
    let tok_b = token(&ws, "Tenant_B", &[]);
    let before_revoke = ws.read(".dagrun/tokens.json");
    let id_b = {
        let l = ok(ws.dagrun(&["tokens", "list", "--json"])).json();
        l["tokens"].as_array().unwrap().iter().find(|t| t["tenant"] == "Tenant_B").unwrap()["id"].as_str().unwrap().to_string()
    };
    ok(ws.dagrun(&["tokens", "revoke", &id_b]));
    let srv = Server::start(&ws, &[]);
    let a = agent();
    let inp_b = input(&ws, "Tenant_B", 5, 3);
    let infer_b = srv.url("/v2/models/Tenant_B/infer");
    let refused_b = |a: &ureq::Agent, tok: &str| post(a, &infer_b, Some(tok), "application/json", inp_b.oip("x").to_string().as_bytes()).status;
    assert_eq!(refused_b(&a, &tok_b), 401);
    let failures = |a: &ureq::Agent| {
        let m = get(a, &srv.url("/metrics"), None).body;
        m.lines().find(|l| l.starts_with("dagrun_serve_token_reload_failures_total")).unwrap().to_string()
    };
    // A forged token appended for Tenant_B (the hash of a token of the attacker's choosing).
    let forged = format!("dgr_{}", "ab".repeat(32));
    let mut v: Value = serde_json::from_str(&ws.read(".dagrun/tokens.json")).unwrap();
    let mut rec = v["tokens"][0].clone();
    rec["id"] = json!("0badc0de");
    rec["tenant"] = json!("Tenant_B");
    rec["sha256"] = json!(hex_sha256(forged.as_bytes()));
    v["tokens"].as_array_mut().unwrap().push(rec);
    let current = ws.read(".dagrun/tokens.json");
    ws.write(".dagrun/tokens.json", serde_json::to_vec_pretty(&v).unwrap());
    srv.wait_log("cannot reload the tokens");
    assert_eq!(refused_b(&a, &forged), 401, "a forged token was accepted");
    assert!(failures(&a).ends_with(" 1"), "{}", failures(&a));
    // The old file from before the revocation, sealed and valid, put back: refused as older.
    ws.write(".dagrun/tokens.json", &current);
    std::thread::sleep(Duration::from_millis(1500));
    ws.write(".dagrun/tokens.json", &before_revoke);
    srv.wait_log("older than the one loaded");
    assert_eq!(refused_b(&a, &tok_b), 401, "a replayed file lifted a revocation");
    // Tenant_A's token kept working all along.
    let inp_a = input(&ws, "Tenant_A", 5, 3);
    assert_eq!(post(&a, &srv.url("/v2/models/Tenant_A/infer"), Some(&tok_a), "application/json", inp_a.oip("a").to_string().as_bytes()).status, 200);
    // The commands refuse the forged file too, naming the way out; removing
    // it and creating the tokens again takes effect in the running server
    // (a file made anew is newer than any before it).
    ws.write(".dagrun/tokens.json", serde_json::to_vec_pretty(&v).unwrap());
    let o = ws.dagrun(&["tokens", "list"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("modified outside dagrun") && o.stderr.contains("create the tokens again"), "{}", o.stderr);
    std::fs::remove_file(ws.path(".dagrun/tokens.json")).unwrap();
    // Review 26: removing the file takes every token with it at once.
    srv.wait_log("was removed: every token is refused");
    let infer_a = srv.url("/v2/models/Tenant_A/infer");
    assert_eq!(
        post(&a, &infer_a, Some(&tok_a), "application/json", inp_a.oip("a0").to_string().as_bytes()).status,
        401,
        "a removed token file kept its tokens"
    );
    let tok_a2 = token(&ws, "Tenant_A", &[]);
    srv.wait_log("tokens reloaded (1 tokens)");
    assert_eq!(post(&a, &infer_a, Some(&tok_a2), "application/json", inp_a.oip("a2").to_string().as_bytes()).status, 200);
    assert_eq!(post(&a, &infer_a, Some(&tok_a), "application/json", inp_a.oip("a1").to_string().as_bytes()).status, 401);
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// `--max-connections`: idle clients cannot hold every slot (review 26: one
/// client opening idle connections locked every tenant out). A connection
/// accepted when all are open closes the oldest one not in a request and is
/// served, at once: one that sent nothing, one that sent half its headers
/// (review 28: those stayed open until the header timeout, and piled up),
/// and one whose body never comes (review 28: a token's slow uploads locked
/// the other tenants out). Evictions are counted; a slot freed is used again.
/// (Refusal when every connection is in a request: `serve::tests`.)
#[test]
fn at_max_connections_the_oldest_connection_not_in_a_request_makes_room() {
    let ws = trained(2000);
    let tok = token(&ws, "Tenant_A", &[]);
    let srv = Server::start(&ws, &["--max-connections", "2", "--header-timeout", "30", "--request-timeout", "30"]);
    let closed_within = |s: &mut TcpStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 256];
        let t0 = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t0.elapsed()),
                Err(_) => return None,
            }
        }
    };
    let served = |srv: &Server| {
        let mut c = TcpStream::connect(&srv.addr).unwrap();
        c.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer
    };
    let slow_body =
        format!("POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{");
    for (what, sent) in [("nothing", ""), ("half its headers", "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"), ("a body that never ends", slow_body.as_str())] {
        let mut held: Vec<TcpStream> = (0..2)
            .map(|_| {
                let mut c = TcpStream::connect(&srv.addr).unwrap();
                c.write_all(sent.as_bytes()).unwrap();
                c
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let answer = served(&srv);
        assert!(answer.starts_with("HTTP/1.1 200"), "with two connections that sent {what}, a new one was not served: {answer:?}");
        let t = closed_within(&mut held[0], Duration::from_secs(5));
        assert!(t.is_some(), "the oldest connection, which sent {what}, was not closed to make room");
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
    }
    let r = get(&agent(), &srv.url("/metrics"), None);
    assert_eq!(r.status, 200);
    let evicted = r.body.lines().find(|l| l.starts_with("dagrun_serve_connections_evicted_total ")).unwrap_or_default().to_string();
    assert!(evicted.split(' ').nth(1).and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n >= 3), "{evicted}");
    assert!(r.body.contains("dagrun_serve_connections_refused_total 0\n"), "{}", r.body);
    let o = ws.dagrun(&["serve", "--max-connections", "0"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}

/// A client that pipelines requests and never reads the answers held its
/// connection slot for as long as it kept the socket open, so a few of them
/// locked everyone out (review 10): a connection whose answers make no
/// progress for --request-timeout is closed and its slot freed.
#[test]
fn clients_that_stop_reading_their_answers_lose_their_connection() {
    let ws = trained(2000);
    let srv = Server::start(&ws, &["--max-connections", "2", "--header-timeout", "1", "--request-timeout", "1"]);
    let stuck: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&srv.addr).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            // Until the server stops reading: its answers fill both socket buffers.
            let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(64);
            let t0 = Instant::now();
            while s.write_all(&req).is_ok() {
                assert!(t0.elapsed() < Duration::from_secs(60), "the server never stopped reading");
            }
            s
        })
        .collect();
    // Both slots are taken now; after the send timeout they are free again.
    std::thread::sleep(Duration::from_millis(2500));
    let r = get(&agent(), &srv.url("/v2/health/live"), None);
    assert_eq!(r.status, 200, "a new client was locked out by clients that read nothing");
    drop(stuck);
}

/// Send raw HTTP on a new connection and read the whole answer (the server
/// closes or the 10 s read timeout ends it).
fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Hostile requests (from a review that attacked the server): values are
/// described, never echoed; a body of tiny JSON values is refused while it
/// is parsed; size refusals come after the token, as JSON, audited with the
/// tenant; two Authorization headers and unknown methods get JSON answers;
/// a second SIGTERM stops a drain that a slow upload would hold.
#[test]
fn hostile_requests_are_bounded_described_and_audited() {
    let ws = trained(2000);
    let tok = token(&ws, "Tenant_A", &[]);
    let tok_b = token(&ws, "Tenant_B", &[]);
    let mut srv = Server::start(&ws, &["--max-body", "200000", "--max-rows", "1000", "--drain-timeout", "60"]);
    let a = agent();
    let inv = srv.url("/invocations");
    // A headerless CSV: its first row (PII) is taken for the header.
    let r = post(&a, &inv, Some(&tok), "text/csv", b"jane.doe@example.com,17,3,2025-01-01\n");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().starts_with("request: column 1: unknown column name (20 characters, looks like an e-mail address)"), "{}", r.body);
    assert!(!r.body.contains("jane"), "{}", r.body);
    // 3 bytes of JSON per record, more records than 1000 rows allow: 413 while parsing.
    let body = format!(r#"{{"dataframe_records":[{}]}}"#, vec!["{}"; 9000].join(","));
    let r = post(&a, &inv, Some(&tok), "application/json", body.as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("holds more values than 1000 rows can"), "{}", r.body);
    // A declared length over --max-body: without a token 401 (the token comes first),
    // with one a JSON 413 (and `Connection: close`: the body was never read).
    let over = |auth: &str| format!("POST /invocations HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: text/csv\r\nContent-Length: 300000\r\n\r\n");
    assert!(raw(&srv.addr, over("").as_bytes()).starts_with("HTTP/1.1 401"));
    let resp = raw(&srv.addr, over(&format!("Authorization: Bearer {tok}\r\n")).as_bytes());
    assert!(resp.starts_with("HTTP/1.1 413") && resp.contains("\"error_code\":\"BAD_REQUEST\"") && resp.contains("--max-body"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
    // Two Authorization headers (the other tenant's last): refused, not guessed.
    let two =
        format!("GET /v2/models/Tenant_A HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nAuthorization: Bearer {tok_b}\r\nConnection: close\r\n\r\n");
    let resp = raw(&srv.addr, two.as_bytes());
    assert!(resp.starts_with("HTTP/1.1 400") && resp.contains("more than one Authorization header"), "{resp}");
    // A model name that is not UTF-8 once decoded: the token first, then a JSON 400.
    let bad_name = |auth: &str| format!("GET /v2/models/%FF%FE HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    assert!(raw(&srv.addr, bad_name("").as_bytes()).starts_with("HTTP/1.1 401"));
    let resp = raw(&srv.addr, bad_name(&format!("Authorization: Bearer {tok}\r\n")).as_bytes());
    assert!(resp.starts_with("HTTP/1.1 400") && resp.contains(r#"{"error":"the model name or version in the URL is not valid"#), "{resp}");
    // An unknown method: JSON 405.
    let r = get(&a, &inv, Some(&tok));
    assert_eq!(r.status, 405, "{}", r.body);
    assert!(r.error().contains("does not take this method"), "{}", r.body);
    assert_eq!(r.json()["error_code"], "BAD_REQUEST", "/invocations answers in MLflow's shape: {}", r.body);
    let del = format!("DELETE /v2/models/Tenant_A/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n");
    let resp = raw(&srv.addr, del.as_bytes());
    assert!(resp.starts_with("HTTP/1.1 405") && resp.contains(r#"{"error":"this route does not take this method"}"#), "{resp}");
    assert_eq!(get(&a, &srv.url("/v2/health/live"), None).status, 200);
    // A slow upload holds the drain; a second SIGTERM ends it (the drain timeout is 60 s).
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    write!(s, "POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Type: text/csv\r\nContent-Length: 1000\r\n\r\nCustomer_ID")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    srv.sigterm();
    srv.wait_log("a second signal stops at once");
    std::thread::sleep(Duration::from_millis(300));
    assert!(srv.child.try_wait().unwrap().is_none(), "the server did not wait for the request in flight");
    srv.sigterm();
    let t0 = Instant::now();
    srv.wait(Duration::from_secs(10));
    assert!(t0.elapsed() < Duration::from_secs(5), "a second SIGTERM did not stop the drain");
    drop(s);
    // The refusals are audited with the caller's token and tenant.
    let day = chrono::Utc::now().format("%Y-%m-%d");
    let audit = ws.read(&format!(".dagrun/audit/serve-audit-{day}.jsonl"));
    let lines: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().filter(|l| l["status"] == 413 && l["tenant"] == "Tenant_A" && !l["token_id"].is_null()).count() >= 2, "{audit}");
    assert!(!audit.contains("jane"));
}

/// A symlink planted where today's audit log goes: the server refuses to
/// start (naming the file) instead of appending the log where the link points.
#[test]
fn a_planted_audit_link_is_refused_at_start() {
    let ws = Ws::new();
    let victim = ws.path("victim.txt");
    std::fs::write(&victim, "untouched\n").unwrap();
    let day = chrono::Utc::now().format("%Y-%m-%d");
    let log = ws.path(&format!(".dagrun/audit/serve-audit-{day}.jsonl"));
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    let o = ws.dagrun(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("cannot open the audit log") && o.stderr.contains("not a symlink"), "{}", o.stderr);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
}

/// Helper-65: start-up errors exit 2 naming the fix, as the README says (a
/// port in use exited 1); `--listen localhost:PORT` is an address (it was
/// refused); `--audit-dir` is held to `report -o`'s rule (config/ was
/// accepted); a server with no usable token says every request gets 401.
#[test]
fn start_up_errors_exit_2_a_host_name_listens_and_no_token_is_warned_of() {
    let ws = Ws::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let o = ws.dagrun(&["serve", "--listen", &format!("127.0.0.1:{port}")]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!("--listen 127.0.0.1:{port}: cannot listen there")) && o.stderr.contains(&format!("another process listens on port {port}")),
        "{}",
        o.stderr
    );
    for (dir, why) in [("config", "inside config/"), ("runs", "replace a run record"), (".dagrun", "inside .dagrun/")] {
        let o = ws.dagrun(&["serve", "--listen", "127.0.0.1:0", "--audit-dir", dir]);
        assert_eq!(o.code, 2, "--audit-dir {dir}: {}", o.stderr);
        assert!(o.stderr.contains("--audit-dir") && o.stderr.contains(why), "--audit-dir {dir}: {}", o.stderr);
    }
    assert!(!ws.exists("config") && !ws.exists("runs"), "a refused --audit-dir was created");
    let o = ws.dagrun(&["serve", "--listen", "no-such-host.invalid:8080"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("does not resolve") && o.stderr.contains("localhost:8080"), "{}", o.stderr);

    // (Absolute: the server's current folder is the test's, the crate root.)
    let audit = ws.path("audit");
    let srv = Server::start_listen(&ws, "localhost:0", &["--audit-dir", audit.to_str().unwrap()]);
    assert!(srv.addr.starts_with("127.0.0.1:"), "{}", srv.addr);
    srv.wait_log("WARNING: no valid API token: every scoring request gets 401 until one is made with `dagrun tokens create TENANT`");
    let r = get(&agent(), &srv.url("/v2/health/live"), None);
    assert_eq!(r.status, 200);
    drop(srv);
    assert!(audit.is_dir(), "the audit log went to --audit-dir");
    token(&ws, "Tenant_A", &[]);
    // The default folder written out is the default, not a refused .dagrun/ path.
    let default = ws.path(".dagrun/audit");
    let mut srv = Server::start(&ws, &["--audit-dir", default.to_str().unwrap()]);
    srv.sigterm();
    assert_eq!(srv.wait(Duration::from_secs(20)), 0);
    srv.wait_log("dagrun serve: stopped");
    std::thread::sleep(Duration::from_millis(100));
    assert!(!srv.log().contains("no valid API token"), "{}", srv.log());
}

/// One tenant's slow uploads hold at most its own share of the bodies the
/// server keeps at once: another tenant is still answered at once, while
/// the first tenant's next request waits for its own share.
#[test]
fn one_tenants_slow_uploads_do_not_starve_another() {
    let ws = trained(2000);
    let (tok_a, tok_b) = (token(&ws, "Tenant_A", &[]), token(&ws, "Tenant_B", &[]));
    let (csv_a, csv_b) = (input(&ws, "Tenant_A", 5, 3).csv, input(&ws, "Tenant_B", 5, 3).csv);
    let srv = Server::start(&ws, &["--max-body", "100000", "--request-timeout", "5"]);
    // Sixteen of Tenant_A's largest bodies, announced and never sent: as many
    // as the server holds at once, but four are its whole share.
    let t_slow = Instant::now();
    let slow: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(&srv.addr).unwrap();
            write!(
                s,
                "POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok_a}\r\nContent-Type: text/csv\r\nContent-Length: 100000\r\n\r\nCustomer_ID"
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let a = agent();
    let t0 = Instant::now();
    let r = post(&a, &srv.url("/invocations"), Some(&tok_b), "text/csv", csv_b.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t0.elapsed() < Duration::from_secs(2), "Tenant_B waited {:?} behind Tenant_A's uploads", t0.elapsed());
    // Tenant_A's next request waits for its own share: until the request
    // timeout (5 s) cuts the uploads off.
    let r = post(&a, &srv.url("/invocations"), Some(&tok_a), "text/csv", csv_a.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t_slow.elapsed() > Duration::from_millis(4500), "Tenant_A's request did not wait for its share: {:?}", t_slow.elapsed());
    drop(slow);
}
