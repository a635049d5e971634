"""What ``tapvits run`` shows while it works: the whole run's progress, each running step's, an ETA.

On a terminal (or with ``--progress``) one rich display on stderr: a bar for the run
(steps done of total, elapsed, the estimated time left) and one per running step, which
the stage itself advances in a serial run (its batches or epochs, with its loss or rate).
Anywhere else (a pipe, a CI log) a plain line every ``PLAIN_PROGRESS_SECONDS``, such as
``[7/23] devices/d0/finetune 0:42 (finetune 120/400 (30%), epoch 2/5 loss 0.4120); 6 of 23
steps done, 2:10 elapsed, ETA 4:31``, and a closing line when one was printed. ``-q`` and
``--no-progress`` show neither. The numbers are ``pipeline.progress.RunProgress``'s;
this module draws them. Longer than most cli modules because it holds both renderings
and the thread that refreshes them while a stage holds the main thread.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from tapvits_cli.cli import output
from tapvits_cli.cli.options import CURRENT
from tapvits_cli.pipeline.progress import RunProgress
from tapvits_cli.stages import feedback

BAR_REFRESH_SECONDS = 0.5   # how often the bars' ETA fields are recomputed


def display_mode() -> str:
    """``bars`` (a terminal, or ``--progress``), ``lines`` (elsewhere) or ``off`` (``-q``, ``--no-progress``)."""
    if CURRENT.verbosity < 0 or CURRENT.progress is False:
        return "off"
    return "bars" if output.show_progress() else "lines"


class RunDisplay:
    """The run's progress on stderr while a ``with`` block carries the steps out.

    Feed it the scheduler's events (:meth:`on_event`); give a step run in this process
    :meth:`step_progress` as its stage's progress.
    """

    def __init__(self, steps: Sequence[Any], parallel: int = 1, mode: str | None = None) -> None:
        self.mode = display_mode() if mode is None else mode
        self.tracker = RunProgress(steps, time.monotonic(), parallel)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars: Any = None
        self._overall: Any = None
        self._tasks: dict[str, Any] = {}   # step id -> its rich task
        self._printed = False

    def __enter__(self) -> "RunDisplay":
        if self.mode == "bars":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                                  TextColumn("{task.fields[status]}"), console=output.stderr_console(),
                                  transient=sys.stderr.isatty())   # forced bars on a pipe leave their last state
            self._bars.start()
            self._overall = self._bars.add_task("steps", total=self.tracker.total, eta="", status="")
        if self.mode != "off":
            self._thread = threading.Thread(target=self._refresh_until_stopped, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bars is not None:
            self._bars.stop()
        if self._printed:
            now = time.monotonic()
            self._write(f"{self.tracker.done} of {self.tracker.total} steps done in "
                        f"{output.format_duration(now - self.tracker.started)}")

    def on_event(self, event: str, step: Any, detail: Any) -> None:
        """A scheduler event (``schedule.execute``'s ``on_event``)."""
        with self._lock:
            self.tracker.on_event(event, step, detail, time.monotonic())
            if self._bars is None:
                return
            if event in ("start", "retry") and step.id not in self._tasks:
                self._tasks[step.id] = self._bars.add_task(self._name(step.id), total=None, eta="", status="")
            elif event in ("done", "failed") and step.id in self._tasks:
                self._bars.remove_task(self._tasks.pop(step.id))
            self._bars.update(self._overall, completed=self.tracker.done, eta=self._run_eta(time.monotonic()))

    def step_progress(self, step: Any) -> Callable[[str, int | None], Any]:
        """A stage's progress (see ``stages.feedback``) that advances ``step``'s own bar or line."""
        if self.mode == "off":
            return feedback.no_progress

        @contextlib.contextmanager
        def progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
            with self._lock:
                self.tracker.begin_work(step.id, description, total, time.monotonic())
                if step.id in self._tasks:
                    self._bars.update(self._tasks[step.id], description=f"{self._name(step.id)}: {description}",
                                      total=total, completed=0, status="")

            def advance(n: int = 1, status: str | None = None) -> None:
                with self._lock:
                    self.tracker.advance(step.id, n, status)
                    if step.id in self._tasks:
                        self._bars.update(self._tasks[step.id], advance=n,
                                          **({} if status is None else {"status": status}))

            yield advance

        return progress

    def line(self, now: float) -> str:
        """The plain progress line: each running step, then the whole run."""
        tracker, parts = self.tracker, []
        for step_id, running in sorted(tracker.running.items(), key=lambda item: item[1].position):
            text = f"{self._name(step_id)} {output.format_duration(now - running.started)}"
            details = []
            if running.total is not None:
                share = f" ({running.done / running.total:.0%})" if running.total else ""
                details.append(f"{running.description} {running.done}/{running.total}{share}")
            if running.status:
                details.append(running.status)
            parts.append(text + (f" ({', '.join(details)})" if details else ""))
        left = tracker.time_left(now)
        parts.append(f"{tracker.done} of {tracker.total} steps done, {output.format_duration(now - tracker.started)} "
                     f"elapsed" + ("" if left is None else f", ETA {output.format_duration(left)}"))
        return "; ".join(parts)

    def _run_eta(self, now: float) -> str:
        left = self.tracker.time_left(now)
        return "" if left is None or self.tracker.done == self.tracker.total else f"ETA {output.format_duration(left)}"

    def _name(self, step_id: str) -> str:
        return f"[{self.tracker.position(step_id)}/{self.tracker.total}] {step_id}"

    def _refresh_until_stopped(self) -> None:
        period = BAR_REFRESH_SECONDS if self._bars is not None else output.PLAIN_PROGRESS_SECONDS
        while not self._stop.wait(period):
            with self._lock:
                now = time.monotonic()
                if self._bars is None:
                    self._write(self.line(now))
                    self._printed = True
                    continue
                self._bars.update(self._overall, eta=self._run_eta(now))
                for step_id, task in self._tasks.items():
                    running = self.tracker.running.get(step_id)
                    own = running.time_left(now) if running is not None else None
                    self._bars.update(task, eta="" if own is None else f"ETA {output.format_duration(own)}")

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
