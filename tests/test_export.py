"""``tapvits export``: ONNX files that onnxruntime runs to PyTorch's outputs, pruned widths included."""

from __future__ import annotations

import builtins
import copy
import json

import numpy as np
import pytest
import torch

from conftest import TINY_VIT, TINY_VIT_KWARGS
from tapvits_cli.errors import ExitCode

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

# (heads, head_dim, mlp_hidden) per block; the tiny ViT has (3, 8, 48). 0 is a branch `prune` removed whole.
NARROW_WIDTHS = ((2, 8, 30), (1, 8, 5))
BRANCHLESS_WIDTHS = ((0, 8, 30), (2, 8, 0))


def write_narrowed_model(path, widths):
    """A tiny ViT with fewer heads and MLP neurons per block, as `prune` leaves it."""
    from tapvits_cli.artifacts.model import write_model
    from tapvits_cli.models.factory import create_model, describe_model
    from tapvits_cli.models.families.vit import set_block_widths
    from tapvits_cli.models.spec import BlockWidths

    torch.manual_seed(1)
    model = create_model(TINY_VIT, TINY_VIT_KWARGS)
    set_block_widths(model, [BlockWidths(*w) for w in widths])
    write_model(path, model, describe_model(model, TINY_VIT, TINY_VIT_KWARGS), params={"seed": 1})
    return path


@pytest.fixture
def narrow_model_file(tmp_path):
    return write_narrowed_model(tmp_path / "narrow.safetensors", NARROW_WIDTHS)


def onnx_matches_pytorch(model_file, onnx_file, batch_sizes):
    """Largest |onnxruntime - PyTorch| over fresh random batches (not the exporter's own check batches)."""
    from tapvits_cli.artifacts.model import load_model

    loaded = load_model(model_file)
    model, spec = loaded.module, loaded.spec
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(123)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, *spec.preprocessing["input_size"], generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        actual = session.run(["logits"], {"images": images.numpy()})[0]
        assert actual.shape == expected.shape == (batch, TINY_VIT_KWARGS["num_classes"])
        worst = max(worst, float(np.abs(actual - expected).max()))
    return worst


@pytest.mark.parametrize("widths", [None, NARROW_WIDTHS, BRANCHLESS_WIDTHS], ids=["unpruned", "narrow", "branchless"])
def test_export_matches_pytorch_at_batch_1_and_3(widths, tapvits, tmp_path, tiny_model_file):
    model_file = tiny_model_file if widths is None else write_narrowed_model(tmp_path / "pruned.safetensors", widths)
    out = tmp_path / "model.onnx"
    result = tapvits("export", model_file, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["output"] == str(out) and report["checked_batch_sizes"] == [1, 3]
    assert 0 <= report["max_abs_diff"] <= 1e-4
    assert report["input_shape"] == ["batch", 1, 8, 8]
    assert onnx_matches_pytorch(model_file, out, (1, 3)) <= 1e-4
    assert not list(tmp_path.glob(".*.partial"))


def test_metadata_props_carry_the_source_model(tapvits, tmp_path, narrow_model_file):
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.model import read_model_spec

    out = tmp_path / "narrow.onnx"
    assert tapvits("export", narrow_model_file, "-o", out, "--no-check", "--opset", "18").exit_code == 0
    graph = onnx.load(str(out))
    props = {p.key: p.value for p in graph.metadata_props}
    artifact = read_model_spec(narrow_model_file).artifact
    assert props["tapvits.export"] == "onnx" and props["tapvits.export_version"] == "1"
    assert "tapvits.kind" not in props   # an export is not an artifact
    assert json.loads(props["tapvits.inputs"]) == {
        "model": {"sha256": sha256_file(narrow_model_file), "kind": "model", "name": "narrow.safetensors"}}
    assert json.loads(props["tapvits.params"])["opset"] == 18
    assert props["model.weights_sha256"] == artifact.metadata["model.weights_sha256"]
    assert props["model.architecture"] == TINY_VIT
    blocks = [{"heads": h, "head_dim": d, "mlp_hidden": m} for h, d, m in NARROW_WIDTHS]
    assert json.loads(props["model.blocks"]) == blocks
    assert {op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")} == {18}
    assert tapvits("validate", out).exit_code == 3   # an export, not an artifact


def test_static_batch_fixes_the_batch_axis(tapvits, tmp_path, tiny_model_file):
    out = tmp_path / "static.onnx"
    result = tapvits("export", tiny_model_file, "-o", out, "--static-batch", "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["checked_batch_sizes"] == [2]
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 1, 8, 8]
    assert tapvits("export", tiny_model_file, "-o", out, "--opset", "13").exit_code == 2   # before fused attention


def test_failed_check_writes_nothing_and_exits_1(tapvits, tmp_path, tiny_model_file, monkeypatch):
    from tapvits_cli.models import onnx_export

    real_export = onnx_export.export_onnx

    def miscompiled(model, *args, **kwargs):   # a graph whose logits are off by one, as a broken exporter's would be
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.head.bias += 1.0
        return real_export(twin, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", miscompiled)
    out = tmp_path / "bad.onnx"
    result = tapvits("export", tiny_model_file, "-o", out)
    assert result.exit_code == 1
    assert "differs from PyTorch by 1" in result.stderr and "--no-check" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))


def test_missing_onnx_names_the_extra(tapvits, tmp_path, tiny_model_file, monkeypatch):
    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    result = tapvits("export", tiny_model_file, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 8
    assert 'pip install "tapvits[onnx]"' in result.stderr and "onnxruntime" in result.stderr


@pytest.mark.parametrize("raw_input", ["2,8,8", "1,100000,100000", "1,99999999999999999999,8", "1, 8,8", "1,8", "0,8,8"])
def test_raw_input_out_of_range_is_a_usage_error(tapvits, tmp_path, tiny_model_file, raw_input):
    out = tmp_path / "e.onnx"
    refused = tapvits("export", tiny_model_file, "--features", "--raw-input", raw_input, "-o", out)
    assert refused.exit_code == ExitCode.USAGE and "--raw-input" in refused.stderr and not out.exists()
