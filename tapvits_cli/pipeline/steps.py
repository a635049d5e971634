"""A recipe unrolled into the subcommand invocations that carry it out, in order.

Each :class:`Step` is one ``tapvits <stage> ARGS`` call: exactly what a user would type
(``commands.sh`` in the run directory lists them), except that the run names the files.
Argument tokens are plain strings, :class:`Input` (an artifact another step or the user
made; its content hash enters the step's key) or :class:`Output` (the file the step
writes). Dataset references enter the key through their content fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tapvits_cli.pipeline.recipe import Recipe
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
    args: tuple[Token, ...]
    output: str              # path relative to the run directory
    device: str | None = None

    @property
    def inputs(self) -> list[Input]:
        return [token for token in self.args if isinstance(token, Input)]

    def argv(self, root: str) -> list[str]:
        """The command line, with run-directory paths under ``root``."""
        return [_render(token, root) for token in self.args]


def _render(token: Token, root: str) -> str:
    if isinstance(token, Input) and token.external:
        return token.path
    if isinstance(token, (Input, Output)):
        return f"{root}/{token.path}"
    if isinstance(token, DatasetArg):
        return token.reference
    return token


def option_tokens(options: Mapping[str, Any], flags: Mapping[str, tuple[str, str | None]]) -> list[str]:
    """``--key value`` tokens of checked stage options.

    ``flags`` maps each boolean option to its (on, off) spellings, e.g.
    ``("--standardize", "--no-standardize")`` or ``("--no-pca", None)``; lists repeat
    the option (``-a``/``--augment`` style).
    """
    tokens: list[str] = []
    for key, value in options.items():
        if key in flags:
            on, off = flags[key]
            if value:
                tokens.append(on)
            elif off:
                tokens.append(off)
        elif isinstance(value, (list, tuple)):
            for item in value:
                tokens += [f"--{key}", str(item)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def build_steps(recipe: Recipe, flags: Mapping[str, Mapping[str, tuple[str, str | None]]]) -> list[Step]:
    """Every step of ``recipe`` in an order that respects their inputs.

    ``flags`` gives each stage's boolean options (see :func:`option_tokens`).
    """
    steps: list[Step] = []
    common = ["--seed", str(recipe.seed), "--device", recipe.device]

    def add(step_id: str, stage: str, args: Sequence[Token], output: str, device: str | None = None) -> str:
        steps.append(Step(step_id, stage, (*args, "-o", Output(output), *common), output, device))
        return output

    def opts(stage: str, options: Mapping[str, Any] | None) -> list[str]:
        return option_tokens(options or {}, flags.get(stage, {}))

    public = DatasetArg(recipe.public)
    base_model = recipe.base_model
    if base_model.artifact:
        base: Input = Input(base_model.artifact, external=True)
    else:
        model_args = [token for key, value in base_model.args.items() for token in ("-a", f"{key}={_yaml_scalar(value)}")]
        base = Input(add("base", "finetune", ["--model", base_model.model, *model_args, "--data", public,
                                               *opts("finetune", base_model.train)], "base/model.safetensors"))
    if recipe.extractor == BASE_EXTRACTOR:
        extractor: Token = base
    elif recipe.extractor in BUILT_IN_EXTRACTORS:
        extractor = recipe.extractor
    else:
        extractor = Input(recipe.extractor, external=True)
    pool = Input(add("public/features", "features", [public, "--extractor", extractor,
                                                        *opts("features", recipe.stages["features"])],
                     "public/features.h5"))
    for device in recipe.devices:
        where = f"devices/{device.name}"
        if device.gmm:
            gmm = Input(device.gmm, external=True)
        else:
            gmm = Input(add(f"{where}/fit-gmm", "fit-gmm", [DatasetArg(device.private), "--extractor", extractor,
                                                            *opts("fit-gmm", recipe.stages["fit-gmm"])],
                            f"{where}/gmm.safetensors", device.name))
        metric = Input(add(f"{where}/select", "select", [gmm, "--pool", pool,
                                                         *opts("select", recipe.stages["select"])],
                           f"{where}/metric.h5", device.name))
        model: Input = base
        if recipe.prunes:
            score_options = dict(recipe.stages["score"] or {})
            # The KL probes remove the share of units the budget will remove, unless told otherwise or skipped.
            probes_set = "probe-fraction" in score_options or score_options.get("no-layer-importance")
            budget_args = [] if probes_set else ["--budget", str(recipe.budget)]
            scores = Input(add(f"{where}/score", "score", [base, "--metric-set", metric, "--pool", public,
                                                          *budget_args, *opts("score", score_options)],
                               f"{where}/scores.safetensors", device.name))
            plan = Input(add(f"{where}/allocate", "allocate", [scores, "--budget", str(recipe.budget), "--model", base,
                                                              *opts("allocate", recipe.stages["allocate"])],
                             f"{where}/plan.safetensors", device.name))
            model = Input(add(f"{where}/prune", "prune", [base, plan, *opts("prune", recipe.stages["prune"])],
                              f"{where}/pruned.safetensors", device.name))
        if recipe.stage_enabled("finetune"):
            finetune_options = dict(recipe.stages["finetune"])
            teacher = ["--teacher", base] if finetune_options.pop("distill", False) else []
            model = Input(add(f"{where}/finetune", "finetune", [model, "--data", public, "--metric-set", metric,
                                                               *teacher, *opts("finetune", finetune_options)],
                              f"{where}/model.safetensors", device.name))
        if device.test and recipe.stage_enabled("eval"):
            add(f"{where}/eval", "eval", [model, "--data", DatasetArg(device.test),
                                          *opts("eval", recipe.stages["eval"])],
                f"{where}/report.json", device.name)
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
