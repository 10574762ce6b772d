"""The per-worker causal-LM loop: setup -> train steps -> eval -> checkpoint -> export.

Everything Ray-specific sits behind `Context` (rank, device, data, report, restore), so the same `train` runs in one
plain process in a unit test (`LocalContext`) and on every Ray Train worker (`raypt.train.RayContext`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from raypt import faults, parallel
from raypt.checkpoint import Checkpointer, TrainState, full_model_state
from raypt.config import Config, global_batch_size, grad_accum_steps, sources
from raypt.stream import (MixPosition, Position, RankStream, Unit, fingerprint_changes, gather, order_args,
                          stream_windows)
from raypt.loss import IGNORE
from raypt.metrics import MetricsLogger, emit, mfu, peak_flops
from raypt.model import build_model, hf_model, unwrap
from raypt.optim import NonFiniteError, StepGuard, build_optimizer, set_lr

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
    data_fingerprint: dict | None
    """What the training data order depends on (`raypt.data.fingerprint`), checked against a checkpoint's on resume;
    None: not checked."""

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap for DDP; identity in one process and for a model FSDP already sharded."""

    def train_steps(self, cfg: Config, position: Position, step: int) -> Iterator[tuple[list[torch.Tensor], Position]]:
        """From `position` on, endlessly: this worker's micro-batches ((at most micro_batch_size, seq_len) int64
        tensors, `grad_accum_steps(cfg, world_size)` of them) of each next step (`step + 1`, ...), with the data
        position after that step's global batch."""

    def eval_blocks(self) -> dict[str, np.ndarray] | None:
        """This worker's share of each fixed eval set, (n, seq_len) with the same n on every rank, by source name
        ("": a one-source run), or None."""

    def sync(self) -> None:
        """Mirror run_dir to the run's storage when that is not a local path."""


