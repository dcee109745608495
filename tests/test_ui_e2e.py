"""End to end in a real browser: `prefect server start`, `metricmill serve` against it, a deployment
run triggered through the Prefect API, and its page and artifact in headless Chromium.

Skipped when Chromium is missing, unless CI=true or METRICMILL_REQUIRE_CHROMIUM=1 (set by
.ci/run), which turn the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_required() -> bool:
    flags = (os.environ.get("CI", ""), os.environ.get("METRICMILL_REQUIRE_CHROMIUM", ""))
    return any(v.strip().lower() in {"1", "true", "yes", "on"} for v in flags)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        reason = "Chromium is not installed (Debian: apt-get install chromium)"
        if chromium_required():
            pytest.fail(f"{reason} [CI / METRICMILL_REQUIRE_CHROMIUM=1]", pytrace=False)
        pytest.skip(reason)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_")
        and not (k.startswith("METRICMILL_") and not k.startswith("METRICMILL_REQUIRE_"))
    }
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        # A session of its own, so the whole process tree can be stopped by its group id.
        return subprocess.Popen(
            args, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until(what: str, check: Any, timeout: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def get_json(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port, with its own PREFECT_HOME.

    One per module: starting it is the slow part, and each test waits for the deployment it
    needs to be registered afresh (`registered`), so sharing it changes no test's outcome.
    """
    tmp_path = tmp_path_factory.mktemp("prefect-api")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "prefect-server.log"
    env = clean_env(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_UI_API_URL=api,
        # Only the run this test triggers: no runs from the every-minute schedule.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start(args, env, log)
    try:
        wait_until("the Prefect server", lambda: get_json(f"{api}/health") is True, 150, log)
        yield api
    finally:
        stop(server)


def forget_deployment(api: str, name: str) -> None:
    """Delete the deployment `name` ("flow/deployment") from the server, if it is there."""
    found = get_json(f"{api}/deployments/name/{name}")
    if found:
        httpx.delete(f"{api}/deployments/{found['id']}", timeout=30).raise_for_status()
    assert get_json(f"{api}/deployments/name/{name}") is None, f"{name} is still registered"


def registered(api: str, name: str, process: subprocess.Popen[bytes], log: Path) -> Any:
    """The deployment `name` once `process` (a serve started after `forget_deployment`) has
    registered it; fails at once if that process exits first."""

    def check() -> Any:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"serve exited ({process.returncode}) before registering {name}\n{tail}")
        return get_json(f"{api}/deployments/name/{name}")

    return wait_until(f"metricmill serve to register {name}", check, 120, log)


