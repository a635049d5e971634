"""timm VisionTransformer (ViT/DeiT): block widths and their physical rebuild.

timm's ``Attention`` keeps ``attn_dim = num_heads * head_dim`` separate from the
embedding width, so a block with fewer heads is an ordinary ``Attention`` whose
``qkv`` and ``proj`` are narrower: no custom module is needed, and a pruned model
stays a plain timm model.
"""

from __future__ import annotations

from typing import Sequence

from tapvits_cli.errors import NotImplementedStageError
from tapvits_cli.models.spec import BlockWidths


def is_member(model) -> bool:
    """A VisionTransformer whose blocks use timm's plain ``Attention`` and ``Mlp``."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, VisionTransformer

    return isinstance(model, VisionTransformer) and all(
        isinstance(blk.attn, Attention) and isinstance(blk.mlp, Mlp) for blk in model.blocks
    )


def block_widths(model) -> tuple[BlockWidths, ...]:
    return tuple(
        BlockWidths(heads=blk.attn.num_heads, head_dim=blk.attn.head_dim, mlp_hidden=blk.mlp.fc1.out_features)
        for blk in model.blocks
    )


def set_block_widths(model, widths: Sequence[BlockWidths]) -> None:
    """Resize each block's attention and MLP to ``widths`` (fresh, uninitialised weights).

    Used when loading a pruned artifact: the architecture is rebuilt at the recorded
    widths, then the stored weights are loaded strictly on top.
    """
    import torch.nn as nn

    if len(widths) != len(model.blocks):
        raise ValueError(f"{len(widths)} block widths for a model with {len(model.blocks)} blocks")
    for index, (blk, width) in enumerate(zip(model.blocks, widths)):
        attn, mlp = blk.attn, blk.mlp
        if width.heads == 0 or width.mlp_hidden == 0:
            raise NotImplementedStageError(
                f"block {index} has an empty attention or MLP branch; removing whole branches comes with `prune` (issue 5)"
            )
        if width.head_dim != attn.head_dim:
            raise ValueError(f"block {index}: head_dim {width.head_dim} differs from the architecture's {attn.head_dim}")
        if width.heads != attn.num_heads:
            dim, attn_dim = attn.qkv.in_features, width.heads * width.head_dim
            attn.qkv = nn.Linear(dim, 3 * attn_dim, bias=attn.qkv.bias is not None)
            attn.proj = nn.Linear(attn_dim, attn.proj.out_features, bias=attn.proj.bias is not None)
            attn.num_heads, attn.attn_dim = width.heads, attn_dim
            if getattr(attn, "gate", None) is not None or not isinstance(attn.norm, nn.Identity):
                raise NotImplementedStageError(f"block {index}: pruning gated or scale-normed attention is not supported yet")
        if width.mlp_hidden != mlp.fc1.out_features:
            if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
                raise NotImplementedStageError(f"block {index}: pruning an MLP with an inner norm is not supported yet")
            mlp.fc1 = nn.Linear(mlp.fc1.in_features, width.mlp_hidden, bias=mlp.fc1.bias is not None)
            mlp.fc2 = nn.Linear(width.mlp_hidden, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)
