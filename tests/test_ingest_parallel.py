"""Parallel ingest runs on PostgreSQL (`ingest_max_parallel_runs`): four runs released at once
over 400 landed files (replays, overlapping series and timestamps, rejected rows) end with the
tables of one sequential run over the same files; one slot per run, the fifth skips; SQLite
stays at one run."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest

from flows.guard import exclusive_run
from metricmill.devtools.pgcluster import PgCluster
from metricmill.settings import load_settings
from storage.landing import claim_files
from storage.locks import flow_lock, lock_holders
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.forked_runs import ForkedRuns, warm_ingest
from tests.settings_env import isolate_settings

FILES = 400
RUNS = 4
SERIES = 24
TIMES = 30
RUN_TIMEOUT = 240.0


def _value(host: str, ts_s: int) -> float:
    """One value per (series, ts), whichever file holds it: files overlap without conflicting,
    so the stored table does not depend on which run writes a shared point first."""
    return float((int(host[1:]) * 7919 + ts_s // 60) % 1000) / 10.0


def _landing_files(seed: int) -> list[tuple[str, bytes]]:
    """(name, content): every file shares series and timestamps with others, about one in six
    repeats an earlier file byte for byte (a replay), one in five carries rejected rows."""
    rng = random.Random(seed)
    start_s = (int(time.time()) // 60) * 60 - 6 * 3600
    files: list[tuple[str, bytes]] = []
    for n in range(FILES):
        if files and rng.random() < 0.16:
            files.append((f"replay-{n:03d}.ndjson", rng.choice(files)[1]))
            continue
        rows = []
        for _ in range(rng.randint(8, 30)):
            host = f"h{rng.randrange(SERIES)}"
            ts_s = start_s + 60 * rng.randrange(TIMES) + 3600 * rng.randrange(3)
            labels = {"host": host, "dc": f"dc{int(host[1:]) % 3}"}
            rows.append(
                {"metric": "par_m", "labels": labels, "ts": ts_s, "value": _value(host, ts_s)}
            )
        if rng.random() < 0.2:
            rows.append({"metric": "9-bad", "labels": {"n": str(n)}, "ts": start_s, "value": 1.0})
            rows.append(
                {
                    "metric": "par_m",
                    "labels": {"host": "future"},
                    "ts": start_s + 86_400 * 3,
                    "value": float(n),
                }  # fmt: skip
            )
        body = "\n".join(json.dumps(r, sort_keys=True) for r in rows) + "\n"
        files.append((f"file-{n:03d}.ndjson", body.encode()))
    return files


def _land(landing: Path, files: list[tuple[str, bytes]]) -> None:
    landing.mkdir(parents=True, exist_ok=True)
    base = time.time() - 60
    for n, (name, data) in enumerate(files):
        path = landing / name
        path.write_bytes(data)
        os.utime(path, (base + n / 1000, base + n / 1000))  # landing order: the list's


@pytest.fixture
def children(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[ForkedRuns]:
    """Forked ingest runs (tests/forked_runs.py) with no settle time, on plain tables."""
    isolate_settings(monkeypatch, settle_seconds=0, timescaledb="off")
    warm_ingest()
    runs = ForkedRuns(tmp_path / "logs", RUN_TIMEOUT)
    try:
        yield runs
    finally:
        runs.close()


def _parallel(runs: int) -> dict[str, str]:
    """The environment of a run allowed `runs` parallel runs."""
    return {"METRICMILL_INGEST_MAX_PARALLEL_RUNS": str(runs)}


class Databases:
    """Fresh databases on the cluster, dropped when the test ends."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster, self.names = cluster, []

    def new(self) -> str:
        name = f"par_{uuid.uuid4().hex[:10]}"
        self.cluster.create_database(name)
        self.names.append(name)
        return self.cluster.url(name)


@pytest.fixture
def databases(pg_cluster: PgCluster) -> Iterator[Databases]:
    made = Databases(pg_cluster)
    try:
        yield made
    finally:
        for name in made.names:
            pg_cluster.drop_database(name)


