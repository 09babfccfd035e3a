"""``python -m loratune``: the same CLI as the ``loratune`` command."""

import sys

from loratune.cli.main import main

sys.exit(main())
