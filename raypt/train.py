"""Launch pre-training on Ray Train:

    python -m raypt.train --config CFG [--set section.key=value ...]

Joins the cluster in RAY_ADDRESS (what `ray job submit` sets) or starts a local Ray, builds the data pipeline
(`raypt.data`) or reads a pre-tokenized directory, and runs `raypt.loop.train` on every worker of a `TorchTrainer`.
Re-running the same run.name resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch

from raypt.checkpoint import CheckpointError
from raypt.config import (Config, absolute_paths, add_config_args, config_from_args, config_from_dict,
                          global_batch_size, grad_accum_steps)
from raypt.corpus import CorpusError, filesystem
from raypt.data import build_dataset, init_ray, user_error
from raypt.model import ModelError

class RayContext:
    """`raypt.loop.Context` on a Ray Train worker."""

    def __init__(self, cfg: Config, run_dir: str, eval_ref):
        import ray.train.torch

        c = ray.train.get_context()
        self.cfg, self.rank, self.world_size = cfg, c.get_world_rank(), c.get_world_size()
        self.device = ray.train.torch.get_device()
        self._eval_ref = eval_ref
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
        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy=self.cfg.scaling.strategy)

    def train_batches(self, micro_batch_size: int, epoch: int):
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy", drop_last=True):
            # int32 blocks -> int64 ids; a pinned copy lets the host-to-GPU transfer overlap compute
            x = torch.from_numpy(batch["input_ids"]).long()
            yield x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x

    def eval_blocks(self):
        if self._eval_ref is None:
            return None
        blocks = ray.get(self._eval_ref)
        return blocks[self.rank :: self.world_size]

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{metrics['step']:06d}")

    @contextlib.contextmanager
    def latest_checkpoint(self):
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)


def _copy(uri: str, local: Path) -> None:
    """Download `uri` to `local` if it exists."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def _checkpoints(run_dir: str) -> list[str]:
    """Names of the checkpoint directories of a run (local path or URI)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def train_loop_per_worker(config: dict) -> dict:
    from raypt.loop import train

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _quiet_libraries()
    cfg = config_from_dict(config["config"])
    return train(cfg, RayContext(cfg, config["run_dir"], config["eval"]))


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def ensure_tokenizer(cfg: Config) -> None:
    """Train the run's tokenizer first when it names a path that does not exist yet and a vocab_size."""
    t = cfg.tokenizer
    if t.path and t.vocab_size and not Path(t.path).exists() and not cfg.model.name_or_path:
        from raypt.tokenizer import train_tokenizer

        print(f"training a {t.vocab_size}-token byte-level BPE on data.train_paths -> {t.path}", flush=True)
        train_tokenizer(cfg.data.train_paths, t.vocab_size, t.path, fmt=cfg.data.format,
                        text_field=cfg.data.text_field, decode_errors=cfg.data.decode_errors)


def _as_blocks(batch: dict, seq_len: int, where: str) -> dict:
    """Parquet rows (a list or tensor column) -> an (n, seq_len) int32 array; a wrong length is a clear error."""
    col = batch["input_ids"]
    blocks = np.stack(col) if col.dtype == object else np.asarray(col)
    if blocks.ndim != 2 or blocks.shape[1] != seq_len:
        raise CorpusError(f"data.pretokenized {where} holds blocks of {blocks.shape[-1]} tokens, but data.seq_len is "
                          f"{seq_len}; set data.seq_len to match, or re-run `python -m raypt.data` with this seq_len")
    return {"input_ids": blocks.astype(np.int32, copy=False)}


def read_blocks(path: Path, seq_len: int) -> ray.data.Dataset:
    """A directory of Parquet blocks written by `python -m raypt.data --out`."""
    return ray.data.read_parquet(str(path.resolve()), columns=["input_ids"]).map_batches(
        _as_blocks, batch_format="numpy", fn_kwargs={"seq_len": seq_len, "where": str(path)})


