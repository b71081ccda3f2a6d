"""Where each adapter style sits, per architecture: one table instead of string tests spread around.

A :class:`Placement` names, relative to one transformer layer, the module whose output each adapter
reads or extends. The wrapped module's output ``out`` becomes

* ``pfeiffer``: ``out + adapter(out)`` at the FFN site (Pfeiffer et al. 2021: one adapter per layer);
* ``houlsby``: ``out + adapter(out)`` at the attention site and at the FFN site (Houlsby et al. 2019);
* ``parallel``: ``out + s * adapter(x_ffn)`` at the FFN site, ``x_ffn`` the FFN block's input (He et al. 2021).

Sites per architecture (``L`` = one layer; the adapter always acts before the layer's residual add
and, for post-LN models, before its LayerNorm, as in Houlsby/Pfeiffer):

=========================== ================== ====================== ===============================
model_type                  attention site     FFN site               parallel adapter reads
=========================== ================== ====================== ===============================
bert, roberta, xlm-roberta, ``L.attention.     ``L.output.dense``     input of ``L.intermediate``
deberta-v2 (DeBERTa-v3)     output.dense``     (before dropout + LN)
vit                         ``L.attention.     ``L.mlp``              input of ``L.mlp``
                            o_proj``
gpt2                        ``L.attn.c_proj``  ``L.mlp``              input of ``L.mlp``
llama, mistral, qwen2       ``L.self_attn.     ``L.mlp``              input of ``L.mlp``
                            o_proj``
=========================== ================== ====================== ===============================

Any other architecture: pass ``adapter_placement={"layers": ..., "attn": ..., "ffn": ..., "ffn_in": ...}``
(``layers`` a regex of one layer's module name, the others module paths relative to it).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional

STYLES = ("pfeiffer", "houlsby", "parallel")
_SITES = {"pfeiffer": ("ffn",), "houlsby": ("attn", "ffn"), "parallel": ("ffn",)}


class UnknownArchitectureError(ValueError):
    """No placement is known for this model_type and none was given."""


@dataclass(frozen=True)
class Placement:
    """Adapter sites of one architecture; ``ffn_in`` only when the FFN site is not the whole FFN block."""

    layers: str
    attn: str
    ffn: str
    ffn_in: Optional[str] = None

    @classmethod
    def from_dict(cls, value: dict, style: str) -> "Placement":
        known = {"layers", "attn", "ffn", "ffn_in"}
        needed = {"layers", *_SITES[style]}
        if not isinstance(value, dict) or set(value) - known or needed - set(value):
            raise ValueError(
                f"adapter_placement={value!r} is malformed: style {style!r} needs the keys {sorted(needed)} "
                f"(allowed: {sorted(known)}), e.g. {{'layers': r'encoder\\.layer\\.\\d+', "
                "'attn': 'attention.output.dense', 'ffn': 'output.dense', 'ffn_in': 'intermediate'}."
            )
        try:
            re.compile(value["layers"])
        except re.error as err:
            raise ValueError(f"adapter_placement['layers']={value['layers']!r} is not a valid regex: {err}") from err
        return cls(value["layers"], value.get("attn", ""), value["ffn"], value.get("ffn_in"))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}

    def _pattern(self, site: str) -> str:
        return rf"(?:.*\.)?(?:{self.layers})\.{re.escape(getattr(self, site))}"

    def target_regex(self, style: str) -> str:
        """The ``target_modules`` regex (full match, as PEFT applies it) of ``style``'s sites."""
        return "|".join(f"(?:{self._pattern(site)})" for site in _SITES[style])

    def ffn_input_key(self, ffn_key: str) -> Optional[str]:
        """Name of the module whose input feeds a parallel adapter at ``ffn_key`` (None: the wrapped one)."""
        if not self.ffn_in or self.ffn_in == self.ffn:
            return None
        return ffn_key[: -len(self.ffn)] + self.ffn_in


_ENCODER = Placement(r"encoder\.layer\.\d+", "attention.output.dense", "output.dense", "intermediate")
_DECODER = Placement(r"layers\.\d+", "self_attn.o_proj", "mlp")

PLACEMENTS: dict[str, Placement] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "deberta-v2": _ENCODER,
    "vit": Placement(r"layers\.\d+", "attention.o_proj", "mlp"),
    "gpt2": Placement(r"h\.\d+", "attn.c_proj", "mlp"),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
}


def resolve_placement(model_type: Optional[str], override: Optional[dict], style: str) -> Placement:
    """The explicit placement if given, else the table's entry for ``model_type``."""
    if override is not None:
        return Placement.from_dict(override, style)
    if model_type not in PLACEMENTS:
        raise UnknownArchitectureError(
            f"CapaBoost adapters have no placement for model_type={model_type!r} (known: {sorted(PLACEMENTS)}). "
            "Pass it explicitly, e.g. CapaBoostAdapterConfig(adapter_placement={'layers': r'encoder\\.layer\\.\\d+', "
            "'attn': 'attention.output.dense', 'ffn': 'output.dense', 'ffn_in': 'intermediate'}): 'layers' is a "
            "regex of one layer's module name, the others are module paths inside a layer ('ffn_in' only for a "
            "parallel adapter whose 'ffn' module is not the whole FFN block)."
        )
    return PLACEMENTS[model_type]
