"""Which series each rule governs, and the cut-offs that follow (a plan per level)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from metricmill.settings import Settings
from metricmill.types import datetime_to_us
from storage.archive import (
    DAY_US,
)
from storage.backend import Backend

if TYPE_CHECKING:
    pass

from storage.retention.rules import LEVELS, RetentionRule, glob_regex, list_rules


def load_series(backend: Backend) -> pd.DataFrame:
    rows = backend.execute("SELECT series_id, metric, labels, series_key FROM series")
    return pd.DataFrame(
        {
            "series_id": np.array([int(r[0]) for r in rows], dtype=np.int64),
            "metric": [r[1] for r in rows],
            "labels": [backend.parse_labels(r[2]) for r in rows],
            "series_key": [r[3] for r in rows],
        }
    )


def match_mask(series: pd.DataFrame, labels: pd.DataFrame, rule: RetentionRule) -> np.ndarray:
    """Which series a rule matches: one vectorised regex over metric names, label equalities."""
    if series.empty:  # no series yet: its empty metric column has no string type to match
        return np.zeros(0, dtype=bool)
    regex = glob_regex(rule.metric_pattern)
    mask = series["metric"].str.fullmatch(regex).to_numpy(dtype=bool, copy=True)
    for key, value in rule.labels.items():
        if key not in labels.columns:
            return np.zeros(len(series), dtype=bool)
        mask &= (labels[key] == value).to_numpy(dtype=bool)
    return mask


def _label_frame(series: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records(series["labels"].tolist(), index=series.index)


def held_mask(series: pd.DataFrame, rules: list[RetentionRule]) -> np.ndarray:
    labels = _label_frame(series)
    mask = np.zeros(len(series), dtype=bool)
    for rule in rules:
        if rule.legal_hold:
            mask |= match_mask(series, labels, rule)
    return mask


def default_days(settings: Settings, level: str) -> int | None:
    days = {
        "raw": settings.retention_days,
        "1m": settings.retention_1m_days,
        "5m": settings.retention_5m_days,
        "1h": settings.retention_1h_days,
        "1d": settings.retention_1d_days,
    }[level]
    return days or None


@dataclass
class Group:
    """The series of one level that one rule (or the default) governs."""

    level: str
    rule: RetentionRule | None  # None: the level's default
    days: int
    cutoff_us: int
    archive: bool
    ids: np.ndarray  # not held at planning time
    held_ids: np.ndarray

    @property
    def rule_name(self) -> str:
        return "default" if self.rule is None else self.rule.name


@dataclass
class Plan:
    now_us: int
    today_us: int
    series: pd.DataFrame
    groups: list[Group]
    kept_forever: dict[str, np.ndarray]  # level -> ids no rule lets go


def plan(backend: Backend, settings: Settings, now: datetime | None = None) -> Plan:
    """Which series each level's rules govern, with their cut-offs (UTC midnights)."""
    now_us = datetime_to_us(now or datetime.now(UTC))
    today_us = now_us - now_us % DAY_US
    series = load_series(backend)
    rules = list_rules(backend)
    labels = _label_frame(series)
    held = held_mask(series, rules)
    ids = series["series_id"].to_numpy()
    groups: list[Group] = []
    forever: dict[str, np.ndarray] = {}
    for level in LEVELS:
        chosen = sorted(
            (r for r in rules if r.level == level and not r.legal_hold),
            key=lambda r: (-r.priority, r.rule_id),
        )
        owner = np.full(len(series), -1, dtype=np.int64)
        for position, rule in enumerate(chosen):
            owner[(owner == -1) & match_mask(series, labels, rule)] = position
        keep: list[np.ndarray] = []
        for position in [-1, *range(len(chosen))]:
            members = owner == position
            if not members.any():
                continue
            owned: RetentionRule | None = None if position == -1 else chosen[position]
            days = default_days(settings, level) if owned is None else owned.retention_days
            if days is None:
                keep.append(ids[members])
                continue
            groups.append(
                Group(
                    level=level,
                    rule=owned,
                    days=days,
                    # nothing is older than 1970: a rule of a million days keeps everything
                    cutoff_us=max(today_us - days * DAY_US, 0),
                    archive=level == "raw" and (owned is None or owned.archive),
                    ids=ids[members & ~held],
                    held_ids=ids[members & held],
                )
            )
        forever[level] = np.concatenate([*keep, ids[held]]) if keep else ids[held]
    return Plan(now_us, today_us, series, groups, forever)


def raw_cutoffs(
    backend: Backend,
    settings: Settings,
    metrics: np.ndarray,
    labels: np.ndarray,
    now: datetime | None = None,
) -> np.ndarray | None:
    """Per incoming row (metric, labels as received): the oldest time (µs) its series' raw
    rule keeps, where a rule keeps less than the default `retention_days` — older rows would
    land in hours retention has already archived (and a rollup would rebuild those hours from
    the late rows alone). int64 min where the default (checked by the quality suite), a longer
    rule or a legal hold applies; None when no raw rule is stricter than the default."""
    from storage.frames import canonical_labels

    rules = list_rules(backend)
    default = default_days(settings, "raw")
    stricter = [
        r
        for r in rules
        if r.level == "raw" and not r.legal_hold and r.retention_days is not None
        and (default is None or r.retention_days < default)
    ]  # fmt: skip
    if not stricter or not len(metrics):
        return None
    # One lookup per distinct (metric, label object): rows decoded together share objects.
    keys = pd.MultiIndex.from_arrays(
        [pd.Series(metrics, dtype=object), pd.Series(map(id, labels), dtype="int64")]
    )
    codes, uniques = pd.factorize(keys)
    first = np.unique(codes, return_index=True)[1]
    texts = [canonical_labels(labels[i])[0] for i in first]
    series = pd.DataFrame(
        {
            "metric": [str(metrics[i]) for i in first],
            "labels": [json.loads(t) if t is not None else {} for t in texts],
        }
    )
    frame = _label_frame(series)
    chosen = sorted(
        (r for r in rules if r.level == "raw" and not r.legal_hold),
        key=lambda r: (-r.priority, r.rule_id),
    )
    days = np.full(len(series), -1, dtype=np.int64)  # -1: the default
    for rule in chosen:
        free = days == -1
        days[free & match_mask(series, frame, rule)] = (
            rule.retention_days if rule.retention_days is not None else 0
        )
    strict = (days > 0) & ((default is None) | (days < (default or 0)))
    strict &= ~held_mask(series, rules)
    now_us = datetime_to_us(now or datetime.now(UTC))
    today_us = now_us - now_us % DAY_US
    per_series = np.where(strict, today_us - days * DAY_US, np.iinfo(np.int64).min)
    return per_series[codes]
