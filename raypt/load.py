"""A trained model for generation and evaluation, from any of a run's outputs, local or at an s3:// / gs:// URI:

- a run's `final/`, or any directory `AutoModelForCausalLM.from_pretrained` reads (a base model);
- a LoRA adapter directory (a LoRA run's `final/adapter`): the base model its adapter_config.json names, with the
  adapter applied;
- a `checkpoint_NNNNNN/`: the model its config.yaml describes, built as training builds it, with the checkpoint's
  weights (written by any number of ranks, DDP or FSDP); a LoRA run's checkpoint holds only the adapter, applied to
  its base. A 4-bit (QLoRA) run's base is loaded unquantized.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from raypt.errors import UserError
from raypt.storage import is_uri, node_copy


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    kind: str
    """"model" (final/ or any pretrained directory), "adapter" or "checkpoint"."""
    path: str
    config: object | None = None
    """The run's raypt config where the directory has one (config.yaml), else None."""

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"{self.kind} {self.path}: {n:,} parameters"


def load(path: str, device: str | torch.device = "cpu") -> Loaded:
    """The model at `path` (see the module's docstring) on `device`, in eval mode, and its tokenizer."""
    from raypt.checkpoint import MARKER

    device = torch.device(device)
    local = _local(path)
    if (local / MARKER).exists():
        loaded = _checkpoint(local, device)
    elif (local / "adapter_config.json").is_file():
        loaded = _adapter(local, device)
    elif (local / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(local, dtype=_dtype(device)).to(device)
        loaded = Loaded(model, _tokenizer(local), "model", path, _raypt_config(local))
    else:
        raise UserError(f"{path} holds no model: give a run's final/ directory, a LoRA adapter directory (with "
                        "adapter_config.json) or a checkpoint_NNNNNN/ directory")
    loaded.path = path
    loaded.model.eval()
    return loaded


def _local(path: str) -> Path:
    if is_uri(path):
        return node_copy(path, "models")
    if not Path(path).is_dir():
        raise UserError(f"--model {path} is not a directory")
    return Path(path)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _tokenizer(*dirs: Path | str):
    """The tokenizer in the first of `dirs` that has one."""
    from raypt.tokenizer import load_tokenizer

    for d in dirs:
        if d is not None and any(Path(d).glob("tokenizer*")):
            return load_tokenizer(str(d))
    raise UserError(f"no tokenizer found in {', '.join(str(d) for d in dirs if d is not None)}")


def _raypt_config(d: Path):
    from raypt.config import load_config

    return load_config(d / "config.yaml") if (d / "config.yaml").is_file() else None


def _checkpoint(d: Path, device: torch.device) -> Loaded:
    from raypt.checkpoint import check, load_weights
    from raypt.model import build_model

    check(d)
    cfg = _raypt_config(d)
    if cfg is None:
        raise UserError(f"{d} has no config.yaml; it is not a checkpoint of this raypt version")
    tok = _tokenizer(d)
    m = dataclasses.replace(cfg.model, quantize=None, gradient_checkpointing=False)
    if m.dtype == "auto" and cfg.model.quantize:
        m = dataclasses.replace(m, dtype="bfloat16" if device.type == "cuda" else "float32")
    model, _ = build_model(m, vocab_size=len(tok), seq_len=cfg.data.seq_len, device=device, tokenizer=tok,
                           seed=cfg.run.seed)
    load_weights(d, model)
    return Loaded(model, tok, "checkpoint", str(d), cfg)


def _adapter(d: Path, device: torch.device) -> Loaded:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raypt.model import local_model_dir

    base = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or (Path(base).is_absolute() and not Path(base).is_dir()):
        raise UserError(f"{d}/adapter_config.json names base model {base!r}, which is not here; load the run's "
                        "final/ (the merged model) instead, or put the base model at that path")
    model = AutoModelForCausalLM.from_pretrained(local_model_dir(base), dtype=_dtype(device)).to(device)
    model = PeftModel.from_pretrained(model, d)
    return Loaded(model, _tokenizer(d, d.parent, local_model_dir(base)), "adapter", str(d),
                  _raypt_config(d.parent))
