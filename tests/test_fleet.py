"""Fleets: the step graph scheduled serially, in local processes, on Ray and on Slurm (submitit's local stand-in).

The scheduler tests use stand-in steps that write small files (fast, no torch); the
run tests carry out the tiny digits recipe of test_run.py and compare artifacts.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tapvits_cli.artifacts.run_directory import RunDirectory
from tapvits_cli.errors import ExitCode, UsageError
from tapvits_cli.pipeline import schedule
from tapvits_cli.pipeline.steps import Input, Output, Step

from test_run import TINY_RECIPE, write_recipe


# -- stand-in steps ------------------------------------------------------------------------------

def _step(step_id: str, stage: str, output: str, needs: tuple[str, ...] = (), device: str | None = None) -> Step:
    return Step(step_id, stage, (*(Input(path) for path in needs), "-o", Output(output)), output, device)


def fake_fleet(devices=("a", "b", "c"), stage: str = "work") -> list[Step]:
    steps = [_step("base", "work", "base.txt"), _step("public/features", "work", "pool.txt", ("base.txt",))]
    for name in devices:
        where = f"devices/{name}"
        steps.append(_step(f"{where}/select", stage if name == "b" else "work", f"{where}/metric.txt",
                           ("pool.txt",), name))
        steps.append(_step(f"{where}/eval", "work", f"{where}/report.txt", (f"{where}/metric.txt", "base.txt"), name))
    return steps


def write_output(root: str, marker: str, step: Step) -> None:
    """A stand-in stage: the output is a hash of the step and its inputs' contents.

    ``boom`` fails as a stage does on bad input; ``crash-once`` kills its worker process
    the first time (``marker`` records that it did), as a lost node would, and ``crash``
    every time, as an out-of-memory kill would; ``slow`` takes 1.5 s and ``sleep`` 4 s (writing
    ``OUTPUT.started`` first); ``elsewhere`` succeeds without writing its output here, as a
    worker on an unshared file system would.
    """
    if step.stage == "boom":
        raise UsageError(f"{step.id}: refused")
    if step.stage == "crash-once" and not Path(marker).exists():
        Path(marker).write_text("crashed")
        os._exit(1)
    if step.stage == "crash":
        time.sleep(0.5)   # the slow steps beside it are in the pool when it dies
        os._exit(1)
    if step.stage == "slow":
        time.sleep(1.5)
    if step.stage == "elsewhere":   # a worker whose file system is not this machine's
        return
    if step.stage == "sleep":   # says it started, then takes longer than an interrupt waits
        Path(root, step.output).parent.mkdir(parents=True, exist_ok=True)
        Path(root, step.output + ".started").write_text("")
        time.sleep(4)
    digest = hashlib.sha256(step.id.encode())
    for token in step.inputs:
        digest.update(Path(root, token.path).read_bytes())
    target = Path(root, step.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(digest.hexdigest())


def _schedule(tmp_path, steps, executor_for, retries=1, events=None):
    root = tmp_path / "run"
    work = functools.partial(write_output, str(root), str(tmp_path / "crashed"))
    heard = events if events is not None else []
    directory = RunDirectory(root)
    try:
        return schedule.execute(steps, directory, executor_for(work), lambda reference: "", retries=retries,
                                on_event=lambda event, step, detail: heard.append((event, step.id)))
    finally:
        directory.close()


def _artifacts(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_dependencies_follow_the_files_steps_name():
    needs = schedule.dependencies(fake_fleet(("a",)))
    assert needs == {"base": (), "public/features": ("base",), "devices/a/select": ("public/features",),
                     "devices/a/eval": ("devices/a/select", "base")}


def test_local_jobs_give_the_serial_artifacts_and_skip_alike(tmp_path):
    events: list = []
    serial = _schedule(tmp_path / "s", fake_fleet(), schedule.SerialExecutor, events=events)
    assert [event for event in events if event[0] == "start"] == [("start", s.id) for s in fake_fleet()]
    local = _schedule(tmp_path / "l", fake_fleet(), lambda work: schedule.LocalExecutor(work, jobs=2))
    assert not serial.failures and not local.failures
    assert [o.source for o in local.outcomes] == ["ran"] * 8
    assert _artifacts(tmp_path / "s" / "run") == _artifacts(tmp_path / "l" / "run")
    again = _schedule(tmp_path / "l", fake_fleet(), lambda work: schedule.LocalExecutor(work, jobs=2))
    assert [o.source for o in again.outcomes] == ["skipped"] * 8


def test_a_rerun_with_nothing_to_do_starts_no_worker(tmp_path, monkeypatch):
    """Starting workers means waiting for the fork server's torch import: a no-op rerun must not."""
    _schedule(tmp_path, fake_fleet(), lambda work: schedule.LocalExecutor(work, jobs=2))

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    again = _schedule(tmp_path, fake_fleet(), lambda work: schedule.LocalExecutor(work, jobs=2))
    assert [o.source for o in again.outcomes] == ["skipped"] * 8
    with pytest.raises(AssertionError, match="pool was started"):   # the patch does reach a run with work to do
        _schedule(tmp_path / "fresh", fake_fleet(), lambda work: schedule.LocalExecutor(work, jobs=2))


