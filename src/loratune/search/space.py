"""The search space (YAML ``search:``), checked before Ray starts; no Ray here.

Each key is a training option; each value is one distribution::

    lr:      {loguniform: [1.0e-4, 1.0e-1]}   # log-uniform on [a, b], 0 < a <= b
    dropout: {uniform: [0.1, 0.5]}            # uniform on [a, b], a <= b
    rank:    {choice: [2, 4, 8]}              # one of the values, sampled
    batch_size: {grid: [16, 32]}              # every value: the trial count multiplies (as in Ray Tune)
    seed:    {randint: [0, 9]}                # an integer in [a, b], both ends included
    alpha:   "=rank"                          # tied: the same value as another option in each trial

Everything a trial could reject is rejected here instead, as an :class:`InputError` that names the
key (``search.rank: ...``): unknown options and distributions, empty choices, lower > upper,
loguniform bounds <= 0, continuous ranges on integer options, values ``TrainConfig`` refuses, and
(:func:`check_model`, which loads the model once) a rank larger than a targeted matrix.

Values travel to Ray as scalars: a targets list ``[q, v]`` becomes ``"q,v"`` (presets such as ``qv``
are spelled out, so the default ``qv`` equals the choice ``[q, v]``) and a layers list ``"0,1"``;
``TrainConfig`` parses both spellings.

The trials table and the best trial are in :mod:`loratune.search.trials`. This module never imports Ray.
"""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from loratune.errors import InputError
from loratune.training.options import (
    AUTO,
    OPTIONS,
    TrainConfig,
    auto_text,
    flag,
    option_names,
    parse_layers,
    parse_modules,
    parse_targets,
)

CLASSIFICATION_METRICS = ("val_loss", "val_accuracy", "val_f1", "val_f1_macro", "val_precision", "val_recall",
                          "val_roc_auc")
CAUSAL_METRICS = ("val_loss", "val_perplexity", "val_accuracy", "val_exact_match")
"""A causal-LM trial's validation metrics (tasks/causal_eval.py), in trials.csv's column order; ``val_accuracy``
(choice scoring) only where the data's completions are a label set."""
METRICS = tuple(dict.fromkeys(CLASSIFICATION_METRICS + CAUSAL_METRICS))
"""Every metric a search can pick its best trial by (``--metric``); :func:`check_metric` says which a task offers."""
LOWER_IS_BETTER = ("val_loss", "val_perplexity")
INTERVAL_COLUMNS = ("val_accuracy_lo", "val_accuracy_hi", "val_f1_lo", "val_f1_hi")   # trials.csv: 95% intervals
OK_STATUSES = ("completed", "stopped_early")              # the statuses a best trial may have
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SPACES_DIR = Path(__file__).resolve().parent / "spaces"
"""The shipped spaces, one YAML file each (``--space NAME``): ``default`` (loratune's) and ``seed`` (the seed
project's)."""


