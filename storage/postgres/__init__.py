"""PostgreSQL and TimescaleDB: everything metricmill says in their SQL, one module per idea.

- backend: `PostgresBackend`, the connection, the schema and the dialect's answers
- parts: the write path, one or many ingest batches ("parts") in one transaction
- series / samples: the write path's two halves (series resolution, rows by COPY and upsert)
- copy_format: COPY's binary format, both ways, in one numpy pass
- timescale: the extension, hypertables and chunk housekeeping
"""

from storage.postgres.backend import PostgresBackend
from storage.postgres.timescale import TimescaleMode

__all__ = ["PostgresBackend", "TimescaleMode"]