def test_a_failing_device_leaves_the_others_finished_and_a_rerun_completes_it(tmp_path):
    failed = _schedule(tmp_path, fake_fleet(stage="boom"), lambda work: schedule.LocalExecutor(work, jobs=2))
    assert list(failed.failures) == ["devices/b/select"] and failed.not_started == ["devices/b/eval"]
    assert failed.failures["devices/b/select"].exit_code == ExitCode.USAGE
    assert {o.step.id for o in failed.outcomes} == {s.id for s in fake_fleet()} - {"devices/b/select", "devices/b/eval"}
    error = schedule.StepsFailedError(fake_fleet(stage="boom"), failed.failures)
    assert error.exit_code == ExitCode.USAGE and error.failed_devices == ["b"]
    assert str(error).startswith("device b failed: devices/b/select: refused;")
    rerun = _schedule(tmp_path, fake_fleet(), lambda work: schedule.LocalExecutor(work, jobs=2))
    assert not rerun.failures
    assert {o.step.id for o in rerun.outcomes if o.source == "ran"} == {"devices/b/select", "devices/b/eval"}


def test_a_killed_worker_is_retried_and_without_retries_its_device_fails(tmp_path):
    events: list = []
    retried = _schedule(tmp_path / "r", fake_fleet(stage="crash-once"),
                        lambda work: schedule.LocalExecutor(work, jobs=2), events=events)
    assert not retried.failures and len(retried.outcomes) == 8
    assert ("retry", "devices/b/select") in events
    given_up = _schedule(tmp_path / "g", fake_fleet(stage="crash"),
                         lambda work: schedule.LocalExecutor(work, jobs=2), retries=0)
    failure = given_up.failures["devices/b/select"]
    assert failure.retryable and failure.exit_code == ExitCode.INTERNAL and "worker failed after 1 attempt" in failure.message
    # A dying worker breaks the pool, and the steps beside it run again alone: only the crashing step fails.
    assert set(given_up.failures) == {"devices/b/select"} and given_up.not_started == ["devices/b/eval"]
    assert len(given_up.outcomes) == 6


def test_a_worker_that_always_dies_fails_only_its_own_step(tmp_path):
    """A local worker's death breaks the whole pool; the steps beside it are not charged for it."""
    events: list = []
    steps = [_step("devices/bad/select", "crash", "devices/bad/x.txt", device="bad"),
             *(_step(f"devices/{name}/select", "slow", f"devices/{name}/x.txt", device=name) for name in "abc")]
    result = _schedule(tmp_path, steps, lambda work: schedule.LocalExecutor(work, jobs=3), retries=1, events=events)
    assert set(result.failures) == {"devices/bad/select"}
    assert "after 2 attempts" in result.failures["devices/bad/select"].message
    assert sorted(o.step.id for o in result.outcomes) == [f"devices/{name}/select" for name in "abc"]


