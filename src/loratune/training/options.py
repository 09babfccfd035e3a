"""Training options: one frozen dataclass, validated on construction.

Every field is a CLI flag (``--rank``, ``--batch-size``) and a YAML key (``rank``, ``batch_size``)
with the same default. Each field is declared once, with an :class:`Option` that says its kind
(str, int, float, bool, list), its range or choices and its help text; that one declaration drives
``argparse`` (cli/common.py), the checks of :class:`TrainConfig` (a YAML file, the CLI and the
library all go through them) and the kinds of distributions a search may draw for it
(search/space.py). A bad value raises :class:`InputError` naming the flag, so it never reaches the
training loop.

Options whose good default depends on the task or method (``lr``, ``max_length``) default to
``"auto"``, resolved by :func:`resolve_auto` from the table :data:`AUTO_DEFAULTS` when the config is
built: ``TrainConfig().lr`` is a number, and ``to_dict()`` (what config.yaml stores) holds numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from loratune.errors import InputError

if TYPE_CHECKING:
    from loratune.core.inject import LoraSpec

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
BIAS_MODES = ("none", "all", "lora_only")
INITS = ("kaiming", "gaussian", "pissa", "olora")
VARIANTS = ("lora", "dora")
CLASS_WEIGHTS = ("none", "balanced")
METHODS = ("lora", "full")
TASKS = ("auto", "classification", "causal-lm")

AUTO = "auto"
Kind = Literal["str", "int", "float", "bool", "list"]

AUTO_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("classification", "lora"): {"model": "minilm-l6", "lr": 5e-4, "max_length": 128, "modules_to_save": (), "epochs": 3},
    ("classification", "full"): {"model": "minilm-l6", "lr": 5e-5, "max_length": 128, "modules_to_save": (), "epochs": 3},
    ("causal-lm", "lora"): {"model": "smollm2-135m", "lr": 5e-4, "max_length": 512, "modules_to_save": (), "epochs": 1},
}
"""(task, method) -> the value each ``auto`` option takes (BENCHMARKS.md, "Quality", has the evidence). A new
task adds rows, e.g. ``("causal-lm", "lora"): {"lr": 5e-4, "max_length": 512, ...}``. A ``modules_to_save``
name from this table that names no module of the model is skipped (BERT has a ``pooler``, DistilBERT none);
one the user gives must exist."""
AUTO_LABELS = {"classification": "classification", "causal-lm": "causal-LM", "lora": "LoRA", "full": "full fine-tuning"}
"""How ``--help`` names a task or method ("auto = 0.0005 for LoRA classification")."""


def flag(name: str) -> str:
    """The CLI spelling of an option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def resolve_auto(name: str, task: str = "classification", method: str = "lora") -> Any:
    """The value the ``auto`` option ``name`` takes for a task and method: the one place ``auto`` is resolved."""
    row = AUTO_DEFAULTS.get((task, method), {})
    if name not in row:
        raise InputError(f"{flag(name)}: no automatic value for {AUTO_LABELS.get(method, method)} "
                         f"{AUTO_LABELS.get(task, task)}; give a value")
    return row[name]


def auto_text(name: str) -> str:
    """``auto = 0.0005 for LoRA classification`` (every row of :data:`AUTO_DEFAULTS` that sets ``name``)."""
    rows = [f"{_shown(row[name])} for {AUTO_LABELS.get(m, m)} {AUTO_LABELS.get(t, t)}"
            for (t, m), row in AUTO_DEFAULTS.items() if name in row]
    return "auto = " + ", ".join(rows)


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


