"""``loratune generate`` / ``loratune.generate`` and the causal-LM paths of ``load``, ``eval``, ``merge`` and
``train``'s summary, on a tiny random Llama with a ChatML tokenizer built here (no downloads).

Greedy completions are pinned against ``tasks.causal_metrics.greedy_generate`` (what ``exact_match`` scores),
against peft's own loading of the adapter and against the merged model loaded by plain transformers.
"""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run
from test_causal_data import chat_tokenizer

from loratune.cli.adapter import show_run
from loratune.cli.progress import Renderer
from loratune.core.adapters import save_adapter
from loratune.core.inject import LoraSpec, inject, lora_layers
from loratune.errors import InputError
from loratune.infer.generate import generate, prompt_ids
from loratune.infer.inference import load, task_of
from loratune.tasks.causal import encode_conversations
from loratune.tasks.causal_metrics import greedy_generate, stop_ids
from loratune.training import rundir
from loratune.training.models import load_causal_lm
from loratune.training.options import TrainConfig

PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Translate to German: good morning."]
SYSTEM = "You are a terse assistant. Answer in one word."
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch) -> None:
    """Commands take torch threads = the CPUs available; a model this small runs fastest on one (and far
    faster than on two CPUs shared with other work)."""
    from loratune import runtime

    monkeypatch.setattr(runtime, "available_cpus", lambda: 1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random Llama (weights wide enough that greedy choices are not near-ties) and its ChatML tokenizer,
    whose EOS (<|endoftext|>) differs from the end-of-turn token (<|im_end|>): two stop tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer(eos="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         initializer_range=0.3, tie_word_embeddings=False,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    out = tmp_path_factory.mktemp("generate") / "base"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def causal_adapter(base: Path, out: Path, meta: dict | None = None) -> Path:
    """A LoRA adapter (q_proj, v_proj, B randomised so that it changes the output) saved as training saves one."""
    model = load_causal_lm(str(base))
    spec = LoraSpec(targets=("q_proj", "v_proj"), rank=4, alpha=8)
    inject(model, spec)
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.5)
    meta = {"task": "causal-lm", "model": str(base), "max_length": 64, "system_prompt": SYSTEM,
            "id2label": ["Paris", "Rome"], **(meta or {})}
    return save_adapter(model, out, spec, ["q_proj", "v_proj"], base_model=str(base), meta=meta)


@pytest.fixture(scope="module")
def adapter(base_dir) -> Path:
    """``run/adapter`` of a causal-LM run (config.yaml beside it, as ``train`` leaves it)."""
    run_dir = base_dir.parent / "run"
    run_dir.mkdir()
    rundir.write_config(run_dir, TrainConfig(task="causal-lm", model=str(base_dir), data="train.jsonl", split_seed=3,
                                             system_prompt=SYSTEM))
    return causal_adapter(base_dir, run_dir / "adapter")


@pytest.fixture(scope="module")
def loaded(adapter):
    return load(adapter, device="cpu")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A classification adapter whose base is never loaded (the task check comes first)."""
    from conftest import tiny_model

    model = tiny_model("llama")
    spec = LoraSpec(targets=("q_proj", "v_proj"), rank=2)
    inject(model, spec)
    return save_adapter(model, tmp_path_factory.mktemp("cls") / "adapter", spec, ["q_proj", "v_proj"],
                        base_model="nowhere/model", meta={"model": "nowhere/model", "id2label": ["neg", "pos"]})


def gen(source, prompts, **kw) -> list[dict]:
    return list(generate(source, prompts, precision="fp32", device="cpu", threads=1, **kw))


# --------------------------------------------------------------------------- loading

def test_load_puts_a_causal_adapter_on_the_causal_lm(loaded, adapter, classifier) -> None:
    assert task_of(adapter) == "causal-lm" and task_of(classifier) == "classification"
    assert loaded.task == "causal-lm" and loaded.system_prompt == SYSTEM
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and lora_layers(loaded.model)
    assert loaded.label_names == ["Paris", "Rome"] and not loaded.model.training


def test_a_peft_written_causal_adapter_is_told_by_its_task_type(base_dir, tmp_path) -> None:
    """No loratune.json: adapter_config.json's task_type CAUSAL_LM says what it is; peft's own adapter loads."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "peft"))
    assert not (tmp_path / "peft" / "loratune.json").exists()
    assert task_of(tmp_path / "peft") == "causal-lm"
    got = load(tmp_path / "peft", device="cpu")
    assert got.task == "causal-lm" and got.system_prompt is None and got.label_names == []


# --------------------------------------------------------------------------- greedy = the other greedy paths

def test_greedy_completion_equals_greedy_generate_and_peft(loaded, adapter, base_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = gen(loaded, PROMPTS, max_new_tokens=12)
    tok = loaded.tokenizer
    ids = [np.asarray(prompt_ids(tok, p, SYSTEM)) for p in PROMPTS]
    assert tok.decode(ids[0]).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{PROMPTS[0]}")
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    batched = greedy_generate(loaded.model, tok, ids, CPU, 12)            # left-padded, in one batch
    alone = [greedy_generate(loaded.model, tok, [i], CPU, 12)[0] for i in ids]
    assert [r["completion"] for r in rows] == batched == alone
    assert any(r["completion"].strip() for r in rows)

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    stops = stop_ids(tok)
    assert stops == [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    by_peft, by_base = [], []
    for i in ids:
        x = torch.as_tensor(i)[None]
        for model, into in ((peft, by_peft), (base, by_base)):
            with torch.no_grad():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=12, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            into.append(tok.decode(out[0, x.shape[1]:], skip_special_tokens=True))
    assert [r["completion"] for r in rows] == by_peft
    assert by_peft != by_base                                     # the adapter changes what is written


def test_system_prompt_flag_replaces_the_adapters(loaded) -> None:
    tok = loaded.tokenizer
    other = gen(loaded, PROMPTS[:1], max_new_tokens=8, system_prompt="Reply in German.")[0]["completion"]
    assert other == greedy_generate(loaded.model, tok, [np.asarray(prompt_ids(tok, PROMPTS[0], "Reply in German."))],
                                    CPU, 8)[0]
    none = prompt_ids(tok, PROMPTS[0], None)                       # '': no system turn (the template's default)
    assert gen(loaded, PROMPTS[:1], max_new_tokens=8, system_prompt="")[0]["completion"] == \
        greedy_generate(loaded.model, tok, [np.asarray(none)], CPU, 8)[0]
    assert "SmolLM" in tok.decode(none) and SYSTEM not in tok.decode(none)


def test_a_tokenizer_without_a_template_gets_the_plain_prompt() -> None:
    from test_causal_data import CHATML_SPECIALS, _bpe
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(CHATML_SPECIALS), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert prompt_ids(tok, PROMPTS[0]) == tok(PROMPTS[0])["input_ids"]
    enc = encode_conversations([[{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "Paris."}]],
                               tok, 512, ["row 1"])
    assert prompt_ids(tok, PROMPTS[0]) == enc.input_ids[0][:enc.starts[0]].tolist()      # what eval generates from
    with pytest.raises(InputError, match="^--system-prompt: the tokenizer has no chat template"):
        prompt_ids(tok, PROMPTS[0], "Be brief.")


# --------------------------------------------------------------------------- stop, length, sampling

def test_finish_reason_stop_versus_length(loaded) -> None:
    """A stop token ends a completion (left out of its text, counted in ``tokens``); without one it is length."""
    stopped = next((r, seed) for seed in range(40)
                   for r in gen(loaded, PROMPTS[:1], max_new_tokens=64, temperature=5.0, seed=seed)
                   if r["finish_reason"] == "stop" and r["tokens"] > 1)
    row, seed = stopped
    assert row["tokens"] <= 64
    cut = gen(loaded, PROMPTS[:1], max_new_tokens=row["tokens"] - 1, temperature=5.0, seed=seed)[0]
    assert cut["finish_reason"] == "length" and cut["tokens"] == row["tokens"] - 1
    assert cut["completion"] == row["completion"]              # the same draws; the stop token wrote nothing
    assert "<|im_end|>" not in row["completion"] and "<|endoftext|>" not in row["completion"]
    for r in gen(loaded, PROMPTS, max_new_tokens=3):
        assert (r["finish_reason"], r["tokens"]) == ("length", 3) or (r["finish_reason"] == "stop" and r["tokens"] <= 3)


def test_sampling_is_reproducible_by_seed_and_leaves_the_global_rng_alone(loaded) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = gen(loaded, PROMPTS, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    again = gen(loaded, PROMPTS, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    other = gen(loaded, PROMPTS, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=8)
    assert first == again
    assert [r["completion"] for r in first] != [r["completion"] for r in other]
    greedy = gen(loaded, PROMPTS, max_new_tokens=10)
    assert [r["completion"] for r in first] != [r["completion"] for r in greedy]
    assert gen(loaded, PROMPTS, max_new_tokens=10, seed=99) == greedy          # the seed is for sampling only
    # top-p that small keeps only the most likely token: sampling is greedy
    assert gen(loaded, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_prompts_are_read_one_at_a_time(loaded) -> None:
    read: list[str] = []

    def prompts():
        for p in PROMPTS:
            read.append(p)
            yield p

    rows = generate(loaded, prompts(), max_new_tokens=2, precision="fp32", threads=1)
    first = next(rows)
    assert first["prompt"] == PROMPTS[0] and read == PROMPTS[:1]
    assert [r["prompt"] for r in rows] == PROMPTS[1:]


def test_streamed_text_adds_up_to_the_completion(loaded) -> None:
    pieces: list[list[str]] = []
    rows = []
    for p in PROMPTS:
        pieces.append([])
        rows += gen(loaded, [p], max_new_tokens=16, temperature=1.0, seed=5, on_text=pieces[-1].append)
    assert ["".join(x) for x in pieces] == [r["completion"] for r in rows]
    assert max(len(x) for x in pieces) > 1                       # it came in pieces, not at the end


# --------------------------------------------------------------------------- the CLI

def test_cli_json_lines_in_input_order(adapter, loaded, capsys) -> None:
    code, out, err = run(capsys, "generate", "--adapter", str(adapter), "--json", "--precision", "fp32",
                         "--max-new-tokens", "6", *PROMPTS)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert set(r) == {"prompt", "completion", "finish_reason", "tokens"}
        assert r["finish_reason"] in ("stop", "length") and isinstance(r["tokens"], int) and 1 <= r["tokens"] <= 6
    assert rows == gen(loaded, PROMPTS, max_new_tokens=6)


def test_cli_streams_completions_a_blank_line_apart(adapter, loaded, capsys) -> None:
    code, out, err = run(capsys, "generate", "--adapter", str(adapter), "--precision", "fp32", "--max-new-tokens",
                         "8", "--temperature", "0.8", "--seed", "4", *PROMPTS[:2])
    assert code == 0, err
    want = gen(loaded, PROMPTS[:2], max_new_tokens=8, temperature=0.8, seed=4)
    assert out == f"{want[0]['completion']}\n\n{want[1]['completion']}\n"


def test_cli_reads_a_file_or_stdin(adapter, loaded, tmp_path, capsys, monkeypatch) -> None:
    f = tmp_path / "prompts.txt"
    f.write_bytes("\n".join(PROMPTS[:2]).encode() + b"\n\n\xff broken\n")
    want = gen(loaded, PROMPTS[:2], max_new_tokens=4)
    code, out, err = run(capsys, "generate", "--adapter", str(adapter), "--json", "--precision", "fp32",
                         "--max-new-tokens", "4", "--file", str(f))
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == want
    assert "line 3: empty" in err and "line 4: not UTF-8" in err
    for how in ([], ["--file", "-"]):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(PROMPTS[:2]).encode())))
        code, out, err = run(capsys, "generate", "--adapter", str(adapter), "--json", "--precision", "fp32",
                             "--max-new-tokens", "4", *how)
        assert code == 0 and [json.loads(line) for line in out.splitlines()] == want, err
    code, _, err = run(capsys, "generate", "--adapter", str(adapter), "--file", str(f), "a prompt")
    assert_one_line_error(code, err, "not both")
    code, _, err = run(capsys, "generate", "--adapter", str(adapter), "--file", str(tmp_path / "none.txt"))
    assert_one_line_error(code, err, "--file")


def test_wrong_task_and_bad_flags_exit_2_naming_the_way(adapter, classifier, capsys) -> None:
    code, _, err = run(capsys, "generate", "--adapter", str(classifier), "a prompt")
    assert_one_line_error(code, err, "use `loratune predict`")
    assert "classification adapter" in err
    code, _, err = run(capsys, "predict", "--adapter", str(adapter), "a text")
    assert_one_line_error(code, err, "use `loratune generate`")
    assert "causal-LM adapter" in err
    for flags, name in ((["--max-new-tokens", "0"], "--max-new-tokens"), (["--temperature", "-1"], "--temperature"),
                        (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--seed", "-2"], "--seed"),
                        (["--temperature", "nan"], "--temperature")):
        code, _, err = run(capsys, "generate", "--adapter", str(adapter), *flags, "a prompt")
        assert_one_line_error(code, err, name)
    with pytest.raises(InputError, match="use `loratune generate`"):
        next(iter(__import__("loratune").predict(adapter, ["x"])))


# --------------------------------------------------------------------------- merge

MERGED_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, system, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
out = []
for p in prompts:
    text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": p}],
                                   add_generation_prompt=True, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=12)      # its own generation config
    out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
assert not any(k.startswith(("loratune", "peft")) for k in sys.modules)
print(json.dumps({"completions": out, "template": tok.chat_template,
                  "lora": [n for n, _ in model.named_parameters() if "lora" in n or "adapters" in n]}))
"""


def test_merge_gives_a_causal_lm_that_writes_the_same(adapter, loaded, tmp_path, capsys) -> None:
    """The merged folder, in a process without loratune or peft: AutoModelForCausalLM + AutoTokenizer, the chat
    template kept, and a plain greedy ``generate`` (stopping by the folder's generation config) writes what
    ``loratune generate`` writes."""
    import os
    import subprocess

    merged = tmp_path / "merged"
    code, out, err = run(capsys, "merge", "--adapter", str(adapter), "--out", str(merged))
    assert code == 0, err
    assert "AutoModelForCausalLM" in out
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.bin"))
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert stops == stop_ids(loaded.tokenizer) and len(stops) == 2          # EOS and <|im_end|>
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", MERGED_GENERATE, str(merged), SYSTEM, json.dumps(PROMPTS)],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert theirs["lora"] == [] and theirs["template"] == loaded.tokenizer.chat_template
    assert theirs["completions"] == [r["completion"] for r in gen(loaded, PROMPTS, max_new_tokens=12)]
    code, _, err = run(capsys, "merge", "--adapter", str(adapter), "--out", str(merged))
    assert_one_line_error(code, err, "--overwrite")


# --------------------------------------------------------------------------- eval (wiring), train's summary

CITIES = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid")]


def qa_rows(n: int, template: str = "What is the capital of {}?") -> list[dict]:
    return [{"prompt": template.format(CITIES[i % 4][0]) + " " * (i // 4), "completion": CITIES[i % 4][1]}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def qa_run(base_dir) -> Path:
    """A causal-LM run on prompt/completion data whose completions are a label set (four capitals)."""
    run_dir = base_dir.parent / "qa-run"
    run_dir.mkdir()
    data = write_jsonl(base_dir.parent / "qa.jsonl", qa_rows(40))
    rundir.write_config(run_dir, TrainConfig(task="causal-lm", model=str(base_dir), data=data, split_seed=3,
                                             system_prompt=SYSTEM, max_length=64))
    causal_adapter(base_dir, run_dir / "adapter")
    return run_dir


def test_eval_scores_a_causal_adapter_as_training_does(qa_run, tmp_path, capsys) -> None:
    """eval = prepare_data on the run's options (its split seed) + evaluate_causal; its exact match comes from
    the greedy completions ``generate`` writes for the same prompts."""
    from loratune.tasks.causal_eval import evaluate_causal
    from loratune.training.loop import prepare_data

    adapter = qa_run / "adapter"
    code, out, err = run(capsys, "eval", "--adapter", str(adapter), "--json", "--precision", "fp32")
    assert code == 0, err
    got = json.loads(out)
    cfg = rundir.adapter_run_config(adapter)
    assert cfg is not None and cfg.split_seed == 3
    test = prepare_data(cfg).test
    loaded = load(adapter, device="cpu")
    want, generations = evaluate_causal(loaded.model, loaded.tokenizer, test, CPU, "fp32", loaded.pad_id)
    assert set(got) == {"split", "examples", "loss", "perplexity", "exact_match", "accuracy"}
    assert got["split"] == "test" and got["examples"] == len(test) > 0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert got["perplexity"] == pytest.approx(np.exp(got["loss"]), rel=1e-5)

    # generate's prompt tokens are the ones eval generates from, and so are its greedy completions
    tok = loaded.tokenizer
    by_ids = {tuple(prompt_ids(tok, r["prompt"], SYSTEM)): r["prompt"] for r in qa_rows(40)}
    prompts = [by_ids[tuple(int(t) for t in ids)] for ids in test.prompts()]
    assert [r["completion"] for r in gen(loaded, prompts, max_new_tokens=test.max_new_tokens)] == generations

    other = write_jsonl(tmp_path / "other.jsonl", qa_rows(30, "Which city is the capital of {}?"))
    code, out, err = run(capsys, "eval", "--adapter", str(adapter), "--split", "validation", "--data", other)
    assert code == 0, err
    n = len(prepare_data(cfg.replace(data=other, split_seed=0)).validation)
    assert out.startswith(f"validation ({n} examples): loss ")
    code, _, err = run(capsys, "eval", "--adapter", str(adapter), "--text-column", "text")
    assert_one_line_error(code, err, "--text-column")


def test_eval_without_a_label_set_has_no_accuracy(base_dir, tmp_path, capsys) -> None:
    rows = [{"prompt": f"Name item {i}.", "completion": f"Item {i}"} for i in range(30)]         # 30 answers
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_config(run_dir, TrainConfig(task="causal-lm", model=str(base_dir),
                                             data=write_jsonl(tmp_path / "count.jsonl", rows), max_length=64))
    causal_adapter(base_dir, run_dir / "adapter", {"id2label": None, "system_prompt": None})
    code, out, err = run(capsys, "eval", "--adapter", str(run_dir / "adapter"), "--json")
    assert code == 0, err
    assert set(json.loads(out)) == {"split", "examples", "loss", "perplexity", "exact_match"}


def _result(tmp_path: Path, validation: dict, test: dict | None):
    (tmp_path / "report.html").write_text("")                     # already written: show_run leaves it
    return types.SimpleNamespace(run_dir=tmp_path, validation=validation, test=test, best_epoch=2, already_done=True,
                                 train={"tokens_per_s": 1000.0, "seconds": 3.0, "trainable_params": 10,
                                        "adapter_bytes": 40, "model_bytes": 4000})


def test_train_summary_of_a_causal_run(tmp_path, capsys) -> None:
    after = {"loss": 0.08, "perplexity": 1.0833, "exact_match": 0.83, "accuracy": 0.835}
    before = {"loss": 1.23, "perplexity": 3.4212, "exact_match": 0.61, "accuracy": 0.645}
    (tmp_path / "results.json").write_text(json.dumps({"baseline": {"validation": before, "test": before}}))
    show_run(Renderer(), _result(tmp_path, after, {**after, "loss": 0.1}))
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["run " + str(tmp_path) + " already finished; nothing to resume", "best epoch 2:",
                       ("  validation: accuracy 0.645 -> 0.835, exact match 0.610 -> 0.830, loss 1.230 -> 0.080, "
                        "perplexity 3.42 -> 1.08")]
    assert out[3].startswith("  test: accuracy 0.645 -> 0.835, exact match 0.610 -> 0.830, loss 1.230 -> 0.100")

    # no label set: no accuracy; no test split evaluated
    plain = {k: v for k, v in after.items() if k != "accuracy"}
    (tmp_path / "results.json").write_text(json.dumps({"baseline": {"validation": before}}))
    show_run(Renderer(), _result(tmp_path, plain, None))
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "  validation: exact match 0.610 -> 0.830, loss 1.230 -> 0.080, perplexity 3.42 -> 1.08"
    assert not any("test:" in line or "accuracy" in line for line in out)

    (tmp_path / "nobase").mkdir()                                 # a run without a baseline: no arrows
    show_run(Renderer(), _result(tmp_path / "nobase", plain, None))
    assert "  validation: exact match 0.830, loss 0.080, perplexity 1.08" in capsys.readouterr().out.splitlines()

    (tmp_path / "cls").mkdir()
    show_run(Renderer(), _result(tmp_path / "cls", {"loss": 0.5, "accuracy": 0.9, "f1": 0.9}, {"accuracy": 0.8}))
    assert "best epoch 2: validation accuracy 0.9000 (loss 0.5000), test accuracy 0.8000" in capsys.readouterr().out


def test_the_models_context_bounds_prompt_and_completion(adapter, loaded, capsys) -> None:
    """The tiny Llama reads 512 positions: a completion stops there (length), a prompt that fills them is refused."""
    tok = loaded.tokenizer
    words = "capital " * 420
    n = len(prompt_ids(tok, words, SYSTEM))
    assert 400 < n < 500
    row = gen(loaded, [words], max_new_tokens=100)[0]
    assert row["tokens"] <= 512 - n and (row["finish_reason"] == "stop" or row["tokens"] == 512 - n)
    code, _, err = run(capsys, "generate", "--adapter", str(adapter), "a prompt", words * 2)
    assert_one_line_error(code, err, "prompt 2 (")
    assert "the model reads at most 512" in err


def _argmax_decoding(model, tok, ids: list[int], n: int) -> str:
    """The reference: the most likely token each step, until a stop token, with no setting at all."""
    stops, out, x = set(stop_ids(tok)), [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return tok.decode(out, skip_special_tokens=True)


def test_greedy_is_greedy_whatever_the_models_generation_config_says(base_dir, tmp_path) -> None:
    """A base whose generation_config.json sets sampling and a repetition penalty (as some instruct models ship):
    `generate --temperature 0` and the evaluation's greedy answers still take the most likely token each time, and
    the model keeps its own generation config afterwards."""
    import shutil

    from transformers import GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    tok = load(causal_adapter(base_dir, tmp_path / "a0"), device="cpu").tokenizer
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_sample=True, temperature=0.7,
                     top_p=0.8, top_k=20, repetition_penalty=5.0, no_repeat_ngram_size=2).save_pretrained(base)
    loaded = load(causal_adapter(base, tmp_path / "adapter"), device="cpu")
    assert loaded.model.generation_config.repetition_penalty == 5.0
    ids = prompt_ids(loaded.tokenizer, PROMPTS[0], SYSTEM)
    want = _argmax_decoding(loaded.model, loaded.tokenizer, ids, 16)
    assert gen(loaded, PROMPTS[:1], max_new_tokens=16)[0]["completion"] == want
    assert greedy_generate(loaded.model, loaded.tokenizer, [np.asarray(ids)], CPU, 16)[0] == want
    assert loaded.model.generation_config.repetition_penalty == 5.0


def _gpt2(tmp_path: Path, n_positions: int = 32) -> tuple[Path, Path]:
    """A random GPT-2 causal LM with a learned table of ``n_positions`` positions and a tokenizer with no chat
    template and no special tokens added, and a LoRA adapter on it: (base folder, adapter folder)."""
    from test_causal_data import CHATML_SPECIALS, _bpe
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(CHATML_SPECIALS), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=n_positions,
                               initializer_range=0.3, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    model = load_causal_lm(str(base))
    spec = LoraSpec(targets=("c_attn",), rank=2)
    inject(model, spec)
    adapter = save_adapter(model, tmp_path / "adapter", spec, ["c_attn"], base_model=str(base),
                           meta={"task": "causal-lm", "model": str(base), "max_length": n_positions})
    return base, adapter


def test_an_empty_prompt_with_no_template_is_refused(tmp_path, capsys) -> None:
    """GPT-2's tokenizer adds no special tokens and has no template: '' is no tokens, which generate crashed on
    (IndexError, exit 1); it is a one-line error naming the prompt."""
    _, adapter = _gpt2(tmp_path)
    with pytest.raises(InputError, match=r"^prompt 2 \(''\) has no tokens: nothing to continue$"):
        gen(adapter, ["Name a colour.", ""], max_new_tokens=2)
    capsys.readouterr()                                        # the set-up's own output
    code, _, err = run(capsys, "generate", "--adapter", str(adapter), "--max-new-tokens", "2", "")
    assert_one_line_error(code, err, "prompt 1 ('') has no tokens")


def test_greedy_answers_stay_inside_a_learned_position_table(tmp_path) -> None:
    """The evaluation's greedy answers on a model with 32 learned positions: a 30-token prompt and 12 new tokens
    ran past the table (IndexError: exit 1 mid-evaluation). As lm-evaluation-harness does, a prompt keeps its last
    32 - 12 = 20 tokens, and the answer is the most likely token each step from there."""
    base, adapter = _gpt2(tmp_path, n_positions=32)
    loaded = load(adapter, device="cpu")
    tok = loaded.tokenizer
    ids = tok(" ".join(["the capital of France is Paris"] * 8))["input_ids"][:30]
    assert len(ids) == 30
    got = greedy_generate(loaded.model, tok, [np.asarray(ids), np.asarray(ids[:5])], CPU, 12)
    assert got[0] == _argmax_decoding(loaded.model, tok, ids[-20:], 12)
    assert got[1] == _argmax_decoding(loaded.model, tok, ids[:5], 12)     # a short prompt is kept whole


def test_overlapping_greedy_calls_give_the_model_its_own_generation_config_back(loaded) -> None:
    """Two threads generating with one model overlap: the second entered while the first had swapped in the blank
    config, and kept that blank one to restore last (every setting of the model's own config lost for good)."""
    from loratune.tasks.causal_metrics import only_given_settings

    own = loaded.model.generation_config
    first = only_given_settings(loaded.model)
    first.__enter__()
    second = only_given_settings(loaded.model)                     # made while the first holds the blank config
    second.__enter__()
    assert loaded.model.generation_config is not own
    first.__exit__(None, None, None)
    assert loaded.model.generation_config is not own              # the second is still generating
    second.__exit__(None, None, None)
    assert loaded.model.generation_config is own
