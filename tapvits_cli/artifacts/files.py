"""File primitives every artifact kind shares: atomic writes, hashing, format sniffing.

An interrupted stage must never leave a file that looks like a finished artifact, so
every writer goes through :func:`atomic_write`: data lands in a hidden temporary file
beside the target and is renamed over it only after a successful flush to disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from tapvits_cli.errors import InvalidArtifactError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HASH_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``, on failure delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600, and a writer may replace the file (safetensors does), so the
        # ordinary permissions are set on what was written: files handed to other users
        # and machines must be readable wherever the umask allows it.
        tmp.chmod(0o666 & ~_current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes: the identity used in lineage records."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sniff_format(path: str | os.PathLike) -> str:
    """Tell ``safetensors``, ``hdf5`` or ``json`` apart by their first bytes.

    Sniffing (rather than trusting the file extension) lets ``inspect`` and
    ``validate`` give a precise reason for a renamed, foreign or empty file.

    safetensors is recognised first, by its little-endian header length followed by
    ``{``: a length whose low byte is 123 makes the file start with ``{`` too, but no JSON
    text's first eight bytes (printable characters, each >= 0x09) read as a length that
    fits in the file, so checking the length against the file size tells them apart.
    """
    file = Path(path)
    if not file.is_file():
        raise InvalidArtifactError(f"{file}: no such file")
    with open(file, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise InvalidArtifactError(f"{file}: empty file, not a tapvits artifact")
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= file.stat().st_size:
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "json"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"   # a header length beyond the file: the safetensors reader says "truncated"
    raise InvalidArtifactError(f"{file}: not a tapvits artifact (neither safetensors, HDF5 nor JSON)")


# torch's names for the dtypes a NumPy array can hold: the hash rule below names dtypes as
# torch prints them, so a tensor hashes the same whether torch or NumPy holds it.
_TORCH_DTYPE_NAMES = {"float64": "torch.float64", "float32": "torch.float32", "float16": "torch.float16",
                      "int64": "torch.int64", "int32": "torch.int32", "int16": "torch.int16", "int8": "torch.int8",
                      "uint8": "torch.uint8", "bool": "torch.bool"}


def tensors_sha256(arrays) -> str:
    """The ``model.weights_sha256`` rule over NumPy arrays: ``name|dtype|shape|`` then raw bytes, by name.

    The same digest as :func:`tapvits_cli.models.factory.weights_sha256` gives for the same
    tensors in torch; the device side, which has no torch, hashes what it writes with this.
    """
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])   # not ascontiguousarray: it turns a 0-d array into 1-d
        digest.update(f"{name}|{_TORCH_DTYPE_NAMES[array.dtype.name]}|{tuple(array.shape)}|".encode())
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()

