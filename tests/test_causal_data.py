"""Causal-LM data (tasks/causal.py): row formats, chat-template loss masks, truncation, collation.

The tokenizers are built here (no downloads): a byte-level BPE and a word-level one with ChatML's
special tokens and SmolLM2-Instruct's chat template (default system turn included), and a
GPT-2-style byte-level BPE without a template.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from loratune.errors import InputError
from loratune.tasks.batches import batch_order
from loratune.tasks.causal import (
    IGNORE_INDEX,
    CausalEncoded,
    collate_causal,
    detect_format,
    encode_conversation,
    encode_rows,
    to_messages,
)

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-Instruct's template: ChatML, with a default system turn when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Name three primary colours. Red, yellow and blue.",
    "Translate to German: good morning. Guten Morgen!",
    "And of Italy? Rome, of course.",
    "You are a terse assistant. Answer in one word.",
    DEFAULT_SYSTEM + ". Give three tips for staying healthy.\n\n1. Eat well.",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def _words(specials: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for text in CORPUS + ["system user assistant x y"] for w in re.findall(r"\w+|[^\w\s]+", text)})
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return tok


def chat_tokenizer(kind: str = "bpe", eos: str = "<|im_end|>", template: str = SMOLLM2_TEMPLATE):
    """SmolLM2-Instruct's special tokens (bos <|im_start|>, eos and pad <|im_end|>) and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = (_bpe if kind == "bpe" else _words)(CHATML_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token=eos,
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def chatml():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def gpt2():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert not tok.chat_template
    return tok


def runs(ids: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """The trained stretches of a sequence (labels != -100), each as its token ids."""
    on = labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.r_[0, on.astype(int), 0]))
    return [ids[a:b] for a, b in zip(edges[::2], edges[1::2])]


