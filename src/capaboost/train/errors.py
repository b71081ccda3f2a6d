"""The run layer's error type, in a module of its own so that every ``train`` module can raise it
without importing ``run_config`` (which reads the method and task tables)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A run option is missing, unknown or out of range; the message names the option and the fix."""
