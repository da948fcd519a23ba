#!/usr/bin/env bash
# Benchmark of `dagrun serve` over loopback with wrk (release build, a
# temporary workspace; nothing is written to the repository).
#
#   bench/serve.sh                 16 connections, 10 s per case, 3 rounds
#   bench/serve.sh --duration 30   longer cases
#   bench/serve.sh --rounds 1      one pass
#   bench/serve.sh --workers 1     server worker threads (default: cores)
#   DAGRUN_BIN=/path/to/dagrun bench/serve.sh   measure another build (no cargo build)
#
# It trains the default pipeline (100k rows), creates a token, starts the
# server and load-tests, with wrk on the same machine (and the same cores):
#   /v2/health/live (the ceiling of this machine and server), then 1-row and
#   1000-row requests to /invocations (MLflow dataframe_split) and
#   /v2/models/Tenant_A/infer (Open Inference Protocol).
# The five cases run one after another, in rounds (the machine may be shared:
# a round measures the ceiling and the scoring cases under the same load);
# each figure is the median over the rounds. For each case it prints req/s,
# rows/s, p50 and p99 latency (wrk's) and errors (connection errors and
# answers with status >= 400, counted by wrk); then the aims of issue 10 and
# whether this run met them, the server's peak RSS, the load average, and the
# audit log's line count against the scoring requests made.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=10
conns=16
threads=2
rounds=3
workers=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift ;;
    --connections) conns="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --workers) workers="$2"; shift ;;
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

if [ -z "${DAGRUN_BIN:-}" ] && [ -z "${SKIP_BUILD:-}" ]; then cargo build --release --quiet; fi
BIN="${DAGRUN_BIN:-$PWD/target/release/dagrun}"   # DAGRUN_BIN=/path/to/dagrun: measure another build
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
echo "dagrun:  $("$BIN" --version) ($(git rev-parse --short HEAD 2> /dev/null || echo '?')); $workers server workers; $conns connections, $threads wrk threads, ${duration}s per case, $rounds rounds"
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

"$BIN" -q -C "$ws" serve --listen 127.0.0.1:0 --workers "$workers" > "$ws/serve.out" 2> "$ws/serve.err" &
server=$!
addr=""
for _ in $(seq 600); do
  addr=$(sed -n 's/.*listening on http:\/\/\([^ ]*\) .*/\1/p' "$ws/serve.out" 2> /dev/null)
  [ -n "$addr" ] && break
  kill -0 "$server" 2> /dev/null || break
  sleep 0.05
done
[ -n "$addr" ] || { echo "the server did not start:"; cat "$ws/serve.out" "$ws/serve.err"; exit 1; }

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
-- No response() hook: wrk would run Lua on every response, taking CPU from
-- the server on the same cores. wrk counts answers with status >= 400 itself.
function done(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end
LUA

# Check every case answers 200 once before loading it.
for c in "/invocations mlflow-1" "/v2/models/Tenant_A/infer oip-1"; do
  read -r path body <<< "$c"
  code=$(curl -s -o "$ws/answer" -w '%{http_code}' -H "Authorization: Bearer $token" -H 'Content-Type: application/json' --data-binary "@$ws/$body.json" "http://$addr$path")
  [ "$code" = 200 ] || { echo "$path answered $code: $(cat "$ws/answer")"; exit 1; }
done

names=("/v2/health/live (ceiling)" "/invocations, 1 row" "/v2/models/T/infer, 1 row" "/invocations, 1000 rows" "/v2/models/T/infer, 1000 rows")
paths=(/v2/health/live /invocations /v2/models/Tenant_A/infer /invocations /v2/models/Tenant_A/infer)
nrows=(0 1 1 1000 1000)
bodies=("" "$ws/mlflow-1.json" "$ws/oip-1.json" "$ws/mlflow-1000.json" "$ws/oip-1000.json")
ctypes=("" application/json application/json application/json application/json)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$ws/results"
scoring_requests=2 # the two checks above
for r in $(seq "$rounds"); do
  echo "round $r/$rounds…"
  for i in "${!names[@]}"; do
    out=$(BODY="${bodies[$i]}" CTYPE="${ctypes[$i]}" TOKEN="$token" wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s "$ws/post.lua" "http://$addr${paths[$i]}" | grep '^RESULT')
    read -r _ rps p50 p99 errors total <<< "$out"
    echo "$i $rps $p50 $p99 $errors" >> "$ws/results"
    if [ "$i" -gt 0 ]; then scoring_requests=$((scoring_requests + total)); fi
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
metrics=$(curl -s "http://$addr/metrics")
peak=$(awk '/VmHWM/{print $2}' "/proc/$server/status")
kill -TERM "$server"
wait "$server" || true
server=""
audit_lines=$(cat "$ws"/.dagrun/audit/*.jsonl | wc -l)
audit_failures=$(echo "$metrics" | awk '/^dagrun_serve_audit_write_failures_total/{print $2}')

# Medians over the rounds, the table, and the aims.
python3 - "$ws/results" "$rounds" "$conns" "${nrows[*]}" "${names[@]}" <<'PY'
import statistics, sys
path, rounds, conns, nrows = sys.argv[1], int(sys.argv[2]), sys.argv[3], [int(x) for x in sys.argv[4].split()]
names = sys.argv[5:]
res = {}
for line in open(path):
    i, rps, p50, p99, err = line.split()
    res.setdefault(int(i), []).append((float(rps), float(p50), float(p99), int(err)))
med = {}
print(f"\n{'case (' + conns + ' connections)':<32} {'req/s':>9} {'rows/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
for i, name in enumerate(names):
    rs = res[i]
    m = tuple(statistics.median(x[k] for x in rs) for k in range(3)) + (sum(x[3] for x in rs),)
    med[i] = m
    rows = f"{m[0] * nrows[i]:11.0f}" if nrows[i] else f"{'-':>11}"
    print(f"{name:<32} {m[0]:9.0f} {rows} {m[1]:7.2f} {m[2]:7.2f} {m[3]:6d}")
if rounds > 1:
    print(f"(medians of {rounds} rounds; req/s of each round:")
    for i, name in enumerate(names):
        print(f"   {name:<30} " + " / ".join(f"{x[0]:.0f}" for x in res[i]))
    print(")")
ceiling = med[0][0]
one = min(med[1][0], med[2][0])
p99 = max(med[1][2], med[2][2])
thousand = min(med[3][0], med[4][0]) * 1000
def v(ok): return "met" if ok else "NOT met"
print("\naims of issue 10 (the slower protocol counts):")
print(f"  1-row >= 20,000 req/s              {one:10.0f} req/s   {v(one >= 20000)}")
print(f"  1-row p99 <= 5 ms                  {p99:10.2f} ms      {v(p99 <= 5)}")
print(f"  1000-row >= 2,000,000 rows/s       {thousand:10.0f} rows/s  {v(thousand >= 2e6)}")
print(f"  1-row >= half the ceiling          {one / ceiling * 100:10.0f} %       {v(one >= ceiling / 2)}")
PY
echo
echo "server peak RSS: $((peak / 1024)) MiB"
echo "load average (1/5/15 min) before: $load_before, after: $load_after"
echo "audit log: $audit_lines lines for $scoring_requests scoring requests counted by wrk (a few more are answered after wrk stops counting); lines dropped: ${audit_failures:-?}"
