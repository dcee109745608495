"""What `Store.health()` reports: the backend, its schema version, details and problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Health:
    ok: bool
    backend: str
    schema_version: int | None
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
