"""Bulk reads and writes for baselines and detection: one statement per window, never per series.

History comes from a rollup level (avg = sum / count, plus the spread inside each bucket from
sum_sq); recent points come from raw samples newer than each series' detect watermark.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from metricmill.errors import MetricmillError
from storage.dialect import ColumnKind
from storage.schema import CALIBRATION_COLUMNS, ROLLUP_TABLES

if TYPE_CHECKING:
    from storage.store import Store

BASELINE_COLUMNS = [
    "series_id",
    "slot",
    "season",
    "n",
    "mean",
    "std",
    "median",
    "mad",
    "p05",
    "p50",
    "p95",
    "p99",
    "trend_slope",
    "window_start",
    "window_end",
    "scale",
    "level",
    *CALIBRATION_COLUMNS,
]
_BASELINE_KINDS: dict[str, ColumnKind] = {  # any other column is a float
    "series_id": "bigint",
    "slot": "integer",
    "season": "text",
    "n": "bigint",
    "window_start": "ts",
    "window_end": "ts",
}
_BASELINE_TS = {c for c, kind in _BASELINE_KINDS.items() if kind == "ts"}
_BASELINE_READ_KINDS: dict[str, str] = {
    c: {"bigint": "int", "integer": "int", "text": "int", "ts": "ts"}.get(
        _BASELINE_KINDS.get(c, "float"), "float"
    )
    for c in BASELINE_COLUMNS
}
# The values of baselines.season, in the order tasks.seasonality numbers them.
BASELINE_SEASONS = ("none", "day", "week", "weekpart")
BASELINE_READ_SERIES = 20_000  # series per read of their baselines


def _ids_clause(store: Store, column: str, ids: Sequence[int] | None) -> tuple[str, list[Any]]:
    if ids is None:
        return "", []
    return f" AND {column} {store.backend.ids_in}", [store.backend.id_list([int(i) for i in ids])]


def series_metrics(store: Store, series_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """series_id and metric name of every series (or of the given ones)."""
    clause, params = _ids_clause(store, "series_id", series_ids)
    rows = store.backend.execute(
        f"SELECT series_id, metric FROM series WHERE 1 = 1{clause} ORDER BY series_id",  # noqa: S608
        params,
    )
    return pd.DataFrame(rows, columns=["series_id", "metric"]).astype({"series_id": "int64"})


def history(
    store: Store,
    *,
    start_us: int,
    end_us: int,
    level: str = "5m",
    series_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Buckets of a rollup level in [start, end): series_id, ts_us, count, sum, sum_sq, min, max
    (the extremes calibrate the tails of raw points, not only of bucket averages)."""
    table = ROLLUP_TABLES[level]  # a constant name, never user text
    b = store.backend
    clause, params = _ids_clause(store, "series_id", series_ids)
    arrays = b.read_columns(
        f"SELECT {{columns}} FROM {table} "  # noqa: S608
        f"WHERE bucket >= {b.ts_in} AND bucket < {b.ts_in}{clause}",
        [
            ("series_id", "series_id", "int"),
            ("ts_us", "bucket", "ts"),
            ("count", "count", "float"),
            ("sum", "sum", "float"),
            ("sum_sq", "sum_sq", "float"),
            ("min", "min", "float"),
            ("max", "max", "float"),
        ],
        [start_us, end_us, *params],
        by_key=series_ids is not None,
    )
    return pd.DataFrame(arrays)


def series_with_history(
    store: Store, *, start_us: int, end_us: int, level: str = "5m"
) -> list[int]:
    """Ids of the series with any bucket of `level` in [start, end)."""
    table = ROLLUP_TABLES[level]
    b = store.backend
    rows = b.execute(
        f"SELECT DISTINCT series_id FROM {table} "  # noqa: S608
        f"WHERE bucket >= {b.ts_in} AND bucket < {b.ts_in} ORDER BY series_id",
        [start_us, end_us],
    )
    return [int(r[0]) for r in rows]


