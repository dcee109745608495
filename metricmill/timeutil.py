"""Parsing times and durations as users type them: `now`, `-2h`, ISO 8601, `5m`, `1h30m`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from metricmill.errors import QueryError

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str | int | float | timedelta) -> timedelta:
    """`90s`, `5m`, `1h30m`, `2d`, `1w`, or a number of seconds."""
    if isinstance(text, timedelta):
        value = text
    elif isinstance(text, int | float):
        value = timedelta(seconds=text)
    else:
        source = text.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", source):
            value = timedelta(seconds=float(source))
        else:
            parts = _DURATION.findall(source)
            if not parts or "".join(n + u for n, u in parts) != source:
                raise QueryError(f"invalid duration {text!r}: use forms like 30s, 5m, 1h30m, 2d")
            value = timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
    if value <= timedelta(0):
        raise QueryError(f"duration {text!r} must be positive")
    return value


def parse_time(text: str | datetime | None, *, now: datetime | None = None) -> datetime | None:
    """`now`, `-1h` (relative to now), an ISO 8601 time (naive means UTC), or epoch seconds."""
    if text is None:
        return None
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    source = text.strip()
    if source.lower() == "now":
        return now
    if source.startswith(("-", "+")) and not re.fullmatch(r"[-+]\d+(\.\d+)?", source):
        delta = parse_duration(source[1:])
        return now - delta if source[0] == "-" else now + delta
    if re.fullmatch(r"\d+(\.\d+)?", source):
        return datetime.fromtimestamp(float(source), UTC)
    try:
        parsed = datetime.fromisoformat(source.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"invalid time {text!r}: use ISO 8601 (2024-05-01T12:00:00Z), epoch seconds, "
            "'now' or a relative time like -2h"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
