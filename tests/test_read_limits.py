"""Readers bound what one file may make them do: size, line length, nesting, labels per row and
bad lines, checked while the bytes stream in; each breach is one UnreadableFile with a reason."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from storage.limits import ReadLimits, UnreadableFile, nesting_depth, read_bounded
from storage.readers import read_landed_file, read_samples_file
from tests.settings_env import isolate_settings

GOOD = {"metric": "m", "labels": {"h": "a"}, "ts": 1_700_000_000, "value": 1.0}
SMALL = ReadLimits(
    max_file_bytes=10_000,
    max_line_bytes=200,
    max_nesting_depth=8,
    max_row_labels=5,
    max_bad_lines=3,
)


DEFAULTS = ReadLimits()


def refused(path: Path, limits: ReadLimits = DEFAULTS, data: bytes | None = None) -> str:
    with pytest.raises(UnreadableFile) as raised:
        read_landed_file(path, limits=limits, data=data)
    return raised.value.reason


def ndjson(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_good_file_within_the_bounds_reads_as_before(tmp_path: Path) -> None:
    path = ndjson(tmp_path / "ok.ndjson", GOOD, {**GOOD, "value": 2.0})
    decoded = read_landed_file(path, limits=SMALL)
    assert decoded.frame["value"].tolist() == [1.0, 2.0]


def test_too_large_decompressed_and_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "big.ndjson.gz"
    path.write_bytes(gzip.compress(b"\n".join([json.dumps(GOOD).encode()] * 500)))
    assert path.stat().st_size < SMALL.max_file_bytes
    assert refused(path, SMALL) == "too_large"
    plain = ndjson(tmp_path / "big.ndjson", *[GOOD] * 500)
    assert refused(plain, SMALL) == "too_large"
    assert refused(plain, SMALL, data=plain.read_bytes()) == "too_large"


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_line_too_long_anywhere(tmp_path: Path, where: str) -> None:
    long = {**GOOD, "labels": {"h": "x" * 300}}
    records = {"first": [long, GOOD, GOOD], "middle": [GOOD, long, GOOD], "last": [GOOD, long]}
    path = ndjson(tmp_path / f"{where}.ndjson", *records[where])
    assert refused(path, SMALL) == "line_too_long"
    gz = tmp_path / f"{where}.ndjson.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert refused(gz, SMALL) == "line_too_long"


def test_a_gzip_bomb_stops_at_the_first_long_line_not_at_the_end(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.ndjson.gz"
    bomb.write_bytes(gzip.compress(b"\0" * (64 << 20), compresslevel=1))
    assert bomb.stat().st_size < 1 << 20
    assert refused(bomb) == "line_too_long"


def test_deep_nesting_is_too_deep_never_a_recursion_error(tmp_path: Path) -> None:
    line = '{"metric":"n","labels":{"a":' + "[" * 2000 + "]" * 2000 + '},"ts":1,"value":1}'
    path = tmp_path / "n.ndjson"
    path.write_text(line + "\n" + json.dumps(GOOD) + "\n")
    assert refused(path) == "too_deep"
    assert nesting_depth(line.encode()) == 2002  # the record, its labels, 2000 arrays
    assert nesting_depth(b'{"a":"[[[[[[[[\\"[["}') == 1  # brackets in strings do not count
    csv = tmp_path / "n.csv"
    csv.write_text('metric,timestamp,value,labels\nm,1,1,"' + "[" * 2000 + "]" * 2000 + '"\n')
    assert refused(csv) == "too_deep"


def test_too_many_labels_in_every_format(tmp_path: Path) -> None:
    wide = {f"l{i}": "v" for i in range(6)}
    assert refused(ndjson(tmp_path / "w.ndjson", {**GOOD, "labels": wide}), SMALL) == (
        "too_many_labels"
    )
    csv = tmp_path / "w.csv"
    csv.write_text("metric,timestamp,value," + ",".join(wide) + "\nm,1,1," + "v," * 5 + "v\n")
    assert refused(csv, SMALL) == "too_many_labels"
    lp = tmp_path / "w.lp"
    lp.write_text("m," + ",".join(f"{k}=v" for k in wide) + " value=1 1\n")
    assert refused(lp, SMALL) == "too_many_labels"


def test_too_many_bad_lines_in_ndjson_and_line_protocol(tmp_path: Path) -> None:
    empties = tmp_path / "e.ndjson"
    empties.write_text("{}\n" * 4 + json.dumps(GOOD) + "\n")
    assert refused(empties, SMALL) == "too_many_bad_lines"
    three = tmp_path / "three.ndjson"
    three.write_text("{}\n" * 3 + json.dumps(GOOD) + "\n")
    decoded = read_landed_file(three, limits=SMALL)
    assert [reason for _, reason in decoded.rejected] == ["malformed_line"] * 3
    junk = tmp_path / "j.lp"
    junk.write_text("junk\n" * 4 + "m value=1 1\n")
    assert refused(junk, SMALL) == "too_many_bad_lines"


def test_gzip_members_truncation_and_junk(tmp_path: Path) -> None:
    two = tmp_path / "two.ndjson.gz"
    two.write_bytes(gzip.compress(json.dumps(GOOD).encode() + b"\n") * 2)
    assert len(read_landed_file(two).frame) == 2
    cut = tmp_path / "cut.ndjson.gz"
    cut.write_bytes(gzip.compress(json.dumps(GOOD).encode() * 50)[:-30])
    assert refused(cut) == "unreadable_file"
    junk = tmp_path / "junk.ndjson.gz"
    junk.write_bytes(b"\x1f\x8bnot really gzip")
    assert refused(junk) == "unreadable_file"
    latin = tmp_path / "latin.ndjson"
    latin.write_bytes(b'{"metric":"m\xe9","ts":1,"value":1}\n')
    assert refused(latin) == "unreadable_file"


def test_read_bounded_streams_compressed_input_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    inflater = zlib.compressobj(1, zlib.DEFLATED, 31)
    line = b"a" * 99 + b"\n"
    path.write_bytes(inflater.compress(line * 100_000) + inflater.flush())
    assert read_bounded(path, None, ReadLimits()) == line * 100_000


def test_parquet_bounds_and_a_list_value_is_invalid_value(tmp_path: Path) -> None:
    lists = tmp_path / "l.parquet"
    table = pa.table(
        {"metric": ["m", "m"], "ts": [1_700_000_000, 1_700_000_001], "value": [[1.0], None]}
    )
    pq.write_table(table, lists)
    decoded = read_landed_file(lists)
    assert [reason for _, reason in decoded.rejected] == ["invalid_value"]
    assert decoded.rejected[0][0]["value"] == [1.0]
    assert len(decoded.frame) == 1
    deep_type: pa.DataType = pa.float64()
    for _ in range(10):
        deep_type = pa.list_(deep_type)
    deep = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"metric": pa.array(["m"]), "value": pa.array([None], deep_type)}), deep
    )
    assert refused(deep, SMALL) == "too_deep"
    big = tmp_path / "b.parquet"
    pd.DataFrame({"metric": ["m"] * 5000, "ts": range(5000), "value": 1.0}).to_parquet(big)
    assert refused(big, SMALL) == "too_large"


def test_cli_ingest_of_a_deep_file_is_one_error_line_and_the_rest_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_settings(monkeypatch, home=tmp_path / "home")
    monkeypatch.setenv("COLUMNS", "250")
    deep = tmp_path / "deep.ndjson"
    deep.write_text('{"metric":"n","labels":{"a":' + "[" * 2000 + "]" * 2000 + "}}\n")
    good = ndjson(tmp_path / "good.ndjson", {**GOOD, "ts": "2024-05-01T00:00:00Z"})
    result = CliRunner().invoke(app, ["ingest", str(deep), str(good)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {deep}: deep.ndjson: JSON nested deeper than 32 levels "
        "(METRICMILL_MAX_NESTING_DEPTH)"
    ]
    assert "good.ndjson" in result.stdout
    assert read_samples_file(good)["value"].tolist() == [1.0]


# -- memory: each hostile file in its own process, its peak RSS measured -----------------------
_MEASURE = """
import resource, sys
from pathlib import Path
from storage.readers import read_landed_file, UnreadableFile
path = Path(sys.argv[1])
data = path.read_bytes() if sys.argv[2] == "data" else None
try:
    read_landed_file(path, data=data)
    outcome = "read"
