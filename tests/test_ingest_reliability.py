"""Reliability of the `ingest` flow: kill -9 at random points, PostgreSQL crashing mid-batch,
two runs at once. Every test ends by comparing the database and the directories with the
source files: every sample exactly once, every file once in done/ or quarantine/.

Importing the flow stack and warming Great Expectations cost tens of seconds, so this process
does it once; every flow run is an `os.fork()` of it that runs the real Prefect flow (against
the session's test Prefect server, whose URL the child inherits in memory) and `os._exit`s
(tests/forked_runs.py, shared with tests/test_ingest_parallel.py). The parent SIGKILLs children
it wants dead and only ever signals or reaps pids it forked.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.json as pa_json
import pytest

from metricmill.devtools.pgcluster import PgCluster
from storage.store import Store
from tests.forked_runs import ForkedRuns, tail, warm_ingest
from tests.settings_env import isolate_settings

# -- source files ------------------------------------------------------------------------------

BROKEN_FILE = "broken.ndjson"  # not UTF-8: the reader cannot decode it -> quarantine
RUN_TIMEOUT = 300.0  # seconds a flow run that is not killed may take


@dataclass
class Source:
    """The files of a landing directory, and what the database must hold after ingesting them."""

    directory: Path
    good: list[str]
    bad: list[str]
    samples: int
    series: int

    def copy_to(self, landing: Path) -> None:
        landing.mkdir(parents=True, exist_ok=True)
        for name in self.good + self.bad:
            shutil.copyfile(self.directory / name, landing / name)

    def digests(self) -> dict[str, str]:
        return {
            name: hashlib.sha256((self.directory / name).read_bytes()).hexdigest()
            for name in self.good
        }

    def frame(self) -> pd.DataFrame:
        """The samples of the readable files, read back from the files (pyarrow's JSON reader:
        exact doubles, and seconds rather than minutes for 300,000 lines)."""
        options = pa_json.ParseOptions(
            explicit_schema=pa.schema(
                [("metric", pa.string()), ("ts", pa.string()), ("value", pa.float64())]
            ),
            unexpected_field_behavior="infer",
        )
        frames = []
        for name in self.good:
            table = pa_json.read_json(self.directory / name, parse_options=options)
            frames.append(
                pd.DataFrame(
                    {
                        "metric": table.column("metric").to_pylist(),
                        "labels": _canonical_label_column(table.column("labels").to_pylist()),
                        "ts_us": _iso_to_us(table.column("ts").to_pandas()),
                        "value": table.column("value").to_numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


def make_source(
    directory: Path, *, files: int, series: int, steps: int, seed: int, broken: bool = True
) -> Source:
    """`files` NDJSON files of `series` x `steps` samples, each file its own series and times.

    Timestamps are ISO 8601 with microseconds, within the last two days (inside the retention
    window, never in the future); values are random with three decimals.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    start_us = (int(time.time()) - 2 * 86_400) * 1_000_000
    good = []
    for k in range(files):
        name = f"batch-{k:03d}.ndjson"
        ts_us = start_us + k * 1_001 + np.arange(steps, dtype=np.int64) * 60_000_000
        ts = pd.to_datetime(ts_us, unit="us", utc=True).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        values = np.round(rng.uniform(-1e6, 1e6, size=(series, steps)), 3)
        ts_json = [json.dumps(t) for t in ts]
        lines = []
        for s in range(series):
            labels = {"file": f"f{k:03d}", "host": f"h{s:04d}", "zone": "z" + str(s % 3)}
            record = {"metric": f"reliability_metric_{s % 4}", "labels": labels}
            head = json.dumps(record)[:-1] + ', "ts": '
            # repr(float) is what json.dumps writes for a float
            lines.extend(
                f'{head}{t}, "value": {float(v)!r}}}'
                for t, v in zip(ts_json, values[s], strict=True)
            )
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        good.append(name)
    bad = []
    if broken:
        (directory / BROKEN_FILE).write_bytes(b"\xff\xfe\x00\x9c not utf-8 \xc3\x28\n")
        bad.append(BROKEN_FILE)
    return Source(directory, good, bad, samples=files * series * steps, series=files * series)


def _iso_to_us(column: pd.Series) -> np.ndarray:
    parsed = pd.to_datetime(column, utc=True, format="ISO8601").dt.tz_localize(None)
    return parsed.to_numpy(dtype="datetime64[us]").view("int64")


