"""Settings: defaults under METRICMILL_HOME, environment, TOML file, validation, URL hygiene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metricmill.errors import SettingsError
from metricmill.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Only what a test sets itself: no METRICMILL_* from the caller's shell."""
    for name in list(os.environ):
        if name.startswith("METRICMILL_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("METRICMILL_HOME", str(home))
    return home


def test_defaults_live_under_metricmill_home(clean_env: Path) -> None:
    settings = load_settings()

    home = clean_env.resolve()
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'metrics.db'}"
    assert settings.landing == home / "landing"
    assert settings.archive == home / "archive"
    assert settings.quarantine == home / "quarantine"
    assert settings.exports == home / "exports"
    assert settings.retention_days == 30
    assert settings.timescaledb == "auto"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METRICMILL_DATABASE_URL", "postgresql://metrics@db.internal:5433/mm")
    monkeypatch.setenv("METRICMILL_RETENTION_DAYS", "7")
    monkeypatch.setenv("METRICMILL_EXPORT_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("METRICMILL_TIMESCALEDB", "require")

    settings = load_settings()

    assert settings.database_url == "postgresql://metrics@db.internal:5433/mm"
    assert settings.retention_days == 7
    assert settings.exports == (tmp_path / "elsewhere").resolve()
    assert settings.timescaledb == "require"


def test_toml_file_named_by_metricmill_config_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "mm.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path}/from-toml.db"\n'
        "retention_days = 9\n"
        'timescaledb = "off"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("METRICMILL_CONFIG", str(config))

    settings = load_settings()

    assert settings.database_url == f"sqlite:///{(tmp_path / 'from-toml.db').resolve()}"
    assert settings.retention_days == 9
    assert settings.timescaledb == "off"


def test_environment_beats_the_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "mm.toml"
    config.write_text("retention_days = 9\n", encoding="utf-8")
    monkeypatch.setenv("METRICMILL_CONFIG", str(config))
    monkeypatch.setenv("METRICMILL_RETENTION_DAYS", "3")

    assert load_settings().retention_days == 3


def test_toml_file_in_home_is_found_without_metricmill_config(clean_env: Path) -> None:
    clean_env.mkdir(parents=True)
    (clean_env / "metricmill.toml").write_text("retention_days = 11\n", encoding="utf-8")

    assert load_settings().retention_days == 11


def test_missing_config_file_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("METRICMILL_CONFIG", str(tmp_path / "absent.toml"))

    with pytest.raises(SettingsError, match="absent.toml"):
        load_settings()


def test_unsupported_database_scheme_is_refused_with_password_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SettingsError) as direct:
        load_settings(database_url="mysql://u:secret@h/db")
    monkeypatch.setenv("METRICMILL_DATABASE_URL", "mysql://u:secret@h/db")
    with pytest.raises(SettingsError) as from_env:
        load_settings()

    for err in (direct.value, from_env.value):
        assert "secret" not in str(err)
        assert "mysql" in str(err)
        assert "METRICMILL_DATABASE_URL" in str(err)


@pytest.mark.parametrize("days", [-1, 0])
def test_retention_days_must_be_positive(days: int) -> None:
    with pytest.raises(SettingsError, match="METRICMILL_RETENTION_DAYS"):
        load_settings(retention_days=days)


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("postgres://u:pw@db:5432/mm", "postgresql://u:pw@db:5432/mm"),
        ("postgresql+psycopg://u@db/mm", "postgresql://u@db/mm"),
        ("postgresql://u@db/mm", "postgresql://u@db/mm"),
    ],
)
def test_postgres_urls_normalise_to_postgresql(given: str, normalised: str) -> None:
    settings = load_settings(database_url=given)

    assert settings.database_url == normalised
    assert "pw" not in settings.masked_database_url
