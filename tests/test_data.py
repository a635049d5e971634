"""The dataset layer: references, every source, selection semantics, fingerprints, preprocessing."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tapvits_cli.data import DatasetRef, open_dataset
from tapvits_cli.data.selection import dirichlet_assignment
from tapvits_cli.data.sources import FASHION_MNIST_DIR, MAX_IMAGE_PIXELS
from tapvits_cli.errors import DataUnavailableError, ExitCode, UsageError
from tests.conftest import CliResult
from tests.test_protocol_examples import assert_one_line_failure

FASHION_DIR = os.environ.get("TAPVITS_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
HAS_FASHION = Path(FASHION_DIR, "t10k-images-idx3-ubyte.gz").exists()


def _pool(n: int = 60, classes: int = 3, seed: int = 0, shape=(8, 8)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n, dtype=np.int64) % classes


# --- references -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "digits",
    "digits:split=test",
    "fashion-mnist:split=all:classes=0,3,5-7:fold=1/2:indices=0-99,200:sample=10:seed=3",
    "fashion-mnist:split=test:dirichlet=0.5:part=2/5:fold=0/2",
    "digits:classes=0-4:dirichlet=1.0:part=0/3:seed=7",
    "pool.h5:split=train:fold=0/4",
    "/data/with:colon/pool.npz:classes=2",
])
def test_reference_round_trip(text):
    ref = DatasetRef.parse(text)
    assert str(ref) == text
    assert DatasetRef.parse(str(ref)) == ref


def test_reference_normalises_and_keeps_colon_paths():
    ref = DatasetRef.parse("digits:sample=5:classes=7,6,5,0,3,3:indices=10-12,0,1-4")
    assert ref.classes == ((0, 0), (3, 3), (5, 7)) and ref.indices == ((0, 4), (10, 12)) and ref.sample == 5
    assert str(ref) == "digits:classes=0,3,5-7:indices=0-4,10-12:sample=5"
    assert DatasetRef.parse(r"C:\data\pool.npz:split=test").source == r"C:\data\pool.npz"
    assert DatasetRef.parse("digits:seed=0") == DatasetRef("digits")


@pytest.mark.parametrize("text, message", [
    ("digits:foo=1", "unknown option"),
    ("digits:fold=2/2", "K must be in 0..N-1"),
    ("digits:fold=1", "expected K/N"),
    ("digits:fold=0/1", ">= 2"),
    ("digits:split=val", "train, test, all"),
    ("digits:sample=0", ">= 1"),
    ("digits:classes=3-1", "backwards"),
    ("digits:indices=a", "0,3,5-7"),
    ("digits:seed=-1", ">= 0"),
    ("digits:seed=1:seed=2", "given twice"),
    ("digits:dirichlet=0.5", "go together"),
    ("digits:part=0/5", "go together"),
    ("digits:dirichlet=0:part=0/5", "number > 0"),
    ("digits:dirichlet=abc:part=0/5", "number > 0"),
    ("digits:dirichlet=0.5:part=5/5", "K must be in 0..N-1"),
    (":split=train", "source"),
    # strict: ASCII digits and plain decimals only, no spaces, no underscores, within int64
    ("digits:classes=٣", "0,3,5-7"),
    ("digits:classes=1, 3", "0,3,5-7"),
    ("digits:indices=0-3\n", "0,3,5-7"),
    ("digits:fold=٠/٢", ">= 0"),
    ("digits:sample=1_0", ">= 1"),
    ("digits:sample= 5", ">= 1"),
    ("digits:fold=0/99999999999999999999", r"at most 2\*\*63-1"),
    ("digits:seed=9223372036854775808", r"at most 2\*\*63-1"),
    ("digits:classes=0-" + "9" * 5000, r"at most 2\*\*63-1"),
    ("digits:dirichlet=1_0:part=0/5", "number > 0"),
    ("digits:dirichlet= 0.5:part=0/5", "number > 0"),
    ("digits:dirichlet=infinity:part=0/5", "number > 0"),
])
def test_reference_errors(text, message):
    with pytest.raises(UsageError, match=message) as info:
        DatasetRef.parse(text)
    assert "\n" not in str(info.value)


def test_reference_limits():
    """Integers are int64, numbers plain decimals; ranges stay ranges until a source bounds them."""
    assert DatasetRef.parse("digits:classes=2-5000").classes == ((2, 5000),)
    top = DatasetRef.parse("digits:fold=0/9223372036854775807:seed=9223372036854775807:classes=007")
    assert top.fold == (0, 2**63 - 1) and top.seed == 2**63 - 1 and top.classes == ((7, 7),)
    assert DatasetRef.parse("digits:dirichlet=.5:part=0/2").dirichlet == 0.5
    assert DatasetRef.parse("digits:dirichlet=1e-3:part=0/2") == DatasetRef.parse("digits:dirichlet=0.001:part=0/2")
    with pytest.raises(UsageError, match="number > 0"):
        DatasetRef.from_mapping({"source": "digits", "dirichlet": 10 ** 400, "part": [0, 2]})
    with pytest.raises(UsageError, match="backwards"):
        DatasetRef.from_mapping({"source": "digits", "indices": [[5, 2]]})


@pytest.mark.parametrize("text, message", [
    ("digits:classes=0-3000000000", "the source has 10 classes"),
    ("digits:dirichlet=0.5:part=0/100000000000", "more parts than the 1433 samples"),
    ("digits:dirichlet=0.5:part=0/30000000", "more parts than the 1433 samples"),
    ("digits:classes=3:dirichlet=0.5:part=0/147", "more parts than the 146 samples"),
    ("digits:fold=0/99999999999999999999", "fold: expected an integer"),
])
def test_references_too_large_for_memory_are_usage_errors(text, message):
    """Found by a review: each exhausted memory (up to 745 GiB asked) or overflowed, exit 1.

    In a child limited to 2 GiB of address space, so that a regression fails here instead of
    taking the machine's memory."""
    def limit_memory() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    result = subprocess.run([sys.executable, "-m", "tapvits_cli", "dataset", text], capture_output=True, text=True,
                            preexec_fn=limit_memory, timeout=120)
    assert_one_line_failure(CliResult(result.returncode, result.stdout, result.stderr), ExitCode.USAGE)
    assert message in result.stderr


