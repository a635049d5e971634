"""``create-model``: a model artifact from a timm architecture, random or with weights (a file or timm's)."""

from __future__ import annotations

from dataclasses import dataclass

from tapvits_cli.errors import UsageError
from tapvits_cli.stages.common import Written as Result, argument, artifact_lineage, option
from tapvits_cli.stages.feedback import log


@dataclass(frozen=True, kw_only=True)
class Options:
    architecture: str = argument()
    output: str = option("-o", recipe=False)
    model_args: tuple[str, ...] = option("-a", (), multiple=True)
    weights: str | None = option("--weights", recipe=False)
    pretrained: bool = option("--pretrained", False)
    class_names: str | None = option("--class-names")
    seed: int = 0
    device: str = "auto"   # the model is created on the CPU whatever is asked


def run(options: Options) -> Result:
    from tapvits_cli.artifacts.external import read_weights_file
    from tapvits_cli.artifacts.model import write_model
    from tapvits_cli.models.arguments import parse_model_args
    from tapvits_cli.models.checkpoints import import_checkpoint
    from tapvits_cli.models.factory import count_parameters, create_model, describe_model
    from tapvits_cli.runtime import seed_everything

    architecture, weights, pretrained = options.architecture, options.weights, options.pretrained
    if weights and pretrained:
        raise UsageError("--weights and --pretrained are exclusive: choose one source of weights")
    kwargs = parse_model_args(options.model_args)
    seed_everything(options.seed)
    model = create_model(architecture, kwargs, pretrained=pretrained)
    inputs, imported = {}, {}
    if weights:
        layout, notes = import_checkpoint(model, read_weights_file(weights), f"{weights} ({architecture} {kwargs or ''})")
        inputs["weights"] = artifact_lineage(weights, "file")
        log(f"{inputs['weights'].name}: {layout} layout", level=1)
        for note in notes:
            log(note)
        imported = {"weights_layout": layout, "adapted": notes}
    names = [n.strip() for n in options.class_names.split(",")] if options.class_names else None
    spec = describe_model(model, architecture, kwargs, names)
    params = {"architecture": architecture, "kwargs": kwargs, "pretrained": pretrained, "seed": options.seed}
    path = write_model(options.output, model, spec, params, inputs)
    parameters = count_parameters(model)
    log(f"{architecture}: {parameters:,} parameters, family {spec.family}, {len(spec.blocks)} blocks", level=1)
    return Result(str(path), {"output": str(path), "kind": "model", "parameters": parameters, "family": spec.family,
                              **imported})
