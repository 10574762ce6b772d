"""The training data order: one deterministic stream of blocks, cut into global batches, each rank taking its slice.

Ray Data's `streaming_split` hands blocks to workers in whatever order they finish (ray#58658) and has no iterator
checkpoint (ray#48224), so a restarted run would repeat or skip data. raypt owns the order instead:

- the source is the corpus's work units in plan order (`raypt.data.plan`; for pre-tokenized data, its Parquet files
  in sorted order), each packed on its own, read with `preserve_order`: the same blocks in every run, whatever the
  number of tokenize actors or training workers;
- shuffling: consecutive whole units are gathered into windows of at least `data.shuffle_blocks` blocks, and each
  window is emitted in a random order seeded by (run.seed, pass, window), so a batch mixes many documents and
  units, and every pass differs, yet block i of the stream is the same in every run;
- global batch s is the next `global_batch` blocks of that stream; rank r of W trains on its r-th slice, so the
  summed gradient is the same for any W;
- a `Position` (pass, first unit of the current window, blocks of that window consumed) is saved with every
  checkpoint; resuming starts the pipeline at that unit and rebuilds the window, so at most one window is re-read.

One `Feeder` actor per run holds the stream and hands each rank its slice of each step (`get(step, rank)`); it
outlives worker-group restarts, and rank 0 re-opens it at the checkpoint's position when a group starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from raypt.corpus import CorpusError


@dataclass(frozen=True)
class Position:
    """Where the next training block comes from."""

    epoch: int = 0
    """Passes over the data started."""
    unit: int = 0
    """First work unit (pre-tokenized: Parquet file) of the shuffle window holding the next block."""
    offset: int = 0
    """Blocks of that window already consumed."""


def rows_from(read: Callable[[int], Iterable[dict]], pos: Position, window_blocks: int = 0,
              seed: int | None = None) -> Iterator[tuple[np.ndarray, Position]]:
    """Blocks from `pos` on, pass after pass, each with the position after it. `read(first_unit)` iterates one pass's
    ``{"input_ids", "unit"}`` batches in stream order, starting at or before `first_unit`. Whole units are gathered
    into windows of at least `window_blocks` blocks; with a `seed`, each window comes out in its own random order."""
    epoch, start, skip = pos.epoch, pos.unit, pos.offset
    while True:
        fed, whole_pass = 0, start == 0 and skip == 0
        for first, blocks in _windows(read(start), start, window_blocks):
            order = (np.random.default_rng([seed, epoch, first]).permutation(len(blocks)) if seed is not None
                     else np.arange(len(blocks)))
            for i in range(skip, len(blocks)):
                yield blocks[order[i]], Position(epoch, first, i + 1)
            fed += len(blocks) - skip
            skip = 0
        if fed == 0 and whole_pass:
            raise CorpusError("the training data yields no block of data.seq_len tokens; add text or lower data.seq_len")
        epoch, start, skip = epoch + 1, 0, 0


def _windows(batches: Iterable[dict], start: int, min_blocks: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first unit, blocks) of consecutive whole units from unit `start` on, each window closed at a unit boundary
    once it holds `min_blocks` blocks (a function of the units' block counts alone, so a resume rebuilds it)."""
    first, last, parts, n = None, None, [], 0
    for b in batches:
        units, blocks = np.asarray(b["unit"]), b["input_ids"]
        keep = units >= start
        units, blocks = units[keep], blocks[keep]
        if not len(units):
            continue
        cuts = np.flatnonzero(np.diff(units)) + 1
        for a, z in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(units)].tolist()):
            u = int(units[a])
            if first is None:
                first = u
            elif u != last and n >= min_blocks:  # a new unit begins and the window is full: emit it
                yield first, np.concatenate(parts)
                first, parts, n = u, [], 0
            parts.append(blocks[a:z])
            n += z - a
            last = u
    if parts:
        yield first, np.concatenate(parts)


def global_batches(rows: Iterator[tuple[np.ndarray, Position]], size: int) -> Iterator[tuple[np.ndarray, Position]]:
    """Group rows into (size, seq_len) batches, each with the position after its last block."""
    while True:
        got = [next(rows) for _ in range(size)]
        yield np.stack([b for b, _ in got]), got[-1][1]


