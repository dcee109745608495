"""`metricmill alerts list|show|ack|resolve|silence|silences|rules`.

Registered by metricmill/cli/main.py under the name `alerts`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pandas as pd
import typer
from rich.table import Table

from metricmill.cli.common import (
    MAX_ID,
    FormatOption,
    ListFormat,
    check_range,
    counted,
    echo,
    format_labels,
    format_number,
    open_store,
    out,
    print_records,
    row,
    settings_from,
    table,
)
from metricmill.errors import MetricmillError
from metricmill.selectors import parse_selector
from metricmill.timeutil import parse_duration
from storage.store import Store

if TYPE_CHECKING:
    from tasks.alert_engine import AlertRule

alerts_app = typer.Typer(
    help="Alerts: list, show, ack, resolve, silence; alert rules.", no_args_is_help=True
)
rules_app = typer.Typer(help="Alert rules kept in the database (on top of settings).")
alerts_app.add_typer(rules_app, name="rules")

_STATUSES = ("open", "firing", "acknowledged", "resolved", "all")


class AlertCommandError(MetricmillError):
    """An alert command names something that does not exist or cannot change that way."""


def _now_us() -> int:
    return round(datetime.now(UTC).timestamp() * 1_000_000)


def _when(us: Any) -> str:
    if us is None or pd.isna(us):
        return "-"
    return datetime.fromtimestamp(int(us) / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else format_number(value)


def _series(detail: dict[str, Any]) -> str:
    return f"{detail.get('metric', '?')}{format_labels(detail.get('labels', {}))}"


def _alert_or_fail(store: Store, alert_id: int) -> dict[str, Any]:
    alert = store.alerts.get(alert_id) if 0 <= alert_id <= MAX_ID else None
    if alert is None:
        raise AlertCommandError(f"no alert {alert_id}: see `metricmill alerts list --status all`")
    return alert


@alerts_app.command("list")
def alerts_list(
    ctx: typer.Context,
    status: Annotated[str, typer.Option(help="open, firing, acknowledged, resolved or all.")] = (
        "open"
    ),
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    format: FormatOption = ListFormat.table,
) -> None:
    """Alerts, newest first (open ones by default)."""
    if status not in _STATUSES:
        raise AlertCommandError(f"unknown status {status!r}: use one of {', '.join(_STATUSES)}")
    check_range("--limit", limit, 1, 1_000_000)
    with open_store(ctx) as store:
        frame = store.alerts.find(status=None if status == "all" else status, limit=limit)
    records = []
    for alert in frame.to_dict("records"):
        silenced = alert["silence_id"] is not None and not pd.isna(alert["silence_id"])
        detail = alert["detail"] or {}
        records.append(
            {
                "id": int(alert["alert_id"]),
                "rule": alert["rule"],
                "metric": detail.get("metric"),
                "labels": detail.get("labels", {}),
                "severity": alert["severity"],
                "status": alert["status"],
                "since": _when(alert["started_at"]),
                "value": None if pd.isna(alert["value"]) else float(alert["value"]),
                "score": None if pd.isna(alert["score"]) else float(alert["score"]),
                "silenced_by": int(alert["silence_id"]) if silenced else None,
                "incident": bool(alert["incident"]),
            }
        )
    if format is not ListFormat.table:
        print_records(format, records, list(_LIST_COLUMNS))
        return
    if not records:
        typer.echo(f"no {'' if status == 'all' else status + ' '}alerts")
        return
    notes = [
        ", ".join(
            ([f"silenced by {r['silenced_by']}"] if r["silenced_by"] is not None else [])
            + (["incident"] if r["incident"] else [])
        )
        for r in records
    ]
    # The series gets the room: the other columns do not wrap, a column that is empty on every
    # row (note) is left out, rule too when every row has the same one (the caption names it),
    # and under 100 columns so are rule and score (`alerts show ID` and --format json have
    # them).
    console = out()
    wide = console.width >= 100
    rules = sorted({str(r["rule"]) for r in records})
    show_rule = wide and len(rules) > 1
    grid = Table(caption=counted(len(records), "alert"), box=None, padding=(0, 1), pad_edge=False)
    grid.add_column("id", no_wrap=True, justify="right")
    grid.add_column("series", overflow="fold", ratio=1, min_width=16)
    for name in ("rule",) * show_rule + ("severity", "status", "since"):
        grid.add_column(name, no_wrap=True)
    grid.add_column("value", no_wrap=True, justify="right")
    if wide:
        grid.add_column("score", no_wrap=True, justify="right")
    if any(notes):
        grid.add_column("note", overflow="fold")
    for r, note in zip(records, notes, strict=True):
        cells = [
            r["id"],
            f"{r['metric'] or '?'}{format_labels(r['labels'])}",
            *([r["rule"]] if show_rule else []),
            r["severity"],
            r["status"],
            r["since"],
            format_number(r["value"]),
            *([format_number(r["score"])] if wide else []),
        ]
        row(grid, *cells, *([note] if any(notes) else []))
    console.print(grid)


_LIST_COLUMNS = (
    "id", "rule", "metric", "labels", "severity", "status", "since", "value", "score",
    "silenced_by", "incident",
)  # fmt: skip


@alerts_app.command("show")
def alerts_show(
    ctx: typer.Context,
    alert_id: int,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write a PNG: the series around the alert, expected band, alert span.",
        ),
    ] = None,
) -> None:
    """One alert with its notifications (and, with --plot, its picture)."""
    from tasks.alert_plot import alert_window, render

    if plot is not None and plot.suffix.lower() != ".png":
        raise AlertCommandError(f"--plot {plot}: the picture is written as PNG: name it .png")
    with open_store(ctx) as store:
        alert = _alert_or_fail(store, alert_id)
        sent = store.alerts.notifications_for(alert_id)
        window = alert_window(store, alert)
    if window.band is not None:  # as drawn: clipped at 0 for a series that never goes negative
        alert = {**alert, "expected_low": window.band[0], "expected_high": window.band[1]}
    lines = [
        f"alert {alert['alert_id']}  {alert['status']}  {alert['severity']}",
        f"rule: {alert['rule']}  fingerprint: {alert['fingerprint']}",
        f"series: {_series(alert['detail'])}",
        f"value: {_num(alert['value'])}  expected: {_num(alert['expected'])} "
        f"[{_num(alert['expected_low'])} .. {_num(alert['expected_high'])}]  "
        f"score: {_num(alert['score'])}",
        f"since: {_when(alert['started_at'])}  updated: {_when(alert['updated_at'])}",
        f"acknowledged: {_when(alert['acknowledged_at'])}  resolved: {_when(alert['resolved_at'])}",
        f"incident: {'yes' if alert['incident'] else 'no'}  silenced by: "
        + (
            "-"
            if alert["silence_id"] is None or pd.isna(alert["silence_id"])
            else str(int(alert["silence_id"]))
        ),
    ]
    for line in lines:
        echo(line)
    grid = table("channel", "event", "attempts", "outcome", "error", "at", title="notifications")
    for note in sent.to_dict("records"):
        row(
            grid,
            note["channel"],
            note["event"],
            note["attempts"],
            note["outcome"],
            note["error"] or "",
            _when(note["sent_at"]),
        )
    out().print(grid)
    if plot is not None:
        title = f"alert {alert['alert_id']} ({alert['severity']}, {alert['status']}): " + _series(
            alert["detail"]
        )
        render(window, title, plot)
        echo(f"picture: {plot} ({len(window.points)} points)")


def _change(ctx: typer.Context, alert_id: int, status: str, incident: bool) -> None:
    with open_store(ctx) as store:
        alert = _alert_or_fail(store, alert_id)
        if alert["status"] == "resolved" and not (status == "resolved" and incident):
            raise AlertCommandError(f"alert {alert_id} is already resolved")
        if alert["status"] == status and not incident:
            raise AlertCommandError(f"alert {alert_id} is already {status}")
        new_status = alert["status"] if alert["status"] == "resolved" else status
        store.alerts.set_status(alert_id, status=new_status, now_us=_now_us(), incident=incident)
    note = " (confirmed incident: left out of baseline training)" if incident else ""
    typer.echo(f"alert {alert_id}: {new_status}{note}")


_INCIDENT = typer.Option(
    "--incident", help="Mark it a confirmed incident: its data is left out of baselines."
)


@alerts_app.command("ack")
def alerts_ack(
    ctx: typer.Context, alert_id: int, incident: Annotated[bool, _INCIDENT] = False
) -> None:
    """Acknowledge an open alert: no more repeats; it still resolves by itself."""
    _change(ctx, alert_id, "acknowledged", incident)


@alerts_app.command("resolve")
def alerts_resolve(
    ctx: typer.Context, alert_id: int, incident: Annotated[bool, _INCIDENT] = False
) -> None:
    """Resolve an alert by hand (with --incident, also on an already resolved one)."""
    _change(ctx, alert_id, "resolved", incident)


@alerts_app.command("silence")
def alerts_silence(
    ctx: typer.Context,
    matcher: Annotated[str, typer.Argument(help='metric{label="v"}, {label=~"re"} or metric.')],
    duration: Annotated[str, typer.Option("--for", help="How long, e.g. 30m, 2h, 1d.")],
    comment: Annotated[str | None, typer.Option(help="Why (shown in `alerts silences`).")] = None,
) -> None:
    """Silence alerts whose series match: they are still recorded, but not sent."""
    selector = parse_selector(matcher)
    if selector.metric is None and not selector.matchers:
        raise AlertCommandError("an empty matcher would silence everything: name labels")
    length = parse_duration(duration)
    start = _now_us()
    end = start + round(length.total_seconds() * 1_000_000)
    with open_store(ctx) as store:
        silence_id = store.alerts.add_silence(
            matcher=matcher.strip(), starts_us=start, ends_us=end, comment=comment
        )
    echo(f"silence {silence_id}: {matcher.strip()} until {_when(end)}")


@alerts_app.command("silences")
def alerts_silences(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Include expired silences.")] = False,
    format: FormatOption = ListFormat.table,
) -> None:
    """Active silences (with --all, expired ones too)."""
    with open_store(ctx) as store:
        found = store.alerts.silences(active_at_us=None if all_ else _now_us())
    if format is not ListFormat.table:
        records = [
            {"id": s.silence_id, "matcher": s.matcher, "from": _when(s.starts_us),
             "until": _when(s.ends_us), "comment": s.comment or ""}
            for s in found
        ]  # fmt: skip
        print_records(format, records, ["id", "matcher", "from", "until", "comment"])
        return
    grid = table("id", "matcher", "from", "until", "comment")
    for s in found:
        row(grid, s.silence_id, s.matcher, _when(s.starts_us), _when(s.ends_us), s.comment or "")
    out().print(grid)


@rules_app.command("list")
def rules_list(ctx: typer.Context, format: FormatOption = ListFormat.table) -> None:
    """Every rule in effect: the settings' default and those added here."""
    from tasks.alerting import load_rules

    settings = settings_from(ctx)
    with open_store(ctx) as store:
        rules = load_rules(settings, store)
        stored = {r["name"] for r in store.alerts.rules()}
        effective = _effective_thresholds(store, rules)
    if format is not ListFormat.table:
        records = _rule_records(rules, effective, stored, settings.alert_budget_per_week)
        print_records(format, records, list(records[0]) if records else ["name"])
        return
    out().print(_rules_table(rules, effective, stored, settings.alert_budget_per_week))


