"""Creating timm models, importing foreign weights, and model artifact round trips."""

from __future__ import annotations

import pytest
import torch

from tapvits_cli.artifacts.external import read_weights_file
from tapvits_cli.artifacts.model import load_model, write_model
from tapvits_cli.errors import ExitCode, InvalidArtifactError, NotImplementedStageError
from tapvits_cli.models.factory import create_model, describe_model
from tapvits_cli.models.families import family_module, vit
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, model_args


def tiny(seed=0):
    torch.manual_seed(seed)
    return create_model(TINY_VIT, TINY_VIT_KWARGS).eval()


def inputs():
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_identical_outputs(tmp_path):
    model = tiny()
    spec = describe_model(model, TINY_VIT, TINY_VIT_KWARGS, [str(i) for i in range(10)])
    path = write_model(tmp_path / "m.safetensors", model, spec, params={"seed": 0})
    read = load_model(path)
    loaded, loaded_spec, artifact = read.module, read.spec, read.artifact
    assert loaded_spec == spec
    assert torch.equal(loaded(inputs()), model(inputs()))
    assert artifact.header.kind == "model"


def test_spec_records_deit_tiny_shape_at_28px():
    model = create_model(TINY_VIT, {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10})
    spec = describe_model(model, TINY_VIT, {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10})
    assert spec.family == "vit" and len(spec.blocks) == 12
    assert spec.blocks[0].heads == 3 and spec.blocks[0].mlp_hidden == 768
    assert spec.preprocessing["input_size"] == [1, 28, 28]


def test_pruned_widths_rebuild_from_the_artifact(tmp_path):
    """A model with narrower blocks reloads from its metadata alone (what `prune` relies on)."""
    model = tiny()
    widths = list(vit.block_widths(model))
    widths[0] = type(widths[0])(heads=2, head_dim=widths[0].head_dim, mlp_hidden=30)
    torch.manual_seed(3)
    vit.set_block_widths(model, widths)
    spec = describe_model(model, TINY_VIT, TINY_VIT_KWARGS)
    assert spec.blocks[0].heads == 2 and spec.blocks[0].mlp_hidden == 30
    path = write_model(tmp_path / "p.safetensors", model, spec, params={})
    loaded = load_model(path).module
    assert torch.equal(loaded(inputs()), model.eval()(inputs()))
    assert loaded.blocks[0].attn.qkv.out_features == 3 * 2 * 8


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_torch_checkpoint_import(tmp_path, tapvits, wrap):
    source = tiny(seed=5)
    state = source.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    checkpoint = tmp_path / "ckpt.pth"
    torch.save(state, checkpoint)
    out = tmp_path / "m.safetensors"
    result = tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--weights", checkpoint, "-o", out)
    assert result.exit_code == 0, result.stderr
    read = load_model(out)
    loaded, artifact = read.module, read.artifact
    assert torch.equal(loaded(inputs()), source(inputs()))
    assert artifact.header.inputs["weights"].kind == "file"


def test_safetensors_weights_import(tmp_path, tapvits):
    from safetensors.torch import save_file

    source = tiny(seed=6)
    weights = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(weights))
    out = tmp_path / "m.safetensors"
    assert tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--weights", weights, "-o", out).exit_code == 0
    assert torch.equal(load_model(out).module(inputs()), source(inputs()))


def test_pickled_module_is_refused(tmp_path):
    checkpoint = tmp_path / "whole_module.pth"
    torch.save(tiny(), checkpoint)  # a pickled nn.Module, not a state dict
    with pytest.raises(InvalidArtifactError, match="weights-only"):
        read_weights_file(checkpoint)


@pytest.mark.parametrize("keyword", ["pretrained=true", "checkpoint_path=/etc/hosts", "cache_dir=/tmp"])
def test_keyword_arguments_that_load_weights_or_files_are_refused(keyword, tmp_path, tapvits):
    """``-a`` shapes the architecture; weights come only through --pretrained or --weights."""
    result = tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-a", keyword,
                     "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE and keyword.split("=")[0] in result.stderr
    assert "--pretrained or --weights" in result.stderr and not (tmp_path / "m.safetensors").exists()


def test_a_yaml_alias_bomb_in_a_model_argument_is_refused_at_once():
    from tapvits_cli.errors import UsageError
    from tapvits_cli.models.arguments import parse_model_args

    bomb = "[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(
        f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi")) + "]"   # 10⁹ values expanded
    with pytest.raises(UsageError, match="anchors and aliases"):
        parse_model_args((f"depth={bomb}",))
    assert parse_model_args(("img_size=[28, 28]", "depth=2", "mlp_ratio=2.0")) == {
        "img_size": [28, 28], "depth": 2, "mlp_ratio": 2.0}


def test_weights_for_another_shape_are_refused(tmp_path, tapvits):
    other = create_model(TINY_VIT, {**TINY_VIT_KWARGS, "embed_dim": 12})
    checkpoint = tmp_path / "other.pth"
    torch.save(other.state_dict(), checkpoint)
    result = tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--weights", checkpoint,
                     "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE and "does not fit" in result.stderr


def test_unsupported_family_is_generic_and_not_prunable(tmp_path, tapvits):
    out = tmp_path / "resnet.safetensors"
    result = tapvits("--json", "create-model", "resnet18", "-a", "num_classes=3", "-o", out)
    assert result.exit_code == 0 and result.json()["family"] == "generic"
    read = load_model(out)
    loaded, spec = read.module, read.spec
    assert spec.blocks == () and loaded(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(NotImplementedStageError, match="supported families: vit"):
        family_module(spec.family)


def test_pretrained_flag_reaches_timm_and_fails_cleanly_offline(tmp_path, tapvits, monkeypatch):
    """Offline, --pretrained must fail with the data-unavailable code, not a traceback."""
    import timm

    calls = {}

    def fake_create_model(name, pretrained=False, **kwargs):
        calls["pretrained"] = pretrained
        raise OSError("offline")

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    result = tapvits("create-model", TINY_VIT, "--pretrained", "-o", tmp_path / "m.safetensors")
    assert calls == {"pretrained": True}
    assert result.exit_code == ExitCode.DATA_UNAVAILABLE and "pretrained" in result.stderr
