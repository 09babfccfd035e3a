"""Training options: one frozen dataclass, validated on construction.

Every field is a CLI flag (``--rank``, ``--batch-size``) and a YAML key (``rank``, ``batch_size``)
with the same default. Construction checks types and ranges and raises :class:`InputError` naming
the flag, so a bad value never reaches the training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

from loratune.errors import InputError

if TYPE_CHECKING:
    from loratune.core.inject import LoraSpec

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
BIAS_MODES = ("none", "all", "lora_only")
INITS = ("kaiming", "gaussian")
CLASS_WEIGHTS = ("none", "balanced")


def flag(name: str) -> str:
    """The CLI spelling of an option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def parse_targets(value: Any) -> tuple[str, ...]:
    """``"q_lin,v_lin"``, ``["q", "v"]`` or ``"re:.*query"`` -> a tuple of target specs."""
    if isinstance(value, str):
        if value.startswith("re:"):
            return (value,)
        items = [t.strip() for t in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(t).strip() for t in value]
    else:
        raise InputError(f"--targets: expected a comma-separated list of module names, got {value!r}")
    if not items or any(not t for t in items):
        raise InputError(f"--targets: empty target name in {value!r}")
    return tuple(items)


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """``None``, ``"0,1,5"``, ``"0-3"`` or ``[0, 1]`` -> sorted layer indices (None: all layers)."""
    if value is None or value == "" or value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    lo, hi = part.split("-", 1)
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise InputError(f"--layers: expected indices like '0,1,5' or '0-3', got {value!r}") from None
        value = out
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InputError(f"--layers: expected a list of layer indices, got {value!r}")
    if not value or any(i < 0 for i in value):
        raise InputError(f"--layers: layer indices must be >= 0, got {value!r}")
    return tuple(sorted(set(value)))


