"""Config fields shared by every CapaBoost method (LoRA, adapters, prefix): what builds the masks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from peft.utils.other import get_pattern_key

from .masks import GENERATOR_VERSION, MaskSpec


@dataclass
class MaskedParallelConfig:
    """Mixin for a PEFT config: d masked copies of density s, regenerated from ``mask_seed``.

    Only these fields (plus module names and shapes) determine the masks, so a checkpoint stores them
    and never the masks. ``copies_pattern``/``density_pattern`` map module-name regexes to per-module
    values, like PEFT's ``rank_pattern``.
    """

    num_copies: int = field(default=2, metadata={"help": "d: parallel masked copies sharing one weight (>= 1)."})
    mask_density: float = field(default=0.5, metadata={"help": "s: fraction of entries each copy keeps, in (0, 1]."})
    mask_seed: int = field(default=0, metadata={"help": "Seed of the counter-based mask generator."})
    mask_pattern: str = field(default="random", metadata={"help": "'random' (exact count) or 'N:M', e.g. '2:4'."})
    mask_mode: str = field(
        default="diff",
        metadata={"help": "'diff' (distinct masks), 'same' (one mask for all copies), 'dropout' (fresh each step)."},
    )
    copies_pattern: dict = field(default_factory=dict, metadata={"help": "Module regex -> num_copies."})
    density_pattern: dict = field(default_factory=dict, metadata={"help": "Module regex -> mask_density."})
    generator_version: int = field(
        default=GENERATOR_VERSION, metadata={"help": "Mask generator version; a mismatch refuses to load."}
    )
    mask_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "Digest of all masks, written on save and checked on load."}
    )

    def _validate_masks(self) -> None:
        if self.generator_version != GENERATOR_VERSION:
            raise ValueError(
                f"This checkpoint's masks were made by mask generator version {self.generator_version}, but this "
                f"capaboost has version {GENERATOR_VERSION}: its masks would differ and the outputs would be wrong. "
                f"Install the capaboost release with generator version {self.generator_version}."
            )
        self.mask_spec(None)  # validates the global fields
        for pattern, value in {**self.copies_pattern, **self.density_pattern}.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"copies_pattern/density_pattern key {pattern!r} is not a valid regex: {err}") from err
        for pattern in self.copies_pattern:
            self._spec(self.copies_pattern[pattern], self.density_pattern.get(pattern, self.mask_density))
        for pattern in self.density_pattern:
            self._spec(self.copies_pattern.get(pattern, self.num_copies), self.density_pattern[pattern])

    def _spec(self, num_copies: int, density: float) -> MaskSpec:
        return MaskSpec(
            num_copies=num_copies, density=density, pattern=self.mask_pattern, mode=self.mask_mode, seed=self.mask_seed
        )

    def mask_spec(self, key: Optional[str]) -> MaskSpec:
        """The MaskSpec of the module called ``key`` (None: the global one)."""
        copies, density = self.num_copies, self.mask_density
        if key is not None:
            if self.copies_pattern:
                copies = self.copies_pattern.get(get_pattern_key(self.copies_pattern.keys(), key), copies)
            if self.density_pattern:
                density = self.density_pattern.get(get_pattern_key(self.density_pattern.keys(), key), density)
        return self._spec(copies, density)
