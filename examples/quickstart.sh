#!/usr/bin/env bash
# Quickstart: what tapvits can do today, end to end on this machine, offline.
# Run it through the project's environment:  bash .ci/env bash examples/quickstart.sh
# (later stages extend this script into the full device -> cloud pipeline).
set -euo pipefail
out="${1:-quickstart-out}"
mkdir -p "$out"

# A DeiT-Tiny-shaped ViT for 28x28 grey images (Fashion-MNIST / digits upscaled), seeded.
model=$(tapvits create-model vit_tiny_patch16_224 \
  -a img_size=28 -a patch_size=4 -a in_chans=1 -a num_classes=10 \
  --seed 0 -o "$out/base.safetensors")

tapvits inspect "$model" >&2        # header, lineage, per-block widths
tapvits validate "$model"           # exits non-zero if the artifact breaks the protocol
tapvits --json inspect "$model" | python -c 'import json,sys; d=json.load(sys.stdin); print("parameters:", d["figures"]["parameters"])'
