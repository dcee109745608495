"""The pure alert rule engine: scores in, alert transitions and carried state out.

Per series the engine is the Prometheus state machine (normal -> pending -> firing -> normal),
evaluated without a per-sample loop. The trick is that the machine only changes phase at a few
places that numpy can find directly:

- a *run* is a stretch of consecutive "high" rows; pending always starts at a run's first row,
  and the run fires at its first row at least `for_seconds` after that start (if any);
- once firing, the alert resolves at the first row at least `keep_firing_for_seconds` after the
  last high row, provided no high row comes first. Runs linked by "no resolution in between"
  form a *segment*; a segment holds one firing episode, from its first run that fires to the
  resolution after its last run (or still open at the end of the data).

Carried state is turned back into one synthetic leading row per series (a high row at the
pending start, or at the last high row of a firing alert), so that evaluating consecutive chunks
gives exactly the events of one evaluation over everything.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.alert_machine import run_machine
from tasks.calibration import shift_for_budget

SCORE_COLUMNS = (
    "series_id",
    "ts_us",
    "value",
    "expected",
    "lower",
    "upper",
    "stat_score",
    "model_score",
    "score",
    "sign",
    "kind",
    "outage",
)
# What the rules need of each series rather than of each row (its baseline's level, and the
# thresholds and budget set at its fit): a frame of these, one row per series, sorted by
# series_id, goes with the scores (`series=`). A scores frame may instead carry them as
# columns, per row (a backtest, whose baselines change day by day); those come first.
SERIES_COLUMNS = (
    "series_id",
    "baseline_level",
    "alert_budget",
    "threshold_both",
    "threshold_up",
    "threshold_down",
)
DIRECTIONS = ("both", "up", "down")
EVENT_COLUMNS = (
    "series_id",
    "ts_us",
    "event",
    "severity",
    "value",
    "expected",
    "lower",
    "upper",
    "score",
    "since_us",
    "kind",
)
STATE_COLUMNS = ("series_id", "phase", "since_us", "last_high_us", "severity", "last_ts_us")
PHASES = ("normal", "pending", "firing")
_EVENT_ORDER = {"firing": 0, "escalated": 1, "resolved": 2}


@dataclass(frozen=True)
class AlertRule:
    """When a scored series turns into an alert, and when it stops being one."""

    name: str = "anomaly"
    metric_pattern: str = "*"  # glob on metric name
    threshold: float = 0.7  # warning tier: score >= threshold
    critical_threshold: float = 0.9  # critical tier
    for_seconds: float = 300.0  # score must stay high this long before firing
    keep_firing_for_seconds: float = 900.0  # must stay normal this long before resolving
    min_abs_deviation: float = 0.0  # |value - expected| below this never counts as high
    min_baseline_level: float = 0.0  # series whose |baseline_level| is below never alert
    repeat_interval_seconds: float = 14400.0
    direction: str = "both"  # up | down | both: which side of expected may alert
    alert_budget_per_week: float | None = None  # None: the budget the baselines were fitted with

    def matches(self, metric: str) -> bool:
        """Whether the rule applies to a metric name (shell-style glob, case-sensitive)."""
        return fnmatch.fnmatchcase(metric, self.metric_pattern)


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation learns; `flags` and `row_index` are aligned with the input."""

    events: pd.DataFrame
    state: pd.DataFrame
    flags: np.ndarray  # 0/1 per input row: firing at that row (rows already seen count 0)
    fresh: np.ndarray  # bool per input row: newer than the carried state's last_ts_us


def empty_state() -> pd.DataFrame:
    """A state frame with no series in it."""
    return _state_frame(
        np.empty(0, np.int64),
        np.empty(0, object),
        np.empty(0, np.int64),
        np.empty(0, np.int64),
        np.empty(0, object),
        np.empty(0, np.int64),
        np.empty(0, bool),
        np.empty(0, bool),
    )


