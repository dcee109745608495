"""Walk-forward replay: the nightly baseline and the 5-minute scoring, day by day, over history.

At every UTC midnight T the baselines and per-metric models are refitted from the buckets
before T (the last `window_days` days), exactly as the nightly flow would; the day's points are
then scored in one vectorised call, with the points of the hour before T as look-back context.
A point's score therefore depends only on points at or before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.alert_engine import AlertRule, alert_flags
from tasks.baseline import DAY_US, BaselineTable, LearnParams, fit_models, learn_baselines
from tasks.detect import CONTEXT_US, empty_scores, score_points

BUCKET_US = 300_000_000


def buckets_of(points: pd.DataFrame, bucket_us: int = BUCKET_US) -> pd.DataFrame:
    """Rollup-style buckets (series_id, ts_us, count, sum, sum_sq) of raw points."""
    sid = points["series_id"].to_numpy(np.int64)
    bucket = points["ts_us"].to_numpy(np.int64) // bucket_us * bucket_us
    value = points["value"].to_numpy(np.float64)
    keys = np.column_stack([sid, bucket])
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    size = len(uniq)
    return pd.DataFrame(
        {
            "series_id": uniq[:, 0],
            "ts_us": uniq[:, 1],
            "count": np.bincount(inverse, minlength=size).astype(np.float64),
            "sum": np.bincount(inverse, weights=value, minlength=size),
            "sum_sq": np.bincount(inverse, weights=value * value, minlength=size),
        }
    )


def replay(
    points: pd.DataFrame,
    *,
    window_days: int = 28,
    detectors: dict[str, str] | None = None,
    metric: str = "backtest",
    max_fit_rows: int = 5_000,
    params: LearnParams | None = None,
) -> pd.DataFrame:
    """Scores (the detect flow's columns) for every point of `points` (series_id, ts_us, value).

    Points before a series has its first baseline get score 0 and no expected value.
    """
    points = points.sort_values(["series_id", "ts_us"], kind="stable").reset_index(drop=True)
    if points.empty:
        return empty_scores()
    ts = points["ts_us"].to_numpy(np.int64)
    buckets = buckets_of(points)
    b_ts = buckets["ts_us"].to_numpy(np.int64)
    metric_of = pd.Series(metric, index=np.unique(points["series_id"].to_numpy(np.int64)))
    patterns = detectors or {"*": "ecod"}
    first_day = int(ts.min()) // DAY_US + 1
    last_day = int(ts.max()) // DAY_US
    parts: list[pd.DataFrame] = []
    for day in range(first_day, last_day + 1):  # one refit per day, as the nightly flow
        t0 = day * DAY_US
        train = buckets[(b_ts >= t0 - window_days * DAY_US) & (b_ts < t0)]
        learned = learn_baselines(train, bucket_us=BUCKET_US, params=params)
        if learned.baselines.empty:
            continue
        models = fit_models(train, learned.baselines, metric_of, patterns, max_rows=max_fit_rows)
        window = (ts >= t0 - CONTEXT_US) & (ts < t0 + DAY_US)
        chunk = points.loc[window].assign(fresh=ts[window] >= t0)
        scored = score_points(chunk, BaselineTable.from_frame(learned.baselines), models, metric_of)
        parts.append(scored.scores)
    scored_all = pd.concat(parts, ignore_index=True) if parts else empty_scores()
    merged = points[["series_id", "ts_us", "value"]].merge(
        scored_all.drop(columns="value"), on=["series_id", "ts_us"], how="left"
    )
    for column in ("stat_score", "score"):
        merged[column] = merged[column].fillna(0.0)
    return merged


@dataclass
class Evaluation:
    """Window recall, false alerts and detection delay of alert flags against labels."""

    windows: pd.DataFrame  # series_id, start_us, end_us, detected, delay_s (+ kind if given)
    alerts: int
    false_alerts: int
    series_weeks: float

    @property
    def recall(self) -> float:
        return float(self.windows["detected"].mean()) if len(self.windows) else float("nan")

    @property
    def precision(self) -> float:
        return (self.alerts - self.false_alerts) / self.alerts if self.alerts else float("nan")

    @property
    def false_per_series_week(self) -> float:
        return self.false_alerts / self.series_weeks if self.series_weeks else float("nan")

    @property
    def median_delay_s(self) -> float:
        found = self.windows.loc[self.windows["detected"], "delay_s"]
        return float(found.median()) if len(found) else float("nan")


def alerts_for(scores: pd.DataFrame, rule: AlertRule) -> np.ndarray:
    """0/1 per row: the alert rule engine's firing flag (one call, shared with the detect flow)."""
    return np.asarray(alert_flags(rule, scores), dtype=np.int8)


def label_windows(frame: pd.DataFrame, step_us: int) -> pd.DataFrame:
    """Runs of label == 1 per series as (series_id, start_us, end_us)."""
    sid = frame["series_id"].to_numpy(np.int64)
    ts = frame["ts_us"].to_numpy(np.int64)
    label = frame["label"].to_numpy(np.int64) > 0
    prev = np.r_[False, label[:-1] & (sid[1:] == sid[:-1])]
    nxt = np.r_[label[1:] & (sid[1:] == sid[:-1]), False]
    starts = np.flatnonzero(label & ~prev)
    ends = np.flatnonzero(label & ~nxt)
    return pd.DataFrame(
        {"series_id": sid[starts], "start_us": ts[starts], "end_us": ts[ends] + step_us}
    )


def evaluate_alerts(
    frame: pd.DataFrame,
    alert: np.ndarray,
    windows: pd.DataFrame,
    *,
    grace_us: int,
    scored_from_us: int | None = None,
) -> Evaluation:
    """Match alert onsets to labelled windows (extended by grace_us); count the rest as false."""
    sid = frame["series_id"].to_numpy(np.int64)
    ts = frame["ts_us"].to_numpy(np.int64)
    on = alert.astype(bool)
    onset = on & ~np.r_[False, on[:-1] & (sid[1:] == sid[:-1])]
    # Per window: the first alerting row inside [start, end + grace).
    order = np.lexsort((ts, sid))
    s_sid, s_ts, s_on = sid[order], ts[order], on[order]
    key_rows = np.flatnonzero(s_on)
    detected = np.zeros(len(windows), dtype=bool)
    delay = np.full(len(windows), np.nan)
    w_sid = windows["series_id"].to_numpy(np.int64)
    w_start = windows["start_us"].to_numpy(np.int64)
    w_end = windows["end_us"].to_numpy(np.int64) + grace_us
    if len(key_rows):
        a_sid, a_ts = s_sid[key_rows], s_ts[key_rows]
        # First alerting row at or after (series, start), compared lexicographically.
        combined = a_sid.astype(np.float64) * 1e17 + a_ts  # series ids and µs fit comfortably
        probe = w_sid.astype(np.float64) * 1e17 + w_start
        pos = np.searchsorted(combined, probe, side="left")
        inside = pos < len(a_ts)
        pc = np.minimum(pos, len(a_ts) - 1)
        inside &= (a_sid[pc] == w_sid) & (a_ts[pc] < w_end)
        detected = inside
        delay = np.where(inside, (a_ts[pc] - w_start) / 1e6, np.nan)
    # Onsets inside any window (+grace) are true; the rest are false alerts.
    o_sid, o_ts = sid[onset], ts[onset]
    true_onset = np.zeros(len(o_sid), dtype=bool)
    if len(windows) and len(o_sid):
        w_order = np.lexsort((w_start, w_sid))
        ws, wst, wen = w_sid[w_order], w_start[w_order], w_end[w_order]
        wkey = ws.astype(np.float64) * 1e17 + wst
        okey = o_sid.astype(np.float64) * 1e17 + o_ts
        pos = np.searchsorted(wkey, okey, side="right") - 1
        ok = pos >= 0
        pc = np.maximum(pos, 0)
        true_onset = ok & (ws[pc] == o_sid) & (o_ts < wen[pc])
    start = scored_from_us if scored_from_us is not None else int(ts.min())
    weeks = (int(ts.max()) - start) / (7 * DAY_US)
    n_series = len(np.unique(sid))
    out = windows.copy()
    out["detected"] = detected
    out["delay_s"] = delay
    return Evaluation(out, int(onset.sum()), int((~true_onset).sum()), max(weeks, 0) * n_series)
