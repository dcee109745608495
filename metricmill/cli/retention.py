"""`metricmill retention list|add|remove|preview|apply` and `metricmill archive export|list|verify`.

Registered by metricmill/cli.py (which this module imports helpers from, so it is imported
at the bottom of cli.py).
"""

from __future__ import annotations

from typing import Annotated

import typer

from metricmill.cli.common import (
    MAX_ID,
    FormatOption,
    ListFormat,
    check_range,
    counted,
    echo,
    format_number,
    open_store,
    out,
    print_records,
    row,
    settings_from,
    table,
)
from metricmill.errors import MetricmillError
from metricmill.timeutil import parse_time
from storage.retention import (
    LEVELS,
    MAX_RETENTION_DAYS,
    RetentionReport,
    RetentionRuleError,
)
from storage.store import Store

retention_app = typer.Typer(
    help="Retention rules and legal holds: list, add, remove, preview, apply.",
    no_args_is_help=True,
)
archive_app = typer.Typer(
    help="The Parquet archive: ad-hoc (anonymized) exports, the manifest, verification.",
    no_args_is_help=True,
)


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RetentionRuleError(f"--label {pair!r}: use NAME=VALUE, e.g. --label host=host_1")
        labels[key.strip()] = value
    return labels


@retention_app.command("list")
def retention_list(ctx: typer.Context, format: FormatOption = ListFormat.table) -> None:
    """The rules, highest priority first per level; legal holds are marked."""
    with open_store(ctx) as store:
        rules = store.retention.rules()
        settings = store.settings
    if format is not ListFormat.table:
        records = [
            {
                "id": rule.rule_id, "pattern": rule.metric_pattern, "labels": rule.labels or {},
                "level": rule.level, "days": rule.retention_days, "priority": rule.priority,
                "archive": rule.archive, "legal_hold": rule.legal_hold,
                "lock_days": rule.lock_days(settings.archive_lock_days) if rule.archives else None,
            }
            for rule in rules
        ]  # fmt: skip
        columns = [
            "id", "pattern", "labels", "level", "days", "priority", "archive", "legal_hold",
            "lock_days",
        ]  # fmt: skip
        print_records(format, records, columns)
        return
    grid = table(
        "id", "pattern", "labels", "level", "days", "priority", "archive", "legal hold", "lock"
    )  # fmt: skip
    for rule in rules:
        lock = rule.lock_days(settings.archive_lock_days) if rule.archives else 0
        row(
            grid, rule.rule_id, rule.metric_pattern, rule.labels or "", rule.level,
            rule.retention_days if rule.retention_days is not None else "-", rule.priority,
            "yes" if rule.archive else "no", "HOLD" if rule.legal_hold else "",
            f"{lock}d" if lock else "-",
        )  # fmt: skip
    out().print(grid)
    defaults = ", ".join(
        f"{level} {days}d" if days else f"{level} forever"
        for level, days in (
            ("raw", settings.retention_days),
            ("1m", settings.retention_1m_days),
            ("5m", settings.retention_5m_days),
            ("1h", settings.retention_1h_days),
            ("1d", settings.retention_1d_days),
        )
    )
    typer.echo(f"defaults for unmatched series: {defaults}")


@retention_app.command("add")
def retention_add(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="Metric name glob, e.g. 'container_cpu_*'")],
    days: Annotated[
        int | None, typer.Option(help="Keep this many days (not with --legal-hold)")
    ] = None,
    label: Annotated[list[str], typer.Option(help="NAME=VALUE the series must have")] = [],  # noqa: B006
    priority: Annotated[int, typer.Option(help="Higher wins when rules overlap")] = 0,
    level: Annotated[str, typer.Option(help=f"One of {', '.join(LEVELS)}")] = "raw",
    archive: Annotated[bool, typer.Option(help="Archive raw data to Parquet first")] = True,
    legal_hold: Annotated[bool, typer.Option(help="Keep matching series, every level")] = False,
    lock_days: Annotated[
        int | None,
        typer.Option(
            help="Compliance-lock this rule's archive files for this many days after their day "
            "(object stores with object lock; default: METRICMILL_ARCHIVE_LOCK_DAYS; 0: none)"
        ),
    ] = None,
) -> None:
    """Add a retention rule or a legal hold."""
    if days is not None:
        check_range("--days", days, 1, MAX_RETENTION_DAYS)
    if lock_days is not None:
        check_range("--lock-days", lock_days, 0, MAX_RETENTION_DAYS)
    check_range("--priority", priority, -(10**9), 10**9)
    with open_store(ctx) as store:
        rule = store.retention.add_rule(
            pattern, days, parse_labels(label), priority,
            level=level, archive=archive, legal_hold=legal_hold, archive_lock_days=lock_days,
        )  # fmt: skip
    kind = "legal hold" if rule.legal_hold else f"rule ({rule.level}, {rule.retention_days} days)"
    if rule.archive_lock_days:
        kind += f", archive files locked {rule.archive_lock_days} days"
    echo(f"added {kind} {rule.rule_id}: {rule.name.split(' ', 1)[1]}")