except UnreadableFile as exc:
    outcome = exc.reason
print(outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def peak_rss_mb(path: Path, data: bool) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), "data" if data else "path"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    reason, rss = done.stdout.split()
    return reason, int(rss)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    files: dict[str, Path] = {}
    bomb = root / "zeros.ndjson.gz"  # 1 GiB of zeros in about 1 MB
    with bomb.open("wb") as out:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = b"\0" * (1 << 20)
        for _ in range(1024):
            out.write(packer.compress(block))
        out.write(packer.flush())
    files["gzip_bomb"] = bomb
    empties = root / "empties.ndjson.gz"  # ten million `{}` lines in about 30 KB
    with gzip.open(empties, "wb", compresslevel=9) as out:
        for _ in range(100):
            out.write(b"{}\n" * 100_000)
    files["ten_million_empty_objects"] = empties
    deep = root / "deep.ndjson"
    deep.write_text('{"metric":"n","labels":{"a":' + "[" * 2000 + "]" * 2000 + '},"ts":1}\n')
    files["deep_nesting"] = deep
    return files


@pytest.mark.parametrize("case", ["gzip_bomb", "ten_million_empty_objects", "deep_nesting"])
@pytest.mark.parametrize("data", [False, True], ids=["path", "bytes"])
def test_peak_memory_of_a_hostile_file_stays_bounded(
    hostile: dict[str, Path], case: str, data: bool
) -> None:
    reason, rss = peak_rss_mb(hostile[case], data)
    expected = {
        "gzip_bomb": "line_too_long",
        "ten_million_empty_objects": "too_many_bad_lines",
        "deep_nesting": "too_deep",
    }
    assert reason == expected[case]
    assert rss < 1500, f"{case}: peak RSS {rss} MB"
