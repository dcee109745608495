"""Timestamp columns of landed files before they are checked together.

A text `ts` column that is all ISO 8601 instants with a zone becomes datetime64[us, UTC] (so
a CSV concatenated with a Parquet file stays a datetime column); anything else is left as it
came, for the row-wise rules and the quarantine's "row as received".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from storage.frames import timestamps_us, with_parsed_timestamps


def frame_of(ts: list[object]) -> pd.DataFrame:
    n = len(ts)
    return pd.DataFrame(
        {"metric": ["m"] * n, "labels": [{}] * n, "ts": pd.Series(ts, dtype=object), "value": 1.0}
    )


def test_zoned_iso_text_becomes_the_same_instants_as_the_row_wise_parse() -> None:
    text = [
        "2026-11-08T00:00:00Z",
        "2026-11-08T00:00:00+01:00",
        "2026-11-08T00:00:00.123456Z",
        "2026-11-07T23:59:59-0530",
    ]
    frame = frame_of(text)
    parsed = with_parsed_timestamps(frame)
    assert str(parsed["ts"].dtype) == "datetime64[us, UTC]"
    expected, bad = timestamps_us(frame["ts"])  # the row-wise (pandas) path
    assert not bad.any()
    got = parsed["ts"].to_numpy(dtype="datetime64[us]").view(np.int64)
    assert got.tolist() == expected.tolist()
    assert frame["ts"].tolist() == text  # the caller's frame is not modified


def test_a_column_with_any_other_value_is_left_as_received() -> None:
    for odd in ["not a time", "2026-11-08 00:00:00", "1700000000", None, 1_700_000_000]:
        frame = frame_of(["2026-11-08T00:00:00Z", odd])
        kept = with_parsed_timestamps(frame)
        assert kept["ts"].dtype == object
        assert kept["ts"].tolist() == ["2026-11-08T00:00:00Z", odd]


def test_parsed_text_concatenates_with_a_datetime_file_as_datetimes() -> None:
    parquet_like = pd.DataFrame(
        {
            "metric": ["m"],
            "labels": [{}],
            "ts": pd.Series(pd.to_datetime(["2026-11-08T01:00:00Z"]).as_unit("us")),
            "value": [2.0],
        }
    )
    text = with_parsed_timestamps(frame_of(["2026-11-08T00:00:00Z"]))
    both = pd.concat([text, parquet_like], ignore_index=True)
    assert str(both["ts"].dtype) == "datetime64[us, UTC]"
    us, bad = timestamps_us(both["ts"])
    assert not bad.any()
    assert (us[1] - us[0]) == 3_600_000_000
