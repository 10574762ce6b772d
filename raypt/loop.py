"""The per-worker causal-LM loop: setup -> train steps -> eval -> checkpoint -> export.

Everything Ray-specific sits behind `Context` (rank, device, data, report, restore), so the same `train` runs in one
plain process in a unit test (`LocalContext`) and on every Ray Train worker (`raypt.train.RayContext`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from raypt import checkpoint, faults
from raypt.checkpoint import TrainState
from raypt.config import Config, global_batch_size, grad_accum_steps
from raypt.feed import Position, global_batches, rank_slice, rows_from, shuffle_args
from raypt.metrics import MetricsLogger, emit, mfu, peak_flops
from raypt.model import build_model, unwrap
from raypt.optim import build_optimizer, set_lr



class NonFiniteError(RuntimeError):
    """Training met a NaN/inf loss or gradient norm."""


class Context(Protocol):
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    """Local directory for metrics and the final model (rank 0 writes)."""
    storage: str
    """The run's directory on its storage (path or URI): checkpoints are written and looked for there."""

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap for data parallelism (DDP/FSDP); identity in one process."""

    def train_steps(self, cfg: Config, position: Position, step: int) -> Iterator[tuple[list[torch.Tensor], Position]]:
        """From `position` on, endlessly: this worker's micro-batches ((micro_batch_size, seq_len) int64 tensors) of
        each next step (`step + 1`, ...), with the data position after that step's global batch."""

    def eval_blocks(self) -> np.ndarray | None:
        """This worker's share of the fixed eval set, (n, seq_len), or None."""

    def sync(self) -> None:
        """Mirror run_dir to the run's storage when that is not a local path."""


def _all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=op)
    return x


