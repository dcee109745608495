"""The alert state machine, vectorised: every series of a frame at once, no per-row loop.

tasks/alert_engine.py prepares its rows (fresh input rows plus a synthetic leading row for a
series carried in pending or firing) and reads back its events, flags and end states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class _Layout:
    """Where each series lies in the frame (sorted by series, then time)."""

    starts: np.ndarray  # first row of each series
    ends: np.ndarray  # one past its last row
    row_series: np.ndarray  # each row's series number
    row_series_end: np.ndarray  # each row's series end
    key: np.ndarray  # a time key increasing over the whole frame


def _layout(sid: np.ndarray, ts: np.ndarray) -> _Layout:
    n = len(sid)
    first_of_series = np.ones(n, bool)
    first_of_series[1:] = sid[1:] != sid[:-1]
    starts = np.flatnonzero(first_of_series)
    ends = np.append(starts[1:], n)
    row_series = np.cumsum(first_of_series) - 1
    # A key increasing over the whole frame, so one searchsorted finds "first row of this
    # series at or after t" for every series at once (a landing past the series means none).
    span = ts[ends - 1] - ts[starts]
    offset = np.concatenate([[0], np.cumsum(span + 1)[:-1]])
    key = ts - ts[starts][row_series] + offset[row_series]
    return _Layout(starts, ends, row_series, ends[row_series], key)


@dataclass(frozen=True)
class _Runs:
    """Maximal stretches of high rows within a series, and what each one leads to."""

    starts: np.ndarray  # first row of each run
    ends: np.ndarray  # last row of each run
    series_end: np.ndarray
    fire: np.ndarray  # the row where the run has been high for `for` (past `ends`: never)
    qualifies: np.ndarray  # the run fires
    resolve_at: np.ndarray  # the first row >= last high + keep_firing_for
    breaks: np.ndarray  # that row comes before the next run: an episode ends here
    segment: np.ndarray  # runs joined by keep_firing_for share a segment number


def _runs(
    for_us: int,
    keep_us: int,
    lay: _Layout,
    high: np.ndarray,
    forced: np.ndarray,
    synthetic: np.ndarray,
    interval: np.ndarray,
) -> _Runs:
    n = len(high)
    first_of_series = np.zeros(n, bool)
    first_of_series[lay.starts] = True
    last_of_series = np.zeros(n, bool)
    last_of_series[lay.ends - 1] = True
    prev_high = np.zeros(n, bool)
    prev_high[1:] = high[:-1]
    next_high = np.zeros(n, bool)
    next_high[:-1] = high[1:]
    starts = np.flatnonzero(high & (first_of_series | ~prev_high))
    ends = np.flatnonzero(high & (last_of_series | ~next_high))
    series_end = lay.row_series_end[starts]
    next_start = np.minimum(np.append(starts[1:], n), series_end)

    # Does the run fire, and where: first row >= start + for (never the synthetic row itself).
    key = lay.key
    fire = np.searchsorted(key, key[starts] + for_us, side="left")
    fire = np.where(synthetic[starts] & (fire == starts), fire + 1, fire)
    # A row standing for an interval at least `for` long (hourly data, a 5-minute `for`) has
    # been high for `for` on its own: its run fires at once.
    fire = np.where((interval[starts] >= for_us) & ~synthetic[starts], starts, fire)
    fire = np.where(forced[starts], starts, fire)

    # After a run: the first later row >= last high + keep; it resolves if before the next run.
    resolve_at = np.maximum(np.searchsorted(key, key[ends] + keep_us, side="left"), ends + 1)
    breaks = resolve_at < next_start
    continues = np.zeros(len(starts), bool)
    if len(starts) > 1:
        continues[1:] = (series_end[1:] == series_end[:-1]) & ~breaks[:-1]
    segment = np.cumsum(~continues) - 1
    return _Runs(starts, ends, series_end, fire, fire <= ends, resolve_at, breaks, segment)


@dataclass(frozen=True)
class _Episodes:
    """One per segment whose runs fire: from the first firing row to its resolution."""

    fire: np.ndarray
    end: np.ndarray  # the resolving row, or the series end while it is still open
    since: np.ndarray
    resolved: np.ndarray
    crit_at: np.ndarray  # first critical row at or after `fire` (n: none)
    starts_critical: np.ndarray
    escalates: np.ndarray
    severity: np.ndarray


def _episodes(
    runs: _Runs,
    ts: np.ndarray,
    crit: np.ndarray,
    forced: np.ndarray,
    carried_since: np.ndarray,
) -> _Episodes:
    n = len(ts)
    q_runs = np.flatnonzero(runs.qualifies)
    segments, first_pos = np.unique(runs.segment[q_runs], return_index=True)
    first_run = q_runs[first_pos]  # first qualifying run of each segment with an episode
    last_run = np.searchsorted(runs.segment, segments, side="right") - 1
    fire = runs.fire[first_run]
    resolved = runs.breaks[last_run]
    end = np.where(resolved, runs.resolve_at[last_run], runs.series_end[first_run])
    begin = runs.starts[first_run]
    since = np.where(forced[begin], carried_since[begin], ts[begin])

    crit_pos = np.where(crit, np.arange(n), n)
    crit_at = np.minimum.accumulate(crit_pos[::-1])[::-1][fire]
    starts_critical = crit_at == fire
    escalates = (crit_at > fire) & (crit_at < end)
    severity = np.where(starts_critical | escalates, "critical", "warning")
    return _Episodes(fire, end, since, resolved, crit_at, starts_critical, escalates, severity)


def _events(ep: _Episodes, sid: np.ndarray, ts: np.ndarray, synthetic: np.ndarray) -> pd.DataFrame:
    """firing (not at a synthetic row), escalated and resolved events, one row each."""
    announce = ~synthetic[ep.fire]
    parts = [
        (
            ep.fire[announce],
            "firing",
            np.where(ep.starts_critical, "critical", "warning")[announce],
            ep.since[announce],
        ),
        (
            ep.crit_at[ep.escalates],
            "escalated",
            np.full(ep.escalates.sum(), "critical"),
            ep.since[ep.escalates],
        ),
        (ep.end[ep.resolved], "resolved", ep.severity[ep.resolved], ep.since[ep.resolved]),
    ]
    rows = np.concatenate([p[0] for p in parts]).astype(np.int64)
    return pd.DataFrame(
        {
            "series_id": sid[rows],
            "ts_us": ts[rows],
            "event": np.concatenate([np.full(len(p[0]), p[1], dtype=object) for p in parts]),
            "severity": np.concatenate([np.asarray(p[2], dtype=object) for p in parts]),
            "since_us": np.concatenate([p[3] for p in parts]).astype(np.int64),
            "_row": rows,
        }
    )


def _end_state(
    lay: _Layout, runs: _Runs, ep: _Episodes, sid: np.ndarray, ts: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Each series' state after its last row: (series id, phase, since, last high time,
    severity, last seen, has since, has high)."""
    n_series = len(lay.starts)
    phase = np.full(n_series, "normal", dtype=object)
    since = np.zeros(n_series, np.int64)
    has_since = np.zeros(n_series, bool)
    severity = np.full(n_series, None, dtype=object)
    last_run = np.full(n_series, -1)
    last_run[lay.row_series[runs.starts]] = np.arange(len(runs.starts))  # later runs win
    has_high = last_run >= 0
    last_high = np.zeros(n_series, np.int64)
    last_high[has_high] = ts[runs.ends[last_run[has_high]]]

    pending = has_high & high[lay.ends - 1]
    phase[pending] = "pending"
    since[pending] = ts[runs.starts[last_run[pending]]]
    has_since |= pending
    open_ep = ~ep.resolved
    ep_series = lay.row_series[ep.fire[open_ep]]
    phase[ep_series] = "firing"
    since[ep_series] = ep.since[open_ep]
    severity[ep_series] = ep.severity[open_ep]
    has_since[ep_series] = True
    # Only the rows' own timestamps count as "seen": a synthetic row is never the last one.
    s_last_ts = ts[lay.ends - 1]
    return sid[lay.starts], phase, since, last_high, severity, s_last_ts, has_since, has_high


