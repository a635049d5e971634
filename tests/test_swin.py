"""The `swin` family: pruned Swin equals masked Swin (shifted windows included), costs, reloads, the CLI chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tapvits_cli.allocation.strategies import allocate
from tapvits_cli.artifacts.model import load_model, write_model
from tapvits_cli.artifacts.plan import read_plan
from tapvits_cli.errors import ExitCode, NotImplementedStageError
from tapvits_cli.models.factory import cost_model, count_parameters, create_model, describe_model
from tapvits_cli.models.families import family_module, family_of, swin
from tapvits_cli.models.families.branches import EmptyBranch
from tapvits_cli.models.units import observing
from tapvits_cli.pruning import prune_model
from tapvits_cli.vocabulary import ALLOCATION_STRATEGIES as STRATEGIES
from tests.conftest import model_args
from tests.test_prune import masked
from tests.test_protocol_examples import assert_one_line_failure

SWIN = "swin_tiny_patch4_window7_224"
# Two stages (16×16 then 8×8 tokens after patch merging), windows of 4×4: blocks 1 and 3 shift their windows.
TINY_SWIN_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 24, "depths": [2, 2],
                    "num_heads": [2, 4], "mlp_ratio": 2.0, "in_chans": 1, "num_classes": 10}
# 28 px: 14×14 and 7×7 grids, padded to whole 4×4 windows inside the attention.
PADDED_SWIN_KWARGS = {**TINY_SWIN_KWARGS, "img_size": 28}
# Every kind of block change: block 0 loses a head, shifted block 1 its whole attention, block 2 (after the
# patch merging) its whole MLP, shifted block 3 two of its four heads.
KEEP = {"attn": [[1], [], [0, 2, 3], [1, 3]], "mlp": [[0, 5, 9, 30, 47], list(range(0, 48, 3)), [], list(range(60))]}


def noisy_swin(kwargs, fused_attention=False):
    """A seeded tiny Swin with every parameter random (no zero bias or unit norm hides a slicing mistake)."""
    torch.manual_seed(0)
    model = create_model(SWIN, kwargs).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return attention_path(model, fused_attention)


def attention_path(model, fused: bool):
    """Choose timm's attention code path (its default is the explicit one: fused is "experimental" for Swin)."""
    for blk in swin.stage_blocks(model):
        if not isinstance(blk.attn, EmptyBranch):
            blk.attn.fused_attn = fused
    return model


