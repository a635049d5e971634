"""A user's own checkpoint into a timm model: names mapped to timm's, shapes fitted to the target.

Pure state-dict logic (``artifacts.external`` reads the file): no I/O, no printing.
Three layouts are recognised from the tensor names alone, so no config file is needed
and Hugging Face ``transformers`` is never imported:

- ``timm``: timm's own names (``blocks.0.attn.qkv.weight``), what ``torch.save(model.state_dict())``
  and timm's ``model.safetensors`` hold;
- ``transformers-vit``: ``ViTModel``/``ViTForImageClassification`` and the DeiT classes
  (``{vit.,deit.,}embeddings.patch_embeddings.projection.weight``, ``encoder.layer.N``);
- ``transformers-swin``: ``SwinModel``/``SwinForImageClassification``
  (``{swin.,}embeddings.patch_embeddings.projection.weight``, ``encoder.layers.S.blocks.B``).

``transformers`` keeps query, key and value as three linear layers where timm has one
``qkv`` layer (rows q, then k, then v), and puts a Swin stage's patch merging at the end
of the stage where timm puts it at the start of the next one; everything else is a rename.

Fitting to the target then uses timm's own rules: a classifier whose class count differs
is discarded for the target's freshly initialised one (what timm's ``load_pretrained``
does for ``num_classes``), a first convolution for another channel count is adapted by
timm's ``adapt_input_conv``, and an absolute position embedding for another token grid
is resampled with timm's ``resample_abs_pos_embed``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from tapvits_cli.errors import InvalidArtifactError

#: Wrapper prefixes that training code adds to every name: DataParallel/DDP (``module.``),
#: Lightning and EMA wrappers (``model.``), ``torch.compile`` (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")

_HF_PATCH = "embeddings.patch_embeddings.projection.weight"

# (pattern on the name after the base-model prefix, timm name or None to drop). A name
# with a ``qkv`` group is one third of timm's fused ``attn.qkv``.
_Rule = tuple[str, str | Callable[[re.Match], str] | None]

_VIT_RULES: tuple[_Rule, ...] = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.mask_token", None),                       # masked-image-modelling only
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(?P<qkv>query|key|value)\.(weight|bias)",
     r"blocks.\1.attn.qkv.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", None),                  # ViTModel's tanh pooler: no timm counterpart
)

_SWIN_RULES: tuple[_Rule, ...] = (
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (r"embeddings\.mask_token", None),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_bias_table",
     r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_index", None),  # rebuilt by timm
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(?P<qkv>query|key|value)\.(weight|bias)",
     r"layers.\1.blocks.\2.attn.qkv.\4"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.output\.dense\.(weight|bias)",
     r"layers.\1.blocks.\2.attn.proj.\3"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.intermediate\.dense\.(weight|bias)",
     r"layers.\1.blocks.\2.mlp.fc1.\3"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    # transformers merges patches at the end of stage S, timm at the start of stage S+1
    (r"encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)

# Heads sit outside the base model's prefix in the *ForImageClassification classes.
_VIT_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
_SWIN_HEADS = {"classifier": "head.fc"}

LAYOUTS = ("timm", "transformers-vit", "transformers-swin")


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the :data:`WRAPPER_PREFIXES` that *every* name carries (repeatedly: ``module.model.``).

    Only a prefix shared by all names is a wrapper's; one shared by some names is part
    of the model (``model.`` could name a submodule).
    """
    state = dict(state)
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_layout(state: Mapping[str, Any]) -> tuple[str, str]:
    """The layout of ``state`` (one of :data:`LAYOUTS`) and the base-model prefix of a transformers one."""
    for key in state:
        if key.endswith(_HF_PATCH):
            base = key[: -len(_HF_PATCH)]
            if any(k.startswith(f"{base}encoder.layers.") for k in state):
                return "transformers-swin", base
            if any(k.startswith(f"{base}encoder.layer.") for k in state):
                return "transformers-vit", base
    return "timm", ""