@retention_app.command("remove")
def retention_remove(
    ctx: typer.Context, rule_id: Annotated[int, typer.Argument(help="Rule id from `list`")]
) -> None:
    """Remove a rule (removing a legal hold lets its series age out again)."""
    check_range("rule id", rule_id, 1, MAX_ID)
    with open_store(ctx) as store:
        rule = store.retention.remove_rule(rule_id)
    echo(f"removed rule {rule.rule_id}: {rule.name.split(' ', 1)[1]}")


def print_report(report: RetentionReport) -> None:
    verb = "would be " if report.dry_run else ""
    grid = table(
        "level", "rule", "days", "cutoff", "series", f"{verb}deleted", f"{verb}archived",
        "kept by hold", title="retention" + (" preview" if report.dry_run else ""),
    )  # fmt: skip
    for o in report.outcomes:
        row(grid, o.level, o.rule, o.days, o.cutoff, o.series, o.deleted, o.archived, o.held)
    console = out()
    console.print(grid)
    for tbl, share in sorted(report.deleted_fraction().items()):
        console.print(f"{tbl}: {share:.1%} of {report.table_rows[tbl]:,} rows {verb}deleted")
    if report.files:
        files = table("file", "rows", "sha256", title="archive files written")
        for item in report.files:
            row(files, item.path, item.rows, item.sha256)
        console.print(files)


@retention_app.command("preview")
def retention_preview(ctx: typer.Context) -> None:
    """Per rule and level: rows that would be deleted, archived, or kept by a legal hold."""
    with open_store(ctx) as store:
        report = store.retention.preview()
    print_report(report)


@retention_app.command("apply")
def retention_apply(
    ctx: typer.Context,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm a run that deletes a large share of a table")
    ] = False,
) -> None:
    """Archive (verified) and delete what the rules let go; legal holds are kept."""
    with open_store(ctx) as store:
        planned = store.retention.preview()
        limit = store.settings.retention_confirm_fraction
        too_much = {t: f for t, f in planned.deleted_fraction().items() if f > limit}
        if too_much and not yes:
            worst = ", ".join(f"{t} {f:.0%}" for t, f in sorted(too_much.items()))
            raise MetricmillError(
                f"this would delete {worst} of the rows (more than retention_confirm_fraction "
                f"{limit:g}): check `metricmill retention preview`, then rerun with --yes"
            )
        anonymizer = None
        if store.settings.archive_anonymize:
            from tasks.retention import anonymizer_for  # imports Prefect: only when needed

            anonymizer = anonymizer_for(store.settings)
        report = store.retention.apply(anonymizer=anonymizer)
    print_report(report)


@archive_app.command("export")
def archive_export(
    ctx: typer.Context,
    start: Annotated[str, typer.Option(help="ISO time, epoch, or relative (-7d)")],
    end: Annotated[str, typer.Option(help="ISO time, epoch, now, or relative")] = "now",
    metric: Annotated[str | None, typer.Option(help="Only this metric")] = None,
    anonymize: Annotated[
        bool, typer.Option(help="HMAC the configured labels, drop others, coarsen times")
    ] = False,
    output: Annotated[
        str | None, typer.Option(help="File under the export directory (.parquet)")
    ] = None,
) -> None:
    """Raw samples of a time range as one Parquet file under the export directory."""
    settings = settings_from(ctx)
    anonymizer = None
    if anonymize:
        from tasks.retention import anonymizer_for  # imports Prefect: only when needed

        anonymizer = anonymizer_for(settings)
    start_dt, end_dt = parse_time(start), parse_time(end)
    assert start_dt is not None and end_dt is not None
    with Store.open(settings=settings) as store:
        path, rows = store.retention.export_parquet(
            output, start_dt, end_dt, metric=metric, anonymizer=anonymizer
        )
    typer.echo(f"exported {rows} rows to {path}" + (" (anonymized)" if anonymize else ""))


@archive_app.command("list")
def archive_list(
    ctx: typer.Context,
    metric: Annotated[str | None, typer.Option()] = None,
    format: FormatOption = ListFormat.table,
) -> None:
    """Archive files recorded in the manifest."""
    with open_store(ctx) as store:
        frame = store.retention.manifest(metric)
    records = [
        {"path": str(path), "rows": int(rows), "series": int(series), "sha256": str(sha)}
        for path, rows, series, sha in zip(
            frame["path"], frame["rows"], frame["series"], frame["sha256"], strict=True
        )
    ]
    if format is not ListFormat.table:
        print_records(format, records, ["path", "rows", "series", "sha256"])
        return
    grid = table("path", "rows", "series", "sha256", caption=counted(len(frame), "file"))
    for r in records:
        row(grid, r["path"], format_number(r["rows"]), format_number(r["series"]), r["sha256"])
    out().print(grid)


@archive_app.command("verify")
def archive_verify(ctx: typer.Context) -> None:
    """Check every archive file against its manifest row; exit 1 on any problem."""
    with open_store(ctx) as store:
        problems = store.retention.verify_archive()
        count = len(store.retention.manifest())
    for path, problem in problems:
        echo(f"{path}: {problem}", err=True)
    typer.echo(f"{count} files in the manifest, {len(problems)} problems")
    if problems:
        raise typer.Exit(1)
