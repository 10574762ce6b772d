"""The per-worker causal-LM loop: setup -> train steps -> eval -> checkpoint -> export.

Everything Ray-specific sits behind `Context` (rank, device, data, report, restore), so the same `train` runs in one
plain process in a unit test (`LocalContext`) and on every Ray Train worker (`raypt.train.RayContext`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from raypt import faults, parallel, storage
from raypt.checkpoint import CheckpointError, Checkpointer
from raypt.config import Config, data_parallel_size, global_batch_size, grad_accum_steps
from raypt.export import end_sample, export, write_report
from raypt.loss import IGNORE
from raypt.metrics import MetricsLogger, emit, mfu, peak_flops
from raypt.model import build_model, hf_model, unwrap
from raypt.optim import NonFiniteError, StepGuard, build_optimizer, set_lr
from raypt.rundata import RunData
from raypt.stream import Position, RankStream, Unit, gather, order_args, stream_windows

__all__ = ["Context", "LocalContext", "NonFiniteError", "document_inputs", "train"]


class Context(Protocol):
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    """Local directory for metrics and the final model (rank 0 writes)."""
    storage: str
    """The run's directory on its storage (path or URI): checkpoints are written and looked for there."""
    data: RunData
    """The run's data (`RunData.light`): its position, and the fingerprint a checkpoint's position is checked
    against."""
    grew_from: int
    """The size of the group that left for a larger one (0: none): a group no larger does not try again."""

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap for DDP; identity in one process and for a model FSDP already sharded."""

    def train_steps(self, cfg: Config, position: Position) -> Iterator[tuple[list[torch.Tensor], Position]]:
        """From `position` on, endlessly: this worker's micro-batches ((at most micro_batch_size, seq_len) int64
        tensors, `grad_accum_steps(cfg, world_size)` of them) of each next step, with the data position after that
        step's global batch."""

    def eval_blocks(self) -> dict[str, np.ndarray] | None:
        """This worker's share of each fixed eval set, (n, seq_len) with the same n on every rank, by source name
        ("": a one-source run), or None."""

    def sync(self) -> None:
        """Mirror run_dir to the run's storage when that is not a local path."""

    def preemption(self) -> tuple[float, int] | None:
        """(Seconds until a node of the run is reclaimed, the ranks on the nodes reclaimed), or None while none is;
        every rank calls at the same steps and gets the same answer (the soonest deadline any rank's clock gives:
        one host's clock ahead must not have it alone decide not to save)."""

    def room(self) -> int:
        """How many more training workers the cluster could hold now (asked on rank 0 alone)."""

    def storage_retries(self) -> int:
        """Requests to object storage tried again so far (`raypt.storage.retries`): this rank's, and on rank 0 also the
        data pipeline's."""


def train(cfg: Config, ctx: Context) -> dict:
    """Train from the run's latest checkpoint (or from the start) to train.max_steps / train.max_tokens, logging,
    evaluating and checkpointing as configured; export the model at the end. Returns the run's summary, or
    {"restart": "reclaim" | "grow", "step": ...} when the workers should start again elsewhere: a node of the run is
    being reclaimed, or an elastic run has room for more workers (`Training.check_cluster`)."""
    training = Training(cfg, ctx)
    t = cfg.train
    periodic = [Every(t.log_every, training.log, pauses=False), Every(t.eval_every, training.evaluate),
                Every(t.checkpoint_every, training.save),
                Every(training.cluster_check_every, training.check_cluster, at_end=False)]
    steps = ctx.train_steps(cfg, ctx.data.position)  # starts where the checkpoint's data ended
    training.model.train()
    while not (training.done or training.restart):
        t0 = time.perf_counter()
        micro, position = next(steps)
        training.input_wait += time.perf_counter() - t0  # (a rank waiting for its blocks: a stall in the pipeline)
        training.step(micro, position)
        due = [p for p in periodic if p.due(training.progress.step, training.done)]
        if due:  # host syncs anyway: never evaluate or save past a non-finite step
            training.guard.check()
        for p in due:
            t0 = time.perf_counter()
            p.action()
            if p.pauses:  # eval and checkpoint time is kept out of tokens/s
                training.t_log += time.perf_counter() - t0
    return training.leave() if training.restart else training.finish()


