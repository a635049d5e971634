"""Reading and writing the three container formats with the common header.

safetensors holds tensors (model, GMM, scores, plan), HDF5 holds tables (features,
metric sets), JSON holds reports. Each reader checks the container's own structure
first, so a truncated or foreign file fails with a precise one-line reason before any
kind-specific check runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tapvits_cli.artifacts.files import atomic_write, sniff_format
from tapvits_cli.artifacts.header import Header, parse_json
from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass
class ArtifactFile:
    """What a reader learns from a file without loading its payload.

    ``metadata`` holds every string key (``tapvits.*`` header keys and the kind's own
    namespaced keys); ``tensors`` the name, dtype and shape of each safetensors tensor.
    """

    path: Path
    format: str
    header: Header
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def kind_metadata(self, namespace: str) -> dict[str, str]:
        """The keys under ``namespace.`` with the prefix removed."""
        prefix = namespace + "."
        return {k[len(prefix):]: v for k, v in self.metadata.items() if k.startswith(prefix)}

    def fail(self, message: str) -> InvalidArtifactError:
        """The error for a rule this file breaks, naming the file."""
        return InvalidArtifactError(f"{self.path}: {message}")

    def require_keys(self, namespace: str, keys) -> None:
        """Every ``namespace.key`` must be present (the kind's required metadata)."""
        for key in keys:
            if f"{namespace}.{key}" not in self.metadata:
                raise self.fail(f"required key '{namespace}.{key}' is missing")

    def json_field(self, key: str) -> Any:
        """A metadata value that the protocol stores as compact JSON."""
        if key not in self.metadata:
            raise InvalidArtifactError(f"{self.path}: required key '{key}' is missing")
        try:
            return parse_json(self.metadata[key])
        except ValueError as exc:
            raise InvalidArtifactError(f"{self.path}: key '{key}' is not valid JSON ({exc})") from None


# --- safetensors --------------------------------------------------------------------

def _safetensors_layout(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InvalidArtifactError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_SAFETENSORS_HEADER:
            raise InvalidArtifactError(f"{path}: not a safetensors file (header length {header_len})")
        if 8 + header_len > size:
            raise InvalidArtifactError(f"{path}: truncated safetensors file (header cut off)")
        raw = handle.read(header_len)
    try:
        layout = parse_json(raw)
    except ValueError as exc:
        raise InvalidArtifactError(f"{path}: not a safetensors file (header is not strict JSON: {exc})") from None
    if not isinstance(layout, dict):
        raise InvalidArtifactError(f"{path}: not a safetensors file (header is not an object)")
    metadata = layout.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    try:
        for name, entry in layout.items():
            start, end = entry["data_offsets"]
            tensors[name] = TensorInfo(str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            data_end = max(data_end, int(end))
    except (KeyError, TypeError, ValueError):
        raise InvalidArtifactError(f"{path}: malformed safetensors header") from None
    expected = 8 + header_len + data_end
    if size < expected:
        raise InvalidArtifactError(f"{path}: truncated safetensors file ({size} of {expected} bytes)")
    if size > expected:
        raise InvalidArtifactError(f"{path}: corrupt safetensors file ({size - expected} trailing bytes)")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArtifactError(f"{path}: safetensors metadata values must be strings")
    return dict(metadata), tensors


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], header: Header,
                      metadata: Mapping[str, str]) -> Path:
    """Write torch tensors, or NumPy arrays, plus the header and the kind's namespaced string metadata.

    NumPy arrays are written without importing torch: the device side has no torch.
    """
    import numpy as np

    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file

        payload = {name: np.require(t, requirements="C") for name, t in tensors.items()}   # keeps 0-d arrays 0-d
    else:
        from safetensors.torch import save_file

        payload = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(payload, str(tmp), metadata={**header.to_strings(), **metadata})
    return Path(path)


def load_safetensors(artifact: ArtifactFile, numpy: bool = False) -> dict[str, Any]:
    """Load every tensor of an already-opened artifact onto the CPU (as NumPy arrays with ``numpy``)."""
    if numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file

    try:
        return load_file(str(artifact.path))
    except Exception as exc:  # safetensors raises its own error types
        raise InvalidArtifactError(f"{artifact.path}: cannot read tensors ({exc})") from None


# --- HDF5 ---------------------------------------------------------------------------

@contextlib.contextmanager
def hdf5_reading(path: str | os.PathLike) -> Iterator[None]:
    """Reads from an HDF5 artifact: what h5py raises on a damaged file becomes one invalid-artifact line.

    A bit flip can surface anywhere in h5py (opening, iterating attributes, decoding a
    chunk) as OSError, RuntimeError, KeyError or ValueError; all mean "corrupt" (exit 3),
    except the system's own refusals (permission denied: exit 9).
    """
    from tapvits_cli.errors import TapvitsError, environment_failure

    try:
        yield
    except TapvitsError:
        raise
    except OSError as exc:
        refused = environment_failure(exc, f"reading {path}")
        if refused is not None:
            raise refused from None
        raise InvalidArtifactError(f"{path}: unreadable HDF5 file, truncated or corrupt ({_first_line(exc)})") from None
    except (RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidArtifactError(f"{path}: unreadable HDF5 file, truncated or corrupt ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _hdf5_attrs(path: Path) -> dict[str, str]:
    """The root attributes (the header), read after :func:`_probe_hdf5` has walked the file's metadata and
    the file was found to store every value it declares, none borrowed from elsewhere (:mod:`tapvits_cli.data.hdf5`)."""
    import h5py

    from tapvits_cli.data.hdf5 import borrowed_data, unstored_values

    _probe_hdf5(path)
    with hdf5_reading(path), h5py.File(path, "r") as handle:
        borrowed = borrowed_data(handle)
        if borrowed is not None:
            raise InvalidArtifactError(f"{path}: {borrowed}; an artifact holds all its data in the file")
        unstored = unstored_values(handle)
        if unstored is not None:
            raise InvalidArtifactError(f"{path}: {unstored}; an artifact stores every value it declares")
        return {k: attr_string(v) for k, v in handle.attrs.items()}


def _walk_hdf5(path: Path) -> None:
    """Read every attribute, and every dataset's dtype and shape: all the metadata a reader touches."""
    import h5py

    def visit(_name: str, item: Any) -> None:
        for value in item.attrs.values():
            attr_string(value)
        if isinstance(item, h5py.Dataset):
            (item.dtype, item.shape)

    with h5py.File(path, "r") as handle:
        for value in handle.attrs.values():
            attr_string(value)
        handle.visititems(visit)


_PROBE_SECONDS = 60.0


def _wait_for(pid: int, seconds: float) -> int | None:
    """The child's wait status, or None once ``seconds`` have passed.

    Waits on a pidfd where the system has one (Linux), so the parent wakes the moment the
    child exits; elsewhere it polls every millisecond or so: a probe takes tens of
    milliseconds, and a coarser poll would add as much again to every HDF5 read.
    """
    import select
    import time

    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):
        handle = None
    if handle is not None:
        try:
            ready, _, _ = select.select([handle], [], [], seconds)
        finally:
            os.close(handle)
        return os.waitpid(pid, 0)[1] if ready else None
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)


# Files whose probe this process saw survive, by (device, inode): an open descriptor, which keeps the inode from
# being reused by another file, and the (size, mtime, ctime) the file had. Bounded: the oldest are closed.
_SURVIVED: dict[tuple[int, int], tuple[int, tuple[int, int, int]]] = {}
_SURVIVED_LIMIT = 64


def _signature(status: os.stat_result) -> tuple[int, int, int]:
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _survived_before(path: Path) -> bool:
    """True when this process probed this very file, unchanged since (same inode, size, mtime and ctime)."""
    try:
        status = os.stat(path)
    except OSError:
        return False
    entry = _SURVIVED.get((status.st_dev, status.st_ino))
    if entry is None:
        return False
    try:
        held = os.fstat(entry[0])
    except OSError:   # the descriptor was closed behind our back: forget it
        _SURVIVED.pop((status.st_dev, status.st_ino), None)
        return False
    return (held.st_dev, held.st_ino) == (status.st_dev, status.st_ino) and \
        entry[1] == _signature(status) == _signature(held)


def _remember_survived(handle: int, path: Path) -> bool:
    """Keep ``handle`` (opened on ``path`` before the probe) when ``path`` still names that unchanged file."""
    held, named = os.fstat(handle), os.stat(path)
    if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino) or _signature(held) != _signature(named):
        return False
    old = _SURVIVED.pop((held.st_dev, held.st_ino), None)
    if old is not None:
        os.close(old[0])
    _SURVIVED[held.st_dev, held.st_ino] = (handle, _signature(held))
    while len(_SURVIVED) > _SURVIVED_LIMIT:
        os.close(_SURVIVED.pop(next(iter(_SURVIVED)))[0])
    return True


