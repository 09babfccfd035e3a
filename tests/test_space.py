"""The search space: YAML distributions parsed and checked before Ray starts (no Ray in these tests)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from loratune.errors import InputError
from loratune.search.space import (
    DEFAULT_SPACE,
    FIXED_ONLY,
    Dim,
    Space,
    check_device,
    columns,
    encode,
    load_space,
    option_kind,
    parse_space,
    space_presets,
    validate,
)
from loratune.search.trials import Tested, choose_best, finish, status_of, trial_record
from loratune.training.options import OPTIONS, TrainConfig, option_names


@pytest.fixture
def base() -> TrainConfig:
    return TrainConfig()


@pytest.mark.parametrize("space, fragment", [
    ({"lr": {"normal": [0, 1]}}, "search.lr: unknown distribution 'normal'"),
    ({"lr": {"uniform": [0.1, 0.01]}}, "search.lr: uniform lower bound 0.1 is greater than the upper bound 0.01"),
    ({"dropout": {"loguniform": [0.3, 0.1]}}, "search.dropout: loguniform lower bound"),
    ({"rank": {"randint": [16, 2]}}, "search.rank: randint lower bound 16"),
    ({"rank": {"choice": []}}, "search.rank: choice needs a non-empty list"),
    ({"batch_size": {"grid": []}}, "search.batch_size: grid needs a non-empty list"),
    ({"rnak": {"choice": [4, 8]}}, "search.rnak: unknown training option (did you mean rank?)"),
    ({"zzz": {"choice": [1]}}, "search.zzz: unknown training option; known options:"),
    ({"lr": {"loguniform": [0, 0.1]}}, "search.lr: loguniform needs 0 < lower"),
    ({"lr": {"loguniform": [-1e-3, 0.1]}}, "search.lr: loguniform needs 0 < lower"),
    ({"rank": {"uniform": [2, 16]}}, "search.rank: uniform draws real numbers, but rank is an integer option"),
    ({"rslora": {"uniform": [0, 1]}}, "search.rslora: uniform draws real numbers, but rslora is true or false"),
    ({"bias": {"randint": [0, 1]}}, "search.bias: randint draws numbers"),
    ({"rank": {"randint": [2.5, 8]}}, "search.rank: randint needs integer bounds"),
    ({"lr": {"uniform": [0.1]}}, "search.lr: uniform needs [lower, upper]"),
    ({"lr": {"uniform": ["a", "b"]}}, "search.lr: uniform needs [lower, upper]"),
    ({"lr": 0.1}, "search.lr: expected one distribution"),
    ({"lr": {"uniform": [0.1, 0.2], "choice": [1]}}, "search.lr: expected one distribution"),
    ({"alpha": "=rnak"}, "search.alpha: '=rnak' ties to 'rnak', which is not a training option"),
    ({"alpha": "=alpha"}, "search.alpha: '=alpha' ties the option to itself"),
    ({"alpha": "=rank", "rank": "=alpha"}, "ties form a cycle"),
    ({"rank": "=dropout", "dropout": {"uniform": [0.1, 0.2]}}, "search.rank: '=dropout' copies real numbers"),
    ({"rank": {"choice": [0, 4]}}, "search.rank: value 0 is not valid: --rank: must be >= 1"),
    ({"dropout": {"uniform": [0.1, 1.0]}}, "search.dropout: value 1.0 is not valid: --dropout: must be < 1"),
    ({"bias": {"choice": ["none", "some"]}}, "search.bias: value 'some' is not valid: --bias: expected one of"),
    ({"targets": {"choice": [[]]}}, "search.targets: --targets: empty target name"),
    ({"rank": {"choice": [4, 4]}}, "search.rank: choice lists a value twice"),
    ({"rank": {"grid": [4, 4.0]}}, "search.rank: grid lists a value twice"),          # equal numbers, one trial
    ({"targets": {"choice": ["q,v", "v,q"]}}, "search.targets: choice lists a value twice"),  # the same layers
    ({"modules_to_save": {"choice": ["pooler", ["pooler"]]}}, "search.modules_to_save: choice lists a value twice"),
    ({"modules_to_save": {"choice": ["none", "auto"]}}, "auto is not a value to search; list the values"),
    ({"lr": {"choice": [1e-4, "auto"]}}, "search.lr: auto is not a value to search; list numbers"),
    ({"system_prompt": {"choice": ["a", "b"]}}, "search.system_prompt: cannot be searched: the data is prepared"),
    ({"task": {"choice": ["classification", "causal-lm"]}}, "search.task: cannot be searched"),
    ({"prompt_column": {"choice": ["p", "q"]}}, "search.prompt_column: cannot be searched"),
    ({"completion_column": {"choice": ["p", "q"]}}, "search.completion_column: cannot be searched"),
    ({"messages_column": {"choice": ["p", "q"]}}, "search.messages_column: cannot be searched"),
    ({"max_length": {"choice": [32, 64]}}, "search.max_length: cannot be searched: the data is tokenized once"),
    ({"model": {"choice": ["a", "b"]}}, "search.model: cannot be searched"),
    ({"epochs": {"choice": [1, 2]}}, "search.epochs: cannot be searched: every trial trains --max-epochs"),
    ({"threads": {"choice": [1, 2]}}, "search.threads: cannot be searched"),
    ({}, "search: expected a mapping"),
    ([1, 2], "search: expected a mapping"),
])
def test_bad_spaces_name_the_key(base, space, fragment) -> None:
    with pytest.raises(InputError) as e:
        parse_space(space, base)
    assert fragment in str(e.value), str(e.value)


def test_parsing_needs_no_ray() -> None:
    code = ("import sys; from loratune.search.space import DEFAULT_SPACE, validate; from loratune.training.options import TrainConfig; "
            "validate(DEFAULT_SPACE, TrainConfig(), load_model=False); assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_default_space_is_loratunes_and_holds_the_untuned_default(base) -> None:
    space = parse_space(DEFAULT_SPACE, base)
    assert space.dims == (Dim("lr", "loguniform", (2e-4, 2e-3)), Dim("rank", "choice", (4, 8, 16)),
                          Dim("alpha", "choice", (8, 16, 32)), Dim("targets", "choice", ("q,v", "q,k,v,o")),
                          Dim("dropout", "uniform", (0.0, 0.2)), Dim("modules_to_save", "choice", ("none", "pooler")))
    assert load_space("default") == DEFAULT_SPACE and "default" in space_presets()
    # The untuned config: TrainConfig's defaults, a point of the space (Optuna can enqueue it as it is).
    default = space.default_point(base)
    assert default == {"lr": 5e-4, "rank": 8, "alpha": 16.0, "targets": "q,v", "dropout": 0.1, "modules_to_save": "none"}
    assert all(d.contains(default[d.key]) for d in space.sampled)
    assert space.default_point(base.replace(rank=4, targets="v"))["targets"] == "v"
    assert columns(space)[:9] == ["trial", "status", "epochs_run", "lr", "rank", "alpha", "targets", "dropout",
                                  "modules_to_save"]


def test_ties_follow_their_source_and_fixed_options(base) -> None:
    space = parse_space({"alpha": "=rank", "rank": {"choice": [2, 4]}, "weight_decay": "=dropout"}, base)
    assert space.keys == ["rank", "alpha", "weight_decay"]                   # a tie comes after its source
    assert space.resolve({"rank": 4, "alpha": "=rank", "weight_decay": 0.1}) == {
        "rank": 4, "alpha": 4, "weight_decay": 0.1}
    assert space.resolve_ties({"rank": 2}, base) == {"rank": 2, "alpha": 2, "weight_decay": base.dropout}
    chain = parse_space({"init": {"choice": ["kaiming"]}, "alpha": "=rank", "rank": "=seed",
                         "seed": {"randint": [1, 3]}}, base)
    assert chain.resolve({"seed": 2, "rank": "=seed", "alpha": "=rank", "init": "kaiming"})["alpha"] == 2


def test_grid_multiplies_samples_and_the_default_replaces_one(base) -> None:
    space = parse_space({"lr": {"grid": [1e-3, 1e-2, 0.1]}, "batch_size": {"grid": [8, 16]},
                         "rank": {"choice": [2, 4]}}, base)
    assert space.grid_size == 6
    assert space.trial_count(1) == 1 and space.trial_count(3) == 1 + 2 * 6
    assert parse_space(DEFAULT_SPACE, base).trial_count(8) == 8


def test_values_are_encoded_as_ray_scalars(base) -> None:
    assert encode("targets", ["q", "v"]) == encode("targets", "qv") == encode("targets", ("q", "v")) == "q,v"
    assert encode("targets", "attention") == "q,k,v,o"
    assert encode("targets", ["re:.*query"]) == "re:.*query"
    assert encode("layers", [1, 0]) == "0,1" and encode("layers", None) is None
    assert TrainConfig(targets="q,v").targets == ("q", "v") and TrainConfig(layers="0,1").layers == (0, 1)
    space = parse_space({"rank": {"randint": [2, 4]}}, base)          # both ends included
    assert space.dims[0].contains(4) and space.dims[0].contains(2) and not space.dims[0].contains(5)


def test_yaml_example_of_the_contract(base) -> None:
    doc = yaml.safe_load("""
        search:
          lr: {loguniform: [1.0e-4, 1.0e-1]}
          rank: {choice: [2, 4, 6, 8, 10, 16]}
          targets: {choice: [[q], [v], [q, v]]}
          dropout: {uniform: [0.1, 0.5]}
          alpha: "=rank"
          batch_size: {grid: [16, 32]}
    """)
    space = parse_space(doc["search"], base)
    assert space.keys == ["lr", "rank", "targets", "dropout", "batch_size", "alpha"]
    assert space.trial_count(8) == 1 + 7 * 2


def test_optuna_refuses_grid(base) -> None:
    with pytest.raises(InputError, match=r"search.batch_size: grid is not available with --search-alg optuna"):
        validate({"batch_size": {"grid": [8, 16]}}, base, search_alg="optuna", load_model=False)


def test_rank_larger_than_a_target_matrix_is_caught_with_the_model(tiny_model_dir) -> None:
    base = TrainConfig(model=tiny_model_dir)                              # hidden size 32: q, v are 32x32
    validate({"rank": {"choice": [4, 32]}, "targets": {"choice": [["q"], ["v"]]}}, base)
    with pytest.raises(InputError, match=r"search.rank: rank 64 is larger than min\(d, k\) = 32 of .*query"):
        validate({"rank": {"choice": [4, 64]}, "targets": {"choice": [["q"], ["v"]]}}, base)
    with pytest.raises(InputError, match=r"search.rank: rank 33 is larger than min\(d, k\) = 32"):
        validate({"rank": {"randint": [2, 33]}}, base)
    with pytest.raises(InputError, match=r"--rank: rank 40 is larger"):               # fixed rank, searched targets
        validate({"targets": {"choice": [["q"], ["v"]]}}, base.replace(rank=40))
    with pytest.raises(InputError, match=r"search.targets: 'nope'.*matches no linear layer"):
        validate({"targets": {"choice": [["q"], ["nope"]]}}, base)
    with pytest.raises(InputError, match=r"search.layers: .*--layers: no targeted layer"):
        validate({"layers": {"choice": [[0], [7]]}}, base)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_status_from_the_last_report() -> None:
    assert status_of({"epoch": 3, "epochs_planned": 3}, error=False) == "completed"
    assert status_of({"epoch": 1, "epochs_planned": 3}, error=False) == "stopped_early"
    assert status_of({"epoch": 1, "epochs_planned": 3, "diverged": 1}, error=False) == "diverged"
    assert status_of({}, error=True) == "failed"


def test_space_is_a_value(base) -> None:
    a, b = parse_space(DEFAULT_SPACE, base), parse_space(dict(DEFAULT_SPACE), base)
    assert a == b and isinstance(a, Space) and hash(a) == hash(b)


def _run_dir(root: Path, name: str, losses: list[float]) -> Path:
    """A trial's run directory as the trainer leaves it: eval lines in metrics.jsonl, an adapter folder."""
    run = root / "trials" / name
    (run / "adapter").mkdir(parents=True)
    lines = [{"type": "train", "step": 1, "loss": 9.0}]
    lines += [{"type": "eval", "split": "validation", "epoch": i + 1, "step": 10 * (i + 1), "loss": v,
               "accuracy": 1 - v, "f1": 1 - v} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_table_and_best_never_a_failed_or_diverged_trial(tmp_path, base) -> None:
    """Failed and diverged trials may have logged lower losses before they broke: they are never chosen."""
    space = parse_space({"rank": {"choice": [2, 4]}, "alpha": "=rank"}, base)
    specs = [("t0", "completed", 8, [0.5, 0.4]), ("t1", "failed", 2, [0.1]), ("t2", "diverged", 4, [0.05]),
             ("t3", "stopped_early", 2, [0.3]), ("t4", "completed", 4, [0.35, 0.32])]
    trials = [trial_record(space, name, status, {"rank": rank, "alpha": "=rank" if name != "t0" else 16.0},
                           _run_dir(tmp_path, name, losses)) for name, status, rank, losses in specs]
    assert choose_best(trials, "val_loss", "min")["trial"] == "t3"
    assert choose_best(trials, "val_accuracy", "max")["trial"] == "t3"
    tested = []
    doc = {"metric": "val_loss", "mode": "min", "experiment": str(tmp_path / "ray")}
    result = finish(tmp_path, doc, space, trials, 1.0,
                    lambda a: tested.append(a) or Tested({"accuracy": 0.5}, np.ones(3, bool)), lambda e: None)
    assert [Path(a).parent.name for a in tested] == ["best", "t0"]          # the best, then the untuned default
    header, rows = _read_csv(tmp_path / "trials.csv")
    assert header == ["trial", "status", "epochs_run", "rank", "alpha", "val_loss", "val_accuracy", "val_accuracy_lo",
                      "val_accuracy_hi", "val_f1", "val_f1_lo", "val_f1_hi"]
    assert [(r["trial"], r["status"], r["epochs_run"], r["alpha"]) for r in rows] == [
        ("t0", "completed", "2", "16.0"), ("t1", "failed", "1", "2.0"), ("t2", "diverged", "1", "4.0"),
        ("t3", "stopped_early", "1", "2.0"), ("t4", "completed", "2", "4.0")]
    assert json.loads((tmp_path / "trials.json").read_text()) == result.rows
    assert result.rows[4]["val_loss"] == 0.32 and result.best["trial"] == "t3" and result.default["trial"] == "t0"
    best = json.loads((tmp_path / "best" / "results.json").read_text())
    assert best["validation"]["loss"] == 0.3 and best["test"] == {"accuracy": 0.5} and best["best_epoch"] == 1
    summary = json.loads((tmp_path / "search.json").read_text())
    assert summary["statuses"] == {"completed": 2, "failed": 1, "diverged": 1, "stopped_early": 1}


def test_nothing_to_choose_when_every_trial_broke(tmp_path, base) -> None:
    space = parse_space({"rank": {"choice": [2, 4]}}, base)
    trials = [trial_record(space, "t0", "diverged", {"rank": 8}, tmp_path / "none"),
              trial_record(space, "t1", "failed", {"rank": 2}, tmp_path / "none")]
    result = finish(tmp_path, {"metric": "val_loss", "mode": "min", "experiment": ""}, space, trials, 0.0,
                    lambda a: pytest.fail("nothing to test"), lambda e: None)
    assert result.best is None and result.default["test"] is None and not (tmp_path / "best").exists()
    assert [r["epochs_run"] for r in result.rows] == [0, 0]


def test_fp16_needs_cuda(base) -> None:
    space = parse_space({"precision": {"choice": ["bf16", "fp16"]}}, base)
    check_device(space, base, "cuda")
    with pytest.raises(InputError, match="search.precision: fp16 is for CUDA devices"):
        check_device(space, base, "cpu")


def test_option_kinds_come_from_the_options_declaration() -> None:
    assert {k: option_kind(k) for k in ("lr", "rank", "targets", "layers", "bias", "rslora", "model", "clip")} == {
        "lr": "float", "rank": "int", "targets": "list", "layers": "list", "bias": "str", "rslora": "bool",
        "model": "str", "clip": "float"}
    assert all(option_kind(k) == OPTIONS[k].kind for k in option_names())
    assert set(FIXED_ONLY) <= set(option_names())
    with pytest.raises(InputError, match="search.targets: uniform draws real numbers, but targets is a list option"):
        parse_space({"targets": {"uniform": [0, 1]}}, TrainConfig())


def test_the_default_trial_sees_auto_options_as_numbers() -> None:
    base = TrainConfig(lr="auto", max_length="auto")
    space = parse_space({"lr": {"loguniform": [1e-4, 1e-1]}, "rank": {"choice": [4, 8]}}, base)
    point = space.default_point(base)
    assert point == {"lr": 5e-4, "rank": 8} and isinstance(point["lr"], float)
    assert space.default_point(base.replace(rank=4)) == {"lr": 5e-4, "rank": 4}   # lr stays auto, resolved again
    assert space.default_point(TrainConfig(lr=2e-3)) == {"lr": 2e-3, "rank": 8}


def test_searched_modules_to_save_are_checked_against_the_model(tiny_model_dir) -> None:
    from loratune.search.space import candidates

    base = TrainConfig(model=tiny_model_dir)
    space = validate({"modules_to_save": {"choice": [["pooler"], "none"]}}, base)
    assert candidates(space, "modules_to_save", base) == ["pooler", "none"]
    assert TrainConfig(model=tiny_model_dir, modules_to_save="none").modules_to_save == ()
    with pytest.raises(InputError, match=r"search.modules_to_save: 'poolr': --modules-to-save: 'poolr' matches no"):
        validate({"modules_to_save": {"choice": ["pooler", "poolr"]}}, base)


# --- --space and --show-space ---------------------------------------------------------------------------------

SEED_SPACE = {  # the seed project's search space, written out independently of loratune's copies
    "lr": {"loguniform": [1e-4, 1e-1]},
    "rank": {"choice": [2, 4, 6, 8, 10, 16]},
    "targets": {"choice": [["q"], ["v"], ["q", "v"]]},
    "dropout": {"uniform": [0.1, 0.5]},
    "alpha": "=rank",
}


def _shown(capsys, *argv: str) -> dict:
    from conftest import run

    code, out, err = run(capsys, "tune", "--show-space", *argv)
    assert code == 0, err
    return yaml.safe_load(out)["search"]


def test_space_seed_is_the_seed_projects_space_exactly(capsys) -> None:
    from loratune.search.space import SEED_SPACE as shipped

    assert "seed" in space_presets() and shipped == SEED_SPACE
    assert load_space("seed") == SEED_SPACE
    assert _shown(capsys, "--space", "seed") == SEED_SPACE


def test_show_space_prints_the_default_a_file_and_full_fine_tuning_s(capsys, tmp_path) -> None:
    from loratune.search.space import DEFAULT_SPACE, FULL_SPACE

    assert _shown(capsys) == DEFAULT_SPACE
    assert _shown(capsys, "--method", "full") == FULL_SPACE
    f = tmp_path / "space.yaml"
    f.write_text("alpha: '=rank'\nrank: {grid: [4, 8]}\nlr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    # a tie is listed after what it follows, as the search samples them
    assert list(_shown(capsys, "--space", str(f))) == ["rank", "lr", "alpha"]
    cfg = tmp_path / "config.yaml"
    cfg.write_text("rank: 4\nsearch:\n  dropout: {uniform: [0.0, 0.2]}\n")
    assert _shown(capsys, "--config", str(cfg)) == {"dropout": {"uniform": [0.0, 0.2]}}
    assert _shown(capsys, "--space", str(cfg)) == {"dropout": {"uniform": [0.0, 0.2]}}   # a config's search: key
    cfg.write_text("lr: 1e-4\nsearch:\n  lr: {loguniform: [1e-5, 1e-3]}\n")              # exponents as people write them
    assert _shown(capsys, "--config", str(cfg)) == {"lr": {"loguniform": [1e-5, 1e-3]}}


@pytest.mark.parametrize("argv,fragment", [
    (["--space", "nope"], "neither a shipped space (causal, default, seed"),
    (["--space", "LIST"], "holds no mapping"),
    (["--space", "BAD"], "search.rank"),
    (["--space", "seed", "--config", "CONFIG"], "the space is given twice"),
    (["--space", "seed", "--resume", "DIR"], "drop --space"),
    # what only the model or the search's own options show: --show-space checks them as the search would
    (["--space", "NOTARGET"], "search.targets: 'zz': target 'zz' matches no linear layer"),
    (["--space", "BIGRANK"], "search.rank: rank 1000 is larger than min(d, k) = 384"),
    (["--space", "GRID", "--search-alg", "optuna"], "grid is not available with --search-alg optuna"),
    (["--samples", "0"], "--samples: expected an integer >= 1"),
], ids=["unknown", "a list", "a bad distribution", "twice", "with resume", "no such target", "rank too large",
        "optuna grid", "no samples"])
def test_bad_space_flags_exit_2(capsys, tmp_path, argv, fragment) -> None:
    from conftest import assert_one_line_error, run

    files = {"LIST": "- 1\n- 2\n", "BAD": "rank: {choice: []}\n", "CONFIG": "search:\n  rank: {choice: [4]}\n",
             "NOTARGET": "targets: {choice: [[zz]]}\n", "BIGRANK": "rank: {choice: [8, 1000]}\n",
             "GRID": "rank: {grid: [4, 8]}\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [str(tmp_path / a) if a in files or a == "DIR" else a for a in argv]
    code, _, err = run(capsys, "tune", "--show-space", *argv)
    assert_one_line_error(code, err, fragment)


def test_show_space_of_a_resumed_full_search_reads_its_options_as_the_search_does(capsys, tmp_path) -> None:
    # A --method full search's search.yaml holds the LoRA options at the defaults of its day; they mean nothing
    # there, and the search itself (TrainConfig.from_stored) skips them; --show-space --resume must too.
    from loratune.search.space import FULL_SPACE

    options = {**TrainConfig(method="full").to_dict(), "rank": 3, "alpha": 7.0}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump({"options": options, "search": FULL_SPACE,
                                                          "experiment": str(tmp_path / "ray")}))
    assert _shown(capsys, "--resume", str(tmp_path)) == FULL_SPACE


def test_a_given_training_flag_fixes_its_option_in_the_default_space(capsys, tmp_path) -> None:
    # "Training flags fix an option for every trial": the default space leaves out what they fix.
    from loratune.search.space import DEFAULT_SPACE, default_space

    assert _shown(capsys, "--rank", "4", "--lr", "1e-3") == {k: v for k, v in DEFAULT_SPACE.items()
                                                          if k not in ("rank", "lr")}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dropout: 0.05\n")                                  # a --config key is given as much as a flag
    assert "dropout" not in _shown(capsys, "--config", str(cfg))
    assert default_space(TrainConfig(), ["rank"]) == {k: v for k, v in DEFAULT_SPACE.items() if k != "rank"}
    with pytest.raises(InputError, match="fix every option the default space searches"):
        default_space(TrainConfig(), list(DEFAULT_SPACE))
    # A space of the user's own keeps what it searches: the flag is the untuned default trial's value there.
    f = tmp_path / "space.yaml"
    f.write_text("rank: {choice: [2, 4]}\n")
    assert _shown(capsys, "--space", str(f), "--rank", "8") == {"rank": {"choice": [2, 4]}}


def test_a_search_fits_auto_max_length_to_the_models_positions(tiny_model_dir) -> None:
    # search.yaml stores options resolved: auto's 128 as a given 128 would then be refused for a model with 64
    # positions; the search fits it first (as train does), and a given value past them is refused before Ray starts.
    from loratune.cli.tune import SEARCH_KEYS
    from loratune.search.trials import new_search

    kw = {k: v for k, v in SEARCH_KEYS.items() if k != "search"}
    doc = new_search(None, {"model": tiny_model_dir}, None, **kw)
    assert doc["options"]["max_length"] == 64
    assert TrainConfig.from_stored(doc["options"]).max_length == 64
    assert new_search(None, {"model": tiny_model_dir, "max_length": 32}, None, **kw)["options"]["max_length"] == 32
    with pytest.raises(InputError, match="--max-length: 100 tokens is more than"):
        new_search(None, {"model": tiny_model_dir, "max_length": 100}, None, **kw)
