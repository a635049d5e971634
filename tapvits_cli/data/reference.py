"""Dataset references: one short string names a source, a split and a subset of it.

A reference travels on the command line (``fashion-mnist:split=test:classes=0-4``), in
recipes and in every artifact's provenance, so it must mean the same selection on any
machine and print back to a string that parses to an equal reference. The grammar and
its semantics are normative in ``protocol/datasets.md``. Parsing opens no file: whether
a source exists is only known when :func:`tapvits_cli.data.open_dataset` opens it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from tapvits_cli.errors import UsageError

BUILTINS = ("digits", "fashion-mnist")
SPLITS = ("train", "test", "all")
OPTIONS = ("split", "classes", "dirichlet", "part", "fold", "indices", "sample", "seed")

_OPTION = re.compile(r"([A-Za-z_]\w*)=(.*)", re.DOTALL)  # fullmatch: "seed=3\n" is refused, not read as 3
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Every integer of a reference (a label, a position, K/N, a count, a seed) fits NumPy's int64,
# so a huge value is refused here instead of overflowing, or exhausting memory, in NumPy.
_INT64_MAX = 2**63 - 1

Ranges = tuple[tuple[int, int], ...]


def _natural(value: object, minimum: int = 0) -> int:
    """An integer in minimum..2**63-1 from YAML (int) or the command line (ASCII digits only).

    Strict like the rest of a reference: ``int()`` would also take ``" 7"``, ``"1_0"`` and
    other scripts' digits (``"٣"``), none of which the canonical form prints back.
    """
    number = _digits(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not minimum <= number <= _INT64_MAX:
        raise ValueError(f"expected an integer >= {minimum} (at most 2**63-1), got {value!r}")
    return number


def _digits(text: str) -> int | None:
    """ASCII digits as an integer, or None; None too beyond 19 significant digits, which no int64 has
    (and which ``int()`` refuses to convert past 4,300 digits anyway)."""
    significant = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit()) or len(significant) > len(str(_INT64_MAX)):
        return None
    return int(significant)


def _ranges(value: object) -> Ranges:
    """'0,3,5-7', an int or a list of ints or [low, high] pairs -> sorted, merged, inclusive ranges.

    Kept as ranges, never expanded here: ``0-3000000000`` is a short string but three billion
    labels. Whoever expands them bounds them first (:func:`tapvits_cli.data.selection.select_ids`).
    """
    if isinstance(value, str):
        pairs = [_range_item(item, value) for item in value.split(",")]
    elif isinstance(value, (list, tuple)) and value:
        pairs = [(_natural(v[0]), _natural(v[1])) if isinstance(v, (list, tuple)) and len(v) == 2
                 else (_natural(v),) * 2 for v in value]
    else:
        pairs = [(_natural(value),) * 2]
    merged: list[list[int]] = []
    for low, high in sorted(pairs):
        if high < low:
            raise ValueError(f"range {low}-{high} runs backwards")
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return tuple((low, high) for low, high in merged)


def _range_item(item: str, text: str) -> tuple[int, int]:
    """One item of a list: ``N`` or ``N-M``, ASCII digits only, no spaces."""
    match = _RANGE.fullmatch(item)
    if not match:
        raise ValueError(f"expected a list like 0,3,5-7, got {text!r}")
    low = _natural(match[1])
    return low, _natural(match[2]) if match[2] is not None else low


def format_ranges(ranges: Ranges) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def _split(value: object) -> str:
    if value not in SPLITS:
        raise ValueError(f"expected one of {', '.join(SPLITS)}, got {value!r}")
    return value


def _fold(value: object) -> tuple[int, int]:
    parts = value.split("/") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        raise ValueError(f"expected K/N, got {value!r}")
    k, n = _natural(parts[0]), _natural(parts[1], minimum=2)
    if k >= n:
        raise ValueError(f"K must be in 0..N-1, got {k}/{n}")
    return k, n


def _concentration(value: object) -> float:
    """A Dirichlet concentration α > 0 (finite), from YAML (number) or the command line (text).

    Text must be a plain decimal (``0.5``, ``2``, ``1e-3``): ``float()`` would also take
    ``" 0.5"``, ``"1_0"``, ``"infinity"`` and other scripts' digits.
    """
    if isinstance(value, bool) or (isinstance(value, str) and not _DECIMAL.fullmatch(value)):
        raise ValueError(f"expected a number > 0, got {value!r}")
    try:
        alpha = float(value)
    except (TypeError, ValueError, OverflowError):   # OverflowError: a YAML integer beyond any double
        raise ValueError(f"expected a number > 0, got {value!r}") from None
    if not 0 < alpha < float("inf"):
        raise ValueError(f"expected a number > 0, got {value!r}")
    return alpha


_CONVERT: dict[str, Callable[[object], object]] = {
    "split": _split,
    "classes": _ranges,
    "dirichlet": _concentration,
    "part": _fold,
    "fold": _fold,
    "indices": _ranges,
    "sample": lambda v: _natural(v, minimum=1),
    "seed": _natural,
}


@dataclass(frozen=True)
class DatasetRef:
    """A dataset source and the selection applied to it:
    split → classes → dirichlet part → fold → indices → sample.

    ``split=None`` means the source's default; :func:`open_dataset` resolves it, so a
    dataset's provenance always names its split. ``classes`` (labels) and ``indices``
    (positions) are sorted, merged, inclusive ``(low, high)`` ranges and ``fold`` and
    ``part`` are ``(K, N)``, so equal selections compare equal however they were written.
    ``dirichlet`` (α) and ``part`` come together: part K of a non-IID split into N parts.
    """

    source: str
    split: str | None = None
    classes: Ranges | None = None
    dirichlet: float | None = None
    part: tuple[int, int] | None = None
    fold: tuple[int, int] | None = None
    indices: Ranges | None = None
    sample: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise UsageError(f"dataset reference: the source must be a non-empty string, got {self.source!r}")
        for key in OPTIONS:
            value = getattr(self, key)
            if value is not None:
                try:
                    object.__setattr__(self, key, _CONVERT[key](value))
                except ValueError as exc:
                    raise UsageError(f"dataset reference {self.source!r}: {key}: {exc}") from None
        if (self.dirichlet is None) != (self.part is None):
            raise UsageError(f"dataset reference {self.source!r}: dirichlet=ALPHA and part=K/N go together "
                             f"(part K of a Dirichlet split into N parts), got only "
                             f"{'dirichlet' if self.part is None else 'part'}")

    @classmethod
    def parse(cls, text: str) -> "DatasetRef":
        """Parse ``SOURCE[:key=value...]``, taking trailing ``key=value`` segments as options.

        Options are peeled off from the right, so a path containing ``:`` still works as
        long as its last ``:`` segment has no ``=``.
        """
        segments = text.split(":")
        options: dict[str, str] = {}
        while len(segments) > 1 and (match := _OPTION.fullmatch(segments[-1])):
            segments.pop()
            key, value = match.groups()
            if key in options:
                raise UsageError(f"dataset reference {text!r}: option {key!r} given twice")
            options[key] = value
        return cls._build(":".join(segments), options, lambda key: f"dataset reference {text!r}: {key}")

    @classmethod
    def from_mapping(cls, mapping: object, path: str = "dataset") -> "DatasetRef":
        """A reference from a recipe: a reference string, or a mapping of ``source`` and options.

        Strict like the rest of a recipe: an unknown key is an error naming its full
        path (``devices[0].private.foo``), so a typo never silently selects other data.
        """
        if isinstance(mapping, str):
            try:
                return cls.parse(mapping)
            except UsageError as exc:
                raise UsageError(f"{path}: {exc}") from None
        if not isinstance(mapping, Mapping):
            raise UsageError(f"{path}: expected a dataset reference string or a mapping, got {type(mapping).__name__}")
        for key in mapping:
            if key != "source" and key not in OPTIONS:
                raise UsageError(f"{path}.{key}: unknown key (expected source, {', '.join(OPTIONS)})")
        source = mapping.get("source")
        if not isinstance(source, str) or not source:
            raise UsageError(f"{path}.source: required, a built-in name ({', '.join(BUILTINS)}) or a path")
        options = {key: mapping[key] for key in OPTIONS if mapping.get(key) is not None}
        return cls._build(source, options, lambda key: f"{path}.{key}")

    @classmethod
    def _build(cls, source: str, options: Mapping[str, object], where: Callable[[str], str]) -> "DatasetRef":
        values = {}
        for key, value in options.items():
            if key not in _CONVERT:
                raise UsageError(f"{where(key)}: unknown option (expected {', '.join(OPTIONS)})")
            try:
                values[key] = _CONVERT[key](value)
            except ValueError as exc:
                raise UsageError(f"{where(key)}: {exc}") from None
        return cls(source, **values)

    def __str__(self) -> str:
        """The canonical form: options in a fixed order, defaults left out."""
        parts = [self.source]
        for field in fields(self)[1:]:
            value = getattr(self, field.name)
            if value is None or value == field.default:
                continue
            if field.name in ("classes", "indices"):
                value = format_ranges(value)
            elif field.name in ("fold", "part"):
                value = f"{value[0]}/{value[1]}"
            elif field.name == "dirichlet":
                value = repr(float(value))
            parts.append(f"{field.name}={value}")
        return ":".join(parts)
