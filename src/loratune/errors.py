"""The one exception type that means "the user gave us something wrong".

The CLI turns an :class:`InputError` into exit code 2 and one line on stderr; anything else is
an internal error (exit 1). Messages name the field or file and what is wrong with it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a flag, a file, a column, an adapter folder. The message is shown as is."""
