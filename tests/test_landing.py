"""Landing-directory claims under concurrency: every file is claimed by exactly one run."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

from storage.landing import claim_files


def _claim_and_record(landing: str, out: str) -> None:
    try:
        _claim(landing, out)
    except BaseException:
        Path(out + ".err").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _claim(landing: str, out: str) -> None:
    claim = claim_files(Path(landing), settle_seconds=0)
    names = [p.name for p in claim.files]
    for path in claim.files:  # finish each file as the flow does, so the claim empties
        os.replace(path, Path(landing) / "done" / path.name)
    claim.release()
    Path(out).write_text("\n".join(names), encoding="utf-8")


def _dead_claim(landing: Path, name: str, files: list[str]) -> None:
    """A claim left by a run that died: a directory with an unlocked lock file."""
    directory = landing / "processing" / name
    directory.mkdir(parents=True)
    (directory / ".lock").touch()
    for file in files:
        (directory / file).write_text("x", encoding="utf-8")


def test_concurrent_claims_take_every_file_exactly_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for round_no in range(25):
        landing = tmp_path / f"round{round_no}" / "landing"
        (landing / "done").mkdir(parents=True)
        expected = {f"new-{i}.ndjson" for i in range(6)} | {f"orphan-{i}.ndjson" for i in range(4)}
        for name in expected:
            if name.startswith("new"):
                (landing / name).write_text("x", encoding="utf-8")
        _dead_claim(landing, "1-1-dead0001", ["orphan-0.ndjson", "orphan-1.ndjson"])
        _dead_claim(landing, "1-2-dead0002", ["orphan-2.ndjson", "orphan-3.ndjson"])
        outputs = [tmp_path / f"round{round_no}-{i}.txt" for i in range(4)]
        workers = [
            context.Process(target=_claim_and_record, args=(str(landing), str(out)))
            for out in outputs
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
            errors = [Path(str(out) + ".err") for out in outputs]
            details = "".join(e.read_text(encoding="utf-8") for e in errors if e.exists())
            assert worker.exitcode == 0, f"round {round_no}: a claim failed:\n{details}"
        claimed = [n for out in outputs for n in out.read_text(encoding="utf-8").split("\n") if n]
        assert sorted(claimed) == sorted(expected), f"round {round_no}: {sorted(claimed)}"
        assert {p.name for p in (landing / "done").iterdir()} == expected
        leftovers = [p for p in (landing / "processing").rglob("*") if p.name != ".lock"]
        assert all(p.is_dir() for p in leftovers), leftovers