def test_reference_from_mapping():
    assert DatasetRef.from_mapping("digits:fold=0/2") == DatasetRef("digits", fold=(0, 2))
    ref = DatasetRef.from_mapping({"source": "digits", "classes": [5, 1], "fold": "1/2", "sample": 10, "seed": 2})
    assert ref == DatasetRef.parse("digits:classes=1,5:fold=1/2:sample=10:seed=2")
    assert DatasetRef.from_mapping({"source": "digits", "classes": "0-2", "fold": [0, 3]}).fold == (0, 3)
    with pytest.raises(UsageError, match=r"^devices\[0\]\.private\.foo: unknown key"):
        DatasetRef.from_mapping({"source": "digits", "foo": 1}, path="devices[0].private")
    with pytest.raises(UsageError, match=r"^devices\[0\]\.private\.fold: "):
        DatasetRef.from_mapping({"source": "digits", "fold": "3/2"}, path="devices[0].private")
    with pytest.raises(UsageError, match=r"^dataset\.source: required"):
        DatasetRef.from_mapping({"split": "train"})
    with pytest.raises(UsageError, match=r"^pool: dataset reference"):
        DatasetRef.from_mapping("digits:bad=1", path="pool")
    with pytest.raises(UsageError, match="sample"):
        DatasetRef.from_mapping({"source": "digits", "sample": True})


def test_unknown_sources(tmp_path):
    with pytest.raises(DataUnavailableError, match="neither a built-in"):
        open_dataset("fashion_mnist")
    (tmp_path / "pool.csv").write_text("1,2\n")
    with pytest.raises(UsageError, match="unsupported file type"):
        open_dataset(str(tmp_path / "pool.csv"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="unreadable"):
        open_dataset(str(tmp_path / "broken.npz"))


# --- built-in sources --------------------------------------------------------------------------

def test_digits_splits():
    train, test, full = (open_dataset(f"digits:split={s}") for s in ("train", "test", "all"))
    assert open_dataset("digits").ref.split == "train"
    assert len(train) + len(test) == len(full) == 1797
    assert train.image_shape == (1, 8, 8) and train.num_classes == 10 and train.class_names[3] == "3"
    test_counts = np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(test_counts - np.bincount(full.labels) / 5) <= 1)  # stratified 20%
    images = full.images(np.arange(len(full)))
    assert images.dtype == np.float32 and images.min() == 0.0 and images.max() == 1.0
    from sklearn.datasets import load_digits   # read from scikit-learn's file directly: the same data
    reference = load_digits()
    np.testing.assert_array_equal(images[:, 0], (reference.images / 16).astype(np.float32))
    np.testing.assert_array_equal(full.labels, reference.target)


@pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST files absent from {FASHION_DIR} "
                                            "(apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist():
    import gzip
    test = open_dataset("fashion-mnist:split=test")
    assert len(test) == 10_000 and test.image_shape == (1, 28, 28) and test.num_classes == 10
    assert test.class_names[0] == "T-shirt/top" and test.class_names[9] == "Ankle boot"
    assert np.all(np.bincount(test.labels) == 1000)
    with gzip.open(Path(FASHION_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    np.testing.assert_array_equal(test.images([7])[0, 0], raw[7] / np.float32(255))
    assert len(open_dataset("fashion-mnist:classes=9")) == 6000  # default split: train
    full = open_dataset("fashion-mnist:split=all:indices=60007")
    np.testing.assert_array_equal(full.images([0]), test.images([7]))  # all = train then test


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPVITS_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataUnavailableError, match="install it with: apt-get install -y dataset-fashion-mnist"):
        open_dataset("fashion-mnist")


# --- file sources ------------------------------------------------------------------------------

def test_npz_layouts(tmp_path):
    x, y = _pool()
    np.savez(tmp_path / "all.npz", x=x, y=y, class_names=np.array(["cat", "dog", "eel"]))
    data = open_dataset(str(tmp_path / "all.npz"))
    assert data.ref.split == "all" and len(data) == 60 and data.class_names == ("cat", "dog", "eel")
    np.testing.assert_array_equal(data.images([3, 1])[:, 0], x[[3, 1]] / np.float32(255))
    with pytest.raises(UsageError, match="no split 'train'"):
        open_dataset(f"{tmp_path / 'all.npz'}:split=train")

    rgb = np.random.default_rng(1).random((10, 6, 5, 3)).astype(np.float32)  # NHWC floats
    np.savez(tmp_path / "split.npz", x_train=rgb[:7], y_train=np.array([0, 1, 4, 0, 1, 4, 0]),
             x_test=rgb[7:], y_test=np.array([1, 1, 0]))
    train = open_dataset(str(tmp_path / "split.npz"))
    assert train.ref.split == "train" and train.image_shape == (3, 6, 5) and train.num_classes == 5
    np.testing.assert_array_equal(train.images([2])[0], rgb[2].transpose(2, 0, 1))
    both = open_dataset(f"{tmp_path / 'split.npz'}:split=all")
    assert len(both) == 10 and both.labels.tolist()[7:] == [1, 1, 0]
    np.testing.assert_array_equal(both.images([8])[0], rgb[8].transpose(2, 0, 1))

    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 5, 5, 5)), y=np.zeros(4, int))
    with pytest.raises(UsageError, match="shape"):
        open_dataset(str(tmp_path / "bad.npz"))


def test_hdf5_layouts(tmp_path):
    x, y = _pool(n=200)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["images"], f["labels"] = x[:, None], y  # NCHW
    with h5py.File(tmp_path / "groups.hdf5", "w") as f:
        f["train/images"], f["train/labels"] = x[:150], y[:150]
        f["test/images"], f["test/labels"] = x[150:], y[150:]
        f["class_names"] = ["a", "b", "c"]
    flat = open_dataset(str(tmp_path / "flat.h5"))
    assert flat.ref.split == "all" and flat.image_shape == (1, 8, 8) and flat.class_names == ("0", "1", "2")
    order = [190, 3, 4, 5, 120, 3]  # unsorted, repeated, sparse and dense reads
    np.testing.assert_array_equal(flat.images(order)[:, 0], x[order] / np.float32(255))
    groups = open_dataset(str(tmp_path / "groups.hdf5"))
    assert groups.ref.split == "train" and len(groups) == 150 and groups.class_names == ("a", "b", "c")
    test = open_dataset(f"{tmp_path / 'groups.hdf5'}:split=test")
    np.testing.assert_array_equal(test.images([0])[0, 0], x[150] / np.float32(255))
    both = open_dataset(f"{tmp_path / 'groups.hdf5'}:split=all")
    np.testing.assert_array_equal(both.images(order), flat.images(order))
    assert both.fingerprint() != flat.fingerprint()  # same pixels, but another source kind/split


