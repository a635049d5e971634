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


# -- renamed options: the old spelling works for one version, with a warning, and is not in --help

def test_every_renamed_option_names_a_real_option_and_only_the_new_one_is_in_the_help(tapvits):
    renamed = {name: command for name, command in cli.commands.items() if getattr(command, "renamed", None)}
    assert {"eval", "profile", "finetune"} <= set(renamed)
    for name, command in renamed.items():
        flags = {flag for param in command.params for flag in param.opts}
        text = tapvits(name, "--help").stdout
        for old, new in command.renamed.items():
            assert new in flags and old not in flags, (name, old, new)
            assert f"{new} " in text and f"{old} " not in text, (name, old)


def test_modernize_rewrites_old_spellings_but_never_a_value():
    from tapvits_cli.cli.options import modernize

    values, renamed = {"--warmup-runs": 1, "--data": 1, "-o": 1}, {"--warmup": "--warmup-runs"}
    args, used = modernize(["m", "--warmup", "3", "-o", "--warmup", "--", "--warmup"], renamed, None, values)
    assert args == ["m", "--warmup-runs", "3", "-o", "--warmup", "--", "--warmup"]   # a value and after -- stay
    assert used == [("--warmup", "--warmup-runs")]
    assert modernize(["--warmup=4"], renamed, None, values)[0] == ["--warmup-runs=4"]
    with pytest.raises(click.UsageError, match="--warmup-runs is given twice"):
        modernize(["--warmup", "3", "--warmup-runs=4"], renamed, None, values)
    args, used = modernize(["-o", "out", "digits:split=test", "x"], {}, "--data", values)
    assert args == ["-o", "out", "--data", "digits:split=test", "x"]   # only the first bare token; click refuses x
    assert used == [("a positional argument", "--data digits:split=test")]


def test_an_option_given_in_both_spellings_is_refused(tapvits, tmp_path):
    result = tapvits("eval", tmp_path / "m.safetensors", "--data", "digits:split=test", "--warmup", "1", "--warmup-runs", "2",
                     "-o", tmp_path / "r.json")
    assert result.exit_code == ExitCode.USAGE and "--warmup-runs is given twice" in result.stderr


def test_an_old_spelling_still_works_and_says_it_is_deprecated(tapvits, tiny_model_file, tmp_path):
    from tapvits_cli.artifacts.report import read_report

    args = ("eval", tiny_model_file, "--data", "digits:split=test:sample=20", "--latency-batches", "1",
            "--latency-repeats", "1", "--warmup", "2", "-o", tmp_path / "r.json")
    result = tapvits(*args)
    assert result.exit_code == 0, result.stderr
    assert "--warmup is deprecated and will be removed in the next version; use --warmup-runs" in result.stderr
    assert read_report(tmp_path / "r.json")["latency"][0]["warmup"] == 2
    quiet = tapvits(*args, "-q")
    assert quiet.exit_code == 0 and "deprecated" not in quiet.stderr
