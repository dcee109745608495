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

from tasks.alert_engine import SERIES_COLUMNS, AlertRule, alert_flags
from tasks.baseline import DAY_US, BaselineTable, LearnParams, fit_models, learn_baselines
from tasks.detect import CONTEXT_US, empty_scores, score_points
from tasks.detectors import FittedModel

BUCKET_US = 300_000_000
MODEL_REFIT_DAYS = 7


def buckets_of(points: pd.DataFrame, bucket_us: int = BUCKET_US) -> pd.DataFrame:
    """Rollup-style buckets (series_id, ts_us, count, sum, sum_sq, min, max) of raw points."""
    sid = points["series_id"].to_numpy(np.int64)
    bucket = points["ts_us"].to_numpy(np.int64) // bucket_us * bucket_us
    value = points["value"].to_numpy(np.float64)
    order = np.lexsort((bucket, sid))
    sid, bucket, value = sid[order], bucket[order], value[order]
    starts = np.flatnonzero(np.r_[True, (sid[1:] != sid[:-1]) | (bucket[1:] != bucket[:-1])])
    if not len(value):
        starts = np.empty(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, len(value)]).astype(np.float64)
    if not len(value):
        empty = {c: np.empty(0) for c in ("count", "sum", "sum_sq", "min", "max")}
        return pd.DataFrame(
            {"series_id": np.empty(0, np.int64), "ts_us": np.empty(0, np.int64), **empty}
        )
    return pd.DataFrame(
        {
            "series_id": sid[starts],
            "ts_us": bucket[starts],
            "count": counts,
            "sum": np.add.reduceat(value, starts),
            "sum_sq": np.add.reduceat(value * value, starts),
            "min": np.minimum.reduceat(value, starts),
            "max": np.maximum.reduceat(value, starts),
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
    model_refit_days: int = MODEL_REFIT_DAYS,
    confirmed: np.ndarray | None = None,
    confirm_with: AlertRule | None = None,
) -> pd.DataFrame:
    """Scores (the detect flow's columns) for every point of `points` (series_id, ts_us, value),
    in the order of `points` sorted by (series_id, ts_us) (duplicated timestamps keep their
    order). Points before a series has its first baseline get score 0 and no expected value.

    Baselines are refitted every midnight from the days before it; the PyOD models every
    `model_refit_days` midnights (also only from earlier days), as they only refine points that
    are already unusual and their fit dominates the replay's time.

    `confirmed` (bool per row of `points`, e.g. a file's labels) marks incidents. With
    `confirm_with` (an alert rule), a refit leaves out what an operator could have confirmed
    by then: the rows of each alert the rule raised on a labelled incident, and that incident's
    labelled rows (`metricmill alerts resolve --incident`); missed incidents and false alerts
    stay in the training data. Without it, every labelled row before the refit is left out.
    A refit only ever sees rows before its midnight, so nothing is known ahead of time.
    """
    if confirmed is not None:
        points = points.assign(_confirmed=np.asarray(confirmed, dtype=bool))
    points = points.sort_values(["series_id", "ts_us"], kind="stable").reset_index(drop=True)
    if points.empty:
        return empty_scores()
    h = _history(points, confirmed is not None, confirm_with)
    metric_of = pd.Series(metric, index=np.unique(h.sid))
    patterns = detectors or {"*": "ecod"}
    # The rows carry what the rules need per series too: the baselines change day by day.
    columns = [c for c in empty_scores().columns if c not in ("series_id", "ts_us", "value")]
    columns += SERIES_COLUMNS[1:]
    values = {c: np.full(len(h.points), np.nan) for c in columns}
    models: dict[str, FittedModel] = {}
    fitted_on: int | None = None
    for day in range(int(h.ts.min()) // DAY_US + 1, int(h.ts.max()) // DAY_US + 1):
        t0 = day * DAY_US  # one refit per day, as the nightly flow
        if h.labels is not None and confirm_with is not None:
            _leave_out_confirmed(h, t0, values, confirm_with)
        train = _training_buckets(h, t0, window_days)
        learned = learn_baselines(train, bucket_us=BUCKET_US, params=params)
        if learned.baselines.empty:
            continue
        if fitted_on is None or day - fitted_on >= model_refit_days:
            models = fit_models(
                train, learned.baselines, metric_of, patterns, max_rows=max_fit_rows
            )
            fitted_on = day
        table = BaselineTable.from_frame(learned.baselines)
        _score_day(h, t0, table, models, metric_of, values)
    out = h.points.copy()
    for column in columns:
        out[column] = values[column]
    for column in ("stat_score", "score"):
        out[column] = out[column].fillna(0.0)
    return out


@dataclass
class _History:
    """What a replay walks over: the points (series_id, ts_us, value; sorted), their labels,
    their 5m buckets, each point's bucket, and the buckets a refit must leave out (labelled or
    confirmed). `single`: one series, so time windows are slices."""

    points: pd.DataFrame
    ts: np.ndarray
    sid: np.ndarray
    labels: np.ndarray | None
    buckets: pd.DataFrame
    b_ts: np.ndarray
    row_bucket: np.ndarray
    left_out: np.ndarray
    single: bool


def _history(points: pd.DataFrame, labelled: bool, confirm_with: AlertRule | None) -> _History:
    """The replay's points and buckets; without a rule to confirm with, every labelled
    bucket is left out of every refit from the start."""
    ts = points["ts_us"].to_numpy(np.int64)
    sid = points["series_id"].to_numpy(np.int64)
    labels = points["_confirmed"].to_numpy(bool) if labelled else None
    points = points[["series_id", "ts_us", "value"]]
    buckets = buckets_of(points)
    b_ts = buckets["ts_us"].to_numpy(np.int64)
    b_sid = buckets["series_id"].to_numpy(np.int64)
    row_bucket = _bucket_rows(sid, ts, b_sid, b_ts)
    left_out = np.zeros(len(buckets), dtype=bool)
    if labels is not None and confirm_with is None:
        left_out[row_bucket[labels]] = True
    return _History(points, ts, sid, labels, buckets, b_ts, row_bucket, left_out, _single(buckets))


def _leave_out_confirmed(
    h: _History, t0: int, values: dict[str, np.ndarray], rule: AlertRule
) -> None:
    """Mark the buckets of the rows an operator could have confirmed before `t0` (from the
    scores so far) as left out of the refits from now on."""
    assert h.labels is not None
    seen = int(np.searchsorted(h.ts, t0)) if h.single else len(h.ts)
    known = h.ts[:seen] < t0
    confirmed = _confirmed_rows(h.points, values, seen, known, h.labels, rule)
    h.left_out[h.row_bucket[:seen][confirmed]] = True


def _training_buckets(h: _History, t0: int, window_days: int) -> pd.DataFrame:
    """The buckets of the `window_days` days before `t0` a refit may learn from."""
    if h.single:
        lo, hi = np.searchsorted(h.b_ts, [t0 - window_days * DAY_US, t0])
        keep = np.arange(lo, hi)
    else:
        keep = np.flatnonzero((h.b_ts >= t0 - window_days * DAY_US) & (h.b_ts < t0))
    return h.buckets.iloc[keep[~h.left_out[keep]]]


def _score_day(
    h: _History,
    t0: int,
    table: BaselineTable,
    models: dict[str, FittedModel],
    metric_of: pd.Series,
    values: dict[str, np.ndarray],
) -> None:
    """Score the day from `t0` (with the hour before as context) into `values`."""
    rows = np.flatnonzero((h.ts >= t0 - CONTEXT_US) & (h.ts < t0 + DAY_US))
    chunk = h.points.iloc[rows].assign(fresh=h.ts[rows] >= t0)
    scored = score_points(chunk, table, models, metric_of)
    target = rows[scored.rows]  # back to rows of `points`
    series = scored.series
    at = np.searchsorted(
        series["series_id"].to_numpy(np.int64), scored.scores["series_id"].to_numpy(np.int64)
    )  # every scored row's series is in the day's table
    for column, column_values in values.items():
        if column in scored.scores.columns:
            column_values[target] = scored.scores[column].to_numpy(np.float64)
        else:
            column_values[target] = series[column].to_numpy(np.float64)[at]


def _bucket_rows(
    sid: np.ndarray, ts: np.ndarray, b_sid: np.ndarray, b_ts: np.ndarray
) -> np.ndarray:
    """Per row (sorted by series and time): the index of its bucket in buckets_of's frame."""
    key = (sid, ts // BUCKET_US * BUCKET_US)
    order = np.lexsort((b_ts, b_sid))  # buckets_of sorts this way already; cheap to be sure
    at = np.searchsorted(
        b_sid[order].astype(np.float64) * 1e17 + b_ts[order],
        key[0].astype(np.float64) * 1e17 + key[1],
    )
    return order[np.minimum(at, len(order) - 1)]


def _confirmed_rows(
    out: pd.DataFrame,
    values: dict[str, np.ndarray],
    seen: int,
    known: np.ndarray,
    labels: np.ndarray,
    rule: AlertRule,
) -> np.ndarray:
    """Rows among the first `seen` (those with `known` set) an operator would have confirmed
    as an incident by now: rows of alert episodes that overlap a labelled run, and the rows of
    labelled runs that overlap an alert."""
    rows = np.flatnonzero(known)
    if not len(rows):
        return rows
    frame = out.iloc[rows].assign(**{c: v[rows] for c, v in values.items()})
    for column in ("stat_score", "score"):
        frame[column] = frame[column].fillna(0.0)
    firing = np.asarray(alert_flags(rule, frame), dtype=bool)
    label = labels[rows]
    sid = frame["series_id"].to_numpy(np.int64)
    confirmed = np.zeros(len(rows), dtype=bool)
    for mask, other in ((firing, label), (label, firing)):  # episodes of one, touched by other
        start = mask & ~np.r_[False, mask[:-1] & (sid[1:] == sid[:-1])]
        run = np.cumsum(start) * mask  # 0 outside runs
        touched = np.zeros(int(run.max()) + 1, dtype=bool)
        touched[run[mask & other]] = True
        confirmed |= mask & touched[run]
    return rows[confirmed]


def _single(buckets: pd.DataFrame) -> bool:
    """One series (buckets sorted by time): training windows are slices."""
    sid = buckets["series_id"].to_numpy()
    return bool(len(sid) == 0 or sid[0] == sid[-1])


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
