"""Dataclasses shared by every text task loader."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """One text (or text pair) with its label; ``label`` is a float for regression."""

    text: str
    text_pair: str | None
    label: int | float


@dataclass
class TaskData:
    """A task after the split protocol, ready for tokenization.

    ``extra_test`` holds additional labelled test sets (MNLI's
    ``test_mismatched``) that are evaluated like ``test`` but never used for
    model selection.
    """

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    num_labels: int
    is_regression: bool
    label_names: list[str] | None
    metric_names: list[str]
    main_metric: str
    protocol: str = "dev"
    seed: int = 0
    extra_test: dict[str, list[Example]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Split sizes, handy for logs and sanity checks."""
        out = {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}
        out.update({k: len(v) for k, v in self.extra_test.items()})
        return out
