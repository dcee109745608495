"""One settings object: METRICMILL_* environment variables, then an optional TOML file."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import pydantic_settings
from pydantic import (
    BaseModel,
    ConfigDict,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from metricmill.errors import SettingsError
from metricmill.secrets import (
    install_log_redaction,
    quote_password,
    redact,
    remember,
    split_password,
)

install_log_redaction()  # settings are where passwords enter: from here on, logs hide them

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


class Settings(BaseSettings):
    """Everything metricmill can be told, with the defaults a single machine needs."""

    # allow_inf_nan=False: every float setting is finite (SETTLE_SECONDS=nan would never settle)
    model_config = SettingsConfigDict(env_prefix="METRICMILL_", extra="forbid", allow_inf_nan=False)

    home: Path = Path("~/.metricmill")
    database_url: str = ""
    # The database password, kept out of the URL wherever the URL is stored (flow parameters):
    # from METRICMILL_DATABASE_PASSWORD, or a Prefect Secret block named here.
    database_password: SecretStr | None = None
    database_password_block: str | None = None
    landing_dir: Path | None = None
    # a directory, or an object-store URL s3://bucket/prefix (storage/archive_root.py)
    archive_dir: Path | str | None = None
    quarantine_dir: Path | None = None
    export_dir: Path | None = None
    retention_days: int = 30
    timescaledb: Literal["auto", "off", "require"] = "auto"
    # ingestion
    settle_seconds: float = 2.0
    max_future_skew_seconds: float = 600.0
    max_new_series_per_batch: int = 5000
    max_labels: int = 32
    max_label_name_length: int = 128
    max_label_value_length: int = 2048
    line_protocol_precision: Literal["ns", "us", "ms", "s"] = "ns"
    # ingest runs that may work at once (PostgreSQL/TimescaleDB; SQLite keeps one writer: 1)
    ingest_max_parallel_runs: int = 1
    # bounds on one landed file, checked while it streams in (storage.limits)
    max_file_bytes: int = 1 << 30  # decompressed
    max_line_bytes: int = 1 << 20
    max_nesting_depth: int = 32
    max_row_labels: int = 1000
    max_bad_lines: int = 10_000
    # URLs, or {"url": ..., "job": ..., "labels": {...}} objects (ScrapeTarget)
    scrape_targets: list[ScrapeTarget] = []
    scrape_timeout_seconds: float = 10.0
    # push receiver (`metricmill receive`): where it listens, what it accepts, when it pushes back
    receive_host: str = "127.0.0.1"
    receive_port: int = 9201
    receive_max_request_bytes: int = 32 * 1024 * 1024
    receive_max_backlog_bytes: int = 1024 * 1024 * 1024
    receive_retry_after_seconds: int = 30
    receive_concurrency: int = 4
    receive_max_connections: int = 64
    receive_token: SecretStr | None = None
    receive_token_block: str | None = None

    @field_validator("scrape_targets", mode="before")
    @classmethod
    def _plain_urls(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator(
        "receive_max_request_bytes",
        "receive_max_backlog_bytes",
        "receive_retry_after_seconds",
        "receive_concurrency",
        "receive_max_connections",
    )
    @classmethod
    def _receive_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("receive_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError("must be a TCP port (0-65535; 0 picks a free one)")
        return value

    # retention and archival (raw samples keep `retention_days`; 0 for a level = keep forever)
    retention_1m_days: int = 90
    retention_5m_days: int = 365
    retention_1h_days: int = 730
    retention_1d_days: int = 0
    retention_confirm_fraction: float = 0.5
    compress_after_days: int = 7
    archive_anonymize: bool = False
    anonymize_labels: list[str] = []
    anonymize_drop_labels: list[str] = []
    anonymize_key: SecretStr | None = None
    anonymize_key_block: str | None = None
    anonymize_coarsen_seconds: int = 0
    # archives in object storage (archive_dir = s3://bucket/prefix): endpoint (empty: AWS),
    # region, keys (empty: the AWS default chain), and compliance-mode object lock
    archive_s3_endpoint: str | None = None
    archive_s3_region: str | None = None
    archive_s3_access_key_id: str | None = None
    archive_s3_secret_access_key: SecretStr | None = None
    archive_s3_secret_access_key_block: str | None = None
    archive_s3_timeout_seconds: float = 30.0
    archive_lock_days: int = 0

    @field_validator("archive_dir", mode="before")
    @classmethod
    def _archive_location(cls, value: Any) -> Any:
        """A URL stays a string (checked here), anything else is a directory."""
        if isinstance(value, str) and "://" in value:
            return check_archive_url(value)
        return Path(value) if isinstance(value, str) else value

    @field_validator("archive_s3_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"https?://[^/\s?#@]+/?", value):
            raise ValueError("give the endpoint as http(s)://HOST[:PORT], without a path")
        return value.rstrip("/") if value else None

    @field_validator("archive_s3_timeout_seconds")
    @classmethod
    def _timeout_positive(cls, value: float) -> float:
        if not 0 < value <= 3600:
            raise ValueError("must be between 0 and 3600 seconds")
        return value

    @field_validator(
        "retention_1m_days",
        "retention_5m_days",
        "retention_1h_days",
        "retention_1d_days",
        "compress_after_days",
        "anonymize_coarsen_seconds",
        "archive_lock_days",
    )
    @classmethod
    def _retention_not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative (0 keeps forever / turns it off)")
        return value

    @field_validator("retention_confirm_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("must be a fraction in (0, 1]")
        return value

    # rollups (hours of pending range per transaction; rows per level the DQ suite checks a run)
    rollup_chunk_hours: int = 6
    rollup_check_max_rows: int = 100_000

    @field_validator("rollup_chunk_hours", "rollup_check_max_rows")
    @classmethod
    def _rollup_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    # baselines and anomaly detection (detectors: metric glob -> ecod|iforest|copod|hbos; the
    # first matching glob wins, metrics matching none use ECOD)
    baseline_window_days: int = 28
    baseline_level: Literal["1m", "5m", "1h"] = "5m"
    baseline_chunk_series: int = 1000
    detectors: dict[str, str] = {"*": "ecod"}
    detector_max_fit_rows: int = 20_000
    detect_lookback_minutes: int = 60
    detect_shards: int = 1
    detect_dask_address: str | None = None

    @field_validator(
        "baseline_window_days",
        "baseline_chunk_series",
        "detector_max_fit_rows",
        "detect_lookback_minutes",
        "detect_shards",
    )
    @classmethod
    def _detection_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, value: dict[str, str]) -> dict[str, str]:
        known = ("ecod", "iforest", "copod", "hbos")
        cleaned = {pattern: name.strip().lower() for pattern, name in value.items()}
        for pattern, name in cleaned.items():
            if name not in known:
                raise ValueError(
                    f"unknown detector {name!r} for {pattern!r}: use one of {', '.join(known)}"
                )
        return cleaned

    # alerts and notifications: the default rule (named "anomaly", every metric; rules added
    # with `metricmill alerts rules add` come on top), and the Prefect notification blocks to
    # send through, as "block-type-slug/block-name" (e.g. "slack-webhook/ops")
    alert_rule_enabled: bool = True
    alert_threshold: float = 0.7
    alert_critical_threshold: float = 0.9
    alert_for_seconds: float = 300.0
    alert_keep_firing_for_seconds: float = 900.0
    alert_min_abs_deviation: float = 0.0
    alert_min_baseline_level: float = 0.0
    alert_repeat_interval_seconds: float = 14400.0
    # alerts a rule may raise per series and week: each baseline fit sets every series'
    # effective threshold from its own window so the rule would have fired at most this often
    alert_budget_per_week: float = 0.5
    notification_blocks: list[str] = []
    notify_email_to: list[str] = []
    notify_email_from: str | None = None
    notify_timeout_seconds: float = 10.0
    notify_retries: int = 3
    notify_backoff_seconds: float = 2.0

    @field_validator(
        "alert_for_seconds",
        "alert_keep_firing_for_seconds",
        "alert_min_abs_deviation",
        "alert_min_baseline_level",
        "alert_repeat_interval_seconds",
        "alert_budget_per_week",
        "notify_timeout_seconds",
        "notify_retries",
        "notify_backoff_seconds",
    )
    @classmethod
    def _alerting_not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("alert_threshold", "alert_critical_threshold")
    @classmethod
    def _alert_score(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("must be a score in (0, 1]")
        return value

    @field_validator("notification_blocks")
    @classmethod
    def _block_references(cls, value: list[str]) -> list[str]:
        cleaned = [v.strip() for v in value if v.strip()]
        for ref in cleaned:
            slug, _, name = ref.partition("/")
            if not slug or not name:
                raise ValueError(
                    f"notification block {ref!r} must be 'block-type-slug/block-name', "
                    "e.g. 'slack-webhook/ops'"
                )
        return cleaned

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        home = getattr(init_settings, "init_kwargs", {}).get("home")
        toml_file = config_file_path(home)
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        return normalise_database_url(value) if value else ""

    @field_validator(
        "retention_days", "max_new_series_per_batch", "max_labels", "ingest_max_parallel_runs"
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be a positive number")
        return value

    @field_validator("settle_seconds", "max_future_skew_seconds", "scrape_timeout_seconds")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'metrics.db'}"
        for name, default in (
            ("landing_dir", "landing"),
            ("archive_dir", "archive"),
            ("quarantine_dir", "quarantine"),
            ("export_dir", "exports"),
        ):
            current = getattr(self, name)
            if isinstance(current, str):  # an object-store URL (checked by its validator)
                continue
            path = (self.home / default) if current is None else current.expanduser()
            setattr(self, name, path.resolve())
        return self

    @model_validator(mode="after")
    def _password(self) -> Settings:
        """A server URL without a password gets the one from the environment or the block."""
        if not self.database_url.startswith("postgresql://"):
            return self
        url, in_url = split_password(self.database_url)
        password = in_url
        if password is None:
            password = secret_setting(self.database_password, self.database_password_block)
        if password is not None:
            remember(password)
            user, _, rest = url.partition("://")[2].partition("@")
            if rest:
                self.database_url = f"postgresql://{user}:{quote(password, safe='')}@{rest}"
        return self

    @model_validator(mode="after")
    def _within_bounds(self) -> Settings:
        """Sane upper bounds: a value past them is a typo, and would overflow a date or a
        buffer somewhere far from the setting that caused it."""
        for names, high in _UPPER_BOUNDS:
            for name in names:
                if getattr(self, name) > high:
                    raise ValueError(f"METRICMILL_{name.upper()}: must be at most {high:,}")
        for name in ("max_file_bytes", "max_line_bytes", "max_nesting_depth", "max_row_labels",
                     "max_bad_lines"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"METRICMILL_{name.upper()}: must be at least 1")
        return self

    def __repr_args__(self) -> Any:
        """repr() and str() show the URL masked (a settings object may end up in a log)."""
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name == "database_url" else value)

    @property
    def ingest_parallel_runs(self) -> int:
        """How many ingest runs may work at once: `ingest_max_parallel_runs` on a PostgreSQL
        server, always 1 on SQLite (one writer per file: a higher setting is clamped)."""
        if self.database_url.startswith("postgresql://"):
            return self.ingest_max_parallel_runs
        return 1

    @property
    def masked_database_url(self) -> str:
        return mask_url(self.database_url)

    def ensure_dirs(self) -> None:
        """Create the home and working directories (not for in-memory use)."""
        for path in (self.home, self.landing, self.quarantine, self.exports):
            path.mkdir(parents=True, exist_ok=True)
        if self.archive_url is None:
            self.archive.mkdir(parents=True, exist_ok=True)

    # The directory fields are filled by the validator; these give them a non-optional type.
    @property
    def landing(self) -> Path:
        assert self.landing_dir is not None
        return self.landing_dir

    @property
    def archive(self) -> Path:
        """The local archive directory (see archive_url for an object store)."""
        if isinstance(self.archive_dir, str):
            raise SettingsError(
                f"the archive is in object storage ({self.archive_dir}), not a directory"
            )
        assert self.archive_dir is not None
        return self.archive_dir

    @property
    def archive_url(self) -> str | None:
        """The archive's object-store URL (s3://bucket/prefix); None for a local directory."""
        return self.archive_dir if isinstance(self.archive_dir, str) else None

    @property
    def quarantine(self) -> Path:
        assert self.quarantine_dir is not None
        return self.quarantine_dir

    @property
    def exports(self) -> Path:
        assert self.export_dir is not None
        return self.export_dir


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


