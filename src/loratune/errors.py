"""The exceptions the CLI turns into exit codes: bad input (2), a diverged run (1), an interrupted one (130).

The CLI turns an :class:`InputError` into exit code 2 and one line on stderr; anything else is
an internal error (exit 1). Messages name the field or file and what is wrong with it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a flag, a file, a column, an adapter folder. The message is shown as is."""


class Diverged(RuntimeError):
    """The training or validation loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, what: str = "loss") -> None:
        super().__init__(f"training diverged at step {step}: {what} is {loss}; try a lower --lr")
        self.step, self.loss = step, loss


class Interrupted(Exception):
    """SIGINT/SIGTERM: the current step ended and a checkpoint was written."""
