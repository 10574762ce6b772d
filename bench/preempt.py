"""A spot reclaim, measured on a real multi-node Ray on this machine (`ray.cluster_utils.Cluster`: a head with no
CPU, three 3-CPU nodes), in one command:

    python bench/preempt.py [--steps 160] [--at 132] [--deadline 20] [--elastic] [--json]

1. The cost of asking. Inside a 2-worker TorchTrainer, the loop's check (`raypt.train.preemption_notice`: each
   worker's notice and one all-reduce, every run.preemption_check_s seconds) and `ray.train.get_preemption_info()`
   (Ray Train's own barrier, through one actor) timed --calls times each, beside a gloo all-reduce of one number; and
   what the check costs a run at the default cadence.
2. One reclaim. The demo (configs/demo.yaml, checkpoints every 100 steps) on 2 workers, once uninterrupted and once
   with rank 1's node drained for preemption after step --at with --deadline seconds left, as a cloud's notice reaches
   Ray; Ray Train's watcher at its default poll (5 s). Reported: steps trained twice; seconds from the drain to the
   notice the loop saw, from the notice to a complete checkpoint, from the checkpoint to the new group's resume (and
   how long before the deadline that was) and on to its first new step; wall time against the uninterrupted run;
   and the largest relative difference between the two runs' per-step losses. With --elastic: scaling.num_workers
   [1, 2] on two nodes, so that the new group is the one worker the node left holds (Ray Train alone would size it
   by a view of the cluster that still counts the draining node, and wait for that node until its start timed out,
   60 s).

metrics.jsonl has no clocks: a thread stamps its lines as they appear (every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MB = 1 << 20


def probe(config: dict) -> None:
    """Ray Train worker: time `get_preemption_info` and a one-number all-reduce; rank 0 writes the medians."""
    import ray.train
    import torch
    import torch.distributed as dist

    def timed(fn, n):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    from raypt.train import preemption_notice

    x, cpu = torch.zeros(1), torch.device("cpu")
    timed(ray.train.get_preemption_info, 5)  # (warm up)
    ask = timed(ray.train.get_preemption_info, config["n"])
    check = timed(lambda: preemption_notice(cpu), config["n"])
    reduce = timed(lambda: dist.all_reduce(x), config["n"])
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps({
            "get_preemption_info_ms": 1e3 * statistics.median(ask),
            "get_preemption_info_p90_ms": 1e3 * statistics.quantiles(ask, n=10)[-1],
            "check_ms": 1e3 * statistics.median(check), "check_p90_ms": 1e3 * statistics.quantiles(check, n=10)[-1],
            "all_reduce_ms": 1e3 * statistics.median(reduce)}))


def cost_of_asking(tmp: Path, calls: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp / "probe.json"
    TorchTrainer(probe, train_loop_config={"n": calls, "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp), name="probe")).fit()
    return json.loads(out.read_text())


class Stamped:
    """metrics.jsonl's lines as they appear, each with the monotonic time it was first seen."""

    def __init__(self, path: Path):
        self.path, self.rows, self._on = path, [], True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = 0
        while self._on:
            if self.path.exists():
                lines = self.path.read_text().splitlines()
                now = time.monotonic()
                for line in lines[seen:]:
                    self.rows.append((now, json.loads(line)))
                seen = len(lines)
            time.sleep(0.05)

    def stop(self) -> list[tuple[float, dict]]:
        time.sleep(0.2)
        self._on = False
        self._thread.join()
        return self.rows


def run(argv: list[str], metrics: Path) -> tuple[float, list[tuple[float, dict]]]:
    from raypt import train

    stamps, t0 = Stamped(metrics), time.monotonic()
    assert train.main(argv) == 0
    return time.monotonic() - t0, stamps.stop()


def losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for _, r in rows if "loss" in r}  # (a step trained twice: its last loss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--at", type=int, default=132, help="drain rank 1's node after this step (default 132)")
    ap.add_argument("--deadline", type=float, default=20.0, help="seconds of notice (default 20)")
    ap.add_argument("--calls", type=int, default=200, help="get_preemption_info calls timed (default 200)")
    ap.add_argument("--elastic", action="store_true", help="num_workers [1, 2] on two nodes: the run shrinks")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import ray
    from ray._private.state import state
    from ray.cluster_utils import Cluster

    if not (ROOT / "out" / "demo" / "tokenizer").exists():
        subprocess.run([sys.executable, "-m", "raypt.demo", "--out", "out/demo"], cwd=ROOT, check=True)
    os.chdir(ROOT)
    tmp = Path(tempfile.mkdtemp(prefix="raypt-preempt-"))
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # (Ray's default; said here against a stray setting)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 * MB})
    for _ in range(2 if a.elastic else 3):
        cluster.add_node(num_cpus=3, object_store_memory=256 * MB)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        out = cost_of_asking(tmp, a.calls)
        sets = ["run.report=false", "train.sample_tokens=0", "train.eval_every=0", "train.log_every=1",
                f"train.max_steps={a.steps}", "train.checkpoint_every=100", f"run.storage_path={tmp}",
                "scaling.cpus_per_worker=2", "data.cpus_per_tokenize_worker=1"] + (
                   ["scaling.num_workers=[1, 2]"] if a.elastic else [])
        argv = lambda name: ["--config", "configs/demo.yaml",  # noqa: E731
                             *[x for s in [*sets, f"run.name={name}"] for x in ("--set", s)]]
        calm_s, calm = run(argv("calm"), tmp / "calm" / "metrics.jsonl")
        os.environ.update(RAYPT_FAULT=f"drain:{a.at}:1", RAYPT_FAULT_FILE=str(tmp / "drained"),
                          RAYPT_FAULT_DEADLINE=str(a.deadline))
        try:
            spot_s, spot = run(argv("spot"), tmp / "spot" / "metrics.jsonl")
        finally:
            for k in ("RAYPT_FAULT", "RAYPT_FAULT_FILE", "RAYPT_FAULT_DEADLINE"):
                os.environ.pop(k)
            for node in [n for n in cluster.worker_nodes if n.node_id in state.get_draining_nodes()]:
                cluster.remove_node(node)
    finally:
        ray.shutdown()
        cluster.shutdown()

    drained = (tmp / "drained").stat().st_mtime - time.time() + time.monotonic()  # (the fault's file: the drain)
    notice_t, notice = next((t, r) for t, r in spot if r.get("preemption_notice"))
    saved_t, saved = next((t, r) for t, r in spot if "checkpoint" in r and r["step"] == notice["step"])
    resumed_t, resumed = next((t, r) for t, r in spot if "resumed_from" in r)
    first_t = next(t for t, r in spot if "loss" in r and t > resumed_t)
    calm_loss, spot_loss = losses(calm), losses(spot)
    stamps = [t for t, r in calm if "loss" in r]
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    out.update({
        "check_every_s": 2.0, "ask_share_of_training": out["check_ms"] / 1e3 / 2.0,
        "drained_after_step": a.at, "notice_at_step": notice["step"], "deadline_s": a.deadline,
        "elastic": a.elastic, "resumed_workers": resumed["workers"],
        "steps_trained_twice": resumed["steps_retrained"], "resumed_from": Path(resumed["resumed_from"]).name,
        "drain_to_notice_s": notice_t - drained, "notice_to_checkpoint_s": saved_t - notice_t,
        "checkpoint_s": saved["checkpoint_s"], "checkpoint_to_resume_s": resumed_t - saved_t,
        "resumed_before_deadline_s": drained + a.deadline - resumed_t,
        "resume_to_first_step_s": first_t - resumed_t, "calm_wall_s": calm_s, "spot_wall_s": spot_s,
        "calm_step_s": step_s,
        "loss_max_rel_diff": max(abs(spot_loss[s] - v) / abs(v) for s, v in calm_loss.items()),
    })
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"asking, 2 workers: the loop's check (each worker's notice, one all-reduce) {out['check_ms']:.2f} ms "
          f"median, {out['check_p90_ms']:.2f} ms p90; ray.train.get_preemption_info() "
          f"{out['get_preemption_info_ms']:.2f} ms median, {out['get_preemption_info_p90_ms']:.2f} ms p90 (a gloo "
          f"all-reduce of one number: {out['all_reduce_ms']:.2f} ms); the check every 2 s of training "
          f"(run.preemption_check_s): {100 * out['ask_share_of_training']:.3f}% of it")
    print(f"reclaim: drained after step {a.at} with {a.deadline:g} s left; the loop saw the notice at step "
          f"{notice['step']}, {out['drain_to_notice_s']:.1f} s after the drain; checkpoint complete "
          f"{out['notice_to_checkpoint_s']:.1f} s after the notice (the save itself {saved['checkpoint_s']:.2f} s); "
          f"a new group of {resumed['workers']} resumed from {out['resumed_from']} "
          f"{out['checkpoint_to_resume_s']:.1f} s after the checkpoint "
          f"({abs(out['resumed_before_deadline_s']):.1f} s "
          f"{'before' if out['resumed_before_deadline_s'] >= 0 else 'after'} the deadline) and trained its first new "
          f"step {out['resume_to_first_step_s']:.1f} s later; steps trained twice: {out['steps_trained_twice']}")
    print(f"wall: {spot_s:.0f} s against {calm_s:.0f} s uninterrupted ({step_s:.2f} s a step); per-step losses "
          f"differ by at most {out['loss_max_rel_diff']:.1e} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
