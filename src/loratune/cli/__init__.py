"""The ``loratune`` command: one module per command group, each a thin shell over a library function.

Importing this package imports nothing else."""
