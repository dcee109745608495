"""`metricmill quarantine list|show|replay`: fix a quarantined file or raise a limit, replay it."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from flows.ingest import ingest
from metricmill.cli import app
from metricmill.settings import load_settings
from storage.store import Store
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

runner = CliRunner()
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
T = NOW - timedelta(minutes=30)
T_ISO = T.isoformat()
WINDOW = (T - timedelta(hours=1), NOW + timedelta(hours=1))


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Its own METRICMILL_HOME, none of the caller's settings, files claimed without waiting."""
    home = tmp_path / "home"
    isolate_settings(monkeypatch, home=home, settle_seconds=0)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: no folded cells
    return home


def cli(*args: str) -> Result:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_user_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def run_flow() -> dict[str, dict[str, Any]]:
    state = asyncio.run(ingest(scrape=False, return_state=True))
    assert state.is_completed(), state
    return {row["source"]: row for row in state.result()}


def store() -> Store:
    return Store.open(settings=load_settings())


def land_ndjson(home: Path, name: str, records: list[dict[str, Any]]) -> Path:
    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    path = landing / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def points(metric: str) -> list[tuple[dict[str, str], datetime, float]]:
    with store() as s:
        frame = s.query(metric, None, *WINDOW)
    found = zip(frame["labels"], frame["ts"], frame["value"], strict=True)
    return sorted(((labels, ts.to_pydatetime(), value) for labels, ts, value in found), key=str)


def pending_entries() -> list[dict[str, Any]]:
    with store() as s:
        return s.quarantine(limit=1000, pending_only=True).to_dict(orient="records")


def test_a_fixed_file_replays_into_done(home: Path) -> None:
    landing = home / "landing"
    landing.mkdir(parents=True)
    (landing / "disk.csv").write_text(
        f"metric,timestamp,host\ndisk_free,{T_ISO},a\ndisk_free,{T_ISO},b\n", encoding="utf-8"
    )
    rows = run_flow()
    assert rows["file:disk.csv"]["file_quarantined"] == "unreadable_file"
    quarantined = home / "quarantine" / "disk.csv"

    listed = cli("quarantine", "list").stdout
    assert "disk.csv" in listed and "unreadable_file" in listed
    shown = cli("quarantine", "show", "disk.csv").stdout
    assert f"file:   {quarantined}" in shown
    assert "reason: unreadable_file" in shown
    assert "value" in shown  # the detail says which column is missing

    # the user fixes the file where it lies, then replays it
    quarantined.write_text(
        f"metric,timestamp,value,host\ndisk_free,{T_ISO},10,a\ndisk_free,{T_ISO},20,b\n",
        encoding="utf-8",
    )
    replayed = cli("quarantine", "replay", "disk.csv").stdout

    assert "disk.csv: written: 2 of 2 rows" in replayed
    assert (landing / "done" / "disk.csv").is_file()
    assert sorted(p.name for p in (home / "quarantine").iterdir()) == []
    assert [p.name for p in landing.iterdir() if p.is_file()] == []
    assert points("disk_free") == [({"host": "a"}, T, 10.0), ({"host": "b"}, T, 20.0)]
    assert "disk.csv" not in cli("quarantine", "list").stdout