def train(cfg: Config, ctx: Context) -> dict:
    from raypt.tokenizer import load_tokenizer, tokenizer_path

    t = cfg.train
    rank0 = ctx.rank == 0
    tok = load_tokenizer(tokenizer_path(cfg))
    model, info = build_model(cfg.model, vocab_size=len(tok), seq_len=cfg.data.seq_len, device=ctx.device,
                              tokenizer=tok, seed=cfg.run.seed)
    if rank0:
        emit(f"model: {info.total_params:,} parameters, {info.trainable_params:,} trainable "
             f"({100 * info.trainable_params / info.total_params:.2f}%), {info.flops_per_token / 1e6:,.1f} MFLOPs/token")
    model = ctx.prepare(model)
    optimizer = build_optimizer(model, t, ctx.device)
    metrics = MetricsLogger(ctx.run_dir, t.max_steps, enabled=rank0)
    state = TrainState()
    skipped: list[str] = []
    source = checkpoint.latest(ctx.storage, skipped)  # complete by construction; the run's own ones win
    if source is None and cfg.run.resume_from:
        source = cfg.run.resume_from
        checkpoint.check(source)
    if source:
        with checkpoint.local_copy(source) as d:
            state = checkpoint.load(d, model=model, optimizer=optimizer)
        if rank0:
            for why in skipped:
                emit(f"skipping {why}")
            name = source.rstrip("/").rsplit("/", 1)[-1]
            metrics.event(state.step, f"resuming from {name}: step {state.step}, {state.tokens_seen:,} tokens "
                          f"seen, data at epoch {state.epoch}, unit {state.unit}, block {state.offset}",
                          resumed_from=source)

    accum = grad_accum_steps(cfg)
    tokens_per_step = global_batch_size(cfg) * cfg.data.seq_len
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda"
                else contextlib.nullcontext())  # fp32 on CPU
    params = [p for p in model.parameters() if p.requires_grad]
    peak = peak_flops(ctx.device, t.peak_flops)
    config_yaml = cfg.to_yaml()

    def done() -> bool:
        return state.step >= t.max_steps or (t.max_tokens is not None and state.tokens_seen >= t.max_tokens)

    nan_step = faults.nan_step(ctx.rank)  # tests only: a NaN loss at this step on this rank
    steps = ctx.train_steps(cfg, state.position, state.step)  # starts where the checkpoint's data ended
    model.train()
    loss_sum = torch.zeros((), device=ctx.device)  # stays on the device until a log step
    # Non-finite guard without a per-step host sync: fused AdamW skips its update when `found_inf` is set (the
    # mechanism GradScaler uses); the flags are read at log steps.
    bad_steps = torch.zeros((), dtype=torch.int64, device=ctx.device)  # steps whose update was skipped
    first_bad = torch.full((), -1, dtype=torch.int64, device=ctx.device)
    local_bad = torch.zeros((), dtype=torch.bool, device=ctx.device)  # this rank's own loss was non-finite
    good_steps = torch.zeros((), dtype=torch.int64, device=ctx.device)  # finite steps since the last log
    steps_since_log, t_log = 0, time.perf_counter()
    last_eval, loss_avg = None, None
    while not done():
        micro, position = next(steps)
        step_loss = torch.zeros((), device=ctx.device)
        for i, x in enumerate(micro):
            sync = i == accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                loss = model(input_ids=x, labels=x).loss / accum  # the model shifts labels itself
            if state.step + 1 == nan_step:
                loss = loss * float("nan")
            loss.backward()
            step_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
        bad = ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
        local_bad |= ~torch.isfinite(step_loss)
        first_bad = torch.where(bad & (first_bad < 0), state.step + 1, first_bad)
        bad_steps += bad
        # stop mode: no update at all once a bad step was seen; skip mode: only that step's update is dropped
        skip = bad if t.nonfinite == "skip" else first_bad >= 0
        lr = set_lr(optimizer, state.step, t)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = skip.float()
            optimizer.step()
        elif not skip.item():  # unfused optimizers cannot skip on the device
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += torch.where(bad, 0.0, step_loss)
        good_steps += ~bad
        state.step += 1
        state.position = position
        faults.maybe_kill("step", state.step, ctx.rank)
        state.tokens_seen += tokens_per_step
        steps_since_log += 1

        log_now = state.step % t.log_every == 0 or done()
        eval_now = (t.eval_every and state.step % t.eval_every == 0) or done()
        ckpt_now = (t.checkpoint_every and state.step % t.checkpoint_every == 0) or done()
        if log_now or eval_now or ckpt_now:  # host syncs anyway: never evaluate or save past a non-finite step
            bad_ranks = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.device)
            bad_ranks[ctx.rank] = local_bad.long()
            _all_reduce(bad_ranks)
            flags = torch.cat([torch.stack([bad_steps, first_bad]), bad_ranks]).tolist()
            check_finite(t, flags[0], flags[1], [r for r, b in enumerate(flags[2:]) if b])
        if log_now:
            good = int(good_steps)  # steps since the last log whose update was not skipped
            loss_avg = _all_reduce(loss_sum.clone()).item() / (ctx.world_size * good) if good else None
            elapsed = time.perf_counter() - t_log
            tps = steps_since_log * tokens_per_step / elapsed
            metrics.log(state.step, {
                "loss": loss_avg, "lr": lr, "grad_norm": grad_norm.item(),
                "skipped_steps": int(bad_steps) or None,
                "tokens_seen": state.tokens_seen, "tokens_per_s": tps,
                "mfu": mfu(info.flops_per_token, tps / ctx.world_size, peak),
            })
            loss_sum.zero_()
            good_steps.zero_()
            steps_since_log, t_log = 0, time.perf_counter()
        t_pause = time.perf_counter()  # eval and checkpoint time is kept out of tokens/s
        if eval_now:
            last_eval = evaluate(model, ctx, t.micro_batch_size, t.eval_batches, autocast)
            if last_eval is not None:
                metrics.log(state.step, last_eval)
        if ckpt_now:
            t_ckpt = time.perf_counter()
            path = checkpoint.save(ctx.storage, model=model, optimizer=optimizer, state=state,
                                   config_yaml=config_yaml, tokenizer=tok, is_rank0=rank0,
                                   keep=cfg.run.checkpoints_to_keep)
            ctx.sync()
            seconds = time.perf_counter() - t_ckpt
            metrics.event(state.step, f"saved {path.rsplit('/', 1)[-1]} in {seconds:.1f} s",
                          checkpoint=path, checkpoint_s=round(seconds, 3))
        t_log += time.perf_counter() - t_pause

    metrics.close()
    export(cfg, ctx, model, tok)
    ctx.sync()
    return {"step": state.step, "tokens_seen": state.tokens_seen, "final_loss": loss_avg, **(last_eval or {})}


