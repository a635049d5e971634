"""Carry out a run's step graph on an executor: in this process, in local processes, on Ray or on Slurm.

Steps name their inputs, so a run is a graph: the shared steps (base model, pool
features) come first, then each device's chain, which depends on no other device's. The
scheduler starts every step whose inputs are finished, as many at a time as the executor
takes. Whether a step is unchanged (skipped), in the stage cache (copied) or must run is
decided here, in the process that holds the run directory, exactly as a serial run
decides it; only running a step goes to a worker, and only this process writes
``run.json`` and the cache. So step keys, skipping, the cache and resuming are the same
whatever the executor, and so are the artifacts (each stage seeds itself from ``--seed``).

Ray and Slurm workers read and write the run directory, the datasets, the cache and the
recipe's files at the paths this process uses, from the directory it was started in:
they need a file system shared with this machine.

A step whose worker fails without a :class:`TapvitsError` (a crash, a killed process, a
lost node) is retried up to ``retries`` times; a ``TapvitsError`` is a verdict on the
step's inputs that a second attempt would repeat, so it is not. A local worker that dies
takes the whole process pool with it, and the pool cannot say whose worker it was: the
steps that were in it are charged nothing and run again one at a time, alone, so a crash
is charged only to the step that crashed and a step beside it does not fail with it.
Steps that need a failed step's output are not started; every other device goes on, and
the run's result names the failed steps so the caller can exit non-zero. A rerun skips
what finished.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from tapvits_cli.errors import DataUnavailableError, ExitCode, TapvitsError, UsageError, environment_failure
from tapvits_cli.pipeline.runner import StepOutcome, code_fingerprint, step_key
from tapvits_cli.pipeline.steps import Input, Step

EXTRAS = {"ray": ("ray", "ray"), "slurm": ("submitit", "slurm")}   # executor: (module, pip extra)

# Imported once by the local executor's fork server; tapvits_cli first: it sets OpenMP's wait policy before torch loads.
WORKER_PRELOAD = ("tapvits_cli", "torch", "timm", "tapvits_cli.cli.main")

Work = Callable[[Step], None]   # runs one step in the worker's process; must pickle for all but serial


@dataclass(frozen=True)
class StepFailure:
    """Why a step did not finish, as data: executors differ in how (and whether) they carry exceptions back."""

    message: str
    exit_code: int
    retryable: bool = False   # a crash or a lost worker, not a verdict on the step's inputs


@dataclass
class Schedule:
    """What became of every step: outcomes of the finished ones, failures, and those never started."""

    outcomes: list[StepOutcome]
    failures: dict[str, StepFailure] = field(default_factory=dict)
    not_started: list[str] = field(default_factory=list)


class StepsFailedError(TapvitsError):
    """Some steps failed; the others finished and are recorded, so a rerun does only what is left.

    The exit code is that of the first failure in step order, so a fleet whose only
    failure is an invalid artifact still exits 3.
    """

    def __init__(self, steps: Sequence[Step], failures: Mapping[str, StepFailure]):
        order = [step.id for step in steps if step.id in failures]
        devices = sorted({step.device for step in steps if step.id in failures and step.device})
        shared = [step.id for step in steps if step.id in failures and not step.device]
        who = (f"shared step {', '.join(shared)} failed, so no device finished" if shared else
               f"device{'s' if len(devices) > 1 else ''} {', '.join(devices)} failed")
        first = failures[order[0]]
        more = f" (and {len(order) - 1} more, above)" if len(order) > 1 else ""
        super().__init__(f"{who}: {first.message}{more}; finished steps are kept, run again to resume")
        self.exit_code = first.exit_code
        self.failed_devices = devices


def dependencies(steps: Sequence[Step]) -> dict[str, tuple[str, ...]]:
    """For each step, the steps whose outputs it reads (external inputs depend on no step)."""
    producer = {step.output: step.id for step in steps}
    return {step.id: tuple(dict.fromkeys(producer[token.path] for token in step.inputs
                                         if not token.external and token.path in producer))
            for step in steps}


def share_threads(threads: int | None) -> None:
    """Give this worker process ``threads`` intra-op threads, so N jobs do not oversubscribe the cores.

    The variables take effect when torch is first imported; a torch already imported is
    told directly (importing it here would cost every worker a second, needed or not).
    """
    if not threads:
        return
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _preload() -> None:
    import importlib

    for module in WORKER_PRELOAD:
        importlib.import_module(module)


def perform(work: Work, step: Step, threads: int | None = None, directory: str | None = None,
            code: str | None = None) -> float | StepFailure:
    """Run one step in a worker: its seconds, or a :class:`StepFailure` for a ``TapvitsError``.

    Module-level and fed only picklable arguments, so any executor can ship it.
    ``directory`` is where the run was started: relative paths of the recipe resolve
    from there on every machine of a shared file system. ``code`` is the driver's code
    fingerprint, which the step's key holds: a worker whose installation differs (a node
    with another tapvits or torch, sources edited during the run) refuses the step rather
    than record its result under a key that claims other code.
    """
    if code is not None and (own := code_fingerprint()) != code:
        return StepFailure(f"{step.id}: this worker's tapvits code or libraries differ from the driver's (code "
                           f"fingerprint {own[:12]}, driver {code[:12]}): install the same tapvits "
                           f"and dependencies on every node", ExitCode.INCOMPATIBLE)
    if directory is not None:
        os.chdir(directory)
    share_threads(threads)
    started = time.perf_counter()
    try:
        work(step)
    except TapvitsError as exc:
        return StepFailure(str(exc), exc.exit_code)
    except OSError as exc:   # a full disk or a read-only path: exit 9, as in a serial run; anything else is a crash
        refused = environment_failure(exc, exc.filename or "writing")
        if refused is None:
            raise
        return StepFailure(f"{step.id}: {refused}", refused.exit_code)
    return time.perf_counter() - started


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def require_extra(executor: str):
    """The engine's package, or exit 8 naming the install that provides it."""
    import importlib

    module, extra = EXTRAS[executor]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataUnavailableError(f'--executor {executor} needs {module}, which is not installed: '
                                   f'pip install "tapvits[{extra}]"') from None


