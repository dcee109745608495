"""The archive in object storage (archive_dir = s3://bucket/prefix) against a local S3 endpoint
(moto's server on 127.0.0.1): write, read back, verify, delete, manifest; include_archive
queries and `archive verify` there; compliance object lock; bad URLs and endpoints."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from botocore.exceptions import ClientError
from typer.testing import CliRunner, Result

from metricmill.cli import app
from metricmill.settings import Settings
from storage import retention
from storage.archive import ArchiveError, manifest, read_archive, retain_until, verify_archive
from storage.archive_root import S3Root, archive_root
from storage.store import Store
from tests import s3server
from tests.dbtargets import DbTarget
from tests.retention_data import (
    DAYS,
    NOW,
    PER_DAY,
    SERIES,
    TODAY,
    cutoff,
    expected_rows,
    filled_store,
    make_settings,
    remaining,
)

CPU1, CPU2, MEM = SERIES
PREFIX = "metrics/archive"
runner = CliRunner()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with s3server.moto_server() as url:
        yield url


@pytest.fixture
def s3(endpoint: str) -> Any:
    return s3server.client(endpoint)


def new_bucket(s3: Any, *, lock: bool = False) -> str:
    name = f"mm-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
    return name


def s3_settings(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    target: DbTarget,
    endpoint: str,
    bucket: str,
    **extra: object,
) -> Settings:
    return make_settings(
        monkeypatch,
        tmp_path / "home",
        target,
        retention_days=30,
        archive_dir=f"s3://{bucket}/{PREFIX}",
        archive_s3_endpoint=endpoint,
        archive_s3_region=s3server.REGION,
        archive_s3_access_key_id=s3server.ACCESS_KEY_ID,
        archive_s3_secret_access_key=s3server.SECRET_ACCESS_KEY,
        **extra,
    )


def objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """Every object under the archive prefix: relative path -> bytes."""
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/").get("Contents", [])
    return {
        o["Key"].removeprefix(f"{PREFIX}/"): s3.get_object(Bucket=bucket, Key=o["Key"])[
            "Body"
        ].read()
        for o in listed
        if not o["Key"].endswith("/")  # pyarrow's empty directory markers
    }


def archived_before(series: tuple[str, dict[str, str]], days: int) -> pd.DataFrame:
    rows = expected_rows(*series)
    return rows[rows["ts"] < cutoff(days)].reset_index(drop=True)


def test_settings_take_an_s3_url_and_keep_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str
) -> None:
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/m.db", "off")
    settings = s3_settings(monkeypatch, tmp_path, target, endpoint + "/", "some-bucket")
    assert settings.archive_url == f"s3://some-bucket/{PREFIX}"
    assert settings.archive_s3_endpoint == endpoint
    assert s3server.SECRET_ACCESS_KEY not in repr(settings)
    assert isinstance(archive_root(settings), S3Root)
    settings.ensure_dirs()  # creates no local directory named after the URL
    assert not any("s3:" in p.name for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    "bad",
    ["gs://bucket/x", "s3://", "s3://Bad_Bucket/x", "s3://user:pw@bucket/x", "s3://bucket/a/../b"],
)
def test_bad_archive_urls_are_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: str
) -> None:
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = make_settings(monkeypatch, tmp_path / "home", target)
    filled_store(settings).close()
    monkeypatch.setenv("METRICMILL_ARCHIVE_DIR", bad)
    result = cli(settings.home, "retention", "apply", "--yes")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid settings: "), result.stderr
    assert "METRICMILL_ARCHIVE_DIR" in lines[0]
    assert "Traceback" not in result.output
    assert "user:pw" not in result.output


def test_archive_to_s3_and_read_back_with_include_archive(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget, s3: Any, endpoint: str
) -> None:
    bucket = new_bucket(s3)
    settings = s3_settings(monkeypatch, tmp_path, db_target, endpoint, bucket)
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "container_cpu_*", 7)
        report = retention.apply(store)

        stored = objects(s3, bucket)
        listed = manifest(store.backend)
        assert report.files
        assert sorted(stored) == sorted(listed["path"]) == sorted(f.path for f in report.files)
        for path, sha in zip(listed["path"], listed["sha256"], strict=True):
            assert hashlib.sha256(stored[path]).hexdigest() == sha
        assert verify_archive(store.backend, archive_root(settings)) == []
        cpu_rows = len(archived_before(CPU1, 7)) + len(archived_before(CPU2, 7))
        mem_rows = len(archived_before(MEM, 30))
        assert sum(o.archived for o in report.outcomes) == cpu_rows + mem_rows
        assert sum(o.deleted for o in report.outcomes) == cpu_rows + mem_rows

        window = (TODAY - timedelta(days=DAYS + 1), NOW)
        recent = store.query(CPU1[0], CPU1[1], *window)
        full = store.query(CPU1[0], CPU1[1], *window, include_archive=True)
        want = expected_rows(*CPU1)
        assert len(recent) == len(want) - len(archived_before(CPU1, 7))
        assert list(full["ts"]) == list(want["ts"])
        assert list(full["value"]) == list(want["value"])
        daily = store.query(CPU1[0], CPU1[1], *window, step="1d", agg="sum", include_archive=True)
        sums = want.groupby(want["ts"].dt.floor("1D"))["value"].sum()
        assert list(daily["ts"]) == list(sums.index)
        assert list(daily["value"]) == pytest.approx(list(sums))

        back = read_archive(settings, MEM[0], MEM[1])  # every file of the metric, listed in S3
        assert list(back["value"]) == list(archived_before(MEM, 30)["value"])
        for metric, labels in SERIES:  # archive + database = everything, nothing twice
            both = pd.concat(
                [
                    read_archive(settings, metric, labels)[["ts", "value"]],
                    remaining(store, metric, labels)[["ts", "value"]],
                ]
            ).sort_values("ts")
            assert list(both["value"]) == list(expected_rows(metric, labels)["value"])


def test_a_corrupted_upload_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: Any, endpoint: str
) -> None:
    bucket = new_bucket(s3)
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = s3_settings(monkeypatch, tmp_path, target, endpoint, bucket)

    def corrupt(stage: str, detail: dict[str, Any]) -> None:
        if stage == "written":
            key = f"{PREFIX}/{detail['relative']}"
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            s3.put_object(Bucket=bucket, Key=key, Body=body[:-20])

    with filled_store(settings) as store:
        retention.add_rule(store.backend, "*", 7)
        before = store.backend.table_counts()
        with pytest.raises(ArchiveError, match="does not read back as written"):
            retention.apply(store, checkpoint=corrupt)
        assert store.backend.table_counts() == before
        assert manifest(store.backend).empty


def cli(home: Path, *args: str) -> Result:
    return runner.invoke(app, ["--home", str(home), *args])


def test_archive_verify_finds_corrupted_missing_and_stray_objects(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: Any, endpoint: str
) -> None:
    bucket = new_bucket(s3)
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = s3_settings(monkeypatch, tmp_path, target, endpoint, bucket)
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "*", 7)
        retention.apply(store)
        paths = sorted(manifest(store.backend)["path"])
    assert len(paths) >= 3
    clean = cli(settings.home, "archive", "verify")
    assert clean.exit_code == 0, clean.output
    assert f"{len(paths)} files in the manifest, 0 problems" in clean.stdout

    corrupted, gone = paths[0], paths[1]
    body = s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{corrupted}")["Body"].read()
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{corrupted}", Body=body[:-1] + b"\x00")
    s3.delete_object(Bucket=bucket, Key=f"{PREFIX}/{gone}")
    stray = gone.rsplit("/", 1)[0] + "/part-" + "0" * 32 + ".parquet"
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{stray}", Body=body)

    result = cli(settings.home, "archive", "verify")
    assert result.exit_code == 1
    assert sorted(result.stderr.strip().splitlines()) == sorted(
        [
            f"{corrupted}: sha256 differs from the manifest",
            f"{gone}: missing",
            f"{stray}: not in the manifest (left by an interrupted run)",
        ]
    )
    assert f"{len(paths)} files in the manifest, 3 problems" in result.stdout


def test_object_lock_keeps_archived_objects_until_their_hold_ends(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: Any, endpoint: str
) -> None:
    bucket = new_bucket(s3, lock=True)
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = s3_settings(monkeypatch, tmp_path, target, endpoint, bucket, archive_lock_days=400)
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "container_cpu_*", 7)
        report = retention.apply(store)
        assert report.files
        assert verify_archive(store.backend, archive_root(settings)) == []
    for item in report.files:
        key = f"{PREFIX}/{item.path}"
        head = s3.head_object(Bucket=bucket, Key=key)
        day = datetime.strptime(item.path.split("date=")[1][:10], "%Y-%m-%d").replace(tzinfo=UTC)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"] == day + timedelta(days=1 + 400)
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
        body = s3.get_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == item.sha256


def test_a_rule_sets_its_own_lock_days_over_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget, s3: Any, endpoint: str
) -> None:
    """Per rule: container_cpu_* keeps its files 45 days (`--lock-days 45`, over the setting's
    400), mem_* is not locked at all (`--lock-days 0`), the rest takes the setting's 400."""
    bucket = new_bucket(s3, lock=True)
    settings = s3_settings(
        monkeypatch, tmp_path, db_target, endpoint, bucket, archive_lock_days=400
    )
    with filled_store(settings):
        pass
    monkeypatch.setenv("METRICMILL_DATABASE_URL", db_target.url)  # the CLI's store: the same
    added = [
        cli(settings.home, "retention", "add", "container_cpu_*", "--days", "7", "--lock-days",
            "45", "--priority", "2"),
        cli(settings.home, "retention", "add", "mem_*", "--days", "7", "--lock-days", "0",
            "--priority", "1"),
        cli(settings.home, "retention", "add", "*", "--days", "7"),
    ]  # fmt: skip
    assert [r.exit_code for r in added] == [0, 0, 0], [r.output for r in added]
    assert "archive files locked 45 days" in added[0].stdout
    listed = cli(settings.home, "retention", "list", "--format", "json")
    locks = {r["pattern"]: r["lock_days"] for r in map(json.loads, listed.stdout.splitlines())}
    assert locks == {"container_cpu_*": 45, "mem_*": 0, "*": 400}

    with Store.open(settings=settings) as store:
        report = retention.apply(store)
        assert verify_archive(store.backend, archive_root(settings)) == []
    metrics = {item.path.split("/")[0] for item in report.files}
    assert metrics == {"metric=container_cpu_usage", "metric=mem_used_bytes"}
    for item in report.files:
        head = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/{item.path}")
        day = datetime.strptime(item.path.split("date=")[1][:10], "%Y-%m-%d").replace(tzinfo=UTC)
        if item.path.startswith("metric=container_cpu_usage/"):
            assert head["ObjectLockMode"] == "COMPLIANCE"
            assert head["ObjectLockRetainUntilDate"] == day + timedelta(days=1 + 45)
        else:
            assert "ObjectLockMode" not in head, item.path


