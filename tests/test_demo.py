"""`metricmill demo` end to end at a reduced size: real flow runs, incidents scored."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.demo import METRICS, generate, land_files
from storage.readers import read_landed_file
from tests.settings_env import isolate_settings


def cell(output: str, label: str) -> str:
    """The value cell of a two-column summary row."""
    found = re.search(rf"│ {re.escape(label)}\s*│ (.+?)\s*│", output)
    assert found, f"no {label!r} row in:\n{output}"
    return found.group(1)


@pytest.mark.usefixtures("prefect_server")
def test_demo_finds_the_injected_incidents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_settings(monkeypatch)
    monkeypatch.setenv("COLUMNS", "220")
    home = tmp_path / "demo"
    # Eight days: a week holds a weekend on any day the suite runs. From four, a Saturday
    # evening or a Monday has no weekend evening to compare with, or takes the weekend for
    # a falling trend, and alerts on every quiet series (a limit of young series).
    days = 8
    result = CliRunner().invoke(
        app, ["demo", "--home", str(home), "--hosts", "4", "--days", str(days)]
    )
    output = result.stdout
    assert result.exit_code == 0, output + (result.stderr or "")

    generated = 4 * len(METRICS) * days * 1440
    assert cell(output, "generated").startswith(f"{generated:,} samples")
    kinds = set(cell(output, "landed files").split("(", 1)[1].rstrip(")").split(", "))
    assert {"ndjson", "csv.gz", "lp", "parquet"} <= kinds
    # Every generated minute is rolled up once, and survives retention of raw samples.
    assert f"rollup_1m: {generated:,}" in cell(output, "rollups")
    stored = int(cell(output, "samples stored").split()[0].replace(",", ""))
    assert 0 < stored < generated  # retention archived and deleted the older half
    assert int(cell(output, "archive files written")) > 0
    assert int(cell(output, "baselines learned").split()[0].replace(",", "")) > 0

    found, total = (int(x) for x in cell(output, "incidents found").split(" of "))
    assert total == 5
    assert found >= 4, output
    assert int(cell(output, "false alerts").split()[0]) <= 3, output
    runs = re.findall(r"│ (ingest history|rollup ×\d+|baseline|ingest live|rollup live|detect|"
                      r"retention)\s*│ (\w+)", output)  # fmt: skip
    assert len(runs) == 7 and all(state == "Completed" for _, state in runs), runs
    assert f"--home {home} alerts list" in output


def test_landing_files_cover_every_format_and_read_back(tmp_path: Path) -> None:
    data = generate(3, 3, end=datetime(2026, 1, 8, 12, 0, tzinfo=UTC), live_minutes=120)
    files = land_files(data, tmp_path, data.times[0].to_pydatetime(), data.live_start)
    suffixes = {p.name.split(".", 1)[1] for p in files}
    assert {"ndjson", "csv.gz", "lp", "parquet"} <= suffixes
    total = 0
    for path in files:
        decoded = read_landed_file(path)
        assert not decoded.rejected and not decoded.skipped_fields, path
        total += len(decoded.frame)
    expected = len(data.frame(data.times[0].to_pydatetime(), data.live_start))
    assert total == expected
    assert len(data.incidents) == 5
    assert all(i.start >= data.live_start for i in data.incidents)
