"""``python -m loratune``: the same CLI as the ``loratune`` command."""

import sys

from loratune.cli.main import run

sys.exit(run())
