"""timm VisionTransformer (ViT/DeiT): block widths, their physical rebuild, and unit views.

timm's ``Attention`` keeps ``attn_dim = num_heads * head_dim`` separate from the
embedding width, so a block with fewer heads is an ordinary ``Attention`` whose
``qkv`` and ``proj`` are narrower: no custom module is needed, and a pruned model
stays a plain timm model.

Units (see ``models/units.py``): an MLP neuron is a row of ``fc1`` (weight and bias) and
a column of ``fc2``; its output is channel j of ``fc2``'s input. A head is its ``head_dim``
rows of each of q, k and v in ``qkv`` (weight and bias) and the matching columns of
``proj``; its output is its ``head_dim`` channels of ``proj``'s input (timm concatenates
heads head-major). Zeroing those channels equals deleting the unit's weights.

A branch that keeps no unit at all is removed with its norm and layer scale: the block
holds an :class:`EmptyBranch` there and computes ``x + 0`` for it (width 0 in the spec).
The slicing itself is shared with Swin (``branches.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tapvits_cli.models.families.branches import (EmptyBranch, check_prunable, head_weights, mlp_hidden,
                                                  neuron_weights, resize_blocks, slice_blocks)
from tapvits_cli.models.spec import BlockWidths
from tapvits_cli.models.units import BlockSequence, CostModel, LayerCost, UnitLayer, unit_params


def is_member(model) -> bool:
    """A VisionTransformer whose blocks use timm's plain ``Attention`` and ``Mlp``."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, VisionTransformer

    return isinstance(model, VisionTransformer) and all(
        isinstance(blk.attn, (Attention, EmptyBranch)) and isinstance(blk.mlp, (Mlp, EmptyBranch)) for blk in model.blocks
    )


def block_widths(model) -> tuple[BlockWidths, ...]:
    return tuple(
        BlockWidths(heads=getattr(blk.attn, "num_heads", 0), head_dim=blk.attn.head_dim, mlp_hidden=mlp_hidden(blk.mlp))
        for blk in model.blocks
    )


def set_block_widths(model, widths: Sequence[BlockWidths]) -> None:
    """Resize each block's attention and MLP to ``widths`` (fresh, uninitialised weights).

    Used when loading a pruned artifact: the architecture is rebuilt at the recorded
    widths, then the stored weights are loaded strictly on top. Width 0 removes the branch.
    """
    resize_blocks(model.blocks, widths, _head_dim, _heads_resized)


def prune_blocks(model, attn_keep: Sequence, mlp_keep: Sequence) -> None:
    """Keep, in place, only the listed heads and MLP neurons of each block (sorted indices).

    A head keeps its ``head_dim`` rows of each of q, k and v in ``qkv`` (laid out
    ``[3, heads, head_dim]`` along the rows) and the matching input columns of ``proj``;
    a neuron its row of ``fc1`` and column of ``fc2``. Output biases stay whole. An empty
    list removes the branch (see :class:`EmptyBranch`).
    """
    slice_blocks(model.blocks, attn_keep, mlp_keep, _head_dim, _heads_resized_to_kept)


def _head_dim(attn) -> int:
    return attn.head_dim


def _heads_resized(attn, heads: int) -> None:
    attn.attn_dim = heads * attn.head_dim   # timm's Attention reshapes its output by attn_dim


def _heads_resized_to_kept(attn, heads: torch.Tensor) -> None:
    _heads_resized(attn, len(heads))


def unit_layers(model) -> list[UnitLayer]:
    """Per block, its attention heads then its MLP neurons (execution order)."""
    layers = []
    for index, blk in enumerate(model.blocks):
        attn, mlp = blk.attn, blk.mlp
        check_prunable(index, attn, mlp)
        layers.append(UnitLayer(index, "attn", attn.num_heads, attn.head_dim, attn.proj,
                                tuple(head_weights(attn, attn.head_dim)), _tokens))
        layers.append(UnitLayer(index, "mlp", mlp.fc1.out_features, 1, mlp.fc2, tuple(neuron_weights(mlp)), _tokens))
    return layers


def _tokens(x):
    """ViT gate inputs already are (samples, tokens, channels)."""
    return x


def block_sequence(model) -> BlockSequence:
    """``forward_features`` + ``forward_head`` split at block boundaries (eval mode, no masks).

    A replay from block l cannot carry merged token sizes, so a token-merging model is refused.
    """
    from tapvits_cli.errors import UsageError

    # A merging model's blocks carry their ``merging`` (models.token_merging.MergingBlocks); asked
    # of the module rather than by importing that one, which needs this family to check support.
    if getattr(model.blocks, "merging", None) is not None:
        raise UsageError("layer importance replays blocks without token merging: score the model before merging "
                         "(tapvits prune MODEL --merge none -o unmerged.safetensors writes such a copy)")

    def stem(images):
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    return BlockSequence(stem=stem, blocks=list(model.blocks), tail=lambda x: model.forward_head(model.norm(x)))


def cost_model(model) -> CostModel:
    """Parameters and MACs per unit, branch and the rest; works on a ``meta``-device model.

    With T tokens (patches + prefix tokens), embedding width d, per image:
    a head costs T·hd·3d (its q, k, v) + T·hd·d (its ``proj`` columns) + 2·T²·hd
    (scores and weighted sum) MACs; an MLP neuron 2·T·d. The rest is the patch
    embedding (patches · d · C·p_h·p_w) and the classifier (d · classes for the one pooled
    vector); attention-pooling heads (``global_pool='map'``) are not counted.
    """
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    layers, unit_total = [], 0
    for layer in unit_layers(model):
        blk = model.blocks[layer.block]
        if layer.kind == "attn":
            branch, dim = (blk.norm1, blk.attn, blk.ls1), blk.attn.qkv.in_features
            macs = tokens * layer.channels * 4 * dim + 2 * tokens * tokens * layer.channels
        else:
            branch, dim = (blk.norm2, blk.mlp, blk.ls2), blk.mlp.fc1.in_features
            macs = 2 * tokens * dim
        per_unit = unit_params(layer)
        branch_params = sum(p.numel() for module in branch for p in module.parameters()) - per_unit * layer.units
        unit_total += per_unit * layer.units + branch_params
        layers.append(LayerCost(layer.block, layer.kind, layer.units, per_unit, macs, branch_params))
    conv = model.patch_embed.proj
    fixed_macs = model.patch_embed.num_patches * conv.out_channels * (conv.in_channels // conv.groups) \
        * conv.kernel_size[0] * conv.kernel_size[1]
    if getattr(model.head, "weight", None) is not None:
        fixed_macs += model.head.in_features * model.head.out_features
    fixed_params = sum(p.numel() for p in model.parameters()) - unit_total
    return CostModel(fixed_params=fixed_params, fixed_macs=fixed_macs, layers=tuple(layers))
