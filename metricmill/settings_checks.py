"""What the settings check and normalise, apart from the model itself: database URLs (and their
masked form), the archive's object-store URL, scrape targets and the upper bounds of numbers."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator

from metricmill.secrets import quote_password, redact

MEMORY_URL = "sqlite:///:memory:"
_SQLITE_SCHEMES = {"sqlite", "sqlite+pysqlite"}
_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"}
# sqlite:///PATH with nothing to decode: read without SQLAlchemy, whose import costs more than
# half a second of every CLI command's start-up.
_PLAIN_SQLITE_URL = re.compile(r"sqlite(?:\+pysqlite)?:///(?P<path>[^?#%]*)")


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class ScrapeTarget(BaseModel):
    """One scrape target, as Prometheus's static_configs put it: a URL, the `job` label its
    samples get, and labels added to each of them (a plain URL string means job "scrape")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    job: str = "scrape"
    labels: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"not an http(s) URL: {redact(value)!r}")
        return value

    @field_validator("job")
    @classmethod
    def _job(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("job must not be empty")
        return value

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ValueError(f"label name {name!r} is not a Prometheus label name")
            if name in {"job", "instance"}:
                raise ValueError(f"label {name!r} is set by the target: use its 'job' key")
        return value


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to print or log (see `redact`)."""
    return url if url == MEMORY_URL else redact(url)


def normalise_database_url(url: str) -> str:
    """Canonical form of a database URL: sqlite:///ABS_PATH, sqlite:///:memory: or postgresql://…"""
    url = url.strip()
    if url in {"memory", "memory://", ":memory:", "sqlite://", "sqlite:///:memory:"}:
        return MEMORY_URL
    plain = _PLAIN_SQLITE_URL.fullmatch(url)
    if plain is not None:
        database = plain["path"]
        if not database or database == ":memory:":
            return MEMORY_URL
        return f"sqlite:///{Path(database).expanduser().resolve()}"
    from sqlalchemy.engine import make_url  # only for URLs that need its parser
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(quote_password(url))
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"not a database URL: {mask_url(url)!r}") from exc
    scheme = parsed.drivername
    if scheme in _SQLITE_SCHEMES:
        if not parsed.database or parsed.database == ":memory:":
            return MEMORY_URL
        path = Path(parsed.database).expanduser().resolve()
        return f"sqlite:///{path}"
    if scheme in _POSTGRES_SCHEMES:
        return parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    raise ValueError(
        f"unsupported database {scheme!r} in {mask_url(url)!r}: "
        "use sqlite:///PATH, memory:// or postgresql://USER@HOST:PORT/DB"
    )


# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_archive_url(url: str) -> str:
    """An archive URL as given, or ValueError saying what is wrong with it (for settings)."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(
            f"unsupported archive URL scheme {parts.scheme!r}: give a directory or "
            "s3://BUCKET/PREFIX"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(
            "the archive URL takes no credentials, query or fragment: set "
            "METRICMILL_ARCHIVE_S3_ACCESS_KEY_ID and METRICMILL_ARCHIVE_S3_SECRET_ACCESS_KEY"
        )
    if not _BUCKET.fullmatch(parts.netloc):
        raise ValueError(f"{parts.netloc!r} is not an S3 bucket name (s3://BUCKET/PREFIX)")
    prefix = parts.path.strip("/")
    if any(piece in ("", ".", "..") for piece in prefix.split("/")) and prefix:
        raise ValueError("the archive URL's prefix has an empty, '.' or '..' part")
    return f"s3://{parts.netloc}/{prefix}".rstrip("/")


DAY_FIELDS = (
    "retention_days", "retention_1m_days", "retention_5m_days", "retention_1h_days",
    "retention_1d_days", "compress_after_days", "baseline_window_days", "archive_lock_days",
)  # fmt: skip
SECOND_FIELDS = (
    "settle_seconds", "max_future_skew_seconds", "scrape_timeout_seconds",
    "anonymize_coarsen_seconds", "alert_for_seconds", "alert_keep_firing_for_seconds",
    "alert_repeat_interval_seconds", "notify_timeout_seconds", "notify_backoff_seconds",
)  # fmt: skip
# (fields, the largest value each may take)
UPPER_BOUNDS: tuple[tuple[tuple[str, ...], int], ...] = (
    (DAY_FIELDS, 36_500),  # a century: further back than any sample can be
    (SECOND_FIELDS, 366 * 86_400),
    (("detect_lookback_minutes",), 366 * 24 * 60),
    (("max_file_bytes",), 1 << 40),
    (("max_line_bytes",), 1 << 30),
    # JSON nested deeper than this would recurse past Python's limit in the json module
    (("max_nesting_depth",), 256),
    (("max_row_labels", "max_labels"), 100_000),
    (("max_bad_lines",), 100_000_000),
    (("max_new_series_per_batch", "rollup_check_max_rows", "detector_max_fit_rows"), 10**9),
    (("max_label_name_length", "max_label_value_length"), 1 << 20),
    (("rollup_chunk_hours",), 24 * 366),
    (("ingest_max_parallel_runs",), 1024),  # an advisory lock slot each
    (("baseline_chunk_series", "detect_shards", "notify_retries"), 1_000_000),
)
