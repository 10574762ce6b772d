"""Run metrics: MFU arithmetic, and rank 0's metrics.jsonl, TensorBoard events and one progress line per log step."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from raypt.progress import _duration

_echo = None


def emit(line: str, **fields) -> None:
    """One line to the job log. Writes to stdout directly: Ray Train patches print() into its own logging. Where the
    driver shows a progress bar (`echo_to`), the line goes to the driver instead, with `fields` (a log step's step
    and tokens/s)."""
    if _echo is not None:
        _echo(line, fields)
        return
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def echo_to(fn) -> None:
    """Send this process's `emit` lines to `fn(line, fields)`."""
    global _echo
    _echo = fn

# Dense bf16 peak FLOP/s of one device, by a substring of torch.cuda.get_device_name().
# Dense bf16 peak FLOP/s (NVIDIA's data sheets), matched against the device name in this order: the first key
# it contains (so "GB200" before "B200", the PCIe and NVL H100s before the SXM one).
PEAK_FLOPS = {"GB200": 2.5e15, "B200": 2.25e15, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
              "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 125e12,
              "A10": 125e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """Peak FLOP/s for MFU: the configured value, a known GPU's, or None (MFU not reported)."""
    if configured:
        return configured
    return peak_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_of(name: str) -> float | None:
    """A GPU's dense bf16 peak from its device name (`PEAK_FLOPS`), or None."""
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its peak."""
    return flops_per_token * tokens_per_s_per_device / peak if peak else None


class MetricsLogger:
    """Appends one JSON object per event to `run_dir/metrics.jsonl`, sends scalars to the run's trackers
    (`run.loggers`), prints progress."""

    def __init__(self, run_dir: Path, max_steps: int, enabled: bool, loggers: tuple[str, ...] = ("tensorboard",),
                 name: str = "raypt", config: dict | None = None):
        self.enabled, self.max_steps = enabled, max_steps
        self._t0 = time.perf_counter()
        self._start_step = None
        self._trackers = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._trackers = [TRACKERS[kind](run_dir, name, config or {}) for kind in dict.fromkeys(loggers)]

    def last_step(self) -> int | None:
        """The step of the newest training row in metrics.jsonl (a restarted run's: the last logged before it)."""
        with open(self._file.name, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))  # (a long run's file: its tail holds the last log rows)
            tail = f.read().decode("utf-8", "replace")
        for line in reversed(tail.splitlines()):
            try:
                row = json.loads(line)
            except ValueError:  # (the tail's cut first line, or one a killed writer left half-written)
                continue
            if "tokens_per_s" in row:
                return row["step"]
        return None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        # strict JSON: a non-finite value (a skipped step's grad norm) is left out like a missing one
        row = {"step": step, **{k: v for k, v in metrics.items()
                                if v is not None and not (isinstance(v, float) and not math.isfinite(v))}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self._trackers:
            tracker.log(step, scalars)
        emit(self._line(step, row), step=step, tokens_per_s=row.get("tokens_per_s"))

    def event(self, step: int, message: str, **fields) -> None:
        """A line in metrics.jsonl (with `fields`) and on the console for something that happened, e.g. a resume; its
        numbers go to the trackers too (a resume's steps_retrained, a reclaim's preemption_notice as 1)."""
        if self.enabled:
            self._file.write(json.dumps({"step": step, **fields}) + "\n")
            self._file.flush()
            scalars = {k: float(v) for k, v in fields.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            for tracker in self._trackers if scalars else ():
                tracker.log(step, scalars)
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
        if row.get("input_wait_max", 0) >= 0.05:  # (training waits for data: a stall in the pipeline)
            parts.append(f"waiting for data {100 * row['input_wait_max']:.0f}%")
        if row.get("straggler_wait", 0) >= 0.05:  # (the other ranks wait for one)
            parts.append(f"rank {row['slowest_rank']} slowest: the others wait for it "
                         f"{100 * row['straggler_wait']:.0f}%")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            for tracker in self._trackers:
                tracker.close()


# -- trackers: rank 0 alone talks to them ----------------------------------------------------------------------------


class TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class WandB:
    """A W&B run with the raypt run's name as its id, so a resumed run (even from another node) goes on in it."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        import os
        import re

        import wandb

        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "raypt"), name=name, config=config,
                               id=re.sub(r"[^A-Za-z0-9_-]", "-", name), resume="allow", dir=str(run_dir))

    def log(self, step: int, scalars: dict) -> None:
        if step >= self._run.step:  # (steps a resumed run trains again are already there: W&B keeps the first)
            self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MLflow:
    """An MLflow run tagged with the raypt run's name, found again on resume. Without MLFLOW_TRACKING_URI: a file
    store in run_dir/mlruns (`mlflow ui --backend-store-uri RUN_DIR/mlruns`)."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        import os

        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow >= 3 asks for this)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "raypt"))
        found = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`raypt.run` = '{name}'",
                                   max_results=1, output_format="list")
        self._mlflow = mlflow
        if found:  # (a resumed run: its params are there already)
            mlflow.start_run(run_id=found[0].info.run_id)
        else:
            mlflow.start_run(run_name=name, tags={"raypt.run": name})
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})
            mlflow.log_dict(config, "config.json")

    def log(self, step: int, scalars: dict) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def check_trackers(loggers: list[str]) -> None:
    """Refuse, before a run starts, a tracker whose package is not installed."""
    import importlib.util

    from raypt.errors import UserError

    if missing := [k for k in loggers if k in ("wandb", "mlflow") and importlib.util.find_spec(k) is None]:
        raise UserError(f"run.loggers names {', '.join(missing)}, which is not installed: pip install "
                        "'raypt[trackers]' (or remove it from run.loggers)")


def tracker_env() -> dict[str, str]:
    """The trackers' settings and credentials in the driver's environment, for the workers' runtime env."""
    import os

    return {k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_"))}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

