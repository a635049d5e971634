"""``tapvits allocate``: scores + budget → a plan of kept neurons and heads per block."""

from __future__ import annotations

from pathlib import Path

import click

from tapvits_cli.cli.options import FiniteFloat, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log
from tapvits_cli.errors import IncompatibleArtifactError, UsageError
from tapvits_cli.vocabulary import ALLOCATION_STRATEGIES, BUDGET_FRACTION, DEFAULT_ALLOCATION_STRATEGY, UNIT_KINDS

_FRACTION = FiniteFloat(BUDGET_FRACTION.low, BUDGET_FRACTION.high, BUDGET_FRACTION.low_open, BUDGET_FRACTION.high_open)


@click.command("allocate", cls=WritingCommand, short_help="Turn layer importance and a budget into a pruning plan.")
@click.argument("scores_path", metavar="SCORES", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Plan artifact to write (.safetensors).")
@click.option("--budget", type=_FRACTION, metavar="F", help="Keep this fraction of the whole model's parameters.")
@click.option("--budget-macs", type=_FRACTION, metavar="F", help="Keep this fraction of the whole model's MACs instead.")
@click.option("--strategy", type=click.Choice(ALLOCATION_STRATEGIES), default=DEFAULT_ALLOCATION_STRATEGY, show_default=True,
              help="kl: softmax of the KL layer importance (METHOD.md); uniform: one ratio everywhere; "
                   "global: one ranking of normalised unit scores across layers.")
@click.option("--min-keep", type=FiniteFloat(0, 1), default=0.1, show_default=True,
              help="Floor: every layer keeps at least this fraction of its units (and at least one).")
@click.option("--allow-branch-removal", is_flag=True,
              help="A layer whose share falls below half its floor loses its whole attention or MLP branch.")
@click.option("--temperature", type=FiniteFloat(0, min_open=True), default=1.1, show_default=True,
              help="τ of the kl strategy's softmax over layer importances.")
@click.option("--tolerance", type=FiniteFloat(0, 1), default=0.005, show_default=True,
              help="Largest accepted relative gap to the budget; beyond it the exit code is 5.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              help="The scored model artifact, to check the plan is made for it (its architecture is already "
                   "recorded in SCORES).")
@global_options
def command(scores_path: str, output: str, budget: float | None, budget_macs: float | None, strategy: str,
            min_keep: float, allow_branch_removal: bool, temperature: float, tolerance: float,
            model_path: str | None) -> None:
    """Choose, per block, the MLP neurons and heads to keep so the whole model meets a budget.

    The budget counts the whole model (embeddings and head included), in parameters
    (--budget) or MACs (--budget-macs); the plan lands within --tolerance of it or the
    command fails with exit code 5 and the closest achievable value. Each layer keeps its
    top units by score.

    Example: tapvits allocate device.scores.safetensors --budget 0.7 -o device.plan.safetensors
    """
    from tapvits_cli.allocation.strategies import allocate
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import verify_model
    from tapvits_cli.artifacts.plan import write_plan
    from tapvits_cli.artifacts.scores import read_scores
    from tapvits_cli.models.factory import cost_model

    if (budget is None) == (budget_macs is None):
        raise UsageError("give exactly one of --budget (parameters) and --budget-macs")
    budget_kind, value = ("params", budget) if budget is not None else ("macs", budget_macs)
    scores = read_scores(scores_path)
    if strategy == "kl" and scores.layer_importance is None:
        raise UsageError(f"{scores_path} has no layer importance (scored with --no-layer-importance): "
                         "use --strategy uniform or global, or score again with the KL probes")
    inputs = {"scores": LineageEntry(sha256_file(scores_path), "scores", Path(scores_path).name)}
    if model_path:
        artifact, spec, _ = verify_model(model_path)   # every rule validate applies, weights included
        if artifact.metadata.get("model.weights_sha256") != scores.model_sha256 or spec.blocks != scores.blocks:
            raise IncompatibleArtifactError(f"{scores_path} was computed on another model (weights "
                                            f"{scores.model_sha256[:12]}) than {model_path}: score this model first")
        inputs["model"] = LineageEntry(sha256_file(model_path), "model", Path(model_path).name)
    cost = cost_model(scores.model_spec)
    unit_scores = {key: values["score"] for key, values in scores.values.items()}
    result = allocate(cost, unit_scores, scores.layer_importance, budget_kind, value, strategy, min_keep,
                      allow_branch_removal, temperature, tolerance)

    keep = {(layer.block, layer.kind): kept for layer, kept in zip(cost.layers, result.keep)}
    achieved = {"params": result.params, "params_fraction": result.params / result.base_params,
                "macs": result.macs, "macs_fraction": result.macs / result.base_macs}
    params = {"budget": value, "budget_kind": budget_kind, "strategy": strategy, "min_keep": min_keep,
              "allow_branch_removal": allow_branch_removal, "temperature": temperature, "tolerance": tolerance}
    path = write_plan(output, keep, strategy, {"kind": budget_kind, "value": value}, achieved,
                      {"params": result.base_params, "macs": result.base_macs}, scores.model,
                      inputs["scores"].sha256, params, inputs)
    log(f"{strategy}: {result.params:,} of {result.base_params:,} parameters ({achieved['params_fraction']:.4f}), "
        f"{result.macs:,} of {result.base_macs:,} MACs ({achieved['macs_fraction']:.4f})", level=1)
    ratios = {kind: [round(len(keep[(block, kind)]) / widths.units(kind), 4) for block, widths in enumerate(scores.blocks)]
              for kind in UNIT_KINDS}
    emit({"output": str(path), "kind": "plan", "strategy": strategy, "budget": {"kind": budget_kind, "value": value},
          "achieved": achieved, "keep_ratios": ratios}, str(path))

