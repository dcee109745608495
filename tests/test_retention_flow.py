"""The `retention` flow and its artifact, the retention/archive CLI, and the seed-001 calls."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import Artifact
from pydantic import TypeAdapter
from typer.testing import CliRunner, Result

from flows.retention import retention
from metricmill.cli import app
from metricmill.storage_system import create_metrics_storage_system
from storage.archive import manifest
from storage.retention import add_rule, list_rules
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.retention_data import (
    DAYS,
    PER_DAY,
    SERIES,
    cutoff,
    expected_rows,
    filled_store,
    make_settings,
    remaining,
)

pytestmark = pytest.mark.usefixtures("prefect_server")
CPU1, CPU2, MEM = SERIES
runner = CliRunner()


def artifact(flow_run_id: UUID) -> Artifact:
    artifact_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=["retention-summary"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
    )
    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": artifact_filter.model_dump(mode="json", exclude_unset=True)},
        )
    found = TypeAdapter(list[Artifact]).validate_python(response.json())
    assert len(found) == 1
    return found[0]


def flow_run_name(flow_run_id: UUID) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


def test_retention_flow_archives_deletes_and_reports_per_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget
) -> None:
    if db_target.name == "timescaledb":
        pytest.skip("the flow is backend-blind; TimescaleDB is covered in test_retention")
    settings = make_settings(monkeypatch, tmp_path / "home", db_target, retention_days=30)
    with filled_store(settings) as store:
        add_rule(store.backend, "container_cpu_*", 7, priority=1)
        add_rule(store.backend, "container_cpu_usage", labels={"host": "host_2"}, legal_hold=True)
    home = str(settings.home)

    dry = retention(home=home, database_url=settings.database_url, dry_run=True, return_state=True)
    assert dry.is_completed()
    with Store.open(settings=settings) as store:
        assert len(remaining(store, *CPU1)) == DAYS * PER_DAY

    state = retention(home=home, database_url=settings.database_url, return_state=True)

    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    assert flow_run_name(run_id).startswith("retention-") and flow_run_name(run_id).endswith(
        run_id.hex[-6:]
    )  # a direct call (flows/naming.py)
    table = artifact(run_id).data
    rows = json.loads(table) if isinstance(table, str) else table
    by_rule = {r["rule"]: r for r in rows if r["kind"] == "rule" and r["level"] == "raw"}
    cpu_old = len(expected_rows(*CPU1)[expected_rows(*CPU1)["ts"] < cutoff(7)])
    rule = by_rule["#1 container_cpu_*"]
    assert (rule["deleted"], rule["archived"], rule["held"]) == (cpu_old, cpu_old, cpu_old)
    files = [r for r in rows if r["kind"] == "file"]
    with Store.open(settings=settings) as store:
        listed = manifest(store.backend)
        assert len(remaining(store, *CPU2)) == DAYS * PER_DAY  # held
        assert len(remaining(store, *CPU1)) == DAYS * PER_DAY - cpu_old
    assert sorted((f["file"], f["sha256"]) for f in files) == sorted(
        zip(listed["path"], listed["sha256"], strict=True)
    )
    for f in files:
        digest = hashlib.sha256((settings.archive / f["file"]).read_bytes()).hexdigest()
        assert digest == f["sha256"]


# -- CLI ------------------------------------------------------------------------------------
def cli(home: Path, *args: str) -> Result:
    return runner.invoke(app, ["--home", str(home), *args])


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = make_settings(monkeypatch, tmp_path / "home", target, retention_days=30)
    filled_store(settings).close()
    return settings.home


def test_cli_rules_preview_and_apply_that_asks_for_yes(home: Path) -> None:
    bad = cli(home, "retention", "add", "cpu[", "--days", "3")
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "error: bad glob 'cpu[': '[' without its ']'"
    assert cli(home, "retention", "add", "*", "--days", "5").exit_code == 0
    hold = cli(home, "retention", "add", "mem_*", "--legal-hold")
    assert hold.exit_code == 0, hold.output
    listed = cli(home, "retention", "list")
    assert "HOLD" in listed.stdout and "mem_*" in listed.stdout

    preview = cli(home, "retention", "preview")
    cpu_old = sum(
        DAYS * PER_DAY - int((expected_rows(*s)["ts"] >= cutoff(5)).sum()) for s in SERIES[:2]
    )
    assert f"samples: {cpu_old / (3 * DAYS * PER_DAY):.1%}" in preview.stdout

    refused = cli(home, "retention", "apply")
    assert refused.exit_code == 1
    assert "rerun with --yes" in refused.stderr
    assert f"samples {cpu_old / (3 * DAYS * PER_DAY):.0%}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    with Store.open(settings=_settings(home)) as store:
        assert len(remaining(store, *CPU1)) == DAYS * PER_DAY

    applied = cli(home, "retention", "apply", "--yes")
    assert applied.exit_code == 0, applied.output
    with Store.open(settings=_settings(home)) as store:
        assert len(remaining(store, *CPU1)) == DAYS * PER_DAY - cpu_old // 2
        assert len(remaining(store, *MEM)) == DAYS * PER_DAY
        rule_id = next(r.rule_id for r in list_rules(store.backend) if r.legal_hold)
    verified = cli(home, "archive", "verify")
    assert verified.exit_code == 0 and "0 problems" in verified.stdout
    assert cli(home, "retention", "remove", str(rule_id)).exit_code == 0
    assert cli(home, "retention", "remove", str(rule_id)).exit_code == 1


def _settings(home: Path) -> Any:
    from metricmill.settings import load_settings

    return load_settings(home=home)


def test_cli_anonymized_export_needs_a_key_and_refuses_dotdot(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICMILL_ANONYMIZE_LABELS", '["host", "container_id"]')
    args = ["archive", "export", "--start", "-60d", "--anonymize"]
    refused = cli(home, *args)
    assert refused.exit_code == 1 and "needs a key" in refused.stderr
    monkeypatch.setenv("METRICMILL_ANONYMIZE_KEY", "a-secret-key")
    outside = cli(home, *args, "--output", "../x.parquet")
    assert outside.exit_code == 1 and "contains '..'" in outside.stderr

    done = cli(home, *args, "--output", "anon.parquet", "--metric", "container_cpu_usage")

    assert done.exit_code == 0, done.output
    frame = pd.read_parquet(home / "exports" / "anon.parquet")
    assert len(frame) == 2 * DAYS * PER_DAY
    values = {v for labels in frame["labels"] for _, v in labels}
    assert values.isdisjoint({"host_1", "host_2", "ctr-alpha-0001", "ctr-bravo-0002"})


# -- seed 001 ---------------------------------------------------------------------------------
def test_seed_retention_calls(home: Path) -> None:
    async def main() -> dict[str, Any]:
        storage_system = create_metrics_storage_system(
            {"storage_type": "sqlite", "storage_config": {"db_path": str(home / "metrics.db")}}
        )
        await storage_system.initialize()
        try:
            # Add a retention rule
            storage_system.add_retention_rule(
                metric_pattern="container_cpu_*",
                retention_days=7,
                labels={"host": "host_1"},
                priority=10,
            )
            # Apply retention policy
            await storage_system.apply_retention_policy()
            # Get retention summary
            return storage_system.get_retention_summary()
        finally:
            await storage_system.cleanup()

    summary = asyncio.run(main())

    assert [r["metric_pattern"] for r in summary["rules"]] == ["container_cpu_*"]
    assert summary["defaults_days"]["raw"] == 30 and summary["defaults_days"]["1d"] is None
    runs = {r["rule"]: r for r in summary["last_run"]["rules"] if r["level"] == "raw"}
    old = int((expected_rows(*CPU1)["ts"] < cutoff(7)).sum())
    assert runs['#1 container_cpu_*{host="host_1"}']["deleted"] == old
    with Store.open(settings=_settings(home)) as store:
        assert len(remaining(store, *CPU1)) == DAYS * PER_DAY - old


def test_the_anonymization_key_can_come_from_a_prefect_secret_block(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.blocks.system import Secret

    from storage.archive import ArchiveError
    from tasks.retention import anonymization_key, anonymizer_for

    Secret(value="key-from-a-block").save("metricmill-test-anon-key", overwrite=True)
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/m.db", "off")
    settings = make_settings(
        monkeypatch, tmp_path, target, anonymize_key_block="metricmill-test-anon-key"
    )
    assert anonymization_key(settings) == b"key-from-a-block"
    assert anonymizer_for(settings).token("host_1") == anonymizer_for(settings).token("host_1")

    missing = make_settings(monkeypatch, tmp_path, target, anonymize_key_block="no-such-block")
    with pytest.raises(ArchiveError, match="no-such-block"):
        anonymization_key(missing)
