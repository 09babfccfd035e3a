"""loratune: LoRA fine-tuning of pretrained transformers and LoRA hyperparameter search on Ray Tune."""

from __future__ import annotations

__version__ = "0.1.0"
