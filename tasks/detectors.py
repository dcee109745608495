"""PyOD detectors per metric: features, fitting, point-wise scoring and calibration to [0, 1].

ECOD and COPOD score a batch by recomputing their empirical CDFs over the training rows *plus
the whole batch*, so a row's score would depend on the rows scored with it (look-ahead in a
replay, and a different score for the same point in a different run). `pointwise_scores` gives
every row the score PyOD gives it when scored alone — computed for all rows at once from the
sorted training columns and running moments. IForest and HBOS score rows independently already.
"""

from __future__ import annotations

import fnmatch
import pickle
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyod.models.base import BaseDetector
from pyod.models.copod import COPOD
from pyod.models.ecod import ECOD
from pyod.models.hbos import HBOS
from pyod.models.iforest import IForest

DETECTORS = ("ecod", "iforest", "copod", "hbos")
FEATURES = ("value", "residual", "diff", "spread")
ROLLING_POINTS = 6
_CALIBRATION_POINTS = 501


def detector_for(metric: str, patterns: dict[str, str]) -> str:
    """The configured detector of a metric: the first glob that matches, else ECOD."""
    for pattern, name in patterns.items():
        if fnmatch.fnmatchcase(metric, pattern):
            return name
    return "ecod"


def make_detector(name: str) -> BaseDetector:
    if name == "ecod":
        return ECOD()
    if name == "copod":
        return COPOD()
    if name == "iforest":
        return IForest(n_estimators=100, random_state=0)
    if name == "hbos":
        return HBOS()
    raise ValueError(f"unknown detector {name!r}")


def features(
    series_id: np.ndarray,
    value: np.ndarray,
    expected: np.ndarray,
    scale: np.ndarray,
    level: np.ndarray,
) -> np.ndarray:
    """Rows x FEATURES for points sorted by (series, time); every feature looks only backwards.

    value: level-normalised value; residual: (value - expected) / scale; diff: first
    difference / scale (0 at a series' first row); spread: standard deviation of the residual
    over the last ROLLING_POINTS rows of the series (fewer at its start).
    """
    n = len(value)
    residual = (value - expected) / scale
    first = np.ones(n, dtype=bool)
    first[1:] = series_id[1:] != series_id[:-1]
    diff = np.zeros(n)
    diff[1:] = (value[1:] - value[:-1]) / scale[1:]
    diff[first] = 0.0
    # Rolling sums by position, clipped at each series' first row.
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    lo = np.maximum(np.arange(n) - ROLLING_POINTS + 1, start)
    c1 = np.concatenate(([0.0], np.cumsum(residual)))
    c2 = np.concatenate(([0.0], np.cumsum(residual * residual)))
    idx = np.arange(n)
    count = idx + 1 - lo
    s1 = c1[idx + 1] - c1[lo]
    s2 = c2[idx + 1] - c2[lo]
    mean = s1 / count
    spread = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    out = np.empty((n, 4))
    out[:, 0] = (value - level) / scale
    out[:, 1] = residual
    out[:, 2] = diff
    out[:, 3] = spread
    return np.nan_to_num(out, copy=False, nan=0.0, posinf=1e6, neginf=-1e6)