@dataclass(frozen=True)
class TrainConfig:
    """All options of one training run (the contract's TRAIN OPTIONS)."""

    model: str = "minilm-l6"
    """Built-in name, local transformers folder, or hub id (used only where cached or reachable)."""
    data: str = "rotten-tomatoes-4k"
    """Built-in name, a CSV/JSONL/Parquet file, a HF dataset name or a ``save_to_disk`` folder."""
    text_column: str = "text"
    """Column holding the input text."""
    label_column: str = "label"
    """Column holding the class label (strings or integers)."""
    validation_file: str | None = None
    """Separate validation file; without it the data is split 80/10/10, stratified, seed 0."""
    test_file: str | None = None
    """Separate test file (same rule as ``validation_file``)."""
    sample_pct: float = 1.0
    """Fraction of the training split to use, stratified (the seed's ``sample_pct``), in (0, 1]."""
    max_length: int = 128
    """Longest tokenized input; longer texts are truncated."""
    targets: tuple[str, ...] = ("qv",)
    """Module-name suffixes, short names q/k/v/o, a preset (qv, attention, all-linear) or ``re:<regex>``."""
    layers: tuple[int, ...] | None = None
    """Only adapt these transformer layer indices (None: all)."""
    rank: int = 8
    """LoRA rank r >= 1."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.1
    """Dropout on the adapter's input, in [0, 1)."""
    bias: str = "none"
    """Which biases train: none, all, lora_only (those of adapted layers)."""
    init: str = "kaiming"
    """Initialisation of A: kaiming (uniform, a=sqrt(5), as peft) or gaussian (std 1/r)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""
    lr: float = 5e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    warmup: float = 0.06
    """Linear warm-up as a fraction of all optimizer steps, in [0, 1)."""
    epochs: int = 3
    """Passes over the training split (the schedule's length unless max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs for the schedule)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step."""
    clip: float | None = 1.0
    """Gradient-norm clipping (None or 0: off)."""
    early_stop: int | None = None
    """Stop after this many epochs without a better validation loss (None: off)."""
    class_weights: str = "none"
    """none, or balanced (weights inversely proportional to class frequency)."""
    precision: str = "auto"
    """auto (bf16 where native, fp16 on GPUs without bf16, else fp32), fp32, bf16, fp16."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    seed: int = 0
    """Seed for initialisation, dropout and batch order."""
    log_every: int = 20
    """Log the training loss every N optimizer steps."""
    bucket: bool = True
    """Length-bucketed batches (shuffled buckets of similar length): less padding, same data."""
    checkpoint_every: int | None = None
    """Also checkpoint every N optimizer steps (every epoch always)."""
    threads: int | None = None
    """torch threads (None: the CPUs this process may use)."""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("targets", parse_targets(self.targets))
        set_("layers", parse_layers(self.layers))
        for name in ("model", "data", "text_column", "label_column"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise InputError(f"{flag(name)}: expected a non-empty string, got {v!r}")
        for name in ("validation_file", "test_file"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InputError(f"{flag(name)}: expected a file path, got {v!r}")
        _int(self, "max_length", lo=2)
        _int(self, "rank", lo=1)
        _int(self, "epochs", lo=1)
        _int(self, "batch_size", lo=1)
        _int(self, "grad_accum", lo=1)
        _int(self, "log_every", lo=1)
        _int(self, "seed", lo=0, hi=2**32 - 1)
        _int(self, "max_steps", lo=1, optional=True)
        _int(self, "early_stop", lo=1, optional=True)
        _int(self, "checkpoint_every", lo=1, optional=True)
        _int(self, "threads", lo=1, optional=True)
        _num(self, "sample_pct", lo=0.0, hi=1.0, lo_open=True)
        _num(self, "alpha", lo=0.0, lo_open=True)
        _num(self, "dropout", lo=0.0, hi=1.0, hi_open=True)
        _num(self, "lr", lo=0.0, lo_open=True)
        _num(self, "weight_decay", lo=0.0)
        _num(self, "warmup", lo=0.0, hi=1.0, hi_open=True)
        if self.clip == 0:
            set_("clip", None)
        _num(self, "clip", lo=0.0, lo_open=True, optional=True)
        for name, allowed in (("bias", BIAS_MODES), ("init", INITS), ("precision", PRECISIONS),
                              ("device", DEVICES), ("class_weights", CLASS_WEIGHTS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{flag(name)}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("rslora", "bucket"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{flag(name)}: expected true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from YAML/CLI values; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown training option {unknown[0]!r}; known options: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-friendly values (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    def lora_spec(self) -> LoraSpec:
        """The LoRA part of these options: the one place a :class:`LoraSpec` is made from a config."""
        from loratune.core.inject import LoraSpec           # torch: only when a model is built

        return LoraSpec(targets=self.targets, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                        rslora=self.rslora, init=self.init, layers=self.layers, bias=self.bias)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)


def option_names() -> list[str]:
    """All training option names, in declaration order."""
    return [f.name for f in fields(TrainConfig)]


def _int(cfg: TrainConfig, name: str, *, lo: int, hi: int | None = None, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, float) and v.is_integer():
        v = int(v)
        object.__setattr__(cfg, name, v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InputError(f"{flag(name)}: expected an integer, got {v!r}")
    if v < lo:
        raise InputError(f"{flag(name)}: must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise InputError(f"{flag(name)}: must be <= {hi}, got {v}")


def _num(cfg: TrainConfig, name: str, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{flag(name)}: expected a number, got {v!r}")
    v = float(v)
    object.__setattr__(cfg, name, v)
    if v != v or v in (float("inf"), float("-inf")):
        raise InputError(f"{flag(name)}: must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise InputError(f"{flag(name)}: must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise InputError(f"{flag(name)}: must be {'<' if hi_open else '<='} {hi:g}, got {v:g}")


# Defaults as a dict, for help texts and the search's "untuned default" trial.
DEFAULTS: dict[str, Any] = TrainConfig().to_dict()
