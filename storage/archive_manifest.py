"""The archive's manifest: one row per committed Parquet file (path, metric, rows, series,
time span, sha256, anonymized), written in the same transaction that deletes the file's rows,
so a file the manifest does not record is left over from a run that died and may go."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.archive_root import ArchiveRoot, as_root
from storage.backend import Backend


@dataclass(frozen=True)
class ArchivedFile:
    """One verified file: what its manifest row says."""

    path: str  # relative to the archive directory, '/'-separated
    metric: str
    rows: int
    series: int
    min_ts: int
    max_ts: int
    sha256: str
    anonymized: bool


def record_manifest(backend: Backend, item: ArchivedFile) -> None:
    """The file's manifest row (inside the caller's delete transaction)."""
    backend.execute(
        "INSERT INTO archive_manifest (path, metric, rows, series, min_ts, max_ts, sha256, "  # noqa: S608
        f"anonymized) VALUES (%s, %s, %s, %s, {backend.ts_in}, {backend.ts_in}, %s, %s) "
        "ON CONFLICT (path) DO NOTHING",
        (
            item.path,
            item.metric,
            item.rows,
            item.series,
            item.min_ts,
            item.max_ts,
            item.sha256,
            backend.sql_bool(item.anonymized),
        ),
    )


def manifest(backend: Backend, metric: str | None = None) -> pd.DataFrame:
    """Manifest rows (path, metric, rows, series, min_ts µs, max_ts µs, sha256, anonymized)."""
    where, params = ("WHERE metric = %s", (metric,)) if metric else ("", ())
    rows = backend.execute(
        f"SELECT path, metric, rows, series, {backend.ts_out.format(col='min_ts')}, "  # noqa: S608
        f"{backend.ts_out.format(col='max_ts')}, sha256, anonymized FROM archive_manifest "
        f"{where} ORDER BY metric, min_ts, path",
        params,
    )
    return pd.DataFrame(
        rows,
        columns=["path", "metric", "rows", "series", "min_ts", "max_ts", "sha256", "anonymized"],
    )


def manifest_paths(backend: Backend, metric: str, start_us: int, end_us: int) -> list[str]:
    """Recorded (committed) files of `metric` that may hold rows in [start, end)."""
    rows = backend.execute(
        "SELECT path FROM archive_manifest WHERE metric = %s AND anonymized = %s "  # noqa: S608
        f"AND min_ts < {backend.ts_in} AND max_ts >= {backend.ts_in} ORDER BY path",
        (metric, backend.sql_bool(False), end_us, start_us),
    )
    return [r[0] for r in rows]


def remove_orphans(
    backend: Backend, root: ArchiveRoot | Path, directory: str, keep: str
) -> list[str]:
    """Delete files of a partition that no manifest row records (a run died before its
    delete committed, so their rows are still in the database); returns what was removed.
    (Under an object lock a delete only hides the object: the locked version stays.)"""
    store = as_root(root)
    names = store.listdir(directory)
    if not names:
        return []
    recorded = {
        r[0]
        for r in backend.execute(
            "SELECT path FROM archive_manifest WHERE path LIKE %s", (f"{directory}/%",)
        )
    }
    removed = []
    for name in names:
        relative = f"{directory}/{name}"
        stale_tmp = name.startswith(".part-")
        if stale_tmp or (name.startswith("part-") and relative not in recorded | {keep}):
            store.delete(relative)
            removed.append(relative)
    return removed


def verify_archive(backend: Backend, root: ArchiveRoot | Path) -> list[tuple[str, str]]:
    """(path, problem) for every manifest file missing or not matching its checksum/rows,
    and for files in the archive that no manifest row records."""
    store = as_root(root)
    problems: list[tuple[str, str]] = []
    listed = manifest(backend)
    for path, rows, sha in zip(listed["path"], listed["rows"], listed["sha256"], strict=True):
        data = store.read(path)
        if data is None:
            problems.append((path, "missing"))
        elif hashlib.sha256(data).hexdigest() != sha:
            problems.append((path, "sha256 differs from the manifest"))
        else:
            try:
                stored_rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            except (pa.ArrowException, OSError):
                stored_rows = -1
            if stored_rows != int(rows):
                problems.append((path, "row count differs from the manifest"))
    known = set(listed["path"])
    for relative in store.parts():
        if relative not in known:
            problems.append((relative, "not in the manifest (left by an interrupted run)"))
    return problems
