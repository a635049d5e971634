"""The command-line contract: help, stdout/stderr discipline, exit codes, global options."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tapvits_cli.errors import ExitCode
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, model_args

SUBCOMMANDS = ("fit-gmm", "features", "select", "score", "allocate", "prune", "finetune", "eval",
               "run", "inspect", "validate", "create-model")


def test_help_lists_every_subcommand_without_importing_torch():
    code = (
        "import sys\n"
        "from tapvits_cli.cli.main import main\n"
        "rc = main(['--help'])\n"
        "heavy = [m for m in ('torch', 'timm', 'sklearn', 'h5py', 'safetensors', 'numpy') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in SUBCOMMANDS:
        assert f"  {name} " in out, name
    assert "HEAVY=\n" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "tapvits_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "tapvits" in out.stdout


def test_usage_error_exit_code(tapvits):
    assert tapvits("create-model").exit_code == ExitCode.USAGE
    assert tapvits("no-such-command").exit_code == ExitCode.USAGE


def test_stdout_is_only_the_output_path(tmp_path, tapvits):
    out = tmp_path / "m.safetensors"
    result = tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", out)
    assert result.exit_code == 0
    assert result.stdout == f"{out}\n"


def test_json_before_or_after_subcommand(tmp_path, tapvits):
    for i, args in enumerate((["--json", "create-model"], ["create-model", "--json"])):
        out = tmp_path / f"m{i}.safetensors"
        result = tapvits(*args, TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", out)
        assert result.exit_code == 0, result.stderr
        document = result.json()
        assert document["output"] == str(out) and document["kind"] == "model"


def test_seed_makes_creation_repeatable(tmp_path, tapvits):
    from tapvits_cli.artifacts.kinds import read_artifact

    hashes = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = tmp_path / f"{name}.safetensors"
        assert tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--seed", seed, "-o", path).exit_code == 0
        hashes.append(read_artifact(path).metadata["model.weights_sha256"])
    assert hashes[0] == hashes[1] != hashes[2]


def test_seed_from_environment(tmp_path, tapvits, monkeypatch):
    from tapvits_cli.artifacts.kinds import read_artifact

    monkeypatch.setenv("TAPVITS_SEED", "7")
    path = tmp_path / "m.safetensors"
    assert tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", path).exit_code == 0
    assert read_artifact(path).header.params["seed"] == 7


def test_debug_shows_traceback_only_when_asked(tmp_path, tapvits):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    quiet = tapvits("inspect", bad)
    assert quiet.exit_code == ExitCode.INVALID_ARTIFACT and "Traceback" not in quiet.stderr
    loud = tapvits("--debug", "inspect", bad)
    assert loud.exit_code == ExitCode.INVALID_ARTIFACT and "Traceback" in loud.stderr


def test_bad_model_arguments(tmp_path, tapvits):
    result = tapvits("create-model", TINY_VIT, "-a", "img_size", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE and "KEY=VALUE" in result.stderr
    result = tapvits("create-model", "no_such_vit", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE and "unknown timm architecture" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_no_color_and_no_tty_keep_stderr_plain(tmp_path):
    env = {**os.environ, "NO_COLOR": "1"}
    out = tmp_path / "m.safetensors"
    args = [sys.executable, "-m", "tapvits_cli", "-v", "create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr and "parameters" in proc.stderr
    assert proc.stdout == f"{out}\n"


def test_dataset_command_describes_a_reference(tapvits):
    result = tapvits("--json", "dataset", "digits:split=test:classes=1,7:fold=0/2")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["reference"] == "digits:split=test:classes=1,7:fold=0/2"
    assert set(document["class_counts"]) == {"1", "7"}
    assert document["samples"] == sum(document["class_counts"].values())
    assert len(document["fingerprint"]) == 64
    bad = tapvits("dataset", "digits:colour=red")
    assert bad.exit_code == ExitCode.USAGE and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("command, option, value", [
    ("fit-gmm", "--components", "1-10000000000"),    # expanded before any check: filled memory
    ("fit-gmm", "--components", "1025"),
    ("fit-gmm", "--components", "٣"),                 # a digit to int(), not to the documented syntax
    ("prune", "--merge-layers", "0-99999999999"),
])
def test_integer_ranges_are_bounded_before_they_are_expanded(tmp_path, tapvits, command, option, value):
    anything = tmp_path / "x.safetensors"
    anything.write_bytes(b"")
    result = tapvits(command, str(anything), option, value, "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.USAGE and f"Invalid value for '{option}': expected" in result.stderr, result.stderr


@pytest.mark.parametrize("args", [
    ("eval", "MODEL", "--data", "digits:indices=0-9", "--latency-batches", "1000000", "-o", "OUT"),   # 2 GB of images
    ("profile", "MODEL", "--threads", "100000", "-o", "OUT"),          # libgomp: raw line, exit 1, or the OOM killer
    ("profile", "MODEL", "--threads", str((os.cpu_count() or 1) + 1), "-o", "OUT"),   # beyond this machine
    ("profile", "MODEL", "--tokens", "100000", "-o", "OUT"),           # hung for minutes
    ("profile", "MODEL", "--batch-sizes", "1,1000000000000", "-o", "OUT"),
    ("select", "MODEL", "--pool", "MODEL", "--prior-draws", "1000000000", "-o", "OUT"),   # 7.45 GiB
    ("finetune", "MODEL", "--data", "digits", "--lr", "1e39", "-o", "OUT"),               # overflow inside AdamW
    ("finetune", "MODEL", "--data", "digits", "--distill-temperature", "1e160", "-o", "OUT"),
    ("finetune", "MODEL", "--data", "digits", "--workers", "100000", "-o", "OUT"),        # 100,000 processes
    ("finetune", "MODEL", "--data", "digits", "--augment", "crop=100000", "-o", "OUT"),   # 2.5 TB batches
    ("fit-gmm", "--data", "digits", "-e", "MODEL", "--noise-scale", "1e308", "-o", "OUT"),
    ("fit-gmm", "--data", "digits", "-e", "MODEL", "--dp-epsilon", "1e-300", "-o", "OUT"),
    ("fit-gmm", "--data", "digits", "-e", "MODEL", "--dp-epsilon", "1", "--dp-delta", "1e-320", "-o", "OUT"),
    ("run", "MODEL", "--jobs", "1000000000000"),                         # OverflowError in the process pool
    ("run", "MODEL", "--jobs", "2", "--cpus-per-step", "1000000000000"),
])
def test_sizes_far_beyond_use_are_usage_errors(args, tiny_model_file, tmp_path, tapvits):
    """Found by a review: each was exit 1, a crash, a hang or gigabytes for a tiny input."""
    argv = [str(tiny_model_file) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = tapvits(*argv)
    assert result.exit_code == ExitCode.USAGE, (args, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argument, reason", [
    ("embed_dim=-24", "negative dimension"),
    ("patch_size=0", "by zero"),
    ("depth=-1", "non-negative"),
])
def test_create_model_arguments_timm_cannot_build_are_usage_errors(argument, reason, tmp_path, tapvits):
    """A review: each was exit 1 (an internal error)."""
    result = tapvits("create-model", TINY_VIT, "-a", argument, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE and "timm cannot build" in result.stderr and reason in result.stderr
    assert not (tmp_path / "m.safetensors").exists()
