"""The content hashes the protocol defines, in one place so every producer and reader agrees.

Each function here is the reference for one rule of protocol/README.md ("Compact JSON",
"Tensor hash"); another implementation reproduces them from that text alone, which
``tests/independent_reader.py`` checks. Imports neither torch nor timm: the device side,
which may have neither, hashes what it writes with these too.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from tapvits_cli.artifacts.header import compact_json

# safetensors' own dtype names (its header's "dtype" field), keyed by the dtype name NumPy
# and torch share: the tensor hash names dtypes as the container does, not as a library prints them.
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}

# Which tensor-hash rule a file of a kind and version uses: "container" (dtype names as
# safetensors writes them, shape as a JSON list) since model v2 and gmm v3; "legacy"
# (torch's dtype string, Python's tuple repr) before. Readers keep the legacy rule so
# older files still verify.
CONTAINER_RULE_SINCE = {"model": 2, "gmm": 3}


def canonical_sha256(value: Any) -> str:
    """Hex SHA-256 of the compact JSON of ``value`` (ASCII, see ``header.compact_json``): step keys, extractor fingerprints."""
    return hashlib.sha256(compact_json(value).encode("ascii")).hexdigest()


def fingerprint_sha256(fingerprint: Mapping[str, Any]) -> str:
    """The extractor fingerprint's hash (``features.extractor_sha256``, ``gmm.extractor_sha256``)."""
    return canonical_sha256(dict(fingerprint))


def tensor_rule(kind: str, version: int) -> str:
    """The tensor-hash rule of a ``kind`` artifact at format ``version``: "container" or "legacy"."""
    return "container" if version >= CONTAINER_RULE_SINCE[kind] else "legacy"


def tensors_sha256(tensors: Mapping[str, Any], rule: str = "container") -> str:
    """``model.weights_sha256`` / ``gmm.tensors_sha256`` of torch tensors or NumPy arrays.

    For each tensor in name order (UTF-8 byte order): ``NAME|DTYPE|SHAPE|`` in UTF-8, then
    its values as little-endian bytes in row-major order. The ``container`` rule writes
    DTYPE as safetensors names it (``F32``) and SHAPE as a JSON list (``[3,64]``, ``[]`` for
    a scalar); the ``legacy`` rule wrote ``torch.float32`` and ``(3, 64)``. Independent of
    the file, so a model keeps its identity when re-saved.
    """
    if rule not in ("container", "legacy"):
        raise ValueError(f"unknown tensor hash rule {rule!r}")
    digest = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        dtype, shape, data = _tensor_parts(tensors[name])
        if rule == "container":
            label = f"{name}|{SAFETENSORS_DTYPES[dtype]}|[{','.join(map(str, shape))}]|"
        else:
            label = f"{name}|torch.{dtype}|({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})|"
        digest.update(label.encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()


def _tensor_parts(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, little-endian row-major bytes) of a torch tensor or a NumPy array."""
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()   # torch runs little-endian only
        return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), raw
    import numpy as np

    array = np.asarray(value)   # not ascontiguousarray: it turns a 0-d array into 1-d
    return array.dtype.name, tuple(array.shape), array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
