"""Errors that the command line turns into one readable line and a documented exit code.

Stage logic raises these; ``cli`` maps them to exit codes. Keeping the mapping on the
exception class (not in a table elsewhere) means a new error cannot forget its code.
"""

from __future__ import annotations

import errno
import string


class ExitCode:
    """Process exit codes, documented in README.md ("Exit codes")."""

    OK = 0
    INTERNAL = 1          # a bug in tapvits: please report it (run again with --debug)
    USAGE = 2             # bad options or arguments (click's own code)
    INVALID_ARTIFACT = 3  # not a tapvits artifact, truncated, corrupt, or fails its spec
    INCOMPATIBLE = 4      # a valid artifact that cannot be used here (newer version, wrong kind, fingerprint mismatch)
    UNSATISFIABLE_BUDGET = 5
    BELOW_THRESHOLD = 6   # an evaluation threshold failed
    NOT_IMPLEMENTED = 7   # the stage or option is not built yet
    DATA_UNAVAILABLE = 8  # a dataset source, weights download or optional package is missing (unreadable data: USAGE)
    ENVIRONMENT = 9       # the machine refused: disk full, read-only file system, permission denied
    INTERRUPTED = 130     # Ctrl-C / SIGINT, or SIGTERM


class TapvitsError(Exception):
    """Base class: a failure the user can act on, shown as one line."""

    exit_code = ExitCode.INTERNAL


class UsageError(TapvitsError):
    """An option value that click could not check by itself."""

    exit_code = ExitCode.USAGE


class ParameterError(UsageError):
    """A value the stage logic refuses, naming its parameters as the logic calls them.

    The logic cannot know how its caller spells a parameter (``--pca-dim`` on the command
    line, ``pca-dim`` in a recipe, ``pca_dim`` from Python), so ``template`` writes each
    one as ``{name}``: ``str()`` shows the names themselves, :meth:`naming` the caller's
    spelling.
    """

    def __init__(self, template: str):
        self.template = template
        self.parameters = tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))
        super().__init__(template.format(**{name: name for name in self.parameters}))

    def naming(self, spell) -> UsageError:
        """The same error with each parameter written as ``spell(name)``."""
        return UsageError(self.template.format(**{name: spell(name) for name in self.parameters}))


class InvalidArtifactError(TapvitsError):
    exit_code = ExitCode.INVALID_ARTIFACT


class IncompatibleArtifactError(TapvitsError):
    exit_code = ExitCode.INCOMPATIBLE


class UnsatisfiableBudgetError(TapvitsError):
    exit_code = ExitCode.UNSATISFIABLE_BUDGET


class BelowThresholdError(TapvitsError):
    exit_code = ExitCode.BELOW_THRESHOLD


class NotImplementedStageError(TapvitsError):
    exit_code = ExitCode.NOT_IMPLEMENTED


class DataUnavailableError(TapvitsError):
    exit_code = ExitCode.DATA_UNAVAILABLE


class ExportError(TapvitsError):
    """An export torch cannot trace, or whose graph disagrees with PyTorch: a bug, not a user error."""

    exit_code = ExitCode.INTERNAL


class EnvironmentFailure(TapvitsError):
    """The machine, not the input, stopped the command: no space, a read-only or forbidden path.

    Raised with what was kept (nothing half-written is ever trusted later), so the user
    frees space or fixes permissions and reruns the same command.
    """

    exit_code = ExitCode.ENVIRONMENT


# errno values that mean "the environment refused", not a bug or a bad input
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})


def environment_failure(exc: OSError, doing: str) -> EnvironmentFailure | None:
    """An :class:`EnvironmentFailure` for ``exc`` when its errno (or HDF5's message) says so."""
    import os
    import re

    code = exc.errno
    if code is None:  # HDF5 reports the system error inside its message: "errno = 28"
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found[1]) if found else None
    if code not in ENVIRONMENT_ERRNOS:
        return None
    return EnvironmentFailure(f"{doing}: {os.strerror(code)}")

