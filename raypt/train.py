"""Launch pre-training on Ray Train:

    python -m raypt.train --config CFG [--set section.key=value ...]

Joins the cluster in RAY_ADDRESS (what `ray job submit` sets) or starts a local Ray, builds the data pipeline
(`raypt.data`) or reads a pre-tokenized directory, and runs `raypt.loop.train` on every worker of a `TorchTrainer`.
Re-running the same run.name resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raypt import checkpoint, faults, parallel, storage
from raypt.cli import command, fail, quiet_libraries
from raypt.cluster import (check_data_fits, check_workers_fit, cpu_threads, free_worker_room, init_ray,
                           workers_after_reclaim)
from raypt.config import Config, config_from_dict, data_parallel_size, global_batch_size, grad_accum_steps
from raypt.errors import UserError
from raypt.feed import Feeder, RankFeed, eval_chunks
from raypt.metrics import check_trackers, echo_to, emit, tracker_env
from raypt.model import check_model
from raypt.pipeline_stats import PipelineStats
from raypt.progress import Progress, is_terminal
from raypt.rundata import RunData, touched_files
from raypt.storage import download_if_exists, is_uri, upload
from raypt.tokenizer import encoder_spec, load_tokenizer, tokenizer_path


RESTARTS = {"reclaim": "a node of the run is being reclaimed", "grow": "the cluster has room for more workers"}
GROW_AFTER_S = 25.0
"""How long room for more workers must last before the run restarts to grow: Ray Train sizes the new group by its
autoscaling coordinator's view of the cluster, refreshed every 20 s; a restart before that brings a group no larger."""
UNKNOWN_RECLAIM_S = 120.0
"""Ray Train's own wait for a reclaim that came without a deadline (`DEFAULT_PREEMPTION_DEADLINE_S`)."""