def text(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_labels(ids: np.ndarray, labels: np.ndarray) -> None:
    assert ids.dtype == np.int32 and labels.dtype == np.int64 and ids.shape == labels.shape
    on = labels != IGNORE_INDEX
    assert on.any() and (labels[on] == ids[on]).all()


# --------------------------------------------------------------------------- rows -> conversations

ROWS = {
    "prompt-completion": ({"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
                          ["The capital of France is Paris."]),
    "messages": ({"messages": [{"role": "user", "content": "What is the capital of France?"},
                               {"role": "assistant", "content": "Paris."},
                               {"role": "user", "content": "And of Italy?"},
                               {"role": "assistant", "content": "Rome, of course."}]},
                 ["Paris.", "Rome, of course."]),
    "alpaca": ({"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
               ["1. Eat well."]),
}


def test_formats_are_told_apart_by_their_columns() -> None:
    assert detect_format(["prompt", "completion", "id"]) == "prompt-completion"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["prompt", "prompt_id", "messages"]) == "messages"      # UltraChat's columns
    assert detect_format(["q", "a"], prompt_column="q", completion_column="a") == "prompt-completion"
    with pytest.raises(InputError, match=r"^train.jsonl: no known conversation format in columns \['text', 'label'\]; "
                                         r"expected 'messages', or 'prompt' and 'completion', or 'instruction' and "
                                         r"'output' \(Alpaca\)$"):
        detect_format(["text", "label"], where="train.jsonl")


def test_rows_become_conversations() -> None:
    assert to_messages({"prompt": "Hi", "completion": "Hello!"}) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert to_messages({"instruction": "Translate to German: good morning.", "input": "x", "output": "Guten Morgen!"}) == [
        {"role": "user", "content": "Translate to German: good morning.\n\nx"},
        {"role": "assistant", "content": "Guten Morgen!"}]
    for empty in ("", None, float("nan")):     # no input (a CSV's empty cell, a Parquet null)
        assert to_messages({"instruction": "Do it.", "input": empty, "output": "Done."})[0]["content"] == "Do it."
    assert to_messages({"instruction": "Do it.", "output": "Done."})[0]["content"] == "Do it."
    msgs = ROWS["messages"][0]["messages"]
    assert to_messages({"messages": msgs}) == msgs
    assert to_messages({"messages": np.array(msgs, dtype=object)}) == msgs         # Parquet through pandas


def test_a_system_prompt_is_added_only_where_there_is_none() -> None:
    out = to_messages({"prompt": "Hi", "completion": "Hello!"}, system_prompt="Be brief.")
    assert out[0] == {"role": "system", "content": "Be brief."} and len(out) == 3
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello!"}]
    assert to_messages({"messages": own}, system_prompt="Be brief.") == own


def test_conversational_prompt_completion_trains_the_completion_only(chatml) -> None:
    row = {"prompt": [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris."},
                      {"role": "user", "content": "And of Italy?"}],
           "completion": [{"role": "assistant", "content": "Rome, of course."}]}
    msgs = to_messages(row)
    assert [m.get("train", True) for m in msgs] == [True, False, True, True]
    ids, labels, _ = encode_conversation(msgs, chatml, 512)
    assert [text(chatml, r) for r in runs(ids, labels)] == ["Rome, of course.<|im_end|>"]
    assert "Paris.<|im_end|>" in text(chatml, ids)


# --------------------------------------------------------------------------- loss masks with a chat template

@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_the_loss_covers_each_assistant_turn_and_its_end_of_turn_token(chatml, fmt) -> None:
    row, answers = ROWS[fmt]
    ids, labels, truncated = encode_conversation(to_messages(row), chatml, 512)
    check_labels(ids, labels)
    assert not truncated
    assert [text(chatml, r) for r in runs(ids, labels)] == [a + "<|im_end|>" for a in answers]
    whole = text(chatml, ids)
    assert whole.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == end and labels[-1] == end                  # ends at the last trained token: no "\n"
    assert (ids == end).sum() == whole.count("<|im_start|>")     # one <|im_end|> per turn: no second EOS
    rendered = chatml.apply_chat_template(to_messages(row), tokenize=False)
    assert rendered == whole + "\n"                               # exactly the template's tokens


def test_word_level_tokens_mask_the_same_way() -> None:
    tok = chat_tokenizer("words")
    row, answers = ROWS["messages"]
    ids, labels, _ = encode_conversation(to_messages(row), tok, 512)
    check_labels(ids, labels)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [r.tolist() for r in runs(ids, labels)] == [tok(a, add_special_tokens=False)["input_ids"] + [end]
                                                       for a in answers]


def test_an_end_of_turn_token_that_is_not_eos_ends_the_span_and_no_eos_is_added() -> None:
    tok = chat_tokenizer(eos="<|endoftext|>")
    ids, labels, _ = encode_conversation(to_messages(ROWS["prompt-completion"][0]), tok, 512)
    assert [text(tok, r) for r in runs(ids, labels)] == ["The capital of France is Paris.<|im_end|>"]
    assert tok.eos_token_id not in ids.tolist()


def test_a_given_system_prompt_replaces_the_templates_default(chatml) -> None:
    msgs = to_messages(ROWS["alpaca"][0], system_prompt="You are a terse assistant.")
    ids, labels, _ = encode_conversation(msgs, chatml, 512)
    assert text(chatml, ids).startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user")
    assert DEFAULT_SYSTEM not in text(chatml, ids)
    assert [text(chatml, r) for r in runs(ids, labels)] == ["1. Eat well.<|im_end|>"]


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_offsets_trimmed_or_not_give_the_same_mask(trim_offsets) -> None:
    from tokenizers import processors

    tok = chat_tokenizer()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)   # as GPT-2-family files
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Paris.\n\n"}]
    ids, labels, _ = encode_conversation(msgs, tok, 512)
    assert [text(tok, r) for r in runs(ids, labels)] == ["  Paris.\n\n<|im_end|>"]


def test_a_template_that_trims_content_still_masks_the_answer() -> None:
    tok = chat_tokenizer(template=SMOLLM2_TEMPLATE.replace("message['content']", "(message['content'] | trim)"))
    msgs = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "  Red, yellow and blue. \n"}]
    ids, labels, _ = encode_conversation(msgs, tok, 512)
    assert [text(tok, r) for r in runs(ids, labels)] == ["Red, yellow and blue.<|im_end|>"]