def images(count=6, size=32):
    return torch.randn(count, 1, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fused_attention", [False, True])
@pytest.mark.parametrize("kwargs", [TINY_SWIN_KWARGS, PADDED_SWIN_KWARGS], ids=["32px", "28px-padded"])
def test_pruned_swin_equals_masked_swin_and_reloads(kwargs, fused_attention, tmp_path, tapvits):
    model = noisy_swin(kwargs, fused_attention)
    blocks = swin.stage_blocks(model)
    assert [any(blk.shift_size) for blk in blocks] == [False, True, False, True]
    keep = {kind: [np.array(kept, dtype=np.int64) for kept in lists] for kind, lists in KEEP.items()}
    x = images(size=kwargs["img_size"])
    pruned = attention_path(prune_model(model, keep), fused_attention)
    with torch.no_grad(), masked(model, keep):
        expected = model(x)
    with torch.no_grad():
        actual, unpruned = pruned(x), model(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(actual, unpruned, atol=1e-3)

    pruned_blocks = swin.stage_blocks(pruned)
    assert pruned_blocks[3].attn.relative_position_bias_table.shape == (49, 2)
    torch.testing.assert_close(pruned_blocks[3].attn.relative_position_bias_table,
                               blocks[3].attn.relative_position_bias_table[:, [1, 3]])
    assert isinstance(pruned_blocks[1].attn, EmptyBranch) and isinstance(pruned_blocks[2].mlp, EmptyBranch)
    spec = describe_model(pruned, SWIN, kwargs)
    assert [(b.heads, b.head_dim, b.mlp_hidden) for b in spec.blocks] == [(1, 12, 5), (0, 12, 16), (3, 12, 0),
                                                                          (2, 12, 60)]
    path = write_model(tmp_path / "pruned.safetensors", pruned, spec, params={})
    assert tapvits("validate", path).exit_code == 0
    loaded = load_model(path)
    reloaded, reloaded_spec, artifact = loaded.module, loaded.spec, loaded.artifact
    attention_path(reloaded, fused_attention)
    assert reloaded_spec.family == "swin" and reloaded_spec.blocks == spec.blocks
    assert "layers.0.blocks.1.norm1.weight" not in artifact.tensors and "layers.1.blocks.0.mlp.fc1.weight" not in artifact.tensors
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned.eval()(x))


@pytest.mark.parametrize("kwargs", [TINY_SWIN_KWARGS, PADDED_SWIN_KWARGS], ids=["32px", "28px-padded"])
def test_cost_model_counts_every_parameter_and_the_flop_counters_macs(kwargs):
    from torch.utils.flop_counter import FlopCounterMode

    model = noisy_swin(kwargs)
    keep = {kind: [np.array(kept, dtype=np.int64) for kept in lists] for kind, lists in KEEP.items()}
    pruned = prune_model(model, keep)
    cost = cost_model(describe_model(model, SWIN, kwargs))
    for network, counts in ((model, cost.units), (pruned, [len(keep[l.kind][l.block]) for l in cost.layers])):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(torch.zeros(1, 1, kwargs["img_size"], kwargs["img_size"]))
        assert cost.macs(counts) * 2 == counter.get_total_flops()
        assert cost.params(counts) == count_parameters(network)
    per_head = [layer.unit_params for layer in cost.layers if layer.kind == "attn"]
    assert per_head == [4 * 12 * 24 + 12 * 3 + 49] * 2 + [4 * 12 * 48 + 12 * 3 + 49] * 2   # q,k,v,proj + bias + table


def test_block_sequence_replays_the_model_and_attention_tokens_stay_per_image():
    model = noisy_swin(TINY_SWIN_KWARGS)
    x = images(3)
    sequence = swin.block_sequence(model)
    hidden = sequence.stem(x)
    for block in sequence.blocks:
        hidden = block(hidden)
    with torch.no_grad():
        torch.testing.assert_close(sequence.tail(hidden), model(x))

    layers = [layer for layer in swin.unit_layers(model) if layer.kind == "attn"]
    seen = {}
    with torch.no_grad(), observing(layers, lambda layer, tokens: seen.setdefault(layer.block, []).append(tokens)):
        model(x)
        model(x[1:2])
    for block, (batch, alone) in seen.items():
        assert batch.shape == (3, 256 if block < 2 else 64, swin.stage_blocks(model)[block].attn.qkv.out_features // 3)
        torch.testing.assert_close(batch[1:2], alone)   # windows regrouped into their own image's tokens


@pytest.mark.parametrize("budget_kind", ["params", "macs"])
def test_allocation_meets_whole_model_budgets_across_stages(budget_kind):
    """swin_tiny at 224 px: four stages of widths 96…768 and depths 2, 2, 6, 2."""
    with torch.device("meta"):
        cost = swin.cost_model(create_model(SWIN, {}))
    assert len(cost.layers) == 24 and len({layer.unit_params for layer in cost.layers if layer.kind == "mlp"}) == 4
    rng = np.random.default_rng(0)
    scores = {(layer.block, layer.kind): rng.random(layer.units) for layer in cost.layers}
    importance = {kind: rng.exponential(0.5, 12) for kind in ("attn", "mlp")}
    measure = cost.measure(budget_kind)
    for strategy in STRATEGIES:
        for budget in (0.9, 0.7, 0.5):
            result = allocate(cost, scores, importance, budget_kind, budget, strategy)
            assert abs(measure(result.counts) / measure(cost.units) - budget) <= 0.005, (strategy, budget)
            assert all(0 < count <= layer.units for count, layer in zip(result.counts, cost.layers))


def test_score_allocate_prune_chain_reloads_without_pickle(metric_set_file, tmp_path, tapvits):
    base_path, scores, plan_path, pruned_path = (tmp_path / f"{name}.safetensors"
                                                  for name in ("base", "scores", "plan", "pruned"))
    assert tapvits("create-model", SWIN, *model_args(TINY_SWIN_KWARGS), "-o", base_path).exit_code == 0
    result = tapvits("score", base_path, "--metric-set", metric_set_file, "--max-samples", "32", "-o", scores)
    assert result.exit_code == 0, result.stderr
    allocated = tapvits("--json", "allocate", scores, "--budget", "0.7", "--model", base_path, "-o", plan_path)
    assert allocated.exit_code == 0, allocated.stderr
    assert abs(allocated.json()["achieved"]["params_fraction"] - 0.7) <= 0.0035
    pruned = tapvits("--json", "prune", base_path, plan_path, "-o", pruned_path)
    assert pruned.exit_code == 0, pruned.stderr
    assert tapvits("validate", pruned_path).exit_code == 0
    inspected = tapvits("--json", "inspect", pruned_path)
    assert inspected.exit_code == 0 and '"swin"' in inspected.stdout

    plan = read_plan(plan_path)
    loaded = load_model(pruned_path)
    reloaded, spec = loaded.module, loaded.spec
    assert spec.family == "swin" and spec.blocks == plan.pruned_blocks
    assert pruned.json()["params_after"] == plan.achieved["params"] == count_parameters(reloaded)
    base = load_model(base_path).module
    x = images(4)
    with torch.no_grad(), masked(base, plan.keep):
        expected = base(x)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, atol=1e-5, rtol=1e-5)


def test_unsupported_families_fail_naming_the_supported_ones(metric_set_file, tmp_path, tapvits):
    with torch.device("meta"):
        for architecture in ("convnext_atto", "swinv2_cr_tiny_ns_224"):
            assert family_of(create_model(architecture, {})) == "generic"
    path = tmp_path / "resnet.safetensors"
    assert tapvits("create-model", "resnet18", "-a", "num_classes=10", "-o", path).exit_code == 0
    refused = tapvits("score", path, "--metric-set", metric_set_file, "-o", tmp_path / "scores.safetensors")
    assert_one_line_failure(refused, ExitCode.NOT_IMPLEMENTED)
    assert "resnet18" in refused.stderr and "vit (timm VisionTransformer" in refused.stderr \
        and "swin (timm SwinTransformer" in refused.stderr
    model = load_model(path).module
    with pytest.raises(NotImplementedStageError, match="supported families: vit .*, swin"):
        prune_model(model, {"attn": [], "mlp": []})
    with pytest.raises(NotImplementedStageError, match="convnext_atto .* cannot be scored or pruned"):
        family_module("generic", "convnext_atto")
