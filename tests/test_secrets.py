"""Passwords never leave: one masking function, password-free flow parameters, and a canary
password looked for in every command's output, the logs, the artifacts and the Prefect API."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.devtools.pgcluster import PgCluster
from metricmill.secrets import redact, remember, split_password
from metricmill.settings import load_settings, normalise_database_url
from tests.settings_env import isolate_settings

# A password with every character that confuses a URL: @, /, #, and a blank-free tail.
CANARY = "Cn4ry-Pa@ss/wo#rd-q7Z"
CANARY_FORMS = (CANARY, quote(CANARY, safe=""), "Cn4ry-Pa", "wo#rd-q7Z")


def leaked(text: str) -> list[str]:
    return [form for form in CANARY_FORMS if form in text]


# -- the masking function ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:PW-secret@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u@h/db?password=PW-secret", "postgresql://u@h/db?password=***"),
        ("postgresql://u@h/db?sslmode=x&password=PW-secret&a=1", "postgresql://u@h/db?sslmode=x&password=***&a=1"),
        ("host=h password=PW-secret dbname=d", "host=h password=*** dbname=d"),
        ("host=h password='PW secret' dbname=d", "host=h password=*** dbname=d"),
        ("postgresql://u:Pa@ss/wo#rd@h/db", "postgresql://u:***@h/db"),
        ("error: reaching postgres://x:y@h:5432/db", "error: reaching postgres://x:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)  # fmt: skip
def test_redact_masks_every_spelling_of_a_password(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_known_password_is_masked_in_driver_error_text() -> None:
    remember("sp ace-pw")
    message = 'invalid connection option "ace-pw" near "sp ace-pw"'
    assert "ace-pw" not in redact(message, ["ace-pw"])
    assert redact("password sp ace-pw rejected") == "password *** rejected"


def test_a_password_with_url_characters_is_a_password_not_a_host() -> None:
    url = normalise_database_url("postgresql://u:Pa@ss/wo#rd@h:5433/db")
    assert url == "postgresql://u:Pa%40ss%2Fwo%23rd@h:5433/db"
    assert split_password(url) == ("postgresql://u@h:5433/db", "Pa@ss/wo#rd")
    assert split_password("postgresql://u@h/db?password=x%20y&sslmode=disable") == (
        "postgresql://u@h/db?sslmode=disable",
        "x y",
    )


def test_the_password_comes_from_the_environment_when_the_url_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    isolate_settings(monkeypatch, home=tmp_path, database_password=CANARY)
    settings = load_settings(database_url="postgresql://u@h:5/db")
    assert settings.database_url == f"postgresql://u:{quote(CANARY, safe='')}@h:5/db"
    assert not leaked(settings.masked_database_url)
    assert not leaked(repr(settings))


def test_log_records_are_masked_when_made(caplog: pytest.LogCaptureFixture) -> None:
    remember(CANARY)
    logger = logging.getLogger("metricmill.test")
    with caplog.at_level(logging.INFO, logger="metricmill.test"):
        logger.info("connecting to %s", f"postgresql://u:{CANARY}@h/db")
        try:
            raise RuntimeError(f"driver said: password {CANARY} is wrong")
        except RuntimeError:
            logger.exception("failed")
    assert not leaked(caplog.text)
    assert "postgresql://u:***@h/db" in caplog.text


# -- the canary: every command, the logs, the artifacts, the Prefect API ----------------------
T = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


def _api_json(path: str) -> str:
    """Every object the Prefect API lists at `path` (a /filter endpoint), as JSON text."""
    from prefect.client.orchestration import get_client

    found: list[Any] = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            response = client.request("POST", path, json={"limit": 200, "offset": offset})
            page = response.json()
            found.extend(page)
            if len(page) < 200:
                break
            offset += 200
    return json.dumps(found)


@pytest.mark.usefixtures("prefect_server")
def test_canary_password_appears_nowhere(
    pg_cluster: PgCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from prefect.blocks.system import Secret

    home = tmp_path / "home"
    isolate_settings(monkeypatch, home=home, settle_seconds=0)
    monkeypatch.setenv("COLUMNS", "250")
    dbname = "canary"
    pg_cluster.create_database(dbname)
    plain = pg_cluster.url(dbname)  # postgresql://USER@HOST:PORT/canary (trust authentication)
    user, _, rest = plain.removeprefix("postgresql://").partition("@")
    with_password = f"postgresql://{user}:{CANARY}@{rest}"  # unencoded, as a user types it
    port = rest.split(":")[1].split("/")[0]
    sample = {"metric": "canary_m", "labels": {"h": "a"}, "ts": T.isoformat(), "value": 1.0}
    good = tmp_path / "good.ndjson"
    good.write_text(json.dumps(sample) + "\n")
    quarantine = home / "quarantine"
    quarantine.mkdir(parents=True)
    (quarantine / "bad.ndjson").write_text(json.dumps({**sample, "value": 2.0}) + "\n")
    (quarantine / "bad.ndjson.reason").write_text("unreadable_file\nfixed since\n")
    window = [
        "--start",
        (T - timedelta(hours=1)).isoformat(),
        "--end",
        datetime.now(UTC).isoformat(),
    ]
    runner = CliRunner()
    commands: list[list[str]] = [
        ["init"],
        ["ingest", str(good)],
        ["query", "canary_m", *window, "--format", "json"],
        ["query", "canary_m", *window],
        ["series"],
        ["stats"],
        ["health"],
        ["export", "canary_m", "--output", "canary.json", *window],
        ["quarantine", "list"],
        ["quarantine", "show", "bad.ndjson"],
        ["quarantine", "replay", "bad.ndjson"],  # runs the ingest flow: parameters, logs
        ["status"],
        ["doctor"],
        ["retention", "list"],
        ["retention", "preview"],
        ["alerts", "list"],
        ["archive", "list"],
    ]
    outputs: list[str] = []
    for command in commands:
        result = runner.invoke(app, ["--database", with_password, *command])
        outputs.append(f"$ {' '.join(command)}\n{result.output}{result.stderr}")
        assert "Traceback" not in result.output, (command, result.output)
    # The same password where the command fails, in a URL and in a keyword DSN.
    for database in (
        f"postgresql://{user}:{CANARY}@127.0.0.1:1/{dbname}",
        f"postgresql://{user}@127.0.0.1:1/{dbname}?password={quote(CANARY, safe='')}",
        f"host=127.0.0.1 port={port} password='{CANARY}' dbname={dbname}",
        f"postgresql://{user}:{CANARY}@127.0.0.1:{port}/no_such_db",
    ):
        result = runner.invoke(app, ["--database", database, "stats"])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr.startswith("error: "), result.stderr
        outputs.append(result.output + result.stderr)

    # The password from a Prefect Secret block, the URL without one.
    Secret(value=CANARY).save("metricmill-canary-db", overwrite=True)
    monkeypatch.setenv("METRICMILL_DATABASE_PASSWORD_BLOCK", "metricmill-canary-db")
    from_block = load_settings(database_url=plain)
    assert from_block.database_url == f"postgresql://{user}:{quote(CANARY, safe='')}@{rest}"
    result = runner.invoke(app, ["--database", plain, "stats"])
    assert result.exit_code == 0, result.output
    outputs.append(result.output)

    captured = capfd.readouterr()
    everything = "\n".join(outputs) + captured.out + captured.err
    assert "replay" in everything and "canary_m" in everything  # the commands did run
    assert not leaked(everything), [o for o in outputs if leaked(o)]
    for path in (home, tmp_path):
        for file in path.rglob("*"):
            if file.is_file() and file.suffix in (".json", ".ndjson", ".log", ".reason", ".toml"):
                assert not leaked(file.read_text(errors="replace")), file

    flow_runs = _api_json("/flow_runs/filter")
    assert '"database_url"' in flow_runs  # the replay's run is there, with its parameters
    assert f"postgresql://{user}@{rest}" in flow_runs  # the URL, less its password
    for path in ("/flow_runs/filter", "/task_runs/filter", "/logs/filter", "/artifacts/filter"):
        text = flow_runs if path == "/flow_runs/filter" else _api_json(path)
        assert not leaked(text), path
    pg_cluster.drop_database(dbname)
