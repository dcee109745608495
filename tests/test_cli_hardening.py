"""A careless user's mistakes are one `error:` line naming what to fix, never a traceback; names
with control characters reach the terminal escaped."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from metricmill.cli import app
from metricmill.cli.common import printable
from storage.store import Store
from tests.settings_env import isolate_settings

runner = CliRunner()
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    isolate_settings(monkeypatch, home=home)
    monkeypatch.setenv("COLUMNS", "250")
    return home


def user_error(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 1, (args, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    assert isinstance(result.exception, SystemExit), (args, result.exception)  # no crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    return lines[0]


def ok(*args: str) -> Result:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


@pytest.mark.parametrize(
    "variable", ["SCRAPE_TARGETS", "DETECTORS", "NOTIFICATION_BLOCKS", "ANONYMIZE_LABELS"]
)
def test_a_list_setting_that_is_not_json_is_one_error_line(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"METRICMILL_{variable}", "not json")
    line = user_error("stats")
    assert f"METRICMILL_{variable}" in line and "JSON" in line


def test_a_config_file_that_is_not_toml_is_one_error_line(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "metricmill.toml").write_text("retention_days = [\n")
    line = user_error("stats")
    assert "metricmill.toml" in line and "not TOML" in line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SETTLE_SECONDS", "nan"),
        ("SETTLE_SECONDS", "inf"),
        ("MAX_FUTURE_SKEW_SECONDS", "-inf"),
        ("ALERT_THRESHOLD", "nan"),
        ("RETENTION_DAYS", "1000000"),
        ("RETENTION_1M_DAYS", "99999999999999999999999"),
        ("MAX_FILE_BYTES", "0"),
        ("MAX_NESTING_DEPTH", "100000"),
    ],
)
def test_non_finite_and_out_of_bound_settings_are_named(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"METRICMILL_{variable}", value)
    assert f"METRICMILL_{variable}" in user_error("stats")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["quarantine", "show", "99999999999999999999999"], "99999999999999999999999"),
        (["quarantine", "list", "--limit", "99999999999999999999"], "--limit"),
        (["retention", "add", "x*", "--days", "99999999999999999999999"], "--days"),
        (["retention", "add", "cpu*", "--days", "10000000"], "--days"),
        (["retention", "remove", "99999999999999999999"], "rule id"),
        (["alerts", "show", "99999999999999999999"], "99999999999999999999"),
        (["alerts", "list", "--limit", "0"], "--limit"),
        (["alerts", "rules", "add", "r", "--threshold", "nan"], "--threshold"),
        (["alerts", "rules", "add", "r", "--min-level", "inf"], "--min-level"),
        (["query", "cpu", "--limit", "99999999999999999999999"], "--limit"),
    ],
)
def test_huge_ids_days_and_limits_are_one_error_line(args: list[str], named: str) -> None:
    assert named in user_error(*args)


def test_an_export_path_through_a_symlink_loop_is_one_error_line(home: Path) -> None:
    exports = home / "exports"
    exports.mkdir(parents=True)
    (exports / "loop").symlink_to(exports / "loop")
    assert "loop/x.json" in user_error("export", "cpu", "--output", "loop/x.json")


def test_retention_preview_on_an_empty_database_with_a_rule() -> None:
    ok("retention", "add", "cpu*", "--days", "7")
    assert "would be deleted" in ok("retention", "preview").output


def test_retention_preview_with_a_century_or_a_stored_huge_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METRICMILL_RETENTION_DAYS", "36500")
    sample = {"metric": "cpu_x", "labels": {}, "ts": NOW - timedelta(minutes=5), "value": 1.0}
    with Store.open() as store:
        store.write_samples([sample])
        # a rule stored before rules were bounded
        store.backend.execute(
            "INSERT INTO retention_rules (metric_pattern, labels, level, retention_days, "
            "priority, archive, legal_hold) VALUES ('cpu*', '{}', 'raw', 10000000, 0, 1, 0)"
        )
    assert "1 rows would be deleted" in " ".join(ok("retention", "preview").output.split())


ESC_NAME = "evil\x1b[2J\x1b]0;pwned\x07\u202e.ndjson"


def test_names_with_control_characters_are_escaped_in_every_listing(home: Path) -> None:
    quarantine = home / "quarantine"
    quarantine.mkdir(parents=True)
    (quarantine / ESC_NAME).write_text("x\n")
    (quarantine / f"{ESC_NAME}.reason").write_text("unreadable_file\nline \x1b[31mred\n")
    sample = {
        "metric": "m",
        "labels": {"host": "a\x1b[31mb\x9b"},
        "ts": NOW - timedelta(minutes=5),
        "value": 1.0,
    }
    with Store.open() as store:
        store.write_samples([sample])
        store.write_samples([{**sample, "metric": 7}], source="file:\x1b[5mblink")
    outputs = [
        ok("quarantine", "list").output,
        ok("quarantine", "show", ESC_NAME).output,
        ok("quarantine", "show", "1").output,
        ok("series").output,
        ok("query", "m", "--start", "-1h", "--format", "json").output,
        ok("query", "m", "--start", "-1h", "--format", "csv").output,
        ok("query", "m", "--start", "-1h").output,
    ]
    for output in outputs:
        assert not any(c in output for c in "\x1b\x07\x9b\u202e"), output
    assert "evil\\u001b[2J" in outputs[0] and "\\u202e" in outputs[1]
    assert "a\\u001b[31mb\\u009b" in outputs[3]
    # JSON output stays JSON, the label value intact once decoded
    assert json.loads(outputs[4].splitlines()[0])["labels"]["host"] == "a\x1b[31mb\x9b"


def test_printable_leaves_ordinary_text_alone() -> None:
    text = 'température{pièce="cuisine"} 日本 [x] \\ 😀'
    assert printable(text) == text
    assert printable("a\nb") == "a\\u000ab"
    assert printable("a\nb", keep_newlines=True) == "a\nb"
