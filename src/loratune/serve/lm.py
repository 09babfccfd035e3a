"""The causal-LM model a server holds: one frozen decoder, many causal-LM adapters, rows decoded together.

:class:`ServedLM` is the causal-LM sibling of :class:`loratune.serve.model.ServedModel` (the same interface
for the routes: ``base``, ``adapters``, ``add``, ``remove``, ``merged``), used from the server's one worker
thread. :meth:`ServedLM.generate` decodes one batch of rows — each a prompt of token ids through its own
adapter (None: the base alone) with its own sampling options — together, for the whole generation: the
prompts are left-padded into one prefill pass, then every step is one forward pass of one new token per
row still running, through the KV cache, with :func:`loratune.core.inject.routed` sending each row through
its adapter's LoRA matrices. A row that finishes leaves the batch (its cache rows are dropped), so the rest
run narrower.

Greedy rows pick the highest logit, as ``loratune generate`` at temperature 0 does; sampled rows draw from
their temperature-scaled distribution cut to its top-p nucleus, with a random stream of their own (seeded
by the request's ``seed``, else at random), so a row's draw never depends on its neighbours. A row stops at
a stop token (EOS or the chat template's end of turn: :func:`loratune.tasks.causal_metrics.stop_ids`, left
out of the text), at a stop string (cut before it), after ``max_tokens`` new tokens, or at the model's
context length.
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from loratune.core.adapters import file_size, read_meta
from loratune.core.inject import merge_and_unload, routed
from loratune.core.routing import add_routed_adapter, remove_routed_adapter
from loratune.errors import InputError
from loratune.runtime import autocast, resolve_device, resolve_precision
from loratune.serve.model import ServedAdapter, ServedModel
from loratune.tasks.causal_metrics import stop_ids
from loratune.training.models import (
    is_model_folder,
    load_causal_lm,
    load_tokenizer,
    pad_id_of,
)

log = logging.getLogger(__name__)


@dataclass
class GenRow:
    """One completion to write: the prompt's token ids and the request's options; the worker fills in the
    result (``tokens``, ``text``, ``finish_reason``) and hands each new piece of text to ``emit`` (called on
    the worker thread) when streaming. ``cancelled`` (set from any thread: the client went away) ends the row
    at its next step."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    emit: Callable[[str], None] | None = None
    on_done: Callable[[dict[str, Any]], None] | None = None
    """Called (on the worker thread) with the row's result the moment it finishes, before its batch ends."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    shown: str = ""
    cancelled: bool = False

    @property
    def started(self) -> bool:
        """Whether any text reached the client (a row that streamed cannot be run again)."""
        return bool(self.shown)


class ServedLM:
    """A causal-LM base and its adapters; :meth:`generate` decodes a batch of rows, each through its own."""

    task = "causal-lm"

    def __init__(self, base: str, *, device: str = "auto", precision: str = "auto", download: bool = False) -> None:
        self.base = base
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.base_labels = None
        self.model = load_causal_lm(base, download=download)
        self._ready()
        self.tokenizer = load_tokenizer(base, download=download)
        self.merged = False
        self.adapters: dict[str, ServedAdapter] = {}
        self._finish_init()

    @classmethod
    def merged_from(cls, name: str, adapter_dir: str | os.PathLike, *, base: str | None = None,
                    device: str = "auto", precision: str = "auto") -> "ServedLM":
        """One causal-LM adapter folded into its base (``--merge``): a plain transformers decoder."""
        from loratune.infer.inference import load

        _check_causal(adapter_dir)
        loaded = load(adapter_dir, base=base, device=device)
        self = cls.__new__(cls)
        self.base, self.device = loaded.base, next(loaded.model.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.base_labels = None
        self.model = merge_and_unload(loaded.model)
        self._ready()
        self.tokenizer, self.merged = loaded.tokenizer, True
        self.adapters = {name: ServedAdapter(name, str(adapter_dir), [], 0, file_size(adapter_dir),
                                             task="causal-lm", system_prompt=loaded.system_prompt)}
        self._finish_init()
        return self

    def _ready(self) -> None:
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _finish_init(self) -> None:
        tok = self.tokenizer
        self.pad_id = pad_id_of(tok)
        self.stops = set(stop_ids(tok))
        if not self.stops:
            raise InputError(f"{self.base}: the tokenizer has no EOS or end-of-turn token to stop generation on")
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.base_max_length = self.context or 0
        for a in self.adapters.values():
            a.max_length = self.base_max_length
        params = inspect.signature(self.model.forward).parameters
        self._keep = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5.x
        self._probe = list(tok("probe")["input_ids"]) or [self.pad_id]

    # --- adapters --------------------------------------------------------------------------------

    check_base = ServedModel.check_base               # the same rule: it reads only ``self.base``

    def add(self, name: str, adapter_dir: str | os.PathLike) -> ServedAdapter:
        """Load a causal-LM adapter for per-row routing, then write one token through it (a bad adapter is
        refused here, never failing a batch of others)."""
        if self.merged:
            raise InputError("this server serves one merged adapter (--merge); it loads no others")
        _check_causal(adapter_dir)
        self.check_base(adapter_dir)
        system = read_meta(adapter_dir).get("system_prompt")
        if system is not None and not isinstance(system, str):
            raise InputError(f"{adapter_dir}/loratune.json: field 'system_prompt' must be text or null")
        add_routed_adapter(self.model, adapter_dir, name)
        adapter = ServedAdapter(name, str(adapter_dir), [], self.base_max_length, file_size(adapter_dir),
                                task="causal-lm", system_prompt=system)
        self.adapters[name] = adapter
        try:
            self.generate([(name, GenRow(self._probe[:8], max_tokens=1))])
        except Exception:
            self.remove(name)
            raise
        return adapter

    def remove(self, name: str) -> None:
        remove_routed_adapter(self.model, name)
        self.adapters.pop(name, None)

    def memory_bytes(self) -> dict[str, Any]:
        return {"base": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                "adapters_on_disk": sum(a.bytes for a in self.adapters.values())}

    # --- prompts -----------------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict[str, str]], system_prompt: str | None) -> list[int]:
        """A conversation as the model continues it: the chat template with the assistant's header, after
        ``system_prompt`` when the messages have no system turn of their own (as ``loratune generate``)."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InputError("the model's tokenizer has no chat template; use /v1/completions with a plain prompt")
        turns = list(messages)
        if system_prompt and not any(m["role"] == "system" for m in turns):
            turns = [{"role": "system", "content": system_prompt}] + turns
        from jinja2.exceptions import TemplateError

        try:
            text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            raise InputError(f"the chat template refused the messages ({e})") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, prompt: str) -> list[int]:
        """A plain prompt, tokenized as the tokenizer gives it (with its own special tokens)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def room(self, n_prompt: int) -> int:
        """How many tokens may follow a prompt of ``n_prompt`` tokens within the model's context."""
        return (self.context - n_prompt) if self.context else 1 << 30

    # --- decoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, rows: Sequence[tuple[str | None, GenRow]]) -> list[dict[str, Any]]:
        """Decode every row together (row i through adapter ``rows[i][0]``); returns per row ``{"text",
        "finish_reason", "completion_tokens", "prompt_tokens"}`` and fills each :class:`GenRow` in."""
        from transformers import DynamicCache

        names = [n for n, _ in rows]
        gen = [r for _, r in rows]
        for r in gen:
            if r.started:
                raise RuntimeError("a streamed row cannot be run again")
            r.tokens, r.text, r.finish_reason = [], "", None
            r.max_tokens = max(0, min(r.max_tokens, self.room(len(r.ids))))
        rngs = [_generator(r.seed) if r.temperature >= GREEDY_BELOW else None for r in gen]
        lens = [len(r.ids) for r in gen]
        width = max(lens)
        ids = torch.full((len(gen), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(gen), width), dtype=torch.long)
        for i, r in enumerate(gen):                      # left-padded: every row's last token is at the end
            ids[i, width - lens[i]:] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - lens[i]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        live = [i for i, r in enumerate(gen) if r.max_tokens > 0]
        for i, r in enumerate(gen):
            if r.max_tokens == 0:
                r.finish_reason = "length"
                _finish(r)
        if live and len(live) < len(gen):
            ids, mask, pos = ids[live], mask[live], pos[live]
        cache = DynamicCache()
        dev = self.device
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        while live:
            extra: dict[str, Any] = {self._cache_arg: cache}
            if self._keep:
                extra["logits_to_keep"] = 1                   # the prefill's last position only
            with autocast(dev, self.precision):
                if self.merged:
                    out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
                else:
                    with routed(self.model, [names[i] for i in live]):
                        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                         **extra)
            returned = getattr(out, "cache", None)
            cache = returned if returned is not None else out.past_key_values
            logits = out.logits[:, -1, :].float()
            keep: list[int] = []
            for j, i in enumerate(live):
                r = gen[i]
                token = _pick(logits[j], r.temperature, r.top_p, rngs[i])
                if self._advance(r, token):
                    keep.append(j)
                else:
                    _finish(r)
            if not keep:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.batch_select_indices(index)
                mask, pos = mask[index], pos[index]
                live = [live[j] for j in keep]
            ids = torch.tensor([[gen[i].tokens[-1]] for i in live], dtype=torch.long, device=dev)
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
        return [_result(r) for r in gen]

    def _advance(self, r: GenRow, token: int) -> bool:
        """Take ``token`` for row ``r``; False once the row is done (its finish_reason set)."""
        r.tokens.append(token)
        if token in self.stops:
            r.finish_reason = "stop"
            return False
        text = self.tokenizer.decode([t for t in r.tokens], skip_special_tokens=True)
        cut = _first_stop(text, r.stop)
        if cut is not None:
            r.text, r.finish_reason = text[:cut], "stop"
            return False
        r.text = text
        if len(r.tokens) >= r.max_tokens:
            r.finish_reason = "length"
            return False
        if r.cancelled:
            r.finish_reason = "cancelled"
            return False
        if r.emit is not None and not text.endswith("\ufffd"):
            safe = len(text) - _held(text, r.stop)       # a possible start of a stop string waits
            if safe > len(r.shown) and text[:safe].startswith(r.shown):
                r.emit(text[len(r.shown):safe])
                r.shown = text[:safe]
        return True


