"""Ingestion tasks: decode a source, apply the quality contract, write exactly once."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from expectations.ingest_batch import (
    BatchUnusable,
    QualityLimits,
    check_required_columns,
)
from metricmill.secrets import redact
from metricmill.settings import ScrapeTarget, Settings
from metricmill.types import Reason
from storage.exposition import parse_exposition
from storage.frames import to_frame, typed_timestamps, with_parsed_timestamps
from storage.landing import (
    Claim,
    attempts,
    claim_files,
    count_attempt,
    move_done,
    move_quarantined,
    real_directory,
)
from storage.locks import LockLost, ensure_flow_lock
from storage.readers import ReadLimits, UnreadableFile, read_landed_file
from storage.store import Store
from tasks.quality import QualityResult, rejected_rows, validate_batch, validate_batch_pandas
from tasks.write_order import (
    TRANSIENT_ERRORS,
    EarlierGroupFailed,
    turnstile,
    with_database_retries,
)


class TransientError(RuntimeError):
    """A failure worth retrying: a 5xx, a timeout, a dropped connection."""


class CheckFailed(RuntimeError):
    """The quality check itself failed on a file's rows (not a row it rejected)."""


RETRYABLE: tuple[type[BaseException], ...] = (TransientError, *TRANSIENT_ERRORS)
# Failures a unit of files can do nothing about: the run stops and the next one retries.
_NOT_THE_FILES: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, LockLost)


def is_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """retry_condition_fn: retry lost connections, 5xx and timeouts — never bad data."""
    try:
        state.result()
    except RETRYABLE:
        return True
    except Exception:
        return False
    return False


@dataclass
class SourceOutcome:
    """What one file, scrape or programmatic batch did: a row of the run's summary table."""

    source: str
    kind: str
    rows_in: int = 0
    written: int = 0
    overwritten: int = 0
    unchanged: int = 0
    new_series: int = 0
    replay: bool = False
    quarantined: Counter[str] = field(default_factory=Counter)
    skipped_fields: int = 0
    file_quarantined: str | None = None
    seconds: float = 0.0
    quality_markdown: str = ""

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        data["quarantined"] = ", ".join(f"{k}: {v}" for k, v in sorted(self.quarantined.items()))
        data["rows_per_s"] = round(self.rows_in / self.seconds) if self.seconds else 0
        data.pop("quality_markdown")
        return data


def quality_limits(settings: Settings) -> QualityLimits:
    return QualityLimits(
        max_future_skew=timedelta(seconds=settings.max_future_skew_seconds),
        retention_days=settings.retention_days,
        max_labels=settings.max_labels,
        max_label_name_length=settings.max_label_name_length,
        max_label_value_length=settings.max_label_value_length,
    )


def _write(
    settings: Settings,
    frame: pd.DataFrame,
    outcome: SourceOutcome,
    *,
    batch_id: str | None,
    pre_rejected: list[tuple[dict, str]],
    check: Callable[[pd.DataFrame, QualityLimits], QualityResult] = validate_batch,
) -> bool:
    """Validate and write; False when the cardinality guard quarantined the whole batch."""
    checked = check(frame, quality_limits(settings)) if len(frame) else None
    good = checked.good if checked is not None else frame
    rejected = pre_rejected + (checked.rejected if checked is not None else [])
    if checked is not None:
        outcome.quality_markdown = checked.markdown()
    with Store.open(settings=settings) as store:
        old = _past_their_rule(store, settings, checked.typed_good()) if checked else None
        if old is not None:
            rejected = rejected + _too_old(good, old)
            good = good[~old]
        report = store.write_samples(
            good,
            source=outcome.source,
            batch_id=batch_id,
            rejected=rejected,
            max_new_series=settings.max_new_series_per_batch,
        )
    outcome.rows_in = report.rows_in
    outcome.replay = report.replay
    outcome.written = report.written
    outcome.overwritten = report.overwritten
    outcome.unchanged = report.unchanged
    outcome.new_series = report.new_series
    outcome.quarantined = Counter(report.rejected)
    return not report.guarded_new_series


# Long enough to ride out a database restart at the start of a run.
@task(retries=5, retry_delay_seconds=[2, 5, 10, 20, 30], retry_condition_fn=is_transient)
def prepare_store(settings: Settings) -> None:
    """Create or upgrade the schema once, before the run's tasks open the store side by side
    (on a new database, concurrent first connections race to create the TimescaleDB extension)."""
    Store.open(settings=settings).close()


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
# than the budget goes alone).
TASK_BYTES = 24_000_000
TASK_FILES = 64
# A file up to this size is read once, for its hash and its decoding; a larger one is hashed
# streaming and its reader reads it again from disk.
KEEP_BYTES = 64 * 1024 * 1024
# A file that this many runs died while decoding is quarantined unopened.
MAX_ATTEMPTS = 3
_STANDARD_COLUMNS = frozenset(("metric", "labels", "ts", "value"))