@dataclass(frozen=True)
class Option:
    """How one :class:`TrainConfig` field is typed, checked and explained.

    ``ge``/``gt``/``le``/``lt`` bound numbers (>=, >, <=, <); ``optional``: None is allowed and means
    ``unset`` (what ``--help`` shows for it); ``auto``: the value ``"auto"`` is allowed and resolved
    by :func:`resolve_auto`; ``parse`` normalises a value before the checks (``"q,v"`` -> ``("q", "v")``).
    """

    kind: Kind
    help: str
    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    optional: bool = False
    unset: str = "none"
    auto: bool = False
    parse: Callable[[Any], Any] | None = None
    metavar: str | None = None

    def range_text(self) -> str:
        """``in [0, 1)``, ``>= 1``, ``> 0`` or ``""``."""
        f = self.show
        lo = f"[{f(self.ge)}" if self.ge is not None else (f"({f(self.gt)}" if self.gt is not None else None)
        hi = f"{f(self.le)}]" if self.le is not None else (f"{f(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return ""

    def show(self, value: float) -> str:
        """A bound or value as messages write it: ``4294967295``, ``0.0005``, ``1e-05``."""
        return str(int(value)) if self.kind == "int" else f"{value:g}"

    def check(self, name: str, value: Any) -> Any:
        """``value`` normalised (ints of float options become floats, ...), or :class:`InputError` naming the flag."""
        if self.parse is not None:
            value = self.parse(value)
        if value is None and self.optional:
            return None
        if self.kind == "str":
            return self._check_str(name, value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InputError(f"{flag(name)}: expected true or false, got {value!r}")
            return value
        if self.kind in ("int", "float"):
            return self._check_range(name, self._number(name, value))
        return value                                       # list: ``parse`` checked it

    def _check_str(self, name: str, value: Any) -> str:
        if self.choices:
            if value not in self.choices:
                raise InputError(f"{flag(name)}: expected one of {', '.join(self.choices)}, got {value!r}")
        elif not isinstance(value, str) or not value.strip():
            what = "a file path" if self.optional else "a non-empty string"
            raise InputError(f"{flag(name)}: expected {what}, got {value!r}")
        return value

    def _number(self, name: str, value: Any) -> int | float:
        auto = " or auto" if self.auto else ""
        if self.kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{flag(name)}: expected an integer{auto}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{flag(name)}: expected a number{auto}, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{flag(name)}: must be finite, got {value}")
        return float(value)

    def _check_range(self, name: str, v: int | float) -> int | float:
        for bound, op, ok in ((self.ge, ">=", lambda b: v >= b), (self.gt, ">", lambda b: v > b),
                              (self.le, "<=", lambda b: v <= b), (self.lt, "<", lambda b: v < b)):
            if bound is not None and not ok(bound):
                raise InputError(f"{flag(name)}: must be {op} {self.show(bound)}, got {self.show(v)}")
        return v


def option(default: Any, kind: Kind, help: str, **spec: Any) -> Any:
    """A :class:`TrainConfig` field: its default and its :class:`Option` (see the class body)."""
    return dataclasses.field(default=default, metadata={"option": Option(kind, help, **spec)})


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


def parse_modules(value: Any) -> tuple[str, ...]:
    """``"pooler"``, ``"pooler,pre_classifier"``, ``["pooler"]``, ``"none"`` or ``[]`` -> module names (suffixes)."""
    if value is None or value == "none" or value == "":
        return ()
    if isinstance(value, str):
        items = [t.strip() for t in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(t).strip() if isinstance(t, str) else t for t in value]
    else:
        raise InputError(f"--modules-to-save: expected a comma-separated list of module names, got {value!r}")
    if any(not isinstance(t, str) or not t for t in items):
        raise InputError(f"--modules-to-save: empty or non-text module name in {value!r}")
    return tuple(dict.fromkeys(items))


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


def parse_pattern(name: str, whole: bool) -> Callable[[Any], tuple[tuple[str, Any], ...]]:
    """``--rank-pattern`` / ``--alpha-pattern``: ``"query=16,re:.*value=4"``, a YAML mapping, or pairs ->
    ((key, value), ...) in the given order (the first matching key wins, as in peft). Keys are peft's regexes
    (a plain name matches itself and every ``*.name``); a leading ``re:`` is allowed and dropped when saved."""
    import re

    def parse(value: Any) -> tuple[tuple[str, Any], ...]:
        if value is None or value == "" or value == "none":
            return ()
        if isinstance(value, str):
            items: list[Any] = []
            for part in value.split(","):
                key, eq, number = part.strip().rpartition("=")
                if not eq or not key:
                    raise InputError(f"{flag(name)}: expected KEY=VALUE[,KEY=VALUE...], got {part.strip()!r}")
                try:
                    items.append((key, int(number) if whole else float(number)))
                except ValueError:
                    items.append((key, number))
        elif isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            items = [tuple(p) for p in value]
        else:
            raise InputError(f"{flag(name)}: expected KEY=VALUE pairs or a mapping, got {value!r}")
        out: dict[str, Any] = {}
        for key, v in items:
            if not isinstance(key, str) or not key.removeprefix("re:"):
                raise InputError(f"{flag(name)}: empty or non-text key in {value!r}")
            try:
                re.compile(key.removeprefix("re:"))
            except re.error as e:
                raise InputError(f"{flag(name)}: {key!r} is not a valid regex ({e})") from None
            if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or not v > 0 \
                    or not math.isfinite(v):
                raise InputError(f"{flag(name)}: the value of {key!r} must be a positive "
                                 f"{'whole number' if whole else 'number'}, got {v!r}")
            if key in out:
                raise InputError(f"{flag(name)}: {key!r} is given twice")
            out[key] = int(v) if whole else float(v)
        return tuple(out.items())

    return parse


def _zero_is_off(value: Any) -> Any:
    """``--clip 0`` turns clipping off (None)."""
    return None if value == 0 else value


@dataclass(frozen=True)
class TrainConfig:
    """All options of one training run (the contract's TRAIN OPTIONS); each field's help is in its :class:`Option`."""

    model: str = option(AUTO, "str", "built-in name (minilm-l6, smollm2-135m), local transformers folder, GGUF "
                        "file, or hub id (used only where cached or reachable)", auto=True, metavar="MODEL")
    data: str = option("rotten-tomatoes-4k", "str", "built-in name (rotten-tomatoes-4k; rotten-tomatoes-4k-instruct: "
                       "the same snippets as prompt -> positive/negative), CSV/JSONL/Parquet file, HF dataset name or "
                       "save_to_disk folder", metavar="DATA")
    task: str = option(AUTO, "str", "classification (a text -> label classifier) or causal-lm (instruction tuning: "
                       "prompt -> completion); auto: causal-lm for data with prompt/completion, messages or Alpaca "
                       "columns, classification for data with the text and label columns, else by the model (a "
                       "decoder LLM: causal-lm)", choices=TASKS)
    text_column: str = option("text", "str", "column holding the input text", metavar="COLUMN")
    label_column: str = option("label", "str", "column holding the class label (strings or integers)",
                               metavar="COLUMN")
    prompt_column: str = option("prompt", "str", "causal-lm: column holding the prompt (TRL's prompt-completion "
                                "format)", metavar="COLUMN")
    completion_column: str = option("completion", "str", "causal-lm: column holding the completion the model "
                                    "learns to write", metavar="COLUMN")
    messages_column: str = option("messages", "str", "causal-lm: column holding a conversation, a list of "
                                  "{role, content} turns (every assistant turn is trained on)", metavar="COLUMN")
    system_prompt: str | None = option(None, "str", "causal-lm: a system turn put before every conversation "
                                       "that has none (saved with the adapter; generate uses it)", optional=True,
                                       metavar="TEXT")
    validation_file: str | None = option(None, "str", "separate validation file; without it the data is split "
                                         "80/10/10, stratified, by --split-seed", optional=True, metavar="FILE")
    test_file: str | None = option(None, "str", "separate test file (same rule as --validation-file)",
                                   optional=True, metavar="FILE")
    split_seed: int = option(0, "int", "seed of the stratified train/validation/test cut and of the --sample-pct "
                             "subsample (never of --seed's initialisation and order); refused where nothing is cut "
                             "(both --validation-file and --test-file, no --sample-pct)", ge=0, le=2**32 - 1, metavar="SEED")
    sample_pct: float = option(1.0, "float", "fraction of the training split to use, stratified", gt=0, le=1,
                               metavar="FRACTION")
    max_length: int = option(AUTO, "int", "longest tokenized input; longer texts are truncated; at most the "
                             "model's positions (auto comes down to them)", ge=2, auto=True,
                             metavar="TOKENS")
    method: str = option("lora", "str", "lora (train adapters, the base frozen) or full (every weight trains; "
                         "the run writes model/, a transformers folder, instead of adapter/)", choices=METHODS)
    targets: tuple[str, ...] = option(("qv",), "list", "module-name suffixes (q_lin,v_lin), short names q,k,v,o, "
                                      "a preset (qv, attention, all-linear) or re:REGEX", parse=parse_targets,
                                      metavar="TARGETS")
    layers: tuple[int, ...] | None = option(None, "list", "only adapt these transformer layers, e.g. 0,1 or 3-5",
                                            parse=parse_layers, optional=True, unset="all", metavar="LAYERS")
    rank: int = option(8, "int", "LoRA rank r", ge=1, metavar="R")
    alpha: float = option(16.0, "float", "LoRA alpha: the update is scaled by alpha/r, or alpha/sqrt(r) with --rslora",
                          gt=0, metavar="ALPHA")
    dropout: float = option(0.1, "float", "dropout on the adapter's input", ge=0, lt=1, metavar="P")
    bias: str = option("none", "str", "which biases train: none, all, or lora_only (those of adapted layers)",
                       choices=BIAS_MODES)
    init: str = option("kaiming", "str", "how A and B start: kaiming (A uniform, a=sqrt(5), B zero, as peft), "
                       "gaussian (A with std 1/r), pissa (from W0's principal singular vectors) or olora (from "
                       "W0's QR); pissa and olora replace W0 by the residual (the output at step 0 is unchanged) "
                       "and save the adapter converted for the original W0, at twice the rank", choices=INITS)
    variant: str = option("lora", "str", "lora, or dora (weight-decomposed LoRA: a learned magnitude per output "
                          "row times the normalised W0 + BA; peft's use_dora)", choices=VARIANTS)
    rank_pattern: tuple[tuple[str, int], ...] = option((), "list", "per-module ranks, peft's rank_pattern: "
                                                       "KEY=R,... where KEY is a module name or regex (the first "
                                                       "key matching a module's name or its dotted tail wins), "
                                                       "e.g. query=16,re:.*value=4", parse=parse_pattern(
                                                           "rank_pattern", True), metavar="KEY=R,...")
    alpha_pattern: tuple[tuple[str, float], ...] = option((), "list", "per-module alphas, peft's alpha_pattern, "
                                                          "matched as --rank-pattern", parse=parse_pattern(
                                                              "alpha_pattern", False), metavar="KEY=ALPHA,...")
    loraplus_ratio: float | None = option(None, "float", "LoRA+: the B matrices (and, as peft's LoRA+ optimizer, "
                                          "every 1-D trainable tensor) learn at R x --lr; the paper suggests 16",
                                          ge=1, optional=True, unset="off", metavar="R")
    rslora: bool = option(False, "bool", "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    modules_to_save: tuple[str, ...] = option(AUTO, "list", "modules besides the task head that train in full "
                                              "and are saved in the adapter (peft's modules_to_save), e.g. pooler; "
                                              "none for the head alone", parse=parse_modules, auto=True,
                                              metavar="NAMES")
    lr: float = option(AUTO, "float", "peak learning rate of AdamW", gt=0, auto=True, metavar="LR")
    weight_decay: float = option(0.01, "float", "AdamW weight decay (not applied to biases and LayerNorm weights)",
                                 ge=0, metavar="WD")
    warmup: float = option(0.06, "float", "linear warm-up as a fraction of all optimizer steps", ge=0, lt=1,
                           metavar="FRACTION")
    epochs: int = option(AUTO, "int", "passes over the training split (the schedule's length unless --max-steps)",
                         ge=1, auto=True, metavar="N")
    max_steps: int | None = option(None, "int", "stop after this many optimizer steps (overrides --epochs for the "
                                   "schedule)", ge=1, optional=True, metavar="N")
    batch_size: int = option(16, "int", "sequences per forward pass", ge=1, metavar="N")
    grad_accum: int = option(1, "int", "forward passes per optimizer step", ge=1, metavar="N")
    clip: float | None = option(1.0, "float", "gradient-norm clipping (0: off)", ge=0, optional=True,
                                parse=_zero_is_off, unset="off", metavar="NORM")
    early_stop: int | None = option(None, "int", "stop after this many validation passes without a better "
                                    "validation loss (epochs, with one pass per epoch)", ge=1, optional=True,
                                    unset="off", metavar="EVALS")
    evals_per_epoch: int = option(1, "int", "validation passes per epoch, each after 1/N of its optimizer steps (a "
                                  "search's ASHA rungs: --rungs-per-epoch)", ge=1, metavar="N")
    class_weights: str = option("none", "str", "loss weights: none, or balanced (inversely proportional to class "
                                "frequency)", choices=CLASS_WEIGHTS)
    precision: str = option("auto", "str", "auto (bf16 where native, fp16 on GPUs without bf16, else fp32), fp32, "
                            "bf16, fp16", choices=PRECISIONS)
    device: str = option("auto", "str", "auto (CUDA when present), cpu or cuda", choices=DEVICES)
    seed: int = option(0, "int", "seed for initialisation, dropout and batch order", ge=0, le=2**32 - 1,
                       metavar="SEED")
    log_every: int = option(20, "int", "log the training loss every N optimizer steps", ge=1, metavar="N")
    bucket: bool = option(True, "bool", "length-bucketed batches (shuffled buckets of similar length): less "
                          "padding, same data")
    checkpoint_every: int | None = option(None, "int", "also checkpoint every N optimizer steps (every epoch "
                                          "always)", ge=1, optional=True, unset="off", metavar="N")
    threads: int | None = option(None, "int", "torch threads", ge=1, optional=True,
                                 unset="the CPUs this process may use", metavar="N")
    compile: bool = option(False, "bool", "torch.compile each transformer layer's training pass (inductor's fused "
                           "kernels; on a CPU it needs a C++ compiler): a SmolLM2 step ~1.5x faster after a compile of "
                           "~90 s (12-22 s once inductor's cache is warm), little gain for a small classifier; "
                           "validation and generation run as without it")

    def __post_init__(self) -> None:
        auto = frozenset(f.name for f in fields(self) if (_spec(f).auto or f.name == "task")
                         and getattr(self, f.name) == AUTO)
        for f in fields(self):
            if f.name not in auto:
                object.__setattr__(self, f.name, _spec(f).check(f.name, getattr(self, f.name)))
        if "task" in auto:                                  # first: the other auto options depend on it
            from loratune.training.detect import detect_task

            object.__setattr__(self, "task", detect_task(self))
        if self.task == "causal-lm" and self.method == "full":
            raise InputError("--method full: full fine-tuning of a causal LM is not supported; train LoRA "
                             "(--method lora), the causal-LM default")
        task, method = self.auto_key()
        for name in auto - {"task"}:                        # after the rest: a resolution may read any option
            object.__setattr__(self, name, OPTIONS[name].check(name, resolve_auto(name, task, method)))
        object.__setattr__(self, "_auto", auto)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Options that are valid alone but not together."""
        if self.split_seed and self.validation_file is not None and self.test_file is not None \
                and self.sample_pct == 1.0:
            raise InputError("--split-seed: with both --validation-file and --test-file (and no --sample-pct) "
                             "nothing is cut from the training data; leave --split-seed at 0")
        for name in (CLASSIFICATION_ONLY if self.task == "causal-lm" else CAUSAL_ONLY):
            if getattr(self, name) != _declared(name):
                other = "classification" if self.task == "causal-lm" else "causal-lm"
                raise InputError(f"{flag(name)}: a {other} option, but this run's task is {self.task}"
                                 + (" (--task auto chose it from the data's columns and the model; give --task "
                                    f"{other} to change it)" if "task" in self.auto_fields else ""))
        if self.layers is not None and any(t.startswith("re:") for t in self.targets):
            raise InputError("--layers: cannot be combined with a re: target (peft refuses layers_to_transform with "
                             "a regex target_modules, so the adapter could not be loaded there); put the layers in "
                             r"the pattern instead, e.g. 're:.*\.layer\.(0|1)\..*\.query'")
        if self.method == "full":
            for name in LORA_ONLY:
                default = (resolve_auto(name, *self.auto_key()) if declared_default(name) == AUTO
                           else _declared(name))
                if name not in self.auto_fields and getattr(self, name) != OPTIONS[name].check(name, default):
                    raise InputError(f"{flag(name)}: a LoRA option, but --method full trains every weight and "
                                     f"has no adapter; leave it out or use --method lora")

    def auto_key(self) -> tuple[str, str]:
        """(task, method): the row of :data:`AUTO_DEFAULTS` this config's ``auto`` options take."""
        return self.task, self.method

    @property
    def auto_fields(self) -> frozenset[str]:
        """The options given as ``auto`` (resolved to numbers; :meth:`replace` resolves them again)."""
        return self._auto                                   # type: ignore[attr-defined, no-any-return]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from YAML/CLI values; unknown keys are an error that lists the known ones."""
        known = set(OPTIONS)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown training option {unknown[0]!r}; known options: {', '.join(sorted(known))}")
        return cls(**dict(values))

    @classmethod
    def from_stored(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Options as a run or search stored them (config.yaml, search.yaml): :meth:`from_dict`, except that a
        ``--method full`` run's LoRA-only options, written at the defaults of their day, are not read (the
        defaults may have moved since; they never meant anything for full fine-tuning)."""
        if values.get("method") == "full":
            values = {k: v for k, v in values.items() if k not in LORA_ONLY}
        if "task" not in values:                            # written before causal-LM existed: a classifier
            values = {**values, "task": "classification"}
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-friendly values (tuples become lists): what config.yaml stores. ``auto`` is resolved,
        except where the value depends on the model (:data:`MODEL_DEPENDENT`): the training loop resolves
        those once the model is loaded and writes config.yaml with what it found."""
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        out["layers"] = None if self.layers is None else list(self.layers)
        out["modules_to_save"] = list(self.modules_to_save)
        out["rank_pattern"] = dict(self.rank_pattern)
        out["alpha_pattern"] = dict(self.alpha_pattern)
        for name in MODEL_DEPENDENT:
            if name in self.auto_fields:
                out[name] = AUTO
        return out

    def lora_spec(self) -> LoraSpec:
        """The LoRA part of these options: the one place a :class:`LoraSpec` is made from a config."""
        from loratune.core.inject import LoraSpec  # torch: only when a model is built

        return LoraSpec(targets=self.targets, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                        rslora=self.rslora, init=self.init, layers=self.layers, bias=self.bias,
                        modules_to_save=self.modules_to_save, variant=self.variant,
                        rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some options changed (validated again); options that were ``auto`` and are not
        changed stay ``auto`` and are resolved again (a new task or method may give them other values)."""
        still_auto = {name: AUTO for name in self.auto_fields if name not in changes}
        if "task" in still_auto and not set(changes) & TASK_INPUTS:
            still_auto["task"] = self.task                  # detected once; nothing that decides it changed
        return dataclasses.replace(self, **still_auto, **changes)


def _spec(f: dataclasses.Field) -> Option:  # type: ignore[type-arg]
    return f.metadata["option"]  # type: ignore[no-any-return]


OPTIONS: dict[str, Option] = {f.name: _spec(f) for f in fields(TrainConfig)}
"""Every training option's :class:`Option`, in declaration order."""


MODEL_DEPENDENT = ("modules_to_save",)
"""``auto`` options whose value the model decides (a default name the model lacks is dropped): kept as ``auto``
by :meth:`TrainConfig.to_dict` until the model is known."""
TASK_INPUTS = frozenset({"data", "model", "text_column", "label_column", "prompt_column", "completion_column",
                         "messages_column"})
"""What ``--task auto`` reads: :meth:`TrainConfig.replace` detects the task again only when one of these changes."""
CLASSIFICATION_ONLY = ("text_column", "label_column", "class_weights")
"""Options of the classification task: refused at a non-default value for a causal-LM run."""
CAUSAL_ONLY = ("prompt_column", "completion_column", "messages_column", "system_prompt")
"""Options of the causal-LM task: refused at a non-default value for a classification run."""
LORA_ONLY = ("targets", "layers", "rank", "alpha", "dropout", "bias", "init", "rslora", "modules_to_save", "variant",
             "rank_pattern", "alpha_pattern", "loraplus_ratio")
"""Options that describe the adapter: refused at a non-default value with ``--method full``."""


def _declared(name: str) -> Any:
    """The declared default as the option's checks normalise it (``"qv"`` -> ``("qv",)``)."""
    return OPTIONS[name].check(name, declared_default(name))


def declared_default(name: str) -> Any:
    """The default as declared (``"auto"`` for an auto option; :data:`DEFAULTS` has it resolved)."""
    return TrainConfig.__dataclass_fields__[name].default


def option_names() -> list[str]:
    """All training option names, in declaration order."""
    return list(OPTIONS)


# Defaults as a dict (``auto`` resolved), for help texts and the search's "untuned default" trial.
DEFAULTS: dict[str, Any] = TrainConfig().to_dict()
