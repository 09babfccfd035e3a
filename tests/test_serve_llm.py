"""``loratune serve`` for causal-LM adapters: OpenAI's /v1/completions and /v1/chat/completions, tested with
OpenAI's own Python client against a server on 127.0.0.1, on a tiny random Llama with a ChatML tokenizer.

Chats are pinned against ``loratune generate`` (greedy, fp32: the same chat template and system prompt),
plain completions against transformers' own greedy ``generate`` of the prompt with the adapter loaded alone;
streaming and not; rows of three adapters (and the base) decoded in one batch, each equal to its adapter's
answer alone; per-row seeded sampling; stop strings; the context limit; every bad request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import test_generate
import torch
from conftest import assert_one_line_error, run
from starlette.requests import Request
from test_causal_data import chat_tokenizer
from test_serve import _make, call, metrics, serving, total, wait_for

from loratune.core.adapters import save_adapter
from loratune.core.inject import LoraSpec, inject, lora_layers
from loratune.errors import InputError
from loratune.infer.generate import generate
from loratune.infer.inference import load
from loratune.serve.app import Limits
from loratune.serve.completions import completions
from loratune.serve.server import prepare
from loratune.tasks.causal_metrics import stop_ids
from loratune.training.models import load_causal_lm, load_tokenizer

base_dir = test_generate.base_dir
"""The fixture: test_generate's random Llama (wide weights: no near-ties) with a ChatML tokenizer whose EOS differs
from its end-of-turn token."""
SYSTEM = "You are a terse assistant."
PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Translate to German: good morning."]
ADAPTERS = {"sys": (1, SYSTEM), "plain": (2, None), "other": (3, "Answer in French.")}
"""name: (seed of its random B, its system prompt)."""
N = 12                                                # tokens written per answer in most tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lm_adapter(base: Path, out: Path, seed: int, system: str | None) -> Path:
    """A causal-LM LoRA adapter (q, v r4; B random, so that each adapter writes its own text)."""
    model = load_causal_lm(str(base))
    spec = LoraSpec(targets=("q_proj", "v_proj"), rank=4, alpha=8)
    inject(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.adapters["default"].lora_B.normal_(0, 0.5, generator=g)
    meta = {"task": "causal-lm", "model": str(base), "max_length": 64, "system_prompt": system}
    return save_adapter(model, out, spec, ["q_proj", "v_proj"], base_model=str(base), meta=meta)


@pytest.fixture(scope="module")
def root(base_dir) -> Path:
    root = base_dir.parent / "adapters"
    for name, (seed, system) in ADAPTERS.items():
        lm_adapter(base_dir, root / name, seed, system)
    lm_adapter(base_dir, root / "late", 4, None)
    return root


@pytest.fixture(scope="module")
def loaded(root) -> dict[str, Any]:
    return {name: load(root / name, device="cpu") for name in [*ADAPTERS, "late"]}


def chat_ref(loaded, prompt: str, n: int = N) -> str:
    """``loratune generate``'s greedy answer (its chat template, its system prompt)."""
    return next(generate(loaded, [prompt], max_new_tokens=n, precision="fp32", threads=1))["completion"]