def check_finite(t, bad_steps: int, first_bad: int, bad_ranks: list[int]) -> None:
    """Raise when the run met non-finite values it may not go on with (called at log steps: the only host sync).
    Every rank raises the same message, naming the ranks whose own loss was non-finite."""
    if bad_steps == 0 or (t.nonfinite == "skip" and bad_steps <= t.max_skipped_steps):
        return
    where = f"loss on rank {', '.join(map(str, bad_ranks))}" if bad_ranks else "gradient norm"
    if t.nonfinite == "skip":
        raise NonFiniteError(f"{bad_steps} steps with a non-finite loss or gradient norm, more than "
                             f"train.max_skipped_steps={t.max_skipped_steps}; the first at step {first_bad} "
                             f"(non-finite {where}). Lower train.lr, check the data, or raise the limit")
    raise NonFiniteError(f"non-finite {where} at step {first_bad}; training stopped with no update applied from "
                         "that step on. Lower train.lr or check the data; train.nonfinite: skip drops such steps and "
                         "goes on")


@torch.no_grad()
def evaluate(model, ctx: Context, micro_batch_size: int, max_batches: int, autocast) -> dict | None:
    """Mean loss and perplexity over this worker's eval blocks, averaged over all ranks by token count."""
    blocks = ctx.eval_blocks()
    if blocks is None:
        return None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (loss x tokens, tokens)
    for i in range(0, min(len(blocks), micro_batch_size * max_batches), micro_batch_size):
        x = torch.as_tensor(blocks[i : i + micro_batch_size], dtype=torch.long, device=ctx.device)
        with autocast:
            loss = unwrap(model)(input_ids=x, labels=x).loss
        n = x.shape[0] * (x.shape[1] - 1)  # predicted positions
        total += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=ctx.device)])
    model.train()
    loss_sum, n = _all_reduce(total).tolist()
    if n == 0:
        return None
    return {"eval_loss": loss_sum / n, "eval_ppl": math.exp(min(loss_sum / n, 50))}


def export(cfg: Config, ctx: Context, model, tok) -> None:
    """`run_dir/final`: a model AutoModelForCausalLM loads, plus the tokenizer; LoRA also leaves `final/adapter`
    (PeftModel loads it). QLoRA merges into the base reloaded unquantized in bf16."""
    sd, _ = checkpoint.gather(model)
    if ctx.rank != 0:
        return
    final = ctx.run_dir / "final"
    inner = unwrap(model)
    if not cfg.model.lora:
        checkpoint.save_weights(inner, final, sd)
    else:
        inner.save_pretrained(final / "adapter", state_dict=sd, safe_serialization=True)
        if cfg.model.quantize:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            from raypt.model import local_model_dir

            base = AutoModelForCausalLM.from_pretrained(local_model_dir(cfg.model.name_or_path), dtype=torch.bfloat16,
                                                        trust_remote_code=cfg.model.trust_remote_code)
            merged = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload()
        else:
            merged = inner.merge_and_unload()
        merged.save_pretrained(final, safe_serialization=True)
    tok.save_pretrained(final)
    (final / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")


class LocalContext:
    """One process, no Ray: blocks from memory, checkpoints in `run_dir`. For tests and debugging."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: Path, train_blocks: np.ndarray, eval_blocks: np.ndarray | None = None,
                 device: str = "cpu"):
        self.run_dir, self.device = Path(run_dir), torch.device(device)
        self.storage = str(self.run_dir)
        self._train, self._eval = train_blocks, eval_blocks

    def prepare(self, model):
        return model

    def sync(self) -> None:
        pass

    def train_steps(self, cfg: Config, position: Position, step: int):
        """The blocks as one unit, in the run's order."""
        blocks = {"input_ids": self._train, "unit": np.zeros(len(self._train), np.int64)}
        rows = rows_from(lambda first_unit: [blocks], position, *shuffle_args(cfg))
        batches = global_batches(rows, global_batch_size(cfg))
        accum = grad_accum_steps(cfg)
        for batch, pos in batches:
            mine = torch.as_tensor(rank_slice(batch, self.rank, self.world_size), dtype=torch.long, device=self.device)
            yield list(mine.chunk(accum)), pos

    def eval_blocks(self):
        return self._eval