def test_a_suspect_runs_with_nothing_beside_it_even_with_steps_waiting(tmp_path):
    """With steps waiting, the last suspect must still run alone: beside others, its crash would break the pool
    again, go uncharged, and take a new pair of steps down each round."""
    events: list = []
    steps = [_step("devices/bad/select", "crash", "devices/bad/x.txt", device="bad"),
             *(_step(f"devices/{name}/select", "slow", f"devices/{name}/x.txt", device=name) for name in "abcdef")]
    result = _schedule(tmp_path, steps, lambda work: schedule.LocalExecutor(work, jobs=2), retries=1, events=events)
    assert set(result.failures) == {"devices/bad/select"} and len(result.outcomes) == 6
    # one uncharged rerun when the pool first broke (if it held others), then two charged attempts, both alone
    assert events.count(("retry", "devices/bad/select")) <= 2
    assert events.count(("failed", "devices/bad/select")) == 1


def test_a_worker_that_leaves_no_output_here_fails_only_its_step(tmp_path):
    result = _schedule(tmp_path, fake_fleet(stage="elsewhere"), lambda work: schedule.LocalExecutor(work, jobs=2))
    failure = result.failures["devices/b/select"]
    assert failure.exit_code == ExitCode.ENVIRONMENT and "shared" in failure.message and not failure.retryable
    assert set(result.failures) == {"devices/b/select"} and len(result.outcomes) == 6


def test_a_worker_with_other_code_refuses_its_step(tmp_path, monkeypatch):
    """A node with another tapvits or torch would write results under keys that name the driver's code."""
    ran: list = []
    step = _step("devices/a/select", "work", "devices/a/metric.h5")
    refused = schedule.perform(ran.append, step, code="0" * 64)
    assert isinstance(refused, schedule.StepFailure) and ran == []
    assert refused.exit_code == ExitCode.INCOMPATIBLE and not refused.retryable
    assert "differ from the driver's" in refused.message
    assert schedule.perform(ran.append, step, code=schedule.code_fingerprint()) >= 0 and ran == [step]
    # Through real worker processes: the driver claims other code, every worker refuses, nothing is retried.
    monkeypatch.setattr(schedule, "code_fingerprint", lambda: "0" * 64)
    result = _schedule(tmp_path / "w", fake_fleet(), lambda work: schedule.LocalExecutor(work, jobs=2))
    assert not result.outcomes and all(f.exit_code == ExitCode.INCOMPATIBLE for f in result.failures.values())


def test_a_failed_shared_step_starts_no_device(tmp_path):
    steps = fake_fleet()
    steps[0] = _step("base", "boom", "base.txt")
    result = _schedule(tmp_path, steps, schedule.SerialExecutor)
    assert list(result.failures) == ["base"] and len(result.not_started) == 7 and not result.outcomes
    assert str(schedule.StepsFailedError(steps, result.failures)).startswith("shared step base failed")


def _cancel_a_running_step(root: Path, executor_for) -> tuple[bool, bool]:
    """Start a 4-second step on ``executor_for(work)``, cancel it once it has started, wait past its end:
    whether it started, and whether it still wrote its output.

    submitit cancels a local job with SIGINT, which a process started in the background of a
    non-interactive shell inherits as ignored (``pytest … &``): the job processes started here get
    SIGINT's default action whatever this process inherited, so the outcome does not depend on how
    the suite was launched.
    """
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # a handler resets to default in children
    try:
        executor = executor_for(functools.partial(write_output, str(root), str(root.parent / "crashed")))
        executor.submit(_step("devices/a/select", "sleep", "devices/a/x.txt", device="a"))
        deadline = time.monotonic() + 120
        while not (root / "devices/a/x.txt.started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        executor.close(cancel=True)
        time.sleep(6)
    finally:
        signal.signal(signal.SIGINT, previous)
    return (root / "devices/a/x.txt.started").exists(), (root / "devices/a/x.txt").exists()


def test_ray_tasks_give_the_serial_artifacts(tmp_path):
    ray = pytest.importorskip("ray")
    serial = _schedule(tmp_path / "s", fake_fleet(), schedule.SerialExecutor)
    # Ray's workers import the stand-in stage from this file, so they need its folder on their path.
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                      os.environ.get("PYTHONPATH", "")])}})
    try:
        on_ray = _schedule(tmp_path / "r", fake_fleet(), lambda work: schedule.RayExecutor(work))
        # An interrupted run cancels its running tasks: on a cluster they would outlive it and go on writing.
        started, finished = _cancel_a_running_step(tmp_path / "cancelled", schedule.RayExecutor)
    finally:
        ray.shutdown()
    assert not serial.failures and not on_ray.failures
    assert _artifacts(tmp_path / "s" / "run") == _artifacts(tmp_path / "r" / "run")
    assert started and not finished


