"""The hyperparameter search: the space and the trials table (no Ray), and the Ray Tune driver.

Importing this package imports nothing else. Ray pickles a search's callback and Optuna space into the
search's state; searches started before the package had folders named them ``loratune.search.LiveView`` /
``loratune.search.OptunaSpace``, so those names still resolve (lazily, from the driver) for their resume.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("LiveView", "OptunaSpace"):
        from loratune.search import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'loratune.search' has no attribute {name!r}")
