"""``python -m loratune``: the same CLI as the ``loratune`` command."""

import sys

from .cli import main

sys.exit(main())
