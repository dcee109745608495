"""Data-quality contracts (Great Expectations suites) kept as code, versioned with metricmill.

Modules here import great_expectations lazily (it takes seconds to import), so importing them is
cheap; only building a suite loads GX.
"""

from __future__ import annotations

import logging
from typing import Any


def quiet_ephemeral_context() -> Any:
    """An ephemeral GX context, with GX's INFO lines (a dozen on import, "Created temporary
    directory ... for ephemeral docs site" for every context) left out unless someone set GX's
    log level (`metricmill demo --verbose` does): noise on every flow run otherwise."""
    gx_logger = logging.getLogger("great_expectations")
    quiet = gx_logger.level == logging.NOTSET
    if quiet:
        gx_logger.setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types import base

    if quiet:  # this module sets its own logger to INFO on import
        logging.getLogger(base.__name__).setLevel(logging.WARNING)
    return gx.get_context(mode="ephemeral")
