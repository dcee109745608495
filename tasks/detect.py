"""Scoring of new points against baselines and per-metric PyOD models, vectorised across series.

The score rule (documented in the README, "Anomaly detection"; tasks/calibration.py):

- r = (value - expected) / scale, with expected and scale from the series' baseline slot, less
  the series' agile offset (the median of three 40-minute medians of its 5-minute block mean
  residuals in the two hours before the point), so a sustained level shift alerts once and is
  then the new normal, while a short incident never becomes the level;
- L = -log10 p, p the tail probability of r on its side (up or down) under the exponential tail
  fitted to the series' own training residuals, at least that of a Laplace tail of 1.5 scales;
  linear in r, so it never saturates;
- where L >= MODEL_GATE and the metric has a PyOD model, the model's own tail probability of
  the point's shape (jump, spread of recent points) adds cal.MODEL_WEIGHT x its -log10: the model
  can raise a point that is already unusual, never make one out of a normal point;
- score = 1 - exp(-L / L_SCALE): 0.7 at p = 1e-4, 0.9 at p ~ 2e-8, below 1 however far out
  (past L = 30 the gap to 1 shrinks as 1 / L: float64 never rounds a score to exactly 1).

Each row also carries its side (`sign`), whether it is an outage (a busy non-negative series at
or below a tenth of its 1% quantile) and its kind (point, outage, level shift), for the alert
rules; what they need per series (the effective thresholds set at the baseline fit from the
alert budget, the budget, the baseline's level) comes once per series, beside the rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from metricmill.settings import Settings
from storage.schema import CALIBRATION_COLUMNS
from storage.store import Store
from tasks import calibration as cal
from tasks.alert_engine import SCORE_COLUMNS, SERIES_COLUMNS
from tasks.baseline import DAY_US, BaselineTable, fit_models
from tasks.detectors import ROLLING_POINTS, FittedModel, detector_for

MODEL_GATE = 3.0
CONTEXT_US = cal.AGILE_US + cal.BLOCK_US  # points before the watermark the offset looks back at
CHUNK_ROWS = 250_000
_THRESHOLD_FLOOR = 0.7  # for the row's kind only: the rule's own threshold decides alerts
_NONE = np.empty(0, dtype=np.int64)
_GIVEN = ("series_id", "ts_us", "value")  # output columns taken from the input as they are


def empty_scores() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in SCORE_COLUMNS})
    return frame.astype({"series_id": "int64", "ts_us": "int64"})


def series_frame(table: BaselineTable) -> pd.DataFrame:
    """What the alert rules need per series of the table (SERIES_COLUMNS), by series_id."""
    columns: dict[str, np.ndarray] = {"series_id": table.series_ids.astype(np.int64)}
    for name in SERIES_COLUMNS[1:]:
        columns[name] = table.level if name == "baseline_level" else table.per_series(name)
    return pd.DataFrame(columns)


@dataclass
class Scored:
    """Scores of the fresh points, what the alert rules need per series (`series`:
    SERIES_COLUMNS), and the fresh series that have no baseline yet."""

    scores: pd.DataFrame
    no_baseline: np.ndarray
    series: pd.DataFrame
    row_parts: list[np.ndarray] = field(default_factory=list)

    @property
    def rows(self) -> np.ndarray:
        """Each score row's row of the points scored (joined on demand: on millions of rows
        that costs as much as a tenth of the scoring, and only a backtest asks)."""
        if not self.row_parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(self.row_parts)


def _shape_features(
    rows: np.ndarray,
    code: np.ndarray,
    value: np.ndarray,
    residual: np.ndarray,
    scale: np.ndarray,
    level: np.ndarray,
) -> np.ndarray:
    """The detector features (value, residual, diff, spread) of a few rows, looking back along
    their series only (tasks.detectors.features computes the same for every row)."""
    n = len(rows)
    back = rows[:, None] - np.arange(ROLLING_POINTS)[None, :]
    back_c = np.maximum(back, 0)
    same = (back >= 0) & (code[back_c] == code[rows][:, None])
    window = np.where(same, residual[back_c], np.nan)
    count = same.sum(axis=1)
    mean = np.nansum(window, axis=1) / count
    spread = np.sqrt(np.maximum(np.nansum(window * window, axis=1) / count - mean * mean, 0.0))
    prev = np.maximum(rows - 1, 0)
    has_prev = (rows > 0) & (code[prev] == code[rows])
    out = np.empty((n, 4))
    out[:, 0] = (value[rows] - level[rows]) / scale[rows]
    out[:, 1] = residual[rows]
    out[:, 2] = np.where(has_prev, (value[rows] - value[prev]) / scale[rows], 0.0)
    out[:, 3] = spread
    return np.nan_to_num(out, copy=False, nan=0.0, posinf=1e6, neginf=-1e6)


def _reach(table: BaselineTable, side: str) -> np.ndarray:
    """Per series of the table: how many scales from expected its effective threshold on one
    side lies (at least the default rule's threshold)."""

    def column(name: str) -> np.ndarray:
        return table.calibration[CALIBRATION_COLUMNS.index(name)]

    threshold = np.fmax(column(f"threshold_{side}"), _THRESHOLD_FLOOR)
    return cal.tail_reach(
        cal.level_of(threshold), column(f"tail_{side}_u"), column(f"tail_{side}_beta")
    )


def score_points(
    points: pd.DataFrame,
    table: BaselineTable,
    models: dict[str, FittedModel],
    metric_of: pd.Series,
) -> Scored:
    """Score points (series_id, ts_us, value[, fresh]) sorted by series and time.

    Rows with fresh=False are context only (the agile offset and the shape features look back
    at them); output rows are the fresh rows of series with a baseline, sorted by
    (series_id, ts_us).

    Worked through in parts of about CHUNK_ROWS rows cut at series boundaries: a series only
    ever looks back at its own rows, and a part's two dozen intermediate arrays then stay in
    the processor's cache (a third less time on millions of rows than one pass over all).
    Each part writes its output rows straight into the output columns, allocated once for
    as many rows as there are points (pages past the last output row are never touched).
    """
    sid = points["series_id"].to_numpy(np.int64)
    if points.empty:
        return Scored(empty_scores(), np.empty(0, dtype=np.int64), series_frame(table))
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    cuts = [0]
    for start in starts[np.searchsorted(starts, np.arange(CHUNK_ROWS, len(sid), CHUNK_ROWS))]:
        if start > cuts[-1]:  # a series longer than a part stays whole
            cuts.append(int(start))
    cuts.append(len(sid))
    out = {c: np.empty(len(sid), dtype=np.float64) for c in SCORE_COLUMNS if c not in _GIVEN}
    size = 0
    no_baseline, rows = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):  # a loop per part of rows
        part_rows, part_no_baseline = _score_part(
            points.iloc[lo:hi], table, models, metric_of, out, size
        )
        size += len(part_rows)
        rows.append(part_rows + lo)
        no_baseline.append(part_no_baseline)
    given = {
        name: points[name].to_numpy(np.float64 if name == "value" else np.int64) for name in _GIVEN
    }
    if size < len(sid):  # where every row is scored, the input's own columns serve as they are
        scored = np.concatenate(rows)
        rows = [scored]  # joined once: `Scored.rows` then has nothing left to join
        given = {name: column[scored] for name, column in given.items()}
    columns = {c: given[c] if c in given else out[c][:size] for c in SCORE_COLUMNS}
    return Scored(
        pd.DataFrame(columns, copy=False),  # no consolidation copy of a few million rows
        np.unique(np.concatenate(no_baseline)),
        series_frame(table),
        rows,
    )


