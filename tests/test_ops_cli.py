"""Operator commands: `metricmill status` and `metricmill doctor`."""

from __future__ import annotations

import asyncio
import re
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from flows.ingest import ingest
from metricmill.cli import app
from metricmill.settings import load_settings
from metricmill.types import datetime_to_us
from storage.alerts import open_alerts
from storage.locks import flow_lock
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    isolate_settings(monkeypatch, home=home)
    monkeypatch.setenv("COLUMNS", "220")
    return home


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def cell(output: str, label: str) -> str:
    found = re.search(rf"│ {re.escape(label)}\s*│ (.+?)\s*│", output)
    assert found, f"no {label!r} row in:\n{output}"
    return found.group(1)


def check(output: str, name: str) -> str:
    """The result column (ok, FAIL, -) of one doctor check."""
    found = re.search(rf"│ {re.escape(name)}\s*│ (\S+)\s*│", output)
    assert found, f"no {name!r} check in:\n{output}"
    return found.group(1)


# -- doctor -----------------------------------------------------------------------------------
def test_doctor_passes_on_an_initialised_home() -> None:
    assert invoke("init").exit_code == 0
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output
    for name in ("settings", "home", "landing directory", "database", "schema", "database writes"):
        assert check(result.output, name) == "ok"
    assert check(result.output, "TimescaleDB") == "-"  # not applicable on SQLite


def test_doctor_fails_with_a_fix_for_an_unwritable_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke("init").exit_code == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("METRICMILL_LANDING_DIR", str(blocker / "landing"))
    result = invoke("doctor")
    assert result.exit_code == 1
    assert check(result.output, "landing directory") == "FAIL"
    assert check(result.output, "archive directory") == "ok"
    fix = [line for line in result.output.splitlines() if line.startswith("fix landing")]
    assert len(fix) == 1
    assert str(blocker / "landing") in fix[0] and "METRICMILL_LANDING_DIR" in fix[0]


def test_doctor_fails_with_a_fix_for_an_unreachable_database() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = invoke("--database", f"postgresql://nobody:secret@127.0.0.1:{port}/x", "doctor")
    assert result.exit_code == 1
    assert check(result.output, "database") == "FAIL"
    assert "fix database: start the database or fix METRICMILL_DATABASE_URL" in result.output
    assert "secret" not in result.output


def test_doctor_says_to_run_init_when_the_schema_is_missing() -> None:
    result = invoke("doctor")
    assert result.exit_code == 1
    assert check(result.output, "schema") == "FAIL"
    assert "fix schema: run `metricmill init`" in result.output