def shuffle_args(cfg) -> tuple[int, int | None]:
    """(window_blocks, seed) for `rows_from` from a run's config."""
    if not cfg.data.shuffle:
        return 0, None
    return cfg.data.shuffle_blocks, cfg.run.seed


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    n = len(batch) // world_size
    return batch[rank * n : (rank + 1) * n]


class Feeder:
    """Owns the run's training stream; every rank asks it for its slice of each step's global batch. A Ray actor
    (`raypt.train` starts it); this module itself needs no Ray, so the in-process loop runs without it."""

    def __init__(self, cfg_dict: dict, reserved_cpus: float):
        from raypt.config import config_from_dict, global_batch_size
        from raypt.data import init_ray

        init_ray()  # this process's DataContext: preserve_order, quiet user errors
        self.cfg = config_from_dict(cfg_dict)
        self.world_size, self.reserved = self.cfg.scaling.num_workers, reserved_cpus
        self.global_batch = global_batch_size(self.cfg)
        self.stats: list = []  # PipelineStats actors of the pipelines started so far
        d = self.cfg.data
        if d.pretokenized:
            self.files = parquet_files(f"{d.pretokenized}/train")
            self.num_units = len(self.files)
        else:
            from raypt.data import plan

            self.num_units = len(plan(self.cfg, "train")[1])
        self.materialized = self._dataset(0).materialize() if d.materialize else None
        self.batches, self.cache, self.next_step = None, {}, 0

    def ready(self) -> int:
        """Units in one pass (the driver waits on this: it surfaces listing errors and the materialize step)."""
        return self.num_units

    def _dataset(self, first_unit: int):
        d = self.cfg.data
        if d.pretokenized:
            from raypt.train import read_blocks

            return read_blocks(self.files[first_unit:], d.seq_len, first_unit)
        from raypt.data import build_dataset

        split = build_dataset(self.cfg, "train", reserved_cpus=self.reserved, first_unit=first_unit)
        self.stats.append(split.stats)
        return split.dataset

    def _read(self, first_unit: int) -> Iterable[dict]:
        ds = self.materialized or self._dataset(first_unit)
        return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4)

    def open(self, pos: Position, step: int) -> None:
        """Restart the stream at `pos`; the next global batch is step `step + 1`."""
        if pos.unit > self.num_units or (pos.unit == self.num_units and pos.offset > 0):
            raise CorpusError(f"the checkpoint's data position (unit {pos.unit}) is past the {self.num_units} work "
                              "units of the training data: the corpus changed since it was saved; start a new run.name "
                              "or restore the corpus")
        self.batches = global_batches(rows_from(self._read, pos, *shuffle_args(self.cfg)), self.global_batch)
        self.cache, self.next_step = {}, step + 1

    def get(self, step: int, rank: int) -> tuple[np.ndarray, Position]:
        """Rank `rank`'s slice of global batch `step` (1-based), and the data position after the whole batch."""
        if self.batches is None:
            raise RuntimeError("Feeder.get before Feeder.open")
        while self.next_step <= step:
            self.cache[self.next_step] = [*next(self.batches), set()]
            self.next_step += 1
        batch, pos, taken = self.cache[step]
        taken.add(rank)
        if len(taken) == self.world_size:
            del self.cache[step]
        return rank_slice(batch, rank, self.world_size), pos

    def close(self) -> None:
        """End the stream while Ray is still up (Ray Data logs an error when an iterator dies with its process)."""
        if self.batches is not None:
            self.batches.close()
            self.batches = None

    def counts(self) -> dict:
        """The text pipelines' counters so far (documents, skips by reason, tokens, blocks)."""
        import ray

        total: Counter = Counter()
        for s in self.stats:
            total.update(ray.get(s.get.remote())[0])
        total.pop("peak_actor_rss_mb", None)
        total["pipelines"] = len(self.stats)  # one per pass over the data, and one per resume
        return dict(total)


def parquet_files(path: str) -> list[str]:
    """The Parquet files of a pre-tokenized split, sorted: the stream order of pre-tokenized data."""
    from raypt.corpus import list_files

    files = [f for f in list_files([path], "data.pretokenized").files if f.endswith(".parquet")]
    if not files:
        raise CorpusError(f"data.pretokenized: {path} holds no .parquet files; write it with "
                          "`python -m raypt.data --config ... --out DIR`")
    return files
