"""What a person sees while a run goes: a one-line bar on a terminal, plain lines otherwise.

The library emits events (dicts with a ``kind``); only this module turns them into text.
Progress goes to stderr so that stdout stays clean for results (``predict --json | jq``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Renderer:
    """Draws training events; ``out`` writes results (stdout), ``err`` problems (stderr)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._bar_open = False
        self._start = time.monotonic()
        self._first_step = 0
        self._every = 1

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev["kind"]
        if kind == "start":
            self._start, self._first_step = time.monotonic(), ev["step"]
            self._every = max(1, ev["total_steps"] // 20)
            self._write(f"training {ev['train_size']:,} examples: {ev['epochs']} epochs × {ev['steps_per_epoch']} steps, "
                        f"{ev['precision']} on {ev['device']}, {ev['threads']} threads"
                        + (f" (resuming at step {ev['step']})" if ev["step"] else ""))
        elif kind == "step":
            done, total = ev["step"], ev["total_steps"]
            rate = (done - self._first_step) / max(time.monotonic() - self._start, 1e-9)
            eta = (total - done) / rate if rate > 0 else 0.0
            text = (f"epoch {ev['epoch']} step {done}/{total} loss {ev['loss']:.4f} "
                    f"{ev['tokens_per_s']:,.0f} tok/s ETA {_clock(eta)}")
            if self.tty:
                width = 24
                filled = int(width * done / max(total, 1))
                self._bar(f"[{'#' * filled}{'.' * (width - filled)}] {text}")
            elif done % self._every == 0 or done == total:
                self._write(text)
        elif kind == "eval":
            self._write(f"epoch {ev['epoch']}/{ev['epochs']}: validation {metrics_text(ev['metrics'])}"
                        + (" (best so far)" if ev["best"] else ""))
        elif kind == "test":
            self._write(f"test (best epoch): {metrics_text(ev['metrics'])}")
        elif kind == "baseline":
            self._write("evaluating the base model before training (validation and test)")
        elif kind == "baseline_done":
            self._start = time.monotonic()                  # the ETA counts training steps, not this evaluation
            for split, m in ev["metrics"].items():
                self._write(f"base model, {split}: {metrics_text(m)}")
        elif kind == "message":
            self._write(ev["text"])

    def _bar(self, text: str) -> None:
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()
        self._bar_open = True

    def _write(self, text: str) -> None:
        if self._bar_open:
            self.stream.write("\r\x1b[2K")
            self._bar_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        """A status line for the person (stdout, after closing any bar)."""
        self.close()
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def out(self, text: str) -> None:
        """A result line (stdout)."""
        sys.stdout.write(text + "\n")

    def err(self, text: str) -> None:
        self.close()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_open = False


METRIC_ORDER = ("loss", "accuracy", "f1", "roc_auc", "perplexity", "exact_match")


def metrics_text(m: dict[str, Any]) -> str:
    """``loss 0.4123 accuracy 0.8125 f1 0.8100`` for whichever of the known metrics ``m`` holds (classification:
    loss, accuracy, f1, roc_auc; causal LM: loss, accuracy where a label set, perplexity, exact_match)."""
    return " ".join(f"{k} {m[k]:.4f}" for k in METRIC_ORDER if isinstance(m.get(k), (int, float)))
