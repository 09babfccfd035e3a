"""loratune: LoRA fine-tuning of pretrained transformers and LoRA hyperparameter search on Ray Tune.

The library functions behind the CLI commands::

    loratune.train(rank=4, epochs=1, out="runs/x")        # loratune train
    loratune.tune(samples=8, max_epochs=3, out="runs/s")  # loratune tune (Ray Tune, ASHA)
    loratune.evaluate(adapter_dir, split="test")          # loratune eval
    loratune.predict(adapter_dir, ["a fine film"])        # loratune predict
    loratune.generate(adapter_dir, ["Name a colour."])    # loratune generate (a causal-LM adapter)
    loratune.merge(adapter_dir, out_dir)                  # loratune merge
    loratune.info("minilm-l6", targets="qv", rank=8)      # loratune info
    loratune.serve(adapters={"a": "runs/x/adapter"})      # loratune serve (HTTP, vLLM's routes)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "train": ("training.loop", "train"),
    "tune": ("search.driver", "tune"),
    "TrainConfig": ("training.options", "TrainConfig"),
    "Levers": ("training.levers", "Levers"),
    "InputError": ("errors", "InputError"),
    "evaluate": ("infer.inference", "evaluate_adapter"),
    "predict": ("infer.inference", "predict"),
    "generate": ("infer.generate", "generate"),
    "merge": ("infer.inference", "merge_export"),
    "info": ("infer.inference", "info"),
    "LoraLinear": ("core.lora", "LoraLinear"),
    "LoraSpec": ("core.inject", "LoraSpec"),
    "inject": ("core.inject", "inject"),
    "load_adapter": ("core.adapters", "load_adapter"),
    "save_adapter": ("core.adapters", "save_adapter"),
}


def __getattr__(name: str) -> Any:
    """Import on first use: ``import loratune`` stays fast (no torch until needed)."""
    if name == "serve":                                   # a callable package (loratune/serve/__init__.py)
        import importlib

        return importlib.import_module(".serve", __name__)
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loratune' has no attribute {name!r}")


__all__ = [*_LAZY, "serve"]
