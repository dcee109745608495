"""Archival: the Parquet layout and manifest, verify-before-delete, kill -9, reading back,
and anonymized exports."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from metricmill.errors import ExportPathError
from metricmill.settings import Settings
from storage import retention
from storage.archive import (
    Anonymizer,
    ArchiveError,
    export_to_parquet,
    manifest,
    read_archive,
    verify_archive,
)
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.retention_data import (
    DAYS,
    NOW,
    PER_DAY,
    SERIES,
    TODAY,
    assert_archive_plus_database_is_everything,
    cutoff,
    expected_rows,
    filled_store,
    make_settings,
    remaining,
)

CPU1, CPU2, MEM = SERIES
ROOT = Path(__file__).resolve().parent.parent
PART = re.compile(r"metric=(\w+)/date=(\d{4}-\d{2}-\d{2})/part-[0-9a-f]{32}\.parquet")


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget) -> Settings:
    return make_settings(monkeypatch, tmp_path / "home", db_target, retention_days=30)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with filled_store(settings) as opened:
        yield opened


def archived_before(series: tuple[str, dict[str, str]], days: int) -> pd.DataFrame:
    rows = expected_rows(*series)
    return rows[rows["ts"] < cutoff(days)].reset_index(drop=True)


def test_archive_files_follow_the_hive_layout_and_match_the_manifest(
    store: Store, settings: Settings
) -> None:
    retention.add_rule(store.backend, "container_cpu_*", 7)

    report = retention.apply(store)

    first_day = f"{cutoff(DAYS):%Y-%m-%d}"
    assert f"metric=container_cpu_usage/date={first_day}" in {
        f.path.rsplit("/", 1)[0] for f in report.files
    }
    assert all(PART.fullmatch(f.path) for f in report.files)
    listed = manifest(store.backend)
    assert sorted(listed["path"]) == sorted(f.path for f in report.files)
    for path, sha in zip(listed["path"], listed["sha256"], strict=True):
        assert hashlib.sha256((settings.archive / path).read_bytes()).hexdigest() == sha
    assert verify_archive(store.backend, settings.archive) == []
    cpu_rows = len(archived_before(CPU1, 7)) + len(archived_before(CPU2, 7))
    mem_rows = len(archived_before(MEM, 30))
    assert sum(o.archived for o in report.outcomes) == cpu_rows + mem_rows
    assert sum(o.deleted for o in report.outcomes) == cpu_rows + mem_rows

    # The files open as they are: pandas (pyarrow) and DuckDB read the Hive partitions.
    frame = pd.read_parquet(settings.archive)
    assert len(frame) == cpu_rows + mem_rows
    assert set(frame.columns) >= {"series_key", "labels", "ts", "value", "metric", "date"}
    counted = duckdb.sql(
        f"SELECT metric, count(*) FROM read_parquet('{settings.archive}/**/*.parquet', "
        "hive_partitioning = true) GROUP BY metric ORDER BY metric"
    ).fetchall()
    assert counted == [("container_cpu_usage", cpu_rows), ("mem_used_bytes", mem_rows)]
    back = read_archive(settings, "container_cpu_usage", {"host": "host_1"})
    want = archived_before(CPU1, 7)
    assert list(back["ts"]) == list(want["ts"])
    assert list(back["value"]) == list(want["value"])
    assert back["labels"].iloc[0] == CPU1[1]


def test_query_with_include_archive_reads_back_what_retention_removed(store: Store) -> None:
    retention.add_rule(store.backend, "container_cpu_*", 7)
    retention.apply(store)
    window = (TODAY - timedelta(days=DAYS + 1), NOW)

    recent = store.query(CPU1[0], CPU1[1], *window)
    full = store.query(CPU1[0], CPU1[1], *window, include_archive=True)

    want = expected_rows(*CPU1)
    assert len(recent) == len(want) - len(archived_before(CPU1, 7))
    assert list(full["ts"]) == list(want["ts"])
    assert list(full["value"]) == list(want["value"])
    daily = store.query(CPU1[0], CPU1[1], *window, step="1d", agg="sum", include_archive=True)
    sums = want.groupby(want["ts"].dt.floor("1D"))["value"].sum()
    assert list(daily["ts"]) == list(sums.index)
    assert list(daily["value"]) == pytest.approx(list(sums))


def test_counter_increase_spans_the_archive_and_the_database(store: Store) -> None:
    # A counter: +5 every six hours, reset to 0 on two days (one archived, one kept).
    stamps = [TODAY - timedelta(hours=6 * k + 3) for k in range(DAYS * PER_DAY)][::-1]
    resets = {DAYS * PER_DAY // 4, DAYS * PER_DAY - 6}
    values, level = [], 0.0
    for k in range(len(stamps)):
        level = 0.0 if k in resets else level + 5.0
        values.append(level)
    labels = {"host": "host_1"}
    store.write_samples(
        pd.DataFrame(
            {"metric": "requests_total", "labels": [labels] * len(stamps), "ts": stamps,
             "value": values}
        ),
        source="test",
    )  # fmt: skip
    store.rollup()  # retention keeps what a pending rollup range still needs
    retention.add_rule(store.backend, "requests_*", 7)
    report = retention.apply(store)
    assert sum(o.archived for o in report.outcomes if "requests_" in o.rule) > 0
    window = (TODAY - timedelta(days=DAYS + 1), NOW)

    got = store.query("requests_total", labels, *window, step="1d", agg="increase",
                      include_archive=True)  # fmt: skip

    # Prometheus-style: each step's delta (a drop is a reset, counted from 0) belongs to the
    # later sample's day; the very first sample adds nothing.
    steps = [0.0] + [b - a if b >= a else b for a, b in zip(values[:-1], values[1:], strict=True)]
    per_day = pd.Series(steps).groupby(pd.DatetimeIndex(stamps).floor("1D")).sum()
    assert list(got["ts"]) == list(per_day.index)
    assert list(got["value"]) == pytest.approx(list(per_day))
    assert got["ts"].min() < cutoff(7) <= got["ts"].max()  # both tiers answered


def test_a_file_that_does_not_verify_deletes_nothing(store: Store, settings: Settings) -> None:
    retention.add_rule(store.backend, "*", 7)
    before = store.backend.table_counts()

    def corrupt(stage: str, detail: dict[str, Any]) -> None:
        if stage == "written":
            path = Path(detail["path"])
            path.write_bytes(path.read_bytes()[:-20])

    with pytest.raises(ArchiveError, match="does not read back"):
        retention.apply(store, checkpoint=corrupt)
    assert store.backend.table_counts() == before
    assert manifest(store.backend).empty


def test_an_unwritable_archive_directory_fails_the_run_and_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget
) -> None:
    if db_target.name != "sqlite":
        pytest.skip("the check is backend-blind: SQLite is enough")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the archive directory should be")
    settings = make_settings(monkeypatch, tmp_path / "home", db_target, archive_dir=blocker / "a")
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "*", 7)
        before = store.backend.table_counts()
        with pytest.raises(ArchiveError, match="not writable.*nothing deleted"):
            retention.apply(store)
        assert store.backend.table_counts() == before


def test_kill_between_parquet_write_and_delete_loses_nothing_and_archives_nothing_twice(
    store: Store, settings: Settings, db_target: DbTarget, tmp_path: Path
) -> None:
    # On TimescaleDB the oldest days go whole (archive, then drop_chunks): killed there.
    retention.add_rule(store.backend, "container_cpu_*", 7)
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.retention_killer", str(settings.home),
         settings.database_url, db_target.timescaledb, str(ready)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the retention process never reached the delete"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        if child.stderr:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    orphan = ready.read_text()
    assert (settings.archive / orphan).is_file()  # written, verified, never committed
    assert len(remaining(store, *CPU1)) == DAYS * PER_DAY  # nothing was deleted
    assert manifest(store.backend).empty

    retention.apply(store)

    assert (settings.archive / orphan).is_file()  # the rerun wrote the same content-named file
    assert_archive_plus_database_is_everything(store, settings, [CPU1, CPU2])


# -- anonymized export ------------------------------------------------------------------------
def strings_in(path: Path) -> list[str]:
    """Every decoded string of a Parquet file: cells, map keys and values, column statistics."""
    table = pq.read_table(path)
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    for column in table.columns:
        walk(column.to_pylist())
    meta = pq.ParquetFile(path).metadata
    for group in range(meta.num_row_groups):
        for index in range(meta.num_columns):
            stats = meta.row_group(group).column(index).statistics
            if stats is not None and stats.has_min_max:
                walk([str(stats.min), str(stats.max)])
    return found


def anonymizer(settings: Settings, key: bytes = b"k3y-for-tests") -> Anonymizer:
    return Anonymizer.from_settings(settings, key)


@pytest.fixture
def anon_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget) -> Settings:
    if db_target.name == "timescaledb":
        pytest.skip("export SQL is the plain PostgreSQL one")
    return make_settings(
        monkeypatch,
        tmp_path / "home",
        db_target,
        anonymize_labels='["host"]',
        anonymize_drop_labels='["container_id"]',
        anonymize_coarsen_seconds=3600,
    )


def test_anonymized_export_holds_no_raw_label_value(anon_settings: Settings) -> None:
    window = (TODAY - timedelta(days=DAYS + 1), NOW)
    with filled_store(anon_settings) as store:
        keys = [r[0] for r in store.backend.execute("SELECT series_key FROM series")]
        path, rows = export_to_parquet(
            store.backend, anon_settings, "share/anon.parquet", *window,
            anonymizer=anonymizer(anon_settings),
        )  # fmt: skip
        again, _ = export_to_parquet(
            store.backend, anon_settings, "share/again.parquet", *window,
            anonymizer=anonymizer(anon_settings),
        )  # fmt: skip
        other, _ = export_to_parquet(
            store.backend, anon_settings, "share/other.parquet", *window,
            anonymizer=anonymizer(anon_settings, b"another-key"),
        )  # fmt: skip

    assert path == anon_settings.exports / "share" / "anon.parquet"
    assert rows == len(SERIES) * DAYS * PER_DAY
    raw_values = ["host_1", "host_2", "ctr-alpha-0001", "ctr-bravo-0002"]
    unkeyed = [hashlib.sha256(v.encode()).hexdigest()[:32] for v in raw_values] + keys
    data = path.read_bytes()
    assert not any(v.encode() in data for v in raw_values + unkeyed)
    assert not any(v in text for v in raw_values + unkeyed for text in strings_in(path))
    frame = pd.read_parquet(path)
    labels = [dict(x) for x in frame["labels"]]
    assert all(set(x) == {"host"} for x in labels)
    assert {x["host"] for x in labels}.isdisjoint({"host_1", "host_2"})
    assert (frame["ts"].dt.minute == 0).all() and (frame["ts"].dt.second == 0).all()
    repeat = [dict(x) for x in pd.read_parquet(again)["labels"]]
    assert repeat == labels  # stable across runs: joins still work
    rekeyed = {dict(x)["host"] for x in pd.read_parquet(other)["labels"]}
    assert rekeyed.isdisjoint({x["host"] for x in labels})
    assert len({x["host"] for x in labels}) == 2


def test_anonymization_without_a_key_is_refused(anon_settings: Settings) -> None:
    with pytest.raises(ArchiveError, match="needs a key"):
        Anonymizer.from_settings(anon_settings, None)


@pytest.mark.parametrize("output", ["../outside.parquet", "/tmp/abs.parquet", "a/../../b.parquet"])
def test_export_paths_leaving_the_export_directory_are_refused(
    anon_settings: Settings, output: str
) -> None:
    with Store.open(settings=anon_settings) as store, pytest.raises(ExportPathError):
        export_to_parquet(store.backend, anon_settings, output, cutoff(3), NOW)
    assert not anon_settings.exports.exists() or not any(anon_settings.exports.rglob("*"))


def test_retention_can_archive_anonymized(anon_settings: Settings) -> None:
    with filled_store(anon_settings) as store:
        retention.add_rule(store.backend, "mem_*", 20)
        report = retention.apply(store, anonymizer=anonymizer(anon_settings))
        listed = manifest(store.backend)
    assert report.files and all(f.anonymized for f in report.files)
    assert listed["anonymized"].astype(bool).all()
    for item in report.files:
        table = pq.read_table(anon_settings.archive / item.path)
        assert {dict(x)["host"] for x in table.column("labels").to_pylist()} != {"host_1"}
