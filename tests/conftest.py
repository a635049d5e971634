"""Shared fixtures: a tiny ViT and an in-process CLI runner.

Tests run in parallel (pytest -n 2 on 2 cores), so each worker uses one torch thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

torch.set_num_threads(1)

# A DeiT-shaped ViT small enough to build and run in milliseconds, on digits' 8x8 images.
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {
    "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10,
    "embed_dim": 24, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0,
}


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: the long property-based fuzz run of test_corpus.py (run with -m fuzz)")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def tapvits(capsys):
    """Run ``tapvits ARGS`` in-process through the real entry point (exit-code mapping included)."""
    from tapvits_cli.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def model_args(kwargs: dict) -> list[str]:
    args = []
    for key, value in kwargs.items():
        args += ["-a", f"{key}={value}"]
    return args


@pytest.fixture
def tiny_model_file(tmp_path, tapvits):
    path = tmp_path / "tiny.safetensors"
    result = tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


@pytest.fixture
def metric_set_file(tmp_path):
    """A metric set over digits' train split: its first 96 ids (metric set) of 160 (fine-tuning set)."""
    import numpy as np

    from tapvits_cli.artifacts.metric_set import write_metric_set
    from tapvits_cli.data import open_dataset
    from tapvits_cli.selection import Selection

    pool = open_dataset("digits")
    positions = np.arange(0, 320, 2, dtype=np.int64)
    selection = Selection(positions=positions, log_likelihood=-np.arange(len(positions), dtype=np.float64),
                          component=np.zeros(len(positions), dtype=np.int32),
                          columns={"ids": pool.ids[positions], "labels": pool.labels[positions]},
                          metric_size=96, finetune_size=len(positions), strategy="topk")
    path = tmp_path / "metric.h5"
    write_metric_set(path, selection, pool.provenance(), "0" * 64, "1" * 64, params={"seed": 0})
    return path


@pytest.fixture
def scores_file(tiny_model_file, metric_set_file, tmp_path, tapvits):
    """Composite scores of the tiny model on the first 32 samples of ``metric_set_file``."""
    out = tmp_path / "scores.safetensors"
    assert tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--max-samples", "32",
                   "-o", out).exit_code == 0
    return out
