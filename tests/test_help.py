"""--help: every option described, the global options in one section, dataset grammar and
sources, and a misspelled architecture answered with its near match."""

from __future__ import annotations

import click
import pytest

from tapvits_cli.cli.main import GLOBAL_OPTION_NAMES, GLOBAL_SECTION, cli
from tapvits_cli.errors import ExitCode


def test_every_option_of_every_subcommand_is_described():
    undescribed = [f"{name} {max(param.opts, key=len)}" for name, command in cli.commands.items()
                   for param in command.params
                   if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()]
    assert undescribed == []


@pytest.mark.parametrize("name", ["score", "finetune", "inspect", "report"])
def test_global_options_come_once_in_their_own_section(tapvits, name):
    text = tapvits(name, "--help").stdout
    before, _, shared = text.partition(GLOBAL_SECTION)
    assert text.count(GLOBAL_SECTION) == 1 and "\nOptions:\n" in before
    own = before.split("\nOptions:\n")[1]
    for option in ("--json", "--seed", "--device", "--progress / --no-progress"):
        assert f"\n  {option} " not in own and f"\n  {option} " in shared
    assert GLOBAL_OPTION_NAMES >= {"json_", "debug", "verbose", "quiet", "seed", "device", "progress"}


def test_group_help_keeps_its_command_list(tapvits):
    text = tapvits("--help").stdout
    assert GLOBAL_SECTION in text and "Commands:" in text and "report" in text.split("Commands:")[1]


def test_dataset_help_gives_the_grammar_and_every_source(tapvits):
    from tapvits_cli.data.reference import BUILTINS, OPTIONS

    text = tapvits("dataset", "--help").stdout
    for key in OPTIONS:
        assert f"{key}=" in text, key
    for source in (*BUILTINS, "FILE.npz", "FILE.h5", "DIRECTORY"):
        assert source in text, source


def test_epochs_and_label_smoothing_are_explained(tapvits):
    text = " ".join(tapvits("finetune", "--help").stdout.split())
    assert "--epochs INTEGER RANGE Passes over the training samples" in text
    assert "--label-smoothing FLOAT Cross-entropy target" in text


@pytest.mark.parametrize("typo,meant", [("deit_tiny_patch16_244", "deit_tiny_patch16_224"),
                                        ("vit_tiny_pach16_224", "vit_tiny_patch16_224")])
def test_a_misspelled_architecture_gets_the_near_match(tapvits, tmp_path, typo, meant):
    result = tapvits("create-model", typo, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE
    assert f"did you mean {meant}" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_name_with_no_near_spelling_lists_its_family(tapvits, tmp_path):
    result = tapvits("create-model", "vit_nothing_like_it", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE and "models of that family: vit_" in result.stderr
