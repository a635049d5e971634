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

from tapvits_cli.errors import InvalidArtifactError, UsageError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HASH_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``, on failure delete it."""
    target = Path(path)
    if target.is_dir():   # checked first: os.replace would fail only after the whole write
        raise UsageError(f"{target} is a folder: give the output a file name")
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