def test_submitit_local_jobs_stand_in_for_slurm(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    failed = _schedule(tmp_path, fake_fleet(stage="boom"),
                       lambda work: schedule.SlurmExecutor(work, str(tmp_path / "slurm"), {"timeout_min": 5},
                                                           cluster="local"))
    assert list(failed.failures) == ["devices/b/select"] and len(failed.outcomes) == 6
    assert (tmp_path / "slurm").stat().st_mode & 0o777 == 0o700   # pickles others must not write
    serial = _schedule(tmp_path / "s", fake_fleet(stage="boom"), schedule.SerialExecutor)
    assert _artifacts(tmp_path / "run") == _artifacts(tmp_path / "s" / "run")
    # an interrupted run cancels its jobs: queued or running, none goes on writing after it
    started, finished = _cancel_a_running_step(tmp_path / "cancelled", lambda work: schedule.SlurmExecutor(
        work, str(tmp_path / "slurm-cancelled"), {"timeout_min": 5}, cluster="local"))
    assert started and not finished


# -- whole runs of the tiny digits recipe ---------------------------------------------------------

# Header values that record when or how fast a file was made, and the input hashes that follow from them.
VOLATILE = re.compile(r"(created|seconds|per_second|sha256)$")
RECORDS = {".lock", "run.json", "summary.json", "commands.sh", "recipe.yaml"}


def _lasting(value, key=""):
    """A header value without its volatile members (JSON held in strings is opened up)."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: _lasting(v, k) for k, v in sorted(value.items()) if not VOLATILE.search(k)}
    return value


def artifact_digest(path: Path) -> str:
    """SHA-256 of an artifact's tensors (or datasets, or JSON body) and its header minus the volatile members."""
    digest = hashlib.sha256()
    if path.suffix == ".safetensors":
        raw = path.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        digest.update(json.dumps(_lasting(json.loads(raw[8:8 + size])), sort_keys=True).encode() + raw[8 + size:])
    elif path.suffix == ".json":
        digest.update(json.dumps(_lasting(json.loads(path.read_text())), sort_keys=True).encode())
    else:
        import h5py

        with h5py.File(path, "r") as file:
            def add(name, node):
                attributes = {k: (v if isinstance(v, str) else repr(v)) for k, v in node.attrs.items()}
                digest.update(name.encode() + json.dumps(_lasting(attributes), sort_keys=True).encode())
                if isinstance(node, h5py.Dataset):
                    digest.update(np.ascontiguousarray(node[()]).tobytes())
            add("/", file)
            file.visititems(add)
    return digest.hexdigest()


def run_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): artifact_digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in RECORDS and "slurm" not in p.relative_to(root).parts}


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    """The tiny recipe carried out serially, once for this module (one torch thread, as conftest sets)."""
    from tapvits_cli.cli.main import main

    root = tmp_path_factory.mktemp("serial")
    recipe = write_recipe(root, TINY_RECIPE)
    assert main(["-q", "run", str(recipe), "--run-dir", str(root / "run")]) == 0
    return recipe, root / "run", json.loads((root / "run" / "summary.json").read_text())


