"""The hostile corpus: dozens of hostile files mixed with good ones through one ingest run.

Every good sample lands exactly once; every hostile file ends in quarantine with a reason (the
file itself in quarantine/, or, where each of its lines was refused on its own, every line in
the quarantine table and the file in done/ with nothing of it written); the run completes;
the process's peak memory stays bounded; nothing outside the landing tree is read or moved.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import resource
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.ingest import ingest
from metricmill.settings import load_settings
from storage.store import Store
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

NOW = datetime.now(UTC).replace(microsecond=0)
TS = NOW - timedelta(minutes=20)
TS_ISO = TS.isoformat()
TS_NS = int(TS.timestamp()) * 1_000_000_000
DEEP = "[" * 2000 + "]" * 2000
OUTSIDE_METRIC = "outside_secret"
PEAK_RSS_MB = 1500


def _json_lines(*records: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _sample(metric: str = "hostile_x", **labels: str) -> dict[str, object]:
    return {"metric": metric, "labels": labels or {"h": "x"}, "ts": TS_ISO, "value": 1.0}


def _gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _deep_parquet() -> bytes:
    kind: pa.DataType = pa.float64()
    for _ in range(40):
        kind = pa.list_(kind)
    return _parquet(pa.table({"metric": ["m"], "ts": [1], "value": pa.array([None], kind)}))


# name -> bytes; every one must end as a quarantined file (a reason beside it in quarantine/)
HOSTILE_FILES: dict[str, Callable[[], bytes]] = {
    # NDJSON
    "deep-labels.ndjson": lambda: b'{"metric":"n","labels":{"a":' + DEEP.encode() + b'},"ts":1}\n',
    "deep-value.ndjson": lambda: b'{"metric":"n","ts":1,"value":' + DEEP.encode() + b"}\n",
    "deep-objects.ndjson": lambda: ('{"a":' * 3000 + "1" + "}" * 3000 + "\n").encode(),
    "deep-then-good.ndjson": lambda: _json_lines(_sample()) + b'{"labels":' + DEEP.encode() + b"}",
    "huge-line.ndjson": lambda: b'{"metric":"' + b"a" * (2 << 20) + b'","ts":1,"value":1}\n',
    "zeros-bomb.ndjson.gz": lambda: _gzip_of_zeros(1 << 30),
    "empty-objects-bomb.ndjson.gz": lambda: gzip.compress(b"{}\n" * 10_000_000, 9),
    "empty-objects.ndjson": lambda: b"{}\n" * 100_000,
    "binary-junk.ndjson": lambda: bytes(range(256)) * 64,
    "truncated.ndjson.gz": lambda: gzip.compress(_json_lines(*[_sample()] * 200))[:-40],
    "not-gzip.ndjson.gz": lambda: b"\x1f\x8b\x08 this is not gzip at all",
    "junk-members.ndjson.gz": lambda: gzip.compress(b"\xff\xfe junk") + b"\x1f\x8bnope",
    "empty.ndjson": lambda: b"",
    "empty.ndjson.gz": lambda: b"",
    "blank-lines.ndjson": lambda: b"\n  \n\t\n\n",
    "too-many-labels.ndjson": lambda: _json_lines(
        {**_sample(), "labels": {f"l{i}": "v" for i in range(2000)}}
    ),
    "arrays.ndjson": lambda: b"[1,2,3]\n[4,5]\n",
    "scalars.ndjson": lambda: b'"text"\n42\nnull\ntrue\n',
    "latin1.ndjson": lambda: '{"metric":"café","ts":1,"value":1}\n'.encode("latin-1"),
    "utf16.ndjson": lambda: json.dumps(_sample()).encode("utf-16"),
    "one-big-array.json": lambda: json.dumps([_sample()] * 50).encode(),
    "no-sample-keys.ndjson": lambda: b'{"foo": 1}\n{"bar": [1]}\n',
    "gz-huge-line.ndjson.gz": lambda: gzip.compress(b"a" * (3 << 20)),
    "evil\x1b[31mname\x07.ndjson": lambda: b'{"labels":' + DEEP.encode() + b"}\n",
    # CSV
    "deep-labels.csv": lambda: b'metric,timestamp,value,labels\nm,1,1,"' + DEEP.encode() + b'"\n',
    "wide.csv": lambda: (
        "metric,timestamp,value," + ",".join(f"l{i}" for i in range(2000)) + "\n"
        "m,1,1," + ",".join("v" for _ in range(2000)) + "\n"
    ).encode(),
    "no-columns.csv": lambda: b"a,b,c\n1,2,3\n",
    "binary.csv": lambda: b"\x00\xff\xfe\x01" * 1000,
    "huge-line.csv": lambda: b"metric,timestamp,value\n" + b"m" * (2 << 20) + b",1,1\n",
    "zeros-bomb.csv.gz": lambda: _gzip_of_zeros(256 << 20),
    # Parquet
    "fake.parquet": lambda: b"PAR1 not really parquet PAR1",
    "truncated.parquet": lambda: _parquet(
        pa.table({"metric": ["m"] * 100, "ts": list(range(100)), "value": [1.0] * 100})
    )[:-20],
    "deep.parquet": _deep_parquet,
    "missing-columns.parquet": lambda: _parquet(pa.table({"x": [1, 2]})),
    # Influx line protocol
    "huge-line.lp": lambda: b"m,h=" + b"a" * (2 << 20) + b" value=1\n",
    "zeros-bomb.lp.gz": lambda: _gzip_of_zeros(256 << 20),
    "junk-lines.lp": lambda: b"junk line\n" * 20_000,
    "strings-only.lp": lambda: b'cpu,host=a state="idle" 1\n',
    "smuggle.lp": lambda: b'm s="a\nx v=2\n"\n',
    "binary.lp": lambda: b"\xff\xfe\xfd value=1\n",
    "many-tags.lp": lambda: ("m," + ",".join(f"t{i}=v" for i in range(2000)) + " v=1\n").encode(),
    "booleans-only.lp": lambda: b"m up=true,down=f 1\n",
    # other names and types
    "program.exe": lambda: b"MZ\x90\x00" + bytes(200),
    "no-suffix": lambda: _json_lines(_sample()),
    "script.sh": lambda: b"#!/bin/sh\nrm -rf /\n",
    "archive.zip": lambda: b"PK\x03\x04" + bytes(100),
    "image.ndjson.png": lambda: b"\x89PNG\r\n\x1a\n" + bytes(100),
}

# Files whose every line is refused on its own: they reach done/, each line in the quarantine
# table with its reason, and nothing of them written.
ROW_LEVEL_FILES: dict[str, Callable[[], bytes]] = {
    "nan-values.ndjson": lambda: (
        '{"metric":"hostile_nan","labels":{},"ts":"' + TS_ISO + '","value":NaN}\n'
    ).encode(),
    "text-values.ndjson": lambda: _json_lines({**_sample("hostile_text"), "value": "abc"}),
    "control-metric.ndjson": lambda: _json_lines(_sample("hostile\x1b[2Jm")),
    "nested-metric.ndjson": lambda: _json_lines({**_sample(), "metric": {"n": 1}}),
    "list-values.parquet": lambda: _parquet(
        pa.table({"metric": ["hostile_list"], "ts": [TS], "value": pa.array([[1.0]])})
    ),
    "control-chars.lp": lambda: f"c\x01pu value=1 {TS_NS}\ncpu,h=a\x1bb value=2 {TS_NS}\n".encode(),
    "nan-fields.lp": lambda: f"hostile_lp value=NaN {TS_NS}\n".encode(),
    "far-future.ndjson": lambda: _json_lines({**_sample("hostile_future"), "ts": "2200-01-01"}),
    "bad-quotes.csv": lambda: b'metric,timestamp,value\n"m,1,1\nx,"2,2\n',
}  # fmt: skip


def _good_files(landing: Path) -> set[tuple[str, str]]:
    """Good files of every format; returns the (host, metric) of every sample written."""
    expected: set[tuple[str, str]] = set()
    for i in range(6):
        host = f"nd{i}"
        (landing / f"good-{i}.ndjson").write_bytes(_json_lines(_sample("hostile_ok", h=host)))
        expected.add((host, "hostile_ok"))
    csv = "metric,timestamp,value,h\n" + "".join(
        f"hostile_ok,{TS_ISO},2,csv{i}\n" for i in range(3)
    )
    (landing / "good.csv").write_text(csv)
    expected |= {(f"csv{i}", "hostile_ok") for i in range(3)}
    (landing / "good.ndjson.gz").write_bytes(
        gzip.compress(_json_lines(_sample("hostile_ok", h="gz")))
    )
    expected.add(("gz", "hostile_ok"))
    (landing / "good.lp").write_text(f"hostile_ok,h=lp value=3 {TS_NS}\n")
    expected.add(("lp", "hostile_ok"))
    frame = pd.DataFrame({"metric": ["hostile_ok"], "ts": [TS], "value": [4.0], "h": ["pq"]})
    frame.to_parquet(landing / "good.parquet")
    expected.add(("pq", "hostile_ok"))
    return expected


def test_hostile_corpus_through_the_ingest_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    landing = home / "landing"
    landing.mkdir(parents=True)
    isolate_settings(monkeypatch, home=home, settle_seconds=0)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.ndjson"
    secret.write_bytes(_json_lines(_sample(OUTSIDE_METRIC, h="outside")))
    outside_before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in outside.iterdir()}

    for name, make in {**HOSTILE_FILES, **ROW_LEVEL_FILES}.items():
        (landing / name).write_bytes(make())
    links = {
        "link-to-outside.ndjson": secret,
        "link-to-passwd.ndjson": Path("/etc/passwd"),
        "link-to-dir.ndjson": outside,
        "dangling.ndjson": tmp_path / "nothing-here",
    }
    for name, target in links.items():
        (landing / name).symlink_to(target)
    (landing / "loop.ndjson").symlink_to(landing / "loop.ndjson")
    hostile = set(HOSTILE_FILES) | set(links) | {"loop.ndjson"}
    assert len(hostile) + len(ROW_LEVEL_FILES) >= 50
    expected = _good_files(landing)

    state = asyncio.run(ingest(home=str(home), scrape=False, return_state=True))

    assert state.is_completed(), state
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    assert peak_mb < PEAK_RSS_MB, f"peak RSS {peak_mb} MB"

    quarantine = home / "quarantine"
    reasons = {
        p.name.removesuffix(".reason"): p.read_text(encoding="utf-8").split("\n")[0]
        for p in quarantine.iterdir()
        if p.name.endswith(".reason")
    }
    missing = sorted(hostile - set(reasons))
    assert not missing, f"hostile files not quarantined: {missing}"
    assert all(reasons[name] for name in hostile)
    for name in links:
        assert reasons[name] == "symlink"
        assert (quarantine / name).is_symlink()
    assert reasons["zeros-bomb.ndjson.gz"] == "line_too_long"
    assert reasons["empty-objects-bomb.ndjson.gz"] == "too_many_bad_lines"
    assert reasons["deep-labels.ndjson"] == "too_deep"
    assert reasons["too-many-labels.ndjson"] == "too_many_labels"
    assert reasons["strings-only.lp"] == reasons["smuggle.lp"] == "no_samples"

    done = {p.name for p in (landing / "done").iterdir()}
    assert not (set(ROW_LEVEL_FILES) - done), sorted(set(ROW_LEVEL_FILES) - done)
    assert not [p for p in (landing / "processing").rglob("*") if not p.name.startswith(".")]
    assert not [p for p in landing.iterdir() if p.name not in ("done", "processing")]

    settings = load_settings(home=home)
    with Store.open(settings=settings) as store:
        stored = store.query("hostile_ok", None, NOW - timedelta(days=1), NOW + timedelta(days=1))
        series = store.series()
        entries = store.quarantine(limit=10_000, pending_only=False)
    landed = list(
        zip(stored["labels"].map(lambda labels: labels.get("h")), stored["metric"], strict=True)
    )
    assert sorted(landed) == sorted(expected)  # every good sample once, nothing else
    assert set(series["metric"]) == {"hostile_ok"}
    by_source = entries.groupby("source")["reason"].apply(set).to_dict()
    for name in ROW_LEVEL_FILES:
        assert by_source.get(f"file:{name}"), f"{name}: no quarantined rows"

    # nothing outside the landing tree was read, written or moved
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in outside.iterdir()} == (
        outside_before
    )
    assert OUTSIDE_METRIC not in json.dumps(entries["row"].tolist(), default=str)
    assert "root:" not in json.dumps(entries["row"].tolist(), default=str)
    assert os.path.exists("/etc/passwd")