def test_a_row_still_bad_is_quarantined_again_and_marked_replayed(home: Path) -> None:
    land_ndjson(
        home,
        "cpu.ndjson",
        [
            {"metric": "cpu", "labels": {"host": "a"}, "ts": T_ISO, "value": 0.5},
            {"metric": "cpu", "labels": {"host": "b"}, "ts": T_ISO, "value": float("nan")},
        ],
    )
    run_flow()
    [entry] = pending_entries()
    entry_id = str(entry["id"])
    assert (entry["source"], entry["reason"]) == ("file:cpu.ndjson", "non_finite_value")

    listed = cli("quarantine", "list").stdout
    assert "non_finite_value" in listed and "file:cpu.ndjson" in listed
    shown = json.loads(cli("quarantine", "show", entry_id).stdout)
    assert shown["id"] == entry["id"]
    assert shown["reason"] == "non_finite_value"
    assert shown["row"]["labels"] == {"host": "b"}
    assert shown["replayed_at"] is None

    replayed = cli("quarantine", "replay", entry_id).stdout

    assert f"entry {entry_id}: written: 0 of 1 rows; quarantined again: non_finite_value: 1" in (
        replayed
    )
    [again] = pending_entries()  # the old entry is done with; the new one is pending
    assert again["id"] != entry["id"]
    assert (again["source"], again["reason"]) == ("programmatic", "non_finite_value")
    assert json.loads(cli("quarantine", "show", entry_id).stdout)["replayed_at"] is not None
    pending_ids = cli("quarantine", "list").stdout
    everything = cli("quarantine", "list", "--all").stdout
    assert "programmatic" in pending_ids and "file:cpu.ndjson" not in pending_ids
    assert "file:cpu.ndjson" in everything
    assert points("cpu") == [({"host": "a"}, T, 0.5)]

    # a second replay of the same entry is refused; unknown ids are one-line errors
    assert "was replayed at" in assert_user_error(
        runner.invoke(app, ["quarantine", "replay", entry_id])
    )
    for args in (["show", "999999"], ["replay", "999999"], ["show", "nope.csv"]):
        assert "no quarantined file or entry" in assert_user_error(
            runner.invoke(app, ["quarantine", *args])
        )


def guarded_batch(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Five new series against a limit of three: the file and its samples are quarantined."""
    monkeypatch.setenv("METRICMILL_MAX_NEW_SERIES_PER_BATCH", "3")
    land_ndjson(
        home,
        "wide.ndjson",
        [
            {"metric": "conn", "labels": {"peer": str(i)}, "ts": T_ISO, "value": float(i)}
            for i in range(5)
        ],
    )
    rows = run_flow()
    assert rows["file:wide.ndjson"]["file_quarantined"] == "cardinality_limit"
    assert (home / "quarantine" / "wide.ndjson").is_file()
    [entry] = pending_entries()
    assert entry["reason"] == "cardinality_limit"
    assert len(entry["row"]["samples"]) == 5
    listed = cli("quarantine", "list").stdout
    assert "cardinality_limit" in listed and "wide.ndjson" in listed
    return entry


EXPECTED_CONN = [({"peer": str(i)}, T, float(i)) for i in range(5)]


def test_a_guarded_batch_entry_lands_once_the_limit_is_raised(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = guarded_batch(home, monkeypatch)
    entry_id = str(entry["id"])

    # still over the limit: quarantined again, the entry is done with all the same
    still = cli("quarantine", "replay", entry_id).stdout
    assert "quarantined again: cardinality_limit: 5" in still
    with store() as s:
        assert s.series("conn").empty
        newer = [e for e in pending_entries() if e["reason"] == "cardinality_limit"]
    assert [e["source"] for e in newer] == ["programmatic"]

    monkeypatch.setenv("METRICMILL_MAX_NEW_SERIES_PER_BATCH", "10")
    landed = cli("quarantine", "replay", str(newer[0]["id"])).stdout

    assert f"entry {newer[0]['id']}: written: 5 of 5 rows" in landed
    assert points("conn") == EXPECTED_CONN
    assert pending_entries() == []


def test_a_guarded_file_lands_once_the_limit_is_raised(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guarded_batch(home, monkeypatch)
    monkeypatch.setenv("METRICMILL_MAX_NEW_SERIES_PER_BATCH", "10")

    landed = cli("quarantine", "replay", "wide.ndjson").stdout

    assert "wide.ndjson: written: 5 of 5 rows" in landed
    assert (home / "landing" / "done" / "wide.ndjson").is_file()
    assert list((home / "quarantine").iterdir()) == []
    assert points("conn") == EXPECTED_CONN
    assert pending_entries() == []  # the guard's entry for the file is marked replayed