def text_ref(model, tok, prompt: str, n: int = N) -> tuple[str, int]:
    """transformers' greedy continuation of ``tokenizer(prompt)`` up to a stop token: (text, tokens written)."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    stops = stop_ids(tok)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    end = next((k for k, t in enumerate(new) if t in stops), None)
    return tok.decode(new if end is None else new[:end], skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def refs(loaded, base_dir) -> dict[str, dict[str, list]]:
    out = {name: {"chat": [chat_ref(lo, p) for p in PROMPTS],
                  "text": [text_ref(lo.model, lo.tokenizer, p)[0] for p in PROMPTS]} for name, lo in loaded.items()}
    base, tok = load_causal_lm(str(base_dir)), load_tokenizer(str(base_dir))
    out["BASE"] = {"text": [text_ref(base, tok, p)[0] for p in PROMPTS]}
    return out


@pytest.fixture(scope="module")
def server(root, refs) -> Iterator[Any]:
    with serving(adapters={n: str(root / n) for n in ADAPTERS}, adapters_dir=root, max_wait_ms=25,
                 limits=Limits(max_inputs=4, max_chars=400, max_body_bytes=4096, max_tokens=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


# --- each adapter, alone --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_completions_equal_loratune_generate(client, refs, stream) -> None:
    for name in ADAPTERS:
        for k, prompt in enumerate(PROMPTS):
            kw = dict(model=name, messages=[{"role": "user", "content": prompt}], max_tokens=N, temperature=0)
            if stream:
                chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
                assert chunks[0].choices[0].delta.role == "assistant"
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                usage = chunks[-1].usage
                assert chunks[-1].choices == [] and len(finish) == 1
                assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
            else:
                answer = client.chat.completions.create(**kw)
                assert answer.object == "chat.completion" and answer.model == name
                assert answer.choices[0].message.role == "assistant"
                text, finish, usage = answer.choices[0].message.content, [answer.choices[0].finish_reason], answer.usage
            assert text == refs[name]["chat"][k], (name, prompt)
            assert finish[0] in ("stop", "length")
            assert usage.completion_tokens == N if finish[0] == "length" else usage.completion_tokens <= N
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_transformers_greedy_generate(client, refs, base_dir, stream) -> None:
    for name in [*ADAPTERS, str(base_dir)]:
        ref = refs.get(name, refs["BASE"])["text"]
        if stream:
            chunks = list(client.completions.create(model=name, prompt=PROMPTS[:2], max_tokens=N, temperature=0,
                                                    stream=True))
            texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == k) for k in range(2)]
            assert all(c.object == "text_completion" for c in chunks)
        else:
            answer = client.completions.create(model=name, prompt=PROMPTS[:2], max_tokens=N, temperature=0)
            assert [c.index for c in answer.choices] == [0, 1] and answer.object == "text_completion"
            texts = [c.text for c in answer.choices]
        assert texts == ref[:2], name


def test_models_lists_the_base_and_the_adapters_as_causal_lm(server, base_dir) -> None:
    status, body = call(server.url, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == [str(base_dir), *ADAPTERS]
    assert {m["task"] for m in body["data"]} == {"causal-lm"} and body["data"][1]["parent"] == str(base_dir)
    assert body["data"][0]["max_model_len"] == 512


# --- many adapters in one batch -----------------------------------------------------------------------------

def test_concurrent_requests_over_three_adapters_decode_in_one_batch(root, base_dir) -> None:
    """12 concurrent requests (3 adapters and the base, chats and completions, streamed and not, each a
    different length, so rows leave the batch at different steps) run as one batch; every answer equals that
    adapter's alone."""
    jobs = [(name, k, kind, stream, 4 + (i % 5) * 2) for i, (name, k, kind, stream) in enumerate(
        [(n, k, kind, s) for n in ADAPTERS for k, kind, s in ((0, "chat", False), (1, "chat", True), (2, "text", False))]
        + [(str(base_dir), k, "text", k == 1) for k in range(3)])]

    def one(job) -> tuple[str, str]:
        name, k, kind, stream, n = job
        if kind == "chat":
            kw = dict(model=name, messages=[{"role": "user", "content": PROMPTS[k]}], max_tokens=n, temperature=0)
            if stream:
                return job, "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    stream=True, **kw))
            return job, client.chat.completions.create(**kw).choices[0].message.content
        kw = dict(model=name, prompt=PROMPTS[k], max_tokens=n, temperature=0)
        if stream:
            return job, "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return job, client.completions.create(**kw).choices[0].text

    # a batch waits until it has every row (max_wait 10 s): all 12 requests decode together
    with serving(adapters={n: str(root / n) for n in ADAPTERS}, max_batch=len(jobs), max_wait_ms=10_000) as one_batch:
        client = openai.OpenAI(base_url=one_batch.url + "/v1", api_key="none", max_retries=0, timeout=120)
        before = metrics(one_batch.url)
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = [f.result(timeout=120) for f in [pool.submit(one, job) for job in jobs]]
        after = metrics(one_batch.url)
    for (name, k, kind, stream, n), text in answers:
        if kind == "chat":
            want = chat_ref(load_cached(name), PROMPTS[k], n)
        else:
            model, tok = _model_of(name)
            want = text_ref(model, tok, PROMPTS[k], n)[0]
        assert text == want, (name, k, kind, stream, n)
    assert total(after, "loratune_batch_rows_count") - total(before, "loratune_batch_rows_count") == 1
    assert total(after, "loratune_batch_rows_sum") - total(before, "loratune_batch_rows_sum") == len(jobs)
    # the one batch counted once for each of the 3 adapters and once for the base's rows
    assert total(after, "loratune_adapter_batch_rows_count") - total(before, "loratune_adapter_batch_rows_count") == 4


