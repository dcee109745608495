"""One bad file never stops the others: the ingest flow quarantines that file with a reason and
lands the rest of its group; links are never followed; runs that died on a file are counted;
`status` and `doctor` show what sits in processing/ and why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import tasks.ingest_files
from flows.ingest import ingest
from metricmill.cli import app
from metricmill.settings import load_settings
from storage.landing import attempts, claim_files, clear_attempts, count_attempt
from storage.store import Store
from tests.forked_runs import ForkedRuns, tail
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

NOW = datetime.now(UTC).replace(second=0, microsecond=0)


def good_file(path: Path, host: str, value: float = 1.0) -> Path:
    ts = (NOW - timedelta(minutes=5)).isoformat()
    record = {"metric": "poison_m", "labels": {"host": host}, "ts": ts, "value": value}
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    isolate_settings(monkeypatch, settle_seconds=0)
    home = tmp_path / "home"
    (home / "landing").mkdir(parents=True)
    return home


def hosts(home: Path) -> list[str]:
    with Store.open(settings=load_settings(home=home)) as store:
        frame = store.query("poison_m", None, NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    return sorted(labels["host"] for labels in frame["labels"])


def reason_of(home: Path, name: str) -> str:
    return (home / "quarantine" / f"{name}.reason").read_text(encoding="utf-8").split("\n")[0]


def detail_of(home: Path, name: str) -> str:
    return (home / "quarantine" / f"{name}.reason").read_text(encoding="utf-8")


def run(home: Path) -> None:
    state = asyncio.run(ingest(home=str(home), scrape=False, return_state=True))
    assert state.is_completed(), state


def test_a_poison_file_is_quarantined_and_its_group_lands(home: Path) -> None:
    landing = home / "landing"
    good_file(landing / "a.ndjson", "a")
    nested = "[" * 5000 + "]" * 5000
    (landing / "deep.ndjson").write_text(
        '{"metric": "n", "labels": {"a": ' + nested + '}, "ts": 1, "value": 1}\n'
    )
    (landing / "empty-objects.ndjson").write_text("{}\n{}\n")
    good_file(landing / "b.ndjson", "b")

    run(home)  # all four files in one group

    assert hosts(home) == ["a", "b"]
    assert reason_of(home, "deep.ndjson") in {"undecodable", "too_deep", "unreadable_file"}
    assert reason_of(home, "empty-objects.ndjson") in {"no_samples", "unreadable_file"}
    assert sorted(p.name for p in (landing / "done").iterdir()) == ["a.ndjson", "b.ndjson"]
    assert not [p for p in (landing / "processing").rglob("*") if not p.name.startswith(".")]


def test_no_samples_at_all_is_quarantined_not_done(home: Path) -> None:
    landing = home / "landing"
    (landing / "strings.lp").write_text('cpu,host=a state="idle" 1700000000000000000\n')

    run(home)

    assert reason_of(home, "strings.lp") == "no_samples"
    assert not (landing / "done").exists() or not any((landing / "done").iterdir())


def test_a_symlink_is_quarantined_without_being_read(home: Path, tmp_path: Path) -> None:
    outside = good_file(tmp_path / "outside.ndjson", "secret")
    before = outside.stat()
    (home / "landing" / "link.ndjson").symlink_to(outside)
    good_file(home / "landing" / "c.ndjson", "c")

    run(home)

    assert hosts(home) == ["c"]
    assert reason_of(home, "link.ndjson") == "symlink"
    assert (home / "quarantine" / "link.ndjson").is_symlink()  # the link moved, not its target
    assert outside.read_text(encoding="utf-8").count("secret") == 1
    assert outside.stat().st_mtime_ns == before.st_mtime_ns


def test_a_done_directory_that_is_a_link_stops_the_run_before_any_file_moves(
    home: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "landing" / "done").symlink_to(elsewhere)
    good_file(home / "landing" / "d.ndjson", "d")

    state = asyncio.run(ingest(home=str(home), scrape=False, return_state=True))

    assert state.is_failed()
    assert "must be a real directory" in str(state.message)
    assert list(elsewhere.iterdir()) == []
    assert (home / "landing" / "d.ndjson").exists()


def died_three_times(landing: Path, name: str, *, cleared_before: bool = False) -> None:
    """Leave `name` as three runs killed while decoding it leave it: claimed by a dead run, its
    count at MAX_ATTEMPTS (after a clearance by a separate process, if `cleared_before`)."""
    claim = claim_files(landing, settle_seconds=0)
    path = next(p for p in claim.files if p.name == name)
    if cleared_before:
        clear_attempts(path)
    for _ in range(tasks.ingest_files.MAX_ATTEMPTS):
        count_attempt([path])
    assert attempts(path) == tasks.ingest_files.MAX_ATTEMPTS
    claim.release()


class ChildKiller:
    """Kills, with SIGKILL, every process decoding `name` alone (storage/readers/isolated.py):
    a file that kills whatever decodes it, as the run's own decoder died three times."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.pids: set[int] = set()  # each counted once: a killed process lingers a moment
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit() or int(proc.name) in self.pids:
                    continue
                try:
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if any(b"storage.readers.isolated" in a for a in argv) and any(
                    a.endswith(b"/" + self.name) for a in argv
                ):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(proc.name), signal.SIGKILL)
                        self.pids.add(int(proc.name))
            time.sleep(0.005)

    @property
    def killed(self) -> int:
        """How many processes it killed."""
        return len(self.pids)

    def __enter__(self) -> ChildKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_file_that_kills_its_decoder_is_quarantined_after_three_deaths(home: Path) -> None:
    landing = home / "landing"
    good_file(landing / "killer.ndjson", "k")
    good_file(landing / "e.ndjson", "e")
    died_three_times(landing, "killer.ndjson")

    with ChildKiller("killer.ndjson") as killer:
        run(home)

    assert killer.killed == 1
    assert reason_of(home, "killer.ndjson") == "repeated_failure"
    assert "killed by SIGKILL" in detail_of(home, "killer.ndjson")
    assert hosts(home) == ["e"]


