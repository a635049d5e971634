"""The ``model`` artifact: weights in safetensors, the whole architecture in metadata.

See protocol/model.md. ``load_model(path)`` needs nothing but the file: the timm
architecture, its keyword arguments and the per-block widths rebuild the module, and
the weights load strictly on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from tapvits_cli.artifacts.containers import ArtifactFile, load_safetensors, write_safetensors
from tapvits_cli.artifacts.digests import tensor_rule, tensors_sha256
from tapvits_cli.artifacts.header import Header, LineageEntry, compact_json, parse_decimal, parse_json
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, read_artifact, register
from tapvits_cli.errors import InvalidArtifactError
from tapvits_cli.models.spec import BlockWidths, ModelSpec, TokenMerging
from tapvits_cli.vocabulary import PRUNABLE_FAMILIES

KIND = "model"
VERSION = 2   # v2: model.weights_sha256 names dtypes as safetensors does, shapes as JSON lists; model.timm_version
NAMESPACE = "model"


def write_model(path: str | os.PathLike, model, spec: ModelSpec, params: Mapping[str, Any],
                inputs: Mapping[str, LineageEntry] | None = None):
    """Write ``model`` with its spec; returns the path."""
    import timm

    from tapvits_cli.models.factory import count_parameters

    state = model.state_dict()
    header = Header(kind=KIND, version=VERSION, inputs=dict(inputs or {}), params=dict(params))
    metadata = model_metadata(spec, parameters=count_parameters(model), weights_sha256=tensors_sha256(state),
                              timm_version=timm.__version__)
    return write_safetensors(path, state, header, metadata)


def model_metadata(spec: ModelSpec, parameters: int, weights_sha256: str, timm_version: str) -> dict[str, str]:
    """The ``model.*`` keys of protocol/model.md for ``spec`` (all strings, nested values compact JSON)."""
    meta = {
        "model.architecture": spec.architecture,
        "model.kwargs": compact_json(dict(spec.kwargs)),
        "model.family": spec.family,
        "model.blocks": compact_json([b.to_dict() for b in spec.blocks]),
        "model.preprocessing": compact_json(dict(spec.preprocessing)),
        "model.num_classes": str(spec.num_classes),
        "model.parameters": str(parameters),
        "model.weights_sha256": weights_sha256,
        "model.timm_version": timm_version,
    }
    if spec.class_names is not None:
        meta["model.class_names"] = compact_json(list(spec.class_names))
    if spec.token_merging is not None:
        meta["model.token_merging"] = compact_json(spec.token_merging.to_dict())
    return meta


def spec_from_metadata(meta: Mapping[str, str], source: str) -> ModelSpec:
    """Parse the ``model.*`` keys, checking each one's JSON type (one line, exit 3, for any other)."""
    def field_(key: str, kind: type | tuple[type, ...], parse=parse_json, required: bool = True):
        if f"model.{key}" not in meta:
            if not required:
                return None
            raise InvalidArtifactError(f"{source}: required key 'model.{key}' is missing")
        try:
            value = parse(meta[f"model.{key}"])
        except (ValueError, TypeError):
            raise InvalidArtifactError(f"{source}: key 'model.{key}' is malformed") from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidArtifactError(f"{source}: key 'model.{key}' must be {_TYPE_NAMES[kind]}")
        return value

    kwargs = field_("kwargs", dict)
    blocks_raw = field_("blocks", list)
    preprocessing = field_("preprocessing", dict)
    try:
        blocks = tuple(BlockWidths(_integer(b["heads"]), _integer(b["head_dim"]), _integer(b["mlp_hidden"]))
                       for b in blocks_raw)
    except (KeyError, TypeError, ValueError):
        raise InvalidArtifactError(f"{source}: model.blocks entries need integer heads, head_dim, mlp_hidden") from None
    if any(min(b.heads, b.head_dim, b.mlp_hidden) < 0 for b in blocks):
        raise InvalidArtifactError(f"{source}: model.blocks widths must not be negative")
    names = field_("class_names", list, required=False)
    if names is not None and not all(isinstance(name, str) for name in names):
        raise InvalidArtifactError(f"{source}: key 'model.class_names' must be a JSON list of strings")
    num_classes = field_("num_classes", int, parse=parse_decimal)
    if num_classes < 0:
        raise InvalidArtifactError(f"{source}: key 'model.num_classes' must not be negative")
    merging = None
    if "model.token_merging" in meta:
        try:
            merging = TokenMerging.from_dict(parse_json(meta["model.token_merging"]))
        except ValueError as exc:
            raise InvalidArtifactError(f"{source}: key 'model.token_merging' is malformed ({exc})") from None
    return ModelSpec(
        architecture=field_("architecture", str, parse=str),
        kwargs=kwargs,
        family=field_("family", str, parse=str),
        blocks=blocks,
        preprocessing=preprocessing,
        num_classes=num_classes,
        class_names=tuple(names) if names is not None else None,
        token_merging=merging,
    )


