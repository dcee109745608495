"""CLI start-up benchmark: `metricmill stats` on a small database against `import pandas`.

    uv run python benchmarks/cli_startup.py [--repeat 7]

A fresh home with a SQLite database of 2 series x 60 samples (written by `metricmill ingest`).
Each repeat runs both commands as new processes, in alternating order: `metricmill stats` (the
installed console script) and `python -c "import pandas"` (the floor every command pays: the
CLI prints pandas frames). Prints the medians and `RATIO cli_startup_vs_python <x>`: the median
`stats` time over the median `import pandas` time (goal <= 2). Commands that need no flow
import neither Prefect, Great Expectations nor PyOD (tests/test_cli_startup.py checks that).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import log, ratio_line


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    script = Path(sys.executable).with_name("metricmill")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "metricmill.cli"]
    with tempfile.TemporaryDirectory(prefix="mm-cli-startup-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METRICMILL_")}
        env["METRICMILL_HOME"] = str(Path(tmp) / "home")
        samples = Path(tmp) / "samples.ndjson"
        with samples.open("w") as f:
            for host in ("a", "b"):
                for minute in range(60):
                    ts = 1_767_225_600 + 60 * minute
                    line = {"metric": "cpu", "labels": {"host": host}, "ts": ts, "value": minute}
                    f.write(json.dumps(line) + "\n")
        subprocess.run([*cli, "ingest", str(samples)], env=env, check=True, capture_output=True)
        peers = {
            "metricmill stats": [*cli, "stats"],
            "python -c 'import pandas'": [sys.executable, "-c", "import pandas"],
        }
        times: dict[str, list[float]] = {name: [] for name in peers}
        for attempt in range(args.repeat):
            order = list(peers) if attempt % 2 == 0 else list(reversed(peers))
            for name in order:
                times[name].append(timed(peers[name], env))
            log(f"repeat {attempt + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in peers))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:<28} median {value:.2f} s over {args.repeat} runs")
    print(
        ratio_line(
            "cli_startup_vs_python",
            medians["metricmill stats"] / medians["python -c 'import pandas'"],
        )
    )


if __name__ == "__main__":
    main()
