"""`metricmill demo --database` on TimescaleDB: the pipeline on hypertables, small.

Its own file, so the test runner can put it beside the SQLite demo test rather than after it.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.demo import METRICS
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings


def cell(output: str, label: str) -> str:
    """The value cell of a two-column summary row."""
    found = re.search(rf"│ {re.escape(label)}\s*│ (.+?)\s*│", output)
    assert found, f"no {label!r} row in:\n{output}"
    return found.group(1)


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("pg_only_target", ["timescaledb"], indirect=True)
def test_demo_runs_on_timescaledb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_only_target: DbTarget
) -> None:
    # `require`: the flow runs read it too, so none of them can fall back to plain tables.
    isolate_settings(monkeypatch, timescaledb="require")
    monkeypatch.setenv("COLUMNS", "220")
    home = tmp_path / "demo"
    days = 8  # a week holds a weekend, as in the SQLite demo test; two hosts keep it small
    result = CliRunner().invoke(
        app,
        ["demo", "--home", str(home), "--database", pg_only_target.url, "--hosts", "2",
         "--days", str(days)],
    )  # fmt: skip
    output = result.stdout
    assert result.exit_code == 0, output + (result.stderr or "")
    assert cell(output, "database").endswith("(timescaledb)")
    runs = re.findall(r"│ (ingest history|rollup ×\d+|baseline|ingest live|rollup live|detect|"
                      r"retention)\s*│ (\w+)", output)  # fmt: skip
    assert len(runs) == 7 and all(state == "Completed" for _, state in runs), runs

    generated = 2 * len(METRICS) * days * 1440
    assert f"rollup_1m: {generated:,}" in cell(output, "rollups")
    found, total = (int(x) for x in cell(output, "incidents found").split(" of "))
    assert total == 5 and found >= 4, output
    assert int(cell(output, "archive files written")) > 0
    with psycopg.connect(pg_only_target.url, autocommit=True) as conn:
        hypertables = {
            name
            for (name,) in conn.execute(
                "SELECT hypertable_name FROM timescaledb_information.hypertables"
            )
        }
        assert {"samples", "rollup_1m", "rollup_5m", "rollup_1h", "rollup_1d"} <= hypertables
        # Retention archived the older days and dropped their chunks whole: every sample
        # chunk left holds data, and the samples left start at a UTC midnight's cut-off.
        (stored, oldest, chunks, empty) = conn.execute(
            "SELECT (SELECT count(*) FROM samples), (SELECT min(ts) FROM samples), "
            "count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM samples s "
            "WHERE s.ts >= c.range_start AND s.ts < c.range_end)) "
            "FROM timescaledb_information.chunks c WHERE c.hypertable_name = 'samples'"
        ).fetchone()
    assert 0 < stored < generated
    assert chunks > 0 and empty == 0
    assert oldest.hour == 0 and oldest.minute == 0