_TYPE_NAMES = {dict: "a JSON object", list: "a JSON list", int: "an integer", str: "a string"}


def _integer(value: Any) -> int:
    """A JSON integer (not a float, string or boolean that ``int()`` would also take)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


@dataclass(frozen=True)
class ModelFile:
    """A model artifact read without building its module: the architecture and the opened file
    (header, metadata, tensor shapes); ``weights`` (name → tensor) once :func:`verify_model` checked them."""

    spec: ModelSpec
    artifact: ArtifactFile
    weights: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A model artifact loaded by :func:`load_model`: the module (eval mode), its architecture, the opened file."""

    module: Any            # torch.nn.Module
    spec: ModelSpec
    artifact: ArtifactFile


def read_model_spec(path: str | os.PathLike) -> ModelFile:
    """Header and architecture only, without loading any weight (nor checking the architecture)."""
    artifact = read_artifact(path, expect=KIND)
    return ModelFile(spec_from_metadata(artifact.metadata, str(path)), artifact)


def verify_model(path: str | os.PathLike) -> ModelFile:
    """The model file with its ``weights``, after every rule ``validate`` applies to a model.

    For consumers that need the model's identity but not a module (``allocate --model``):
    they refuse exactly what ``validate`` refuses.
    """
    read = read_model_spec(path)
    return ModelFile(read.spec, read.artifact, _verified_state(read.artifact, read.spec))


def _verified_state(artifact: ArtifactFile, spec: ModelSpec) -> dict:
    check_architecture(artifact, spec)
    state = load_safetensors(artifact)
    check_weights(artifact, state)
    return state


