"""Bring your own model: checkpoints in each supported layout into model artifacts (``create-model --weights``).

The Hugging Face ``transformers`` checkpoints are written here from that library's
documented layout (ViTForImageClassification, ViTModel, DeiTForImageClassificationWithTeacher,
SwinForImageClassification), walking a timm module's parts, not by inverting the mapping
under test. Everything is tiny and built in the test; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

from tapvits_cli.artifacts.model import load_model
from tapvits_cli.errors import ExitCode
from tapvits_cli.models.factory import create_model
from tests.conftest import model_args

VIT = ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2,
                                "mlp_ratio": 2.0, "num_classes": 5})
DEIT = ("deit_tiny_distilled_patch16_224", {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2,
                                            "num_heads": 2, "mlp_ratio": 2.0, "num_classes": 5})
SWIN = ("swin_tiny_patch4_window7_224", {"img_size": 16, "patch_size": 2, "window_size": 4, "embed_dim": 8,
                                         "depths": [2, 2], "num_heads": [1, 2], "num_classes": 5})


def source_model(arch, kwargs, seed=11):
    torch.manual_seed(seed)
    model = create_model(arch, kwargs).eval()
    with torch.no_grad():   # timm zero-initialises some tensors (heads, tokens): make every one distinctive
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    return model


def pre_logits(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _qkv(prefix, qkv):
    """transformers' three projections from timm's fused one (rows: query, key, value)."""
    out = {}
    for param in ("weight", "bias"):
        for name, part in zip(("query", "key", "value"), getattr(qkv, param).detach().chunk(3, dim=0)):
            out[f"{prefix}.{name}.{param}"] = part.clone()
    return out


def _linear(prefix, module):
    return {f"{prefix}.weight": module.weight.detach().clone(), f"{prefix}.bias": module.bias.detach().clone()}


def transformers_vit(model, base="vit.", heads=(("classifier", "head"),), pooler=False):
    """ViT/DeiT in transformers' names: embeddings, encoder.layer.N (attention.attention.query...), layernorm."""
    state = {f"{base}embeddings.cls_token": model.cls_token.detach().clone(),
             f"{base}embeddings.position_embeddings": model.pos_embed.detach().clone(),
             **_linear(f"{base}embeddings.patch_embeddings.projection", model.patch_embed.proj),
             **_linear(f"{base}layernorm", model.norm)}
    if getattr(model, "dist_token", None) is not None:
        state[f"{base}embeddings.distillation_token"] = model.dist_token.detach().clone()
    for i, block in enumerate(model.blocks):
        layer = f"{base}encoder.layer.{i}"
        state.update(_linear(f"{layer}.layernorm_before", block.norm1))
        state.update(_qkv(f"{layer}.attention.attention", block.attn.qkv))
        state.update(_linear(f"{layer}.attention.output.dense", block.attn.proj))
        state.update(_linear(f"{layer}.layernorm_after", block.norm2))
        state.update(_linear(f"{layer}.intermediate.dense", block.mlp.fc1))
        state.update(_linear(f"{layer}.output.dense", block.mlp.fc2))
    if pooler:   # ViTModel(add_pooling_layer=True): a tanh pooler timm does not have
        state.update({f"{base}pooler.dense.weight": torch.randn(16, 16), f"{base}pooler.dense.bias": torch.randn(16)})
    for hf_name, timm_name in heads:
        state.update(_linear(hf_name, model.get_submodule(timm_name)))
    return state


def transformers_swin(model, base="swin."):
    """Swin in transformers' names: patch merging at the *end* of stage S (timm: start of stage S+1)."""
    state = {**_linear(f"{base}embeddings.patch_embeddings.projection", model.patch_embed.proj),
             **_linear(f"{base}embeddings.norm", model.patch_embed.norm),
             **_linear(f"{base}layernorm", model.norm),
             **_linear("classifier", model.head.fc)}
    for s, stage in enumerate(model.layers):
        if s > 0:
            merge = f"{base}encoder.layers.{s - 1}.downsample"
            state[f"{merge}.reduction.weight"] = stage.downsample.reduction.weight.detach().clone()
            state.update(_linear(f"{merge}.norm", stage.downsample.norm))
        for b, block in enumerate(stage.blocks):
            prefix = f"{base}encoder.layers.{s}.blocks.{b}"
            state.update(_linear(f"{prefix}.layernorm_before", block.norm1))
            state[f"{prefix}.attention.self.relative_position_bias_table"] = \
                block.attn.relative_position_bias_table.detach().clone()
            state[f"{prefix}.attention.self.relative_position_index"] = block.attn.relative_position_index.clone()
            state.update(_qkv(f"{prefix}.attention.self", block.attn.qkv))
            state.update(_linear(f"{prefix}.attention.output.dense", block.attn.proj))
            state.update(_linear(f"{prefix}.layernorm_after", block.norm2))
            state.update(_linear(f"{prefix}.intermediate.dense", block.mlp.fc1))
            state.update(_linear(f"{prefix}.output.dense", block.mlp.fc2))
    return state