def _effective_thresholds(store: Store, rules: list[AlertRule]) -> dict[str, np.ndarray]:
    """Per rule, the effective warning threshold of each series with a learned baseline
    whose metric the rule matches."""
    from tasks.alert_engine import effective_threshold

    learned = store.detection.read_baselines().drop_duplicates("series_id")
    metrics = store.detection.series_metrics().set_index("series_id")["metric"]
    learned = learned.assign(metric=learned["series_id"].map(metrics).fillna(""))
    effective: dict[str, np.ndarray] = {}
    for r in rules:
        mine = learned[[r.matches(str(m)) for m in learned["metric"]]]
        effective[r.name] = effective_threshold(r, mine) if len(mine) else np.empty(0)
    return effective


def _rule_records(
    rules: list[AlertRule], effective: dict[str, np.ndarray], stored: set[str], budget: float
) -> list[dict[str, Any]]:
    """The rules as records, for --format json/csv (budget: the settings' default)."""
    return [
        {"name": r.name, "metrics": r.metric_pattern, "warn": r.threshold,
         "crit": r.critical_threshold, "for_seconds": r.for_seconds,
         "keep_firing_for_seconds": r.keep_firing_for_seconds,
         "min_abs_deviation": r.min_abs_deviation, "min_baseline_level": r.min_baseline_level,
         "repeat_interval_seconds": r.repeat_interval_seconds, "direction": r.direction,
         "budget_per_week": budget if r.alert_budget_per_week is None else r.alert_budget_per_week,
         "effective_median": (
             float(np.median(effective[r.name])) if len(effective[r.name]) else None
         ),
         "effective_max": float(np.max(effective[r.name])) if len(effective[r.name]) else None,
         "series": len(effective[r.name]),
         "from": "cli" if r.name in stored else "settings"}
        for r in rules
    ]  # fmt: skip