_CACHE: dict[str, Any] = {}


def load_cached(name: str) -> Any:
    return _CACHE[name]


def _model_of(name: str) -> tuple[Any, Any]:
    lo = _CACHE[name]
    return (lo.model, lo.tokenizer) if hasattr(lo, "model") else lo


@pytest.fixture(scope="module", autouse=True)
def _fill_cache(loaded, base_dir) -> None:
    _CACHE.update(loaded)
    _CACHE[str(base_dir)] = (load_causal_lm(str(base_dir)), load_tokenizer(str(base_dir)))


# --- sampling, stops, limits ---------------------------------------------------------------------------------

def test_sampling_is_seeded_per_row_and_top_p_near_zero_is_greedy(root, client, refs) -> None:
    def sample(seed: int, via: openai.OpenAI | None = None, **kw: Any) -> str:
        return (via or client).chat.completions.create(model="plain", messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=N, temperature=1.0, seed=seed, **kw).choices[0].message.content

    alone = sample(7)
    assert sample(7) == alone                               # the same seed, the same text
    assert len({alone, sample(8), sample(9)}) == 3          # other seeds, other draws

    # in one batch with other rows (it waits for 3): each row's draws are its own
    with serving(adapters={"plain": str(root / "plain")}, max_batch=3, max_wait_ms=10_000) as three:
        batch_client = openai.OpenAI(base_url=three.url + "/v1", api_key="none", max_retries=0, timeout=120)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(sample, seed, batch_client) for seed in (7, 8, 7)]
            batched = [f.result(timeout=120) for f in futures]
        assert total(metrics(three.url), "loratune_batch_rows_count") == 1
    assert batched[0] == batched[2] == alone and batched[1] == sample(8)
    # a nucleus below the top token's probability keeps the top token alone: greedy
    assert sample(3, top_p=1e-6) == refs["plain"]["chat"][0]