def _copy_forgetting(run: Path, target: Path, prefixes: tuple[str, ...]) -> Path:
    """A copy of a finished run directory whose steps under ``prefixes`` are unrecorded (so they run again)."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".lock"))
    state = json.loads((target / "run.json").read_text())
    state["steps"] = {k: v for k, v in state["steps"].items() if not k.startswith(prefixes)}
    (target / "run.json").write_text(json.dumps(state))
    return target


def test_jobs_2_gives_the_artifacts_of_a_serial_run(tmp_path, tapvits, serial_run):
    recipe, serial, expected = serial_run
    result = tapvits("--json", "run", recipe, "--run-dir", tmp_path / "run", "--jobs", "2", "--cpus-per-step", "1")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["steps"]["ran"] == summary["steps"]["total"] == 16
    assert [row["top1"] for row in summary["devices"]] == [row["top1"] for row in expected["devices"]]
    # rows read as each device finished match the serial run's, read at the end (all but timings)
    untimed = lambda row: {k: v for k, v in row.items() if not k.startswith(("latency_", "stage_"))}
    assert [untimed(row) for row in summary["devices"]] == [untimed(row) for row in expected["devices"]]
    digests = run_digests(tmp_path / "run")
    assert len(digests) == 16 and digests == run_digests(serial)


def test_a_device_that_fails_leaves_the_others_finished_and_a_rerun_completes_it(tmp_path, tapvits, serial_run):
    recipe, serial, _ = serial_run
    # high's last steps run again, beside the bad device's
    run = _copy_forgetting(serial, tmp_path / "run", ("devices/high/finetune", "devices/high/eval"))
    gmm = tmp_path / "uploaded.safetensors"
    gmm.write_bytes((serial / "devices" / "low" / "gmm.safetensors").read_bytes()[:300])   # a truncated upload
    fleet = write_recipe(tmp_path, {**TINY_RECIPE, "devices": [
        *TINY_RECIPE["devices"], {"name": "bad", "gmm": str(gmm), "test": "digits:split=test:classes=0-4:fold=1/2"}]})
    failed = tapvits("--json", "run", fleet, "--run-dir", run, "--jobs", "2", "--cpus-per-step", "1")
    assert failed.exit_code == ExitCode.INVALID_ARTIFACT, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert "device bad failed: devices/bad/select:" in last and "run again to resume" in last
    partial = failed.json()   # the summary of the devices that finished, written before the exit
    assert partial["failed_devices"] == ["bad"] and [row["device"] for row in partial["devices"]] == ["low", "high"]
    assert json.loads((run / "summary.json").read_text())["failed_devices"] == ["bad"]
    state = json.loads((run / "run.json").read_text())["steps"]
    assert {step for step in state if step.startswith("devices/high/")} == {
        f"devices/high/{stage}" for stage in ("fit-gmm", "select", "score", "allocate", "prune", "finetune", "eval")}
    assert not any(step.startswith("devices/bad/") for step in state)

    shutil.copyfile(serial / "devices" / "low" / "gmm.safetensors", gmm)   # the device sends its file again
    resumed = tapvits("--json", "run", fleet, "--run-dir", run, "--jobs", "2", "--cpus-per-step", "1")
    assert resumed.exit_code == 0, resumed.stderr
    summary = resumed.json()
    assert summary["steps"]["ran"] == 6 and summary["steps"]["skipped"] == 16
    assert [row["device"] for row in summary["devices"]] == ["low", "high", "bad"] and summary["failed_devices"] == []
    digests = run_digests(run)
    assert all(digests[name] == digest for name, digest in run_digests(serial).items())


def test_a_missing_engine_exits_8_naming_the_extra(tmp_path, tapvits, monkeypatch, serial_run):
    recipe, serial, _ = serial_run
    import sys

    for module, extra in (("ray", "ray"), ("submitit", "slurm")):
        monkeypatch.setitem(sys.modules, module, None)   # as if not installed
        result = tapvits("run", recipe, "--run-dir", tmp_path / extra, "--executor", "slurm" if extra == "slurm" else "ray")
        assert result.exit_code == ExitCode.DATA_UNAVAILABLE
        assert f'pip install "tapvits[{extra}]"' in result.stderr
        assert not (tmp_path / extra).exists()   # refused before the run directory is made
    mixed = tapvits("run", recipe, "--run-dir", tmp_path / "mixed", "--jobs", "2", "--address", "auto")
    assert mixed.exit_code == ExitCode.USAGE and "--address names a Ray cluster" in mixed.stderr


def test_ray_runs_the_recipe_to_the_same_top1(tmp_path, tapvits, serial_run):
    ray = pytest.importorskip("ray")
    recipe, serial, expected = serial_run
    run = _copy_forgetting(serial, tmp_path / "run", ("devices/",))   # every device's chain runs on Ray
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = tapvits("--json", "run", recipe, "--run-dir", run, "--executor", "ray")
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["steps"]["ran"] == 14 and summary["steps"]["skipped"] == 2
    assert [row["top1"] for row in summary["devices"]] == [row["top1"] for row in expected["devices"]]
    assert run_digests(run) == run_digests(serial)


def test_slurm_jobs_ask_for_a_gpu_only_for_finetune_and_refuse_unknown_settings(tmp_path):
    pytest.importorskip("submitit")
    executor = schedule.SlurmExecutor(print, str(tmp_path), {"timeout_min": 60}, cpus=4, gpus=True, cluster="debug")
    assert "gpus_per_node" not in executor._submitters[False]._executor.parameters
    assert executor._submitters[True]._executor.parameters["gpus_per_node"] == 1
    assert schedule.slurm_parameters(["partition=gpu", "time=30", "mem_gb=16", "cluster=local"]) == (
        {"slurm_partition": "gpu", "timeout_min": 30, "mem_gb": 16}, "local")
    with pytest.raises(UsageError, match="--slurm: Unknown executor 'bogus'"):
        schedule.SlurmExecutor(print, str(tmp_path), {"bogus_key": 1}, cluster="local")
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        schedule.slurm_parameters(["partition"])


def test_a_recipe_names_its_slurm_settings_and_flags_override_them(tmp_path):
    from tapvits_cli.cli.run import check_stage
    from tapvits_cli.pipeline.recipe import parse_recipe, to_document

    recipe = parse_recipe({**TINY_RECIPE, "slurm": {"partition": "gpu", "time": 30}}, "fleet", check_stage)
    assert recipe.slurm == ("partition=gpu", "time=30")
    assert to_document(recipe)["slurm"] == {"partition": "gpu", "time": "30"}
    assert parse_recipe(to_document(recipe), "fleet", check_stage).slurm == recipe.slurm
    assert schedule.slurm_parameters([*recipe.slurm, "time=90"])[0] == {"slurm_partition": "gpu", "timeout_min": 90}
    for bad in ({"time": None}, {"partition": ""}, {"exclusive": True}, ["partition=gpu"]):
        with pytest.raises(UsageError, match="slurm"):
            parse_recipe({**TINY_RECIPE, "slurm": bad}, "fleet", check_stage)


def test_submitit_local_jobs_stand_in_for_slurm_in_a_run(tmp_path, tapvits, serial_run):
    """The recipe's slurm section is what makes this run local (cluster=local); a flag overrides its time."""
    pytest.importorskip("submitit")
    _, serial, expected = serial_run
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "slurm": {"cluster": "local", "time": 5}})
    run = _copy_forgetting(serial, tmp_path / "run", ("devices/low/eval",))
    result = tapvits("--json", "run", recipe, "--run-dir", run, "--executor", "slurm", "--slurm", "time=10")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["steps"]["ran"] == 1 and summary["devices"][0]["top1"] == expected["devices"][0]["top1"]
    assert run_digests(run) == run_digests(serial)
    assert list((run / "slurm").glob("*_log.err"))   # submitit's job logs stay beside the run


