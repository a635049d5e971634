"""A recipe unrolled into the stage calls that carry it out, in order.

Each :class:`Step` is one stage with its options (``stages.<stage>.Options``), built here
from the recipe; its arguments are the command line those options render, exactly what a
user would type (``commands.sh`` in the run directory lists them), except that the run
names the files. In the options and the arguments a file or dataset is a placeholder:
:class:`Input` (an artifact another step or the user made; its content hash enters the
step's key), :class:`Output` (the file the step writes) or :class:`DatasetArg` (a dataset
reference, which enters the key through its content fingerprint). ``step.resolved(root)``
puts the paths in: what ``stages.<stage>.run`` takes, in this process or any worker.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tapvits_cli.pipeline.recipe import Recipe
from tapvits_cli.stages import stage_module
from tapvits_cli.stages.common import command_tokens, file_fields
from tapvits_cli.vocabulary import BASE_EXTRACTOR, BUILT_IN_EXTRACTORS


@dataclass(frozen=True)
class Input:
    path: str
    external: bool = False   # given by the user (relative to the working directory), not made by the run


@dataclass(frozen=True)
class Output:
    path: str


@dataclass(frozen=True)
class DatasetArg:
    reference: str


Token = str | Input | Output | DatasetArg


@dataclass(frozen=True)
class Step:
    id: str                  # e.g. "devices/d0/select"
    stage: str               # the subcommand
    args: tuple[Token, ...]  # its command line; built from ``options`` when there are options
    output: str              # path relative to the run directory
    device: str | None = None
    options: Any = None      # stages.<stage>.Options, files as placeholders

    @property
    def inputs(self) -> list[Input]:
        return [token for token in self.args if isinstance(token, Input)]

    def argv(self, root: str) -> list[str]:
        """The command line, with run-directory paths under ``root``."""
        return [_render(token, root) for token in self.args]

    def resolved(self, root: str):
        """The step's options with every placeholder replaced by its path (run-directory files under ``root``)."""
        return dataclasses.replace(self.options, **{name: _render(token, root)
                                                    for name, token in file_fields(self.options).items()})


def _render(token: Token, root: str) -> str:
    if isinstance(token, Input) and token.external:
        return token.path
    if isinstance(token, (Input, Output)):
        return f"{root}/{token.path}"
    if isinstance(token, DatasetArg):
        return token.reference
    return token


# A stage's options from the recipe's section of it: stage name, checked section → Options keyword arguments.
StageFields = Callable[[str, Mapping[str, Any]], dict[str, Any]]


def build_steps(recipe: Recipe, stage_fields: StageFields) -> list[Step]:
    """Every step of ``recipe`` in an order that respects their inputs.

    ``stage_fields`` turns a recipe's stage section (checked option text) into keyword
    arguments of the stage's options.
    """
    steps: list[Step] = []

    def add(step_id: str, stage: str, output: str, device_name: str | None = None, **fields: Any) -> Input:
        options = stage_module(stage).Options(**fields, output=Output(output), seed=recipe.seed, device=recipe.device)
        steps.append(Step(step_id, stage, tuple(command_tokens(options)), output, device_name, options))
        return Input(output)

    def opts(stage: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
        return stage_fields(stage, options or {})

    public = DatasetArg(recipe.public)
    base_model = recipe.base_model
    if base_model.artifact:
        base: Input = Input(base_model.artifact, external=True)
    else:
        model_args = tuple(f"{key}={_yaml_scalar(value)}" for key, value in base_model.args.items())
        base = add("base", "finetune", "base/model.safetensors", architecture=base_model.model, model_args=model_args,
                   data=public, **opts("finetune", base_model.train))
    if recipe.extractor == BASE_EXTRACTOR:
        extractor: Token = base
    elif recipe.extractor in BUILT_IN_EXTRACTORS:
        extractor = recipe.extractor
    else:
        extractor = Input(recipe.extractor, external=True)
    pool = add("public/features", "features", "public/features.h5", data=public, extractor_name=extractor,
               **opts("features", recipe.stages["features"]))
    for device in recipe.devices:
        where = f"devices/{device.name}"
        if device.gmm:
            gmm = Input(device.gmm, external=True)
        else:
            gmm = add(f"{where}/fit-gmm", "fit-gmm", f"{where}/gmm.safetensors", device.name,
                      data=DatasetArg(device.private), extractor_name=extractor, **opts("fit-gmm", recipe.stages["fit-gmm"]))
        metric = add(f"{where}/select", "select", f"{where}/metric.h5", device.name, gmm=gmm, pool=pool,
                     **opts("select", recipe.stages["select"]))
        model: Input = base
        if recipe.prunes:
            score_fields = opts("score", recipe.stages["score"])
            # The KL probes remove the share of units the budget will remove, unless told otherwise or skipped.
            if "probe_fraction" not in score_fields and not score_fields.get("no_layer_importance"):
                score_fields["budget"] = recipe.budget
            # score and finetune read the pool from the metric set, which records it: no --data
            scores = add(f"{where}/score", "score", f"{where}/scores.safetensors", device.name, model=base,
                         metric_set_path=metric, **score_fields)
            plan = add(f"{where}/allocate", "allocate", f"{where}/plan.safetensors", device.name, scores_path=scores,
                       budget=recipe.budget, model_path=base, **opts("allocate", recipe.stages["allocate"]))
            model = add(f"{where}/prune", "prune", f"{where}/pruned.safetensors", device.name, model_path=base,
                        plan_path=plan, **opts("prune", recipe.stages["prune"]))
        if recipe.stage_enabled("finetune"):
            finetune_options = dict(recipe.stages["finetune"])
            teacher = {"teacher": base} if finetune_options.pop("distill", False) else {}
            model = add(f"{where}/finetune", "finetune", f"{where}/model.safetensors", device.name, model_file=model,
                        finetune_set=metric, **teacher, **opts("finetune", finetune_options))
        if device.test and recipe.stage_enabled("eval"):
            add(f"{where}/eval", "eval", f"{where}/report.json", device.name, model_path=model,
                data=DatasetArg(device.test), **opts("eval", recipe.stages["eval"]))
    return steps


def _yaml_scalar(value: Any) -> str:
    """A timm keyword value as ``create-model -a`` reads it (JSON-like literals)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_scalar(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):   # str() gives "nan", which YAML reads as text
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return str(value)
