"""Landed files: claimed, hashed, decoded, judged together once, written in landing order.

A task takes a group of claimed files (`group_files`); each file is hashed (its ledger batch
id) and decoded (`storage.readers`); files of the standard columns are combined into one batch
and go through `tasks.ingest_check` once (normalise, rules, encode); the unit is written in one
transaction with a ledger batch per file when the group's turn comes; then each file moves to
done/ or quarantine/.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import itertools
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from expectations.ingest_batch import BatchUnusable, check_required_columns
from metricmill.settings import Settings
from metricmill.types import Reason
from storage.frames import PreparedBatch, typed_timestamps, with_parsed_timestamps
from storage.landing import (
    Claim,
    attempts_in,
    claim_files,
    clear_attempts,
    cleared,
    count_attempt,
    move_done,
    move_quarantined,
    real_directory,
)
from storage.locks import LockLost, ensure_flow_lock
from storage.readers import ReadLimits, UnreadableFile, read_landed_file
from storage.readers.isolated import decode_alone
from storage.store import Store
from tasks.ingest import CheckFailed, SourceOutcome, quality_limits
from tasks.ingest_check import (
    Rejected,
    Verdict,
    encode_parts,
    judge,
    mark_past_their_rule,
)
from tasks.quality import rejected_rows
from tasks.write_order import (
    TRANSIENT_ERRORS,
    EarlierGroupFailed,
    check_turnstile,
    turnstile,
    with_database_retries,
)

# Failures a unit of files can do nothing about: the run stops and the next one retries.
_NOT_THE_FILES: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, LockLost)

# A parallel run's claim holds at most this many files: it comes back for more, so the runs
# share the landing out evenly however many files each round finds.
PARALLEL_CLAIM_FILES = 128


@task
def claim_landing(settings: Settings) -> Claim:
    """Claim settled files in the landing directory (and adopt those of dead runs): all of
    them, or with parallel runs (`ingest_max_parallel_runs` on PostgreSQL) this run's share."""
    real_directory(settings.quarantine)
    parallel = settings.ingest_parallel_runs
    return claim_files(
        settings.landing,
        settle_seconds=settings.settle_seconds,
        limit=PARALLEL_CLAIM_FILES if parallel > 1 else None,
        parallel=parallel,
    )


# Files a task takes together: their bytes summed, and their number, at most (a file larger
# than the budget goes alone). Each group costs a GX validation and a pass over every series
# it holds, whatever its size; but a group writes while the next one decodes, so the first
# group's decoding and the last one's write are the run's unshared time: on 1M samples (130 MB
# of NDJSON) the work ended after a median 4.75 s in 5 groups (see group_files) against
# 5.6-6.0 s in 2 (DESIGN.md, "Flows").
TASK_BYTES = 36_000_000
TASK_FILES = 64
# A file up to this size is read once, for its hash and its decoding; a larger one is hashed
# streaming and its reader reads it again from disk.
KEEP_BYTES = 64 * 1024 * 1024
# A file that this many runs died while decoding is decoded alone, in a process of its own,
# before a run opens it again (see storage/readers/isolated.py).
MAX_ATTEMPTS = 3
_STANDARD_COLUMNS = frozenset(("metric", "labels", "ts", "value"))


