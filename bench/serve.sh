#!/usr/bin/env bash
# Benchmark of `dagrun serve` over loopback with wrk (release build, a
# temporary workspace; nothing is written to the repository).
#
#   bench/serve.sh                 16 connections, 10 s per case
#   bench/serve.sh --duration 30   longer cases
#
# It trains the default pipeline (100k rows), creates a token, starts the
# server and load-tests, with wrk on the same machine (and the same cores):
#   /v2/health/live (the ceiling of this machine and server), then 1-row and
#   1000-row requests to /invocations (MLflow dataframe_split) and
#   /v2/models/Tenant_A/infer (Open Inference Protocol).
# For each case it prints req/s, rows/s, p50 and p99 latency (wrk's), and at
# the end the server's peak RSS. Every response's status is checked by the
# wrk script: a non-200 answer is counted and reported.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=10
conns=16
threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift ;;
    --connections) conns="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v wrk > /dev/null; then
  echo "installing wrk (Debian package)…"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq > /dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk > /dev/null
fi

cargo build --release --quiet
BIN="$PWD/target/release/dagrun"
export DAGRUN_MASTER_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f  # benchmark-only key
ws=$(mktemp -d /tmp/dagrun-serve-bench.XXXXXX)
server=""
cleanup() {
  if [ -n "$server" ]; then kill -TERM "$server" 2> /dev/null || true; wait "$server" 2> /dev/null || true; fi
  rm -rf "$ws"
}
trap cleanup EXIT
mkdir -p "$ws/config" "$ws/pipelines"
cp pipelines/propensity.yaml "$ws/pipelines/"
printf 'tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n' > "$ws/config/tenants.yaml"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "dagrun:  $("$BIN" --version); $conns connections, $threads wrk threads, ${duration}s per case"
"$BIN" -q run "$ws/pipelines/propensity.yaml" -p rows=100000
token=$("$BIN" -C "$ws" tokens create Tenant_A --name bench 2> /dev/null | tail -1)

# Request bodies: 1 row and 1000 rows of Tenant_A, both protocols.
"$BIN" sample --tenant Tenant_A --rows 1000 --seed 5 --no-label --out "$ws/rows.csv"
python3 - "$ws" <<'PY'
import csv, json, sys
ws = sys.argv[1]
rows = list(csv.DictReader(open(f"{ws}/rows.csv")))
cols = ["Customer_ID", "Login_Count", "Purchase_Amount", "Last_Visit_Date"]
def typed(c, v):
    return int(v) if c in ("Customer_ID", "Login_Count") else float(v) if c == "Purchase_Amount" else v
for n in (1, 1000):
    rs = rows[:n]
    split = {"dataframe_split": {"columns": cols, "data": [[typed(c, r[c]) for c in cols] for r in rs]}}
    dt = {"Customer_ID": "INT64", "Login_Count": "INT64", "Purchase_Amount": "FP64", "Last_Visit_Date": "BYTES"}
    oip = {"id": "bench", "inputs": [{"name": c, "shape": [n], "datatype": dt[c], "data": [typed(c, r[c]) for r in rs]} for c in cols]}
    json.dump(split, open(f"{ws}/mlflow-{n}.json", "w"), separators=(",", ":"))
    json.dump(oip, open(f"{ws}/oip-{n}.json", "w"), separators=(",", ":"))
PY

"$BIN" -q -C "$ws" serve --listen 127.0.0.1:0 --workers "$(nproc)" > "$ws/serve.out" 2> "$ws/serve.err" &
server=$!
for _ in $(seq 100); do grep -q listening "$ws/serve.out" 2> /dev/null && break; sleep 0.05; done
addr=$(sed -n 's/.*listening on http:\/\/\([^ ]*\).*/\1/p' "$ws/serve.out")
[ -n "$addr" ] || { echo "the server did not start:"; cat "$ws/serve.err"; exit 1; }

cat > "$ws/post.lua" <<'LUA'
local body_file, ctype, token = os.getenv("BODY"), os.getenv("CTYPE"), os.getenv("TOKEN")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = ctype
  wrk.headers["Authorization"] = "Bearer " .. token
end
local bad = 0
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end
function done(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end
LUA

printf '\n%-34s %12s %14s %9s %9s %7s\n' "case" "req/s" "rows/s" "p50 ms" "p99 ms" "errors"
run_case() { # name path rows body ctype
  local out
  out=$(BODY="$4" CTYPE="$5" TOKEN="$token" wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s "$ws/post.lua" "http://$addr$2" | grep '^RESULT')
  read -r _ rps p50 p99 errors total <<< "$out"
  printf '%-34s %12.0f %14.0f %9.2f %9.2f %7d\n' "$1" "$rps" "$(python3 -c "print($rps * $3)")" "$p50" "$p99" "$errors"
}
run_case "/v2/health/live (ceiling)" /v2/health/live 0 "" ""
run_case "/invocations, 1 row" /invocations 1 "$ws/mlflow-1.json" application/json
run_case "/v2/models/T/infer, 1 row" /v2/models/Tenant_A/infer 1 "$ws/oip-1.json" application/json
run_case "/invocations, 1000 rows" /invocations 1000 "$ws/mlflow-1000.json" application/json
run_case "/v2/models/T/infer, 1000 rows" /v2/models/Tenant_A/infer 1000 "$ws/oip-1000.json" application/json

peak=$(awk '/VmHWM/{print $2}' "/proc/$server/status")
echo
echo "server peak RSS: $((peak / 1024)) MiB"
kill -TERM "$server"
wait "$server" || true
server=""
audit_lines=$(cat "$ws"/.dagrun/audit/*.jsonl | wc -l)
echo "audit log: $audit_lines lines"
