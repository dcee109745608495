"""OTLP/HTTP metrics (`ExportMetricsServiceRequest`, protobuf or JSON) as a `PushBatch`.

Messages come from the `opentelemetry-proto` package. The mapping, as Prometheus stores them:

* names: characters outside ``[a-zA-Z0-9_:]`` become ``_`` (``http.server.duration`` ->
  ``http_server_duration``), a leading digit gets a ``_`` before it; no unit suffix is added.
* gauges and non-monotonic sums: one sample per point, the name as is.
* monotonic sums (counters): the name with ``_total`` appended (unless it ends so already).
* histograms: ``<name>_bucket`` with ``le`` (cumulative counts, the last ``le="+Inf"``),
  ``<name>_sum`` (when the point has a sum) and ``<name>_count``.
* summaries: ``<name>`` with ``quantile``, ``<name>_sum`` and ``<name>_count``.
* labels: the point's attributes, over the resource's: ``service.name`` becomes ``job``
  (``<service.namespace>/<service.name>`` when a namespace is set), ``service.instance.id``
  becomes ``instance``, every other resource attribute a label with its name sanitised like a
  metric name (``host.name`` -> ``host_name``), except ``telemetry.*`` (they describe the SDK).
  Point attribute names are sanitised the same way. Non-text values are rendered as text
  (``true``, ``42``, ``0.5``; arrays and maps as JSON).
* skipped and counted (answered as rejected points in ``partial_success``): delta-temporality
  sums and histograms (metricmill stores cumulative counters), exponential histograms, and
  points flagged "no recorded value".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric

from storage.push_decode import BadPush
from storage.push_landing import PushBatch, SeriesPoints

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
_NO_RECORDED_VALUE = 1


def sanitise_name(name: str, *, label: bool = False) -> str:
    """A metric (or label) name Prometheus-style: invalid characters become ``_``."""
    cleaned = (_INVALID_LABEL_CHARS if label else _INVALID_NAME_CHARS).sub("_", name)
    return f"_{cleaned}" if cleaned[:1].isdigit() else cleaned


def decode_otlp(body: bytes, *, json: bool) -> PushBatch:
    """An OTLP metrics export request body as a batch."""
    request = ExportMetricsServiceRequest()
    try:
        if json:
            json_format.Parse(body, request, ignore_unknown_fields=True)
        else:
            request.ParseFromString(body)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        kind = "JSON" if json else "protobuf"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadPush(f"not an OTLP metrics request ({kind}): {first[:200]}") from None
    batch = PushBatch("otlp")
    series = _Series()
    for resource_metrics in request.resource_metrics:
        base = resource_labels(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                _add_metric(batch, series, metric, base)
    batch.series = series.all()
    return batch


def resource_labels(attributes: Iterable[KeyValue]) -> dict[str, str]:
    """The labels a resource gives each of its series (see the module docstring)."""
    values = {kv.key: any_value_text(kv.value) for kv in attributes}
    labels: dict[str, str] = {}
    for key, text in values.items():
        if key.startswith("telemetry.") or key in ("service.name", "service.namespace"):
            continue
        if key == "service.instance.id":
            labels["instance"] = text
        else:
            labels[sanitise_name(key, label=True)] = text
    if "service.name" in values:
        namespace = values.get("service.namespace")
        name = values["service.name"]
        labels["job"] = f"{namespace}/{name}" if namespace else name
    return labels


def any_value_text(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return repr(value.double_value)
    if kind is None:
        return ""
    return json_format.MessageToJson(value, indent=None)


def _labels(base: dict[str, str], attributes: Iterable[KeyValue]) -> dict[str, str]:
    labels = dict(base)
    for kv in attributes:
        labels[sanitise_name(kv.key, label=True)] = any_value_text(kv.value)
    return labels


def _le(bound: float) -> str:
    """A bucket bound (or quantile) as Prometheus writes it: 1 not 1.0, 0.25, +Inf."""
    if bound == float("inf"):
        return "+Inf"
    if bound.is_integer() and abs(bound) < 1e15:
        return str(int(bound))
    return repr(bound)


class _Series:
    """Points grouped by (metric, labels) in the order they come, then landed as a batch's."""

    def __init__(self) -> None:
        self._index: dict[tuple[str, tuple[tuple[str, str], ...]], SeriesPoints] = {}
        self._ts: dict[int, list[int]] = {}
        self._values: dict[int, list[float]] = {}

    def add(self, metric: str, labels: dict[str, str], ts_us: int, value: float) -> None:
        key = (metric, tuple(sorted(labels.items())))
        points = self._index.get(key)
        if points is None:
            ts_list: list[int] = []
            values: list[float] = []
            points = self._index[key] = SeriesPoints(metric, labels, ts_list, values)
            self._ts[id(points)], self._values[id(points)] = ts_list, values
        self._ts[id(points)].append(ts_us)
        self._values[id(points)].append(value)

    def all(self) -> list[SeriesPoints]:
        return list(self._index.values())


def _add_metric(batch: PushBatch, out: _Series, metric: Metric, base: dict[str, str]) -> None:
    name = sanitise_name(metric.name)
    kind = metric.WhichOneof("data")
    if kind in ("gauge", "sum"):
        data = metric.gauge if kind == "gauge" else metric.sum
        counter = kind == "sum" and metric.sum.is_monotonic
        if kind == "sum" and metric.sum.aggregation_temporality != _CUMULATIVE:
            batch.ignore("delta_points", len(data.data_points))
            return
        if counter and not name.endswith("_total"):
            name += "_total"
        for point in data.data_points:
            if point.flags & _NO_RECORDED_VALUE:
                batch.ignore("no_recorded_value")
                continue
            value = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
            out.add(name, _labels(base, point.attributes), point.time_unix_nano // 1000, value)
    elif kind == "histogram":
        if metric.histogram.aggregation_temporality != _CUMULATIVE:
            batch.ignore("delta_points", len(metric.histogram.data_points))
            return
        for hist in metric.histogram.data_points:
            if hist.flags & _NO_RECORDED_VALUE:
                batch.ignore("no_recorded_value")
                continue
            labels = _labels(base, hist.attributes)
            ts = hist.time_unix_nano // 1000
            bounds = [*hist.explicit_bounds, float("inf")]
            counts = list(hist.bucket_counts)
            if counts and len(counts) != len(bounds):
                batch.ignore("malformed_histograms")
                continue
            running = 0
            for bound, count in zip(bounds, counts, strict=False):
                running += count
                out.add(f"{name}_bucket", {**labels, "le": _le(bound)}, ts, float(running))
            if hist.HasField("sum"):
                out.add(f"{name}_sum", labels, ts, hist.sum)
            out.add(f"{name}_count", labels, ts, float(hist.count))
    elif kind == "summary":
        for summary in metric.summary.data_points:
            if summary.flags & _NO_RECORDED_VALUE:
                batch.ignore("no_recorded_value")
                continue
            labels = _labels(base, summary.attributes)
            ts = summary.time_unix_nano // 1000
            for quantile in summary.quantile_values:
                quantile_label = {**labels, "quantile": _le(quantile.quantile)}
                out.add(name, quantile_label, ts, quantile.value)
            out.add(f"{name}_sum", labels, ts, summary.sum)
            out.add(f"{name}_count", labels, ts, float(summary.count))
    elif kind == "exponential_histogram":
        batch.ignore("exponential_histogram_points", len(metric.exponential_histogram.data_points))
    else:
        batch.ignore("empty_metrics")
