"""Fault injection for the reliability tests: kill this process, for real, at a chosen point of a run.

    RAYPT_FAULT=POINT:STEP:RANK RAYPT_FAULT_FILE=PATH python -m raypt.train ...

POINT is `step` (right after optimizer step STEP) or `save` (while writing the checkpoint of step STEP: this rank's
shard written, the marker not yet). The rank RANK sends itself SIGKILL there, once: PATH is created first, and a
fault whose file exists does not fire again, so the worker group Ray restarts runs on. POINT `drain` instead has rank
RANK drain its own node for preemption after step STEP, once, with RAYPT_FAULT_DEADLINE seconds (default 10) left, as
a cloud's reclaim notice does through Ray's autoscaler. POINT `nan` makes rank RANK's loss NaN in step STEP, or in
each of several (`nan:3,5:1`; no file needed), and POINT `slow` has rank RANK sleep RAYPT_FAULT_SECONDS (default 3)
before each such step's work, as a straggler does (no file needed). POINT `tokenize` (no steps or rank) has every
tokenize actor sleep RAYPT_FAULT_SECONDS per work unit, as a stalled data pipeline does. Several faults go in one
variable joined by `+` (`drain:2:1+slow:3,4:0`). The driver forwards the variables to the workers and the data
pipeline; without them nothing here runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _fires(point: str, step: int | None = None, rank: int | None = None) -> bool:
    """Whether a fault of RAYPT_FAULT is `point` at this step on this rank (None: at any)."""
    for fault in filter(None, os.environ.get("RAYPT_FAULT", "").split("+")):
        name, *at = fault.split(":")
        steps, on = ({int(s) for s in at[0].split(",")}, int(at[1])) if len(at) == 2 else (set(), None)
        if name == point and (step is None or step in steps) and (rank is None or rank == on):
            return True
    return False


def maybe_kill(point: str, step: int, rank: int) -> None:
    once = os.environ.get("RAYPT_FAULT_FILE")
    if not _fires(point, step, rank) or not once or Path(once).exists():
        return
    Path(once).write_text(os.environ["RAYPT_FAULT"] + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_drain(step: int, rank: int) -> None:
    once = os.environ.get("RAYPT_FAULT_FILE")
    if not _fires("drain", step, rank) or not once or Path(once).exists():
        return
    import time

    import ray

    from raypt.reclaim import drain

    Path(once).write_text(os.environ["RAYPT_FAULT"] + "\n")
    ctx = ray.get_runtime_context()
    drain(ctx.gcs_address, ctx.get_node_id(), float(os.environ.get("RAYPT_FAULT_DEADLINE", "10")), "raypt fault")
    from ray.train.v2._internal.execution.context import get_train_context

    given = time.monotonic() + 30
    while get_train_context().preemption_context.preemption_info is None:  # (Ray Train's watcher polls: wait for
        if time.monotonic() > given:  # its notice, so that the run's next check sees it, on every rank alike)
            raise RuntimeError("no preemption notice 30 s after this node was drained: is "
                               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER off?")
        time.sleep(0.2)
    time.sleep(1)


def maybe_slow(point: str, step: int | None = None, rank: int | None = None) -> None:
    """Sleep RAYPT_FAULT_SECONDS where a `slow` (step, rank) or `tokenize` fault says."""
    if _fires(point, step, rank):
        import time

        time.sleep(float(os.environ.get("RAYPT_FAULT_SECONDS", "3")))


def is_nan(step: int, rank: int) -> bool:
    """Whether `RAYPT_FAULT=nan:STEPS:RANK` makes this step's loss NaN on this rank."""
    return _fires("nan", step, rank)


def forwarded_env() -> dict[str, str]:
    """The fault variables of the driver's environment, for the workers' runtime env."""
    return {k: os.environ[k] for k in ("RAYPT_FAULT", "RAYPT_FAULT_FILE", "RAYPT_FAULT_DEADLINE", "RAYPT_FAULT_SECONDS")
            if k in os.environ}
