"""The ``features`` artifact: a public pool embedded by one extractor, as an HDF5 table.

See protocol/features.md. The cloud builds it once per pool and extractor and every
device's ``select`` streams it, so the layout is made for row-wise reads: one row per
sample, features chunked along rows, uncompressed; :meth:`FeatureTable.iter_chunks`
reads contiguous row ranges with memory that does not grow with the pool.

Embedding a large pool takes hours, so writing is resumable: the table grows in
``<output>.partial`` (complete header, datasets pre-sized, ``features.rows_done``
advanced after each flushed batch) and is renamed onto the output only once every row is
written. A partial file never validates, and a finished table never exists half-written.

A write that fails half-way must not leave state that a resume trusts. So the partial
file claims its whole disk space when it is created (a full disk fails then, before any
work, instead of inside HDF5 mid-batch, which crashed the process), each batch's rows are
written and flushed before ``rows_done`` moves, and ``features.features_sha256`` (the
hash of the committed rows) lets a resume and every reader check the rows themselves.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from tapvits_cli.artifacts.containers import (ArtifactFile, attr_string, check_group_encoding, hdf5_reading,
                                              set_group_encoding)
from tapvits_cli.artifacts.files import atomic_write
from tapvits_cli.artifacts.header import Header, LineageEntry, compact_json, parse_decimal, parse_json
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, read_artifact, register
from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError, environment_failure

KIND = "features"
VERSION = 1
GROUP = "features"
ENCODING_TYPE = "feature-table"
ENCODING_VERSION = 1
PARTIAL_SUFFIX = ".partial"
# Rows per HDF5 chunk: about 1 MiB of features. Large enough that a streamed read touches
# few chunks, small enough that a partly filled chunk stays in the 8 MiB chunk cache
# while batches of a few hundred rows fill it. Uncompressed: streaming 10^6 x 32 rows ran
# at ~40M rows/s here, against ~2.6M with lzf and ~1.7M with gzip (for 35-45% less disk).
CHUNK_BYTES = 1 << 20
CACHE_BYTES = 8 << 20
VALIDATE_CHUNK_BYTES = 32 << 20
_META_KEYS = ("extractor", "extractor_sha256", "dataset", "dim", "rows", "rows_done")


def partial_path(output: str | os.PathLike) -> Path:
    """Where an unfinished table for ``output`` lives (not the final name, so it never passes for it)."""
    return Path(str(output) + PARTIAL_SUFFIX)


def _meta(key: str) -> str:
    return f"{KIND}.{key}"


# --- writing ------------------------------------------------------------------------

def open_feature_writer(output: str | os.PathLike, extractor, dataset, params: Mapping[str, Any],
                        extractor_input: LineageEntry, restart: bool = False) -> "FeatureTableWriter":
    """Start ``<output>.partial`` or resume it.

    A partial file resumes only when it was started for the same extractor fingerprint,
    the same dataset fingerprint and the same parameters (batch size, device, seed), so
    the resumed table is exactly what one uninterrupted run writes. Otherwise it is
    refused; ``restart=True`` discards it.
    """
    from tapvits_cli.artifacts.digests import fingerprint_sha256

    partial = partial_path(output)
    if restart:
        partial.unlink(missing_ok=True)
    header = Header(kind=KIND, version=VERSION, params=dict(params), inputs={
        "extractor": extractor_input,
        "dataset": LineageEntry(dataset.fingerprint(), "dataset", str(dataset.ref)),
    })
    description = {**dataset.provenance(), "class_names": list(dataset.class_names)}
    metadata = {
        _meta("extractor"): compact_json(dict(extractor.fingerprint)),
        _meta("extractor_sha256"): fingerprint_sha256(extractor.fingerprint),
        _meta("dataset"): compact_json(description),
        _meta("dim"): str(extractor.feature_dim),
        _meta("rows"): str(len(dataset)),
    }
    if partial.exists():
        _check_resumable(partial, header, metadata)
    else:
        try:
            _create_partial(partial, header, metadata, dataset.ids, dataset.labels, extractor.feature_dim)
        except OSError as exc:
            refused = environment_failure(exc, f"creating {partial} ({len(dataset)} rows)")
            if refused is None:
                raise
            raise refused from None
    return FeatureTableWriter(Path(output), partial, dataset.ids, dataset.labels)


def _create_partial(partial: Path, header: Header, metadata: Mapping[str, str], ids: np.ndarray,
                    labels: np.ndarray, dim: int) -> None:
    """The partial file appears complete in structure (atomically) with zero rows done."""
    import h5py

    rows = len(ids)
    early = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    early.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)   # every chunk on disk now, not on first write
    with atomic_write(partial) as tmp, h5py.File(tmp, "w") as handle:
        for key, value in {**header.to_strings(), **metadata, _meta("rows_done"): "0",
                           _meta("features_sha256"): hashlib.sha256().hexdigest(),
                           _meta("index_sha256"): index_sha256(ids, labels)}.items():
            handle.attrs[key] = value
        group = handle.create_group(GROUP)
        set_group_encoding(group, ENCODING_TYPE, ENCODING_VERSION)
        group.create_dataset("ids", data=np.asarray(ids, dtype=np.int64), chunks=(_chunk_rows(rows, 8),))
        group.create_dataset("labels", data=np.asarray(labels, dtype=np.int64), chunks=(_chunk_rows(rows, 8),))
        group.create_dataset("features", shape=(rows, dim), dtype=np.float32,
                             chunks=(_chunk_rows(rows, 4 * dim), dim), fillvalue=0.0, dcpl=early, fill_time="alloc")


def _index_rows(ids: np.ndarray, labels: np.ndarray) -> bytes:
    """Rows' (id, label) pairs as the index hash covers them: little-endian int64, id first."""
    return np.stack([np.asarray(ids), np.asarray(labels)], axis=1).astype("<i8").tobytes()