def _score_part(
    points: pd.DataFrame,
    table: BaselineTable,
    models: dict[str, FittedModel],
    metric_of: pd.Series,
    out: dict[str, np.ndarray],
    at: int,
) -> tuple[np.ndarray, np.ndarray]:
    """score_points on one part of the rows (whole series): residuals against the baselines,
    their statistical level, the models' lift of unusual points, then the output rows,
    written into `out` from row `at`. Returns the part's output rows (positions in the part)
    and its fresh series without a baseline."""
    fresh = (
        points["fresh"].to_numpy(bool) if "fresh" in points else np.ones(len(points), dtype=bool)
    )
    r = _residuals(points, table)
    no_baseline = np.unique(r.sid[fresh & ~r.has])
    stat_level = _stat_level(r)
    # The points a model may lift: unusual ones, of series whose metric may have a model.
    gated = np.flatnonzero(fresh & r.has & (stat_level >= MODEL_GATE)) if models else _NONE
    model, total = _model_lift(r, stat_level, gated, models, metric_of)
    out_rows = np.flatnonzero(fresh & r.has)
    _score_rows(r, table, stat_level, model, total, gated, out_rows, out, at)
    return out_rows, no_baseline


@dataclass
class _Residuals:
    """One part's points against their baselines: per point its series code within the part,
    the baseline's expected value, scale and level (`has`: the series has one), the series'
    table, whether the point is an outage, the agile offset and the residual (in scales, less
    the offset); `where` is the table positions of the points."""

    sid: np.ndarray
    ts: np.ndarray
    value: np.ndarray
    code: np.ndarray
    where: tuple[np.ndarray, np.ndarray]
    has: np.ndarray
    expected: np.ndarray
    scale: np.ndarray
    level: np.ndarray
    table: BaselineTable
    outage: np.ndarray
    offset: np.ndarray
    residual: np.ndarray