def test_devices_from_an_inbox_skip_invalid_uploads(tmp_path, tapvits, serial_run):
    recipe, serial, _ = serial_run
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copyfile(serial / "devices" / "low" / "gmm.safetensors", inbox / "phone-1.gmm.safetensors")
    shutil.copyfile(serial / "devices" / "high" / "gmm.safetensors", inbox / "phone-2.safetensors")
    shutil.copyfile(serial / "devices" / "high" / "gmm.safetensors", inbox / "phone-3.gmm.safetensors")
    (inbox / "phone-3.profile.json").write_text('{"tapvits.kind": "profile"}')          # a broken profile
    (inbox / "truncated.gmm.safetensors").write_bytes(b"\x08\x00\x00")
    shutil.copyfile(serial / "devices" / "low" / "gmm.safetensors", inbox / "low.safetensors")   # a listed name
    shutil.copyfile(serial / "devices" / "low" / "gmm.safetensors", inbox / "LOW.gmm.safetensors")   # the same folder
    (inbox / "link.gmm.safetensors").symlink_to(inbox / "phone-1.gmm.safetensors")   # anything the run can read
    (inbox / "folder.gmm.safetensors").mkdir()
    fleet = write_recipe(tmp_path, {**TINY_RECIPE, "budget": 1.0, "stages": {**TINY_RECIPE["stages"], "finetune": False},
                                    "devices": [TINY_RECIPE["devices"][0], {"inbox": str(inbox)}]})
    run = _copy_forgetting(serial, tmp_path / "run", ("devices/",))
    result = tapvits("--json", "run", fleet, "--run-dir", run)
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert [row["device"] for row in summary["devices"]] == ["low", "phone-1", "phone-2"]
    assert summary["steps"]["skipped"] == 2 and summary["steps"]["ran"] == 5   # fit-gmm, select, eval; 2 selects
    skipped = {Path(entry["file"]).name: entry["reason"] for entry in summary["skipped_uploads"]}
    assert set(skipped) == {"low.safetensors", "phone-3.gmm.safetensors", "truncated.gmm.safetensors",
                            "LOW.gmm.safetensors", "link.gmm.safetensors", "folder.gmm.safetensors"}
    assert "already taken" in skipped["low.safetensors"] and "profile" in skipped["phone-3.gmm.safetensors"]
    assert "ignoring case" in skipped["LOW.gmm.safetensors"]
    assert "symbolic link" in skipped["link.gmm.safetensors"] and "not a plain file" in skipped["folder.gmm.safetensors"]
    assert "inbox: skipped" in result.stderr
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())["devices"]
    assert recorded[1] == {"name": "phone-1", "gmm": str(inbox / "phone-1.gmm.safetensors")}
    assert json.loads((run / "summary.json").read_text())["skipped_uploads"] == summary["skipped_uploads"]

    for upload in ("phone-1.gmm.safetensors", "phone-2.safetensors", "LOW.gmm.safetensors", "link.gmm.safetensors"):
        (inbox / upload).unlink()
    (inbox / "folder.gmm.safetensors").rmdir()
    only = write_recipe(tmp_path, {**TINY_RECIPE, "devices": [{"inbox": str(inbox / "*.gmm.safetensors")}]})
    empty = tapvits("run", only, "--dry-run")
    assert empty.exit_code == ExitCode.USAGE and "no valid device files (2 skipped)" in empty.stderr


