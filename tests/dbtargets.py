"""The database a test runs against, as handed out by the db_target fixtures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DbTarget:
    """One backend for a test: ``name`` is "sqlite", "postgres" or "timescaledb".

    ``url`` is an SQLAlchemy/libpq style URL of a fresh, empty database (for postgres targets
    ``postgresql://`` — pick a driver such as ``postgresql+psycopg://`` where one is needed).
    ``timescaledb`` is "require" when the database must use the TimescaleDB extension, else "off".
    """

    name: str
    url: str
    timescaledb: str  # "off" or "require"
