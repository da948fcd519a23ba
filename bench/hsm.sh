#!/usr/bin/env bash
# Overhead of a PKCS#11 (SoftHSM2) master key against a file master key: cold runs
# of the propensity pipeline (release build, 2 tenants, fresh workspace each run,
# so every tenant key is created and wrapped), alternating file / HSM.
#
#   bench/hsm.sh                 100k rows, 7 runs each
#   bench/hsm.sh --rows N --runs K
#   bench/hsm.sh --mechanism CKM_AES_KEY_WRAP_PAD    force the token's wrapping mechanism
#
# Prints the load average before and after, each run, the median cold run of both,
# the overhead in percent, the median wall time of the encrypt stages (where keys
# are unwrapped), the fixed cost of opening the keyring (`dagrun keys list`, file
# vs HSM, alternating), and the PKCS#11 calls of one cold run and of one run that
# re-encrypts (counted with OpenSC's pkcs11-spy, when installed). Needs
# ../shared/tools/softhsm-token.sh (or DAGRUN_SOFTHSM_TOKEN_SH); installs nothing
# itself beyond what that script installs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."
rows=100000
runs=7
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows="$2"; shift ;;
    --runs) runs="$2"; shift ;;
    --mechanism) export DAGRUN_MASTER_KEY_MECHANISM="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
tool=${DAGRUN_SOFTHSM_TOKEN_SH:-}
for c in ../shared/tools/softhsm-token.sh ../../shared/tools/softhsm-token.sh; do
  [ -z "$tool" ] && [ -r "$c" ] && tool=$c
