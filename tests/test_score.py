"""`score`: unit views of the vit family, every criterion's values, KL probes, the scores artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tapvits_cli.artifacts.scores import read_scores
from tapvits_cli.data import open_dataset
from tapvits_cli.data.preprocess import Preprocessing
from tapvits_cli.errors import ExitCode
from tapvits_cli.importance.probes import probe_kl
from tapvits_cli.importance.samples import SampleSet
from tapvits_cli.importance.scoring import ScoreConfig, score_model
from tapvits_cli.models.factory import create_model
from tapvits_cli.models.families import vit
from tapvits_cli.models.units import removing
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS
from tests.test_protocol_examples import assert_one_line_failure, rewrite_metadata

COPIED, DEAD, ZEROED_HEAD = (3, 4), 7, 2   # block 0: neuron 4 copies neuron 3, neuron 7 is dead, head 2 outputs 0


def edited_tiny_vit(with_copy=True):
    """A seeded tiny ViT with a copied neuron, a dead neuron and a silent head in block 0."""
    torch.manual_seed(0)
    model = create_model(TINY_VIT, TINY_VIT_KWARGS).eval()
    blk = model.blocks[0]
    with torch.no_grad():
        source, copy = COPIED
        if with_copy:
            blk.mlp.fc1.weight[copy] = blk.mlp.fc1.weight[source]
            blk.mlp.fc1.bias[copy] = blk.mlp.fc1.bias[source]
        blk.mlp.fc1.weight[DEAD] = 0
        blk.mlp.fc1.bias[DEAD] = 0                    # GELU(0) = 0 for every input
        dim, head_dim = blk.attn.qkv.in_features, blk.attn.head_dim
        v_rows = slice(2 * dim + ZEROED_HEAD * head_dim, 2 * dim + (ZEROED_HEAD + 1) * head_dim)
        blk.attn.qkv.weight[v_rows] = 0
        blk.attn.qkv.bias[v_rows] = 0                 # v = 0, so the head's output is 0
    return model


def digits_samples(model, count=96):
    dataset = open_dataset("digits")
    preprocessing = Preprocessing.from_model(model)
    return SampleSet(count, lambda i: preprocessing(torch.from_numpy(dataset.images(i))), dataset.labels[:count])


@pytest.fixture(scope="module")
def edited():
    model = edited_tiny_vit()
    return model, digits_samples(model)


@pytest.fixture(scope="module")
def composite(edited):
    model, samples = edited
    return score_model(model, samples, ScoreConfig(batch_size=64, hsic_batch=32))


def layer(result, block, kind):
    return next(s.values for s in result.layers if s.block == block and s.kind == kind)


def test_owned_weights_are_exactly_each_units_rows_and_columns():
    model = create_model(TINY_VIT, TINY_VIT_KWARGS)
    dim, heads, head_dim, hidden = 24, 3, 8, 48
    attn, mlp = vit.unit_layers(model)[:2]
    assert (attn.kind, attn.units, attn.channels, mlp.kind, mlp.units, mlp.channels) == ("attn", 3, 8, "mlp", 48, 1)
    numbered = {id(o.parameter): torch.arange(o.parameter.numel()).reshape(o.parameter.shape) for o in attn.owned}
    qkv_w, proj_w = (numbered[id(o.parameter)] for o in attn.owned[:2])
    for head in range(heads):
        rows = [part * dim + head * head_dim + i for part in range(3) for i in range(head_dim)]
        assert torch.equal(attn.owned[0].per_unit(qkv_w)[head].sort().values, qkv_w[rows].flatten().sort().values)
        columns = proj_w[:, head * head_dim:(head + 1) * head_dim]
        assert torch.equal(attn.owned[1].per_unit(proj_w)[head].sort().values, columns.flatten().sort().values)
    fc2 = torch.arange(dim * hidden).reshape(dim, hidden)
    assert torch.equal(mlp.owned[1].per_unit(fc2)[5], fc2[:, 5])
    assert sum(o.parameter.numel() for o in mlp.owned) == hidden * (2 * dim + 1)


def test_block_sequence_and_masks_equal_the_model():
    model = edited_tiny_vit()
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sequence = vit.block_sequence(model)
    hidden = sequence.stem(images)
    for block in sequence.blocks:
        hidden = block(hidden)
    assert torch.equal(sequence.tail(hidden), model(images))
    attn = vit.unit_layers(model)[0]
    keep = torch.tensor([True, True, False])         # removing the silent head changes nothing
    with removing(attn, keep):
        assert torch.allclose(model(images), sequence.tail(hidden), atol=1e-6)
    with removing(attn, torch.tensor([False, True, True])):
        assert not torch.allclose(model(images), sequence.tail(hidden), atol=1e-4)


def test_statistics_are_exact_sums_over_any_batching(monkeypatch):
    from tapvits_cli.importance import statistics

    monkeypatch.setattr(statistics, "_GRAM_BLOCK", 5)             # several blocks of the triangular Gram
    layer = vit.unit_layers(create_model(TINY_VIT, TINY_VIT_KWARGS))[0]            # 3 heads × 8 channels
    activations = torch.randn(10, 6, 24, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 24)
    accumulated = statistics.LayerStatistics(layer)
    for part in activations.split([3, 1, 6]):
        accumulated.update(part)
    flat = activations.reshape(-1, 24).double().numpy()
    np.testing.assert_allclose(accumulated.correlation().numpy(), np.corrcoef(flat, rowvar=False), atol=1e-6)
    np.testing.assert_allclose(accumulated.activity().numpy(), np.abs(flat).reshape(-1, 3, 8).mean((0, 2)), rtol=1e-6)
    assert accumulated.representations().shape == (10, 3, 8)


def test_composite_shapes_and_ranges(composite):
    assert len(composite.layers) == 4
    for scores in composite.layers:
        units = 3 if scores.kind == "attn" else 48
        assert set(scores.values) == {"activity", "redundancy", "relevance", "score"}
        for name, values in scores.values.items():
            assert values.shape == (units,) and values.dtype == np.float32 and np.isfinite(values).all()
            assert (values >= 0).all(), name
        assert scores.values["score"].max() <= 1.0 + 1e-6          # α + β + γ = 1
    for kind, values in composite.layer_importance.items():
        assert values.shape == (2,) and (values >= 0).all() and values.max() > 0


def test_copy_is_redundant_and_dead_neuron_is_least_active(edited, composite):
    mlp = layer(composite, 0, "mlp")
    original = edited_tiny_vit(with_copy=False)
    before = layer(score_model(original, edited[1], ScoreConfig(probe_fraction=None)), 0, "mlp")["redundancy"]
    source, copy = COPIED
    assert mlp["redundancy"][copy] == pytest.approx(mlp["redundancy"][source], rel=1e-4)
    assert mlp["redundancy"][source] - before[source] > 0.05            # its twin adds ≈ 3.1 nats / 47 others
    others = np.delete(mlp["redundancy"] - before, list(COPIED))
    assert np.abs(others).max() < 0.02
    assert mlp["activity"][DEAD] == 0 and np.argmin(mlp["activity"]) == DEAD
    assert mlp["relevance"][DEAD] == pytest.approx(0, abs=1e-9)


def test_silent_head_has_the_smallest_kl_effect(edited, composite):
    model, samples = edited
    sequence = vit.block_sequence(model)
    logits = model(samples.load(np.arange(samples.count))).double()
    cache = [sequence.stem(samples.load(np.arange(samples.count)))]
    reference = [torch.log_softmax(logits, -1)]
    attn = vit.unit_layers(model)[0]
    effects = [probe_kl(sequence, attn, np.arange(3) == head, cache, reference) for head in range(3)]
    assert np.argmin(effects) == ZEROED_HEAD and effects[ZEROED_HEAD] < 1e-9 < min(np.delete(effects, ZEROED_HEAD))
    # the composite ranks the silent head last, so block 0's attention probe removes just that head
    assert np.argmin(layer(composite, 0, "attn")["score"]) == ZEROED_HEAD
    importance = composite.layer_importance
    assert importance["attn"][0] < 1e-9 < min(importance["attn"][1], *importance["mlp"])


def test_output_norm_is_the_rms_of_what_each_unit_writes_through_its_gate(edited):
    model, samples = edited
    result = score_model(model, samples, ScoreConfig(criterion="output-norm", probe_fraction=None))
    inputs = {}
    layers = vit.unit_layers(model)
    handles = [l.gate.register_forward_pre_hook(lambda m, args, l=l: inputs.__setitem__(l.name, args[0].detach()))
               for l in layers]
    with torch.no_grad():
        model(samples.load(np.arange(samples.count)))
    for handle in handles:
        handle.remove()
    for unit_layer in layers:
        x, weight = inputs[unit_layer.name].double(), unit_layer.gate.weight.detach().double()
        c = unit_layer.channels
        expected = [(x[..., u * c:(u + 1) * c] @ weight[:, u * c:(u + 1) * c].T).square().sum(-1).mean().sqrt().item()
                    for u in range(unit_layer.units)]                     # one unit at a time, observation by observation
        got = layer(result, unit_layer.block, unit_layer.kind)["score"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=unit_layer.name)
    assert layer(result, 0, "mlp")["score"][DEAD] == 0 and layer(result, 0, "attn")["score"][ZEROED_HEAD] == 0
    louder = edited_tiny_vit()                 # the same activations, but the copy's outgoing column doubled
    with torch.no_grad():
        louder.blocks[0].mlp.fc2.weight[:, COPIED[1]] *= 2
    doubled = layer(score_model(louder, samples, ScoreConfig(criterion="output-norm", probe_fraction=None)), 0, "mlp")
    original = layer(result, 0, "mlp")["score"]
    assert doubled["score"][COPIED[1]] == pytest.approx(2 * original[COPIED[1]], rel=1e-5)
    assert original[COPIED[0]] != original[COPIED[1]]    # same activations, different fc2 columns


@pytest.mark.parametrize("criterion", ["composite", "taylor", "output-norm"])
def test_values_do_not_depend_on_batch_size(edited, composite, criterion):
    model, samples = edited
    reference = composite if criterion == "composite" else \
        score_model(model, samples, ScoreConfig(criterion=criterion, batch_size=64, hsic_batch=32))
    other = score_model(model, samples, ScoreConfig(criterion=criterion, batch_size=7, hsic_batch=32))
    for a, b in zip(reference.layers, other.layers):
        for name in a.values:
            np.testing.assert_allclose(a.values[name], b.values[name], rtol=1e-3, atol=1e-7, err_msg=name)
    for kind in reference.layer_importance:
        np.testing.assert_allclose(reference.layer_importance[kind], other.layer_importance[kind], rtol=1e-5, atol=1e-12)


def test_baselines(edited):
    model, samples = edited
    magnitude = score_model(model, samples, ScoreConfig(criterion="magnitude", probe_fraction=None))
    assert magnitude.layer_importance is None
    mlp = layer(magnitude, 0, "mlp")["score"]
    fc2 = model.blocks[0].mlp.fc2.weight[:, DEAD].abs().sum().item()
    assert mlp[DEAD] == pytest.approx(fc2, rel=1e-5)              # fc1 row and bias are zero: only its fc2 column
    assert mlp[COPIED[0]] != mlp[COPIED[1]]                       # same fc1 row, different fc2 column
    taylor = score_model(model, samples, ScoreConfig(criterion="taylor", probe_fraction=None))
    assert layer(taylor, 0, "mlp")["score"][DEAD] == pytest.approx(0, abs=1e-12)   # no gradient through a dead unit
    assert all(p.grad is None for p in model.parameters())
    first = score_model(model, samples, ScoreConfig(criterion="random", probe_fraction=None, seed=3))
    again = score_model(model, samples, ScoreConfig(criterion="random", probe_fraction=None, seed=3))
    assert np.array_equal(layer(first, 1, "mlp")["score"], layer(again, 1, "mlp")["score"])
    for result in (magnitude, taylor, first):
        for scores in result.layers:
            values = scores.values["score"]
            assert set(scores.values) == {"score"} and values.shape == ((3,) if scores.kind == "attn" else (48,))
            assert np.isfinite(values).all() and (values >= 0).all()
    assert (layer(first, 0, "mlp")["score"] < 1).all()


def test_score_command_writes_a_valid_artifact(tiny_model_file, metric_set_file, tmp_path, tapvits):
    out = tmp_path / "scores.safetensors"
    result = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--criterion", "composite",
                     "--budget", "0.6", "--max-samples", "40", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["samples"] == 40 and document["probe_fraction"] == pytest.approx(0.4)
    assert tapvits("validate", out).exit_code == 0
    scores = read_scores(out)
    assert scores.criterion == "composite" and scores.samples == 40 and scores.weights["attn"] == [0.1, 0.1, 0.8]
    assert scores.score(1, "mlp").shape == (48,) and scores.layer_importance["attn"].shape == (2,)
    assert set(scores.artifact.header.inputs) == {"model", "metric-set", "pool"}
    inspected = tapvits("inspect", out)
    assert inspected.exit_code == 0 and "KL attn" in inspected.stdout and "█" in inspected.stdout
    figures = tapvits("--json", "inspect", out).json()["figures"]
    assert figures["weights"] == {"attn": [0.1, 0.1, 0.8], "mlp": [0.8, 0.1, 0.1]}   # a plain key

    default = tmp_path / "default.safetensors"   # no --criterion: output-norm, chosen on the partitions benchmark
    result = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--no-layer-importance",
                     "--max-samples", "40", "-o", default)
    assert result.exit_code == 0, result.stderr
    assert read_scores(default).criterion == "output-norm" and read_scores(default).weights is None

    taylor = tmp_path / "taylor.safetensors"
    result = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--criterion", "taylor",
                     "--no-layer-importance", "--max-samples", "40", "-o", taylor)
    assert result.exit_code == 0, result.stderr
    assert read_scores(taylor).layer_importance is None and read_scores(taylor).weights is None

    output_norm = tmp_path / "output-norm.safetensors"
    result = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--criterion", "output-norm",
                     "--budget", "0.6", "--max-samples", "40", "-o", output_norm)
    assert result.exit_code == 0, result.stderr
    assert tapvits("validate", output_norm).exit_code == 0
    scores = read_scores(output_norm)
    assert scores.criterion == "output-norm" and scores.weights is None and scores.layer_importance["mlp"].shape == (2,)


def test_score_command_refuses_bad_input(tiny_model_file, metric_set_file, tmp_path, tapvits):
    out = tmp_path / "s.safetensors"
    other_pool = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--data", "digits:split=test", "-o", out)
    assert_one_line_failure(other_pool, ExitCode.INCOMPATIBLE)
    assert "fingerprint" in other_pool.stderr
    both = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--budget", "0.7",
                   "--probe-fraction", "0.2", "-o", out)
    assert both.exit_code == ExitCode.USAGE
    weights = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--mlp-weights", "1,2", "-o", out)
    assert weights.exit_code == ExitCode.USAGE and "α,β,γ" in weights.stderr
    assert not out.exists()


def test_a_pool_count_that_contradicts_the_fingerprint_is_refused(tiny_model_file, metric_set_file, tmp_path, tapvits):
    """The fingerprint matches the pool, so a different recorded sample count means an edited metric set."""
    import json

    import h5py

    with h5py.File(metric_set_file, "r+") as handle:
        pool = json.loads(handle.attrs["metric-set.pool"])
        handle.attrs["metric-set.pool"] = json.dumps({**pool, "samples": pool["samples"] + 1})
    out = tmp_path / "s.safetensors"
    for command in (("score", tiny_model_file, "--metric-set", metric_set_file),
                    ("finetune", tiny_model_file, "--finetune-set", metric_set_file, "--max-steps", "1")):
        refused = tapvits(*command, "-o", out)
        assert_one_line_failure(refused, ExitCode.INVALID_ARTIFACT)
        assert f"records a pool of {pool['samples'] + 1} samples" in refused.stderr
        assert not out.exists()


def test_scores_artifact_rules(tiny_model_file, metric_set_file, tmp_path, tapvits):
    from safetensors.torch import load_file, save_file

    from tapvits_cli.artifacts.containers import open_file

    out = tmp_path / "scores.safetensors"
    assert tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--max-samples", "16",
                   "--criterion", "magnitude", "-o", out).exit_code == 0
    missing = tmp_path / "missing.safetensors"
    rewrite_metadata(out, missing, scores__model=None)
    assert_one_line_failure(tapvits("validate", missing), ExitCode.INVALID_ARTIFACT)
    tensors, meta = load_file(str(out)), open_file(out).metadata
    for name, replacement in (("blocks.1.attn.score", torch.zeros(4)), ("layer_importance.mlp", torch.tensor([-1.0, 0.0]))):
        broken = tmp_path / f"{name}.safetensors"
        save_file({**tensors, name: replacement}, str(broken), metadata=meta)
        result = tapvits("validate", broken)
        assert_one_line_failure(result, ExitCode.INVALID_ARTIFACT)
        assert name in result.stderr


def test_composite_weights_count_by_their_proportions(tiny_model_file, metric_set_file, tmp_path, tapvits):
    """A review: --mlp-weights 1e39,0,0 overflowed every float32 score (an artifact validate refused, exit 0)."""
    scores = {}
    for name, weights in (("unit", "1,0,0"), ("huge", "1e39,0,0"), ("tiny", "1e-320,0,0")):
        out = tmp_path / f"weights-{name}.safetensors"
        result = tapvits("score", tiny_model_file, "--metric-set", metric_set_file, "--criterion", "composite",
                         "--mlp-weights", weights, "--no-layer-importance", "--max-samples", "40", "-o", out)
        assert result.exit_code == 0, result.stderr
        assert tapvits("validate", out).exit_code == 0
        scores[name] = read_scores(out)
        assert scores[name].weights["mlp"] == [1.0, 0.0, 0.0]
    for name in ("huge", "tiny"):
        assert scores[name].values.keys() == scores["unit"].values.keys()
        for key in scores["unit"].values:
            assert np.array_equal(scores[name].score(*key), scores["unit"].score(*key))