def _probe_hdf5(path: Path) -> None:
    """Walk an HDF5 file's metadata in a forked child first: HDF5's C library can crash on corrupt metadata.

    A bit flip in an attribute's encoding made h5py die with SIGSEGV (measured: one flipped
    bit at byte 1026 of a feature table), which no Python handler can catch. The child
    walks what every reader touches (:func:`_walk_hdf5`); if it dies by a signal the file
    is corrupt (exit 3); if it survives, the same deterministic reads are safe here. Python
    errors are left to :func:`hdf5_reading` in this process, which reports them the same
    way; without ``fork`` (not POSIX) there is no probe.

    A fork of a process that has loaded torch costs about 40 ms, and its child as much
    again (measured in ``tapvits run``, where the probes were a sixth of a fleet's CPU
    time), and a run reads one metric set up to three times. So a file this process saw
    survive is not probed again while it is unchanged: its descriptor stays open, so its
    inode cannot be reused by another file, and its size, mtime and ctime must match.
    tapvits replaces files, never rewrites them in place, so a changed file is a new inode.
    """
    if not hasattr(os, "fork") or _survived_before(path):
        return
    import h5py  # noqa: F401  (imported before the fork, so the child does not import it)

    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        handle = None   # h5py will report it
    try:
        pid = os.fork()
        if pid == 0:   # the child: never returns into the caller's code, prints nothing
            code = 0
            try:
                import faulthandler

                faulthandler.disable()
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                _walk_hdf5(path)
            except BaseException:
                code = 1   # an ordinary error: the parent meets it again, with its message
            finally:
                os._exit(code)
        status = _wait_for(pid, _PROBE_SECONDS)
        if status is None:   # stuck (a lock another thread held at the fork): go on without the probe
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        if os.WIFSIGNALED(status):
            raise InvalidArtifactError(f"{path}: corrupt HDF5 file (its metadata crashes the HDF5 library: "
                                       f"{signal.Signals(os.WTERMSIG(status)).name})")
        if os.WEXITSTATUS(status) == 0 and handle is not None and _remember_survived(handle, path):
            handle = None   # kept
    finally:
        if handle is not None:
            os.close(handle)


