"""The run directory: where it goes, when an existing one may be reused, and its small files."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig
from .errors import InputError
from .runtime import versions


def default_out(command: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<command>-<timestamp>``, with a suffix if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{command}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{command}-{stamp}-{n}"
    return path


def check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing non-empty ``--out`` unless ``--resume`` or ``--overwrite`` (checked before any work)."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: give one or the other")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} is a file, not a folder")
    if resume:
        if not out.is_dir() or not (out / "config.yaml").is_file():
            raise InputError(f"--out: nothing to resume in {out} (no config.yaml there)")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out: {out} exists and is not empty; use --resume to continue it or --overwrite to replace it")


def start(out: Path, *, overwrite: bool) -> None:
    """Create (or empty, with ``--overwrite``) the folder."""
    if overwrite and out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON (temp file + rename); NaN becomes null so any JSON reader takes it."""
    _atomic_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_config(out: Path, cfg: TrainConfig, **extra: Any) -> None:
    doc = {**cfg.to_dict(), **extra, "versions": versions()}
    _atomic_text(out / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def read_config(out: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The options a run was started with (for ``--resume``), and the extra keys."""
    path = out / "config.yaml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a mapping of options")
    names = set(TrainConfig.__dataclass_fields__)
    extra = {k: v for k, v in doc.items() if k not in names}
    return TrainConfig.from_dict({k: v for k, v in doc.items() if k in names}), extra


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):                               # numpy / torch scalars
        return _clean(obj.item())
    return obj