@dataclass
class Every:
    """An action taken every `steps` optimizer steps (0 or None: never) and after the last one."""

    steps: int | None | Callable[[], int | None]
    """(A callable: asked each step, for a cadence that changes.)"""
    action: Callable[[], None]
    pauses: bool = True
    """Whether its time is kept out of the training rate."""
    at_end: bool = True
    """Whether it is also taken after the last step."""

    def due(self, step: int, last: bool) -> bool:
        steps = self.steps() if callable(self.steps) else self.steps
        return (last and self.at_end) or bool(steps) and step % steps == 0


class BusyClock:
    """A rank's busy seconds: from each step's start to where the rank first waits for the others. On a GPU the host
    runs ahead of the device, and its clock would time kernel launches: there CUDA events on the compute stream time
    the work itself (read at log steps, which wait for the device anyway)."""

    def __init__(self, device: torch.device):
        self.cuda, self.seconds, self.pairs = device.type == "cuda", 0.0, []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, started) -> None:
        if self.cuda:
            self.pairs.append((started, self.mark()))
        else:
            self.seconds += time.perf_counter() - started

    def take(self) -> float:
        """The busy seconds since the last take."""
        for _, end in self.pairs:
            end.synchronize()
        seconds = self.seconds + sum(start.elapsed_time(end) for start, end in self.pairs) / 1e3
        self.seconds, self.pairs = 0.0, []
        return seconds


@dataclass
class Progress:
    """The loop's part of a checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed by all workers together."""

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}


SAVE_SHARE = 0.8
"""A checkpoint at a reclaim notice is written only when the last one took at most this share of the time left."""
NOTICES = {"GCP": 30, "AWS": 120}
"""Seconds of notice clouds give before reclaiming a spot VM."""


