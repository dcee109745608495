"""Helper process for the kill -9 trial in test_archive.py.

Run as ``python -m tests.retention_killer HOME DATABASE_URL TIMESCALEDB READY`` from the project
root: applies retention and, once the first archive file is written and verified but before its
rows are deleted, touches READY and waits to be killed with SIGKILL.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from metricmill.settings import load_settings
from storage.retention import apply
from storage.store import Store


def main() -> None:
    home, url, timescaledb, ready = sys.argv[1:5]
    settings = load_settings(home=home, database_url=url, timescaledb=timescaledb)

    def stop_after_verify(stage: str, detail: dict[str, Any]) -> None:
        if stage == "verified":
            Path(ready).write_text(detail["path"])
            time.sleep(600)  # the parent's SIGKILL comes here

    with Store.open(settings=settings) as store:
        apply(store, checkpoint=stop_after_verify)


if __name__ == "__main__":
    main()