def test_a_stop_string_cuts_the_text_before_it(client, refs) -> None:
    ref = refs["sys"]["chat"][1]
    at = next(i for i in range(2, len(ref) - 2) if "\ufffd" not in ref[i:i + 2] and ref.find(ref[i:i + 2]) == i)
    stop = ref[at:at + 2]
    kw = dict(model="sys", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=N, temperature=0,
              stop=[stop, "never-written"])
    answer = client.chat.completions.create(**kw)
    assert answer.choices[0].message.content == ref[:at] and answer.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ref[:at]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_the_context_bounds_prompt_and_answer(server, client, monkeypatch) -> None:
    prompt_tokens = client.completions.create(model="plain", prompt=PROMPTS[0], max_tokens=1,
                                              temperature=0).usage.prompt_tokens
    monkeypatch.setattr(server.state.model, "context", prompt_tokens + 3)
    answer = client.completions.create(model="plain", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    want_text, want_tokens = text_ref(_CACHE["plain"].model, _CACHE["plain"].tokenizer, PROMPTS[0], 3)
    assert (answer.choices[0].text, answer.usage.completion_tokens) == (want_text, want_tokens)
    assert answer.choices[0].finish_reason == ("length" if want_tokens == 3 else "stop")
    monkeypatch.setattr(server.state.model, "context", prompt_tokens)
    with pytest.raises(openai.BadRequestError, match=f"is {prompt_tokens} tokens; the model reads at most"):
        client.completions.create(model="plain", prompt=PROMPTS[0], max_tokens=N)


def _batches_run(server, monkeypatch) -> list[list[dict]]:
    """The rows of each batch the server's batcher runs from now on (this test's), as run returns them."""
    seen: list[list[dict]] = []
    run = server.state.batcher.run

    def spy(rows):
        out = run(rows)
        seen.append(out)
        return out

    monkeypatch.setattr(server.state.batcher, "run", spy)
    return seen


def _writes_64() -> str:
    """A prompt the 'plain' adapter answers with all 64 tokens when alone (no stop token before)."""
    lo = _CACHE["plain"]
    return next(p for p in PROMPTS if text_ref(lo.model, lo.tokenizer, p, 64)[1] == 64)


def test_a_stream_the_client_leaves_ends_its_row(server, client, monkeypatch) -> None:
    seen = _batches_run(server, monkeypatch)
    prompt = _writes_64()
    stream = client.completions.create(model="plain", prompt=prompt, max_tokens=64, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    assert wait_for(lambda: bool(seen), timeout=30)
    assert seen[0][0]["finish_reason"] == "cancelled" and seen[0][0]["completion_tokens"] < 64


def test_a_stream_never_sent_generates_nothing(server, client, monkeypatch) -> None:
    """A streamed answer is made, then never sent: the request's task ended between the handler and the response
    (cancelled, or the client gone and the server stopping). Its rows must not be generating to max_tokens for
    nobody: the only row the batcher runs is the next request's. (A stream that has begun and is left ends its rows
    at their next step: test_a_stream_the_client_leaves_ends_its_row.)"""
    seen = _batches_run(server, monkeypatch)
    prompt = _writes_64()
    body = json.dumps({"model": "plain", "prompt": prompt, "max_tokens": 64, "temperature": 0,
                       "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def made_then_dropped() -> str:
        response, _, _ = await completions(Request(scope, receive), server.state)
        await asyncio.sleep(0.5)                            # the batcher's loop runs meanwhile
        return type(response).__name__

    loop = server.state.batcher._task.get_loop()           # the server's own event loop, as uvicorn runs the app
    assert asyncio.run_coroutine_threadsafe(made_then_dropped(), loop).result(timeout=30) == "StreamingResponse"
    after = client.completions.create(model="plain", prompt=PROMPTS[0], max_tokens=1, temperature=0)
    assert after.usage.completion_tokens == 1
    assert [r["completion_tokens"] for batch in seen for r in batch] == [1], seen


# --- adapters at run time, kinds that do not mix -------------------------------------------------------------

def test_load_a_causal_adapter_at_run_time_and_refuse_a_classifier(server, client, refs, root, tiny_model_dir) -> None:
    status, text = call(server.url, "POST", "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "late"})
    assert status == 200, text
    try:
        got = client.chat.completions.create(model="late", messages=[{"role": "user", "content": PROMPTS[2]}],
                                             max_tokens=N, temperature=0).choices[0].message.content
        assert got == refs["late"]["chat"][2]
    finally:
        call(server.url, "POST", "/v1/unload_lora_adapter", {"lora_name": "late"})
    folder = root / "classifier"
    if not folder.exists():
        _make(folder, tiny_model_dir, "a2", seed=5)          # test_serve's 2-class BERT adapter
    status, answer = call(server.url, "POST", "/v1/load_lora_adapter",
                          {"lora_name": "cls", "lora_path": "classifier"})
    assert status == 400 and "a classification adapter" in answer["error"]["message"], answer
    with pytest.raises(InputError, match="one server serves one kind"):
        prepare(adapters={"plain": str(root / "plain"), "cls": str(folder)}, threads=1)


# --- bad requests ---------------------------------------------------------------------------------------------

CHAT = {"model": "sys", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "sys", "prompt": "hi"}
BAD = [  # (case, path, body, status, param, fragment)
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model", "'nope' does not exist"),
    ("malformed json", "/v1/completions", b'{"model": "sys", "prompt": ', 400, None, "not valid JSON"),
    ("body a list", "/v1/chat/completions", [CHAT], 400, None, "must be a JSON object, not list"),
    ("model a number", "/v1/completions", {**TEXT, "model": 3}, 422, "model", "'model'"),
    ("messages missing", "/v1/chat/completions", {"model": "sys"}, 422, "messages", "'messages' is required"),
    ("messages empty", "/v1/chat/completions", {**CHAT, "messages": []}, 422, "messages", "non-empty list"),
    ("a message not an object", "/v1/chat/completions", {**CHAT, "messages": ["hi"]}, 422, "messages[0]",
     "must be an object"),
    ("a bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 422,
     "messages[0].role", "must be one of"),
    ("content a number", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, 422,
     "messages[0].content", "must be a string"),
    ("an image part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422,
     "messages[0].content[0]", "text only"),
    ("prompt missing", "/v1/completions", {"model": "sys"}, 422, "prompt", "'prompt' is required"),
    ("prompt token ids", "/v1/completions", {**TEXT, "prompt": [1, 2, 3]}, 422, "prompt[0]", "token ids"),
    ("prompt item a number", "/v1/completions", {**TEXT, "prompt": ["x", 3]}, 422, "prompt[1]", "non-empty string"),
    ("too many prompts", "/v1/completions", {**TEXT, "prompt": ["x"] * 5}, 413, "prompt", "the limit is 4"),
    ("prompt too long", "/v1/completions", {**TEXT, "prompt": ["x", "y" * 401]}, 413, "prompt[1]", "limit is 400"),
    ("too many messages", "/v1/chat/completions", {**CHAT, "messages": CHAT["messages"] * 5}, 413, "messages",
     "the limit is 4"),
    ("messages too long", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "y" * 300}] * 2}, 413, "messages", "over 400 characters"),
    ("body too big", "/v1/completions", {**TEXT, "prompt": ["z" * 390] * 4, "stop": ["q" * 3000]}, 413, None,
     "limit is 4,096"),
    ("temperature too high", "/v1/chat/completions", {**CHAT, "temperature": 3}, 422, "temperature", "[0, 2]"),
    ("temperature a string", "/v1/completions", {**TEXT, "temperature": "hot"}, 422, "temperature", "a number"),
    ("top_p zero", "/v1/chat/completions", {**CHAT, "top_p": 0}, 422, "top_p", "(0, 1]"),
    ("max_tokens zero", "/v1/completions", {**TEXT, "max_tokens": 0}, 422, "max_tokens", ">= 1"),
    ("max_tokens over the limit", "/v1/completions", {**TEXT, "max_tokens": 65}, 422, "max_tokens",
     "at most 64 tokens"),
    ("max_completion_tokens over", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 100}, 422,
     "max_completion_tokens", "at most 64"),
    ("seed negative", "/v1/completions", {**TEXT, "seed": -1}, 422, "seed", "whole number"),
    ("five stops", "/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "at most 4"),
    ("an empty stop", "/v1/completions", {**TEXT, "stop": [""]}, 422, "stop", "non-empty string"),
    ("stream a string", "/v1/completions", {**TEXT, "stream": "yes"}, 422, "stream", "true or false"),
    ("stream_options unstreamed", "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 422,
     "stream_options", "only allowed"),
    ("n = 2", "/v1/chat/completions", {**CHAT, "n": 2}, 422, "n", "not supported"),
    ("logprobs", "/v1/completions", {**TEXT, "logprobs": 2}, 422, "logprobs", "not supported"),
    ("echo", "/v1/completions", {**TEXT, "echo": True}, 422, "echo", "not supported"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 422, "tools", "not supported"),
    ("classify on a causal LM", "/v1/classify", {"model": "sys", "input": "x"}, 400, "model",
     "use /v1/completions"),
    ("a role that is a list", "/v1/chat/completions", {**CHAT, "messages": [{"role": ["user"], "content": "x"}]}, 422,
     "messages[0].role", "must be one of"),
    ("temperature of 400 digits", "/v1/completions", b'{"model": "sys", "prompt": "hi", "temperature": 1' + b"0" * 400
     + b"}", 422, "temperature", "[0, 2]"),
    ("top_p NaN", "/v1/completions", b'{"model": "sys", "prompt": "hi", "top_p": NaN}', 422, "top_p", "(0, 1]"),
    ("a lone surrogate in a prompt", "/v1/completions", b'{"model": "sys", "prompt": "a\\ud800"}', 422, "prompt",
     "lone surrogate"),
    ("a lone surrogate in a message", "/v1/chat/completions",
     b'{"model": "sys", "messages": [{"role": "user", "content": "\\udc80"}]}', 422, "messages[0].content",
     "lone surrogate"),
    ("logprobs 0", "/v1/completions", {**TEXT, "logprobs": 0}, 422, "logprobs", "not supported"),
    ("a stop of 257 characters", "/v1/chat/completions", {**CHAT, "stop": "s" * 257}, 422, "stop", "at most 256"),
    # vLLM's sampling extras: refused by name, never ignored (a repetition_penalty of 5 answered as without it)
    ("repetition_penalty", "/v1/completions", {**TEXT, "repetition_penalty": 5.0}, 422, "repetition_penalty",
     "not supported"),
    ("top_k", "/v1/chat/completions", {**CHAT, "top_k": 5}, 422, "top_k", "not supported"),
    ("min_p", "/v1/completions", {**TEXT, "min_p": 0.1}, 422, "min_p", "not supported"),
    ("ignore_eos", "/v1/completions", {**TEXT, "ignore_eos": True}, 422, "ignore_eos", "not supported"),
    ("stop_token_ids", "/v1/completions", {**TEXT, "stop_token_ids": [2]}, 422, "stop_token_ids", "not supported"),
]


@pytest.mark.parametrize("case,path,body,status,param,fragment", BAD, ids=[c[0] for c in BAD])
def test_a_bad_request_gets_its_status_and_the_server_serves_on(server, refs, case, path, body, status, param,
                                                                 fragment) -> None:
    raw = body if isinstance(body, bytes) else None
    got, answer = call(server.url, "POST", path, None if raw else body, raw=raw)
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == status and error["param"] == param and fragment in error["message"], error
    code, good = call(server.url, "POST", "/v1/chat/completions",
                      {**CHAT, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": N,
                       "temperature": 0})
    assert code == 200 and good["choices"][0]["message"]["content"] == refs["sys"]["chat"][0]


def test_the_key_guards_the_text_routes(root, refs) -> None:
    with serving(adapters={"sys": str(root / "sys")}, api_key="k") as keyed:
        bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="sys", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="sys", prompt="x")
        for path, body in (("/v1/completions", TEXT), ("/v1/chat/completions", CHAT)):
            status, answer = call(keyed.url, "POST", path, body)                  # no key at all
            assert status == 401 and answer["error"]["code"] == 401
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="k", max_retries=0)
        assert good.chat.completions.create(model="sys", messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=N, temperature=0).choices[0].message.content == \
            refs["sys"]["chat"][0]


