"""Files that are not tapvits artifacts: weights from timm/PyTorch checkpoints, exports for other runtimes.

Nothing is unpickled: torch files load with ``weights_only=True``, which refuses
arbitrary objects. Common checkpoint wrappers are unwrapped in every format: a
torch file's nesting (``state_dict``, ``model``...) here, and the name prefixes that
training wrappers add (``module.``, ``model.``...) by ``models.checkpoints``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from tapvits_cli.artifacts.files import atomic_write, sniff_format
from tapvits_cli.artifacts.header import Header, LineageEntry, PREFIX, compact_json, parse_json
from tapvits_cli.errors import DataUnavailableError, InvalidArtifactError, UsageError

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")


def read_weights_file(path: str | os.PathLike) -> dict:
    """A flat ``name -> tensor`` dict from a safetensors file or a torch checkpoint, wrapper prefixes removed."""
    import torch

    from tapvits_cli.models.checkpoints import strip_wrapper_prefixes

    file = Path(path)
    if not file.is_file():
        raise DataUnavailableError(f"{file}: weights file not found")
    try:
        is_safetensors = sniff_format(file) == "safetensors"
    except InvalidArtifactError:
        is_safetensors = False
    if is_safetensors:
        from safetensors.torch import load_file

        try:
            return strip_wrapper_prefixes(load_file(str(file)))
        except Exception as exc:
            raise InvalidArtifactError(f"{file}: unreadable safetensors weights ({exc})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArtifactError(f"{file}: not a safetensors file nor a weights-only torch checkpoint ({exc})") from None
    while isinstance(state, dict):   # {"model": {"state_dict": {...}}} unwraps to the inner dict
        key = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if key is None:
            break
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidArtifactError(f"{file}: checkpoint does not hold a flat dict of tensors")
    return strip_wrapper_prefixes(state)


def packaged_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file shipped inside an installed Python package (e.g. pretrained weights)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"the Python package '{package}' is not installed: {install_hint}")
    file = Path(next(iter(spec.submodule_search_locations))) / relative
    if not file.is_file():
        raise DataUnavailableError(f"{file}: missing from the installed package '{package}': {install_hint}")
    return file


def write_export(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file for another runtime (``tapvits export``'s ONNX bytes) atomically; returns its path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


EXPORT_VERSION = 1   # of the metadata_props layout below (protocol/README.md, "Exports")
GRAPH_KEY, EXTRACTOR_KEY, RAW_INPUT_KEY = "tapvits.graph", "tapvits.extractor", "tapvits.raw_input"
FEATURES_GRAPH = "features"


def export_provenance(model_metadata: Mapping[str, str], source: LineageEntry,
                      params: Mapping[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` tapvits stamps on an export (protocol/README.md, "Exports").

    The source artifact's ``model.*`` keys are copied verbatim (architecture, per-block
    widths, preprocessing, weights hash...), so an ONNX file traces back to the exact
    model artifact it came from and tells a runtime its preprocessing and classes.
    """
    header = Header(kind="", version=EXPORT_VERSION, inputs={"model": source}, params=dict(params)).to_strings()
    del header[PREFIX + "kind"], header[PREFIX + "version"]   # an export is not an artifact: no kind to claim
    return {PREFIX + "export": "onnx", PREFIX + "export_version": str(EXPORT_VERSION), **header,
            **{key: value for key, value in model_metadata.items() if key.startswith("model.")}}


def features_graph_provenance(model_metadata: Mapping[str, str], source: LineageEntry, params: Mapping[str, Any],
                              fingerprint: Mapping[str, Any], raw_input) -> dict[str, str]:
    """:func:`export_provenance` plus what makes a features graph usable as ``--extractor``."""
    return {**export_provenance(model_metadata, source, {**params, "raw_input": list(raw_input)}),
            GRAPH_KEY: FEATURES_GRAPH, EXTRACTOR_KEY: compact_json(dict(fingerprint)),
            RAW_INPUT_KEY: compact_json(list(raw_input))}


def load_onnx_extractor(path: str | os.PathLike):
    """Open an exported features graph as an extractor; refuse a logits graph or one without its fingerprint."""
    try:
        import onnxruntime
    except ImportError:
        raise DataUnavailableError("an ONNX extractor needs onnxruntime: pip install onnxruntime") from None
    from tapvits_cli.models.onnx_extractor import OnnxExtractor

    path = Path(path)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArtifactError(f"{path}: not a readable ONNX graph ({first})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get(GRAPH_KEY) != FEATURES_GRAPH:
        raise UsageError(f"{path} is not a features graph (export it with `tapvits export MODEL --features`)")
    try:
        fingerprint = parse_json(metadata[EXTRACTOR_KEY])
        raw_input = tuple(int(v) for v in parse_json(metadata[RAW_INPUT_KEY]))
    except (KeyError, ValueError, TypeError):
        raise InvalidArtifactError(f"{path}: '{EXTRACTOR_KEY}' and '{RAW_INPUT_KEY}' must hold the extractor "
                                   "fingerprint and the (C, H, W) input") from None
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("feature_dim"), int) or len(raw_input) != 3:
        raise InvalidArtifactError(f"{path}: malformed extractor fingerprint or raw input shape")
    return OnnxExtractor(session=session, fingerprint=fingerprint, raw_input=raw_input, path=path)
