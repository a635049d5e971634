"""Feature extraction shared by the device (``fit-gmm``) and the cloud (``features``, ``select``).

The GMM a device uploads lives in the feature space of one extractor; the cloud may only
score public images with *the same* extractor and preprocessing. :class:`Extractor`
therefore carries a fingerprint (architecture, kwargs, weights hash, preprocessing,
feature layer, and token merging when the model has it: the same weights merging tokens
give other features) that every artifact in feature space records and every consumer compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

FEATURE_LAYER = "pre_logits"  # timm forward_head(pre_logits=True): pooled, normed, before the classifier


@dataclass(frozen=True)
class Extractor:
    model: Any                 # a timm nn.Module in eval mode
    preprocessing: Any         # data.preprocess.Preprocessing
    fingerprint: Mapping[str, Any]

    @property
    def feature_dim(self) -> int:
        return int(self.fingerprint["feature_dim"])


def make_extractor(model, architecture: str, kwargs: Mapping[str, Any], weights_sha256: str,
                   preprocessing=None) -> Extractor:
    """Wrap a loaded model; the fingerprint is what makes two extractors interchangeable."""
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.token_merging import token_merging_of

    preprocessing = preprocessing or Preprocessing.from_model(model)
    model.eval()
    fingerprint = {
        "architecture": architecture,
        "kwargs": dict(kwargs),
        "weights_sha256": weights_sha256,
        "preprocessing": preprocessing.to_dict(),
        "feature_layer": FEATURE_LAYER,
        "feature_dim": int(model.num_features),
    }
    merging = token_merging_of(model)
    if merging is not None:
        fingerprint["token_merging"] = merging.to_dict()
    return Extractor(model=model, preprocessing=preprocessing, fingerprint=fingerprint)


def pooled_features(model, images):
    """Pooled pre-logits features of a preprocessed batch: (n, feature_dim)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def extract_features(extractor: Extractor, dataset, batch_size: int = 256, device: str = "cpu",
                     positions=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream ``(ids, features float32 (n, D), labels)`` batch by batch.

    Nothing accumulates here, so memory stays flat however large the dataset; callers
    write each batch out (``features``) or collect what they need (``fit-gmm``).
    """
    import torch

    from tapvits_cli.data.preprocess import iterate_batches

    model = extractor.model.to(device)
    with torch.inference_mode():
        for ids, images, labels in iterate_batches(dataset, extractor.preprocessing, batch_size,
                                                   positions=positions, device=device):
            features = pooled_features(model, images).float().cpu().numpy()
            yield ids, features, labels.cpu().numpy()


def feature_graph(extractor: Extractor):
    """A module from stored images (n, C', H', W') in [0, 1] to pooled features (n, D).

    Preprocessing and network in one graph: exported to ONNX it is all a device needs,
    so it cannot preprocess differently from the cloud (models.onnx_extractor).
    """
    import torch

    class FeatureGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = extractor.model.eval()

        def forward(self, images):
            return pooled_features(self.model, extractor.preprocessing(images))

    return FeatureGraph().eval()

