"""Model families: which timm models tapvits can prune, and how their blocks are shaped.

Each family module provides ``is_member(model)``, ``block_widths(model)`` and
``set_block_widths(model, widths)``; unit enumeration for scoring (issue 4) lives here
too, so a new family (Swin) never touches the importance criteria. A model outside
every family can still be loaded and used as a feature extractor: its family is
``generic`` and it has no prunable blocks.
"""

from __future__ import annotations

from types import ModuleType

from tapvits_cli.errors import UsageError
from tapvits_cli.models.families import vit

FAMILIES: dict[str, ModuleType] = {"vit": vit}
GENERIC = "generic"
SUPPORTED_DESCRIPTION = "vit (timm VisionTransformer: ViT, DeiT and other vit_*/deit_* models)"


def family_of(model) -> str:
    """The family name of ``model``, or ``generic`` when no family can prune it."""
    for name, module in FAMILIES.items():
        if module.is_member(model):
            return name
    return GENERIC


def family_module(name: str) -> ModuleType:
    """The module of a prunable family; a clear error for anything else."""
    if name not in FAMILIES:
        raise UsageError(
            f"model family '{name}' cannot be pruned; supported families: {SUPPORTED_DESCRIPTION}"
        )
    return FAMILIES[name]
