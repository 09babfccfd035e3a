"""The hyperparameter search: the space and the trials table (no Ray), and the Ray Tune driver.

Importing this package imports nothing else."""