def test_rule_lock_days_are_checked_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cases = [
        (["--days", "7", "--lock-days", "30", "--no-archive"], "this rule archives nothing"),
        (["--legal-hold", "--lock-days", "30"], "this rule archives nothing"),
        (["--days", "7", "--level", "1h", "--lock-days", "30"], "this rule archives nothing"),
        (["--days", "7", "--lock-days", "-1"], "--lock-days"),
    ]
    for extra, message in cases:
        result = cli(home, "retention", "add", "cpu_*", *extra)
        assert result.exit_code != 0, (extra, result.output)
        assert message in result.output, (extra, result.output)
        assert "Traceback" not in result.output
    assert "cpu_*" not in cli(home, "retention", "list").stdout


def test_object_lock_on_a_bucket_without_it_fails_before_deleting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: Any, endpoint: str
) -> None:
    bucket = new_bucket(s3, lock=False)
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = s3_settings(monkeypatch, tmp_path, target, endpoint, bucket, archive_lock_days=30)
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "*", 7)
        before = store.backend.table_counts()
        with pytest.raises(ArchiveError, match=f"bucket {bucket} has no object lock"):
            retention.apply(store)
        assert store.backend.table_counts() == before
    assert objects(s3, bucket) == {}


@pytest.mark.parametrize("problem", ["unreachable", "no-such-bucket"])
def test_unusable_object_store_is_one_error_line_and_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: Any, endpoint: str, problem: str
) -> None:
    bucket = new_bucket(s3)
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = s3_settings(monkeypatch, tmp_path, target, endpoint, bucket)
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "*", 7)
        before = store.backend.table_counts()
    if problem == "unreachable":
        monkeypatch.setenv("METRICMILL_ARCHIVE_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    else:
        monkeypatch.setenv("METRICMILL_ARCHIVE_DIR", f"s3://{bucket}-missing/{PREFIX}")

    result = cli(settings.home, "retention", "apply", "--yes")

    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: archive s3://"), result.stderr
    assert lines[0].endswith("nothing deleted")
    assert "Traceback" not in result.output
    assert s3server.SECRET_ACCESS_KEY not in result.output
    with Store.open(settings=settings) as store:
        assert store.backend.table_counts() == before
        assert manifest(store.backend).empty
    assert objects(s3, bucket) == {}
    assert len(expected_rows(*CPU1)) == DAYS * PER_DAY


def free_port() -> int:
    return s3server.free_port()


def test_doctor_probes_the_object_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: Any, endpoint: str
) -> None:
    from metricmill.cli.doctor import check_directories

    bucket = new_bucket(s3)
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = s3_settings(monkeypatch, tmp_path, target, endpoint, bucket)
    found = {c.name: c for c in check_directories(settings)}["archive (object store)"]
    assert found.ok is True and found.detail == f"s3://{bucket}/{PREFIX}"

    gone = s3_settings(monkeypatch, tmp_path, target, endpoint, bucket + "-missing")
    failed = {c.name: c for c in check_directories(gone)}["archive (object store)"]
    assert failed.ok is False
    assert failed.detail.startswith(f"archive s3://{bucket}-missing/{PREFIX} is not writable")
    assert s3server.SECRET_ACCESS_KEY not in failed.detail


def test_object_lock_needs_an_object_store_and_a_hold_still_to_come(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = DbTarget("sqlite", f"sqlite:///{tmp_path}/home/metrics.db", "off")
    settings = make_settings(
        monkeypatch, tmp_path / "home", target, retention_days=30, archive_lock_days=30
    )
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "*", 7)
        before = store.backend.table_counts()
        with pytest.raises(ArchiveError, match="need an object store with object lock"):
            retention.apply(store)
        assert store.backend.table_counts() == before
    day = datetime(2026, 1, 10, tzinfo=UTC)
    day_us = int(day.timestamp() * 1_000_000)
    now = datetime(2026, 3, 1, tzinfo=UTC)
    assert retain_until(day_us, 100, now) == day + timedelta(days=101)
    assert retain_until(day_us, 30, now) is None  # the hold ended before the file was written
    assert retain_until(day_us, 0, now) is None
