#!/usr/bin/env bash
# Promote each tenant's model trained by the last `dagrun run`, only when
# that run passed the AUC and drift gates. Run it in the workspace, after
#   dagrun run pipelines/propensity-ingest.yaml -p promote=manual
# (`promote: manual`: `train` registers the model and leaves the champion alone).
#
#   promote-if-gates-pass.sh [--dry-run]
#
# Gates, per tenant, read back from the run record (`dagrun runs show last
# --json`) and the registry (`dagrun models list --json`):
#   - the run ended `ok` (every stage gate passed: `train` fails below
#     `min_auc`, `drift` fails above `max_psi`);
#   - AUC: the registered test AUC of the model in models/TENANT/model.json is
#     at least the run's `min_auc` param;
#   - drift: reports/drift/TENANT.json says ok, warn or no_reference (the first
#     model of a tenant) and every PSI is at most the run's `max_psi`, or it
#     says accepted (a shift above max_psi that a model was already trained
#     on, after a run with `-p max_psi=...` raised: `reference.accepted_by`).
# Then `dagrun models promote TENANT VERSION --reason ...` (skipped when the
# version is already the champion, or was rolled back: a rollback stays
# rolled back on the nights that follow). With DAGRUN_METRICS_FILE set (the
# run's --metrics-file), the promotion marks the new champion there too. Exit 1, promoting nothing, when a gate
# fails. Needs `dagrun` on PATH and python3.
set -euo pipefail

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

record=$(dagrun runs show last --json)
registry=$(dagrun models list --json)

# One line per tenant: TENANT VERSION REASON, or a gate failure (exit 1).
plan=$(RECORD="$record" REGISTRY="$registry" python3 - <<'PY'
import json, os, re, subprocess, sys
rec = json.loads(os.environ["RECORD"])
reg = json.loads(os.environ["REGISTRY"])["models"]
fail = []
if rec.get("status") != "ok":
    fail.append(f"run {rec.get('run_id')} ended {rec.get('status')} (exit {rec.get('exit_code')}): a stage gate failed")
params = rec.get("params", {})
min_auc = float(params.get("min_auc", 0.6))
max_psi = float(params.get("max_psi", 0.25))
tenants = sorted({m.group(1) for s in rec.get("stages", []) for m in [re.fullmatch(r"train\[(.+)\]", s["stage"])] if m})
if not tenants:
    fail.append("the last run trained no model (no train[TENANT] stage)")
out = []
for t in tenants:
    train = next(s for s in rec["stages"] if s["stage"] == f"train[{t}]")
    if train["status"] not in ("ran", "cached", "restored"):
        fail.append(f"{t}: train {train['status']}")
        continue
    with open(f"models/{t}/model.json") as f:
        version = json.load(f)["model_version"]
    entry = next((m for m in reg if m["tenant"] == t and m["version"] == version), None)
    if entry is None:
        fail.append(f"{t}: model {version} is not registered")
        continue
    auc = float(entry["auc"])
    if not auc >= min_auc:
        fail.append(f"{t}: test AUC {auc:.4f} < min_auc {min_auc}")
    try:
        with open(f"reports/drift/{t}.json") as f:
            drift = json.load(f)
    except OSError as e:
        fail.append(f"{t}: no drift report ({e})")
        continue
    worst = max([float(x["psi"]) for x in drift.get("features", [])], default=0.0)
    status = drift.get("status")
    accepted_by = (drift.get("reference") or {}).get("accepted_by")
    if status == "accepted" and accepted_by:
        pass
    elif status not in ("ok", "warn", "no_reference") or worst > max_psi:
        fail.append(f"{t}: drift {status}, max PSI {worst:.3f} > max_psi {max_psi}")
    if entry.get("alias") == "champion":
        print(f"{t}: {version} is already the champion", file=sys.stderr)
        continue
    # A model an operator rolled back is not promoted again by a later
    # night's run of the same model (a no-op night would undo the rollback);
    # one replaced by an ordinary promotion is (a reverted change restores it).
    hist = json.loads(subprocess.run(["dagrun", "models", "history", t, "--json"], check=True, capture_output=True, text=True).stdout)["history"]
    rolled_back = [h for h in hist if h.get("applied") and h.get("action") == "rollback" and h.get("from") == version]
    if rolled_back:
        h = rolled_back[-1]
        print(f"{t}: {version} was rolled back by {h['who']} at {h['time']}: not promoted again; `dagrun models promote {t} {version}` does it by hand", file=sys.stderr)
        continue
    if status == "accepted":
        why = f"drift accepted (max PSI {worst:.3f}: model {accepted_by} was trained on this data)"
    else:
        why = f"drift {status}, max PSI {worst:.3f} <= max_psi {max_psi}"
    out.append(f"{t} {version} test AUC {auc:.4f} >= min_auc {min_auc}; {why}; run {rec['run_id']}")
if fail:
    print("gates not passed, nothing promoted:\n  " + "\n  ".join(fail), file=sys.stderr)
    sys.exit(1)
print("\n".join(out))
PY
)

if [ -z "$plan" ]; then
  echo "nothing to promote"
  exit 0
fi
while read -r tenant version reason; do
  if [ "$dry_run" = 1 ]; then
    echo "would promote $tenant $version ($reason)"
  else
    why="gates passed: $reason${GITHUB_RUN_ID:+; CI run $GITHUB_RUN_ID}"
    if [ -n "${DAGRUN_METRICS_FILE:-}" ]; then
      dagrun models promote "$tenant" "$version" --reason "$why" --metrics-file "$DAGRUN_METRICS_FILE"
    else
      dagrun models promote "$tenant" "$version" --reason "$why"
    fi
  fi
done <<< "$plan"
