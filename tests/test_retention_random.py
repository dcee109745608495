"""Retention against an oracle: random rules (globs, label equalities, tied priorities, archive
on and off, legal holds) over a few series; what stays, what is archived and what is gone must
be what the rules say, computed here in plain Python, and a second run must change nothing."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metricmill.settings import Settings
from storage import retention
from storage.archive import read_archive, verify_archive
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.retention_data import cutoff, make_settings, remaining, sample_frame

DEFAULT_DAYS = 30
SERIES = [
    ("container_cpu_usage", {"host": "h1", "env": "prod"}),
    ("container_cpu_usage", {"host": "h2", "env": "dev"}),
    ("container_mem_bytes", {"host": "h1", "env": "dev"}),
    ("disk_io", {"host": "h1", "env": "dev"}),
    ("disk_io", {"host": "h2", "env": "prod"}),
]
PATTERNS = ["*", "container_*", "container_cpu_*", "container_[cm]*", "disk_io", "d?sk_*", "x*"]


@dataclass
class Rule:
    rule_id: int
    pattern: str
    labels: dict[str, str]
    priority: int
    days: int | None
    archive: bool
    hold: bool

    def matches(self, metric: str, labels: dict[str, str]) -> bool:
        return fnmatch.fnmatchcase(metric, self.pattern) and all(
            labels.get(k) == v for k, v in self.labels.items()
        )


def random_rules(rng: np.random.Generator) -> list[Rule]:
    rules = []
    for _ in range(int(rng.integers(1, 6))):
        labels = [{}, {}, {"host": "h1"}, {"host": "h2"}, {"env": "prod"}][int(rng.integers(5))]
        hold = bool(rng.random() < 0.15)
        rules.append(
            Rule(
                rule_id=0,
                pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
                labels=labels,
                priority=int(rng.integers(0, 3)),  # ties are frequent: the older rule wins
                days=None if hold else int(rng.integers(1, 46)),
                archive=bool(rng.random() < 0.7),
                hold=hold,
            )
        )
    return rules


def fate(rules: list[Rule], metric: str, labels: dict[str, str]) -> tuple[int | None, bool]:
    """(days kept, None for all of it; whether what goes is archived) for one series."""
    if any(r.hold and r.matches(metric, labels) for r in rules):
        return None, False
    owners = sorted(
        (r for r in rules if not r.hold and r.matches(metric, labels)),
        key=lambda r: (-r.priority, r.rule_id),
    )
    if not owners:
        return DEFAULT_DAYS, True  # the level's default, archived
    return owners[0].days, owners[0].archive


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget) -> Settings:
    return make_settings(monkeypatch, tmp_path / "home", db_target, retention_days=DEFAULT_DAYS)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with Store.open(settings=settings) as opened:
        opened.write_samples(sample_frame(SERIES), source="test")
        opened.backend.execute("DELETE FROM rollup_pending")  # as after a rollup run
        yield opened


def pairs(frame: pd.DataFrame) -> list[tuple[pd.Timestamp, float]]:
    return sorted(zip(pd.to_datetime(frame["ts"], utc=True), frame["value"], strict=True))


@pytest.mark.parametrize("seed", range(8))
def test_random_rules_keep_archive_and_delete_what_they_say(
    store: Store, settings: Settings, seed: int
) -> None:
    rng = np.random.default_rng(4200 + seed)
    rules = random_rules(rng)
    for rule in rules:
        added = retention.add_rule(
            store.backend, rule.pattern, rule.days, rule.labels, rule.priority,
            archive=rule.archive, legal_hold=rule.hold,
        )  # fmt: skip
        rule.rule_id = added.rule_id

    report = retention.apply(store)

    everything = sample_frame(SERIES)
    gone_total = 0
    for metric, labels in SERIES:
        days, archived = fate(rules, metric, labels)
        mine = [
            m == metric and x == labels
            for m, x in zip(everything["metric"], everything["labels"], strict=True)
        ]
        rows = everything[mine]
        assert len(rows) > 0
        stays = rows if days is None else rows[rows["ts"] >= cutoff(days)]
        goes = rows.drop(stays.index)
        gone_total += len(goes)
        assert pairs(remaining(store, metric, labels)) == pairs(stays), (metric, labels, rules)
        in_archive = read_archive(settings, metric, labels)
        want = goes if archived else goes.iloc[:0]
        assert pairs(in_archive) == pairs(want), (metric, labels, rules)
    assert sum(o.deleted for o in report.outcomes if o.level == "raw") == gone_total
    assert verify_archive(store.backend, settings.archive) == []

    again = retention.apply(store)
    assert sum(o.deleted for o in again.outcomes) == 0
    assert sum(o.archived for o in again.outcomes) == 0
