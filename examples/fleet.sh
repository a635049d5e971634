#!/usr/bin/env bash
# A fleet of devices as one recipe, devices side by side (`tapvits run --jobs`):
#   bash .ci/env bash examples/fleet.sh [WORKDIR] [DEVICES...]     (default: runs/fleet 0-3 4-6 7-9)
# Each DEVICE is a class list of digits' test split (`0-3`, `1,7`): the device's private
# images are its half fold=0/2, its held-out images the other half. The script writes the
# recipe WORKDIR/fleet.yaml (one simulated device per class list, named digits-0-3,
# digits-1_7, ...) and runs it with WORKDIR as the run directory: the base model (or the one
# given) and the public pool's features once, then every device's fit-gmm -> select -> score
# -> allocate -> prune -> finetune -> eval, JOBS steps at a time in worker processes. The
# run's log goes to stderr; stdout gets a table of the devices' top-1 on their held-out
# halves, from WORKDIR/summary.json. A device that fails does not stop the others: tapvits
# names it, the table marks it, and the script exits with tapvits' exit code; running the
# script again redoes only what did not finish.
#
# Knobs (environment variables):
#   JOBS           steps run side by side [number of cores]; each gets cores/JOBS torch
#                  threads, or OMP_NUM_THREADS when set
#   RUN_OPTIONS    more `tapvits run` options, e.g. "--executor ray --address auto" or
#                  "--executor slurm --slurm partition=cpu --slurm time=30" (README "Fleets")
#   BASE_MODEL     a base model artifact the cloud is given (default: the cloud trains one)
#   MODEL, MODEL_ARGS, BASE_EPOCHS   the base model the cloud trains (timm name, KEY=VALUE list, epochs)
#   BUDGET         fraction of parameters kept [0.7]
#   METRIC_SIZE, FINETUNE_SIZE       public images selected for scoring / fine-tuning [64, 384]
#   EPOCHS         fine-tuning epochs per device [8];  LATENCY_REPEATS  [5]
#   TAPVITS_DEVICE cpu, cuda or auto [auto]
set -euo pipefail
JOBS="${JOBS:-$(nproc)}"
work="${1:-runs/fleet}"
shift $(( $# > 0 ? 1 : 0 ))
devices=("$@")
[ ${#devices[@]} -gt 0 ] || devices=(0-3 4-6 7-9)
mkdir -p "$work"

# The recipe, as JSON (which YAML reads as it is).
BASE_MODEL="${BASE_MODEL:-}" MODEL="${MODEL:-vit_tiny_patch16_224}" \
MODEL_ARGS="${MODEL_ARGS:-img_size=8 patch_size=2 in_chans=1 embed_dim=64 depth=4 num_heads=4}" \
BASE_EPOCHS="${BASE_EPOCHS:-25}" BUDGET="${BUDGET:-0.7}" METRIC_SIZE="${METRIC_SIZE:-64}" \
FINETUNE_SIZE="${FINETUNE_SIZE:-384}" EPOCHS="${EPOCHS:-8}" LATENCY_REPEATS="${LATENCY_REPEATS:-5}" \
DEVICE="${TAPVITS_DEVICE:-auto}" python3 - "${devices[@]}" > "$work/fleet.yaml" <<'EOF'
import json, os, re, sys

def scalar(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

env = os.environ
base = ({"artifact": env["BASE_MODEL"]} if env["BASE_MODEL"] else
        {"train": {"model": env["MODEL"], "epochs": int(env["BASE_EPOCHS"]), "batch-size": 64, "lr": 2e-3,
                   "args": {k: scalar(v) for k, v in (s.split("=", 1) for s in env["MODEL_ARGS"].split())}}})
devices = [{"name": "digits-" + re.sub(r"[^A-Za-z0-9-]", "_", classes),
            "private": f"digits:split=test:classes={classes}:fold=0/2",
            "test": f"digits:split=test:classes={classes}:fold=1/2"} for classes in sys.argv[1:]]
print(json.dumps({
    "version": 1, "name": "fleet", "device": env["DEVICE"], "public": "digits:split=train", "base_model": base,
    "devices": devices, "budget": float(env["BUDGET"]),
    "stages": {
        # ~55-70 private images: diagonal covariances, and a lower floor than the default 50.
        "fit-gmm": {"covariance": "diag", "min-samples": 40},
        "select": {"strategy": "class-prior", "metric-size": int(env["METRIC_SIZE"]),
                   "finetune-size": int(env["FINETUNE_SIZE"])},
        "finetune": {"epochs": int(env["EPOCHS"]), "lr": 1e-3, "distill": True},
        "eval": {"latency-repeats": int(env["LATENCY_REPEATS"])},
    }}, indent=2))
EOF

threads=()
[ -z "${OMP_NUM_THREADS:-}" ] || threads=(--cpus-per-step "$OMP_NUM_THREADS")
rm -f "$work/summary.json"     # a summary from an earlier run must not pass for this one
status=0
# shellcheck disable=SC2086  # RUN_OPTIONS is a list of options
tapvits run "$work/fleet.yaml" --run-dir "$work" --jobs "$JOBS" "${threads[@]}" ${RUN_OPTIONS:-} >/dev/null || status=$?
[ -f "$work/summary.json" ] || exit "$status"   # a shared step failed: no device to show

python3 - "$work/summary.json" <<'EOF'
import json, sys
with open(sys.argv[1]) as file:
    summary = json.load(file)
line = "{:<16} {:>7} {:>7} {:>11} {:>10}"
print(line.format("device", "samples", "top-1", "params kept", "MACs"))
for row in summary["devices"]:
    print(line.format(row["device"], row["samples"], format(row["top1"], ".2%"), format(row["params_kept"], ".1%"),
                      format(row["macs"], ",")))
for name in summary["failed_devices"]:
    print(line.format(name, "", "failed", "", ""))
EOF
exit "$status"