def _write_folder(root: Path, mode: str, per_class: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    written = {}
    for name in ("bird", "ant"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (5, 4) if mode == "L" else (5, 4, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:02d}.png")
            written[f"{name}/{i:02d}"] = pixels
    (root / "ant" / "notes.txt").write_text("not an image")
    return written


def test_image_folder(tmp_path):
    written = _write_folder(tmp_path / "flat", "RGB")
    data = open_dataset(str(tmp_path / "flat"))
    assert data.ref.split == "all" and data.class_names == ("ant", "bird") and data.image_shape == (3, 5, 4)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(data.images([4])[0], written["bird/01"].transpose(2, 0, 1) / np.float32(255))

    _write_folder(tmp_path / "split" / "train", "L")
    grey = _write_folder(tmp_path / "split" / "test", "L", per_class=1)
    test = open_dataset(f"{tmp_path / 'split'}:split=test")
    assert test.image_shape == (1, 5, 4) and len(test) == 2
    np.testing.assert_array_equal(test.images([1])[0, 0], grey["bird/00"] / np.float32(255))
    assert len(open_dataset(str(tmp_path / "split"))) == 6  # default: train
    assert len(open_dataset(f"{tmp_path / 'split'}:split=all")) == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match="no images"):
        open_dataset(str(tmp_path / "empty"))


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width×height: PIL reads the size without decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


@contextmanager
def _fails_instead_of_hanging(seconds: int = 20):
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("width, height", [(9000, 9000), (10_000, 10_000), (15_000, 15_000)])
def test_image_folder_refuses_huge_images_wherever_they_sort(tmp_path, recwarn, first, width, height):
    """9000×9000 set every image's size (6 GiB for 21 images); 15000×15000 is a decompression bomb to
    PIL, which crashed (exit 1) as the first image; 10000×10000 made PIL print a warning."""
    _write_folder(tmp_path, "L")
    _png_claiming(tmp_path / "ant" / ("00-huge.png" if first else "zz-huge.png"), width, height)
    with pytest.raises(UsageError, match=f"huge.png: image of .*more than the limit of {MAX_IMAGE_PIXELS} pixels"):
        data = open_dataset(str(tmp_path))
        data.images(np.arange(len(data)))
    assert not [w for w in recwarn if "DecompressionBomb" in w.category.__name__]


def test_image_folder_size_limit_is_inclusive(tmp_path):
    _write_folder(tmp_path, "L")
    _png_claiming(tmp_path / "ant" / "00-largest.png", 4096, 4096)
    assert open_dataset(str(tmp_path)).image_shape == (1, 4096, 4096)


def test_image_folder_skips_what_is_not_a_regular_file(tmp_path):
    """A FIFO named like an image made `dataset` wait for a writer forever; it is skipped, like a
    directory named like an image and a broken link, as files of other types are."""
    _write_folder(tmp_path, "L")
    os.mkfifo(tmp_path / "ant" / "zz_fifo.png")
    (tmp_path / "bird" / "dir.png").mkdir()
    (tmp_path / "bird" / "broken.png").symlink_to(tmp_path / "missing.png")
    with _fails_instead_of_hanging():
        data = open_dataset(str(tmp_path))
        assert len(data) == 6 and len(data.fingerprint()) == 64


def test_image_folder_links(tmp_path):
    """Links are followed within the dataset folder, refused when they lead outside it."""
    _write_folder(tmp_path / "pool", "L")
    os.symlink("../bird/00.png", tmp_path / "pool" / "ant" / "05.png")
    inside = open_dataset(str(tmp_path / "pool"))
    assert len(inside) == 7
    np.testing.assert_array_equal(inside.images([3]), inside.images([4]))   # ant/05.png is bird/00.png

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("L", (5, 4)).save(outside / "x.png")
    (tmp_path / "pool" / "ant" / "06.png").symlink_to(outside / "x.png")
    with pytest.raises(UsageError, match="06.png: leads outside the dataset folder"):
        open_dataset(str(tmp_path / "pool"))
    (tmp_path / "pool" / "ant" / "06.png").unlink()
    (tmp_path / "pool" / "cat").symlink_to(outside)   # a class folder linked elsewhere
    with pytest.raises(UsageError, match="x.png: leads outside the dataset folder"):
        open_dataset(str(tmp_path / "pool"))


def test_an_image_that_changes_after_the_folder_was_listed_is_checked_again_when_read(tmp_path):
    """Listing and reading are minutes apart in a long run: an image replaced meanwhile by a FIFO made the read
    wait for a writer forever, and one replaced by a link out of the folder was read."""
    _write_folder(tmp_path / "pool", "L")
    data = open_dataset(str(tmp_path / "pool"))
    first = data.images([0])
    (tmp_path / "pool" / "ant" / "00.png").unlink()
    os.mkfifo(tmp_path / "pool" / "ant" / "00.png")
    with _fails_instead_of_hanging(), pytest.raises(UsageError, match="00.png: no longer a regular file"):
        data.images([0])
    (tmp_path / "pool" / "ant" / "00.png").unlink()
    outside = tmp_path / "elsewhere.png"
    Image.new("L", (5, 4), color=255).save(outside)
    (tmp_path / "pool" / "ant" / "00.png").symlink_to(outside)
    with pytest.raises(UsageError, match="00.png: leads outside the dataset folder"):
        data.images([0])
    (tmp_path / "pool" / "ant" / "00.png").unlink()
    os.symlink("../bird/00.png", tmp_path / "pool" / "ant" / "00.png")   # a link within the folder is still read
    np.testing.assert_array_equal(data.images([0]), data.images([data.labels.tolist().index(1)]))
    assert first.shape == data.images([0]).shape


# --- selection semantics ------------------------------------------------------------------------

def test_classes_fold_indices_sample():
    full = open_dataset("digits:split=all")
    some = open_dataset("digits:split=all:classes=1,7")
    assert set(some.labels) == {1, 7} and len(some) == np.isin(full.labels, [1, 7]).sum()
    halves = [open_dataset(f"digits:split=all:fold={k}/2") for k in (0, 1)]
    assert not set(halves[0].ids) & set(halves[1].ids)
    assert sorted([*halves[0].ids, *halves[1].ids]) == list(full.ids)
    counts = [np.bincount(h.labels, minlength=10) for h in halves]
    assert np.all(np.abs(counts[0] - counts[1]) <= 1)  # stratified
    # a sample's fold does not depend on which classes are kept
    assert set(open_dataset("digits:split=all:classes=1,7:fold=0/2").ids) <= set(halves[0].ids)
    assert not np.array_equal(open_dataset("digits:split=all:fold=0/2:seed=1").ids, halves[0].ids)

    picked = open_dataset("digits:split=all:fold=1/2:indices=0-4,10")
    np.testing.assert_array_equal(picked.ids, halves[1].ids[[0, 1, 2, 3, 4, 10]])
    sample = open_dataset("digits:split=all:fold=1/2:sample=50:seed=7")  # seed 7 for the fold as well
    half = open_dataset("digits:split=all:fold=1/2:seed=7")
    assert len(sample) == 50 and np.all(np.diff(sample.ids) > 0) and set(sample.ids) <= set(half.ids)
    np.testing.assert_array_equal(sample.ids, open_dataset("digits:split=all:fold=1/2:sample=50:seed=7").ids)
    assert not np.array_equal(sample.ids, open_dataset("digits:split=all:fold=1/2:sample=50:seed=8").ids)

    for text, message in [("digits:classes=10", "10 classes"), ("digits:classes=0,9-12", "10 classes"),
                          ("digits:indices=5000", "reaches position 5000"),
                          ("digits:classes=0:sample=1000", "more than")]:
        with pytest.raises(UsageError, match=message):
            open_dataset(text)


def test_dirichlet_parts():
    """Dirichlet devices: disjoint, covering, seeded, skewed by small alpha, independent of `classes`."""
    labels = open_dataset("digits:split=all").labels
    parts = [open_dataset(f"digits:split=all:dirichlet=0.5:part={k}/4").ids for k in range(4)]
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))              # disjoint, and they cover the split
    again = open_dataset("digits:split=all:dirichlet=0.5:part=1/4").ids
    np.testing.assert_array_equal(again, parts[1])
    other_seed = open_dataset("digits:split=all:dirichlet=0.5:part=1/4:seed=1").ids
    assert not np.array_equal(other_seed, parts[1])

    def skew(alpha: float) -> float:
        """Mean over parts of the largest class's share: 0.1 would be IID over 10 classes."""
        shares = []
        for k in range(5):
            part_labels = labels[open_dataset(f"digits:split=all:dirichlet={alpha}:part={k}/5").ids]
            shares.append(np.bincount(part_labels, minlength=10).max() / len(part_labels))
        return float(np.mean(shares))

    assert skew(0.1) > 0.4 and skew(100.0) < 0.2     # measured 0.46 and about 0.12
    # what a class contributes to a part does not depend on the other classes kept
    some = open_dataset("digits:split=all:classes=2,3:dirichlet=0.5:part=0/4").ids
    np.testing.assert_array_equal(some, parts[0][np.isin(labels[parts[0]], [2, 3])])
    # the draw: per class, Dirichlet shares cut the seeded order into runs
    shares = np.random.default_rng([0, 5]).dirichlet([0.5] * 4, 10)
    for c in range(10):
        counts = [int((labels[p] == c).sum()) for p in parts]
        cuts = np.floor(np.cumsum(shares[c])[:-1] * (labels == c).sum()).astype(int)
        np.testing.assert_array_equal(np.diff([0, *cuts, (labels == c).sum()]), counts)
    halves = [open_dataset(f"digits:split=all:dirichlet=0.5:part=1/4:fold={k}/2").ids for k in range(2)]
    np.testing.assert_array_equal(np.sort(np.concatenate(halves)), parts[1])
    # as many parts as samples (the most allowed): as drawn, in memory linear in the samples
    shares = np.random.default_rng([0, 5]).dirichlet([0.5] * len(labels), 10)
    assignment = dirichlet_assignment(labels, np.arange(len(labels)), 10, 0.5, len(labels), 0)
    for c in range(10):
        cuts = np.floor(np.cumsum(shares[c])[:-1] * (labels == c).sum()).astype(int)
        np.testing.assert_array_equal(np.bincount(assignment[labels == c], minlength=len(labels)),
                                      np.diff([0, *cuts, (labels == c).sum()]))