def _canonical_labels(labels: Any) -> str:
    if isinstance(labels, str):
        labels = json.loads(labels)
    clean = {k: v for k, v in labels.items() if v is not None}  # pyarrow: absent key -> None
    return json.dumps(clean, sort_keys=True, separators=(",", ":"))


def _canonical_label_column(values: list[Any]) -> list[str]:
    """Canonical JSON per row, computed once per distinct label set."""
    memo: dict[Any, str] = {}
    out = []
    for labels in values:
        key = labels if isinstance(labels, str) else tuple(labels.items())
        text = memo.get(key)
        if text is None:
            text = memo[key] = _canonical_labels(labels)
        out.append(text)
    return out


def checksum(frame: pd.DataFrame) -> int:
    """Order-independent: the sum (mod 2**64) of one hash per (metric, labels, ts, value)."""
    if frame.empty:
        return 0
    columns = frame[["metric", "labels", "ts_us", "value"]].astype(
        {"metric": object, "labels": object, "ts_us": "int64", "value": "float64"}
    )
    hashes = pd.util.hash_pandas_object(columns, index=False).to_numpy(dtype=np.uint64)
    return int(hashes.sum(dtype=np.uint64))


# -- the database, read without metricmill's storage code ------------------------------------


@dataclass
class DbState:
    samples: pd.DataFrame
    series: int
    ledger: dict[str, tuple[str, int]]  # batch_id -> (status, rows_in)
    pending_batches: set[str]  # batch ids with rollup_pending rows
    quarantined_rows: int


