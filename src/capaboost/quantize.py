"""Quantizing a float base model QLoRA-style, the optional backends' imports, and bytes as stored.

Nothing here is LoRA-specific: :func:`quantize_base` turns ``nn.Linear`` layers into bitsandbytes 4/8-bit or torchao
int8 weight-only layers before ``get_peft_model``; :mod:`capaboost.lora.quantized` then puts CapaBoost-LoRA on
them. The backends are optional: nothing is imported unless a model already uses it or a quantization asks for it.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

QUANTIZE_KINDS = ("4bit", "nf4", "fp4", "8bit", "int8")
#: Module-name components that :func:`quantize_base` leaves in float by default: the output/classification heads
#: (trained whole or tied to the embeddings), as transformers' bitsandbytes integration skips the output embedding.
DEFAULT_SKIP = ("lm_head", "classifier", "score", "qa_outputs")



def _bnb():
    """bitsandbytes if it is already imported (a model with bnb layers imported it), else None."""
    return sys.modules.get("bitsandbytes")


def _torchao_tensor(weight: Any) -> bool:
    if "torchao" not in sys.modules:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("quantizing to 4/8 bits needs bitsandbytes: pip install bitsandbytes") from exc
    return bitsandbytes


def _import_torchao():
    try:
        import torchao.quantization
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("int8 weight-only quantization needs torchao: pip install torchao") from exc
    return torchao.quantization


def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts for s in skip)


def quantize_base(
    model: nn.Module, kind: str, skip: Iterable[str] = DEFAULT_SKIP, compute_dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Quantize ``model``'s ``nn.Linear`` layers in place, QLoRA-style; returns ``model``. Call before get_peft_model.

    ``kind``: ``"4bit"``/``"nf4"`` (bitsandbytes NF4, double-quantized statistics, as QLoRA), ``"fp4"``,
    ``"8bit"`` (bitsandbytes LLM.int8, outlier threshold 6.0 as transformers' default) or ``"int8"`` (torchao
    int8 weight-only, per-row scales). Left in float: the output embedding (``get_output_embeddings()``), any
    linear tied to an input embedding, and modules with a name component in ``skip`` (default: the heads
    ``lm_head``, ``classifier``, ``score``, ``qa_outputs``, which are trained whole or tied). ``compute_dtype``
    (4-bit only) defaults to each layer's weight dtype. For bitsandbytes kinds the model is flagged
    ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` as transformers' quantizer does, so PEFT's own LoRA dispatches
    its bnb layers on the same base (a LoRA baseline, ``export_as_lora``).
    """
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize kind must be one of {QUANTIZE_KINDS}, got {kind!r}.")
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("quantize_base needs the base model: call it before get_peft_model.")
    keep = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        keep.add(id(out_emb))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and id(module) not in keep and id(module.weight) not in embeddings
        and not _skipped(name, skip) and not _torchao_tensor(module.weight)
    ]
    if not targets:
        raise ValueError(f"quantize_base found no torch.nn.Linear to quantize in {type(model).__name__}.")
    if kind == "int8":
        tq = _import_torchao()
        chosen = {id(m) for _, m in targets}
        tq.quantize_(model, tq.Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, _: id(m) in chosen)
        return model
    bnb = _import_bnb()
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight = linear.weight.detach()
        device = weight.device
        if kind == "8bit":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
            q.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        else:
            quant_type = "fp4" if kind == "fp4" else "nf4"
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype or weight.dtype, compress_statistics=True,
                                  quant_type=quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type=quant_type,
                                         module=q).to(device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        q.train(linear.training)
        setattr(parent, attr, q)
    setattr(model, "is_loaded_in_8bit" if kind == "8bit" else "is_loaded_in_4bit", True)
    return model


def _tensor_bytes(t: torch.Tensor) -> int:
    if _torchao_tensor(t):
        optional = [n for n in getattr(t, "optional_tensor_data_names", []) if getattr(t, n, None) is not None]
        names = list(t.tensor_data_names) + optional
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bnb 4-bit: absmax (and the nested statistics), the code table
    while state is not None:
        total += sum(x.numel() * x.element_size() for x in (state.absmax, state.code) if isinstance(x, torch.Tensor))
        state = getattr(state, "state2", None)
    scb = getattr(t, "SCB", None)  # bnb 8-bit row scales
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def storage_bytes(model: nn.Module, trainable: Optional[bool] = None) -> int:
    """Bytes held by ``model``'s parameters and buffers as stored: a bnb 4-bit weight counts its packed uint8
    data plus its quantization statistics, an int8 one its data plus row scales, a torchao tensor its int8 data
    and scales (``numel * element_size`` would count those at the float dtype they present). ``trainable``:
    True/False counts only parameters that do / do not require grad (buffers count as not trainable)."""
    seen: set[int] = set()
    total = 0
    tensors = [(p, p.requires_grad) for p in model.parameters()] + [(b, False) for b in model.buffers()]
    for t, grad in tensors:
        if id(t) in seen or (trainable is not None and grad != trainable):
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total
