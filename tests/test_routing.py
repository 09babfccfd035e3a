"""Per-row routing (core.routing): many adapters on one frozen base, each row of a batch through its own.

The reference for every row is its adapter alone, loaded the normal way (``load_adapter`` on a fresh model),
or peft's own model for an adapter peft wrote.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from loratune.core.adapters import PREFIX, WEIGHTS_NAME, load_adapter, save_adapter
from loratune.core.inject import (
    LoraSpec,
    expand_targets,
    inject,
    lora_layers,
    routed,
    routed_modules,
)
from loratune.core.routing import add_routed_adapter, remove_routed_adapter
from loratune.errors import InputError

TOL = 1e-5

# arch -> [(adapter name, classes, spec)]: different class counts, targets, ranks (and a saved pooler on BERT)
CASES: dict[str, list[tuple[str, int, LoraSpec]]] = {
    "bert": [
        ("two", 2, LoraSpec(targets=("qv",), rank=4, alpha=8)),
        ("three", 3, LoraSpec(targets=("attention",), rank=2, alpha=4, rslora=True)),
        ("five", 5, LoraSpec(targets=("value", "intermediate.dense"), rank=8, alpha=16, modules_to_save=("pooler",))),
        ("dora", 3, LoraSpec(targets=("query", "key"), rank=4, alpha=8, variant="dora", layers=(1,))),
    ],
    "distilbert": [
        ("two", 2, LoraSpec(targets=("qv",), rank=4, alpha=8)),
        ("three", 3, LoraSpec(targets=("lin1", "lin2"), rank=2, alpha=4)),
        ("five", 5, LoraSpec(targets=("attention",), rank=8, alpha=16, layers=(0,))),
    ],
    "roberta": [
        ("two", 2, LoraSpec(targets=("qv",), rank=4, alpha=8)),
        ("three", 3, LoraSpec(targets=("attention",), rank=2, alpha=4)),
        ("five", 5, LoraSpec(targets=("key", "intermediate.dense"), rank=8, alpha=16)),
    ],
    "gpt2": [
        ("two", 2, LoraSpec(targets=("c_attn",), rank=4, alpha=8)),
        ("three", 3, LoraSpec(targets=("c_fc", "mlp.c_proj"), rank=2, alpha=4)),
        ("five", 5, LoraSpec(targets=("attention",), rank=8, alpha=16)),
    ],
}
PAD = 0                                       # the tiny models' pad id (GPT-2's config says so)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random changes to everything that trains (A, B, DoRA's magnitude, head, saved modules), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _make(folder: Path, arch: str, classes: int, spec: LoraSpec, seed: int) -> Path:
    model = tiny_model(arch, num_labels=classes).eval()
    inject(model, spec)
    _perturb(model, seed)
    return save_adapter(model, folder, spec, expand_targets(model, spec.targets, spec.modules_to_save),
                        meta={"id2label": [f"c{i}" for i in range(classes)]})


def _reference(arch: str, classes: int, folder: Path) -> torch.nn.Module:
    model = tiny_model(arch, num_labels=classes).eval()
    load_adapter(model, folder)
    return model


def _rows(n: int, seed: int = 3) -> list[list[int]]:
    """Token id rows of different lengths (ids >= 3: never the pad id or GPT-2's eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded with the pad id (GPT-2's head finds each row's last token by it), with the mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _routed_probs(model: torch.nn.Module, rows: list[list[int]], names: list[str | None],
                  widths: dict[str | None, int]) -> list[torch.Tensor]:
    with routed(model, names):
        logits = model(**_batch(rows)).logits
    out = []
    for i, n in enumerate(names):
        w = widths[n]
        assert torch.isinf(logits[i, w:]).all() and (logits[i, w:] < 0).all(), "a narrower head's extra entries"
        out.append(torch.softmax(logits[i, :w], dim=-1))
    return out


@torch.no_grad()
def _alone(model: torch.nn.Module, row: list[int]) -> torch.Tensor:
    return torch.softmax(model(**_batch([row])).logits[0], dim=-1)


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    assert (got - want).abs().max().item() <= TOL, f"{what}: {got} vs {want}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from more, and two spinning threads on a shared 2-CPU
    machine make each forward pass many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, dict[str, tuple[Path, int]]]:
    """Each arch's adapters, saved once: {arch: {name: (folder, classes)}}."""
    root = tmp_path_factory.mktemp("routing")
    return {arch: {name: (_make(root / arch / name, arch, classes, spec, seed=7 * i + 1), classes)
                   for i, (name, classes, spec) in enumerate(cases)}
            for arch, cases in CASES.items()}