def exclude_windows(frame: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """Rows of `frame` (sorted by series_id, ts_us) outside every (series_id, start_us, end_us)."""
    if frame.empty or windows.empty:
        return frame
    sid = frame["series_id"].to_numpy(np.int64)
    ts = frame["ts_us"].to_numpy(np.int64)
    # Lexicographic (series, ts) positions of each window's bounds; a loop per window is fine
    # (incidents are few), the marking itself is one cumulative sum.
    mark = np.zeros(len(frame) + 1, dtype=np.int64)
    for w_sid, start, end in windows[["series_id", "start_us", "end_us"]].itertuples(index=False):
        lo_s, hi_s = np.searchsorted(sid, [w_sid, w_sid + 1])
        lo = lo_s + np.searchsorted(ts[lo_s:hi_s], start, "left")
        hi = lo_s + np.searchsorted(ts[lo_s:hi_s], end, "left")
        mark[lo] += 1
        mark[hi] -= 1
    inside = np.cumsum(mark[:-1]) > 0
    return frame.loc[~inside].reset_index(drop=True)


# -- baselines ---------------------------------------------------------------------------------
def write_baselines(store: Store, frame: pd.DataFrame) -> int:
    """Replace the baselines of the series in `frame` in one transaction; returns rows written."""
    if frame.empty:
        return 0
    frame = frame[BASELINE_COLUMNS]
    ids = sorted({int(i) for i in frame["series_id"].unique()})
    b = store.backend
    values = {c: _plain(frame[c]) for c in BASELINE_COLUMNS}
    with b.transaction():
        b.execute(f"DELETE FROM baselines WHERE series_id {b.ids_in}", [b.id_list(ids)])  # noqa: S608
        b.insert_columns(
            "baselines",
            [(c, _BASELINE_KINDS.get(c, "float")) for c in BASELINE_COLUMNS],
            [values[c] for c in BASELINE_COLUMNS],
        )
    return len(frame)


def _plain(column: pd.Series) -> Any:
    """A column for insert_columns: numbers as a numpy array (int64, or float64 whose NaN is
    NULL), anything else as strings."""
    if not pd.api.types.is_numeric_dtype(column.dtype):
        return [str(v) for v in column.tolist()]
    if pd.api.types.is_integer_dtype(column.dtype):
        return column.to_numpy(dtype=np.int64)
    return column.to_numpy(dtype=np.float64)


def read_baselines(store: Store, series_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Stored baselines (all columns of BASELINE_COLUMNS, times in µs), by series and slot.

    Read as columns (`Backend.read_columns`: on PostgreSQL straight into numpy), in chunks of
    BASELINE_READ_SERIES series: a row per (series, slot) is 2.4 million rows at 100,000
    series, which as Python tuples took most of a detect run there (and more than ten times
    what 10,000 series took)."""
    return _chunked(store, series_ids, BASELINE_COLUMNS)


# What scoring reads of a baseline (tasks.baseline_table.BaselineTable): per slot its median
# and scale; per series the rest, which every slot row of a series repeats.
SCORING_SLOT_COLUMNS = ["series_id", "slot", "median", "scale"]
SCORING_SERIES_COLUMNS = [
    "series_id",
    "season",
    "trend_slope",
    "window_start",
    "window_end",
    "level",
    *CALIBRATION_COLUMNS,
]


def read_scoring_baselines(
    store: Store, series_ids: Sequence[int] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slots, series): what scoring needs of the stored baselines, a row per (series, slot)
    of SCORING_SLOT_COLUMNS and a row per series of SCORING_SERIES_COLUMNS, from its lowest
    slot's row. About a seventh of read_baselines' values: at 100,000 series its 30 columns of
    2.4 million rows were half of a detect run.

    The series rows are read by primary key, (series, its lowest slot) found in the slot
    rows, one statement per distinct lowest slot (nearly always only slot 0): a join to a
    grouped subquery of the same table was planned as a nested loop on a table not analysed
    yet (62 s at 100,000 series, where reading all columns took 13 s)."""
    slots = _chunked(store, series_ids, SCORING_SLOT_COLUMNS)
    sid = slots["series_id"].to_numpy(np.int64)
    first = np.r_[True, sid[1:] != sid[:-1]] if len(sid) else np.zeros(0, dtype=bool)
    lowest_sid, lowest = sid[first], slots["slot"].to_numpy(np.int64)[first]
    parts = [
        _chunked(store, lowest_sid[lowest == slot].tolist(), SCORING_SERIES_COLUMNS, slot=slot)
        for slot in np.unique(lowest).tolist()
    ]
    if not parts:
        return slots, _chunked(store, [], SCORING_SERIES_COLUMNS)
    series = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    if len(parts) > 1:
        series = series.sort_values("series_id", kind="stable", ignore_index=True)
    return slots, series


def _chunked(
    store: Store, series_ids: Sequence[int] | None, names: Sequence[str], slot: int | None = None
) -> pd.DataFrame:
    if series_ids is None:
        return _read_baselines(store, None, names, slot)
    ids = [int(i) for i in series_ids]
    chunks = [
        _read_baselines(store, ids[at : at + BASELINE_READ_SERIES], names, slot)
        for at in range(0, len(ids), BASELINE_READ_SERIES)
    ]
    if not chunks:
        return _read_baselines(store, [], names, slot)
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


def _read_baselines(
    store: Store, series_ids: Sequence[int] | None, names: Sequence[str], slot: int | None
) -> pd.DataFrame:
    """The `names` columns of the series' baseline rows (of one `slot`, when given)."""
    b = store.backend
    clause, params = _ids_clause(store, "series_id", series_ids)
    if slot is not None:
        clause, params = f"{clause} AND slot = %s", [*params, slot]
    # The season travels as its number in BASELINE_SEASONS (-1: a name this version does not
    # know, read as "none"), so every column is a number. It goes last: a backend may order
    # by the second column, and its expression holds parameters.
    season = (
        "CASE season "
        + " ".join(f"WHEN %s THEN {code}" for code in range(len(BASELINE_SEASONS)))
        + " ELSE -1 END"
    )
    columns = [
        (c, season if c == "season" else c, _BASELINE_READ_KINDS[c])
        for c in sorted(names, key=lambda c: c == "season")
    ]
    seasons = BASELINE_SEASONS if "season" in names else ()
    arrays = b.read_columns(
        f"SELECT {{columns}} FROM baselines WHERE 1 = 1{clause}",  # noqa: S608
        columns,
        [*seasons, *params],
        by_key=series_ids is not None,
    )
    if "season" in arrays:
        names_of = np.asarray((*BASELINE_SEASONS, BASELINE_SEASONS[0]), dtype=object)
        arrays["season"] = names_of[arrays["season"]]  # -1 picks the last: "none"
    return pd.DataFrame(arrays, columns=list(names))


# -- detector models ---------------------------------------------------------------------------
def write_models(store: Store, models: Sequence[dict[str, Any]]) -> None:
    """Upsert fitted models: dicts with scope, detector, model (bytes), params, n_samples,
    fitted_from, fitted_to (µs). One transaction."""
    if not models:
        return
    b = store.backend
    now = f"{b.ts_in}"
    rows = [
        (
            m["scope"],
            m["detector"],
            m["model"],
            json.dumps(m.get("params", {}), sort_keys=True, default=str),
            int(m["n_samples"]),
            int(m["fitted_from"]),
            int(m["fitted_to"]),
            int(m["fitted_at"]),
        )
        for m in models
    ]
    with b.transaction():
        b.executemany(
            "INSERT INTO detector_models (scope, detector, model, params, n_samples, "  # noqa: S608
            f"fitted_from, fitted_to, fitted_at) VALUES (%s, %s, %s, %s, %s, {b.ts_in}, "
            f"{b.ts_in}, {now}) ON CONFLICT (scope, detector) DO UPDATE SET "
            "model = excluded.model, params = excluded.params, n_samples = excluded.n_samples, "
            "fitted_from = excluded.fitted_from, fitted_to = excluded.fitted_to, "
            "fitted_at = excluded.fitted_at",
            rows,
        )


def read_models(store: Store, scopes: Sequence[str] | None = None) -> pd.DataFrame:
    """Stored models: scope, detector, model (bytes), params (dict), n_samples, fitted_* µs."""
    b = store.backend
    where, params = "", []
    if scopes is not None:
        if not scopes:
            return pd.DataFrame(columns=_MODEL_COLUMNS)
        where = " WHERE scope IN (" + ", ".join(["%s"] * len(scopes)) + ")"
        params = list(scopes)
    rows = b.execute(
        "SELECT scope, detector, model, params, n_samples, "  # noqa: S608
        f"{b.ts_out.format(col='fitted_from')}, {b.ts_out.format(col='fitted_to')}, "
        f"{b.ts_out.format(col='fitted_at')} FROM detector_models{where} ORDER BY scope",
        params,
    )
    records = [
        (
            r[0],
            r[1],
            bytes(r[2]),
            r[3] if isinstance(r[3], dict) else json.loads(r[3] or "{}"),
            *r[4:],
        )
        for r in rows
    ]
    return pd.DataFrame(records, columns=_MODEL_COLUMNS)


_MODEL_COLUMNS = [
    "scope",
    "detector",
    "model",
    "params",
    "n_samples",
    "fitted_from",
    "fitted_to",
    "fitted_at",
]


# -- watermarks and recent points -------------------------------------------------------------
def read_watermarks(store: Store) -> pd.DataFrame:
    """series_id, ts_us: the newest sample time each series has been scored up to."""
    b = store.backend
    rows = b.execute(
        f"SELECT series_id, {b.ts_out.format(col='ts')} FROM detect_watermarks "  # noqa: S608
        "ORDER BY series_id"
    )
    return pd.DataFrame(rows, columns=["series_id", "ts_us"]).astype("int64")


def series_to_score(store: Store, *, floor_us: int) -> list[int]:
    """Series whose last sample is newer than their watermark (or than `floor_us` without one),
    and series with samples written behind it since the last run (detect_late)."""
    b = store.backend
    last = b.ts_out.format(col="s.last_seen")
    mark = b.ts_out.format(col="w.ts")
    rows = b.execute(
        f"SELECT s.series_id FROM series s LEFT JOIN detect_watermarks w "  # noqa: S608
        f"ON w.series_id = s.series_id WHERE s.last_seen IS NOT NULL "
        f"AND {last} > coalesce({mark}, %s) AND {last} >= %s "
        "UNION SELECT DISTINCT series_id FROM detect_late ORDER BY 1",
        [floor_us, floor_us],
    )
    return [int(r[0]) for r in rows]


def read_late(store: Store, series_ids: Sequence[int]) -> pd.DataFrame:
    """id, series_id, from_us of the late-sample marks of these series (detect_late rows)."""
    columns = ["id", "series_id", "from_us"]
    if not series_ids:
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in columns})
    b = store.backend
    rows = b.execute(
        f"SELECT id, series_id, {b.ts_out.format(col='from_ts')} FROM detect_late "  # noqa: S608
        f"WHERE series_id {b.ids_in} ORDER BY id",
        [b.id_list([int(i) for i in series_ids])],
    )
    return pd.DataFrame(rows, columns=columns).astype("int64")


