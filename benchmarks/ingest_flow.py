"""Ingest-flow benchmark: NDJSON landing files through the Prefect `ingest` flow into PostgreSQL,
against ``psql \\copy`` of the same rows.

    uv run python benchmarks/ingest_flow.py [--rows 1000000] [--files 100] [--series 10000]
                                            [--timestamps mixed|iso|epoch]
                                            [--pg-url URL] [--profile N] [--repeat 3]

One synthetic workload (benchmarks/ingest.py's: metric ``bench_metric``, labels host/region,
seeded random values, scrape order), moved to recent timestamps (now - 2 days, 10 s apart, so
the quality window accepts every row), is written before the timed part as ``--files`` NDJSON
files (``{"metric", "labels", "timestamp", "value"}`` per line; by default even files ISO 8601
timestamps, odd files epoch seconds, see ``--timestamps``) and as one CSV (series_id, ts, value).

Timed, each into a fresh database of one throwaway PostgreSQL cluster (schema created first):

* ``flows.ingest.ingest(landing=True, scrape=False, ...)``: claim, then per group of files (one
  ``ingest_files`` task each, ``tasks.ingest_files.group_files``) parse, one GX validation of the
  group's frame and one ``Store.write_batch_parts`` (a ledger batch per file), under
  ``prefect_test_harness`` (the
  harness's server start-up, the GX import/context set-up and one empty warm-up flow run are
  one-time process costs and are not timed; their durations are printed);
* ``psql -c "\\copy samples_copy FROM file WITH (FORMAT csv)"`` into a table with the samples
  table's columns and primary key (benchmarks/ingest.py's baseline).

The two run in turn, ``--repeat`` times (default 3: \\copy, flow, \\copy, flow, ...), so that
each flow run meets the machine as the \\copy just before it did; this VM's speed drifts by a
third within minutes. Every run's seconds and each pair's ratio are printed; the ratio line takes
the best run of each side (as timeit does).

A second, untimed-by-the-flow pass decodes, validates and writes the same file groups stage by
stage (``storage.readers.read_landed_file``, one frame per group, ``tasks.quality.validate_batch``,
``Store.open`` + ``Store.write_batch_parts``), and runs ``validate_batch_pandas`` on the same
frames, for where the time goes and the GX-vs-pandas comparison. ``--profile N`` adds a cProfile
of each stage over the first N files (as one group). The output ends with
``RATIO ingest_flow_vs_copy`` (best flow rows/s over best \\copy rows/s) and
``RATIO gx_vs_pandas`` (GX seconds over pandas seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import psycopg

from benchmarks._common import (
    PSQL,
    PgServer,
    format_table,
    log,
    print_machine,
    rate,
    ratio_line,
    throwaway_pg,
    timed,
)
from benchmarks.ingest import (
    PG_COPY_TABLE,
    START_US,
    Workload,
    build_workload,
    check_metricmill_pg,
    check_pg,
    run_psql_copy,
    write_pg_csv,
)

# The flow reads its settings from the environment: claim files at once, and let the first
# file create all 10,000 series without the cardinality guard quarantining it. TimescaleDB off,
# as benchmarks/ingest.py does for plain PostgreSQL: with "auto", on a server where the
# extension is installed but not preloaded, CREATE EXTENSION fails with a FATAL error that
# closes the connection, and the next statement fails with "the connection is closed".
FLOW_ENV = {
    "METRICMILL_SETTLE_SECONDS": "0",
    "METRICMILL_MAX_NEW_SERIES_PER_BATCH": "100000",
    "METRICMILL_TIMESCALEDB": "off",
}
STEP_SECONDS = 10
TIMESTAMP_FORMATS = {
    "iso": "ISO 8601 timestamps",
    "epoch": "epoch-second timestamps",
    "mixed": "even files ISO timestamps, odd files epoch seconds",
}
AGE = timedelta(days=2)


# --------------------------------------------------------------------------- data


def recent_workload(rows: int, series: int, *, seed: int) -> Workload:
    """benchmarks/ingest.py's workload (scrape order), moved to start at now - 2 days (whole s)."""
    work = build_workload(rows, series, step_seconds=STEP_SECONDS, order="time", seed=seed)
    start_s = int((datetime.now(UTC) - AGE).timestamp())
    work.ts_us = work.ts_us - START_US + start_s * 1_000_000
    work.frame["ts"] = pd.to_datetime(work.ts_us, unit="us", utc=True)
    return work


