"""Causal-LM (instruction tuning) data: rows -> conversations -> tokens with a loss mask.

Rows come in the ecosystem's three formats (:func:`detect_format` tells them apart by their columns):

- **prompt-completion** (TRL): ``prompt`` and ``completion`` strings, or TRL's conversational kind
  (``prompt`` a list of messages, ``completion`` a list holding one assistant message);
- **messages**: a list of ``{"role": "system"|"user"|"assistant", "content": str}`` turns;
- **alpaca**: ``instruction``, optional ``input``, ``output``.

:func:`to_messages` turns each into one list of turns; :func:`encode_conversation` tokenizes it
the way the model will see it at inference and masks the labels (-100) everywhere the model is
not asked to write:

- **With a chat template** the conversation is rendered by the template, and the loss covers each
  assistant turn from its first token through its end-of-turn token (``<|im_end|>`` in ChatML):
  not the template's headers, not what follows the end-of-turn token (ChatML's newline), and no
  EOS is appended (the template's end-of-turn token is the one the model must learn to stop on).
- **Without one** (GPT-2 style base models) only a prompt and a completion can be formatted: the
  prompt's tokens (with the tokenizer's own special tokens, as ``tokenizer(prompt)`` gives them),
  then the completion's and the EOS token; the loss covers the completion and the EOS.

Labels are not shifted: ``labels[t]`` is ``input_ids[t]`` where trained, and a Hugging Face causal
LM shifts them itself (the logits at t - 1 predict token t). A sequence ends at its last trained
token (what follows would carry no loss and, attention being causal, affect none).

:func:`encode_rows` does a whole split into a :class:`CausalEncoded`, which :func:`batch_order`
orders by its ``lengths`` and :func:`collate_causal` pads into tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loratune.errors import InputError

if TYPE_CHECKING:
    import torch

FORMATS = ("messages", "prompt-completion", "alpaca")
"""What :func:`detect_format` returns, in the order it looks for them."""
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
"""The label of a position without loss (what torch's cross-entropy and Hugging Face models skip)."""
_CHUNK = 512  # rendered conversations tokenized per batched tokenizer call


# --------------------------------------------------------------------------- rows -> conversations

def detect_format(columns: Iterable[str], *, prompt_column: str = "prompt", completion_column: str = "completion",
                  messages_column: str = "messages", where: str = "data") -> str:
    """The format of rows with these columns: "messages", "prompt-completion" or "alpaca", looked for in that order.

    ``messages_column`` wins over a prompt/completion pair (chat datasets often carry a ``prompt``
    column beside their ``messages``); Alpaca's columns (``instruction``, ``output``) are fixed.
    InputError names the columns found and the ones expected.
    """
    cols = list(dict.fromkeys(columns))
    if messages_column in cols:
        return "messages"
    if prompt_column in cols and completion_column in cols:
        return "prompt-completion"
    if "instruction" in cols and "output" in cols:
        return "alpaca"
    raise InputError(f"{where}: no known conversation format in columns {cols}; expected {messages_column!r}, "
                     f"or {prompt_column!r} and {completion_column!r}, or 'instruction' and 'output' (Alpaca)")


def to_messages(row: Mapping[str, Any], *, prompt_column: str = "prompt", completion_column: str = "completion",
                messages_column: str = "messages", system_prompt: str | None = None, fmt: str | None = None,
                where: str = "conversation") -> list[dict[str, Any]]:
    """One row as a conversation: a list of ``{"role", "content"}`` turns, validated.

    ``fmt`` is one of :data:`FORMATS` (None: :func:`detect_format` on the row's keys). Every
    assistant turn is trained on, except the assistant turns inside a conversational prompt
    (TRL trains on the completion only): those carry ``"train": False``. ``system_prompt``, when
    given, becomes the first turn of a conversation that has no system turn. ``where`` (e.g.
    ``"train.jsonl: row 7"``) starts every InputError: a missing column, a value that is not a
    string (or a list of turns), an empty completion or assistant turn, a bad role, a conversation
    with no assistant turn or one that starts with it.
    """
    if not isinstance(row, Mapping):
        raise InputError(f"{where}: expected a record of columns, got {type(row).__name__}")
    fmt = fmt or detect_format(row.keys(), prompt_column=prompt_column, completion_column=completion_column,
                               messages_column=messages_column, where=where)
    if fmt == "messages":
        msgs = _turns(_column(row, messages_column, where), f"column {messages_column!r}", where)
    elif fmt == "prompt-completion":
        msgs = _prompt_completion(row, prompt_column, completion_column, where)
    elif fmt == "alpaca":
        instruction = _text(_column(row, "instruction", where), "instruction", where, required=True)
        extra = _text(row.get("input"), "input", where, required=False)
        user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(_column(row, "output", where), "output", where, required=True)}]
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if system_prompt is not None and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    _check_order(msgs, where)
    return msgs