def _result(r: GenRow) -> dict[str, Any]:
    return {"text": r.text, "finish_reason": r.finish_reason, "completion_tokens": len(r.tokens),
            "prompt_tokens": len(r.ids)}


def _finish(r: GenRow) -> None:
    """A row is done: the rest of its text (held back while it might begin a stop string) goes out, then its
    result, at once (its request need not wait for the batch's longest row)."""
    if r.emit is not None and len(r.text) > len(r.shown):
        r.emit(r.text[len(r.shown):])
        r.shown = r.text
    if r.on_done is not None:
        r.on_done(_result(r))


GREEDY_BELOW = 1e-5
"""A temperature below this is greedy (vLLM's _SAMPLING_EPS): dividing by it would overflow the logits."""


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


def _pick(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> int:
    """The next token: the argmax at temperature 0, else a draw from the temperature-scaled distribution cut
    to its top-p nucleus (the smallest set of most likely tokens whose mass reaches top_p)."""
    if temperature < GREEDY_BELOW or rng is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if not torch.isfinite(probs).all():                  # an overflow (a temperature near 0): the argmax
        return int(logits.argmax())
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p           # mass of the more likely tokens
        sorted_p[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=rng))


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    at = [text.find(s) for s in stops]
    found = [a for a in at if a >= 0]
    return min(found) if found else None


def _held(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins a stop string (not shown until it is decided)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _check_causal(adapter_dir: str | os.PathLike) -> None:
    if is_model_folder(adapter_dir):
        raise InputError(f"{adapter_dir}: a fully fine-tuned model, not an adapter; serve it as the base (--base)")
    from loratune.infer.inference import task_of

    if task_of(adapter_dir) != "causal-lm":
        raise InputError(f"{adapter_dir}: a classification adapter; this server's base is a causal LM that serves "
                         "completions (serve classification adapters on their own base)")
