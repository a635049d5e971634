#!/usr/bin/env bash
# The device -> cloud hand-off, with two directories standing for the two machines:
#   bash .ci/env bash examples/device_to_cloud.sh [WORKDIR]        (default: runs/device-to-cloud)
# WORKDIR/cloud/ is all the cloud has, WORKDIR/device/ all the device has; each side's
# commands run inside its own directory and name only files there. Files cross only through
# `send`, which logs every crossing in WORKDIR/transfers.log:
#   cloud -> device: the feature extractor (the base model), later the device's pruned model;
#   device -> cloud: the GMM, and nothing else.
# The device fits its GMM on its private half of digits' test split and audits it (support of
# every component, distance of every mean to the private samples, membership inference
# against its held-out half) before sending it; the cloud does the rest
# (select, score, allocate, prune, finetune) on the public train split, and the device
# evaluates the model it gets back on its held-out half. The script ends by checking that the
# GMM was the only file to go device -> cloud and that every cloud artifact was made from
# cloud files and the public pool only (their lineage, read with `tapvits --json inspect`).
#
# Knobs (environment variables):
#   BASE_MODEL     a base model artifact the cloud is given (default: the cloud trains one)
#   MODEL, MODEL_ARGS, BASE_EPOCHS   the base model the cloud trains (timm name, KEY=VALUE list, epochs)
#   CLASSES        the device's digit classes [0-4];  BUDGET  fraction of parameters kept [0.7]
#   METRIC_SIZE, FINETUNE_SIZE       public images selected for scoring / fine-tuning [64, 384]
#   EPOCHS         fine-tuning epochs of the pruned model [8];  LATENCY_REPEATS  [5]
set -euo pipefail
BASE_MODEL="${BASE_MODEL:-}"
MODEL="${MODEL:-vit_tiny_patch16_224}"
MODEL_ARGS="${MODEL_ARGS:-img_size=8 patch_size=2 in_chans=1 embed_dim=64 depth=4 num_heads=4}"
BASE_EPOCHS="${BASE_EPOCHS:-25}"
CLASSES="${CLASSES:-0-4}"
BUDGET="${BUDGET:-0.7}"
METRIC_SIZE="${METRIC_SIZE:-64}"
FINETUNE_SIZE="${FINETUNE_SIZE:-384}"
EPOCHS="${EPOCHS:-8}"
LATENCY_REPEATS="${LATENCY_REPEATS:-5}"

work="${1:-runs/device-to-cloud}"
mkdir -p "$work/cloud" "$work/device"
[ -z "$BASE_MODEL" ] || BASE_MODEL="$(realpath "$BASE_MODEL")"
work="$(cd "$work" && pwd)"
: > "$work/transfers.log"
public="digits:split=train"                                # the cloud's public labelled pool
private="digits:split=test:classes=$CLASSES:fold=0/2"      # the device's private images: GMM half
held_out="digits:split=test:classes=$CLASSES:fold=1/2"     # ... and its held-out half, for eval only

cloud() { (cd "$work/cloud" && "$@"); }
device() { (cd "$work/device" && "$@"); }
send() {   # send FROM TO FILE [AS]: the only way a file crosses between the two sides
  local from=$1 to=$2 file=$3 as=${4:-$(basename "$3")}
  cp "$work/$from/$file" "$work/$to/$as"
  printf '%s -> %s\t%s\t%s\n' "$from" "$to" "$as" "$(sha256sum "$work/$to/$as" | cut -d' ' -f1)" >> "$work/transfers.log"
  echo "== sent $from -> $to: $as" >&2
}

if [ -n "$BASE_MODEL" ]; then
  echo "== cloud: given the base model $BASE_MODEL" >&2
  cp "$BASE_MODEL" "$work/cloud/base.safetensors"
  base=base.safetensors