def _tables(url: str) -> dict[str, Any]:
    """What must not depend on how the files were shared out: the samples by series key, the
    series' seen spans, quarantined rows, the ledger per batch and its totals, pending rollups.
    (Ids, file names of replays, creation times and per-batch split of written / unchanged
    depend on which run wrote a shared point first; their totals do not.)"""
    with psycopg.connect(url) as conn:

        def rows(query: str) -> list[tuple[Any, ...]]:
            return conn.execute(query).fetchall()

        return {
            "samples": Counter(
                rows(
                    "SELECT s.series_key, x.ts, x.value FROM samples x "
                    "JOIN series s USING (series_id)"
                )
            ),
            "series": sorted(rows("SELECT series_key, first_seen, last_seen FROM series")),
            "spans_match_samples": rows(
                "SELECT s.series_key FROM series s JOIN (SELECT series_id, min(ts) lo, max(ts) hi "
                "FROM samples GROUP BY series_id) m USING (series_id) "
                "WHERE s.first_seen <> m.lo OR s.last_seen <> m.hi"
            ),
            "quarantine": Counter(rows("SELECT batch_id, reason, row_data FROM quarantine")),
            "ledger": sorted(
                rows(
                    "SELECT batch_id, status, rows_in, quarantined, min_ts, max_ts "
                    "FROM ingest_batches"
                )
            ),
            "ledger_totals": rows(
                "SELECT count(*), sum(written), sum(overwritten), sum(unchanged), "
                "sum(new_series) FROM ingest_batches"
            ),
            "rollup_pending": Counter(
                rows("SELECT start_ts, end_ts, batch_id FROM rollup_pending")
            ),
        }


# Forked runs reach their first claim up to seconds apart (Prefect's API under four runs
# starting at once; once, here, over a minute), and the first to claim may finish the 400
# files before the others claim. Sharing is shown by the first of these attempts in which at
# least two runs took files; every attempt must end with the sequential run's tables.
SHARING_ATTEMPTS = 3


@pytest.mark.timeout(900)
def test_four_parallel_runs_end_with_the_tables_of_one_sequential_run(
    children: ForkedRuns, databases: Databases, tmp_path: Path
) -> None:
    seed = int(os.environ.get("METRICMILL_PARALLEL_SEED") or time.time_ns() % 2**32)
    files = _landing_files(seed)
    one = tmp_path / "one"
    _land(one / "landing", files)
    sequential_url = databases.new()
    [sequential] = children.run_all(one, sequential_url, count=1, env=_parallel(1))
    expected = _tables(sequential_url)
    assert expected["samples"], "the sequential run stored nothing"
    assert expected["quarantine"], "the files' rejected rows were not quarantined"
    assert expected["spans_match_samples"] == []
    _assert_settled(one)

    all_shares: list[list[int]] = []
    for attempt in range(SHARING_ATTEMPTS):
        many, parallel_url = tmp_path / f"many-{attempt}", databases.new()
        _land(many / "landing", files)
        started = time.monotonic()
        results = children.run_all(many, parallel_url, count=RUNS, env=_parallel(RUNS))
        took = time.monotonic() - started

        # No run skipped: each held a slot of the ingest lock; between them they reported
        # every file once.
        assert all(r is not None for r in results), "a run skipped: it found no free slot"
        reported = Counter(row["source"] for rows in results for row in rows)
        assert reported == Counter(row["source"] for row in sequential), f"seed {seed}"
        assert set(reported.values()) == {1}, f"seed {seed}"
        replays = sum(row["replay"] for rows in results for row in rows)
        assert replays == sum(row["replay"] for row in sequential) > 0
        got = _tables(parallel_url)
        for table in expected:
            assert got[table] == expected[table], f"{table} differs (seed {seed})"
        _assert_settled(many)
        shares = [len(rows) for rows in results]
        all_shares.append(shares)
        print(f"seed {seed}: {RUNS} runs took {shares} files in {took:.1f}s")
        if sum(share > 0 for share in shares) >= 2:  # they worked side by side
            break
    assert sum(share > 0 for share in all_shares[-1]) >= 2, (
        f"one run took every file in each of {SHARING_ATTEMPTS} attempts: {all_shares}"
    )


def _assert_settled(home: Path) -> None:
    landing = home / "landing"
    assert sorted(p.name for p in landing.iterdir()) == ["done", "processing"]
    assert [p for p in (landing / "processing").iterdir() if p.name != ".lock"] == []
    assert len(list((landing / "done").iterdir())) == FILES


