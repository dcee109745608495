"""Landing order through the `ingest` flow, against an oracle.

Random files (NDJSON and CSV) with overlapping series and times, corrections, exact copies of
earlier files (replays), repeats and conflicts inside a file, and bad rows land in random order
and are taken in random groupings (group size drawn per seed, so several task threads write).
The oracle applies the files one by one in landing order: a file seen before (same bytes) writes
nothing, a (series, ts) a file holds with two different values is quarantined, and a later file
wins a (series, ts) an earlier one also holds. The database must end identical to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import tasks.ingest_files
from flows.ingest import ingest
from metricmill.settings import load_settings
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

SEEDS = int(os.environ.get("METRICMILL_ORDER_SEEDS", "24"))
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
TIMES = [NOW - timedelta(hours=3) + timedelta(minutes=7 * k) for k in range(12)]
HOSTS = [f"h{k}" for k in range(5)]
METRIC = "order_m"

Key = tuple[str, str, datetime]  # (seed tag, host, ts)


def _row(seed_tag: str, host: str, ts: datetime, value: float) -> dict[str, Any]:
    return {"metric": METRIC, "labels": {"seed": seed_tag, "host": host}, "ts": ts, "value": value}


def _file_bytes(rows: list[dict[str, Any]], kind: str) -> bytes:
    if kind == "csv":
        lines = ["metric,labels,timestamp,value"]
        for r in rows:
            labels = json.dumps(r["labels"]).replace('"', '""')
            value = r["value"] if isinstance(r["value"], str) else repr(float(r["value"]))
            lines.append(f'{r["metric"]},"{labels}",{r["ts"].isoformat()},{value}')
        return ("\n".join(lines) + "\n").encode()
    return "".join(json.dumps({**r, "ts": r["ts"].isoformat()}) + "\n" for r in rows).encode()


def _oracle_apply(state: dict[Key, float], rows: list[dict[str, Any]]) -> None:
    """One file: keys held with one value land, keys held with two values are quarantined."""
    seen: dict[Key, set[float]] = {}
    for r in rows:
        if isinstance(r["value"], str):
            continue  # not a number: quarantined
        key = (r["labels"]["seed"], r["labels"]["host"], r["ts"])
        seen.setdefault(key, set()).add(float(r["value"]))
    for key, values in seen.items():
        if len(values) == 1:
            state[key] = values.pop()


def random_files(seed: int) -> list[tuple[str, bytes]]:
    """One seed's files, (file name, bytes), in the order they are to land; names shuffled
    against that order, so a name order would be a wrong order."""
    rng = random.Random(seed)
    tag = f"s{seed}"
    files: list[tuple[bytes, str]] = []
    for _ in range(rng.randint(6, 14)):
        if files and rng.random() < 0.2:
            files.append(rng.choice(files))  # an exact copy of an earlier file: a replay
            continue
        rows = []
        for _ in range(rng.randint(1, 10)):
            row = _row(tag, rng.choice(HOSTS), rng.choice(TIMES), float(rng.randint(0, 3)))
            rows.append(row)
            if rng.random() < 0.1:
                rows.append(dict(row))  # the same row twice: one sample
            if rng.random() < 0.05:
                rows.append({**row, "value": row["value"] + 1})  # a conflict inside the file
            if rng.random() < 0.05:
                rows.append({**row, "ts": rng.choice(TIMES), "value": "NaN"})
        kind = rng.choice(["ndjson", "csv"])
        files.append((_file_bytes(rows, kind), kind))
    names = [f"{tag}-{n:03d}" for n in range(len(files))]
    rng.shuffle(names)
    return [(f"{name}.{kind}", data) for (data, kind), name in zip(files, names, strict=True)]


class Oracle:
    """The files applied one by one in landing order."""

    def __init__(self) -> None:
        self.state: dict[Key, float] = {}
        self.seen: set[str] = set()
        self.clock = 1_700_000_000 * 10**9

    def land(self, landing: Path, name: str, data: bytes) -> None:
        path = landing / name
        path.write_bytes(data)
        self.clock += 10**6  # distinct modification times, in landing order
        os.utime(path, ns=(self.clock, self.clock))
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.seen:
            self.seen.add(digest)
            _oracle_apply(self.state, _parse_back(data, name.rsplit(".", 1)[1]))


def _parse_back(data: bytes, kind: str) -> list[dict[str, Any]]:
    """The oracle reads its own files back (what landed, not what was meant)."""
    out = []
    if kind == "csv":
        import csv
        import io

        for rec in csv.DictReader(io.StringIO(data.decode())):
            value: Any = rec["value"]
            value = value if value == "NaN" else float(value)
            out.append(
                {
                    "labels": json.loads(rec["labels"]),
                    "ts": datetime.fromisoformat(rec["timestamp"]),
                    "value": value,
                }
            )
        return out
    for line in data.decode().splitlines():
        rec = json.loads(line)
        rec["ts"] = datetime.fromisoformat(rec["ts"])
        out.append(rec)
    return out


@pytest.fixture
def home(db_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    isolate_settings(monkeypatch, settle_seconds=0, timescaledb=db_target.timescaledb)
    monkeypatch.setenv("METRICMILL_DATABASE_URL", db_target.url)
    yield tmp_path / "home"


def stored(home: Path) -> dict[Key, float]:
    with Store.open(settings=load_settings(home=home)) as store:
        frame = store.query(METRIC, None, TIMES[0] - timedelta(hours=1), NOW + timedelta(hours=1))
    return {
        (labels["seed"], labels["host"], ts.to_pydatetime()): float(value)
        for labels, ts, value in zip(frame["labels"], frame["ts"], frame["value"], strict=True)
    }


def test_random_overlapping_files_end_as_applied_one_by_one_in_landing_order(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SEEDS seeds over two runs: each seed's first files before the first run, the rest
    (corrections and replays of the first among them) before the second; random groupings."""
    landing = home / "landing"
    landing.mkdir(parents=True)
    oracle = Oracle()
    rng = random.Random(SEEDS)
    per_seed = [random_files(seed) for seed in range(SEEDS)]
    cuts = [rng.randint(1, len(files) - 1) for files in per_seed]
    for wave in (0, 1):
        for files, cut in zip(per_seed, cuts, strict=True):
            for name, data in files[:cut] if wave == 0 else files[cut:]:
                oracle.land(landing, name, data)
        # A few files a group: several groups, written by both task threads.
        monkeypatch.setattr(tasks.ingest_files, "TASK_FILES", rng.randint(2, 7))
        state = asyncio.run(ingest(home=str(home), scrape=False, return_state=True))
        assert state.is_completed(), state
        assert stored(home) == oracle.state, f"after run {wave + 1}"
    assert [p.name for p in landing.iterdir() if p.is_file()] == []
    processing = landing / "processing"
    assert not any(p.is_file() for p in processing.rglob("*") if not p.name.startswith("."))


def test_a_later_correction_wins_however_many_groups_a_run_has(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """70 files landed at once: file 1 sets K = 1.0, file 70 corrects it to 2.0."""
    landing = home / "landing"
    landing.mkdir(parents=True)
    monkeypatch.setattr(tasks.ingest_files, "TASK_FILES", 4)  # 18 groups, written by two threads
    base_ns = 1_700_000_000 * 10**9
    for n in range(1, 71):
        value = 1.0 if n == 1 else 2.0 if n == 70 else float(n)
        host = "k" if n in (1, 70) else f"other{n}"
        rows = [_row("corr", host, TIMES[0], value)]
        # Filler rows make early groups heavier, so later groups finish checking first.
        rows += [_row("corr", f"fill{n}", TIMES[1 + i % 10], float(i)) for i in range(400 // n)]
        path = landing / f"f{n:03d}.ndjson"
        path.write_bytes(_file_bytes(rows, "ndjson"))
        os.utime(path, ns=(base_ns + n, base_ns + n))
    state = asyncio.run(ingest(home=str(home), scrape=False, return_state=True))
    assert state.is_completed(), state
    assert stored(home)[("corr", "k", TIMES[0])] == 2.0
