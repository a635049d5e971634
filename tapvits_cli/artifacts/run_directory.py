"""The files of a ``tapvits run``: the run directory and the stage cache.

Layout and ``run.json`` are specified in protocol/run.md. The run directory is the
only record of what finished: a step counts as done when ``run.json`` holds its key and
the file it wrote still has the recorded SHA-256, so a file edited or truncated by hand
is made again rather than trusted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from tapvits_cli.artifacts.files import atomic_write, sha256_file
from tapvits_cli.artifacts.header import finite_number, parse_json
from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError, UsageError
from tapvits_cli.vocabulary import NAME_PATTERN

STATE_FILE = "run.json"
LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.yaml"
COMMANDS_FILE = "commands.sh"
SUMMARY_FILE = "summary.json"
STATE_VERSION = 1


CACHE_RECORD_SUFFIX = ".record.json"


def read_run_state(path: Path, advice: str = "") -> dict:
    """``run.json`` (protocol/run.md), checked: a run directory may have been edited by anyone.

    Every step record is an object whose ``output`` is a relative path inside the run
    directory (no ``..``, not absolute: ``report`` and ``inspect`` open it), with a finite
    ``seconds`` ≥ 0 and a text ``sha256`` and ``key`` where present. ``advice`` ends the
    messages (what the caller's user can do).
    """
    try:
        state = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArtifactError(f"{path}: unreadable run state ({exc}){advice}") from None
    steps = state.get("steps") if isinstance(state, dict) else None
    version = state.get("version", 0) if isinstance(state, dict) else None
    if not isinstance(steps, dict) or not isinstance(version, int) or isinstance(version, bool):
        raise InvalidArtifactError(f"{path}: not a tapvits run state (an object of a version number and steps){advice}")
    if version > STATE_VERSION:
        raise IncompatibleArtifactError(f"{path}: run state v{version} is newer than this tapvits reads "
                                        f"(v{STATE_VERSION}); upgrade tapvits")
    for step_id, record in steps.items():
        if not _valid_step_record(record):
            raise InvalidArtifactError(f"{path}: step {str(step_id)[:60]!r} is not a step record (an output path "
                                       f"inside the run directory, finite seconds, text hashes){advice}")
    return state


def read_run_summary(path: Path) -> dict:
    """``summary.json`` (protocol/run.md), checked as :func:`read_run_state` checks ``run.json``:
    device names are names (``report`` builds paths from them), ``mean`` an object, ``failures`` a list."""
    try:
        summary = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArtifactError(f"{path}: unreadable run summary ({exc})") from None
    devices = summary.get("devices", []) if isinstance(summary, dict) else None
    failures = summary.get("failures") if isinstance(summary, dict) else None
    steps = summary.get("steps") if isinstance(summary, dict) else None
    if not (isinstance(devices, list) and all(isinstance(d, dict) and isinstance(d.get("device"), str)
                                               and NAME_PATTERN.match(d["device"]) for d in devices)
            and isinstance(summary.get("mean") or {}, dict)
            and (failures is None or isinstance(failures, list) and all(isinstance(f, str) for f in failures))
            and (steps is None or isinstance(steps, dict) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in steps.values()))
            and all(_fractions_or_null(entry) for entry in [*devices, summary.get("mean") or {}])):
        raise InvalidArtifactError(f"{path}: not what tapvits run writes ('devices' a list of objects whose "
                                   "'device' is a device name, 'mean' an object, 'failures' a list of messages, "
                                   "'steps' counts, top1, top5 and params_kept fractions from 0 to 1)")
    return summary


def _fractions_or_null(entry: dict) -> bool:
    """A device's or the mean's top-1, top-5 and share of parameters kept: null, or a number from 0 to 1
    (``report`` plots them: a top-1 of 1e17 left its chart axis without a scale, exit 1)."""
    return all(entry.get(key) is None or finite_number(entry[key]) and 0 <= entry[key] <= 1
               for key in ("top1", "top5", "params_kept"))


def _valid_step_record(record: Any) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("output"), str):
        return False
    output = PurePosixPath(record["output"])
    seconds = record.get("seconds", 0)
    return (not output.is_absolute() and ".." not in output.parts and "\\" not in record["output"]
            and bool(record["output"].strip())
            and finite_number(seconds) and seconds >= 0
            and all(isinstance(record.get(key, ""), str) for key in ("sha256", "key", "source")))


class RunDirectory:
    """One run's directory: its state (``run.json``), recorded recipe and commands, and the stage cache."""

    def __init__(self, root: str | os.PathLike, cache: str | os.PathLike | None = None):
        self.root = Path(root)
        self.cache = Path(cache) if cache is not None else None
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = self._acquire_lock()
        self.state = self._read_state()

    def _acquire_lock(self):
        """Hold an exclusive lock for this process's lifetime: two runs in one directory would clobber its state."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / LOCK_FILE
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):   # a link would create its target elsewhere
            raise InvalidArtifactError(f"{lock}: the run directory's lock is not a plain file; remove it")
        handle = open(lock, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UsageError(f"{self.root}: another tapvits run is using this run directory") from None
        return handle

    def close(self) -> None:
        self._lock.close()

    # -- state ---------------------------------------------------------------------------------

    def _read_state(self) -> dict:
        path = self.root / STATE_FILE
        if not path.exists():
            return {"version": STATE_VERSION, "steps": {}}
        return read_run_state(path, "; remove it to start the run afresh")

    def _write_state(self) -> None:
        """One step record per line: readable, and encoded by json's C encoder.

        The state is rewritten after every step; ``indent`` would route the whole document
        through json's pure-Python encoder, which cost a fleet run's parent process about a
        second of CPU for 170 steps (measured), while the workers waited for it.
        """
        steps = ",\n".join(f"  {json.dumps(step_id)}: {json.dumps(record, sort_keys=True)}"
                            for step_id, record in sorted(self.state["steps"].items()))
        others = {key: value for key, value in self.state.items() if key != "steps"}
        head = json.dumps(others, sort_keys=True)[1:-1]
        text = "{" + (head + ", " if head else "") + '"steps": {' + (f"\n{steps}\n" if steps else "") + "}}\n"
        with atomic_write(self.root / STATE_FILE) as tmp:
            tmp.write_text(text)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def sha256(self, path: str | os.PathLike) -> str:
        """SHA-256 of a file, remembered while its size and modification time stay the same."""
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]

    def finished(self, step_id: str, output: str, key: str) -> bool:
        """True when ``step_id`` ran with ``key`` and its output is still the file it wrote (not a link to one)."""
        record = self.state["steps"].get(step_id)
        target = self.path(output)
        return bool(record and record.get("key") == key and target.is_file() and not target.is_symlink()
                    and self.sha256(target) == record.get("sha256"))

    def record(self, step_id: str, output: str, key: str, seconds: float, source: str) -> None:
        """Mark a step done (``source``: ran, or cache) and save the state at once."""
        self.state["steps"][step_id] = {
            "key": key, "output": output, "sha256": self.sha256(self.path(output)), "seconds": round(seconds, 3),
            "source": source, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._write_state()

    def forget(self, step_id: str) -> None:
        if self.state["steps"].pop(step_id, None) is not None:
            self._write_state()

    def seconds(self, step_id: str) -> float | None:
        record = self.state["steps"].get(step_id)
        return None if record is None else record.get("seconds")

    # -- the stage cache -----------------------------------------------------------------------

    def _cached(self, key: str, output: str) -> Path | None:
        return None if self.cache is None else self.cache / f"{key}{''.join(Path(output).suffixes)}"

    def _record(self, key: str) -> Path:
        """The entry's record; its own name, since an output may itself end in ``.json`` (reports)."""
        return self.cache / f"{key}{CACHE_RECORD_SUFFIX}"

    def restore_from_cache(self, key: str, output: str) -> float | None:
        """Copy a verified cached result of the same step key into place; its original run time, or None.

        An entry is trusted only when its file hashes to the SHA-256 its record holds: a
        damaged entry (a bit flip, a half-copied file, a record lost, an entry of the first
        layout that had no hash) is deleted and the step runs again, instead of feeding every
        later step. A symbolic link is damaged too: the cache holds copies, and a link lets
        the file it names change between the check and the copy.
        """
        cached = self._cached(key, output)
        if cached is None or not (cached.is_file() or cached.is_symlink()):
            return None
        record_path = self._record(key)
        try:
            if cached.is_symlink() or record_path.is_symlink():
                raise ValueError("a link in the cache")
            record = parse_json(record_path.read_text())
            seconds, recorded = float(record["seconds"]), str(record["sha256"])
            if not (math.isfinite(seconds) and seconds >= 0):   # "nan" would reach run.json and --json as NaN
                recorded = None
        except (OSError, ValueError, KeyError, TypeError, OverflowError):
            recorded = None
        if recorded is None or not cached.is_file() or sha256_file(cached) != recorded:
            first_layout_record = self.cache / f"{key}.json"   # or, for a report, the entry itself: damaged too
            for damaged in (cached, record_path, first_layout_record):
                with contextlib.suppress(IsADirectoryError, PermissionError):
                    damaged.unlink(missing_ok=True)
            return None
        with atomic_write(self.path(output)) as tmp:
            shutil.copyfile(cached, tmp)
        if sha256_file(self.path(output)) != recorded:   # the copy itself went wrong
            self.path(output).unlink()
            return None
        return seconds

    def store_in_cache(self, key: str, output: str, seconds: float) -> None:
        """Copy a step's output into the cache; the record, written last, commits the entry with its hash."""
        cached = self._cached(key, output)
        if cached is not None and not cached.exists():
            with atomic_write(cached) as tmp:
                shutil.copyfile(self.path(output), tmp)
            with atomic_write(self._record(key)) as tmp:
                tmp.write_text(json.dumps({"seconds": round(seconds, 3), "output": output,
                                           "sha256": self.sha256(self.path(output))}) + "\n")

    # -- records beside the artifacts ----------------------------------------------------------

    def write_recipe(self, document: Mapping[str, Any]) -> Path:
        import yaml

        with atomic_write(self.root / RECIPE_FILE) as tmp:
            tmp.write_text("# The resolved recipe this run carried out (extends and --set applied).\n"
                           + yaml.safe_dump(dict(document), sort_keys=False))
        return self.root / RECIPE_FILE

    def write_commands(self, command_lines: list[str]) -> Path:
        with atomic_write(self.root / COMMANDS_FILE) as tmp:
            tmp.write_text("#!/usr/bin/env bash\n# The subcommands this run executes, in order "
                           "(run from the directory tapvits run was started in).\nset -euo pipefail\n"
                           + "\n".join(command_lines) + "\n")
        return self.root / COMMANDS_FILE

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        with atomic_write(self.root / SUMMARY_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        return self.root / SUMMARY_FILE
