"""The `ingest` Prefect flow end to end: landing files, caller samples, quarantine, exactly-once.

Every bad input must end with its reason in quarantine (a table row, or the file in the
quarantine directory beside a `.reason` file), the rest of the batch landed, and the flow run
Completed. The core cases run on every backend (db_target); the format edge cases on SQLite
only, all in one flow run (a module fixture) to keep the file fast.
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import Artifact
from pydantic import TypeAdapter

from flows.ingest import ingest
from metricmill.errors import QueryError
from metricmill.settings import load_settings
from storage.store import Store
from tasks.ingest_files import TASK_BYTES, TASK_FILES, group_files
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

# Sample times: well inside retention, well before now (the future-skew limit is 10 minutes).
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
T = NOW - timedelta(minutes=30)
WINDOW = (T - timedelta(hours=1), NOW + timedelta(hours=1))
T_ISO = T.isoformat()
T_S = int(T.timestamp())
T_NS = T_S * 1_000_000_000
ONE_MB = 1_000_000


# -- helpers ----------------------------------------------------------------------------------
def clean_env(mp: pytest.MonkeyPatch, **settings: object) -> None:
    """None of the caller's METRICMILL_* settings; the given ones (METRICMILL_<NAME>) instead."""
    isolate_settings(mp, **settings)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    clean_env(monkeypatch, settle_seconds=0, max_new_series_per_batch=5000)
    return monkeypatch


@pytest.fixture
def target(db_target: DbTarget, env: pytest.MonkeyPatch) -> DbTarget:
    env.setenv("METRICMILL_TIMESCALEDB", db_target.timescaledb)
    return db_target


@dataclass
class Run:
    """A finished flow run: its id and the summary rows it returned, by source."""

    flow_run_id: UUID
    rows: dict[str, dict[str, Any]]


def run_flow(home: Path, database_url: str | None = None, **kwargs: Any) -> Run:
    kwargs.setdefault("scrape", False)
    state = asyncio.run(
        ingest(home=str(home), database_url=database_url, return_state=True, **kwargs)
    )
    assert state.is_completed(), state
    rows = state.result()
    assert isinstance(rows, list)
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    return Run(flow_run_id, {row["source"]: row for row in rows})


def open_store(home: Path, database_url: str | None = None) -> Store:
    return Store.open(settings=load_settings(home=home, database_url=database_url))


def write_ndjson(path: Path, records: list[dict[str, Any]], *, newline: str = "\n") -> Path:
    path.write_text("".join(json.dumps(r) + newline for r in records), encoding="utf-8", newline="")
    return path


def points(store: Store, metric: str) -> list[tuple[dict[str, str], datetime, float]]:
    frame = store.query(metric, None, *WINDOW)
    found = [(labels, ts.to_pydatetime(), value) for labels, ts, value in zip(
        frame["labels"], frame["ts"], frame["value"], strict=True
    )]  # fmt: skip
    return sorted(found, key=lambda p: (json.dumps(p[0], sort_keys=True), p[1]))


def quarantined(store: Store, source: str) -> list[tuple[str, Any]]:
    """(reason, row as received) of the table's quarantine entries of one source."""
    frame = store.quarantine(limit=100_000)
    chosen = frame[frame["source"] == source]
    return list(zip(chosen["reason"], chosen["row"], strict=True))


def reasons(store: Store, source: str) -> Counter[str]:
    return Counter(reason for reason, _ in quarantined(store, source))


def quarantined_file(home: Path, name: str) -> tuple[str, str]:
    """(reason, detail) of a file in the quarantine directory; it must be there."""
    directory = home / "quarantine"
    assert (directory / name).is_file(), sorted(p.name for p in directory.iterdir())
    reason, detail = (directory / f"{name}.reason").read_text(encoding="utf-8").split("\n", 1)
    return reason, detail.strip()


