"""Writing samples: exact round trips, exactly once, counts, rejects, the ledger, crashes."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest

from metricmill.types import us_to_datetime
from storage.normalise import prepare
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.sigkill_writer import SAMPLES, SERIES, sigkill_frame

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
WINDOW = {"start": T0 - timedelta(days=1), "end": T0 + timedelta(days=1)}
PROJECT_ROOT = Path(__file__).resolve().parent.parent

HOSTILE_TEXTS = [
    "it's",
    'say "hi"',
    "semi;colon",
    "back\\slash\\",
    "new\nline",
    "tab\there",
    "emoji 📈🔥",
    "中文指标 メトリクス",
    "-- not a comment",
    "/* not a comment */",
    "'; DROP TABLE samples; --",
]


@pytest.fixture
def store(db_target: DbTarget) -> Iterator[Store]:
    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as opened:
        yield opened


def sample(metric: str, seconds: float, value: Any, **labels: str) -> dict[str, Any]:
    ts = T0 + timedelta(seconds=seconds)
    return {"metric": metric, "labels": labels, "ts": ts, "value": value}


def count(store: Store, table: str) -> int:
    return int(store.backend.execute(f"SELECT count(*) FROM {table}")[0][0])


def as_utc(value: Any) -> datetime:
    """A stored timestamp as an aware datetime (SQLite keeps epoch µs, PostgreSQL timestamptz)."""
    if isinstance(value, int):
        return us_to_datetime(value)
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def quarantined(store: Store) -> list[tuple[str, dict[str, Any]]]:
    rows = store.backend.execute("SELECT reason, row_data FROM quarantine ORDER BY id")
    return [(reason, json.loads(row_data)) for reason, row_data in rows]


# -- exact round trips ---------------------------------------------------------------------


def test_metacharacters_round_trip_byte_exact(store: Store) -> None:
    rows = [sample(text, i, float(i), **{text: text}) for i, text in enumerate(HOSTILE_TEXTS)]

    report = store.write_samples(rows)

    assert report.written == len(HOSTILE_TEXTS)
    assert report.rejected_total == 0
    for i, text in enumerate(HOSTILE_TEXTS):
        points = store.query(text, **WINDOW)
        assert points["metric"].tolist() == [text]
        assert points["labels"].tolist() == [{text: text}]
        assert points["value"].tolist() == [float(i)]
        newest = store.latest(text)
        assert newest["metric"].tolist() == [text]
        assert newest["labels"].tolist() == [{text: text}]
        assert newest["ts"].tolist() == [T0 + timedelta(seconds=i)]
        found = store.series(text)
        assert found["metric"].tolist() == [text]
        assert found["labels"].tolist() == [{text: text}]
        by_label = store.series(None, {text: text})
        assert by_label["metric"].tolist() == [text]
    stored = {row[0] for row in store.backend.execute("SELECT metric FROM series")}
    assert {name.encode() for name in stored} == {text.encode() for text in HOSTILE_TEXTS}
    assert count(store, "samples") == len(HOSTILE_TEXTS)


def test_nul_character_is_rejected_and_the_rest_of_the_batch_lands(store: Store) -> None:
    rows = [
        sample("clean", 0, 1.0, k="v"),
        sample("nul\x00metric", 1, 2.0),
        sample("clean", 2, 3.0, **{"k\x00ey": "v"}),
        sample("clean", 3, 4.0, k="v\x00alue"),
    ]

    report = store.write_samples(rows)

    assert report.rejected == Counter({"nul_character": 3})
    assert report.written == 1
    assert store.query("clean", **WINDOW)["value"].tolist() == [1.0]
    assert [reason for reason, _ in quarantined(store)] == ["nul_character"] * 3


def test_lone_surrogate_in_metric_name_is_rejected_as_invalid_unicode(store: Store) -> None:
    rows = [sample("clean", 0, 1.0, k="v"), sample("surrogate\ud800", 1, 2.0)]

    report = store.write_samples(rows)

    assert report.rejected == Counter({"invalid_unicode": 1})
    assert report.written == 1
    assert store.query("clean", **WINDOW)["value"].tolist() == [1.0]
    assert [reason for reason, _ in quarantined(store)] == ["invalid_unicode"]


def test_lone_surrogate_in_label_is_rejected_as_invalid_unicode(store: Store) -> None:
    rows = [
        sample("clean", 0, 1.0, k="v"),
        sample("clean", 2, 3.0, k="\ud800"),
        sample("clean", 3, 4.0, **{"\ud800": "v"}),
    ]

    report = store.write_samples(rows)

    assert report.rejected == Counter({"invalid_unicode": 2})
    assert report.written == 1
    assert store.query("clean", **WINDOW)["value"].tolist() == [1.0]
    assert [reason for reason, _ in quarantined(store)] == ["invalid_unicode"] * 2


# -- exactly once --------------------------------------------------------------------------


def test_replayed_batch_writes_nothing(store: Store) -> None:
    frame = pd.DataFrame([sample("cpu", i, float(i), host="a") for i in range(10)])
    first = store.write_samples(frame)

    again = store.write_samples(frame)

    assert not first.replay
    assert first.written == 10
    assert again.replay
    assert again.batch_id == first.batch_id
    assert (again.written, again.overwritten, again.unchanged) == (0, 0, 0)
    assert count(store, "samples") == 10
    assert count(store, "ingest_batches") == 1


def test_same_rows_in_another_order_are_a_replay(store: Store) -> None:
    rows = [
        {
            "metric": "cpu",
            "labels": {"host": "a", "dc": "eu"},
            "ts": T0 + timedelta(seconds=i),
            "value": float(i),
        }
        for i in range(5)
    ] + [sample("mem", 0, 7.0, host="b")]
    shuffled = [
        {**row, "labels": dict(reversed(list(row["labels"].items())))} for row in reversed(rows)
    ]
    first = store.write_samples(rows)

    again = store.write_samples(shuffled)

    assert again.replay
    assert again.batch_id == first.batch_id
    assert again.written == 0
    assert count(store, "samples") == 6
    assert count(store, "ingest_batches") == 1


# -- counting ------------------------------------------------------------------------------


def test_new_value_for_an_existing_sample_is_an_overwrite(store: Store) -> None:
    store.write_samples([sample("cpu", 0, 1.0, host="a")])

    report = store.write_samples(
        [sample("cpu", 0, 2.0, host="a"), sample("cpu", 60, 3.0, host="a")]
    )

    assert (report.written, report.overwritten, report.unchanged) == (1, 1, 0)
    assert store.query("cpu", **WINDOW)["value"].tolist() == [2.0, 3.0]
    assert count(store, "samples") == 2


def test_identical_resend_in_a_new_batch_counts_as_unchanged(store: Store) -> None:
    store.write_samples([sample("cpu", 0, 1.0, host="a"), sample("cpu", 60, 2.0, host="a")])

    report = store.write_samples(
        [sample("cpu", 0, 1.0, host="a"), sample("cpu", 120, 3.0, host="a")]
    )

    assert not report.replay
    assert (report.written, report.overwritten, report.unchanged) == (1, 0, 1)
    assert store.query("cpu", **WINDOW)["value"].tolist() == [1.0, 2.0, 3.0]


def test_identical_duplicates_in_one_batch_count_as_unchanged(store: Store) -> None:
    twice = sample("cpu", 0, 1.0, host="a")

    report = store.write_samples([twice, dict(twice), sample("cpu", 60, 2.0, host="a")])

    assert (report.written, report.overwritten, report.unchanged) == (2, 0, 1)
    assert report.rejected_total == 0
    assert count(store, "samples") == 2


def test_conflicting_duplicates_in_one_batch_are_both_rejected(store: Store) -> None:
    rows = [
        sample("cpu", 0, 1.0, host="a"),
        sample("cpu", 0, 2.0, host="a"),
        sample("cpu", 60, 5.0, host="a"),
    ]

    report = store.write_samples(rows)

    assert report.rejected == Counter({"conflicting_values_in_batch": 2})
    assert report.written == 1
    points = store.query("cpu", **WINDOW)
    assert points["ts"].tolist() == [T0 + timedelta(seconds=60)]
    assert points["value"].tolist() == [5.0]


# -- validation ----------------------------------------------------------------------------


def test_non_finite_values_are_rejected(store: Store) -> None:
    non_finite = [float("nan"), float("inf"), float("-inf")]
    rows = [sample("cpu", i, value) for i, value in enumerate(non_finite)]
    rows.append(sample("cpu", 10, 1.5))

    report = store.write_samples(rows)

    assert report.rejected == Counter({"non_finite_value": 3})
    assert store.query("cpu", **WINDOW)["value"].tolist() == [1.5]


def test_timestamps_before_1970_or_after_2262_are_out_of_range(store: Store) -> None:
    rows = [
        {"metric": "cpu", "ts": "1969-12-31T23:59:59Z", "value": 1.0},
        {"metric": "cpu", "ts": datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), "value": 2.0},
        {"metric": "cpu", "ts": "2262-04-12T00:00:00Z", "value": 3.0},
        {"metric": "cpu", "ts": datetime(2300, 1, 1, tzinfo=UTC), "value": 4.0},
        {"metric": "cpu", "ts": "1970-01-01T00:00:00Z", "value": 5.0},
    ]

    report = store.write_samples(rows)

    assert report.rejected == Counter({"timestamp_out_of_range": 4})
    assert store.query("cpu", start="1970-01-01T00:00:00Z", end=T0)["value"].tolist() == [5.0]


def test_unparseable_timestamp_is_invalid(store: Store) -> None:
    rows = [
        {"metric": "cpu", "ts": "yesterday-ish", "value": 1.0},
        {"metric": "cpu", "ts": "2024-13-45T99:00:00", "value": 2.0},
        sample("cpu", 0, 3.0),
    ]

    report = store.write_samples(rows)

    assert report.rejected == Counter({"invalid_timestamp": 2})
    assert report.written == 1


def test_naive_timestamp_is_utc(store: Store) -> None:
    store.write_samples([{"metric": "cpu", "ts": datetime(2024, 5, 1, 12, 0), "value": 1.0}])

    report = store.write_samples(
        [
            {"metric": "cpu", "ts": "2024-05-01T12:00:00+00:00", "value": 1.0},
            {"metric": "cpu", "ts": "2024-05-01T14:00:00+02:00", "value": 1.0},
            {"metric": "cpu", "ts": "2024-05-01T12:00:00", "value": 1.0},
            {"metric": "cpu", "ts": "2024-05-01T13:00:00", "value": 2.0},
        ]
    )

    assert (report.written, report.overwritten, report.unchanged) == (1, 0, 3)
    points = store.query("cpu", **WINDOW)
    assert points["ts"].tolist() == [
        datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        datetime(2024, 5, 1, 13, 0, tzinfo=UTC),
    ]
    assert points["value"].tolist() == [1.0, 2.0]


def test_empty_batch_writes_nothing(store: Store) -> None:
    empties = [[], pd.DataFrame(), pd.DataFrame(columns=["metric", "labels", "ts", "value"])]

    reports = [store.write_samples(empty) for empty in empties]

    for report in reports:
        assert report.rows_in == 0
        assert (report.written, report.new_series, report.rejected_total) == (0, 0, 0)
        assert not report.replay
    assert count(store, "samples") == 0
    assert count(store, "series") == 0
    assert count(store, "ingest_batches") == 0


def test_every_rejected_row_is_quarantined_with_its_reason(store: Store) -> None:
    rows = [
        sample("q_nan", 0, float("nan")),
        sample("q_text_value", 0, "twelve"),
        sample("", 0, 1.0),
        {"metric": "q_garbage_ts", "labels": {}, "ts": "garbage", "value": 1.0},
        {"metric": "q_old_ts", "labels": {}, "ts": "1960-01-01T00:00:00Z", "value": 1.0},
        {"metric": "q_bad_labels", "labels": "not json", "ts": T0, "value": 1.0},
        sample("q_nul\x00", 0, 1.0),
        sample("q_conflict", 0, 1.0),
        sample("q_conflict", 0, 2.0),
        sample("q_good", 0, 1.0),
    ]
    expected = sorted(
        [
            ("non_finite_value", "q_nan"),
            ("invalid_value", "q_text_value"),
            ("missing_metric", ""),
            ("invalid_timestamp", "q_garbage_ts"),
            ("timestamp_out_of_range", "q_old_ts"),
            ("invalid_labels", "q_bad_labels"),
            ("nul_character", "q_nul\x00"),
            ("conflicting_values_in_batch", "q_conflict"),
            ("conflicting_values_in_batch", "q_conflict"),
        ]
    )

    report = store.write_samples(rows, source="quarantine-test")

    assert report.written == 1
    assert report.rejected == Counter(reason for reason, _ in expected)
    rows_back = quarantined(store)
    assert sorted((reason, row["metric"]) for reason, row in rows_back) == expected
    by_metric = {row["metric"]: row for _, row in rows_back}
    assert by_metric["q_text_value"]["value"] == "twelve"
    assert by_metric["q_bad_labels"]["labels"] == "not json"
    assert by_metric["q_garbage_ts"]["ts"] == "garbage"
    conflicting = sorted(row["value"] for _, row in rows_back if row["metric"] == "q_conflict")
    assert conflicting == [1.0, 2.0]
    batch_ids = store.backend.execute("SELECT DISTINCT batch_id, source FROM quarantine")
    assert batch_ids == [(report.batch_id, "quarantine-test")]


# -- scale ---------------------------------------------------------------------------------


def test_batch_of_100k_new_series_is_written_completely(store: Store) -> None:
    n = 100_000
    frame = pd.DataFrame(
        {
            "metric": "wide",
            "labels": [{"instance": f"i{i:06d}"} for i in range(n)],
            "ts": T0,
            "value": [float(i) for i in range(n)],
        }
    )

    report = store.write_samples(frame)

    assert (report.new_series, report.written, report.rejected_total) == (n, n, 0)
    stats = store.stats()
    assert (stats["series"], stats["samples"]) == (n, n)
    written = store.backend.execute("SELECT written, new_series FROM ingest_batches")
    assert written == [(n, n)]


# -- ledger and rollup queue ---------------------------------------------------------------

_LEDGER_COLUMNS = (
    "source, status, rows_in, written, overwritten, unchanged, quarantined, new_series, "
    "min_ts, max_ts"
)


def ledger_row(store: Store, batch_id: str) -> tuple[Any, ...]:
    rows = store.backend.execute(
        f"SELECT {_LEDGER_COLUMNS} FROM ingest_batches WHERE batch_id = %s",
        (batch_id,),
    )
    assert len(rows) == 1, rows
    *head, min_ts, max_ts = rows[0]
    return (*head, as_utc(min_ts), as_utc(max_ts))


def test_each_committed_batch_has_one_ledger_row_with_its_counts(store: Store) -> None:
    first_rows = [
        sample("cpu", 0, 1.0, host="a"),
        sample("cpu", 1800, 2.0, host="a"),
        sample("cpu", 4500, 3.0, host="b"),
        sample("cpu", 60, float("nan"), host="a"),
    ]
    first = store.write_samples(first_rows, source="agent-1")
    second = store.write_samples(
        [
            sample("cpu", 0, 10.0, host="a"),
            sample("cpu", 1800, 2.0, host="a"),
            sample("cpu", 7200, 4.0, host="b"),
        ],
        source="agent-2",
    )
    store.write_samples(first_rows, source="agent-1")

    assert count(store, "ingest_batches") == 2
    assert ledger_row(store, first.batch_id) == (
        "agent-1",
        "committed",
        4,
        3,
        0,
        0,
        1,
        2,
        T0,
        T0 + timedelta(seconds=4500),
    )
    assert ledger_row(store, second.batch_id) == (
        "agent-2",
        "committed",
        3,
        1,
        1,
        1,
        0,
        0,
        T0,
        T0 + timedelta(seconds=7200),
    )


def test_touched_hours_are_queued_for_rollup(store: Store) -> None:
    report = store.write_samples(
        [
            sample("cpu", 5 * 60, 1.0),
            sample("cpu", 3600 - 0.000001, 2.0),
            sample("cpu", 90 * 60, 3.0),
            sample("cpu", 4 * 3600, 4.0),
        ]
    )

    rows = store.backend.execute(
        "SELECT start_ts, end_ts, batch_id FROM rollup_pending ORDER BY start_ts"
    )

    hour = timedelta(hours=1)
    assert [(as_utc(s), as_utc(e), b) for s, e, b in rows] == [
        (T0, T0 + 2 * hour, report.batch_id),
        (T0 + 4 * hour, T0 + 5 * hour, report.batch_id),
    ]


# -- SIGKILL atomicity ---------------------------------------------------------------------


class WriterHelper:
    """The long-lived helper process of tests/sigkill_writer.py, one fork per trial."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sigkill_writer"],
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"sigkill helper did not answer (exit {self.proc.poll()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def start(self, job: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self._reply(timeout=60)["pid"])

    def exit_code(self) -> int:
        return int(self._reply(timeout=60)["exit"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def writer_helper() -> Iterator[WriterHelper]:
    helper = WriterHelper()
    try:
        yield helper
    finally:
        helper.close()


@dataclass
class Trial:
    delay: float
    in_transaction: bool
    samples: int

    @property
    def killed_mid_write(self) -> bool:
        return self.in_transaction and self.samples == 0


class WriteProbe:
    """Tells, from outside, whether some other connection has a write transaction open."""

    def __init__(self, target: DbTarget) -> None:
        self.sqlite = target.name == "sqlite"
        if self.sqlite:
            path = target.url.removeprefix("sqlite:///")
            self.lite = sqlite3.connect(path, timeout=0, isolation_level=None)
        else:
            self.pg = psycopg.connect(target.url, autocommit=True)

    def write_in_progress(self) -> bool:
        if self.sqlite:
            try:
                self.lite.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return True  # the writer holds the write lock
            self.lite.execute("ROLLBACK")
            return False
        row = self.pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND backend_xid IS NOT NULL"
        ).fetchone()
        return bool(row and row[0])

    def wait_until_alone(self, timeout: float = 30) -> None:
        """PostgreSQL aborts a dead client's transaction only when it notices; wait for that."""
        if self.sqlite:
            return
        deadline = time.monotonic() + timeout
        while True:
            row = self.pg.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
            if row and row[0] == 0:
                return
            assert time.monotonic() < deadline, "the killed writer's session never ended"
            time.sleep(0.02)

    def close(self) -> None:
        (self.lite if self.sqlite else self.pg).close()


def run_kill_trial(
    helper: WriterHelper, target: DbTarget, workdir: Path, name: str, delay: float
) -> Trial:
    files = {kind: workdir / f"{name}.{kind}" for kind in ("ready", "done", "error")}
    probe = WriteProbe(target)
    try:
        pid = helper.start(
            {
                "url": target.url,
                "timescaledb": target.timescaledb,
                "metric": name,
                "batch_id": name,
                **{kind: str(path) for kind, path in files.items()},
            }
        )
        deadline = time.monotonic() + 60
        while not files["ready"].exists():
            if files["error"].exists():
                helper.exit_code()
                pytest.fail(f"writer failed before writing:\n{files['error'].read_text()}")
            assert time.monotonic() < deadline, "writer never began writing"
            time.sleep(0.002)
        time.sleep(delay)
        in_transaction = probe.write_in_progress()
        os.kill(pid, signal.SIGKILL)
        exit_code = helper.exit_code()
        if files["error"].exists():
            pytest.fail(f"writer failed while writing:\n{files['error'].read_text()}")
        assert exit_code == -signal.SIGKILL
        probe.wait_until_alone()
    finally:
        probe.close()

    with Store.open(target.url, timescaledb=target.timescaledb) as after:
        samples, series = after.backend.execute(
            "SELECT count(s.series_id), count(DISTINCT r.series_id) FROM series r "
            "LEFT JOIN samples s ON s.series_id = r.series_id WHERE r.metric = %s",
            (name,),
        )[0]
        ledger = after.backend.execute(
            "SELECT status, rows_in, written FROM ingest_batches WHERE batch_id = %s", (name,)
        )
        where = f"trial {name} killed {delay:.3f}s after the write began"
        assert samples in (0, SAMPLES), where
        assert series == (SERIES if samples else 0), where
        assert ledger == ([("committed", SAMPLES, SAMPLES)] if samples else []), where
        if target.name == "sqlite":
            assert after.backend.execute("PRAGMA integrity_check") == [("ok",)], where
    return Trial(delay, in_transaction, int(samples))


def test_sigkill_during_write_leaves_all_or_nothing(
    db_target: DbTarget, writer_helper: WriterHelper, tmp_path: Path
) -> None:
    rng = random.Random()
    frame = sigkill_frame("measure")
    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as store:
        started = time.perf_counter()
        prepare(frame)
        prepared = time.perf_counter() - started
        started = time.perf_counter()
        store.write_samples(frame, batch_id="measure")
        whole = time.perf_counter() - started
    in_db = whole - prepared  # the part of write_samples spent inside the transaction

    trials = [
        run_kill_trial(
            writer_helper,
            db_target,
            tmp_path,
            f"trial{k}",
            rng.uniform(prepared + in_db * k / 3, prepared + in_db * (k + 1) / 3),
        )
        for k in range(3)
    ]
    # The writer process may run faster or slower than this one measured: when no kill landed
    # inside the write, look for it by bisection between a delay too early and one too late.
    early = max([0.0, *(t.delay for t in trials if not t.samples and not t.in_transaction)])
    late = max([prepared + in_db, *(t.delay for t in trials if t.samples)])
    for extra in range(8):
        if any(t.killed_mid_write for t in trials):
            break
        delay = (early + late) / 2
        trial = run_kill_trial(writer_helper, db_target, tmp_path, f"extra{extra}", delay)
        trials.append(trial)
        if trial.samples:  # the write had committed
            late = delay
        elif not trial.in_transaction:  # it had not begun
            early = delay

    assert any(t.killed_mid_write for t in trials), trials
