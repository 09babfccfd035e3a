"""YAML as people write it: ``lr: 1e-4`` is a number.

PyYAML follows YAML 1.1, where a float needs a dot, so ``1e-4`` and ``5E-5`` were read as strings and refused
("--lr: expected a number, got '1e-4'"). YAML 1.2 (and every other YAML reader people use: ruamel, Go, JS)
reads them as floats; so does this loader. Everything else is PyYAML's safe loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    """Quotes a string this loader would read as a number (the text '1e5' stays text on the way back)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                      |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                      |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                      |[-+]?\.(?:inf|Inf|INF)
                      |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
        list("-+0123456789."))


def load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats (``1e-4``, ``5E-5``, ``-2e3``)."""
    return yaml.load(text, Loader=_Loader)           # a SafeLoader subclass: no Python objects


def dump(data: Any, **kw: Any) -> str:
    """``yaml.safe_dump`` whose output :func:`load` reads back as it was (strings such as '1e5' quoted)."""
    return yaml.dump(data, Dumper=_Dumper, **kw)