def _state_frame(
    sid: np.ndarray,
    phase: np.ndarray,
    since: np.ndarray,
    last_high: np.ndarray,
    severity: np.ndarray,
    last_ts: np.ndarray,
    has_since: np.ndarray,
    has_high: np.ndarray,
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "series_id": pd.Series(sid, dtype="int64"),
            "phase": pd.Series(phase, dtype=object),
            "since_us": _nullable(since, has_since),
            "last_high_us": _nullable(last_high, has_high),
            "severity": pd.Series(severity, dtype=object),
            "last_ts_us": pd.Series(last_ts, dtype="int64"),
        }
    )


def _nullable(values: np.ndarray, present: np.ndarray) -> pd.Series:
    return pd.Series(np.where(present, values, 0), dtype="Int64").mask(~present)


def _empty_events() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.array([], dtype="float64") for c in EVENT_COLUMNS})
    return frame.astype(
        {
            "series_id": "int64",
            "ts_us": "int64",
            "event": object,
            "severity": object,
            "since_us": "int64",
            "kind": "int64",
        }
    )


def _check_scores(scores: pd.DataFrame) -> None:
    missing = [c for c in ("series_id", "ts_us", "value", "score") if c not in scores.columns]
    if missing:
        raise ValueError(f"scores lack column(s): {', '.join(missing)}")


def _column(scores: pd.DataFrame, name: str, default: float = np.nan) -> np.ndarray:
    if name in scores.columns:
        return scores[name].to_numpy(dtype=np.float64, na_value=np.nan)
    return np.full(len(scores), default)


