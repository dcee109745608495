"""Labelled synthetic series: daily and weekly seasonality, trend, noise and injected anomalies.

Used by the detection evaluation (benchmarks/detect.py, tests) and the demo. Everything is
generated with numpy on a (series x time) grid, so thousands of series take a moment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

US_PER_MINUTE = 60_000_000
US_PER_DAY = 86_400_000_000
ANOMALY_KINDS = ("spike", "dip", "level_shift", "variance_change", "seasonality_break")
# 2026-01-05 is a Monday: weekly patterns line up with calendar weeks.
DEFAULT_START_US = 1_767_571_200_000_000


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly: which series, what kind, and its half-open window in µs."""

    series: int
    kind: str
    start_us: int
    end_us: int


@dataclass
class SyntheticSet:
    """The generated points (series_id, ts_us, value, label) and the anomalies injected."""

    frame: pd.DataFrame
    anomalies: list[Anomaly]
    start_us: int
    end_us: int
    step_us: int

    def anomaly_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [(a.series, a.kind, a.start_us, a.end_us) for a in self.anomalies],
            columns=["series_id", "kind", "start_us", "end_us"],
        )


def seasonal_series(
    n_series: int,
    *,
    days: float,
    step_minutes: float = 5.0,
    start_us: int = DEFAULT_START_US,
    seed: int = 0,
    weekly_share: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean series as (timestamps µs, values [series x time], noise sigma per series)."""
    rng = np.random.default_rng(seed)
    step_us = round(step_minutes * US_PER_MINUTE)
    n = int(days * US_PER_DAY // step_us)
    ts = start_us + np.arange(n, dtype=np.int64) * step_us
    hours = (ts - start_us) / 3_600_000_000
    level = rng.uniform(50, 500, n_series)[:, None]
    sigma = level * rng.uniform(0.01, 0.04, (n_series, 1))
    daily_amp = sigma * rng.uniform(3, 8, (n_series, 1))
    phase = rng.uniform(0, 2 * np.pi, (n_series, 1))
    daily = daily_amp * np.sin(2 * np.pi * hours[None, :] / 24 + phase)
    # Weekends lower for a share of the series (a weekly pattern).
    weekend = ((hours // 24) % 7 >= 5)[None, :]
    weekly_on = (rng.uniform(size=(n_series, 1)) < weekly_share).astype(float)
    weekly = -weekly_on * daily_amp * 0.8 * weekend
    trend = sigma * rng.uniform(-0.05, 0.05, (n_series, 1)) * (hours[None, :] / 24)
    noise = rng.normal(0, 1, (n_series, n)) * sigma
    return ts, level + daily + weekly + trend + noise, sigma[:, 0]


def labelled_set(
    n_series: int,
    *,
    days: float = 35,
    step_minutes: float = 5.0,
    clean_days: float = 21,
    start_us: int = DEFAULT_START_US,
    seed: int = 0,
    kinds: tuple[str, ...] = ANOMALY_KINDS,
) -> SyntheticSet:
    """Series with one anomaly each (kinds in turn) placed after `clean_days` of history."""
    rng = np.random.default_rng(seed + 1)
    ts, values, sigma = seasonal_series(
        n_series, days=days, step_minutes=step_minutes, start_us=start_us, seed=seed
    )
    step_us = int(ts[1] - ts[0])
    labels = np.zeros(values.shape, dtype=np.int8)
    anomalies: list[Anomaly] = []
    first = int(np.searchsorted(ts, start_us + int(clean_days * US_PER_DAY)))
    for i in range(n_series):
        kind = kinds[i % len(kinds)]
        length = _length(kind, step_us, rng)
        at = int(rng.integers(first, len(ts) - length))
        window = slice(at, at + length)
        s = sigma[i]
        sign = 1.0 if rng.uniform() < 0.5 else -1.0
        if kind == "spike":
            values[i, window] += s * rng.uniform(7, 12)
        elif kind == "dip":
            values[i, window] -= s * rng.uniform(7, 12)
        elif kind == "level_shift":
            values[i, window] += sign * s * rng.uniform(5, 10)
        elif kind == "variance_change":
            values[i, window] += rng.normal(0, 1, length) * s * rng.uniform(4, 6)
        elif kind == "seasonality_break":
            # The daily cycle runs half a day out of phase: peaks where troughs belong.
            shift = (24 * 60 // 2) // max(1, step_us // US_PER_MINUTE)
            clean = np.roll(values[i], shift)
            values[i, window] = clean[window]
        else:
            raise ValueError(f"unknown anomaly kind {kind!r}")
        labels[i, window] = 1
        anomalies.append(Anomaly(i + 1, kind, int(ts[at]), int(ts[at + length - 1] + step_us)))
    frame = pd.DataFrame(
        {
            "series_id": np.repeat(np.arange(1, n_series + 1, dtype=np.int64), len(ts)),
            "ts_us": np.tile(ts, n_series),
            "value": values.ravel(),
            "label": labels.ravel(),
        }
    )
    return SyntheticSet(frame, anomalies, int(ts[0]), int(ts[-1] + step_us), step_us)


def _length(kind: str, step_us: int, rng: np.random.Generator) -> int:
    """Points an anomaly of this kind lasts."""
    per_hour = max(1, 3_600_000_000 // step_us)
    if kind in ("spike", "dip"):
        return int(rng.integers(1, 3))
    if kind == "level_shift":
        return int(per_hour * rng.uniform(3, 12))
    if kind == "variance_change":
        return int(per_hour * rng.uniform(3, 12))
    return int(per_hour * rng.uniform(8, 16))  # seasonality_break
