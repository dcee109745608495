"""Prometheus text exposition parsing against a recorded node_exporter page."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from storage.exposition import ExpositionResult, parse_exposition
from storage.normalise import prepare

FIXTURE = Path(__file__).parent / "fixtures" / "node_exporter_sample.prom"
SCRAPE = datetime(2024, 5, 21, 11, 15, 0, tzinfo=UTC)
TARGET = {"instance": "127.0.0.1:9100", "job": "node"}


@pytest.fixture(scope="module")
def page() -> str:
    return FIXTURE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def result(page: str) -> ExpositionResult:
    return parse_exposition(page, scrape_time=SCRAPE, extra_labels=TARGET)


def samples(result: ExpositionResult, metric: str) -> list[tuple[dict[str, str], float]]:
    frame = result.frame[result.frame["metric"] == metric]
    return list(zip(frame["labels"], frame["value"], strict=True))


def test_recorded_page_parses_cleanly(result: ExpositionResult) -> None:
    assert result.rejected == []
    assert len(result.frame) == 58  # 59 samples, less the NaN quantile (skipped and counted)
    assert result.skipped_nan == 1
    assert list(result.frame.columns) == ["metric", "labels", "ts", "value"]
    assert str(result.frame["ts"].dtype) == "datetime64[us, UTC]"
    assert result.frame["value"].dtype == "float64"


def test_family_types(result: ExpositionResult) -> None:
    families = result.families
    assert families["node_cpu_seconds_total"] == "counter"
    assert families["promhttp_metric_handler_requests_total"] == "counter"
    assert families["node_load1"] == "gauge"
    assert families["node_textfile_backup_duration_seconds"] == "histogram"
    assert families["go_gc_duration_seconds"] == "summary"
    assert len(families) == 21
    # flattened series names are not families of their own
    assert "node_textfile_backup_duration_seconds_bucket" not in families


def test_counter_labels_and_target_labels(result: ExpositionResult) -> None:
    cpu = samples(result, "node_cpu_seconds_total")
    assert len(cpu) == 16
    assert cpu[0] == ({"cpu": "0", "mode": "idle", **TARGET}, 845312.47)
    assert {labels["mode"] for labels, _ in cpu} == {
        "idle",
        "iowait",
        "irq",
        "nice",
        "softirq",
        "steal",
        "system",
        "user",
    }
    assert samples(result, "node_load1") == [(TARGET, 0.42)]


def test_histogram_is_flat(result: ExpositionResult) -> None:
    name = "node_textfile_backup_duration_seconds"
    buckets = samples(result, f"{name}_bucket")
    assert [(labels["le"], value) for labels, value in buckets] == [
        ("60", 0.0),
        ("300", 3.0),
        ("900", 11.0),
        ("3600", 14.0),
        ("+Inf", 14.0),
    ]
    assert all(labels["job_name"] == "nightly" for labels, _ in buckets)
    assert samples(result, f"{name}_sum") == [({"job_name": "nightly", **TARGET}, 7421.5)]
    assert samples(result, f"{name}_count") == [({"job_name": "nightly", **TARGET}, 14.0)]


def test_summary_is_flat_and_its_nan_quantile_is_skipped(result: ExpositionResult) -> None:
    # `go_gc_duration_seconds{quantile="1"} NaN` (no observation yet) is not a sample.
    quantiles = samples(result, "go_gc_duration_seconds")
    assert [labels["quantile"] for labels, _ in quantiles] == ["0", "0.25", "0.5", "0.75"]
    assert quantiles[2][1] == 4.0135e-05
    assert not any(math.isnan(value) for _, value in quantiles)
    assert samples(result, "go_gc_duration_seconds_sum") == [(TARGET, 0.084612361)]
    assert samples(result, "go_gc_duration_seconds_count") == [(TARGET, 1689.0)]


def test_infinite_value_is_kept_as_float(result: ExpositionResult) -> None:
    [(labels, value)] = samples(result, "node_hwmon_temp_crit_celsius")
    assert value == math.inf
    assert labels == {"chip": "platform_coretemp_0", "sensor": "temp1", **TARGET}


def test_timestamps_explicit_or_scrape_time(result: ExpositionResult) -> None:
    frame = result.frame
    explicit = frame["metric"] == "node_textfile_backup_last_run_info"
    assert frame.loc[explicit, "ts"].tolist() == [pd.Timestamp("2024-05-21T11:13:20.123Z")]
    assert (frame.loc[~explicit, "ts"] == pd.Timestamp(SCRAPE)).all()


def test_escaped_label_values(result: ExpositionResult) -> None:
    [(info, _)] = samples(result, "node_textfile_backup_last_run_info")
    assert info["message"] == "rsync finished\nexit status 0"
    assert info["target"] == "C:\\Backups"
    [(os_info, _)] = samples(result, "node_os_info")
    assert os_info["pretty_name"] == 'Debian GNU/Linux 12 "bookworm"'
    units = samples(result, "node_systemd_unit_state")
    assert units[0][0]["name"] == "dev-disk-by\\x2duuid-3f2a.swap"
    [(dmi, _)] = samples(result, "node_dmi_info")
    assert dmi["product_name"] == "Standard PC (Q35 + ICH9, 2009)"


def test_extra_labels_do_not_override_sample_labels() -> None:
    text = 'up{job="pushgateway"} 1\nup{instance="10.0.0.7:9091",job=""} 0\n'
    result = parse_exposition(text, scrape_time=SCRAPE, extra_labels=TARGET)
    assert result.frame["labels"].tolist() == [
        {"job": "pushgateway", "instance": "127.0.0.1:9100"},
        # an empty label value is the same as no label (Prometheus semantics): target job added
        {"instance": "10.0.0.7:9091", "job": "node"},
    ]
    # the caller's dict is not modified
    assert TARGET == {"instance": "127.0.0.1:9100", "job": "node"}


def test_without_extra_labels() -> None:
    result = parse_exposition('a_total{x="1"} 5', scrape_time=SCRAPE)
    assert result.frame["labels"].tolist() == [{"x": "1"}]


def test_malformed_lines_are_rejected_and_the_rest_parse(page: str) -> None:
    bad = [
        ("node_load5 not_a_number", "malformed_line"),
        ('node_load15{cpu="0" 1', "malformed_line"),
        ("node_memory_MemFree_bytes{device=sda} 1", "malformed_line"),
        ("0node_bad_name 1", "malformed_line"),
        ("node_load1", "malformed_line"),
        ("node_load1 1 2 3", "malformed_line"),
        ('node_x{a="1",a="2"} 1', "malformed_line"),
        ('node_x{a="bad \\t escape"} 1', "malformed_line"),
        ('node_x{1a="v"} 1', "malformed_line"),
        ("node_x 1_000", "malformed_line"),
        ("node_x 1 12.5", "invalid_timestamp"),
        ("node_x 1 99999999999999999999", "timestamp_out_of_range"),
        ("# TYPE node_y histogramm", "malformed_line"),
        ("# TYPE node_z", "malformed_line"),
        ("# TYPE node_load1 counter", "malformed_line"),  # conflicts with the recorded gauge
    ]
    text = page + "\n".join(line for line, _ in bad) + "\nnode_after_the_bad_ones 7\n"
    result = parse_exposition(text, scrape_time=SCRAPE, extra_labels=TARGET)
    first = page.count("\n") + 1
    assert result.rejected == [
        ({"line": line, "line_no": first + i}, reason) for i, (line, reason) in enumerate(bad)
    ]
    assert len(result.frame) == 59
    assert samples(result, "node_after_the_bad_ones") == [(TARGET, 7.0)]
    assert result.families["node_load1"] == "gauge"
    assert "node_y" not in result.families and "node_z" not in result.families


def test_crlf_bom_and_whitespace_variants() -> None:
    text = (
        "\ufeff# HELP x_total Things.\r\n"
        "# TYPE x_total counter\r\n"
        "\r\n"
        'x_total { a = "1" , b="2", } 3 1716290000000\r\n'
        "x_total\t\t4\r\n"
        "  y -Inf  \r\n"
        "z{} 5\r\n"
    )
    result = parse_exposition(text, scrape_time=SCRAPE)
    assert result.rejected == []
    assert result.families == {"x_total": "counter"}
    frame = result.frame
    assert frame["metric"].tolist() == ["x_total", "x_total", "y", "z"]
    assert frame["labels"].tolist() == [{"a": "1", "b": "2"}, {}, {}, {}]
    assert frame["value"].tolist()[:2] == [3.0, 4.0]
    assert frame["value"].iloc[2] == -math.inf
    assert frame["ts"].tolist() == [
        pd.Timestamp("2024-05-21T11:13:20Z"),
        *[pd.Timestamp(SCRAPE)] * 3,
    ]


def test_label_value_may_contain_braces_commas_and_equals() -> None:
    text = 'http_requests_total{path="/api/{id},x=1",code="200"} 12'
    result = parse_exposition(text, scrape_time=SCRAPE)
    assert result.frame["labels"].tolist() == [{"path": "/api/{id},x=1", "code": "200"}]


def test_naive_scrape_time_is_utc() -> None:
    result = parse_exposition("a 1", scrape_time=datetime(2024, 5, 21, 11, 15))
    assert result.frame["ts"].tolist() == [pd.Timestamp(SCRAPE)]


def test_storage_layer_rejects_non_finite_values(result: ExpositionResult) -> None:
    batch = prepare(result.frame)
    reasons = [reason for _, reason in batch.rejected]
    assert reasons == ["non_finite_value"]  # the +Inf gauge (the NaN quantile is skipped)
    assert len(batch.values) == 57
