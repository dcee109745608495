"""Helper process for the SIGKILL trials in test_storage_write.py.

Run as ``python -m tests.sigkill_writer`` from the project root. It imports the storage stack
once, then for every job line read from stdin forks one writer process, so a trial costs a fork
instead of a fresh interpreter. Protocol, one JSON object per line:

    parent -> helper  {"url", "timescaledb", "metric", "batch_id", "ready", "done", "error"}
    helper -> parent  {"pid": writer pid}            as soon as the writer exists
    helper -> parent  {"pid": ..., "exit": code}     once the writer is gone (-9 after SIGKILL)

The writer builds its batch, opens the store, touches `ready` right before write_samples, and
touches `done` once the write returned; then it waits to be killed, so the parent always kills
a live process of its own and never a recycled pid.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storage.store import Store

SERIES = 1_000
STEPS = 200
SAMPLES = SERIES * STEPS
FIRST_TS = pd.Timestamp("2024-03-01T00:00:00Z")


def sigkill_frame(metric: str) -> pd.DataFrame:
    """SERIES series x STEPS samples ten seconds apart, all under `metric`."""
    labels = [{"instance": f"i{i:04d}", "job": "sigkill"} for i in range(SERIES)]
    series_of_row = np.repeat(np.arange(SERIES), STEPS)
    offsets = np.tile(np.arange(STEPS, dtype=np.int64) * 10, SERIES)
    return pd.DataFrame(
        {
            "metric": metric,
            "labels": [labels[i] for i in series_of_row],
            "ts": FIRST_TS + pd.to_timedelta(offsets, unit="s"),
            "value": np.arange(SAMPLES, dtype="float64"),
        }
    )


def _write(job: dict[str, Any]) -> int:
    try:
        frame = sigkill_frame(job["metric"])
        store = Store.open(job["url"], timescaledb=job["timescaledb"])
        Path(job["ready"]).touch()
        store.write_samples(frame, source="sigkill", batch_id=job["batch_id"])
        Path(job["done"]).touch()
    except BaseException:
        Path(job["error"]).write_text(traceback.format_exc())
        return 1
    time.sleep(600)  # wait for the parent's SIGKILL
    return 0


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_write(job))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
