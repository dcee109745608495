"""Realistic host and container metrics for the demo, with incidents whose answers are known.

Every metric is a (hosts, minutes) numpy array driven by a daily and a weekly load profile, so
nothing loops per sample. The last `live_minutes` are "live" data that arrive after the
baselines were learned; the incidents are injected there, for detection to find.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

GIB = 2**30
REGIONS = ("eu-west", "us-east", "ap-south")
METRICS = (
    "cpu_usage_percent",
    "memory_used_bytes",
    "disk_used_bytes",
    "disk_io_utilization_percent",
    "network_receive_bytes_per_second",
    "network_transmit_bytes_per_second",
    "http_requests_per_second",
    "http_request_duration_seconds",
    "http_server_errors_per_minute",
    "container_memory_working_set_bytes",
)
LABEL_NAMES = ("host", "region", "env", "container")


@dataclass(frozen=True)
class Incident:
    """One injected incident: a metric of one host misbehaving in [start, end)."""

    kind: str
    host: str
    metric: str
    start: datetime
    end: datetime
    what: str


@dataclass
class DemoData:
    hosts: tuple[str, ...]
    times: pd.DatetimeIndex  # every minute, UTC
    values: dict[str, np.ndarray]  # metric -> (hosts, minutes)
    incidents: list[Incident]
    live_start: datetime

    @property
    def samples(self) -> int:
        return len(self.hosts) * len(self.times) * len(METRICS)

    @property
    def series(self) -> int:
        return len(self.hosts) * len(METRICS)

    def frame(
        self, start: datetime, end: datetime, metrics: tuple[str, ...] = METRICS
    ) -> pd.DataFrame:
        """Samples in [start, end) of the given metrics: metric, ts, value and label columns."""
        cols = np.flatnonzero(
            (self.times >= pd.Timestamp(start)) & (self.times < pd.Timestamp(end))
        )
        if len(cols) == 0:
            return pd.DataFrame(columns=["metric", "ts", "value", *LABEL_NAMES])
        hosts, minutes = len(self.hosts), len(cols)
        host_idx = np.tile(np.repeat(np.arange(hosts), minutes), len(metrics))
        names = np.array(self.hosts, dtype=object)
        regions = np.array([REGIONS[i % len(REGIONS)] for i in range(hosts)], dtype=object)
        ts = self.times[cols]
        return pd.DataFrame(
            {
                "metric": np.repeat(np.array(metrics, dtype=object), hosts * minutes),
                "ts": pd.to_datetime(
                    np.tile(ts.tz_convert(None).to_numpy(), hosts * len(metrics)), utc=True
                ),
                "value": np.concatenate([self.values[m][:, cols].ravel() for m in metrics]),
                "host": names[host_idx],
                "region": regions[host_idx],
                "env": "prod",
                "container": "api",
            }
        )


def host_names(count: int) -> tuple[str, ...]:
    return tuple(f"web-{i:02d}" for i in range(1, count + 1))


def load_profile(times: pd.DatetimeIndex) -> np.ndarray:
    """0..1: a daily cycle peaking mid-afternoon UTC, quieter at weekends."""
    hour = (times.hour + times.minute / 60.0).to_numpy(dtype="float64")
    daily = 0.5 * (1.0 + np.cos(2 * np.pi * (hour - 14.0) / 24.0))
    weekend = np.isin(times.dayofweek.to_numpy(), (5, 6))
    return np.asarray(daily * np.where(weekend, 0.55, 1.0))


def generate(
    hosts: int = 50, days: int = 14, *, end: datetime | None = None, seed: int = 7,
    live_minutes: int = 180,
) -> DemoData:  # fmt: skip
    """`hosts` × 10 metrics × `days` of 1-minute samples ending at `end` (default: now)."""
    if hosts < 1 or days < 1:
        raise ValueError("hosts and days must be at least 1")
    rng = np.random.default_rng(seed)
    stamp = pd.Timestamp(end or datetime.now(UTC)).tz_convert(UTC).floor("min")
    times = pd.date_range(end=stamp - pd.Timedelta(minutes=1), periods=days * 1440, freq="min")
    n = len(times)
    load = rng.uniform(0.6, 1.4, hosts)[:, None]
    busy = load_profile(times)[None, :] * load

    def noise(scale: float) -> np.ndarray:
        return np.asarray(rng.normal(0.0, scale, (hosts, n)))

    requests = np.maximum(40.0 + 260.0 * busy + noise(6.0), 0.0)
    values = {
        "cpu_usage_percent": np.clip(10.0 + 50.0 * busy + noise(2.5), 0.0, 100.0),
        "memory_used_bytes": np.round((0.40 + 0.15 * busy + noise(0.004)) * 16 * GIB),
        "disk_used_bytes": np.round(
            rng.uniform(40, 120, hosts)[:, None] * GIB + np.arange(n)[None, :] * 2.0**20
        ),
        "disk_io_utilization_percent": np.clip(5.0 + 30.0 * busy + noise(2.0), 0.0, 100.0),
        "network_receive_bytes_per_second": np.maximum(2e5 + 4e6 * busy + noise(6e4), 0.0),
        "network_transmit_bytes_per_second": np.maximum(1e5 + 2e6 * busy + noise(4e4), 0.0),
        "http_requests_per_second": requests,
        "http_request_duration_seconds": 0.08 * (1.0 + 0.6 * busy) + noise(0.004),
        "http_server_errors_per_minute": rng.poisson(0.5 + 2.0 * busy).astype("float64"),
        "container_memory_working_set_bytes": np.round((0.9 + 0.4 * busy + noise(0.01)) * GIB),
    }
    names = host_names(hosts)
    live_start = (stamp - pd.Timedelta(minutes=live_minutes)).to_pydatetime()
    incidents = inject_incidents(values, times, names, live_minutes, rng)
    return DemoData(names, times, values, incidents, live_start)


# kind, metric, minutes, what
_INCIDENTS = (
    ("cpu saturation", "cpu_usage_percent", 25, "CPU pinned near 98%"),
    ("latency spike", "http_request_duration_seconds", 20, "request latency ×6"),
    ("error burst", "http_server_errors_per_minute", 15, "5xx errors ×25"),
    ("memory leak", "container_memory_working_set_bytes", 45, "container memory climbing ×2.5"),
    ("network outage", "network_receive_bytes_per_second", 20, "received traffic down to ~0"),
)


def inject_incidents(
    values: dict[str, np.ndarray],
    times: pd.DatetimeIndex,
    names: tuple[str, ...],
    live_minutes: int,
    rng: np.random.Generator,
) -> list[Incident]:
    """Each incident on its own host, spread over the live window (not its last 30 minutes)."""
    n = len(times)
    room = max(live_minutes - 30, 30)
    incidents = []
    for i, (kind, metric, minutes, what) in enumerate(_INCIDENTS):
        host = (3 + 7 * i) % len(names)
        if i and host == (3 + 7 * (i - 1)) % len(names) and len(names) > 1:
            host = (host + 1) % len(names)
        first = n - live_minutes + (i * room) // len(_INCIDENTS) + 5
        window = slice(first, first + minutes)
        series = values[metric][host]
        if metric == "cpu_usage_percent":
            series[window] = rng.uniform(96.0, 99.5, minutes)
        elif metric == "http_request_duration_seconds":
            series[window] *= 6.0
        elif metric == "http_server_errors_per_minute":
            series[window] = series[window] * 25.0 + 40.0
        elif metric == "container_memory_working_set_bytes":
            series[window] *= np.linspace(1.3, 2.5, minutes)
        else:
            series[window] *= 0.02
        start = times[first].to_pydatetime()
        incidents.append(
            Incident(kind, names[host], metric, start, start + timedelta(minutes=minutes), what)
        )
    return incidents


# -- landing files ----------------------------------------------------------------------------
def write_atomically(path: Path, data: bytes) -> None:
    """Write under a .part name, then rename: the ingest flow never takes a half-written file."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.rename(path)


