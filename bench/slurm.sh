#!/usr/bin/env bash
# The default pipeline (pipelines/propensity.yaml, 2 tenants) run locally and under
# Slurm, cold, in temporary workspaces sharing one keyring (release build).
#
#   bench/slurm.sh                  100k rows
#   bench/slurm.sh --rows 1000000
#
# Prints, per mode: wall time of the cold run, Slurm jobs submitted, stages run.
# Modes: local; slurm with the pipeline's job groups (each tenant's encrypt → train
# chain in one job); slurm with every stage its own job (groups removed).
# Needs a Slurm cluster (../shared/tools/slurm-single-node.sh up starts the test one).
set -euo pipefail
cd "$(dirname "$0")/.."
rows=100000
jobs=4
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows="$2"; shift ;;
    -j) jobs="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
  echo "no Slurm controller answers 'scontrol ping'; start one (e.g. sudo ../shared/tools/slurm-single-node.sh up)" >&2
  exit 1
fi
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --quiet   # SKIP_BUILD=1: reuse the build; DAGRUN_BIN=PATH: measure another
BIN="${DAGRUN_BIN:-$PWD/target/release/dagrun}"
unset DAGRUN_MASTER_KEY DAGRUN_MASTER_KEY_FILE   # jobs read the key from its file
echo "machine: $(nproc) cores; Slurm: $(sinfo -h -o '%D node(s), %c CPUs/node, partition %P' | head -n 1)"
echo "dagrun:  $("$BIN" --version), propensity pipeline, 2 tenants, $rows rows, -j $jobs"

tmp=$(mktemp -d /tmp/dagrun-bench-slurm.XXXXXX)   # on the filesystem the jobs see (single node)
trap 'rm -rf "$tmp"' EXIT
setup() {  # DIR [KEYS_FROM]
  mkdir -p "$1/pipelines" "$1/config" "$1/.dagrun"
  cp pipelines/propensity.yaml "$1/pipelines/"
  printf 'tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n' > "$1/config/tenants.yaml"
  if [ -n "${2:-}" ]; then cp -a "$2/.dagrun/keys" "$1/.dagrun/"; fi
}
measure() {  # DIR ARGS… -> "wall jobs ran"
  local dir=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN" -q run "$dir/pipelines/propensity.yaml" -p rows="$rows" -j "$jobs" "$@" >/dev/null
  t1=$(date +%s.%N)
  printf '%s ' "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
  "$BIN" -C "$dir" runs show last --json | python3 -c '
import json, sys
r = json.load(sys.stdin)
jobs = {s["slurm_job"] for s in r["stages"] if s.get("slurm_job")}
print(len(jobs), sum(1 for s in r["stages"] if s["status"] == "ran"))'
}

setup "$tmp/local"
read -r lw lj lr < <(measure "$tmp/local")
setup "$tmp/grouped" "$tmp/local"
read -r gw gj gr < <(measure "$tmp/grouped" --executor slurm)
setup "$tmp/ungrouped" "$tmp/local"
sed -i '/^    group:/d' "$tmp/ungrouped/pipelines/propensity.yaml"
read -r uw uj ur < <(measure "$tmp/ungrouped" --executor slurm)

printf '\n%-34s %9s %6s %11s\n' "mode" "wall (s)" "jobs" "stages ran"
printf '%-34s %9s %6s %11s\n' "local" "$lw" "$lj" "$lr"
printf '%-34s %9s %6s %11s\n' "slurm, job groups (default)" "$gw" "$gj" "$gr"
printf '%-34s %9s %6s %11s\n' "slurm, one job per stage" "$uw" "$uj" "$ur"
