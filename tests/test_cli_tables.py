"""Tables at 80 and 100 columns: the series keeps its room, times are whole and to the second,
numbers have one format, no always-empty column, counts agree in number; --format json|csv."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.settings import load_settings
from metricmill.types import datetime_to_us
from storage.alerts import open_alerts
from storage.store import Store
from tests.settings_env import isolate_settings

LABELS = {"host": "web-01", "region": "eu-west", "env": "prod", "container": "api"}
SERIES = (
    'http_request_duration_seconds{container="api", env="prod", host="web-01", region="eu-west"}'
)
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    isolate_settings(monkeypatch, home=home)
    now = datetime.now(UTC).replace(microsecond=123456)
    samples = [
        {
            "metric": "http_request_duration_seconds",
            "labels": LABELS,
            "ts": now - timedelta(minutes=m),
            "value": 7.331111,
        }
        for m in (1, 2)
    ]
    with Store.open(settings=load_settings(home=home)) as store:
        store.write_samples(samples, source="test")
        series_id = int(store.series()["series_id"].iloc[0])
        at = datetime_to_us(now)
        detail = json.dumps({"metric": "http_request_duration_seconds", "labels": LABELS})
        with store.backend.transaction():
            open_alerts(
                store.backend,
                [("fp-1", "anomaly", series_id, "critical", at, at, 7.331111, 0.25, 0.0, 0.5,
                  0.987654, detail, None)],
            )  # fmt: skip
    return home


def run(width: int, *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output


def lines_holding(output: str, first: str, last: str) -> list[str]:
    """The lines from the one holding `first` down to the one holding `last`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if last in lines[i])
    return lines[start : end + 1]


@pytest.mark.parametrize("width,most_lines", [(80, 6), (100, 3)])
@pytest.mark.usefixtures("home")
def test_alerts_list_gives_the_series_room(width: int, most_lines: int) -> None:
    output = run(width, "alerts", "list")
    assert all(len(line) <= width for line in output.splitlines()), output
    alert = lines_holding(output, "http_request_dura", "region")
    assert len(alert) <= most_lines, output
    assert "".join(line.split("│")[0] for line in alert)  # the row is there
    # The series reads back whole from its column, the time is on one line, to the second.
    assert len(STAMP.findall(output)) == 1, output
    assert ".123" not in output and "+00:00" not in output
    assert re.search(r"\b7\.331\b", output) and "7.3311" not in output  # one number format
    assert ("0.9877" in output) is (width >= 100)  # the score: only where there is room
    assert "note" not in output  # no empty column
    assert "1 alert" in output and "1 alerts" not in output


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.usefixtures("home")
def test_series_and_query_keep_times_whole(width: int) -> None:
    listed = run(width, "series")
    assert len(STAMP.findall(listed)) == 2, listed  # first and last seen, unbroken
    assert "1 series" in listed
    points = run(width, "query", "http_request_duration_seconds", "--start", "-10m")
    assert len(STAMP.findall(points)) == 2, points
    assert "2 rows" in points and "7.331 " in points


@pytest.mark.usefixtures("home")
def test_stats_numbers_have_thousands_separators(home: Path) -> None:
    with Store.open(settings=load_settings(home=home)) as store:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        store.write_samples(
            [
                {"metric": "bulk", "labels": {}, "ts": start + timedelta(seconds=s), "value": 1}
                for s in range(1200)
            ],
            source="test",
        )
    output = run(100, "stats")
    assert re.search(r"samples stored\s*│\s*1,202\b", output), output


@pytest.mark.usefixtures("home")
def test_list_commands_speak_json_and_csv() -> None:
    for args, key in (
        (("alerts", "list"), "severity"),
        (("series",), "last_seen"),
    ):
        lines = run(100, *args, "--format", "json").splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 1 and key in records[0], lines
        assert records[0]["labels"] == LABELS
        table = list(csv.DictReader(io.StringIO(run(100, *args, "--format", "csv"))))
        assert len(table) == 1 and json.loads(table[0]["labels"]) == LABELS
    alert = json.loads(run(100, "alerts", "list", "--format", "json"))
    assert alert["value"] == 7.331111 and alert["score"] == 0.987654  # every digit kept


@pytest.mark.usefixtures("home")
def test_every_list_command_has_json_and_csv() -> None:
    run(100, "retention", "add", "http_*", "--days", "7")
    run(100, "alerts", "silence", "http_request_duration_seconds", "--for", "1h")
    for args, expected in (
        (("quarantine", "list", "--all"), {"kind", "id", "reason"}),
        (("retention", "list"), {"pattern", "days", "legal_hold"}),
        (("archive", "list"), {"path", "sha256"}),
        (("alerts", "silences"), {"matcher", "until"}),
        (("alerts", "rules", "list"), {"name", "warn", "from"}),
        (("alerts", "list", "--status", "all"), {"metric", "status"}),
        (("series",), {"metric", "first_seen"}),
    ):
        records = [json.loads(line) for line in run(100, *args, "--format", "json").splitlines()]
        header = next(csv.reader(io.StringIO(run(100, *args, "--format", "csv"))))
        assert expected <= set(header), (args, header)
        for record in records:
            assert set(record) == set(header), (args, record)
        if args[0] != "quarantine" and args[0] != "archive":
            assert records, args