def write_ndjson_files(
    work: Workload, directory: Path, files: int, timestamps: str = "iso"
) -> list[Path]:
    """The workload as `files` NDJSON files of consecutive rows, timestamps as ISO 8601 text,
    epoch seconds, or "mixed" (even files ISO, odd files epoch). Values are written with repr
    (round-trips exactly)."""
    directory.mkdir(parents=True, exist_ok=True)
    # one serialised prefix per series (labels are the same dict for all its rows)
    labels = work.frame["labels"].to_numpy(dtype=object)
    metric = work.frame["metric"].to_numpy(dtype=object)
    first_row = np.unique(work.series_id, return_index=True)[1]
    prefix: dict[int, str] = {}
    for row in first_row:
        head = json.dumps({"metric": metric[row], "labels": labels[row]}, separators=(",", ":"))
        prefix[int(work.series_id[row])] = head[:-1] + ',"timestamp":'
    # one rendering per distinct timestamp, in each format
    stamps, stamp_of_row = np.unique(work.ts_us, return_inverse=True)
    iso = [
        f'"{s}"' for s in pd.to_datetime(stamps, unit="us", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")
    ]
    epoch = [str(int(us // 1_000_000)) for us in stamps]
    paths = []
    for number, chunk in enumerate(np.array_split(np.arange(work.rows), files)):
        use_iso = timestamps == "iso" or (timestamps == "mixed" and number % 2 == 0)
        rendered = iso if use_iso else epoch
        lines = [
            f'{prefix[sid]}{rendered[stamp]},"value":{value!r}}}\n'
            for sid, stamp, value in zip(
                work.series_id[chunk].tolist(),
                stamp_of_row[chunk].tolist(),
                work.values[chunk].tolist(),
                strict=True,
            )
        ]
        path = directory / f"batch-{number:04d}.ndjson"
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths


def stage_landing(sources: list[Path], home: Path) -> None:
    """Copy the files into home/landing (mtimes in the past: settled)."""
    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    for path in sources:
        shutil.copy2(path, landing / path.name)


def create_schema(url: str) -> None:
    """metricmill's schema, created before timing (as \\copy's table is)."""
    from storage.store import Store

    Store.open(url).close()


# --------------------------------------------------------------------------- flow


@dataclass
class FlowRun:
    """The flow runs and the \\copy runs between them (in turn: copy, flow, copy, flow, ...)."""

    runs: list[float]  # seconds of each timed flow run
    copies: list[float]  # seconds of each \\copy, the one just before each flow run
    rows: list[dict[str, Any]]  # the fastest flow run's summary rows
    harness_seconds: float
    gx_warmup_seconds: float
    flow_warmup_seconds: float

    @property
    def seconds(self) -> float:
        return min(self.runs)

    @property
    def copy_seconds(self) -> float:
        return min(self.copies)


def warm_up_gx() -> float:
    """Import GX and build its context and suite once, on a tiny frame (one-time process cost)."""
    from tasks.quality import QualityLimits, validate_batch, validate_batch_pandas

    now = pd.Timestamp.now(tz="UTC")
    tiny = pd.DataFrame(
        {
            "metric": ["warm_up", "warm_up"],
            "labels": [{"host": "a"}, {"host": "b"}],
            "ts": [now - pd.Timedelta(seconds=1), now - pd.Timedelta(seconds=2)],
            "value": [1.0, 2.0],
        }
    )
    seconds, result = timed(validate_batch, tiny, QualityLimits())
    validate_batch_pandas(tiny, QualityLimits())
    if result.rejected:
        raise RuntimeError(f"GX warm-up rejected rows: {result.rejected}")
    return seconds


def run_flow(
    server: PgServer, sources: list[Path], csv_path: Path, tmp: Path, work: Workload, repeat: int
) -> FlowRun:
    """`repeat` timed flow calls, each after a timed \\copy of the same rows, so that both see
    the same state of the machine (plus the untimed harness, GX and empty-run warm-ups)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest

    def run_ingest(**kwargs: Any) -> Any:
        return asyncio.run(ingest(**kwargs))

    log("starting the Prefect test harness (not timed)")
    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=600):
        harness_seconds = time.perf_counter() - started
        log(f"  harness up after {harness_seconds:.1f}s; warming up GX (not timed)")
        gx_warmup_seconds = warm_up_gx()
        log(f"  GX warm-up {gx_warmup_seconds:.1f}s")

        with server.fresh_database("mm_flow_warmup") as url:
            warm_home = tmp / "home-warmup"
            create_schema(url)
            flow_warmup_seconds, warm_rows = timed(
                run_ingest, landing=True, scrape=False, home=str(warm_home), database_url=url
            )
        if warm_rows:
            raise RuntimeError(f"warm-up flow run found sources: {warm_rows}")
        log(f"  empty warm-up flow run {flow_warmup_seconds:.1f}s")

        runs: list[float] = []
        copies: list[float] = []
        fastest: list[dict[str, Any]] = []
        for attempt in range(repeat):
            copies.append(run_copy(server, csv_path, work))
            with server.fresh_database(f"mm_flow_{attempt}") as url:
                home = tmp / f"home-flow-{attempt}"
                stage_landing(sources, home)
                create_schema(url)
                log(f"flow {attempt + 1}/{repeat}: {work.rows:,} rows in {len(sources)} files")
                cpu = time.process_time()
                seconds, rows = timed(
                    run_ingest, landing=True, scrape=False, home=str(home), database_url=url
                )
                cpu = time.process_time() - cpu
                log(
                    f"  flow {seconds:.2f}s ({rate(work.rows, seconds):,.0f} rows/s; "
                    f"{cpu:.2f}s CPU in this process)"
                )
                if not isinstance(rows, list):  # a Skipped run (another run held the lock)
                    raise RuntimeError(f"the flow run did not ingest: {rows}")
                check_flow(rows, home, work, len(sources))
                check_metricmill_pg(url, work)
            if not runs or seconds < min(runs):
                fastest = rows
            runs.append(seconds)
    return FlowRun(runs, copies, fastest, harness_seconds, gx_warmup_seconds, flow_warmup_seconds)


def check_flow(rows: list[dict[str, Any]], home: Path, work: Workload, files: int) -> None:
    if len(rows) != files:
        raise RuntimeError(f"flow reported {len(rows)} sources, expected {files}")
    bad = [r for r in rows if r["file_quarantined"] or r["quarantined"] or r["replay"]]
    if bad:
        raise RuntimeError(f"flow quarantined or replayed files: {bad[:3]}")
    written = sum(r["written"] for r in rows)
    if written != work.rows:
        raise RuntimeError(f"flow wrote {written} rows, expected {work.rows}")
    left = [p.name for p in (home / "landing").iterdir() if p.is_file()]
    if left:
        raise RuntimeError(f"files left in landing/: {left[:5]}")


# --------------------------------------------------------------------------- copy


def run_copy(server: PgServer, csv_path: Path, work: Workload) -> float:
    with server.fresh_database("copy_flow") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PG_COPY_TABLE)
        log("psql \\copy (timed)")
        seconds, _ = timed(run_psql_copy, url, "samples_copy", csv_path)
        check_pg(url, "samples_copy", work, "\\copy into samples_copy")
    log(f"  \\copy {seconds:.2f}s ({rate(work.rows, seconds):,.0f} rows/s)")
    return seconds


# --------------------------------------------------------------------------- stages


@dataclass
class Stages:
    """Seconds per stage, summed over the file groups of the second pass."""

    read_hash: float = 0.0
    decode: float = 0.0
    combine: float = 0.0
    validate_gx: float = 0.0
    validate_pandas: float = 0.0
    open_store: float = 0.0
    write: float = 0.0
    same_results: bool = True
    gx_rejected: int = 0
    pandas_rejected: int = 0
    per_group_gx: list[float] = field(default_factory=list)
    per_group_write: list[float] = field(default_factory=list)
    group_files: list[int] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds of this process over the pass (the rest: PostgreSQL, waits)

    @property
    def flow_path(self) -> float:
        """What the ingest_files tasks do, less Prefect: hash, decode, combine, GX, open, write."""
        return (
            self.read_hash
            + self.decode
            + self.combine
            + self.validate_gx
            + self.open_store
            + self.write
        )


@dataclass
class _Group:
    """One task's files, read, decoded and put in one frame (as tasks.ingest does)."""

    names: list[str]
    digests: list[str]
    frame: pd.DataFrame
    parts: np.ndarray
    rejected: list[list[Any]]


def load_group(paths: list[Path], stages: Stages | None = None) -> _Group:
    from storage.frames import with_parsed_timestamps
    from storage.readers import read_landed_file
    from tasks.ingest_files import combine_files

    started = time.perf_counter()
    datas = [p.read_bytes() for p in paths]
    digests = [hashlib.sha256(d).hexdigest() for d in datas]
    if stages:
        stages.read_hash += time.perf_counter() - started
    memo: dict[Any, Any] = {}
    seconds, decoded = timed(
        lambda: [
            read_landed_file(p, data=d, labels_memo=memo) for p, d in zip(paths, datas, strict=True)
        ]
    )
    if stages:
        stages.decode += seconds
    started = time.perf_counter()
    frames = [with_parsed_timestamps(d.frame) for d in decoded]
    frame, parts, _ = combine_files(frames)  # as tasks.ingest_files.check_together does
    if stages:
        stages.combine += time.perf_counter() - started
    return _Group([p.name for p in paths], digests, frame, parts, [d.rejected for d in decoded])


def run_stages(server: PgServer, sources: list[Path], tmp: Path, work: Workload) -> Stages:
    """Per file group (as the flow's tasks take them): read / decode / validate (GX, and pandas
    on the same frame) / write, outside the flow."""
    from metricmill.settings import load_settings
    from storage.store import Store
    from tasks.ingest import quality_limits
    from tasks.ingest_files import group_files
    from tasks.quality import validate_batch, validate_batch_pandas

    stages = Stages()
    with server.fresh_database("mm_stages") as url:
        create_schema(url)
        settings = load_settings(database_url=url, home=str(tmp / "home-stages"))
        groups = group_files(sources)
        log(
            f"second pass: read / decode / validate / write of {len(sources)} files in "
            f"{len(groups)} groups, stage by stage"
        )
        cpu = time.process_time()
        for paths in groups:
            group = load_group(paths, stages)
            stages.group_files.append(len(paths))
            limits = quality_limits(settings)
            seconds, checked_pd = timed(
                validate_batch_pandas, group.frame, limits, parts=group.parts
            )
            stages.validate_pandas += seconds
            seconds, checked = timed(validate_batch, group.frame, limits, parts=group.parts)
            stages.validate_gx += seconds
            stages.per_group_gx.append(seconds)
            stages.gx_rejected += len(checked.rejected)
            stages.pandas_rejected += len(checked_pd.rejected)
            stages.same_results &= [r for _, r in checked.rejected] == [
                r for _, r in checked_pd.rejected
            ] and checked.good.index.equals(checked_pd.good.index)

            seconds, store = timed(Store.open, settings=settings)
            stages.open_store += seconds
            try:
                seconds, reports = timed(write_group, store, settings, group, checked)
            finally:
                store.close()
            stages.write += seconds
            stages.per_group_write.append(seconds)
            for report in reports:
                if report.replay or report.rejected or report.guarded_new_series:
                    raise RuntimeError(f"unexpected write report {report}")
        stages.cpu = time.process_time() - cpu
        check_metricmill_pg(url, work)
    return stages


def write_group(store: Any, settings: Any, group: _Group, checked: Any) -> Any:
    """What tasks.ingest_files does after validation: the verdict encoded, one write of every
    file, a ledger batch each."""
    from tasks.ingest_check import encode_parts, verdict_of

    return store.write_batch_parts(
        encode_parts(verdict_of(checked), group.rejected),
        batch_ids=group.digests,
        sources=[f"file:{n}" for n in group.names],
        max_new_series=settings.max_new_series_per_batch,
    )


def profile_stages(server: PgServer, sources: list[Path], tmp: Path) -> str:
    """cProfile of decode, GX validation and open+write over the first files (one group), one
    profile per stage; the top functions of each by own time and by cumulative time."""
    from metricmill.settings import load_settings
    from storage.store import Store
    from tasks.ingest import quality_limits
    from tasks.quality import validate_batch

    profiles = {name: cProfile.Profile() for name in ("decode", "validate (GX)", "open+write")}
    with server.fresh_database("mm_profile") as url:
        create_schema(url)
        settings = load_settings(database_url=url, home=str(tmp / "home-profile"))
        group = profiles["decode"].runcall(load_group, sources)
        checked = profiles["validate (GX)"].runcall(
            validate_batch, group.frame, quality_limits(settings), parts=group.parts
        )

        def open_and_write() -> Any:
            with Store.open(settings=settings) as store:
                return write_group(store, settings, group, checked)

        profiles["open+write"].runcall(open_and_write)
    out = io.StringIO()
    for name, profile in profiles.items():
        stats = pstats.Stats(profile, stream=out)
        total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
        print(f"--- cProfile {name}: {len(sources)} files, {total:.2f}s own time total", file=out)
        stats.sort_stats("tottime").print_stats(10)
        stats.sort_stats("cumulative").print_stats(10)
    return out.getvalue()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="samples in all files")
    parser.add_argument("--files", type=int, default=100, help="NDJSON files")
    parser.add_argument("--series", type=int, default=10_000, help="distinct series")
    parser.add_argument("--pg-url", help="use this PostgreSQL server instead of a throwaway one")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile the stages over N files"
    )
    parser.add_argument(
        "--timestamps",
        choices=tuple(TIMESTAMP_FORMATS),
        default="mixed",
        help="timestamp format in the files (default mixed: even files ISO, odd files epoch)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed \\copy + flow pairs, run in turn; the ratio takes the best of each",
    )
    parser.add_argument("--seed", type=int, default=20250101)
    args = parser.parse_args(argv)
    if min(args.rows, args.files, args.series, args.repeat) < 1 or args.files > args.rows:
        parser.error("--rows, --files, --series and --repeat must be positive, --files <= --rows")
    return args


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {f"{name} (python)": version(name) for name in ("prefect", "great-expectations")} | {
        "pandas (python)": pd.__version__
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(FLOW_ENV)

    with tempfile.TemporaryDirectory(prefix="metricmill-bench-flow-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"building {args.rows:,} rows over {args.series:,} series in {args.files} files")
        work = recent_workload(args.rows, args.series, seed=args.seed)
        sources = write_ndjson_files(work, tmp / "source", args.files, args.timestamps)
        csv_path = tmp / "samples_pg.csv"
        write_pg_csv(work, csv_path)
        ndjson_mb = sum(p.stat().st_size for p in sources) / 1e6

        with throwaway_pg(args.pg_url) as server:
            print_machine({"postgresql server": server.version(), "psql": PSQL, **versions()})
            first = pd.to_datetime(int(work.ts_us.min()), unit="us", utc=True)
            print(
                f"workload: {work.rows:,} samples, {work.n_series:,} series, {args.files} NDJSON "
                f"files ({ndjson_mb:.0f} MB; {TIMESTAMP_FORMATS[args.timestamps]}), "
                f"{STEP_SECONDS}s spacing from {first.isoformat()} (now - 2 days), "
                "fresh database per run, schema created before timing",
                flush=True,
            )
            flow = run_flow(server, sources, csv_path, tmp, work, args.repeat)
            stages = run_stages(server, sources, tmp, work)
            profile = profile_stages(server, sources[: args.profile], tmp) if args.profile else ""

    copy_seconds = flow.copy_seconds
    flow_rate, copy_rate = rate(work.rows, flow.seconds), rate(work.rows, copy_seconds)
    print()
    print(
        "not timed (one-time process costs): "
        f"Prefect test harness start-up {flow.harness_seconds:.1f}s, "
        f"GX import + context + suite on a 2-row frame {flow.gx_warmup_seconds:.1f}s, "
        f"one empty warm-up flow run {flow.flow_warmup_seconds:.1f}s"
    )
    print()
    print(
        format_table(
            ["method", "rows/s", "seconds"],
            [
                ("ingest flow (parse + GX + write)", f"{flow_rate:,.0f}", f"{flow.seconds:.2f}"),
                ("psql \\copy (csv)", f"{copy_rate:,.0f}", f"{copy_seconds:.2f}"),
            ],
        )
    )
    pairs = [c / f for c, f in zip(flow.copies, flow.runs, strict=True)]
    print(
        f"best of {len(flow.runs)} each, run in turn (\\copy, then the flow): flow "
        f"{', '.join(f'{s:.2f}' for s in flow.runs)}s; \\copy "
        f"{', '.join(f'{s:.2f}' for s in flow.copies)}s; each pair's ratio "
        f"{', '.join(f'{r:.2f}' for r in pairs)} (median {float(np.median(pairs)):.2f})"
    )
    print()
    print_flow_tasks(flow)
    print()
    print_stages(stages, work.rows, flow)
    if profile:
        print()
        print(profile.rstrip())
    print()
    print(ratio_line("ingest_flow_vs_copy", flow_rate / copy_rate))
    print(ratio_line("gx_vs_pandas", stages.validate_gx / stages.validate_pandas))
    return 0


def print_flow_tasks(flow: FlowRun) -> None:
    seconds = np.array([r["seconds"] for r in flow.rows], dtype=float)
    total = float(seconds.sum())
    print(
        f"flow summary rows: {len(seconds)} files; their seconds (a file's own read and decode, "
        "plus its share by rows of its group's GX check and write) sum to "
        f"{total:.2f}s, median {np.median(seconds):.3f}s, max {seconds.max():.3f}s; "
        f"sum / flow wall time = {total / flow.seconds:.2f} (two groups run at once, so a "
        "group's seconds include waiting for the other: hence the second pass)"
    )


def print_stages(stages: Stages, rows: int, flow: FlowRun) -> None:
    path = stages.flow_path
    entries = [
        ("read + sha256", stages.read_hash),
        ("read_landed_file (NDJSON reader)", stages.decode),
        ("ISO times parsed, one frame per group", stages.combine),
        ("validate_batch (GX), once per group", stages.validate_gx),
        ("Store.open", stages.open_store),
        ("Store.write_batch_parts", stages.write),
    ]
    groups = len(stages.per_group_gx)
    print(
        f"second pass, sequential, outside the flow (same files in the flow's {groups} groups "
        f"of {min(stages.group_files)}-{max(stages.group_files)} files, fresh database): "
        f"{path:.2f}s = {rate(rows, path):,.0f} rows/s; the whole pass (pandas validation "
        f"included) {stages.cpu:.2f}s CPU in this process (the rest: PostgreSQL's work and "
        "waiting for it, or other load on the machine)"
    )
    print(
        format_table(
            ["stage", "seconds", "share", "rows/s alone"],
            [(name, f"{s:.2f}", f"{s / path:.0%}", f"{rate(rows, s):,.0f}") for name, s in entries],
        )
    )
    writes = stages.per_group_write
    if len(writes) > 1:
        print(
            f"Store.write_batch_parts per group: first {writes[0]:.3f}s (creates the series), "
            f"then median {np.median(writes[1:]):.3f}s, max {max(writes[1:]):.3f}s"
        )
    print(
        f"flow wall time {flow.seconds:.2f}s vs the same work in sequence {path:.2f}s: "
        f"{flow.seconds - path:+.2f}s for Prefect (task runs, state and log traffic to the "
        "API server, artifacts), claiming and moving files, and two groups at once (overlap "
        "of Python with PostgreSQL, or contention)"
    )
    print()
    print(
        f"validation on the same {groups} group frames: GX {stages.validate_gx:.2f}s "
        f"({stages.validate_gx / groups * 1000:.0f} ms/group), pandas "
        f"{stages.validate_pandas:.2f}s "
        f"({stages.validate_pandas / groups * 1000:.0f} ms/group); "
        f"rejected GX {stages.gx_rejected}, pandas {stages.pandas_rejected}; "
        f"same rejects and good rows: {stages.same_results}"
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # cleanup already ran in the finally blocks on the way out
        log("interrupted")
        sys.exit(130)