def save(state, path):
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# name -> (architecture and kwargs, checkpoint writer, file name, detected layout, the checkpoint has a classifier)
LAYOUTS = {
    "timm-pth": (VIT, lambda m: m.state_dict(), "w.pth", "timm", True),
    "timm-safetensors": (VIT, lambda m: m.state_dict(), "w.safetensors", "timm", True),
    "prefixed-nested-pth": (VIT, lambda m: {"epoch": 3, "model": {f"module.{k}": v for k, v in m.state_dict().items()}},
                            "w.pth", "timm", True),
    "prefixed-safetensors": (VIT, lambda m: {f"module.model.{k}": v for k, v in m.state_dict().items()},
                             "w.safetensors", "timm", True),
    "transformers-vit": (VIT, transformers_vit, "model.safetensors", "transformers-vit", True),
    "transformers-vit-bin": (VIT, lambda m: {"module." + k: v for k, v in transformers_vit(m).items()},
                             "pytorch_model.bin", "transformers-vit", True),
    "transformers-vitmodel": (VIT, lambda m: transformers_vit(m, base="", heads=(), pooler=True),
                              "model.safetensors", "transformers-vit", False),
    "transformers-deit": (DEIT, lambda m: transformers_vit(m, base="deit.", heads=(
        ("cls_classifier", "head"), ("distillation_classifier", "head_dist"))),
        "model.safetensors", "transformers-vit", True),
    "transformers-swin": (SWIN, transformers_swin, "model.safetensors", "transformers-swin", True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_converts_with_new_classes_and_image_size(tmp_path, tapvits, layout):
    (arch, kwargs), write, filename, detected, has_head = LAYOUTS[layout]
    source = source_model(arch, kwargs)
    checkpoint = save(write(source), tmp_path / filename)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def convert(name, **changes):
        out = tmp_path / f"{name}.safetensors"
        result = tapvits("--json", "create-model", arch, *model_args({**kwargs, **changes}),
                         "--weights", checkpoint, "-o", out)
        assert result.exit_code == 0, result.stderr
        assert result.json()["weights_layout"] == detected
        assert tapvits("validate", out).exit_code == 0
        return load_model(out).module, result.json()["adapted"]

    same, notes = convert("same")
    assert torch.equal(pre_logits(same, x), pre_logits(source, x))
    if has_head:   # the whole model, classifier included
        assert notes == [] and torch.equal(same(x), source(x))

    fewer, notes = convert("classes", num_classes=3)
    assert torch.equal(pre_logits(fewer, x), pre_logits(source, x))
    assert fewer(x).shape == (3, 3) and any("classifier" in n for n in notes)

    bigger, notes = convert("size", img_size=32)
    expected, actual = source.state_dict(), bigger.state_dict()
    assert set(actual) == set(expected)
    assert bigger(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    if "pos_embed" in expected:
        from timm.layers import resample_abs_pos_embed

        prefix = source.num_prefix_tokens
        assert actual["pos_embed"].shape[1] == 8 * 8 + prefix and any("pos_embed" in n for n in notes)
        assert torch.equal(actual["pos_embed"], resample_abs_pos_embed(expected["pos_embed"], [8, 8], [4, 4],
                                                                       num_prefix_tokens=prefix))
        assert torch.equal(actual["pos_embed"][:, :prefix], expected["pos_embed"][:, :prefix])
    untouched = [k for k in expected if k != "pos_embed" and not k.startswith("head")]
    assert all(torch.equal(actual[k], expected[k]) for k in untouched)


def test_transformers_checkpoint_maps_to_timm_names_exactly():
    """The renamed state equals timm's own, tensor for tensor (qkv fused in query, key, value order)."""
    from tapvits_cli.models.checkpoints import to_timm_names

    for (arch, kwargs), write in ((VIT, transformers_vit), (SWIN, transformers_swin)):
        source = source_model(arch, kwargs)
        renamed, _ = to_timm_names(write(source), "test")
        expected = source.state_dict()
        assert set(renamed) == set(expected)
        assert all(torch.equal(renamed[k], expected[k]) for k in expected)


def test_unmapped_transformers_tensor_and_incomplete_qkv_are_refused(tmp_path, tapvits):
    (arch, kwargs) = VIT
    state = transformers_vit(source_model(arch, kwargs))
    extra = save({**state, "vit.encoder.layer.0.attention.attention.rotary.weight": torch.zeros(2)},
                 tmp_path / "extra.safetensors")
    result = tapvits("create-model", arch, *model_args(kwargs), "--weights", extra, "-o", tmp_path / "a.safetensors")
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "rotary" in result.stderr
    del state["vit.encoder.layer.1.attention.attention.key.bias"]
    partial = save(state, tmp_path / "partial.safetensors")
    result = tapvits("create-model", arch, *model_args(kwargs), "--weights", partial, "-o", tmp_path / "b.safetensors")
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "blocks.1.attn.qkv.bias" in result.stderr


def test_a_shared_prefix_that_is_not_a_wrapper_is_kept():
    from tapvits_cli.models.checkpoints import strip_wrapper_prefixes

    assert strip_wrapper_prefixes({"module.model.a": 1, "module.model.b": 2}) == {"a": 1, "b": 2}
    assert strip_wrapper_prefixes({"model.a": 1, "head.b": 2}) == {"model.a": 1, "head.b": 2}


def test_other_widths_still_do_not_fit(tmp_path, tapvits):
    """Only the classifier and the token grid adapt: another depth is a usage error naming the tensors."""
    (arch, kwargs) = VIT
    checkpoint = save(source_model(arch, {**kwargs, "depth": 1}).state_dict(), tmp_path / "w.safetensors")
    result = tapvits("create-model", arch, *model_args({**kwargs, "num_classes": 3}), "--weights", checkpoint,
                     "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE and "missing ['blocks.1." in result.stderr


def _fake_hub(monkeypatch, cached: bool):
    """timm.create_model that finds weights only in the hub cache, recording whether each call was offline."""
    import timm
    from huggingface_hub import constants

    calls, real = [], timm.create_model

    def fake(name, pretrained=False, **kwargs):
        if pretrained:
            calls.append(constants.HF_HUB_OFFLINE)
        if pretrained and not (cached and constants.HF_HUB_OFFLINE):
            raise OSError("not in the local cache")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)
    return calls


def test_pretrained_with_hf_hub_offline_fails_at_once_in_one_line(tmp_path, tapvits, monkeypatch):
    from huggingface_hub import constants

    from tapvits_cli.models import factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(factory, "_reachable", lambda *a: pytest.fail("offline mode must not touch the network"))
    calls = _fake_hub(monkeypatch, cached=False)
    result = tapvits("create-model", VIT[0], *model_args(VIT[1]), "--pretrained", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.DATA_UNAVAILABLE and calls == [True]
    assert "HF_HUB_OFFLINE" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_pretrained_unreachable_hub_fails_without_a_download_attempt(tmp_path, tapvits, monkeypatch):
    from huggingface_hub import constants

    from tapvits_cli.models import factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(factory, "_reachable", lambda *a: False)
    calls = _fake_hub(monkeypatch, cached=False)
    result = tapvits("create-model", VIT[0], *model_args(VIT[1]), "--pretrained", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.DATA_UNAVAILABLE and calls == [True]   # the cache only, then stop
    assert "cannot be reached" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert constants.HF_HUB_OFFLINE is False   # offline mode was only lent to the cache lookup


def test_pretrained_from_the_hub_cache_needs_no_network(tmp_path, tapvits, monkeypatch):
    from huggingface_hub import constants

    from tapvits_cli.models import factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(factory, "_reachable", lambda *a: pytest.fail("a cached model must not touch the network"))
    calls = _fake_hub(monkeypatch, cached=True)
    result = tapvits("create-model", VIT[0], *model_args(VIT[1]), "--pretrained", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.stderr
    assert calls == [True]


def test_transformers_deit_without_teacher_head_gets_a_fresh_distillation_head(tmp_path, tapvits):
    """DeiTForImageClassification: ``classifier`` becomes ``head``; ``head_dist`` has nothing to come from."""
    (arch, kwargs) = DEIT
    source = source_model(arch, kwargs)
    checkpoint = save(transformers_vit(source, base="deit.", heads=(("classifier", "head"),)),
                      tmp_path / "model.safetensors")
    out = tmp_path / "m.safetensors"
    result = tapvits("--json", "create-model", arch, *model_args(kwargs), "--weights", checkpoint, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert [n.split(":")[0] for n in result.json()["adapted"]] == ["classifier head_dist reset"]
    loaded = load_model(out).module.state_dict()
    assert torch.equal(loaded["head.weight"], source.head.weight)
    assert not torch.equal(loaded["head_dist.weight"], source.head_dist.weight)


def test_rgb_weights_adapt_to_one_input_channel(tmp_path, tapvits):
    """timm's adapt_input_conv sums the RGB filters: a grey image gives the features of its RGB copy."""
    (arch, kwargs) = VIT
    source = source_model(arch, kwargs)
    checkpoint = save(source.state_dict(), tmp_path / "rgb.safetensors")
    out = tmp_path / "grey.safetensors"
    result = tapvits("--json", "create-model", arch, *model_args({**kwargs, "in_chans": 1}), "--weights", checkpoint,
                     "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.json()["adapted"] == ["patch_embed.proj adapted: 3 → 1 input channels"]
    grey = load_model(out).module
    assert torch.equal(grey.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(pre_logits(grey, x), pre_logits(source, x.repeat(1, 3, 1, 1)))