def preemption_notice(device: torch.device) -> tuple[float, int] | None:
    """(Seconds until a node of the run is reclaimed, the ranks on the nodes reclaimed), or None, the same on every
    rank. Ray Train's watcher hands its notice to every worker; the ranks agree on it with one all-reduce of three
    numbers (any rank's notice, the soonest deadline), 0.5 ms for 2 workers here. `ray.train.get_preemption_info()`
    agrees through one actor that every worker calls: 2.4 ms for 2 workers, and that actor's calls grow with the
    workers (bench/preempt.py). It is the fallback where Ray Train keeps the notice elsewhere."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError, RuntimeError):  # (every rank runs the same Ray: all take this path alike)
        info = ray.train.get_preemption_info()
    mine = [0.0, -math.inf, 0.0]
    if info is not None:  # (no deadline: Ray Train then restarts the group this long after the notice)
        left = UNKNOWN_RECLAIM_S if info.deadline_ms is None else max(0.0, info.deadline_ms / 1000 - time.time())
        mine = [1.0, -left, float(len(info.preempted_ranks))]
    heard, soonest, ranks = parallel.all_reduce(torch.tensor(mine, dtype=torch.float64, device=device),
                                                op=torch.distributed.ReduceOp.MAX).tolist()
    return (-soonest, int(ranks)) if heard else None


class RayContext:
    """`raypt.loop.Context` on a Ray Train worker."""

    def __init__(self, cfg: Config, run_dir: str, feeder, eval_refs, data: RunData, grew_from: int = 0,
                 stats=None):
        import ray.train.torch

        c = ray.train.get_context()
        self.cfg, self.rank, self.world_size = cfg, c.get_world_rank(), c.get_world_size()
        self.local_rank = c.get_local_rank()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            threads = cfg.scaling.cpu_threads or cpu_threads(c.get_local_world_size())
            torch.set_num_threads(threads)
            if self.rank == 0:
                emit(f"training on {threads} CPU thread{'s' * (threads > 1)} per worker"
                     + ("" if cfg.scaling.cpu_threads else " (the node's CPUs over its workers; scaling.cpu_threads)"))
        self._feeder, self._eval_refs, self.data, self.grew_from = feeder, eval_refs, data, grew_from
        self._stats, self._pipeline_retries = stats, 0  # (the run's PipelineStats: the pipeline's storage retries)
        self._room_since = None  # (when rank 0 first saw room for more workers, of late)
        self.storage = run_dir
        self._remote = run_dir if is_uri(run_dir) else None
        # With s3:// or gs:// storage, rank 0 writes metrics and final/ locally and mirrors them after each checkpoint.
        self.run_dir = Path(tempfile.mkdtemp(prefix="raypt-run-")) / cfg.run.name if self._remote else Path(run_dir)
        if self._remote and self.rank == 0:
            download_if_exists(f"{self._remote}/metrics.jsonl", self.run_dir / "metrics.jsonl")  # resumed: appended

    def sync(self) -> None:
        if self._remote and self.rank == 0:
            try:  # (rank 0 alone: a failure must not leave it apart from the others; the next sync mirrors it all)
                upload(self.run_dir, self._remote)
            except Exception as e:  # noqa: BLE001
                emit(f"could not mirror the run's metrics to {self._remote} ({e}); the next checkpoint tries again")

    def preemption(self) -> tuple[float, int] | None:
        return preemption_notice(self.device)

    def room(self) -> int:
        """More workers that fit, once they have fitted for GROW_AFTER_S (asked on rank 0 alone)."""
        try:
            free = min(free_worker_room(self.cfg.scaling), self.cfg.scaling.max_workers - self.world_size)
        except Exception as e:  # noqa: BLE001 (the GCS busy: the other ranks wait in the all-reduce; ask again later)
            emit(f"could not read the cluster's free resources ({type(e).__name__}: {e})")
            free = 0
        if free < 1:
            self._room_since = None
            return 0
        self._room_since = self._room_since or time.monotonic()
        return free if time.monotonic() - self._room_since >= GROW_AFTER_S else 0

    def storage_retries(self) -> int:
        mine = storage.retries()
        if self.rank == 0 and self._stats is not None:  # (one call to an async actor per log interval, rank 0 alone)
            with contextlib.suppress(Exception):  # (the count must not fail a step; the next interval has it)
                self._pipeline_retries = ray.get(self._stats.total.remote("storage_retries"), timeout=10)
        return mine + self._pipeline_retries

    def prepare(self, model):
        if self.world_size == 1 or self.cfg.scaling.strategy == "fsdp":  # FSDP2: sharded as it was built
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                                             parallel_strategy_kwargs=parallel.ddp_options())

    def train_steps(self, cfg: Config, position):
        """This rank's rows of the run's one ordered stream (`raypt.feed`): the Feeder says which, the rank
        fetches them from where they were made."""
        import torch.distributed as dist

        from raypt.loop import micro_batches

        if self.rank == 0:  # a (re)started worker group: the stream restarts at the checkpoint's position
            ray.get(self._feeder.open.remote(position, self.world_size))
        if dist.is_initialized():
            dist.barrier()
        for blocks, pos in RankFeed(self._feeder, cfg, self.rank, self.world_size, position):
            # int32 rows gathered from the object store -> int64; pinned, the host-to-GPU copy overlaps compute
            x = torch.from_numpy(blocks).long()
            x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x
            yield micro_batches(x, cfg, self.world_size), pos

    def eval_blocks(self):
        """This rank's own share of each eval set: one of its objects (one per data-parallel rank of the largest group:
        a tensor-parallel group's ranks share one), or every k-th of them in a smaller elastic group."""
        if self._eval_refs is None:
            return None
        out, tp = {}, self.cfg.scaling.tensor_parallel
        for name, refs in self._eval_refs.items():
            mine = ray.get(refs[self.rank // tp :: self.world_size // tp])
            out[name] = mine[0] if len(mine) == 1 else np.concatenate(mine)
        return out


def train_loop_per_worker(config: dict) -> dict:
    from raypt.loop import train

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_libraries()
    cfg = config_from_dict(config["config"])
    try:
        if config["terminal"] and ray.train.get_context().get_world_rank() == 0:  # the driver shows a bar
            echo_to(lambda line, fields: ray.get(config["stats"].say.remote(line, fields)))  # (none lost at exit)
        return train(cfg, RayContext(cfg, config["run_dir"], config["feeder"], config["eval"], config["data"],
                                     config.get("grew_from", 0), config["stats"]))
    except UserError as e:
        # Every rank meets these at the same point (same model, same checkpoint, same data, all-reduced NaN flags),
        # and no restart can fix them: the run ends with the message instead of a worker failure Ray would retry.
        return {"error": getattr(e, "message", str(e))}


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def ensure_tokenizer(cfg: Config) -> None:
    """Train the run's tokenizer first when it names a path that does not exist yet and a vocab_size."""
    t = cfg.tokenizer
    if t.path and t.vocab_size and not is_uri(t.path) and not Path(t.path).exists() and not cfg.model.name_or_path:
        from raypt.tokenizer import train_tokenizer

        print(f"training a {t.vocab_size}-token byte-level BPE on data.train_paths -> {t.path}", flush=True)
        train_tokenizer(cfg.data.train_paths, t.vocab_size, t.path, fmt=cfg.data.format,
                        text_field=cfg.data.text_field, decode_errors=cfg.data.decode_errors)


def run(cfg: Config) -> dict:
    """Pre-train on the cluster (started locally when there is none): checks, the data, the workers; the result."""
    from ray.train.torch import TorchTrainer

    init_ray()
    ensure_tokenizer(cfg)
    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    latest = checkpoint.latest(run_dir)
    announce(cfg, run_dir, latest)
    check_workers_fit(cfg.scaling)
    check_trackers(cfg.run.loggers)
    tp = cfg.scaling.tensor_parallel
    check_model(cfg.model, cfg.data.seq_len, tp, load_tokenizer(tokenizer_path(cfg)) if tp > 1 else None)
    if cfg.run.resume_from and not latest:
        checkpoint.check(cfg.run.resume_from)
    encoder = None if cfg.data.pretokenized else encoder_spec(cfg)  # (loaded here once, not in every data process)
    data = RunData.build(cfg, encoder)  # the training files, listed once
    sc = cfg.scaling
    check_data_fits(cfg, 0.0 if cfg.data.materialize else sc.max_workers * sc.cpus_per_worker, data.num_units,
                    data.weights)
    start = {"step": 0, "tokens_seen": 0}
    if source := latest or cfg.run.resume_from:  # where the data stream will start
        start = resume_data(data, source, cfg.run.data_changed)
    feeder, stats, evals = start_data(cfg, data, encoder)
    loop_config = {"config": cfg.to_dict(), "run_dir": run_dir, "feeder": feeder, "eval": evals, "data": data.light(),
                   "stats": stats, "terminal": is_terminal(sys.stdout)}
    def scaling(most: int) -> ray.train.ScalingConfig:
        return ray.train.ScalingConfig(num_workers=(sc.min_workers, most) if sc.elastic else sc.max_workers,
                                       use_gpu=sc.use_gpu, resources_per_worker={"CPU": sc.cpus_per_worker})

    trainer = functools.partial(
        TorchTrainer, train_loop_per_worker,
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": env} if (env := faults.forwarded_env() | tracker_env()) else None,
        ),
    )
    t0 = time.perf_counter()
    monitor = Monitor(stats, cfg.train.max_steps) if is_terminal(sys.stdout) else None
    try:
        # Workers that checkpoint and return for a restart get a new group at once, from that checkpoint: a reclaimed
        # node's on the nodes left (a draining node takes no new work), instead of Ray Train's restart at the
        # reclaim's deadline; an elastic run's on a cluster with room for more workers. A group that left to grow
        # passes its size on: one no larger (the room was taken meanwhile) does not try again. An elastic group that
        # left a reclaim is at most what the nodes that stay hold (`workers_after_reclaim`).
        grew_from, most = 0, sc.max_workers
        while (result := trainer(scaling_config=scaling(most), train_loop_config={
                **loop_config, "grew_from": grew_from}).fit()).return_value and (
                why := (back := result.return_value).get("restart")):
            grew_from = back["workers"] if why == "grow" else 0
            most = workers_after_reclaim(sc, back["workers"], back["reclaimed"]) if why == "reclaim" else sc.max_workers
            print(f"{RESTARTS[why]} at step {back['step']}: starting the workers again"
                  + (f" (at most {most}: the nodes being reclaimed take none)" if most < sc.max_workers else ""),
                  flush=True)
    finally:
        if monitor is not None:
            monitor.stop()
        ray.get(feeder.close.remote())
    out = dict(result.return_value or {})
    out["data"] = ray.get(feeder.counts.remote())
    ray.kill(feeder)
    out.update(seconds=time.perf_counter() - t0, final=f"{run_dir}/final", run_dir=run_dir,
               steps_trained=out.get("step", 0) - start["step"],
               tokens_trained=out.get("tokens_seen", 0) - start["tokens_seen"])
    return out


def announce(cfg: Config, run_dir: str, latest: str | None) -> None:
    """Say whether the run resumes, and what a step is."""
    if latest:
        print(f"run {cfg.run.name!r} already has checkpoints in {run_dir}: resuming from the latest, "
              f"{latest.rsplit('/', 1)[-1]} (use another run.name to start over)", flush=True)
    sc, batch = cfg.scaling, global_batch_size(cfg)
    print(f"global batch {batch} sequences x {cfg.data.seq_len} tokens = {batch * cfg.data.seq_len:,} tokens/step; "
          + ", or ".join(f"{w} workers x micro-batch {cfg.train.micro_batch_size} x {grad_accum_steps(cfg, w)} "
                         "accumulation steps" for w in dict.fromkeys([sc.max_workers, sc.min_workers]))
          + (f" (elastic: any size from {sc.min_workers} to {sc.max_workers})" if sc.elastic else ""), flush=True)


def resume_data(data: RunData, source: str, on_change: str) -> dict:
    """The data position of the checkpoint the workers will resume from, so that the Feeder starts there (a
    checkpoint of other data is refused here, before any worker starts); returns the checkpoint's state."""
    saved = checkpoint.saved_state(source)
    data.load_state_dict(saved, source.rstrip("/").rsplit("/", 1)[-1], on_change)
    if touched := touched_files(saved.get("data"), data.fingerprint):
        print(f"note: {len(touched)} training files have a new mtime but their old size since the checkpoint "
              f"(e.g. {touched[0]}); their content is taken to be the same", flush=True)
    return saved


def start_data(cfg: Config, data: RunData, encoder):
    """The run's Feeder (opened at the data's position: the pipeline makes the first window while the workers
    start), the stats actor every pipeline counts in, and the eval sets' objects. The Feeder and the stats actor
    live beside the driver (they need no CPU), so they outlast worker-group restarts and the loss of any other node;
    materialize reads the data there. The affinity is hard: a soft one let Ray place them on a worker node, whose
    loss then ended the run."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    stats = PipelineStats.options(scheduling_strategy=here).remote()
    feeder = ray.remote(Feeder).options(num_cpus=0, max_restarts=-1, scheduling_strategy=here,
                                        runtime_env={"env_vars": env} if (env := faults.forwarded_env()) else None
                                        ).remote(cfg.to_dict(), data, encoder, stats)  # (its pipeline inherits env)
    evals = eval_chunks(cfg, data_parallel_size(cfg), encoder, stats)  # (while the feeder starts)
    ray.get(feeder.ready.remote())
    feeder.open.remote(data.position, warm=True)
    return feeder, stats, evals


class Monitor(threading.Thread):
    """On a terminal: the data warm-up before step 1, then training, as one progress bar each, and rank 0's lines
    printed above them. Rank 0 sends its lines here (through the stats actor) instead of to its stdout, which Ray's
    log forwarding would print across the bar. Off the terminal rank 0's lines are the progress, as they are."""

    def __init__(self, stats, max_steps: int, every: float = 0.5):
        super().__init__(daemon=True, name="raypt-progress")
        self.stats, self.max_steps, self.every = stats, max_steps, every
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        warmup = Progress("data warm-up: blocks made before step 1", unit="block", stream=sys.stdout)
        steps = None
        while True:
            stopping = self._done.wait(self.every)
            lines, blocks = ray.get(self.stats.heard.remote())
            for line, fields in lines:
                if steps is None and "step" in fields:  # step 1 is done: the warm-up is over
                    warmup.close()
                    steps = Progress("training", total=self.max_steps, unit="step", stream=sys.stdout)
                (steps or warmup).write(line)
                if steps is not None and "step" in fields:
                    tps = fields.get("tokens_per_s")
                    steps.set(fields["step"], f"{tps:,.0f} tok/s" if tps else "")
            if steps is None:
                warmup.set(blocks)
            if stopping:
                (steps or warmup).close()
                return

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def format_counts(c: dict) -> str:
    """The text pipeline's counters for this run (units read ahead of the last step and re-read on resume count)."""
    line = (f"data tokenized by this run, over {c.get('pipelines', 0)} passes/resumes: {c.get('files', 0)} files, "
            f"{c.get('documents', 0):,} documents -> {c.get('tokens', 0):,} tokens -> {c.get('blocks', 0):,} blocks")
    skipped = {k: v for k, v in sorted(c.items()) if k.startswith(("skipped_", "documents_with_"))}
    if skipped:
        line += "\n  skipped: " + ", ".join(f"{k}={v}" for k, v in skipped.items())
    if pools := c.get("tokenize_pools"):
        line += "\n  tokenize actors per pipeline (fewest-most): " + ", ".join(f"{a}-{b}" for a, b in pools)
    return line


@command(__doc__, "raypt.train", config=True)
def main(args) -> int:
    cfg = args.cfg
    quiet_libraries()
    print("resolved config:\n" + cfg.to_yaml(), flush=True)
    out = run(cfg)
    if "error" in out:  # a user error met on the workers (they return it: no retry)
        return fail(out["error"])
    prompt = cfg.train.sample_prompt or "The "
    if not out["steps_trained"]:
        print(f"\ndone: {out.get('step')} steps, as before: nothing was left to train (raise train.max_steps or "
              "train.max_tokens to go on, or use another run.name to start over)")
    else:
        again = f" ({out['steps_trained']} by this job)" if out["steps_trained"] != out.get("step") else ""
        print(f"\ndone: {out.get('step')} steps{again}, {out['tokens_trained']:,} tokens in {out['seconds']:.0f} s "
              f"({out['tokens_trained'] / out['seconds']:,.0f} tokens/s overall)")
    if out.get("final_loss") is not None:
        print(f"final train loss {out['final_loss']:.4f}", end="")
        print(f", eval loss {out['eval_loss']:.4f}, perplexity {out['eval_ppl']:.2f}" if "eval_ppl" in out else "")
    if out.get("data", {}).get("documents"):  # (text streamed by this run; none for pre-tokenized data)
        print(format_counts(out["data"]))
    print(f"model: {out['final']}")
    if "sample" in out:  # (made on the workers, by the trained model: export.end_sample)
        print(f"sample: {prompt!r} -> {out['sample']!r}")
    if cfg.run.report:
        print(f"report: {out['run_dir']}/report/report.md (plots beside it; compare runs with "
              f"`python -m raypt.report RUN_DIR RUN_DIR`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
