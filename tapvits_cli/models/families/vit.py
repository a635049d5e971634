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
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from tapvits_cli.errors import NotImplementedStageError
from tapvits_cli.models.spec import BlockWidths
from tapvits_cli.models.units import (BlockSequence, CostModel, LayerCost, OwnedWeights, UnitLayer,
                                      unit_params)


def is_member(model) -> bool:
    """A VisionTransformer whose blocks use timm's plain ``Attention`` and ``Mlp``."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, VisionTransformer

    return isinstance(model, VisionTransformer) and all(
        isinstance(blk.attn, (Attention, EmptyBranch)) and isinstance(blk.mlp, (Mlp, EmptyBranch)) for blk in model.blocks
    )


class EmptyBranch(nn.Module):
    """A removed attention or MLP branch: contributes zeros to the residual stream, owns no weight.

    ``head_dim`` keeps the architecture's head width of a removed attention branch, so the
    spec still says what a head of this block was.
    """

    def __init__(self, head_dim: int = 0):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def block_widths(model) -> tuple[BlockWidths, ...]:
    def mlp_hidden(mlp):
        return 0 if isinstance(mlp, EmptyBranch) else mlp.fc1.out_features

    return tuple(
        BlockWidths(heads=getattr(blk.attn, "num_heads", 0), head_dim=blk.attn.head_dim, mlp_hidden=mlp_hidden(blk.mlp))
        for blk in model.blocks
    )


def _remove_branch(blk, kind: str) -> None:
    """Replace a block's attention or MLP branch (its norm and layer scale too) by an :class:`EmptyBranch`."""
    if kind == "attn":
        blk.norm1, blk.attn, blk.ls1 = nn.Identity(), EmptyBranch(blk.attn.head_dim), nn.Identity()
    else:
        blk.norm2, blk.mlp, blk.ls2 = nn.Identity(), EmptyBranch(), nn.Identity()


def _check_prunable(index: int, blk) -> None:
    """Narrower q/k/v and fc1 equal the masked model only without a norm or gate across units."""
    attn, mlp = blk.attn, blk.mlp
    if isinstance(attn, EmptyBranch) or isinstance(mlp, EmptyBranch):
        raise NotImplementedStageError(f"block {index} already lost a whole branch; pruning or scoring such a "
                                       "model again is not supported yet")
    if getattr(attn, "gate", None) is not None or not isinstance(attn.norm, nn.Identity) \
            or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise NotImplementedStageError(f"block {index}: gated or inner-normed attention/MLP is not supported yet")


def set_block_widths(model, widths: Sequence[BlockWidths]) -> None:
    """Resize each block's attention and MLP to ``widths`` (fresh, uninitialised weights).

    Used when loading a pruned artifact: the architecture is rebuilt at the recorded
    widths, then the stored weights are loaded strictly on top. Width 0 removes the branch.
    """
    if len(widths) != len(model.blocks):
        raise ValueError(f"{len(widths)} block widths for a model with {len(model.blocks)} blocks")
    for index, (blk, width) in enumerate(zip(model.blocks, widths)):
        attn, mlp = blk.attn, blk.mlp
        if width.head_dim != attn.head_dim:
            raise ValueError(f"block {index}: head_dim {width.head_dim} differs from the architecture's {attn.head_dim}")
        if width.heads != attn.num_heads or width.mlp_hidden != mlp.fc1.out_features:
            _check_prunable(index, blk)
        if width.heads == 0:
            _remove_branch(blk, "attn")
        elif width.heads != attn.num_heads:
            dim, attn_dim = attn.qkv.in_features, width.heads * width.head_dim
            attn.qkv = nn.Linear(dim, 3 * attn_dim, bias=attn.qkv.bias is not None)
            attn.proj = nn.Linear(attn_dim, attn.proj.out_features, bias=attn.proj.bias is not None)
            attn.num_heads, attn.attn_dim = width.heads, attn_dim
        if width.mlp_hidden == 0:
            _remove_branch(blk, "mlp")
        elif width.mlp_hidden != mlp.fc1.out_features:
            mlp.fc1 = nn.Linear(mlp.fc1.in_features, width.mlp_hidden, bias=mlp.fc1.bias is not None)
            mlp.fc2 = nn.Linear(width.mlp_hidden, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)


