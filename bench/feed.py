"""Feeding ranks: the previous design (one actor hands every rank its bytes) vs raypt's (the actor hands out only
references; ranks fetch their rows from where the tokenize actors left them), side by side in one command.

    python bench/feed.py [--mb 16] [--ranks 2,8,32] [--steps 12] [--seq-lens 512,2048,8192]

On one corpus (../shared/corpus/cnews/train replicated to --mb megabytes; a 4k BPE trained on it), tokenized once
per seq_len (`raypt.data --out`) and read in full before the clock starts (data.materialize), so that both paths
serve the same blocks and the tokenizer is timed on its own. The old actor keeps its own default window of 8192
blocks. For N consumer
actors standing in for ranks (each pulls its slices of global batches of N x 8 blocks as fast as it can, at
seq_len 2048) it reports tokens/s delivered, and of the order-keeping actor: CPU seconds, RSS and bytes it sent
(old: the blocks; new: window descriptors, with every object reference counted as its 28-byte id). Then the
Feeder's RSS at each --seq-lens (N = 8): the old one holds shuffle windows of blocks, the new one none.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SOURCE = ROOT.parent / "shared" / "corpus" / "cnews" / "train"

from raypt.config import load_config  # noqa: E402
from raypt.stream import Position  # noqa: E402


class OldFeeder:
    """raypt's previous Feeder, as it was: it pulls the whole stream (`iter_batches`, the bytes), rebuilds shuffle
    windows of at least `shuffle_blocks` blocks with np.concatenate, and answers `get(step, rank)` with each rank's
    slice of each global batch."""

    def __init__(self, cfg_dict: dict, world: int, shuffle_blocks: int):
        from raypt.config import config_from_dict
        from raypt.cluster import init_ray
        from raypt.data import build_dataset

        init_ray()
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # what its order rested on
        self.cfg = config_from_dict(cfg_dict)
        self.world, self.window, self.seed = world, shuffle_blocks, self.cfg.run.seed
        self.ds = build_dataset(self.cfg, "train").dataset.materialize()
        self.cache, self.next_step, self.sent = {}, 1, 0
        self.batches = self._batches()

    def _windows(self):
        first, last, parts, n = None, None, [], 0
        for b in self.ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
            units, blocks = np.asarray(b["unit"]), b["input_ids"]
            cuts = np.flatnonzero(np.diff(units)) + 1
            for a, z in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(units)].tolist()):
                u = int(units[a])
                if first is None:
                    first = u
                elif u != last and n >= self.window:
                    yield first, np.concatenate(parts)
                    first, parts, n = u, [], 0
                parts.append(blocks[a:z])
                n += z - a
                last = u
        if parts:
            yield first, np.concatenate(parts)

    def _batches(self):
        g = self.cfg.train.global_batch_size
        epoch, rows = 0, []
        while True:
            for first, blocks in self._windows():
                for i in np.random.default_rng([self.seed, epoch, first]).permutation(len(blocks)):
                    rows.append(blocks[i])
                    if len(rows) == g:
                        yield np.stack(rows)
                        rows = []
            epoch += 1

    def ready(self) -> bool:
        return True

    def get(self, step: int, rank: int) -> np.ndarray:
        while self.next_step <= step:
            self.cache[self.next_step] = [next(self.batches), set()]
            self.next_step += 1
        batch, taken = self.cache[step]
        taken.add(rank)
        if len(taken) == self.world:
            del self.cache[step]
        n = len(batch) // self.world
        out = batch[rank * n : (rank + 1) * n]
        self.sent += out.nbytes
        return out

    def usage(self) -> dict:
        return _usage(self.sent)


class NewFeeder:
    """raypt's Feeder, measured: what it sends is counted at the consumer (`Consumer.new`)."""

    def __init__(self, cfg_dict: dict, world: int):
        from raypt.feed import Feeder

        self.f = Feeder(cfg_dict)
        self.f.open(Position())

    def ready(self) -> bool:
        return True

    def window(self, k: int, rank: int):
        return self.f.window(k, rank)

    def usage(self) -> dict:
        return _usage(0)


