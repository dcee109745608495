"""Guard rail: `Store` (and its facades) is the only storage object above storage/.

Every module of the product outside storage/ is parsed, and the test fails on an attribute
access `.backend` or `._backend` (on anything: `store.backend`, `health.backend`), a call
`.transaction(`, or an import of `storage.backend`. Code above storage/ asks `store.alerts`,
`store.retention`, `store.detection`, `store.rollups`, `store.quarantine`, `store.ops` or the
Store itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABOVE_STORAGE = ("metricmill", "tasks", "flows", "deployments", "expectations")
SKIPPED = (ROOT / "metricmill" / "devtools",)  # test tooling: drives servers, not a Store
# (path relative to the root, line) -> why it must reach below the facades. Keep it empty
# unless there is no other way; every entry needs its reason.
ALLOWED: dict[tuple[str, int], str] = {}


def violations(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for every reach below the Store in `source`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Attribute) and node.attr in ("backend", "_backend"):
            found.append((node.lineno, f"attribute .{node.attr}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "transaction"
        ):
            found.append((node.lineno, "call .transaction()"))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}")
                for a in node.names
                if a.name == "storage.backend" or a.name.startswith("storage.backend.")
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "storage.backend" or node.module.startswith("storage.backend."):
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module == "storage" and any(a.name == "backend" for a in node.names):
                found.append((node.lineno, "from storage import backend"))
    return sorted(found)


def product_modules() -> list[Path]:
    """Every Python module above storage/ (test tooling left out)."""
    files = []
    for package in ABOVE_STORAGE:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not any(path.is_relative_to(skipped) for skipped in SKIPPED):
                files.append(path)
    return files


def test_the_rule_is_checked_on_a_real_tree() -> None:
    modules = product_modules()
    names = {p.relative_to(ROOT).as_posix() for p in modules}
    # The packages that used to reach through are among those checked.
    assert {"tasks/alerting.py", "tasks/retention.py", "metricmill/cli/alerts.py"} <= names
    assert "metricmill/storage_system.py" in names and "flows/detect.py" in names
    assert not any(name.startswith("metricmill/devtools/") for name in names)
    assert len(modules) > 40


def test_nothing_above_storage_reaches_below_the_store() -> None:
    found = []
    for path in product_modules():
        relative = path.relative_to(ROOT).as_posix()
        for line, what in violations(path.read_text(encoding="utf-8"), relative):
            if (relative, line) not in ALLOWED:
                found.append(f"{relative}:{line}: {what}")
    assert not found, "use the Store's facades instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("rows = store.backend.execute('SELECT 1')", [(1, "attribute .backend")]),
        ("name = health.backend", [(1, "attribute .backend")]),
        ("with b.transaction():\n    pass", [(1, "call .transaction()")]),
        ("from storage.backend import Backend", [(1, "from storage.backend import ...")]),
        ("import storage.backend", [(1, "import storage.backend")]),
        ("from storage import backend, alerts", [(1, "from storage import backend")]),
        ("x = 1\nstore.alerts.get(3)\nstore.retention.rules()", []),
        ("x = store.alerts._backend", [(1, "attribute ._backend")]),
        ("from storage.backends import thing\nbackend = 1\nbackend_name = store.backend_name", []),
    ],
)
def test_the_checker_sees_each_kind_of_reach(source: str, expected: list[tuple[int, str]]) -> None:
    assert violations(source) == expected
