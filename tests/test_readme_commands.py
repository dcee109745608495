"""Every example of README.md's command table, run as written against a demo home.

The examples that run until stopped (`serve`, `receive`) have tests of their own; the module's
fixture runs the demo itself (smaller than the table's example) to make the home.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shlex
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from tests.settings_env import isolate_settings

REPO = Path(__file__).resolve().parents[1]
RUN_ELSEWHERE = {
    "serve": "runs until stopped: tests/test_serve_signals.py runs it",
    "receive": "runs until stopped: tests/test_receive.py runs it",
    "demo": "this module's fixture runs it (smaller), tests/test_demo.py at the table's size",
}


def command_table() -> list[tuple[str, str]]:
    """(command, example) of each row of the README's command table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| command | does | example |") :].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, line
        command = cells[0].strip("`").split()[0]
        example = cells[2]
        assert example.startswith("`metricmill ") and example.endswith("`"), line
        rows.append((command, example[1:-1]))
    return rows


EXAMPLES = command_table()


def test_the_table_covers_every_command() -> None:
    listed = {command for command, _ in EXAMPLES}
    registered = {c.name for c in app.registered_commands if c.name} | {
        c.callback.__name__ for c in app.registered_commands if c.name is None and c.callback
    }
    registered |= {g.name for g in app.registered_groups if g.name}
    for group in app.registered_groups:  # ops_app, demo_app, ...: their commands at top level
        if group.name is None and group.typer_instance is not None:
            for command in group.typer_instance.registered_commands:
                name = command.name or (command.callback.__name__ if command.callback else "")
                registered.add(name)
    assert registered <= listed, f"missing from README's command table: {registered - listed}"


class _Peer(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        _Peer.received.append(json.loads(self.rfile.read(length) or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def demo_home(
    prefect_server: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """(home, working directory with the files the examples name) after `metricmill demo`."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    base = tmp_path_factory.mktemp("readme")
    home, work = base / "home", base / "work"
    work.mkdir()
    peer = ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    Thread(target=peer.serve_forever, daemon=True).start()
    with pytest.MonkeyPatch.context() as mp:
        isolate_settings(mp)
        mp.setenv("COLUMNS", "200")
        mp.chdir(work)
        done = CliRunner().invoke(app, ["demo", "--home", str(home), "--hosts", "2", "--days", "3"])
        assert done.exit_code == 0, done.output
        # A configured notification block for the notify example: a webhook peer on loopback.
        CustomWebhookNotificationBlock(
            name="readme",
            url=f"http://127.0.0.1:{peer.server_port}/readme",
            json_data={"subject": "{{subject}}", "text": "{{body}}"},
        ).save("readme", overwrite=True)
        mp.setenv("METRICMILL_NOTIFICATION_BLOCKS", '["custom-webhook/readme"]')
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        sample = {"metric": "readme_up", "labels": {"host": "web-01"}, "value": 1}
        (work / "a.ndjson").write_text(
            json.dumps(sample | {"ts": (now - timedelta(minutes=3)).isoformat()}) + "\n"
        )
        with gzip.open(work / "b.csv.gz", "wt") as f:
            f.write("metric,timestamp,value,host\n")
            f.write(f"readme_up,{(now - timedelta(minutes=2)).isoformat()},1,web-02\n")
        with (work / "latency.csv").open("w") as f:  # four days of 5-minute points
            f.write("timestamp,value\n")
            start = now - timedelta(days=4)
            for i in range(4 * 288):
                value = 0.2 + 0.05 * math.sin(2 * math.pi * i / 288) + (0.5 if i == 1000 else 0)
                f.write(f"{(start + timedelta(minutes=5 * i)).isoformat()},{value:.4f}\n")
        yield home, work
    peer.shutdown()


@pytest.mark.parametrize(
    "command,example", EXAMPLES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(EXAMPLES)]
)
def test_readme_example_runs_against_a_demo_home(
    demo_home: tuple[Path, Path], command: str, example: str
) -> None:
    if command in RUN_ELSEWHERE:
        pytest.skip(f"`{command}` {RUN_ELSEWHERE[command]}")
    home, work = demo_home
    args = shlex.split(example)[1:]
    result = CliRunner().invoke(app, ["--home", str(home), *args])
    output = result.output
    assert result.exit_code == 0, f"{example}\n{output}"
    assert output.strip(), example
    assert "error:" not in output and "Traceback" not in output, output
    if command == "notify":
        assert _Peer.received and "test notification" in _Peer.received[-1]["subject"]
    if command == "export":
        assert (home / "exports" / "cpu" / "day.parquet").stat().st_size > 0
    if command == "backtest":
        assert (work / "scores.csv").read_text().count("\n") == 4 * 288 + 1
    if command == "query":
        assert "cpu_usage_percent" in output and "web-01" in output
