"""The `metricmill` command line, one module per command group.

`common` holds what every group shares (global options, output formats, one-line errors,
printable names, tables); `main` builds the application from the core commands and the groups.
No module here imports `main` or this package's root, so the command modules form no cycle.
"""

from metricmill.cli.main import app

__all__ = ["app"]