def test_positions_of():
    data = open_dataset("digits:fold=1/3")
    np.testing.assert_array_equal(data.positions_of(data.ids[[5, 2]]), [5, 2])
    missing = np.setdiff1d(np.arange(1433), data.ids)[0]
    with pytest.raises(ValueError, match="not in dataset"):
        data.positions_of([missing])


def test_fingerprint(tmp_path):
    x, y = _pool()
    np.savez(tmp_path / "pool.npz", x=x, y=y)
    data = open_dataset(f"{tmp_path / 'pool.npz'}:fold=0/2")
    fingerprint = data.fingerprint()
    assert len(fingerprint) == 64 and data.fingerprint() == fingerprint
    assert open_dataset(f"{tmp_path / 'pool.npz'}:fold=0/2").fingerprint() == fingerprint
    assert open_dataset(f"{tmp_path / 'pool.npz'}:fold=1/2").fingerprint() != fingerprint
    shutil.copy(tmp_path / "pool.npz", tmp_path / "moved.npz")  # paths are not content
    assert open_dataset(f"{tmp_path / 'moved.npz'}:fold=0/2").fingerprint() == fingerprint
    x[data.ids[3], 2, 2] ^= 1
    np.savez(tmp_path / "pool.npz", x=x, y=y)
    assert open_dataset(f"{tmp_path / 'pool.npz'}:fold=0/2").fingerprint() != fingerprint
    x[data.ids[3], 2, 2] ^= 1
    y[data.ids[0]] = (y[data.ids[0]] + 1) % 3
    np.savez(tmp_path / "pool.npz", x=x, y=y)
    assert open_dataset(f"{tmp_path / 'pool.npz'}:fold=0/2").fingerprint() != fingerprint
    provenance = data.provenance()
    assert provenance == {"reference": f"{tmp_path / 'pool.npz'}:split=all:fold=0/2", "samples": 30,
                          "fingerprint": fingerprint, "image_shape": [1, 8, 8], "num_classes": 3}