def _residuals(points: pd.DataFrame, table: BaselineTable) -> _Residuals:
    """Each point's residual from its baseline slot, less its series' agile offset (outage
    points, at or below the series' outage floor, do not move the offset)."""
    sid = points["series_id"].to_numpy(np.int64)
    ts = points["ts_us"].to_numpy(np.int64)
    value = points["value"].to_numpy(np.float64)
    where = table.positions(sid)
    has, expected, scale, level = table.lookup(sid, ts, positions=where)
    first = np.r_[True, sid[1:] != sid[:-1]]
    code = np.cumsum(first) - 1
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        raw = (value - expected) / scale
        outage = has & (value <= table.per_point("outage_floor", where[0]))
        offset = cal.agile_offset(code, ts, raw, int(code[-1]) + 1, use=has & ~outage)
        residual = raw - offset
    return _Residuals(
        sid, ts, value, code, where, has, expected, scale, level, table, outage, offset, residual
    )


def _stat_level(r: _Residuals) -> np.ndarray:
    """L = -log10 p of each residual under its side's tail, raised to that of the run of
    residuals it ends when the run is on the same side; 0 without a baseline."""
    residual, pos = r.residual, r.where[0]
    upward = residual >= 0
    stat_level = cal.tail_level(np.abs(residual), *r.table.sided("tail", pos, upward))
    run = cal.rolling_mean(r.code, np.where(r.has & ~r.outage, residual, 0.0), cal.RUN_POINTS)
    run_up = run >= 0
    run_level = cal.tail_level(np.abs(run), *r.table.sided("run", pos, run_up))
    # The run counts on the point's own side only: a dip right after a long rise is a dip.
    stat_level = np.fmax(stat_level, np.where(run_up == upward, run_level, 0.0))
    stat_level[~r.has] = 0.0
    return stat_level


def _model_lift(
    r: _Residuals,
    stat_level: np.ndarray,
    gated: np.ndarray,
    models: dict[str, FittedModel],
    metric_of: pd.Series,
) -> tuple[np.ndarray, np.ndarray]:
    """(model score per point, NaN where no model scored it; the level with the models' lift
    added at the gated points). Without gated points the level is `stat_level` itself."""
    model = np.full(len(r.sid), np.nan)
    if not len(gated):
        return model, stat_level
    names = pd.Series(r.sid[gated]).map(metric_of).to_numpy(dtype=object)
    codes, uniq = pd.factorize(names)
    for m_code, metric in enumerate(uniq):  # a loop per metric
        fitted = models.get(str(metric))
        if fitted is None:
            continue
        rows = gated[codes == m_code]
        feats = _shape_features(rows, r.code, r.value, r.residual, r.scale, r.level)
        model[rows] = fitted.calibrated(feats)
    lift = -np.log10(np.maximum(1.0 - np.nan_to_num(model[gated]), cal.MODEL_P_FLOOR))
    total = stat_level.copy()
    total[gated] += cal.MODEL_WEIGHT * lift
    return model, total


def _score_rows(
    r: _Residuals,
    table: BaselineTable,
    stat_level: np.ndarray,
    model: np.ndarray,
    total: np.ndarray,
    gated: np.ndarray,
    out_rows: np.ndarray,
    out: dict[str, np.ndarray],
    at: int,
) -> None:
    """The output rows (SCORE_COLUMNS: scores, kind, sign and the band), written into `out`
    from row `at`."""
    # The output rows: a plain view when every row is one (a backtest day, a benchmark), a
    # gather otherwise; a few million rows make each avoidable gather count.
    sel: slice | np.ndarray = slice(None) if len(out_rows) == len(r.sid) else out_rows
    n = len(out_rows)
    put = {name: column[at : at + n] for name, column in out.items()}
    o_pos = r.where[0][sel]
    o_res = r.residual[sel]
    o_scale = r.scale[sel]
    o_expected = put["expected"]
    np.multiply(r.offset[sel], o_scale, out=o_expected)
    o_expected += r.expected[sel]
    thr_both = table.per_point("threshold_both", o_pos)
    stat_score = put["stat_score"]
    cal.score_of(stat_level[sel], out=stat_score)
    score = put["score"]
    score[:] = stat_score
    if len(gated):  # only rows the model lifted differ from the statistics alone
        is_gated = np.zeros(len(r.sid), dtype=bool)
        is_gated[gated] = True
        lifted = np.flatnonzero(is_gated[sel])
        score[lifted] = cal.score_of(total[out_rows[lifted]])
    o_outage = r.outage[sel]
    sign = put["sign"]
    np.sign(o_res, out=sign)
    high = score >= np.fmax(thr_both, _THRESHOLD_FLOOR)
    shifted = cal.sustained(r.code[sel], np.where(high, sign, 0.0))
    kind = put["kind"]
    kind.fill(cal.KIND_POINT)
    kind[shifted] = cal.KIND_SHIFT
    kind[o_outage] = cal.KIND_OUTAGE
    # The band: where the series' effective thresholds (at least the default rule's) lie;
    # computed once per series of the table, then spread over the rows.
    if n:
        np.multiply(_reach(table, "down").take(o_pos), o_scale, out=put["lower"])
        np.subtract(o_expected, put["lower"], out=put["lower"])
        np.multiply(_reach(table, "up").take(o_pos), o_scale, out=put["upper"])
        put["upper"] += o_expected
    put["model_score"][:] = model[sel]
    put["outage"][:] = o_outage


