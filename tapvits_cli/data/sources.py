"""Dataset sources: the only code in tapvits that reads dataset files.

A :class:`Source` is one split of one source: its labels in memory (small) and a reader
that returns the pixels of requested rows, so that an HDF5 pool or an image folder larger
than memory is never loaded whole. Every reader returns float32 images in [0, 1], shaped
(n, C, H, W): uint8 is divided by 255, uint16 by 65535, floats are kept as stored.
Readers are small picklable classes, so DataLoader worker processes can carry them.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from tapvits_cli.data.hdf5 import borrowed_data
from tapvits_cli.data.reference import BUILTINS
from tapvits_cli.data.selection import fold_assignment
from tapvits_cli.errors import DataUnavailableError, UsageError, environment_failure

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
# The most pixels (width × height) an image in a folder may have: 4096×4096, more than a 12-megapixel
# photo, far below PIL's decompression-bomb limit. The first image sets every image's size, so one
# large header (a few KB of PNG) would otherwise make every read of the folder that large.
MAX_IMAGE_PIXELS = 4096 * 4096
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
# Digits ships without a test split; ours is fold 0 of a stratified 5-fold partition with seed 0 (~20%).
_DIGITS_TEST_FOLDS, _DIGITS_TEST_SEED = 5, 0


@dataclass(frozen=True)
class Source:
    """One split of a dataset source.

    ``kind`` is the built-in name or the file type (``npz``, ``hdf5``, ``folder``), never
    the path: the fingerprint uses it, and moving a file must not change a fingerprint.
    """

    kind: str
    split: str
    labels: np.ndarray
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    read: Callable[[np.ndarray], np.ndarray]  # sorted unique rows -> float32 (n, C, H, W)

    def __post_init__(self) -> None:
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise UsageError(f"{self.kind} dataset ({self.split}): labels must lie in "
                                       f"0..{len(self.class_names) - 1}")


def _layout(shape: tuple[int, ...], what: str) -> tuple[tuple[int, int, int], bool]:
    """(C, H, W) of stored images and whether channels come last."""
    if len(shape) == 3:
        return (1, shape[1], shape[2]), False
    if len(shape) == 4 and shape[1] in (1, 3):
        return (shape[1], shape[2], shape[3]), False
    if len(shape) == 4 and shape[3] in (1, 3):
        return (shape[3], shape[1], shape[2]), True
    raise UsageError(f"{what}: images of shape {tuple(shape)} are not (N,H,W), (N,C,H,W) or (N,H,W,C) "
                     "with C = 1 or 3")


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if dtype not in _SCALE and not np.issubdtype(dtype, np.floating):
        raise UsageError(f"{what}: pixels of type {dtype} are not supported (use uint8, uint16 or "
                         "floats in [0, 1])")


def _to_float(raw: np.ndarray, channels_last: bool, what: str, rows: np.ndarray) -> np.ndarray:
    """Stored pixels of ``rows`` as float32 (n, C, H, W) in [0, 1].

    Float pixels are checked to be finite here, the one place every stored float pixel
    passes through (fingerprints, training, evaluation, embedding), so a NaN or an
    infinity in a dataset file is refused as bad input instead of turning every loss,
    feature and weight it touches into NaN.
    """
    if raw.ndim == 3:
        raw = raw[:, None]
    elif channels_last:
        raw = raw.transpose(0, 3, 1, 2)
    if raw.dtype in _SCALE:
        return np.ascontiguousarray(np.divide(raw, _SCALE[raw.dtype], dtype=np.float32))
    with np.errstate(over="ignore"):   # float64 beyond float32's range becomes inf: refused below, not warned about
        images = np.ascontiguousarray(raw, dtype=np.float32)
    bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if bad.any():
        raise UsageError(f"{what}: image {int(rows[np.argmax(bad)])} holds NaN or infinite pixels "
                         f"({int(bad.sum())} of the {len(images)} images read); store finite values in [0, 1]")
    return images


def _labels(raw: np.ndarray, what: str) -> np.ndarray:
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
        raise UsageError(f"{what}: labels must be a 1-D integer array, got {raw.dtype} {raw.shape}")
    return raw.astype(np.int64)


def _default_names(labels: list[np.ndarray]) -> tuple[str, ...]:
    top = max((int(part.max()) for part in labels if len(part)), default=-1)
    return tuple(str(i) for i in range(top + 1))


class _ArrayRows:
    """Rows of an array held in memory (built-ins, .npz), converted only when read."""

    def __init__(self, raw: np.ndarray, channels_last: bool, what: str) -> None:
        self.raw, self.channels_last, self.what = raw, channels_last, what

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return _to_float(self.raw[rows], self.channels_last, self.what, rows)


class _H5Rows:
    """Rows of one or more HDF5 image datasets (train then test for ``split=all``), read lazily.

    The file is opened per call: h5py handles must not cross into DataLoader workers.
    """

    def __init__(self, path: str, parts: tuple[tuple[str, int], ...], channels_last: bool) -> None:
        self.path, self.parts, self.channels_last = path, parts, channels_last

    def __call__(self, rows: np.ndarray) -> np.ndarray:  # rows: sorted, unique, not empty
        import h5py

        chunks, offset = [], 0
        try:
            with h5py.File(self.path, "r") as f:
                for key, count in self.parts:
                    local = rows[(rows >= offset) & (rows < offset + count)] - offset
                    offset += count
                    if len(local) == 0:
                        continue
                    low, high = int(local[0]), int(local[-1]) + 1
                    if high - low <= 2 * len(local):  # dense enough: one slice beats point selection
                        chunks.append(f[key][low:high][local - low])
                    else:
                        chunks.append(f[key][local])
        except (OSError, KeyError, ValueError) as exc:   # a file damaged, or changed, after it was opened
            raise _unreadable(exc, f"{self.path}: unreadable, truncated or corrupt images") from None
        return _to_float(np.concatenate(chunks), self.channels_last, self.path, rows)


class _FileRows:
    """Rows of an image folder, one file per row, opened only when read.

    Every image is converted to the mode and size of the folder's first image, since a
    batch needs one shape; a model's preprocessing resizes afterwards anyway.
    """

    def __init__(self, files: tuple[str, ...], mode: str, size: tuple[int, int], root: Path) -> None:
        self.files, self.mode, self.size, self.root = files, mode, size, root

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        width, height = self.size
        channels = 1 if self.mode == "L" else 3
        out = np.empty((len(rows), height, width, channels), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = _with_image(self.files[row], self.root, self._pixels).reshape(height, width, channels)
        return _to_float(out, True, "image folder", rows)

    def _pixels(self, image) -> np.ndarray:
        """An image in the folder's mode and size: a batch needs one shape."""
        from PIL import Image

        image = image.convert(self.mode)
        if image.size != self.size:
            image = image.resize(self.size, Image.BILINEAR)
        return np.asarray(image)