# --- preprocessing --------------------------------------------------------------------------------

def test_preprocessing_values():
    import torch
    from tapvits_cli.data.preprocess import Preprocessing

    grey = torch.rand(2, 1, 8, 8)
    to_rgb = Preprocessing((3, 8, 8), (0.5, 0.25, 0.0), (0.5, 0.5, 1.0))
    out = to_rgb(grey)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[:, 0], (grey[:, 0] - 0.5) / 0.5)
    torch.testing.assert_close(out[:, 2], grey[:, 0])

    rgb = torch.zeros(1, 3, 4, 4)
    rgb[:, 0] = 1.0
    to_grey = Preprocessing((1, 4, 4), (0.0,), (1.0,))
    torch.testing.assert_close(to_grey(rgb), torch.full((1, 1, 4, 4), 0.299))

    for interpolation in ("bilinear", "bicubic", "nearest"):
        resize = Preprocessing((1, 16, 12), (0.0,), (1.0,), interpolation)
        assert resize(grey).shape == (2, 1, 16, 12)
        small = Preprocessing((1, 4, 4), (0.0,), (1.0,), interpolation)(grey)
        assert small.shape == (2, 1, 4, 4) and small.min() >= 0 and small.max() <= 1
    constant = Preprocessing((1, 3, 5), (0.0,), (1.0,), "bicubic")(torch.full((1, 1, 8, 8), 0.25))
    torch.testing.assert_close(constant, torch.full((1, 1, 3, 5), 0.25))

    assert Preprocessing.from_dict({**to_rgb.to_dict(), "future_key": 1}) == to_rgb
    with pytest.raises(ValueError):
        Preprocessing((3, 8, 8), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="channels"):
        to_grey(torch.rand(1, 2, 4, 4))


