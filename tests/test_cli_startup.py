"""Commands that need no flow start without importing Prefect, Great Expectations or PyOD."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("prefect", "great_expectations", "pyod")
# Listed too, as a control: every command loads pandas, so a probe that misses it is broken.
WATCHED = (*HEAVY, "pandas")

# Runs one command in this interpreter, then prints which heavy packages it loaded.
PROBE = """
import json, sys
from metricmill.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.stdin.read())))
print("LOADED " + json.dumps(heavy))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("startup") / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRICMILL_")}
    env["METRICMILL_HOME"] = str(home)
    # status looks for a Prefect API; a profile or variable of the caller's must not matter.
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(home.parent / "prefect")
    samples = home.parent / "up.ndjson"
    samples.write_text(json.dumps({"metric": "up", "labels": {}, "ts": 1767225600, "value": 1}))
    assert probe(env, "ingest", str(samples)) == ["pandas"]
    return env


def probe(env: dict[str, str], *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        input=json.dumps(WATCHED),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED "))
    loaded: list[str] = json.loads(line.removeprefix("LOADED "))
    return loaded


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("stats",),
        ("status",),
        ("series",),
        ("query", "up", "--start", "2026-01-01T00:00:00Z", "--end", "2026-01-01T00:01:00Z"),
        ("alerts", "list"),
        ("quarantine", "list"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_command_imports_no_prefect_gx_or_pyod(env: dict[str, str], args: tuple[str, ...]) -> None:
    assert probe(env, *args) == ["pandas"]