def done_names(home: Path) -> list[str]:
    done = home / "landing" / "done"
    return sorted(p.name for p in done.iterdir()) if done.is_dir() else []


def landing_files(home: Path) -> list[str]:
    """Files left in landing/ (and in unfinished claims), not in done/."""
    landing = home / "landing"
    left = [p.name for p in landing.iterdir() if p.is_file()]
    processing = landing / "processing"
    if processing.is_dir():
        left += [p.name for p in processing.rglob("*") if p.is_file() and p.name != ".lock"]
    return sorted(left)


def age(*paths: Path, seconds: float = 3600) -> None:
    """Set the files' mtime into the past: settled, ready to be claimed."""
    past = datetime.now(UTC).timestamp() - seconds
    for path in paths:
        os.utime(path, (past, past))


def artifact_keys(flow_run_id: UUID) -> set[str]:
    """Keys of the flow run's artifacts, as the Prefect API has them."""
    artifact_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=["ingest-summary", "ingest-quality"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
    )
    with get_client(sync_client=True) as client:
        # Not client.read_artifacts(): it sends null for the filters not given, which this
        # server rejects (422), and an empty task-run filter drops flow-level artifacts.
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": artifact_filter.model_dump(mode="json", exclude_unset=True)},
        )
    artifacts = TypeAdapter(list[Artifact]).validate_python(response.json())
    assert {a.flow_run_id for a in artifacts} <= {flow_run_id}
    return {a.key for a in artifacts if a.key}


# -- core cases: every backend ----------------------------------------------------------------
QUALITY_RECORDS: list[dict[str, Any]] = [
    {"metric": "cpu_usage", "labels": {"host": "a"}, "ts": T_ISO, "value": 1.5},
    {"metric": "cpu_usage", "labels": {"host": "b"}, "ts": T_ISO, "value": 2.5},
    {"metric": "cpu_usage", "labels": {"host": "a"}, "ts": T_ISO, "value": 1.5},  # identical
    {"metric": "mem_used", "labels": {"host": "a"}, "ts": T_ISO, "value": 1.0},  # conflicting
    {"metric": "mem_used", "labels": {"host": "a"}, "ts": T_ISO, "value": 2.0},  # conflicting
    {"metric": "cpu_usage", "labels": {"host": "c"}, "ts": T_ISO, "value": float("nan")},
    {"metric": "cpu_usage", "labels": {"host": "d"}, "ts": T_ISO, "value": float("inf")},
    {"metric": "cpu_usage", "labels": {"host": "e"}, "ts": T_ISO, "value": float("-inf")},
    {"metric": "cpu_usage", "labels": {"host": "f"}, "ts": "2099-01-01T00:00:00Z", "value": 1.0},
    {"metric": "cpu_usage", "labels": {"host": "x" * ONE_MB}, "ts": T_ISO, "value": 1.0},
]

LINE_PROTOCOL = (
    f"weather,location=us\\ midwest,code=a\\,b,eq=x\\=y temperature=82 {T_NS}\n"
    f"weather,location=us midwest temperature=83 {T_NS}\n"  # unescaped space: malformed
    f'sensor,host=a temp=21.5,status="ok",alive=true,count=12i {T_NS}\n'
    f'sensor,host=b note="only text" {T_NS}\n'  # no numeric field: no sample, not rejected
)