def run_machine(
    for_us: int,
    keep_us: int,
    sid: np.ndarray,
    ts: np.ndarray,
    high: np.ndarray,
    crit: np.ndarray,
    forced: np.ndarray,
    synthetic: np.ndarray,
    carried_since: np.ndarray,
    interval: np.ndarray,
) -> tuple[pd.DataFrame, np.ndarray, tuple[np.ndarray, ...]]:
    """The alert state machine over every series at once, without a per-row loop.

    Rows are sorted by series, then time; a run fires after `for_us` of high rows and an
    episode resolves after `keep_us` without one. Steps: lay out the series; find the runs of high
    rows, where each fires (`for`) and where it resolves (`keep_firing_for`); join runs into
    episodes; emit their events; flag the rows inside an episode; and read each series'
    state after its last row (carried into the next evaluation).
    """
    n = len(sid)
    lay = _layout(sid, ts)
    runs = _runs(for_us, keep_us, lay, high, forced, synthetic, interval)
    ep = _episodes(runs, ts, crit, forced, carried_since)
    events = _events(ep, sid, ts, synthetic)
    flags_delta = np.zeros(n + 1, np.int64)
    np.add.at(flags_delta, ep.fire, 1)
    np.add.at(flags_delta, ep.end, -1)
    flags = np.cumsum(flags_delta[:n]).astype(np.int8)
    return events, flags, _end_state(lay, runs, ep, sid, ts, high)
