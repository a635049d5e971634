"""Create timm models by name and rebuild them from a :class:`ModelSpec`.

Pure model logic: weights arrive as state dicts (``artifacts`` reads the files), and
``--pretrained`` goes through timm's own hub download for users who are online.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

from tapvits_cli.errors import DataUnavailableError, InvalidArtifactError, UsageError
from tapvits_cli.models.families import GENERIC, family_module, family_of
from tapvits_cli.models.spec import ModelSpec


# timm.create_model's own keywords, and build_model_with_cfg's, that fetch or read weights or
# change what a call builds beyond the architecture: downloads, files named by a path, hub caches.
# A model artifact's kwargs come from an untrusted file, so they may only shape the architecture;
# weights arrive through tapvits' own readers (or --pretrained, which asks for them openly).
LOADING_KEYWORDS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "pretrained_filter_fn",
    "pretrained_model_args", "checkpoint_path", "cache_dir", "model_cfg", "feature_cfg", "features_only",
    "kwargs_filter", "scriptable", "exportable", "no_jit", "device", "dtype",
})


def create_model(architecture: str, kwargs: Mapping[str, Any] | None = None, pretrained: bool = False):
    """``timm.create_model`` with tapvits' errors: an unknown name gets the nearest known ones.

    Keyword arguments only shape the architecture: any of :data:`LOADING_KEYWORDS` (which would
    make timm download weights or open a file an artifact names) is a :class:`UsageError`.
    """
    import timm

    loading = sorted(LOADING_KEYWORDS & set(kwargs or {}))
    if loading:
        raise UsageError(f"model keyword arguments may not load weights or files ({', '.join(loading)}): "
                         "use --pretrained or --weights")
    if not timm.is_model(architecture):
        raise UsageError(f"unknown timm architecture '{architecture}'{_near_architectures(architecture)}")
    try:
        if pretrained:
            return _create_pretrained(architecture, dict(kwargs or {}))
        return timm.create_model(architecture, **dict(kwargs or {}))
    except TypeError as exc:
        raise UsageError(f"bad keyword arguments for {architecture}: {exc}") from None
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError, MemoryError) as exc:
        # what timm's constructors raise on values out of range (embed_dim=-24: a negative dimension;
        # img_size=1000000: a position table torch cannot allocate), not a tapvits crash
        raise UsageError(f"timm cannot build {architecture} with these keyword arguments "
                         f"({_first_line(exc) or type(exc).__name__})") from None


def _near_architectures(architecture: str) -> str:
    """"; did you mean X?" for a misspelling, else the names that share its family prefix.

    A typo (``deit_tiny_patch16_244``) is best answered by the closest spellings; a name
    with no close spelling still gets the architectures of its family (``vit_*``).
    """
    import difflib

    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(architecture.lower(), names, n=3, cutoff=0.8)
    if close:
        return f"; did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}?"
    family = timm.list_models(f"{architecture.split('_')[0]}*")[:8]
    return f"; models of that family: {', '.join(family)}" if family else ""


def _create_pretrained(architecture: str, kwargs: dict):
    """timm's pretrained weights from the local hub cache first, downloaded only when the hub answers.

    huggingface_hub asks the hub before it looks in its cache and retries an unreachable
    hub (ten attempts, over a minute, before timm gives up). So: the cache alone first
    (hub offline mode for that one call); with ``HF_HUB_OFFLINE`` set that is all; else
    one TCP connection to the hub decides, in seconds, between a download and exit 8.
    """
    import timm
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    try:
        with _hub_offline(constants):
            return timm.create_model(architecture, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        cached_error = exc
    where = f"the local hub cache ({constants.HF_HUB_CACHE})"
    if offline:   # a cache miss says only that; any other failure (no weights exist for the name...) is told
        detail = "" if isinstance(cached_error, FileNotFoundError) else f" ({_first_line(cached_error)})"
        raise DataUnavailableError(f"no pretrained weights for {architecture} in {where}, and HF_HUB_OFFLINE is "
                                   f"set{detail}")
    host = _hub_host(constants.ENDPOINT)
    if not _reachable(host):
        raise DataUnavailableError(f"no pretrained weights for {architecture} in {where}, and {host[0]} cannot be "
                                   "reached to download them (offline?)")
    try:
        return timm.create_model(architecture, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataUnavailableError(f"cannot download pretrained weights for {architecture} "
                                   f"({_first_line(exc)})") from None


@contextlib.contextmanager
def _hub_offline(constants):
    """huggingface_hub's offline mode (cache only, no request) for the calls inside, whatever the environment says."""
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_host(endpoint: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _reachable(host: tuple[str, int], timeout: float = 5.0) -> bool:
    """One TCP connection (name lookup included): the cheapest evidence that a download can work."""
    import socket

    try:
        socket.create_connection(host, timeout=timeout).close()
        return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_model(model, architecture: str, kwargs: Mapping[str, Any],
                   class_names: Sequence[str] | None = None) -> ModelSpec:
    """The spec that rebuilds ``model`` exactly, read off the live module (token merging included)."""
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.token_merging import token_merging_of

    family = family_of(model)
    blocks = family_module(family).block_widths(model) if family != GENERIC else ()
    num_classes = int(getattr(model, "num_classes", 0))
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f"{len(class_names)} class names for a model with {num_classes} classes")
    return ModelSpec(
        architecture=architecture,
        kwargs=dict(kwargs),
        family=family,
        blocks=tuple(blocks),
        preprocessing=Preprocessing.from_model(model).to_dict(),
        num_classes=num_classes,
        class_names=tuple(class_names) if class_names is not None else None,
        token_merging=token_merging_of(model),
    )


