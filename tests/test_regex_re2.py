"""Label regex matchers run on RE2: linear time whatever the pattern, anchored as in Prometheus."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.errors import SelectorError
from metricmill.selectors import parse_selector
from storage.store import Store
from tasks.alert_notices import silencer

EVIL = '{v=~"(a+)+$"}'
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
# Python's backtracking `re` needs minutes for (a+)+$ against 40 a's and a mismatch.
LONG_VALUES = ["a" * n + "!" for n in (26, 41, 1000, 100_000)]


def _seeded(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/metrics.db"
    rows = [
        {"metric": "m", "labels": {"v": value}, "ts": T0, "value": float(i)}
        for i, value in enumerate([*LONG_VALUES, "aaaa"])
    ]
    with Store.open(url) as store:
        store.write_samples(rows)
    return url


def test_catastrophic_pattern_matches_long_values_in_linear_time() -> None:
    selector = parse_selector(EVIL)
    started = time.perf_counter()
    results = [selector.matches({"v": value}) for value in LONG_VALUES]
    assert time.perf_counter() - started < 0.5
    assert results == [False] * len(LONG_VALUES)
    assert selector.matches({"v": "a" * 100_000})


def test_matchers_are_fully_anchored_and_dot_matches_newline() -> None:
    assert parse_selector('{v=~"b.c"}').matches({"v": "b\nc"})
    assert not parse_selector('{v=~"b"}').matches({"v": "abc"})
    assert not parse_selector('{v=~"a|b"}').matches({"v": "ab"})
    assert parse_selector('{v!~"a|b"}').matches({"v": "ab"})


@pytest.mark.parametrize("pattern", [r"(a)\\1", "(?=a)a", "a)|(b", "(?<!x)y"])
def test_patterns_outside_re2_syntax_are_one_selector_error(pattern: str) -> None:
    with pytest.raises(SelectorError, match="invalid regular expression"):
        parse_selector(f'{{v=~"{pattern}"}}')


def test_query_and_series_with_the_pattern_answer_in_well_under_a_second(
    tmp_path: Path,
) -> None:
    url = _seeded(tmp_path)
    runner = CliRunner()
    window = ["--start", "2024-05-01T09:00:00Z", "--end", "2024-05-01T11:00:00Z"]
    started = time.perf_counter()
    queried = runner.invoke(app, ["--database", url, "query", f"m{EVIL}", *window, "--format",
                                  "json"])  # fmt: skip
    listed = runner.invoke(app, ["--database", url, "series", "--selector", EVIL])
    elapsed = time.perf_counter() - started
    assert queried.exit_code == 0, queried.output
    assert listed.exit_code == 0, listed.output
    assert elapsed < 5  # CLI start-up included; each match itself takes microseconds
    assert queried.output.count('"metric"') == 1 and '"aaaa"' in queried.output
    assert "1 series" in listed.output


def test_a_stored_silence_with_the_pattern_decides_in_well_under_a_second(
    tmp_path: Path,
) -> None:
    url = _seeded(tmp_path)
    now_us = int(time.time() * 1_000_000)
    with Store.open(url) as store:
        store.alerts.add_silence(
            matcher=f"m{EVIL}",
            starts_us=now_us - 1_000_000,
            ends_us=now_us + int(timedelta(hours=1).total_seconds() * 1_000_000),
            comment="re2",
        )
        silence_for = silencer(store, now_us)
    started = time.perf_counter()
    decided = [silence_for({"metric": "m", "labels": {"v": v}}) for v in LONG_VALUES]
    assert time.perf_counter() - started < 0.5
    assert decided == [None] * len(LONG_VALUES)
    assert silence_for({"metric": "m", "labels": {"v": "aaa"}}) is not None