def clear_late(store: Store, mark_ids: Sequence[int]) -> int:
    """Delete the late-sample marks a run has read (by id: marks written since stay)."""
    if not mark_ids:
        return 0
    b = store.backend
    with b.transaction():
        b.execute(
            f"DELETE FROM detect_late WHERE id {b.ids_in}",  # noqa: S608
            [b.id_list([int(i) for i in mark_ids])],
        )
    return len(mark_ids)


def recent_points(
    store: Store,
    *,
    series_ids: Sequence[int],
    floor_us: int,
    context_us: int,
    late: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Raw samples to score: series_id, ts_us, value, fresh (newer than the watermark).

    Rows within `context_us` before a series' start are included with fresh=False: the
    scoring features look back at them. A series' start is its watermark, or `floor_us` when it
    has none or an older one (a series is never scored further back than the floor); with
    `late` marks (read_late), the earliest late sample when that is earlier, so samples
    written behind the watermark are scored again with their neighbours.
    """
    if not series_ids:
        return pd.DataFrame(
            {
                "series_id": pd.Series(dtype="int64"),
                "ts_us": pd.Series(dtype="int64"),
                "value": pd.Series(dtype="float64"),
                "fresh": pd.Series(dtype=bool),
            }
        )
    b = store.backend
    # Read as columns (on PostgreSQL straight into numpy, not a tuple per sample); a series
    # without a watermark reads the floor's, so no value is NULL.
    arrays = b.read_columns(
        "SELECT {columns} FROM samples s LEFT JOIN detect_watermarks w "  # noqa: S608 - constant fragments only
        f"ON w.series_id = s.series_id WHERE s.series_id {b.ids_in} AND s.ts >= {b.ts_in}",
        [
            ("series_id", "s.series_id", "int"),
            ("ts_us", "s.ts", "ts"),
            ("value", "s.value", "float"),
            ("mark", f"COALESCE({b.ts_out.format(col='w.ts')}, %s)", "int"),
        ],
        [floor_us - 1, b.id_list([int(i) for i in series_ids]), floor_us - context_us],
        by_key=True,
    )
    sid = arrays["series_id"]
    mark = arrays["mark"].astype(np.float64)
    if late is not None and len(late):
        earliest = late.groupby("series_id")["from_us"].min()
        behind = pd.Series(sid).map(earliest).astype("float64").to_numpy() - 1
        mark = np.fmin(mark, behind)  # NaN (no late mark) leaves the watermark
    start = np.maximum(mark, float(floor_us - 1))
    ts = arrays["ts_us"]
    keep = ts >= start - context_us
    out = pd.DataFrame(
        {
            "series_id": sid[keep],
            "ts_us": ts[keep],
            "value": arrays["value"][keep],
            "fresh": (ts > start)[keep],
        }
    )
    return out


def advance_watermarks(store: Store, marks: pd.DataFrame) -> int:
    """Move watermarks forward to `marks` (series_id, ts_us); never backwards. One transaction."""
    if marks.empty:
        return 0
    b = store.backend
    ids = [int(i) for i in marks["series_id"]]
    stamps = [int(t) for t in marks["ts_us"]]
    with b.transaction():
        b.insert_columns(
            "detect_watermarks",
            [("series_id", "bigint"), ("ts", "ts")],
            [ids, stamps],
            on_conflict="ON CONFLICT (series_id) DO UPDATE SET "  # a watermark never goes back
            f"ts = {b.greatest}(detect_watermarks.ts, excluded.ts), updated_at = {b.now}",
        )
    return len(ids)


# -- backtest files ------------------------------------------------------------------------------
class BacktestInputError(MetricmillError):
    """A backtest CSV that cannot be replayed."""


def read_backtest_csv(path: Path) -> pd.DataFrame:
    """`timestamp,value[,label]` rows of one series as ts_us, value[, label], sorted by time.

    Files are taken as they come: rows may be unsorted (sorted here, stably), a timestamp may
    appear more than once (every row is kept, in file order), and an empty value is a gap (the
    row is dropped). `frame.attrs` counts them: rows, duplicates, gaps, unsorted. Timestamps are
    ISO 8601 (naive ones are UTC) or Unix epoch seconds; anything else unreadable is an error
    naming its line.
    """
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise BacktestInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BacktestInputError(f"{path}: is a directory, not a CSV file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BacktestInputError(
            f"{path}: not a readable CSV ({str(exc).splitlines()[0]})"
        ) from None
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    missing = [c for c in ("timestamp", "value") if c not in raw.columns]
    if missing:
        raise BacktestInputError(
            f"{path}: missing column(s) {', '.join(missing)}; expected timestamp,value[,label]"
        )
    if raw.empty:
        raise BacktestInputError(f"{path}: no rows")
    stamps = raw["timestamp"].str.strip()
    numeric = pd.to_numeric(stamps, errors="coerce")
    if numeric.notna().all():
        ts_us = (numeric.to_numpy(np.float64) * 1_000_000).round().astype(np.int64)
        bad = np.zeros(len(raw), dtype=bool)
    else:
        parsed = pd.to_datetime(stamps, utc=True, errors="coerce", format="ISO8601")
        bad = parsed.isna().to_numpy().copy()
        ts_us = np.zeros(len(raw), dtype=np.int64)
        ok = ~bad
        ts_us[ok] = (
            parsed[ok].dt.tz_convert("UTC").astype("datetime64[us, UTC]").astype("int64")
        ).to_numpy()
    text = raw["value"].str.strip()
    gap = (text == "").to_numpy() | text.str.lower().isin(["nan", "null", "none", "na"]).to_numpy()
    values = pd.to_numeric(text.where(~gap, "nan"), errors="coerce").to_numpy(np.float64)
    bad = bad | (~gap & ~np.isfinite(values))
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 2  # header is line 1
        raise BacktestInputError(
            f"{path}: line {line} has an unreadable timestamp or value "
            f"({raw['timestamp'].iloc[line - 2]!r}, {raw['value'].iloc[line - 2]!r})"
        )
    frame = pd.DataFrame({"ts_us": ts_us, "value": values})
    if "label" in raw.columns:
        labels = pd.to_numeric(raw["label"].str.strip().replace("", "0"), errors="coerce")
        if labels.isna().any():
            line = int(np.flatnonzero(labels.isna().to_numpy())[0]) + 2
            raise BacktestInputError(f"{path}: line {line} has a label that is not 0 or 1")
        frame["label"] = (labels.to_numpy() > 0).astype(np.int8)
    frame = frame[~gap]
    if frame.empty:
        raise BacktestInputError(f"{path}: no row has a value")
    unsorted = bool((np.diff(frame["ts_us"].to_numpy()) < 0).any())
    frame = frame.sort_values("ts_us", kind="stable").reset_index(drop=True)
    frame.attrs.update(
        rows=len(raw),
        gaps=int(gap.sum()),
        duplicates=int(frame["ts_us"].duplicated().sum()),
        unsorted=unsorted,
    )
    return frame


def write_scores_csv(frame: pd.DataFrame, path: Path) -> None:
    """The backtest's rows as CSV (written to a temporary file, then moved into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    frame.to_csv(partial, index=False, float_format="%.6g")
    partial.replace(path)
