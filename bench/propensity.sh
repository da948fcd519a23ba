#!/usr/bin/env bash
# Benchmark of the propensity pipeline (release build, temporary workspaces).
#
#   bench/propensity.sh            100k and 1M rows, 2 tenants
#   bench/propensity.sh --large    also 10M rows
#   bench/propensity.sh --tenants 50 --rows 1000000   one size, N tenants
#   bench/propensity.sh --tenants 50 --rows 1000000 --ingest
#                                  also: the ingest pipeline on one file per tenant,
#                                  then one tenant's file changes (what reruns?)
#   DAGRUN_BIN=path bench/propensity.sh ...   measure that binary (no build)
#   bench/propensity.sh --vs-seed [--rows N] [--large]
#                                  dagrun against ../shared/baselines/seed_engine.py
#                                  (the Python engine it replaces, with --aes
#                                  --all-tenants), alternately, 3 times each, in fresh
#                                  workspaces: medians of wall time and peak memory of
#                                  both, and the ratios. Sets up the seed's Python
#                                  environment (bench/.venv-seed) with pip on first use.
#
# For each size it prints: cold run, no-op run (median of 3), C-change rerun,
# peak memory (max RSS), each stage's wall time (summed over tenants), CPU
# utilisation ((user+sys)/wall) and rows per second, and output sizes; the cold
# run's user and system CPU and the encrypt stages' CPU per row; then the same
# cold run once more in a new workspace right after deleting the first one
# (what the kernel freed is reused: on a VM that backs guest memory lazily,
# first-touch faults make the two differ), and with --large the 10M / 1M
# ratio of both kinds of cold run.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=(100000 1000000)
tenants=2
ingest=0
vs_seed=0
while [ $# -gt 0 ]; do
  case "$1" in
    --ingest) ingest=1 ;;
    --vs-seed) vs_seed=1 ;;
    --large) sizes+=(10000000) ;;
    --rows) sizes=("$2"); shift ;;
    --tenants) tenants="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
# DAGRUN_BIN=/path/to/dagrun measures that binary instead of building this tree
# (e.g. to alternate an older build with a newer one on a busy machine).
if [ -n "${DAGRUN_BIN:-}" ]; then
  BIN="$DAGRUN_BIN"
else
  cargo build --release --quiet
  BIN="$PWD/target/release/dagrun"
fi
export DAGRUN_MASTER_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f  # benchmark-only key
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "dagrun:  $("$BIN" --version), $tenants tenants"

tenant_config() {
  python3 - "$1" <<'PY'
import sys
n = int(sys.argv[1])
if n == 2:
    print("tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4")
else:
    shares = [1.0 / n] * n
    shares[-1] = 1.0 - sum(shares[:-1])
    print("tenants:")
    for i, s in enumerate(shares):
        print(f"  - id: T{i:02d}\n    share: {s!r}")
PY
}

timed_cpu() { # prints "wall_seconds maxrss_kb user_seconds system_seconds" of a command (wall clock in ns resolution)
  local t0 t1
  t0=$(date +%s%N)
  /usr/bin/time -f "%M %U %S" -o /tmp/dagrun-bench-time "$@" > /dev/null
  t1=$(date +%s%N)
  echo "$(( (t1 - t0) / 1000 ))e-6 $(cat /tmp/dagrun-bench-time)"
}

timed() { # prints "wall_seconds maxrss_kb" of a command
  timed_cpu "$@" | cut -d' ' -f1-2
}