done
[ -n "$tool" ] || { echo "softhsm-token.sh not found (set DAGRUN_SOFTHSM_TOKEN_SH)" >&2; exit 2; }
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --quiet   # SKIP_BUILD=1: reuse the build; DAGRUN_BIN=PATH: measure another
BIN="${DAGRUN_BIN:-$PWD/target/release/dagrun}"
tmp=$(mktemp -d /tmp/dagrun-bench-hsm.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
eval "$(bash "$tool" init "$tmp/token" 2>/dev/null)"
URI=$DAGRUN_MASTER_KEY_URI
unset DAGRUN_MASTER_KEY_URI DAGRUN_MASTER_KEY DAGRUN_MASTER_KEY_FILE
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "dagrun:  $("$BIN" --version), $rows rows, 2 tenants, $runs cold runs per master key, mechanism ${DAGRUN_MASTER_KEY_MECHANISM:-auto}"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

one_run() { # KIND -> "wall_seconds encrypt_seconds cpu_seconds"
  local kind=$1 ws t0 t1
  ws=$(mktemp -d "$tmp/ws.XXXXXX")
  mkdir -p "$ws/config" "$ws/pipelines"
  cp pipelines/propensity.yaml "$ws/pipelines/"
  sed -i "s/^  rows: .*/  rows: $rows/" "$ws/pipelines/propensity.yaml"
  printf 'tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n' > "$ws/config/tenants.yaml"
  t0=$(date +%s%N)
  if [ "$kind" = hsm ]; then
    DAGRUN_MASTER_KEY_URI=$URI DAGRUN_PLAIN=1 /usr/bin/time -f "%U %S" -o "$tmp/cpu" "$BIN" -q -C "$ws" run "$ws/pipelines/propensity.yaml" > /dev/null
  else
    DAGRUN_MASTER_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f DAGRUN_PLAIN=1 \
      /usr/bin/time -f "%U %S" -o "$tmp/cpu" "$BIN" -q -C "$ws" run "$ws/pipelines/propensity.yaml" > /dev/null  # benchmark-only key
  fi
  t1=$(date +%s%N)
  local enc
  enc=$(python3 -c 'import json,sys,glob; r=json.load(open(sorted(glob.glob(sys.argv[1]+"/runs/*.json"))[-1])); print(round(sum(s["seconds"] for s in r["stages"] if s["stage"].startswith("encrypt[")),4))' "$ws")
  rm -rf "$ws"
  echo "$(( (t1 - t0) / 1000 ))e-6 $enc $(awk '{print $1+$2}' "$tmp/cpu")"
}


: > "$tmp/file.txt"; : > "$tmp/hsm.txt"
one_run file > /dev/null; one_run hsm > /dev/null   # warm the page cache and the token
for i in $(seq 1 "$runs"); do
  f=$(one_run file); h=$(one_run hsm)
  echo "$f" >> "$tmp/file.txt"; echo "$h" >> "$tmp/hsm.txt"
  printf 'run %d: file %.3f s (encrypt %.3f s, cpu %.2f s)   hsm %.3f s (encrypt %.3f s, cpu %.2f s)\n' "$i" $f $h
done
fm=$(cut -d' ' -f1 "$tmp/file.txt" | median); hm=$(cut -d' ' -f1 "$tmp/hsm.txt" | median)
fe=$(cut -d' ' -f2 "$tmp/file.txt" | median); he=$(cut -d' ' -f2 "$tmp/hsm.txt" | median)
fc=$(cut -d' ' -f3 "$tmp/file.txt" | median); hc=$(cut -d' ' -f3 "$tmp/hsm.txt" | median)
python3 - "$fm" "$hm" "$fe" "$he" "$fc" "$hc" <<'PY'
import sys
fm, hm, fe, he, fc, hc = map(float, sys.argv[1:])
print(f"median cold run: file key {fm:.3f} s, HSM key {hm:.3f} s: overhead {100*(hm-fm)/fm:+.1f} % (goal: within 10 %)")
print(f"median encrypt stages (summed over tenants): file key {fe:.3f} s, HSM key {he:.3f} s")
print(f"median CPU (user+sys): file key {fc:.2f} s, HSM key {hc:.2f} s: {100*(hc-fc)/fc:+.1f} %")
PY
echo "load average after cold runs: $(cut -d' ' -f1-3 /proc/loadavg)"

# The fixed cost per process: open the keyring (load the module, C_Initialize,
# log in, find the key, check it, derive the integrity key) and list the keys.
new_ws() { # KIND -> a workspace that ran once at 2000 rows
  local ws
  ws=$(mktemp -d "$tmp/open.XXXXXX")
  mkdir -p "$ws/config" "$ws/pipelines"
  cp pipelines/propensity.yaml "$ws/pipelines/"
  sed -i "s/^  rows: .*/  rows: 2000/" "$ws/pipelines/propensity.yaml"
  printf 'tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n' > "$ws/config/tenants.yaml"
  with_key "$1" "$BIN" -q -C "$ws" run "$ws/pipelines/propensity.yaml" > /dev/null
  echo "$ws"
}
with_key() { # KIND CMD... : run CMD with that master key
  local kind=$1; shift
  if [ "$kind" = hsm ]; then
    DAGRUN_MASTER_KEY_URI=$URI DAGRUN_PLAIN=1 "$@"
  else
    DAGRUN_MASTER_KEY=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f DAGRUN_PLAIN=1 "$@"  # benchmark-only key
  fi
}
fws=$(new_ws file); hws=$(new_ws hsm)
: > "$tmp/fo.txt"; : > "$tmp/ho.txt"
for i in $(seq 1 $((runs * 3))); do
  for k in file hsm; do
    ws=$fws; [ "$k" = hsm ] && ws=$hws
    t0=$(date +%s%N); with_key "$k" "$BIN" -q -C "$ws" keys list > /dev/null; t1=$(date +%s%N)
    echo "$(( (t1 - t0) / 1000 ))e-6" >> "$tmp/${k:0:1}o.txt"
  done
done
fo=$(median < "$tmp/fo.txt"); ho=$(median < "$tmp/ho.txt")
python3 - "$fo" "$ho" "$((runs * 3))" <<'PY'
import sys
fo, ho, n = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print(f"median `dagrun keys list` ({n} each, alternating): file key {1000*fo:.1f} ms, HSM key {1000*ho:.1f} ms: the token costs {1000*(ho-fo):+.1f} ms per process")
PY
echo "load average after keys list: $(cut -d' ' -f1-3 /proc/loadavg)"

# What the token is asked, counted by OpenSC's pkcs11-spy (a PKCS#11 module that
# logs every call and forwards it to the real one).
spy=/usr/lib/x86_64-linux-gnu/pkcs11-spy.so
if [ -r "$spy" ]; then
  SPY_URI=${URI/module-path=\/usr\/lib\/softhsm\/libsofthsm2.so/module-path=$spy}
  count() { grep -oE '^[0-9]+: C_[A-Za-z]+' "$1" | awk '{print $2}' | sort | uniq -c | sort -rn | awk '{printf "%s %s, ", $2, $1}' | sed 's/, $//'; }
  ws=$(mktemp -d "$tmp/spy.XXXXXX")
  mkdir -p "$ws/config" "$ws/pipelines"
  cp pipelines/propensity.yaml "$ws/pipelines/"
  sed -i "s/^  rows: .*/  rows: 2000/" "$ws/pipelines/propensity.yaml"
  printf 'tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n' > "$ws/config/tenants.yaml"
  PKCS11SPY=/usr/lib/softhsm/libsofthsm2.so PKCS11SPY_OUTPUT="$tmp/spy1.log" DAGRUN_MASTER_KEY_URI=$SPY_URI DAGRUN_PLAIN=1 \
    "$BIN" -q -C "$ws" run "$ws/pipelines/propensity.yaml" > /dev/null
  echo "PKCS#11 calls, cold run (keys created and wrapped): $(count "$tmp/spy1.log")"
  PKCS11SPY=/usr/lib/softhsm/libsofthsm2.so PKCS11SPY_OUTPUT="$tmp/spy2.log" DAGRUN_MASTER_KEY_URI=$SPY_URI DAGRUN_PLAIN=1 \
    "$BIN" -q -C "$ws" run "$ws/pipelines/propensity.yaml" --force encrypt > /dev/null
  echo "PKCS#11 calls, run re-encrypting both tenants (keys unwrapped): $(count "$tmp/spy2.log")"
else
  echo "(OpenSC's pkcs11-spy.so not installed: PKCS#11 call counts skipped)"
fi
