"""Recipes: the whole pipeline as one checked YAML document (protocol/recipe.md).

A recipe is validated strictly, because a mistyped key that is silently ignored runs a
different experiment than the one written down: every unknown key, wrong type or
missing value is an error that names its path (``stages.score.critrion``) and, where one
exists, the key that was probably meant. Stage sections hold the options of the
subcommand of the same name; which ones are allowed, and how their values are checked,
comes from the subcommands themselves (the caller passes ``check_stage``), so the two
can never disagree.

Variants are overrides of a base recipe (``extends:`` plus ``--set``), merged before
validation: a variant states only what differs.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from tapvits_cli.errors import UsageError
from tapvits_cli.vocabulary import (BASE_EXTRACTOR, BUDGET_FRACTION, NAME_PATTERN, OPTIONAL_STAGES, PIPELINE_STAGES,
                                   SEED_RANGE)

VERSION = 1
TOP_LEVEL = ("version", "extends", "name", "seed", "device", "public", "base_model", "extractor", "devices",
             "budget", "stages", "thresholds", "slurm")
THRESHOLDS = ("min-top1", "min-mean-top1")
_MAX_EXTENDS = 16

# check_stage(stage, options, path) → the options, checked and normalised; raises UsageError.
StageCheck = Callable[[str, Mapping[str, Any], str], dict]


@dataclass(frozen=True)
class BaseModel:
    """An existing model artifact, or a timm architecture trained on the public pool."""

    artifact: str | None = None
    model: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)   # `tapvits finetune` options


@dataclass(frozen=True)
class Device:
    """A real device (its GMM file) or a simulated one (its private train split)."""

    name: str
    gmm: str | None = None
    private: str | None = None
    test: str | None = None
    profile: str | None = None   # the latency profile a real device sent with its GMM (from an inbox)


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int
    device: str
    public: str
    base_model: BaseModel
    extractor: str
    devices: tuple[Device, ...]
    budget: float
    stages: Mapping[str, Mapping[str, Any] | None]   # None: the stage is switched off
    thresholds: Mapping[str, float]
    inboxes: tuple[str, ...] = ()   # folders or globs of uploaded device files (pipeline/inbox.py)
    slurm: tuple[str, ...] = ()     # KEY=VALUE Slurm job settings, as `run --slurm` takes them (which override them)

    @property
    def prunes(self) -> bool:
        return self.budget < 1.0

    def stage_enabled(self, stage: str) -> bool:
        return self.stages.get(stage, {}) is not None


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """``override`` laid over ``base``: mappings merge key by key, anything else replaces,
    and ``null`` removes the key (JSON Merge Patch, RFC 7386), so a variant can drop a
    base's keyword argument that its own architecture does not take."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that a mapping key given twice is an error.

    Plain YAML loaders keep the last of two equal keys, so a recipe that sets ``budget``
    twice silently runs with the second value, whichever the author meant. The error is a
    ``yaml.YAMLError`` that marks the second key, so callers report it like any YAML
    error, with its line. Keys brought in by a merge key (``<<: *base``) may still be
    overridden: that is what merging is for.

    Two more limits, since a recipe may come from anyone: nesting deeper than Python's
    recursion limit, and aliases that expand to more than :data:`_MAX_EXPANDED_VALUES`
    values (nine levels of ``&a [*b, *b, …]`` in 700 bytes make 10⁹, and every later
    ``str()`` or comparison would walk them all) are YAML errors too.
    """
    import yaml

    try:
        document = yaml.load(text, Loader=_strict_loader())
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as exc:   # an integer of thousands of digits (Python's conversion limit)
        raise yaml.YAMLError(str(exc).splitlines()[0]) from None
    _check_expanded_size(document)
    return document


_MAX_EXPANDED_VALUES = 1_000_000


def _check_expanded_size(document: Any) -> None:
    """Count the values ``document`` holds with every alias expanded, up to the limit."""
    import yaml

    pending, count = [document], 0
    while pending:
        value = pending.pop()
        count += 1
        if count > _MAX_EXPANDED_VALUES:
            raise yaml.YAMLError(f"its aliases expand to more than {_MAX_EXPANDED_VALUES:,} values")
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2 ** 63:
            raise yaml.YAMLError(f"the integer {str(value)[:20]}… does not fit 64 bits")


@functools.lru_cache(maxsize=1)
def _strict_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        earlier = first_line.get(key)
                    except TypeError:   # an unhashable key: the base loader refuses it itself
                        continue
                    if earlier is not None:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"duplicate key {key!r}, first given on line {earlier}", key_node.start_mark)
                    first_line[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_recipe_document(path: str | os.PathLike) -> dict:
    """The YAML document of a recipe with its ``extends`` chain merged in (base first).

    ``extends`` names the base recipe relative to the file that names it; a chain is
    followed up to 16 levels and a cycle is an error.
    """
    import yaml

    chain: list[dict] = []
    current = Path(path)
    seen: set[Path] = set()
    while True:
        try:
            resolved = current.resolve()
            if resolved in seen or len(chain) >= _MAX_EXTENDS:
                raise UsageError(f"recipe {current}: 'extends' forms a cycle or is nested deeper than {_MAX_EXTENDS}")
            seen.add(resolved)
            if current.exists() and not current.is_file():   # a device (/dev/zero), a FIFO or a folder would
                raise UsageError(f"recipe {current}: not a regular file")   # read without end or fail late
            text = current.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"recipe {current}: no such file") from None
        except (OSError, UnicodeDecodeError, RuntimeError, ValueError) as exc:   # symlink loops, NUL bytes
            raise UsageError(f"recipe {str(current)!r}: cannot be read ({exc})") from None
        try:
            document = load_yaml(text)   # a key given twice is an error, not "the last one wins"
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f": line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UsageError(f"recipe {current}{where}: not valid YAML ({problem})") from None
        if not isinstance(document, dict):
            raise UsageError(f"recipe {current}: must be a YAML mapping of keys (see protocol/recipe.md)")
        chain.append(document)
        parent = document.get("extends")
        if parent is None:
            break
        if not isinstance(parent, str):
            raise UsageError(f"recipe {current}: 'extends' must be a file name")
        current = current.parent / parent
    # The root recipe as written; each variant is then laid over it (its nulls remove base keys).
    merged = {k: v for k, v in chain[-1].items() if k != "extends"}
    for document in reversed(chain[:-1]):
        merged = merge(merged, {k: v for k, v in document.items() if k != "extends"})
    return merged


def parse_yaml_value(text: str) -> Any:
    """A ``--set`` value as YAML reads it (0.5 → float, true → bool, [a, b] → list)."""
    import yaml

    try:
        return load_yaml(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UsageError(f"--set value {shown!r} is not a YAML scalar or flow list/mapping ({problem})") from None


def apply_setting(document: Mapping[str, Any], setting: str, parse_value: Callable[[str], Any]) -> dict:
    """``document`` with ``a.b.c=VALUE`` applied (VALUE read as a YAML scalar or flow value)."""
    path, sep, text = setting.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise UsageError(f"--set '{setting}': expected KEY.PATH=VALUE, e.g. stages.score.criterion=magnitude")
    value: Any = parse_value(text)
    for key in reversed(keys):
        value = {key: value}
    return merge(document, value)


def suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _require_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise UsageError(f"recipe: '{path}' must be a mapping, not {type(value).__name__}")
    return value


def _check_keys(mapping: Mapping[str, Any], allowed, path: str) -> None:
    for key in mapping:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise UsageError(f"recipe: unknown key '{where}'{suggest(str(key), allowed)}; "
                             f"allowed: {', '.join(allowed)}")


def _typed(mapping: Mapping[str, Any], key: str, kind, path: str, default: Any = ...):
    if key not in mapping or mapping[key] is None:
        if default is ...:
            raise UsageError(f"recipe: '{path}{key}' is required")
        return default
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise UsageError(f"recipe: '{path}{key}' must be {' or '.join(k.__name__ for k in kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise UsageError(f"recipe: '{path}{key}' must be {' or '.join(k.__name__ for k in kinds)}, "
                         f"not {type(value).__name__} ({value!r})")
    return value


def parse_recipe(document: Mapping[str, Any], default_name: str, check_stage: StageCheck) -> Recipe:
    """A validated :class:`Recipe` from a merged YAML document (``extends`` already resolved)."""
    document = _require_mapping(document, "(top level)")
    _check_keys(document, TOP_LEVEL, "")
    version = _typed(document, "version", int, "")
    if version > VERSION:
        raise UsageError(f"recipe: version {version} is newer than this tapvits reads ({VERSION}); upgrade tapvits")
    if version < 1:
        raise UsageError("recipe: 'version' must be 1")
    name = _typed(document, "name", str, "", default_name)
    if not NAME_PATTERN.match(name):
        raise UsageError(f"recipe: 'name' {name!r} must be letters, digits, '_', '.' or '-'")
    device = _typed(document, "device", str, "", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"recipe: 'device' must be auto, cpu or cuda, not {device!r}")
    budget = float(_typed(document, "budget", (int, float), "", 1.0))
    if budget not in BUDGET_FRACTION:
        raise UsageError(f"recipe: 'budget' must be a fraction of the parameters in {BUDGET_FRACTION}, not {budget}")
    stages_doc = _require_mapping(document.get("stages") or {}, "stages")
    _check_keys(stages_doc, PIPELINE_STAGES, "stages")
    stages: dict[str, Mapping[str, Any] | None] = {}
    for stage in PIPELINE_STAGES:
        section = stages_doc.get(stage, {})
        if section is False:
            if stage not in OPTIONAL_STAGES:
                raise UsageError(f"recipe: 'stages.{stage}' cannot be switched off (only {' and '.join(OPTIONAL_STAGES)} can)")
            stages[stage] = None
            continue
        stages[stage] = check_stage(stage, _require_mapping(section or {}, f"stages.{stage}"), f"stages.{stage}")
    thresholds_doc = _require_mapping(document.get("thresholds") or {}, "thresholds")
    _check_keys(thresholds_doc, THRESHOLDS, "thresholds")
    thresholds = {}
    for key in thresholds_doc:
        value = float(_typed(thresholds_doc, key, (int, float), "thresholds."))
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"recipe: 'thresholds.{key}' must lie in [0, 1], not {value}")
        thresholds[key] = value
    seed = _typed(document, "seed", int, "", 0)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"recipe: 'seed' must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]}, not {seed}")
    devices, inboxes = _parse_devices(document.get("devices"))
    if thresholds and not any(d.test for d in devices):
        raise UsageError("recipe: thresholds need at least one device with a 'test' split to evaluate on")
    return Recipe(
        name=name, seed=seed, device=device,
        public=_typed(document, "public", str, ""), base_model=_parse_base(document.get("base_model"), check_stage),
        extractor=_typed(document, "extractor", str, "", BASE_EXTRACTOR), devices=devices, budget=budget,
        stages=stages, thresholds=thresholds, inboxes=inboxes, slurm=_parse_slurm(document.get("slurm")))


def _parse_slurm(value: Any) -> tuple[str, ...]:
    """``slurm: {partition: gpu, time: 60, mem_gb: 16}`` → ``("partition=gpu", "time=60", "mem_gb=16")``.

    Where and how long a fleet's jobs run is part of the recipe a cluster user keeps;
    ``tapvits run --executor slurm`` applies it, and ``--slurm`` flags override it key by
    key. Other executors ignore it, so the same recipe also runs on one machine.
    """
    settings = _require_mapping(value or {}, "slurm")
    out = []
    for key, setting in settings.items():
        if isinstance(setting, bool) or not isinstance(setting, (str, int, float)) or str(setting).strip() == "":
            raise UsageError(f"recipe: 'slurm.{key}' must be a string or a number, e.g. partition: gpu or time: 60")
        out.append(f"{key}={setting}")
    return tuple(out)


def _parse_base(value: Any, check_stage: StageCheck) -> BaseModel:
    base = _require_mapping(value, "base_model") if value is not None else None
    if base is None:
        raise UsageError("recipe: 'base_model' is required (artifact: FILE, or train: {model: NAME, ...})")
    _check_keys(base, ("artifact", "train"), "base_model")
    if ("artifact" in base) == ("train" in base):
        raise UsageError("recipe: 'base_model' needs exactly one of 'artifact' and 'train'")
    if "artifact" in base:
        return BaseModel(artifact=_typed(base, "artifact", str, "base_model."))
    train = dict(_require_mapping(base["train"], "base_model.train"))
    model = _typed(train, "model", str, "base_model.train.")
    args = dict(_require_mapping(train.get("args") or {}, "base_model.train.args"))
    options = {k: v for k, v in train.items() if k not in ("model", "args")}
    return BaseModel(model=model, args=args, train=check_stage("train", options, "base_model.train"))


def _parse_devices(value: Any) -> tuple[tuple[Device, ...], tuple[str, ...]]:
    """The listed devices, and the inboxes (``{inbox: FOLDER_OR_GLOB}`` entries) to take more from at run time."""
    if not isinstance(value, list) or not value:
        raise UsageError("recipe: 'devices' must be a non-empty list")
    devices, names, inboxes = [], set(), []
    for index, entry in enumerate(value):
        path = f"devices[{index}]"
        entry = _require_mapping(entry, path)
        if "inbox" in entry:
            _check_keys(entry, ("inbox",), path)
            inbox = _typed(entry, "inbox", str, f"{path}.")
            if not inbox.strip():
                raise UsageError(f"recipe: '{path}.inbox' must name a folder or a glob of GMM files")
            inboxes.append(inbox)
            continue
        _check_keys(entry, ("name", "gmm", "private", "test", "profile", "inbox"), path)
        name = _typed(entry, "name", str, f"{path}.")
        if not NAME_PATTERN.match(name):
            raise UsageError(f"recipe: '{path}.name' {name!r} must be letters, digits, '_', '.' or '-'")
        if name.casefold() in names:   # devices/Phone and devices/phone are one folder on some file systems
            raise UsageError(f"recipe: device name '{name}' is used twice (names are compared ignoring case)")
        names.add(name.casefold())
        if ("gmm" in entry) == ("private" in entry):
            raise UsageError(f"recipe: '{path}' needs exactly one of 'gmm' (a real device's GMM file) and "
                             "'private' (a simulated device's private dataset reference)")
        if "profile" in entry and "gmm" not in entry:
            raise UsageError(f"recipe: '{path}.profile' is a real device's latency profile: it goes with 'gmm'")
        devices.append(Device(name=name, gmm=_typed(entry, "gmm", str, f"{path}.", None),
                              private=_typed(entry, "private", str, f"{path}.", None),
                              test=_typed(entry, "test", str, f"{path}.", None),
                              profile=_typed(entry, "profile", str, f"{path}.", None)))
    return tuple(devices), tuple(inboxes)


def to_document(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (written beside the run's artifacts)."""
    base = recipe.base_model
    base_doc = ({"artifact": base.artifact} if base.artifact else
                {"train": {"model": base.model, "args": dict(base.args), **dict(base.train)}})
    return {
        "version": VERSION, "name": recipe.name, "seed": recipe.seed, "device": recipe.device,
        "public": recipe.public, "base_model": base_doc, "extractor": recipe.extractor,
        "devices": [{k: v for k, v in vars(d).items() if v is not None} for d in recipe.devices],
        "budget": recipe.budget,
        "stages": {stage: (False if options is None else dict(options)) for stage, options in recipe.stages.items()},
        "thresholds": dict(recipe.thresholds),
        **({"slurm": dict(setting.split("=", 1) for setting in recipe.slurm)} if recipe.slurm else {}),
    }