def test_a_file_runs_were_killed_on_by_chance_is_decoded_alone_and_lands(home: Path) -> None:
    landing = home / "landing"
    good_file(landing / "innocent.ndjson", "i")
    good_file(landing / "e.ndjson", "e")
    died_three_times(landing, "innocent.ndjson")

    run(home)

    assert hosts(home) == ["e", "i"]
    assert not (home / "quarantine").exists() or not list((home / "quarantine").iterdir())


def test_a_cleared_file_runs_die_on_again_is_quarantined_unopened(home: Path) -> None:
    landing = home / "landing"
    good_file(landing / "again.ndjson", "a")
    good_file(landing / "e.ndjson", "e")
    died_three_times(landing, "again.ndjson", cleared_before=True)

    with ChildKiller("again.ndjson") as killer:
        run(home)

    assert killer.killed == 0  # not decoded alone a second time
    assert reason_of(home, "again.ndjson") == "repeated_failure"
    assert "after a separate process had decoded it" in detail_of(home, "again.ndjson")
    assert hosts(home) == ["e"]


def test_runs_dying_on_one_file_of_a_group_count_against_that_file_alone(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Runs die while decoding b, in a group with a and c (the decoder ends the run's process, as
    a file that crashes its parser would). A group's files are counted together until a death,
    then each alone: after three deaths only b is at MAX_ATTEMPTS, the next run decodes b alone
    (where it dies again: quarantined), and a and c land without being decoded alone."""
    landing = home / "landing"
    for name in "abc":
        good_file(landing / f"{name}.ndjson", name)
    real = tasks.ingest_files.read_landed_file

    def dies_on_b(path: Path, **kwargs: Any) -> Any:
        if path.name == "b.ndjson":
            os._exit(137)
        return real(path, **kwargs)

    monkeypatch.setattr(tasks.ingest_files, "read_landed_file", dies_on_b)
    runs = ForkedRuns(tmp_path / "logs", run_timeout=300)
    for _ in range(tasks.ingest_files.MAX_ATTEMPTS):
        pid, log = runs.start(home, "")
        assert runs.wait(pid, 300) == 137, tail(log)
    monkeypatch.setattr(tasks.ingest_files, "read_landed_file", real)
    claimed = {p.name: p for p in (landing / "processing").glob("*/*.ndjson")}
    assert {name: attempts(path) for name, path in claimed.items()} == {
        "a.ndjson": 1,
        "b.ndjson": tasks.ingest_files.MAX_ATTEMPTS,
        "c.ndjson": 1,
    }

    with ChildKiller("b.ndjson") as killer:
        run(home)

    assert killer.killed == 1  # b alone
    assert reason_of(home, "b.ndjson") == "repeated_failure"
    assert hosts(home) == ["a", "c"]


def cli(home: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--home", str(home), *args], terminal_width=200)


def test_status_and_doctor_flag_files_left_in_processing(home: Path) -> None:
    landing = home / "landing"
    good_file(landing / "stuck.ndjson", "s")
    claim = claim_files(landing, settle_seconds=0)
    count_attempt(claim.files)
    claim.release()  # as a run killed while decoding it leaves it

    doctor = cli(home, "doctor")
    status = cli(home, "status")

    assert doctor.exit_code == 1, doctor.output
    assert "landing backlog" in doctor.output and "FAIL" in doctor.output
    assert "1 files left in" in " ".join(doctor.output.split())
    assert "stuck in processing" in status.output, status.output
