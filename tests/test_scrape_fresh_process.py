"""A scrape as `metricmill serve` runs it: the `ingest` flow in a process of its own, against the
session's Prefect API, scraping a loopback target. The scrape's batch goes through the
ingest-batch contract (bad samples quarantined with their reason) without Great Expectations
being imported in that process: importing it and building its context cost seconds per run."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from metricmill.settings import load_settings
from storage.store import Store

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = Path(__file__).resolve().parents[1]
LONG = "x" * 30  # over the child's max_label_value_length of 20

CHILD = """
import asyncio, json, sys
from flows.ingest import ingest
rows = asyncio.run(ingest(landing=False, scrape=True))
print(json.dumps({"rows": rows, "gx_imported": "great_expectations" in sys.modules}))
"""


@pytest.fixture
def target() -> Iterator[str]:
    future_ms = int((datetime.now(UTC) + timedelta(days=2)).timestamp() * 1000)
    body = (
        "# TYPE fresh_up gauge\n"
        'fresh_up{role="a"} 1\n'
        'fresh_up{role="b"} 2\n'
        f'fresh_up{{role="{LONG}"}} 3\n'
        "# TYPE fresh_stamped gauge\n"
        f"fresh_stamped 5 {future_ms}\n"
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        thread.join()


def test_a_served_scrape_checks_its_batch_without_importing_great_expectations(
    target: str, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    assert api, "the session's Prefect server has no URL"
    url = f"sqlite:///{tmp_path}/metrics.db"
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("METRICMILL_") and not k.startswith("METRICMILL_REQUIRE_"))
    }
    env |= {
        "PREFECT_API_URL": str(api),
        "METRICMILL_HOME": str(tmp_path),
        "METRICMILL_DATABASE_URL": url,
        "METRICMILL_SCRAPE_TARGETS": json.dumps([target]),
        "METRICMILL_MAX_LABEL_VALUE_LENGTH": "20",
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["gx_imported"] is False
    [row] = result["rows"]
    assert row["source"] == f"scrape:{target}"
    assert (row["rows_in"], row["written"], row["error"]) == (4, 2, "")
    assert row["quarantined"] == "label_value_too_long: 1, timestamp_in_future: 1"

    settings = load_settings(database_url=url, home=tmp_path)
    with Store.open(settings=settings) as store:
        stored = store.query("fresh_up", None, datetime(2000, 1, 1, tzinfo=UTC), None)
        quarantined = store.quarantine()
    assert sorted(labels["role"] for labels in stored["labels"]) == ["a", "b"]
    assert sorted(quarantined["reason"]) == ["label_value_too_long", "timestamp_in_future"]