def test_merge_serves_one_causal_adapter_as_generate(root, refs) -> None:
    with serving(adapters={"sys": str(root / "sys")}, merge=True) as merged:
        c = openai.OpenAI(base_url=merged.url + "/v1", api_key="x", max_retries=0)
        got = [c.chat.completions.create(model="sys", messages=[{"role": "user", "content": p}], max_tokens=N,
                                         temperature=0).choices[0].message.content for p in PROMPTS]
    # merged weights differ from W0 + BA by float rounding only: the same greedy text
    assert got == refs["sys"]["chat"]


def test_bad_max_tokens_flag_exits_2(root, capsys) -> None:
    code, _, err = run(capsys, "serve", "--adapter", f"sys={root / 'sys'}", "--max-tokens", "0")
    assert_one_line_error(code, err, "--max-tokens")


def test_engine_rows_through_their_adapters_equal_each_alone(server, refs, base_dir) -> None:
    """The decoding engine itself (no HTTP): one batch over every adapter and the base, rows of different
    prompt lengths and max_tokens, equal to each alone; a finished row leaves the batch."""
    from loratune.serve.lm import GenRow

    model = server.state.model
    rows = [(name, GenRow(model.chat_ids([{"role": "user", "content": p}], ADAPTERS[name][1]), max_tokens=n))
            for name in ADAPTERS for p, n in zip(PROMPTS, (N, 3, 7))]
    rows.append((None, GenRow(model.text_ids(PROMPTS[2]), max_tokens=N)))
    done = threading.Event()
    out: list[dict] = []

    def go() -> None:
        out.extend(model.generate(rows))
        done.set()

    server.state.batcher.executor.submit(go)            # on the worker thread, between the server's batches
    assert done.wait(60)
    for i, ((name, _), got) in enumerate(zip(rows[:-1], out)):
        k = i % 3
        assert got["text"] == chat_ref(_CACHE[name], PROMPTS[k], (N, 3, 7)[k]), (name, k)
        assert got["completion_tokens"] <= (N, 3, 7)[k]
    assert out[-1]["text"] == refs["BASE"]["text"][2]