def _with_image(path: str, root: Path, use: Callable) -> object:
    """``use(image)`` on the image file ``path`` of the dataset folder ``root``, opened lazily and checked
    against :data:`MAX_IMAGE_PIXELS`.

    The one way a folder's image is opened, for its first image (which sets the folder's mode
    and size) as for every later one, so a corrupt file or a decompression bomb is the same
    bad input (exit 2, naming the file) wherever it sorts.
    """
    from PIL import Image

    try:
        with _open_image_file(path, root) as handle, warnings.catch_warnings():
            # PIL warns from 89 million pixels: far beyond the limit refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
            with image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_large(path, f"{width}×{height} pixels")
                return use(image)
    except Image.DecompressionBombError:   # so large that PIL refuses it while opening
        raise _too_large(path, f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # PIL reports a corrupt or truncated file as OSError (UnidentifiedImageError among
        # them), SyntaxError or ValueError: a bad input, named, not a crash
        raise _unreadable(exc, f"{path}: unreadable image, truncated or corrupt") from None


def _open_image_file(path: str, root: Path):
    """The file at ``path``, checked as it is opened, not as it was listed: a regular file within ``root``.

    Listing a folder and reading it are apart in time (a pool is read for minutes), so an
    image may meanwhile become a FIFO (reading would wait for a writer forever: it is
    opened without waiting, then refused) or a link out of the folder (the real path of
    what was opened, where the system tells it, is checked again).
    """
    import stat

    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise UsageError(f"{path}: no longer a regular file (it changed after the dataset folder was listed)")
        opened = Path(_opened_path(handle, path))
        if not opened.is_relative_to(root):
            raise _outside(path, root, opened)
        os.set_blocking(handle, True)
        return os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise


def _opened_path(handle: int, path: str) -> str:
    """The real path of an open file: from ``/proc`` where the system has it, else resolved from its name."""
    try:
        return os.readlink(f"/proc/self/fd/{handle}")
    except OSError:
        return os.path.realpath(path)


def _outside(path: str, root: Path, target: Path) -> UsageError:
    return UsageError(f"{path}: leads outside the dataset folder {root} (to {target}); "
                      "copy the file into the folder instead of linking it")


def _too_large(path: str, size: str) -> UsageError:
    return UsageError(f"{path}: image of {size}, more than the limit of {MAX_IMAGE_PIXELS} pixels (4096×4096); "
                      "downscale it")


@lru_cache(maxsize=1)
def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (8×8, values 0..16), read from the file the package ships.

    Not through ``sklearn.datasets.load_digits``: importing scikit-learn takes about two
    seconds, and ``run`` fingerprints every digits reference in its parent process, which
    otherwise never needs scikit-learn. The file's rows are 64 pixels and the label.
    """
    from importlib.util import find_spec

    spec = find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise DataUnavailableError("the digits dataset ships with scikit-learn, which is not installed: "
                                   "pip install scikit-learn")
    rows = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images = (rows[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)
    images.flags.writeable = False  # cached and shared by every digits dataset
    return images, rows[:, -1].astype(np.int64)


def _digits(split: str | None) -> Source:
    split = split or "train"
    images, labels = _digits_all()
    if split != "all":
        test = fold_assignment(labels, _DIGITS_TEST_FOLDS, _DIGITS_TEST_SEED) == 0
        keep = np.flatnonzero(test if split == "test" else ~test)
        images, labels = images[keep], labels[keep]
    return Source("digits", split, labels, tuple(str(i) for i in range(10)), (1, 8, 8), _ArrayRows(images, False, "digits"))


@lru_cache(maxsize=4)
def _read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format): magic 0,0,type,ndim, big-endian uint32 sizes, data."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataUnavailableError(f"Fashion-MNIST not found: {path} is missing; install it with: "
                                   "apt-get install -y dataset-fashion-mnist (or set TAPVITS_FASHION_MNIST_DIR "
                                   "to a folder holding the four idx .gz files)") from None
    except (OSError, EOFError) as exc:
        raise DataUnavailableError(f"{path}: unreadable ({exc})") from None
    ndim = data[3] if len(data) > 4 else 0
    if data[:3] != b"\x00\x00\x08" or ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataUnavailableError(f"{path}: not an idx file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if len(data) - 4 - 4 * ndim != int(np.prod(shape)):
        raise DataUnavailableError(f"{path}: truncated idx file")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str | None) -> Source:
    split = split or "train"
    root = Path(os.environ.get("TAPVITS_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    images = [_read_idx(str(root / f"{p}-images-idx3-ubyte.gz")) for p in prefixes]
    labels = [_read_idx(str(root / f"{p}-labels-idx1-ubyte.gz")) for p in prefixes]
    images_all = images[0] if len(images) == 1 else np.concatenate(images)
    return Source("fashion-mnist", split, np.concatenate(labels).astype(np.int64), FASHION_MNIST_CLASSES,
                  (1, 28, 28), _ArrayRows(images_all, False, "fashion-mnist"))


def _resolve_split(available: list[str], split: str | None, what: str) -> list[str]:
    """Which stored parts make up ``split``: ``all`` falls back to train followed by test."""
    if split is None:
        split = "all" if "all" in available else "train"
    if split in available:
        return [split]
    if split == "all" and "train" in available and "test" in available:
        return ["train", "test"]
    raise UsageError(f"{what}: no split '{split}' (this source has: {', '.join(available) or 'none'})")


def _npz(path: Path, split: str | None) -> Source:
    keys = {"all": ("x", "y"), "train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
    what = str(path)
    with np.load(path, allow_pickle=False) as z:
        available = [s for s, (x, y) in keys.items() if x in z.files and y in z.files]
        parts = _resolve_split(available, split, what)
        all_labels = [_labels(z[keys[s][1]], what) for s in available]
        names = tuple(z["class_names"].astype(str).tolist()) if "class_names" in z.files else _default_names(all_labels)
        raw = [z[keys[s][0]] for s in parts]
    labels = [all_labels[available.index(s)] for s in parts]
    shape, channels_last = _check_parts([(a.shape, a.dtype) for a in raw], labels, what)
    images = raw[0] if len(raw) == 1 else np.concatenate(raw)
    return Source("npz", _name(parts), np.concatenate(labels), names, shape, _ArrayRows(images, channels_last, what))


def _hdf5(path: Path, split: str | None) -> Source:
    import h5py

    groups = {"all": "", "train": "train/", "test": "test/"}
    what = str(path)
    with h5py.File(path, "r") as f:
        borrowed = borrowed_data(f)
        if borrowed is not None:
            raise UsageError(f"{what}: {borrowed}; a dataset file must hold its images and labels itself")
        available = [s for s, g in groups.items() if f"{g}images" in f and f"{g}labels" in f]
        parts = _resolve_split(available, split, what)
        all_labels = [_labels(f[f"{groups[s]}labels"][()], what) for s in available]
        names = tuple(f["class_names"].asstr()[()]) if "class_names" in f else _default_names(all_labels)
        datasets = [f[f"{groups[s]}images"] for s in parts]
        labels = [all_labels[available.index(s)] for s in parts]
        shape, channels_last = _check_parts([(d.shape, d.dtype) for d in datasets], labels, what)
        reader = _H5Rows(what, tuple((d.name, len(d)) for d in datasets), channels_last)
    return Source("hdf5", _name(parts), np.concatenate(labels), names, shape, reader)


def _check_parts(arrays: list[tuple[tuple[int, ...], np.dtype]], labels: list[np.ndarray],
                 what: str) -> tuple[tuple[int, int, int], bool]:
    """The common layout of the stored parts of a split, which must agree with each other and their labels."""
    layouts = [_layout(shape, what) for shape, _ in arrays]
    for (shape, dtype), part_labels, layout in zip(arrays, labels, layouts):
        _check_dtype(dtype, what)
        if layout != layouts[0] or shape[0] != len(part_labels):
            raise UsageError(f"{what}: images and labels disagree in shape or length")
    return layouts[0]


def _name(parts: list[str]) -> str:
    return "all" if len(parts) > 1 else parts[0]


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path, root: Path) -> list[str]:
    """The images of one class folder: its regular files with an image suffix, not hidden, sorted.

    Anything else is skipped like a file of another type: a directory, a FIFO (opening one
    waits for a writer forever), a socket, a device, a broken link. A link is followed, but
    only within the dataset folder ``root``: one that leads outside it (``ln -s /etc/passwd
    a.png``, or a class folder linked elsewhere) is refused, so a folder never reads files
    its reference does not name.
    """
    if not folder.is_dir():
        return []
    real_folder = Path(os.path.realpath(folder))
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES or entry.name.startswith("."):
                continue
            target = Path(os.path.realpath(entry.path)) if entry.is_symlink() else real_folder / entry.name
            if not target.is_relative_to(root):
                raise _outside(entry.path, root, target)
            if entry.is_file():
                found.append(entry.path)
    return sorted(found)


def _folder(root: Path, split: str | None) -> Source:
    what = str(root)
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    parts = _resolve_split(["train", "test"] if has_splits else ["all"], split, what)
    folders = [root / s for s in parts] if has_splits else [root]
    class_roots = [root / "train", root / "test"] if has_splits else [root]  # same labels in both splits
    names = sorted({p.name for class_root in class_roots for p in _subfolders(class_root)})
    files, labels = [], []
    for folder in folders:
        for label, name in enumerate(names):
            found = _images_in(folder / name, root)
            files += found
            labels += [label] * len(found)
    if not files:
        raise DataUnavailableError(f"{what}: no images found (expected class subfolders holding "
                                   f"{', '.join(sorted(IMAGE_SUFFIXES))} files)")
    first_mode, size = _with_image(files[0], root, lambda image: (image.mode, image.size))
    mode = "L" if first_mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    return Source("folder", _name(parts), np.asarray(labels, dtype=np.int64), tuple(names),
                  (1 if mode == "L" else 3, size[1], size[0]), _FileRows(tuple(files), mode, size, root))


def open_source(source: str, split: str | None) -> Source:
    """Open one split of a source; ``split=None`` picks its default (see protocol/datasets.md)."""
    if source == "digits":
        return _digits(split)
    if source == "fashion-mnist":
        return _fashion_mnist(split)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataUnavailableError(f"dataset source {source!r} not found: it is neither a built-in "
                                   f"({', '.join(BUILTINS)}) nor an existing file or folder")
    openers = {".npz": _npz, ".h5": _hdf5, ".hdf5": _hdf5}
    opener = _folder if path.is_dir() else openers.get(path.suffix.lower())
    if opener is None:
        raise UsageError(f"dataset source {source!r}: unsupported file type (expected .npz, .h5, .hdf5 or a folder "
                         "of class subfolders)")
    try:
        return opener(path.resolve(), split)  # absolute: readers must survive a change of directory
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise _unreadable(exc, f"dataset source {source!r}: unreadable, truncated or corrupt") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _unreadable(exc: BaseException, what: str) -> Exception:
    """A dataset file that cannot be read: the environment's refusal (exit 9, e.g. permission denied),
    else a bad input (exit 2; ``8`` is kept for a source that is missing altogether)."""
    refused = environment_failure(exc, what.split(":")[0]) if isinstance(exc, OSError) else None
    return refused or UsageError(f"{what} ({_first_line(exc)})")