def group_files(paths: list[Path]) -> list[list[Path]]:
    """The claimed files, in order, as groups within TASK_BYTES / TASK_FILES; one task each.

    A group writes while the next one is read and checked, so the first group's reading and
    the last group's write are the only steps nothing overlaps. When the files need more than
    one group, the fewest groups the budget allows are evened out and one more is added by
    halving the first and the last: the run starts writing sooner and its last write is
    short."""
    sizes = []
    for path in paths:
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            sizes.append(0)
    total = sum(sizes)
    count = max(-(-total // TASK_BYTES), -(-len(paths) // TASK_FILES), 1)
    share = total / count
    shares = [share / 2] + [share] * (count - 1) + [share / 2] if count > 1 else [share]
    ends = list(itertools.accumulate(shares))  # where each group's share of the bytes ends
    groups: list[list[Path]] = []
    current = -1
    before = 0
    size = 0
    for path, length in zip(paths, sizes, strict=True):
        # the group whose share holds the file's middle byte
        index = min(bisect.bisect_left(ends, before + length / 2), len(ends) - 1)
        if (
            not groups
            or index > current
            or len(groups[-1]) >= TASK_FILES
            or size + length > TASK_BYTES
        ):
            groups.append([])
            current = index  # never lower: the files come in byte order
            size = 0
        groups[-1].append(path)
        before += length
        size += length
    return groups


@dataclass
class _Landed:
    """One claimed file on its way: its hash, what was decoded, where it goes."""

    path: Path
    digest: str
    outcome: SourceOutcome
    decoded: Any = None  # storage.readers.DecodedFile
    quarantine: tuple[str, str] | None = None  # (reason, detail)
    seconds: float = 0.0
    died: int = 0  # runs that died while decoding it (storage.landing.attempts)


def combine_files(frames: list[pd.DataFrame]) -> tuple[pd.DataFrame, np.ndarray, bool]:
    """One frame of several files' rows for one quality check, the part (file number) of each
    row, and whether the times were read per file.

    Files whose times came in different forms (ISO text parsed to datetimes in one, epoch
    numbers in another) would meet in an object column of boxed values, which pandas builds
    and the check then reads back value by value: most of a run's time. Their times are then
    read per file, by the rule the check applies (`storage.frames.typed_timestamps`), into one
    datetime column, and the rows the check rejects are shown as their file had them
    (`rejected_as_received`)."""
    sizes = np.array([len(frame) for frame in frames], dtype=np.int64)
    parts = np.repeat(np.arange(len(frames), dtype=np.int64), sizes)
    filled = [frame for frame in frames if len(frame)]
    if not filled:
        return frames[0].iloc[0:0], parts, False
    retime = len({str(frame["ts"].dtype) for frame in filled}) > 1
    if retime:
        filled = [frame.assign(ts=typed_timestamps(frame["ts"])) for frame in filled]
    return pd.concat(filled, ignore_index=True), parts, retime


def rejected_as_received(
    frames: list[pd.DataFrame], parts: np.ndarray, reasons: np.ndarray
) -> Rejected:
    """The rejected rows (`reasons` not None, in row order) rendered from the files' own
    frames."""
    sizes = np.array([len(frame) for frame in frames], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    positions = np.flatnonzero(pd.notna(reasons))
    out: Rejected = []
    for part in sorted(set(parts[positions].tolist())):
        mine = positions[parts[positions] == part]
        codes = np.full(int(sizes[part]), None, dtype=object)
        codes[mine - starts[part]] = reasons[mine]
        out += rejected_rows(frames[part], codes)
    return out


@dataclass
class Together:
    """Files read as one batch and judged once."""

    frames: list[pd.DataFrame]  # each file's rows (ISO times parsed)
    decoded_rejected: list[Rejected]  # per file: the lines its reader set aside
    parts: np.ndarray  # the file of each row of the combined batch
    retimed: bool  # times were read per file (shown from the files' frames)
    verdict: Verdict
    markdown: str
    # The batch to write, encoded while the check had its turn, so the write's turn (the
    # pipeline's longer step) does not spend its time on it; encoded again at write time
    # when a retention rule read then changes the verdict.
    encoded: PreparedBatch | None = None

    def shown(self) -> Rejected:
        """The rows the verdict rejected, in row order, as their files had them."""
        reasons = self.verdict.reasons
        if self.retimed:
            return rejected_as_received(self.frames, self.parts, reasons)
        return rejected_rows(self.verdict.batch.frame, reasons)

    def rejected_by_file(self) -> list[Rejected]:
        """Per file: the lines its reader set aside, then the rows the verdict rejected."""
        out = [list(rows) for rows in self.decoded_rejected]
        positions = np.flatnonzero(pd.notna(self.verdict.reasons))
        for row, part in zip(self.shown(), self.parts[positions].tolist(), strict=True):
            out[part].append(row)
        return out


def check_together(settings: Settings, files: list[_Landed]) -> Together:
    """One batch of the files' rows, normalised and judged once (GX: one validation)."""
    frames = [with_parsed_timestamps(f.decoded.frame) for f in files]
    combined, parts, retimed = combine_files(frames)
    verdict = judge(combined, quality_limits(settings), parts=parts, n_parts=len(files))
    markdown = verdict.markdown
    if len(files) > 1 and markdown:
        names = ", ".join(f"`{f.path.name}`" for f in files)
        markdown = f"Checked together ({len(files)} files): {names}\n\n{markdown}"
    decoded = [list(f.decoded.rejected) for f in files]
    together = Together(frames, decoded, parts, retimed, verdict, markdown)
    together.encoded = encode_parts(verdict, decoded, together.shown())
    return together


def _checked(settings: Settings, files: list[_Landed]) -> Together | CheckFailed:
    """The unit's check (`check_together`), or why it could not be checked."""
    try:
        return check_together(settings, files)
    except Exception as exc:
        failed = CheckFailed(_first_line(exc))
        failed.__cause__ = exc
        return failed


def _write_together(
    settings: Settings,
    store: Store,
    files: list[_Landed],
    checked: Together | CheckFailed | None = None,
) -> None:
    """Check (unless `checked` already holds the unit's check) and write files as one unit:
    one GX validation, one write transaction with a ledger batch per file. Fills each file's
    outcome and its destination."""
    together = _checked(settings, files) if checked is None else checked
    if isinstance(together, CheckFailed):
        raise together
    if mark_past_their_rule(store, together.verdict) or together.encoded is None:
        together.encoded = encode_parts(
            together.verdict, together.decoded_rejected, together.shown()
        )
    batch = together.encoded
    reports = store.write_batch_parts(
        batch,
        batch_ids=[f.digest for f in files],
        sources=[f.outcome.source for f in files],
        max_new_series=settings.max_new_series_per_batch,
    )
    files[0].outcome.quality_markdown = together.markdown
    for landed, report in zip(files, reports, strict=True):
        landed.outcome.take(report)
        if report.guarded_new_series:
            landed.quarantine = (
                Reason.CARDINALITY_LIMIT,
                f"more than {settings.max_new_series_per_batch} new series",
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _hash_file(path: Path) -> tuple[str, bytes | None]:
    """The file's SHA-256, streamed, and its bytes when it is small enough to keep for decoding.
    Opened without following a link (a link swapped in after the claim is refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        if os.fstat(handle.fileno()).st_size <= KEEP_BYTES:
            data = handle.read()
            return hashlib.sha256(data).hexdigest(), data
        return hashlib.file_digest(handle, "sha256").hexdigest(), None


def _take_up(settings: Settings, paths: list[Path]) -> list[_Landed]:
    """The group's files with their hashes; files that must not be opened (links) or that
    runs keep failing on are set aside for quarantine here."""
    files: list[_Landed] = []
    died = {directory: attempts_in(directory) for directory in {p.parent for p in paths}}
    for path in paths:
        landed = _Landed(path, "", SourceOutcome(f"file:{path.name}", "landing"))
        landed.died = died[path.parent].get(path.name, 0)
        try:
            if path.is_symlink():
                landed.quarantine = ("symlink", "a symbolic link: not followed, not read")
            elif landed.died >= MAX_ATTEMPTS:
                landed.quarantine = _poison(settings, path, landed.died)
            if landed.quarantine is None:
                landed.digest, landed.decoded = _hash_file(path)
        except FileNotFoundError:
            continue  # moved by an earlier attempt of this task, after its write committed
        except OSError as exc:
            landed.quarantine = ("unreadable_file", _first_line(exc))
        files.append(landed)
    return files


def _poison(settings: Settings, path: Path, died: int) -> tuple[str, str] | None:
    """A file that runs keep dying while decoding: the reason to quarantine it, or None when a
    process decoding it alone survives (the runs were killed by something else while it was in
    hand; it is decoded as usual, its count started again). A file cleared so once that runs
    die on again is quarantined unopened."""
    what = f"{died} runs died while decoding this file"
    if cleared(path):
        return ("repeated_failure", f"{what} after a separate process had decoded it")
    ended = decode_alone(
        path,
        precision=settings.line_protocol_precision,
        limits=ReadLimits.from_settings(settings),
    )
    if ended is not None:
        return ("repeated_failure", f"{what}, and {ended}")
    clear_attempts(path)
    return None


def _committed(settings: Settings, digests: list[str]) -> dict[str, int]:
    with Store.open(settings=settings) as store:
        return store.committed_batches(digests)


def _decode(settings: Settings, landed: _Landed, labels_memo: dict[Any, Any]) -> None:
    """Decode one file; whatever goes wrong with it quarantines this file alone."""
    data, landed.decoded = landed.decoded, None
    begun = time.perf_counter()
    try:
        decoded = read_landed_file(
            landed.path,
            precision=settings.line_protocol_precision,
            data=data,
            labels_memo=labels_memo,
            limits=ReadLimits.from_settings(settings),
        )
        if len(decoded.frame):
            check_required_columns(decoded.frame.columns)
    except UnreadableFile as exc:
        landed.quarantine = (exc.reason, str(exc))
        return
    except BatchUnusable as exc:
        landed.quarantine = ("unusable_batch", str(exc))
        return
    except Exception as exc:  # a poison file must not stop the files behind it
        landed.quarantine = ("undecodable", _first_line(exc))
        return
    finally:
        landed.seconds += time.perf_counter() - begun
    landed.decoded = decoded
    landed.outcome.skipped_fields = decoded.skipped_fields
    if not len(decoded.frame) and not decoded.rejected:
        skipped = f" ({decoded.skipped_fields} non-numeric fields skipped)"
        landed.quarantine = (
            "no_samples",
            "the file holds no samples" + (skipped if decoded.skipped_fields else ""),
        )


def _write_in_order(
    settings: Settings,
    units: list[list[_Landed]],
    checks: list[Together | CheckFailed],
    *,
    order_key: str | None,
    turn: int,
) -> None:
    """Write the units (with their checks) when this group's turn comes, riding out database
    restarts. A unit of several files that fails for a reason of its own is written file by
    file, and a file that fails alone is quarantined (`write_failed`): the files behind it
    still land."""
    gate = turnstile(order_key)
    written = False
    try:
        if not gate.wait(turn):
            raise EarlierGroupFailed(
                "an earlier group of this run was not written; these files wait in "
                "processing/ for the next run, to keep the landing order"
            )
        logger = get_run_logger()

        def retrying(exc: BaseException, delay: float) -> None:
            logger.warning("database unavailable (%s); retrying in %.0fs", _first_line(exc), delay)

        for unit, checked in zip(units, checks, strict=True):
            _write_unit(settings, unit, retrying, checked)
        written = True
    finally:
        gate.finish(turn, written)


def _write_unit(
    settings: Settings,
    unit: list[_Landed],
    retrying: Callable[[BaseException, float], None],
    checked: Together | CheckFailed | None = None,
) -> None:
    def attempt(files: list[_Landed], checked: Together | CheckFailed | None = None) -> None:
        ensure_flow_lock(settings, "ingest")
        with Store.open(settings=settings) as store:
            _write_together(settings, store, files, checked)

    try:
        with_database_retries(lambda: attempt(unit, checked), on_retry=retrying)
        return
    except _NOT_THE_FILES:
        raise
    except Exception as exc:
        if len(unit) == 1:
            _set_aside(settings, unit[0], exc)
            return
    for landed in unit:  # find the file that fails, write the others in order
        alone = [landed]
        try:
            with_database_retries(functools.partial(attempt, alone), on_retry=retrying)
        except _NOT_THE_FILES:
            raise
        except Exception as exc:
            _set_aside(settings, landed, exc)


def _set_aside(settings: Settings, landed: _Landed, exc: BaseException) -> None:
    """A file whose write fails for a reason of its own: quarantined, the error in the ledger."""
    error = str(exc) if isinstance(exc, CheckFailed) else _first_line(exc)
    get_run_logger().error("%s could not be written: %s", landed.path.name, error)
    landed.quarantine = ("undecodable" if isinstance(exc, CheckFailed) else "write_failed", error)
    landed.outcome.rows_in = 0
    with contextlib.suppress(*TRANSIENT_ERRORS), Store.open(settings=settings) as store:
        store.record_failures([(landed.digest, landed.outcome.source, error)])


def _units(
    files: list[_Landed], together: list[_Landed], alone: list[_Landed]
) -> list[list[_Landed]]:
    """Units in landing order: the files read together share one, files with other columns
    are written alone, in their place."""
    shareable = {id(f) for f in together}
    isolated = {id(f) for f in alone}
    units: list[list[_Landed]] = []
    for landed in files:
        if id(landed) in shareable and units and id(units[-1][0]) in shareable:
            units[-1].append(landed)
        elif id(landed) in shareable or id(landed) in isolated:
            units.append([landed])
    return units


@task
def ingest_files(
    settings: Settings, paths: list[Path], order_key: str | None = None, turn: int = 0
) -> list[SourceOutcome]:
    """Landed files as one unit: decoded, checked by GX once, written in one transaction with a
    ledger batch per file (its content hash) when the group's turn comes (`order_key`, `turn`:
    the run's landing order); then each moved to done/ or quarantine/.

    Not retried as a whole: the write retries itself while the database is away, and a task
    retried later could no longer keep its turn."""
    started = time.perf_counter()
    files: list[_Landed] = []
    # One group of the run reads and checks at a time, in landing order, while the group before
    # it writes (tasks.write_order); the wait's answer only orders the work.
    checking = check_turnstile(order_key)
    checking.wait(turn)
    try:
        files = _take_up(settings, paths)
        committed = with_database_retries(
            functools.partial(_committed, settings, [f.digest for f in files if f.digest])
        )
        labels_memo: dict[Any, Any] = {}
        together: list[_Landed] = []
        alone: list[_Landed] = []
        for landed in files:
            if landed.digest in committed and landed.quarantine is None:
                landed.decoded = None  # a replay: nothing to read or check
                landed.outcome.replay = True
                landed.outcome.rows_in = committed[landed.digest]
        # A run that dies while it decodes a file counts against that file. The files no run
        # has died on are counted together, in one write before and one after: a write is a
        # few system calls, each waiting for the GIL while the group before writes, and two
        # a file cost a tenth of the benchmark's run. A death counts against all of them; from
        # then on each is counted alone, so only a file that kills runs reaches MAX_ATTEMPTS.
        decoding = [f for f in files if f.quarantine is None and not f.outcome.replay]
        fresh = [f.path for f in decoding if not f.died]
        count_attempt(fresh)
        for landed in decoding:
            if landed.died:
                count_attempt([landed.path])
            _decode(settings, landed, labels_memo)
            if landed.died:
                count_attempt([landed.path], -1)
            if landed.quarantine is not None:
                continue
            if set(landed.decoded.frame.columns) == _STANDARD_COLUMNS or not len(
                landed.decoded.frame
            ):
                together.append(landed)
            else:
                alone.append(landed)  # other columns travel with their rows to quarantine
        count_attempt(fresh, -1)
        begun = time.perf_counter()
        units = _units(files, together, alone)
        checks = [_checked(settings, unit) for unit in units]
    except BaseException:
        turnstile(order_key).finish(turn, False)
        raise
    finally:
        checking.finish(turn, True)
    _write_in_order(settings, units, checks, order_key=order_key, turn=turn)
    shared = time.perf_counter() - begun
    rows = sum(f.outcome.rows_in for f in together + alone) or 1
    for landed in together + alone:
        landed.seconds += shared * landed.outcome.rows_in / rows
    for landed in files:
        tag = (landed.digest or uuid.uuid4().hex)[:12]
        if landed.quarantine is not None:
            reason, detail = landed.quarantine
            landed.outcome.file_quarantined = reason
            move_quarantined(
                landed.path, settings.quarantine, reason=reason, detail=detail, tag=tag
            )
        else:
            move_done(landed.path, settings.landing, tag=tag)
        landed.outcome.seconds = landed.seconds
    logger = get_run_logger()
    logger.info(
        "%d files (%d replays) in %.2fs",
        len(files),
        sum(f.outcome.replay for f in files),
        time.perf_counter() - started,
    )
    return [f.outcome for f in files]
