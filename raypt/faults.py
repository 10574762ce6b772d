"""Fault injection for the reliability tests: kill this process, for real, at a chosen point of a run.

    RAYPT_FAULT=POINT:STEP:RANK RAYPT_FAULT_FILE=PATH python -m raypt.train ...

POINT is `step` (right after optimizer step STEP) or `save` (while writing the checkpoint of step STEP: this rank's
shard written, the marker not yet). The rank RANK sends itself SIGKILL there, once: PATH is created first, and a fault whose
file exists does not fire again, so the worker group Ray restarts runs on. POINT `nan` instead makes rank RANK's loss
NaN in step STEP (no file needed). The driver forwards the variables to the workers; without them nothing here runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _fault() -> tuple[str, int, int] | None:
    """(point, step, rank) of RAYPT_FAULT, or None."""
    parts = os.environ.get("RAYPT_FAULT", "").split(":")
    return (parts[0], int(parts[1]), int(parts[2])) if len(parts) == 3 else None


def maybe_kill(point: str, step: int, rank: int) -> None:
    once = os.environ.get("RAYPT_FAULT_FILE")
    if _fault() != (point, step, rank) or not once or Path(once).exists():
        return
    Path(once).write_text(os.environ["RAYPT_FAULT"] + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


def nan_step(rank: int) -> int | None:
    """The step whose loss `RAYPT_FAULT=nan:STEP:RANK` makes NaN on this rank, or None."""
    fault = _fault()
    return fault[1] if fault and fault[0] == "nan" and fault[2] == rank else None


def forwarded_env() -> dict[str, str]:
    """The fault variables of the driver's environment, for the workers' runtime env."""
    return {k: os.environ[k] for k in ("RAYPT_FAULT", "RAYPT_FAULT_FILE") if k in os.environ}
