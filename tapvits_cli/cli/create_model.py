"""``tapvits create-model``: a model artifact from a timm architecture, random or with weights."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import WritingCommand, global_options
from tapvits_cli.cli.output import emit


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
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import create_model

    result = run_stage(create_model)
    emit(result.document, result.output)