def _shipped(name: str) -> dict[str, Any]:
    from loratune import yamltext

    return yamltext.load((SPACES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


DEFAULT_SPACE: dict[str, Any] = _shipped("default")
"""loratune's space (spaces/default.yaml): lr 2e-4–2e-3 log-uniform, rank 4/8/16, alpha 8/16/32, targets q,v or
all four attention projections, dropout 0–0.2, the pooler trained in full or not; the untuned default (lr 5e-4, r 8,
α 16, q,v, dropout 0.1, head only) lies inside it. Measured with ``make bench-quality`` (BENCHMARKS.md): its
chosen adapter is not yet better than the default on test."""
CAUSAL_SPACE: dict[str, Any] = _shipped("causal")
"""The default space for causal-LM data (spaces/causal.yaml): lr 1e-4–2e-3 log-uniform, rank 4/8/16, alpha 8/16/32,
targets q,v, the attention projections or all linear layers, dropout 0–0.2; no ``modules_to_save`` (a causal LM has
no pooler). The untuned causal-LM default (lr 5e-4, r 8, α 16, q,v, dropout 0.1) lies inside it."""
SEED_SPACE: dict[str, Any] = _shipped("seed")
"""The seed project's space (``--space seed``): lr 1e-4–0.1, r, target modules, dropout; alpha tied to r."""
RUNGS_PER_EPOCH = 4
"""``--rungs-per-epoch``'s default: a trial validates every quarter epoch and ASHA may stop it there (measured in
BENCHMARKS.md, "Search": the seed's once-an-epoch rungs spent whole epochs on trials that were bad after a
quarter of one)."""
REDUCTION_FACTOR = 4
"""``--reduction-factor``'s default, ASHA's η (Ray Tune's own default): a trial goes on past a rung only if it is
in the best 1/η of the trials that reached that rung. The seed's 2 kept most trials to the end (BENCHMARKS.md,
"Search": 14.5 trial-epochs for 8 trials against 9 with 4, 2.95x against 6.47x the seed's search's speed, and
the chosen trial no worse on test than the untuned default on average over 3 splits)."""
LAST_EPOCH_RUNG = True
"""``--last-epoch-rung``'s default: besides ASHA's rungs at grace × η^k, one a whole epoch before ``max_t`` when that
lies past the last of them (max 3 epochs, 4 rungs an epoch, η 4: rungs at 0.25, 1 and 2 epochs), so a trial trains
its last epoch only if it is in the best 1/η of those that got there. Without it, a trial that passed the 1-epoch
rung trained 2 more epochs unchecked, and asynchronous ASHA lets through most trials that are the best so far when
they reach a rung (BENCHMARKS.md, "Search": on split seeds 1 and 2, 4 of 8 trials trained all 3 epochs)."""
FULL_SPACE: dict[str, Any] = {"lr": {"loguniform": [1e-5, 2e-4]}}
"""``--method full`` has no adapter to shape: the default space is its learning rate alone."""



def space_presets() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(spec: str) -> dict[str, Any]:
    """``--space``: a shipped space by name (:func:`space_presets`) or a YAML file holding the mapping (or a
    config whose ``search:`` key holds it); InputError naming the presets otherwise. Checked later by
    :func:`parse_space` like any space."""
    import yaml

    from loratune import yamltext

    path = SPACES_DIR / f"{spec}.yaml" if spec in space_presets() else Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"--space: {spec!r} is neither a shipped space ({', '.join(space_presets())}) nor a YAML "
                         "file")
    try:
        doc = yamltext.load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"--space: cannot read {path} ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(doc, dict) and isinstance(doc.get("search"), dict):
        doc = doc["search"]
    if not isinstance(doc, dict) or not doc:
        raise InputError(f"--space: {path} holds no mapping of training option: distribution")
    return doc


def default_space(base: TrainConfig, fixed: Iterable[str] = ()) -> dict[str, Any]:
    """The space searched when none is given: :data:`FULL_SPACE` for ``--method full``, :data:`CAUSAL_SPACE` for
    causal-LM data, else :data:`DEFAULT_SPACE`; without the options in ``fixed`` (those the user gave: a flag fixes
    its option for every trial). InputError when they fix every option it searches."""
    space = FULL_SPACE if base.method == "full" else CAUSAL_SPACE if base.task == "causal-lm" else DEFAULT_SPACE
    fixed = set(fixed)
    left = {k: v for k, v in space.items() if k not in fixed}
    if not left:
        raise InputError(f"search: the options given ({', '.join(flag(k) for k in space)}) fix every option the "
                         "default space searches; leave one out, or give a space (--space FILE or search: in "
                         "--config)")
    return left

# Options a search cannot vary, and why (the message tells the user what to do instead).
FIXED_ONLY = {
    "model": "all trials share one model; fix it with --model",
    "data": "the data is prepared once for all trials; fix it with --data",
    "task": "the data is prepared once for all trials, as one task; fix it with --task",
    "text_column": "the data is prepared once for all trials",
    "label_column": "the data is prepared once for all trials",
    "prompt_column": "the data is prepared once for all trials",
    "completion_column": "the data is prepared once for all trials",
    "messages_column": "the data is prepared once for all trials",
    "system_prompt": "the data is prepared (and tokenized) once for all trials; fix it with --system-prompt",
    "validation_file": "the data is prepared once for all trials",
    "test_file": "the data is prepared once for all trials",
    "sample_pct": "the data is prepared once for all trials; fix it with --sample-pct",
    "split_seed": "every trial is judged on the same validation split; fix it with --split-seed",
    "method": "a search compares adapters of one method; fix it with --method (full fine-tuning is the baseline)",
    "max_length": "the data is tokenized once for all trials; fix it with --max-length",
    "epochs": "every trial trains --max-epochs epochs (ASHA's budget); set --max-epochs",
    "max_steps": "every trial trains --max-epochs epochs (ASHA's budget)",
    "evals_per_epoch": "a trial's validation passes are ASHA's rungs, the same for all trials; set --rungs-per-epoch",
    "threads": "a trial's threads equal its CPUs; set --cpus-per-trial",
    "device": "the device is chosen for the whole search; fix it with --device",
    "compile": "it changes a trial's speed, not its result; fix it for every trial with --compile",
}


@dataclass(frozen=True)
class Dim:
    """One searched option: ``kind`` is a distribution name or ``"tie"``.

    ``values``: the encoded candidates (choice, grid), the bounds ``(a, b)`` (uniform, loguniform,
    randint: both ends included), or ``(other,)`` for a tie.
    """

    key: str
    kind: str
    values: tuple[Any, ...]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` (encoded) is a possible sample of this dimension."""
        if self.kind in ("choice", "grid"):
            return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values)
        if self.kind in ("uniform", "loguniform", "randint"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            return self.values[0] <= value <= self.values[1] and (self.kind != "randint" or float(value).is_integer())
        return False


@dataclass(frozen=True)
class Space:
    """A validated space: sampled dimensions first, then ties in an order where each follows its source."""

    dims: tuple[Dim, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def sampled(self) -> list[Dim]:
        return [d for d in self.dims if d.kind != "tie"]

    @property
    def ties(self) -> list[Dim]:
        return [d for d in self.dims if d.kind == "tie"]

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.dims if d.kind == "grid")

    def trial_count(self, samples: int) -> int:
        """Trials a random search runs: the default config replaces one sample; grids multiply the rest."""
        return 1 + (samples - 1) * self.grid_size

    def default_point(self, base: TrainConfig) -> dict[str, Any]:
        """The untuned config's value of every key (ties included: the default trial is not tied); ``auto``
        options are the numbers they resolved to."""
        return {d.key: encode(d.key, getattr(base, d.key)) for d in self.dims}

    def resolve(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's config with ties to sampled keys (carried as ``"=other"``) replaced by their values."""
        out = dict(config)
        for d in self.ties:
            other = d.values[0]
            if out.get(d.key) == "=" + other and other in out:
                out[d.key] = out[other]
        return out

    def resolve_ties(self, values: Mapping[str, Any], base: TrainConfig) -> dict[str, Any]:
        """``values`` of the sampled keys plus each tie's value (its source's, or the fixed option's)."""
        out = dict(values)
        for d in self.ties:
            other = d.values[0]
            out[d.key] = out[other] if other in out else encode(other, getattr(base, other))
        return out


def encode(key: str, value: Any) -> Any:
    """A value as Ray carries it: targets and layers as comma strings, presets spelled out."""
    if key == "targets":
        if isinstance(value, str) and value.startswith("re:"):
            return value
        from loratune.core.inject import PRESETS

        names = parse_targets(value)
        if len(names) == 1 and names[0].startswith("re:"):
            return names[0]
        return ",".join(dict.fromkeys(n for t in names for n in PRESETS.get(t, (t,))))
    if key == "layers":
        layers = parse_layers(value)
        return None if layers is None else ",".join(map(str, layers))
    if key == "modules_to_save" and value != AUTO:
        return ",".join(parse_modules(value)) or "none"
    if value == AUTO and OPTIONS[key].auto:                # a trial's table row must show what it trained with
        what = "numbers" if option_kind(key) in ("int", "float") else "the values"
        raise InputError(f"auto is not a value to search; list {what} ({auto_text(key)})")
    return value


def option_kind(key: str) -> str:
    """``int``, ``float``, ``str``, ``bool`` or ``list`` (the option's declared kind): which distributions suit it."""
    return OPTIONS[key].kind


def parse_space(raw: Any, base: TrainConfig) -> Space:
    """Validate the ``search:`` mapping against ``base`` (the fixed options); see the module docstring."""
    if not isinstance(raw, Mapping) or not raw:
        raise InputError("search: expected a mapping of training option: distribution, e.g. "
                         "{lr: {loguniform: [1.0e-4, 1.0e-1]}, rank: {choice: [4, 8]}}")
    known = option_names()
    dims: dict[str, Dim] = {}
    for key, spec in raw.items():
        where = f"search.{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise InputError(f"{where}: unknown training option"
                             + (f" (did you mean {close[0]}?)" if close else f"; known options: {', '.join(known)}"))
        if key in FIXED_ONLY:
            raise InputError(f"{where}: cannot be searched: {FIXED_ONLY[key]}")
        dims[key] = _parse_dim(key, spec, where)
    ordered = _order_ties(dims)
    space = Space(tuple(ordered))
    _check_values(space, base)
    return space


def _identity(key: str, value: Any) -> Any:
    """What makes two listed values the same trial: numbers by value (4 and 4.0), target and module lists as
    sets ("q,v" and "v,q" adapt the same layers; a ``re:`` pattern as written), anything else by its repr."""
    if isinstance(value, bool):
        return ("bool", value)
    if _is_number(value):
        return ("number", float(value))
    if key in ("targets", "modules_to_save") and isinstance(value, str) and not value.startswith("re:"):
        return ("names", frozenset(value.split(",")))
    return ("repr", repr(value))


def _parse_dim(key: str, spec: Any, where: str) -> Dim:
    if isinstance(spec, str) and spec.startswith("="):
        other = spec[1:].strip()
        if other not in OPTIONS:
            raise InputError(f"{where}: {spec!r} ties to {other!r}, which is not a training option")
        if other == key:
            raise InputError(f"{where}: {spec!r} ties the option to itself")
        return Dim(key, "tie", (other,))
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise InputError(f"{where}: expected one distribution ({', '.join('{' + d + ': ...}' for d in DISTRIBUTIONS)}) "
                         f"or '=other_option', got {spec!r}")
    (dist, arg), = spec.items()
    if dist not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(dist), DISTRIBUTIONS, n=1)
        raise InputError(f"{where}: unknown distribution {dist!r}"
                         + (f" (did you mean {close[0]}?)" if close else f"; use one of {', '.join(DISTRIBUTIONS)}"))
    kind = option_kind(key)
    if dist in ("choice", "grid"):
        if not isinstance(arg, (list, tuple)) or not arg:
            raise InputError(f"{where}: {dist} needs a non-empty list of values, got {arg!r}")
        try:
            values = tuple(encode(key, v) for v in arg)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if len({_identity(key, v) for v in values}) != len(values):
            raise InputError(f"{where}: {dist} lists a value twice: {list(arg)!r}")
        return Dim(key, dist, values)
    if not isinstance(arg, (list, tuple)) or len(arg) != 2 or not all(_is_number(v) for v in arg):
        raise InputError(f"{where}: {dist} needs [lower, upper] (two numbers), got {arg!r}")
    lo, hi = arg
    if lo > hi:
        raise InputError(f"{where}: {dist} lower bound {lo} is greater than the upper bound {hi}")
    if dist == "loguniform" and lo <= 0:
        raise InputError(f"{where}: loguniform needs 0 < lower <= upper, got [{lo}, {hi}]")
    if dist == "randint":
        if not all(float(v).is_integer() for v in arg):
            raise InputError(f"{where}: randint needs integer bounds, got {list(arg)!r}")
        if kind not in ("int", "float"):
            raise InputError(f"{where}: randint draws numbers, but {key} is not numeric; use choice")
        return Dim(key, dist, (int(lo), int(hi)))
    if kind != "float":
        what = {"int": "an integer option; use randint or choice", "bool": "true or false; use choice",
                "list": "a list option; use choice"}.get(kind, "not a number; use choice")
        raise InputError(f"{where}: {dist} draws real numbers, but {key} is {what}")
    return Dim(key, dist, (float(lo), float(hi)))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _order_ties(dims: dict[str, Dim]) -> list[Dim]:
    """Sampled dims in the given order, then ties so that each comes after the tie it copies (no cycles)."""
    ordered = [d for d in dims.values() if d.kind != "tie"]
    pending = {k: d for k, d in dims.items() if d.kind == "tie"}
    done = {d.key for d in ordered}
    while pending:
        ready = [d for k, d in pending.items() if d.values[0] not in pending]
        if not ready:
            key = next(iter(pending))
            raise InputError(f"search.{key}: ties form a cycle ({' -> '.join(pending)}); one option must be sampled")
        for d in ready:
            ordered.append(d)
            done.add(d.key)
            del pending[d.key]
    return ordered


def candidates(space: Space, key: str, base: TrainConfig) -> list[Any]:
    """Values of ``key`` worth checking: every choice, both bounds of a range, a tie's source's; else fixed."""
    dim = next((d for d in space.dims if d.key == key), None)
    if dim is None:
        return [encode(key, getattr(base, key))]
    if dim.kind == "tie":
        return candidates(space, dim.values[0], base)
    return list(dim.values)


def _check_values(space: Space, base: TrainConfig) -> None:
    """Every candidate value must make a valid TrainConfig; a tie must copy a compatible option."""
    for d in space.dims:
        where = f"search.{d.key}"
        if d.kind == "tie":
            if _root(space, d).kind in ("uniform", "loguniform") and option_kind(d.key) != "float":
                raise InputError(f"{where}: '={d.values[0]}' copies real numbers into {d.key}, which is "
                                 f"{option_kind(d.key)}-valued")
        for value in candidates(space, d.key, base):
            try:
                base.replace(**{d.key: value})
            except InputError as e:
                raise InputError(f"{where}: value {value!r} is not valid: {e}") from None
            except TypeError as e:
                raise InputError(f"{where}: value {value!r} is not valid ({e})") from None


def _root(space: Space, dim: Dim) -> Dim:
    """The sampled dimension a chain of ties copies (the last tie when the chain ends at a fixed option)."""
    by_key = {d.key: d for d in space.dims}
    while dim.kind == "tie" and dim.values[0] in by_key:
        dim = by_key[dim.values[0]]
    return dim


def check_model(space: Space, base: TrainConfig) -> None:
    """Load the model once: every (targets, layers) candidate must match, every rank must fit its matrices.

    A LoRA pair B (d x r), A (r x k) only makes sense for r <= min(d, k) of the adapted matrix. The
    default trial (the fixed options' targets, layers and rank) is checked as well as the samples.
    """
    from loratune.training.models import load_model, modules_to_save

    if base.method == "full":                               # no adapter: nothing to fit into the model
        return
    model = load_model(base.model, ["0", "1"])
    saved = modules_to_save(base, model)
    fixed = {k: encode(k, getattr(base, k)) for k in ("targets", "layers")}
    _check_combo(model, fixed["targets"], fixed["layers"], base.rank, "--rank", "--targets", saved)
    rank_where = "search.rank" if "rank" in space.keys else "--rank"
    where = next((f"search.{k}" for k in ("targets", "layers") if k in space.keys), "--targets")
    max_rank = max(int(r) for r in candidates(space, "rank", base))
    for targets, layers in itertools.product(candidates(space, "targets", base), candidates(space, "layers", base)):
        _check_combo(model, targets, layers, max_rank, rank_where, where, saved)
    if "modules_to_save" in space.keys:                     # a name the model lacks would fail every trial
        from loratune.core.inject import saved_modules

        for value in candidates(space, "modules_to_save", base):
            try:
                saved_modules(model, parse_modules(value))
            except InputError as e:
                raise InputError(f"search.modules_to_save: {value!r}: {e}") from None


def _check_combo(model: Any, targets: str, layers: str | None, rank: int, rank_where: str, where: str,
                 saved: tuple[str, ...] = ()) -> None:
    from loratune.core.inject import resolve_targets
    from loratune.core.lora import linear_shape

    try:
        names = resolve_targets(model, parse_targets(targets), parse_layers(layers), saved)
    except InputError as e:
        raise InputError(f"{where}: {targets!r}" + (f" (layers {layers})" if layers else "") + f": {e}") from None
    for name in names:
        d, k = linear_shape(_unwrapped(model.get_submodule(name)))
        if rank > min(d, k):
            raise InputError(f"{rank_where}: rank {rank} is larger than min(d, k) = {min(d, k)} of {name} "
                             f"({d}x{k}), targeted by targets {targets!r}")


def _unwrapped(layer: Any) -> Any:
    return getattr(layer, "base_layer", layer)


def validate(raw: Any, base: TrainConfig, *, search_alg: str = "random", load_model: bool = True) -> Space:
    """:func:`parse_space`, the search algorithm's limits, and (``load_model``) :func:`check_model`."""
    space = parse_space(raw, base)
    if search_alg == "optuna":
        grid = [d.key for d in space.dims if d.kind == "grid"]
        if grid:
            raise InputError(f"search.{grid[0]}: grid is not available with --search-alg optuna "
                             "(TPE samples; use choice, or --search-alg random)")
    if load_model:
        check_model(space, base)
    return space


def check_device(space: Space, base: TrainConfig, device: str) -> None:
    """What only the trials' device decides (known once Ray says whether trials get GPUs)."""
    if device == "cpu" and "fp16" in candidates(space, "precision", base):
        where = "search.precision" if "precision" in space.keys else "--precision"
        raise InputError(f"{where}: fp16 is for CUDA devices, and the trials run on CPUs; use bf16 or fp32")


def default_mode(metric: str) -> str:
    """``--mode`` where none is given: ``min`` for a loss (:data:`LOWER_IS_BETTER`), ``max`` for the scores."""
    return "min" if metric in LOWER_IS_BETTER else "max"


def task_metrics(task: str, choices: bool = True) -> tuple[str, ...]:
    """The validation metrics a trial of ``task`` reports: a classifier's :data:`CLASSIFICATION_METRICS`, a causal
    LM's :data:`CAUSAL_METRICS`, without ``val_accuracy`` where its data has no label set (``choices`` False)."""
    if task != "causal-lm":
        return CLASSIFICATION_METRICS
    return tuple(m for m in CAUSAL_METRICS if choices or m != "val_accuracy")


def check_metric(metric: str, task: str, choices: bool | None = None) -> None:
    """InputError unless ``metric`` is one a trial of ``task`` reports (before Ray starts: a metric no trial
    reports would leave ASHA nothing to rank). ``choices``: whether the causal-LM data's completions are a label
    set (None: not known yet, so ``val_accuracy`` passes until the data is read)."""
    offered = task_metrics(task, choices is not False)
    if metric in offered:
        return
    from loratune.training.causal_data import MAX_CHOICES

    what = (f"this causal-LM data's completions are not a label set (at most {MAX_CHOICES} distinct answers), so no "
            "choice accuracy is scored" if task == "causal-lm" and metric == "val_accuracy"
            else f"a {task} trial does not report it")
    raise InputError(f"--metric: {metric}: {what}; this search offers {', '.join(offered)}")


def columns(space: Space) -> list[str]:
    """trials.csv's columns (the contract's order): the best epoch's validation accuracy and F1 each with its
    95% interval (``_lo``/``_hi``: Wilson, bootstrap; :func:`loratune.search.trials.intervals`)."""
    return ["trial", "status", "epochs_run", *space.keys, "val_loss", "val_accuracy", *INTERVAL_COLUMNS[:2],
            "val_f1", *INTERVAL_COLUMNS[2:]]