# -- loading what scoring needs ------------------------------------------------------------------
def load_models(
    store: Store, settings: Settings, metrics: list[str], *, refit_window_days: int | None = None
) -> tuple[dict[str, FittedModel], list[str]]:
    """The configured detector of each metric; a stored model that fails to load is refitted.

    Returns the models and one message per refit (also logged by the caller).
    """
    wanted = {m: detector_for(m, settings.detectors) for m in metrics}
    rows = store.detection.read_models([f"metric:{m}" for m in metrics])
    models: dict[str, FittedModel] = {}
    broken: list[str] = []
    notes: list[str] = []
    for record in rows.to_dict("records"):  # one row per metric
        row = {str(k): v for k, v in record.items()}
        metric = str(row["scope"]).removeprefix("metric:")
        if wanted.get(metric) != row["detector"]:
            continue
        try:
            models[metric] = FittedModel.from_row(row)
        except Exception as exc:  # a corrupt or incompatible pickle: refit below
            broken.append(metric)
            notes.append(f"model for {metric} failed to load ({type(exc).__name__}); refitted")
    if broken:
        models.update(_refit(store, settings, broken, refit_window_days))
    return models, notes


def _refit(
    store: Store, settings: Settings, metrics: list[str], window_days: int | None
) -> dict[str, FittedModel]:
    from tasks.baseline_run import _model_rows  # the same rows the nightly flow writes

    catalog = store.detection.series_metrics()
    ids = catalog.loc[catalog["metric"].isin(metrics), "series_id"].tolist()
    end_us = time.time_ns() // 1000
    start_us = end_us - (window_days or settings.baseline_window_days) * DAY_US
    buckets = store.detection.history(
        start_us=start_us, end_us=end_us, level=settings.baseline_level, series_ids=ids
    )
    baselines = store.detection.read_baselines(ids)
    fitted = fit_models(
        buckets,
        baselines,
        catalog.set_index("series_id")["metric"],
        settings.detectors,
        max_rows=settings.detector_max_fit_rows,
    )
    store.detection.write_models(_model_rows(fitted))
    return fitted


# -- Prefect task --------------------------------------------------------------------------
@dataclass
class ShardResult:
    """One shard's scores, the watermarks to advance once alerts are stored, and notes."""

    scores: pd.DataFrame
    per_series: pd.DataFrame  # what the alert rules need per series (SERIES_COLUMNS)
    marks: pd.DataFrame
    late_marks: list[int] = field(default_factory=list)  # detect_late ids read: cleared after
    no_baseline: list[int] = field(default_factory=list)
    series: int = 0
    points: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@task(name="score-shard")
def score_shard(
    settings: Settings, shard: int = 0, shards: int = 1, series: str | None = None
) -> ShardResult:
    """Score every new point of the series in this shard (series_id % shards == shard), only
    of those the label selector `series` matches when it is given."""
    logger = get_run_logger()
    started = time.perf_counter()
    floor_us = time.time_ns() // 1000 - settings.detect_lookback_minutes * 60_000_000
    with Store.open(settings=settings) as store:
        ids = [i for i in store.detection.series_to_score(floor_us=floor_us) if i % shards == shard]
        if series:
            wanted = set(store.series(None, series)["series_id"].astype(int))
            ids = [i for i in ids if i in wanted]
        late = store.detection.read_late(ids)
        points = store.detection.recent_points(
            series_ids=ids, floor_us=floor_us, context_us=CONTEXT_US, late=late
        )
        catalog = store.detection.series_metrics(ids)
        metric_of = catalog.set_index("series_id")["metric"]
        table = BaselineTable.from_reads(*store.detection.read_scoring_baselines(ids))
        models, notes = load_models(store, settings, sorted(set(catalog["metric"])))
    for note in notes:
        logger.warning(note)
    scored = score_points(points, table, models, metric_of)
    fresh = points[points["fresh"]]
    marks = fresh.groupby("series_id", sort=True)["ts_us"].max().reset_index()
    return ShardResult(
        scores=scored.scores,
        per_series=scored.series,
        marks=marks,
        late_marks=late["id"].tolist(),
        no_baseline=[int(i) for i in scored.no_baseline],
        series=len(ids),
        points=int(len(fresh)),
        notes=notes,
        seconds=time.perf_counter() - started,
    )
