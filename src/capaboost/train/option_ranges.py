"""The allowed values of every numeric run option, in one table (``RunConfig.check_values`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MIN_SEQ_LEN = 8  # below this a sentence (pair) keeps hardly more than its special tokens


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: ``low``/``high`` bounds (None: unbounded), open or closed."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{text} ({self.note})" if self.note else text


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
# Every numeric option's range, in one place (``RunConfig.check_values``); tests/test_options.py checks that no
# numeric field is missing. None is always allowed where the field is Optional (it means "the default").
RANGES: dict[str, Range] = {
    "max_train_samples": AT_LEAST_1,
    "max_eval_samples": AT_LEAST_1,
    "max_seq_len": Range(MIN_SEQ_LEN, note="and at most the model's maximum length"),
    "doc_stride": AT_LEAST_1,
    "test_fraction": Range(0, 1, low_open=True, high_open=True),
    "image_size": AT_LEAST_1,
    "train_size": AT_LEAST_1,
    "val_size": AT_LEAST_1,
    "seed": Range(0, 2**32 - 1),
    "epochs": AT_LEAST_1,
    "max_steps": AT_LEAST_1,
    "lr": POSITIVE,
    "head_lr": POSITIVE,
    "weight_decay": Range(0),
    "warmup_ratio": Range(0, 1, note="a fraction of the steps"),
    "max_grad_norm": Range(0, note="0 turns clipping off"),
    "batch_size": AT_LEAST_1,
    "eval_batch_size": AT_LEAST_1,
    "d": AT_LEAST_1,
    "density": Range(0, 1, low_open=True),
    "mask_seed": Range(0, 2**63 - 1),
    "r": AT_LEAST_1,
    "alpha": POSITIVE,
    "dropout": Range(0, 1, high_open=True),
    "bottleneck": AT_LEAST_1,
    "num_virtual_tokens": AT_LEAST_1,
    "prefix_hidden": AT_LEAST_1,
    "threads": AT_LEAST_1,
    "save_steps": AT_LEAST_1,
    "eval_steps": AT_LEAST_1,
}