def _rules_table(
    rules: list[AlertRule], effective: dict[str, np.ndarray], stored: set[str], budget: float
) -> Table:
    """The rules as a table, with the median and maximum effective threshold."""
    grid = table(
        "name", "metrics", "warn", "crit", "for", "keep", "min dev", "min level", "repeat", "dir",
        "budget/wk", "effective (median / max)", "from",
    )  # fmt: skip
    for r in rules:
        mine_effective = effective[r.name]
        shown = (
            f"{np.median(mine_effective):.3f} / {np.max(mine_effective):.3f} "
            f"({len(mine_effective)} series)"
            if len(mine_effective)
            else "no baselines yet"
        )
        row(
            grid,
            r.name,
            r.metric_pattern,
            f"{r.threshold:g}",
            f"{r.critical_threshold:g}",
            f"{r.for_seconds:g}s",
            f"{r.keep_firing_for_seconds:g}s",
            f"{r.min_abs_deviation:g}",
            f"{r.min_baseline_level:g}",
            f"{r.repeat_interval_seconds:g}s",
            r.direction,
            f"{budget if r.alert_budget_per_week is None else r.alert_budget_per_week:g}",
            shown,
            "cli" if r.name in stored else "settings",
        )
    return grid


def _seconds(text: str) -> float:
    return 0.0 if text.strip() in {"0", "0s"} else parse_duration(text).total_seconds()


