#!/usr/bin/env bash
# A fleet of devices at once, with standard shell tools (xargs -P):
#   bash .ci/env bash examples/fleet.sh [WORKDIR] [DEVICES...]     (default: runs/fleet 0-3 4-6 7-9)
# Each DEVICE is a class list of digits' test split (`0-3`, `1,7`): the device's private
# images are its half fold=0/2, its held-out images the other half. The cloud trains the base
# model (or is given one) and embeds the public pool once; then every device runs
# fit-gmm -> select -> score -> allocate -> prune -> finetune -> eval as its own job, JOBS at
# a time, its stderr in WORKDIR/logs/DEVICE.log and its artifacts in WORKDIR/devices/DEVICE/.
# stdout gets a table of the devices' top-1 on their held-out halves, assembled from the
# eval reports with python3. A device that fails is named with its error and log, and the
# script exits with 1 after the table.
#
# Knobs (environment variables):
#   JOBS           devices processed in parallel [number of cores]; each job gets cores/JOBS
#                  torch threads unless OMP_NUM_THREADS is set
#   BASE_MODEL     a base model artifact the cloud is given (default: the cloud trains one)
#   MODEL, MODEL_ARGS, BASE_EPOCHS   the base model the cloud trains (timm name, KEY=VALUE list, epochs)
#   BUDGET         fraction of parameters kept [0.7]
#   METRIC_SIZE, FINETUNE_SIZE       public images selected for scoring / fine-tuning [64, 384]
#   EPOCHS         fine-tuning epochs per device [8];  LATENCY_REPEATS  [5]
set -euo pipefail
export BASE_MODEL="${BASE_MODEL:-}"
export MODEL="${MODEL:-vit_tiny_patch16_224}"
export MODEL_ARGS="${MODEL_ARGS:-img_size=8 patch_size=2 in_chans=1 embed_dim=64 depth=4 num_heads=4}"
export BASE_EPOCHS="${BASE_EPOCHS:-25}"
export BUDGET="${BUDGET:-0.7}"
export METRIC_SIZE="${METRIC_SIZE:-64}"
export FINETUNE_SIZE="${FINETUNE_SIZE:-384}"
export EPOCHS="${EPOCHS:-8}"
export LATENCY_REPEATS="${LATENCY_REPEATS:-5}"
JOBS="${JOBS:-$(nproc)}"

work="${1:-runs/fleet}"
shift $(( $# > 0 ? 1 : 0 ))
devices=("$@")
[ ${#devices[@]} -gt 0 ] || devices=(0-3 4-6 7-9)
mkdir -p "$work/logs" "$work/devices"
export work public="digits:split=train"

device_name() { echo "digits-${1//[^A-Za-z0-9,-]/_}"; }

if [ -n "$BASE_MODEL" ]; then
  export base="$BASE_MODEL"
else
  echo "== cloud: train the base model on the public pool" >&2
  model_args=()
  for setting in $MODEL_ARGS; do model_args+=(-a "$setting"); done
  base=$(tapvits finetune --model "$MODEL" "${model_args[@]}" --data "$public" --epochs "$BASE_EPOCHS" \
    --batch-size 64 --lr 2e-3 -o "$work/base.safetensors")
  export base
fi
echo "== cloud: embed the public pool once" >&2
pool=$(tapvits features "$public" --extractor "$base" -o "$work/pool.h5")
export pool

# One device, start to end, in its own bash process (errexit stops it at the first failure).
device_chain() {
  dir="$work/devices/$(device_name "$1")"
  mkdir -p "$dir"
  rm -f "$dir/report.json"       # a report from an earlier run must not pass for this one
  exec 2>"$work/logs/$(device_name "$1").log"
  # ~55-70 private images: diagonal covariances, and a lower floor than the default 50.
  gmm=$(tapvits fit-gmm "digits:split=test:classes=$1:fold=0/2" --extractor "$base" --covariance diag \
    --min-samples 40 -o "$dir/gmm.safetensors")
  metric=$(tapvits select "$gmm" --pool "$pool" --strategy stratified --metric-size "$METRIC_SIZE" \
    --finetune-size "$FINETUNE_SIZE" -o "$dir/metric.h5")
  scores=$(tapvits score "$base" --metric-set "$metric" --budget "$BUDGET" -o "$dir/scores.safetensors")
  plan=$(tapvits allocate "$scores" --budget "$BUDGET" -o "$dir/plan.safetensors")
  pruned=$(tapvits prune "$base" "$plan" -o "$dir/pruned.safetensors")
  model=$(tapvits finetune "$pruned" --data "$public" --metric-set "$metric" --teacher "$base" \
    --epochs "$EPOCHS" --lr 1e-3 -o "$dir/model.safetensors")
  tapvits eval "$model" --data "digits:split=test:classes=$1:fold=1/2" --latency-repeats "$LATENCY_REPEATS" \
    -o "$dir/report.json" >/dev/null
}
export -f device_chain device_name

cores=$(nproc)
echo "== devices: ${devices[*]}, $JOBS at a time (logs in $work/logs/)" >&2
printf '%s\n' "${devices[@]}" |
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores > JOBS ? cores / JOBS : 1 ))}" \
  xargs -P "$JOBS" -I{} bash -euo pipefail -c 'device_chain "$1"' _ {} || true   # failures: below

failed=()
rows=()
for classes in "${devices[@]}"; do
  name=$(device_name "$classes")
  if [ -f "$work/devices/$name/report.json" ]; then
    rows+=("$name" "$work/devices/$name/report.json")
  else
    failed+=("$name")
    rows+=("$name" "")
  fi
done
base_parameters=$(tapvits --json inspect "$base" | python3 -c 'import json, sys; print(json.load(sys.stdin)["figures"]["parameters"])')
python3 -c '
import json, sys
base_parameters, rows = int(sys.argv[1]), sys.argv[2:]
line = "{:<16} {:>7} {:>7} {:>11} {:>10}"
print(line.format("device", "samples", "top-1", "params kept", "MACs"))
for name, path in zip(rows[::2], rows[1::2]):
    if not path:
        print(line.format(name, "", "failed", "", ""))
        continue
    with open(path) as file:
        report = json.load(file)
    print(line.format(name, report["samples"], format(report["top1"], ".2%"),
                      format(report["parameters"] / base_parameters, ".1%"), format(report["macs"], ",")))
' "$base_parameters" "${rows[@]}"

for name in "${failed[@]}"; do
  echo "fleet: device $name failed: $(tail -n 1 "$work/logs/$name.log") (log: $work/logs/$name.log)" >&2
done
[ ${#failed[@]} -eq 0 ]