def attr_string(value: Any) -> str:
    """An HDF5 attribute as text (h5py returns bytes or str, depending on how it was written)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def write_hdf5(path: str | os.PathLike, header: Header, metadata: Mapping[str, str],
               fill: Callable[[Any], None]) -> Path:
    """Create an HDF5 artifact atomically; ``fill(h5file)`` writes the groups."""
    import h5py

    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            for key, value in {**header.to_strings(), **metadata}.items():
                handle.attrs[key] = value
            fill(handle)
    return Path(path)


def check_group_encoding(group: Any, path: Path, name: str, encoding_type: str, encoding_version: int) -> None:
    """The encoding tag :func:`set_group_encoding` writes: this type, and a version this tapvits reads."""
    found_type, version = (attr_string(group.attrs.get(key)) for key in ("encoding-type", "encoding-version"))
    if found_type != encoding_type or not (version.isascii() and version.isdigit()):
        raise InvalidArtifactError(f"{path}: group '{name}' must have encoding-type '{encoding_type}' "
                                   "and an integer encoding-version")
    if int(version) > encoding_version:
        raise IncompatibleArtifactError(f"{path}: {encoding_type} encoding v{version}, this tapvits reads up to "
                                        f"v{encoding_version}; upgrade tapvits")


def set_group_encoding(group: Any, encoding_type: str, encoding_version: int) -> None:
    """Tag an HDF5 group with the encoding the protocol defines for it."""
    group.attrs["encoding-type"] = encoding_type
    group.attrs["encoding-version"] = str(encoding_version)


# --- JSON ---------------------------------------------------------------------------

def _json_members(path: Path) -> dict[str, Any]:
    try:
        document = parse_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArtifactError(f"{path}: invalid or truncated JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidArtifactError(f"{path}: not a tapvits artifact (JSON is not an object)")
    return document


def write_json(path: str | os.PathLike, header: Header, body: Mapping[str, Any]) -> Path:
    """A JSON artifact is one object: the ``tapvits.*`` header members, then the body."""
    document = {**header.to_strings(), **body}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)


def read_json_body(artifact: ArtifactFile) -> dict[str, Any]:
    return {k: v for k, v in _json_members(artifact.path).items() if not k.startswith("tapvits.")}


# --- any format ---------------------------------------------------------------------

def open_file(path: str | os.PathLike) -> ArtifactFile:
    """Sniff the container, check its structure and parse the common header."""
    file = Path(path)
    fmt = sniff_format(file)
    tensors: dict[str, TensorInfo] = {}
    if fmt == "safetensors":
        metadata, tensors = _safetensors_layout(file)
    elif fmt == "hdf5":
        metadata = _hdf5_attrs(file)
    else:
        members = _json_members(file)
        metadata = {k: v for k, v in members.items() if k.startswith("tapvits.")}
        loose = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
        if loose is not None:   # the header is strings in every container; nested values are compact-JSON text
            raise InvalidArtifactError(f"{file}: header member '{loose}' must be a JSON string")
    header = Header.from_strings(metadata, str(file))
    return ArtifactFile(path=file, format=fmt, header=header, metadata=metadata, tensors=tensors)
