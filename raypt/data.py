"""The Ray Data corpus pipeline: files -> documents -> parallel tokenize + pack -> blocks of `seq_len` tokens.

    python -m raypt.data --config CFG [--set section.key=value ...] --out DIR

`build_dataset` returns a streaming Ray Dataset of ``{"input_ids": int32[seq_len]}`` rows that the trainer consumes
directly; the CLI writes the same rows as Parquet under ``DIR/train`` and ``DIR/eval`` plus ``DIR/summary.json``.

The corpus is planned into units of ~8 MB (`raypt.corpus.plan_units`: small files grouped, big ones cut into line
ranges); the plan depends on the data alone, not on the cluster. An actor pool maps units to blocks: each actor loads
the tokenizer once, reads its unit's documents (`raypt.corpus` decodes and counts skips), encodes them in batches with
the fast tokenizer and cuts the unit's stream into blocks (each unit's last tail, < seq_len, is dropped and counted).
A unit's blocks are a pure function of the unit, and outputs keep unit order (`preserve_order`), so block i of the
stream is the same in every run: `raypt.feed` builds exact resume on that. Every row carries its unit's index.
Reading inside the tokenizing actor means document text never crosses processes; memory is bounded by a batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from raypt.config import Config, absolute_paths, add_config_args, config_from_args
from raypt.corpus import CorpusError, Listing, Segment, iter_documents, list_files, plan_units
from raypt.packing import BlockPacker
from raypt.tokenizer import tokenizer_path

SPLITS = ("train", "eval")
TEXT_BATCH_CHARS = 8 << 20  # a tokenizer batch is closed at this many characters even if it has few documents
MIN_UNITS = 16  # a small corpus is cut finer (down to 64 KB units) so that actors share it; each unit drops a tail


@ray.remote(num_cpus=0)
class PipelineStats:
    """Counters the pipeline's tasks and actors add to; read once at the end."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.first_ready = self.last_add = None

    def ready(self, t: float) -> None:
        """An actor finished starting up at wall time `t`: steady-state work is timed from the first such call."""
        self.first_ready = t if self.first_ready is None else min(self.first_ready, t)

    def add(self, counts: dict, t: float, rss_mb: float) -> None:
        self.counts.update(counts)
        self.counts["peak_actor_rss_mb"] = max(self.counts["peak_actor_rss_mb"], round(rss_mb))
        self.last_add = t if self.last_add is None else max(self.last_add, t)

    def get(self) -> tuple[dict, float | None]:
        steady = self.last_add - self.first_ready if self.last_add and self.first_ready else None
        return dict(self.counts), steady


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TokenizePack:
    """Ray Data actor: a unit of files -> documents -> ``BOS doc EOS`` stream -> full blocks of seq_len tokens.

    Each unit is packed on its own (its tail, < seq_len tokens, is dropped and counted), so its blocks do not depend
    on which actor ran it or what it ran before. The tokenizer is loaded once per actor.
    """

    def __init__(self, cfg: Config, tokenizer_path: str, bos_id, eos_id, threads: int, stats):
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # before the tokenizer's thread pool starts
        from raypt.tokenizer import DocumentEncoder, load_tokenizer

        self.d = cfg.data
        self.encode = DocumentEncoder(load_tokenizer(tokenizer_path), bos_id, eos_id, self.d.max_doc_chars)
        self.stats = stats
        stats.ready.remote(time.time())

    def __call__(self, batch: dict):
        counts: Counter = Counter()
        unit, packer = int(batch["index"][0]), BlockPacker(self.d.seq_len)
        docs, chars = [], 0
        for seg in batch["unit"][0]:
            for doc in iter_documents(
                Segment(**seg), self.d.format, counts, text_field=self.d.text_field, decode_errors=self.d.decode_errors
            ):
                docs.append(doc)
                chars += len(doc)
                if len(docs) >= self.d.docs_per_batch or chars >= TEXT_BATCH_CHARS:
                    yield self._blocks(docs, packer, unit, counts)
                    docs, chars = [], 0
        if docs:
            yield self._blocks(docs, packer, unit, counts)
        self.stats.add.remote(counts, time.time(), _peak_rss_mb())

    def _blocks(self, docs: list[str], packer: BlockPacker, unit: int, counts: Counter) -> dict:
        tokens = self.encode(docs)
        blocks = packer.add(tokens)
        counts["tokens"] += len(tokens)
        counts["blocks"] += len(blocks)
        return {"input_ids": blocks, "unit": np.full(len(blocks), unit, np.int64)}


