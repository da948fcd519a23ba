#!/usr/bin/env bash
# No-op / cold-run benchmark for dagrun.
#
#   bench/noop.sh            build with `cargo build --release`, then measure
#   SKIP_BUILD=1 bench/noop.sh   reuse target/release/dagrun
#   SKIP_BUILD=1 DAGRUN_BIN=/path/to/other/dagrun bench/noop.sh   measure another build
#   ONLY_A=1 bench/noop.sh   only the 200-stage case (a), not the 1 GiB one (b)
#
# Generates (in a temp dir, removed at exit; nothing is written to the repo):
#  (a) a 200-stage cmd pipeline: stage i writes out/i.txt and depends on the
#      output of stage i/2 (a binary tree: depth 8, width up to 100);
#  (b) a one-stage pipeline whose input is a 1 GiB file (stage: `wc -c`).
# Prints wall times: cold (a) median of 3 (each in a fresh workspace) and
# how long those runs went on after their last stage ended (the end-of-run
# flush),
# no-op (a) median of 5 — and GNU make on the same 200-rule DAG in the same
# script run, alternating with dagrun (cold median of 3 from an empty out/,
# no-op median of 5, both with -j as many jobs as dagrun's default: the
# cores), with the ratios, the median CPU time (user + system, commands
# included) of the cold runs, the no-op runs of both once more timed by
# `perf stat` (mean of 30, process start to exit, no shell timing; only where
# perf runs) beside `true`'s (what any process start costs here), and the
# load average before and after; cold (b), the
# first no-op (b) right after it (nothing may be re-read: the memo trusts what
# dagrun wrote), and no-op (b) median of 5.
# GNU make is a Debian package: the script installs it when missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release --quiet)
fi
BIN="${DAGRUN_BIN:-$ROOT/target/release/dagrun}"   # DAGRUN_BIN=/path/to/dagrun: compare two builds
[[ -x "$BIN" ]] || { echo "no $BIN; build it first" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/dagrun-bench.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# CPU seconds (user + system) of this shell's finished children so far, into
# the variable named $1 (`times` must run in this shell, not a subshell).
child_cpu() {
  local f="$TMP/times.$BASHPID"
  times > "$f"
  printf -v "$1" '%s' "$(tail -1 "$f" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); s += p[1] * 60 + p[2] } printf "%.3f", s }')"
}

# time_run DIR ARGS...: run dagrun quietly in DIR, print the wall time in
# seconds (and, with CPU_OUT set, append its CPU seconds, commands included,
# to that file).
time_run() {
  local dir=$1; shift
  local t0 t1 c0 c1
  child_cpu c0
  t0=$(now)
  (cd "$dir" && "$BIN" -q run pipeline.yaml "$@" >/dev/null)
  t1=$(now)
  child_cpu c1
  [[ -n "${CPU_OUT:-}" ]] && awk -v a="$c1" -v b="$c0" 'BEGIN { printf "%.3f\n", a - b }' >> "$CPU_OUT"
  awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.4f\n", a - b }'
}
noop5() { local dir=$1; for _ in 1 2 3 4 5; do time_run "$dir"; done | median; }

# (a) 200 stages.
# A new workspace per cold run, none deleted before the end: on ext4, files
# created right after thousands were deleted nearby cost many times more
# (inode allocation skips recently deleted inodes one by one), which would
# measure the file system's recovery from `rm -rf`, not dagrun. On ext4
# without a journal (this VM's root) "recently" is 60 s, or 360 s while the
# inode's table block is not written back (fs/ext4/ialloc.c,
# `recently_deleted`): so a run of this script within minutes of another
# (which deletes its temp dir at exit) or of any large `rm -rf` measures
# slower cold runs, dagrun's (three new files a stage) more than make's (one).
n_a=0
fresh_a() { n_a=$((n_a + 1)); A="$TMP/a$n_a"; mkdir -p "$A/.dagrun"; tree_pipeline 200 > "$A/pipeline.yaml"; }

# The same DAG for GNU make (same commands, same dependency tree).
command -v make >/dev/null || { apt-get update -qq && apt-get install -y -qq make >/dev/null; }
M="$TMP/m"; mkdir -p "$M/out"
{
  echo "all: $(for i in $(seq 1 200); do printf 'out/%s.txt ' "$i"; done)"
  printf 'out/1.txt:\n\techo 1 > out/1.txt\n'
  for i in $(seq 2 200); do
    p=$((i / 2))
    printf 'out/%s.txt: out/%s.txt\n\t(cat out/%s.txt; echo %s) > out/%s.txt\n' "$i" "$p" "$p" "$i" "$i"
  done
} > "$M/Makefile"
JOBS=$(nproc)
# make's cold runs start from an empty out/ (the old one moved aside, not deleted).
n_m=0
fresh_m() { n_m=$((n_m + 1)); mv "$M/out" "$TMP/m-out-$n_m"; mkdir -p "$M/out"; }
time_make() {
  local t0 t1 c0 c1
  child_cpu c0
  t0=$(now)
  make -s -C "$M" -j"$JOBS" >/dev/null
  t1=$(now)
  child_cpu c1
  [[ -n "${CPU_OUT:-}" ]] && awk -v a="$c1" -v b="$c0" 'BEGIN { printf "%.3f\n", a - b }' >> "$CPU_OUT"
  awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.4f\n", a - b }'
}

# (b) one stage reading a 1 GiB file.
B="$TMP/b"; mkdir -p "$B/.dagrun"
[[ -n "${ONLY_A:-}" ]] || head -c 1G /dev/urandom > "$B/big.bin"
cat > "$B/pipeline.yaml" <<'YAML'
stages:
  count:
    cmd: wc -c < big.bin > count.txt
    deps: [big.bin]
    outs: [count.txt]
YAML

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
colds_a=(); colds_m=()
for _ in 1 2 3; do
  fresh_a; colds_a+=("$(CPU_OUT="$TMP/cpu_a" time_run "$A")")
  fresh_m; colds_m+=("$(CPU_OUT="$TMP/cpu_m" time_make)")
done
cpu_a=$(median < "$TMP/cpu_a"); cpu_m=$(median < "$TMP/cpu_m")
# What a cold run spends after its last stage ended: making the 400 files it
# wrote durable (`util::atomic::sync_files`), then the hash memo (from each
# cold workspace's run record: its seconds minus the last stage's end).
tail_a=$(for i in $(seq 1 "$n_a"); do
  (cd "$TMP/a$i" && "$BIN" runs show last --json) |
    python3 -c 'import json, sys; r = json.load(sys.stdin); print("%.1f" % ((r["seconds"] - max(s["end_s"] for s in r["stages"])) * 1000))'
done | median)
cold_a=$(printf '%s\n' "${colds_a[@]}" | median)
cold_m=$(printf '%s\n' "${colds_m[@]}" | median)
noops_a=(); noops_m=()
for _ in 1 2 3 4 5; do
  noops_a+=("$(time_run "$A")")
  noops_m+=("$(time_make)")
done
noop_a=$(printf '%s\n' "${noops_a[@]}" | median)
noop_m=$(printf '%s\n' "${noops_m[@]}" | median)
# The no-op runs once more, timed by `perf stat` from each process's start to
# its exit: the shell's own `date` calls and forks above add the same few
# milliseconds to both sides, which flatters a ratio of ~10 ms to ~2 ms.
# Optional: only where perf (Debian's linux-perf) runs.
perf_elapsed() { # perf_elapsed DIR CMD...: mean wall seconds of 30 runs
  local dir=$1; shift
  (cd "$dir" && perf stat -r 30 -o "$TMP/perf.txt" "$@" >/dev/null 2>&1) || return 1
  awk '/seconds time elapsed/ { print $1 }' "$TMP/perf.txt"
}
perf_a=""; perf_m=""; perf_t=""
if command -v perf >/dev/null && perf stat -o /dev/null true >/dev/null 2>&1; then
  perf_a=$(perf_elapsed "$A" "$BIN" -q run pipeline.yaml || true)
  perf_m=$(perf_elapsed "$M" make -s -j"$JOBS" || true)
  # What starting any process costs on this machine (on a VM that traps
  # CPUID, glibc's start-up alone can take half a millisecond).
  perf_t=$(perf_elapsed "$TMP" true || true)
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
if [[ -z "${ONLY_A:-}" ]]; then
  cold_b=$(time_run "$B")
  first_b=$(time_run "$B") # the first no-op after the cold run
  noop_b=$(noop5 "$B")
fi

# Sanity: the no-op runs really did nothing.
last=$(cd "$A" && "$BIN" runs show last --json | grep -c '"status": "cached"' || true)
[[ "$last" == 200 ]] || { echo "warning: last no-op run of (a) did not report 200 cached stages ($last)" >&2; }

printf '\n%-44s %10s\n' "case" "seconds"
printf '%-44s %10.3f   (%s)\n' "(a) 200 stages, cold run (median of 3)" "$cold_a" "${colds_a[*]}"
printf '%-44s %10.3f\n' "(a) 200 stages, no-op run (median of 5)" "$noop_a"
printf '%-44s %10.3f   (%s)\n' "(a) GNU make, same DAG, cold (median of 3)" "$cold_m" "${colds_m[*]}"
printf '%-44s %10.3f\n' "(a) GNU make, same DAG, no-op (median of 5)" "$noop_m"
printf '%-44s %10.3f   (make: %.3f; CPU time does not wait for a busy machine)\n' "(a) cold CPU s, user+sys, commands included" "$cpu_a" "$cpu_m"
printf '%-44s %10.1f   (ms, median of the 3: making what the run wrote durable, then the hash memo)\n' "(a) cold: after the last stage ended" "$tail_a"
awk -v a="$cold_a" -v b="$cold_m" -v c="$noop_a" -v d="$noop_m" 'BEGIN { printf "%-44s %9.2fx\n%-44s %9.2fx\n", "(a) cold: dagrun / make", a / b, "(a) no-op: dagrun / make", c / d }'
if [[ -n "$perf_a" && -n "$perf_m" ]]; then
  awk -v a="$perf_a" -v b="$perf_m" 'BEGIN { printf "%-44s %10.4f   (make %.4f: %.2fx; perf stat, mean of 30, process start to exit)\n", "(a) no-op run, no shell timing", a, b, a / b }'
  if [[ -n "$perf_t" ]]; then
    awk -v t="$perf_t" 'BEGIN { printf "%-44s %10.4f   (perf stat, mean of 30: a process start and exit on this machine)\n", "`true`, for scale", t }'
  fi
fi
if [[ -z "${ONLY_A:-}" ]]; then
  printf '%-44s %10.3f\n' "(b) 1 GiB input, cold run" "$cold_b"
  printf '%-44s %10.3f\n' "(b) 1 GiB input, first no-op after cold" "$first_b"
  printf '%-44s %10.3f\n' "(b) 1 GiB input, no-op run (median of 5)" "$noop_b"
fi
printf '(%s, %s cores, %s; load average %s before (a), %s after)\n' "$("$BIN" --version)" "$(nproc)" "$(uname -sr)" "$load_before" "$load_after"