else
  echo "== cloud: train a small DeiT-shaped ViT on the public pool" >&2
  model_args=()
  for setting in $MODEL_ARGS; do model_args+=(-a "$setting"); done
  base=$(cloud tapvits finetune --model "$MODEL" "${model_args[@]}" --data "$public" --epochs "$BASE_EPOCHS" \
    --batch-size 64 --lr 2e-3 -o base.safetensors)
fi
echo "== cloud: embed the public pool once" >&2
pool=$(cloud tapvits features "$public" --extractor "$base" -o pool.h5)
send cloud device "$base" extractor.safetensors

echo "== device: fit a GMM to features of its private images (offline)" >&2
# ~90 samples: diagonal covariances in 7 dims (one per 12 samples); fit-gmm refuses a mixture
# whose components would describe individual private images.
gmm=$(device tapvits fit-gmm "$private" --extractor extractor.safetensors --covariance diag -o gmm.safetensors)
echo "== device: audit the GMM against its private data before it leaves (exit 6 on a breach)" >&2
device tapvits audit-gmm "$gmm" --private "$private" --held-out "$held_out" --extractor extractor.safetensors >&2
send device cloud "$gmm"

echo "== cloud: select, score, allocate, prune and fine-tune for that GMM" >&2
metric=$(cloud tapvits select gmm.safetensors --pool "$pool" --strategy stratified \
  --metric-size "$METRIC_SIZE" --finetune-size "$FINETUNE_SIZE" -o metric.h5)
scores=$(cloud tapvits score "$base" --metric-set "$metric" --budget "$BUDGET" -o scores.safetensors)
plan=$(cloud tapvits allocate "$scores" --budget "$BUDGET" -o plan.safetensors)
pruned=$(cloud tapvits prune "$base" "$plan" -o pruned.safetensors)
model=$(cloud tapvits finetune "$pruned" --data "$public" --metric-set "$metric" --teacher "$base" \
  --epochs "$EPOCHS" --lr 1e-3 -o model.safetensors)
send cloud device "$model"

echo "== device: evaluate the model on its held-out private half" >&2
report=$(device tapvits eval "$model" --data "$held_out" --latency-repeats "$LATENCY_REPEATS" -o report.json)

# Reads `tapvits --json inspect` lines: each cloud artifact's inputs must be cloud files or the public pool.
check_lineage='
import json, os, sys
public, cloud_files = sys.argv[1], set(os.listdir(sys.argv[2]))
wrong = []
for line in sys.stdin:
    artifact = json.loads(line)
    name, kind, inputs = os.path.basename(artifact["path"]), artifact["kind"], list(artifact["inputs"].values())
    sources = ", ".join(entry["kind"] + " " + entry["name"] for entry in inputs) or "nothing"
    print(f"  cloud/{name}: {kind} made from {sources}", file=sys.stderr)
    wrong += [name + " <- " + entry["name"] for entry in inputs
              if (entry["name"] != public if entry["kind"] == "dataset" else entry["name"] not in cloud_files)]
if wrong:
    sys.exit("device_to_cloud: cloud artifacts made from what the cloud must not have: " + "; ".join(wrong))
'
echo "== check: what the cloud holds, and what it was made from" >&2
crossed=$(awk -F'\t' '$1 == "device -> cloud" { print $2 }' "$work/transfers.log")
if [ "$crossed" != "gmm.safetensors" ]; then
  echo "device_to_cloud: expected only gmm.safetensors to cross device -> cloud, got: ${crossed:-nothing}" >&2
  exit 1
fi
received=("$gmm" ${BASE_MODEL:+"$base"})   # their lineage is the sender's business
for file in "$work"/cloud/*; do
  [[ " ${received[*]} " == *" $(basename "$file") "* ]] || tapvits --json inspect "$file"
done | python3 -c "$check_lineage" "$public" "$work/cloud"
echo "  the device sent only $gmm; the cloud used only its own files and $public" >&2
echo "$work/device/$report"