@pytest.mark.parametrize("arch", list(CASES))
def test_a_mixed_batch_gives_each_row_its_adapter_s_answer(arch, adapters) -> None:
    model = tiny_model(arch, num_labels=2).eval()
    base = copy.deepcopy(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (folder, _) in adapters[arch].items():
        add_routed_adapter(model, folder, name)
    # the shared base is never written: every tensor of the plain model is still what it was
    now = {k.replace(".base_layer.", ".").replace(".inner.", "."): v for k, v in model.state_dict().items()}
    for k, v in frozen.items():
        assert torch.equal(now[k], v), k
    assert not any(p.requires_grad for p in model.parameters())
    refs = {name: _reference(arch, classes, folder) for name, (folder, classes) in adapters[arch].items()}
    widths: dict[str | None, int] = {name: classes for name, (_, classes) in adapters[arch].items()}
    widths[None] = 2
    refs[None] = base                                            # a row of no adapter: the base model as it was
    names: list[str | None] = [*adapters[arch], None] * 3
    names = names[1:] + names[:1]                                # rows of one adapter not side by side
    rows = _rows(len(names))
    got = _routed_probs(model, rows, names, widths)
    for i, (name, row) in enumerate(zip(names, rows)):
        _assert_close(got[i], _alone(refs[name], row), f"{arch} row {i} ({name}, {len(row)} tokens)")
    # a batch of one adapter's rows only, and one row alone, give the same again
    for name in adapters[arch]:
        one = [r for r, n in zip(rows, names) if n == name]
        for row, p in zip(one, _routed_probs(model, one, [name] * len(one), widths)):
            _assert_close(p, _alone(refs[name], row), f"{arch} {name} alone")


def test_a_peft_adapter_routed_gives_peft_s_logits(tmp_path, adapters) -> None:
    pm = get_peft_model(tiny_model("bert", num_labels=4), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["pooler"], task_type="SEQ_CLS"))
    _perturb(pm, seed=11)
    pm.save_pretrained(str(tmp_path / "p"))
    pm.eval()
    model = tiny_model("bert", num_labels=2).eval()
    add_routed_adapter(model, adapters["bert"]["three"][0], "ours")
    add_routed_adapter(model, tmp_path / "p", "peft")
    ref_ours = _reference("bert", 3, adapters["bert"]["three"][0])
    names = ["peft", "ours", "peft", "ours", "peft"]
    rows = _rows(len(names), seed=5)
    got = _routed_probs(model, rows, names, {"peft": 4, "ours": 3})
    for i, (name, row) in enumerate(zip(names, rows)):
        _assert_close(got[i], _alone(pm if name == "peft" else ref_ours, row), f"row {i} ({name})")


# --- refusals: an InputError, and the model exactly as it was -----------------------------------------

def _snapshot(model: torch.nn.Module) -> dict:
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": [p.requires_grad for p in model.parameters()],
            "adapters": {n: list(layer.adapters) for n, layer in lora_layers(model).items()},
            "active": {n: layer.active for n, layer in lora_layers(model).items()},
            "copies": {n: list(m.copies) for n, m in routed_modules(model).items()}}


