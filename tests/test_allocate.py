"""`allocate`: cost accounting, budget solving per strategy, floors, the plan artifact."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tapvits_cli.allocation.strategies import allocate
from tapvits_cli.artifacts.plan import read_plan
from tapvits_cli.errors import ExitCode, UnsatisfiableBudgetError
from tapvits_cli.models.factory import build_model, cost_model, create_model, describe_model
from tapvits_cli.models.families import vit
from tapvits_cli.models.spec import BlockWidths
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS
from tests.test_protocol_examples import assert_one_line_failure, rewrite_metadata

# DeiT-Tiny-shaped at 28×28 (12 blocks of 3 heads × 64 and 768 neurons): a head is ~0.9% of the model.
DEIT_TINY_28 = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}


def deit_tiny_costs():
    with torch.device("meta"):
        return vit.cost_model(create_model(TINY_VIT, DEIT_TINY_28))


def random_scores(cost, seed=0):
    rng = np.random.default_rng(seed)
    scores = {(layer.block, layer.kind): rng.random(layer.units) for layer in cost.layers}
    importance = {kind: rng.random(len(cost.layers) // 2) for kind in ("attn", "mlp")}
    return scores, importance


@pytest.mark.parametrize("widths", [[(3, 48), (3, 48)], [(2, 30), (1, 5)], [(1, 48), (3, 1)]])
def test_cost_model_matches_parameter_count_and_torch_flop_counter(widths):
    from tapvits_cli.evaluation import count_macs

    base = create_model(TINY_VIT, TINY_VIT_KWARGS)
    spec = describe_model(base, TINY_VIT, TINY_VIT_KWARGS)
    pruned = build_model(replace(spec, blocks=tuple(BlockWidths(heads, 8, hidden) for heads, hidden in widths)))
    counts = [count for heads, hidden in widths for count in (heads, hidden)]
    cost = cost_model(spec)
    assert cost.macs(counts) == count_macs(pruned, (1, 8, 8))
    assert cost.params(counts) == sum(p.numel() for p in pruned.parameters())
    assert cost.params(cost.units) == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("budget_kind", ["params", "macs"])
@pytest.mark.parametrize("strategy", ["kl", "kl-power", "uniform", "global"])
def test_every_strategy_hits_the_budget(strategy, budget_kind):
    cost = deit_tiny_costs()
    scores, importance = random_scores(cost)
    measure = cost.measure(budget_kind)
    for budget in (0.9, 0.7, 0.5):
        result = allocate(cost, scores, importance, budget_kind, budget, strategy)
        achieved = measure(result.counts)
        assert abs(achieved / measure(cost.units) - budget) <= 0.005 * budget, (budget, achieved)
        assert (result.params, result.macs) == (cost.params(result.counts), cost.macs(result.counts))
        floors = np.maximum(1, np.ceil(0.1 * cost.units))
        assert (result.counts >= floors).all() and (result.counts <= cost.units).all()
        for kept, layer, count in zip(result.keep, cost.layers, result.counts):
            values = scores[(layer.block, layer.kind)]
            assert len(kept) == count and (np.diff(kept) > 0).all()
            assert values[kept].min(initial=np.inf) >= np.delete(values, kept).max(initial=-np.inf)   # top units


def test_strategies_follow_their_signal():
    cost = deit_tiny_costs()
    scores, importance = random_scores(cost)
    importance["mlp"][:] = 0.0
    importance["mlp"][5] = 3.0                                     # one MLP layer matters far more
    kl = allocate(cost, scores, importance, "params", 0.6, "kl")
    mlp = [i for i, layer in enumerate(cost.layers) if layer.kind == "mlp"]
    assert kl.counts[mlp[5]] == cost.units[mlp[5]] and max(np.delete(kl.counts[mlp], 5)) < cost.units[mlp[5]]
    uniform = allocate(cost, scores, importance, "params", 0.6, "uniform")
    assert np.ptp(uniform.counts[mlp]) <= 1 and np.ptp([uniform.counts[i] for i in range(0, len(cost.layers), 2)]) == 0
    scores[(2, "mlp")] = scores[(2, "mlp")] + 5.0                 # one layer's units outrank all others
    global_ = allocate(cost, scores, importance, "params", 0.6, "global")
    assert global_.counts[mlp[2]] == cost.units[mlp[2]]


def test_kl_power_follows_small_kls_that_kl_flattens():
    """KLs of a few hundredths of a nat (what a small ViT's probes give): kl keeps nearly one ratio, kl-power
    follows their ratios, and scaling every KL by one factor leaves its plan unchanged."""
    cost = deit_tiny_costs()
    scores, importance = random_scores(cost)
    small = {kind: np.linspace(0.004, 0.2, len(values)) for kind, values in importance.items()}
    mlp = [i for i, layer in enumerate(cost.layers) if layer.kind == "mlp"]
    flat = allocate(cost, scores, small, "params", 0.6, "kl")
    power = allocate(cost, scores, small, "params", 0.6, "kl-power")
    assert np.ptp(flat.counts[mlp]) <= 0.15 * cost.units[mlp[0]]   # 388–481 of 768
    assert power.counts[mlp[-1]] == cost.units[mlp[-1]] and power.counts[mlp[0]] < 0.3 * cost.units[mlp[0]]
    assert (np.diff(power.counts[mlp]) >= 0).all()
    scaled = allocate(cost, scores, {kind: 50.0 * values for kind, values in small.items()}, "params", 0.6, "kl-power")
    assert (scaled.counts == power.counts).all()
    silent = {kind: np.where(np.arange(len(values)) == 3, 0.0, values) for kind, values in small.items()}
    assert allocate(cost, scores, silent, "params", 0.6, "kl-power").counts[mlp[3]] == np.ceil(0.1 * cost.units[mlp[3]])
    zeros = {kind: np.zeros_like(values) for kind, values in small.items()}   # nothing measurable: equal shares
    assert np.ptp(allocate(cost, scores, zeros, "params", 0.6, "kl-power").counts[mlp]) <= 1


def test_floors_and_branch_removal():
    cost = deit_tiny_costs()
    scores, importance = random_scores(cost)
    importance["attn"][:] = 0.0
    importance["attn"][:3] = 8.0                                   # the other attention layers get almost nothing
    kept = allocate(cost, scores, importance, "params", 0.5, "kl", min_keep=0.3)
    attn = [i for i, layer in enumerate(cost.layers) if layer.kind == "attn"]
    assert kept.counts[attn].min() == 1                           # ⌈0.3 × 3⌉ = 1 head: floors hold, nothing vanishes
    removed = allocate(cost, scores, importance, "params", 0.5, "kl", min_keep=0.3, allow_branch_removal=True)
    assert (removed.counts[attn] == 0).any() and removed.counts.sum() > 0
    assert abs(removed.params / removed.base_params - 0.5) <= 0.0025


def test_unreachable_budget_names_the_closest_value():
    cost = deit_tiny_costs()
    scores, importance = random_scores(cost)
    with pytest.raises(UnsatisfiableBudgetError, match="closest achievable is"):
        allocate(cost, scores, importance, "params", 0.05, "uniform")   # below the embeddings, head and floors


def test_plan_round_trip(scores_file, tiny_model_file, tmp_path, tapvits):
    from tapvits_cli.artifacts.scores import read_scores

    out = tmp_path / "plan.safetensors"
    result = tapvits("allocate", scores_file, "--budget", "0.7", "--model", tiny_model_file, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert "warning" not in result.stderr          # scored for 0.7 (the default probe fraction 0.3)
    document = result.json()
    assert abs(document["achieved"]["params_fraction"] - 0.7) <= 0.0035
    assert tapvits("validate", out).exit_code == 0
    plan = read_plan(out)
    scores = read_scores(scores_file)
    expected = allocate(cost_model(scores.model_spec), {k: v["score"] for k, v in scores.values.items()},
                        scores.layer_importance, "params", 0.7, "kl")
    assert [k.tolist() for k in expected.keep] == [plan.keep[kind][block].tolist()
                                                   for block in range(2) for kind in ("attn", "mlp")]
    assert plan.achieved["params"] == expected.params and plan.base["params"] == expected.base_params
    assert plan.model_sha256 == scores.model_sha256 and plan.strategy == "kl"
    assert plan.base_blocks == scores.blocks
    assert [b.heads for b in plan.pruned_blocks] == [len(k) for k in plan.attn_keep]
    assert set(plan.artifact.header.inputs) == {"scores", "model"}
    inspected = tapvits("inspect", out)
    assert inspected.exit_code == 0 and "█" in inspected.stdout and "mlp keep" in inspected.stdout

    tampered = tmp_path / "tampered.safetensors"
    rewrite_metadata(out, tampered, plan__achieved='{"macs":1,"macs_fraction":0.1,"params":5,"params_fraction":0.1}')
    assert_one_line_failure(tapvits("validate", tampered), ExitCode.INVALID_ARTIFACT)


def test_allocate_refusals(scores_file, tmp_path, tapvits):
    out = tmp_path / "plan.safetensors"
    tight = tapvits("allocate", scores_file, "--budget", "0.1", "-o", out)
    assert_one_line_failure(tight, ExitCode.UNSATISFIABLE_BUDGET)
    assert "closest achievable" in tight.stderr
    assert tapvits("allocate", scores_file, "-o", out).exit_code == ExitCode.USAGE
    other = tmp_path / "other.safetensors"
    assert tapvits("create-model", TINY_VIT, *[f"-a{k}={v}" for k, v in TINY_VIT_KWARGS.items()], "--seed", "1",
                   "-o", other).exit_code == 0
    mismatch = tapvits("allocate", scores_file, "--budget", "0.7", "--model", other, "-o", out)
    assert_one_line_failure(mismatch, ExitCode.INCOMPATIBLE)
    assert not out.exists()
    macs = tapvits("allocate", scores_file, "--budget-macs", "0.6", "--strategy", "global", "-o", out, "--json")
    assert macs.exit_code == 0, macs.stderr
    assert abs(macs.json()["achieved"]["macs_fraction"] - 0.6) <= 0.003


def test_a_plan_for_another_budget_than_the_probes_warns(scores_file, tmp_path, tapvits):
    out = tmp_path / "plan.safetensors"
    other = tapvits("allocate", scores_file, "--budget", "0.6", "--tolerance", "0.05", "-o", out)
    assert other.exit_code == 0, other.stderr
    assert ("was probed for a budget of 0.7 (score --budget 0.7, i.e. --probe-fraction 0.3), but this plan is for "
            "--budget 0.6") in other.stderr
    uniform = tapvits("allocate", scores_file, "--budget", "0.6", "--strategy", "uniform", "--tolerance", "0.05",
                      "-o", out)
    assert uniform.exit_code == 0 and "warning" not in uniform.stderr   # only kl uses the probes
