"""Query results to JSON, CSV and Parquet files, confined to the export directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import pandas as pd

from metricmill.errors import ExportPathError

ExportFormat = Literal["json", "csv", "parquet"]
FORMATS: tuple[ExportFormat, ...] = ("json", "csv", "parquet")


def confined_path(export_dir: Path, requested: str | Path) -> Path:
    """`requested` inside export_dir, refusing absolute paths, `..` and symlinks leading out."""
    text = str(requested)
    if not text.strip():
        raise ExportPathError("export path is empty")
    candidate = Path(text)
    if candidate.is_absolute():
        raise ExportPathError(
            f"export path {text!r} is absolute: give a path relative to {export_dir}"
        )
    if ".." in candidate.parts:
        raise ExportPathError(f"export path {text!r} contains '..': it must stay in {export_dir}")
    try:
        root = export_dir.resolve()
        target = (root / candidate).resolve()  # follows symlinks anywhere along the path
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop
        raise ExportPathError(f"export path {text!r} cannot be resolved: {exc}") from None
    if target != root and root not in target.parents:
        raise ExportPathError(f"export path {text!r} leads outside {export_dir} through a symlink")
    if target == root or target.is_dir():
        raise ExportPathError(f"export path {text!r} is a directory, not a file")
    return target


def write_export(frame: pd.DataFrame, target: Path, fmt: ExportFormat) -> Path:
    """Write atomically (temporary file, then rename) so readers never see half a file."""
    if fmt not in FORMATS:
        raise ExportPathError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    out = frame.copy()
    out["ts"] = out["ts"].map(lambda t: t.isoformat()) if fmt != "parquet" else out["ts"]
    try:
        if fmt == "json":
            records = out.to_dict(orient="records")
            tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
        elif fmt == "csv":
            out["labels"] = out["labels"].map(
                lambda d: json.dumps(d, sort_keys=True, ensure_ascii=False)
            )
            out.to_csv(tmp, index=False)
        else:
            out["labels"] = out["labels"].map(lambda d: list(d.items()))
            out.to_parquet(tmp, index=False, compression="zstd")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