class Training:
    """One worker's training run: its model, optimizer, data position and checkpoints, set up (and resumed) on
    construction; `step` trains one global batch, `log`, `evaluate` and `save` are the periodic actions."""

    def __init__(self, cfg: Config, ctx: Context):
        from raypt.tokenizer import load_tokenizer, special_ids, tokenizer_path

        t, self.cfg, self.ctx, self.data = cfg.train, cfg, ctx, ctx.data
        self.retries_seen = ctx.storage_retries()  # (the retries of the resume below count in the first interval)
        self.tok = load_tokenizer(tokenizer_path(cfg))
        tc = cfg.tokenizer
        self.docs = (special_ids(self.tok, tc.add_bos, tc.add_eos, tc.bos_id, tc.eos_id) if cfg.data.document_masking
                     else None)
        self.ckpt = Checkpointer(ctx.storage, rank=ctx.rank, local_rank=ctx.local_rank,
                                 keep=cfg.run.checkpoints_to_keep,
                                 async_save=ctx.device.type == "cuda" if cfg.run.async_checkpoint is None
                                 else cfg.run.async_checkpoint)
        source, skipped = self.ckpt.source(cfg.run.resume_from)  # decided first: a checkpoint replaces the weights
        self.model, self.info = setup_model(cfg, ctx, self.tok, weights=source is None)
        self.optimizer = build_optimizer(self.model, t, ctx.device)
        self.metrics = MetricsLogger(ctx.run_dir, t.max_steps, enabled=ctx.rank == 0, loggers=cfg.run.loggers,
                                     name=cfg.run.name, config=cfg.to_dict())
        if source is None:
            self.progress, self.data.position = Progress(), Position()
        else:
            self.progress = self.resume(source, skipped)
        self.batch = global_batch_size(cfg)
        self.tokens_per_step = self.batch * cfg.data.seq_len
        self.autocast, self.one_row = parallel.autocast(t, ctx.device, self.model), packs_one_row(self.model)
        self.guard = StepGuard(t, ctx.device, ctx.rank, ctx.world_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.peak, self.config_yaml = peak_flops(ctx.device, t.peak_flops), cfg.to_yaml()
        self.dp_size = data_parallel_size(cfg, ctx.world_size)  # (a tensor-parallel group trains on one share)
        # the eval set is eval_batches micro-batches per worker of the largest group, the same blocks at any size
        self.eval_rows = -(-t.eval_batches * t.micro_batch_size * data_parallel_size(cfg) // self.dp_size)
        self.done = self.at_end()  # (a finished run started again trains no further step)
        self.steps_since_log, self.t_log, self.input_wait = 0, time.perf_counter(), 0.0
        self.busy = BusyClock(ctx.device)
        self.saved_step = None if source is None else self.progress.step  # (the step of the newest checkpoint)
        self.write_s, self.restart = None, None  # (write_s: the slowest rank's last complete save, seconds)
        self.reclaimed = 0  # (ranks on the nodes being reclaimed)
        self.check_every = 1  # (steps between cluster checks: from the step time, at log steps)
        sc = cfg.scaling
        self.may_grow = sc.elastic and ctx.grew_from < ctx.world_size < sc.max_workers  # (grew_from: see Context)
        self.loss_avg, self.last_eval, self.grad_norm, self.lr = None, None, None, None

    def resume(self, source: str, skipped: list[str]) -> Progress:
        """The checkpoint `source` (`Checkpointer.source`: newer incomplete ones `skipped`) loaded into the model,
        the optimizer and the data position. A checkpoint of other data is refused, or with run.data_changed:
        restart, keeps its model and optimizer and starts the new data's order from the beginning
        (`RunData.load_state_dict`)."""
        ctx, metrics = self.ctx, self.metrics
        t0 = time.perf_counter()
        saved, read = self.ckpt.restore(source, model=self.model, optimizer=self.optimizer)
        seconds = time.perf_counter() - t0
        read = torch.tensor(float(read), dtype=torch.float64, device=ctx.device)
        total = parallel.all_reduce(read.clone()).item()
        most = parallel.all_reduce(read, op=torch.distributed.ReduceOp.MAX).item()
        for why in skipped if metrics.enabled else ():
            emit(f"skipping {why}")
        name = source.rstrip("/").rsplit("/", 1)[-1]
        changes = self.data.load_state_dict(saved, name, self.cfg.run.data_changed)
        progress = Progress(saved["step"], saved["tokens_seen"])
        w, trained = ctx.world_size, metrics.last_step() if metrics.enabled else None
        retrained = max(0, trained - progress.step) if trained is not None else 0
        metrics.event(progress.step, f"resuming from {name} on {w} worker{'s' * (w > 1)}: step {progress.step}, "
                      f"{progress.tokens_seen:,} tokens seen, data at {self.data.where()}; {total / 1e6:,.1f} MB of "
                      f"saved state read ({most / 1e6:,.1f} MB by the busiest worker) in {seconds:.1f} s"
                      + (f"; {step_range(progress.step + 1, trained)} trained again" if retrained else ""),
                      resumed_from=source, workers=w, restore_bytes=int(total), restore_bytes_max=int(most),
                      restore_s=round(seconds, 3), steps_retrained=retrained,
                      **({"checkpoints_skipped": skipped} if skipped else {}))
        if changes:
            metrics.event(progress.step, f"DATA CHANGED since {name} ({'; '.join(changes)}): run.data_changed is "
                          "restart, so the model and optimizer go on and the new data is read from the start of its "
                          "order", data_changed=changes)
        return progress

    def step(self, micro: list[torch.Tensor], position) -> None:
        """One optimizer step over this rank's micro-batches of the global batch; `position`: the data's after it."""
        model, t, ctx, step = self.model, self.cfg.train, self.ctx, self.progress.step + 1
        started = self.busy.mark()
        faults.maybe_slow("slow", step, ctx.rank)  # (tests only: a straggler)
        nan = faults.is_nan(step, ctx.rank)  # (tests only: a NaN loss on this rank)
        step_loss = torch.zeros((), device=ctx.device)  # stays on the device until a log step
        for i, x in enumerate(micro):
            last = i == len(micro) - 1
            with parallel.accumulating(model, last, self.cfg.scaling.fsdp_sync_every_micro_batch), self.autocast:
                # (the model shifts the labels itself; no KV cache: training never reads one back, and each
                # layer's cache slot would make a compiled layer's graph that layer's alone)
                loss = weighted(model(**inputs(x, self.docs, self.one_row), use_cache=False).loss, len(x), self.batch,
                                self.dp_size)
            if nan:
                loss = loss * float("nan")
            if last:  # (under DDP a rank first waits for the others in this backward: the gradients' all-reduce)
                self.busy.add(started)
            loss.backward()
            step_loss += loss.detach()
        self.grad_norm = parallel.clip_grad_norm_(self.params, t.grad_clip)
        self.lr = set_lr(self.optimizer, step - 1, t)
        self.guard.step(self.optimizer, step, step_loss, self.grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step, self.progress.tokens_seen = step, self.progress.tokens_seen + self.tokens_per_step
        self.data.position = position
        faults.maybe_kill("step", step, ctx.rank)
        faults.maybe_drain(step, ctx.rank)
        self.steps_since_log += 1
        self.done = self.at_end()

    def at_end(self) -> bool:
        t, p = self.cfg.train, self.progress
        return p.step >= t.max_steps or (t.max_tokens is not None and p.tokens_seen >= t.max_tokens)

    def log(self) -> None:
        self.loss_avg = self.guard.mean_loss()
        seconds = time.perf_counter() - self.t_log
        tps = self.steps_since_log * self.tokens_per_step / seconds
        self.metrics.log(self.progress.step, {
            "loss": self.loss_avg, "lr": self.lr, "grad_norm": self.grad_norm.item(),
            "skipped_steps": self.guard.skipped or None, "tokens_seen": self.progress.tokens_seen,
            "tokens_per_s": tps, "mfu": mfu(self.info.flops_per_token, tps / self.ctx.world_size, self.peak),
            **self.rank_times(seconds), **self.data.passes(),
        })
        self.steps_since_log, self.t_log, self.input_wait = 0, time.perf_counter(), 0.0

    def rank_times(self, seconds: float) -> dict:
        """What held each rank up over its log interval (`seconds`: this rank's), gathered in one all-reduce of a
        (ranks x 4) table (16 KB at 512 ranks, once a log interval). Requests to storage the ranks and the data
        pipeline tried again (storage_retries: `raypt.storage`). The share of the interval the ranks waited for input:
        all together (input_wait), the rank that waited most and the one that waited least (every rank waits: the
        pipeline is short). And each rank's busy seconds per step, from the step's start to its last micro-batch's
        backward, where DDP's gradient all-reduce makes it wait for the other ranks (so the forwards and the earlier
        micro-batches' backwards: with one micro-batch a step, a slow device shows about a third of its lag): their
        mean, their most and that rank (slowest_rank: the straggler), and the share of a step the mean rank waits for
        it (straggler_wait). Under FSDP every layer's all-gather lines the ranks up, so busy time is not told apart
        from waiting there and is not logged. Sets the cluster checks' cadence from the slowest rank's interval, so
        every rank asks at the same steps."""
        ctx = self.ctx
        retries, self.retries_seen = (now := ctx.storage_retries()) - self.retries_seen, now
        table = torch.zeros(ctx.world_size, 4, dtype=torch.float64, device=ctx.device)
        table[ctx.rank] = torch.tensor([self.input_wait, seconds, self.busy.take(), retries], dtype=torch.float64)
        wait, interval, busy, retries = parallel.all_reduce(table).cpu().numpy().T
        if self.cfg.run.preemption_check_s:
            self.check_every = max(1, int(self.cfg.run.preemption_check_s * self.steps_since_log / interval.max()))
        share = wait / interval
        out = {"input_wait": wait.sum() / interval.sum(), "input_wait_max": share.max(), "input_wait_min": share.min(),
               "storage_retries": int(retries.sum())}
        if not parallel.is_sharded(self.model):
            step_s, busy = interval.max() / self.steps_since_log, busy / self.steps_since_log
            out.update(rank_busy_s_mean=busy.mean(), rank_busy_s_max=busy.max(), slowest_rank=int(busy.argmax()),
                       straggler_wait=(busy.max() - busy.mean()) / step_s)  # (the step share a rank waits for it)
        return {k: v if isinstance(v, int) else float(v) for k, v in out.items()}

    def evaluate(self) -> None:
        if result := evaluate(self.model, self.ctx, self.cfg.train.micro_batch_size, self.eval_rows, self.autocast,
                              self.docs):
            self.last_eval = result
            self.metrics.log(self.progress.step, result)

    def save(self) -> None:
        t0 = time.perf_counter()
        self.settle()
        path = self.settle(lambda: self.ckpt.save(model=self.model, optimizer=self.optimizer,
                                                  state={**self.progress.state_dict(), **self.data.state_dict()},
                                                  config_yaml=self.config_yaml, tokenizer=self.tok))
        if path is None:
            return
        self.saved_step = self.progress.step
        self.ctx.sync()
        seconds = time.perf_counter() - t0
        self.metrics.event(self.progress.step, f"saved {path.rsplit('/', 1)[-1]} in {seconds:.1f} s"
                           + (" (writing in the background)" if self.ckpt.async_save else ""),
                           checkpoint=path, checkpoint_s=round(seconds, 3))
        # the slowest rank's last complete write (a background one may not be done yet: then the one before), which a
        # reclaim notice is measured against; every rank takes part, whether or not its own has a figure yet
        mine = torch.tensor(self.ckpt.write_s or -1.0, dtype=torch.float64, device=self.ctx.device)
        write_s = parallel.all_reduce(mine, op=torch.distributed.ReduceOp.MAX).item()
        if write_s >= 0 and self.write_s is None:
            self.metrics.event(self.progress.step, f"a checkpoint takes {write_s:.1f} s to write: "
                               + fits_notices(write_s, self.cfg.train.checkpoint_every),
                               checkpoint_write_s=round(write_s, 3))
        self.write_s = write_s if write_s >= 0 else None

    def settle(self, action=None):
        """`action` (default: waiting for a checkpoint written in the background) with a checkpoint that could not be
        written (a full disk, storage failing past its retries: `CheckpointError`) handled as run.checkpoint_failed
        says: the run stops with its one line, or it is reported and training goes on (None returned) to try again
        at the next checkpoint step. Every rank meets such a failure alike (`Checkpointer` agrees on it)."""
        try:
            return (action or self.ckpt.wait)()
        except CheckpointError as e:
            if self.cfg.run.checkpoint_failed == "stop":
                raise
            self.saved_step = self.ckpt.complete_step  # (a background save may have failed)
            self.metrics.event(self.progress.step, f"CHECKPOINT FAILED: {e.message} (run.checkpoint_failed: continue, "
                               "so training goes on and tries again at the next checkpoint step)",
                               checkpoint_failed=e.message)
            return None

    def cluster_check_every(self) -> int | None:
        """Steps between cluster checks: about run.preemption_check_s seconds (None: never)."""
        return self.check_every if self.cfg.run.preemption_check_s else None

    def check_cluster(self) -> None:
        """Every `check_every` steps (about run.preemption_check_s seconds), ask whether a node of the run is being
        reclaimed (`check_preemption`), and whether an elastic run below its most workers has room for more. Room: a
        checkpoint at this step, and the workers leave (`leave`) for the driver to start a larger group from it."""
        if self.done:
            return
        if (notice := self.ctx.preemption()) is not None:
            self.check_preemption(*notice)
            return
        if not self.may_grow:
            return
        mine = torch.tensor(self.ctx.room() if self.ctx.rank == 0 else 0, device=self.ctx.device)
        if (more := int(parallel.all_reduce(mine, op=torch.distributed.ReduceOp.MAX).item())) < 1:
            return
        self.restart, step = "grow", self.progress.step
        self.metrics.event(step, f"room for {more} more worker{'s' * (more > 1)}: checkpoint at step {step}, then the "
                           "workers start again on the larger cluster", grow=more)
        self.checkpoint_now(self.saved_step != step)

    def check_preemption(self, left: float, ranks: int) -> None:
        """A node of the run, with `ranks` of its ranks, is reclaimed in `left` seconds: a checkpoint at this step
        (unless one was just saved), written out at once, and the workers leave (`leave`): the driver starts them
        again on the nodes left, from this checkpoint, without waiting for the deadline, so no step is trained twice.
        No checkpoint when the last one took longer to write than the notice leaves: the restart resumes from that
        one instead."""
        self.restart, step, save = "reclaim", self.progress.step, self.saved_step != self.progress.step
        self.reclaimed = ranks
        if save and self.write_s is not None and self.write_s > SAVE_SHARE * left:  # (it would be lost half-written)
            save, last = False, "the start" if self.saved_step is None else f"step {self.saved_step}"
            self.metrics.event(step, f"a node of the run is being reclaimed ({left:.0f} s left): NO TIME TO CHECKPOINT "
                               f"(the last one took {self.write_s:.0f} s to write); the restart resumes from {last} "
                               f"and trains {step_range((self.saved_step or 0) + 1, step)} again",
                               preemption_notice=True, deadline_s=round(left, 1), checkpoint_skipped=True)
        else:
            self.metrics.event(step, f"a node of the run is being reclaimed ({left:.0f} s left): checkpoint at step "
                               f"{step}, then the workers start again on the nodes left", preemption_notice=True,
                               deadline_s=round(left, 1))
        self.checkpoint_now(save)

    def checkpoint_now(self, save: bool) -> None:
        """Before the workers leave: this step's checkpoint (`save`), and any still being written in the background,
        complete. One that fails (a rank of a reclaimed node gone mid-save) is reported and the restart resumes from
        the last complete one: failing here would charge a reclaim or a growth to run.max_failures."""
        try:
            if save:
                self.save()
            self.settle()
        except Exception as e:  # noqa: BLE001
            emit(f"the checkpoint before the restart did not complete ({type(e).__name__}: {e}); the restart resumes "
                 "from the last complete one")

    def leave(self) -> dict:
        """End this worker group early, for a reclaim or to grow: its checkpoints written, its metrics out. The driver
        starts a new group (`raypt.train.run`), which resumes from the newest checkpoint."""
        self.settle()
        self.metrics.close()
        self.ctx.sync()
        return {"restart": self.restart, "step": self.progress.step, "workers": self.ctx.world_size,
                "reclaimed": self.reclaimed}

    def finish(self) -> dict:
        """Wait for the last checkpoint, export the model, make the sample and the report; the run's summary."""
        cfg, ctx = self.cfg, self.ctx
        self.settle()
        self.metrics.close()
        export(cfg, ctx.rank, ctx.run_dir, self.model, self.tok)
        text = end_sample(cfg, self.model, self.tok, self.autocast)
        if ctx.rank == 0 and cfg.run.report:
            write_report(ctx.run_dir)
        ctx.sync()
        return {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen, "final_loss": self.loss_avg,
                **(self.last_eval or {}), **({"sample": text} if text is not None else {})}


def step_range(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def fits_notices(write_s: float, checkpoint_every: int | None) -> str:
    """Which clouds' reclaim notices (`NOTICES`) a checkpoint written in `write_s` seconds fits, and what a notice
    too short for it costs."""
    short = [f"{cloud}'s ~{s} s" for cloud, s in NOTICES.items() if write_s > SAVE_SHARE * s]
    if not short:
        return f"fits a spot VM's reclaim notice ({', '.join(f'{c} ~{s} s' for c, s in NOTICES.items())})"
    every = f"up to {checkpoint_every} steps" if checkpoint_every else "everything since the start"
    return (f"too long for {' and '.join(short)} reclaim notice: a reclaim there falls back to the last periodic "
            f"checkpoint and trains {every} again (train.checkpoint_every)")


def inputs(x: torch.Tensor, docs: tuple[int | None, int | None] | None, one_row: bool = False) -> dict:
    """The model's inputs for a micro-batch of blocks: labels = input_ids (the model shifts them itself), and with
    document masking (`docs`: the BOS and EOS ids) position ids that restart at every document.

    `one_row` (`packs_one_row`: flash-attention) lays the micro-batch out as one row of all its documents with their
    boundaries (`cu_seq_lens_*`, `max_length_*`): transformers' flash path reads documents from position ids only in
    a batch of one row, and would otherwise attend across documents while RoPE restarts. The loss is the batched
    one's: each block's first token is predicted by nothing (not by the previous block's last)."""
    if docs is None:
        return {"input_ids": x, "labels": x}
    position_ids, labels = document_inputs(x, *docs)
    if not one_row:
        return {"input_ids": x, "labels": labels, "position_ids": position_ids}
    labels[:, 0] = IGNORE
    flat = position_ids.reshape(1, -1)  # (1, batch * seq)
    positions = flat[0].cpu()  # one host sync a micro-batch (flash would make one in every layer)
    starts = (positions == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([len(positions)])]).to(torch.int32)
    longest = int(cu.diff().max())
    cu = cu.to(x.device)
    return {"input_ids": x.reshape(1, -1), "labels": labels.reshape(1, -1), "position_ids": flat,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packs_one_row(model) -> bool:
    """Whether document masking must lay a micro-batch out as one row (`inputs`): flash-attention finds packed
    documents in one row only; SDPA, eager and flex attention mask them in any batch (their masks grow with the row)."""
    return hf_model(unwrap(model)).config._attn_implementation.startswith("flash_attention")


def document_inputs(x: torch.Tensor, bos_id: int | None, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids, labels) of packed blocks `x` (batch, seq) whose documents must not see each other. A document
    starts where the packer put a BOS (`raypt.packing.concat_documents`), or after an EOS when documents get no BOS;
    position ids count from 0 at each start, which Hugging Face models turn into a block-diagonal causal mask (SDPA,
    eager, flex) or flash-attention's varlen path; the label of a start inside the block is IGNORE, so no document's
    first token is predicted from the one before it. A block's first token always starts a (piece of a) document."""
    start = torch.zeros_like(x, dtype=torch.bool)
    if bos_id is not None:
        start = x == bos_id
    else:
        start[:, 1:] = x[:, :-1] == eos_id
    start[:, 0] = True
    index = torch.arange(x.shape[1], device=x.device).expand_as(x)
    position_ids = index - torch.where(start, index, 0).cummax(dim=1).values
    labels = x.masked_fill(start & (index > 0), IGNORE)
    return position_ids, labels


def micro_batches(rows: torch.Tensor, cfg: Config, world_size: int) -> list[torch.Tensor]:
    """A rank's rows of one step cut into its micro-batches: as even as can be, the same count on every rank."""
    return list(rows.tensor_split(grad_accum_steps(cfg, world_size)))


def weighted(loss: torch.Tensor, rows: int, batch: int, dp_size: int) -> torch.Tensor:
    """A micro-batch's mean loss weighted by its share of the global batch, times the data-parallel size (DDP and
    FSDP average gradients over those ranks; the ranks of a tensor-parallel group share one loss): ranks holding
    different numbers of rows still add up to the batch's mean. When the batch splits evenly this is loss /
    accumulation steps."""
    return loss / (batch / (dp_size * rows))


def setup_model(cfg: Config, ctx: Context, tok, weights: bool = True):
    """The model on this worker: whole and wrapped in DDP, or built sharded by FSDP2 (never whole on any rank).
    `weights=False`: a checkpoint fills them (`build_model`)."""
    bf16 = parallel.bf16_compute(cfg.train, ctx.device)
    shard = (parallel.fsdp_sharder(cfg.scaling, ctx.device, ctx.world_size, bf16) if cfg.scaling.strategy == "fsdp"
             else None)
    model, info = build_model(cfg.model, vocab_size=len(tok), seq_len=cfg.data.seq_len, device=ctx.device,
                              tokenizer=tok, seed=cfg.run.seed, shard=shard, rank=ctx.rank, weights=weights)
    compiled = compiling(cfg, ctx.device)
    if compiled:
        parallel.compile_layers(model)
    if ctx.rank == 0:
        emit(f"model: {info.total_params:,} parameters, {info.trainable_params:,} trainable "
             f"({100 * info.trainable_params / info.total_params:.2f}%), {info.flops_per_token / 1e6:,.1f} MFLOPs/token"
             + (f", FSDP2 over {ctx.world_size} workers" if shard else "") + (", compiled layers" if compiled else "")
             + f", fp32 weights, {'bf16' if bf16 else 'fp32'} compute")
    return ctx.prepare(model), info


def compiling(cfg: Config, device: torch.device) -> bool:
    """train.compile, or its default: on GPU for a model that is not 4-bit."""
    if cfg.train.compile is not None:
        return cfg.train.compile
    return device.type == "cuda" and not cfg.model.quantize


@torch.no_grad()
def evaluate(model, ctx: Context, micro_batch_size: int, max_rows: int, autocast, docs=None) -> dict | None:
    """Mean loss and perplexity over this worker's eval blocks (at most `max_rows` of each set), averaged over all
    ranks by token count: eval_loss and eval_ppl over every set, and eval_loss/NAME, eval_ppl/NAME for each source of
    a mixture. `docs`: document masking's BOS and EOS ids (`inputs`)."""
    sets = ctx.eval_blocks()
    if sets is None:
        return None
    model.eval()
    sums = {name: _eval_sums(model, ctx, blocks[:max_rows], micro_batch_size, autocast, docs)
            for name, blocks in sets.items()}
    model.train()
    totals = {"": [sum(v) for v in zip(*sums.values())]}  # every set together; then each source's own
    if len(sums) > 1 or "" not in sums:
        totals.update(sums)
    out = {}
    for name, (loss_sum, n) in totals.items():
        if n:
            suffix = f"/{name}" if name else ""
            out.update({f"eval_loss{suffix}": loss_sum / n, f"eval_ppl{suffix}": math.exp(min(loss_sum / n, 50))})
    return out or None


def _eval_sums(model, ctx: Context, blocks: np.ndarray, micro_batch_size: int, autocast, docs) -> list[float]:
    """(loss x predicted tokens, predicted tokens) of an eval set, summed over all ranks. Every rank runs the same
    number of forwards (FSDP gathers parameters collectively): a rank with fewer blocks (an elastic group whose size
    does not divide the eval set) repeats its first micro-batch, counted zero."""
    mine = -(-len(blocks) // micro_batch_size)
    forwards = int(parallel.all_reduce(torch.tensor(mine, device=ctx.device), op=torch.distributed.ReduceOp.MAX))
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    one_row = packs_one_row(model)
    for i in range(forwards):
        rows = blocks[i * micro_batch_size : (i + 1) * micro_batch_size] if i < mine else blocks[:micro_batch_size]
        x = torch.tensor(rows, dtype=torch.long, device=ctx.device)  # (a read-only view)
        batch = inputs(x, docs, one_row)
        with autocast:
            loss = unwrap(model)(**batch, use_cache=False).loss  # DDP: the module; FSDP: the sharded one
        n = (batch["labels"][:, 1:] != IGNORE).sum().double() * (i < mine)  # predicted positions
        total += torch.stack([loss.double() * n, n])
    return parallel.all_reduce(total).tolist()


class LocalContext:
    """One process, no Ray: blocks from memory, checkpoints in `run_dir`. For tests and debugging."""

    rank, local_rank, world_size, grew_from = 0, 0, 1, 0

    def __init__(self, run_dir: Path, train_blocks: np.ndarray, eval_blocks: np.ndarray | None = None,
                 device: str = "cpu"):
        self.run_dir, self.device = Path(run_dir), torch.device(device)
        self.storage = str(self.run_dir)
        self.data = RunData([], None)  # (the blocks as given: no fingerprint to check)
        self._train, self._eval = train_blocks, eval_blocks

    def prepare(self, model):
        return model

    def sync(self) -> None:
        pass

    def preemption(self) -> tuple[float, int] | None:
        return None

    def room(self) -> int:
        return 0

    def storage_retries(self) -> int:
        return storage.retries()

    def train_steps(self, cfg: Config, position: Position):
        """The blocks as one unit, in the run's order."""
        min_blocks, seed = order_args(cfg)
        units = [Unit(0, len(self._train), self._train)]
        windows = stream_windows(lambda epoch, first: units[first:], position, min_blocks)
        for rows, pos in RankStream(windows, position.offset, global_batch_size(cfg), self.rank, self.world_size, seed):
            mine = torch.as_tensor(gather(rows, lambda u: u.data), dtype=torch.long, device=self.device)
            yield micro_batches(mine, cfg, self.world_size), pos

    def eval_blocks(self):
        return None if self._eval is None else {"": self._eval}
