"""Strategies and runs: the epoch loop, data parallelism, the pipeline, run configuration, run
directories and the paper's presets."""
