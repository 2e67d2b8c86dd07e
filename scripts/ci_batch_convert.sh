#!/usr/bin/env bash
# Convert, evaluate and gate every job of a manifest; the exit code is the CI verdict.
#
#   scripts/ci_batch_convert.sh MANIFEST.yaml [SUMMARY.json] [JOBS]
#
# Re-runs skip finished jobs (--resume: same source hash, resolved recipe and seed), so a retried CI
# job only redoes what failed or changed.  Exit 0: every job done or skipped with its gate passed;
# 1: a job failed or missed its gate (its log is OUT.log); 2: the manifest itself is wrong (nothing ran).
# JOBS defaults to the number of conversions that fit: see README "Sizing --jobs".
set -euo pipefail
manifest=${1:?usage: $0 MANIFEST.yaml [SUMMARY.json] [JOBS]}
summary=${2:-moefy-batch-summary.json}
jobs=${3:-1}
moefy=${MOEFY:-moefy}

status=0
"$moefy" batch "$manifest" --jobs "$jobs" --resume --json "$summary" || status=$?
if [[ -f "$summary" ]]; then
  # one line per job for the CI log (python is there: moefy needs it)
  python3 - "$summary" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for j in s["jobs"]:
    delta = j["eval"]["delta_pct"] if j["eval"] else None
    print(f"{j['status']:8} {j['name']:30} Δppl {'—' if delta is None else f'{delta:+.3f}%':>10}  {j['reason'] or j['out']}")
print(f"counts: {s['counts']}")
PY
fi
exit "$status"
