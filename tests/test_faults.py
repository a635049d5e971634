"""Faults must not spread: corrupted inputs are caught where they are consumed, and a full or
read-only disk is one line with exit code 9 that leaves nothing a later stage would trust."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from tapvits_cli.errors import ExitCode


@contextlib.contextmanager
def small_mount(path: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` at ``path`` (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): needs root in a "
                    "namespace that allows mounts")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def flip_last_tensor_bit(path: Path, offset_from_end: int = 20) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01   # a low bit of one stored number: structure intact, content wrong
    path.write_bytes(bytes(data))


def test_a_full_disk_stops_features_before_any_work(tmp_path, tapvits, tiny_model_file):
    with small_mount(tmp_path / "small", "64k") as small:
        result = tapvits("features", "--data", "digits", "--extractor", tiny_model_file, "-o", small / "pool.h5")
        assert result.exit_code == ExitCode.ENVIRONMENT
        assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr
        assert list(small.iterdir()) == []   # no partial file for a resume to trust


def test_a_read_only_directory_is_an_environment_error(tmp_path, tapvits, tiny_model_file):
    with small_mount(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = tapvits("fit-gmm", "-q", "--data", "digits:classes=0,1", "--extractor", tiny_model_file, "--covariance",
                         "diag", "-o", read_only / "g.safetensors")
        assert result.exit_code == ExitCode.ENVIRONMENT and "Read-only file system" in result.stderr
        assert result.stderr.count("\n") == 1


def test_a_bit_flipped_model_is_refused_by_every_consumer(tmp_path, tapvits, tiny_model_file, metric_set_file):
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(tiny_model_file.read_bytes())
    flip_last_tensor_bit(flipped)
    consumers = {
        "eval": ("eval", flipped, "--data", "digits:sample=20", "--no-latency", "-o", tmp_path / "r.json"),
        "prune": None,  # needs a plan; covered through finetune and export below
        "finetune": ("finetune", flipped, "--data", "digits:sample=20", "--epochs", "1", "-o", tmp_path / "m.safetensors"),
        "export": ("export", flipped, "-o", tmp_path / "m.onnx"),
        "features": ("features", "--data", "digits:sample=20", "--extractor", flipped, "-o", tmp_path / "p.h5"),
    }
    for name, args in consumers.items():
        if args is None:
            continue
        result = tapvits(*args)
        assert result.exit_code == ExitCode.INVALID_ARTIFACT, (name, result.stderr)
        assert "do not match model.weights_sha256" in result.stderr, name
    assert not any(p.name in {"r.json", "m.safetensors", "m.onnx", "p.h5"} for p in tmp_path.iterdir())


def test_corrupted_feature_rows_are_caught_by_select(tmp_path, tapvits, tiny_model_file):
    pool = tmp_path / "pool.h5"
    assert tapvits("features", "--data", "digits", "--extractor", tiny_model_file, "-o", pool).exit_code == 0
    gmm = tmp_path / "g.safetensors"
    fitted = tapvits("fit-gmm", "--data", "digits:split=test:classes=0,1", "--extractor", tiny_model_file, "--covariance",
                     "diag", "--min-samples", "40", "-o", gmm)
    assert fitted.exit_code == 0, fitted.stderr
    with h5py.File(pool, "r+") as handle:
        handle["features/features"][100, 3] += 1.0   # plausible, finite, wrong
    result = tapvits("select", gmm, "--pool", pool, "--metric-size", "16", "--finetune-size", "32",
                     "-o", tmp_path / "m.h5")
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "features.features_sha256" in result.stderr
    assert not (tmp_path / "m.h5").exists()
    assert tapvits("validate", pool).exit_code == ExitCode.INVALID_ARTIFACT


def test_a_damaged_partial_table_is_not_resumed(tmp_path, tapvits, tiny_model_file, monkeypatch):
    from tapvits_cli.artifacts import features as features_artifact

    pool = tmp_path / "pool.h5"
    original = features_artifact.FeatureTableWriter.write_batches

    def stop_after_two(self, batches, on_progress=None):
        def two():
            for index, batch in enumerate(batches):
                if index == 2:
                    raise KeyboardInterrupt
                yield batch
        return original(self, two(), on_progress)

    monkeypatch.setattr(features_artifact.FeatureTableWriter, "write_batches", stop_after_two)
    interrupted = tapvits("features", "--data", "digits", "--extractor", tiny_model_file, "--batch-size", "100", "-o", pool)
    assert interrupted.exit_code == ExitCode.INTERRUPTED
    monkeypatch.setattr(features_artifact.FeatureTableWriter, "write_batches", original)
    partial = features_artifact.partial_path(pool)
    with h5py.File(partial, "r+") as handle:
        assert handle.attrs["features.rows_done"] == "200"
        handle["features/features"][150] = np.zeros(handle["features/features"].shape[1])  # a lost write
    refused = tapvits("features", "--data", "digits", "--extractor", tiny_model_file, "--batch-size", "100", "-o", pool)
    assert refused.exit_code == ExitCode.INVALID_ARTIFACT and "--restart" in refused.stderr
    assert not pool.exists()
    redone = tapvits("features", "--data", "digits", "--extractor", tiny_model_file, "--batch-size", "100", "--restart", "-o", pool)
    assert redone.exit_code == 0 and tapvits("validate", pool).exit_code == 0


def _run_with_one_cached_model(tmp_path):
    """A run directory whose stage cache holds one entry, ``k1``: model.safetensors, which took 2.5 s."""
    from tapvits_cli.artifacts.run_directory import RunDirectory

    run = RunDirectory(tmp_path / "run", cache=tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    run.path("model.safetensors").parent.mkdir(parents=True, exist_ok=True)
    run.path("model.safetensors").write_bytes(b"weights" * 100)
    run.store_in_cache("k1", "model.safetensors", 2.5)
    return run


def test_a_damaged_cache_entry_is_discarded(tmp_path):
    run = _run_with_one_cached_model(tmp_path)
    run.path("model.safetensors").unlink()
    assert run.restore_from_cache("k1", "model.safetensors") == 2.5
    assert run.path("model.safetensors").read_bytes() == b"weights" * 100
    cached = tmp_path / "cache" / "k1.safetensors"
    flip_last_tensor_bit(cached)
    run.path("model.safetensors").unlink()
    assert run.restore_from_cache("k1", "model.safetensors") is None
    assert not cached.exists() and not (tmp_path / "cache" / "k1.record.json").exists()
    assert not run.path("model.safetensors").exists()
    # an entry of the first cache layout (no hash record) is not trusted: deleted, and the step runs again
    (tmp_path / "cache" / "k2.safetensors").write_bytes(b"old entry")
    (tmp_path / "cache" / "k2.json").write_text('{"seconds": 7.0, "output": "model.safetensors"}')
    assert run.restore_from_cache("k2", "model.safetensors") is None
    assert not (tmp_path / "cache" / "k2.safetensors").exists() and not run.path("model.safetensors").exists()
    assert not (tmp_path / "cache" / "k2.json").exists()   # its record goes with it, no litter


def test_a_link_in_the_cache_or_run_directory_is_not_trusted(tmp_path):
    """A link names a file that may change between the hash check and the copy: the entry is damaged."""
    run = _run_with_one_cached_model(tmp_path)
    elsewhere = tmp_path / "elsewhere.safetensors"
    cached = tmp_path / "cache" / "k1.safetensors"
    cached.rename(elsewhere)
    cached.symlink_to(elsewhere)                      # same bytes, same hash, but a link
    run.path("model.safetensors").unlink()
    assert run.restore_from_cache("k1", "model.safetensors") is None
    assert not cached.is_symlink() and elsewhere.exists()          # the link is removed, never what it names
    assert not run.path("model.safetensors").exists()
    run.path("model.safetensors").write_bytes(b"weights" * 100)
    run.record("s1", "model.safetensors", "k1", 1.0, "ran")
    assert run.finished("s1", "model.safetensors", "k1")
    run.path("model.safetensors").rename(tmp_path / "moved.safetensors")
    run.path("model.safetensors").symlink_to(tmp_path / "moved.safetensors")
    assert not run.finished("s1", "model.safetensors", "k1")


def test_an_hdf5_file_is_probed_again_only_when_it_changed(tmp_path, monkeypatch):
    """The crash probe forks once per unchanged file: a replaced file (new inode) or one rewritten in place
    (new size or times) is probed again, and the descriptors kept are bounded."""
    import os

    from tapvits_cli.artifacts import containers

    def write(path: Path, rows: int) -> None:
        with h5py.File(path, "w") as handle:
            handle.attrs["kind"] = "test"
            handle["x"] = np.arange(rows)

    forks, real_fork = [], os.fork

    def counting_fork():
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counting_fork)
    monkeypatch.setattr(containers, "_SURVIVED", {})
    monkeypatch.setattr(containers, "_SURVIVED_LIMIT", 2)
    path = tmp_path / "table.h5"
    write(path, 3)
    containers._probe_hdf5(path)
    containers._probe_hdf5(path)
    assert len(forks) == 1
    write(tmp_path / "next.h5", 3)
    os.replace(tmp_path / "next.h5", path)        # same size, another file
    containers._probe_hdf5(path)
    assert len(forks) == 2
    with open(path, "ab") as handle:               # rewritten in place
        handle.write(b"\0" * 16)
    containers._probe_hdf5(path)
    assert len(forks) == 3
    for name in ("a.h5", "b.h5", "c.h5"):
        write(tmp_path / name, 4)
        containers._probe_hdf5(tmp_path / name)
    assert len(containers._SURVIVED) == 2
    for handle, _ in containers._SURVIVED.values():
        os.close(handle)
