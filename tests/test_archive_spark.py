"""The archive opens in Spark as it is: Hive partitions, zstd Parquet, labels as a map.

PySpark runs in a separate environment (`uv run --no-project --with pyspark`, see
tests/spark_read_archive.py). Skipped when no Java runtime is installed, unless CI=true or
METRICMILL_REQUIRE_SPARK=1 (set by .ci/run after it installs one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from metricmill.types import datetime_to_us
from storage import retention
from tests.dbtargets import DbTarget
from tests.retention_data import SERIES, cutoff, expected_rows, filled_store, make_settings

READER = Path(__file__).with_name("spark_read_archive.py")
PYSPARK = "pyspark>=4,<5"


def spark_required() -> bool:
    flags = (os.environ.get("CI", ""), os.environ.get("METRICMILL_REQUIRE_SPARK", ""))
    return any(v.strip().lower() in {"1", "true", "yes", "on"} for v in flags)


def read_with_spark(root: Path) -> dict[str, object]:
    missing = [tool for tool in ("java", "uv") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not found: Spark needs a Java runtime (Debian: " \
            "apt-get install openjdk-17-jre-headless) and uv to fetch pyspark"  # fmt: skip
        if spark_required():
            pytest.fail(f"{reason} [CI / METRICMILL_REQUIRE_SPARK=1]", pytrace=False)
        pytest.skip(reason)
    done = subprocess.run(
        ["uv", "run", "--no-project", "--quiet", "--with", PYSPARK, "python", str(READER),
         str(root)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_spark_reads_the_archive_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The archive format does not depend on the backend: SQLite is enough here.
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/metrics.db", "off")
    settings = make_settings(monkeypatch, tmp_path / "home", target, retention_days=30)
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "container_cpu_*", 7)
        report = retention.apply(store)
    archived = sum(o.archived for o in report.outcomes)
    assert archived > 0

    read = read_with_spark(settings.archive)

    schema = read["schema"]
    assert isinstance(schema, dict)
    assert schema["metric"] == "string" and schema["date"] == "date"
    assert schema["value"] == "double" and schema["labels"] == "map<string,string>"
    rows = read["rows"]
    assert isinstance(rows, list) and len(rows) == archived
    # Every archived row, with its labels and time, equals what retention removed.
    for metric, labels in SERIES:
        days = 7 if metric.startswith("container_cpu") else 30
        want = expected_rows(metric, labels)
        want = want[want["ts"] < cutoff(days)]
        got = [r for r in rows if r["metric"] == metric and r["host"] == labels["host"]]
        assert [r["us"] for r in got] == [datetime_to_us(t) for t in want["ts"]], (metric, labels)
        assert [r["value"] for r in got] == list(want["value"]), (metric, labels)
        assert all(r["same_day"] for r in got)  # the date partition is the row's UTC day
