"""Training checkpoints: one file per save, written atomically, loaded without unpickling code.

A checkpoint holds everything that makes a resumed run equal an uninterrupted one: the trainable
tensors, optimizer, scheduler and loss-scaler states, the torch RNG, the position in the data
(epoch, next batch), the best epoch so far, whether early stopping fired and the metrics log's length.
What goes in is ``TrainState.to_checkpoint`` (state.py); this module only writes, lists and reads files.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from loratune.errors import InputError

log = logging.getLogger(__name__)
KEEP = 2                                          # the newest two: one may be cut short by a crash
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``folder/step-<step>.pt`` via a temp file + fsync + rename; prune older ones."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:                                   # disk full: the previous checkpoint stays as it was
        tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (``weights_only=True``): a checkpoint can't run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file, whatever torch raises
        raise InputError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise InputError(f"{path}: not a loratune checkpoint")
    return state


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a damaged newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load_checkpoint(path)
        except InputError as e:
            log.warning("skipping damaged checkpoint: %s", e)
    return None
