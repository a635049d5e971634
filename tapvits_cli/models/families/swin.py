"""timm SwinTransformer: block widths, their physical rebuild, and unit views.

Blocks are numbered across stages in execution order (``layers[0].blocks[0]`` is block 0;
the first block of stage s > 0 is preceded by that stage's patch merging). Each block is
a window attention and an ``Mlp`` (see ``branches.py``); its tokens are laid out
``[B, H, W, C]``, and the attention runs on windows of ``window_size`` (cyclically shifted
in every second block), batched as ``[B · windows, window area, C]``.

Units: an MLP neuron as in ViT. A head owns its q, k, v rows of ``qkv``, its ``proj``
columns **and its column of** ``relative_position_bias_table`` (``[(2·Wh−1)(2·Ww−1),
heads]``): the bias is added to that head's attention logits only. The relative position
index and the shifted-window mask are per window, not per head (timm broadcasts the mask
over ``num_heads``), so they stay as they are and a block with fewer heads shifts and
masks exactly as before. The scale 1/√head_dim is unchanged because head_dim is.

Not pruned: patch merging and the stages' embedding widths (what the residual stream, the
norms and the next stage's input are sized by). A pruned Swin keeps the architecture's
stage widths; only heads and MLP widths change, so the spec's per-block widths rebuild it.

Windows per image are read off each block's ``input_resolution`` (the model's input size,
which tapvits always feeds it): scoring regroups the attention's per-window gate input
into per-image tokens with it (the zero padding up to whole windows included: the
attention computes those tokens too), and the cost model counts with it.

A removed attention branch (an ``EmptyBranch`` in ``attn``) is still preceded by the
block's window shift and partition (timm's block does those around ``attn``): correct,
since the branch adds zeros, but not free.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from tapvits_cli.models.families.branches import (EmptyBranch, check_prunable, head_weights, mlp_hidden,
                                                  neuron_weights, resize_blocks, slice_blocks)
from tapvits_cli.models.spec import BlockWidths
from tapvits_cli.models.units import (BlockSequence, CostModel, LayerCost, OwnedWeights, UnitLayer,
                                      unit_params)


def is_member(model) -> bool:
    """A SwinTransformer (v1, incl. S3) whose blocks use timm's ``WindowAttention`` and plain ``Mlp``."""
    from timm.layers import Mlp
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention

    return isinstance(model, SwinTransformer) and all(
        isinstance(blk, SwinTransformerBlock) and isinstance(blk.attn, (WindowAttention, EmptyBranch))
        and isinstance(blk.mlp, (Mlp, EmptyBranch)) for blk in stage_blocks(model))


def stage_blocks(model) -> list:
    """Every ``SwinTransformerBlock`` of every stage, in execution order: block i of the spec."""
    return [blk for stage in model.layers for blk in stage.blocks]


def _head_dim(attn) -> int:
    """WindowAttention records no head_dim: it is the width of q (a third of ``qkv``) per head."""
    return attn.head_dim if isinstance(attn, EmptyBranch) else attn.qkv.out_features // 3 // attn.num_heads


def block_widths(model) -> tuple[BlockWidths, ...]:
    return tuple(BlockWidths(heads=getattr(blk.attn, "num_heads", 0), head_dim=_head_dim(blk.attn),
                             mlp_hidden=mlp_hidden(blk.mlp)) for blk in stage_blocks(model))


def set_block_widths(model, widths: Sequence[BlockWidths]) -> None:
    """Resize each block's attention (bias table included) and MLP to ``widths`` (fresh weights).

    Used when loading a pruned artifact: the architecture is rebuilt at the recorded
    widths, then the stored weights are loaded strictly on top. Width 0 removes the branch.
    """
    resize_blocks(stage_blocks(model), widths, _head_dim, _bias_table_resized)


def prune_blocks(model, attn_keep: Sequence, mlp_keep: Sequence) -> None:
    """Keep, in place, only the listed heads and MLP neurons of each block (sorted indices).

    A head keeps its q, k, v rows, ``proj`` columns and relative position bias column; a
    neuron its ``fc1`` row and ``fc2`` column. Output biases stay whole. An empty list
    removes the branch (see :class:`~tapvits_cli.models.families.branches.EmptyBranch`).
    """
    slice_blocks(stage_blocks(model), attn_keep, mlp_keep, _head_dim, _bias_table_kept)


def _bias_table_kept(attn, heads: torch.Tensor) -> None:
    """A Swin head also owns its column of the relative position bias table."""
    table = attn.relative_position_bias_table
    attn.relative_position_bias_table = nn.Parameter(table.detach().index_select(1, heads).clone(),
                                                     requires_grad=table.requires_grad)


