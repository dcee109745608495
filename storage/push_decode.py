"""Request bodies of pushing agents as `PushBatch`es: Prometheus remote write, Influx line protocol.

Bodies arrive decompressed (the receiver bounds their size first). Protobuf is decoded by
classes generated from storage/proto/remote_write.proto; line protocol by storage/lineproto.py.
A body that cannot be decoded at all raises `BadPush` with one line of reason.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from math import isnan

from google.protobuf.message import DecodeError

from metricmill.errors import MetricmillError
from storage.lineproto import parse_line_protocol
from storage.proto.remote_write_pb2 import WriteRequest
from storage.push_landing import PushBatch, SeriesPoints

# Prometheus marks a series gone with this NaN; it is a signal, not a value to store.
_STALE_NAN = struct.pack("<Q", 0x7FF0000000000002)
_pack = struct.Struct("<d").pack
# Influx 1.x precision spellings, as line protocol precisions.
INFLUX_PRECISIONS = {"n": "ns", "ns": "ns", "u": "us", "us": "us", "ms": "ms", "s": "s"}
BUCKET_LABEL = "bucket"


class BadPush(MetricmillError):
    """A request body that cannot be decoded; the message is the 400 reply's one line."""


def decode_remote_write(body: bytes) -> PushBatch:
    """A remote write 1.0 `WriteRequest` (already snappy-decompressed) as a batch.

    `__name__` becomes the metric, the other labels stay labels. Exemplars, metadata, native
    histograms and staleness markers are counted in `ignored`, not landed.
    """
    request = WriteRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise BadPush(f"not a remote write WriteRequest: {exc}") from None
    batch = PushBatch("remote_write")
    batch.ignore("metadata", len(request.metadata))
    append = batch.series.append
    for series in request.timeseries:
        if series.exemplars:
            batch.ignore("exemplars", len(series.exemplars))
        if series.histograms:
            batch.ignore("native_histograms", len(series.histograms))
        samples = series.samples
        if not samples:
            continue
        labels = dict(series.labels)
        metric = labels.pop("__name__", "")
        pairs = [(sample.timestamp * 1000, sample.value) for sample in samples]  # ms -> µs
        stamps, values = zip(*pairs, strict=True)
        if any(map(isnan, values)):  # maybe staleness markers
            kept = [(ts, v) for ts, v in pairs if _pack(v) != _STALE_NAN]
            batch.ignore("stale_markers", len(pairs) - len(kept))
            if not kept:
                continue
            stamps, values = zip(*kept, strict=True)
        append(SeriesPoints(metric, labels, stamps, values))
    return batch


def decode_line_protocol(body: bytes, *, bucket: str, precision: str) -> PushBatch:
    """Influx line protocol as a batch; every sample gets the `bucket` label.

    Lines the parser rejects are landed as texts (quarantined as `malformed_line`); a body with
    no sample and some rejected line is refused whole, with the first line's reason.
    """
    unit = INFLUX_PRECISIONS.get(precision)
    if unit is None:
        raise BadPush(f"precision {precision!r} is not supported: use ns, us, ms or s")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadPush(f"line protocol body is not UTF-8 (byte {exc.start})") from None
    parsed = parse_line_protocol(text, precision=unit)
    batch = PushBatch("influx")
    rejected = [
        f"{reason}: line {record['line_no']}: {record['line']}"
        for record, reason in parsed.rejected
    ]
    frame = parsed.frame
    if not len(frame) and rejected:
        raise BadPush(rejected[0][:300])
    batch.rejected = rejected
    batch.ignore("string_fields", parsed.skipped_fields.get("string", 0))
    batch.ignore("boolean_fields", parsed.skipped_fields.get("boolean", 0))
    stamps = frame["ts"].array.asi8.tolist() if len(frame) else []
    with_bucket: dict[int, dict[str, str]] = {}
    groups: dict[tuple[str, int], tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for metric, labels, ts, value in zip(
        frame["metric"].tolist(),
        frame["labels"].tolist(),
        stamps,
        frame["value"].tolist(),
        strict=True,
    ):
        key = id(labels)
        if key not in with_bucket:
            with_bucket[key] = {**labels, BUCKET_LABEL: bucket}
        points = groups[(metric, key)]
        points[0].append(ts)
        points[1].append(value)
    for (metric, key), (ts_list, values) in groups.items():
        batch.series.append(SeriesPoints(metric, with_bucket[key], ts_list, values))
    return batch
