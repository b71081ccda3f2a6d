"""A run's output folder: its lock, its identity (``run.json``, checked by ``--resume``) and its checkpoint."""