# The newest run record of workspace $1.
last_record() { ls "$1"/runs/*.json | sort | tail -1; }

# CPU per row of the encrypt stages (user+sys of their threads, from the run record).
encrypt_us_per_row() {
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = sum(s.get("cpu_seconds") or 0.0 for s in r["stages"] if s["stage"].split("[")[0] == "encrypt")
print(f"{cpu / int(sys.argv[2]) * 1e6:.3f}")
PY
}

fresh_workspace() { # a new workspace with the default pipeline and N tenants
  local ws
  ws=$(mktemp -d /tmp/dagrun-bench.XXXXXX)
  mkdir -p "$ws/config" "$ws/pipelines"
  cp pipelines/propensity.yaml "$ws/pipelines/"
  tenant_config "$tenants" > "$ws/config/tenants.yaml"
  echo "$ws"
}

if [ "$vs_seed" = 1 ]; then
  SEED_PY="$(cd .. && pwd)/shared/baselines/seed_engine.py"
  [ -f "$SEED_PY" ] || { echo "no $SEED_PY (the shared folder beside the clone)" >&2; exit 2; }
  VENV=bench/.venv-seed
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q pandas numpy scikit-learn joblib cryptography
  fi
  echo "seed:    $("$VENV/bin/python" -c 'import pandas, sklearn, numpy; print(f"pandas {pandas.__version__}, scikit-learn {sklearn.__version__}, numpy {numpy.__version__}")')"
  for rows in "${sizes[@]}"; do
    seed_w=(); seed_m=(); dag_w=(); dag_m=()
    for rep in 1 2 3; do
      d=$(mktemp -d /tmp/seed-bench.XXXXXX)
      read -r w m < <(timed "$VENV/bin/python" "$SEED_PY" "$d" --rows "$rows" --aes --all-tenants)
      seed_w+=("$w"); seed_m+=("$m"); rm -rf "$d"
      ws=$(fresh_workspace)
      read -r w m < <(timed "$BIN" -q run "$ws/pipelines/propensity.yaml" -p rows="$rows")
      dag_w+=("$w"); dag_m+=("$m"); rm -rf "$ws"
    done
    python3 - "$rows" "${seed_w[*]}" "${seed_m[*]}" "${dag_w[*]}" "${dag_m[*]}" <<'PY'
import statistics, sys
rows = int(sys.argv[1])
sw, sm, dw, dm = ([float(x) for x in a.split()] for a in sys.argv[2:6])
med = statistics.median
print(f"\n== {rows:,} rows, cold end to end, 3 alternating runs each")
print(f"seed   wall {med(sw):7.2f} s  (runs {', '.join(f'{x:.2f}' for x in sw)})  peak memory {med(sm)/1024:7.0f} MiB")
print(f"dagrun wall {med(dw):7.2f} s  (runs {', '.join(f'{x:.2f}' for x in dw)})  peak memory {med(dm)/1024:7.0f} MiB")
print(f"speed-up {med(sw)/med(dw):.1f}x   memory dagrun/seed {med(dm)/med(sm):.2f}")
PY
  done
  exit 0
fi

declare -A cold_first cold_again
for rows in "${sizes[@]}"; do
  ws=$(fresh_workspace)
  P="$ws/pipelines/propensity.yaml"
  read -r cold_wall cold_rss cold_user cold_sys < <(timed_cpu "$BIN" -q run "$P" -p rows="$rows")
  cold_record=$(last_record "$ws")
  cold_enc=$(encrypt_us_per_row "$cold_record" "$rows")
  noops=()
  read -r first_wall first_rss < <(timed "$BIN" -q run "$P" -p rows="$rows")
  for _ in 1 2 3; do read -r w _ < <(timed "$BIN" -q run "$P" -p rows="$rows"); noops+=("$w"); done
  read -r c_wall c_rss < <(timed "$BIN" -q run "$P" -p rows="$rows" -p C=0.5)
  c_record=$(last_record "$ws")
  python3 - "$rows" "$cold_wall" "$cold_rss" "$c_wall" "$cold_record" "$c_record" "$ws" "$first_wall" "$first_rss" "${noops[@]}" <<'PY'
import json, os, statistics, sys
rows, cold, rss, cwall, rec, crec, ws = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
first, first_rss = float(sys.argv[8]), int(sys.argv[9])
noop = statistics.median(float(x) for x in sys.argv[10:])
r = json.load(open(rec)); c = json.load(open(crec))
print(f"\n== {rows:,} rows")
print(f"cold run {cold:.2f} s (dagrun's own timing {r['seconds']:.2f} s), peak memory {rss/1024:.0f} MiB")
print(f"first no-op run after the cold run {first*1000:.1f} ms, peak memory {first_rss/1024:.0f} MiB")
print(f"no-op run {noop*1000:.1f} ms (median of 3 more, process start to exit)")
ran = sorted(s['stage'] for s in c['stages'] if s['status'] == 'ran')
print(f"C change  {cwall:.2f} s, reran: {', '.join(ran)}")
agg = {}
for s in r['stages']:
    base = s['stage'].split('[')[0]
    a = agg.setdefault(base, [0.0, 0.0, 0])
    a[0] += s['seconds']; a[1] += s.get('cpu_seconds') or 0.0; a[2] += 1
print(f"{'stage':<12} {'wall s':>8} {'cpu s':>8} {'cpu/wall':>9} {'rows/s':>12}   (summed over {a[2]} tenants)")
for base, (w, cpu, n) in agg.items():
    print(f"{base:<12} {w:>8.3f} {cpu:>8.3f} {cpu / w if w else 0:>9.2f} {rows / w if w else 0:>12,.0f}")
seen = set()
def size(p):
    # Hard-linked files (outputs shared with the cache) count once.
    total = 0
    for root, _, files in os.walk(os.path.join(ws, p)):
        for f in files:
            st = os.stat(os.path.join(root, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
import glob
reports = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(ws, "reports/serve-check/*.json")))]
aucs = [r["auc"] for r in reports]
if len(aucs) <= 3:
    print("test AUC  " + ", ".join(f"{r['tenant']} {r['auc']:.4f} ({r['rows_checked']:,} test rows)" for r in reports))
else:
    print(f"test AUC  mean {statistics.mean(aucs):.4f}, min {min(aucs):.4f}, max {max(aucs):.4f} over {len(aucs)} tenants")
for p in ["data/encrypted", "data/afe", "featurestore", "models", ".dagrun/cache"]:
    print(f"size {p:<16} {size(p)/2**20:>9.1f} MiB" + ("  (beyond the hard links to the outputs above)" if p == ".dagrun/cache" else ""))
PY
  if [ "$ingest" = 1 ]; then
    cp pipelines/propensity-ingest.yaml "$ws/pipelines/"
    PI="$ws/pipelines/propensity-ingest.yaml"
    ids=$(grep -o 'id: [A-Za-z0-9_-]*' "$ws/config/tenants.yaml" | cut -d' ' -f2)
    per=$(( rows / tenants ))
    for t in $ids; do "$BIN" sample --tenant "$t" --rows "$per" --seed 7 --out "$ws/incoming/$t.csv"; done
    read -r i_cold _ < <(timed "$BIN" -q run "$PI")
    first=$(echo "$ids" | head -1)
    "$BIN" sample --tenant "$first" --rows "$per" --seed 8 --out "$ws/incoming/$first.csv"
    read -r i_one _ < <(timed "$BIN" -q run "$PI")
    rec=$(last_record "$ws")
    python3 - "$i_cold" "$i_one" "$rec" "$first" <<'PY'
import json, sys
cold, one, rec, first = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
r = json.load(open(rec))
ran = sorted(s["stage"] for s in r["stages"] if s["status"] == "ran")
others = [s for s in ran if not s.endswith(f"[{first}]")]
print(f"ingest pipeline: cold {cold:.2f} s; after changing {first}'s file: {one:.2f} s, reran {len(ran)} stages, {len(others)} of other tenants: {', '.join(ran)}")
PY
  fi
  rm -rf "$ws"
  # The cold run once more, right after the workspace above was deleted: the
  # kernel hands the pages it freed (its page cache) to this run. On a VM
  # whose host backs guest memory lazily (balloon, free page reporting), a
  # page the guest has not touched lately costs a host fault on first touch,
  # and the two runs differ by that cost alone (same build, same work).
  ws=$(fresh_workspace)
  read -r again_wall _ again_user again_sys < <(timed_cpu "$BIN" -q run "$ws/pipelines/propensity.yaml" -p rows="$rows")
  again_enc=$(encrypt_us_per_row "$(last_record "$ws")" "$rows")
  rm -rf "$ws"
  printf 'cold run, CPU user / system: %.2f / %.2f s; encrypt %s us CPU per row\n' "$cold_user" "$cold_sys" "$cold_enc"
  printf 'cold run again right after deleting that workspace: %.2f s, CPU user / system %.2f / %.2f s; encrypt %s us CPU per row\n' \
    "$again_wall" "$again_user" "$again_sys" "$again_enc"
  cold_first[$rows]=$cold_wall
  cold_again[$rows]=$again_wall
done
if [[ -n "${cold_first[10000000]:-}" && -n "${cold_first[1000000]:-}" ]]; then
  awk -v a="${cold_first[10000000]}" -v b="${cold_first[1000000]}" -v c="${cold_again[10000000]}" -v d="${cold_again[1000000]}" \
    'BEGIN { printf "\n10M / 1M cold: %.1fx (first cold runs), %.1fx (cold runs right after a deletion)\n", a / b, c / d }'
fi