def _prompt_completion(row: Mapping[str, Any], prompt_column: str, completion_column: str,
                       where: str) -> list[dict[str, Any]]:
    """TRL's prompt-completion row, plain (two strings) or conversational (two lists of turns)."""
    prompt, completion = _column(row, prompt_column, where), _column(row, completion_column, where)
    if _is_list(prompt) or _is_list(completion):
        if not (_is_list(prompt) and _is_list(completion)):
            raise InputError(f"{where}: columns {prompt_column!r} and {completion_column!r} must both be strings "
                             f"or both lists of turns")
        context = [dict(m, train=False) if m["role"] == "assistant" else m
                   for m in _turns(prompt, f"column {prompt_column!r}", where, need_assistant=False)]
        answer = _turns(completion, f"column {completion_column!r}", where)
        if len(answer) != 1:
            raise InputError(f"{where}: column {completion_column!r} has {len(answer)} turns; expected one "
                             f"assistant turn")
        return context + answer
    user = _text(prompt, prompt_column, where, required=True)
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": _text(completion, completion_column, where, required=True)}]


def _column(row: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise InputError(f"{where}: missing column {name!r} (columns: {list(row)})")
    return row[name]


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))    # Parquet via pandas gives object arrays


def _text(value: Any, what: str, where: str, *, required: bool) -> str:
    """A string column's value; None/NaN (a null) is empty. ``required``: InputError when empty or blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = ""
    if not isinstance(value, str):
        raise InputError(f"{where}: column {what!r} is not a string but {type(value).__name__} {value!r:.40}")
    if required and not value.strip():
        raise InputError(f"{where}: column {what!r} is empty")
    return value


def _turns(value: Any, what: str, where: str, *, need_assistant: bool = True) -> list[dict[str, Any]]:
    """A list of {"role", "content"} turns, checked: known roles, string contents, non-empty assistant turns."""
    if not _is_list(value):
        raise InputError(f"{where}: {what} is not a list of turns but {type(value).__name__} {value!r:.40}")
    out: list[dict[str, Any]] = []
    for k, turn in enumerate(value, 1):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise InputError(f"{where}: {what}: turn {k} is not a {{'role', 'content'}} record: {turn!r:.60}")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise InputError(f"{where}: {what}: turn {k} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: {what}: turn {k} ({role}) has content that is not a string but "
                             f"{type(content).__name__} {content!r:.40}")
        if role == "assistant" and not content.strip():
            raise InputError(f"{where}: {what}: turn {k} (assistant) is empty")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{where}: {what} has no assistant turn to train on")
    return out


def _check_order(msgs: list[dict[str, Any]], where: str) -> None:
    """A user turn comes before the first assistant turn: the model answers something."""
    roles = [m["role"] for m in msgs if m["role"] != "system"]
    if roles and roles[0] == "assistant":
        raise InputError(f"{where}: the conversation starts with an assistant turn; expected a user turn before it")


# --------------------------------------------------------------------------- conversations -> tokens

@dataclass(frozen=True, eq=False)
class CausalEncoded:
    """A tokenized causal-LM split, unpadded. Picklable.

    ``input_ids[i]`` (int32) has ``lengths[i]`` tokens; ``labels[i]`` (int64, the same length) is
    the token to learn at each position or -100 (no loss). ``truncated`` rows were cut to fit
    ``max_length``.
    """

    input_ids: list[np.ndarray]
    lengths: np.ndarray
    labels: list[np.ndarray]
    truncated: int
    starts: np.ndarray | None = None
    """Per row, the first token of its last trained turn: ``input_ids[i][:starts[i]]`` is the prompt a model
    answers at inference (None where not recorded)."""

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int, *,
                        where: str = "conversation") -> tuple[np.ndarray, np.ndarray, bool]:
    """One conversation (from :func:`to_messages`) as ``(input_ids int32, labels int64, truncated)``.

    See the module docstring for what is trained; :func:`encode_rows` does the same for many rows
    with batched tokenizer calls. Over ``max_length`` tokens, the oldest tokens go first (from the
    left) as long as the last assistant turn stays whole; only an assistant turn longer than
    ``max_length`` by itself loses its end (it is then all that is kept). ``truncated`` says
    whether anything was cut.
    """
    msgs = [dict(m) for m in messages]
    if _has_template(tokenizer):
        ids, labels, start = _templated([msgs], tokenizer, [where])[0]
    else:
        ids, labels, start = _plain([msgs], tokenizer, [where])[0]
    ids, labels, cut, _ = _fit(ids, labels, start, max_length)
    return ids, labels, cut


def encode_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int, *, prompt_column: str = "prompt",
                completion_column: str = "completion", messages_column: str = "messages",
                system_prompt: str | None = None, where: str = "data",
                positions: Sequence[str] | None = None) -> CausalEncoded:
    """A split's rows -> :class:`CausalEncoded` (in row order), as :func:`encode_conversation` does each.

    The format is detected once from the union of the rows' columns. Errors name ``where`` and the
    row: ``positions[i]`` (e.g. ``"line 8"`` of a JSONL file) when given, else ``"row {i + 1}"``.
    Without a chat template only plain prompt-completion rows without a system prompt are accepted.
    """
    rows = list(rows)
    if not rows:
        raise InputError(f"{where}: no rows")
    names = {"prompt_column": prompt_column, "completion_column": completion_column,
             "messages_column": messages_column}
    columns = dict.fromkeys(k for r in rows if isinstance(r, Mapping) for k in r)
    fmt = detect_format(columns, **names, where=where)
    templated = _has_template(tokenizer)
    if not templated and fmt != "prompt-completion":
        raise InputError(f"{where}: the tokenizer has no chat template to format {fmt} rows; "
                         f"give {prompt_column}/{completion_column} columns")
    if not templated and system_prompt is not None:
        raise InputError(f"{where}: a system prompt needs a chat template and the tokenizer has none")
    wheres = [f"{where}: {positions[i] if positions is not None else f'row {i + 1}'}" for i in range(len(rows))]
    convs = [to_messages(r, **names, system_prompt=system_prompt, fmt=fmt, where=w) for r, w in zip(rows, wheres)]
    return encode_conversations(convs, tokenizer, max_length, wheres)


def encode_conversations(convs: Sequence[Sequence[Mapping[str, Any]]], tokenizer: Any, max_length: int,
                         wheres: Sequence[str]) -> CausalEncoded:
    """Conversations (from :func:`to_messages`) -> :class:`CausalEncoded` with ``starts``, in order, tokenized
    in batched calls; ``wheres[i]`` starts row i's errors. What :func:`encode_rows` does after reading rows."""
    if not convs:
        raise InputError(f"{wheres[0] if wheres else 'data'}: no rows")
    encode = _templated if _has_template(tokenizer) else _plain
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    starts: list[int] = []
    cut = 0
    for c in range(0, len(convs), _CHUNK):
        chunk = [[dict(m) for m in conv] for conv in convs[c:c + _CHUNK]]
        for seq, lab, start in encode(chunk, tokenizer, list(wheres[c:c + _CHUNK])):
            seq, lab, was_cut, lo = _fit(seq, lab, start, max_length)
            ids.append(seq)
            labels.append(lab)
            starts.append(max(0, start - lo))
            cut += was_cut
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return CausalEncoded(ids, lengths, labels, cut, np.asarray(starts, dtype=np.int64))


