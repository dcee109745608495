"""The Parquet tier: verified archive files, the manifest, reading back, anonymized exports.

Layout under the archive directory (Hive partitioning, readable by pandas, DuckDB, Spark):
``metric=<name>/date=YYYY-MM-DD/part-<content hash>.parquet``, zstd, with the columns
series_key (string), labels (map<string, string>), ts (timestamp[us, UTC]) and value (double).
The file name is a hash of the rows, so rewriting the same rows after a crash lands on the
same file instead of a second copy. The manifest of committed files is storage/archive_manifest.py
(its functions are importable from here too).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from metricmill.errors import ExportPathError, MetricmillError
from metricmill.selectors import Selector, parse_selector
from metricmill.settings import Settings
from metricmill.types import datetime_to_us
from storage.archive_manifest import ArchivedFile, manifest_paths
from storage.archive_manifest import manifest as manifest
from storage.archive_manifest import record_manifest as record_manifest
from storage.archive_manifest import remove_orphans as remove_orphans
from storage.archive_manifest import verify_archive as verify_archive
from storage.archive_root import ArchiveError, ArchiveRoot, archive_root, as_root
from storage.backend import Backend
from storage.export import confined_path
from storage.frames import canonical_labels, series_key

DAY_US = 86_400_000_000
TS_TYPE = pa.timestamp("us", tz="UTC")
LABELS_TYPE = pa.map_(pa.string(), pa.string())
ARCHIVE_SCHEMA = pa.schema(
    [("series_key", pa.string()), ("labels", LABELS_TYPE), ("ts", TS_TYPE), ("value", pa.float64())]
)
Checkpoint = Callable[[str, dict[str, Any]], None]


__all__ = ["ArchiveError", "ArchiveRoot", "archive_root"]


@dataclass(frozen=True)
class Anonymizer:
    """Keyed HMAC-SHA256 tokens for chosen label values; other chosen labels dropped."""

    key: bytes
    hash_labels: frozenset[str]
    drop_labels: frozenset[str] = frozenset()
    coarsen_us: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, key: bytes | None) -> Anonymizer:
        if not key:
            raise ArchiveError(
                "anonymization needs a key: set METRICMILL_ANONYMIZE_KEY or name a Prefect "
                "Secret block in METRICMILL_ANONYMIZE_KEY_BLOCK"
            )
        return cls(
            key=key,
            hash_labels=frozenset(settings.anonymize_labels),
            drop_labels=frozenset(settings.anonymize_drop_labels),
            coarsen_us=settings.anonymize_coarsen_seconds * 1_000_000,
        )

    def token(self, text: str) -> str:
        return hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        return {
            k: (self.token(v) if k in self.hash_labels else v)
            for k, v in labels.items()
            if k not in self.drop_labels
        }


def partition_dir(metric: str, day_us: int) -> str:
    day = pd.Timestamp(day_us, unit="us", tz="UTC")
    return f"metric={quote(metric, safe='')}/date={day:%Y-%m-%d}"


@dataclass(frozen=True)
class ArchiveRows:
    """Rows ready to archive: the Arrow table and what its manifest row will say."""

    table: pa.Table
    content_hash: str  # of the rows, not of the file bytes (those depend on the writer)
    series: int
    min_ts: int
    max_ts: int


def build_table(
    keys: Sequence[str],
    labels: Sequence[Mapping[str, str]],
    codes: np.ndarray,
    ts_us: np.ndarray,
    values: np.ndarray,
    anonymizer: Anonymizer | None = None,
) -> ArchiveRows:
    """Rows as an Arrow table; `codes` index the per-series `keys` and `labels` (each used)."""
    if anonymizer is not None:
        keys = [anonymizer.token(k) for k in keys]
        labels = [anonymizer.labels(x) for x in labels]
        if anonymizer.coarsen_us:
            ts_us = ts_us - ts_us % anonymizer.coarsen_us
    codes = np.asarray(codes, dtype=np.int32)
    ts_us = np.asarray(ts_us, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    # The series key is written dictionary-encoded (each key once per row group); readers that
    # ask for the schema's plain strings get them.
    key_array = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(keys), pa.string()))
    table = pa.table(
        {
            "series_key": key_array,
            "labels": pa.array([list(x.items()) for x in labels], LABELS_TYPE).take(codes),
            "ts": pa.array(ts_us).cast(TS_TYPE),
            "value": pa.array(values),
        }
    )
    digest = hashlib.sha256("\x00".join(keys).encode())
    for part in (codes, ts_us, values):
        digest.update(part.tobytes())
    return ArchiveRows(
        table=table,
        content_hash=digest.hexdigest(),
        series=len(keys),
        min_ts=int(ts_us.min()) if len(ts_us) else 0,
        max_ts=int(ts_us.max()) if len(ts_us) else 0,
    )


def probe_writable(root: ArchiveRoot | Path, *, lock: bool = False) -> None:
    """Fail with the reason unless a file can be created in the archive (and, with `lock`,
    locked there): before a run deletes anything."""
    as_root(root).probe(lock=lock)


def _write_atomic(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def retain_until(day_us: int, lock_days: int, now: datetime | None = None) -> datetime | None:
    """When a compliance lock on a day's archive file ends: `lock_days` after the day's end
    (the data's own age, as retention counts it); None when no lock, or when it would
    already have ended."""
    if lock_days <= 0:
        return None
    until = datetime.fromtimestamp((day_us + DAY_US) / 1e6, UTC) + timedelta(days=lock_days)
    return until if until > (now or datetime.now(UTC)) else None


def write_verified(
    root: ArchiveRoot | Path,
    metric: str,
    day_us: int,
    rows: ArchiveRows,
    *,
    anonymized: bool = False,
    checkpoint: Checkpoint | None = None,
    lock_days: int = 0,
) -> ArchivedFile:
    """Write the rows to their content-named file, read it back and check sha256 and rows.

    `lock_days`: write it under a compliance lock (object stores), see retain_until."""
    store = as_root(root)
    relative = f"{partition_dir(metric, day_us)}/part-{rows.content_hash[:32]}.parquet"
    target = store.show(relative)
    sink = pa.BufferOutputStream()
    pq.write_table(rows.table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    sha = hashlib.sha256(data).hexdigest()
    present = store.read(relative)
    if present is None or hashlib.sha256(present).hexdigest() != sha:
        store.write(relative, data, retain_until(day_us, lock_days))
    if checkpoint is not None:
        checkpoint("written", {"path": target, "relative": relative})
    # Byte-identical to what the writer produced (sha256), with a footer that parses and
    # counts the right rows: the file holds exactly these rows.
    stored = store.read(relative)
    if stored is None:
        raise ArchiveError(f"{target} does not read back: it is missing after the write")
    if hashlib.sha256(stored).hexdigest() != sha:
        raise ArchiveError(f"{target} does not read back as written (sha256 differs)")
    try:
        stored_rows = pq.ParquetFile(pa.BufferReader(stored)).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise ArchiveError(f"{target} does not read back: {exc}") from None
    if stored_rows != rows.table.num_rows:
        raise ArchiveError(f"{target} holds {stored_rows} rows, {rows.table.num_rows} were written")
    return ArchivedFile(
        path=relative,
        metric=metric,
        rows=rows.table.num_rows,
        series=rows.series,
        min_ts=rows.min_ts,
        max_ts=rows.max_ts,
        sha256=sha,
        anonymized=anonymized,
    )


# -- reading back ----------------------------------------------------------------------------
def read_archive(
    settings: Settings,
    metric: str,
    selector: str | Mapping[str, str] | Selector | None = None,
    start_us: int | None = None,
    end_us: int | None = None,
    *,
    paths: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Archived samples of `metric` in [start, end): columns metric, labels, series_key, ts, value.

    `paths` (relative to the archive directory, e.g. from the manifest) limits the files read;
    without it every file of the metric's partition is read.
    """
    root = archive_root(settings)
    relatives = list(paths) if paths is not None else root.parts(f"metric={quote(metric, safe='')}")
    files, filesystem = root.dataset_source(relatives)
    columns = ["metric", "labels", "series_key", "ts", "value"]
    if not files:
        return pd.DataFrame(columns=columns)
    condition = None
    if start_us is not None:
        condition = ds.field("ts") >= pa.scalar(start_us, type=pa.int64()).cast(TS_TYPE)
    if end_us is not None:
        upper = ds.field("ts") < pa.scalar(end_us, type=pa.int64()).cast(TS_TYPE)
        condition = upper if condition is None else condition & upper
    try:
        table = ds.dataset(
            files, schema=ARCHIVE_SCHEMA, format="parquet", filesystem=filesystem
        ).to_table(filter=condition)
    except (pa.ArrowException, OSError) as exc:
        raise ArchiveError(f"cannot read the archive {root.show()}: {exc}") from None
    keys = table.column("series_key").combine_chunks().dictionary_encode()
    codes = np.asarray(keys.indices, dtype=np.int64)
    _, first = np.unique(codes, return_index=True)
    label_maps = table.column("labels").take(pa.array(first)).to_pylist()
    parsed = parse_selector(selector)
    keep = np.array([parsed.matches(dict(m)) for m in label_maps], dtype=bool)
    rows = keep[codes] if len(codes) else np.zeros(0, dtype=bool)
    ts_us = table.column("ts").combine_chunks().cast(pa.int64()).to_numpy()[rows]
    series_labels = [dict(m) for m in label_maps]
    frame = pd.DataFrame(
        {
            "metric": metric,
            "labels": [series_labels[c] for c in codes[rows]],
            "series_key": np.asarray(keys.dictionary.to_pylist(), dtype=object)[codes[rows]]
            if rows.any()
            else [],
            "ts": pd.to_datetime(ts_us, unit="us", utc=True),
            "value": table.column("value").combine_chunks().to_numpy()[rows],
        }
    )
    return frame.sort_values(["series_key", "ts"], kind="stable").reset_index(drop=True)[columns]


def with_archive(
    backend: Backend,
    settings: Settings,
    points: pd.DataFrame,
    metric: str,
    matched: Mapping[int, Mapping[str, str]],
    window: tuple[int, int],
    step_us: int | None,
) -> pd.DataFrame:
    """A query's points plus the archived rows of the matched series that the database lacks."""
    start_us, end_us = window
    paths = manifest_paths(backend, metric, start_us, end_us)
    if not paths:
        return points
    frame = read_archive(settings, metric, None, start_us, end_us, paths=paths)
    keys = {series_key(metric, str(canonical_labels(dict(v))[0])): k for k, v in matched.items()}
    ids = frame["series_key"].map(keys)
    found = ids.notna().to_numpy()
    archived = pd.DataFrame(
        {
            "series_id": ids[found].astype("int64").to_numpy(),
            "ts_us": frame["ts"][found].to_numpy(dtype="datetime64[us]").astype("int64"),
            "value": frame["value"][found].to_numpy(dtype="float64"),
        }
    )
    return merge_archived(points, archived, step_us)


def merge_archived(
    points: pd.DataFrame, archived: pd.DataFrame, step_us: int | None
) -> pd.DataFrame:
    """Add archived rows to a query's points where the database holds nothing for them.

    Raw points: per (series, ts). Step buckets: per (series, bucket), aggregated from the
    archived raw rows (archive cut-offs fall on UTC midnights, so a bucket dividing a day lies
    wholly in the archive or wholly in the database).
    """
    if archived.empty:
        return points
    extra = archived if step_us is None else _bucket_stats(archived, step_us)
    known = pd.MultiIndex.from_frame(points[["series_id", "ts_us"]].astype("int64"))
    fresh = ~pd.MultiIndex.from_frame(extra[["series_id", "ts_us"]]).isin(known)
    merged = pd.concat([points, extra[fresh]], ignore_index=True)
    return merged.sort_values(["series_id", "ts_us"], kind="stable").reset_index(drop=True)


def _bucket_stats(raw: pd.DataFrame, step_us: int) -> pd.DataFrame:
    frame = raw.assign(
        bucket=(raw["ts_us"] // step_us) * step_us, sq=raw["value"] * raw["value"]
    ).sort_values(["series_id", "ts_us"])
    grouped = frame.groupby(["series_id", "bucket"], sort=True)
    stats = grouped.agg(
        count=("value", "size"),
        sum=("value", "sum"),
        sum_sq=("sq", "sum"),
        min=("value", "min"),
        max=("value", "max"),
        first=("value", "first"),
        first_ts=("ts_us", "min"),
        last=("value", "last"),
        last_ts=("ts_us", "max"),
    ).reset_index()
    return stats.rename(columns={"bucket": "ts_us"})


# -- ad-hoc export ---------------------------------------------------------------------------
def export_to_parquet(
    backend: Backend,
    settings: Settings,
    output: str | Path | None,
    start: Any,
    end: Any,
    *,
    metric: str | None = None,
    anonymizer: Anonymizer | None = None,
) -> tuple[Path, int]:
    """Raw samples in [start, end) (optionally of one metric) as one Parquet file under the
    export directory, labels anonymized when an anonymizer is given. Returns (path, rows)."""
    start_us, end_us = datetime_to_us(start), datetime_to_us(end)
    if start_us >= end_us:
        raise MetricmillError("export start must be before its end")
    name = output or (
        f"export-{pd.Timestamp(start_us, unit='us'):%Y%m%dT%H%M}-"
        f"{pd.Timestamp(end_us, unit='us'):%Y%m%dT%H%M}{'-anon' if anonymizer else ''}.parquet"
    )
    target = confined_path(settings.exports, name)
    if target.suffix.lower() != ".parquet":
        raise ExportPathError(f"export path {str(name)!r} must end in .parquet")
    where = ["s.ts >= " + backend.ts_in, "s.ts < " + backend.ts_in]
    params: list[Any] = [start_us, end_us]
    if metric:
        where.append("r.metric = %s")
        params.append(metric)
    rows = backend.execute(
        f"SELECT r.metric, r.series_key, r.labels, {backend.ts_out.format(col='s.ts')}, "  # noqa: S608
        f"s.value FROM samples s JOIN series r ON r.series_id = s.series_id "
        f"WHERE {' AND '.join(where)} ORDER BY r.metric, s.series_id, s.ts",
        params,
    )
    frame = pd.DataFrame(rows, columns=["metric", "series_key", "labels", "ts_us", "value"])
    codes, uniques = pd.factorize(frame["series_key"])
    first = pd.Series(np.arange(len(frame))).groupby(codes).first().to_numpy()
    labels = [backend.parse_labels(frame["labels"].iat[i]) for i in first]
    table = build_table(
        list(uniques),
        labels,
        codes,
        frame["ts_us"].to_numpy(dtype="int64"),
        frame["value"].to_numpy(dtype="float64"),
        anonymizer,
    ).table
    table = table.add_column(0, "metric", pa.array(frame["metric"], type=pa.string()))
    table = table.rename_columns(["metric", "series", "labels", "ts", "value"])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(target, sink.getvalue().to_pybytes())
    return target, table.num_rows
