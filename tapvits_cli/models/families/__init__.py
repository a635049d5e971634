"""Model families: which timm models tapvits can prune, and how their blocks are shaped.

Each family module provides:

- ``is_member(model)``, ``block_widths(model)``, ``set_block_widths(model, widths)``;
- ``unit_layers(model)`` → list of :class:`~tapvits_cli.models.units.UnitLayer`, per block
  its attention heads and its MLP neurons: unit counts, the gate module whose input holds
  the units' outputs (what scoring observes and masks), the weights each unit owns;
- ``block_sequence(model)`` → :class:`~tapvits_cli.models.units.BlockSequence` (stem,
  blocks, tail), so a KL probe of block l replays blocks l..L from a cached input;
- ``cost_model(model)`` → :class:`~tapvits_cli.models.units.CostModel`, parameters and
  MACs per unit (works on a ``meta``-device model).

The importance criteria and the budget allocation use only these views, so a new family
never touches them. A model outside every family can still be loaded and used as a
feature extractor: its family is ``generic`` and it has no prunable blocks; scoring or
pruning it fails with the list of supported families.
"""

from __future__ import annotations

from types import ModuleType

from tapvits_cli.errors import NotImplementedStageError, UsageError
from tapvits_cli.models.families import swin, vit
from tapvits_cli.vocabulary import PRUNABLE_FAMILIES

FAMILIES: dict[str, ModuleType] = dict(zip(PRUNABLE_FAMILIES, (vit, swin)))
GENERIC = "generic"
SUPPORTED_DESCRIPTION = ("vit (timm VisionTransformer: ViT, DeiT and other vit_*/deit_* models), "
                         "swin (timm SwinTransformer: swin_* v1 models, not SwinV2)")


def family_of(model) -> str:
    """The family name of ``model``, or ``generic`` when no family can prune it."""
    for name, module in FAMILIES.items():
        if module.is_member(model):
            return name
    return GENERIC


def family_module(name: str, architecture: str | None = None) -> ModuleType:
    """The module of a prunable family; a clear error for anything else (naming ``architecture`` if given).

    A real model outside every family (``generic``) is a model tapvits does not support
    (yet): "not implemented", exit code 7, like every other unsupported model or option.
    Any other name is no family at all, a usage error.
    """
    if name not in FAMILIES:
        subject = f"{architecture} (model family '{name}')" if architecture else f"model family '{name}'"
        error = NotImplementedStageError if name == GENERIC else UsageError
        raise error(f"{subject} cannot be scored or pruned; supported families: {SUPPORTED_DESCRIPTION}")
    return FAMILIES[name]
