"""The LoRA method itself: the layer, injection into a model (targets, presets, the trainable set), PEFT-format
adapter files, merge / switch / per-row routing. Knows nothing of training, data or tasks.

Importing this package imports nothing else."""
