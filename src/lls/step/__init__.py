"""The training step and how it is issued: the trainer, the graph engine, the low-memory step and
the optimizers (including the capturable schedule-free AdamW)."""
