"""The metricmill command line: init, ingest, query, export, demo, and one-line user errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from metricmill.cli import app
from storage.schema import LATEST_VERSION
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

runner = CliRunner()
DAY = ["--start", "2024-01-01T00:00:00Z", "--end", "2024-01-02T00:00:00Z"]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own METRICMILL_HOME and none of the caller's metricmill settings."""
    home = tmp_path / "home"
    isolate_settings(monkeypatch, home=home)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no folded cells
    return home


def run(*args: str) -> Result:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def assert_user_error(result: Result) -> str:
    """Non-zero exit, exactly one stderr line `error: ...`, and no traceback anywhere."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def json_points(result: Result) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def write_ndjson(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


CPU_RECORDS: list[dict[str, object]] = [
    {"metric": "cpu", "labels": {"host": "a"}, "timestamp": "2024-01-01T00:00:00Z", "value": 0.1},
    {"name": "cpu", "labels": {"host": "a"}, "ts": "2024-01-01T00:01:00+00:00", "value": 1e-300},
    {"metric": "cpu", "labels": {"host": "b"}, "timestamp": "2024-01-01T00:00:00", "value": -2.5},
]


# -- init -------------------------------------------------------------------------------------
def test_init_twice_is_a_no_op(home: Path) -> None:
    first = run("init")
    assert f"version 0 -> {LATEST_VERSION} (upgraded)" in first.stdout
    assert f"sqlite:///{home / 'metrics.db'}" in first.stdout
    second = run("init")
    assert f"version {LATEST_VERSION} -> {LATEST_VERSION} (up to date)" in second.stdout
    assert (home / "exports").is_dir()


# -- ingest and query -------------------------------------------------------------------------
def test_ingested_ndjson_queries_back_exact_values(tmp_path: Path) -> None:
    samples = write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)
    ingest = run("ingest", str(samples))
    assert "cpu.ndjson" in ingest.stdout

    points = json_points(run("query", "cpu", *DAY, "--format", "json"))

    assert all(set(p) == {"metric", "labels", "ts", "value"} for p in points)
    assert [(p["metric"], p["labels"], p["ts"], p["value"]) for p in points] == [
        ("cpu", {"host": "a"}, "2024-01-01T00:00:00+00:00", 0.1),
        ("cpu", {"host": "a"}, "2024-01-01T00:01:00+00:00", 1e-300),
        ("cpu", {"host": "b"}, "2024-01-01T00:00:00+00:00", -2.5),
    ]


def test_ndjson_mixing_epoch_and_iso_timestamps_lands_every_row(tmp_path: Path) -> None:
    samples = write_ndjson(
        tmp_path / "mixed.ndjson",
        [
            {"metric": "up", "labels": {}, "ts": "2024-01-01T00:00:00Z", "value": 1},
            {"metric": "up", "labels": {}, "ts": 1704067260, "value": 0},
        ],
    )
    run("ingest", str(samples))
    points = json_points(run("query", "up", *DAY, "--format", "json"))
    assert [(p["ts"], p["value"]) for p in points] == [
        ("2024-01-01T00:00:00+00:00", 1.0),
        ("2024-01-01T00:01:00+00:00", 0.0),
    ]


def test_ingested_gzipped_ndjson_is_read(tmp_path: Path) -> None:
    path = tmp_path / "cpu.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in CPU_RECORDS)
    run("ingest", str(path))
    assert len(json_points(run("query", "cpu", *DAY, "--format", "json"))) == 3


def test_csv_with_label_columns_queries_back(tmp_path: Path) -> None:
    path = tmp_path / "mem.csv"
    path.write_text(
        "metric,timestamp,value,host,dc\n"
        "mem,2024-01-01T00:00:00Z,1024,a,eu\n"
        "mem,2024-01-01T00:01:00Z,2048.5,b,\n",
        encoding="utf-8",
    )
    run("ingest", str(path))
    csv_out = run("query", "mem", *DAY, "--format", "csv").stdout.splitlines()
    assert csv_out == [
        "metric,labels,ts,value",
        'mem,"{""dc"": ""eu"", ""host"": ""a""}",2024-01-01T00:00:00+00:00,1024.0',
        'mem,"{""host"": ""b""}",2024-01-01T00:01:00+00:00,2048.5',
    ]


def test_csv_with_labels_json_column_and_epoch_seconds_queries_back(tmp_path: Path) -> None:
    path = tmp_path / "disk.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('metric,timestamp,value,labels\ndisk,1704067200,7.25,"{""dev"": ""sda""}"\n')
    run("ingest", str(path))
    points = json_points(run("query", 'disk{dev="sda"}', *DAY, "--format", "json"))
    assert points == [
        {
            "metric": "disk",
            "labels": {"dev": "sda"},
            "ts": "2024-01-01T00:00:00+00:00",
            "value": 7.25,
        }
    ]


def test_reingested_file_is_reported_as_replay(tmp_path: Path) -> None:
    samples = write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)
    first = run("ingest", str(samples))
    assert "yes (skipped)" not in first.stdout
    second = run("ingest", str(samples))
    assert "yes (skipped)" in second.stdout
    assert len(json_points(run("query", "cpu", *DAY, "--format", "json"))) == 3


def test_bad_rows_are_rejected_by_reason_and_good_rows_land(tmp_path: Path) -> None:
    path = tmp_path / "some-bad.ndjson"
    path.write_text(
        '{"metric": "cpu", "labels": {"host": "a"}, "ts": "2024-01-01T00:00:00Z", "value": 1}\n'
        '{"metric": "cpu", "labels": {"host": "a"}, "ts": "2024-01-01T00:01:00Z", "value": "NaN"}\n'
        '{"metric": "cpu", "labels": {"host": "a"}, "ts": "not a time", "value": 2}\n'
        "this line is not JSON\n",
        encoding="utf-8",
    )
    result = run("ingest", str(path))
    assert "non_finite_value: 1" in result.stdout
    assert "invalid_timestamp: 1" in result.stdout
    assert "malformed_line: 1" in result.stdout
    assert len(json_points(run("query", "cpu", *DAY, "--format", "json"))) == 1


def test_unreadable_file_fails_alone_and_other_files_land(tmp_path: Path) -> None:
    good = write_ndjson(tmp_path / "good.ndjson", CPU_RECORDS)
    bad = tmp_path / "bad.ndjson"
    bad.write_text("[1, 2, 3]\n", encoding="utf-8")

    result = runner.invoke(app, ["ingest", str(bad), str(good)])

    line = assert_user_error(result)
    assert str(bad) in line
    assert "good.ndjson" in result.stdout
    assert len(json_points(run("query", "cpu", *DAY, "--format", "json"))) == 3


def test_query_table_with_step_and_agg(tmp_path: Path) -> None:
    run("ingest", str(write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)))
    result = run("query", 'cpu{host="a"}', *DAY, "--step", "1h", "--agg", "max")
    assert 'cpu{host="a"}' in result.stdout
    assert "2024-01-01T00:00:00Z" in result.stdout
    assert "0.1" in result.stdout
    assert "1 row\n" in result.stdout or "1 row " in result.stdout


def test_query_selector_option_and_limit(tmp_path: Path) -> None:
    run("ingest", str(write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)))
    narrowed = run("query", "cpu", "--selector", '{host!="b"}', *DAY, "--format", "json")
    assert {p["value"] for p in json_points(narrowed)} == {0.1, 1e-300}
    limited = run("query", "cpu", *DAY, "--format", "json", "--limit", "1")
    assert len(json_points(limited)) == 1


def test_series_stats_and_health(tmp_path: Path) -> None:
    run("ingest", str(write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)))
    series = run("series", "c*", "--selector", '{host="b"}')
    assert 'host="b"' in series.stdout and "1 series" in series.stdout
    stats = run("stats")
    assert "samples stored" in stats.stdout and "│ 3 " in stats.stdout
    health = run("health")
    assert "health: ok" in health.stdout


def test_health_exits_1_when_the_schema_is_missing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--database", f"sqlite:///{tmp_path / 'empty.db'}", "health"])
    assert result.exit_code == 1
    assert "NOT OK" in result.stdout and "metricmill init" in result.stdout


def test_ingest_and_query_on_every_backend(
    db_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICMILL_TIMESCALEDB", db_target.timescaledb)
    database = ["--database", db_target.url]
    assert db_target.name.replace("postgres", "postgresql") in run(*database, "init").stdout
    samples = write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)
    run(*database, "ingest", str(samples))
    assert "yes (skipped)" in run(*database, "ingest", str(samples)).stdout
    points = json_points(run(*database, "query", "cpu", *DAY, "--format", "json"))
    assert [p["value"] for p in points] == [0.1, 1e-300, -2.5]


# -- export -----------------------------------------------------------------------------------
def test_export_to_a_relative_path_under_the_export_dir(home: Path, tmp_path: Path) -> None:
    run("ingest", str(write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)))
    result = run("export", 'cpu{host="a"}', *DAY, "--output", "sub/cpu.json")
    target = home / "exports" / "sub" / "cpu.json"
    assert str(target) in result.stdout and "2 rows" in result.stdout
    exported = json.loads(target.read_text(encoding="utf-8"))
    assert [row["value"] for row in exported] == [0.1, 1e-300]


@pytest.mark.parametrize("output", ["../x.json", "/tmp/x.json"])
def test_export_outside_the_export_dir_is_refused(output: str, tmp_path: Path) -> None:
    run("ingest", str(write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)))
    line = assert_user_error(runner.invoke(app, ["export", "cpu", *DAY, "--output", output]))
    assert output in line


# -- user mistakes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["query", "nosuch_metric"], "unknown metric 'nosuch_metric'"),
        (["query", "cpu{host=}"], "malformed selector"),
        (["query", "cpu", "--start", "now", "--end", "-1h"], "is not before end"),
        (["query", "cpu", *DAY, "--step", "5m", "--agg", "median"], "unknown aggregation"),
        (["query", "cpu", "--step", "five minutes"], "invalid duration"),
        (["ingest", "does-not-exist.ndjson"], "No such file or directory"),
        (["ingest", "samples.txt"], "unknown file type"),
    ],
)
def test_user_mistake_is_one_error_line(
    args: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("ingest", str(write_ndjson(tmp_path / "cpu.ndjson", CPU_RECORDS)))
    (tmp_path / "samples.txt").write_text("hello\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert expected in assert_user_error(runner.invoke(app, args))


def test_unreachable_database_is_one_line_with_the_password_masked() -> None:
    url = "postgresql://u:secret@127.0.0.1:1/x"
    line = assert_user_error(runner.invoke(app, ["--database", url, "stats"]))
    assert "secret" not in line
    assert "u:***@127.0.0.1:1/x" in line


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("METRICMILL_RETENTION_DAYS", "-1", "METRICMILL_RETENTION_DAYS"),
        ("METRICMILL_TIMESCALEDB", "sometimes", "METRICMILL_TIMESCALEDB"),
        ("METRICMILL_CONFIG", "/nonexistent/metricmill.toml", "METRICMILL_CONFIG"),
    ],
)
def test_invalid_settings_are_one_line(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    assert expected in assert_user_error(runner.invoke(app, ["stats"]))


def test_installed_command_shows_no_traceback(home: Path) -> None:
    command = Path(sys.executable).with_name("metricmill")
    env = {**os.environ, "METRICMILL_HOME": str(home)}
    for args in (
        ["--database", "postgresql://u:secret@127.0.0.1:1/x", "stats"],
        ["query", "cpu{host=}"],
    ):
        done = subprocess.run(
            [str(command), *args], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 1
        assert "Traceback" not in done.stderr + done.stdout
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
        assert "secret" not in done.stderr