def land_core_files(landing: Path) -> list[str]:
    landing.mkdir(parents=True, exist_ok=True)
    write_ndjson(landing / "quality.ndjson", QUALITY_RECORDS)
    (landing / "hosts.csv").write_text(
        "metric,timestamp,value,host,region\n"
        f"disk_free_bytes,{T_S},100,a,eu\n"
        f"disk_free_bytes,{T_S},200,b,\n",
        encoding="utf-8",
    )
    (landing / "labels_json.csv").write_text(
        "metric,timestamp,value,labels\n"
        f'disk_used_bytes,{T_S},5,"{{""host"": ""a"", ""mount"": ""/var""}}"\n',
        encoding="utf-8",
    )
    pd.DataFrame(
        {
            "metric": ["net_rx_bytes", "net_rx_bytes"],
            "timestamp": pd.to_datetime([T, T], utc=True),
            "value": [100.0, 200.0],
            "host": ["a", "b"],
            "region": ["eu", None],
        }
    ).to_parquet(landing / "hosts.parquet")
    pd.DataFrame(
        {
            "metric": ["net_tx_bytes"],
            "timestamp": [T_S],
            "value": [7.0],
            "labels": [json.dumps({"host": "a", "mount": "/var"})],
        }
    ).to_parquet(landing / "labels_json.parquet")
    (landing / "escapes.lp").write_text(LINE_PROTOCOL, encoding="utf-8")
    return sorted(p.name for p in landing.iterdir() if p.is_file())


