"""The wheel a user installs holds every package the code imports.

Builds the project's wheel with `uv build`, installs it into a fresh virtual environment and runs
it from a directory outside the checkout, so nothing can be imported from the source tree by
accident: `metricmill --help` must work and the flows must import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def _source_packages() -> set[str]:
    """Top-level Python packages of the checkout that ship (tests and benchmarks do not)."""
    return {
        p.parent.name
        for p in ROOT.glob("*/__init__.py")
        if p.parent.name not in {"tests", "benchmarks"}
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    work = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT"))}
    built = _run([uv, "build", "--wheel", "--out-dir", str(work / "dist"), str(ROOT)], work, env)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (work / "dist").glob("metricmill-*.whl")
    venv = work / "venv"
    made = _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], work, env)
    assert made.returncode == 0, made.stderr[-2000:]
    python = venv / "bin" / "python"
    put = _run([uv, "pip", "install", "--quiet", "--python", str(python), str(wheel)], work, env)
    assert put.returncode == 0, put.stderr[-2000:]
    return wheel, venv, work


def test_wheel_holds_every_source_package(installed: tuple[Path, Path, Path]) -> None:
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        shipped = {name.split("/", 1)[0] for name in zf.namelist() if "/" in name}
    missing = _source_packages() - shipped
    assert not missing, f"packages left out of the wheel: {sorted(missing)}"


def test_installed_cli_and_flows_work_outside_the_checkout(
    installed: tuple[Path, Path, Path],
) -> None:
    _, venv, work = installed
    outside = work / "elsewhere"
    outside.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["METRICMILL_HOME"] = str(work / "home")
    helped = _run([str(venv / "bin" / "metricmill"), "--help"], outside, env)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "Usage" in helped.stdout and "ingest" in helped.stdout
    probe = (
        "import flows.ingest, flows.detect, flows.baseline, flows.rollup, flows.retention\n"
        "import metricmill, pathlib\n"
        "print(pathlib.Path(metricmill.__file__).resolve())\n"
    )
    imported = _run([str(venv / "bin" / "python"), "-c", probe], outside, env)
    assert imported.returncode == 0, imported.stderr[-2000:]
    # The package came from the fresh environment, not from the source tree.
    assert str(venv.resolve()) in imported.stdout
