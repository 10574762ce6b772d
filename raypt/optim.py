"""AdamW with the usual no-decay groups and the LR schedules (pure functions)."""

from __future__ import annotations

import math

import torch

from raypt.settings import TrainConfig
from raypt.errors import UserError


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float,
              decay_ratio: float = 0.2) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then
    cosine: cosine decay to min_lr_ratio at max_steps;
    wsd: stay at lr, then decay linearly to min_lr_ratio over the last decay_ratio of the run."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_ratio * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1 - (1 - min_lr_ratio) * progress
    raise ValueError(f"train.schedule {schedule!r} is not cosine or wsd")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: never norms, biases or embeddings."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embeddings or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where torch has it: CUDA and CPU."""
    fused = device.type in ("cuda", "cpu") and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in model.parameters() if p.requires_grad
    )
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set the LR for optimizer step `step` (0-based) from the schedule and return it. The schedule is a pure
    function of the step, so a resumed run needs no scheduler state and follows the current config."""
    lr = cfg.lr * lr_factor(step, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                            min_lr_ratio=cfg.min_lr_ratio, decay_ratio=cfg.decay_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class NonFiniteError(UserError):
    """Training met a NaN/inf loss or gradient norm."""


class StepGuard:
    """Applies each optimizer step unless its loss or gradient norm is not finite — without a per-step host sync.
    Fused AdamW skips its update on the device when `found_inf` is set (the mechanism GradScaler uses); the flags
    live in device tensors and are read by `check` where the loop synchronises anyway (log, eval, checkpoint steps).
    With `train.nonfinite: stop` no update is applied from the first bad step on; with `skip` only bad steps'."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

        def zeros(dtype=torch.int64):
            return torch.zeros((), dtype=dtype, device=device)

        self.bad_steps = zeros()  # steps whose update was skipped
        self.first_bad = zeros() - 1  # the first of them (-1: none)
        self.local_bad = zeros(torch.bool)  # this rank's own loss was non-finite
        self.loss_sum, self.good_steps = zeros(torch.float32), zeros()  # finite steps since the last `mean_loss`

    def step(self, optimizer: torch.optim.Optimizer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Optimizer step `step` (1-based) for this step's summed `loss` and global `grad_norm`."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.local_bad |= ~torch.isfinite(loss)
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), step, self.first_bad))
        self.bad_steps += bad
        skip = bad if self.cfg.nonfinite == "skip" else self.first_bad >= 0
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = skip.float()
            optimizer.step()
        elif not skip.item():  # unfused optimizers cannot skip on the device
            optimizer.step()
        self.loss_sum += torch.where(bad, 0.0, loss)
        self.good_steps += ~bad

    def check(self) -> None:
        """Raise when the run met non-finite values it may not go on with; every rank raises the same message,
        naming the ranks whose own loss was non-finite (a host sync and one all-reduce)."""
        from raypt.parallel import all_reduce

        bad_ranks = torch.zeros(self.world_size, dtype=torch.int64, device=self.local_bad.device)
        bad_ranks[self.rank] = self.local_bad.long()
        all_reduce(bad_ranks)
        flags = torch.cat([torch.stack([self.bad_steps, self.first_bad]), bad_ranks]).tolist()
        bad_steps, first_bad, t = flags[0], flags[1], self.cfg
        if bad_steps == 0 or (t.nonfinite == "skip" and bad_steps <= t.max_skipped_steps):
            return
        ranks = [r for r, b in enumerate(flags[2:]) if b]
        where = f"loss on rank {', '.join(map(str, ranks))}" if ranks else "gradient norm"
        if t.nonfinite == "skip":
            raise NonFiniteError(f"{bad_steps} steps with a non-finite loss or gradient norm, more than "
                                 f"train.max_skipped_steps={t.max_skipped_steps}; the first at step {first_bad} "
                                 f"(non-finite {where}). Lower train.lr, check the data, or raise the limit")
        raise NonFiniteError(f"non-finite {where} at step {first_bad}; training stopped with no update applied from "
                             "that step on. Lower train.lr or check the data; train.nonfinite: skip drops such steps "
                             "and goes on")

    @property
    def skipped(self) -> int:
        return int(self.bad_steps)

    def mean_loss(self) -> float | None:
        """Mean loss over all ranks of the finite steps since the last call (None if there were none)."""
        from raypt.parallel import all_reduce

        good = int(self.good_steps)
        loss = all_reduce(self.loss_sum.clone()).item() / (self.world_size * good) if good else None
        self.loss_sum.zero_()
        self.good_steps.zero_()
        return loss
