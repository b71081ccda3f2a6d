"""The fine-tuning runner: run options, the method and task classes, the loop, checkpoints, sweeps and reports."""
