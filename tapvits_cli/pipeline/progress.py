"""How far a run is: steps done of total, what runs now, and about how long the rest takes.

Bookkeeping only, in numbers: the scheduler's events (``schedule.execute``'s
``on_event``) and, in a serial run, the running stage's own progress feed a
:class:`RunProgress`; ``cli/run_progress.py`` draws it (a rich display on a terminal,
plain lines elsewhere). Times come from the ``now`` the caller passes, so the estimate
is testable without waiting.

The time left is estimated per step: a step is expected to take as long as the steps of
its stage that finished before (devices run the same chain, so the second device's
``finetune`` takes about what the first one's took), else the mean of every finished
step; a running step whose stage reports progress is expected to go on at its rate so
far. Steps a failure keeps from starting count as resolved. Steps that ran side by side
(``--jobs``, Ray, Slurm) divide the total by how many run at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tapvits_cli.pipeline.schedule import dependencies
from tapvits_cli.pipeline.steps import Step


@dataclass
class RunningStep:
    """A step that has started: when, and what its stage last reported."""

    position: int                 # 1-based, in the run's step order
    started: float
    description: str = ""         # the stage's current piece of work ("train", "scoring pool")
    done: int = 0
    total: int | None = None
    status: str | None = None     # e.g. "epoch 2/5 loss 0.4120"
    work_started: float = 0.0     # when that piece of work began

    def time_left(self, now: float) -> float | None:
        """What the current piece of work still needs at its rate so far (None: no rate yet)."""
        if not self.total or self.done <= 0 or now <= self.work_started:
            return None
        return max(0.0, self.total - self.done) * (now - self.work_started) / self.done


class RunProgress:
    """The state of a run's steps, updated by :meth:`on_event` and the running stages' progress."""

    def __init__(self, steps: Sequence[Step], started: float, parallel: int = 1) -> None:
        self.total = len(steps)
        self.started = started
        self.parallel = max(1, parallel)
        self._stage = {step.id: step.stage for step in steps}
        self._position = {step.id: index for index, step in enumerate(steps, start=1)}
        self._dependents: dict[str, list[str]] = {step.id: [] for step in steps}
        for step_id, needs in dependencies(steps).items():
            for need in needs:
                self._dependents[need].append(step_id)
        self._resolved: set[str] = set()            # finished, failed, or never to start
        self._seconds: dict[str, list[float]] = {}  # stage -> how long its finished steps took
        self.running: dict[str, RunningStep] = {}

    @property
    def done(self) -> int:
        return len(self._resolved)

    def position(self, step_id: str) -> int:
        return self._position[step_id]

    def on_event(self, event: str, step: Step, detail: Any, now: float) -> None:
        """A scheduler event: "start" and "retry" (the step runs now), "done" (an outcome), "failed"."""
        if event in ("start", "retry"):
            self.running[step.id] = RunningStep(self._position[step.id], now, work_started=now)
        elif event == "done":
            self.running.pop(step.id, None)
            self._resolved.add(step.id)
            if detail.seconds > 0:   # a skipped or cached step tells how long it took when it ran
                self._seconds.setdefault(step.stage, []).append(detail.seconds)
        elif event == "failed":
            self.running.pop(step.id, None)
            blocked = [step.id]
            while blocked:
                current = blocked.pop()
                if current not in self._resolved:
                    self._resolved.add(current)
                    blocked += self._dependents.get(current, [])

    def begin_work(self, step_id: str, description: str, total: int | None, now: float) -> None:
        """The running stage starts a piece of work of ``total`` units (None: unknown)."""
        running = self.running.get(step_id)
        if running is not None:
            running.description, running.total, running.done, running.status = description, total, 0, None
            running.work_started = now

    def advance(self, step_id: str, units: int, status: str | None) -> None:
        running = self.running.get(step_id)
        if running is not None:
            running.done += units
            if status is not None:
                running.status = status

    def time_left(self, now: float) -> float | None:
        """Estimated seconds until every step is resolved; None until there is anything to go by."""
        finished = [seconds for stage in self._seconds.values() for seconds in stage]
        mean = sum(finished) / len(finished) if finished else None
        left = 0.0
        for step_id, stage in self._stage.items():
            if step_id in self._resolved:
                continue
            same = self._seconds.get(stage)
            expected = sum(same) / len(same) if same else mean
            running = self.running.get(step_id)
            own = running.time_left(now) if running is not None else None
            if own is not None:
                left += own
            elif expected is None:
                return None
            else:
                left += max(0.0, expected - (now - running.started)) if running is not None else expected
        return left / self.parallel
