"""Prometheus exposition as strict as Prometheus: UTF-8, histogram and summary rules, reserved
`__name__`, TYPE order; NaN samples skipped and counted. Cases in the upstream style: a page,
then the samples it gives and the lines it rejects."""

from __future__ import annotations

import http.server
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metricmill.settings import load_settings
from storage.exposition import ExpositionResult, parse_exposition
from storage.store import Store
from tasks.ingest import scrape_target
from tests.settings_env import isolate_settings

SCRAPE = datetime(2024, 5, 21, 11, 15, 0, tzinfo=UTC)


def parse(page: str | bytes) -> ExpositionResult:
    return parse_exposition(page, scrape_time=SCRAPE)


def got(result: ExpositionResult) -> list[tuple[str, dict[str, str], float]]:
    frame = result.frame
    return list(zip(frame["metric"], frame["labels"], frame["value"], strict=True))


def rejected_lines(result: ExpositionResult) -> list[tuple[int, str]]:
    return [(row["line_no"], reason) for row, reason in result.rejected]


def test_invalid_utf8_rejects_its_line_instead_of_storing_a_replacement() -> None:
    page = b'a{b="\xff"} 1\na{b="\xc3\xa9"} 2\n'
    result = parse(page)
    assert rejected_lines(result) == [(1, "invalid_unicode")]
    assert result.rejected[0][0]["line"] == 'a{b="\\xff"} 1'
    assert got(result) == [("a", {"b": "é"}, 2.0)]
    assert "\ufffd" not in str(got(result))


def test_bytes_and_text_pages_parse_alike() -> None:
    page = '\ufeff# TYPE up gauge\r\nup{job="x"} 1\r\n'
    assert got(parse(page)) == got(parse(page.encode())) == [("up", {"job": "x"}, 1.0)]


HISTOGRAM = "# TYPE h histogram\n"


@pytest.mark.parametrize(
    "line",
    [
        'h_bucket{le="x"} 1',  # le not a float
        'h_bucket{le=""} 1',  # le empty
        "h_bucket 1",  # no le at all
        'h_bucket{le="0.5"} -1',  # negative bucket count
        "h_count -3",  # negative count
    ],
)
def test_histogram_rules(line: str) -> None:
    result = parse(f'{HISTOGRAM}{line}\nh_bucket{{le="+Inf"}} 3\nh_sum -2.5\nh_count 3\n')
    assert rejected_lines(result) == [(2, "malformed_line")]
    assert [m for m, _, _ in got(result)] == ["h_bucket", "h_sum", "h_count"]  # a sum may be < 0


SUMMARY = "# TYPE s summary\n"


@pytest.mark.parametrize("line", ['s{quantile="median"} 1', "s 1", "s_count -1"])
def test_summary_rules(line: str) -> None:
    result = parse(f'{SUMMARY}{line}\ns{{quantile="0.5"}} 2\ns_sum 4\ns_count 2\n')
    assert rejected_lines(result) == [(2, "malformed_line")]
    assert [(m, v) for m, _, v in got(result)] == [("s", 2.0), ("s_sum", 4.0), ("s_count", 2.0)]


def test_untyped_families_are_not_held_to_histogram_rules() -> None:
    result = parse('u_bucket{le="x"} -1\n')
    assert result.rejected == []
    assert got(result) == [("u_bucket", {"le": "x"}, -1.0)]


def test_a_name_label_is_refused_not_stored() -> None:
    result = parse('a{__name__="b",c="d"} 1\na{c="d"} 2\n')
    assert rejected_lines(result) == [(1, "malformed_line")]
    assert got(result) == [("a", {"c": "d"}, 2.0)]


def test_a_type_line_after_its_samples_is_refused() -> None:
    result = parse("x_total 1\n# TYPE x_total counter\n# TYPE y histogram\ny_bucket 5\n")
    assert rejected_lines(result) == [(2, "malformed_line"), (4, "malformed_line")]
    assert "x_total" not in result.families
    assert result.families == {"y": "histogram"}
    # the same type again, before or after samples, changes nothing
    again = parse("# TYPE z gauge\nz 1\n# TYPE z gauge\n")
    assert again.rejected == [] and again.families == {"z": "gauge"}


def test_nan_samples_are_skipped_and_counted_not_quarantined() -> None:
    page = (
        "# TYPE rpc summary\n"
        'rpc{quantile="0.5"} NaN\nrpc{quantile="0.99"} NaN\nrpc_sum 0\nrpc_count 0\nother NaN\n'
    )
    result = parse(page)
    assert result.rejected == []
    assert result.skipped_nan == 3
    assert [m for m, _, _ in got(result)] == ["rpc_sum", "rpc_count"]


def test_a_scrape_reads_bytes_counts_nan_and_keeps_the_password_out_of_its_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = b'# TYPE s summary\ns{quantile="0.5"} NaN\ns_count 0\nbad{b="\xff"} 1\nup 1\n'

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    isolate_settings(monkeypatch, home=tmp_path)
    settings = load_settings()
    url = f"http://scraper:Sekr3t-pw@127.0.0.1:{server.server_port}/metrics"
    try:
        outcome = scrape_target.fn(settings, url)
    finally:
        server.shutdown()
    assert "Sekr3t-pw" not in outcome.source and outcome.source.startswith("scrape:http://")
    assert outcome.skipped_fields == 1  # the NaN quantile
    assert outcome.written == 2  # s_count and up
    assert dict(outcome.quarantined) == {"invalid_unicode": 1}
    with Store.open(settings=settings) as store:
        [row] = store.quarantine(limit=10, pending_only=True)["row"].tolist()
    assert row["line"] == 'bad{b="\\xff"} 1'
