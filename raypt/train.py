"""Launch pre-training on Ray Train:

    python -m raypt.train --config CFG [--set section.key=value ...]

Joins the cluster in RAY_ADDRESS (what `ray job submit` sets) or starts a local Ray, builds the data pipeline
(`raypt.data`) or reads a pre-tokenized directory, and runs `raypt.loop.train` on every worker of a `TorchTrainer`.
Re-running the same run.name resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
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

from raypt import checkpoint, faults
from raypt.cli import command, fail, quiet_libraries
from raypt.config import Config, config_from_dict, global_batch_size, grad_accum_steps, sources
from raypt.corpus import CorpusError, filesystem, is_uri
from raypt.data import cluster_can_grow, fingerprint, init_ray, plan, pool_plan
from raypt.errors import UserError
from raypt.feed import Feeder, RankFeed, eval_chunks
from raypt.metrics import check_trackers, echo_to, emit, tracker_env
from raypt.pipeline_stats import PipelineStats
from raypt.progress import Progress, is_terminal
from raypt.model import preflight as model_preflight
from raypt.stream import Position, fingerprint_changes, touched_files
from raypt.tokenizer import encoder_spec

class RayContext:
    """`raypt.loop.Context` on a Ray Train worker."""

    def __init__(self, cfg: Config, run_dir: str, feeder, eval_refs, data_fingerprint):
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
        self._feeder, self._eval_refs, self.data_fingerprint = feeder, eval_refs, data_fingerprint
        self.storage = run_dir
        self._remote = run_dir if "://" in run_dir else None
        # With s3:// or gs:// storage, rank 0 writes metrics and final/ locally and mirrors them after each checkpoint.
        self.run_dir = Path(tempfile.mkdtemp(prefix="raypt-run-")) / cfg.run.name if self._remote else Path(run_dir)
        if self._remote and self.rank == 0:
            _copy(f"{self._remote}/metrics.jsonl", self.run_dir / "metrics.jsonl")  # a resumed run appends to it

    def sync(self) -> None:
        if self._remote and self.rank == 0:
            import pyarrow.fs as pafs

            fs, path = filesystem(self._remote)
            pafs.copy_files(str(self.run_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def prepare(self, model):
        if self.world_size == 1 or self.cfg.scaling.strategy == "fsdp":  # FSDP2: sharded as it was built
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")

    def train_steps(self, cfg: Config, position, step: int):
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
        """This rank's own share of each eval set: one of its objects (one per worker of the largest group), or every
        world_size-th of them in a smaller elastic group."""
        if self._eval_refs is None:
            return None
        out = {}
        for name, refs in self._eval_refs.items():
            mine = ray.get(refs[self.rank :: self.world_size])
            out[name] = mine[0] if len(mine) == 1 else np.concatenate(mine)
        return out


def cpu_threads(local_workers: int) -> int:
    """This node's CPUs (as Ray counts them, and no more than this process may run on) divided among the run's
    workers on it."""
    import os

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node), 1)
    return max(1, int(min(cpus, len(os.sched_getaffinity(0))) // max(1, local_workers)))


def _copy(uri: str, local: Path) -> None:
    """Download `uri` to `local` if it exists."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def train_loop_per_worker(config: dict) -> dict:
    from raypt.loop import train

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_libraries()
    cfg = config_from_dict(config["config"])
    try:
        if config["terminal"] and ray.train.get_context().get_world_rank() == 0:  # the driver shows a bar
            echo_to(lambda line, fields: ray.get(config["stats"].say.remote(line, fields)))  # (none lost at exit)
        return train(cfg, RayContext(cfg, config["run_dir"], config["feeder"], config["eval"], config["data"]))
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


