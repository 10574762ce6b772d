"""Self-describing checkpoints: weights (only the adapter for LoRA) in safetensors, optimizer state, train state
(step, tokens, data position, RNG), the resolved config and the tokenizer; a marker written last. The LR schedule
is a pure function of the step (`raypt.optim.set_lr`), so it needs no state.

raypt keeps its checkpoints itself, in the run directory (a local/shared path or an s3:// / gs:// URI): rank 0 writes
every file, then the marker, which lists each file with its size. A directory counts only when its marker is there
and every listed file has that size, so a save killed halfway (or a half-finished upload) is never resumed from;
`latest` picks the newest complete one, `prune` keeps `run.checkpoints_to_keep` and removes crash leftovers.
(Ray Train's own checkpoint registry is not used: it loses a checkpoint reported just before a worker dies.)

State dicts go through `torch.distributed.checkpoint.state_dict`, which speaks plain, DDP and FSDP models alike and
gathers full tensors on rank 0 (every rank calls it: it is a collective under FSDP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from raypt import faults
from raypt.corpus import is_uri, filesystem
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
    """The data position (`raypt.feed.Position`): passes started over the training data,"""
    unit: int = 0
    """the work unit holding the next block,"""
    offset: int = 0
    """and the blocks of that unit already consumed."""

    @property
    def position(self):
        from raypt.feed import Position

        return Position(self.epoch, self.unit, self.offset)

    @position.setter
    def position(self, pos) -> None:
        self.epoch, self.unit, self.offset = pos.epoch, pos.unit, pos.offset


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


def dirname(step: int) -> str:
    return f"checkpoint_{step:06d}"


def save(run_dir: str, *, model, optimizer, state: TrainState, config_yaml: str, tokenizer, is_rank0: bool,
         keep: int) -> str:
    """Write the checkpoint of `state.step` into `run_dir` (a path or URI), then keep the newest `keep` complete ones.
    Every rank must call (the state dicts are gathered collectively); rank 0 writes. Returns the checkpoint's path."""
    model_sd, optim_sd = gather(model, optimizer)
    dest = f"{run_dir.rstrip('/')}/{dirname(state.step)}"
    if not is_rank0:
        return dest
    fs, path = filesystem(dest)
    fs.delete_dir_contents(path, missing_dir_ok=True)  # leftovers of an attempt that died while writing this step
    with tempfile.TemporaryDirectory(prefix="raypt-ckpt-") as tmp:
        local = Path(tmp) if is_uri(dest) else Path(path)  # local storage: written in place, marker last
        local.mkdir(parents=True, exist_ok=True)
        save_weights(model, local, model_sd)
        faults.maybe_kill("save", state.step, 0)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save({"optimizer": optim_sd, "state": dataclasses.asdict(state), "rng": rng}, local / TRAIN_STATE)
        (local / "config.yaml").write_text(config_yaml, encoding="utf-8")
        tokenizer.save_pretrained(local)
        files = {str(f.relative_to(local)): f.stat().st_size for f in sorted(local.rglob("*")) if f.is_file()}
        if is_uri(dest):
            for name in files:
                pafs.copy_files(str(local / name), f"{path}/{name}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
        marker = json.dumps({"state": dataclasses.asdict(state), "files": files}) + "\n"
        with fs.open_output_stream(f"{path}/{MARKER}") as f:  # last: from now on the checkpoint counts
            f.write(marker.encode())
    prune(run_dir, keep)
    return dest


def problem(directory: str) -> str | None:
    """Why `directory` (path or URI) is not a complete raypt checkpoint, or None when it is one."""
    fs, path = filesystem(directory)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return f"{directory} is not a directory"
    if fs.get_file_info(f"{path}/{MARKER}").type != pafs.FileType.File:
        return (f"{directory} is not a complete raypt checkpoint (no {MARKER} marker: it was never finished, or it "
                "is not a raypt checkpoint)")
    try:
        with fs.open_input_stream(f"{path}/{MARKER}") as f:
            files = json.loads(f.read())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{directory} has an unreadable {MARKER} marker; it is not a raypt checkpoint"
    if TRAIN_STATE not in files:
        return f"{directory} has no {TRAIN_STATE}; it is not a raypt checkpoint"
    infos = fs.get_file_info([f"{path}/{name}" for name in files])
    for (name, size), info in zip(files.items(), infos):
        if info.type != pafs.FileType.File or info.size != size:
            return f"{directory} is incomplete or damaged: {name} is missing or not {size} bytes"
    return None


def check(directory: str | Path) -> None:
    """Refuse anything but a complete raypt checkpoint, saying what is wrong."""
    if (why := problem(str(directory))) is not None:
        raise CheckpointError(why + "; point to another checkpoint or start a new run name")


def _listed(run_dir: str) -> list[str]:
    """The run's checkpoint directories, newest first."""
    fs, path = filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    return [f"{run_dir.rstrip('/')}/{n}" for n in sorted(names, reverse=True)]


def latest(run_dir: str, skipped: list[str] | None = None) -> str | None:
    """The newest complete checkpoint of a run, or None; incomplete newer ones are named in `skipped`."""
    for d in _listed(run_dir):
        if (why := problem(d)) is None:
            return d
        if skipped is not None:
            skipped.append(why)
    return None


def prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and incomplete leftovers of crashed saves."""
    fs, _ = filesystem(run_dir)
    complete = 0
    for d in _listed(run_dir):
        ok = problem(d) is None
        complete += ok
        if not ok or complete > keep:
            fs.delete_dir(filesystem(d)[1])


@contextlib.contextmanager
def local_copy(directory: str):
    """A checkpoint as a local directory: itself, or a temporary download of a URI."""
    if not is_uri(directory):
        yield Path(directory)
        return
    with tempfile.TemporaryDirectory(prefix="raypt-resume-") as tmp:
        fs, path = filesystem(directory)
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def load(directory: Path, *, model, optimizer) -> TrainState:
    """Restore weights, optimizer and RNG from a local checkpoint `directory` (every rank reads it; `check` it
    first); return the train state."""
    from safetensors.torch import load_file

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
