"""Data-quality contracts (Great Expectations suites) kept as code, versioned with metricmill.

Modules here import great_expectations lazily (it takes seconds to import), so importing them is
cheap; only building a suite loads GX.
"""
