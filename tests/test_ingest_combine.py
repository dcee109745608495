"""The ingest fast path gives what the row-wise path gives.

Files checked together whose times came in different forms (ISO text in one, epoch numbers in
another) have their times read per file (tasks.ingest_files.combine_files); the check must keep the
same rows, reject the same rows for the same reasons, and show each rejected row as its file
had it. Label sets canonicalised together (storage.labels.canonical_label_sets, remembered
across batches) must match canonical_labels object by object, bad ones included.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from metricmill.settings import load_settings
from storage.frames import with_parsed_timestamps
from storage.labels import canonical_label_sets, canonical_labels
from storage.write_rows import unique_sorted
from tasks.ingest import quality_limits
from tasks.ingest_files import check_together
from tasks.quality import validate_batch


def _files(frames: list[pd.DataFrame]) -> list[Any]:
    return [
        SimpleNamespace(decoded=SimpleNamespace(frame=f, rejected=[]), path=Path(f"f{i}.ndjson"))
        for i, f in enumerate(frames)
    ]


def test_mixed_time_forms_checked_together_match_the_row_wise_check(tmp_path: Path) -> None:
    now = pd.Timestamp.now(tz="UTC").floor("s")
    days = [1, 40, 1, 2]
    iso = pd.DataFrame(
        {
            "metric": ["a", "a", "bad name", "b"],
            "labels": [{"h": "1"}] * 4,
            "ts": [(now - pd.Timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ") for d in days],
            "value": [1.0, 2.0, 3.0, 4.0],
        }
    )
    seconds = [int((now - pd.Timedelta(days=d)).timestamp()) for d in (1, 40, 1, 1)]
    epoch = pd.DataFrame(
        {"metric": ["a", "a", "c", "c"], "labels": [{"h": "2"}] * 4, "ts": seconds}
    ).assign(value=[1.0, 2.0, 3.0, 5.0])
    millis = epoch.assign(ts=epoch["ts"] * 1000)
    frames = [iso, epoch, iso.iloc[0:0], millis]
    settings = load_settings(home=str(tmp_path / "home"))

    together = check_together(settings, _files(frames))
    rejected = together.rejected_by_file()
    kept = np.flatnonzero(together.verdict.kept())

    # the row-wise way: one object column of every file's times
    parsed = [with_parsed_timestamps(f) for f in frames]
    combined = pd.concat([f for f in parsed if len(f)], ignore_index=True)
    assert combined["ts"].dtype == object
    row_parts = np.repeat(np.arange(len(frames)), [len(f) for f in frames])
    checked = validate_batch(combined, quality_limits(settings), parts=row_parts)
    expected: list[list[Any]] = [[] for _ in frames]
    for row, part in zip(
        checked.rejected, row_parts[checked.rejected_positions].tolist(), strict=True
    ):
        expected[part].append(row)

    assert rejected == expected
    assert [[reason for _, reason in rows] for rows in rejected] == [
        ["timestamp_too_old", "invalid_metric_name"],
        ["timestamp_too_old", "conflicting_values_in_batch", "conflicting_values_in_batch"],
        [],
        ["timestamp_too_old", "conflicting_values_in_batch", "conflicting_values_in_batch"],
    ]
    # a rejected row from an epoch file keeps its number, as received
    assert rejected[1][0][0]["ts"] == seconds[1]
    assert rejected[3][0][0]["ts"] == seconds[1] * 1000
    # the same rows kept, in the same files, at the same instants and values
    assert kept.tolist() == checked.good.index.tolist()
    assert together.parts[kept].tolist() == row_parts[checked.good.index.to_numpy()].tolist()
    typed = checked.typed_good()
    batch = together.verdict.batch
    assert batch.ts_us[kept].tolist() == typed["ts"].dt.as_unit("us").astype("int64").tolist()
    assert batch.values[kept].tolist() == typed["value"].tolist()


def test_label_sets_canonicalised_together_match_one_by_one() -> None:
    plain = [{"a": "1", "b": "2"}, {"b": "2", "a": "1"}, {}, {"é": "ü"}]
    odd = [{"x": "nul\x00"}, {"": "v"}, {"a": 1}, {"a": True}, None, '{"z": "1"}']
    surrogate = [{"s": "\ud800"}]
    for objs in (plain, plain + odd, odd[:1], surrogate, plain):  # plain twice: remembered
        canon, reasons = canonical_label_sets(objs)
        assert list(zip(canon.tolist(), reasons.tolist(), strict=True)) == [
            canonical_labels(o) for o in objs
        ]


def test_unique_sorted_is_numpys_unique() -> None:
    rng = np.random.default_rng(7)
    for values in (
        np.zeros(0, dtype=np.int64),
        np.array([5], dtype=np.int64),
        rng.integers(0, 30, 500),
        rng.integers(-(10**15), 10**15, 5000),
    ):
        assert np.array_equal(unique_sorted(values), np.unique(values))
