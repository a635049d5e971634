"""A feature extractor the device runs on onnxruntime, with no torch installed.

``tapvits export MODEL --features`` writes the extractor as one ONNX graph that takes the
dataset's stored images — floats in [0, 1] at their own (C, H, W), the ``raw_input`` it
was exported for — and does everything else itself: resizing, channel mapping,
normalisation, the network, the pooled pre-logits features. The device therefore needs
NumPy to read images and onnxruntime to run the graph, nothing that could preprocess
differently from the cloud. The graph's ``metadata_props`` carry the extractor
fingerprint of the model it came from, so a GMM fitted through it is accepted by the
cloud against a pool embedded by the torch model.

Imports neither torch nor timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from tapvits_cli.errors import InvalidArtifactError, UsageError

FEATURES_INPUT, FEATURES_OUTPUT = "images", "features"


@dataclass(frozen=True)
class OnnxExtractor:
    """An ONNX features graph and the fingerprint of the extractor it reproduces."""

    session: Any                      # onnxruntime.InferenceSession
    fingerprint: Mapping[str, Any]
    raw_input: tuple[int, int, int]   # (C, H, W) of the stored images the graph takes
    path: Path

    @property
    def feature_dim(self) -> int:
        return int(self.fingerprint["feature_dim"])

    def iterate(self, dataset, batch_size: int, positions=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(ids, features float32 (n, D), labels)`` batch by batch, like the torch extractor's."""
        if tuple(dataset.image_shape) != self.raw_input:
            raise UsageError(f"{self.path} was exported for {'x'.join(map(str, self.raw_input))} images, "
                             f"the dataset holds {'x'.join(map(str, dataset.image_shape))}: export it again with "
                             f"--raw-input {','.join(map(str, dataset.image_shape))}")
        positions = np.arange(len(dataset)) if positions is None else np.asarray(positions, dtype=np.int64)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            images = np.ascontiguousarray(dataset.images(chunk), dtype=np.float32)
            try:
                features = self.session.run([FEATURES_OUTPUT], {FEATURES_INPUT: images})[0]
            except Exception as exc:   # onnxruntime's own types: a graph that fails on the very input it declares
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InvalidArtifactError(f"{self.path}: the graph failed on a batch of images ({first})") from None
            if features.shape != (len(chunk), self.feature_dim):
                raise InvalidArtifactError(f"{self.path}: the graph returned features of shape {features.shape}, "
                                           f"expected ({len(chunk)}, {self.feature_dim})")
            yield dataset.ids[chunk], features.astype(np.float32, copy=False), dataset.labels[chunk]
