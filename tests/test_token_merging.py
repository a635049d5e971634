"""Token merging: exact when off, token counts as configured, class token kept, neighbour merges stay
adjacent, proportional attention, pruned models, the artifact round trip, export and unsupported families."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tapvits_cli.artifacts.model import load_model
from tapvits_cli.errors import ExitCode, UsageError
from tapvits_cli.models.factory import create_model
from tapvits_cli.models.families import vit
from tapvits_cli.models.spec import TokenMerging
from tapvits_cli.models.token_matching import bipartite_destinations, merge_tokens, neighbour_destinations
from tapvits_cli.models.token_merging import attention_with_keys, set_token_merging, token_merging_of
from tapvits_cli.pruning import prune_model
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS
from tests.test_prune import random_keep
from tests.test_protocol_examples import assert_one_line_failure

# 16×16 images in 2×2 patches: an 8×8 grid of 64 patch tokens after the class token, four blocks.
KWARGS = {**TINY_VIT_KWARGS, "img_size": 16, "depth": 4, "qkv_bias": True}
SCHEDULES = {"bipartite": (10, 0, 8, 6), "neighbour": (2, 1, 0, 2)}
# bipartite: 64 → 54 → 54 → 46 → 40 patches. neighbour: 8×8 → 8×6 (columns) → 7×6 (rows) → 7×6 → 5×6 (rows).
TOKENS = {"bipartite": [55, 55, 47, 41], "neighbour": [49, 43, 43, 31]}


def model(seed=0):
    torch.manual_seed(seed)
    network = create_model(TINY_VIT, KWARGS).eval()
    for parameter in network.parameters():       # non-zero biases and norms: nothing hides a mistake
        torch.nn.init.normal_(parameter, std=0.3)
    return network


def merged(network, merging):
    network = copy.deepcopy(network)
    set_token_merging(network, merging)
    return network


def images(count=6):
    return torch.randn(count, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def tokens_seen(network, batch):
    """(tokens entering each block's attention, tokens entering each block's MLP)."""
    seen = {"attn": [], "mlp": []}
    modules = [("attn", block.attn.qkv) for block in network.blocks if hasattr(block.attn, "qkv")] + \
              [("mlp", block.mlp) for block in network.blocks]
    handles = [module.register_forward_pre_hook(lambda m, args, kind=kind: seen[kind].append(args[0].shape[1]))
               for kind, module in modules]
    with torch.no_grad():
        network(batch)
    for handle in handles:
        handle.remove()
    return seen["attn"], seen["mlp"]


@pytest.mark.parametrize("method", ["bipartite", "neighbour"])
def test_amount_zero_is_the_unmerged_model(method):
    network = model()
    with torch.no_grad():
        expected = network(images())
        actual = merged(network, TokenMerging(method, (0, 0, 0, 0)))(images())
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["bipartite", "neighbour"])
def test_token_counts_per_block_are_as_configured(method):
    merging = TokenMerging(method, SCHEDULES[method])
    assert list(merging.token_counts((8, 8), 1)) == TOKENS[method]
    network = merged(model(), merging)
    attention, mlp = tokens_seen(network, images())
    assert mlp == TOKENS[method]                          # merged between attention and MLP ...
    assert attention == [65] + TOKENS[method][:-1]        # ... so a block's attention sees the tokens before it
    with torch.no_grad():
        assert network(images()).shape == (6, 10)


def test_amounts_beyond_half_are_refused():
    with pytest.raises(UsageError, match="block 3: bipartite merging removes at most half"):
        TokenMerging("bipartite", (16, 16, 16, 16)).steps((8, 8), 1)   # 64 → 48 → 32 → 16: half is 8 < 16
    with pytest.raises(UsageError, match="at most 4 pairs of the 8 columns"):
        TokenMerging("neighbour", (5, 0, 0, 0)).steps((8, 8), 1)
    with pytest.raises(UsageError, match="blocks 0-3"):
        TokenMerging.uniform("bipartite", 2, 4, layers=[1, 4])
    with pytest.raises(UsageError, match="4 blocks"):
        set_token_merging(model(), TokenMerging("bipartite", (1, 1)))


@pytest.mark.parametrize("prefix", [1, 2])
def test_prefix_tokens_are_never_merged(prefix):
    """Even when every token has the same keys (all equally similar), prefix tokens keep their own slots."""
    metric = torch.ones(3, prefix + 16, 4)
    for slots in (bipartite_destinations(metric, 8, prefix),
                  neighbour_destinations(metric, 2, prefix, (4, 4), "columns"),
                  neighbour_destinations(metric, 2, prefix, (4, 4), "rows")):
        assert torch.equal(slots[:, :prefix], torch.arange(prefix).expand(3, prefix))
        assert (slots[:, prefix:] >= prefix).all()
    x = torch.randn(3, prefix + 16, 5)
    out, size = merge_tokens(x, None, bipartite_destinations(metric, 8, prefix), prefix + 8)
    assert torch.equal(out[:, :prefix], x[:, :prefix]) and torch.equal(size[:, :prefix], torch.ones(3, prefix))
    network = merged(model(), TokenMerging("bipartite", SCHEDULES["bipartite"]))
    assert network.blocks.prefix == network.num_prefix_tokens == 1


def test_bipartite_merges_the_most_similar_pairs_into_size_weighted_means():
    # 8 patch tokens after a class token: A = positions 0, 2, 4, 6, B = 1, 3, 5, 7 (of the patches).
    directions = torch.eye(8)
    metric = torch.cat([torch.ones(1, 8), directions[[0, 1, 2, 3, 4, 5, 6, 7]]])[None]
    metric[0, 1 + 4] = directions[1] + 0.1 * directions[4]      # A token 4 ≈ B token 1 (best pair)
    metric[0, 1 + 6] = directions[7] + 0.5 * directions[6]      # A token 6 ≈ B token 7 (second best)
    slots = bipartite_destinations(metric, 2, 1)[0].tolist()
    # kept A tokens 0, 2 take slots 1, 2; B tokens 1, 3, 5, 7 take slots 3-6; A 4 joins B 1, A 6 joins B 7.
    assert slots == [0, 1, 3, 2, 4, 3, 5, 6, 6]
    x = torch.randn(1, 9, 3)
    size = torch.tensor([[1.0, 1, 1, 1, 1, 3, 1, 1, 1]])          # patch token 4 already stands for 3 patches
    out, new_size = merge_tokens(x, size, torch.tensor([slots]), 7)
    torch.testing.assert_close(out[0, 3], (x[0, 2] + 3 * x[0, 5]) / 4)
    assert new_size[0].tolist() == [1, 1, 1, 4, 1, 1, 2]


def test_proportional_attention_makes_merging_identical_tokens_lossless():
    attn = model().blocks[0].attn
    x = torch.randn(2, 5, KWARGS["embed_dim"])
    duplicated = torch.cat([x, x[:, 2:3], x[:, 2:3]], dim=1)                 # token 2 three times
    size = torch.tensor([[1.0, 1, 3, 1, 1]]).expand(2, 5)
    with torch.no_grad():
        expected, _ = attention_with_keys(attn, duplicated, None)
        actual, _ = attention_with_keys(attn, x, size)
        plain, _ = attention_with_keys(attn, x, None)
    torch.testing.assert_close(actual, expected[:, :5], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, expected[:, :5], atol=1e-3)       # without log(size) the weight is lost


@pytest.mark.parametrize("axis", ["columns", "rows"])
def test_neighbour_merges_only_adjacent_lines(axis):
    """Lines 2 and 3 are near-copies and lines 0 and 4 exact copies: only the adjacent pair may merge."""
    lines = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    lines[3] = lines[2] + 0.01
    lines[4] = lines[0]
    grid = lines[None, :, :].expand(5, 6, 4) if axis == "columns" else lines[:, None, :].expand(6, 5, 4)
    metric = torch.cat([torch.zeros(1, 4), grid.reshape(30, 4)])[None]
    slots = neighbour_destinations(metric, 1, 1, tuple(grid.shape[:2]), axis)[0, 1:].reshape(grid.shape[:2]) - 1
    new_line = torch.tensor([0, 1, 2, 2, 3, 4])
    expected = (torch.arange(5)[:, None] * 5 + new_line) if axis == "columns" else (new_line[:, None] * 5 + torch.arange(5))
    assert torch.equal(slots, expected)


def test_neighbour_groups_are_adjacent_pairs_for_any_keys():
    """On random keys, over a batch: every output token holds one token or two neighbours of the grid."""
    metric = torch.randn(8, 1 + 7 * 6, 5, generator=torch.Generator().manual_seed(2))
    for axis, amount in (("columns", 3), ("rows", 2)):
        slots = neighbour_destinations(metric, amount, 1, (7, 6), axis)
        for image in slots:
            groups = {}
            for index, slot in enumerate(image[1:].tolist()):
                groups.setdefault(slot, []).append(divmod(index, 6))
            assert sorted(groups) == list(range(1, 1 + 7 * 6 - (7 if axis == "columns" else 6) * amount))
            for members in groups.values():
                assert len(members) in (1, 2)
                if len(members) == 2:
                    (r1, c1), (r2, c2) = members
                    assert (r1 == r2 and c2 - c1 == 1) if axis == "columns" else (c1 == c2 and r2 - r1 == 1)
                    assert (c1 if axis == "columns" else r1) % 2 == 0            # the disjoint pairs (0,1), (2,3), …


@pytest.mark.parametrize("method", ["bipartite", "neighbour"])
def test_works_on_a_pruned_model_with_a_removed_attention_branch(method):
    base = model()
    pruned = prune_model(base, random_keep(base))          # block 1 has no heads left, block 2 no MLP
    assert isinstance(pruned.blocks[1].attn, vit.EmptyBranch)
    with torch.no_grad():
        expected = pruned(images())
        torch.testing.assert_close(merged(pruned, TokenMerging(method, (0, 0, 0, 0)))(images()), expected,
                                   rtol=0, atol=1e-6)
    network = merged(pruned, TokenMerging(method, SCHEDULES[method]))
    _, mlp = tokens_seen(network, images())
    assert mlp == TOKENS[method]
    assert vit.block_widths(network) == vit.block_widths(pruned)


def test_layer_importance_refuses_a_merged_model():
    with pytest.raises(UsageError, match="score the model before merging"):
        vit.block_sequence(merged(model(), TokenMerging("bipartite", SCHEDULES["bipartite"])))


def test_training_passes_gradients_through_merges():
    network = merged(model(), TokenMerging("neighbour", SCHEDULES["neighbour"])).train()
    network(images()).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in network.parameters())


def test_prune_sets_keeps_and_clears_merging_through_the_artifact(scores_file, tiny_model_file, tmp_path, tapvits):
    from tapvits_cli.artifacts.kinds import read_artifact
    from tapvits_cli.artifacts.plan import read_plan

    first = tmp_path / "merged.safetensors"            # no PLAN: only the merging changes, the weights do not
    result = tapvits("--json", "prune", tiny_model_file, "--merge", "bipartite", "--merge-amount", "3",
                     "--merge-layers", "1", "-o", first)
    assert result.exit_code == 0, result.stderr
    setting = {"method": "bipartite", "schedule": [0, 3], "proportional_attention": True}
    assert result.json()["token_merging"] == setting and result.json()["tokens_per_block"] == [17, 14]
    weights = read_artifact(tiny_model_file).metadata["model.weights_sha256"]
    assert read_artifact(first).metadata["model.weights_sha256"] == weights

    plan_path = tmp_path / "plan.safetensors"          # so a plan made for the unmerged model still applies
    assert tapvits("allocate", scores_file, "--budget", "0.7", "-o", plan_path).exit_code == 0
    pruned = tmp_path / "pruned.safetensors"
    assert tapvits("prune", first, plan_path, "-o", pruned).exit_code == 0
    assert read_artifact(pruned).header.params["token_merging"] == setting
    assert tapvits("validate", pruned).exit_code == 0
    loaded = load_model(pruned)
    reloaded, spec = loaded.module, loaded.spec
    assert spec.token_merging == TokenMerging("bipartite", (0, 3))
    base = load_model(tiny_model_file).module
    plain = prune_model(base, read_plan(plan_path).keep)
    batch = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(batch), merged(plain, spec.token_merging)(batch))

    replaced = tmp_path / "replaced.safetensors"
    assert tapvits("prune", pruned, "--merge", "neighbour", "--merge-schedule", "1,0", "--no-proportional-attention",
                   "-o", replaced).exit_code == 0
    assert load_model(replaced).spec.token_merging == TokenMerging("neighbour", (1, 0), proportional_attention=False)
    cleared = tmp_path / "cleared.safetensors"
    assert tapvits("prune", replaced, "--merge", "none", "-o", cleared).exit_code == 0
    loaded = load_model(cleared)
    cleared_model, cleared_spec, cleared_artifact = loaded.module, loaded.spec, loaded.artifact
    assert cleared_spec.token_merging is None and "model.token_merging" not in cleared_artifact.metadata
    with torch.no_grad():
        assert torch.equal(cleared_model(batch), plain(batch))


def test_prune_merge_option_errors(tiny_model_file, tmp_path, tapvits):
    out = tmp_path / "m.safetensors"
    for args, words in ((["--merge-amount", "2"], "need --merge"),
                        (["--merge", "bipartite"], "needs either --merge-amount"),
                        (["--merge", "bipartite", "--merge-amount", "2", "--merge-schedule", "1,1"], "needs either"),
                        (["--merge", "none", "--merge-amount", "2"], "drop the other"),
                        ([], "nothing to do"),
                        (["--merge", "bipartite", "--merge-amount", "9"], "at most half"),
                        (["--merge", "bipartite", "--merge-schedule", "1,1,1"], "3 entries")):
        result = tapvits("prune", tiny_model_file, *args, "-o", out)
        assert_one_line_failure(result, ExitCode.USAGE)
        assert words in result.stderr
    assert not out.exists()


def test_unsupported_family_is_refused(tmp_path, tapvits):
    generic = tmp_path / "resnet.safetensors"
    assert tapvits("create-model", "test_resnet", "-a", "num_classes=3", "-o", generic).exit_code == 0
    result = tapvits("prune", generic, "--merge", "bipartite", "--merge-amount", "1", "-o", tmp_path / "m.safetensors")
    assert_one_line_failure(result, ExitCode.NOT_IMPLEMENTED)
    assert "supported for the vit family" in result.stderr and "generic" in result.stderr


def test_finetune_eval_and_export_see_the_merging(tiny_model_file, tmp_path, tapvits):
    onnxruntime = pytest.importorskip("onnxruntime")
    merged_file = tmp_path / "merged.safetensors"
    assert tapvits("prune", tiny_model_file, "--merge", "neighbour", "--merge-amount", "1", "-o",
                   merged_file).exit_code == 0
    tuned = tmp_path / "tuned.safetensors"
    assert tapvits("finetune", merged_file, "--data", "digits:sample=64", "--batch-size", "32", "--max-steps", "2",
                   "--no-checkpoint", "-o", tuned).exit_code == 0
    assert load_model(tuned).spec.token_merging == TokenMerging("neighbour", (1, 1))

    report = tapvits("--json", "eval", merged_file, "--data", "digits:split=test", "--no-latency",
                     "-o", tmp_path / "r.json").json()
    unmerged = tapvits("--json", "eval", tiny_model_file, "--data", "digits:split=test", "--no-latency",
                       "-o", tmp_path / "u.json").json()
    assert report["macs"] < unmerged["macs"]

    onnx_file = tmp_path / "merged.onnx"
    assert tapvits("export", merged_file, "-o", onnx_file).exit_code == 0          # checked at batch 1 and 3
    model_ = load_model(merged_file).module
    batch = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(["logits"], {"images": batch.numpy()})[0] - model_(batch).numpy()).max() <= 1e-4
    refused = tapvits("export", merged_file, "-o", tmp_path / "old.onnx", "--opset", "15")
    assert_one_line_failure(refused, ExitCode.USAGE)
    assert "opset 16" in refused.stderr


def test_merging_is_read_off_the_module_and_rejected_when_malformed(tmp_path):
    from tapvits_cli.errors import InvalidArtifactError
    from tapvits_cli.artifacts.model import model_metadata, spec_from_metadata
    from tapvits_cli.models.factory import describe_model

    network = merged(model(), TokenMerging("bipartite", SCHEDULES["bipartite"]))
    spec = describe_model(network, TINY_VIT, KWARGS)
    assert spec.token_merging == token_merging_of(network)
    metadata = model_metadata(spec, parameters=0, weights_sha256="0" * 64, timm_version="1.0")
    assert spec_from_metadata(metadata, "m").token_merging == spec.token_merging
    for bad in ('{"method":"bipartite","schedule":[1,-1]}', '{"method":"tome","schedule":[1]}', '[1,2]'):
        with pytest.raises(InvalidArtifactError, match="model.token_merging"):
            spec_from_metadata({**metadata, "model.token_merging": bad}, "m")
    from tapvits_cli.artifacts.digests import fingerprint_sha256
    from tapvits_cli.models.extract import make_extractor

    merged_extractor = make_extractor(network, TINY_VIT, KWARGS, "0" * 64)   # same weights, other features
    assert merged_extractor.fingerprint["token_merging"] == spec.token_merging.to_dict()
    set_token_merging(network, None)
    assert token_merging_of(network) is None and type(network.blocks) is torch.nn.Sequential
    plain_extractor = make_extractor(network, TINY_VIT, KWARGS, "0" * 64)
    assert "token_merging" not in plain_extractor.fingerprint
    assert fingerprint_sha256(plain_extractor.fingerprint) != fingerprint_sha256(merged_extractor.fingerprint)