def test_templates_the_mask_cannot_be_found_in_are_refused() -> None:
    rewrites = chat_tokenizer(template=SMOLLM2_TEMPLATE.replace(    # marks the last turn: earlier renderings differ
        "message['content'] + '<|im_end|>'", "message['content'] + ('!' if loop.last else '') + '<|im_end|>'"))
    with pytest.raises(InputError, match=r"^row 3: the tokenizer's chat template does not render the conversation up "
                                         r"to turn 2 \(assistant\) as the start"):
        encode_conversation(to_messages(ROWS["prompt-completion"][0]), rewrites, 512, where="row 3")
    plain_end = chat_tokenizer(template=SMOLLM2_TEMPLATE.replace("'<|im_end|>' + '\n'", "'\n\n'"))
    with pytest.raises(InputError, match=r"^row 3: the tokenizer's chat template ends turn 2 \(assistant\) with no "
                                         r"special \(end-of-turn\) token"):
        encode_conversation(to_messages(ROWS["prompt-completion"][0]), plain_end, 512, where="row 3")
    strict = chat_tokenizer(template="{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(InputError, match=r"^row 3: the tokenizer's chat template refused the conversation "
                                         r"\(Conversation roles must alternate\)$"):
        encode_conversation(to_messages(ROWS["prompt-completion"][0]), strict, 512, where="row 3")


