"""One settings object: METRICMILL_* environment variables, then an optional TOML file.

The model is here; what its fields check and normalise is in settings_checks, where the values
come from (the file, Prefect Secret blocks) and how a failure reads in settings_loading. Every
name importable from this module before that split still is."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from metricmill.errors import SettingsError
from metricmill.secrets import install_log_redaction, remember, split_password
from metricmill.settings_checks import (
    MEMORY_URL,
    UPPER_BOUNDS,
    ScrapeTarget,
    check_archive_url,
    mask_url,
    normalise_database_url,
)
from metricmill.settings_loading import config_file_path, load, load_past_errors, secret_setting

__all__ = [
    "MEMORY_URL",
    "ScrapeTarget",
    "Settings",
    "check_archive_url",
    "config_file_path",
    "load_settings",
    "load_settings_past_errors",
    "mask_url",
    "normalise_database_url",
    "secret_setting",
]

install_log_redaction()  # settings are where passwords enter: from here on, logs hide them


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
        for names, high in UPPER_BOUNDS:
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


def load_settings(**overrides: Any) -> Settings:
    """Settings from overrides, the environment and the TOML file; one clear error if invalid.

    An override that is None or a blank string is not given (a field a custom-run form in the
    Prefect UI left empty arrives as ""): the environment, the file or the default applies."""
    return load(Settings, overrides)


def load_settings_past_errors(**overrides: Any) -> tuple[Settings | None, list[str]]:
    """Settings with every invalid field at its default, and the names of those fields, for
    `metricmill doctor` to run its other checks when a setting is wrong. (None, names) when
    the settings cannot be read even so (a TOML file that does not parse, a cross-field rule)."""
    return load_past_errors(Settings, overrides)