def train(cfg: Config, ctx: Context) -> dict:
    from raypt.tokenizer import load_tokenizer, special_ids, tokenizer_path

    t, rank0 = cfg.train, ctx.rank == 0
    tok = load_tokenizer(tokenizer_path(cfg))
    tc = cfg.tokenizer
    docs = special_ids(tok, tc.add_bos, tc.add_eos, tc.bos_id, tc.eos_id) if cfg.data.document_masking else None
    ckpt = Checkpointer(ctx.storage, rank=ctx.rank, local_rank=ctx.local_rank, keep=cfg.run.checkpoints_to_keep,
                        async_save=ctx.device.type == "cuda" if cfg.run.async_checkpoint is None
                        else cfg.run.async_checkpoint)
    source, skipped = ckpt.source(cfg.run.resume_from)  # decided first: a checkpoint replaces the weights read
    model, info = setup_model(cfg, ctx, tok, weights=source is None)
    optimizer = build_optimizer(model, t, ctx.device)
    metrics = MetricsLogger(ctx.run_dir, t.max_steps, enabled=rank0, loggers=cfg.run.loggers, name=cfg.run.name,
                            config=cfg.to_dict())
    state = resume(cfg, ctx, ckpt, source, skipped, model, optimizer, metrics)

    batch = global_batch_size(cfg)
    tokens_per_step = batch * cfg.data.seq_len
    autocast, one_row = parallel.autocast(t, ctx.device, model), packs_one_row(model)
    guard = StepGuard(t, ctx.device, ctx.rank, ctx.world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    peak, config_yaml = peak_flops(ctx.device, t.peak_flops), cfg.to_yaml()
    # the eval set is eval_batches micro-batches per worker of the largest group, the same blocks at any size
    eval_rows = -(-t.eval_batches * t.micro_batch_size * cfg.scaling.max_workers // ctx.world_size)
    nan_steps = faults.nan_steps(ctx.rank)  # tests only: a NaN loss at these steps on this rank
    steps = ctx.train_steps(cfg, state.position, state.step)  # starts where the checkpoint's data ended
    model.train()
    steps_since_log, t_log, last_eval, loss_avg, last = 0, time.perf_counter(), None, None, False
    while not last:
        micro, position = next(steps)
        step_loss = torch.zeros((), device=ctx.device)  # stays on the device until a log step
        for i, x in enumerate(micro):
            with parallel.accumulating(model, i == len(micro) - 1, cfg.scaling.fsdp_sync_every_micro_batch), autocast:
                # (the model shifts the labels itself; no KV cache: training never reads one back, and each
                # layer's cache slot would make a compiled layer's graph that layer's alone)
                loss = weighted(model(**inputs(x, docs, one_row), use_cache=False).loss, len(x), batch, ctx.world_size)
            if state.step + 1 in nan_steps:
                loss = loss * float("nan")
            loss.backward()
            step_loss += loss.detach()
        grad_norm = parallel.clip_grad_norm_(params, t.grad_clip)
        lr = set_lr(optimizer, state.step, t)
        guard.step(optimizer, state.step + 1, step_loss, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        state.step, state.position, state.tokens_seen = state.step + 1, position, state.tokens_seen + tokens_per_step
        faults.maybe_kill("step", state.step, ctx.rank)
        steps_since_log += 1
        last = state.step >= t.max_steps or (t.max_tokens is not None and state.tokens_seen >= t.max_tokens)

        log_now = state.step % t.log_every == 0 or last
        eval_now = (t.eval_every and state.step % t.eval_every == 0) or last
        ckpt_now = (t.checkpoint_every and state.step % t.checkpoint_every == 0) or last
        if log_now or eval_now or ckpt_now:  # host syncs anyway: never evaluate or save past a non-finite step
            guard.check()
        if log_now:
            loss_avg, tps = guard.mean_loss(), steps_since_log * tokens_per_step / (time.perf_counter() - t_log)
            metrics.log(state.step, {
                "loss": loss_avg, "lr": lr, "grad_norm": grad_norm.item(), "skipped_steps": guard.skipped or None,
                "tokens_seen": state.tokens_seen, "tokens_per_s": tps,
                "mfu": mfu(info.flops_per_token, tps / ctx.world_size, peak), **passes(cfg, position),
            })
            steps_since_log, t_log = 0, time.perf_counter()
        t_pause = time.perf_counter()  # eval and checkpoint time is kept out of tokens/s
        if eval_now and (last_eval := evaluate(model, ctx, t.micro_batch_size, eval_rows, autocast, docs)):
            metrics.log(state.step, last_eval)
        if ckpt_now:
            t_ckpt = time.perf_counter()
            path = ckpt.save(model=model, optimizer=optimizer, state=state, config_yaml=config_yaml, tokenizer=tok)
            ctx.sync()
            seconds = time.perf_counter() - t_ckpt
            metrics.event(state.step, f"saved {path.rsplit('/', 1)[-1]} in {seconds:.1f} s"
                          + (" (writing in the background)" if ckpt.async_save else ""),
                          checkpoint=path, checkpoint_s=round(seconds, 3))
        t_log += time.perf_counter() - t_pause

    ckpt.wait()
    metrics.close()
    export(cfg, ctx, model, tok)
    text = end_sample(cfg, model, tok, autocast)
    if rank0 and cfg.run.report:
        write_report(ctx.run_dir)
    ctx.sync()
    return {"step": state.step, "tokens_seen": state.tokens_seen, "final_loss": loss_avg, **(last_eval or {}),
            **({"sample": text} if text is not None else {})}


def end_sample(cfg: Config, model, tok, autocast) -> str | None:
    """The run's sample: train.sample_tokens of greedy continuation of train.sample_prompt by the trained model,
    made where it already is (on the workers' devices; the driver, on a head with less memory than the model, never
    loads it). Every rank takes part: under FSDP each forward gathers the layers, so every rank makes all the tokens
    (none stops at an EOS before the others). Compiled layers run eagerly here: a few forwards of growing length are
    not worth new graphs."""
    from types import SimpleNamespace

    from raypt.generate import generate

    n = cfg.train.sample_tokens
    if not n:
        return None
    inner = unwrap(model)
    inner.eval()
    with autocast, torch.compiler.set_stance("force_eager"):
        return generate(SimpleNamespace(model=inner, tokenizer=tok), cfg.train.sample_prompt or "The ",
                        max_new_tokens=n, temperature=0, top_p=1, seed=0,
                        min_new_tokens=n if parallel.is_sharded(model) else None)


def write_report(run_dir: Path) -> None:
    """run_dir/report (`raypt.report`); a failure to plot is reported, never the end of a finished run."""
    from raypt.report import write

    try:
        emit(f"report: {write([str(run_dir)])}")
    except Exception as e:  # noqa: BLE001 (the model is saved; the report can be made again with raypt.report)
        emit(f"WARNING: no report ({type(e).__name__}: {e}); make it with `python -m raypt.report {run_dir}`")


def passes(cfg: Config, position) -> dict:
    """A mixture's pass over each source (1: the first) at the start of the current mixture window, pass/NAME: how
    often a small source has been upsampled."""
    if not isinstance(position, MixPosition):
        return {}
    return {f"pass/{src.name}": p.epoch + 1 for src, p in zip(sources(cfg), position.sources)}


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


def weighted(loss: torch.Tensor, rows: int, batch: int, world_size: int) -> torch.Tensor:
    """A micro-batch's mean loss weighted by its share of the global batch, times the world size (DDP and FSDP
    average gradients over the ranks): ranks holding different numbers of rows still add up to the batch's mean.
    When the batch splits evenly this is loss / accumulation steps."""
    return loss / (batch / (world_size * rows))


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


def resume(cfg: Config, ctx: Context, ckpt: Checkpointer, source: str | None, skipped: list[str], model, optimizer,
           metrics: MetricsLogger) -> TrainState:
    """The checkpoint `source` (`Checkpointer.source`: newer incomplete ones `skipped`) loaded into model and
    optimizer; without one a fresh state. A checkpoint whose data fingerprint differs from the context's is refused,
    or with run.data_changed: restart, keeps its model and optimizer and starts the new data's order from the
    beginning."""
    fingerprint, world_size = ctx.data_fingerprint, ctx.world_size
    if source is None:
        return TrainState(data=fingerprint)
    t0 = time.perf_counter()
    state, read = ckpt.restore(source, model=model, optimizer=optimizer)
    seconds = time.perf_counter() - t0
    total = parallel.all_reduce(torch.tensor(float(read), dtype=torch.float64, device=ctx.device)).item()
    most = parallel.all_reduce(torch.tensor(float(read), dtype=torch.float64, device=ctx.device),
                               op=torch.distributed.ReduceOp.MAX).item()
    for why in skipped if metrics.enabled else ():
        emit(f"skipping {why}")
    name = source.rstrip("/").rsplit("/", 1)[-1]
    changes = fingerprint_changes(state.data, fingerprint) if fingerprint is not None else []
    if changes and cfg.run.data_changed != "restart":
        from raypt.corpus import CorpusError

        raise CorpusError(data_changed_message(name, changes))
    metrics.event(state.step, f"resuming from {name} on {world_size} worker{'s' * (world_size > 1)}: step "
                  f"{state.step}, {state.tokens_seen:,} tokens seen, data at {where(cfg, state.position)}; "
                  f"{total / 1e6:,.1f} MB of saved state read ({most / 1e6:,.1f} MB by the busiest worker) in "
                  f"{seconds:.1f} s", resumed_from=source, workers=world_size, restore_bytes=int(total),
                  restore_bytes_max=int(most), restore_s=round(seconds, 3))
    if changes:
        state.position = Position()
        metrics.event(state.step, f"DATA CHANGED since {name} ({'; '.join(changes)}): run.data_changed is restart, "
                      "so the model and optimizer go on and the new data is read from the start of its order",
                      data_changed=changes)
    state.data = fingerprint
    return state


def where(cfg: Config, pos) -> str:
    """A data position in words."""
    if isinstance(pos, MixPosition):
        return "; ".join(f"{src.name} pass {p.epoch + 1} unit {p.unit} block {p.offset} ({t:,} blocks taken)"
                         for src, p, t in zip(sources(cfg), pos.sources, pos.taken)) + f"; mixture block {pos.offset}"
    return f"epoch {pos.epoch}, unit {pos.unit}, block {pos.offset}"


def data_changed_message(name: str, changes: list[str]) -> str:
    return (f"the training data changed since {name}: {'; '.join(changes)}. Its data position would point at other "
            "blocks; restore the data, start a new run.name, or set run.data_changed: restart to keep the model and "
            "optimizer and start the new data's order from the beginning")


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


def export(cfg: Config, ctx: Context, model, tok) -> None:
    """`run_dir/final`: a model AutoModelForCausalLM loads, plus the tokenizer; LoRA also leaves `final/adapter`
    (PeftModel loads it). A 4-bit (QLoRA) or sharded (FSDP) LoRA model's adapter is merged into its base's files one
    file at a time (`raypt.merge`; QLoRA: unquantized, in bf16), never the whole base in this process's memory."""
    sd = full_model_state(model)  # a collective under FSDP: the whole model on rank 0's CPU
    if ctx.rank != 0:
        return
    final, inner = ctx.run_dir / "final", unwrap(model)
    if not cfg.model.lora:
        inner.save_pretrained(final, state_dict=sd, safe_serialization=True)
    else:
        inner.save_pretrained(final / "adapter", state_dict=sd, safe_serialization=True)
        if cfg.model.quantize or parallel.is_sharded(model):
            from raypt.merge import merge_adapter, merges_by_file
            from raypt.model import DTYPES, local_model_dir

            base = local_model_dir(cfg.model.name_or_path)
            dtype = torch.bfloat16 if cfg.model.quantize else DTYPES.get(cfg.model.dtype)
            if merges_by_file(base, final / "adapter"):
                merge_adapter(base, final / "adapter", final, dtype)
            else:  # (a base saved as .bin, an adapter on the embeddings: peft's merge, the whole base in memory)
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                whole = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto",
                                                             trust_remote_code=cfg.model.trust_remote_code)
                merged = PeftModel.from_pretrained(whole, final / "adapter").merge_and_unload()
                merged.save_pretrained(final, safe_serialization=True)
        else:
            inner.merge_and_unload().save_pretrained(final, safe_serialization=True)
    tok.save_pretrained(final)
    (final / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")


class LocalContext:
    """One process, no Ray: blocks from memory, checkpoints in `run_dir`. For tests and debugging."""

    rank, local_rank, world_size = 0, 0, 1
    data_fingerprint = None

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
        min_blocks, seed = order_args(cfg)
        units = [Unit(0, len(self._train), self._train)]
        windows = stream_windows(lambda epoch, first: units[first:], position, min_blocks)
        for rows, pos in RankStream(windows, position.offset, global_batch_size(cfg), self.rank, self.world_size, seed):
            mine = torch.as_tensor(gather(rows, lambda u: u.data), dtype=torch.long, device=self.device)
            yield micro_batches(mine, cfg, self.world_size), pos

    def eval_blocks(self):
        return None if self._eval is None else {"": self._eval}
