"""``tapvits allocate``: scores + budget → a plan of kept neurons and heads per block."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import FiniteFloat, WritingCommand, global_options
from tapvits_cli.cli.output import emit
from tapvits_cli.vocabulary import ALLOCATION_STRATEGIES, BUDGET_FRACTION, DEFAULT_ALLOCATION_STRATEGY

_FRACTION = FiniteFloat.within(BUDGET_FRACTION)


@click.command("allocate", cls=WritingCommand, short_help="Turn layer importance and a budget into a pruning plan.")
@click.argument("scores_path", metavar="SCORES", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Plan artifact to write (.safetensors).")
@click.option("--budget", type=_FRACTION, metavar="F", help="Keep this fraction of the whole model's parameters.")
@click.option("--budget-macs", type=_FRACTION, metavar="F", help="Keep this fraction of the whole model's MACs instead.")
@click.option("--strategy", type=click.Choice(ALLOCATION_STRATEGIES), default=DEFAULT_ALLOCATION_STRATEGY, show_default=True,
              help="kl: softmax of the KL layer importance (METHOD.md); kl-power: shares ∝ KL^τ, so small KLs "
                   "still differ; uniform: one ratio everywhere; "
                   "global: one ranking of normalised unit scores across layers.")
@click.option("--min-keep", type=FiniteFloat(0, 1), default=0.1, show_default=True,
              help="Floor: every layer keeps at least this fraction of its units (and at least one).")
@click.option("--allow-branch-removal", is_flag=True,
              help="A layer whose share falls below half its floor loses its whole attention or MLP branch.")
@click.option("--temperature", type=FiniteFloat(0, min_open=True), default=1.1, show_default=True,
              help="τ of kl's softmax over layer importances, the exponent of kl-power.")
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
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import allocate

    result = run_stage(allocate)
    emit(result.document, result.output)