def to_timm_names(state: Mapping[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """``state`` with timm's names, and the layout it was found in; wrapper prefixes are removed first."""
    state = strip_wrapper_prefixes(state)
    layout, base = detect_layout(state)
    if layout == "timm":
        return state, layout
    rules, heads = (_VIT_RULES, _VIT_HEADS) if layout == "transformers-vit" else (_SWIN_RULES, _SWIN_HEADS)
    return _rename(state, base, rules, heads, layout, source), layout


def _rename(state: Mapping[str, Any], base: str, rules: tuple[_Rule, ...], heads: Mapping[str, str],
            layout: str, source: str) -> dict[str, Any]:
    import torch

    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    renamed: dict[str, Any] = {}
    thirds: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head in heads and param in ("weight", "bias"):
            renamed[f"{heads[head]}.{param}"] = value
            continue
        match = next(((m, target) for pattern, target in compiled
                      if key.startswith(base) and (m := pattern.fullmatch(key[len(base):]))), None)
        if match is None:
            raise InvalidArtifactError(f"{source}: '{key}' is not a tensor of a {layout} checkpoint "
                                       "that tapvits can map to timm")
        found, target = match
        if target is None:
            continue
        name = target(found) if callable(target) else found.expand(target)
        if "qkv" in found.groupdict():
            thirds.setdefault(name, {})[found["qkv"]] = value
        else:
            renamed[name] = value
    for name, parts in thirds.items():
        if set(parts) != {"query", "key", "value"}:
            raise InvalidArtifactError(f"{source}: {name} needs query, key and value; the checkpoint has "
                                       f"{sorted(parts)}")
        renamed[name] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return renamed


def declared_modules(model, role: str) -> tuple[str, ...]:
    """The modules timm's ``pretrained_cfg`` declares for ``role``: ``classifier`` (``head``, ``head.fc``,
    ``head_dist``...) or ``first_conv`` (``patch_embed.proj``); what timm's own loader adapts."""
    declared = (getattr(model, "pretrained_cfg", None) or {}).get(role) or ()
    return (declared,) if isinstance(declared, str) else tuple(declared)


def fit_to_model(state: Mapping[str, Any], model) -> tuple[dict[str, Any], list[str]]:
    """``state`` fitted to ``model``'s class count, input channels and token grid, and one note per change.

    A classifier that does not fit (another class count, or none in the checkpoint) is
    replaced by ``model``'s own freshly initialised one, and a classifier the headless
    model lacks is dropped: timm's ``load_pretrained`` rule for a different ``num_classes``.
    A first convolution for another number of input channels (RGB weights for
    ``in_chans=1``) is adapted by timm's ``adapt_input_conv`` (summed for one channel,
    repeated and rescaled for more), also as ``load_pretrained`` does.
    An absolute ``pos_embed`` of the same width for another (square) grid is resampled to
    ``model.patch_embed.grid_size`` by timm's ``resample_abs_pos_embed``, prefix tokens
    (class, distillation) kept as they are. Anything else that does not fit is left for
    the strict load to name.
    """
    expected = model.state_dict()
    fitted, notes = dict(state), []
    for name in declared_modules(model, "classifier"):
        keys = [f"{name}.{p}" for p in ("weight", "bias") if f"{name}.{p}" in expected or f"{name}.{p}" in fitted]
        fits = all(k in expected and k in fitted and tuple(fitted[k].shape) == tuple(expected[k].shape)
                   for k in keys)
        if keys and not fits:
            before = fitted.get(f"{name}.weight")
            for key in keys:
                fitted.pop(key, None)
                if key in expected:
                    fitted[key] = expected[key].clone()
            notes.append(f"classifier {name} reset: {_classes(before)} → {_classes(expected.get(f'{name}.weight'))} "
                         "classes, freshly initialised")
    for name in declared_modules(model, "first_conv"):
        weight, target = fitted.get(f"{name}.weight"), expected.get(f"{name}.weight")
        if (weight is not None and target is not None and weight.ndim == 4 and target.ndim == 4
                and weight.shape[1] != target.shape[1]
                and (weight.shape[0], *weight.shape[2:]) == (target.shape[0], *target.shape[2:])):
            from timm.models import adapt_input_conv

            fitted[f"{name}.weight"] = adapt_input_conv(int(target.shape[1]), weight, base_chans=int(weight.shape[1]))
            notes.append(f"{name} adapted: {weight.shape[1]} → {target.shape[1]} input channels")
    pos, target = fitted.get("pos_embed"), expected.get("pos_embed")
    if pos is not None and target is not None and tuple(pos.shape) != tuple(target.shape):
        resampled = _resample_pos_embed(pos, model, target)
        if resampled is not None:
            fitted["pos_embed"] = resampled
            notes.append(f"pos_embed resampled: {pos.shape[1]} → {target.shape[1]} tokens "
                         f"(grid {tuple(model.patch_embed.grid_size)})")
    return fitted, notes


def _classes(weight) -> int:
    return 0 if weight is None else int(weight.shape[0])


def _resample_pos_embed(pos, model, target):
    """timm's resampling when only the square token grid differs, else None (the strict load names it)."""
    import math

    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != target.shape[2] or grid is None:
        return None
    side = math.isqrt(max(pos.shape[1] - prefix, 0))
    if side == 0 or side * side != pos.shape[1] - prefix:
        return None
    resampled = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    return resampled if tuple(resampled.shape) == tuple(target.shape) else None


def import_checkpoint(model, state: Mapping[str, Any], source: str) -> tuple[str, list[str]]:
    """Load a foreign checkpoint into ``model`` (names mapped, fitted, then loaded strictly).

    Returns the detected layout and the notes of :func:`fit_to_model`. A checkpoint
    that still does not fit names its first mismatches (usage error: wrong architecture
    or keyword arguments for these weights).
    """
    from tapvits_cli.models.factory import load_foreign_weights

    renamed, layout = to_timm_names(state, source)
    fitted, notes = fit_to_model(renamed, model)
    load_foreign_weights(model, fitted, source)
    return layout, notes
