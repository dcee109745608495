"""Exports: query results as JSON, CSV and Parquet files, never outside the export directory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from metricmill.errors import ExportPathError
from metricmill.settings import load_settings
from storage.store import Store
from tests.dbtargets import DbTarget

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
WINDOW = {"start": T0, "end": T0 + timedelta(hours=1)}
ROWS = [
    {
        "metric": "cpu",
        "labels": {"host": host, "note": 'quote " comma , ü'},
        "ts": T0 + timedelta(seconds=15 * i, microseconds=i),
        "value": i * 0.1 + (100.0 if host == "b" else 0.0),
    }
    for i in range(6)
    for host in ("a", "b")
]


@pytest.fixture
def store(db_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    home = tmp_path / "home"
    monkeypatch.setenv("METRICMILL_HOME", str(home))
    settings = load_settings(
        home=home, database_url=db_target.url, timescaledb=db_target.timescaledb
    )
    with Store.open(settings=settings) as opened:
        opened.write_samples(ROWS)
        yield opened


def read_json(path: Path) -> pd.DataFrame:
    frame = pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
    return frame


def read_csv(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame["labels"] = frame["labels"].map(json.loads)
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
    return frame


def read_parquet(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    frame["labels"] = frame["labels"].map(lambda pairs: {k: v for k, v in pairs})
    return frame


READERS = {"json": read_json, "csv": read_csv, "parquet": read_parquet}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_export_reads_back_equal_in_every_format(store: Store) -> None:
    expected = store.query("cpu", **WINDOW)
    assert len(expected) == len(ROWS)

    for fmt, read in READERS.items():
        path, rows = store.export(f"reports/cpu.{fmt}", metric="cpu", **WINDOW)

        assert path == store.settings.exports / "reports" / f"cpu.{fmt}"
        assert rows == len(ROWS)
        back = read(path)
        assert back["metric"].tolist() == expected["metric"].tolist(), fmt
        assert back["labels"].tolist() == expected["labels"].tolist(), fmt
        assert back["ts"].tolist() == expected["ts"].tolist(), fmt
        assert back["value"].tolist() == expected["value"].tolist(), fmt
    assert {p.name for p in files_under(store.settings.exports)} == {
        "cpu.json",
        "cpu.csv",
        "cpu.parquet",
    }


def test_export_refuses_paths_that_leave_the_export_dir(store: Store, tmp_path: Path) -> None:
    exports = store.settings.exports
    outside = tmp_path / "outside"
    outside.mkdir()
    exports.mkdir(parents=True, exist_ok=True)
    (exports / "escape").symlink_to(outside, target_is_directory=True)
    (exports / "escape.json").symlink_to(outside / "linked.json")
    before = files_under(tmp_path)

    for path in [
        "../stolen.json",
        "reports/../../stolen.json",
        str(outside / "absolute.json"),
        outside / "absolute.parquet",
        "escape/through-link.csv",
        "escape.json",
    ]:
        with pytest.raises(ExportPathError):
            store.export(path, metric="cpu", **WINDOW)

    assert files_under(tmp_path) == before
    assert os.listdir(outside) == []
