"""The Arrow NDJSON reader against the line reader, on random files of the plain case."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from storage.readers.ndjson import ndjson_frame
from storage.readers.ndjson_arrow import arrow_ndjson_frame

HOSTS = ["a", "b", "é", "x y", "", "1"]


def random_file(rng: random.Random, names: tuple[str, ...], text_ts: bool) -> bytes:
    """Lines of the plain case: the same four keys, labels of text values over `names`, some
    of them absent; label sets repeat within and across files."""
    lines = []
    for _ in range(rng.randint(1, 40)):
        second = rng.randint(0, 3)
        present = rng.sample(names, len(names))  # keys in any order, some absent
        labels = {n: rng.choice(HOSTS) for n in present if rng.random() < 0.8}
        record = {
            "metric": rng.choice(["cpu", "mem", "disk_io"]),
            "labels": labels,
            # a few times shared by many rows, as in a scrape; ISO text or epoch numbers
            "ts": f"2026-12-01T00:00:0{second}Z" if text_ts else 1_700_000_000 + second,
            "value": rng.choice([0.0, -1.5, 1e12, rng.random()]),
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def as_rows(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
    return [
        (m, tuple(sorted(labels.items())), t, v)
        for m, labels, t, v in frame[["metric", "labels", "ts", "value"]].itertuples(index=False)
    ]


@pytest.mark.parametrize("seed", range(20))
def test_arrow_reader_gives_the_line_readers_rows_and_shares_label_dicts(seed: int) -> None:
    rng = random.Random(seed)
    names = tuple(rng.sample(["host", "region", "zone", "job"], rng.randint(1, 3)))
    arrow_memo: dict[Any, Any] = {}
    seen: dict[tuple[Any, ...], int] = {}
    for index in range(6):  # files decoded together share the memo
        data = random_file(rng, names, text_ts=index % 2 == 0)
        fast = arrow_ndjson_frame(data, arrow_memo)
        slow = ndjson_frame(data, Path(f"f{index}.ndjson"))
        assert fast is not None
        assert as_rows(fast) == as_rows(slow)
        assert list(fast.columns) == list(slow.columns)
        # text as Python objects, as the line reader gives it (not Arrow-backed strings)
        assert fast["metric"].dtype == object
        assert fast["ts"].dtype == (object if index % 2 == 0 else np.int64)
        # Files whose lines have the same keys (in any order) share one dict per distinct
        # set: later steps do their work per dict.
        keys = frozenset(k for line in data.splitlines() for k in json.loads(line)["labels"])
        for labels in fast["labels"]:
            key = (keys, tuple(sorted(labels.items())))
            assert seen.setdefault(key, id(labels)) == id(labels)