def build_model(spec: ModelSpec, state_dict: Mapping[str, Any] | None = None, device: str = "cpu",
                source: str = "the recorded architecture", max_tensors: int | None = None):
    """Rebuild the architecture of ``spec`` (per-block widths and token merging included) and load weights.

    With ``device="meta"`` no memory is allocated: that is how ``validate`` and every
    reader check tensor names and shapes cheaply before anything is allocated. A spec
    always comes from an artifact (``source`` names it), so an architecture that cannot be
    rebuilt (unknown name, bad keyword arguments, widths that contradict the depth, a
    token-merging schedule that does not fit) is an invalid artifact, never a crash.

    Nor a hang: timm builds whatever depth the keyword arguments ask for, so a corrupt
    ``depth`` of 100000 would spend many minutes building blocks. The depth keywords must
    agree with the recorded blocks first, and ``max_tensors`` (what the file stores) stops
    the construction as soon as it registers far more tensors than the file could fill.
    """
    import torch

    _check_declared_depth(spec, source)
    try:
        with torch.device(device), _tensor_limit(max_tensors, source):
            model = create_model(spec.architecture, _construction_kwargs(spec, state_dict is not None or device == "meta"))
            if spec.family != GENERIC:
                family = family_module(spec.family)
                if family_of(model) != spec.family:
                    raise UsageError(f"{spec.architecture} is not a '{spec.family}' model")
                family.set_block_widths(model, spec.blocks)
            if spec.token_merging is not None:
                from tapvits_cli.models.token_merging import set_token_merging

                set_token_merging(model, spec.token_merging)
    except InvalidArtifactError:
        raise
    except (UsageError, DataUnavailableError, ValueError, TypeError, KeyError, AttributeError, AssertionError,
            OverflowError, RuntimeError, MemoryError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArtifactError(f"{source}: architecture cannot be rebuilt ({message})") from None
    if state_dict is not None:
        model.load_state_dict(dict(state_dict), strict=True)
    model.eval()
    return model


def _construction_kwargs(spec: ModelSpec, weights_follow: bool) -> Mapping[str, Any]:
    """``spec.kwargs``, plus timm's ``weight_init="skip"`` when every weight is about to be replaced.

    A model rebuilt to receive a state dict (or on ``meta``, only to check shapes) does not
    need timm's initialisation, which was a quarter of a fleet's per-device CPU time
    (measured: 360 rebuilds of a 2-block ViT spent 16 of 121 s in ``init_weights``). Only
    the ViT and Swin families take the keyword; a recorded ``weight_init`` is left alone.
    """
    if not weights_follow or spec.family == GENERIC or "weight_init" in spec.kwargs:
        return spec.kwargs
    return {**spec.kwargs, "weight_init": "skip"}


def _check_declared_depth(spec: ModelSpec, source: str) -> None:
    """timm's depth keywords (ViT ``depth``, Swin ``depths``) must count the recorded blocks."""
    if spec.family == GENERIC:
        return
    depth = spec.kwargs.get("depth" if spec.family == "vit" else "depths")
    if depth is None:
        return   # the architecture's own default depth: bounded, and set_block_widths compares it
    total = depth if spec.family == "vit" else (sum(depth) if isinstance(depth, (list, tuple))
                                                 and all(isinstance(d, int) for d in depth) else None)
    if not isinstance(total, int) or isinstance(total, bool) or total != len(spec.blocks):
        raise InvalidArtifactError(f"{source}: the keyword arguments ask for depth {depth!r}, the recorded "
                                   f"blocks number {len(spec.blocks)}")


@contextlib.contextmanager
def _tensor_limit(max_tensors: int | None, source: str):
    """Abort a module construction that registers more than ~4x ``max_tensors`` parameters and buffers."""
    if max_tensors is None:
        yield
        return
    from torch.nn.modules import module as torch_module

    limit, count = 4 * max_tensors + 256, [0]

    def counted(*_args):
        count[0] += 1
        if count[0] > limit:
            raise InvalidArtifactError(f"{source}: the recorded architecture is far larger than the "
                                       f"{max_tensors} tensors the file stores")

    handles = [torch_module.register_module_parameter_registration_hook(counted),
               torch_module.register_module_buffer_registration_hook(counted)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_foreign_weights(model, state: Mapping[str, Any], source: str) -> None:
    """Load weights from outside tapvits, naming the first mismatches instead of a torch dump."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        details = [f"{label} {names[:3]}" for label, names in
                   (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if names]
        raise UsageError(f"{source} does not fit this architecture ({'; '.join(details)})")
    model.load_state_dict(dict(state), strict=True)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cost_model(spec: ModelSpec, source: str = "the recorded architecture"):
    """Parameter and MAC accounting of ``spec``'s prunable family, built on the ``meta`` device (no weights)."""
    model = build_model(spec, device="meta", source=source)
    try:
        return family_module(spec.family).cost_model(model)
    except ValueError as exc:
        raise InvalidArtifactError(f"{source}: {exc}") from None
