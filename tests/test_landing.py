"""Landing-directory claims under concurrency: every file is claimed by exactly one run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# storage.landing needs only the standard library: fresh interpreters start in milliseconds,
# and nothing the test session has loaded (Prefect's threads) is forked into them.
CLAIMER = """
import os, sys
from pathlib import Path
from storage.landing import claim_files

landing, out = Path(sys.argv[1]), Path(sys.argv[2])
claim = claim_files(landing, settle_seconds=0)
for path in claim.files:  # finish each file as the flow does, so the claim empties
    os.replace(path, landing / "done" / path.name)
claim.release()
out.write_text("\\n".join(p.name for p in claim.files), encoding="utf-8")
"""
ROOT = Path(__file__).resolve().parents[1]


def _dead_claim(landing: Path, name: str, files: list[str]) -> None:
    """A claim left by a run that died: a directory with an unlocked lock file."""
    directory = landing / "processing" / name
    directory.mkdir(parents=True)
    (directory / ".lock").touch()
    for file in files:
        (directory / file).write_text("x", encoding="utf-8")


def test_concurrent_claims_take_every_file_exactly_once(tmp_path: Path) -> None:
    for round_no in range(25):
        landing = tmp_path / f"round{round_no}" / "landing"
        (landing / "done").mkdir(parents=True)
        new = {f"new-{i}.ndjson" for i in range(6)}
        orphans = {f"orphan-{i}.ndjson" for i in range(4)}
        for name in new:
            (landing / name).write_text("x", encoding="utf-8")
        _dead_claim(landing, "1-1-dead0001", ["orphan-0.ndjson", "orphan-1.ndjson"])
        _dead_claim(landing, "1-2-dead0002", ["orphan-2.ndjson", "orphan-3.ndjson"])
        outputs = [tmp_path / f"round{round_no}-{i}.txt" for i in range(4)]
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", CLAIMER, str(landing), str(out)],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
            )
            for out in outputs
        ]
        for worker in workers:
            _, stderr = worker.communicate(timeout=60)
            assert worker.returncode == 0, f"round {round_no}: a claim failed:\n{stderr}"
        claimed = [n for out in outputs for n in out.read_text(encoding="utf-8").split("\n") if n]
        assert sorted(claimed) == sorted(new | orphans), f"round {round_no}: {sorted(claimed)}"
        assert {p.name for p in (landing / "done").iterdir()} == new | orphans
        leftovers = [p for p in (landing / "processing").rglob("*") if p.name != ".lock"]
        assert all(p.is_dir() for p in leftovers), leftovers