def _usage(sent: int) -> dict:
    t = os.times()
    return {"cpu_s": t.user + t.system, "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "sent_bytes": sent}


class Consumer:
    """A stand-in for one rank: pulls its slices of `steps` global batches as fast as it can."""

    def old(self, feeder, rank: int, steps: int) -> dict:
        t0, tokens = time.perf_counter(), 0
        ahead = feeder.get.remote(1, rank)
        for s in range(1, steps + 1):
            cur, ahead = ahead, feeder.get.remote(s + 1, rank)
            tokens += ray.get(cur).size
        return {"tokens": tokens, "seconds": time.perf_counter() - t0}

    def new(self, feeder, cfg_dict: dict, rank: int, world: int, steps: int) -> dict:
        from raypt.config import config_from_dict
        from raypt.feed import RankFeed

        cfg = config_from_dict(cfg_dict)
        t0, tokens, desc = time.perf_counter(), 0, 0
        feed = RankFeed(feeder, cfg, rank, world, Position())
        take = feed._take

        def counted():  # the bytes of each window descriptor the Feeder sent, refs as their ids
            nonlocal desc
            before = len(feed.ready)
            take()
            for w in feed.ready[before:]:
                desc += len(pickle.dumps([(u.seq, u.blocks, u.data[0], [r.binary() for r in u.data[1]])
                                          for u in w.units])) + 32
        feed._take = counted
        for _ in range(steps):
            blocks, _ = next(feed)
            tokens += blocks.size
        return {"tokens": tokens, "seconds": time.perf_counter() - t0, "descriptor_bytes": desc}


def corpus(mb: int, tmp: Path) -> Path:
    src = sorted(SOURCE.iterdir())
    out, have, i = tmp / "corpus", 0, 0
    out.mkdir()
    while have < mb << 20:
        for f in src:
            dst = out / f"{i:04d}_{f.name}"
            shutil.copy(f, dst)
            have += dst.stat().st_size
            i += 1
    return out


def config(tmp: Path, text: Path, tok: Path, world: int, seq_len: int):
    """The run's config, on blocks pre-tokenized once per seq_len."""
    from raypt.data import write_pretokenized

    blocks = tmp / f"blocks-{seq_len}"
    sets = [f"data.train_paths=[{text}]", f"tokenizer.path={tok}", f"data.seq_len={seq_len}",
            "data.unit_bytes=1048576", f"run.storage_path={tmp}"]
    if not blocks.exists():
        write_pretokenized(load_config(None, sets), str(blocks))
    return load_config(None, [*sets, f"data.pretokenized={blocks}", "data.materialize=true",
                              f"scaling.num_workers={world}", "train.micro_batch_size=8",
                              f"train.global_batch_size={8 * world}"]).to_dict()


def run(kind: str, cfg: dict, consumers: list, world: int, steps: int) -> dict:
    t0 = time.perf_counter()
    if kind == "old":
        feeder = ray.remote(OldFeeder).options(num_cpus=0).remote(cfg, world, 8192)
    else:
        feeder = ray.remote(NewFeeder).options(num_cpus=0).remote(cfg, world)
    ray.get(feeder.ready.remote())
    setup = time.perf_counter() - t0
    base = ray.get(feeder.usage.remote())
    t1 = time.perf_counter()
    if kind == "old":
        outs = ray.get([c.old.remote(feeder, r, steps) for r, c in enumerate(consumers[:world])])
    else:
        outs = ray.get([c.new.remote(feeder, cfg, r, world, steps) for r, c in enumerate(consumers[:world])])
    wall = time.perf_counter() - t1
    use = ray.get(feeder.usage.remote())
    ray.kill(feeder)
    tokens = sum(o["tokens"] for o in outs)
    return {"path": kind, "ranks": world, "seq_len": cfg["data"]["seq_len"], "tokens": tokens,
            "tokens_per_s": round(tokens / wall), "setup_s": round(setup, 1),
            "order_cpu_s": round(use["cpu_s"] - base["cpu_s"], 2), "order_rss_mb": round(use["rss_mb"]),
            "order_sent_mb": round((use["sent_bytes"] + sum(o.get("descriptor_bytes", 0) for o in outs)) / 2**20, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=16)
    ap.add_argument("--ranks", default="2,8,32")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-lens", default="512,2048,8192")
    args = ap.parse_args()
    if not SOURCE.is_dir():
        print(f"skipped: {SOURCE} is not there")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="raypt-feed-bench-"))
    try:
        text = corpus(args.mb, tmp)
        from raypt.tokenizer import train_tokenizer

        tok = tmp / "tok"
        train_tokenizer([str(SOURCE)], 4096, str(tok))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        from raypt.cluster import init_ray
        from raypt.data import build_dataset, summarize

        init_ray()
        t0 = time.perf_counter()  # the tokenizer's own rate: the pipeline alone, nothing consuming but a count
        split = build_dataset(load_config(None, [f"data.train_paths=[{text}]", f"tokenizer.path={tok}",
                                                 "data.seq_len=2048", "data.unit_bytes=1048576"]), "train")
        for _ in split.dataset.iter_internal_ref_bundles():
            pass
        s = summarize(split, 2048, time.perf_counter() - t0)
        print(json.dumps({"tokenize": {k: s[k] for k in ("tokens", "tokens_per_s", "steady_tokens_per_s",
                                                          "tokenize_actors")}}), flush=True)
        ranks = [int(x) for x in args.ranks.split(",")]
        consumers = [ray.remote(Consumer).options(num_cpus=0).remote() for _ in range(max(ranks))]
        rows = []
        for n in ranks:
            cfg = config(tmp, text, tok, n, 2048)
            for kind in ("old", "new"):
                rows.append(run(kind, cfg, consumers, n, args.steps))
                print(json.dumps(rows[-1]), flush=True)
        for L in [int(x) for x in args.seq_lens.split(",")]:
            cfg = config(tmp, text, tok, 8, L)
            for kind in ("old", "new"):
                rows.append(run(kind, cfg, consumers, 8, max(4, args.steps * 2048 // L)))
                print(json.dumps(rows[-1]), flush=True)
        print("\nranks  seq_len  path  tokens/s     order CPU s  order RSS MB  order sent MB")
        for r in rows:
            print(f"{r['ranks']:>5}  {r['seq_len']:>7}  {r['path']:>4}  {r['tokens_per_s']:>10,}  "
                  f"{r['order_cpu_s']:>11}  {r['order_rss_mb']:>12}  {r['order_sent_mb']:>13}")
        for n in ranks:
            old, new = (next(r for r in rows if r["ranks"] == n and r["seq_len"] == 2048 and r["path"] == k)
                        for k in ("old", "new"))
            print(f"N={n}: new/old tokens/s {new['tokens_per_s'] / old['tokens_per_s']:.2f}x, "
                  f"new / tokenizer rate {new['tokens_per_s'] / (s['steady_tokens_per_s'] or s['tokens_per_s']):.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
