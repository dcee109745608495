"""Notifications through Prefect blocks saved on a real Prefect server, to a real local HTTP
server and a real SMTP server: retries, timeouts, 4xx, repeats, silences, events."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect_email import EmailServerCredentials
from pydantic import SecretStr
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.settings import Settings, load_settings
from storage import alerts as db
from storage.store import Store
from tasks.alerting import process_scores
from tasks.notify import NotificationConfigError, send_test
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings
from tests.test_alerting import T0, _store_series, scores_frame

pytestmark = pytest.mark.usefixtures("prefect_server")

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
LINK = "http://prefect.example/runs/flow-run/1234"


class Hook:
    """A webhook peer: per path, a script of responses (a status code or "hang")."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[int | str]] = {}
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for p, body in self.received if p == path]


@pytest.fixture
def hook() -> Iterator[tuple[Hook, str]]:
    peer = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            with peer.lock:
                peer.received.append((self.path, body))
                script = peer.scripts.get(self.path, [])
                action = script.pop(0) if script else 200
            if action == "hang":
                time.sleep(2.0)
                action = 200
            try:
                self.send_response(int(action))
                self.end_headers()
                self.wfile.write(b"scripted")
            except OSError:  # the client gave up (timeout) and closed the connection
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode()))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def _settings(url: str, tmp_path: Path, blocks: list[str], **extra: Any) -> Settings:
    base: dict[str, Any] = {
        "database_url": url,
        "home": tmp_path,
        "alert_for_seconds": 0,
        "alert_keep_firing_for_seconds": 120,
        "notification_blocks": blocks,
        "notify_retries": 3,
        "notify_backoff_seconds": 0.05,
        "notify_timeout_seconds": 2.0,
        "notify_email_to": ["oncall@example.com"],
    }
    return load_settings(**(base | extra))


def _notifications(url: str, timescaledb: str = "off") -> list[tuple[Any, ...]]:
    with Store.open(url, timescaledb=timescaledb) as store:  # type: ignore[arg-type]
        return store.backend.execute(
            "SELECT alert_id, channel, event, attempts, outcome, error FROM notifications "
            "ORDER BY id"
        )


def _save_custom(base: str, name: str, timeout: float = 5.0) -> str:
    CustomWebhookNotificationBlock(
        name=name,
        url=f"{base}/{name}",
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
        timeout=timeout,
        headers=None,
        cookies=None,
    ).save(name, overwrite=True)
    return f"custom-webhook/{name}"


