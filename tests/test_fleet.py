"""Fleets: the step graph scheduled serially, in local processes, on Ray and on Slurm (submitit's local stand-in).

The scheduler tests use stand-in steps that write small files (fast, no torch); the
run tests carry out the tiny digits recipe of test_run.py and compare artifacts.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import pytest

from tapvits_cli.artifacts.run_directory import RunDirectory
from tapvits_cli.errors import ExitCode, UsageError
from tapvits_cli.pipeline import schedule
from tapvits_cli.pipeline.steps import Input, Output, Step


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
    the first time (``marker`` records that it did), as a lost node would.
    """
    if step.stage == "boom":
        raise UsageError(f"{step.id}: refused")
    if step.stage == "crash-once" and not Path(marker).exists():
        Path(marker).write_text("crashed")
        os._exit(1)
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
    given_up = _schedule(tmp_path / "g", fake_fleet(stage="crash-once"),
                         lambda work: schedule.LocalExecutor(work, jobs=2), retries=0)
    failure = given_up.failures["devices/b/select"]
    assert failure.retryable and failure.exit_code == ExitCode.INTERNAL and "worker failed after 1 attempt" in failure.message
    # A dying worker breaks the pool, so a step running beside it may fail with it; the shared steps stand.
    assert {"base", "public/features"} <= {o.step.id for o in given_up.outcomes}


def test_a_failed_shared_step_starts_no_device(tmp_path):
    steps = fake_fleet()
    steps[0] = _step("base", "boom", "base.txt")
    result = _schedule(tmp_path, steps, schedule.SerialExecutor)
    assert list(result.failures) == ["base"] and len(result.not_started) == 7 and not result.outcomes
    assert str(schedule.StepsFailedError(steps, result.failures)).startswith("shared step base failed")


def test_ray_tasks_give_the_serial_artifacts(tmp_path):
    ray = pytest.importorskip("ray")
    serial = _schedule(tmp_path / "s", fake_fleet(), schedule.SerialExecutor)
    # Ray's workers import the stand-in stage from this file, so they need its folder on their path.
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                      os.environ.get("PYTHONPATH", "")])}})
    try:
        on_ray = _schedule(tmp_path / "r", fake_fleet(), lambda work: schedule.RayExecutor(work))
    finally:
        ray.shutdown()
    assert not serial.failures and not on_ray.failures
    assert _artifacts(tmp_path / "s" / "run") == _artifacts(tmp_path / "r" / "run")


def test_submitit_local_jobs_stand_in_for_slurm(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    failed = _schedule(tmp_path, fake_fleet(stage="boom"),
                       lambda work: schedule.SlurmExecutor(work, str(tmp_path / "slurm"), {"timeout_min": 5},
                                                           cluster="local"))
    assert list(failed.failures) == ["devices/b/select"] and len(failed.outcomes) == 6
    serial = _schedule(tmp_path / "s", fake_fleet(stage="boom"), schedule.SerialExecutor)
    assert _artifacts(tmp_path / "run") == _artifacts(tmp_path / "s" / "run")