@rules_app.command("add")
def rules_add(
    ctx: typer.Context,
    name: str,
    metric: Annotated[str, typer.Option(help="Glob on the metric name.")] = "*",
    threshold: Annotated[float, typer.Option(help="Warning when score >= this.")] = 0.7,
    critical: Annotated[float, typer.Option(help="Critical when score >= this.")] = 0.9,
    for_: Annotated[str, typer.Option("--for", help="High this long before firing.")] = "5m",
    keep_firing_for: Annotated[str, typer.Option(help="Normal this long to resolve.")] = "15m",
    min_deviation: Annotated[float, typer.Option(help="Min |value - expected|.")] = 0.0,
    min_level: Annotated[float, typer.Option(help="Min baseline level to alert at all.")] = 0.0,
    repeat: Annotated[str, typer.Option(help="Re-send a firing alert after this.")] = "4h",
    direction: Annotated[
        str, typer.Option(help="up, down or both: which side of expected may alert.")
    ] = "both",
    budget: Annotated[
        float | None,
        typer.Option(help="Alerts per series and week (default: the baselines' budget)."),
    ] = None,
) -> None:
    """Add or replace a rule (a rule named `anomaly` replaces the settings' default)."""
    if not 0 < threshold <= critical <= 1:  # also refuses NaN
        raise AlertCommandError("need 0 < --threshold <= --critical <= 1")
    check_range("--min-deviation", min_deviation, 0, 1e300)  # finite, not negative
    check_range("--min-level", min_level, 0, 1e300)
    if direction not in ("up", "down", "both"):
        raise AlertCommandError("--direction must be up, down or both")
    if budget is not None:
        check_range("--budget", budget, 1e-6, 1e6)  # alerts per week: finite, above 0
    rule = {
        "name": name,
        "metric_pattern": metric,
        "threshold": threshold,
        "critical_threshold": critical,
        "for_seconds": _seconds(for_),
        "keep_firing_for_seconds": _seconds(keep_firing_for),
        "min_abs_deviation": min_deviation,
        "min_baseline_level": min_level,
        "repeat_interval_seconds": _seconds(repeat),
        "direction": direction,
        "alert_budget_per_week": budget,
    }
    with open_store(ctx) as store:
        store.alerts.upsert_rule(rule)
    echo(f"rule {name}: metrics {metric}, warn >= {threshold:g}, critical >= {critical:g}")


@rules_app.command("remove")
def rules_remove(ctx: typer.Context, name: str) -> None:
    """Remove a rule added with `rules add` (its open alerts stay until resolved by hand)."""
    with open_store(ctx) as store:
        if not store.alerts.delete_rule(name):
            raise AlertCommandError(f"no stored rule {name!r}: see `metricmill alerts rules list`")
    echo(f"rule {name} removed")
