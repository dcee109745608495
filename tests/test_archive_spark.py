"""The archive opens in Spark as it is: Hive partitions, zstd Parquet, labels as a map.

Skipped when no JVM is installed, unless CI=true or METRICMILL_REQUIRE_SPARK=1 (set by
.ci/run after it installs one).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metricmill.types import datetime_to_us
from storage import retention
from tests.dbtargets import DbTarget
from tests.retention_data import SERIES, cutoff, expected_rows, filled_store, make_settings

# PySpark 4.3 warns that it does not fully support pandas 3; nothing here goes through pandas.
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas")


def spark_required() -> bool:
    flags = (os.environ.get("CI", ""), os.environ.get("METRICMILL_REQUIRE_SPARK", ""))
    return any(v.strip().lower() in {"1", "true", "yes", "on"} for v in flags)


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    if shutil.which("java") is None:
        reason = "no Java runtime for Spark (Debian: apt-get install openjdk-17-jre-headless)"
        if spark_required():
            pytest.fail(f"{reason} [CI / METRICMILL_REQUIRE_SPARK=1]", pytrace=False)
        pytest.skip(reason)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("metricmill-archive-test")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_reads_the_archive_as_written(
    spark: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = DbTarget(
        "sqlite", f"sqlite:///{tmp_path}/metrics.db", "off"
    )  # format is backend-blind
    settings = make_settings(monkeypatch, tmp_path / "home", target, retention_days=30)
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "container_cpu_*", 7)
        report = retention.apply(store)
    archived = sum(o.archived for o in report.outcomes)
    assert archived > 0
    from pyspark.sql import functions

    frame = spark.read.parquet(str(settings.archive))
    fields = {f.name: f.dataType.simpleString() for f in frame.schema.fields}
    assert fields["metric"] == "string" and fields["date"] == "date"
    assert fields["value"] == "double" and fields["labels"] == "map<string,string>"
    assert frame.count() == archived

    # Every archived row, with its labels and time, equals what retention removed.
    for metric, labels in SERIES:
        days = 7 if metric.startswith("container_cpu") else 30
        want = expected_rows(metric, labels)
        want = want[want["ts"] < cutoff(days)]
        host = labels["host"]
        rows = (
            frame.where((frame.metric == metric) & (frame.labels["host"] == host))
            .select(
                functions.unix_micros("ts").alias("us"),
                "value",
                (functions.to_date("ts") == frame.date).alias("same_day"),
            )
            .orderBy("us")
            .collect()
        )
        assert [r["us"] for r in rows] == [datetime_to_us(t) for t in want["ts"]], (metric, host)
        assert [r["value"] for r in rows] == list(want["value"]), (metric, host)
        assert all(r["same_day"] for r in rows)  # the date partition is the row's UTC day
    per_metric = dict(frame.groupBy("metric").count().collect())
    assert sum(per_metric.values()) == archived
    assert set(per_metric) == {metric for metric, _ in SERIES}
