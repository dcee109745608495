"""Grouped quantiles over flat arrays, the shared routine of baselines and calibration: rows
grouped by an integer key, each group's values sorted as a short row of a padded matrix."""

from __future__ import annotations

import numpy as np


def group_order(keys: np.ndarray) -> np.ndarray | None:
    """A stable row order that makes each key's rows contiguous; None when they already are."""
    if len(keys) < 2 or bool(np.all(keys[1:] >= keys[:-1])):
        return None
    return np.argsort(keys, kind="stable")


def sort_segments(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`values` with each run [starts[i], starts[i] + counts[i]) sorted ascending (NaN last).

    One argsort over all rows was the baseline's main cost; sorting many short rows of a
    padded matrix is several times cheaper. Runs are padded (with NaN, which sorts last and is
    never read back) to the longest run of their power-of-two size class, so padding at most
    doubles the cells; one matrix sort per class."""
    if not len(values):
        return np.empty(0)
    if bool(np.all(counts == counts[0])):  # equal runs: the rows are the matrix already
        return np.sort(values.reshape(len(counts), int(counts[0])), axis=1).ravel()
    out = np.empty(len(values))
    size_class = np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)
    classes = np.unique(size_class)
    for c in classes:  # a loop over size classes (at most ~30), not groups
        groups = np.flatnonzero(size_class == c)
        lengths = counts[groups]
        width = int(lengths.max())
        before = np.cumsum(lengths) - lengths
        step = np.arange(int(lengths.sum()))
        cell = step + np.repeat(np.arange(len(groups)) * width - before, lengths)
        src = step if len(classes) == 1 else step + np.repeat(starts[groups] - before, lengths)
        grid = np.full(len(groups) * width, np.nan)
        grid[cell] = values[src]
        grid = np.sort(grid.reshape(len(groups), width), axis=1).ravel()
        out[src] = grid[cell]
    return out


def group_quantiles(
    keys: np.ndarray, values: np.ndarray, qs: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Unique keys, their counts and, per q, the linear-interpolated quantile of each group."""
    order = group_order(keys)
    k = keys if order is None else keys[order]
    v = values if order is None else values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.empty(0, np.int64)
    uniq = k[starts]
    counts = np.diff(np.r_[starts, len(k)])
    v = sort_segments(v.astype(np.float64, copy=False), starts, counts)
    start = starts
    out = []
    for q in qs:
        pos = start + q * (counts - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, start + counts - 1)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return uniq, counts, out
