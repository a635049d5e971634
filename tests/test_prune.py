"""`prune`: sliced models equal masked ones, reload from the artifact, refuse foreign plans."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from tapvits_cli.artifacts.model import load_model
from tapvits_cli.artifacts.plan import read_plan
from tapvits_cli.errors import ExitCode, NotImplementedStageError
from tapvits_cli.models.factory import build_model, cost_model, count_parameters, create_model, describe_model
from tapvits_cli.models.families import family_module, family_of, vit
from tapvits_cli.models.units import removing
from tapvits_cli.pruning import prune_model
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS
from tests.test_protocol_examples import assert_one_line_failure

KWARGS = {**TINY_VIT_KWARGS, "depth": 4, "qkv_bias": True}


def random_keep(model, seed=0):
    """Random kept units per layer; block 1 loses its attention branch, block 2 its MLP."""
    rng = np.random.default_rng(seed)
    keep = {"attn": [], "mlp": []}
    for layer in vit.unit_layers(model):
        count = 0 if (layer.block, layer.kind) in {(1, "attn"), (2, "mlp")} else rng.integers(1, layer.units + 1)
        keep[layer.kind].append(np.sort(rng.choice(layer.units, size=count, replace=False)).astype(np.int64))
    return keep


@contextlib.contextmanager
def masked(model, keep):
    """``model`` (any family) with every unit outside ``keep`` zeroed; an empty layer contributes nothing at
    all (its gate's output bias neither, so the branch adds exactly 0)."""
    with contextlib.ExitStack() as stack:
        for layer in family_module(family_of(model)).unit_layers(model):
            kept = keep[layer.kind][layer.block]
            mask = np.zeros(layer.units, dtype=bool)
            mask[kept] = True
            stack.enter_context(removing(layer, mask))
            if not len(kept):
                handle = layer.gate.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
                stack.callback(handle.remove)
        yield model


def test_pruned_model_equals_masked_model_and_reloads(tmp_path):
    from dataclasses import replace

    from tapvits_cli.artifacts.model import write_model

    torch.manual_seed(0)
    model = create_model(TINY_VIT, KWARGS).eval()
    for parameter in model.parameters():                 # non-zero biases and norms: nothing hides a mistake
        torch.nn.init.normal_(parameter, std=0.3)
    keep = random_keep(model)
    images = torch.randn(16, 1, 8, 8)
    pruned = prune_model(model, keep)
    with torch.no_grad(), masked(model, keep):
        expected = model(images)
    with torch.no_grad():
        actual = pruned(images)
        unpruned = model(images)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(actual, unpruned, atol=1e-3)      # the plan did change the model

    spec = describe_model(pruned, TINY_VIT, KWARGS)
    widths = [(b.heads, b.mlp_hidden) for b in spec.blocks]
    assert widths == [(len(a), len(m)) for a, m in zip(keep["attn"], keep["mlp"])]
    assert widths[1][0] == 0 and widths[2][1] == 0 and isinstance(pruned.blocks[1].attn, vit.EmptyBranch)
    cost = cost_model(describe_model(model, TINY_VIT, KWARGS))
    assert count_parameters(pruned) == cost.params([len(keep[layer.kind][layer.block]) for layer in cost.layers])

    path = write_model(tmp_path / "pruned.safetensors", pruned, spec, params={})
    loaded = load_model(path)
    reloaded, reloaded_spec = loaded.module, loaded.spec
    assert reloaded_spec.blocks == spec.blocks
    with torch.no_grad():
        assert torch.equal(reloaded(images), actual)
    assert build_model(replace(spec), device="meta").blocks[2].mlp.__class__ is vit.EmptyBranch
    with pytest.raises(NotImplementedStageError, match="already lost a whole branch"):
        prune_model(pruned, {kind: [np.arange(len(k)) for k in keep[kind]] for kind in keep})


def test_prune_command_end_to_end(scores_file, tiny_model_file, tmp_path, tapvits):  # noqa: F811
    plan_path = tmp_path / "plan.safetensors"
    assert tapvits("allocate", scores_file, "--budget", "0.7", "-o", plan_path).exit_code == 0
    out = tmp_path / "pruned.safetensors"
    result = tapvits("--json", "prune", tiny_model_file, plan_path, "-o", out)
    assert result.exit_code == 0, result.stderr
    document = result.json()
    plan = read_plan(plan_path)
    assert document["params_before"] == plan.base["params"]
    assert document["params_after"] == plan.achieved["params"] == count_parameters(load_model(out).module)
    assert abs(document["params_fraction"] - 0.7) <= 0.0035
    assert tapvits("validate", out).exit_code == 0
    loaded = load_model(out)
    reloaded, spec, artifact = loaded.module, loaded.spec, loaded.artifact
    assert spec.blocks == plan.pruned_blocks and set(artifact.header.inputs) == {"model", "plan"}

    base = load_model(tiny_model_file).module
    images = torch.randn(8, 1, 8, 8)
    with torch.no_grad(), masked(base, plan.keep):
        expected = base(images)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), expected, atol=1e-5, rtol=1e-5)

    other = tmp_path / "other.safetensors"
    assert tapvits("create-model", TINY_VIT, *[f"-a{k}={v}" for k, v in TINY_VIT_KWARGS.items()], "--seed", "1",
                   "-o", other).exit_code == 0
    refused = tapvits("prune", other, plan_path, "-o", tmp_path / "refused.safetensors")
    assert_one_line_failure(refused, ExitCode.INCOMPATIBLE)
    assert plan.model_sha256[:12] in refused.stderr and not (tmp_path / "refused.safetensors").exists()
