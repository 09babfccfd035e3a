"""Hyperparameter search on Ray Tune: the one module that imports Ray.

``tune()`` validates the space (:mod:`loratune.search.space`) and prepares the data before Ray starts,
then runs one :func:`loratune.training.loop.train` per trial with ASHA early stopping:

- The untuned config (the fixed options, every default) is always the first trial, so the search
  can only improve on it. Random search: ``BasicVariantGenerator(points_to_evaluate=[default])``,
  where the default replaces one sample and grid values multiply the others; Optuna's TPE: a
  define-by-run space whose trial number 0 is the default.
- Tokenized data goes to the object store once (``tune.with_parameters``). A trial gets
  ``cpus_per_trial`` CPUs and as many torch threads (plus a GPU share when trials run on CUDA).
- Each epoch a trial reports its validation metrics with its checkpoint file (``ray.tune.report``);
  a restarted or resumed trial continues from it (``ray.tune.get_checkpoint``). A trial whose loss
  turns non-finite reports ``diverged=1`` without the metric (ASHA and the searchers skip it) and ends.
- Each trial writes its own run directory ``OUT/trials/<trial id>``; the best one by the validation
  metric alone is copied to ``OUT/best`` and evaluated on the test split once.
- A causal-LM search evaluates the base model (a run's epoch 0) once, in this process before the first trial
  (:func:`base_model`, kept in ``OUT/base_model.json`` for a resume), and hands it to every trial: its metrics and
  its answers to the first validation rows (each trial's generations.json base column).

A local search keeps Ray on 127.0.0.1, in a short temp folder (Unix socket paths have 107 bytes),
with a per-process auth token in the environment (nothing in the home directory); Ray's results go
to the run directory (or ``storage``), its logs to files. ``resume=DIR`` continues a search whose
driver died: unfinished trials go on from their checkpoints, finished ones are not run again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import ray
from ray import tune as rt
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from loratune import yamltext
from loratune.errors import Diverged, InputError, Interrupted
from loratune.runtime import available_cpus, release_memory, require, set_threads
from loratune.search.space import (
    METRICS,
    Space,
    candidates,
    check_device,
    check_metric,
    task_metrics,
    validate,
)
from loratune.search.trials import (
    BASE_MODEL,
    SearchResult,
    Tested,
    baseline_for,
    finish,
    load_result,
    new_search,
    read_base_model,
    read_search_yaml,
    status_of,
    trial_record,
)
from loratune.training import lock, rundir
from loratune.training.loop import Prepared, prepare_data, train
from loratune.training.options import TrainConfig

log = logging.getLogger(__name__)
require("ray")                     # the private modules _ray_session uses: ray_constants, _raylet.Config
Progress = Callable[[dict[str, Any]], None]

STAGE = ".tune-checkpoint"           # in a trial's run directory: the file Ray copies to storage each epoch
LENT = ".threads.json"               # in a local search's folder: the torch threads lent to each trial (LendIdleCpus)
LEND_EVERY = 10                      # a trial reads it every this many optimizer steps (about a second)
_TOKEN = secrets.token_hex(32)        # this process's Ray auth token for local clusters (never on disk)
_LIVE: dict[str, Any] = {}            # the running search's progress sink and view (Ray restores callbacks by pickle)


def tune(config: TrainConfig | None = None, *, space: dict[str, Any] | None = None, samples: int = 8,
         max_epochs: int = 3, rungs_per_epoch: int | None = None, reduction_factor: int | None = None,
         last_epoch_rung: bool | None = None,
         cpus_per_trial: int = 1, max_concurrent: int | None = None, search_alg: str = "random",
         metric: str = "val_loss", mode: str | None = None, max_failures: int = 2, address: str | None = None,
         storage: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
         resume: str | os.PathLike | None = None, overwrite: bool = False, progress: Progress | None = None,
         on_done: Callable[[SearchResult], None] | None = None, **options: Any) -> SearchResult:
    """Search LoRA hyperparameters; ``options`` (or ``config``) fix training options for every trial.

    ``space`` is the contract's ``search:`` mapping (default: :data:`loratune.search.space.DEFAULT_SPACE`).
    ``samples`` counts the default trial; grid values multiply the others. Each trial's schedule
    is ``max_epochs`` long; ASHA (grace one rung, reduction ``reduction_factor``, default
    :data:`REDUCTION_FACTOR`) may stop it earlier on ``metric``/``mode`` at any
    of its ``rungs_per_epoch`` validation passes an epoch (default :data:`RUNGS_PER_EPOCH`; 1: once an epoch), at
    the rungs grace × η^k and, with ``last_epoch_rung`` (default :data:`LAST_EPOCH_RUNG`), one epoch before the end. A
    classification trial found collapsed (training/loop.collapsed) at a pass after its warm-up stops there.
    ``metric`` must be one the task's trials report (:func:`loratune.search.space.task_metrics`: a causal LM's
    ``val_loss``, ``val_perplexity``, ``val_exact_match``, and ``val_accuracy`` where its data is a label set);
    ``mode`` None is the metric's own (min for a loss, max for a score).
    ``resume=DIR`` continues the search in DIR with the options it was started with. The search holds
    its directory's lock (training/lock.py) from its first write to the end of ``on_done(result)``.
    """
    t0 = time.monotonic()
    emit = progress or (lambda event: None)
    with contextlib.ExitStack() as held:
        if resume is not None:
            out = Path(resume)
            read_search_yaml(out)                                   # not a search: refused before the lock
            held.enter_context(lock.hold(out, flag="--resume"))
            doc = read_search_yaml(out)                             # as it is now that no one else writes
            if (out / "search.json").is_file():
                emit({"kind": "already_done", "out": str(out)})
                return _done(load_result(out, doc), on_done)
            address = address or doc.get("address")
        else:
            doc = new_search(config, options, space, samples, max_epochs, cpus_per_trial, max_concurrent, search_alg,
                             metric, mode, max_failures, address, storage, rungs_per_epoch,
                             reduction_factor, last_epoch_rung)
            out = Path(out) if out is not None else rundir.default_out("tune")
            rundir.check_out(out, resume=False, overwrite=overwrite)
            storage_dir = Path(doc["storage"]) if doc["storage"] else out.resolve()
            doc["experiment"] = str(storage_dir / ("ray" if not doc["storage"] else f"{out.name}-{secrets.token_hex(3)}"))
        base = TrainConfig.from_stored(doc["options"])
        parsed = validate(doc["search"], base, search_alg=doc["search_alg"], load_model=resume is None)
        prepared = prepare_data(base)
        check_metric(doc["metric"], base.task, bool(prepared.label_names))
        metrics = task_metrics(base.task, bool(prepared.label_names)) if prepared.task == "causal-lm" else None
        if resume is None:
            held.enter_context(lock.hold(out, flag="--out"))
            rundir.check_out(out, resume=False, overwrite=overwrite)        # again, now that no one else can write
            rundir.start(out, overwrite=overwrite)
            (out / "search.yaml").write_text(yamltext.dump(doc, sort_keys=False), encoding="utf-8")
        emit({"kind": "search_start", "out": str(out), "trials": _trial_total(parsed, doc),
              "resumed": resume is not None, "keys": parsed.keys, "max_epochs": doc["max_epochs"],
              "rungs_per_epoch": rungs_of(doc), "stop_rungs": stop_rungs(doc)})
        with _ray_session(address, out / "ray.log", defer=held) as cluster:
            grid = _fit(doc, parsed, base, prepared, out, cluster, emit, resume is not None)
        trials = trial_records(grid, _LIVE.pop("view", None), parsed, base, out, metrics)
        if any(t["status"] is None for t in trials) or len(trials) < _trial_total(parsed, doc):
            raise Interrupted(f"search interrupted; its state is saved in {out}")
        return _done(finish(out, doc, parsed, trials, time.monotonic() - t0,
                            lambda adapter: test_metrics(adapter, prepared, base), emit, metrics), on_done)


def rungs_of(doc: dict[str, Any]) -> int:
    """A search's rungs per epoch (search.yaml; a search from before the option had one an epoch)."""
    return int(doc.get("rungs_per_epoch") or 1)