def _bias_table_resized(attn, heads: int) -> None:
    entries = attn.relative_position_bias_table.shape[0]
    attn.relative_position_bias_table = nn.Parameter(torch.empty(entries, heads))


def _padded_resolution(blk) -> tuple[int, int]:
    """The block's token grid padded up to whole windows (what its attention runs on)."""
    (height, width), (win_h, win_w) = blk.input_resolution, blk.window_size
    return math.ceil(height / win_h) * win_h, math.ceil(width / win_w) * win_w


def unit_layers(model) -> list[UnitLayer]:
    """Per block, its attention heads then its MLP neurons (execution order)."""
    layers = []
    for index, blk in enumerate(stage_blocks(model)):
        attn, mlp = blk.attn, blk.mlp
        check_prunable(index, attn, mlp)
        head_dim, (height, width) = _head_dim(attn), _padded_resolution(blk)
        owned_heads = head_weights(attn, head_dim) + [OwnedWeights(attn.relative_position_bias_table, lambda t: t.t())]

        def image_tokens(x, tokens=height * width):   # (images · windows, window area, C) -> (images, tokens, C)
            return x.reshape(-1, tokens, x.shape[-1])

        layers.append(UnitLayer(index, "attn", attn.num_heads, head_dim, attn.proj, tuple(owned_heads), image_tokens))
        layers.append(UnitLayer(index, "mlp", mlp.fc1.out_features, 1, mlp.fc2, tuple(neuron_weights(mlp)),
                                _tokens))
    return layers


def _tokens(x):
    """The MLP's gate input already is (samples, tokens, channels): the block flattens H×W before it."""
    return x


def block_sequence(model) -> BlockSequence:
    """Patch embedding, then every block (the first of a stage after its patch merging), then norm + head."""
    steps = []
    for stage in model.layers:
        for position, blk in enumerate(stage.blocks):
            steps.append(blk if position else (lambda x, stage=stage, blk=blk: blk(stage.downsample(x))))
    return BlockSequence(stem=model.patch_embed, blocks=steps, tail=lambda x: model.forward_head(model.norm(x)))


def cost_model(model) -> CostModel:
    """Parameters and MACs per unit, branch and the rest; works on a ``meta``-device model.

    For a block on an H×W grid padded to Hp×Wp (whole windows of area a), width d, per
    image: a head costs Hp·Wp·hd·(3d + d) (its q, k, v rows and ``proj`` columns, applied
    to every padded token) + 2·Hp·Wp·a·hd (scores and weighted sum inside each window);
    an MLP neuron 2·H·W·d. The rest: the patch embedding (patches · d · C·p_h·p_w), each
    patch merging (merged tokens · 4d_in · d_out) and the classifier (d · classes).
    """
    layers, unit_total = [], 0
    blocks = stage_blocks(model)
    for layer in unit_layers(model):
        blk = blocks[layer.block]
        if layer.kind == "attn":
            height, width = _padded_resolution(blk)
            area, dim = blk.window_size[0] * blk.window_size[1], blk.attn.qkv.in_features
            branch = (blk.norm1, blk.attn)
            macs = height * width * layer.channels * (4 * dim + 2 * area)
        else:
            branch, dim = (blk.norm2, blk.mlp), blk.mlp.fc1.in_features
            macs = 2 * blk.input_resolution[0] * blk.input_resolution[1] * dim
        per_unit = unit_params(layer)
        branch_params = sum(p.numel() for module in branch for p in module.parameters()) - per_unit * layer.units
        unit_total += per_unit * layer.units + branch_params
        layers.append(LayerCost(layer.block, layer.kind, layer.units, per_unit, macs, branch_params))
    conv = model.patch_embed.proj
    grid_h, grid_w = model.patch_embed.grid_size
    fixed_macs = grid_h * grid_w * conv.out_channels * (conv.in_channels // conv.groups) \
        * conv.kernel_size[0] * conv.kernel_size[1]
    for stage in model.layers:
        if hasattr(stage.downsample, "reduction"):   # PatchMerging (stage 0 has an Identity)
            reduction = stage.downsample.reduction
            fixed_macs += stage.output_resolution[0] * stage.output_resolution[1] \
                * reduction.in_features * reduction.out_features
    classifier = getattr(model.head, "fc", None)
    if getattr(classifier, "weight", None) is not None:
        fixed_macs += classifier.in_features * classifier.out_features
    fixed_params = sum(p.numel() for p in model.parameters()) - unit_total
    return CostModel(fixed_params=fixed_params, fixed_macs=fixed_macs, layers=tuple(layers))
