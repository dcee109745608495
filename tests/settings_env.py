"""Tests run with only the metricmill settings they set themselves."""

from __future__ import annotations

import os

import pytest


def isolate_settings(monkeypatch: pytest.MonkeyPatch, **settings: object) -> None:
    """Drop the caller's METRICMILL_* settings (not the REQUIRE_ switches); set the given ones."""
    for name in list(os.environ):
        if name.startswith("METRICMILL_") and not name.startswith("METRICMILL_REQUIRE_"):
            monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv(f"METRICMILL_{name.upper()}", str(value))