@dataclass
class FittedModel:
    """A fitted detector with the quantiles of its training scores (the calibration)."""

    detector: str
    model: BaseDetector
    quantiles: np.ndarray
    n_samples: int
    fitted_from: int
    fitted_to: int

    def to_bytes(self) -> bytes:
        return pickle.dumps(
            {"detector": self.detector, "model": self.model, "quantiles": self.quantiles},
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FittedModel:
        """Rebuild from a detector_models row; raises on a blob that does not load."""
        # Blobs are written by fit_model into our own database, never taken from users.
        payload = pickle.loads(row["model"])
        model = payload["model"]
        if not isinstance(model, BaseDetector) or payload["detector"] != row["detector"]:
            raise ValueError(f"stored model for {row['scope']} is not a {row['detector']}")
        return cls(
            detector=row["detector"],
            model=model,
            quantiles=np.asarray(payload["quantiles"], dtype=np.float64),
            n_samples=int(row["n_samples"] or 0),
            fitted_from=int(row["fitted_from"] or 0),
            fitted_to=int(row["fitted_to"] or 0),
        )

    def calibrated(self, x: np.ndarray) -> np.ndarray:
        """Scores in [0, 1]: the share of training rows that scored lower."""
        raw = pointwise_scores(self.model, x)
        probs = np.linspace(0.0, 1.0, len(self.quantiles))
        return np.clip(np.interp(raw, self.quantiles, probs), 0.0, 1.0)


def fit_model(
    name: str, x: np.ndarray, *, fitted_from: int, fitted_to: int, max_rows: int, seed: int = 0
) -> FittedModel:
    """Fit one detector on at most max_rows rows of x (a reproducible sample)."""
    if len(x) > max_rows:
        rows = np.random.default_rng(seed).choice(len(x), size=max_rows, replace=False)
        x = x[np.sort(rows)]
    model = make_detector(name)
    model.fit(x)
    train = pointwise_scores(model, x)
    quantiles = np.quantile(train, np.linspace(0.0, 1.0, _CALIBRATION_POINTS))
    return FittedModel(name, model, quantiles, len(x), fitted_from, fitted_to)


def pointwise_scores(model: BaseDetector, x: np.ndarray) -> np.ndarray:
    """Each row's raw PyOD score as if it were scored alone against the training rows."""
    if len(x) == 0:
        return np.empty(0)
    if isinstance(model, ECOD | COPOD):
        return _ecdf_scores(model, x, ecod=isinstance(model, ECOD))
    return np.asarray(model.decision_function(x), dtype=np.float64)


@dataclass(frozen=True)
class _Training:
    """What pointwise ECOD / COPOD scores need of a model's training rows, per feature: the
    sorted column (a row of `ordered`, contiguous for searchsorted), its mean and the sums of
    powers of the centred column."""

    ordered: np.ndarray
    centre: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    s3: np.ndarray


# Per fitted model, computed once: a detect run scores its rows in parts, a backtest day by day.
_TRAINING: weakref.WeakKeyDictionary[BaseDetector, _Training] = weakref.WeakKeyDictionary()


def _training(model: ECOD | COPOD) -> _Training:
    found = _TRAINING.get(model)
    if found is None:
        train = np.asarray(model.X_train, dtype=np.float64)
        centre = train.mean(axis=0)
        t = train - centre
        found = _Training(
            np.ascontiguousarray(np.sort(train, axis=0).T),
            centre,
            t.sum(axis=0),
            (t**2).sum(axis=0),
            (t**3).sum(axis=0),
        )
        _TRAINING[model] = found
    return found


def _ecdf_scores(model: ECOD | COPOD, x: np.ndarray, *, ecod: bool) -> np.ndarray:
    prepared = _training(model)
    ordered, centre = prepared.ordered, prepared.centre
    s1, s2, s3 = prepared.s1, prepared.s2, prepared.s3
    n_train = ordered.shape[1]
    n = n_train + 1  # the training rows plus the scored row
    total = np.zeros(len(x))
    for j in range(len(ordered)):  # a loop over the handful of features
        col = x[:, j]
        below = np.searchsorted(ordered[j], col, side="right") + 1
        above = n_train - np.searchsorted(ordered[j], col, side="left") + 1
        u_l = -np.log(below / n)
        u_r = -np.log(above / n)
        # Sign of the (biased) skewness of the training column with this row added.
        c = col - centre[j]
        mean = (s1[j] + c) / n
        m2 = (s2[j] + c * c) / n - mean * mean
        m3 = (s3[j] + c**3) / n - 3 * mean * (s2[j] + c * c) / n + 2 * mean**3
        with np.errstate(invalid="ignore", divide="ignore"):
            sign = np.sign(np.where(m2 > 0, m3 / m2**1.5, np.nan))
        u_skew = u_l * -1 * np.sign(sign - 1) + u_r * np.sign(sign + 1)
        if ecod:
            o = np.maximum(u_skew, np.maximum(u_l, u_r))
        else:
            o = np.maximum(u_skew, (u_l + u_r) / 2)
        total += o
    return total


def fit_per_metric(
    feats: np.ndarray,
    metric_of_row: np.ndarray,
    patterns: dict[str, str],
    *,
    fitted_from: int,
    fitted_to: int,
    max_rows: int,
) -> dict[str, FittedModel]:
    """One model per metric present in metric_of_row, each on that metric's rows."""
    out: dict[str, FittedModel] = {}
    codes, metrics = pd.factorize(metric_of_row)
    for code, metric in enumerate(metrics):  # a loop per metric, not per series
        rows = feats[codes == code]
        if len(rows) < 50:
            continue
        out[str(metric)] = fit_model(
            detector_for(str(metric), patterns),
            rows,
            fitted_from=fitted_from,
            fitted_to=fitted_to,
            max_rows=max_rows,
        )
    return out
