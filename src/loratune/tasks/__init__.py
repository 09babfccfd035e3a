"""What differs per task: data formatting (tokens), batching, the forward pass without gradients, metrics.

Importing this package imports nothing else."""