def _secret_block(name: str) -> str:
    """The value of a Prefect Secret block, "" when it holds none (Prefect is imported only
    when a block is named). ValueError when it cannot be loaded."""
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(name, _sync=True)  # type: ignore[call-arg]
        value = block.get()
    except Exception as exc:  # missing block, unreachable API: a setting that cannot be used
        raise ValueError(f"cannot load the Prefect Secret block {name!r}: {exc}") from None
    return "" if value is None else str(value)


def secret_setting(value: SecretStr | None, block: str | None) -> str | None:
    """A secret setting's value, else that of the Prefect Secret block the setting beside it
    names; None when neither gives one. ValueError when the block cannot be loaded."""
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    return (_secret_block(block) or None) if block else None


_DAY_FIELDS = (
    "retention_days", "retention_1m_days", "retention_5m_days", "retention_1h_days",
    "retention_1d_days", "compress_after_days", "baseline_window_days", "archive_lock_days",
)  # fmt: skip
_SECOND_FIELDS = (
    "settle_seconds", "max_future_skew_seconds", "scrape_timeout_seconds",
    "anonymize_coarsen_seconds", "alert_for_seconds", "alert_keep_firing_for_seconds",
    "alert_repeat_interval_seconds", "notify_timeout_seconds", "notify_backoff_seconds",
)  # fmt: skip
# (fields, the largest value each may take)
_UPPER_BOUNDS: tuple[tuple[tuple[str, ...], int], ...] = (
    (_DAY_FIELDS, 36_500),  # a century: further back than any sample can be
    (_SECOND_FIELDS, 366 * 86_400),
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


def config_file_path(home: str | Path | None = None) -> Path | None:
    """METRICMILL_CONFIG if set (it must exist), else HOME/metricmill.toml when present."""
    explicit = os.environ.get("METRICMILL_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SettingsError(f"METRICMILL_CONFIG points at {path}, which is not a file")
        return path
    home_dir = Path(home or os.environ.get("METRICMILL_HOME", "~/.metricmill")).expanduser()
    candidate = home_dir / "metricmill.toml"
    return candidate if candidate.is_file() else None


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def load_settings(**overrides: Any) -> Settings:
    """Settings from overrides, the environment and the TOML file; one clear error if invalid.

    An override that is None or a blank string is not given (a field a custom-run form in the
    Prefect UI left empty arrives as ""): the environment, the file or the default applies."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None and not _blank(v)})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            # err["msg"] never contains the input value; URLs are masked by the validator.
            problems.append(f"METRICMILL_{field.upper()}: {message}" if field else message)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
    except pydantic_settings.SettingsError as exc:
        # A list or dict setting that is not JSON: pydantic-settings names the field in quotes.
        text = str(exc)
        field = text.split('"')[1] if text.count('"') >= 2 else "?"
        raise SettingsError(
            f"invalid settings: METRICMILL_{field.upper()}: not valid JSON "
            '(a list is written ["a", "b"], a mapping {"key": "value"})'
        ) from None
    except tomllib.TOMLDecodeError as exc:
        where = config_file_path(overrides.get("home"))
        raise SettingsError(f"invalid settings: {where}: not TOML: {exc}") from None


def load_settings_past_errors(**overrides: Any) -> tuple[Settings | None, list[str]]:
    """Settings with every invalid field at its default, and the names of those fields, for
    `metricmill doctor` to run its other checks when a setting is wrong. (None, names) when
    the settings cannot be read even so (a TOML file that does not parse, a cross-field rule)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    replaced: dict[str, Any] = {}
    hidden: dict[str, str] = {}  # variables that do not even parse, out of the environment
    try:
        for _ in range(2 * len(Settings.model_fields) + 1):
            try:
                return Settings(**(given | replaced)), sorted(replaced)
            except ValidationError as exc:
                fields = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
            except pydantic_settings.SettingsError as exc:
                text = str(exc)
                fields = {text.split('"')[1]} if text.count('"') >= 2 else set()
                for name in list(os.environ):
                    if name.upper() in {f"METRICMILL_{f.upper()}" for f in fields}:
                        hidden[name] = os.environ.pop(name)
            except tomllib.TOMLDecodeError:
                return None, sorted(replaced)
            fields = {f for f in fields if f in Settings.model_fields and f not in replaced}
            if not fields:
                return None, sorted(replaced)
            for name in fields:
                replaced[name] = Settings.model_fields[name].get_default(call_default_factory=True)
        return None, sorted(replaced)
    finally:
        os.environ.update(hidden)
