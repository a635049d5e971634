"""Files that are not tapvits artifacts: weights from timm/PyTorch checkpoints, exports for other runtimes.

Nothing is unpickled: torch files load with ``weights_only=True``, which refuses
arbitrary objects. Common checkpoint wrappers are unwrapped in every format: a
torch file's nesting (``state_dict``, ``model``...) here, and the name prefixes that
training wrappers add (``module.``, ``model.``...) by ``models.checkpoints``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tapvits_cli.artifacts.files import atomic_write, sniff_format
from tapvits_cli.errors import DataUnavailableError, InvalidArtifactError

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
