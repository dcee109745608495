"""Aggregations over per-bucket stats (count, sum, sum of squares, min, max, last): what a
step query returns for each bucket, from rollup rows or raw samples alike."""

from __future__ import annotations

import numpy as np
import pandas as pd

from metricmill.types import US_PER_SECOND
from storage.rollup import counter_increase

# The stat columns each aggregation reads (rate and increase: all of them).
STATS_FOR: dict[str, tuple[str, ...]] = {
    "avg": ("count", "sum"),
    "sum": ("count", "sum"),
    "count": ("count", "sum"),
    "min": ("count", "sum", "min"),
    "max": ("count", "sum", "max"),
    "last": ("count", "sum", "last", "last_ts"),
    "stddev": ("count", "sum", "sum_sq"),
}


def aggregate(stats: pd.DataFrame, agg: str, *, step_us: int = 0) -> pd.Series:
    """One aggregate from per-bucket count/sum/sum_sq/min/max/last — never averages of averages.

    rate and increase treat the series as a counter (see `storage.rollup.counter_increase`)."""
    if agg in ("rate", "increase"):
        increase = counter_increase(stats)
        return increase / (step_us / US_PER_SECOND) if agg == "rate" else increase
    count = stats["count"].astype("float64")
    total = stats["sum"].astype("float64")
    if agg == "avg":
        return total / count
    if agg == "sum":
        return total
    if agg == "count":
        return count
    if agg in ("min", "max", "last"):
        return stats[agg].astype("float64")
    mean = total / count
    variance = np.maximum(stats["sum_sq"].astype("float64") / count - mean * mean, 0.0)
    return pd.Series(np.sqrt(variance), index=stats.index)
