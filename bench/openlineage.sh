#!/usr/bin/env bash
# What OpenLineage costs a no-op run.
#
#   bench/openlineage.sh                 build with `cargo build --release`, then measure
#   SKIP_BUILD=1 bench/openlineage.sh    reuse target/release/dagrun
#   DAGRUN_BIN=/path/to/dagrun SKIP_BUILD=1 bench/openlineage.sh   measure another build
#
# On the 200-stage cmd pipeline of bench/noop.sh (a), in a temp dir removed
# at exit, after one cold run:
#  - the no-op wall time, median of RUNS (default 15) runs, with OpenLineage
#    and without (the same workspace copied, its OpenLineage id made
#    unreadable: the run says "OpenLineage events are off"), interleaved;
#    wall time and CPU time (user+sys of dagrun and the stage shells it did
#    not need to start: none, it is a no-op);
#  - from `strace -f` of one no-op run: the write calls to the run's
#    .openlineage.jsonl, files created under .dagrun/openlineage/, fsyncs;
# Prints the load average before and after: the machine may be shared.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release --quiet)
fi
BIN="${DAGRUN_BIN:-${BIN:-$ROOT/target/release/dagrun}}"   # DAGRUN_BIN, as the other scripts (BIN still works)
RUNS="${RUNS:-15}"
[[ -x "$BIN" ]] || { echo "no $BIN; build it first" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/dagrun-olbench.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

A="$TMP/a"; mkdir -p "$A/.dagrun"
tree_pipeline 200 > "$A/pipeline.yaml"
cd "$A"
env -u DAGRUN_OPENLINEAGE_URL "$BIN" -q run pipeline.yaml >/dev/null

# The same workspace without OpenLineage: a run whose workspace id cannot be
# read (a folder in its place) says "OpenLineage events are off for this run".
B="$TMP/b"; cp -a "$A" "$B"; rm -rf "$B/.dagrun/openlineage" "$B/runs"; mkdir -p "$B/.dagrun/openlineage/workspace-id"
(cd "$B" && env -u DAGRUN_OPENLINEAGE_URL "$BIN" -q run pipeline.yaml >/dev/null 2>&1)

# run_in DIR: wall seconds, then CPU seconds (user+sys, less sensitive to a loaded machine).
run_in() {
  local t0 t1 cpu
  t0=$(now)
  cpu=$( { TIMEFORMAT='%3U %3S'; time (cd "$1" && env -u DAGRUN_OPENLINEAGE_URL "$BIN" -q run pipeline.yaml >/dev/null 2>&1); } 2>&1 )
  t1=$(now)
  awk -v a="$t1" -v b="$t0" -v c="$cpu" 'BEGIN { split(c, x, " "); printf "%.5f %.3f\n", a - b, x[1] + x[2] }'
}
: > "$TMP/on"; : > "$TMP/off"
for _ in $(seq "$RUNS"); do   # interleaved, so load changes hit both alike
  run_in "$A" >> "$TMP/on"
  run_in "$B" >> "$TMP/off"
done
[[ -z "$(ls "$B/runs/"*.openlineage.jsonl 2>/dev/null)" ]] || { echo "the OpenLineage-off workspace wrote events" >&2; exit 1; }
on=$(cut -d' ' -f1 "$TMP/on" | median); off=$(cut -d' ' -f1 "$TMP/off" | median)
con=$(cut -d' ' -f2 "$TMP/on" | median); coff=$(cut -d' ' -f2 "$TMP/off" | median)
echo "no-op run, 200 stages (median of $RUNS, interleaved): OpenLineage on ${on} s, off ${off} s wall; CPU ${con} s vs ${coff} s"
awk -v a="$on" -v b="$off" -v c="$con" -v d="$coff" 'BEGIN { printf "  OpenLineage cost: wall %.2f ms per run (%.1f us per stage), CPU %.2f ms per run (%.1f us per stage)\n", (a-b)*1000, (a-b)*1e6/200, (c-d)*1000, (c-d)*1e6/200 }'

if command -v strace >/dev/null; then
  strace -f -y -e trace=write,openat,fsync,fdatasync -o "$TMP/strace" env -u DAGRUN_OPENLINEAGE_URL "$BIN" -q run pipeline.yaml >/dev/null
  w=$(grep -c 'write([0-9]*<[^>]*\.openlineage\.jsonl>' "$TMP/strace" || true)
  c=$(grep 'openat(' "$TMP/strace" | grep -c '\.dagrun/openlineage/open/' || true)
  s=$(grep -c 'fsync\|fdatasync' "$TMP/strace" || true)
  echo "one no-op run under strace: ${w} write(s) to its .openlineage.jsonl, ${c} open-run mark(s) created, ${s} fsync(s) in the whole run"
fi

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
