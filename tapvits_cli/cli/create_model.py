"""``tapvits create-model``: a model artifact from a timm architecture, random or with weights."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log
from tapvits_cli.errors import UsageError
from tapvits_cli.models.arguments import parse_model_args


@click.command("create-model", cls=WritingCommand, short_help="Create a model artifact from a timm architecture (random, file or pretrained weights).")
@click.argument("architecture")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model artifact to write (.safetensors).")
@click.option("-a", "--arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="timm keyword argument, repeatable: -a img_size=28 -a patch_size=4 -a in_chans=1 -a num_classes=10.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Your own weights: a safetensors file or a torch checkpoint (loaded with weights_only=True), "
                   "in timm's names or a Hugging Face transformers ViT/DeiT/Swin checkpoint's. A classifier for "
                   "another class count is replaced, the first convolution adapted to in_chans, a position "
                   "embedding for another image size resampled.")
@click.option("--pretrained", is_flag=True,
              help="timm's pretrained weights: from the local Hugging Face hub cache, else downloaded "
                   "(HF_HUB_OFFLINE=1: the cache only).")
@click.option("--class-names", help="Comma-separated class names, one per output class.")
@global_options
def command(architecture: str, output: str, model_args: tuple[str, ...], weights: str | None,
            pretrained: bool, class_names: str | None) -> None:
    """Create a model artifact from a timm ARCHITECTURE name and keyword arguments.

    Without --weights or --pretrained the weights are a seeded random initialisation,
    which is how offline benchmarks start a base model before `finetune` trains it.

    With --weights the checkpoint's layout is recognised from its tensor names (timm,
    transformers ViT/DeiT, transformers Swin) and wrapper prefixes (module., model.)
    are removed. The -a keyword arguments describe the model to create: with
    -a num_classes=N the checkpoint's classifier is replaced by a fresh one when its
    class count differs, with -a in_chans=1 RGB filters are summed, with -a img_size=S
    its absolute position embedding is resampled to the new token grid (timm's rules
    for all three); every other tensor must fit.

    Examples: tapvits create-model vit_tiny_patch16_224 -a img_size=28 -a patch_size=4
    -a in_chans=1 -a num_classes=10 -o base.safetensors

    tapvits create-model deit_tiny_patch16_224 --weights deit_tiny.pth -a num_classes=10
    -a img_size=112 -o deit10.safetensors
    """
    from tapvits_cli.artifacts.external import read_weights_file
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import write_model
    from tapvits_cli.models.checkpoints import import_checkpoint
    from tapvits_cli.models.factory import count_parameters, create_model, describe_model
    from tapvits_cli.runtime import seed_everything

    if weights and pretrained:
        raise UsageError("--weights and --pretrained are exclusive: choose one source of weights")
    kwargs = parse_model_args(model_args)
    seed_everything(CURRENT.seed)
    model = create_model(architecture, kwargs, pretrained=pretrained)
    inputs, imported = {}, {}
    if weights:
        layout, notes = import_checkpoint(model, read_weights_file(weights), f"{weights} ({architecture} {kwargs or ''})")
        log(f"{click.format_filename(weights, shorten=True)}: {layout} layout", level=1)
        for note in notes:
            log(note)
        imported = {"weights_layout": layout, "adapted": notes}
        inputs["weights"] = LineageEntry(sha256_file(weights), "file", click.format_filename(weights, shorten=True))
    names = [n.strip() for n in class_names.split(",")] if class_names else None
    spec = describe_model(model, architecture, kwargs, names)
    params = {"architecture": architecture, "kwargs": kwargs, "pretrained": pretrained, "seed": CURRENT.seed}
    path = write_model(output, model, spec, params, inputs)
    parameters = count_parameters(model)
    log(f"{architecture}: {parameters:,} parameters, family {spec.family}, {len(spec.blocks)} blocks", level=1)
    emit({"output": str(path), "kind": "model", "parameters": parameters, "family": spec.family, **imported}, str(path))