def _per_series(
    scores: pd.DataFrame, series: pd.DataFrame | None, names: tuple[str, ...]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """For a rule worked out per series: (the row of each score in the returned arrays, one
    array per name). From `series` (SERIES_COLUMNS, sorted by series_id) when the scores do
    not carry the columns; otherwise the scores' own columns, one entry per row."""
    if series is None or any(name in scores.columns for name in names):
        return np.arange(len(scores)), [_column(scores, name) for name in names]
    ids = series["series_id"].to_numpy(np.int64)
    sid = scores["series_id"].to_numpy(np.int64)
    at = np.searchsorted(ids, sid)
    at_c = np.minimum(at, max(len(ids) - 1, 0))
    found = (at < len(ids)) & (ids[at_c] == sid) if len(ids) else np.zeros(len(sid), bool)
    # One extra entry, NaN, for scores of series the frame does not hold.
    row = np.where(found, at_c, len(ids))
    return row, [np.r_[_column(series, name), np.nan] for name in names]


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


def effective_threshold(
    rule: AlertRule, scores: pd.DataFrame, series: pd.DataFrame | None = None
) -> np.ndarray:
    """Per row: the rule's threshold, raised to the series' own (set from the alert budget at
    its baseline fit, for the rule's direction and budget)."""
    column = {"both": "threshold_both", "up": "threshold_up", "down": "threshold_down"}
    row, (own, budget) = _per_series(
        scores, series, (column.get(rule.direction, "threshold_both"), "alert_budget")
    )
    if rule.alert_budget_per_week is not None:
        own = shift_for_budget(own, budget, rule.alert_budget_per_week)
    return np.fmax(own, rule.threshold).take(row)


def high_mask(
    rule: AlertRule, scores: pd.DataFrame, series: pd.DataFrame | None = None
) -> np.ndarray:
    """Rows whose score counts as high under the rule (NaN scores never do): at or above the
    effective threshold on the rule's side, or an outage (unless the rule only looks up)."""
    score = _column(scores, "score")
    value = _column(scores, "value")
    expected = _column(scores, "expected")
    sign = _column(scores, "sign", 0.0)
    outage = _column(scores, "outage", 0.0) > 0
    with np.errstate(invalid="ignore"):
        high = score >= effective_threshold(rule, scores, series)
        if rule.direction == "up":
            high &= (sign > 0) | ~np.isfinite(sign)
            outage[:] = False
        elif rule.direction == "down":
            high &= (sign < 0) | ~np.isfinite(sign)
        high |= outage
        if rule.min_abs_deviation > 0:
            high &= np.abs(value - expected) >= rule.min_abs_deviation
        if rule.min_baseline_level > 0:
            row, (level,) = _per_series(scores, series, ("baseline_level",))
            high &= (np.abs(level) >= rule.min_baseline_level).take(row)
    return np.asarray(high, dtype=bool)


def _sorted(sid: np.ndarray, ts: np.ndarray) -> bool:
    step_sid = np.diff(sid)
    # Equal timestamps (a file's duplicated rows) keep their order: lexsort is stable.
    return bool(np.all((step_sid > 0) | ((step_sid == 0) & (np.diff(ts) >= 0))))


def evaluate(
    rule: AlertRule,
    scores: pd.DataFrame,
    state: pd.DataFrame | None = None,
    series: pd.DataFrame | None = None,
) -> Evaluation:
    """Run the rule over `scores` (sorted by series_id, ts_us), continuing from `state`;
    `series`: what the rule needs per series (SERIES_COLUMNS), unless the scores carry it."""
    _check_scores(scores)
    sid_in = scores["series_id"].to_numpy(dtype=np.int64)
    ts_in = scores["ts_us"].to_numpy(dtype=np.int64)
    if len(scores) > 1 and not _sorted(sid_in, ts_in):
        order = np.lexsort((ts_in, sid_in))
        result = evaluate(rule, scores.iloc[order], state, series)
        flags, fresh = np.empty_like(result.flags), np.empty_like(result.fresh)
        flags[order], fresh[order] = result.flags, result.fresh
        return Evaluation(events=result.events, state=result.state, flags=flags, fresh=fresh)
    st = empty_state() if state is None or len(state) == 0 else state
    st = st.drop_duplicates("series_id", keep="last").sort_values("series_id")
    frame, fresh = _machine_input(rule, scores, st, series)

    events, flags_all, end_state = _empty_events(), np.zeros(0, np.int8), None
    if len(frame.sid):
        events, flags_all, end_state = run_machine(
            _us(rule.for_seconds), _us(rule.keep_firing_for_seconds),
            frame.sid, frame.ts, frame.high, frame.crit, frame.forced,
            frame.synthetic, frame.carried_since, frame.interval,
        )  # fmt: skip
    flags = np.zeros(len(scores), np.int8)
    real = ~frame.synthetic
    flags[frame.source[real]] = flags_all[real]
    events = _event_rows(events, frame.source, scores)
    return Evaluation(events=events, state=_next_state(st, end_state), flags=flags, fresh=fresh)


@dataclass(frozen=True)
class _MachineInput:
    """The rows the state machine walks: the fresh input rows, plus one synthetic leading row
    per carried pending or firing series that has fresh rows (standing for its past)."""

    sid: np.ndarray
    ts: np.ndarray
    source: np.ndarray  # the input row; -1 for a synthetic row
    high: np.ndarray
    crit: np.ndarray
    forced: np.ndarray  # a carried firing series: its run fires at once
    carried_since: np.ndarray
    interval: np.ndarray  # what a real row stands for: since the series' previous row

    @property
    def synthetic(self) -> np.ndarray:
        return self.source < 0


def _machine_input(
    rule: AlertRule, scores: pd.DataFrame, st: pd.DataFrame, series: pd.DataFrame | None
) -> tuple[_MachineInput, np.ndarray]:
    """The machine's rows, and which input rows are fresh (past their series' carried last
    row: the rows at or before it were evaluated before and are skipped)."""
    n_in = len(scores)
    sid_in = scores["series_id"].to_numpy(dtype=np.int64)
    ts_in = scores["ts_us"].to_numpy(dtype=np.int64)
    high_in = high_mask(rule, scores, series)
    with np.errstate(invalid="ignore"):
        crit_in = high_in & (_column(scores, "score") >= rule.critical_threshold)
    st_sid = st["series_id"].to_numpy(dtype=np.int64)
    st_phase = st["phase"].to_numpy(dtype=object)
    st_since = st["since_us"].to_numpy(dtype=np.float64, na_value=np.nan)
    st_high = st["last_high_us"].to_numpy(dtype=np.float64, na_value=np.nan)
    st_sev = st["severity"].to_numpy(dtype=object)
    st_last = st["last_ts_us"].to_numpy(dtype=np.int64)

    pos = np.searchsorted(st_sid, sid_in)
    pos_c = np.minimum(pos, max(len(st_sid) - 1, 0))
    known = (pos < len(st_sid)) & (st_sid[pos_c] == sid_in) if len(st_sid) else np.zeros(n_in, bool)
    fresh = ~known | (ts_in > np.where(known, st_last[pos_c] if len(st_sid) else 0, 0))
    real_idx = np.flatnonzero(fresh)

    present = np.isin(st_sid, sid_in[real_idx])
    syn_pending = present & (st_phase == "pending") & ~np.isnan(st_since)
    syn_firing = present & (st_phase == "firing") & ~np.isnan(st_high)
    syn = np.flatnonzero(syn_pending | syn_firing)
    syn_ts = np.where(syn_firing[syn], st_high[syn], st_since[syn]).astype(np.int64)
    syn_fire = syn_firing[syn]
    syn_crit = syn_fire & (st_sev[syn] == "critical")
    syn_since = np.where(np.isnan(st_since[syn]), syn_ts, st_since[syn]).astype(np.int64)

    real_sid = sid_in[real_idx]
    at = np.searchsorted(real_sid, st_sid[syn], side="left")  # before the series' first row

    def with_synthetic(synthetic_values: np.ndarray, real_values: np.ndarray) -> np.ndarray:
        return np.insert(real_values, at, synthetic_values)

    # The interval each real row stands for: since the series' previous row (in this frame, or
    # the last one evaluated before); 0 when unknown and for a synthetic row.
    r_ts = ts_in[real_idx]
    prev = np.full(len(real_idx), -1, np.int64)
    if len(real_idx):
        same = np.r_[False, real_sid[1:] == real_sid[:-1]]
        prev[1:] = np.where(same[1:], r_ts[:-1], -1)
        carried = known[real_idx] & ~same
        if len(st_sid):
            prev[carried] = st_last[pos_c[real_idx][carried]]
    step = np.where(prev >= 0, r_ts - prev, 0)

    frame = _MachineInput(
        sid=with_synthetic(st_sid[syn], real_sid),
        ts=with_synthetic(syn_ts, r_ts),
        source=with_synthetic(np.full(len(syn), -1, np.int64), real_idx),
        high=with_synthetic(np.ones(len(syn), bool), high_in[real_idx]),
        crit=with_synthetic(syn_crit, crit_in[real_idx]),
        forced=with_synthetic(syn_fire, np.zeros(len(real_idx), bool)),
        carried_since=with_synthetic(syn_since, np.zeros(len(real_idx), np.int64)),
        interval=with_synthetic(np.zeros(len(syn), np.int64), step),
    )
    return frame, fresh


def _event_rows(events: pd.DataFrame, source: np.ndarray, scores: pd.DataFrame) -> pd.DataFrame:
    """The machine's events with the values of the input rows they happened at, in
    (series, time, event order)."""
    if not len(events):
        return _empty_events()
    rows = source[events.pop("_row").to_numpy()]
    for name in ("value", "expected", "lower", "upper", "score"):
        events[name] = _column(scores, name)[rows]
    events["kind"] = np.nan_to_num(_column(scores, "kind", 0.0)[rows]).astype(np.int64)
    events = events[list(EVENT_COLUMNS)]
    events["_order"] = events["event"].map(_EVENT_ORDER)
    return (
        events.sort_values(["series_id", "ts_us", "_order"], kind="stable")
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def _next_state(st: pd.DataFrame, end_state: tuple[np.ndarray, ...] | None) -> pd.DataFrame:
    """Freshly evaluated series' states, plus the carried series that had nothing new."""
    st_sid = st["series_id"].to_numpy(dtype=np.int64)
    new_sid = np.empty(0, np.int64) if end_state is None else end_state[0]
    carried = st.iloc[np.flatnonzero(~np.isin(st_sid, new_sid))]
    if end_state is None:
        new_state = carried.reset_index(drop=True) if len(carried) else empty_state()
    else:
        fresh_state = _state_frame(*end_state)
        # A synthetic row stands for the start of a run; the carried last high may be later.
        before = pd.Series(st["last_high_us"].to_numpy(), index=st_sid, dtype="Int64")
        carried_high = fresh_state["series_id"].map(before).astype("Int64")
        fresh_state["last_high_us"] = (
            pd.concat([fresh_state["last_high_us"], carried_high], axis=1)
            .max(axis=1)
            .astype("Int64")
        )
        parts = [p for p in (carried, fresh_state) if len(p)]
        new_state = pd.concat(parts, ignore_index=True) if parts else empty_state()
    return new_state.sort_values("series_id", kind="stable").reset_index(drop=True)


def late_events(
    rule: AlertRule,
    scores: pd.DataFrame,
    fresh: np.ndarray,
    state: pd.DataFrame | None,
    known_spans: pd.DataFrame | None = None,
    series: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Events for rows at or before their series' carried last row (`fresh` False: samples
    that landed late, overwrites): those rows run through the rule on their own, and each
    episode they make fires with `since` at its first high row and resolves at its last row
    (it lies in the past). Series already firing, and episodes that overlap an alert the
    series had (`known_spans`: series_id, start_us, end_us), make none: late rows are scored
    with their already-scored neighbours, and an episode alerted on then is not news."""
    late = np.flatnonzero(~np.asarray(fresh, dtype=bool))
    if not len(late):
        return _empty_events()
    rows = scores.iloc[late]
    if state is not None and len(state):
        firing = state.loc[state["phase"] == "firing", "series_id"].to_numpy(np.int64)
        rows = rows[~rows["series_id"].isin(firing).to_numpy()]
    if not len(rows):
        return _empty_events()
    events = evaluate(rule, rows, series=series).events
    if not len(events):
        return events
    # An episode still firing at the series' last late row ends there.
    last = rows.groupby("series_id", sort=False).tail(1).set_index("series_id")
    open_now = events.groupby("series_id", sort=False).tail(1)
    open_now = open_now[open_now["event"] != "resolved"]
    if len(open_now):
        closing = last.loc[open_now["series_id"].to_numpy()].reset_index()
        closing = closing.assign(
            event="resolved",
            severity=open_now["severity"].to_numpy(),
            since_us=open_now["since_us"].to_numpy(),
            kind=np.nan_to_num(_column(closing, "kind", 0.0)).astype(np.int64),
        )
        events = pd.concat([events, closing[list(EVENT_COLUMNS)]], ignore_index=True)
        events = events.sort_values(["series_id", "ts_us"], kind="stable").reset_index(drop=True)
    if known_spans is not None and len(known_spans):
        ends = events[events["event"] == "resolved"][["series_id", "since_us", "ts_us"]]
        pairs = ends.merge(known_spans, on="series_id")
        overlap = (pairs["start_us"] <= pairs["ts_us"]) & (pairs["end_us"] >= pairs["since_us"])
        seen = set(
            zip(pairs.loc[overlap, "series_id"], pairs.loc[overlap, "since_us"], strict=True)
        )
        keep = [
            (sid, since) not in seen
            for sid, since in zip(events["series_id"], events["since_us"], strict=True)
        ]
        events = events[np.asarray(keep, dtype=bool)].reset_index(drop=True)
    return events


def alert_timeline(
    rule: AlertRule, scores: pd.DataFrame, state: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Alert transitions (firing, escalated, resolved) in `scores`, and the state to carry on."""
    result = evaluate(rule, scores, state)
    return result.events, result.state


def alert_flags(rule: AlertRule, scores: pd.DataFrame) -> np.ndarray:
    """0/1 per row of `scores`: whether the series is in the firing phase at that row."""
    return evaluate(rule, scores).flags
