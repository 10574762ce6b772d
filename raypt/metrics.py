"""Run metrics: MFU arithmetic, and rank 0's metrics.jsonl, TensorBoard events and one progress line per log step."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

def emit(line: str) -> None:
    """One line to the job log. Writes to stdout directly: Ray Train patches print() into its own logging."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

# Dense bf16 peak FLOP/s of one device, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
              "A10G": 125e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """Peak FLOP/s for MFU: the configured value, a known GPU's, or None (MFU not reported)."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its peak."""
    return flops_per_token * tokens_per_s_per_device / peak if peak else None


class MetricsLogger:
    """Appends one JSON object per event to `run_dir/metrics.jsonl`, mirrors scalars to TensorBoard, prints progress."""

    def __init__(self, run_dir: Path, max_steps: int, enabled: bool):
        self.enabled, self.max_steps = enabled, max_steps
        self._t0 = time.perf_counter()
        self._start_step = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        # strict JSON: a non-finite value (a skipped step's grad norm) is left out like a missing one
        row = {"step": step, **{k: v for k, v in metrics.items()
                                if v is not None and not (isinstance(v, float) and not math.isfinite(v))}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        emit(self._line(step, row))

    def event(self, step: int, message: str, **fields) -> None:
        """A line in metrics.jsonl (with `fields`) and on the console for something that happened, e.g. a resume."""
        if self.enabled:
            self._file.write(json.dumps({"step": step, **fields}) + "\n")
            self._file.flush()
            emit(message)

    def _line(self, step: int, row: dict) -> str:
        if "eval_loss" in row:
            return f"step {step}: eval loss {row['eval_loss']:.4f}, perplexity {row['eval_ppl']:.2f}"
        if self._start_step is None:
            self._start_step, self._t0 = step, time.perf_counter()
            eta = "?"
        else:
            per_step = (time.perf_counter() - self._t0) / max(1, step - self._start_step)
            eta = _duration(per_step * (self.max_steps - step))
        loss = f"loss {row['loss']:.4f}" if "loss" in row else "update skipped (non-finite)"
        parts = [f"step {step}/{self.max_steps}", loss, f"lr {row['lr']:.2e}"]
        if "grad_norm" in row:
            parts.append(f"grad norm {row['grad_norm']:.2f}")
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
        if "mfu" in row:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