# -- executors -----------------------------------------------------------------------------------

class SerialExecutor:
    """One step at a time in this process: the run as it always was.

    Only a ``TapvitsError`` comes back as a failure; anything else (a bug, Ctrl-C) stops
    the run at once with its traceback under ``--debug``: retrying is for workers that
    died, and in-process there is none.
    """

    slots = 1
    ahead = 0

    def __init__(self, work: Work):
        self.work = work

    def submit(self, step: Step) -> Future:
        future: Future = Future()
        future.set_result(perform(self.work, step))
        return future

    def close(self, cancel: bool = False) -> None:
        pass


class LocalExecutor:
    """``jobs`` worker processes on this machine, each with ``threads`` torch threads.

    Workers are not forked from this process (a fork of a process that already runs
    torch's thread pools can deadlock) but from a fork server that imported
    :data:`WORKER_PRELOAD` and ran nothing: torch and timm take seconds of CPU to import,
    paid once instead of once per worker. The pool starts with the first step submitted,
    not before: a rerun that finds every step finished would otherwise wait for those
    imports (7 s of a 24-device fleet's no-op rerun) for nothing. Where there is no fork
    server, workers are spawned.
    A worker that dies breaks the pool; the next submission starts a new one (the steps
    that were in it come back as :class:`~concurrent.futures.process.BrokenProcessPool`,
    which :func:`execute` does not charge to any of them).

    One step more than there are workers is submitted (``ahead``): it waits in the pool's
    queue, so a worker that finishes starts it at once instead of idling while this
    process records the finished step (hashing, ``run.json``, the cache) and works out the
    next key. It is reported as started when it is submitted.
    """

    ahead = 1

    def __init__(self, work: Work, jobs: int, threads: int | None = None):
        self.work, self.slots = work, jobs
        self.threads = threads or max(1, available_cpus() // jobs)
        self._pool = None   # started by the first submit

    def _start(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(list(WORKER_PRELOAD))
        else:
            context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=self.slots, mp_context=context,
                                   initializer=share_threads, initargs=(self.threads,))
        # Start every worker now, from another thread: starting blocks until the fork server has imported
        # its modules, and this process has the next steps' keys to work out meanwhile.
        threading.Thread(target=start_workers, args=(pool, self.slots), daemon=True).start()
        return pool

    def submit(self, step: Step) -> Future:
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            self._pool = self._start()
        try:
            return self._pool.submit(perform, self.work, step, None, os.getcwd(), code_fingerprint())
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start()
            return self._pool.submit(perform, self.work, step, None, os.getcwd(), code_fingerprint())

    def close(self, cancel: bool = False) -> None:
        """Stop the pool; ``cancel`` (an interrupt) stops running steps too.

        A shut-down pool lets its running steps finish, and the interpreter waits for them
        at exit: an interrupted run would then release the run directory's lock while its
        workers still write there. Their outputs are written atomically, so stopping them
        leaves no half-written file, only steps to run again.
        """
        if self._pool is None:
            return
        if cancel:
            for worker in list((getattr(self._pool, "_processes", None) or {}).values()):
                worker.terminate()
        self._pool.shutdown(wait=not cancel, cancel_futures=True)


def start_workers(pool, count: int) -> None:
    """Have ``pool`` start ``count`` workers (each runs a trivial task), stopping quietly once the pool is
    shut down or broken: an interrupt can shut it down while this thread still waits on the fork server,
    and the next submit's RuntimeError would otherwise print a traceback after "tapvits: interrupted"."""
    for _ in range(count):
        try:
            pool.submit(os.getpid)
        except RuntimeError:   # shut down meanwhile, or broken (BrokenProcessPool is a RuntimeError)
            return


class RayExecutor:
    """Each step a Ray task declaring ``cpus`` CPUs, and one GPU for ``finetune`` where the cluster has GPUs.

    Connects to ``address`` (``auto``, ``ray://HOST:PORT``, …) or, without one, to the
    Ray instance this process already started, else starts a local one. Ray's own task
    retries are off: the scheduler retries, the same way for every executor. As with local
    workers, one step more than the slots is submitted, so Ray has the next task at hand.
    """

    ahead = 1

    def __init__(self, work: Work, address: str | None = None, cpus: int = 1, jobs: int | None = None,
                 use_gpus: bool = True):
        ray = require_extra("ray")
        self._ray, self.work, self.cpus = ray, work, cpus
        self._owns = not ray.is_initialized()
        if self._owns:
            import logging

            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        self.gpus = use_gpus and ray.cluster_resources().get("GPU", 0) >= 1
        self.slots = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
        self._task = ray.remote(perform)
        self._tasks: list = []
        preload = ray.remote(_preload).options(num_cpus=cpus, max_retries=0)
        for _ in range(self.slots):   # workers import torch and timm now, while this process works out step keys
            preload.remote()

    def submit(self, step: Step) -> Future:
        options: dict[str, Any] = {"num_cpus": self.cpus, "max_retries": 0}
        if self.gpus and step.stage == "finetune":
            options["num_gpus"] = 1
        task = self._task.options(**options).remote(self.work, step, self.cpus, os.getcwd(), code_fingerprint())
        self._tasks.append(task)
        return task.future()

    def close(self, cancel: bool = False) -> None:
        """``cancel`` (an interrupt) stops the tasks still running: on a cluster (``--address``) they
        would outlive this process and go on writing into the run directory."""
        if cancel:
            for task in self._tasks:
                with contextlib.suppress(Exception):   # finished already, or its worker is gone
                    self._ray.cancel(task, force=True)
        if self._owns:
            self._ray.shutdown()


class SlurmExecutor:
    """Each step a Slurm job submitted through submitit, its logs under ``folder``.

    ``parameters`` are submitit's (``slurm_partition``, ``timeout_min``, ``mem_gb``, …);
    every job asks for ``cpus`` CPUs, and ``finetune`` for one GPU when ``gpus`` is set.
    ``cluster="local"`` runs the jobs as local processes through submitit (for tests
    and machines without Slurm).
    """

    ahead = 0   # Slurm queues jobs itself

    def __init__(self, work: Work, folder: str, parameters: Mapping[str, Any], cpus: int = 1,
                 jobs: int | None = None, gpus: bool = False, cluster: str = "slurm"):
        import shutil

        submitit = require_extra("slurm")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise DataUnavailableError("--executor slurm: no Slurm on this machine (sbatch not found); "
                                       "run from a Slurm login node")
        # submitit's folder holds the pickled steps and results that the jobs and this process
        # unpickle: whoever can write there runs code as this user, so it is this user's alone.
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        self.work, self.cpus = work, cpus
        self.slots = jobs or 1_000_000   # Slurm queues what it cannot start yet
        # One submitter per kind of job: parameters stick to a submitter, and a CPU job must
        # not carry a GPU request (not even --gpus-per-node=0, which some clusters refuse).
        self._submitters = {False: submitit.AutoExecutor(folder=folder, cluster=cluster)}
        if gpus:
            self._submitters[True] = submitit.AutoExecutor(folder=folder, cluster=cluster)
        try:
            for wants_gpu, submitter in self._submitters.items():
                gpu = {"gpus_per_node": 1} if wants_gpu else {}
                submitter.update_parameters(cpus_per_task=cpus, **parameters, **gpu)
        except (ValueError, TypeError, NameError) as exc:   # submitit's words for a key or value it does not take
            raise UsageError(f"--slurm: {str(exc).splitlines()[0]}") from None
        self._jobs: list = []

    def submit(self, step: Step) -> Future:
        submitter = self._submitters[step.stage == "finetune" and True in self._submitters]
        submitter.update_parameters(name=f"tapvits-{step.id.replace('/', '-')}")
        job = submitter.submit(perform, self.work, step, self.cpus, os.getcwd(), code_fingerprint())
        future: Future = Future()

        def follow() -> None:
            try:
                future.set_result(job.result())
            except Exception as exc:   # the job failed or was killed: submitit's own error
                future.set_exception(exc)

        threading.Thread(target=follow, daemon=True).start()
        self._jobs.append(job)
        return future

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for job in self._jobs:
                if not job.done():
                    job.cancel(check=False)


def slurm_parameters(settings: Sequence[str]) -> tuple[dict[str, Any], str]:
    """``--slurm KEY=VALUE`` settings as submitit parameters, and the cluster (``slurm`` or ``local``).

    ``partition`` and ``time`` (minutes per step) are the usual two and get their Slurm
    names; any other key is passed to submitit as given (``mem_gb=16``,
    ``slurm_account=NAME``); ``cluster=local`` runs the jobs on this machine through
    submitit, as a rehearsal without a cluster.
    """
    names = {"partition": "slurm_partition", "time": "timeout_min"}
    parameters: dict[str, Any] = {}
    cluster = "slurm"
    for setting in settings:
        key, sep, value = setting.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise UsageError(f"--slurm '{setting}': expected KEY=VALUE, e.g. partition=gpu or time=60")
        if key == "cluster":
            if value not in ("slurm", "local"):
                raise UsageError(f"--slurm cluster must be slurm or local, not {value!r}")
            cluster = value
            continue
        parameters[names.get(key, key)] = int(value) if value.strip().isascii() and value.strip().isdigit() else value.strip()
    return parameters, cluster


def check_executor_options(name: str, jobs: int | None, address: str | None, slurm: Sequence[str]) -> None:
    """Refuse options that do not go together, and a missing engine, before the run touches any file."""
    if address is not None and name != "ray":
        raise UsageError("--address names a Ray cluster: use it with --executor ray")
    if slurm and name != "slurm":
        raise UsageError("--slurm sets Slurm jobs: use it with --executor slurm")
    if name == "serial" and jobs not in (None, 1):
        raise UsageError(f"--jobs {jobs} runs steps side by side: use --executor local (the default with --jobs)")
    slurm_parameters(slurm)
    if name in EXTRAS:
        require_extra(name)


def make_executor(name: str, work: Work, serial_work: Work, jobs: int | None, cpus_per_step: int | None,
                  address: str | None, slurm: Sequence[str], log_folder: str, gpus: bool):
    """The executor the run's options ask for; ``serial_work`` runs in this process, ``work`` in workers."""
    check_executor_options(name, jobs, address, slurm)
    if name == "serial":
        return SerialExecutor(serial_work)
    if name == "local":
        return LocalExecutor(work, jobs or available_cpus(), cpus_per_step)
    if name == "ray":
        return RayExecutor(work, address, cpus_per_step or 1, jobs, gpus)
    parameters, cluster = slurm_parameters(slurm)
    return SlurmExecutor(work, log_folder, parameters, cpus_per_step or 1, jobs, gpus, cluster)


# -- the scheduler -------------------------------------------------------------------------------

def _crash(step: Step, exc: BaseException, attempts: int) -> StepFailure:
    text = str(exc).strip().splitlines()
    return StepFailure(f"{step.id}: worker failed after {attempts} attempt{'s' if attempts > 1 else ''}: "
                       f"{type(exc).__name__}{': ' + text[0] if text else ''}", ExitCode.INTERNAL, retryable=True)


def _pool_broke(exc: BaseException) -> bool:
    """Whether a worker died in a pool that failed every step it held (the local executor's)."""
    from concurrent.futures.process import BrokenProcessPool

    return isinstance(exc, BrokenProcessPool)


def execute(steps: Sequence[Step], run_directory, executor, dataset_fingerprint: Callable[[str], str],
            force: bool = False, retries: int = 1,
            on_event: Callable[[str, Step, Any], None] = lambda event, step, detail: None) -> Schedule:
    """Carry out ``steps`` on ``executor``; ``on_event`` hears "start", "done" (an outcome),
    "retry" and "failed" (a :class:`StepFailure`) for each step."""

    def input_sha256(token: Input) -> str:
        return run_directory.sha256(token.path if token.external else run_directory.path(token.path))

    needs = dependencies(steps)
    order = {step.id: index for index, step in enumerate(steps)}
    finished: dict[str, StepOutcome] = {}
    failures: dict[str, StepFailure] = {}
    not_started: list[str] = []
    waiting = list(steps)
    running: dict[Future, tuple[Step, str]] = {}
    attempts: dict[str, int] = {}
    suspects: list[tuple[Step, str]] = []   # in a pool that broke: each runs again alone, nothing beside it
    isolated: set[str] = set()               # the suspect running now; nothing starts beside it
    alone: set[str] = set()                  # the steps that ran with nothing beside them

    def finish(step: Step, outcome: StepOutcome) -> None:
        finished[step.id] = outcome
        on_event("done", step, outcome)

    def fail(step: Step, failure: StepFailure) -> None:
        failures[step.id] = failure
        on_event("failed", step, failure)

    def launch(step: Step, key: str) -> None:
        attempts[step.id] = attempts.get(step.id, 0) + 1
        if running:
            alone.difference_update(other.id for other, _ in running.values())
        else:
            alone.add(step.id)
        running[executor.submit(step)] = (step, key)

    try:
        while waiting or running or suspects:
            if suspects and not running:   # nothing else starts until every suspect has run alone
                step, key = suspects.pop(0)
                isolated.add(step.id)
                launch(step, key)
            for step in list(waiting) if not (suspects or isolated) else ():
                if any(need in failures or need in not_started for need in needs[step.id]):
                    waiting.remove(step)
                    not_started.append(step.id)
                    continue
                if not all(need in finished for need in needs[step.id]):
                    continue
                if len(running) >= executor.slots + executor.ahead:
                    break
                waiting.remove(step)
                try:   # a dataset reference that does not resolve fails its device, not the run
                    key = step_key(step, input_sha256, dataset_fingerprint)
                except TapvitsError as exc:
                    fail(step, StepFailure(f"{step.id}: {exc}", exc.exit_code))
                    continue
                if not force and run_directory.finished(step.id, step.output, key):
                    finish(step, StepOutcome(step, "skipped", run_directory.seconds(step.id) or 0.0))
                elif not force and (cached := run_directory.restore_from_cache(key, step.output)) is not None:
                    run_directory.record(step.id, step.output, key, cached, "cache")
                    finish(step, StepOutcome(step, "cache", cached))
                else:
                    run_directory.forget(step.id)
                    on_event("start", step, None)
                    launch(step, key)
            if not running:
                continue   # every step just looked at was skipped, cached or cannot start: look again
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: order[running[f][0].id]):
                step, key = running.pop(future)
                ran_alone, broke = step.id in alone, False
                alone.discard(step.id)
                isolated.discard(step.id)
                try:
                    result = future.result()
                except Exception as exc:   # the worker, not the step, failed
                    broke = _pool_broke(exc)
                    if broke and not ran_alone:   # perhaps another step's worker: charge nobody yet
                        attempts[step.id] -= 1
                        suspects.append((step, key))
                        on_event("retry", step, StepFailure(f"{step.id}: a worker of the pool it ran in died "
                                                            "(perhaps another step's); it runs again alone",
                                                            ExitCode.INTERNAL, retryable=True))
                        continue
                    result = _crash(step, exc, attempts[step.id])
                if isinstance(result, StepFailure):
                    if result.retryable and attempts[step.id] <= retries:
                        on_event("retry", step, result)
                        if broke:   # its own worker died: the next attempt runs alone as well
                            suspects.append((step, key))
                        else:
                            launch(step, key)
                    else:
                        fail(step, result)
                    continue
                if not run_directory.path(step.output).is_file():   # Ray or Slurm workers on another file system
                    fail(step, StepFailure(f"{step.id}: its worker finished, but {step.output} is not in the run "
                                           "directory; the workers need a file system shared with this machine",
                                           ExitCode.ENVIRONMENT))
                    continue
                run_directory.record(step.id, step.output, key, result, "ran")
                run_directory.store_in_cache(key, step.output, result)
                finish(step, StepOutcome(step, "ran", result))
    except BaseException:
        executor.close(cancel=True)
        raise
    executor.close()
    return Schedule([finished[step.id] for step in steps if step.id in finished], failures, not_started)