def page_text(chromium: str, url: str, expected: list[str], profile: Path, timeout: float) -> str:
    """The rendered text of `url` once it shows every expected string (or at the timeout).

    Drives Chromium through its DevTools protocol: the Prefect UI is a single-page app that
    fills the page from API calls after load, which a one-shot --dump-dom does not wait for.
    """
    args = [chromium, *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}"]
    browser = subprocess.Popen(
        [*args, url], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert browser.stderr is not None
        port = None
        for line in browser.stderr:
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                port = int(found.group(1))
                break
        assert port is not None, "Chromium did not open its DevTools port"
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        text = ""
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            deadline = time.monotonic() + timeout
            request = 0
            while time.monotonic() < deadline:
                request += 1
                ws.send(
                    json.dumps(
                        {
                            "id": request,
                            "method": "Runtime.evaluate",
                            "params": {
                                "expression": "document.body ? document.body.innerText : ''",
                                "returnByValue": True,
                            },
                        }
                    )
                )
                reply = json.loads(ws.recv())
                while reply.get("id") != request:
                    reply = json.loads(ws.recv())
                text = reply["result"]["result"].get("value", "")
                if all(e in text for e in expected):
                    break
                time.sleep(0.5)
        return text
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()


def test_served_deployment_run_and_its_artifact_show_in_the_prefect_ui(
    chromium: str, prefect_api: str, tmp_path: Path
) -> None:
    serve_log = tmp_path / "serve.log"
    env = clean_env(PREFECT_API_URL=prefect_api)
    home = tmp_path / "home"
    forget_deployment(prefect_api, "ingest/every-minute")
    serve = start([str(BIN / "metricmill"), "--home", str(home), "serve"], env, serve_log)
    try:
        deployment = registered(prefect_api, "ingest/every-minute", serve, serve_log)
        assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"
        ts = (datetime.now(UTC) - timedelta(minutes=5)).replace(second=0, microsecond=0)
        samples = [
            {"metric": "e2e_up", "labels": {"host": "b"}, "ts": ts.isoformat(), "value": 1.0},
            {"metric": "e2e_up", "labels": {"host": "b"}, "ts": "not a time", "value": 1.0},
        ]
        parameters = {"samples": samples, "landing": False, "scrape": False}

        def create() -> httpx.Response | None:
            # A busy server (its SQLite shared with the runner's polls) may answer 503: retry.
            response = httpx.post(
                f"{prefect_api}/deployments/{deployment['id']}/create_flow_run",
                json={"parameters": parameters},
                timeout=30,
            )
            return None if response.status_code >= 500 else response

        created = wait_until("the API to create the run", create, 60, serve_log)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]

        def finished() -> dict[str, Any] | None:
            run = get_json(f"{prefect_api}/flow_runs/{run_id}")
            if run and run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                return dict(run)
            return None

        run = wait_until("the triggered run to finish", finished, 150, serve_log)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        run_name = run["name"]
        assert run_name == created.json()["name"]  # made by hand: keeps the name it was given
    finally:
        stop(serve)

    ui = prefect_api.removesuffix("/api")
    run_page = page_text(
        chromium, f"{ui}/runs/flow-run/{run_id}", [run_name, "Completed", "every-minute"],
        tmp_path / "chromium-run", timeout=60,
    )  # fmt: skip
    assert run_name in run_page
    assert "Completed" in run_page
    assert "every-minute" in run_page  # the deployment it ran from

    artifact_page = page_text(
        chromium, f"{ui}/artifacts/key/ingest-summary", ["ingest-summary", run_name],
        tmp_path / "chromium-artifact", timeout=60,
    )  # fmt: skip
    assert "ingest-summary" in artifact_page
    assert run_name in artifact_page  # the artifact's latest version is this run's


def test_custom_run_form_shows_every_parameter_description(
    chromium: str, prefect_api: str, tmp_path: Path
) -> None:
    serve_log = tmp_path / "serve.log"
    env = clean_env(PREFECT_API_URL=prefect_api)
    args = [str(BIN / "metricmill"), "--home", str(tmp_path / "home"), "serve", "--flow", "rollup"]
    forget_deployment(prefect_api, "rollup/every-5-minutes")
    serve = start(args, env, serve_log)
    try:
        deployment = registered(prefect_api, "rollup/every-5-minutes", serve, serve_log)
    finally:
        stop(serve)
    properties = deployment["parameter_openapi_schema"]["properties"]
    assert set(properties) == {"database_url", "home", "max_chunks"}
    # Optional parameters are plain inputs: no "or null" branch for the form to open.
    assert [properties[n].get("type") for n in ("database_url", "home", "max_chunks")] == [
        "string", "string", "integer",
    ]  # fmt: skip
    assert not any("anyOf" in p for p in properties.values())
    # A sentence of each description, as the form shows it (the UI joins the docstring lines).
    expected = [
        " ".join(properties[name]["description"].split())[:40] for name in sorted(properties)
    ]
    assert all(len(e) == 40 for e in expected)
    ui = prefect_api.removesuffix("/api")
    form = page_text(
        chromium, f"{ui}/deployments/deployment/{deployment['id']}/run", expected,
        tmp_path / "chromium-form", timeout=90,
    )  # fmt: skip
    shown = " ".join(form.split())
    for text in expected:
        assert text in shown, f"{text!r} not on the custom-run form:\n{form}"
    assert "max_chunks" in form
    # What the form showed under every optional field while they were "X or null".
    assert "Property is type" not in form, form