def reduction_of(doc: dict[str, Any]) -> int:
    """A search's ASHA reduction factor (search.yaml; a search from before the option used the seed's 2)."""
    return int(doc.get("reduction_factor") or 2)


def _ray_rungs(doc: dict[str, Any]) -> list[int]:
    """Ray's ASHA rungs for a search, ascending: grace (one pass) × η^k, as many as its _Bracket makes (MAX_RUNGS,
    s = 0; ``max_t`` itself included where it is a power of η)."""
    eta = reduction_of(doc)
    count = int(np.log(int(doc["max_epochs"]) * rungs_of(doc)) / np.log(eta) + 1)
    return [eta ** k for k in range(count)]


def last_rung_of(doc: dict[str, Any]) -> int | None:
    """The rung (in validation passes) one epoch before ``max_t`` that ``last_epoch_rung`` adds to Ray's rungs, where
    it lies past the last of those before ``max_t``; None otherwise, or without the option (a search from before it
    had none)."""
    rungs = rungs_of(doc)
    max_t = int(doc["max_epochs"]) * rungs
    last = max((r for r in _ray_rungs(doc) if r < max_t), default=0)
    return max_t - rungs if doc.get("last_epoch_rung") and max_t - rungs > last else None


def stop_rungs(doc: dict[str, Any]) -> list[int]:
    """The rungs (validation passes) at which ASHA may stop a trial, ascending: Ray's and :func:`last_rung_of`; what
    :class:`DefaultRunsOut` is built with."""
    extra = last_rung_of(doc)
    return sorted(set(_ray_rungs(doc)) | ({extra} if extra is not None else set()))


