"""Errors a user can cause and fix: the CLI prints them as one line, never a traceback."""

from __future__ import annotations


class MetricmillError(Exception):
    """A mistake in input, configuration or environment that the user can correct."""


class SettingsError(MetricmillError):
    """A setting has a value metricmill cannot use."""


class SelectorError(MetricmillError):
    """A label selector is malformed."""


class QueryError(MetricmillError):
    """A query asks for something that cannot be answered (unknown metric, start after end)."""


class ExportPathError(MetricmillError):
    """An export path points outside the export directory."""


class DatabaseUnavailable(MetricmillError):
    """The database cannot be reached or opened."""


class SchemaError(MetricmillError):
    """The database schema is missing or newer than this version of metricmill."""
