"""Sharded, self-describing checkpoints, one owner (`Checkpointer`), one format for DDP and FSDP:

    checkpoint_NNNNNN/
      state/             model + AdamW state, torch.distributed.checkpoint (DCP): every rank writes its own shard
                         file (__R_0.distcp) in parallel, rank 0 the .metadata index (LoRA: the adapter only)
      rng/rank_RRRRR.pt  each rank's RNG state
      train_state.json   what the run's stateful parts hand over: step, tokens seen, the data's position (JSON)
      config.yaml, tokenizer files
      COMPLETE           written last by rank 0, once every rank has finished: every file with its size

No rank ever holds more than its own shards, and a save costs each rank 1/W of the state (under DDP, DCP spreads the
replicated tensors over the ranks). Loading reshards: a checkpoint written by W workers resumes on any W'. A directory
counts only when its marker is there and every listed file has that size, so a save killed halfway (or a half-finished
upload) is never resumed from; leftovers are removed and the newest `run.checkpoints_to_keep` complete ones kept.
With `async_save`, `dcp.async_save` copies the state to host memory and training goes on while a background thread
writes (and uploads) it and marks it complete. The LR schedule is a pure function of the step: it needs no state.
(Ray Train's own checkpoint registry is not used: it loses a checkpoint reported just before a worker dies.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import shutil
import tempfile
import time
import threading
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultSavePlanner
from torch.distributed.checkpoint.utils import _create_file_view
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from raypt import faults
from raypt.model import unwrap
from raypt.parallel import distributed, is_sharded
from raypt.errors import UserError
from raypt.storage import filesystem, is_uri, node_copy, retrying, upload

MARKER = "COMPLETE"
LOW_DISK = 1 << 30
"""Free bytes below which a failed save's line says how little room its disk has left."""
TRAIN_STATE = "train_state.json"
STATE = "state"


class CheckpointError(UserError):
    """A directory that is not a complete raypt checkpoint, or a checkpoint that could not be written."""


def dirname(step: int) -> str:
    return f"checkpoint_{step:06d}"


def _is_lora(model) -> bool:
    return hasattr(unwrap(model), "peft_config")


def _options(model, **kw) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=_is_lora(model), **kw)