def test_landing_files_land_good_rows_quarantine_bad_ones_exactly_once(
    target: DbTarget, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    names = land_core_files(home / "landing")

    first = run_flow(home, target.url)

    assert set(first.rows) == {f"file:{n}" for n in names}
    assert landing_files(home) == []
    assert done_names(home) == names  # every file was readable
    assert artifact_keys(first.flow_run_id) == {"ingest-summary", "ingest-quality"}
    with open_store(home, target.url) as store:
        # NDJSON: the good rows land (the identical repeat once), each bad row has its reason
        assert points(store, "cpu_usage") == [({"host": "a"}, T, 1.5), ({"host": "b"}, T, 2.5)]
        with pytest.raises(QueryError):
            store.query("mem_used", None, *WINDOW)  # both conflicting rows were quarantined
        assert reasons(store, "file:quality.ndjson") == {
            "conflicting_values_in_batch": 2,
            "non_finite_value": 3,
            "timestamp_in_future": 1,
            "label_value_too_long": 1,
        }
        long_label = [
            row for reason, row in quarantined(store, "file:quality.ndjson")
            if reason == "label_value_too_long"
        ]  # fmt: skip
        assert long_label[0]["labels"] == {"host": "x" * ONE_MB}
        quality = first.rows["file:quality.ndjson"]
        assert (quality["rows_in"], quality["written"], quality["replay"]) == (10, 2, False)
        assert quality["file_quarantined"] is None

        # CSV and Parquet: label columns or a labels JSON column, the same samples back
        assert points(store, "disk_free_bytes") == [
            ({"host": "a", "region": "eu"}, T, 100.0),
            ({"host": "b"}, T, 200.0),
        ]
        assert points(store, "disk_used_bytes") == [({"host": "a", "mount": "/var"}, T, 5.0)]
        assert points(store, "net_rx_bytes") == [
            ({"host": "a", "region": "eu"}, T, 100.0),
            ({"host": "b"}, T, 200.0),
        ]
        assert points(store, "net_tx_bytes") == [({"host": "a", "mount": "/var"}, T, 7.0)]

        # line protocol: escapes come back exactly; an unescaped space rejects its line only
        location = {"location": "us midwest", "code": "a,b", "eq": "x=y"}
        assert points(store, "weather_temperature") == [(location, T, 82.0)]
        series = store.series("weather_*")
        assert series["labels"].tolist() == [location]
        assert quarantined(store, "file:escapes.lp") == [
            ("malformed_line", {"line": f"weather,location=us midwest temperature=83 {T_NS}",
                                "line_no": 2}),
        ]  # fmt: skip
        # integers (12i) are samples; strings and booleans are skipped and counted
        assert points(store, "sensor_temp") == [({"host": "a"}, T, 21.5)]
        assert points(store, "sensor_count") == [({"host": "a"}, T, 12.0)]
        assert first.rows["file:escapes.lp"]["skipped_fields"] == 3
        assert first.rows["file:escapes.lp"]["written"] == 3
        entries_after_first = len(store.quarantine(limit=100_000))
        stats_after_first = store.stats()

    # The same files again (copied back from done/): replays, nothing more written.
    for name in names:
        shutil.copy2(home / "landing" / "done" / name, home / "landing" / name)
    second = run_flow(home, target.url)

    assert set(second.rows) == set(first.rows)
    for source, row in second.rows.items():
        assert row["replay"] is True, (source, row)
        assert (row["written"], row["overwritten"], row["new_series"]) == (0, 0, 0), row
        assert row["file_quarantined"] is None
    assert landing_files(home) == []
    assert len(done_names(home)) == 2 * len(names)
    assert list((home / "quarantine").iterdir()) == []
    assert artifact_keys(second.flow_run_id) == {"ingest-summary", "ingest-quality"}
    with open_store(home, target.url) as store:
        assert len(store.quarantine(limit=100_000)) == entries_after_first
        stats = store.stats()
        assert (stats["series"], stats["samples"]) == (
            stats_after_first["series"],
            stats_after_first["samples"],
        )


def test_programmatic_samples_as_a_list_of_dicts(target: DbTarget, tmp_path: Path) -> None:
    home = tmp_path / "home"
    as_list: list[dict[str, Any]] = [
        {"metric": "api_requests_total", "labels": {"route": "/a"}, "ts": T_S, "value": 3},
        {"metric": "api_requests_total", "labels": {"route": "/b"}, "ts": T_ISO, "value": 4},
        {"metric": "api_requests_total", "labels": {"route": "/c"}, "ts": T_S, "value": "inf"},
    ]
    listed = run_flow(home, target.url, samples=as_list, landing=False)

    row = listed.rows["programmatic"]
    assert (row["rows_in"], row["written"], row["quarantined"]) == (3, 2, "non_finite_value: 1")
    with open_store(home, target.url) as store:
        assert points(store, "api_requests_total") == [
            ({"route": "/a"}, T, 3.0),
            ({"route": "/b"}, T, 4.0),
        ]
        assert reasons(store, "programmatic") == {"non_finite_value": 1}


def test_a_run_shares_one_synchronous_client_across_its_tasks_and_artifacts(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The flow is a coroutine (its run does not wait for Prefect's heartbeat thread), so its
    own client is asynchronous; its synchronous tasks (store, claim, each file group, the
    caller's samples) and artifacts must share one synchronous client, not build one apiece:
    a run of four tasks' worth builds no more clients than a run with one file."""
    from prefect.client.orchestration import SyncPrefectClient

    assert inspect.iscoroutinefunction(ingest.fn)
    built: list[int] = []
    original = SyncPrefectClient.__init__

    def counting(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    env.setattr(SyncPrefectClient, "__init__", counting)
    env.setattr("tasks.ingest_files.TASK_FILES", 1)  # a group (task) per file

    def clients_built(files: int, **kwargs: Any) -> int:
        home = tmp_path / f"home{files}"
        landing = home / "landing"
        landing.mkdir(parents=True)
        for i in range(files):
            write_ndjson(landing / f"f{i}.ndjson", [
                {"metric": "shared_client", "labels": {"f": str(i)}, "timestamp": T_ISO,
                 "value": i}
            ])  # fmt: skip
        built.clear()
        run = run_flow(home, **kwargs)
        names = [f"file:f{i}.ndjson" for i in range(files)]
        assert sorted(run.rows) == names + (["programmatic"] if kwargs else [])
        assert all(row["written"] == 1 for row in run.rows.values()), run.rows
        return len(built)

    one = clients_built(1)
    many = clients_built(3, samples=[{"metric": "shared_client", "ts": T_S, "value": 9}])
    assert many == one, f"{many} synchronous clients for 3 files and samples, {one} for 1 file"


def test_programmatic_samples_as_a_dataframe(target: DbTarget, tmp_path: Path) -> None:
    home = tmp_path / "home"
    as_frame = pd.DataFrame(
        {
            "metric": ["api_latency_seconds"] * 3,
            "labels": [{"route": "/a"}, {"route": "/b"}, {"route": "/c"}],
            "ts": pd.to_datetime([T, T, datetime(2099, 1, 1, tzinfo=UTC)], utc=True),
            "value": [0.25, 0.5, 1.0],
        }
    )
    framed = run_flow(home, target.url, samples=as_frame, landing=False)

    row = framed.rows["programmatic"]
    assert (row["rows_in"], row["written"], row["quarantined"]) == (
        3,
        2,
        "timestamp_in_future: 1",
    )
    with open_store(home, target.url) as store:
        assert points(store, "api_latency_seconds") == [
            ({"route": "/a"}, T, 0.25),
            ({"route": "/b"}, T, 0.5),
        ]
    # the same frame again is a replay
    again = run_flow(home, target.url, samples=as_frame, landing=False)
    assert again.rows["programmatic"]["replay"] is True
    assert again.rows["programmatic"]["written"] == 0


@pytest.fixture
def flow_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Warnings of flow run loggers (Prefect's loggers may not propagate to the root)."""
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def test_too_many_new_series_quarantine_the_file_whole(
    target: DbTarget,
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    flow_warnings: pytest.LogCaptureFixture,
) -> None:
    env.setenv("METRICMILL_MAX_NEW_SERIES_PER_BATCH", "5000")
    home = tmp_path / "home"
    landing = home / "landing"
    landing.mkdir(parents=True)
    write_ndjson(
        landing / "many.ndjson",
        [
            {"metric": "per_request", "labels": {"id": str(i)}, "ts": T_ISO, "value": 1.0}
            for i in range(10_000)
        ],
    )
    write_ndjson(
        landing / "few.ndjson",
        [{"metric": "up", "labels": {"job": "a"}, "ts": T_ISO, "value": 1.0}],
    )

    run = run_flow(home, target.url)

    assert quarantined_file(home, "many.ndjson")[0] == "cardinality_limit"
    many = run.rows["file:many.ndjson"]
    assert many["file_quarantined"] == "cardinality_limit"
    assert (many["written"], many["new_series"]) == (0, 0)
    assert done_names(home) == ["few.ndjson"]
    assert landing_files(home) == []
    with open_store(home, target.url) as store:
        entries = quarantined(store, "file:many.ndjson")
        assert [reason for reason, _ in entries] == ["cardinality_limit"]
        assert len(entries[0][1]["samples"]) == 10_000
        assert store.series("per_request").empty  # nothing of the batch was written
        assert points(store, "up") == [({"job": "a"}, T, 1.0)]
        assert store.stats()["series"] == 1
    warnings = [r.getMessage() for r in flow_warnings.records if r.levelno == logging.WARNING]
    assert any("cardinality" in w and "many.ndjson" in w for w in warnings), warnings


def test_claimed_files_are_grouped_within_the_task_budget_with_half_groups_at_the_ends(
    tmp_path: Path,
) -> None:
    sizes = [1_310_000] * 100  # as benchmarks/ingest_flow.py's 100 files of 10,000 samples
    paths = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"f{number:03d}.ndjson"
        path.write_bytes(b"x" * size)
        paths.append(path)

    groups = group_files(paths)

    assert [p for group in groups for p in group] == paths  # all of them, in claim order
    fewest = -(-sum(sizes) // TASK_BYTES)
    assert fewest > 1
    assert len(groups) == fewest + 1  # the fewest the budget allows, the ends halved
    lengths = [len(group) for group in groups]
    middle = lengths[1:-1]
    assert max(middle) - min(middle) <= 1, lengths
    for end in (lengths[0], lengths[-1]):
        assert abs(2 * end - min(middle)) <= 2, lengths  # half a middle group
    assert all(sum(p.stat().st_size for p in group) <= TASK_BYTES for group in groups)
    # files that fit one group stay one group
    assert group_files(paths[:3]) == [paths[:3]]
    # the file count bounds a group too
    tiny = [tmp_path / f"t{n}.ndjson" for n in range(3 * TASK_FILES)]
    for path in tiny:
        path.write_bytes(b"{}")
    half = TASK_FILES // 2
    assert [len(group) for group in group_files(tiny)] == [half, TASK_FILES, TASK_FILES, half]
    # a file larger than the budget goes alone
    big = tmp_path / "big.ndjson"
    big.write_bytes(b"x" * (TASK_BYTES + 1))
    for files in ([*paths[:2], big, *paths[2:4]], [*paths[:30], big, *paths[30:60]], [big, *paths]):
        grouped = group_files(files)
        assert [big] in grouped
        assert [p for group in grouped for p in group] == files
        assert all(sum(p.stat().st_size for p in g) <= TASK_BYTES for g in grouped if g != [big])
    assert group_files([]) == []


# -- format edge cases: SQLite, one flow run over all of them ----------------------------------
@dataclass
class EdgeRun:
    home: Path
    run: Run


def _gzip_cut_in_half(path: Path, records: list[dict[str, Any]]) -> None:
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path.write_bytes(data[: len(data) // 2])


def _one(metric: str, **labels: str) -> dict[str, Any]:
    return {"metric": metric, "labels": labels, "ts": T_ISO, "value": 1.0}


def _at(unit: str, ts: object) -> dict[str, Any]:
    return {"metric": "mixed_ts", "labels": {"unit": unit}, "ts": ts, "value": 1.0}


# One instant, written every way a collector might: epoch s, ms, us, ns and ISO 8601.
MIXED_PRECISION = [
    _at("s", T_S),
    _at("ms", T_S * 1000),
    _at("us", T_S * 1_000_000),
    _at("ns", T_NS),
    _at("iso_z", T.strftime("%Y-%m-%dT%H:%M:%SZ")),
    _at("iso_offset", T.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()),
]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> Iterator[EdgeRun]:
    home = tmp_path_factory.mktemp("edge") / "home"
    landing = home / "landing"
    landing.mkdir(parents=True)
    _gzip_cut_in_half(
        landing / "truncated.ndjson.gz", [_one("truncated", n=str(i)) for i in range(500)]
    )
    (landing / "empty.ndjson").write_bytes(b"")
    (landing / "no_value.csv").write_text(f"metric,timestamp,host\ncpu,{T_S},a\n", encoding="utf-8")
    (landing / "fake.parquet").write_bytes(b"PAR1 this is not a parquet file\n" * 20)
    write_ndjson(landing / "good.ndjson", [_one("good_metric", host="a")])
    write_ndjson(landing / "mixed_ts.ndjson", MIXED_PRECISION)
    bom_lines = [_one("bom_ndjson", host="a"), _one("bom_ndjson", host="b")]
    (landing / "bom.ndjson").write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in bom_lines).encode()
    )
    (landing / "bom.csv").write_bytes(
        b"\xef\xbb\xbf" + f"metric,timestamp,value,host\nbom_csv,{T_S},1,a\n".encode()
    )
    write_ndjson(
        landing / "crlf.ndjson",
        [_one("crlf_ndjson", host="a"), _one("crlf_ndjson", host="b")],
        newline="\r\n",
    )
    (landing / "crlf.csv").write_bytes(
        f"metric,timestamp,value,host\r\ncrlf_csv,{T_S},1,a\r\ncrlf_csv,{T_S},2,b\r\n".encode()
    )
    (landing / "crlf_bom.lp").write_bytes(
        b"\xef\xbb\xbf"
        + f"crlf_lp,host=a value=1 {T_NS}\r\ncrlf_lp,host=b value=2 {T_NS}\r\n".encode()
    )
    age(*landing.iterdir())
    # Files still being written: a .part name, and a fresh mtime (within settle_seconds).
    write_ndjson(landing / "late.ndjson.part", [_one("late_metric", host="a")])
    write_ndjson(landing / "fresh.ndjson", [_one("fresh_metric", host="a")])

    with pytest.MonkeyPatch.context() as mp:
        clean_env(mp, settle_seconds=60)
        run = run_flow(home)
    yield EdgeRun(home, run)


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("truncated.ndjson.gz", "cannot decode"),
        ("empty.ndjson", "empty file"),
        ("no_value.csv", "value"),
        ("fake.parquet", "not a Parquet file"),
    ],
)
def test_unreadable_file_is_quarantined_whole_and_the_run_completes(
    edge: EdgeRun, name: str, detail: str
) -> None:
    reason, text = quarantined_file(edge.home, name)
    assert reason == "unreadable_file"
    assert detail in text
    assert edge.run.rows[f"file:{name}"]["file_quarantined"] == "unreadable_file"
    with open_store(edge.home) as store:
        assert points(store, "good_metric") == [({"host": "a"}, T, 1.0)]  # the rest landed
    assert "good.ndjson" in done_names(edge.home)


def test_mixed_timestamp_precision_lands_at_one_instant(edge: EdgeRun) -> None:
    with open_store(edge.home) as store:
        assert quarantined(store, "file:mixed_ts.ndjson") == []
        landed = points(store, "mixed_ts")
    assert sorted(labels["unit"] for labels, _, _ in landed) == sorted(
        r["labels"]["unit"] for r in MIXED_PRECISION
    )
    assert {ts for _, ts, _ in landed} == {T}


@pytest.mark.parametrize(
    ("name", "metric", "hosts"),
    [
        ("bom.ndjson", "bom_ndjson", ["a", "b"]),
        ("bom.csv", "bom_csv", ["a"]),
        ("crlf.ndjson", "crlf_ndjson", ["a", "b"]),
        ("crlf.csv", "crlf_csv", ["a", "b"]),
        ("crlf_bom.lp", "crlf_lp", ["a", "b"]),
    ],
)
def test_bom_and_crlf_are_read_like_plain_files(
    edge: EdgeRun, name: str, metric: str, hosts: list[str]
) -> None:
    with open_store(edge.home) as store:
        assert quarantined(store, f"file:{name}") == []
        landed = points(store, metric)
    assert [labels for labels, _, _ in landed] == [{"host": h} for h in hosts]
    assert {ts for _, ts, _ in landed} == {T}
    assert name in done_names(edge.home)


def test_files_being_written_wait_for_the_next_run(edge: EdgeRun) -> None:
    home = edge.home
    landing = home / "landing"
    assert landing_files(home) == ["fresh.ndjson", "late.ndjson.part"]
    assert "file:fresh.ndjson" not in edge.run.rows
    assert "file:late.ndjson.part" not in edge.run.rows
    unreadable = {"truncated.ndjson.gz", "empty.ndjson", "no_value.csv", "fake.parquet"}
    quarantine = {p.name for p in (home / "quarantine").iterdir()}
    assert quarantine == unreadable | {f"{n}.reason" for n in unreadable}

    # the writer finishes: the file gets its final name and settles
    (landing / "late.ndjson.part").rename(landing / "late.ndjson")
    age(landing / "late.ndjson", landing / "fresh.ndjson")
    with pytest.MonkeyPatch.context() as mp:
        clean_env(mp, settle_seconds=60)
        later = run_flow(home)

    assert set(later.rows) == {"file:late.ndjson", "file:fresh.ndjson"}
    assert landing_files(home) == []
    assert {"late.ndjson", "fresh.ndjson"} <= set(done_names(home))
    with open_store(home) as store:
        assert points(store, "late_metric") == [({"host": "a"}, T, 1.0)]
        assert points(store, "fresh_metric") == [({"host": "a"}, T, 1.0)]