def _assert_same(a: dict, b: dict) -> None:
    assert a["modules"] == b["modules"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert (a["grad"], a["adapters"], a["active"], a["copies"]) == (b["grad"], b["adapters"], b["active"], b["copies"])


def _edited(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    weights = load_file(str(dst / WEIGHTS_NAME))
    edit(weights)
    save_file(weights, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    return dst


LORA_B = PREFIX + "bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = PREFIX + "classifier."
POOLER = PREFIX + "bert.pooler.dense."


@pytest.mark.parametrize("case", ["bias", "saved then inside", "inside then saved", "duplicate", "lora shape",
                                  "head shape", "pooler shape", "nan lora", "inf head", "nan pooler",
                                  "missing lora", "stray tensor"])
def test_refused_adapters_leave_the_model_as_it_was(tmp_path, adapters, case) -> None:
    two = adapters["bert"]["two"][0]                 # qv, no saved modules
    five = adapters["bert"]["five"][0]               # saves the pooler
    dense = _make(tmp_path / "dense", "bert", 2, LoraSpec(targets=("dense",), rank=2, alpha=4), seed=3)
    model = tiny_model("bert", num_labels=2).eval()
    first = {"saved then inside": five, "inside then saved": dense}.get(case, two)
    add_routed_adapter(model, first, "first")

    def edit(src: Path, change) -> Path:
        return _edited(src, tmp_path / "e", change)

    nan = float("nan")
    bad, name, match = {
        "bias": lambda: (_make(tmp_path / "b", "bert", 2, LoraSpec(targets=("qv",), rank=2, bias="all"), 1), "x",
                         "bias='all'"),
        "saved then inside": lambda: (dense, "x", "puts LoRA on bert.pooler.*dense, inside bert.pooler, which adapter"),
        "inside then saved": lambda: (five, "x", "saves bert.pooler whole, where adapter first has LoRA"),
        "duplicate": lambda: (adapters["bert"]["three"][0], "first", "already loaded"),
        "lora shape": lambda: (edit(two, lambda w: w.update({LORA_B: torch.zeros(31, 4)})), "x",
                               r"lora_B.weight has shape \[31, 4\]"),
        "head shape": lambda: (edit(two, lambda w: w.update({HEAD + "weight": torch.zeros(2, 33)})), "x",
                               r"classifier.weight has shape \[2, 33\]"),
        "pooler shape": lambda: (edit(five, lambda w: w.update({POOLER + "bias": torch.zeros(5)})), "x",
                                 r"bert.pooler.dense.bias has shape \[5\]"),
        "nan lora": lambda: (edit(two, lambda w: w[LORA_B].__setitem__((0, 0), nan)), "x", "NaN or infinite"),
        "inf head": lambda: (edit(two, lambda w: w[HEAD + "bias"].__setitem__(0, float("inf"))), "x",
                             "NaN or infinite"),
        "nan pooler": lambda: (edit(five, lambda w: w[POOLER + "weight"].__setitem__((1, 1), nan)), "x",
                               "NaN or infinite"),
        "missing lora": lambda: (edit(two, lambda w: w.pop(LORA_B)), "x", "is missing"),
        "stray tensor": lambda: (edit(two, lambda w: w.update({PREFIX + "bert.embeddings.word_embeddings.weight":
                                                               torch.zeros(120, 32)})), "x", "neither a LoRA matrix"),
    }[case]()
    before = _snapshot(model)
    rows, names, widths = _rows(4), ["first", None, "first", None], {"first": 5 if first is five else 2, None: 2}
    probs = _routed_probs(model, rows, names, widths)
    with pytest.raises(InputError, match=match):
        add_routed_adapter(model, bad, name)
    _assert_same(_snapshot(model), before)
    again = _routed_probs(model, rows, names, widths)
    for p, q in zip(probs, again):
        assert torch.equal(p, q)


def test_remove_then_add_again(tmp_path, adapters) -> None:
    bert = adapters["bert"]
    model = tiny_model("bert", num_labels=2).eval().requires_grad_(False)     # frozen, as a server holds it
    pristine = _snapshot(model)
    for name, (folder, _) in bert.items():
        add_routed_adapter(model, folder, name)
    widths: dict[str | None, int] = {name: classes for name, (_, classes) in bert.items()}
    refs = {name: _reference("bert", classes, folder) for name, (folder, classes) in bert.items()}
    rows = _rows(6, seed=9)
    others = ["two", "three", "dora", "two", "three", "dora"]

    def check(names: list) -> None:
        for i, (p, n) in enumerate(zip(_routed_probs(model, rows, names, widths), names)):
            _assert_close(p, _alone(refs[n], rows[i]), f"row {i} ({n})")

    remove_routed_adapter(model, "five")               # the one that saves the pooler
    check(others)
    with pytest.raises(InputError, match="no adapter named 'five'"), routed(model, ["five"]):
        pass
    add_routed_adapter(model, bert["five"][0], "five")
    check(["five", *others[1:]])
    # everything removed: the plain model again, and the pooler free for LoRA of an adapter that targets it
    for name in bert:
        remove_routed_adapter(model, name)
    _assert_same(_snapshot(model), pristine)
    dense = _make(tmp_path / "dense", "bert", 2, LoraSpec(targets=("dense",), rank=2, alpha=4), seed=3)
    add_routed_adapter(model, dense, "dense")
    add_routed_adapter(model, bert["two"][0], "two")
    refs["dense"], widths["dense"] = _reference("bert", 2, dense), 2
    check(["two", "dense"] * 3)
    with pytest.raises(InputError, match="saves bert.pooler whole, where adapter dense has LoRA"):
        add_routed_adapter(model, bert["five"][0], "five")
    remove_routed_adapter(model, "dense")
    add_routed_adapter(model, bert["five"][0], "five")
    check(["two", "five"] * 3)