def ndjson_bytes(frame: pd.DataFrame) -> bytes:
    labels = frame[list(LABEL_NAMES)].to_dict("records")
    records = pd.DataFrame(
        {
            "metric": frame["metric"],
            "labels": labels,
            "ts": frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "value": frame["value"],
        }
    )
    return str(records.to_json(orient="records", lines=True)).encode()


def csv_bytes(frame: pd.DataFrame) -> bytes:
    out = frame.rename(columns={"ts": "timestamp"})
    out = out.assign(timestamp=out["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return str(out.to_csv(index=False)).encode()


def line_protocol_bytes(frame: pd.DataFrame) -> bytes:
    """`metric,host=…,region=… value=1.5 <ns>`: the field named value keeps the metric name."""
    ns = frame["ts"].dt.as_unit("ns").astype("int64").astype(str)
    tags = ",host=" + frame["host"] + ",region=" + frame["region"] + ",env=prod,container=api"
    lines = frame["metric"] + tags + " value=" + frame["value"].map(repr) + " " + ns
    return ("\n".join(lines.tolist()) + "\n").encode()


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink, compression="zstd")
    return bytes(sink.getvalue().to_pybytes())


def land_files(data: DemoData, landing: Path, start: datetime, end: datetime) -> list[Path]:
    """[start, end) as landing files: whole days as Parquet (the fast path), and the first
    hour of each of the first days in one of the text formats, so every format is exercised."""
    import gzip

    landing.mkdir(parents=True, exist_ok=True)
    encoders = {
        "ndjson": ndjson_bytes,
        "csv": csv_bytes,
        "lp": line_protocol_bytes,
        "parquet": parquet_bytes,
    }
    text_formats = ["ndjson", "csv.gz", "lp", "ndjson.gz", "csv", "lp.gz"]
    days = pd.date_range(pd.Timestamp(start).floor("D"), end, freq="D")
    pieces: list[tuple[datetime, datetime, str]] = []
    for i, day in enumerate(days):
        lo = max(day.to_pydatetime(), start)
        hi = min((day + pd.Timedelta(days=1)).to_pydatetime(), end)
        if lo >= hi:
            continue
        if i < len(text_formats):
            cut = min(lo + timedelta(hours=1), hi)
            pieces.append((lo, cut, text_formats[i]))
            lo = cut
        if lo < hi:
            pieces.append((lo, hi, "parquet"))
    written = []
    for lo, hi, kind in pieces:
        body = encoders[kind.removesuffix(".gz")](data.frame(lo, hi))
        if kind.endswith(".gz"):
            body = gzip.compress(body, compresslevel=1)
        path = landing / f"demo-{lo:%Y%m%dT%H%M}.{kind}"
        write_atomically(path, body)
        written.append(path)
    return written