def test_doctor_checks_timescaledb_and_its_hypertables(
    pg_only_target: DbTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICMILL_TIMESCALEDB", pg_only_target.timescaledb)
    args = ("--database", pg_only_target.url)
    assert invoke(*args, "init").exit_code == 0
    result = invoke(*args, "doctor")
    assert result.exit_code == 0, result.output
    if pg_only_target.timescaledb == "require":
        assert check(result.output, "TimescaleDB") == "ok"
        assert check(result.output, "hypertables") == "ok"
        assert "compression on" in result.output
    else:
        assert check(result.output, "TimescaleDB") == "-"
        assert "hypertables" not in result.output


def test_doctor_reports_invalid_settings_with_the_variable_to_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METRICMILL_RETENTION_DAYS", "-3")
    result = invoke("doctor")
    assert result.exit_code == 1
    assert check(result.output, "settings") == "FAIL"
    assert "METRICMILL_RETENTION_DAYS" in result.output


def test_doctor_runs_every_other_check_when_a_setting_is_invalid(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke("init").exit_code == 0
    monkeypatch.setenv("METRICMILL_RETENTION_DAYS", "-3")
    monkeypatch.setenv("METRICMILL_SCRAPE_TARGETS", "not json")
    result = invoke("doctor")
    assert result.exit_code == 1
    assert check(result.output, "settings") == "FAIL"
    used = next(line for line in result.output.splitlines() if "│ settings used" in line)
    assert "METRICMILL_RETENTION_DAYS" in used and "METRICMILL_SCRAPE_TARGETS" in used
    # The valid settings are kept (this home, its database), the rest of doctor runs.
    for name in ("home", "landing directory", "database", "schema", "database writes"):
        assert check(result.output, name) == "ok"
    assert str(home) in result.output
    assert "1 failed" in result.output


def test_doctor_reports_a_broken_database_behind_an_invalid_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("METRICMILL_RETENTION_DAYS", "0")
    result = invoke("--database", f"postgresql://nobody@127.0.0.1:{port}/x", "doctor")
    assert result.exit_code == 1
    assert check(result.output, "settings") == "FAIL"
    assert check(result.output, "database") == "FAIL"
    assert "2 failed" in result.output


# -- status -----------------------------------------------------------------------------------
def test_status_shows_lag_pending_ranges_alerts_quarantine_and_running_flows(
    db_target: DbTarget, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICMILL_TIMESCALEDB", db_target.timescaledb)
    settings = load_settings(
        home=home, database_url=db_target.url, timescaledb=db_target.timescaledb
    )
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    samples = [
        {"metric": "cpu", "labels": {"host": "a"}, "ts": now - timedelta(hours=h), "value": 1.0}
        for h in (1, 3)
    ] + [{"metric": "cpu", "labels": {"host": "a"}, "ts": now, "value": float("nan")}]
    with Store.open(settings=settings) as store:
        report = store.write_samples(samples, source="test")
        assert report.written == 2
        pending = int(store.backend.execute("SELECT count(*) FROM rollup_pending")[0][0])
        series_id = int(store.series()["series_id"].iloc[0])
        at = datetime_to_us(now)
        with store.backend.transaction():
            open_alerts(
                store.backend,
                [("fp-1", "anomaly", series_id, "critical", at, at, 9.0, 1.0, 0.0, 2.0, 0.99,
                  "{}", None)],
            )  # fmt: skip
    assert pending > 0
    with flow_lock(settings, "rollup") as held:
        assert held
        result = invoke("--database", db_target.url, "status")
    assert result.exit_code == 0, result.output
    output = result.output
    assert cell(output, "pending rollup ranges").startswith(f"{pending} (data from")
    assert cell(output, "open alerts") == "critical: 1"
    assert cell(output, "quarantine").startswith("1 rows pending replay")
    assert "ago" in cell(output, "last batch written")
    assert cell(output, "batches in the last 24h") == "1"
    rollup_row = next(line for line in output.splitlines() if line.startswith("│ rollup "))
    assert "running now" in rollup_row
    assert "samples" in output and "rollup_1m" in output  # storage per table


@pytest.mark.usefixtures("prefect_server")
def test_status_shows_the_last_run_of_a_flow_from_prefect(home: Path) -> None:
    ts = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    state = asyncio.run(
        ingest(
            samples=[{"metric": "up", "labels": {}, "ts": ts, "value": 1.0}],
            landing=False,
            scrape=False,
            return_state=True,
        )
    )
    assert state.is_completed()
    result = invoke("status")
    assert result.exit_code == 0, result.output
    ingest_row = next(line for line in result.output.splitlines() if line.startswith("│ ingest "))
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    assert run_id.hex[-6:] in ingest_row and "Completed" in ingest_row  # the run's name
    assert "Prefect API:" not in result.output


# -- the Grafana / psql read path ---------------------------------------------------------------
PSQL_RAW = """SELECT time, value FROM metrics_view
WHERE metric = 'cpu_usage_percent' AND labels->>'host' = 'web-04'
  AND time >= now() - interval '1 hour' ORDER BY time"""
PSQL_HOURLY = """SELECT time, labels->>'host' AS host, avg FROM rollup_1h_view
WHERE metric = 'cpu_usage_percent' AND time >= now() - interval '1 day'
ORDER BY time, host"""
SQLITE_5M = """SELECT time, json_extract(labels, '$.host') AS host, avg, max FROM rollup_5m_view
WHERE metric = 'cpu_usage_percent' AND time >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour')
ORDER BY time"""


def test_readme_view_queries_answer_on_every_backend(db_target: DbTarget, home: Path) -> None:
    from storage.rollup import run_rollup

    settings = load_settings(
        home=home, database_url=db_target.url, timescaledb=db_target.timescaledb
    )
    start = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)
    start -= timedelta(minutes=start.minute % 5)
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    samples = [
        {
            "metric": "cpu_usage_percent",
            "labels": {"host": host},
            "ts": start + timedelta(minutes=i),
            "value": v + (0 if host == "web-04" else 100),
        }
        for host in ("web-04", "web-05")
        for i, v in enumerate(values)
    ]
    with Store.open(settings=settings) as store:
        store.write_samples(samples, source="test")
        run_rollup(store.backend)
        backend = store.backend
        if backend.name == "postgresql":
            raw = backend.execute(PSQL_RAW)
            assert [r[1] for r in raw] == values
            assert raw[0][0] == start
            hourly = backend.execute(PSQL_HOURLY)
            by_host = {r[1]: r[2] for r in hourly}
            assert by_host == {"web-04": 30.0, "web-05": 130.0}
        else:
            five = backend.execute(SQLITE_5M.replace("%", "%%"))
            web04 = [r for r in five if r[1] == "web-04"]
            assert len(web04) == 1
            assert web04[0][0] == start.strftime("%Y-%m-%dT%H:%M:%S.000Z")
            assert (web04[0][2], web04[0][3]) == (30.0, 50.0)
