"""The header every artifact carries: kind, format version, producer, time, lineage, parameters.

The same flat ``tapvits.*`` keys are used in safetensors ``__metadata__``, HDF5 root
attributes and the ``tapvits`` object of JSON artifacts, so one parser serves all three
(see protocol/README.md). Values are strings; nested values are compact JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from tapvits_cli import __version__
from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError

PREFIX = "tapvits."
REQUIRED_KEYS = ("kind", "version", "producer", "producer_version", "created", "inputs", "params")


def compact_json(value: Any) -> str:
    """Compact JSON (protocol/README.md): sorted keys, no whitespace, non-ASCII escaped as ``\\uXXXX``.

    Equal content gives equal bytes, so hashes of it (step keys, extractor fingerprints)
    identify the content, and any language can reproduce them from the spec.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for text read from an artifact, strict JSON only: every failure is a ``ValueError``.

    Python's parser recurses once per nesting level, so ``[[[…]]]`` 100,000 deep raises
    ``RecursionError``; readers catch ``ValueError`` and turn it into one line, exit 3.
    It also takes ``NaN``, ``Infinity`` and ``1e999`` (infinite), which are not JSON, and
    integers of hundreds of digits, which overflow the first float conversion: refused
    here, they can reach neither a computation nor a ``--json`` output that strict parsers
    would then reject. A member name given twice in one object is refused too: Python keeps
    the last value, other parsers the first, so two readers of one file would disagree
    (a ``report.json`` with two ``top1`` passing a CI gate that reads the other one).
    """
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite_float, parse_int=_int64,
                          object_pairs_hook=_unique_members)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


_UTC_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)")


def _utc_timestamp(text: Any) -> bool:
    """Whether ``text`` is a UTC time as ``tapvits.created`` must be: ``2026-12-03T15:30:49+00:00`` (or ``Z``).

    One spelling, matched before the calendar is checked: ``fromisoformat`` alone takes more
    forms on some Python versions than on others (``Z``, week dates, a space for ``T``).
    """
    if not (isinstance(text, str) and _UTC_TIMESTAMP.fullmatch(text)):
        return False
    try:
        _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:   # a day or an hour that does not exist
        return False
    return True


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise ValueError(f"member {name!r} appears twice in one JSON object")
        members[name] = value
    return members


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _int64(text: str) -> int:
    value = int(text)
    if not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"{text[:20]}… is beyond a 64-bit integer")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a 64-bit float")
    return value


def parse_decimal(text: str) -> int:
    """A decimal integer as metadata stores it (``"10"``, ``"-3"``); ``ValueError`` for anything else.

    Stricter than ``int()``, which also takes ``" 10 "``, ``"1_0"`` and other scripts' digits
    (``"٩٣"``), and than ``str.isdigit()``, which also takes ``"³"`` that ``int()`` then refuses.
    """
    if not (isinstance(text, str) and text.isascii() and text.lstrip("-").isdigit() and text.count("-") <= 1):
        raise ValueError(f"{text!r} is not a decimal integer")
    return int(text)


@dataclass(frozen=True)
class LineageEntry:
    """One input an artifact was made from: an artifact file, or a dataset fingerprint."""

    sha256: str
    kind: str
    name: str

    def to_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256, "kind": self.kind, "name": self.name}


@dataclass(frozen=True)
class Header:
    kind: str
    version: int
    inputs: Mapping[str, LineageEntry] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    producer: str = "tapvits"
    producer_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_strings(self) -> dict[str, str]:
        return {
            PREFIX + "kind": self.kind,
            PREFIX + "version": str(self.version),
            PREFIX + "producer": self.producer,
            PREFIX + "producer_version": self.producer_version,
            PREFIX + "created": self.created,
            PREFIX + "inputs": compact_json({role: e.to_dict() for role, e in self.inputs.items()}),
            PREFIX + "params": compact_json(dict(self.params)),
        }

    @classmethod
    def from_strings(cls, values: Mapping[str, str], source: str) -> "Header":
        """Parse the ``tapvits.*`` keys; anything else in ``values`` is ignored."""
        if PREFIX + "kind" not in values:
            raise InvalidArtifactError(f"{source}: not a tapvits artifact (no '{PREFIX}kind' key)")
        missing = [PREFIX + k for k in REQUIRED_KEYS if PREFIX + k not in values]
        if missing:
            raise InvalidArtifactError(f"{source}: header lacks {', '.join(missing)}")
        try:
            version = parse_decimal(values[PREFIX + "version"])
            inputs = parse_json(values[PREFIX + "inputs"])
            params = parse_json(values[PREFIX + "params"])
            lineage = {role: LineageEntry(str(e["sha256"]), str(e["kind"]), str(e["name"])) for role, e in inputs.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidArtifactError(f"{source}: malformed header ({exc})") from None
        if not isinstance(params, dict):
            raise InvalidArtifactError(f"{source}: header '{PREFIX}params' is not a JSON object")
        if not _utc_timestamp(values[PREFIX + "created"]):
            raise InvalidArtifactError(f"{source}: header '{PREFIX}created' is not an ISO 8601 time in UTC "
                                       f"({values[PREFIX + 'created']!r})")
        return cls(
            kind=str(values[PREFIX + "kind"]),
            version=version,
            inputs=lineage,
            params=params,
            producer=str(values[PREFIX + "producer"]),
            producer_version=str(values[PREFIX + "producer_version"]),
            created=str(values[PREFIX + "created"]),
        )

    def check_readable(self, supported_version: int, source: str) -> None:
        """Readers accept any version up to their own and refuse newer ones."""
        if self.version < 1:
            raise InvalidArtifactError(f"{source}: invalid {self.kind} format version {self.version}")
        if self.version > supported_version:
            raise IncompatibleArtifactError(
                f"{source}: {self.kind} format v{self.version} was written by {self.producer} "
                f"{self.producer_version}; this tapvits ({__version__}) reads up to v{supported_version}, upgrade it"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": self.version,
            "producer": self.producer,
            "producer_version": self.producer_version,
            "created": self.created,
            "inputs": {role: e.to_dict() for role, e in self.inputs.items()},
            "params": dict(self.params),
        }


def finite_number(value: Any) -> bool:
    """A finite JSON number: not a boolean, and not an integer too large for a float."""
    import math

    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False