def test_sigterm_stops_a_run_and_its_workers_and_frees_the_run_directory(tmp_path):
    """What Slurm, Kubernetes or ``timeout`` send: the run exits 130 with one line, no worker goes on
    writing into the run directory, and the lock is free for the next run."""
    import fcntl
    import signal
    import subprocess
    import sys

    slow = {**TINY_RECIPE, "base_model": {"train": {**TINY_RECIPE["base_model"]["train"], "epochs": 1000}}}
    recipe, run_dir, log = write_recipe(tmp_path, slow), tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "tapvits_cli", "run", str(recipe), "--run-dir", str(run_dir),
                                   "--jobs", "2", "--cpus-per-step", "1"], stdout=subprocess.DEVNULL, stderr=stderr,
                                  cwd=tmp_path, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while "base: tapvits" not in log.read_text() and time.monotonic() < deadline:   # the base step started
                time.sleep(0.2)
            time.sleep(3)   # its worker is training now
            driver.send_signal(signal.SIGTERM)
            assert driver.wait(timeout=60) == ExitCode.INTERRUPTED
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    assert log.read_text().strip().splitlines()[-1] == "tapvits: interrupted"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # the workers and the fork server are gone with the driver
        try:
            os.killpg(driver.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(driver.pid, signal.SIGKILL)
        pytest.fail("processes of the interrupted run outlived it")
    with open(run_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # raises if anyone still holds it
    assert not list(run_dir.rglob("*.safetensors"))


def test_a_second_sigterm_ends_the_process_at_once():
    """The first SIGTERM becomes an interrupt; one that arrives while a native call (a DDP rendezvous) delays
    the handler can be followed by a second, which the default action then serves."""
    import signal

    from tapvits_cli.cli.main import _interrupt

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            _interrupt(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_starting_workers_stops_quietly_once_the_pool_is_shut_down():
    """An interrupt can shut the pool down while the thread that starts its workers still submits: that
    thread printed "RuntimeError: cannot schedule new futures after shutdown" after "tapvits: interrupted"."""
    from concurrent.futures import ProcessPoolExecutor

    from tapvits_cli.pipeline.schedule import start_workers

    pool = ProcessPoolExecutor(max_workers=1)
    pool.shutdown()
    start_workers(pool, 2)   # returns, raises nothing
