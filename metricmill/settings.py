"""One settings object: METRICMILL_* environment variables, then an optional TOML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from metricmill.errors import SettingsError

MEMORY_URL = "sqlite:///:memory:"
_SQLITE_SCHEMES = {"sqlite", "sqlite+pysqlite"}
_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"}


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to print or log."""
    if url == MEMORY_URL:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Not parseable as a URL: hide everything between '://' and '@', if present.
        head, sep, tail = url.partition("://")
        if sep and "@" in tail:
            return f"{head}://***@{tail.rsplit('@', 1)[1]}"
        return url


def normalise_database_url(url: str) -> str:
    """Canonical form of a database URL: sqlite:///ABS_PATH, sqlite:///:memory: or postgresql://…"""
    url = url.strip()
    if url in {"memory", "memory://", ":memory:", "sqlite://", "sqlite:///:memory:"}:
        return MEMORY_URL
    try:
        parsed = make_url(url)
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

    model_config = SettingsConfigDict(env_prefix="METRICMILL_", extra="forbid")

    home: Path = Path("~/.metricmill")
    database_url: str = ""
    landing_dir: Path | None = None
    archive_dir: Path | None = None
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
    scrape_targets: list[str] = []
    scrape_timeout_seconds: float = 10.0

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

    @field_validator("retention_days", "max_new_series_per_batch", "max_labels")
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
            path = (self.home / default) if current is None else current.expanduser()
            setattr(self, name, path.resolve())
        return self

    @property
    def masked_database_url(self) -> str:
        return mask_url(self.database_url)

    def ensure_dirs(self) -> None:
        """Create the home and working directories (not for in-memory use)."""
        for path in (self.home, self.landing, self.archive, self.quarantine, self.exports):
            path.mkdir(parents=True, exist_ok=True)

    # The directory fields are filled by the validator; these give them a non-optional type.
    @property
    def landing(self) -> Path:
        assert self.landing_dir is not None
        return self.landing_dir

    @property
    def archive(self) -> Path:
        assert self.archive_dir is not None
        return self.archive_dir

    @property
    def quarantine(self) -> Path:
        assert self.quarantine_dir is not None
        return self.quarantine_dir

    @property
    def exports(self) -> Path:
        assert self.export_dir is not None
        return self.export_dir


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


def load_settings(**overrides: Any) -> Settings:
    """Settings from overrides, the environment and the TOML file; one clear error if invalid."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "settings"
            env_name = f"METRICMILL_{field.upper()}"
            # err["msg"] never contains the input value; URLs are masked by the validator.
            problems.append(f"{env_name}: {err['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
