"""Writing with a causal-LM adapter: ``loratune generate`` and ``loratune.generate``.

Each prompt becomes one user turn, rendered by the tokenizer's chat template with the generation prompt
(the assistant's header), after the adapter's system prompt (``--system-prompt`` replaces it): the model
sees what it was trained on. A tokenizer without a template gets the prompt as plain text, tokenized as
``tokenizer(prompt)`` gives it (with its own special tokens), as training formats such data
(:mod:`loratune.tasks.causal`).

Generation is greedy at temperature 0 (the same tokens as :func:`loratune.tasks.causal_metrics.greedy_generate`,
which scores ``exact_match``), else sampled from the temperature-scaled distribution cut to its top-p
nucleus (no top-k: only the flags shape it). It stops at a stop token (:func:`stop_ids`: EOS and the
template's end-of-turn token), left out of the text, or after ``max_new_tokens`` new tokens.

Prompts are done one at a time, in order, as they are read (a file or stdin is never held whole): no
padding, so a prompt's greedy completion never depends on its neighbours, and its text can stream out
(``on_text``) token by token. Sampling draws from one random stream seeded once by ``seed``, kept apart
from torch's global one: the same prompts and seed give the same completions, and the caller's random
state is left as it was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from loratune.errors import InputError
from loratune.infer.inference import Loaded, load, require_task
from loratune.runtime import autocast, resolve_precision, set_threads
from loratune.tasks.causal_metrics import only_given_settings, stop_ids


def generate(adapter: str | os.PathLike | Loaded, prompts: Iterable[str] | str, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, system_prompt: str | None = None,
             precision: str = "auto", base: str | None = None, device: str = "auto", threads: int | None = None,
             on_text: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"prompt", "completion", "finish_reason", "tokens"}`` per prompt, in input order.

    ``finish_reason`` is ``"stop"`` (the model wrote a stop token) or ``"length"`` (``max_new_tokens``
    reached first, or the model's context: prompt and completion never exceed it); ``tokens`` counts the
    tokens generated, the stop token included (what ``max_new_tokens`` bounds). A prompt that fills the
    context by itself is an InputError. ``system_prompt`` None: the adapter's own (if any); ``""``: no system turn.
    ``on_text``, when given, receives each completion's text in pieces as its tokens are generated
    (they add up to ``completion``). ``adapter`` is a causal-LM adapter folder or one already :func:`load`-ed.
    """
    _check(max_new_tokens, temperature, top_p, seed)
    if isinstance(prompts, str):
        prompts = [prompts]
    set_threads(threads)
    require_task(adapter, "causal-lm")                  # a classifier is refused before its model loads
    loaded = adapter if isinstance(adapter, Loaded) else load(adapter, base=base, device=device)
    tok = loaded.tokenizer
    system = loaded.system_prompt if system_prompt is None else (system_prompt or None)
    stops = stop_ids(tok)
    if not stops:
        raise InputError("the tokenizer has no EOS or end-of-turn token to stop generation on")
    dev = next(loaded.model.parameters()).device
    prec = resolve_precision(precision, dev)
    if temperature == 0:
        how: dict[str, Any] = {"do_sample": False, "num_beams": 1}
    else:
        how = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    rng = _Random(seed, dev)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    for number, prompt in enumerate(prompts, 1):
        ids = torch.tensor([prompt_ids(tok, prompt, system)], dtype=torch.long, device=dev)
        if ids.shape[1] == 0:                           # no template, no special tokens: nothing to continue
            raise InputError(f"prompt {number} ({prompt!r:.40}) has no tokens: nothing to continue")
        room = max_new_tokens if not context else min(max_new_tokens, context - ids.shape[1])
        if room < 1:
            raise InputError(f"prompt {number} ({prompt!r:.40}) is {ids.shape[1]} tokens with its chat template, "
                             f"and the model reads at most {context}")
        stream = _Stream(tok, stops, on_text) if on_text is not None else None
        with torch.no_grad(), autocast(dev, prec), rng.active(), only_given_settings(loaded.model):
            out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=room,
                                        eos_token_id=stops, pad_token_id=loaded.pad_id, streamer=stream, **how)
        new = out[0, ids.shape[1]:].tolist()
        end = next((k for k, t in enumerate(new) if t in stops), None)
        kept = new if end is None else new[:end]
        completion = tok.decode(kept, skip_special_tokens=True)
        if stream is not None:
            stream.finish(completion)
        yield {"prompt": prompt, "completion": completion, "finish_reason": "length" if end is None else "stop",
               "tokens": len(new) if end is None else end + 1}


def prompt_ids(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """The token ids the model continues: ``prompt`` as a user turn (after ``system_prompt``) rendered by the
    chat template with the assistant's header; without a template, the prompt as plain text."""
    if not getattr(tokenizer, "chat_template", None):
        if system_prompt:
            raise InputError("--system-prompt: the tokenizer has no chat template to put a system turn in")
        return list(tokenizer(prompt)["input_ids"])
    from jinja2.exceptions import TemplateError

    turns = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise InputError(f"the tokenizer's chat template refused the prompt {prompt!r:.40} ({e})") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check(max_new_tokens: int, temperature: float, top_p: float, seed: int) -> None:
    """The generation flags, each checked before any model loads."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: expected a whole number >= 1, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"--temperature: expected a number >= 0 (0: greedy), got {temperature!r}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InputError(f"--top-p: expected a number in (0, 1] (1: the whole distribution), got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"--seed: expected a whole number >= 0, got {seed!r}")


class _Random:
    """Sampling's own random state, seeded once and carried from prompt to prompt; torch's global state (CPU,
    and the device's when it is a GPU) is swapped in only while a prompt generates, then restored."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self.cuda):
            torch.manual_seed(seed)
            self._save()

    def _save(self) -> None:
        self.cpu = torch.get_rng_state()
        self.gpu = [torch.cuda.get_rng_state(d) for d in self.cuda]

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.cuda):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.cuda, self.gpu):
                torch.cuda.set_rng_state(state, d)
            yield
            self._save()


class _Stream(BaseStreamer):
    """A ``generate(streamer=...)`` that hands ``on_text`` each new piece of the completion's text.

    The tokens so far (up to a stop token) are decoded as a whole each time, as the final text is, and only
    an extension of what was shown is shown; a piece ending in an incomplete character (a byte-level token
    that is half of one) waits for the next token. :meth:`finish` shows the rest of the final text.
    """

    def __init__(self, tokenizer: Any, stops: list[int], on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.stops, self.on_text = tokenizer, set(stops), on_text
        self.ids: list[int] = []
        self.shown = ""
        self.prompt = True
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:                                 # generate() hands over the prompt first
            self.prompt = False
            return
        for t in value.reshape(-1).tolist():
            self.stopped = self.stopped or t in self.stops
            if not self.stopped:
                self.ids.append(int(t))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._show(text)

    def end(self) -> None:
        pass

    def finish(self, completion: str) -> None:
        self._show(completion)

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text