def test_a_tokenizer_without_offsets_is_refused(chatml) -> None:
    class Slow:                                   # a Python tokenizer: a template, but no offsets
        chat_template = chatml.chat_template
        apply_chat_template = staticmethod(chatml.apply_chat_template)

        def __call__(self, texts, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(InputError, match=r"^row 1: the tokenizer gives no character offsets \(not a fast tokenizer\)"):
        encode_conversation(to_messages(ROWS["alpaca"][0]), Slow(), 64, where="row 1")


# --------------------------------------------------------------------------- without a chat template

def test_without_a_template_the_loss_covers_the_completion_and_eos(gpt2) -> None:
    row = {"prompt": "Translate to German: good morning.", "completion": " Guten Morgen!"}
    ids, labels, truncated = encode_conversation(to_messages(row), gpt2, 512)
    check_labels(ids, labels)
    prompt = gpt2(row["prompt"])["input_ids"]
    assert ids.tolist() == prompt + gpt2(row["completion"], add_special_tokens=False)["input_ids"] + [gpt2.eos_token_id]
    assert (labels[:len(prompt)] == IGNORE_INDEX).all()
    assert [text(gpt2, r) for r in runs(ids, labels)] == [" Guten Morgen!<|endoftext|>"]
    assert (ids == gpt2.eos_token_id).sum() == 1 and not truncated


def test_without_a_template_only_prompt_completion_rows_are_formatted(gpt2) -> None:
    with pytest.raises(InputError, match=r"^train.jsonl: the tokenizer has no chat template to format messages rows; "
                                         r"give prompt/completion columns$"):
        encode_rows([ROWS["messages"][0]], gpt2, 64, where="train.jsonl")
    with pytest.raises(InputError, match=r"^train.jsonl: a system prompt needs a chat template"):
        encode_rows([ROWS["prompt-completion"][0]], gpt2, 64, system_prompt="Be brief.", where="train.jsonl")
    with pytest.raises(InputError, match=r"^row 1: the tokenizer has no chat template to format 4 turns; "
                                         r"give prompt/completion columns$"):
        encode_conversation(to_messages(ROWS["messages"][0]), gpt2, 64, where="row 1")


# --------------------------------------------------------------------------- truncation

def test_truncation_drops_the_oldest_prompt_tokens_and_keeps_the_answer(chatml) -> None:
    msgs = to_messages(ROWS["messages"][0])
    full_ids, full_labels, _ = encode_conversation(msgs, chatml, 10_000)
    last = runs(full_ids, full_labels)[-1]
    keep = len(last) + 3
    ids, labels, truncated = encode_conversation(msgs, chatml, keep)
    assert truncated and len(ids) == keep
    assert ids.tolist() == full_ids[-keep:].tolist() and labels.tolist() == full_labels[-keep:].tolist()
    assert text(chatml, runs(ids, labels)[-1]) == "Rome, of course.<|im_end|>"
    assert (labels[:3] == IGNORE_INDEX).all() and "<|im_start|>assistant\n".endswith(text(chatml, ids[:3]))


def test_an_answer_longer_than_max_length_alone_loses_its_end(chatml, gpt2) -> None:
    answer = "Red, yellow and blue. " * 20
    row = {"prompt": "Name three primary colours.", "completion": answer}
    ids, labels, truncated = encode_conversation(to_messages(row), chatml, 16)
    assert truncated and len(ids) == 16 and (labels == ids).all()
    assert answer.startswith(text(chatml, ids))
    ids, labels, truncated = encode_conversation(to_messages(row), gpt2, 16)
    assert truncated and len(ids) == 16 and (labels == ids).all() and answer.startswith(text(gpt2, ids))


def test_encode_rows_counts_the_cut_rows(chatml) -> None:
    short = {"prompt": "Hi", "completion": "Paris."}
    long = {"prompt": "What is the capital of France? " * 10, "completion": "Paris."}
    fits = len(encode_conversation(to_messages(short), chatml, 10_000)[0]) + 5
    enc = encode_rows([short, long, short], chatml, fits)
    assert enc.truncated == 1 and len(enc) == 3 and enc.lengths.dtype == np.int64
    assert enc.lengths.tolist() == [len(x) for x in enc.input_ids] == [fits - 5, fits, fits - 5]
    for ids, labels in zip(enc.input_ids, enc.labels):
        check_labels(ids, labels)
        assert [text(chatml, r) for r in runs(ids, labels)] == ["Paris.<|im_end|>"]


# --------------------------------------------------------------------------- bad rows

PC, MS, AL = "prompt-completion", "messages", "alpaca"
BAD = [  # (format of the good row 1 beside it, bad row 2, the message)
    (PC, {"prompt": "Hi"}, "missing column 'completion'"),
    (PC, {"prompt": "Hi", "completion": " "}, "column 'completion' is empty"),
    (PC, {"prompt": "Hi", "completion": None}, "column 'completion' is empty"),
    (PC, {"prompt": "Hi", "completion": 3}, "column 'completion' is not a string but int 3"),
    (PC, {"prompt": "", "completion": "Hello"}, "column 'prompt' is empty"),
    (AL, {"instruction": "Do it.", "output": ""}, "column 'output' is empty"),
    (AL, {"input": "x", "output": "Done."}, "missing column 'instruction'"),
    (MS, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
     "column 'messages': turn 2 (assistant) is empty"),
    (MS, {"messages": [{"role": "user", "content": "Hi"}]}, "column 'messages' has no assistant turn to train on"),
    (MS, {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     "column 'messages': turn 1 has role 'human'; expected one of system, user, assistant"),
    (MS, {"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}]},
     "column 'messages': turn 1 (user) has content that is not a string but list"),
    (MS, {"messages": [{"role": "user"}, {"role": "assistant", "content": "Yo"}]},
     "column 'messages': turn 1 is not a {'role', 'content'} record"),
    (MS, {"messages": "Hi"}, "column 'messages' is not a list of turns but str"),
    (MS, {"text": "Hi"}, "missing column 'messages'"),
    (MS, {"messages": [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Hi"}]},
     "the conversation starts with an assistant turn; expected a user turn before it"),
    (PC, {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Yo"},
     "columns 'prompt' and 'completion' must both be strings or both lists of turns"),
    (PC, {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "a"}] * 2},
     "column 'completion' has 2 turns; expected one assistant turn"),
    (PC, {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "user", "content": "a"}]},
     "column 'completion' has no assistant turn to train on"),
]


@pytest.mark.parametrize(("fmt", "bad", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_rows_are_named(chatml, fmt, bad, message) -> None:
    with pytest.raises(InputError, match=r"^train\.jsonl: row 2: " + re.escape(message)):
        encode_rows([ROWS[fmt][0], bad], chatml, 64, where="train.jsonl")


def test_rows_are_named_by_their_positions(chatml) -> None:
    bad = {"prompt": "Hi", "completion": ""}
    with pytest.raises(InputError, match=r"^--data: train\.jsonl: line 9: column 'completion' is empty$"):
        encode_rows([ROWS["prompt-completion"][0], bad], chatml, 64, where="--data: train.jsonl",
                    positions=["line 8", "line 9"])
    with pytest.raises(InputError, match=r"^--data: x\.jsonl: no rows$"):
        encode_rows([], chatml, 64, where="--data: x.jsonl")


# --------------------------------------------------------------------------- batches

def test_collate_pads_right_with_minus_100_labels_and_no_attention(chatml) -> None:
    msgs = ROWS["messages"][0]["messages"]
    rows = [{"messages": msgs[:2]}, {"messages": msgs}, {"messages": msgs[2:]}]
    enc = pickle.loads(pickle.dumps(encode_rows(rows, chatml, 512)))
    assert isinstance(enc, CausalEncoded) and len(enc) == 3
    order = batch_order(enc.lengths, 2, bucket=True, shuffle=True, seed=0, epoch=0)
    assert sorted(np.concatenate(order).tolist()) == [0, 1, 2]
    pad = chatml.pad_token_id
    b = collate_causal(enc, np.array([0, 2, 1]), pad, pad_to=8)
    width = -(-int(enc.lengths.max()) // 8) * 8
    assert {k: tuple(v.shape) for k, v in b.items()} == {k: (3, width) for k in ("input_ids", "attention_mask", "labels")}
    assert all(str(v.dtype) == "torch.int64" for v in b.values())
    for row, i in enumerate([0, 2, 1]):
        n = int(enc.lengths[i])
        assert b["input_ids"][row, :n].tolist() == enc.input_ids[i].tolist()
        assert b["labels"][row, :n].tolist() == enc.labels[i].tolist()
        assert (b["attention_mask"][row, :n] == 1).all() and (b["attention_mask"][row, n:] == 0).all()
        assert (b["labels"][row, n:] == IGNORE_INDEX).all() and (b["input_ids"][row, n:] == pad).all()


@pytest.mark.parametrize(("line", "fields"), [("What is 2+2?,Four, definitely", 3), ("only a prompt", 1)])
def test_a_csv_row_with_more_or_fewer_fields_than_its_header_is_refused(tmp_path, line, fields) -> None:
    # csv.DictReader put the extra text under None (dropped: "Four, definitely" became "Four") or filled None in
    from loratune.training.causal_data import _file_records

    f = tmp_path / "qa.csv"
    f.write_text(f"prompt,completion\nHi,Hello\n{line}\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"line 3 has {fields} fields but the header has 2 \(an unquoted ','"):
        _file_records(str(f), "--data")
    f.write_text('prompt,completion\nHi,Hello\n"What is 2+2?","Four, definitely"\n', encoding="utf-8")
    rows, _ = _file_records(str(f), "--data")
    assert rows[1] == {"prompt": "What is 2+2?", "completion": "Four, definitely"}


# --------------------------------------------------------------------------- data files (training/causal_data.py, detect.py)

def test_a_stray_quote_in_a_causal_csv_is_refused_not_merged_into_one_row(tmp_path) -> None:
    # csv's strict=False read the four data lines as one row: the prompt ran from line 2's quote to line 5's
    from loratune.training.causal_data import _file_records

    f = tmp_path / "qa.csv"
    f.write_text('prompt,completion\n"unclosed,yes\nq2,no\nq3,yes\nsay "hi" there,no\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"^--data: \S+qa\.csv: line 5: not valid CSV \(.*\); the row starts on "
                                         r"line 2 \(an unclosed '\"'\?\)$"):
        _file_records(str(f), "--data")
    f.write_text('prompt,completion\n"a, quoted comma","doubled ""quotes"""\n"two\nlines",say "hi" as is\n',
                 encoding="utf-8")
    assert _file_records(str(f), "--data")[0] == [{"prompt": "a, quoted comma", "completion": 'doubled "quotes"'},
                                                  {"prompt": "two\nlines", "completion": 'say "hi" as is'}]


def test_a_causal_text_longer_than_csvs_default_field_limit_reads(tmp_path) -> None:
    from loratune.training.causal_data import _file_records

    long = "lorem ipsum " * 12_000                                 # 144,000 characters: over csv's 131,072
    f = tmp_path / "qa.csv"
    f.write_text(f'prompt,completion\n"{long}",yes\nq2,no\n', encoding="utf-8")
    assert [r["prompt"] for r in _file_records(str(f), "--data")[0]] == [long, "q2"]


def test_task_auto_reads_a_first_jsonl_record_longer_than_a_mebibyte(tmp_path) -> None:
    import json

    from loratune.training.detect import peek_columns

    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"prompt": "Summarize: " + "lorem ipsum " * 90_000, "completion": "a summary"}) + "\n"
                 + json.dumps({"prompt": "q", "completion": "yes"}) + "\n", encoding="utf-8")
    assert f.stat().st_size > 1 << 20
    assert peek_columns(str(f)) == ("prompt", "completion")


@pytest.mark.parametrize(("name", "body"), [("h.csv", "prompt,completion\n"), ("e.json", "[]\n"), ("p.parquet", None)])
def test_empty_causal_data_names_the_flag_and_the_file(tmp_path, name, body) -> None:
    from loratune.training.causal_data import load_causal_splits
    from loratune.training.options import TrainConfig

    f = tmp_path / name
    good = tmp_path / "good.jsonl"
    good.write_text("".join(f'{{"prompt": "q{i}", "completion": "{"yes" if i % 2 else "no"}"}}\n' for i in range(40)))
    if body is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}), f)
    else:
        f.write_text(body, encoding="utf-8")
    for flag, kw in (("--data", {"data": str(f)}),
                     ("--validation-file", {"data": str(good), "validation_file": str(f)}),
                     ("--test-file", {"data": str(good), "test_file": str(f)})):
        with pytest.raises(InputError, match=rf"^{flag}: {re.escape(str(f))}: no rows$"):
            load_causal_splits(TrainConfig(task="causal-lm", **kw))


def test_causal_csv_blank_lines_are_skipped_as_the_classifiers_are(tmp_path) -> None:
    # a leading blank line was taken as an empty header; a whitespace-only line as a row of 1 field
    from loratune.training.causal_data import _file_records

    f = tmp_path / "qa.csv"
    f.write_text('\n\r\n  \nprompt,completion\nq1,yes\n   \n\t\n,\nq2,no\n\n', encoding="utf-8")
    rows, wheres = _file_records(str(f), "--data")
    assert rows == [{"prompt": "q1", "completion": "yes"}, {"prompt": "q2", "completion": "no"}]
    assert [w.rsplit(": ", 1)[1] for w in wheres] == ["line 5", "line 9"]

