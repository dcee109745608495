"""What a retention preview or run did: one outcome per rule and level, and the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.archive import (
    ArchivedFile,
)

if TYPE_CHECKING:
    pass

from storage.retention.rules import LEVEL_TABLES


@dataclass
class Outcome:
    """One row of a retention summary: a rule (or default) at one level."""

    level: str
    rule: str
    days: int
    cutoff: str
    series: int
    deleted: int = 0
    archived: int = 0
    held: int = 0
    chunks_dropped: int = 0

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RetentionReport:
    dry_run: bool
    cutoff_day: str
    outcomes: list[Outcome] = field(default_factory=list)
    files: list[ArchivedFile] = field(default_factory=list)
    table_rows: dict[str, int] = field(default_factory=dict)
    compressed_chunks: int = 0

    def deleted_fraction(self) -> dict[str, float]:
        """Per table: the share of its rows this run deletes (or would delete)."""
        gone: dict[str, int] = {}
        for o in self.outcomes:
            gone[LEVEL_TABLES[o.level]] = gone.get(LEVEL_TABLES[o.level], 0) + o.deleted
        return {t: n / self.table_rows[t] for t, n in gone.items() if self.table_rows.get(t)}

    def summary(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoff_day": self.cutoff_day,
            "deleted": sum(o.deleted for o in self.outcomes),
            "archived": sum(o.archived for o in self.outcomes),
            "held": sum(o.held for o in self.outcomes),
            "files": len(self.files),
            "compressed_chunks": self.compressed_chunks,
            "rules": [o.row() for o in self.outcomes],
        }
