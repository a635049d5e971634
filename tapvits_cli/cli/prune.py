"""``tapvits prune``: a model and a plan made for it → the physically smaller model artifact."""

from __future__ import annotations

from pathlib import Path

import click

from tapvits_cli.cli.options import global_options
from tapvits_cli.cli.output import emit, log
from tapvits_cli.errors import IncompatibleArtifactError


@click.command("prune", short_help="Apply a plan: slice neurons and heads into a smaller model.")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.argument("plan_path", metavar="PLAN", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Pruned model artifact to write (.safetensors).")
@global_options
def command(model_path: str, plan_path: str, output: str) -> None:
    """Slice the MLP neurons and attention heads PLAN drops out of MODEL.

    Kept heads keep their q, k, v rows and proj columns, kept neurons their fc1 rows and
    fc2 columns; a block that keeps no head (or no neuron) loses that whole branch. The
    result is an ordinary model artifact with per-block widths, which `finetune`, `eval`
    and `load_model` rebuild with no pickle. PLAN must have been made for MODEL's weights.

    Example: tapvits prune base.safetensors device.plan.safetensors -o device.pruned.safetensors
    """
    from dataclasses import replace

    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import load_model, write_model
    from tapvits_cli.artifacts.plan import read_plan
    from tapvits_cli.models.factory import count_parameters, describe_model
    from tapvits_cli.pruning import prune_model

    plan = read_plan(plan_path)
    model, spec, artifact = load_model(model_path)
    weights = artifact.metadata["model.weights_sha256"]
    if plan.model_sha256 != weights or plan.base_blocks != spec.blocks:
        raise IncompatibleArtifactError(f"{plan_path} was made for the model with weights {plan.model_sha256[:12]}, "
                                        f"{model_path} has {weights[:12]}: score and allocate this model first")
    pruned = prune_model(model, plan.keep)
    pruned_spec = replace(spec, blocks=describe_model(pruned, spec.architecture, spec.kwargs).blocks)
    before, after = count_parameters(model), count_parameters(pruned)
    inputs = {"model": LineageEntry(sha256_file(model_path), "model", Path(model_path).name),
              "plan": LineageEntry(sha256_file(plan_path), "plan", Path(plan_path).name)}
    params = {"params_before": before, "params_after": after, "strategy": plan.strategy, "budget": dict(plan.budget)}
    path = write_model(output, pruned, pruned_spec, params, inputs)
    log(f"{after:,} of {before:,} parameters ({after / before:.4f}); heads per block "
        f"{[b.heads for b in pruned_spec.blocks]}, MLP widths {[b.mlp_hidden for b in pruned_spec.blocks]}", level=1)
    emit({"output": str(path), "kind": "model", "params_before": before, "params_after": after,
          "params_fraction": after / before, "blocks": [b.to_dict() for b in pruned_spec.blocks]}, str(path))
