"""Serving exports: a merged plain-transformers checkpoint, and a check of a LoRA folder against vLLM's loader.

The vLLM rules (see docs/serving.md for the sources) are read from vLLM's own code, not from a vLLM install:
vLLM needs a GPU, so nothing here imports it. ``vllm_compatibility`` reads only ``adapter_config.json`` and the
safetensors header of a LoRA folder, so it runs on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

# vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`` (--max-lora-rank, default 16).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/config/lora.py: ``LoRADType = Literal["auto", "float16", "bfloat16"]``: the adapter is cast to it on load
# (auto = the served model's dtype), so float32 weights load too.
VLLM_WEIGHT_DTYPES = ("F16", "BF16", "F32")
# vllm/lora/peft_helper.py (_init_is_supported): string inits that only set the initial weights.
VLLM_STRING_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# vllm/lora/peft_helper.py (_validate_features): the only modules_to_save vLLM accepts (classification heads).
VLLM_MODULES_TO_SAVE = ("classifier", "score")
# vllm/lora/utils.py (parse_fine_tuned_lora_name): every other tensor name is "unsupported LoRA weight".
_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def vllm_max_lora_rank(rank: int) -> Optional[int]:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``; None above the largest (512)."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def vllm_compatibility(path: str | Path) -> list[str]:
    """Problems that keep the PEFT LoRA folder ``path`` from loading (or loading as trained) in vLLM; [] when none.

    Checks vLLM's ``PEFTHelper.validate_legal`` rules (rank, bias, modules_to_save, DoRA and the other PEFT
    variants), that the rank is one of the ``--max-lora-rank`` values (or says which one to serve it with),
    per-module ranks/alphas, the tensor names vLLM parses and their dtypes. Not checked: whether vLLM implements
    LoRA for the architecture and each target module (its supported-models table), which needs vLLM itself.
    """
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return [f"{config_file} is missing: not a PEFT adapter folder."]
    config = json.loads(config_file.read_text())
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        way_out = " Run `capaboost export RUN --to lora` first." if str(peft_type).startswith("CAPABOOST") else ""
        return [f"peft_type is {peft_type!r}; vLLM loads only plain LoRA adapters (peft_type 'LORA').{way_out}"]

    problems = []
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        return problems + [f"r must be a positive integer, got {r!r}."]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for rank in sorted({r, *rank_pattern.values()}):
        fit = vllm_max_lora_rank(rank)
        if fit is None:
            problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): "
                            "it cannot be served as a LoRA; export --to merged instead.")
        elif fit != rank:
            problems.append(f"rank {rank} is not one of vLLM's --max-lora-rank values {VLLM_MAX_LORA_RANKS}: serve "
                            f"with --max-lora-rank {fit} (the adapter is padded to it, paying for rank {fit}), or "
                            "train with d*r in that set (e.g. d=2, r=8 -> 16).")
    if rank_pattern or alpha_pattern:
        problems.append("rank_pattern/alpha_pattern set: vLLM releases whose PEFTHelper does not read them apply r and "
                        "lora_alpha to every module, a wrong scaling for the others; use a vLLM that reads them or "
                        "one rank per adapter.")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM does not support adapter biases (bias must be 'none').")
    extra = [m for m in (config.get("modules_to_save") or []) if m not in VLLM_MODULES_TO_SAVE]
    if extra:
        problems.append(f"modules_to_save={extra}: vLLM accepts modules_to_save only as None (or "
                        f"{list(VLLM_MODULES_TO_SAVE)} for classification models); merge instead (--to merged).")
    for key, name in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias (lora_bias)"), ("use_qalora", "QALoRA"),
                      ("use_bdlora", "block-diagonal LoRA"), ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
                      ("layer_replication", "layer_replication")):
        if config.get(key):
            problems.append(f"{key} is set: vLLM does not support {name}.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_STRING_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights when PEFT loads it; vLLM refuses it.")

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return problems + [f"{weights} is missing (vLLM reads adapter_model.safetensors, or .bin)."]
    header = _safetensors_header(weights)
    bad_names = [k for k in header if not (k.startswith("base_model.model.") and k.endswith(_WEIGHT_SUFFIXES))]
    if bad_names:
        problems.append(f"tensors vLLM does not parse as LoRA weights (it raises 'unsupported LoRA weight'): "
                        f"{bad_names[:3]}{' ...' if len(bad_names) > 3 else ''}")
    dtypes = sorted({entry["dtype"] for entry in header.values()} - set(VLLM_WEIGHT_DTYPES))
    if dtypes:
        problems.append(f"tensor dtypes {dtypes}: vLLM's lora_dtype is float16 or bfloat16 (float32 is cast).")
    return problems


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with the adapter folded into its weights (``model`` is consumed).

    CapaBoost-LoRA (and any PEFT LoRA) merges exactly; models without a PEFT wrapper (full fine-tuning,
    BitFit) are returned as they are; prefix tuning and bottleneck adapters cannot be merged and are refused.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        config = model.peft_config[model.active_adapter]
        if config.is_prompt_learning:
            raise ValueError(f"{type(config).__name__} is prompt learning: virtual tokens cannot be merged into "
                             "the weights. Export it with export_as_prefix and serve it with PEFT.")
        model = model.merge_and_unload()  # bottleneck adapters raise AdapterMergeError (a ValueError)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{type(model).__name__} is not a transformers model: it has no save_pretrained "
                         "checkpoint format to export to.")
    return model


def save_merged(model: torch.nn.Module, out: str | Path, max_shard_size: str | int = "5GB",
                tokenizer_from: Optional[str | Path] = None) -> list[str]:
    """Write ``merged_model(model)`` to ``out`` as safetensors shards of at most ``max_shard_size`` (plus the
    index when sharded), with the tokenizer of ``tokenizer_from`` when that folder has one. Returns the files."""
    merged = merged_model(model)
    out = Path(out)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer_from is not None and _has_tokenizer(Path(tokenizer_from)):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(out)
    return sorted(p.name for p in out.iterdir())


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in (
        "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model"))
