"""Sweeps over tasks x methods x settings x seeds, their paper-style report, and the offline demo."""
