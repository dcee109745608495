"""Baselines as dense per-series tables for scoring: the expected value, scale and level of
any point (tasks/detect.py, tasks/backtest.py), and the per-metric models fitted on buckets
scored against their own baselines. tasks/baseline.py learns the rows these are built from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from storage.schema import CALIBRATION_COLUMNS
from tasks.detectors import FittedModel, features, fit_per_metric
from tasks.seasonality import DAY_US, MAX_SLOTS, SEASONS, LearnParams, slot_of


@dataclass
class BaselineTable:
    """Baselines as dense arrays (series x 168 slots) for vectorised lookups."""

    series_ids: np.ndarray
    season: np.ndarray
    median: np.ndarray
    scale: np.ndarray
    slope_per_us: np.ndarray
    t_ref: np.ndarray
    t_end: np.ndarray
    level: np.ndarray
    calibration: np.ndarray  # CALIBRATION_COLUMNS x series

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> BaselineTable:
        """From baseline rows as `read_baselines` gives them (a row per series and slot)."""
        return cls.from_reads(frame, frame)

    @classmethod
    def from_reads(cls, slots: pd.DataFrame, series: pd.DataFrame) -> BaselineTable:
        """From a row per (series, slot) with its median and scale, and per series its season,
        trend, window, level and calibration (`read_scoring_baselines`; a series' last row
        counts where it has several, as every slot row of a series repeats them)."""
        ids = np.unique(slots["series_id"].to_numpy(np.int64))
        n = len(ids)
        pos = np.searchsorted(ids, slots["series_id"].to_numpy(np.int64))
        slot = slots["slot"].to_numpy(np.int64)
        median = np.full((n, MAX_SLOTS), np.nan)
        scale = np.full((n, MAX_SLOTS), np.nan)
        median[pos, slot] = slots["median"].to_numpy(np.float64)
        scale[pos, slot] = slots["scale"].to_numpy(np.float64)
        series = series[np.isin(series["series_id"].to_numpy(np.int64), ids)]
        pos = np.searchsorted(ids, series["series_id"].to_numpy(np.int64))
        season = np.zeros(n, dtype=np.int64)
        season[pos] = pd.Series(series["season"]).map({s: i for i, s in enumerate(SEASONS)})
        per_series = np.zeros((4, n))
        per_series[:, pos] = (
            series[["trend_slope", "window_start", "window_end", "level"]].to_numpy(np.float64).T
        )
        slope, w_start, w_end, level = per_series
        calibration = np.full((len(CALIBRATION_COLUMNS), n), np.nan)
        present = [c for c in CALIBRATION_COLUMNS if c in series.columns]
        if present:
            index = np.array([CALIBRATION_COLUMNS.index(c) for c in present], dtype=np.int64)
            calibration[np.ix_(index, pos)] = series[present].to_numpy(np.float64).T
        # Baselines from before calibration existed: a unit tail from 0 (z = 7 is p = 1e-4).
        for name in ("tail_up_u", "tail_down_u", "run_up_u", "run_down_u"):
            row = calibration[CALIBRATION_COLUMNS.index(name)]
            row[np.isnan(row)] = 0.0
        for name in ("tail_up_beta", "tail_down_beta", "run_up_beta", "run_down_beta"):
            row = calibration[CALIBRATION_COLUMNS.index(name)]
            row[np.isnan(row)] = 1.0
        return cls(
            ids,
            season,
            median,
            scale,
            slope / DAY_US,
            (w_start + w_end) / 2,
            w_end,
            level,
            calibration,
        )

    def positions(self, series_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of the table, whether the series has one) per point (points grouped by series)."""
        n = len(self.series_ids)
        if not n or not len(series_id):
            return np.zeros(len(series_id), dtype=np.int64), np.zeros(len(series_id), dtype=bool)
        starts = np.flatnonzero(np.r_[True, series_id[1:] != series_id[:-1]])
        run_len = np.diff(np.r_[starts, len(series_id)])
        run_pos = np.minimum(np.searchsorted(self.series_ids, series_id[starts]), n - 1)
        run_has = self.series_ids[run_pos] == series_id[starts]
        return np.repeat(run_pos, run_len), np.repeat(run_has, run_len)

    def per_series(self, name: str) -> np.ndarray:
        """One calibration column, per series of the table."""
        return self.calibration[CALIBRATION_COLUMNS.index(name)]

    def per_point(self, name: str, pos: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """One calibration column per point, from positions() (NaN without any series);
        written into `out` when given."""
        if not len(self.series_ids):
            nan = np.full(len(pos), np.nan)
            if out is None:
                return nan
            out[:] = nan
            return out
        # mode="clip": positions() gives valid rows, and "raise" would buffer `out`.
        return self.per_series(name).take(pos, out=out, mode="clip")

    def sided(self, prefix: str, pos: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, beta) per point of the `prefix` ("tail" or "run") tail on each point's side
        (`up`: the up side): one gather each from the two sides laid side by side."""
        if not len(self.series_ids):
            return np.full(len(pos), np.nan), np.full(len(pos), np.nan)
        pair = pos * 2 + up
        u = np.stack([self.per_series(f"{prefix}_down_u"), self.per_series(f"{prefix}_up_u")], 1)
        beta = np.stack(
            [self.per_series(f"{prefix}_down_beta"), self.per_series(f"{prefix}_up_beta")], 1
        )
        return u.ravel().take(pair), beta.ravel().take(pair)

    def lookup(
        self,
        series_id: np.ndarray,
        ts_us: np.ndarray,
        params: LearnParams | None = None,
        positions: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(has baseline, expected, scale, level) per point (points grouped by series)."""
        params = params or LearnParams()
        n = len(self.series_ids)
        if not n or not len(series_id):
            nan = np.full(len(series_id), np.nan)
            return np.zeros(len(series_id), dtype=bool), nan, nan, nan
        # Look each run of one series up once, then spread the answer over its points.
        pos, series_has = positions if positions is not None else self.positions(series_id)
        slot = slot_of(ts_us, self.season[pos])
        flat = pos * MAX_SLOTS + slot
        at = np.minimum(ts_us, self.t_end[pos] + params.max_extrapolation_us)
        expected = self.median.ravel().take(flat) + self.slope_per_us[pos] * (at - self.t_ref[pos])
        scale = self.scale.ravel().take(flat)
        has = series_has & np.isfinite(expected) & np.isfinite(scale)
        expected[~has] = np.nan
        scale[~has] = np.nan
        return has, expected, scale, self.level[pos]


def model_features(
    points: pd.DataFrame, table: BaselineTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(has baseline, expected, scale, level, features) for points sorted by series and time."""
    sid = points["series_id"].to_numpy(np.int64)
    ts = points["ts_us"].to_numpy(np.int64)
    value = points["value"].to_numpy(np.float64)
    has, expected, scale, level = table.lookup(sid, ts)
    feats = features(sid, value, expected, scale, level)
    return has, expected, scale, level, feats


def fit_models(
    buckets: pd.DataFrame,
    baselines: pd.DataFrame,
    metric_of: pd.Series,
    patterns: dict[str, str],
    *,
    max_rows: int,
) -> dict[str, FittedModel]:
    """Per-metric detectors fitted on bucket averages scored against their own baselines."""
    if buckets.empty or baselines.empty:
        return {}
    frame = buckets[buckets["count"] > 0].sort_values(["series_id", "ts_us"], kind="stable")
    points = pd.DataFrame(
        {
            "series_id": frame["series_id"].to_numpy(np.int64),
            "ts_us": frame["ts_us"].to_numpy(np.int64),
            "value": (frame["sum"] / frame["count"]).to_numpy(np.float64),
        }
    )
    has, _, _, _, feats = model_features(points, BaselineTable.from_frame(baselines))
    metrics = points["series_id"].map(metric_of).to_numpy(dtype=object)
    return fit_per_metric(
        feats[has],
        metrics[has],
        patterns,
        fitted_from=int(points["ts_us"].min()),
        fitted_to=int(points["ts_us"].max()),
        max_rows=max_rows,
    )