def plan(cfg: Config, split: str = "train") -> tuple[Listing, list[list[Segment]]]:
    """The split's files and its work units, in stream order. A function of the data alone (never of the cluster),
    so a data position recorded by one run means the same units in the next."""
    paths = cfg.data.train_paths if split == "train" else cfg.data.eval_paths
    listing = list_files(paths, f"data.{split}_paths")
    return listing, plan_units(listing, cfg.data.format, cfg.data.unit_bytes, min_units=MIN_UNITS)


def pool_plan(cfg: Config, units: int, reserved_cpus: float = 0.0) -> tuple[int, int]:
    """(tokenize actors, tokenizer threads per actor). By default one single-threaded actor per free CPU,
    which measured faster than fewer actors with more tokenizer threads (the per-token Python work then also runs
    in parallel), and never more actors than units. `reserved_cpus` are held by training workers."""
    d = cfg.data
    total = ray.cluster_resources().get("CPU", 1)
    free = total - reserved_cpus
    if free < d.cpus_per_tokenize_worker:
        raise CorpusError(
            f"no CPU left for tokenize actors: training workers reserve {reserved_cpus:g} of the cluster's {total:g} "
            "CPUs; set data.materialize: true (tokenize before training), lower scaling.cpus_per_worker or "
            "data.cpus_per_tokenize_worker, or add CPU nodes"
        )
    actors = min(d.num_tokenize_workers or max(1, int(free // d.cpus_per_tokenize_worker)), units)
    return actors, max(1, int(free // actors))


@dataclass
class SplitData:
    dataset: ray.data.Dataset
    listing: Listing
    stats: ray.actor.ActorHandle
    actors: int
    threads: int
    units: int


def build_dataset(cfg: Config, split: str = "train", reserved_cpus: float = 0.0, first_unit: int = 0) -> SplitData:
    """The streaming Ray Dataset of packed blocks for a split ("train" or "eval"), ``{"input_ids", "unit"}`` rows in
    unit order, from unit `first_unit` on; nothing runs until consumed."""
    d = cfg.data
    listing, units = plan(cfg, split)
    tok_path = tokenizer_path(cfg)
    # Fail here, in the driver, rather than inside every actor.
    from raypt.tokenizer import load_tokenizer, special_ids

    t = cfg.tokenizer
    bos, eos = special_ids(load_tokenizer(tok_path), t.add_bos, t.add_eos, t.bos_id, t.eos_id)

    stats = PipelineStats.remote()
    actors, threads = pool_plan(cfg, len(units), reserved_cpus)
    items = [{"index": i, "unit": [dataclasses.asdict(seg) for seg in unit]} for i, unit in enumerate(units)]
    items = items[first_unit:]
    if not items:
        raise CorpusError(f"data.{split}_paths has {len(units)} work units; a data position at unit {first_unit} is "
                          "past its end (did the corpus change since the checkpoint?)")
    blocks = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TokenizePack, batch_size=1, batch_format="numpy", num_cpus=d.cpus_per_tokenize_worker,
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=1),
        fn_constructor_kwargs=dict(cfg=cfg, tokenizer_path=tok_path, bos_id=bos, eos_id=eos, threads=threads,
                                   stats=stats),
    )
    return SplitData(blocks, listing, stats, actors, threads, len(units))


def summarize(split: SplitData, seq_len: int, seconds: float) -> dict:
    """The split's counters after it has been consumed: documents, skips by reason, tokens, blocks, dropped tail."""
    counts, steady = ray.get(split.stats.get.remote())
    c = Counter(counts)
    skipped = {k: v for k, v in sorted(c.items()) if k.startswith("skipped_") or k.startswith("documents_with_")}
    return {
        "files": c["files"],
        "hidden_files_skipped": split.listing.hidden_skipped,
        "documents": c["documents"],
        "skipped": skipped,
        "tokens": c["tokens"],
        "blocks": c["blocks"],
        "dropped_tokens": c["tokens"] - c["blocks"] * seq_len,
        "tokenize_actors": split.actors,
        "peak_actor_rss_mb": c["peak_actor_rss_mb"],
        "seconds": round(seconds, 2),
        "tokens_per_s": round(c["tokens"] / seconds) if seconds > 0 else None,
        "steady_tokens_per_s": round(c["tokens"] / steady) if steady else None,
    }


def check_not_empty(summary: dict, split: str, cfg: Config) -> None:
    if summary["blocks"] == 0:
        hint = ""
        if summary["skipped"]:
            hint = f" (skipped: {summary['skipped']})"
        raise CorpusError(
            f"data.{split}_paths yields no block of data.seq_len={cfg.data.seq_len} tokens: "
            f"{summary['documents']} documents gave {summary['tokens']} tokens{hint}; "
            "add text or lower data.seq_len"
        )


def write_pretokenized(cfg: Config, out: str) -> dict:
    """Run the pipeline for every split that has paths; write Parquet blocks and summary.json under `out`."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    summary = {"seq_len": cfg.data.seq_len, "tokenizer": tokenizer_path(cfg)}
    for split in SPLITS:
        if split == "eval" and not cfg.data.eval_paths:
            continue
        t0 = time.perf_counter()
        sd = build_dataset(cfg, split)
        sd.dataset.select_columns(["input_ids"]).write_parquet(str((out_dir / split).resolve()))
        summary[split] = summarize(sd, cfg.data.seq_len, time.perf_counter() - t0)
        check_not_empty(summary[split], split, cfg)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: dict) -> str:
    lines = []
    for split in SPLITS:
        s = summary.get(split)
        if not s:
            continue
        lines.append(
            f"{split}: {s['files']} files, {s['documents']:,} documents -> {s['tokens']:,} tokens -> "
            f"{s['blocks']:,} blocks of {summary['seq_len']} ({s['dropped_tokens']:,} tail tokens dropped) "
            f"in {s['seconds']} s, {s['tokens_per_s']:,} tokens/s"
        )
        if s["skipped"]:
            lines.append("  skipped: " + ", ".join(f"{k}={v}" for k, v in s["skipped"].items()))
        if s["hidden_files_skipped"]:
            lines.append(f"  hidden files not read ({len(s['hidden_files_skipped'])}): "
                         + ", ".join(s["hidden_files_skipped"][:5]) + (" ..." if len(s["hidden_files_skipped"]) > 5 else ""))
    return "\n".join(lines)


def user_error(exc: BaseException, types: tuple = (CorpusError,)) -> BaseException | None:
    """The user-input error (of `types`) behind an exception that came back through Ray: task errors keep it in
    `.cause`, Ray Train's WorkerGroupError in `.worker_failures`."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types) and not isinstance(e, ray.exceptions.RayError):
            return e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
        todo.extend(getattr(e, "worker_failures", {}).values())
    return None


class _QuietUserErrors(logging.Filter):
    """Ray Data logs a failed UDF's stack trace before raising; for a user's input error raypt prints one clear
    line instead, so those records are dropped (other errors keep their traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += repr(record.exc_info[1])
        return "CorpusError" not in text and not text.startswith("Exception occurred in Ray Data or Ray Core internal")


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (what `ray job submit` sets) or start a local one."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.execution_options.preserve_order = True  # block i of a stream is the same in every run
    for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
        logging.getLogger(name).addFilter(_QuietUserErrors())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raypt.data", description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--out", required=True, help="directory for Parquet blocks (train/, eval/) and summary.json")
    args = ap.parse_args(argv)
    cfg = absolute_paths(config_from_args(args))
    print("resolved config:\n" + cfg.to_yaml(), flush=True)
    init_ray()
    try:
        summary = write_pretokenized(cfg, args.out)
    except Exception as e:
        if (err := user_error(e)) is None:
            raise
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