def test_engine_on_gpt2_left_padding_keeps_positions(tmp_path) -> None:
    """GPT-2 reads learned absolute positions: left-padded rows of different lengths must get positions from
    0 at their first real token. A mixed batch (two adapters, the base) equals each row decoded alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from loratune.serve.lm import GenRow, ServedLM

    tok = chat_tokenizer(eos="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                               initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    folders = {}
    for name, seed in (("g1", 1), ("g2", 2)):
        model = load_causal_lm(str(tmp_path / "base"))
        spec = LoraSpec(targets=("c_attn",), rank=4, alpha=8)
        inject(model, spec)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.adapters["default"].lora_B.normal_(0, 0.5, generator=g)
        folders[name] = save_adapter(model, tmp_path / name, spec, ["c_attn"], base_model=str(tmp_path / "base"),
                                     meta={"task": "causal-lm", "model": str(tmp_path / "base"), "max_length": 64})
    served = ServedLM(str(tmp_path / "base"), device="cpu", precision="fp32")   # the references are fp32
    for name, folder in folders.items():
        served.add(name, folder)
    prompts = ["a", "hello there, how are you today my friend", PROMPTS[1]]
    rows = [(name, GenRow(served.chat_ids([{"role": "user", "content": p}], None), max_tokens=10))
            for name in ("g1", "g2") for p in prompts]
    out = served.generate(rows)
    for (name, _), got, p in zip(rows, out, prompts * 2):
        assert got["text"] == chat_ref(load(folders[name]), p, 10), (name, p)
    base_rows = [(None, GenRow(served.text_ids(p), max_tokens=10)) for p in prompts]
    model, btok = load_causal_lm(str(tmp_path / "base")), load_tokenizer(str(tmp_path / "base"))
    assert [o["text"] for o in served.generate(base_rows)] == [text_ref(model, btok, p, 10)[0] for p in prompts]


def test_a_temperature_near_zero_is_greedy_and_fails_no_neighbour(client, refs) -> None:
    """1e-40 would overflow the logits (NaN probabilities): below 1e-5 is greedy, as vLLM's."""
    got = client.chat.completions.create(model="sys", messages=[{"role": "user", "content": PROMPTS[0]}],
                                         max_tokens=N, temperature=1e-40).choices[0].message.content
    assert got == refs["sys"]["chat"][0]


