"""The one pass of a batch between decoding and writing: normalise once, give each row one
verdict, encode.

    frame ─ storage.normalise.normalise ─> Normalised (read once: typed columns, facts, what
          the tables cannot hold)
      ─ tasks.quality.validate_batch (GX) or validate_batch_pandas ─> the rules' verdicts
        (expectations.ingest_batch.CHECKS, the one declaration of the rules)
      ─ `verdicts`: the first failing rule, else what the tables cannot hold, else the series'
        own raw retention rule (`mark_past_their_rule`), else kept
      ─ storage.normalise.encode ─> PreparedBatch ─ Store.write_batch[_parts] (checks nothing)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from expectations.ingest_batch import QualityLimits, check_required_columns
from metricmill.types import Reason
from storage.frames import PreparedBatch
from storage.normalise import Normalised, encode, normalise
from storage.store import Store
from tasks.quality import QualityResult, rejected_rows, validate_batch

Rejected = list[tuple[dict[str, Any], str]]
Check = Callable[..., QualityResult]


@dataclass
class Verdict:
    """A batch read once and judged once: the reason per row (None: kept) and the quality
    report of the rules."""

    batch: Normalised
    reasons: np.ndarray
    markdown: str = ""

    def kept(self) -> np.ndarray:
        return pd.isna(self.reasons)


def judge(
    frame: pd.DataFrame,
    limits: QualityLimits,
    *,
    check: Check = validate_batch,
    parts: np.ndarray | None = None,
    n_parts: int = 1,
) -> Verdict:
    """Normalise the batch once and run the rules on it (none on an empty batch); a row the
    rules pass but the tables cannot hold keeps the reason the normaliser gave."""
    if len(frame):
        check_required_columns(frame.columns)
    batch = normalise(frame, parts=parts, n_parts=n_parts)
    if not len(batch):
        return Verdict(batch, np.full(0, None, dtype=object))
    return verdict_of(check(batch, limits))


def verdict_of(checked: QualityResult) -> Verdict:
    """The rules' result as a verdict per row: the first failing rule, else what the tables
    cannot hold (the normaliser's reason), else None."""
    batch = checked.batch
    assert batch is not None
    reasons = checked.reasons.copy()
    free = pd.isna(reasons)
    reasons[free] = batch.unreadable[free]
    return Verdict(batch, reasons, checked.markdown())


def mark_past_their_rule(store: Store, verdict: Verdict) -> int:
    """Kept rows older than their series' raw retention rule, where it keeps less than the
    default the rules check, become `timestamp_too_old`: retention may already have archived
    their hours, and a rollup must not rebuild an archived hour from late rows alone. The
    number of rows it marked."""
    kept = np.flatnonzero(verdict.kept())
    if not len(kept):
        return 0
    batch = verdict.batch
    cutoffs = store.retention.raw_cutoffs(
        batch.metric_names[batch.metric_codes[kept]],
        batch.frame["labels"].to_numpy(dtype=object)[kept],
    )
    if cutoffs is None:
        return 0
    old = kept[batch.ts_us[kept] < cutoffs]
    verdict.reasons[old] = Reason.TIMESTAMP_TOO_OLD
    return len(old)


def encode_one(verdict: Verdict, pre_rejected: Rejected) -> PreparedBatch:
    """One batch to write: its kept rows, the rows set aside while decoding (`pre_rejected`)
    and those the verdict rejected, shown as received."""
    batch = encode(
        verdict.batch, verdict.reasons, rejected_rows(verdict.batch.frame, verdict.reasons)
    )
    batch.rejected[:0] = pre_rejected
    batch.rows_in += len(pre_rejected)
    return batch


def encode_parts(
    verdict: Verdict, pre_rejected: list[Rejected], shown: Rejected | None = None
) -> PreparedBatch:
    """A batch of parts (one per landed file) to write; `shown` are the rejected rows as their
    files had them, in row order (None: as the combined frame has them)."""
    if shown is None:
        shown = rejected_rows(verdict.batch.frame, verdict.reasons)
    batch = encode(verdict.batch, verdict.reasons, shown)
    for number, rows in enumerate(pre_rejected):
        batch.add_rejected(list(rows), number)
    return batch
