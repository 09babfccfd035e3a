"""Serving many adapters on one base: the ASGI app, the mixed-adapter batcher, the server (``loratune serve``).

``loratune.serve`` is both this package and the library function behind ``loratune serve``: the package is
callable, ``loratune.serve(adapters={"a": DIR}, port=8000)`` runs :func:`loratune.serve.server.serve`, whichever
was imported first.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> int:
        from loratune.serve.server import serve

        return serve(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