def group_files(paths: list[Path]) -> list[list[Path]]:
    """The claimed files, in order, as the fewest groups within TASK_BYTES / TASK_FILES, their
    sizes evened out (the run's two task threads then finish together); one task each."""
    sizes = []
    for path in paths:
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            sizes.append(0)
    total = sum(sizes)
    count = max(-(-total // TASK_BYTES), -(-len(paths) // TASK_FILES), 1)
    target = total / count
    groups: list[list[Path]] = []
    size = 0
    for path, length in zip(paths, sizes, strict=True):
        if not groups or size + length / 2 > target or len(groups[-1]) >= TASK_FILES:
            groups.append([])
            size = 0
        groups[-1].append(path)
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
    frames: list[pd.DataFrame], parts: np.ndarray, checked: QualityResult
) -> list[tuple[dict[str, Any], str]]:
    """The check's rejected rows (in its order) rendered from the files' own frames."""
    sizes = np.array([len(frame) for frame in frames], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    positions = checked.rejected_positions
    reasons = [reason for _, reason in checked.rejected]
    out: list[tuple[dict[str, Any], str]] = []
    for part in sorted(set(parts[positions].tolist())):
        mine = np.flatnonzero(parts[positions] == part)
        codes = np.full(int(sizes[part]), None, dtype=object)
        codes[positions[mine] - starts[part]] = [reasons[i] for i in mine.tolist()]
        out += rejected_rows(frames[part], codes)
    return out


def _check_together(
    settings: Settings, files: list[_Landed]
) -> tuple[pd.DataFrame, np.ndarray, list[list[tuple[dict[str, Any], str]]], str]:
    """One frame of the files' rows, checked by the GX suite once: (good rows, the part of each
    good row, rejected rows per file, the quality markdown)."""
    frames = [with_parsed_timestamps(f.decoded.frame) for f in files]
    rejected: list[list[tuple[dict[str, Any], str]]] = [list(f.decoded.rejected) for f in files]
    combined, parts, retimed = combine_files(frames)
    if not len(combined):
        return combined, parts, rejected, ""
    checked = validate_batch(combined, quality_limits(settings), parts=parts)
    rows = rejected_as_received(frames, parts, checked) if retimed else checked.rejected
    for row, part in zip(rows, parts[checked.rejected_positions].tolist(), strict=True):
        rejected[part].append(row)
    names = ", ".join(f"`{f.path.name}`" for f in files)
    markdown = checked.markdown()
    if len(files) > 1:
        markdown = f"Checked together ({len(files)} files): {names}\n\n{markdown}"
    good_parts = parts[checked.good.index.to_numpy()]
    return checked.typed_good(), good_parts, rejected, markdown


def _past_their_rule(store: Store, settings: Settings, good: pd.DataFrame) -> np.ndarray | None:
    """Which good rows (ts typed) are older than their series' raw retention rule, where it
    keeps less than the default the quality suite checks: retention may already have
    archived their hours, and a rollup must not rebuild an archived hour from late rows
    alone. None when no row is."""
    if good.empty:
        return None
    cutoffs = store.retention.raw_cutoffs(
        good["metric"].to_numpy(dtype=object),
        good["labels"].to_numpy(dtype=object),
    )
    if cutoffs is None:
        return None
    old = pd.DatetimeIndex(good["ts"]).as_unit("us").asi8 < cutoffs
    return old if old.any() else None


def _too_old(frame: pd.DataFrame, old: np.ndarray) -> list[tuple[dict[str, Any], str]]:
    reasons = np.full(len(frame), None, dtype=object)
    reasons[old] = Reason.TIMESTAMP_TOO_OLD
    return rejected_rows(frame, reasons)


def _write_together(settings: Settings, store: Store, files: list[_Landed]) -> None:
    """Check and write files as one unit: one GX validation, one write transaction with a
    ledger batch per file. Fills each file's outcome and its destination."""
    try:
        good, parts, rejected, markdown = _check_together(settings, files)
    except Exception as exc:
        raise CheckFailed(_first_line(exc)) from exc
    old = _past_their_rule(store, settings, good)
    if old is not None:
        for row, part in zip(_too_old(good, old), parts[old].tolist(), strict=True):
            rejected[part].append(row)
        good, parts = good[~old], parts[~old]
    reports = store.write_sample_parts(
        good,
        parts=parts,
        batch_ids=[f.digest for f in files],
        sources=[f.outcome.source for f in files],
        rejected=rejected,
        max_new_series=settings.max_new_series_per_batch,
    )
    files[0].outcome.quality_markdown = markdown
    for landed, report in zip(files, reports, strict=True):
        o = landed.outcome
        o.rows_in = report.rows_in
        o.replay = report.replay
        o.written = report.written
        o.overwritten = report.overwritten
        o.unchanged = report.unchanged
        o.new_series = report.new_series
        o.quarantined = Counter(report.rejected)
        if report.guarded_new_series:
            landed.quarantine = (
                "cardinality_limit",
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
    for path in paths:
        landed = _Landed(path, "", SourceOutcome(f"file:{path.name}", "landing"))
        try:
            if path.is_symlink():
                landed.quarantine = ("symlink", "a symbolic link: not followed, not read")
            elif attempts(path) >= MAX_ATTEMPTS:
                landed.quarantine = (
                    "repeated_failure",
                    f"{attempts(path)} runs died while decoding this file",
                )
            else:
                landed.digest, landed.decoded = _hash_file(path)
        except FileNotFoundError:
            continue  # moved by an earlier attempt of this task, after its write committed
        except OSError as exc:
            landed.quarantine = ("unreadable_file", _first_line(exc))
        files.append(landed)
    return files


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
    settings: Settings, units: list[list[_Landed]], *, order_key: str | None, turn: int
) -> None:
    """Write the units when this group's turn comes, riding out database restarts. A unit of
    several files that fails for a reason of its own is written file by file, and a file that
    fails alone is quarantined (`write_failed`): the files behind it still land."""
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

        for unit in units:
            _write_unit(settings, unit, retrying)
        written = True
    finally:
        gate.finish(turn, written)


def _write_unit(
    settings: Settings, unit: list[_Landed], retrying: Callable[[BaseException, float], None]
) -> None:
    def attempt(files: list[_Landed]) -> None:
        ensure_flow_lock(settings, "ingest")
        with Store.open(settings=settings) as store:
            _write_together(settings, store, files)

    try:
        with_database_retries(lambda: attempt(unit), on_retry=retrying)
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
    try:
        files = _take_up(settings, paths)
        committed = with_database_retries(
            functools.partial(_committed, settings, [f.digest for f in files if f.digest])
        )
        labels_memo: dict[Any, Any] = {}
        together: list[_Landed] = []
        alone: list[_Landed] = []
        for landed in files:
            if landed.quarantine is not None:
                continue
            if landed.digest in committed:  # a replay: nothing to read or check
                landed.decoded = None
                landed.outcome.replay = True
                landed.outcome.rows_in = committed[landed.digest]
                continue
            # A run that dies while it decodes a file counts against that file.
            count_attempt([landed.path])
            _decode(settings, landed, labels_memo)
            count_attempt([landed.path], -1)
            if landed.quarantine is not None:
                continue
            if set(landed.decoded.frame.columns) == _STANDARD_COLUMNS or not len(
                landed.decoded.frame
            ):
                together.append(landed)
            else:
                alone.append(landed)  # other columns travel with their rows to quarantine
    except BaseException:
        turnstile(order_key).finish(turn, False)
        raise
    begun = time.perf_counter()
    # Units in landing order: files with other columns are written alone, in their place.
    shareable = {id(f) for f in together}
    isolated = {id(f) for f in alone}
    units: list[list[_Landed]] = []
    for landed in files:
        if id(landed) in shareable and units and id(units[-1][0]) in shareable:
            units[-1].append(landed)
        elif id(landed) in shareable or id(landed) in isolated:
            units.append([landed])
    _write_in_order(settings, units, order_key=order_key, turn=turn)
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


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def ingest_records(
    settings: Settings, samples: list[dict[str, Any]] | pd.DataFrame
) -> SourceOutcome:
    """Samples handed in by a caller (a flow parameter or Python)."""
    started = time.perf_counter()
    outcome = SourceOutcome(source="programmatic", kind="programmatic")
    frame = to_frame(samples)  # aliases resolved; a missing column is a clear error
    _write(settings, frame, outcome, batch_id=None, pre_rejected=[])
    outcome.seconds = time.perf_counter() - started
    return outcome


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def scrape_target(settings: Settings, target: ScrapeTarget | str) -> SourceOutcome:
    """One Prometheus exposition scrape, stamped at scrape time unless the text has timestamps;
    samples get the target's `instance`, `job` and labels unless they carry their own."""
    started = time.perf_counter()
    if isinstance(target, str):
        target = ScrapeTarget(url=target)
    url = target.url
    outcome = SourceOutcome(source=f"scrape:{redact(url)}", kind="scrape")  # summary: no password
    scrape_time = datetime.now(UTC)
    response = httpx.get(url, timeout=settings.scrape_timeout_seconds)
    if response.status_code >= 500:
        raise TransientError(f"{url} answered {response.status_code}")
    response.raise_for_status()
    address = httpx.URL(url)
    port = address.port or (443 if address.scheme == "https" else 80)
    parsed = parse_exposition(
        response.content,  # bytes: a line that is not UTF-8 is rejected, not stored as U+FFFD
        scrape_time=scrape_time,
        extra_labels={
            "instance": f"{address.host}:{port}",
            "job": target.job,
            **target.labels,
        },
    )
    outcome.skipped_fields = parsed.skipped_nan  # NaN samples: skipped and counted
    # The ingest-batch suite's checks as vectorised pandas (tasks/quality.py, kept equal to the
    # GX suite by tests/test_quality.py): a served run is a fresh process, and importing Great
    # Expectations and building its context would cost seconds before every scrape's write.
    _write(
        settings,
        parsed.frame,
        outcome,
        batch_id=None,
        pre_rejected=parsed.rejected,
        check=validate_batch_pandas,
    )
    outcome.seconds = time.perf_counter() - started
    return outcome
