"""`metricmill alerts …`: list, show, ack, resolve --incident, silence, rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.settings import load_settings
from storage import alerts as db
from storage.store import Store
from tasks.alerting import incident_windows, process_scores
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings
from tests.test_alerting import MIN, T0, _store_series, scores_frame


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "220")


def test_an_alert_is_listed_shown_acknowledged_and_resolved_as_an_incident(
    db_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wide: None
) -> None:
    isolate_settings(
        monkeypatch, home=tmp_path, database_url=db_target.url, timescaledb=db_target.timescaledb
    )
    (sid,) = _store_series(db_target.url, db_target.timescaledb, ["a"])
    process_scores(load_settings(alert_for_seconds=0), scores_frame({sid: [0.1, 0.95]}))

    code, output = run("alerts", "list")
    assert code == 0
    assert 'cpu{host="a"}' in output and "critical" in output and "firing" in output
    code, output = run("alerts", "show", "1")
    assert code == 0
    # cpu never went below 0 here: the band is shown clipped at 0 (stored as -1 .. 1)
    assert "value: 9.5  expected: 0 [0 .. 1]  score: 0.95" in output
    assert "since: 2023-11-14T22:14:20Z" in output

    assert run("alerts", "ack", "1") == (0, "alert 1: acknowledged\n")
    code, output = run("alerts", "ack", "1")
    assert (code, output.strip()) == (1, "error: alert 1 is already acknowledged")
    code, output = run("alerts", "resolve", "1", "--incident")
    assert code == 0 and output.startswith("alert 1: resolved (confirmed incident")
    code, output = run("alerts", "list")
    assert "no open alerts" in output
    code, output = run("alerts", "list", "--status", "resolved")
    assert "incident" in output and "resolved" in output
    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as store:  # type: ignore[arg-type]
        alert = db.get_alert(store.backend, 1)
        windows = incident_windows(store)
    assert alert is not None and alert["acknowledged_at"] is not None
    assert windows.to_dict("records") == [
        {"series_id": sid, "start_us": T0 + MIN, "end_us": T0 + MIN + 1}
    ]

    code, output = run("alerts", "show", "42")
    assert (code, output.strip().splitlines()[0]) == (
        1,
        "error: no alert 42: see `metricmill alerts list --status all`",
    )


def test_silences_are_added_listed_and_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wide: None
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    code, output = run("alerts", "silence", 'cpu{host="a"}', "--for", "2h", "--comment", "patch")
    assert code == 0 and output.startswith('silence 1: cpu{host="a"} until ')
    code, output = run("alerts", "silences")
    assert 'cpu{host="a"}' in output and "patch" in output
    code, output = run("alerts", "silence", "cpu{host", "--for", "2h")
    assert code == 1 and output.startswith("error: malformed selector")
    code, output = run("alerts", "silence", "cpu", "--for", "soon")
    assert code == 1 and output.startswith("error: invalid duration 'soon'")
    code, output = run("alerts", "silence", "{}", "--for", "1h")
    assert code == 1 and "would silence everything" in output


def test_rules_are_added_listed_and_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wide: None
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    code, output = run(
        "alerts",
        "rules",
        "add",
        "disk",
        "--metric",
        "disk_*",
        "--threshold",
        "0.5",
        "--for",
        "0s",
        "--keep-firing-for",
        "10m",
        "--min-level",
        "3",
    )
    assert (code, output.strip()) == (0, "rule disk: metrics disk_*, warn >= 0.5, critical >= 0.9")
    code, output = run("alerts", "rules", "list")
    lines = [line for line in output.splitlines() if "disk" in line]
    assert len(lines) == 1 and "600s" in lines[0] and "cli" in lines[0]
    assert any("anomaly" in line and "settings" in line for line in output.splitlines())
    code, output = run("alerts", "rules", "add", "bad", "--threshold", "0.95", "--critical", "0.9")
    assert code == 1 and output.startswith("error: need 0 < --threshold")
    assert run("alerts", "rules", "remove", "disk") == (0, "rule disk removed\n")
    code, output = run("alerts", "rules", "remove", "disk")
    assert code == 1 and output.startswith("error: no stored rule 'disk'")