def prune_blocks(model, attn_keep: Sequence, mlp_keep: Sequence) -> None:
    """Keep, in place, only the listed heads and MLP neurons of each block (sorted indices).

    A head keeps its ``head_dim`` rows of each of q, k and v in ``qkv`` (laid out
    ``[3, heads, head_dim]`` along the rows) and the matching input columns of ``proj``;
    a neuron its row of ``fc1`` and column of ``fc2``. Output biases stay whole. An empty
    list removes the branch (see :class:`EmptyBranch`).
    """
    for index, (blk, heads, neurons) in enumerate(zip(model.blocks, attn_keep, mlp_keep)):
        _check_prunable(index, blk)
        attn, mlp = blk.attn, blk.mlp
        heads = torch.as_tensor(heads, dtype=torch.long, device=attn.qkv.weight.device)
        neurons = torch.as_tensor(neurons, dtype=torch.long, device=mlp.fc1.weight.device)
        if len(heads) == 0:
            _remove_branch(blk, "attn")
        elif len(heads) < attn.num_heads:
            channels = (heads[:, None] * attn.head_dim + torch.arange(attn.head_dim, device=heads.device)).reshape(-1)
            rows = (torch.arange(3, device=heads.device)[:, None] * attn.attn_dim + channels).reshape(-1)
            attn.qkv = _sliced(attn.qkv, rows=rows)
            attn.proj = _sliced(attn.proj, columns=channels)
            attn.num_heads, attn.attn_dim = len(heads), len(channels)
        if len(neurons) == 0:
            _remove_branch(blk, "mlp")
        elif len(neurons) < mlp.fc1.out_features:
            mlp.fc1, mlp.fc2 = _sliced(mlp.fc1, rows=neurons), _sliced(mlp.fc2, columns=neurons)


def _sliced(linear, rows=None, columns=None):
    """A new ``nn.Linear`` holding the selected output rows (with their bias) or input columns."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight, bias = weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows)
    if columns is not None:
        weight = weight.index_select(1, columns)
    sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    sliced.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        sliced.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return sliced


def unit_layers(model) -> list[UnitLayer]:
    """Per block, its attention heads then its MLP neurons (execution order)."""
    layers = []
    for index, blk in enumerate(model.blocks):
        _check_prunable(index, blk)
        attn, mlp = blk.attn, blk.mlp
        heads, head_dim, hidden = attn.num_heads, attn.head_dim, mlp.fc1.out_features

        def qkv_rows(t, heads=heads, head_dim=head_dim):   # (3*A, ...) -> (heads, 3*head_dim*...)
            return t.reshape(3, heads, head_dim, -1).transpose(0, 1).reshape(heads, -1)

        def proj_columns(t, heads=heads, head_dim=head_dim):   # (dim, A) -> (heads, dim*head_dim)
            return t.reshape(t.shape[0], heads, head_dim).transpose(0, 1).reshape(heads, -1)

        owned_heads = [OwnedWeights(attn.qkv.weight, qkv_rows), OwnedWeights(attn.proj.weight, proj_columns)]
        if attn.qkv.bias is not None:
            owned_heads.append(OwnedWeights(attn.qkv.bias, qkv_rows))
        owned_neurons = [OwnedWeights(mlp.fc1.weight, lambda t, n=hidden: t.reshape(n, -1)),
                         OwnedWeights(mlp.fc2.weight, lambda t: t.t())]
        if mlp.fc1.bias is not None:
            owned_neurons.append(OwnedWeights(mlp.fc1.bias, lambda t, n=hidden: t.reshape(n, 1)))
        layers.append(UnitLayer(index, "attn", heads, head_dim, attn.proj, tuple(owned_heads), _tokens))
        layers.append(UnitLayer(index, "mlp", hidden, 1, mlp.fc2, tuple(owned_neurons), _tokens))
    return layers


def _tokens(x):
    """ViT gate inputs already are (samples, tokens, channels)."""
    return x


def block_sequence(model) -> BlockSequence:
    """``forward_features`` + ``forward_head`` split at block boundaries (eval mode, no masks)."""
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