def load_model(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """The module of a model artifact, in eval mode on ``device``, its content verified.

    Every rule of ``validate`` runs first (:func:`verify_model`): the architecture is rebuilt
    on the ``meta`` device and checked against the tensors and the metadata before any
    memory is allocated, then the weights must hash to ``model.weights_sha256`` and be
    finite: a consumer that trusted the recorded hash would carry a bit flip into every
    artifact made from the model, each re-hashed and valid-looking (hashing DeiT-Small's
    88 MB of weights took 0.37 s here, measured).
    """
    from tapvits_cli.models.factory import build_model

    verified = verify_model(path)
    try:
        model = build_model(verified.spec, verified.weights, source=str(path))
    except RuntimeError as exc:
        raise InvalidArtifactError(f"{path}: weights do not fit the recorded architecture ({_first_line(exc)})") from None
    return LoadedModel(model.to(device), verified.spec, verified.artifact)


def check_weights(artifact: ArtifactFile, state: Mapping[str, Any]) -> None:
    """Weights hash to the recorded ``model.weights_sha256`` and hold no NaN or infinity."""
    import torch

    recorded = artifact.metadata.get("model.weights_sha256")
    if recorded is None:
        raise InvalidArtifactError(f"{artifact.path}: required key 'model.weights_sha256' is missing")
    if tensors_sha256(state, tensor_rule(KIND, artifact.header.version)) != recorded:
        raise InvalidArtifactError(f"{artifact.path}: weights do not match model.weights_sha256 (corrupted)")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InvalidArtifactError(f"{artifact.path}: tensor {name} holds NaN or infinite values")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# The largest input side a model without a fixed input size may declare: a larger one is a
# corrupt artifact (100000 x 100000 would ask for 40 GB per image before anything runs).
MAX_INPUT_SIDE = 8192


def check_architecture(artifact: ArtifactFile, spec: ModelSpec):
    """The rules that tie a model's metadata to the architecture it rebuilds; returns the ``meta`` skeleton.

    ``validate`` and every reader (:func:`verify_model`) run these same checks, before any
    weight is read or memory allocated: the architecture rebuilds, the stored tensors
    have its names, shapes and dtype-independent count (``model.parameters``), and the
    metadata agrees with it (:func:`check_metadata_fits`).
    """
    from tapvits_cli.models.factory import build_model

    required = ("model.parameters", "model.weights_sha256") + (("model.timm_version",) if artifact.header.version >= 2 else ())
    for key in required:
        if key not in artifact.metadata:
            raise InvalidArtifactError(f"{artifact.path}: required key '{key}' is missing")
    skeleton = build_model(spec, device="meta", source=str(artifact.path), max_tensors=len(artifact.tensors))
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    stored = {name: info.shape for name, info in artifact.tensors.items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise InvalidArtifactError(
            f"{artifact.path}: tensors do not match the architecture (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    wrong = [n for n in expected if expected[n] != stored[n]]
    if wrong:
        raise InvalidArtifactError(f"{artifact.path}: tensor {wrong[0]} has shape {stored[wrong[0]]}, architecture needs {expected[wrong[0]]}")
    parameters = sum(p.numel() for p in skeleton.parameters())
    if str(parameters) != artifact.metadata["model.parameters"]:
        raise InvalidArtifactError(f"{artifact.path}: model.parameters says {artifact.metadata['model.parameters']}, architecture has {parameters}")
    check_metadata_fits(artifact, spec, skeleton)
    return skeleton


def check_metadata_fits(artifact: ArtifactFile, spec: ModelSpec, module) -> None:
    """Blocks, classes and preprocessing must describe ``module`` (the rebuilt architecture).

    Each disagreement used to surface later as a crash or a silently wrong result: a head
    of 10 classes under ``num_classes`` 5, or a preprocessing that feeds 3 channels to a
    1-channel model or resizes every image to 100000 x 100000.
    """
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.families import GENERIC, family_module

    fail = artifact.fail
    if spec.family != GENERIC and tuple(family_module(spec.family).block_widths(module)) != tuple(spec.blocks):
        raise fail("model.blocks does not describe the rebuilt architecture's blocks")
    head = int(getattr(module, "num_classes", 0))
    if spec.num_classes != head:
        raise fail(f"model.num_classes is {spec.num_classes}, the architecture's head has {head} classes")
    if spec.class_names is not None and len(spec.class_names) != spec.num_classes:
        raise fail(f"model.class_names has {len(spec.class_names)} names for {spec.num_classes} classes")
    try:
        preprocessing = Preprocessing.from_dict(spec.preprocessing)
    except (ValueError, TypeError) as exc:
        raise fail(f"model.preprocessing is malformed ({_first_line(exc)})") from None
    needs = Preprocessing.from_model(module).input_size
    channels, height, width = preprocessing.input_size
    if channels != needs[0]:
        raise fail(f"model.preprocessing gives {channels} input channels, the architecture takes {needs[0]}")
    fixed = getattr(getattr(module, "patch_embed", None), "img_size", None) is not None \
        and getattr(module.patch_embed, "strict_img_size", True)
    if fixed and (height, width) != tuple(needs[1:]):
        raise fail(f"model.preprocessing input is {height}x{width}, the architecture takes {needs[1]}x{needs[2]}")
    if max(height, width) > MAX_INPUT_SIDE:
        raise fail(f"model.preprocessing input {height}x{width} exceeds {MAX_INPUT_SIDE} pixels a side")


def _validate(artifact: ArtifactFile) -> None:
    """Every rule of protocol/model.md: :func:`check_architecture`, then the weights (:func:`check_weights`)."""
    _verified_state(artifact, spec_from_metadata(artifact.metadata, str(artifact.path)))


def _summarize(artifact: ArtifactFile) -> Summary:
    """What ``inspect`` shows: the metadata, after the architecture checks (not the weights' hash)."""
    spec = spec_from_metadata(artifact.metadata, str(artifact.path))
    check_architecture(artifact, spec)
    figures = {
        "architecture": spec.architecture,
        "family": spec.family,
        "kwargs": dict(spec.kwargs),
        "parameters": int(artifact.metadata.get("model.parameters", 0)),
        "num_classes": spec.num_classes,
        "input_size": spec.preprocessing.get("input_size"),
        "weights_sha256": artifact.metadata.get("model.weights_sha256"),
        "tensors": len(artifact.tensors),
    }
    if spec.class_names:
        figures["class_names"] = list(spec.class_names)
    tables = []
    if spec.token_merging is not None:
        figures["token_merging"] = spec.token_merging.to_dict()
        tables.append(Table("token merging", ["block", "amount", "tokens after"],
                            [[i, amount, tokens] for i, (amount, tokens)
                             in enumerate(zip(spec.token_merging.schedule, _token_counts(spec, str(artifact.path))))]))
    if spec.blocks:
        tables.append(Table("blocks", ["block", "heads", "head_dim", "mlp_hidden"],
                            [[i, b.heads, b.head_dim, b.mlp_hidden] for i, b in enumerate(spec.blocks)]))
    return Summary(figures=figures, tables=tables)


def _token_counts(spec: ModelSpec, source: str) -> tuple[int, ...]:
    """Tokens leaving each block of a token-merging model (its patch grid comes from a ``meta`` build)."""
    from tapvits_cli.models.factory import build_model
    from tapvits_cli.models.token_merging import token_grid

    return spec.token_merging.token_counts(*token_grid(build_model(spec, device="meta", source=source)))


SPEC = register(KindSpec(
    name=KIND, format="safetensors", version=VERSION, validate=_validate, summarize=_summarize,
    description="a (possibly pruned) timm model: weights plus the architecture that rebuilds it",
))


def load_extractor(path: str | os.PathLike, device: str = "cpu"):
    """A feature extractor from a model artifact, fingerprinted by its recorded weights hash."""
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.extract import make_extractor

    loaded = load_model(path, device=device)
    spec, weights_sha256 = loaded.spec, loaded.artifact.metadata["model.weights_sha256"]
    return make_extractor(loaded.module, spec.architecture, spec.kwargs, weights_sha256,
                          Preprocessing.from_dict(spec.preprocessing))


def model_record(spec: ModelSpec, weights_sha256: str) -> dict[str, Any]:
    """What a scores or plan artifact records of the model it was made for (``scores.model``, ``plan.model``)."""
    return {"architecture": spec.architecture, "kwargs": dict(spec.kwargs), "family": spec.family,
            "blocks": [b.to_dict() for b in spec.blocks], "weights_sha256": weights_sha256}


def record_spec(record: Any, source: str) -> ModelSpec:
    """The architecture part of a :func:`model_record` (enough to rebuild it on ``meta``); checks its shape."""
    problem = InvalidArtifactError(f"{source}: the model record must be an object with architecture, kwargs, "
                                   "family, blocks (heads, head_dim, mlp_hidden) and weights_sha256")
    if not isinstance(record, dict) or not isinstance(record.get("weights_sha256"), str):
        raise problem
    if record.get("family") not in PRUNABLE_FAMILIES:
        raise InvalidArtifactError(f"{source}: the model record's family {record.get('family')!r} is none that "
                                   f"tapvits scores or prunes ({', '.join(PRUNABLE_FAMILIES)})")
    try:
        blocks = tuple(BlockWidths(_integer(b["heads"]), _integer(b["head_dim"]), _integer(b["mlp_hidden"]))
                       for b in record["blocks"])
        return ModelSpec(architecture=str(record["architecture"]), kwargs=dict(record["kwargs"]),
                         family=str(record["family"]), blocks=blocks, preprocessing={}, num_classes=0)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise problem from None
