"""One training run: options, data sources and splits, models, the loop and its state, checkpoints, speed
levers, the run directory.

Importing this package imports nothing else."""
