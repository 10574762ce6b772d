"""Self-describing checkpoints: weights (only the adapter for LoRA) in safetensors, optimizer state, train state
(step, tokens, data position, RNG), the resolved config and the tokenizer; a marker written last. The LR schedule
is a pure function of the step (`raypt.optim.set_lr`), so it needs no state.

State dicts go through `torch.distributed.checkpoint.state_dict`, which speaks plain, DDP and FSDP models alike and
gathers full tensors on rank 0 (every rank calls it: it is a collective under FSDP).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from raypt.model import unwrap

MARKER = "COMPLETE"
TRAIN_STATE = "train_state.pt"


class CheckpointError(ValueError):
    """A directory that is not a complete raypt checkpoint."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed by all workers together."""
    epoch: int = 0
    """Passes started over the training data."""
    batches_in_epoch: int = 0
    """Micro-batches each worker has consumed in the current epoch (the data position)."""


def _is_lora(model) -> bool:
    return hasattr(unwrap(model), "peft_config")


def gather(model, optimizer=None) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state on rank 0; only trainable weights for LoRA."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=_is_lora(model))
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=opts), {}
    return get_state_dict(model, optimizer, options=opts)


def save_weights(model, directory: Path, state_dict: dict) -> None:
    """HF layout: `save_pretrained` writes config + safetensors (a LoRA model writes its adapter only)."""
    unwrap(model).save_pretrained(directory, state_dict=state_dict, safe_serialization=True)


def save(directory: Path, *, model, optimizer, state: TrainState, config_yaml: str, tokenizer,
         is_rank0: bool) -> None:
    """Write a checkpoint into `directory` (rank 0 writes; every rank must call)."""
    model_sd, optim_sd = gather(model, optimizer)
    if not is_rank0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory, model_sd)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizer": optim_sd, "state": dataclasses.asdict(state), "rng": rng}, directory / TRAIN_STATE)
    (directory / "config.yaml").write_text(config_yaml, encoding="utf-8")
    tokenizer.save_pretrained(directory)
    (directory / MARKER).write_text(json.dumps(dataclasses.asdict(state)) + "\n")  # last: the checkpoint is whole


def check(directory: Path) -> None:
    """Refuse anything but a complete raypt checkpoint, saying what is wrong."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if not (directory / MARKER).exists():
        raise CheckpointError(
            f"{directory} is not a complete raypt checkpoint (no {MARKER} marker: it was never finished, or it is "
            "not a raypt checkpoint); point to another checkpoint or start a new run name"
        )
    if not (directory / TRAIN_STATE).exists():
        raise CheckpointError(f"{directory} has no {TRAIN_STATE}; it is not a raypt checkpoint")


def load(directory: Path, *, model, optimizer) -> TrainState:
    """Restore weights, optimizer and RNG from `directory` (every rank reads it); return the train state."""
    from safetensors.torch import load_file

    check(directory)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{directory} holds no .safetensors weights")
    model_sd = {}
    for f in weights:
        model_sd.update(load_file(f))
    if _is_lora(model):  # peft saves adapter keys without the adapter name; map them back
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(unwrap(model), model_sd)
        model_sd = None
    blob = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
    opts = StateDictOptions(full_state_dict=True, strict=False, ignore_frozen_params=_is_lora(model))
    if model_sd is not None:
        model_sd = _untie(unwrap(model), model_sd)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=blob["optimizer"], options=opts)
    else:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=opts)
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(_as_tuple(blob["rng"]["python"]))
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(blob["rng"]["cuda"])
    return TrainState(**blob["state"])


def _untie(model, sd: dict) -> dict:
    """save_pretrained drops a tied LM head; give it back so a strict-ish load sees every weight."""
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in sd:
        emb = next((k for k in sd if k.endswith("embed_tokens.weight")), None)
        if emb is not None:
            sd["lm_head.weight"] = sd[emb]
    return sd


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, list) else x