def test_a_slot_per_run_and_the_next_run_skips(
    pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = f"slots_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    try:
        isolate_settings(monkeypatch, ingest_max_parallel_runs=2)
        settings = load_settings(database_url=pg_cluster.url(name), home=tmp_path)
        assert settings.ingest_parallel_runs == 2
        with (
            exclusive_run(settings, "ingest") as first,
            exclusive_run(settings, "ingest") as second,
        ):
            assert first is None and second is None
            assert lock_holders(settings) == ["ingest", "ingest"]
            with exclusive_run(settings, "ingest") as third:
                assert third is not None and "2 other ingest runs are in progress" in third
            # Other flows keep one run at a time.
            with (
                exclusive_run(settings, "rollup") as rollup,
                flow_lock(settings, "rollup") as again,
            ):
                assert rollup is None and again is False
        with exclusive_run(settings, "ingest") as later:  # the slots are free again
            assert later is None
    finally:
        pg_cluster.drop_database(name)


def test_sqlite_keeps_one_ingest_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_settings(monkeypatch, ingest_max_parallel_runs=4)
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/m.db", home=tmp_path)
    assert settings.ingest_max_parallel_runs == 4
    assert settings.ingest_parallel_runs == 1  # clamped: one writer per SQLite file
    with exclusive_run(settings, "ingest") as first, exclusive_run(settings, "ingest") as second:
        assert first is None
        assert second == "skipped: another ingest run is in progress"


def test_parallel_claims_take_a_share_and_let_the_next_run_claim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("storage.landing.CLAIM_WAIT_SECONDS", 0.2)
    landing = tmp_path / "landing"
    _land(landing, [(f"f{n:02d}.ndjson", b"{}\n") for n in range(10)])
    first = claim_files(landing, settle_seconds=0, parallel=4)
    second = claim_files(landing, settle_seconds=0, parallel=4)  # not busy: first is claimed
    try:
        assert not second.busy
        assert [p.name for p in first.files] == [f"f{n:02d}.ndjson" for n in range(3)]
        # 7 left for the 3 runs besides the one holding a claim: 3 of them.
        assert [p.name for p in second.files] == [f"f{n:02d}.ndjson" for n in range(3, 6)]
        # One run at a time (parallel=1) holds the landing for its whole run.
        solo = claim_files(landing, settle_seconds=0)
        try:
            assert len(solo.files) == 4
            assert claim_files(landing, settle_seconds=0).busy
            # A parallel run waits a while for the landing, then takes nothing.
            assert claim_files(landing, settle_seconds=0, parallel=4).busy
        finally:
            solo.release()
    finally:
        first.release()
        second.release()


def test_ingest_max_parallel_runs_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_settings(monkeypatch, ingest_max_parallel_runs=0)
    with pytest.raises(Exception, match="METRICMILL_INGEST_MAX_PARALLEL_RUNS: must be a positive"):
        load_settings()


def test_a_late_mark_sees_a_sample_committed_while_the_batch_was_writing(
    pg_only_target: DbTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Series at t=10 min; a batch with t=15 starts (it reads last seen = 10) while another
    writer holds the series row; that writer commits t=20. The batch's t=15 is then behind a
    committed sample: it must leave a detect_late mark, and the span must end at 20."""
    isolate_settings(monkeypatch, timescaledb=pg_only_target.timescaledb)
    url = pg_only_target.url
    base = pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(hours=2)

    def sample(minutes: int) -> pd.DataFrame:
        ts = base + pd.Timedelta(minutes=minutes)
        return pd.DataFrame(
            {"metric": ["late_m"], "labels": [{"h": "a"}], "ts": [ts], "value": [1.0]}
        )

    with Store.open(url) as store:
        store.write_samples(sample(10), batch_id="first")
    with psycopg.connect(url) as other:
        [(sid,)] = other.execute("SELECT series_id FROM series").fetchall()
        other.execute("SELECT 1 FROM series WHERE series_id = %s FOR UPDATE", (sid,))
        errors: list[BaseException] = []

        def write_behind() -> None:
            try:
                with Store.open(url) as store:
                    store.write_samples(sample(15), batch_id="behind")
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=write_behind)
        writer.start()
        deadline = time.monotonic() + 60
        with psycopg.connect(url, autocommit=True) as watch:
            while not watch.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchall():
                assert time.monotonic() < deadline and writer.is_alive(), errors
                time.sleep(0.05)
        # The other writer's sample at 20 commits while the batch waits for the series row.
        other.execute(
            "INSERT INTO samples (series_id, ts, value) VALUES (%s, %s, 2.0)",
            (sid, base + pd.Timedelta(minutes=20)),
        )
        other.execute(
            "UPDATE series SET last_seen = %s WHERE series_id = %s",
            (base + pd.Timedelta(minutes=20), sid),
        )
        other.commit()
        writer.join(60)
    assert not errors and not writer.is_alive()
    with psycopg.connect(url) as conn:
        marks = conn.execute("SELECT series_id, from_ts FROM detect_late").fetchall()
        span = conn.execute("SELECT first_seen, last_seen FROM series").fetchone()
    assert marks == [(sid, base + pd.Timedelta(minutes=15))]
    assert span == (base + pd.Timedelta(minutes=10), base + pd.Timedelta(minutes=20))