def _done(result: SearchResult, on_done: Callable[[SearchResult], None] | None) -> SearchResult:
    if on_done is not None:
        on_done(result)
    return result


def trial_records(results: Iterable[Any], view: LiveView | None, space: Space, base: TrainConfig,
                  out: Path, metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One record per Ray result, the untuned trial first, then in creation order (``metrics``: a causal-LM
    search's columns, :func:`loratune.search.trials.trial_record`).

    A trial whose worker died before it reported anything has no config in Ray's result (``Result.config``
    is None: Ray keeps the config in the metrics); the config the callback saw when the trial started or
    failed stands in for it.
    """
    ended, order, configs = (view.ended, view.order, view.configs) if view is not None else ({}, {}, {})

    def tid(r: Any) -> str:
        return r.metrics["trial_id"]                      # Ray's last_result always carries the trial id

    def config(r: Any) -> dict[str, Any]:
        return r.config or configs.get(tid(r)) or {}

    results = sorted(results, key=lambda r: (order.get(tid(r), 1 << 30), tid(r)))
    default = space.default_point(base)                   # the untuned trial; a duplicate of it would be equal
    results.sort(key=lambda r: not is_default(config(r), default, space.keys))
    return [trial_record(space, tid(r), "failed" if r.error else ended.get(tid(r)), config(r), out / "trials" / tid(r),
                         metrics) for r in results]


def _trial_total(space: Space, doc: dict[str, Any]) -> int:
    return doc["samples"] if doc["search_alg"] == "optuna" else space.trial_count(doc["samples"])


# --- Ray -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _ray_session(address: str | None, logfile: Path, defer: contextlib.ExitStack | None = None
                 ) -> Iterator[dict[str, float]]:
    """Start (or join) Ray quietly; yield the cluster's resources; always shut it down.

    With ``defer``, a session whose body ended without an error is shut down in a background thread while the
    caller goes on (the search's test split and report: ray.shutdown spent ≈ 2 s waiting for Ray's processes to
    exit); ``defer`` joins that thread, re-raising what it raised, when it closes. An error shuts down at once."""
    env = {"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
           "TUNE_GLOBAL_CHECKPOINT_S": "0", "RAY_AIR_NEW_OUTPUT": "0"}
    if address is None:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"           # loopback only (read when ray is imported)
        if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)  # else Ray writes ~/.ray/auth_token
    temp = tempfile.mkdtemp(prefix="lt-ray-", dir="/tmp" if os.path.isdir("/tmp") else None) if address is None else ""
    keep = [False]                                                 # Ray's own logs, after an internal error
    teardown = contextlib.ExitStack()                              # run last-in first-out, by one thread or another
    failed = True
    old_term = None
    try:
        if address is None:
            teardown.callback(ray._raylet.Config.initialize, "")  # last: back to the caller's RAY_AUTH_* settings
        teardown.enter_context(_env(env))
        from ray._private import ray_constants

        teardown.callback(setattr, ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
        if address is None:
            ray_constants.ENABLE_RAY_CLUSTER = False              # if ray was imported before the env was set
            ray._raylet.Config.initialize("")                     # re-read RAY_AUTH_* likewise
        teardown.callback(_drop_temp, temp, keep)
        handler = logging.FileHandler(logfile, encoding="utf-8")
        teardown.callback(handler.close)
        ray_log = logging.getLogger("ray")
        teardown.callback(_set_handlers, ray_log, list(ray_log.handlers), ray_log.propagate)
        teardown.callback(ray.shutdown)                           # first
        try:
            kw: dict[str, Any] = dict(log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
            if address is None:
                ray.init(num_cpus=available_cpus(), include_dashboard=False, _temp_dir=temp, **kw)
            else:
                ray.init(address=address, **kw)
            _set_handlers(ray_log, [handler], False)               # Ray's own messages go to OUT/ray.log
            old_term = _sigterm_as_sigint()
            yield {k: float(v) for k, v in ray.cluster_resources().items()} | {
                "max_node_cpus": max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)}
            failed = False
        except Exception as e:
            keep[0] = not isinstance(e, InputError)
            raise
    finally:
        _restore_sigterm(old_term)
        if defer is not None and not failed:
            closing = _Closing(teardown)
            closing.start()
            defer.callback(closing.join_and_raise)
        else:
            teardown.close()


def _set_handlers(logger: logging.Logger, handlers: list[logging.Handler], propagate: bool) -> None:
    logger.handlers[:] = handlers
    logger.propagate = propagate


def _drop_temp(temp: str, keep: list[bool]) -> None:
    if keep[0] and temp:
        log.warning("Ray's logs are in %s", temp)
    elif temp:
        shutil.rmtree(temp, ignore_errors=True)


class _Closing(threading.Thread):
    """A Ray session's teardown (:func:`_ray_session`) run in the background; :meth:`join_and_raise` waits for it."""

    def __init__(self, teardown: contextlib.ExitStack) -> None:
        super().__init__(name="loratune-ray-shutdown", daemon=True)
        self.teardown = teardown
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.teardown.close()
        except BaseException as e:  # noqa: BLE001 - handed to the joining thread
            self.error = e

    def join_and_raise(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _sigterm_as_sigint() -> Any:
    """ray.init makes SIGTERM abort the driver; we want Ctrl-C's graceful stop (state saved, exit 130).

    Returns the handler it replaced (None off the main thread, where handlers can't be set).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def _restore_sigterm(old: Any) -> None:
    if old is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, old)


def _fit(doc: dict[str, Any], space: Space, base: TrainConfig, prepared: Prepared, out: Path,
         cluster: dict[str, float], emit: Progress, resumed: bool) -> Any:
    """Build (or restore) the Tuner and run it; returns Ray's ResultGrid."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    cpus = doc["cpus_per_trial"]
    if cpus > cluster["max_node_cpus"]:
        raise InputError(f"--cpus-per-trial: {cpus} is more than the {cluster['max_node_cpus']:g} CPUs of the "
                         f"largest Ray node")
    concurrent = doc["max_concurrent"] or max(1, int(cluster.get("CPU", 1) // cpus))
    gpus = cluster.get("GPU", 0.0)
    if base.device == "cuda" and not gpus:
        raise InputError("--device: cuda was asked for, but the Ray cluster has no GPU")
    use_gpu = base.device == "cuda" or (base.device == "auto" and gpus > 0)
    resources = {"cpu": cpus, "gpu": min(1.0, gpus / concurrent)} if use_gpu else {"cpu": cpus}
    check_device(space, base, "cuda" if use_gpu else "cpu")
    rungs = rungs_of(doc)
    setup = {"options": {**base.to_dict(), "epochs": doc["max_epochs"], "threads": cpus, "evals_per_epoch": rungs,
                         "device": "cuda" if use_gpu else "cpu"},
             "trials_dir": str((out / "trials").resolve()), "space": space, "default": space.default_point(base),
             "lent": str((out / LENT).resolve()) if doc.get("address") is None and not use_gpu
             and doc["max_concurrent"] is None else None}
    if prepared.task == "causal-lm":
        setup["base_model"] = base_model(TrainConfig.from_stored(setup["options"]), space, prepared, out, emit)
    trainable = rt.with_resources(rt.with_parameters(_trial, prepared=prepared, setup=setup), resources)
    default = setup["default"]
    if doc["search_alg"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        fixed = {d.key: default[d.key] for d in space.sampled if d.contains(default[d.key])}
        searcher: Any = ConcurrencyLimiter(
            OptunaSearch(space=OptunaSpace(space, default, base), metric=doc["metric"], mode=doc["mode"],
                         points_to_evaluate=[fixed] if fixed else None, seed=base.seed), max_concurrent=concurrent)
        param_space: dict[str, Any] = {}
    else:
        searcher = BasicVariantGenerator(points_to_evaluate=[default], random_state=base.seed,
                                         max_concurrent=concurrent)
        param_space = ray_space(space, base)
    _LIVE.update(sink=emit, space=space)
    exp = Path(doc["experiment"])
    if resumed and rt.Tuner.can_restore(str(exp)):
        tuner = rt.Tuner.restore(str(exp), trainable=trainable, param_space=param_space, resume_unfinished=True,
                                 resume_errored=False, restart_errored=False)
    else:
        scheduler = DefaultRunsOut(default, space.keys, time_attr="training_iteration", metric=doc["metric"],
                                   mode=doc["mode"], max_t=doc["max_epochs"] * rungs, grace_period=1,
                                   reduction_factor=reduction_of(doc), stop_last_trials=False,
                                   extra_rung=last_rung_of(doc))
        callbacks: list[Callback] = [LiveView(), KeptJson(), KeptCsv()]
        if setup["lent"]:
            callbacks.append(LendIdleCpus(setup["lent"], _trial_total(space, doc), int(cluster.get("CPU", 1)), cpus))
        run = rt.RunConfig(name=exp.name, storage_path=str(exp.parent), verbose=0, callbacks=callbacks,
                           failure_config=rt.FailureConfig(max_failures=doc["max_failures"]),
                           checkpoint_config=rt.CheckpointConfig(num_to_keep=2))
        tuner = rt.Tuner(trainable, param_space=param_space, run_config=run,
                         tune_config=rt.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=doc["samples"],
                                                   reuse_actors=True))
    try:
        return tuner.fit()
    finally:
        _LIVE.pop("sink", None)


class DefaultRunsOut(ASHAScheduler):
    """ASHA, except that the untuned default trial is never stopped: its results still count in every rung (the
    others are judged against it), but it trains its whole schedule, as ``loratune train`` would, so the search's
    comparison of its best with the default (on test, search.json) is with the default a user would get.

    ``extra_rung`` (:func:`last_rung_of`), if given, is one more rung beside Ray's grace × η^k, judged as they are:
    a trial goes on past it if its result is in the best 1/η of those recorded there."""

    def __init__(self, default: dict[str, Any], keys: list[str], extra_rung: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.default, self.keys = dict(default), list(keys)
        for bracket in self._brackets if extra_rung is not None else ():
            if all(m != extra_rung for m, _ in bracket._rungs):  # Ray's (milestone, recorded) pairs, descending
                bracket._rungs = sorted([*bracket._rungs, (extra_rung, {})], key=lambda r: r[0], reverse=True)

    def milestones(self) -> list[int]:
        """The rungs (in validation passes) at which a trial may be stopped, ascending."""
        return sorted(m for m, _ in self._brackets[0]._rungs)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and is_default(trial.config, self.default, self.keys):
            self._num_stopped -= 1
            return self.CONTINUE
        return action


def is_default(config: dict[str, Any], default: dict[str, Any], keys: list[str]) -> bool:
    """The trial of this Ray config is the untuned default (its searched values are the default point's)."""
    return {k: config.get(k) for k in keys} == default


def ray_space(space: Space, base: TrainConfig) -> dict[str, Any]:
    """Ray Tune domains; randint's upper bound is exclusive in Ray and inclusive in our YAML."""
    make = {"choice": lambda v: rt.choice(list(v)), "grid": lambda v: rt.grid_search(list(v)),
            "uniform": lambda v: rt.uniform(*v), "loguniform": lambda v: rt.loguniform(*v),
            "randint": lambda v: rt.randint(v[0], v[1] + 1)}
    out: dict[str, Any] = {}
    for d in space.dims:
        if d.kind != "tie":
            out[d.key] = make[d.kind](d.values)
        elif d.values[0] in space.keys:
            out[d.key] = "=" + d.values[0]         # resolved by Space.resolve (Ray can't preset a sample_from)
        else:
            out[d.key] = space.resolve_ties({}, base)[d.key]
    return out


class OptunaSpace:
    """Define-by-run space for OptunaSearch: trial 0 is the untuned default; ties copy their source."""

    def __init__(self, space: Space, default: dict[str, Any], base: TrainConfig) -> None:
        self.space, self.default, self.base = space, default, base

    def __call__(self, trial: Any) -> dict[str, Any]:
        is_default = trial.number == 0                     # the first asked trial is the enqueued default point
        values: dict[str, Any] = {}
        for d in self.space.sampled:
            if is_default and not d.contains(self.default[d.key]):
                continue                                   # not representable: set below, unknown to TPE
            if d.kind == "choice":
                values[d.key] = trial.suggest_categorical(d.key, list(d.values))
            elif d.kind == "randint":
                values[d.key] = trial.suggest_int(d.key, d.values[0], d.values[1])
            else:
                values[d.key] = trial.suggest_float(d.key, d.values[0], d.values[1], log=d.kind == "loguniform")
        if is_default:
            return dict(self.default)
        resolved = self.space.resolve_ties(values, self.base)
        return {t.key: resolved[t.key] for t in self.space.ties}


class _KeepsDriverCopy:
    """Ray's result.json / progress.csv loggers, minus one race: a trial retried in the same search (its worker or
    node was lost) got its file copied back from the experiment folder, a snapshot that Ray's background sync
    rewrites every few seconds. Read stale or while it was being rewritten, the copy dropped the rows the trial had
    reported (seen in CI: the lost node's trial kept only its epoch after the retry). The driver's own file
    holds every row, so it is kept; the experiment folder's copy is still restored where the driver has none
    (a search resumed by a new driver)."""

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)            # type: ignore[misc]


class KeptJson(_KeepsDriverCopy, JsonLoggerCallback):
    """result.json, the driver's rows kept on a retry (see _KeepsDriverCopy)."""


class KeptCsv(_KeepsDriverCopy, CSVLoggerCallback):
    """progress.csv, the driver's rows kept on a retry (see _KeepsDriverCopy)."""


class LiveView(Callback):
    """Ray Tune callback -> our progress events; remembers how each trial ended (saved with the experiment).

    Ray pickles callbacks into the experiment and restores them on resume, so the progress sink is
    looked up in a module global rather than held.
    """

    def __init__(self) -> None:
        self.ended: dict[str, str] = {}             # trial id -> status, once it ended
        self.order: dict[str, int] = {}             # trial id -> creation number (Ray's experiment tag)
        self.configs: dict[str, dict[str, Any]] = {}   # trial id -> its config (Ray loses it if no result came)

    def get_state(self) -> dict[str, Any]:
        return {"ended": dict(self.ended), "order": dict(self.order), "configs": dict(self.configs)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.ended, self.order = dict(state.get("ended", {})), dict(state.get("order", {}))
        self.configs = dict(state.get("configs", {}))

    def setup(self, **info: Any) -> None:
        _LIVE["view"] = self

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tag = str(trial.experiment_tag).split("_", 1)[0]
        self.order[trial.trial_id] = int(tag) if tag.isdigit() else len(self.order)
        self.configs[trial.trial_id] = dict(trial.config)
        resumed = trial.checkpoint is not None
        _emit({"kind": "trial", "event": "resume" if resumed else "start", "trial": trial.trial_id,
               "epoch": trial.last_result.get("epoch") if resumed else None, "config": _searched(trial.config)})

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _emit({"kind": "trial", "event": "retry", "trial": trial.trial_id, "config": _searched(trial.config)})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        _emit({"kind": "trial", "event": "diverged" if result.get("diverged") else "epoch", "trial": trial.trial_id,
               "epoch": result.get("epoch"), "epochs": result.get("epochs_planned"), "node": result.get("node_ip"),
               "metrics": {k: result[k] for k in METRICS if k in result}, "config": _searched(trial.config)})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = status_of(trial.last_result, error=False)
        _emit({"kind": "trial", "event": "end", "trial": trial.trial_id, "status": self.ended[trial.trial_id],
               "config": _searched(trial.config)})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = "failed"
        self.configs.setdefault(trial.trial_id, dict(trial.config))
        _emit({"kind": "trial", "event": "end", "trial": trial.trial_id, "status": "failed",
               "config": _searched(trial.config), "error": os.path.join(trial.path or "", "error.txt")})


def lent_threads(running: int, waiting: int, created: int, total: int, cpus: int, per: int) -> int:
    """The torch threads each running trial of a local search may use: its own ``per`` CPUs while trials are still
    to come (``created`` < ``total``) or wait for a CPU (a retry); once none will, the ``cpus`` of the machine shared
    among the ``running`` ones (never fewer than their own)."""
    if running < 1 or waiting or created < total:
        return per
    return max(per, cpus // running)


class LendIdleCpus(Callback):
    """A local search's tail: once every trial has been created and none waits, the CPUs that ended trials freed are
    lent to the trials still running, as torch threads. The driver keeps ``OUT/.threads.json`` (trial id -> threads)
    and each trial reads it every :data:`LEND_EVERY` optimizer steps (:func:`take_lent_threads`); a trial that waits
    again (a retry) sends every trial back to its own CPUs the same way. Without it the last trial trained alone on
    one CPU of two (9–35 s of 220–227 s searches, BENCHMARKS.md). Results change by rounding only: the same math on
    more threads."""

    def __init__(self, path: str, total: int, cpus: int, per: int) -> None:
        self.path, self.total, self.cpus, self.per = Path(path), total, cpus, per
        self.lent: dict[str, int] = {}                  # what the file says

    def setup(self, **info: Any) -> None:
        self.path.unlink(missing_ok=True)                # a resumed search's trials start on their own CPUs
        self.lent = {}

    def _share(self, trials: list, ended: Any = None, started: Any = None, retried: Any = None) -> None:
        running = [t for t in trials if t is started or (t not in (ended, retried) and t.status == "RUNNING")]
        waiting = sum(t is retried or (t not in (ended, started) and t.status == "PENDING") for t in trials)
        n = lent_threads(len(running), waiting, len(trials), self.total, self.cpus, self.per)
        lent = {t.trial_id: n for t in running if n != self.per}
        if lent != self.lent:
            with contextlib.suppress(OSError):           # a trial that cannot read it keeps its own CPUs
                rundir.write_json(self.path, lent)
                self.lent = lent

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._share(trials, started=trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._share(trials, retried=trial)                  # it waits for a CPU again

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._share(trials, ended=trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._share(trials, ended=trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.path.unlink(missing_ok=True)
        self.lent = {}


def take_lent_threads(path: str | None, trial_id: str, current: int, own: int) -> int:
    """A trial's torch threads from now on: what the search's lending file (:class:`LendIdleCpus`) gives
    ``trial_id``, else its ``own``; ``current`` is what it has now (runtime.set_threads only on a change)."""
    n = own
    if path:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            n = max(own, int(json.loads(Path(path).read_text()).get(trial_id, own)))
    return set_threads(n) if n != current else n


def _searched(config: dict[str, Any]) -> dict[str, Any]:
    space = _LIVE.get("space")
    return {k: v for k, v in space.resolve(config).items() if k in space.keys} if space else dict(config)


def _emit(event: dict[str, Any]) -> None:
    sink = _LIVE.get("sink")
    if sink is not None:
        try:
            sink(event)
        except Exception:  # noqa: BLE001 - a broken view must not stop the search
            log.exception("progress callback failed")


# --- one trial (runs in a Ray worker) ---------------------------------------------------------------

def _trial(config: dict[str, Any], prepared: Prepared, setup: dict[str, Any]) -> None:
    """Train one config; report each validation pass (a rung) with its checkpoint; continue from Ray's checkpoint
    if any. A collapsed classifier's last report carries ``collapsed=1`` (with its metrics: ASHA ranks it)."""
    from loratune.training.checkpoint import load_checkpoint

    trial_id = rt.get_context().get_trial_id()
    out = Path(setup["trials_dir"]) / trial_id
    cfg = TrainConfig.from_stored({**setup["options"], **setup["space"].resolve(config)})
    node = ray.util.get_node_ip_address()
    own = cfg.threads or 1                        # the trial's CPUs (train() sets them); a local search may lend more
    state: dict[str, Any] = {"epoch": 0, "planned": cfg.epochs, "collapsed": 0, "threads": own, "most": own}
    stage = out / STAGE                           # what Ray copies to storage: a link to this epoch's checkpoint

    def on_event(event: dict[str, Any]) -> None:
        if event["kind"] == "start":
            state["planned"] = event["epochs"]
        elif event["kind"] == "collapsed":
            state["collapsed"] = 1
        elif event["kind"] == "step" and event["step"] % LEND_EVERY == 0:       # CPUs lent or taken back
            state["threads"] = take_lent_threads(setup.get("lent"), trial_id, state["threads"], own)
            state["most"] = max(state["most"], state["threads"])

    def on_epoch(epoch: float, val: dict[str, float], ckpt: Path) -> None:
        state["epoch"] = epoch
        metrics = {**{f"val_{k}": float(v) for k, v in val.items()}, "epoch": epoch, "epochs_planned": state["planned"],
                   "diverged": 0, "collapsed": state["collapsed"], "node_ip": node,
                   "threads": state["most"]}                        # the most threads this rung trained on
        state["most"] = state["threads"]
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            os.link(ckpt, stage / ckpt.name)
        except OSError:
            shutil.copy2(ckpt, stage / ckpt.name)
        rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(str(stage)))

    release_memory()                              # a reused worker: the previous trial's model and activations
    restored = rt.get_checkpoint()
    with restored.as_directory() if restored is not None else contextlib.nullcontext(None) as where:
        resume_from = max(Path(where).glob("*.pt")) if where else None      # local storage: no copy
        if resume_from is not None:
            saved = load_checkpoint(resume_from)
            state["epoch"] = saved["epoch"] + saved.get("rung", 0) / cfg.evals_per_epoch
        try:
            train(cfg, out=out, overwrite=resume_from is None, prepared=prepared, resume_from=resume_from,
                  on_epoch=on_epoch, evaluate_test=False, progress=on_event, claim=False,   # the search holds its folder
                  stop_collapsed=not is_default(config, setup["default"], setup["space"].keys),
                  baseline=baseline_for(setup.get("base_model"), setup["space"].resolve(config), setup["options"]),
                  base_answers=base_answers_for(setup.get("base_model"), setup["space"].resolve(config),
                                                setup["options"]))
        except Diverged as e:                    # no metric in this report: ASHA and the searcher skip it
            rt.report({"diverged": 1, "epoch": state["epoch"], "epochs_planned": state["planned"],
                       "diverged_step": e.step, "node_ip": node})
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def test_metrics(adapter: Path, prepared: Prepared, base: TrainConfig) -> Tested:
    """The adapter's metrics on the prepared test split (the very split and tokens the trials had), and which
    examples it got right (the arg-max of its probabilities against the labels, in the split's order: what
    McNemar's test pairs between the best and the untuned default). A causal LM is scored as training scores
    it (tasks/causal_eval.score_causal): right or wrong by choice scoring, None without a label set."""
    from loratune.infer.inference import load, run_split
    from loratune.runtime import resolve_precision, set_threads
    from loratune.tasks.causal_eval import CausalSplit, score_causal

    if isinstance(prepared.test, CausalSplit):
        set_threads(None)                                 # as run_split: the driver's CPUs, Ray is gone
        loaded = load(adapter, device=base.device)
        dev = next(loaded.model.parameters()).device
        scores = score_causal(loaded.model, loaded.tokenizer, prepared.test, dev,
                              resolve_precision(base.precision, dev), prepared.pad_id)
        return Tested(scores.metrics, scores.correct)
    split = run_split(adapter, split="test", encoded=prepared.test, precision=base.precision,
                      device=base.device)
    return Tested(split.metrics, split.probs.argmax(axis=1) == split.labels)


def base_model(cfg: TrainConfig, space: Space, prepared: Prepared, out: Path, emit: Progress) -> dict[str, Any] | None:
    """A causal-LM search's epoch 0: the base model on validation and test, evaluated here once for all trials
    (each would otherwise load and evaluate it again, generations included, before its first step), on the
    trials' device and threads, at each ``--precision`` a trial may have (:func:`base_model_metrics`). Kept in
    ``OUT/base_model.json``, so a resumed search reuses it; None where this process cannot use the trials'
    device (a GPU cluster joined from a machine without one): each trial then evaluates it itself."""
    import torch

    saved = read_base_model(out, cfg.device)
    precisions = sorted({str(p) for p in candidates(space, "precision", cfg)})
    if saved is not None and set(precisions) <= set(saved["by_precision"]):
        return saved
    if cfg.device == "cuda" and not torch.cuda.is_available():
        log.info("the trials run on CUDA and this process has none: each trial evaluates the base model itself")
        return None
    emit({"kind": "message", "text": "evaluating the base model on validation and test (once, for every trial)"})
    metrics, answers = base_model_metrics(cfg, prepared, precisions)
    doc = {"device": cfg.device, "threads": cfg.threads, "by_precision": metrics, "generations": answers}
    rundir.write_json(out / BASE_MODEL, doc)
    return read_base_model(out, cfg.device)               # as a resume reads it: NaN where JSON has null


def base_answers_for(base_model: dict[str, Any] | None, config: dict[str, Any],
                     options: dict[str, Any]) -> list[str] | None:
    """The base model's answers a trial of ``config`` writes in its generations.json: base_model.json's
    ``generations`` at the trial's precision, chosen by :func:`baseline_for`'s rule; None where there are none (a
    search from before they were kept: the trial's base column stays null)."""
    if not base_model or not isinstance(base_model.get("generations"), dict):
        return None
    answers = baseline_for({"by_precision": base_model["generations"]}, config, options)
    return list(answers) if isinstance(answers, list) else None


def base_model_metrics(cfg: TrainConfig, prepared: Prepared, precisions: Iterable[str]
                       ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, list[str]]]:
    """``{precision: {"validation": metrics, "test": metrics}}`` of the base model with the untuned default's
    no-op adapter (B = 0), built as a trial builds its model (training/loop.setup, speed levers included) on
    ``cfg.device`` with ``cfg.threads`` torch threads: the very numbers a trial's own epoch 0 would have; and
    ``{precision: answers}``, its greedy answers to the first validation rows (the generations exact match made,
    :data:`SAMPLE_ROWS` of them: each trial's generations.json base column). Each precision option is resolved;
    options that resolve alike share one evaluation."""
    import torch

    from loratune.runtime import resolve_device, resolve_precision, set_threads
    from loratune.tasks.causal_eval import SAMPLE_ROWS
    from loratune.training.levers import Levers
    from loratune.training.loop import evaluate_split, setup

    device, before = resolve_device(cfg.device), torch.get_num_threads()
    threads = set_threads(cfg.threads)
    done: dict[str, tuple[dict[str, dict[str, float]], list[str]]] = {}
    out: dict[str, dict[str, dict[str, float]]] = {}
    answers: dict[str, list[str]] = {}
    try:
        for option in precisions:
            precision = resolve_precision(option, device)
            if precision not in done:
                run = setup(cfg.replace(precision=option), prepared, Path("."), device=device, precision=precision,
                            threads=threads, levers=Levers(), emit=lambda event: None)
                val, gens = evaluate_split(run, prepared.validation)
                done[precision] = ({"validation": val, "test": evaluate_split(run, prepared.test)[0]},
                                   gens[:SAMPLE_ROWS])
                del run
                release_memory()
            out[option], answers[option] = done[precision]
    finally:
        torch.set_num_threads(before)
    return out, answers