def datasets(cfg: Config) -> tuple[ray.data.Dataset, np.ndarray | None]:
    """The training Dataset (streaming, materialized, or pre-tokenized Parquet) and the fixed eval blocks."""
    d, t, sc = cfg.data, cfg.train, cfg.scaling
    n_eval = t.eval_batches * t.micro_batch_size * sc.num_workers
    reserved = 0.0 if d.materialize else sc.num_workers * sc.cpus_per_worker
    if d.pretokenized:
        total = ray.cluster_resources().get("CPU", 0)
        if total - reserved < 0.25:  # (the text pipeline's own check is in raypt.data.pool_plan)
            raise CorpusError(
                f"the {sc.num_workers} training workers reserve {reserved:g} of the cluster's {total:g} CPUs, "
                "leaving none to stream data to them; set data.materialize: true (read all data first), lower "
                "scaling.cpus_per_worker, or add CPUs")
        root = Path(d.pretokenized)
        if not (root / "train").is_dir():
            raise CorpusError(f"data.pretokenized {root} has no train/ directory; write it with "
                              f"`python -m raypt.data --config ... --out {root}`")
        train_ds = read_blocks(root / "train", d.seq_len)
        eval_ds = read_blocks(root / "eval", d.seq_len) if (root / "eval").is_dir() else None
    else:
        train_ds = build_dataset(cfg, "train", reserved_cpus=reserved).dataset
        eval_ds = build_dataset(cfg, "eval").dataset if d.eval_paths else None
    eval_blocks = None
    if eval_ds is not None:
        parts, have = [], 0
        for b in eval_ds.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(b["input_ids"])
            have += len(parts[-1])
            if have >= n_eval:
                break
        eval_blocks = np.concatenate(parts)[:n_eval] if parts else None
    if d.materialize:
        train_ds = train_ds.materialize()
    return train_ds, eval_blocks


def run(cfg: Config) -> dict:
    from ray.train.torch import TorchTrainer

    init_ray()
    ensure_tokenizer(cfg)
    storage = cfg.run.storage_path
    run_dir = f"{storage.rstrip('/')}/{cfg.run.name}"
    if _checkpoints(run_dir):
        print(f"run {cfg.run.name!r} already has checkpoints in {run_dir}: resuming from the latest "
              "(use another run.name to start over)", flush=True)
    print(f"global batch {global_batch_size(cfg)} sequences x {cfg.data.seq_len} tokens = "
          f"{global_batch_size(cfg) * cfg.data.seq_len:,} tokens/step; {cfg.scaling.num_workers} workers x "
          f"micro-batch {cfg.train.micro_batch_size} x {grad_accum_steps(cfg)} accumulation steps", flush=True)
    train_ds, eval_blocks = datasets(cfg)
    sc = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir,
                           "eval": ray.put(eval_blocks) if eval_blocks is not None else None},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker={"CPU": sc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets={"train": train_ds},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    out = dict(result.return_value or {})
    out.update(seconds=time.perf_counter() - t0, final=f"{run_dir}/final", run_dir=run_dir)
    return out


def sample(final_dir: str, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` by the exported model (checks that final/ loads and generates)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raypt.train", description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    args = ap.parse_args(argv)
    cfg = absolute_paths(config_from_args(args))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _quiet_libraries()
    print("resolved config:\n" + cfg.to_yaml(), flush=True)
    try:
        out = run(cfg)
    except Exception as e:
        err = user_error(e, (CorpusError, ModelError, CheckpointError))
        if err is None:
            raise
        print(f"error: {getattr(err, 'message', str(err))}", file=sys.stderr)
        return 2
    prompt = cfg.train.sample_prompt or "The "
    print(f"\ndone: {out.get('step')} steps, {out.get('tokens_seen', 0):,} tokens in {out['seconds']:.0f} s "
          f"({out.get('tokens_seen', 0) / out['seconds']:,.0f} tokens/s overall)")
    if out.get("final_loss") is not None:
        print(f"final train loss {out['final_loss']:.4f}", end="")
        print(f", eval loss {out['eval_loss']:.4f}, perplexity {out['eval_ppl']:.2f}" if "eval_ppl" in out else "")
    print(f"model: {out['final']}")
    if Path(out["final"]).is_dir():
        print(f"sample: {prompt!r} -> {sample(out['final'], prompt)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