class Checkpointer:
    """The run's checkpoints in `run_dir` (a local/shared path or an s3:// / gs:// URI): which one to resume from,
    saving (every rank, collectively), keeping the newest `keep`."""

    def __init__(self, run_dir: str, *, rank: int = 0, local_rank: int = 0, keep: int = 3, async_save: bool = False):
        self.run_dir, self.rank, self.local_rank, self.keep = run_dir.rstrip("/"), rank, local_rank, keep
        # async saves run their collectives from a background thread: on a group of their own, never the training one
        self.async_save = async_save and distributed()
        self._group = dist.new_group(backend="gloo") if self.async_save else None
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self.write_s: float | None = None
        """Seconds the last complete save took on this rank, from `save` until every rank had written (background
        writes and uploads included)."""
        self.complete_step: int | None = None
        """The step of the newest complete checkpoint this run saved or resumed from."""

    # -- resume ---------------------------------------------------------------------------------------------------
    def source(self, resume_from: str | None) -> tuple[str | None, list[str]]:
        """The checkpoint to start from: the run's newest complete one, else `resume_from` (checked), else None; and
        the incomplete newer ones passed over. Rank 0 decides for everyone, so all ranks load the same one."""
        choice: list = [None, []]
        if self.rank == 0:
            skipped: list[str] = []
            src = latest(self.run_dir, skipped)
            if src is None and resume_from:
                check(resume_from)
                src = resume_from
            choice = [src, skipped]
        if distributed():
            dist.broadcast_object_list(choice, src=0)
        return choice[0], choice[1]

    def restore(self, source: str, *, model, optimizer) -> tuple[dict, int]:
        """Load `source` into the (sharded or whole) model and optimizer of this rank; return the state the run's
        other parts saved (`save`) and the bytes of saved state this rank read."""
        with self._readable(source, is_sharded(model)) as d:
            sd = _state_dicts(model, optimizer)
            reader = StateReader(f"{d}/{STATE}")
            dcp.load(sd, storage_reader=reader, no_dist=not distributed())  # each rank: its shards' slices
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                           options=_options(model, strict=False))
            fs, path = filesystem(d)
            try:
                with fs.open_input_file(f"{path}/rng/rank_{self.rank:05d}.pt") as f:
                    _set_rng(torch.load(io.BytesIO(f.read()), weights_only=True))
            except FileNotFoundError:  # a rank the saving run did not have keeps the per-rank seed build_model gave
                pass
            with fs.open_input_file(f"{path}/{TRAIN_STATE}") as f:
                state = json.loads(f.read())["state"]
        self.complete_step = state["step"]
        return state, reader.bytes_read

    @contextlib.contextmanager
    def _readable(self, source: str, sharded: bool):
        """Where to read a checkpoint from: where it is, except a URI holding replicated (DDP) state, which every
        rank reads whole: that is copied once per node (and removed after loading). Sharded (FSDP) state is read
        straight from storage, each rank fetching the byte ranges of its own shards alone."""
        if not is_uri(source) or sharded:
            yield source
            return
        dest = node_copy(source, "checkpoints")
        yield str(dest)
        if distributed():
            dist.barrier()  # every rank of the node has read it
        if self.local_rank == 0:
            shutil.rmtree(dest, ignore_errors=True)

    # -- save -----------------------------------------------------------------------------------------------------
    def save(self, *, model, optimizer, state: dict, config_yaml: str, tokenizer) -> str:
        """Write the checkpoint of step `state["step"]`; every rank calls. `state`: what the run's other stateful
        parts hand over (their `state_dict()`s side by side, JSON), returned by `restore`. Returns the checkpoint's
        path. With async_save this returns once the state is copied to host memory; the files are written and marked
        complete in the background."""
        self.wait()
        t0 = time.perf_counter()
        dest = f"{self.run_dir}/{dirname(state['step'])}"
        fs, path = filesystem(dest)
        local, failed = Path(path), None
        try:
            if self.rank == 0:  # leftovers of an attempt that died writing this step
                fs.delete_dir_contents(path, missing_dir_ok=True)
        except Exception as e:  # noqa: BLE001 (every rank learns it: `_agree`)
            failed = f"rank 0, clearing the directory: {e}"
        self._agree(failed, dest, local, None)  # (and a barrier: nobody writes before the leftovers are gone)
        try:
            local = Path(tempfile.mkdtemp(prefix="raypt-ckpt-")) if is_uri(dest) else local  # URIs: staged, uploaded
            (local / "rng").mkdir(parents=True, exist_ok=True)
            torch.save(_rng_state(), local / "rng" / f"rank_{self.rank:05d}.pt")
            if self.rank == 0:
                (local / TRAIN_STATE).write_text(json.dumps({"state": state}) + "\n")
                (local / "config.yaml").write_text(config_yaml, encoding="utf-8")
                tokenizer.save_pretrained(local)
        except Exception as e:  # noqa: BLE001 (a full disk: OSError, or torch's zip writer's RuntimeError)
            failed = f"rank {self.rank}: {e}"
        self._agree(failed, dest, local, None)  # (every rank learns it before the state's collective save)
        sd = _state_dicts(model, optimizer)
        writer = dcp.FileSystemWriter(str(local / STATE))
        planner = _Planner() if is_sharded(model) else DefaultSavePlanner()
        if self.async_save:
            future = dcp.async_save(sd, storage_writer=writer, planner=planner, process_group=self._group)
            self._pending = threading.Thread(target=self._finish_in_background, args=(future, dest, local, state, t0),
                                             daemon=True)
            self._pending.start()
        else:
            try:
                dcp.save(sd, storage_writer=writer, planner=planner, no_dist=not distributed())
            except CheckpointException as e:  # (DCP tells every rank of any rank's failed write)
                self._agree(_first_failure(e), dest, local, None, agreed=True)
            self._finish(dest, local, state, None, t0)
        return dest

    def wait(self) -> None:
        """Block until a background save is written and marked complete (raising what it met)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _finish_in_background(self, future, dest: str, local: Path, state: dict, t0: float) -> None:
        try:
            try:
                future.result()
            except CheckpointException as e:
                self._agree(_first_failure(e), dest, local, self._group, agreed=True)
            self._finish(dest, local, state, self._group, t0)
        except BaseException as e:  # re-raised by wait() on the training thread
            self._error = e

    def _agree(self, failed: str | None, dest: str, local: Path, group, agreed: bool = False) -> None:
        """Whether any rank failed to write its part of `dest` (`failed`: this rank's error, or None), learnt by every
        rank in one all-gather (`agreed`: every rank knows already); on a failure, the half-written checkpoint is
        removed and every rank raises the same CheckpointError. One rank raising alone would leave the others waiting
        in the save's next collective until its timeout (30 min)."""
        if distributed() and not agreed:
            every = [None] * dist.get_world_size(group)
            dist.all_gather_object(every, failed, group=group)
            failed = next((f for f in every if f), None)
        if not failed:
            return
        if (free := _free_bytes(local)) < LOW_DISK:  # (a library's error may not say ENOSPC: torch's zip writer's not)
            failed += f"; {'the staging' if is_uri(dest) else 'its'} disk has only {free / 1e6:,.1f} MB free"
        if is_uri(dest):
            shutil.rmtree(local, ignore_errors=True)
        if self.rank == 0:  # (a full disk gets its room back; the leftover would be skipped and pruned anyway)
            with contextlib.suppress(Exception):
                fs, path = filesystem(dest)
                fs.delete_dir(path)
        raise CheckpointError(f"{dest} could not be written ({failed}); the run's newest complete checkpoint is as it "
                              "was, and the run resumes from it when started again")

    def _finish(self, dest: str, local: Path, state: dict, group, t0: float) -> None:
        """After this rank's files are written: upload them (URIs), wait for every rank, then rank 0 marks the
        checkpoint complete and prunes old ones. `t0`: when the save began."""
        fs, path = filesystem(dest)
        failed = None
        if is_uri(dest):
            try:
                upload(local, dest)
            except Exception as e:  # noqa: BLE001 (storage failing past its retries, a bucket refusing writes ...)
                failed = f"rank {self.rank}: {e}"
            shutil.rmtree(local, ignore_errors=True)
        faults.maybe_kill("save", state["step"], self.rank)
        self._agree(failed, dest, local, group)  # (and a barrier: every rank has written)
        failed = None
        if self.rank == 0:
            try:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                files = {i.path[len(path) + 1:]: i.size for i in sorted(infos, key=lambda i: i.path)
                         if i.type == pafs.FileType.File}
                retrying(lambda: _write(fs, f"{path}/{MARKER}",  # last: from now on the checkpoint counts
                                        json.dumps({"state": state, "files": files}) + "\n"), f"writing {MARKER}")
            except Exception as e:  # noqa: BLE001
                failed = f"rank 0, its {MARKER} marker: {e}"
        if distributed():  # (whether the marker is written: the checkpoint counts, or every rank raises)
            outcome = [failed]
            dist.broadcast_object_list(outcome, group=group, group_src=0)
            failed = outcome[0]
        self._agree(failed, dest, local, group, agreed=True)
        self.write_s, self.complete_step = time.perf_counter() - t0, state["step"]
        if self.rank == 0:
            try:  # (rank 0 alone: an error here must not leave it apart from the others)
                prune(self.run_dir, self.keep)
            except Exception as e:  # noqa: BLE001 (the next save prunes them)
                print(f"could not remove old checkpoints of {self.run_dir} ({e}); the next save tries again",
                      flush=True)


def _write(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _free_bytes(path: Path) -> int:
    """Free bytes on the disk holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _first_failure(e: CheckpointException) -> str:
    """The first rank's error in DCP's exception, in a line (DCP's own message holds every rank's traceback)."""
    if not e.failures:
        return f"{type(e).__name__}: {e}"
    rank, (error, _) = min(e.failures.items())
    return f"rank {rank}: {error}"


class _Planner(DefaultSavePlanner):
    """DCP's save planner for sharded state: what every rank holds alike (AdamW's step counts, a few hundred small
    tensors) is written by rank 0 alone, together (after its shards; a CUDA writer orders by size, which keeps these
    smallest ones together too), so a resuming rank reads it in one run instead of one request per tensor from
    every file. Shards that several ranks hold (HSDP's replicas) are still spread over
    them by DCP's default, so no node writes the others' share. (Replicated DDP state keeps DCP's default too.)"""

    def create_global_plan(self, all_plans):
        held = Counter(item.index for plan in all_plans for item in plan.items)
        everyone = {index for index, n in held.items() if n == len(all_plans) > 1}
        all_plans = [all_plans[0], *(dataclasses.replace(p, items=[i for i in p.items if i.index not in everyone])
                                     for p in all_plans[1:])]
        plans, metadata = super().create_global_plan(all_plans)
        shared_last = sorted(plans[0].items, key=lambda item: item.index in everyone)  # (stable)
        return [dataclasses.replace(plans[0], items=shared_last), *plans[1:]], metadata


class StateReader(dcp.FileSystemReader):
    """torch's DCP file reader over a pyarrow filesystem (a local path, s3://, gs://) that fetches what this rank's
    plan needs in few large ranged reads: the saved tensors it needs, sorted by place in their file, are read as
    runs of adjacent ones (or nearly: `GAP_BYTES`) of up to `RUN_BYTES` each (on S3 one ranged GET per run, not one
    per tensor: ~870 tensors per rank for an 8B model), nothing staged on local disk. `bytes_read` counts them."""

    RUN_BYTES = 64 << 20
    GAP_BYTES = 4 << 10  # read across a gap this small (another rank's small tensor) rather than make two requests

    def __init__(self, path: str):
        super().__init__(path)
        fs, self.path = filesystem(path)
        self.fs = _Files(fs)
        self.bytes_read = 0
        self._runs: dict[str, list[tuple[int, int]]] = {}
        self._held = threading.local()  # .run: (file, offset, bytes) of the run a reading thread is consuming

    def read_data(self, plan, planner):
        where = {id(item): self.storage_data[item.storage_index] for item in plan.items}
        items = sorted(plan.items, key=lambda i: (where[id(i)].relative_path, where[id(i)].offset))
        self._runs = {}
        for item in items:
            info = where[id(item)]
            runs = self._runs.setdefault(info.relative_path, [])
            start, end = info.offset, info.offset + info.length
            if runs and runs[-1][1] + self.GAP_BYTES >= start and end - runs[-1][0] <= self.RUN_BYTES:
                runs[-1] = (runs[-1][0], max(runs[-1][1], end))
            elif not runs or end > runs[-1][1]:
                runs.append((start, end))
        try:
            return super().read_data(dataclasses.replace(plan, items=items), planner)
        finally:
            self._held = threading.local()

    def _slice_file(self, file, sinfo):
        held = getattr(self._held, "run", None)  # (file, start, end, the run's bytes as a stream: no copy of them)
        if not (held and held[0] == sinfo.relative_path and held[1] <= sinfo.offset
                and sinfo.offset + sinfo.length <= held[2]):
            self._held.run = None  # (the previous run is let go before the next is read)
            start, end = next((a, b) for a, b in self._runs[sinfo.relative_path]
                              if a <= sinfo.offset and sinfo.offset + sinfo.length <= b)
            held = self._held.run = (sinfo.relative_path, start, end, io.BytesIO(file.read_at(end - start, start)))
            self.bytes_read += end - start
        return _create_file_view(held[3], sinfo.offset - held[1], sinfo.length)  # (torch's own view of a slice)


class _Files:
    """The part of torch's `FileSystemBase` a `FileSystemReader` calls, on a pyarrow filesystem."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def concat_path(self, path: str, suffix: str) -> str:
        return f"{path}/{suffix}"

    @contextlib.contextmanager
    def create_stream(self, path: str, mode: str):
        assert mode == "rb", mode
        with self.fs.open_input_file(str(path)) as f:
            if str(path).endswith(".metadata"):  # unpickled in small reads: one request, not one per read
                yield io.BytesIO(f.read())
            else:
                yield f


def _state_dicts(model, optimizer) -> dict:
    """This rank's model and optimizer state as DCP sees it: DTensor shards under FSDP, whole tensors otherwise."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    return {"model": _saved(model, model_sd), "optim": optim_sd}


def _saved(model, model_sd: dict) -> dict:
    """The part of a model's state dict a checkpoint holds: all of it, or a LoRA model's trainable weights alone
    (ignore_frozen_params keeps a frozen weight tied to another, the LM head: dropped here too)."""
    if not _is_lora(model):
        return model_sd
    trainable = {n for n, p in unwrap(model).named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}


def load_weights(source: str | Path, model) -> dict:
    """A complete checkpoint's model weights (not the optimizer's state) into a whole model in one process, however
    many ranks wrote it and whether DDP or FSDP did (DCP reshards): for inference and evaluation. The caller has
    `check`ed it (before building the model)."""
    sd = _saved(model, get_model_state_dict(model, options=_options(model)))
    with warnings.catch_warnings():  # (DCP says it assumes one process: it is one)
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({"model": sd}, checkpoint_id=str(Path(source) / STATE), no_dist=True)
    set_model_state_dict(model, sd, options=_options(model, strict=False))
    return saved_state(str(source))


def full_model_state(model) -> dict:
    """The whole model's weights (only trainable ones for LoRA) on rank 0's CPU, for the final export; a collective
    under FSDP (every rank calls), empty on the other ranks."""
    return get_model_state_dict(model, options=_options(model, full_state_dict=True, cpu_offload=True))


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, list) else x


# -- what counts as a checkpoint ----------------------------------------------------------------------------------


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
    for needed in (TRAIN_STATE, f"{STATE}/.metadata"):
        if needed not in files:
            return (f"{directory} has no {needed}; it is not a checkpoint of this raypt version (sharded "
                    "torch.distributed.checkpoint state)")
    infos = fs.get_file_info([f"{path}/{name}" for name in files])
    for (name, size), info in zip(files.items(), infos):
        if info.type != pafs.FileType.File or info.size != size:
            return f"{directory} is incomplete or damaged: {name} is missing or not {size} bytes"
    return None


def saved_state(directory: str) -> dict:
    """The state recorded in a complete checkpoint's marker (what `Checkpointer.save` was handed)."""
    fs, path = filesystem(directory)
    with fs.open_input_stream(f"{path}/{MARKER}") as f:
        return json.loads(f.read())["state"]


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