def test_preprocessing_from_model():
    import timm
    import torch
    from tapvits_cli.data.preprocess import Preprocessing

    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10,
                            embed_dim=16, depth=1, num_heads=2)
    assert vit.pretrained_cfg["input_size"] == (3, 224, 224)  # timm keeps the architecture's cfg
    prep = Preprocessing.from_model(vit)
    assert prep.input_size == (1, 28, 28) and prep.mean == (0.5,) and prep.interpolation == "bicubic"
    colour = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3, embed_dim=16,
                               depth=1, num_heads=2)
    assert Preprocessing.from_model(colour).input_size == (3, 32, 32)

    data = open_dataset("digits:split=test")
    assert vit(prep(torch.from_numpy(data.images([0, 1])))).shape == (2, 10)


def test_batches_and_torch_dataset():
    import torch
    from tapvits_cli.data.preprocess import Preprocessing, TorchImageDataset, iterate_batches

    data = open_dataset("digits:split=test:classes=0-2")
    prep = Preprocessing((3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    batches = list(iterate_batches(data, prep, batch_size=32, positions=np.arange(40)))
    assert [len(ids) for ids, _, _ in batches] == [32, 8]
    ids, images, labels = batches[1]
    np.testing.assert_array_equal(ids, data.ids[32:40])
    assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64
    assert labels.tolist() == data.labels[32:40].tolist()

    torch_data = TorchImageDataset(data, prep, positions=[3, 1, 4])
    image, label = torch_data[1]
    assert image.shape == (3, 16, 16) and label == int(data.labels[1])
    loader = torch.utils.data.DataLoader(torch_data, batch_size=2)
    first_images, first_labels = next(iter(loader))
    torch.testing.assert_close(first_images[1], image)
    assert first_labels.tolist() == data.labels[[3, 1]].tolist()


@pytest.mark.parametrize("borrow", ["external link", "external storage", "virtual dataset"])
def test_an_hdf5_dataset_that_borrows_its_images_from_another_file_is_refused(tmp_path, borrow):
    x, y = _pool(n=40)
    with h5py.File(tmp_path / "real.h5", "w") as f:
        f["images"], f["labels"] = x[:, None], y
    x[:, None].astype(x.dtype).tofile(tmp_path / "raw.bin")
    with h5py.File(tmp_path / "borrow.h5", "w") as f:
        f["labels"] = y
        if borrow == "external link":
            f["images"] = h5py.ExternalLink("real.h5", "/images")
        elif borrow == "external storage":
            f.create_dataset("images", shape=(40, 1, 8, 8), dtype=x.dtype,
                             external=[(str(tmp_path / "raw.bin"), 0, x.nbytes)])
        else:
            layout = h5py.VirtualLayout(shape=(40, 1, 8, 8), dtype=x.dtype)
            layout[:] = h5py.VirtualSource(str(tmp_path / "real.h5"), "/images", shape=(40, 1, 8, 8))
            f.create_virtual_dataset("images", layout)
    with h5py.File(tmp_path / "borrow.h5", "r") as f:   # h5py itself reads the borrowed images
        np.testing.assert_array_equal(f["images"][:, 0], x)
    with pytest.raises(UsageError, match=f"{borrow}|data in another file|data is in other files"):
        open_dataset(str(tmp_path / "borrow.h5"))
