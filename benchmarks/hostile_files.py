"""Hostile landed files: the peak memory and the time the reader spends before refusing each.

Run: uv run python benchmarks/hostile_files.py

Each file is read by `storage.readers.read_landed_file` at default settings in a fresh Python
process (its bytes passed in, as the ingest flow passes those of files under 64 MiB, and read
from the path), and the process's peak RSS is taken from getrusage. Prints one
`RATIO peak_rss_mb_<case>_<how> <MB>` line per case and way, and the seconds as
`RATIO refuse_seconds_<case>_<how> <s>`; the bound the README states is 1,500 MB.

1. gzip_bomb: 1 GiB of zero bytes gzipped (about 1 MB): no newline, so `line_too_long`.
2. empty_objects: ten million `{}` lines gzipped (about 30 KB): `too_many_bad_lines`.
3. deep_nesting: one NDJSON line nesting arrays 2,000 deep: `too_deep`.
4. huge_good: 256 MiB of valid short NDJSON samples (not hostile, for scale): read.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import format_table, log, ratio_line  # noqa: E402

_MEASURE = """
import resource, sys, time
from pathlib import Path
from storage.readers import read_landed_file, UnreadableFile
path = Path(sys.argv[1])
data = path.read_bytes() if sys.argv[2] == "bytes" else None
started = time.perf_counter()
try:
    outcome = f"read {len(read_landed_file(path, data=data).frame)} rows"
except UnreadableFile as exc:
    outcome = exc.reason
seconds = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(outcome.replace(" ", "_"), peak_mb, seconds)
"""


def build(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    bomb = root / "zeros.ndjson.gz"
    with bomb.open("wb") as out:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        for _ in range(1024):
            out.write(packer.compress(b"\0" * (1 << 20)))
        out.write(packer.flush())
    files["gzip_bomb"] = bomb
    empties = root / "empties.ndjson.gz"
    with gzip.open(empties, "wb", compresslevel=9) as out:
        for _ in range(100):
            out.write(b"{}\n" * 100_000)
    files["empty_objects"] = empties
    deep = root / "deep.ndjson"
    deep.write_text('{"metric":"n","labels":{"a":' + "[" * 2000 + "]" * 2000 + '},"ts":1}\n')
    files["deep_nesting"] = deep
    good = root / "good.ndjson"
    line = json.dumps({"metric": "m", "labels": {"h": "a"}, "ts": 1_700_000_000, "value": 1.5})
    block = ((line + "\n") * 10_000).encode()
    with good.open("wb") as out:
        while out.tell() < 256 << 20:
            out.write(block)
    files["huge_good"] = good
    return files


def main() -> None:
    rows = []
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        files = build(Path(tmp))
        for case, path in files.items():
            for how in ("bytes", "path"):
                log(f"{case} ({how}) ...")
                done = subprocess.run(
                    [sys.executable, "-c", _MEASURE, str(path), how],
                    capture_output=True, text=True, check=True, cwd=ROOT,
                )  # fmt: skip
                outcome, rss, seconds = done.stdout.split()
                rows.append([case, how, path.stat().st_size, outcome, rss, f"{float(seconds):.2f}"])
                ratios.append(ratio_line(f"peak_rss_mb_{case}_{how}", float(rss)))
                ratios.append(ratio_line(f"refuse_seconds_{case}_{how}", float(seconds)))
    print(format_table(["file", "given as", "bytes on disk", "outcome", "peak RSS MB", "s"], rows))
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
