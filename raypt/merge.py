"""A LoRA adapter merged into its base model file by file: the export of a 4-bit (QLoRA) or sharded (FSDP) LoRA run.

peft's `merge_and_unload` needs the whole base in memory (16 GB for an 8B model in bf16, 140 GB for 70B: more than
a GPU, and next to a live training process). Here each safetensors file of the base is read tensor by tensor, every
adapted weight gets `W + scaling * B @ A` (computed in fp32, rounded once to the output dtype) and the file is
written out before the next is read: the memory is one of the base's files, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raypt.errors import UserError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
INDEX = "model.safetensors.index.json"


class MergeError(UserError):
    """An adapter or base this merge cannot combine file by file."""


def merges_by_file(base_dir: str | Path, adapter_dir: str | Path) -> bool:
    """Whether this merge can do it: the base's weights are safetensors files and the adapter is plain LoRA on
    linear layers (else peft's merge_and_unload must, the whole base in memory)."""
    d = Path(base_dir)
    if not ((d / INDEX).exists() or (d / "model.safetensors").exists()):
        return False
    try:
        _deltas(Path(adapter_dir))
    except MergeError:
        return False
    return True


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: torch.dtype | None = None) -> None:
    """Write to `out_dir` the base at `base_dir` with the LoRA adapter at `adapter_dir` (as peft saves it) merged in,
    in the base's files and names; `dtype`: of the floating-point weights written (default: as saved)."""
    base, out = Path(base_dir), Path(out_dir)
    deltas = _deltas(Path(adapter_dir))
    if (base / INDEX).exists():
        where = json.loads((base / INDEX).read_text())["weight_map"]
    else:
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            where = dict.fromkeys(f.keys(), "model.safetensors")
    if missing := sorted(set(deltas) - set(where)):
        raise MergeError(f"the adapter in {adapter_dir} adapts weights the base in {base_dir} does not have: "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; give the base it was "
                         "trained on")
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in sorted(set(where.values())):
        tensors = {}
        with safe_open(str(base / name), "pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                w = f.get_tensor(key)
                to = dtype if dtype is not None and w.is_floating_point() else w.dtype
                if key in deltas:
                    b, a, scaling = deltas[key]
                    if (b.shape[0], a.shape[1]) != w.shape:
                        raise MergeError(f"{key}: the adapter in {adapter_dir} makes {b.shape[0]} x {a.shape[1]}, "
                                         f"the base's weight is {tuple(w.shape)}; give the base it was trained on")
                    w = w.float().addmm_(b.float(), a.float(), alpha=scaling)
                tensors[key] = w.to(to).contiguous()
                total += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, str(out / name), metadata=metadata or {"format": "pt"})
        del tensors
    if (base / INDEX).exists():
        index = json.loads((base / INDEX).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if (base / "generation_config.json").exists():
        shutil.copyfile(base / "generation_config.json", out / "generation_config.json")
    if (base / "config.json").exists():
        config = json.loads((base / "config.json").read_text())
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _deltas(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapter's (B, A, scaling) by the base weight each one adapts."""
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "rank_pattern",
                               "alpha_pattern") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise MergeError(f"{adapter / ADAPTER_CONFIG}: only plain LoRA merges file by file (this one has "
                         f"{config.get('peft_type')} {', '.join(unsupported)}); merge it with peft's merge_and_unload")
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():
            module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):  # (an embedding's lora_embedding_A/B merge transposed)
                raise MergeError(f"{adapter / ADAPTER_WEIGHTS}: {key} is not a linear layer's LoRA weight; merge "
                                 "it with peft's merge_and_unload")
            pairs.setdefault(f"{module}.weight", {})[kind] = f.get_tensor(key)
    return {weight: (ab["B.weight"], ab["A.weight"], scaling) for weight, ab in pairs.items()}