def test_500_500_200_is_one_delivery_recorded_as_sent(
    db_target: DbTarget, hook: tuple[Hook, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    peer, base = hook
    isolate_settings(monkeypatch)
    channel = _save_custom(base, "mm-flaky")
    peer.scripts["/mm-flaky"] = [500, 500, 200]
    (sid,) = _store_series(db_target.url, db_target.timescaledb, ["a"])
    settings = _settings(db_target.url, tmp_path, [channel], timescaledb=db_target.timescaledb)
    summary = process_scores(settings, scores_frame({sid: [0.1, 0.8]}), flow_run_url=LINK, now=NOW)
    assert summary.fired == 1
    assert len(peer.bodies("/mm-flaky")) == 3
    (alert_id,) = {a for a, *_ in _notifications(db_target.url, db_target.timescaledb)}
    assert _notifications(db_target.url, db_target.timescaledb) == [
        (alert_id, channel, "firing", 3, "sent", None)
    ]
    body = peer.bodies("/mm-flaky")[-1]
    assert body["subject"] == '[metricmill] FIRING warning: cpu{host="a"}'
    for part in (
        "value: 8",
        "expected: 0 [-1 .. 1]",
        "score: 0.8",
        LINK,
        "since: 2023-11-14T22:14:20Z",
    ):
        assert part in body["text"]


def test_timeouts_and_4xx_neither_block_other_channels_nor_lose_the_alert(
    hook: tuple[Hook, str],
    smtp: tuple[Mailbox, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    peer, base = hook
    box, port = smtp
    isolate_settings(monkeypatch)
    hanging = _save_custom(base, "mm-hang", timeout=0.3)
    peer.scripts["/mm-hang"] = ["hang", "hang"]
    SlackWebhook(url=SecretStr(f"{base}/mm-slack")).save("mm-slack", overwrite=True)
    peer.scripts["/mm-slack"] = [404]
    EmailServerCredentials(smtp_server="127.0.0.1", smtp_type="INSECURE", smtp_port=port).save(
        "mm-mail", overwrite=True
    )
    channels = [hanging, "slack-webhook/mm-slack", "email-server-credentials/mm-mail"]
    url = f"sqlite:///{tmp_path}/m.db"
    (sid,) = _store_series(url, "off", ["a"])
    settings = _settings(url, tmp_path, channels, notify_retries=1)
    process_scores(settings, scores_frame({sid: [0.9]}), now=NOW)

    outcomes = {row[1]: row[2:] for row in _notifications(url)}
    assert outcomes[hanging][:3] == ("firing", 2, "failed")
    assert "timed out" in outcomes[hanging][3]
    assert outcomes["slack-webhook/mm-slack"][:3] == ("firing", 1, "rejected")
    assert "HTTP 404" in outcomes["slack-webhook/mm-slack"][3]
    assert outcomes["email-server-credentials/mm-mail"] == ("firing", 1, "sent", None)
    assert len(peer.bodies("/mm-slack")) == 1  # a 4xx is never retried
    assert "FIRING critical" in peer.bodies("/mm-slack")[0]["text"]
    assert [rcpt for rcpt, _ in box.messages] == [["oncall@example.com"]]
    assert 'cpu{host="a"}' in box.messages[0][1]
    with Store.open(url) as store:
        assert db.list_alerts(store.backend, status="open")["alert_id"].tolist() == [1]

    # The next run re-sends to the channel that never got it; the 4xx one waits for a repeat.
    peer.scripts["/mm-hang"] = [200]
    process_scores(settings, scores_frame({sid: []}), now=NOW + timedelta(minutes=5))
    latest = _notifications(url)[3:]
    assert latest == [(1, hanging, "repeat", 1, "sent", None)]


def test_repeats_wait_for_the_interval_and_stop_once_acknowledged(
    hook: tuple[Hook, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    peer, base = hook
    isolate_settings(monkeypatch)
    channel = _save_custom(base, "mm-repeat")
    url = f"sqlite:///{tmp_path}/m.db"
    a, b = _store_series(url, "off", ["a", "b"])
    settings = _settings(url, tmp_path, [channel], alert_repeat_interval_seconds=3600)
    process_scores(settings, scores_frame({a: [0.9], b: [0.9]}), now=NOW)
    process_scores(settings, scores_frame({}), now=NOW + timedelta(minutes=59))
    assert [row[2] for row in _notifications(url)] == ["firing", "firing"]
    with Store.open(url) as store:
        db.set_status(store.backend, 2, status="acknowledged", now_us=T0, incident=False)
    process_scores(settings, scores_frame({}), now=NOW + timedelta(minutes=61))
    assert [row[:3] for row in _notifications(url)][2:] == [(1, channel, "repeat")]
    later = scores_frame({a: [0.9, 0.1, 0.1, 0.1], b: [0.9, 0.1, 0.1, 0.1]})
    summary = process_scores(settings, later, now=NOW + timedelta(minutes=62))
    assert summary.resolved == 2
    assert [row[:3] for row in _notifications(url)][3:] == [
        (1, channel, "resolved"),
        (2, channel, "resolved"),
    ]
    assert "RESOLVED" in peer.bodies("/mm-repeat")[-1]["subject"]


def test_silenced_alerts_are_recorded_but_not_sent(
    hook: tuple[Hook, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    peer, base = hook
    isolate_settings(monkeypatch)
    channel = _save_custom(base, "mm-silence")
    url = f"sqlite:///{tmp_path}/m.db"
    a, b = _store_series(url, "off", ["a", "b"])
    now_us = round(NOW.timestamp() * 1e6)
    with Store.open(url) as store:
        silence = db.add_silence(
            store.backend,
            matcher='cpu{host="a"}',
            starts_us=now_us - 1,
            ends_us=now_us + 3_600_000_000,
            comment="maintenance",
        )
    settings = _settings(url, tmp_path, [channel])
    summary = process_scores(settings, scores_frame({a: [0.9], b: [0.9]}), now=NOW)
    assert (summary.fired, summary.silenced) == (2, 1)
    with Store.open(url) as store:
        alerts = {r["series_id"]: r for r in db.list_alerts(store.backend).to_dict("records")}
    assert alerts[a]["silence_id"] == silence and pd_isna(alerts[b]["silence_id"])
    rows = {(r[0], r[4]) for r in _notifications(url)}
    assert rows == {(alerts[a]["alert_id"], "silenced"), (alerts[b]["alert_id"], "sent")}
    assert [body["subject"] for body in peer.bodies("/mm-silence")] == [
        '[metricmill] FIRING critical: cpu{host="b"}'
    ]
    # Once the silence has ended, the still-firing alert is sent (and b repeats after 4h).
    process_scores(settings, scores_frame({}), now=NOW + timedelta(hours=5))
    subjects = sorted(body["subject"] for body in peer.bodies("/mm-silence")[1:])
    assert subjects == [
        '[metricmill] STILL FIRING critical: cpu{host="a"}',
        '[metricmill] STILL FIRING critical: cpu{host="b"}',
    ]


def pd_isna(value: Any) -> bool:
    return value is None or value != value


def test_a_missing_block_fails_before_anything_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    isolate_settings(monkeypatch)
    url = f"sqlite:///{tmp_path}/m.db"
    (sid,) = _store_series(url, "off", ["a"])
    settings = _settings(url, tmp_path, ["slack-webhook/no-such-block"])
    with pytest.raises(NotificationConfigError, match="no-such-block"):
        process_scores(settings, scores_frame({sid: [0.9]}), now=NOW)
    with Store.open(url) as store:
        assert store.backend.execute("SELECT count(*) FROM alerts")[0][0] == 0
        assert store.backend.execute("SELECT count(*) FROM alert_state")[0][0] == 0


def test_transitions_are_emitted_as_prefect_events(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    isolate_settings(monkeypatch)
    url = f"sqlite:///{tmp_path}/m.db"
    (sid,) = _store_series(url, "off", ["events"])
    settings = _settings(url, tmp_path, [], alert_keep_firing_for_seconds=60)
    started = datetime.now(UTC)
    summary = process_scores(settings, scores_frame({sid: [0.9, 0.1]}), flow_run_url=LINK)
    assert summary.events_emitted == 2
    EventsWorker.drain_all()
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        response = httpx.post(
            f"{PREFECT_API_URL.value()}/events/filter",
            json={
                "filter": {
                    "event": {"prefix": ["metricmill.alert."]},
                    "resource": {"id": [f"metricmill.alert.{summary.transitions['alert_id'][0]}"]},
                    "occurred": {"since": started.isoformat()},
                },
                "limit": 10,
            },
        )
        response.raise_for_status()
        seen = {e["event"]: e for e in response.json()["events"]}
        time.sleep(0.5)
    assert set(seen) == {"metricmill.alert.firing", "metricmill.alert.resolved"}
    firing = seen["metricmill.alert.firing"]
    assert firing["payload"]["series_id"] == sid and firing["payload"]["flow_run"] == LINK
    assert firing["resource"]["metricmill.metric"] == "cpu"


def test_notify_test_sends_through_a_named_block(
    hook: tuple[Hook, str],
    smtp: tuple[Mailbox, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    peer, base = hook
    box, port = smtp
    isolate_settings(monkeypatch, home=tmp_path, notify_email_to='["me@example.com"]')
    channel = _save_custom(base, "mm-test")
    result = CliRunner().invoke(app, ["notify", "test", channel])
    assert result.exit_code == 0, result.output
    assert peer.bodies("/mm-test")[0]["subject"] == "[metricmill] test notification"
    missing = CliRunner().invoke(app, ["notify", "test", "slack-webhook/not-registered"])
    assert missing.exit_code == 1
    assert missing.output.strip().startswith("error: notification block")
    EmailServerCredentials(smtp_server="127.0.0.1", smtp_type="INSECURE", smtp_port=port).save(
        "mm-test-mail", overwrite=True
    )
    delivery = send_test(
        load_settings(notify_email_to=["me@example.com"]), "email-server-credentials/mm-test-mail"
    )
    assert (delivery.outcome, delivery.attempts) == ("sent", 1)
    assert box.messages[0][0] == ["me@example.com"]
    assert "Subject: [metricmill] test notification" in box.messages[0][1]


def test_inside_a_flow_run_the_open_alerts_are_published_as_an_artifact(
    hook: tuple[Hook, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    peer, base = hook
    isolate_settings(monkeypatch)
    channel = _save_custom(base, "mm-flow")
    url = f"sqlite:///{tmp_path}/m.db"
    (sid,) = _store_series(url, "off", ["flow"])
    settings = _settings(url, tmp_path, [channel])

    @flow(name="alerts-in-a-flow")
    def run_rules() -> tuple[int, str | None]:
        from prefect.runtime import flow_run

        summary = process_scores(settings, scores_frame({sid: [0.9]}), now=NOW)
        return summary.open_alerts, flow_run.id

    with temporary_settings({PREFECT_UI_URL: "http://ui.example/api-less"}):
        open_alerts, run_id = run_rules()
    assert open_alerts == 1
    body = peer.bodies("/mm-flow")[0]["text"]
    assert f"flow run: http://ui.example/api-less/runs/flow-run/{run_id}" in body
    response = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={
            "artifacts": {"key": {"any_": ["alerts-open"]}, "flow_run_id": {"any_": [run_id]}},
            "limit": 10,
            "offset": 0,
            "sort": "CREATED_DESC",
        },
    )
    response.raise_for_status()
    (artifact,) = response.json()
    assert artifact["type"] == "table" and artifact["description"] == "1 open alert(s)"
    (entry,) = (
        json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
    )
    assert entry["series"] == 'cpu{host="flow"}' and entry["status"] == "firing"


def test_notify_test_without_a_name_tries_every_configured_block_quietly(
    hook: tuple[Hook, str], tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    peer, base = hook
    first, second = _save_custom(base, "mm-all-1"), _save_custom(base, "mm-all-2")
    peer.scripts["/mm-all-2"] = [400]  # a permanent refusal: reported, exit 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRICMILL_", "PREFECT_"))}
    env |= {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "METRICMILL_HOME": str(tmp_path / "home"),
        "METRICMILL_NOTIFICATION_BLOCKS": json.dumps([first, second]),
    }
    cli = Path(sys.executable).with_name("metricmill")
    done = subprocess.run(
        [str(cli), "notify", "test"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"{first}: test message sent (1 attempt(s))"]
    assert done.stderr.splitlines() == [
        f"error: {second}: rejected after 1 attempt(s): HTTP 400: scripted"
    ], done.stderr
    assert peer.bodies("/mm-all-1")[0]["subject"] == "[metricmill] test notification"
    assert len(peer.bodies("/mm-all-2")) == 1
