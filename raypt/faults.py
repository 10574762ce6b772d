"""Fault injection for the reliability tests: kill this process, for real, at a chosen point of a run.

    RAYPT_FAULT=POINT:STEP:RANK RAYPT_FAULT_FILE=PATH python -m raypt.train ...

POINT is `step` (right after optimizer step STEP) or `save` (while writing the checkpoint of step STEP: this rank's
shard written, the marker not yet). The rank RANK sends itself SIGKILL there, once: PATH is created first, and a
fault whose file exists does not fire again, so the worker group Ray restarts runs on. POINT `drain` instead has rank
RANK drain its own node for preemption after step STEP, once, with RAYPT_FAULT_DEADLINE seconds (default 10) left, as
a cloud's reclaim notice does through Ray's autoscaler. POINT `nan` makes rank RANK's loss NaN in step STEP, or in
each of several (`nan:3,5:1`; no file needed), and POINT `slow` has rank RANK sleep RAYPT_FAULT_SECONDS (default 3)
after each such step, as a straggler does (no file needed). The driver forwards the variables to the workers;
without them nothing here runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _fault() -> tuple[str, set[int], int] | None:
    """(point, steps, rank) of RAYPT_FAULT, or None."""
    parts = os.environ.get("RAYPT_FAULT", "").split(":")
    return (parts[0], {int(s) for s in parts[1].split(",")}, int(parts[2])) if len(parts) == 3 else None


def maybe_kill(point: str, step: int, rank: int) -> None:
    once, fault = os.environ.get("RAYPT_FAULT_FILE"), _fault()
    fires = fault is not None and fault[0] == point and step in fault[1] and fault[2] == rank
    if not fires or not once or Path(once).exists():
        return
    Path(once).write_text(os.environ["RAYPT_FAULT"] + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_drain(step: int, rank: int) -> None:
    once, fault = os.environ.get("RAYPT_FAULT_FILE"), _fault()
    fires = fault is not None and fault[0] == "drain" and step in fault[1] and fault[2] == rank
    if not fires or not once or Path(once).exists():
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


def maybe_slow(step: int, rank: int) -> None:
    fault = _fault()
    if fault is not None and fault[0] == "slow" and step in fault[1] and fault[2] == rank:
        import time

        time.sleep(float(os.environ.get("RAYPT_FAULT_SECONDS", "3")))


def nan_steps(rank: int) -> set[int]:
    """The steps whose loss `RAYPT_FAULT=nan:STEPS:RANK` makes NaN on this rank."""
    fault = _fault()
    return fault[1] if fault and fault[0] == "nan" and fault[2] == rank else set()


def forwarded_env() -> dict[str, str]:
    """The fault variables of the driver's environment, for the workers' runtime env."""
    return {k: os.environ[k] for k in ("RAYPT_FAULT", "RAYPT_FAULT_FILE", "RAYPT_FAULT_DEADLINE", "RAYPT_FAULT_SECONDS")
            if k in os.environ}
