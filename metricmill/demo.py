"""Realistic host metrics for the demo: daily seasonality, noise, counters and one incident.

Pure functions over numpy arrays shaped (hosts, minutes); no per-sample Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

GIB = 2**30
METRICS = (
    "cpu_usage_percent",
    "memory_used_bytes",
    "http_request_duration_seconds",
    "http_requests_total",
    "disk_used_bytes",
)
REGIONS = ("eu-west", "us-east", "ap-south")
INCIDENT_MINUTES = 20


@dataclass(frozen=True)
class Incident:
    """The injected anomaly: CPU pegged and latency up on one host for a few minutes."""

    host: str
    start: datetime
    minutes: int
    metrics: tuple[str, ...] = ("cpu_usage_percent", "http_request_duration_seconds")


@dataclass(frozen=True)
class DemoData:
    frame: pd.DataFrame  # metric, labels, ts, value — ready for Store.write_samples
    hosts: tuple[str, ...]
    incident: Incident

    @property
    def series(self) -> int:
        return len(self.hosts) * len(METRICS)


def host_names(count: int) -> tuple[str, ...]:
    return tuple(f"web-{i:02d}" for i in range(1, count + 1))


def minute_grid(days: int, end: datetime) -> pd.DatetimeIndex:
    """Every minute in [end - days, end), end floored to the minute, in UTC."""
    stamp = pd.Timestamp(end)
    stamp = stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)
    end_minute = stamp.floor("min")
    return pd.date_range(end=end_minute - pd.Timedelta(minutes=1), periods=days * 1440, freq="min")


def daily_profile(times: pd.DatetimeIndex, peak_hour: float = 14.0) -> np.ndarray:
    """0 at night, 1 at the afternoon peak (UTC), a smooth daily cycle."""
    hour = (times.hour + times.minute / 60.0).to_numpy(dtype="float64")
    return np.asarray(0.5 * (1.0 + np.cos(2 * np.pi * (hour - peak_hour) / 24.0)))


def host_metrics(
    profile: np.ndarray, load: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each metric as a (hosts, minutes) array driven by the daily profile and per-host load."""
    hosts, minutes = len(load), len(profile)
    busy = profile[None, :] * load[:, None]
    noise = rng.normal(size=(hosts, minutes))
    cpu = np.clip(12.0 + 48.0 * busy + 4.0 * noise, 0.0, 100.0)
    memory_share = 0.35 + 0.2 * busy + np.cumsum(rng.normal(0, 0.002, (hosts, minutes)), axis=1)
    memory = np.clip(memory_share, 0.1, 0.95) * 16 * GIB
    latency = 0.08 * (1.0 + 0.8 * busy) * rng.lognormal(0.0, 0.15, (hosts, minutes))
    per_minute = rng.poisson(600.0 * (0.2 + busy)).astype("float64")
    requests = rng.integers(0, 10**6, hosts)[:, None] + np.cumsum(per_minute, axis=1)
    disk_growth = rng.exponential(2 * 2**20, (hosts, minutes))
    disk = (rng.uniform(40, 120, hosts) * GIB)[:, None] + np.cumsum(disk_growth, axis=1)
    return {
        "cpu_usage_percent": cpu,
        "memory_used_bytes": np.round(memory),
        "http_request_duration_seconds": latency,
        "http_requests_total": requests,
        "disk_used_bytes": np.round(disk),
    }


def inject_incident(
    values: dict[str, np.ndarray], host: int, first: int, minutes: int, rng: np.random.Generator
) -> None:
    """CPU near 100% and latency four times normal on one host for `minutes` minutes."""
    window = slice(first, first + minutes)
    values["cpu_usage_percent"][host, window] = rng.uniform(96.0, 99.5, minutes)
    values["http_request_duration_seconds"][host, window] *= 4.0


def generate_demo_data(
    hosts: int = 10, days: int = 2, *, end: datetime | None = None, seed: int = 7
) -> DemoData:
    """`hosts` × 5 metrics × `days` of 1-minute samples ending at `end` (default: now)."""
    if hosts < 1 or days < 1:
        raise ValueError("hosts and days must be at least 1")
    rng = np.random.default_rng(seed)
    times = minute_grid(days, end or datetime.now(UTC))
    names = host_names(hosts)
    values = host_metrics(daily_profile(times), rng.uniform(0.6, 1.4, hosts), rng)

    incident_host = min(2, hosts - 1)
    minutes = min(INCIDENT_MINUTES, len(times))
    first = int(len(times) * 0.75)
    first = min(first, len(times) - minutes)
    inject_incident(values, incident_host, first, minutes, rng)
    incident = Incident(names[incident_host], times[first].to_pydatetime(), minutes)

    # One labels dict per host, shared by its rows: the store canonicalises each object once.
    labels = np.empty(hosts, dtype=object)
    labels[:] = [
        {"host": name, "region": REGIONS[i % len(REGIONS)], "env": "prod"}
        for i, name in enumerate(names)
    ]
    per_metric = hosts * len(times)
    series = hosts * len(METRICS)
    frame = pd.DataFrame(
        {
            "metric": np.repeat(np.array(METRICS, dtype=object), per_metric),
            "labels": np.tile(np.repeat(labels, len(times)), len(METRICS)),
            "ts": pd.to_datetime(np.tile(times.tz_convert(None).to_numpy(), series), utc=True),
            "value": np.concatenate([values[m].ravel() for m in METRICS]),
        }
    )
    return DemoData(frame=frame, hosts=names, incident=incident)


def hourly_batches(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """The frame cut into one micro-batch per hour of data, in time order."""
    if frame.empty:
        return []
    ts = frame["ts"].to_numpy(dtype="datetime64[ns]")
    order = np.argsort(ts, kind="stable")
    hours = ts[order].astype("datetime64[h]")
    cuts = np.flatnonzero(hours[1:] != hours[:-1]) + 1
    bounds = np.concatenate(([0], cuts, [len(order)]))
    return [
        frame.iloc[order[a:b]].reset_index(drop=True)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def incident_window(incident: Incident, hours: int = 3) -> tuple[datetime, datetime]:
    """Whole hours around the incident, for a query that shows it."""
    start = incident.start.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours)
    return start, start + timedelta(hours=2 * hours + 1)
