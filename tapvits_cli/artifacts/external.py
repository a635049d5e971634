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


_MAX_SIDE = 1 << 16   # bounds on a graph's recorded shapes: far past any image or feature width a ViT has
_MAX_FEATURES = 1 << 20


def _positive_ints(value, count: int | None, limit: int) -> tuple[int, ...] | None:
    """``value`` as a tuple of ``count`` integers in 1..``limit`` (JSON booleans are not integers), else None."""
    values = value if isinstance(value, list) else [value]
    if (count is not None and len(values) != count) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in values):
        return None
    return tuple(values)


def load_onnx_extractor(path: str | os.PathLike):
    """Open an exported features graph as an extractor; refuse a logits graph or one without its fingerprint.

    The graph is the device's input as much as the cloud's, so what its metadata promises
    is checked against the graph itself before a single image goes in: one float input
    ``images`` of shape (batch, C, H, W) = the recorded ``raw_input``, and a float output
    ``features`` of width ``feature_dim``. A graph that breaks this would otherwise fail
    inside onnxruntime at the first batch, or allocate what its shapes ask for.
    """
    try:
        import onnxruntime
    except ImportError:
        raise DataUnavailableError("an ONNX extractor needs onnxruntime: pip install onnxruntime") from None
    from tapvits_cli.models.onnx_extractor import FEATURES_INPUT, FEATURES_OUTPUT, OnnxExtractor

    path = Path(path)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4   # fatal only: a failure is reported as one line of ours, not onnxruntime's log
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArtifactError(f"{path}: not a readable ONNX graph ({first})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get(GRAPH_KEY) != FEATURES_GRAPH:
        raise UsageError(f"{path} is not a features graph (export it with `tapvits export MODEL --features`)")
    try:
        fingerprint, raw_input = parse_json(metadata[EXTRACTOR_KEY]), parse_json(metadata[RAW_INPUT_KEY])
    except (KeyError, ValueError):
        raise InvalidArtifactError(f"{path}: '{EXTRACTOR_KEY}' and '{RAW_INPUT_KEY}' must hold the extractor "
                                   "fingerprint and the (C, H, W) input") from None
    raw_input = _positive_ints(raw_input, 3, _MAX_SIDE)
    feature_dim = _positive_ints(fingerprint.get("feature_dim"), 1, _MAX_FEATURES) \
        if isinstance(fingerprint, dict) else None
    if raw_input is None or feature_dim is None:
        raise InvalidArtifactError(f"{path}: '{RAW_INPUT_KEY}' must be three integers in 1..{_MAX_SIDE} and the "
                                   f"fingerprint's feature_dim an integer in 1..{_MAX_FEATURES}")
    inputs, outputs = session.get_inputs(), {output.name: output for output in session.get_outputs()}
    wanted_input, wanted_output = [None, *raw_input], [None, *feature_dim]

    def fits(node, wanted) -> bool:   # every dimension as recorded but the batch, whose size is free
        return node.type == "tensor(float)" and len(node.shape) == len(wanted) and all(
            want is None or have == want for have, want in zip(node.shape, wanted))

    if inputs and isinstance(inputs[0].shape[0] if inputs[0].shape else None, int):
        raise UsageError(f"{path} was exported with a fixed batch of {inputs[0].shape[0]} (--static-batch); an "
                         "extractor embeds datasets in batches of any size: export it again without --static-batch")

    if len(inputs) != 1 or inputs[0].name != FEATURES_INPUT or not fits(inputs[0], wanted_input):
        found = ", ".join(f"{node.name} {node.type} {node.shape}" for node in inputs)
        raise InvalidArtifactError(f"{path}: the graph must take one float input '{FEATURES_INPUT}' of shape "
                                   f"(batch, {', '.join(map(str, raw_input))}); it takes {found or 'none'}")
    if FEATURES_OUTPUT not in outputs or not fits(outputs[FEATURES_OUTPUT], wanted_output):
        found = ", ".join(f"{node.name} {node.type} {node.shape}" for node in outputs.values())
        raise InvalidArtifactError(f"{path}: the graph must give a float output '{FEATURES_OUTPUT}' of shape "
                                   f"(batch, {feature_dim[0]}); it gives {found or 'none'}")
    return OnnxExtractor(session=session, fingerprint=fingerprint, raw_input=raw_input, path=path)
