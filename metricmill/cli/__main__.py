"""`python -m metricmill.cli`: the same as the `metricmill` command."""

from metricmill.cli.main import app

app()
