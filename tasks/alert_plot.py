"""The picture of one alert: its series around the alert, the expected band and the alert span.

For `metricmill alerts show ID --plot FILE.png`, and for the `detect-alert-plots` markdown
artifact of a detect run that opens alerts (`alerts_markdown`: the pictures inline, as PNG data
URLs the Prefect UI's markdown renderer shows). matplotlib is imported here only, when a
picture is asked for (the CLI's start-up stays free of it).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from storage.store import Store

BEFORE = timedelta(hours=3)
AFTER = timedelta(hours=1)
# A run that opens many alerts (a whole fleet at once) attaches this many pictures; the rest are
# listed with the command that draws them.
MAX_PLOTS = 10
ARTIFACT_SIZE = (8.0, 3.2)  # inches, at 80 dpi: about 25 KB of PNG per alert


@dataclass(frozen=True)
class AlertWindow:
    """The points of the alert's series in the window drawn, and the band as drawn."""

    points: pd.DataFrame  # ts, value
    start: datetime
    end: datetime
    span: tuple[datetime, datetime]  # the alert: started .. resolved (or the last update)
    band: tuple[float, float] | None  # expected low..high, clipped at 0 for a series >= 0
    expected: float | None


def _moment(us: Any) -> datetime | None:
    if us is None or pd.isna(us):
        return None
    return datetime.fromtimestamp(int(us) / 1e6, UTC)


def _number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def clipped_band(
    low: float | None, high: float | None, never_negative: bool
) -> tuple[float, float] | None:
    """The band as shown: a series that never goes negative has no expected value below 0."""
    if low is None or high is None:
        return None
    if never_negative:
        return max(low, 0.0), max(high, 0.0)
    return low, high


def alert_window(store: Store, alert: dict[str, Any], now: datetime | None = None) -> AlertWindow:
    detail = alert.get("detail") or {}
    metric = detail.get("metric")
    labels = dict(detail.get("labels") or {})
    started = _moment(alert["started_at"]) or datetime.now(UTC)
    ended = _moment(alert.get("resolved_at")) or _moment(alert.get("updated_at")) or started
    now = now or datetime.now(UTC)
    start, end = started - BEFORE, min(ended + AFTER, now + timedelta(seconds=1))
    points = pd.DataFrame({"ts": pd.Series([], dtype="datetime64[us, UTC]"), "value": []})
    if metric:
        frame = store.query(metric, labels or None, start, end)
        if not frame.empty:
            mine = frame[[dict(x) == labels for x in frame["labels"]]]
            points = mine[["ts", "value"]].reset_index(drop=True)
    never_negative = bool(len(points)) and float(points["value"].min()) >= 0
    value = _number(alert.get("value"))
    if value is not None and value < 0:
        never_negative = False
    band = clipped_band(
        _number(alert.get("expected_low")), _number(alert.get("expected_high")), never_negative
    )
    return AlertWindow(points, start, end, (started, ended), band, _number(alert.get("expected")))


def render(window: AlertWindow, title: str, path: Path) -> Path:
    """Write the picture as PNG to `path`."""
    data = png(window, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def png(
    window: AlertWindow,
    title: str,
    *,
    size: tuple[float, float] = (10.0, 4.0),
    dpi: int = 100,
) -> bytes:
    """The picture as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def x(moment: datetime) -> float:  # matplotlib's date numbers (days), from naive UTC
        return float(mdates.date2num(moment.astimezone(UTC).replace(tzinfo=None)))

    title = title.replace("$", r"\$")  # a label value with `$` is text, not mathtext
    figure, axes = plt.subplots(figsize=size, dpi=dpi)
    try:
        span_start, span_end = window.span
        span_end = max(span_end, span_start + timedelta(minutes=1))
        axes.axvspan(x(span_start), x(span_end), color="tab:red", alpha=0.15, label="alert")
        if window.band is not None:
            low, high = window.band
            axes.fill_between([x(window.start), x(window.end)], low, high, color="tab:green",
                              alpha=0.15, label="expected band")  # fmt: skip
        if window.expected is not None:
            axes.axhline(window.expected, color="tab:green", linewidth=1, linestyle="--",
                         label="expected")  # fmt: skip
        if len(window.points):
            times = [x(t.to_pydatetime()) for t in window.points["ts"]]
            axes.plot(times, window.points["value"].to_numpy(), color="tab:blue", linewidth=1.2,
                      label="value")  # fmt: skip
        else:
            axes.text(0.5, 0.5, "no samples in this window", transform=axes.transAxes,
                      ha="center", va="center")  # fmt: skip
        axes.set_xlim(x(window.start), x(window.end))
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("UTC")
        axes.legend(loc="upper left", fontsize=8)
        figure.autofmt_xdate()
        figure.tight_layout()
        sink = io.BytesIO()
        figure.savefig(sink, format="png")
    finally:
        plt.close(figure)
    return sink.getvalue()


def describe_series(detail: dict[str, Any]) -> str:
    labels = detail.get("labels") or {}
    inner = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(labels.items()))
    return f"{detail.get('metric', '?')}{{{inner}}}"


def alert_title(alert: dict[str, Any]) -> str:
    return (
        f"alert {alert['alert_id']} ({alert['severity']}, {alert['status']}): "
        + describe_series(alert.get("detail") or {})
    )


def _code(text: str) -> str:
    """`text` as markdown inline code (label values are anyone's text)."""
    return "`" + text.replace("`", "'").replace("\n", " ") + "`"


def alerts_markdown(store: Store, alert_ids: Sequence[int], now: datetime | None = None) -> str:
    """A markdown report with the picture of each alert (the first MAX_PLOTS of them)."""
    lines = [f"## Alerts opened by this run: {len(alert_ids)}", ""]
    for number, alert_id in enumerate(alert_ids):
        alert = store.alerts.get(int(alert_id))
        if alert is None:  # deleted since: nothing to draw
            continue
        if number >= MAX_PLOTS:
            lines.append(
                f"- alert {alert_id}: {_code(describe_series(alert.get('detail') or {}))} "
                f"(`metricmill alerts show {alert_id} --plot alert-{alert_id}.png`)"
            )
            continue
        window = alert_window(store, alert, now)
        picture = png(window, alert_title(alert), size=ARTIFACT_SIZE, dpi=80)
        encoded = base64.b64encode(picture).decode("ascii")
        band = "n/a" if window.band is None else f"{window.band[0]:.6g} .. {window.band[1]:.6g}"
        value = alert.get("value")
        shown = "n/a" if value is None or pd.isna(value) else f"{float(value):.6g}"
        lines += [
            f"### Alert {alert_id} ({alert['severity']}): "
            f"{_code(describe_series(alert.get('detail') or {}))}",
            "",
            f"rule {_code(str(alert['rule']))}, value {shown}, expected band {band}, "
            f"{len(window.points)} points drawn",
            "",
            f"![alert {alert_id}](data:image/png;base64,{encoded})",
            "",
        ]
    return "\n".join(lines)
