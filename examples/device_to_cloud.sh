#!/usr/bin/env bash
# The device -> cloud hand-off, with two directories standing for the two machines:
#   bash .ci/env bash examples/device_to_cloud.sh [WORKDIR]        (default: runs/device-to-cloud)
# WORKDIR/cloud/ is all the cloud has, WORKDIR/device/ all the device has; each side's
# commands run inside its own directory and name only files there. Files cross only through
# `send`, which logs every crossing in WORKDIR/transfers.log:
#   cloud -> device: the feature extractor as an ONNX graph and the base model (whose
#                    architecture the device profiles), later the pruned model as ONNX;
#   device -> cloud: the GMM and the latency profile, and nothing else.
# The cloud runs in the environment that calls this script (torch; `bash .ci/env`). The device
# runs in its own virtual environment holding the device install only, `pip install tapvits`
# without extras (examples/device_env.sh: created on first use from the package registry,
# then reused; the script checks that torch cannot be imported there). Exit 75 when that
# environment cannot be created.
# The device fits its GMM on its private half of digits' test split through the ONNX
# extractor and audits it (support of every component, distance of every mean to the private
# samples, membership inference against its held-out half) before sending it, and measures
# its latency profile (the base model's blocks at every prunable width, on onnxruntime). The
# cloud validates the profile, does the rest (select, score, allocate, prune, finetune) on
# the public train split, predicts from the profile how long the base and the pruned model
# take on the device, and sends the pruned model back as ONNX; the device evaluates it on its
# held-out half with onnxruntime (accuracy and measured latency: `tapvits eval` needs torch).
# The script ends by checking that only the GMM and the profile went device -> cloud and that
# every cloud artifact was made from cloud files and the public pool only (their lineage, read
# with `tapvits --json inspect`).
#
# Knobs (environment variables):
#   BASE_MODEL     a base model artifact the cloud is given (default: the cloud trains one)
#   MODEL, MODEL_ARGS, BASE_EPOCHS   the base model the cloud trains (timm name, KEY=VALUE list, epochs)
#   CLASSES        the device's digit classes [0-4];  BUDGET  fraction of parameters kept [0.7]
#   METRIC_SIZE, FINETUNE_SIZE       public images selected for scoring / fine-tuning [64, 384]
#   EPOCHS         fine-tuning epochs of the pruned model [8]
#   PROFILE_BATCHES, PROFILE_REPEATS the device's profile: batch sizes [1,32] and timed rounds [5]
#   LATENCY_REPEATS                  timed runs of the returned model on the device, per batch size [5]
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
PROFILE_BATCHES="${PROFILE_BATCHES:-1,32}"
PROFILE_REPEATS="${PROFILE_REPEATS:-5}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

work="${1:-runs/device-to-cloud}"
mkdir -p "$work/cloud" "$work/device"
[ -z "$BASE_MODEL" ] || BASE_MODEL="$(realpath "$BASE_MODEL")"
work="$(cd "$work" && pwd)"
: > "$work/transfers.log"
public="digits:split=train"                                # the cloud's public labelled pool
private="digits:split=test:classes=$CLASSES:fold=0/2"      # the device's private images: GMM half
held_out="digits:split=test:classes=$CLASSES:fold=1/2"     # ... and its held-out half, for eval only

echo "== device: its own environment, the device install only" >&2
device_venv="$(bash "$here/device_env.sh")" || exit $?
if "$device_venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "device_to_cloud: torch imports in the device environment $device_venv: it must hold the device install only" >&2
  exit 1
fi

cloud() { (cd "$work/cloud" && "$@"); }
device() { (cd "$work/device" && PATH="$device_venv/bin:$PATH" VIRTUAL_ENV="$device_venv" "$@"); }
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
echo "== cloud: embed the public pool once, and export the extractor for the device" >&2
pool=$(cloud tapvits features --data "$public" --extractor "$base" -o pool.h5)
extractor=$(cloud tapvits export "$base" --features -o extractor.onnx)
send cloud device "$extractor"
send cloud device "$base"

echo "== device: fit a GMM to features of its private images (offline, onnxruntime)" >&2
# ~90 samples: diagonal covariances in 7 dims (one per 12 samples); fit-gmm refuses a mixture
# whose components would describe individual private images.
gmm=$(device tapvits fit-gmm --data "$private" --extractor "$extractor" --covariance diag -o gmm.safetensors)
echo "== device: audit the GMM against its private data before it leaves (exit 6 on a breach)" >&2
device tapvits audit-gmm "$gmm" --private "$private" --held-out "$held_out" --extractor "$extractor" >&2
echo "== device: measure its latency for the base model's blocks at every prunable width" >&2
profile=$(device tapvits profile "$base" -o device.profile.json --batch-sizes "$PROFILE_BATCHES" \
  --repeats "$PROFILE_REPEATS" --warmup-runs 1)