def collate_causal(enc: CausalEncoded, idx: np.ndarray, pad_id: int, pad_to: int = 1) -> dict[str, torch.Tensor]:
    """One batch, right-padded to its longest sequence: ``input_ids``, ``attention_mask``, ``labels`` (B, T) int64.

    Padding has ``pad_id``, attention 0 and label -100; ``pad_to`` > 1 rounds T up to a multiple of it.
    """
    import torch

    lens = enc.lengths[idx]
    width = -(-int(lens.max()) // pad_to) * pad_to
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    labels = np.full((len(idx), width), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(idx):
        ids[row, :lens[row]] = enc.input_ids[i]
        labels[row, :lens[row]] = enc.labels[i]
    mask = (np.arange(width)[None, :] < lens[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


# --------------------------------------------------------------------------- internals

Encoding = tuple[np.ndarray, np.ndarray, int]  # ids, labels, first token of the last trained turn
Span = tuple[int, int, int, int]  # characters: turn start, content end, turn end; turn number (from 1)


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _fit(ids: np.ndarray, labels: np.ndarray, start: int,
         max_length: int) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """Cut to ``max_length``: from the left while the last trained turn (from ``start``) stays whole, else its end.
    Returns the kept ids and labels, whether anything was cut, and the first kept position."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    n = len(ids)
    if n <= max_length:
        lo, hi = 0, n
    elif n - start <= max_length:
        lo, hi = n - max_length, n
    else:
        lo, hi = start, start + max_length
    return ids[lo:hi].astype(np.int32), labels[lo:hi].astype(np.int64), (lo, hi) != (0, n), lo


def _plain(convs: list[list[dict[str, Any]]], tokenizer: Any, wheres: list[str]) -> list[Encoding]:
    """No chat template: ``tokenizer(prompt)`` + completion tokens + EOS, the loss on the last two.

    Prompt and completion are tokenized apart, as at inference (the model continues the prompt's tokens).
    """
    for msgs, where in zip(convs, wheres):
        if [m["role"] for m in msgs] != ["user", "assistant"]:
            what = "a system turn" if any(m["role"] == "system" for m in msgs) else f"{len(msgs)} turns"
            raise InputError(f"{where}: the tokenizer has no chat template to format {what}; "
                             f"give prompt/completion columns")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(f"{wheres[0]}: the tokenizer has no chat template and no EOS token to end a completion with")
    prompts = tokenizer([m[0]["content"] for m in convs], return_attention_mask=False)["input_ids"]
    answers = tokenizer([m[1]["content"] for m in convs], add_special_tokens=False,
                        return_attention_mask=False)["input_ids"]
    out: list[Encoding] = []
    for p, a in zip(prompts, answers):
        ids = np.asarray(list(p) + list(a) + [eos], dtype=np.int64)
        labels = ids.copy()
        labels[:len(p)] = IGNORE_INDEX
        out.append((ids, labels, len(p)))
    return out


def _templated(convs: list[list[dict[str, Any]]], tokenizer: Any, wheres: list[str]) -> list[Encoding]:
    """Render each conversation with the chat template, tokenize the renderings in one call, mask by spans."""
    rendered = [_spans(msgs, tokenizer, where) for msgs, where in zip(convs, wheres)]
    try:
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False)
    except (NotImplementedError, ValueError):
        enc = {}
    if "offset_mapping" not in enc:
        raise InputError(f"{wheres[0]}: the tokenizer gives no character offsets (not a fast tokenizer), so the "
                         f"assistant's tokens cannot be found")
    special = np.fromiter(_special_ids(tokenizer), dtype=np.int64)
    return [_mask(np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2), spans,
                  special, where)
            for ids, offsets, (_, spans), where in zip(enc["input_ids"], enc["offset_mapping"], rendered, wheres)]


def _special_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens: eos/bos/pad/... and every added token marked special (``<|im_end|>``)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def _render(tokenizer: Any, msgs: list[dict[str, Any]], generation: bool, where: str) -> str:
    from jinja2.exceptions import TemplateError

    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    try:
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=generation, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise InputError(f"{where}: the tokenizer's chat template refused the conversation ({e})") from None
    if not isinstance(text, str):
        raise InputError(f"{where}: the tokenizer's chat template rendered {type(text).__name__}, not text")
    return text


def _spans(msgs: list[dict[str, Any]], tokenizer: Any, where: str) -> tuple[str, list[Span]]:
    """The rendering and, per trained assistant turn, its (start, content end, turn end) characters and number.

    The rendering of the turns before assistant turn i with the generation prompt ends where the
    turn starts; that of the turns through i ends after it. Both must be prefixes of the whole
    rendering, else the template rewrites earlier turns (e.g. drops old reasoning) and the mask
    cannot be found. The content end is where the turn's content (stripped, for templates that
    trim) ends; the end-of-turn token is looked for from there.
    """
    full = _render(tokenizer, msgs, False, where)
    spans: list[Span] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not m.get("train", True):
            continue
        head = _render(tokenizer, msgs[:i], True, where)
        turn = full if i == len(msgs) - 1 else _render(tokenizer, msgs[:i + 1], False, where)
        if not (full.startswith(head) and full.startswith(turn) and len(head) < len(turn)):
            raise InputError(f"{where}: the tokenizer's chat template does not render the conversation up to turn "
                             f"{i + 1} (assistant) as the start of the whole conversation, so the assistant's "
                             f"tokens cannot be found; use a template that renders each turn once, in order")
        a, b = len(head), len(turn)
        content = m["content"]
        if full.startswith(content, a):
            end = a + len(content)
        else:                                   # a template that trims, or rewrites, the content
            pos = full.find(content.strip(), a, b)
            end = pos + len(content.strip()) if pos >= 0 else a
        spans.append((a, end, b, i + 1))
    return full, spans


def _mask(ids: np.ndarray, offsets: np.ndarray, spans: list[Span], special: np.ndarray,
          where: str) -> Encoding:
    """Labels = ids from each span's first token through its end-of-turn token; the sequence ends at the last.

    A span's first token is the first whose characters end after the span's start (a token across the
    boundary is trained); its end-of-turn token is the first special token that starts at or after the
    content's end and inside the turn (``<|im_end|>``, not ChatML's newline after it).
    """
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    is_special = np.isin(ids, special)
    if not spans:
        raise InputError(f"{where}: the conversation has no assistant turn to train on")
    first = last = -1
    for a, content_end, b, k in spans:
        inside = np.flatnonzero(ends > a)
        stop = np.flatnonzero(is_special & (starts >= content_end) & (starts < b))
        if not len(inside) or not len(stop):
            raise InputError(f"{where}: the tokenizer's chat template ends turn {k} (assistant) with no special "
                             f"(end-of-turn) token, so the model could not learn to stop")
        first, last = int(inside[0]), int(stop[0])
        labels[first:last + 1] = ids[first:last + 1]
    return ids[:last + 1], labels[:last + 1], first