def test_merged_server_does_not_pass_its_merged_model_off_as_the_base(root, base_dir) -> None:
    with serving(adapters={"sys": str(root / "sys")}, merge=True) as merged:
        status, answer = call(merged.url, "POST", "/v1/completions", {"model": str(base_dir), "prompt": "x"})
    assert status == 400 and "merged" in answer["error"]["message"] and answer["error"]["param"] == "model"


def test_a_short_stream_ends_before_its_batch(root) -> None:
    """A streamed row that finishes leaves at once: its [DONE] comes while a long neighbour still decodes."""
    with serving(adapters={"plain": str(root / "plain")}, max_batch=2, max_wait_ms=10_000) as two:
        c = openai.OpenAI(base_url=two.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def run(n: int) -> float:
            for _ in c.completions.create(model="plain", prompt=PROMPTS[2], max_tokens=n, temperature=0,
                                          stream=True, stop=["\x00"]):
                pass
            return time.monotonic()

        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            short, long = pool.submit(run, 1), pool.submit(run, 60)
            t_short, t_long = short.result(timeout=120), long.result(timeout=120)
        assert total(metrics(two.url), "loratune_batch_rows_count") == 1       # one batch of both
    # the batch starts once both arrived; the short one's answer is out after its prefill and 1 step of 60
    assert t_short - t0 < 0.5 * (t_long - t0), (t_short - t0, t_long - t0)