send device cloud "$gmm"
send device cloud "$profile"

echo "== cloud: check the device's profile" >&2
cloud tapvits validate "$profile" >&2
echo "== cloud: select, score, allocate, prune and fine-tune for that GMM" >&2
metric=$(cloud tapvits select "$gmm" --pool "$pool" --strategy class-prior \
  --metric-size "$METRIC_SIZE" --finetune-size "$FINETUNE_SIZE" -o metric.h5)
scores=$(cloud tapvits score "$base" --metric-set "$metric" --budget "$BUDGET" -o scores.safetensors)
plan=$(cloud tapvits allocate "$scores" --budget "$BUDGET" -o plan.safetensors)
pruned=$(cloud tapvits prune "$base" "$plan" -o pruned.safetensors)
model=$(cloud tapvits finetune "$pruned" --finetune-set "$metric" --teacher "$base" \
  --epochs "$EPOCHS" --lr 1e-3 -o model.safetensors)

# The latency of each model on the device, from the device's profile alone (payloads.latency_table.predict_model).
predict='
import sys
from tapvits_cli.artifacts.model import read_model_spec
from tapvits_cli.artifacts.profile import read_profile
from tapvits_cli.payloads.latency_table import predict_model
profile = read_profile(sys.argv[1])
print(f"  the device: {profile.cpu or profile.device}, {profile.runtime} {profile.runtime_version}, "
      f"{profile.threads} threads", file=sys.stderr)
for path in sys.argv[2:]:
    spec = read_model_spec(path).spec
    times = ", ".join(f"batch {b}: {predict_model(profile, spec, b, path).total_ms:.3f} ms" for b in profile.batch_sizes)
    print(f"  {path} on the device, predicted: {times}", file=sys.stderr)
'
echo "== cloud: how long the models take on the device, predicted from its profile" >&2
cloud python3 -c "$predict" "$profile" "$base" "$model"
onnx_model=$(cloud tapvits export "$model" -o model.onnx)
send cloud device "$onnx_model"

# The device's evaluation on onnxruntime: the graph takes images at the model's input size,
# normalised (protocol/README.md, "Exports"); this script's images are stored at that size.
evaluate='
import json, sys, time
import numpy as np, onnxruntime
from tapvits_cli.data import open_dataset
model, reference, output, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
batches = [int(b) for b in sys.argv[5].split(",")]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
preprocessing = json.loads(session.get_modelmeta().custom_metadata_map["model.preprocessing"])
dataset, size = open_dataset(reference), preprocessing["input_size"]
if list(dataset.image_shape) != size:
    sys.exit(f"device_to_cloud: {reference} holds {dataset.image_shape} images, the model takes {size}: "
             "this script normalises only, it does not resize")
mean, std = (np.asarray(preprocessing[key], dtype=np.float32)[:, None, None] for key in ("mean", "std"))
images = (dataset.images(np.arange(len(dataset))) - mean) / std
logits = session.run(["logits"], {"images": images})[0]
latency = {}
for batch in batches:
    run = lambda: session.run(["logits"], {"images": np.resize(images, (batch, *images.shape[1:]))})
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    latency[str(batch)] = float(np.median(times))
top1 = float(np.mean(logits.argmax(axis=1) == dataset.labels))
with open(output, "w") as handle:
    json.dump({"model": model, "dataset": reference, "samples": len(dataset), "top1": top1,
               "runtime": "onnxruntime " + onnxruntime.__version__, "latency_ms": latency}, handle, indent=1)
print(f"  top-1 {top1:.4f} on {len(dataset)} images; measured on the device: "
      + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in latency.items()), file=sys.stderr)
print(output)
'
echo "== device: evaluate the model on its held-out private half (onnxruntime)" >&2
report=$(device python3 -c "$evaluate" "$onnx_model" "$held_out" report.json "$LATENCY_REPEATS" "$PROFILE_BATCHES")

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
crossed=$(awk -F'\t' '$1 == "device -> cloud" { print $2 }' "$work/transfers.log" | paste -sd' ')
if [ "$crossed" != "$gmm $profile" ]; then
  echo "device_to_cloud: expected only $gmm and $profile to cross device -> cloud, got: ${crossed:-nothing}" >&2
  exit 1
fi
received=("$gmm" "$profile" ${BASE_MODEL:+"$base"})   # their lineage is the sender's business
for file in "$work"/cloud/*; do   # exports (.onnx) are no artifacts: their source model is one checked here
  [[ " ${received[*]} " == *" $(basename "$file") "* || "$file" == *.onnx ]] || tapvits --json inspect "$file"
done | python3 -c "$check_lineage" "$public" "$work/cloud"
echo "  the device sent only $gmm and $profile; the cloud used only its own files and $public" >&2
echo "$work/device/$report"
