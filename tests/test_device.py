"""The device side without torch: an ONNX features graph, fit-gmm, audit-gmm and profile on onnxruntime.

The no-torch runs happen in a subprocess whose import system refuses torch, timm and
torchvision, as on a device that installed only the base package.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tapvits_cli.errors import ExitCode
from tests.test_protocol_examples import assert_one_line_failure

# Runs `tapvits ARGS` in a process where importing torch, timm or torchvision fails.
NO_TORCH = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
from tapvits_cli.cli.main import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("torch", "timm") for m in sys.modules), "torch was imported"
sys.exit(code)
"""


def tapvits_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True, timeout=600)


def torch_features(extractor, dataset) -> np.ndarray:
    from tapvits_cli.models.extract import extract_features

    return np.concatenate([f for _, f, _ in extract_features(extractor, dataset, 64)])


def onnx_features(path, dataset) -> np.ndarray:
    from tapvits_cli.artifacts.external import load_onnx_extractor

    return np.concatenate([f for _, f, _ in load_onnx_extractor(path).iterate(dataset, 64)])


@pytest.fixture
def onnx_extractor_file(tmp_path, tapvits, tiny_model_file):
    path = tmp_path / "extractor.onnx"
    result = tapvits("export", tiny_model_file, "--features", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


def test_onnx_features_match_the_torch_extractor_on_digits(onnx_extractor_file, tiny_model_file):
    from tapvits_cli.artifacts.external import load_onnx_extractor
    from tapvits_cli.artifacts.model import load_extractor
    from tapvits_cli.data import open_dataset

    dataset = open_dataset("digits:classes=0-4:sample=150")
    torch_extractor = load_extractor(tiny_model_file)
    onnx_extractor = load_onnx_extractor(onnx_extractor_file)
    assert onnx_extractor.fingerprint == torch_extractor.fingerprint and onnx_extractor.raw_input == (1, 8, 8)
    np.testing.assert_allclose(onnx_features(onnx_extractor_file, dataset), torch_features(torch_extractor, dataset),
                               atol=1e-4, rtol=0)


def test_fashion_mnist_through_efficientnet_lite0_at_224(tmp_path, tapvits):
    from tapvits_cli.stages.extractor import resolve_extractor
    from tapvits_cli.data import open_dataset

    path = tmp_path / "lite0.onnx"
    result = tapvits("export", "efficientnet-lite0", "--features", "--raw-input", "1,28,28", "-o", path)
    assert result.exit_code == 0, result.stderr
    dataset = open_dataset("fashion-mnist:split=test:classes=0,1:sample=12")
    torch_extractor, _ = resolve_extractor("efficientnet-lite0", "cpu")
    assert torch_extractor.preprocessing.input_size == (3, 224, 224)
    np.testing.assert_allclose(onnx_features(path, dataset), torch_features(torch_extractor, dataset),
                               atol=1e-4, rtol=0)


def test_fit_gmm_without_torch_gives_the_torch_paths_gmm(tmp_path, tapvits, tiny_model_file, onnx_extractor_file):
    from tapvits_cli.artifacts.gmm import read_gmm

    private = "digits:classes=0,1"
    onnx_gmm, torch_gmm = tmp_path / "onnx.gmm.safetensors", tmp_path / "torch.gmm.safetensors"
    device = tapvits_without_torch("fit-gmm", "--data", private, "--extractor", onnx_extractor_file, "--covariance", "diag",
                                   "-o", onnx_gmm)
    assert device.returncode == 0, device.stderr
    assert tapvits("fit-gmm", "--data", private, "--extractor", tiny_model_file, "--covariance", "diag",
                   "-o", torch_gmm).exit_code == 0
    a, b = read_gmm(onnx_gmm), read_gmm(torch_gmm)
    assert a.info.extractor_sha256 == b.info.extractor_sha256 and a.mixture.components == b.mixture.components
    np.testing.assert_allclose(a.mixture.means, b.mixture.means, atol=1e-3)
    assert a.artifact.header.inputs["extractor"].kind == "file"
    audit = tapvits_without_torch("audit-gmm", onnx_gmm, "--private", private, "--extractor", onnx_extractor_file,
                                  "--held-out", "digits:split=test:classes=0,1", "-q")
    assert audit.returncode == 0, audit.stderr
    assert tapvits_without_torch("validate", onnx_gmm).returncode == 0


def test_features_and_select_take_the_onnx_graph_as_extractor(tmp_path, tapvits, tiny_model_file, onnx_extractor_file):
    """``--extractor`` names a model or its exported graph in every command that embeds images."""
    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.artifacts.metric_set import read_metric_set

    tables = {}
    for name, extractor in (("onnx", onnx_extractor_file), ("torch", tiny_model_file)):
        tables[name] = tmp_path / f"{name}.h5"
        made = tapvits("features", "--data", "digits:split=test", "--extractor", extractor, "-o", tables[name])
        assert made.exit_code == 0, made.stderr
    with open_feature_table(tables["onnx"]) as onnx_table, open_feature_table(tables["torch"]) as torch_table:
        assert onnx_table.extractor_sha256 == torch_table.extractor_sha256
        np.testing.assert_allclose(np.concatenate([f for _, f, _ in onnx_table.iter_chunks(1000)]),
                                   np.concatenate([f for _, f, _ in torch_table.iter_chunks(1000)]), atol=1e-4)
    gmm = tmp_path / "gmm.safetensors"
    assert tapvits("fit-gmm", "--data", "digits:classes=0,1", "--extractor", onnx_extractor_file, "--covariance", "diag",
                   "-o", gmm).exit_code == 0
    metric = tmp_path / "metric.h5"
    chosen = tapvits("select", gmm, "--pool", "digits:split=test", "--extractor", onnx_extractor_file,
                     "--strategy", "ratio", "--metric-size", "20", "--finetune-size", "40", "-o", metric)
    assert chosen.exit_code == 0, chosen.stderr
    assert len(read_metric_set(metric).finetune_ids) == 40 and tapvits("validate", metric).exit_code == 0


def _hostile_graph(genuine, path, case: str):
    """A small linear features graph (8×8 images → 24 features) carrying ``genuine``'s metadata, broken as ``case`` says."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    metadata = {prop.key: prop.value for prop in onnx.load(str(genuine)).metadata_props}
    image_type, image_shape, out_type, flat = TensorProto.FLOAT, ["N", 1, 8, 8], TensorProto.FLOAT, [-1, 64]
    if case == "input-name":
        image_name = "x"
    else:
        image_name = "images"
    if case == "input-shape":
        image_shape = ["N", 3, 8, 8]
        flat = [-1, 192]
    if case == "input-double":
        image_type = TensorProto.DOUBLE
    if case == "output-int":
        out_type = TensorProto.INT64
    if case == "fails-at-run":
        flat = [-1, 63]   # declares the right shapes; a batch of n images (64 n values) reshapes only when 63 | n
    weights = np.random.default_rng(0).normal(size=(flat[1], 24)).astype(np.float32) * (case != "constant")
    nodes = [helper.make_node("Cast", [image_name], ["as_float"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["as_float", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["product"]),
             helper.make_node("Cast", ["product"], ["features"], to=out_type)]
    graph = helper.make_graph(nodes, case, [helper.make_tensor_value_info(image_name, image_type, image_shape)],
                              [helper.make_tensor_value_info("features", out_type, ["N", 24])],
                              initializer=[numpy_helper.from_array(weights, "W"),
                                           numpy_helper.from_array(np.array(flat, np.int64), "flat_shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fingerprint = json.loads(metadata["tapvits.extractor"])
    if case.startswith("raw-input="):
        metadata["tapvits.raw_input"] = case.split("=", 1)[1]
    if case.startswith("feature-dim="):
        metadata["tapvits.extractor"] = json.dumps({**fingerprint, "feature_dim": json.loads(case.split("=", 1)[1])})
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("input-name", "must take one float input 'images' of shape (batch, 1, 8, 8); it takes x"),
    ("input-shape", "must take one float input 'images'"),
    ("input-double", "must take one float input 'images'"),
    ("output-int", "must give a float output 'features' of shape (batch, 24)"),
    ("raw-input=[1.5, 8, 8]", "must be three integers"),
    ("raw-input=[true, 8, 8]", "must be three integers"),
    ('raw-input="188"', "must be three integers"),
    ("raw-input=[1, 1e400, 8]", "must hold the extractor fingerprint and the (C, H, W) input"),
    ("feature-dim=-24", "feature_dim an integer"),
    ("feature-dim=true", "feature_dim an integer"),
    ("fails-at-run", "the graph failed on a batch of images"),
])
def test_a_graph_that_breaks_its_own_metadata_is_an_invalid_artifact(tmp_path, tapvits, onnx_extractor_file,
                                                                     case, message):
    """What a graph's metadata promises is checked against the graph before an image goes in; a run-time
    failure inside onnxruntime is the graph's fault too: exit 3, one line, no output."""
    graph = _hostile_graph(onnx_extractor_file, tmp_path / "hostile.onnx", case)
    out = tmp_path / "gmm.safetensors"
    refused = tapvits("fit-gmm", "--data", "digits:classes=0,1", "--extractor", graph, "-o", out)
    assert_one_line_failure(refused, ExitCode.INVALID_ARTIFACT)
    assert message in refused.stderr and not out.exists()


def test_features_without_spread_are_refused_in_one_line(tmp_path, tapvits, onnx_extractor_file):
    """An extractor that maps every image to the same point leaves nothing to fit (PCA's 0/0 warning stays quiet)."""
    import warnings

    graph = _hostile_graph(onnx_extractor_file, tmp_path / "constant.onnx", "constant")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a warning printed on stderr would be a second line
        refused = tapvits("fit-gmm", "--data", "digits:classes=0,1", "--extractor", graph, "--covariance", "diag",
                          "-o", tmp_path / "g.safetensors")
    assert_one_line_failure(refused, ExitCode.USAGE)
    assert "same features" in refused.stderr


def test_a_static_batch_features_graph_is_refused_with_advice(tmp_path, tapvits, tiny_model_file):
    """A fixed batch fits only batches of that size: refused when loaded, not at the first odd batch (exit 3)."""
    graph = tmp_path / "static.onnx"
    assert tapvits("export", tiny_model_file, "--features", "--static-batch", "--batch-size", "4", "-o",
                   graph).exit_code == 0
    refused = tapvits("features", "--data", "digits:sample=10", "--extractor", graph, "-o", tmp_path / "f.h5")
    assert_one_line_failure(refused, ExitCode.USAGE)
    assert "export it again without --static-batch" in refused.stderr and not (tmp_path / "f.h5").exists()


def test_the_hostile_graph_builder_breaks_nothing_unasked(tmp_path, tapvits, onnx_extractor_file):
    """The control for the cases above: the same graph, unbroken, is a working extractor."""
    graph = _hostile_graph(onnx_extractor_file, tmp_path / "plain.onnx", "none")
    made = tapvits("fit-gmm", "--data", "digits:classes=0,1", "--extractor", graph, "--covariance", "diag",
                   "-o", tmp_path / "g.safetensors")
    assert made.exit_code == 0, made.stderr


def test_cloud_commands_without_torch_name_the_install(tmp_path, tiny_model_file, onnx_extractor_file):
    result = tapvits_without_torch("export", tiny_model_file, "-o", tmp_path / "m.onnx")
    assert result.returncode == ExitCode.DATA_UNAVAILABLE
    assert result.stderr == ('tapvits: error: `tapvits export` needs torch, which the device install lacks: '
                             'pip install "tapvits[cloud]"\n')
    wrong = tapvits_without_torch("fit-gmm", "--data", "fashion-mnist:split=test:classes=0,1:sample=60", "--extractor",
                                  onnx_extractor_file, "-o", tmp_path / "g.safetensors")
    assert wrong.returncode == ExitCode.USAGE and "--raw-input 1,28,28" in wrong.stderr
    logits = tmp_path / "logits.onnx"
    logits.write_bytes(b"not a graph")
    unreadable = tapvits_without_torch("fit-gmm", "--data", "digits", "--extractor", logits, "-o", tmp_path / "g.safetensors")
    assert unreadable.returncode == ExitCode.INVALID_ARTIFACT and unreadable.stderr.count("\n") == 1


def test_profile_without_torch_runs_on_onnxruntime(tmp_path, tapvits, tiny_model_file):
    """The device install profiles on onnxruntime (its default there): the table covers the architecture the
    torch path measures (same fingerprint, so the cloud's predict_model accepts it for any pruned model)."""
    from tapvits_cli.artifacts.model import read_model_spec
    from tapvits_cli.artifacts.profile import read_profile
    from tapvits_cli.payloads.latency_table import predict_model

    args = ("--batch-sizes", "1,3", "--widths", "8,48", "--repeats", "2", "--warmup-runs", "1", "--threads", "1")
    device = tapvits_without_torch("profile", tiny_model_file, "-o", tmp_path / "device.json", *args)
    assert device.returncode == 0, device.stderr
    assert tapvits_without_torch("validate", tmp_path / "device.json").returncode == 0
    assert tapvits("profile", tiny_model_file, "-o", tmp_path / "torch.json", "--runtime", "torch", *args).exit_code == 0
    on_device, on_torch = read_profile(tmp_path / "device.json"), read_profile(tmp_path / "torch.json")
    assert (on_device.runtime, on_device.threads, on_device.tokens) == ("onnxruntime", 1, on_torch.tokens)
    assert on_device.model == on_torch.model and on_device.attn.widths == on_torch.attn.widths == (1, 2, 3)
    assert on_device.mlp_alignment == on_torch.mlp_alignment == 8   # both curves on both runtimes
    assert on_device.mlp_unaligned.widths == on_torch.mlp_unaligned.widths == (1, 7, 47)
    assert np.all(on_device.mlp.median_ms > 0) and np.all(on_device.mlp_unaligned.median_ms > 0)
    assert np.all(np.asarray(on_device.embed_ms) > 0)
    prediction = predict_model(on_device, read_model_spec(tiny_model_file).spec, 3)
    assert prediction.total_ms > prediction.embed_ms + prediction.head_ms > 0
    refused = tapvits_without_torch("profile", tiny_model_file, "-o", tmp_path / "t.json", "--runtime", "torch")
    assert refused.returncode == ExitCode.DATA_UNAVAILABLE and "needs torch" in refused.stderr


def test_numpy_and_torch_hash_tensors_alike():
    import torch

    from tapvits_cli.artifacts.digests import tensors_sha256

    rng = np.random.default_rng(0)
    arrays = {"b": rng.normal(size=(3, 4)), "a": rng.normal(size=5).astype(np.float32),
              "c": np.arange(6, dtype=np.int64).reshape(2, 3), "s": np.float64(2.0).reshape(())}
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    for rule in ("container", "legacy"):
        assert tensors_sha256(arrays, rule) == tensors_sha256(tensors, rule)
    changed = {**arrays, "c": arrays["c"].reshape(3, 2)}   # same bytes, other shape: another hash
    assert tensors_sha256(changed) != tensors_sha256(arrays)