def worker_room(need: dict[str, float], nodes: list[tuple[dict, int]]) -> int:
    """How many training workers that each need `need` fit on `nodes`: (resources of a node, how many such nodes)."""
    per_node = [min((int(res.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0), default=1 << 20)
                for res, _ in nodes]
    return sum(n * count for n, (_, count) in zip(per_node, nodes))


def node_types() -> tuple[list[tuple[dict, int]], str] | None:
    """The nodes the cluster has or can have, as (resources, how many at most), and what they are, in words; None
    when that cannot be known before asking."""
    from ray._private.state import state

    config = state.get_cluster_config()  # KubeRay and the v2 autoscaler publish their node groups
    if config is not None and config.node_group_configs:
        return ([(dict(g.resources), g.max_count if g.max_count >= 0 else 1 << 20) for g in config.node_group_configs],
                "the node types of its autoscaler")
    if not cluster_can_grow():
        return [(n["Resources"], 1) for n in ray.nodes() if n["Alive"]], "the cluster's nodes (it cannot grow)"
    # The v1 autoscaler publishes no node type's resources; `ray up` leaves its config, the types' resources filled in
    # by the cloud provider, on the head node, where a submitted job's driver runs (Ray Tune reads it there too).
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
    if not bootstrap.is_file():
        return None
    import yaml

    c = yaml.safe_load(bootstrap.read_text()) or {}
    types = (c.get("available_node_types") or {}).items()
    return ([(t.get("resources") or {}, t.get("max_workers", c.get("max_workers", 0)) + (n == c.get("head_node_type")))
             for n, t in types], "the node types of its autoscaler")


def preflight(cfg: Config, reserved: float) -> None:
    """Refuse, before any worker starts, a run whose training workers fit on no node the cluster has or can have
    (Ray would wait for them forever), or would leave no CPU to stream data; on a cluster that an autoscaler can
    grow, say that the nodes come as the run asks for them."""
    d, sc = cfg.data, cfg.scaling
    need = {"CPU": sc.cpus_per_worker, "GPU": 1.0 if sc.use_gpu else 0.0}
    if (known := node_types()) and (room := worker_room(need, known[0])) < sc.min_workers:
        wants = ", ".join(f"{v:g} {k}" for k, v in need.items() if v)
        raise UserError(
            f"the run needs {sc.min_workers} training workers of {wants} each, and {known[1]} hold {room}: "
            + ("set scaling.use_gpu: false or add GPU nodes" if sc.use_gpu and not any(
                r.get("GPU") for r, _ in known[0]) else "lower scaling.num_workers or scaling.cpus_per_worker, or "
               "add nodes"))
    total = ray.cluster_resources().get("CPU", 0)
    grows = total - reserved < max(0.25, d.cpus_per_tokenize_worker) and cluster_can_grow()
    if grows:
        print(f"the cluster has {total:g} CPUs now: its autoscaler adds nodes as the run asks for them "
              f"({sc.max_workers} training workers of {sc.cpus_per_worker:g} CPUs{', GPUs' * sc.use_gpu}, and the data "
              "pipeline)", flush=True)
    if d.pretokenized:
        if total - reserved < 0.25 and not grows:  # (the text pipeline's own check: data.pool_plan)
            raise CorpusError(
                f"the {sc.max_workers} training workers reserve {reserved:g} of the cluster's {total:g} CPUs, "
                "leaving none to stream data to them; set data.materialize: true (read all data first), lower "
                "scaling.cpus_per_worker, or add CPUs")
        if not Path(d.pretokenized, "train").is_dir() and "://" not in d.pretokenized:
            raise CorpusError(f"data.pretokenized {d.pretokenized} has no train/ directory; write it with "
                              f"`python -m raypt.data --config ... --out {d.pretokenized}`")
    else:
        for i, src in enumerate(sources(cfg)):
            pool_plan(cfg, len(plan(cfg, "train", src)[1]), reserved, source=i)


def run(cfg: Config) -> dict:
    from ray.train.torch import TorchTrainer

    init_ray()
    ensure_tokenizer(cfg)
    storage = cfg.run.storage_path
    run_dir = f"{storage.rstrip('/')}/{cfg.run.name}"
    if latest := checkpoint.latest(run_dir):
        print(f"run {cfg.run.name!r} already has checkpoints in {run_dir}: resuming from the latest, "
              f"{latest.rsplit('/', 1)[-1]} (use another run.name to start over)", flush=True)
    sc = cfg.scaling
    print(f"global batch {global_batch_size(cfg)} sequences x {cfg.data.seq_len} tokens = "
          f"{global_batch_size(cfg) * cfg.data.seq_len:,} tokens/step; " + ", or ".join(
              f"{w} workers x micro-batch {cfg.train.micro_batch_size} x {grad_accum_steps(cfg, w)} accumulation steps"
              for w in dict.fromkeys([sc.max_workers, sc.min_workers]))
          + (f" (elastic: any size from {sc.min_workers} to {sc.max_workers})" if sc.elastic else ""), flush=True)
    reserved = 0.0 if cfg.data.materialize else sc.max_workers * sc.cpus_per_worker
    check_trackers(cfg.run.loggers)
    preflight(cfg, reserved)
    model_preflight(cfg.model, cfg.data.seq_len)
    if cfg.run.resume_from and not latest:
        checkpoint.check(cfg.run.resume_from)
    encoder = None if cfg.data.pretokenized else encoder_spec(cfg)  # (loaded here once, not in every data process)
    data_fp = fingerprint(cfg, encoder)
    start = Position()  # where the data stream will start: the checkpoint's position, if the data is the same
    if source := latest or cfg.run.resume_from:
        saved = checkpoint.saved_state(source)
        if changes := fingerprint_changes(saved.data, data_fp):
            if cfg.run.data_changed != "restart":
                from raypt.loop import data_changed_message

                raise CorpusError(data_changed_message(source.rstrip("/").rsplit("/", 1)[-1], changes))
        else:
            start = saved.position
        if touched := touched_files(saved.data, data_fp):
            print(f"note: {len(touched)} training files have a new mtime but their old size since the checkpoint "
                  f"(e.g. {touched[0]}); their content is taken to be the same", flush=True)
    # The feeder and the stats actor live beside the driver (they need no CPU), so they outlast worker-group restarts
    # and the loss of any other node; materialize reads the data there. The affinity is hard: a soft one let Ray place
    # them on a worker node, whose loss then ended the run.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    stats = PipelineStats.options(scheduling_strategy=here).remote()  # counters and turnstiles of every pipeline
    feeder = ray.remote(Feeder).options(num_cpus=0, max_restarts=-1, scheduling_strategy=here).remote(
        cfg.to_dict(), encoder, stats)
    evals = eval_chunks(cfg, sc.max_workers, encoder, stats)  # (while the feeder starts)
    ray.get(feeder.ready.remote())
    feeder.open.remote(start, warm=True)  # the first window is made while the workers start
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir, "feeder": feeder, "eval": evals,
                           "data": data_fp, "stats": stats, "terminal": is_terminal(sys.stdout)},
        scaling_config=ray.train.ScalingConfig(num_workers=(sc.min_workers, sc.max_workers) if sc.elastic
                                               else sc.max_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker={"CPU": sc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": env} if (env := faults.forwarded_env() | tracker_env()) else None,
        ),
    )
    t0 = time.perf_counter()
    monitor = Monitor(stats, cfg.train.max_steps) if is_terminal(sys.stdout) else None
    try:
        result = trainer.fit()
    finally:
        if monitor is not None:
            monitor.stop()
        ray.get(feeder.close.remote())
    out = dict(result.return_value or {})
    out["data"] = ray.get(feeder.counts.remote())
    ray.kill(feeder)
    out.update(seconds=time.perf_counter() - t0, final=f"{run_dir}/final", run_dir=run_dir)
    return out


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
    print(f"\ndone: {out.get('step')} steps, {out.get('tokens_seen', 0):,} tokens in {out['seconds']:.0f} s "
          f"({out.get('tokens_seen', 0) / out['seconds']:,.0f} tokens/s overall)")
    if out.get("final_loss") is not None:
        print(f"final train loss {out['final_loss']:.4f}", end="")
        print(f", eval loss {out['eval_loss']:.4f}, perplexity {out['eval_ppl']:.2f}" if "eval_ppl" in out else "")
    if out.get("data", {}).get("documents"):  # (text streamed by this run; none for pre-tokenized data)
        print(format_counts(out["data"]))
    print(f"model: {out['final']}")
    if "sample" in out:  # (made on the workers, by the trained model: loop.end_sample)
        print(f"sample: {prompt!r} -> {out['sample']!r}")
    if cfg.run.report:
        print(f"report: {out['run_dir']}/report/report.md (plots beside it; compare runs with "
              f"`python -m raypt.report RUN_DIR RUN_DIR`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
