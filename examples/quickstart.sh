#!/usr/bin/env bash
# Quickstart on scikit-learn's digits, offline, a few minutes on 2 cores:
#   bash .ci/env bash examples/quickstart.sh [OUTDIR]
# A base ViT is trained here; one simulated device holds digits 0-4 and hands the
# cloud only its GMM; the cloud selects matching public images, scores the model on them,
# plans a 70% budget, prunes, fine-tunes, and evaluates on the device's held-out half.
set -euo pipefail
out="${1:-quickstart-out}"
mkdir -p "$out"
public="digits:split=train"                        # the cloud's public labelled pool
private="digits:split=test:classes=0-4:fold=0/2"   # the device's private images (GMM half, ~90)

echo "== cloud: train a small DeiT-shaped ViT on the public pool" >&2
base=$(tapvits finetune --model vit_tiny_patch16_224 -a img_size=8 -a patch_size=2 -a in_chans=1 \
  -a embed_dim=64 -a depth=4 -a num_heads=4 --data "$public" --epochs 25 --batch-size 64 --lr 2e-3 \
  -o "$out/base.safetensors")
echo "== cloud: embed the public pool once" >&2
pool=$(tapvits features --data "$public" --extractor "$base" -o "$out/pool.h5")

echo "== device: fit a GMM to its private features (only this file leaves the device)" >&2
# ~90 samples: diagonal covariances in 7 dims (one per 12 samples).
gmm=$(tapvits fit-gmm --data "$private" --extractor "$base" --covariance diag -o "$out/device.gmm.safetensors")
echo "== device: audit the GMM against its private data (per-component support, distances, membership)" >&2
tapvits audit-gmm "$gmm" --private "$private" --held-out "digits:split=test:classes=0-4:fold=1/2" \
  --extractor "$base" >&2

echo "== cloud: select the device's metric and fine-tuning sets" >&2
metric=$(tapvits select "$gmm" --pool "$pool" --strategy class-prior --metric-size 64 --finetune-size 384 \
  -o "$out/device.metric.h5")
echo "== cloud: score neurons and heads, then plan a 70% parameter budget" >&2
scores=$(tapvits score "$base" --metric-set "$metric" --budget 0.7 -o "$out/device.scores.safetensors")
plan=$(tapvits allocate "$scores" --budget 0.7 -o "$out/device.plan.safetensors")
echo "== cloud: prune the model to the plan" >&2
pruned=$(tapvits prune "$base" "$plan" -o "$out/device.pruned.safetensors")
echo "== cloud: fine-tune the pruned model on the device's public fine-tuning set, distilling the base" >&2
device_model=$(tapvits finetune "$pruned" --finetune-set "$metric" --teacher "$base" \
  --epochs 8 --lr 1e-3 -o "$out/device.model.safetensors")
echo "== device: evaluate on its held-out private half (never seen by any stage)" >&2
report=$(tapvits eval "$device_model" --data "digits:split=test:classes=0-4:fold=1/2" \
  --latency-repeats 5 -o "$out/device.report.json")

tapvits inspect "$plan" >&2
tapvits validate "$base" "$pool" "$gmm" "$metric" "$scores" "$plan" "$pruned" "$device_model" "$report"
tapvits --json inspect "$metric" | python -c '
import json, sys
d = json.load(sys.stdin)
rows = next(t for t in d["tables"] if t["title"] == "rows per public label")["rows"]
hit = sum(r[1] for r in rows if r[0] in range(5)); total = sum(r[1] for r in rows)
print(f"metric set: {hit}/{total} public images show digits 0-4, the device'"'"'s classes")'
