#!/usr/bin/env bash
# A recipe as a CI gate:
#   bash .ci/env bash examples/ci_eval.sh RECIPE [RUN_DIR] [tapvits run options...]
#   bash .ci/env bash examples/ci_eval.sh recipes/quickstart.yaml runs/ci --set thresholds.min-top1=0.9
# Runs `tapvits --json run RECIPE --run-dir RUN_DIR` (default RUN_DIR: runs/ci-<recipe name>;
# further arguments such as --set KEY=VALUE or --cache DIR go to `tapvits run`), writes the
# run's JSON summary to SUMMARY for the CI system to archive, prints one verdict line per
# device and exits with tapvits' code: 0 every threshold passed, 6 a threshold failed,
# anything else an error (README "Exit codes"; no summary is written then). A rerun in the
# same RUN_DIR (a cache restored by CI) redoes only the steps whose inputs changed.
#
# Knobs (environment variables):
#   SUMMARY   where the summary JSON goes [RUN_DIR-summary.json, beside the run directory,
#             so it can be archived without the models]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: ci_eval.sh RECIPE [RUN_DIR] [tapvits run options...]" >&2
  exit 2
fi
recipe=$1
shift
run_dir="runs/ci-$(basename "$recipe" .yaml)"
if [ $# -gt 0 ] && [[ $1 != -* ]]; then run_dir=$1; shift; fi
SUMMARY="${SUMMARY:-$run_dir-summary.json}"
mkdir -p "$(dirname "$SUMMARY")"

code=0
tapvits --json run "$recipe" --run-dir "$run_dir" "$@" > "$SUMMARY.partial" || code=$?
if [ ! -s "$SUMMARY.partial" ]; then        # the run stopped before it could judge anything
  rm -f "$SUMMARY.partial"
  echo "ci_eval: tapvits run failed with exit code $code before writing a summary" >&2
  exit "$code"
fi
mv "$SUMMARY.partial" "$SUMMARY"

python3 -c '
import json, sys
with open(sys.argv[1]) as file:
    summary = json.load(file)
minimum = summary["thresholds"].get("min-top1")
for row in summary["devices"]:
    device, top1 = row["device"], row.get("top1")
    if top1 is None:
        print(f"SKIP {device}: not evaluated (no held-out split)")
    elif minimum is None:
        print(f"PASS {device}: top-1 {top1:.4f} (no per-device threshold)")
    elif top1 >= minimum:
        print(f"PASS {device}: top-1 {top1:.4f} >= min-top1 {minimum}")
    else:
        print(f"FAIL {device}: top-1 {top1:.4f} < min-top1 {minimum}")
mean_minimum, mean = summary["thresholds"].get("min-mean-top1"), summary["mean"]
if mean_minimum is not None and mean is not None:
    verdict, mean_top1 = ("PASS" if mean["top1"] >= mean_minimum else "FAIL"), mean["top1"]
    print(f"{verdict} mean: top-1 {mean_top1:.4f}, min-mean-top1 {mean_minimum}")
print(("PASSED" if summary["passed"] else "FAILED") + f": summary in {sys.argv[1]}")
' "$SUMMARY"
exit "$code"
