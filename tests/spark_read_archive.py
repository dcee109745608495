"""Read a metricmill archive directory with PySpark and print what it holds, as JSON.

Run by tests/test_archive_spark.py in its own environment (`uv run --no-project --with
pyspark`): PySpark in the project's environment would change how Great Expectations imports.
Usage: python spark_read_archive.py ARCHIVE_DIR
"""

from __future__ import annotations

import json
import sys

from pyspark.sql import SparkSession, functions


def main(root: str) -> None:
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("metricmill-archive-test")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        frame = spark.read.parquet(root)
        rows = (
            frame.select(
                "metric",
                frame.labels["host"].alias("host"),
                functions.unix_micros("ts").alias("us"),
                "value",
                (functions.to_date("ts") == frame.date).alias("same_day"),
            )
            .orderBy("metric", "host", "us")
            .collect()
        )
        out = {
            "schema": {f.name: f.dataType.simpleString() for f in frame.schema.fields},
            "rows": [r.asDict() for r in rows],
        }
    finally:
        spark.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