def index_sha256(ids: np.ndarray, labels: np.ndarray) -> str:
    """``features.index_sha256``: the hash of every row's id and label (the features hash covers neither)."""
    return hashlib.sha256(_index_rows(ids, labels)).hexdigest()


def _chunk_rows(rows: int, row_bytes: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // row_bytes))


def _identity(metadata: Mapping[str, str]) -> dict[str, Any]:
    """What a partial file must share with a new run for that run to resume it."""
    try:
        data = parse_json(metadata.get(_meta("dataset"), "{}"))["fingerprint"]
    except (ValueError, KeyError, TypeError):
        data = None
    return {"kind": metadata.get("tapvits.kind"), "format version": metadata.get("tapvits.version"),
            "extractor": metadata.get(_meta("extractor_sha256")), "number of rows": metadata.get(_meta("rows")),
            "feature dimension": metadata.get(_meta("dim")), "dataset": data}


def _check_resumable(partial: Path, header: Header, metadata: Mapping[str, str]) -> None:
    from tapvits_cli.artifacts.containers import open_file

    hint = "run with --restart to discard it and start over"
    try:
        existing = open_file(partial)
    except InvalidArtifactError as exc:
        raise InvalidArtifactError(f"{exc}; it is an interrupted run's partial file: {hint}") from None
    theirs, ours = _identity(existing.metadata), _identity({**header.to_strings(), **metadata})
    for what, value in ours.items():
        if theirs[what] != value:
            raise IncompatibleArtifactError(f"{partial}: an interrupted run with a different {what}; {hint}")
    before, now = existing.header.params, dict(header.params)
    if before != now:
        changed = ", ".join(f"{k}={before.get(k)}" for k in sorted({*before, *now}) if before.get(k) != now.get(k))
        raise IncompatibleArtifactError(f"{partial}: an interrupted run with other parameters ({changed}); "
                                        f"rerun with those to resume it, or {hint}")


class FeatureTableWriter:
    """Appends batches of features to a partial table, then renames it into place.

    Use as a context manager: leaving it (also by Ctrl-C) closes the HDF5 file cleanly,
    so the rows written so far stay resumable.
    """

    def __init__(self, output: Path, partial: Path, ids: np.ndarray, labels: np.ndarray) -> None:
        """Open ``partial`` for the dataset of ``ids`` and ``labels``; its committed rows are checked first."""
        import h5py

        self.output, self.partial = output, partial
        try:
            self._file = h5py.File(partial, "r+", rdcc_nbytes=CACHE_BYTES)
            group = self._file[GROUP]
            self._ids, self._labels, self._features = group["ids"], group["labels"], group["features"]
            self.rows_done = parse_decimal(attr_string(self._file.attrs[_meta("rows_done")]))
            recorded = attr_string(self._file.attrs[_meta("features_sha256")])
            shape = (parse_decimal(attr_string(self._file.attrs[_meta("rows")])),
                     parse_decimal(attr_string(self._file.attrs[_meta("dim")])))
            if self._features.shape != shape or self._ids.shape != shape[:1] or self._labels.shape != shape[:1] \
                    or min(shape) < 1 or not 0 <= self.rows_done <= shape[0]:
                raise ValueError(f"{self.rows_done} rows done of datasets shaped {self._features.shape}, "
                                 f"{self._ids.shape}, {self._labels.shape} for {shape[0]} x {shape[1]}")
        except (OSError, KeyError, ValueError, TypeError) as exc:
            self.close()
            raise InvalidArtifactError(f"{partial}: unreadable partial feature table ({exc}); "
                                       "run with --restart to discard it") from None
        self.rows, self.dim = shape
        if not (np.array_equal(self._ids[()], ids) and np.array_equal(self._labels[()], labels)):
            self.close()
            raise InvalidArtifactError(f"{partial}: its sample ids or labels are not the dataset's (the file was "
                                       "changed); run with --restart to discard it")
        self._digest = hashlib.sha256()
        for start in range(0, self.rows_done, VALIDATE_CHUNK_BYTES // (4 * self.dim) or 1):
            stop = min(start + (VALIDATE_CHUNK_BYTES // (4 * self.dim) or 1), self.rows_done)
            self._digest.update(np.ascontiguousarray(self._features[start:stop], dtype="<f4").tobytes())
        if self._digest.hexdigest() != recorded:
            self.close()
            raise InvalidArtifactError(f"{partial}: its {self.rows_done} committed rows do not match "
                                       f"features.features_sha256 (a write failed half-way, or the file was "
                                       f"changed); run with --restart to discard it")

    def __enter__(self) -> "FeatureTableWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def write_batches(self, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      on_progress: Callable[[int], None] | None = None) -> None:
        """Append ``(ids, features, labels)`` batches from row ``rows_done`` on.

        Each batch must continue the table's ids in order (they were fixed when the
        partial file was created); after it is written and flushed, ``rows_done``
        advances and ``on_progress(rows)`` is called with the batch's row count.
        """
        for ids, features, labels in batches:
            start, stop = self.rows_done, self.rows_done + len(ids)
            if stop > self.rows or not np.array_equal(ids, self._ids[start:stop]) \
                    or not np.array_equal(labels, self._labels[start:stop]):
                raise ValueError(f"batch for rows {start}-{stop - 1} does not continue the table's samples")
            if features.shape != (len(ids), self.dim):
                raise ValueError(f"batch features have shape {features.shape}, expected ({len(ids)}, {self.dim})")
            bad = ~np.isfinite(features).all(axis=1)
            if bad.any():   # a verdict on the extractor: a rerun would stop here again, so nothing is kept to resume
                self.close()
                self.partial.unlink(missing_ok=True)
                raise InvalidArtifactError(f"the extractor produced non-finite features for sample id "
                                           f"{int(ids[bad][0])}; refusing to write them")
            try:
                self._features[start:stop] = features
                self._file.flush()                      # the rows reach the disk first,
                self._digest.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
                self._file.attrs[_meta("features_sha256")] = self._digest.hexdigest()
                self._file.attrs[_meta("rows_done")] = str(stop)
                self._file.flush()                      # then the commit that says they are there
            except (OSError, RuntimeError) as exc:
                refused = environment_failure(exc, f"writing {self.partial}") if isinstance(exc, OSError) else None
                raise (refused or InvalidArtifactError(
                    f"{self.partial}: writing rows {start}-{stop - 1} failed ({str(exc).splitlines()[0]}); "
                    f"rerun to resume from the last committed row")) from None
            self.rows_done = stop
            if on_progress is not None:
                on_progress(len(ids))

    def finish(self) -> Path:
        """Close the complete table, flush it to disk and rename it onto the output."""
        if self.rows_done != self.rows:
            raise ValueError(f"{self.partial}: only {self.rows_done} of {self.rows} rows are written")
        self.close()
        with open(self.partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial, self.output)
        return self.output


# --- reading ------------------------------------------------------------------------

@dataclass
class FeatureTable:
    """An open, structurally checked feature table (``open_feature_table``)."""

    artifact: ArtifactFile
    extractor: dict
    extractor_sha256: str
    dataset: dict
    rows: int
    dim: int
    _handle: Any = field(default=None, repr=False)
    features_sha256: str | None = None   # absent in tables written before tapvits recorded it
    index_sha256: str | None = None      # likewise

    def __enter__(self) -> "FeatureTable":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None and self._handle.id.valid:
            self._handle.close()

    def _group(self):
        import h5py

        if self._handle is None or not self._handle.id.valid:
            self._handle = h5py.File(self.artifact.path, "r", rdcc_nbytes=CACHE_BYTES)
        return self._handle[GROUP]

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(ids int64 (n,), features float32 (n, dim), labels int64 (n,))`` over consecutive
        row ranges of ``chunk_rows`` rows (the last may be shorter), in table order.

        The rows are checked on the way, by the rules ``validate`` applies (it reads the
        table through here too): ids strictly increasing, labels in range, features finite;
        and hashed: after the last chunk, a table whose features do not match
        ``features.features_sha256`` raises, so a consumer that reads the whole table before
        writing (``select``) never writes from corrupted rows.
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        with hdf5_reading(self.artifact.path):
            yield from self._checked_chunks(chunk_rows)

    def _checked_chunks(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        group = self._group()
        ids, features, labels = group["ids"], group["features"], group["labels"]
        classes = self._classes()
        digest, index_digest, previous = hashlib.sha256(), hashlib.sha256(), -1
        for start in range(0, self.rows, chunk_rows):
            stop = min(start + chunk_rows, self.rows)
            chunk_ids, rows, chunk_labels = ids[start:stop], features[start:stop], labels[start:stop]
            if chunk_ids[0] <= previous or (np.diff(chunk_ids) <= 0).any():
                raise InvalidArtifactError(f"{self.artifact.path}: ids must be unique and increasing")
            previous = chunk_ids[-1]
            if chunk_labels.min() < 0 or chunk_labels.max() >= classes:
                raise InvalidArtifactError(f"{self.artifact.path}: labels must lie in 0..num_classes-1 of "
                                           "features.dataset")
            if not np.isfinite(rows).all():
                raise InvalidArtifactError(f"{self.artifact.path}: features contain NaN or infinity")
            digest.update(np.ascontiguousarray(rows, dtype="<f4").tobytes())
            index_digest.update(_index_rows(chunk_ids, chunk_labels))
            yield chunk_ids, rows, chunk_labels
        if self.features_sha256 is not None and digest.hexdigest() != self.features_sha256:
            raise InvalidArtifactError(f"{self.artifact.path}: features do not match features.features_sha256 "
                                       "(corrupted)")
        self._check_index(index_digest.hexdigest())

    def _check_index(self, computed: str) -> None:
        if self.index_sha256 is not None and computed != self.index_sha256:
            raise InvalidArtifactError(f"{self.artifact.path}: ids or labels do not match features.index_sha256 "
                                       "(corrupted)")

    def labels(self) -> np.ndarray:
        """Every row's label (8 bytes a row: small next to the features), in range (the rule of ``validate``)."""
        with hdf5_reading(self.artifact.path):
            ids, labels = self._group()["ids"][:], self._group()["labels"][:]
        self._check_index(index_sha256(ids, labels))   # labels steer class-prior quotas: never a flipped one
        if len(labels) and (labels.min() < 0 or labels.max() >= self._classes()):
            raise InvalidArtifactError(f"{self.artifact.path}: labels must lie in 0..num_classes-1 of features.dataset")
        return labels

    def _classes(self) -> int:
        """``features.dataset.num_classes``; without it any non-negative label is in range."""
        classes = self.dataset.get("num_classes")
        return classes if isinstance(classes, int) else np.iinfo(np.int64).max


def open_feature_table(path: str | os.PathLike) -> FeatureTable:
    """Open a complete feature table after the cheap checks (header, keys, shapes, dtypes)."""
    return _structure(read_artifact(path, expect=KIND))


def _structure(artifact: ArtifactFile) -> FeatureTable:
    import h5py

    from tapvits_cli.artifacts.digests import fingerprint_sha256

    path = artifact.path
    missing = [_meta(k) for k in _META_KEYS if _meta(k) not in artifact.metadata]
    if missing:
        raise InvalidArtifactError(f"{path}: required key '{missing[0]}' is missing")
    meta = artifact.kind_metadata(KIND)
    extractor, dataset = artifact.json_field(_meta("extractor")), artifact.json_field(_meta("dataset"))
    try:
        rows, dim, rows_done = parse_decimal(meta["rows"]), parse_decimal(meta["dim"]), parse_decimal(meta["rows_done"])
    except ValueError:
        raise InvalidArtifactError(f"{path}: features.rows, features.dim and features.rows_done must be integers") from None
    if rows < 1 or dim < 1:
        raise InvalidArtifactError(f"{path}: a feature table holds at least one row of at least one feature, "
                                   f"not {rows} x {dim}")
    if rows_done != rows:
        raise InvalidArtifactError(f"{path}: incomplete feature table ({rows_done} of {rows} rows); "
                                   "rerun `tapvits features` to resume it")
    if not isinstance(extractor, dict) or not isinstance(dataset, dict):
        raise InvalidArtifactError(f"{path}: features.extractor and features.dataset must be JSON objects")
    if fingerprint_sha256(extractor) != meta["extractor_sha256"]:
        raise InvalidArtifactError(f"{path}: features.extractor_sha256 does not match features.extractor")
    if extractor.get("feature_dim") != dim:
        raise InvalidArtifactError(f"{path}: features.dim is {dim}, the extractor's feature_dim {extractor.get('feature_dim')}")
    if not {"reference", "fingerprint", "samples"} <= set(dataset) or dataset["samples"] != rows:
        raise InvalidArtifactError(f"{path}: features.dataset needs reference, fingerprint and samples = features.rows")
    names = dataset.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names) \
            or not isinstance(dataset.get("num_classes", 0), int) or isinstance(dataset.get("num_classes"), bool):
        raise InvalidArtifactError(f"{path}: features.dataset class_names must be a list of strings, num_classes "
                                   "an integer")
    with hdf5_reading(path):
        handle = h5py.File(path, "r", rdcc_nbytes=CACHE_BYTES)
        try:
            _check_group(handle, path, rows, dim)
        except BaseException:
            handle.close()
            raise
    return FeatureTable(artifact, extractor, meta["extractor_sha256"], dataset, rows, dim, handle,
                        meta.get("features_sha256"), meta.get("index_sha256"))


def _check_group(handle, path: Path, rows: int, dim: int) -> None:
    group = handle.get(GROUP)
    if group is None or not hasattr(group, "keys"):
        raise InvalidArtifactError(f"{path}: group '{GROUP}' is missing")
    check_group_encoding(group, path, GROUP, ENCODING_TYPE, ENCODING_VERSION)
    for name, dtype, shape in (("ids", np.int64, (rows,)), ("labels", np.int64, (rows,)),
                               ("features", np.float32, (rows, dim))):
        dataset = group.get(name)
        if dataset is None or not hasattr(dataset, "dtype"):
            raise InvalidArtifactError(f"{path}: dataset '{GROUP}/{name}' is missing")
        if dataset.dtype != dtype or dataset.shape != shape:
            raise InvalidArtifactError(f"{path}: '{GROUP}/{name}' is {dataset.dtype} {dataset.shape}, "
                                       f"the spec needs {np.dtype(dtype)} {shape}")


def _validate(artifact: ArtifactFile) -> None:
    """Structure, then one streamed pass with the row rules every reader applies (:meth:`FeatureTable.iter_chunks`)."""
    with _structure(artifact) as table:
        for _ in table.iter_chunks(max(1, VALIDATE_CHUNK_BYTES // (4 * table.dim))):
            pass


def _summarize(artifact: ArtifactFile) -> Summary:
    meta = artifact.kind_metadata(KIND)
    if meta.get("rows_done") != meta.get("rows"):  # a partial file: show how far it got
        dataset = artifact.json_field(_meta("dataset")) if _meta("dataset") in artifact.metadata else {}
        return Summary(figures={"rows_done": f"{meta.get('rows_done')} of {meta.get('rows')} (incomplete, resumable)",
                                "dataset": dataset.get("reference") if isinstance(dataset, dict) else None})
    with _structure(artifact) as table:
        labels, counts = np.unique(table.labels(), return_counts=True)
    extractor, dataset = table.extractor, table.dataset
    figures = {
        "rows": table.rows,
        "dim": table.dim,
        "extractor": f"{extractor.get('architecture')} (weights {str(extractor.get('weights_sha256'))[:12]})",
        "extractor_sha256": table.extractor_sha256,
        "dataset": dataset["reference"],
        "dataset_fingerprint": dataset["fingerprint"],
    }
    names = dataset.get("class_names") or []
    rows = [[int(label), names[label] if label < len(names) else "", int(n)] for label, n in zip(labels, counts)]
    return Summary(figures=figures, tables=[Table("labels", ["label", "class", "rows"], rows)])


SPEC = register(KindSpec(
    name=KIND, format="hdf5", version=VERSION, validate=_validate, summarize=_summarize,
    description="a public pool's features under one extractor, with sample ids and labels",
))
