"""Decode one landed file in a process of its own.

A file that several runs died while decoding is either poison (it kills whatever decodes it:
a native crash, memory beyond the machine) or innocent (the runs were killed by something
else while it happened to be the file in hand: a deploy, an operator, the kernel's
out-of-memory killer choosing that process). A separate process tells the two apart before the
run opens the file again: if it dies too, the file is poison; if it ends, the file is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from storage.limits import ReadLimits

# Longer than any decode of a file within the read limits takes here (1 GiB: about a minute).
ISOLATED_DECODE_SECONDS = 900

_ENTRY = "import sys; from storage.readers.isolated import main; sys.exit(main(sys.argv[1:]))"


def decode_alone(
    path: Path,
    *,
    precision: str,
    limits: ReadLimits,
    timeout: float = ISOLATED_DECODE_SECONDS,
) -> str | None:
    """Decode `path` in a child process: None when the child ended on its own (having decoded
    the file or refused it with an error the run's own decode will report), otherwise how it
    ended (killed by a signal, crashed, or still decoding after `timeout` seconds)."""
    command = [sys.executable, "-c", _ENTRY, str(path), precision]
    command.append(json.dumps(dataclasses.asdict(limits)))
    # The child imports this package from wherever this process does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run(command, env=env, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"a separate process was still decoding it after {timeout:g} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return f"a separate process decoding it alone was killed by {name}"
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    last = f": {lines[-1][:200]}" if lines else ""
    return f"a separate process decoding it alone exited with status {done.returncode}{last}"


def main(argv: list[str]) -> int:
    """The child: decode the file and end; an error the decode raises is the file's answer,
    reported by the run's own decode, so it ends this process normally too."""
    from storage.readers import read_landed_file

    path, precision, limits = Path(argv[0]), argv[1], ReadLimits(**json.loads(argv[2]))
    with contextlib.suppress(Exception):  # refused cleanly: not what this process looks for
        read_landed_file(path, precision=precision, limits=limits)
    return 0