def read_db(url: str) -> DbState:
    if url.startswith("sqlite:///"):
        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"))
        samples_sql = (
            "SELECT r.metric, r.labels, s.ts, s.value FROM samples s "
            "JOIN series r ON r.series_id = s.series_id"
        )
    else:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        samples_sql = (
            "SELECT r.metric, r.labels::text, (extract(epoch FROM s.ts) * 1000000)::bigint, "
            "s.value FROM samples s JOIN series r ON r.series_id = s.series_id"
        )
    try:

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return list(conn.execute(sql).fetchall())

        tables = {
            r[0]
            for r in rows(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                if url.startswith("sqlite:///")
                else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        if "samples" not in tables:  # no run got as far as creating the schema
            empty = pd.DataFrame(columns=["metric", "labels", "ts_us", "value"])
            return DbState(empty, 0, {}, set(), 0)
        samples = pd.DataFrame(rows(samples_sql), columns=["metric", "labels", "ts_us", "value"])
        samples["labels"] = _canonical_label_column(samples["labels"].tolist())
        return DbState(
            samples=samples,
            series=rows("SELECT count(*) FROM series")[0][0],
            ledger={
                b: (status, int(n))
                for b, status, n in rows("SELECT batch_id, status, rows_in FROM ingest_batches")
            },
            pending_batches={r[0] for r in rows("SELECT DISTINCT batch_id FROM rollup_pending")},
            quarantined_rows=rows("SELECT count(*) FROM quarantine")[0][0],
        )
    finally:
        conn.close()


def sample_diff(expected: pd.DataFrame, actual: pd.DataFrame) -> str:
    """Lost / duplicated / unexpected sample counts, for an assertion message."""
    keys = ["metric", "labels", "ts_us"]
    dup = int(actual.duplicated(keys).sum())
    merged = expected.merge(actual.drop_duplicates(keys), on=keys, how="outer", indicator=True)
    lost = int((merged["_merge"] == "left_only").sum())
    extra = int((merged["_merge"] == "right_only").sum())
    both = merged[merged["_merge"] == "both"]
    wrong = int((both["value_x"] != both["value_y"]).sum())
    return f"lost {lost}, duplicated {dup}, unexpected {extra}, wrong value {wrong}"


def assert_database_holds_exactly(url: str, source: Source) -> None:
    """Every source sample once, nothing else; one committed ledger row per file, each with
    its rollup_pending rows (written in the same transaction)."""
    state = read_db(url)
    expected = source.frame()
    got = state.samples
    assert len(expected) == source.samples
    same = len(got) == len(expected) and checksum(got) == checksum(expected)
    assert same, (
        f"database holds {len(got)} samples, the files {len(expected)}: "
        f"{sample_diff(expected, got)}"
    )
    assert not got.duplicated(["metric", "labels", "ts_us"]).any()
    assert state.series == source.series
    assert state.quarantined_rows == 0
    digests = source.digests()
    rows_per_file = source.samples // len(source.good)
    assert state.ledger == {d: ("committed", rows_per_file) for d in digests.values()}
    assert state.pending_batches == set(digests.values())


def assert_files_settled(home: Path, source: Source) -> None:
    """Each readable file once in done/ (unchanged), each unreadable one in quarantine/ with
    a .reason; nothing left in landing/ or landing/processing/."""
    landing = home / "landing"
    done = sorted(p.name for p in (landing / "done").glob("*"))
    assert done == sorted(source.good), f"done/ holds {done}"
    for name in source.good:
        assert (landing / "done" / name).read_bytes() == (source.directory / name).read_bytes()
    quarantine = home / "quarantine"
    names = sorted(p.name for p in quarantine.iterdir()) if quarantine.exists() else []
    assert names == sorted([*source.bad, *(f"{n}.reason" for n in source.bad)]), names
    for name in source.bad:
        reason = (quarantine / f"{name}.reason").read_text(encoding="utf-8")
        assert reason.startswith("unreadable_file\n"), reason
    left = sorted(p.name for p in landing.iterdir() if p.is_file())
    assert left == [], f"files left in landing/: {left}"
    processing = landing / "processing"
    stuck = (
        sorted(
            str(p.relative_to(processing))
            for p in processing.rglob("*")
            if p.is_file() and p.name != ".lock"
        )
        if processing.exists()
        else []
    )
    assert stuck == [], f"files left in landing/processing/: {stuck}"


# -- flow runs in forked children --------------------------------------------------------------


@dataclass
class RunProfile:
    claimed: float
    first_done: float
    last_done: float
    ended: float
    files: int  # files moved to done/

    @property
    def per_file(self) -> float:
        """Seconds between two files reaching done/, once the first is through."""
        return (self.last_done - self.first_done) / max(self.files - 1, 1)

    def __str__(self) -> str:
        return (
            f"claimed at {self.claimed:.2f}s, first file done at {self.first_done:.2f}s, "
            f"{self.per_file:.2f}s per file after it, ended at {self.ended:.2f}s"
        )


class FlowRuns(ForkedRuns):
    """Forked ingest runs (tests/forked_runs.py), watched through the landing directory."""

    def profile(self, home: Path, url: str) -> RunProfile:
        """One run to completion (it must succeed), timing when it claimed, when the first
        and the last file reached done/, and when it ended (seconds after the fork)."""
        done = home / "landing" / "done"
        processing = home / "landing" / "processing"
        started = time.monotonic()
        pid, log = self.start(home, url)
        marks: dict[str, float] = {}
        files = 0
        code = None
        while code is None:
            now = time.monotonic() - started
            if "claimed" not in marks and any(processing.glob(f"*-{pid}-*")):
                marks["claimed"] = now
            count = len(os.listdir(done)) if done.exists() else 0
            if count > files:
                marks.setdefault("first_done", now)
                marks["last_done"] = now
                files = count
            code = self.wait(pid, 0)
            assert now < RUN_TIMEOUT, "flow run did not end"
            time.sleep(0.002)
        assert code == 0, f"flow run exited with {code}:\n{tail(log)}"
        ended = time.monotonic() - started
        return RunProfile(
            claimed=marks.get("claimed", 0.0),
            first_done=marks.get("first_done", ended),
            last_done=marks.get("last_done", ended),
            ended=ended,
            files=files,
        )

    def wait_for_claim(self, pid: int, home: Path, timeout: float) -> int | None:
        """Wait until the child's claim directory exists: None, or its exit code if it ended
        first (a run with nothing to claim removes its claim again at once)."""
        processing = home / "landing" / "processing"
        deadline = time.monotonic() + timeout
        while not any(processing.glob(f"*-{pid}-*")):
            code = self.wait(pid, 0)
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.002)
        return None


@pytest.fixture(scope="module")
def warm_process() -> None:
    """Import and build Great Expectations once in this process; forked runs inherit it."""
    warm_ingest()


@pytest.fixture
def flow_runs(
    prefect_server: None, warm_process: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[FlowRuns]:
    """Forked flow runs, with the environment they inherit: no settle time, no config file."""
    # no settle time; plain PostgreSQL tables
    isolate_settings(monkeypatch, settle_seconds=0, timescaledb="off")
    runs = FlowRuns(tmp_path / "logs", RUN_TIMEOUT)
    try:
        yield runs
    finally:
        runs.close()


@dataclass
class Databases:
    """Fresh empty databases of one backend, made on demand (server ones dropped at teardown)."""

    backend: str
    tmp_path: Path
    cluster: PgCluster | None = None
    created: list[str] = field(default_factory=list)

    def new(self, tag: str) -> str:
        if self.cluster is None:
            return f"sqlite:///{self.tmp_path / f'{tag}.db'}"
        name = f"rel_{tag}_{uuid.uuid4().hex[:8]}"
        self.cluster.create_database(name)
        self.created.append(name)
        return self.cluster.url(name)


@pytest.fixture(params=["sqlite", "postgres"])
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    if request.param == "sqlite":
        yield Databases("sqlite", tmp_path)
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    dbs = Databases("postgres", tmp_path, cluster)
    try:
        yield dbs
    finally:
        for name in dbs.created:
            cluster.drop_database(name)


def _seed() -> int:
    return int(os.environ.get("METRICMILL_RELIABILITY_SEED") or time.time_ns() % 2**32)


# -- 1. kill -9 at random points ---------------------------------------------------------------

# SQLite gets 20 kill trials; PostgreSQL 5, to keep the test's time down (each trial is a real
# flow run against the Prefect test server).
KILL_TRIALS = {"sqlite": 20, "postgres": 5}
EARLY_KILLS = 0.3  # share of runs killed within an idle run's duration after their start
KILL_WINDOW_FILES = 3  # the others within the first file's time + this many files' after claiming


@dataclass
class Trial:
    early: bool  # killed counting from its start, else counting from its claim
    delay: float
    at: float  # seconds after the fork the run was killed (or ended)
    killed: bool  # False: the run ended before the delay (and must have succeeded)
    left_before: int  # files not yet in done/ or quarantine/ when the run started
    left_after: int
    stranded: int  # files the run left in its claim, for the next run to adopt

    def __str__(self) -> str:
        end = "killed" if self.killed else "ended"
        mode = "after start" if self.early else "after claim"
        return (
            f"{end} at {self.at:.2f}s ({self.delay:.2f}s {mode}): "
            f"{self.left_before}->{self.left_after} left, {self.stranded} stranded"
        )


def _unsettled(home: Path, source: Source) -> int:
    settled = {p.name for p in (home / "landing" / "done").glob("*")}
    settled |= {p.name for p in (home / "quarantine").glob("*")}
    return sum(name not in settled for name in source.good + source.bad)


def _stranded(home: Path) -> int:
    processing = home / "landing" / "processing"
    return sum(p.is_file() and p.name != ".lock" for p in processing.rglob("*"))


@pytest.mark.timeout(900)
def test_kill_9_at_random_points_loses_and_duplicates_nothing(
    databases: Databases, flow_runs: FlowRuns, tmp_path: Path
) -> None:
    seed = _seed()
    rng = random.Random(seed)
    source = make_source(tmp_path / "source", files=24, series=10, steps=50, seed=seed)

    # Unkilled runs over a separate copy: a full run, timed, then a rerun with nothing left to
    # do (which must change nothing). Their timings bound the kill delays.
    measure_home = tmp_path / "measure"
    source.copy_to(measure_home / "landing")
    measure_url = databases.new("measure")
    full_run = flow_runs.profile(measure_home, measure_url)
    idle_run = flow_runs.run(measure_home, measure_url)
    assert_database_holds_exactly(measure_url, source)
    assert_files_settled(measure_home, source)

    # The trials share one landing directory and database: each run resumes what the killed
    # ones left, adopting their claims. A delay drawn from [0, full run) would let the first
    # two or three runs finish the directory, leaving every later kill to runs with nothing to
    # do; and a run's startup (Prefect, fork, a loaded machine) varies by seconds. So a share of
    # the runs is killed at a random point of an idle run's duration from its start (startup,
    # claim, adoption), the others at a random point between their claim and the time a few
    # files take after it (reads, checks, write transactions, moves); the last trials may find
    # the directory settled and be killed in a run with nothing to do.
    after_claim = full_run.first_done - full_run.claimed + KILL_WINDOW_FILES * full_run.per_file
    home = tmp_path / "home"
    source.copy_to(home / "landing")
    url = databases.new("trials")
    trials: list[Trial] = []
    for _ in range(KILL_TRIALS[databases.backend]):
        left = _unsettled(home, source)
        early = rng.random() < EARLY_KILLS
        delay = rng.uniform(0.0, idle_run if early else after_claim)
        started = time.monotonic()
        pid, log = flow_runs.start(home, url)
        code = None if early else flow_runs.wait_for_claim(pid, home, RUN_TIMEOUT)
        if code is None:
            code = flow_runs.wait(pid, delay)
        at = time.monotonic() - started
        if code is None:
            flow_runs.kill(pid)
        else:
            # A run nobody killed must not fail, whatever the runs before it left behind.
            assert code == 0, f"seed {seed}: unkilled run exited with {code}:\n{tail(log)}"
        trials.append(
            Trial(early, delay, at, code is None, left, _unsettled(home, source), _stranded(home))
        )
    flow_runs.run(home, url)  # the clean run that finishes whatever is left

    report = (
        f"{databases.backend}, seed {seed}: full run {full_run}; idle run {idle_run:.2f}s;"
        f" {sum(t.killed for t in trials)}/{len(trials)} runs killed, "
        f"{sum(t.killed and t.stranded > 0 for t in trials)} of them holding claimed files\n"
        + "\n".join(f"  trial {i}: {t}" for i, t in enumerate(trials, start=1))
    )
    try:
        assert_database_holds_exactly(url, source)
        assert_files_settled(home, source)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{report}") from None
    print(report)


# -- 2. PostgreSQL stopped with -m immediate in the middle of a batch --------------------------

BIG_SERIES = 1_000
BIG_STEPS = 300  # 300,000 samples in one file
_IN_FLIGHT = (
    "SELECT query FROM pg_stat_activity WHERE datname = %s AND backend_xid IS NOT NULL "
    "AND pid <> pg_backend_pid()"
)


@pytest.mark.timeout(900)
def test_postgres_immediate_stop_mid_batch_is_all_or_nothing(
    pg_cluster: PgCluster, flow_runs: FlowRuns, tmp_path: Path
) -> None:
    # A dedicated cluster (the session cluster's binaries): the shared one is never stopped.
    cluster = PgCluster(tmp_path / "crash-pg", bindir=pg_cluster.bindir)
    cluster.start()
    try:
        dbname = "crash"
        cluster.create_database(dbname)
        url = cluster.url(dbname)
        source = make_source(
            tmp_path / "source",
            files=1,
            series=BIG_SERIES,
            steps=BIG_STEPS,
            seed=_seed(),
            broken=False,
        )
        home = tmp_path / "home"
        source.copy_to(home / "landing")
        # The schema exists beforehand (as in any deployment), so the first transaction that
        # writes during the run is the batch's.
        Store.open(url, timescaledb="off").close()

        pid, log = flow_runs.start(home, url)
        caught = ""  # what the batch's transaction was doing when the server was stopped
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as watch:
            deadline = time.monotonic() + RUN_TIMEOUT
            opened: float | None = None
            while not caught:
                # Wait for the batch's write transaction, then for its COPY into samples (if
                # that goes unseen for 10 s, stop anyway; if the transaction is gone, it beat us).
                queries = [r[0] for r in watch.execute(_IN_FLIGHT, (dbname,)).fetchall()]
                copying = [q for q in queries if q.lstrip().upper().startswith("COPY SAMPLES")]
                if queries and opened is None:
                    opened = time.monotonic()
                if copying:
                    caught = copying[0]
                elif queries and opened is not None and time.monotonic() - opened > 10:
                    caught = queries[0]
                elif opened is not None and not queries:
                    caught = "(the transaction had committed)"
                else:
                    code = flow_runs.wait(pid, 0)
                    assert code is None, f"run ended ({code}) before it wrote:\n{tail(log)}"
                    assert time.monotonic() < deadline, "no write transaction seen"
                    time.sleep(0.002)
        cluster.stop(mode="immediate")
        try:
            # The run loses its connection; its retries find no server and it gives up.
            code = flow_runs.wait(pid, 120)
            if code is None:
                flow_runs.kill(pid)
        finally:
            cluster.start()

        state = read_db(url)
        digest = next(iter(source.digests().values()))
        stopped = f"server stopped during {caught[:60]!r}, the run then exited with {code}"
        assert len(state.samples) in (0, source.samples), (
            f"partial batch visible: {len(state.samples)} of {source.samples} samples; {stopped}"
        )
        print(f"{stopped}; after the restart {len(state.samples)} samples")
        if len(state.samples) == 0:
            assert state.ledger == {} and state.series == 0 and not state.pending_batches
        else:  # the commit beat the stop
            assert state.ledger == {digest: ("committed", source.samples)}
        processing = home / "landing" / "processing"
        assert not any(p.is_file() for p in (home / "landing").iterdir())
        if len(state.samples) == 0:
            # Not written: the file must still be claimable (left in a dead run's claim).
            assert [p.name for p in processing.rglob("*.ndjson")] == source.good

        flow_runs.run(home, url)  # the next run completes the work
        assert_database_holds_exactly(url, source)
        assert_files_settled(home, source)
    finally:
        cluster.close()


# -- 3. two runs at once -----------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_two_runs_at_once_end_like_one(
    databases: Databases, flow_runs: FlowRuns, tmp_path: Path
) -> None:
    source = make_source(tmp_path / "source", files=12, series=20, steps=50, seed=_seed())
    home = tmp_path / "home"
    landing = home / "landing"
    source.copy_to(landing)
    # A third of the files sit in the claim of a dead run, as kill -9 leaves them: both runs
    # race to adopt it as well as to claim the rest.
    dead_claim = landing / "processing" / "1700000000-99999-deadbeef"
    dead_claim.mkdir(parents=True)
    (dead_claim / ".lock").touch()
    for name in source.good[::3]:
        (landing / name).rename(dead_claim / name)
    url = databases.new("concurrent")
    read_end, write_end = os.pipe()
    try:
        first, first_log = flow_runs.start(home, url, gate=read_end)
        second, second_log = flow_runs.start(home, url, gate=read_end)
        os.write(write_end, b"go")  # release both at once
        codes = [flow_runs.wait(first, RUN_TIMEOUT), flow_runs.wait(second, RUN_TIMEOUT)]
    finally:
        os.close(read_end)
        os.close(write_end)
    logs = f"{tail(first_log)}\n---\n{tail(second_log)}"
    assert codes == [0, 0], f"exit codes {codes}:\n{logs}"
    assert_database_holds_exactly(url, source)
    assert_files_settled(home, source)
    assert not dead_claim.exists()
    # A run that found the other holding the ingest flow's lock is Skipped (no rows: null);
    # between them the runs report every file exactly once.
    results = [json.loads(log.read_text(encoding="utf-8")) for log in (first_log, second_log)]
    shares = [None if rows is None else len(rows) for rows in results]
    reported = sorted(row["source"] for rows in results if rows is not None for row in rows)
    assert reported == sorted(f"file:{name}" for name in source.good + source.bad), shares
    print(f"{databases.backend}: the two runs ingested {shares} sources (None: skipped)")


# -- 4. files with overlaps landing while runs are killed and PostgreSQL restarts ---------------

FAULT_FILES = 36
FAULT_TRIALS = 8
FAULT_SERIES = 12
FAULT_TIMES = 20


def _fault_files(seed: int) -> list[tuple[str, bytes, dict[tuple[str, int], float]]]:
    """(name, bytes, samples) in landing order: every file overlaps others (few series, few
    times), some correct earlier values, some are exact copies of earlier files (replays)."""
    rng = random.Random(seed)
    start_s = int(time.time()) - 86_400
    files: list[tuple[str, bytes, dict[tuple[str, int], float]]] = []
    for n in range(FAULT_FILES):
        if files and rng.random() < 0.15:
            _, data, samples = rng.choice(files)
            files.append((f"copy-{n:03d}.ndjson", data, samples))
            continue
        samples = {}
        for _ in range(rng.randint(20, 80)):
            host = f"h{rng.randrange(FAULT_SERIES)}"
            ts_s = start_s + 60 * rng.randrange(FAULT_TIMES)
            samples[(host, ts_s)] = float(rng.randint(0, 9))
        lines = [
            json.dumps({"metric": "fault_m", "labels": {"host": h}, "ts": t, "value": v})
            for (h, t), v in samples.items()
        ]
        files.append((f"file-{n:03d}.ndjson", ("\n".join(lines) + "\n").encode(), samples))
    return files


def _fault_expected(files: list[tuple[str, bytes, dict[tuple[str, int], float]]]) -> dict:
    """The oracle: files applied one by one in landing order, a repeated content a replay."""
    state: dict[tuple[str, int], float] = {}
    seen: set[bytes] = set()
    for _, data, samples in files:
        if data not in seen:
            seen.add(data)
            state.update(samples)
    return state


def _fault_stored(url: str) -> dict[tuple[str, int], float]:
    start = datetime.now(UTC) - timedelta(days=2)
    with Store.open(url, timescaledb="auto") as store:
        frame = store.query("fault_m", None, start, datetime.now(UTC))
    return {
        (labels["host"], int(ts.timestamp())): float(value)
        for labels, ts, value in zip(frame["labels"], frame["ts"], frame["value"], strict=True)
    }


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavour", ["sqlite", "postgres", "timescaledb"])
def test_overlapping_files_survive_kills_and_database_restarts(
    pg_cluster: PgCluster,
    flow_runs: FlowRuns,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flavour: str,
) -> None:
    """Files land while runs are SIGKILLed and a durable PostgreSQL is stopped with
    `-m immediate` and restarted: at the end every sample is there once with the value of the
    last file (in landing order) that holds it, and nothing is left in processing/. (SQLite:
    the kills alone.)"""
    if flavour == "timescaledb" and not pg_cluster.preload_timescaledb:
        if os.environ.get("METRICMILL_REQUIRE_TIMESCALEDB", "").lower() in {"1", "true", "yes"}:
            pytest.fail("TimescaleDB is not installed for this PostgreSQL", pytrace=False)
        pytest.skip("TimescaleDB is not installed for this PostgreSQL")
    monkeypatch.setenv("METRICMILL_TIMESCALEDB", "require" if flavour == "timescaledb" else "off")
    seed = _seed()
    rng = random.Random(seed)
    cluster = PgCluster(
        tmp_path / "fault-pg",
        bindir=pg_cluster.bindir,
        preload_timescaledb=flavour == "timescaledb",
        durable=True,
    )
    if flavour != "sqlite":
        cluster.start()
    try:
        if flavour == "sqlite":
            url = f"sqlite:///{tmp_path / 'fault.db'}"
        else:
            cluster.create_database("fault")
            url = cluster.url("fault")
        Store.open(url, timescaledb="auto").close()
        files = _fault_files(seed)
        home = tmp_path / "home"
        landing = home / "landing"
        landing.mkdir(parents=True)
        clock = time.time_ns() - 10**12
        landed = 0
        kills = restarts = 0

        def land(count: int) -> None:
            nonlocal landed, clock
            for name, data, _ in files[landed : landed + count]:
                path = landing / name
                path.write_bytes(data)
                clock += 10**6
                os.utime(path, ns=(clock, clock))
            landed = min(landed + count, len(files))

        for _ in range(FAULT_TRIALS):
            land(rng.randint(3, 7))
            pid, log = flow_runs.start(home, url)
            fault = rng.choice(["kill", "restart", "restart", "none"])
            if flavour == "sqlite" and fault == "restart":
                fault = "kill"
            code = flow_runs.wait(pid, rng.uniform(0.5, 4.0))
            if code is None and fault == "kill":
                flow_runs.kill(pid)
                kills += 1
                continue
            if code is None and fault == "restart":
                cluster.stop(mode="immediate")
                land(rng.randint(1, 3))  # files keep landing while the database is away
                time.sleep(rng.uniform(0.5, 3.0))
                cluster.start()
                restarts += 1
            if code is None:
                code = flow_runs.wait(pid, RUN_TIMEOUT)
            # A run that rode out the restart, or that was never disturbed, ends well.
            assert code == 0, f"seed {seed}: run exited with {code}:\n{tail(log)}"
        land(len(files))
        flow_runs.run(home, url)

        stored = _fault_stored(url)
        expected = _fault_expected(files)
        wrong = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
        extra = set(stored) - set(expected)
        report = (
            f"{flavour}, seed {seed}: {len(files)} files "
            f"({sum(n.startswith('copy') for n, _, _ in files)} copies), "
            f"{len(expected)} distinct samples, {kills} kills, {restarts} restarts"
        )
        assert not wrong and not extra, f"{report}: wrong {list(wrong.items())[:5]}, extra {extra}"
        done = {p.name for p in (landing / "done").iterdir()}
        assert done == {name for name, _, _ in files}, report
        processing = landing / "processing"
        left = [p for p in processing.rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert left == [], report
        print(report)
    finally:
        cluster.close()
