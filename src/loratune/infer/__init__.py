"""Using a trained adapter: load it onto its base, evaluate, predict, merge-export, parameter report.

Importing this package imports nothing else."""
