"""The training data order: one deterministic stream of blocks, cut into global batches, each rank taking its slice.

Ray Data's `streaming_split` hands blocks to workers in whatever order they finish (ray#58658) and has no iterator
checkpoint (ray#48224), so a restarted run would repeat or skip data. raypt owns the order instead:

- the stream is the corpus's work units in plan order (`raypt.data.plan`; for pre-tokenized data, its Parquet files in
  sorted order), each packed on its own, read with `preserve_order`: block i is the same in every run, whatever the
  number of tokenize actors or training workers;
- global batch s is the next `global_batch` blocks of that stream; rank r of W trains on its r-th slice, so the
  summed gradient is the same for any W;
- a `Position` (epoch, unit, offset: the next block is block `offset` of unit `unit`) is saved with every checkpoint;
  resuming starts the pipeline at that unit, so only blocks of one unit are read again and dropped.

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
    """Work unit (pre-tokenized: Parquet file), in stream order, holding the next block."""
    offset: int = 0
    """Blocks of that unit already consumed."""


def index_in_unit(units: np.ndarray, last: list[int]) -> np.ndarray:
    """Each row's index within its unit; `last` = [unit, count] of the previous batch, updated in place."""
    idx = np.empty(len(units), np.int64)
    cuts = np.flatnonzero(np.diff(units)) + 1
    for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(units)].tolist()):
        start = last[1] if units[a] == last[0] else 0
        idx[a:b] = np.arange(start, start + b - a)
        last[:] = [int(units[a]), start + b - a]
    return idx


def rows_from(read: Callable[[int], Iterable[dict]], pos: Position) -> Iterator[tuple[np.ndarray, Position]]:
    """Blocks from `pos` on, pass after pass, each with the position after it. `read(first_unit)` iterates one pass's
    ``{"input_ids", "unit"}`` batches in stream order, starting at or before `first_unit`."""
    epoch, unit, offset = pos.epoch, pos.unit, pos.offset
    while True:
        fed, last = 0, [-1, 0]
        for b in read(unit):
            u = np.asarray(b["unit"])
            idx = index_in_unit(u, last)
            keep = np.flatnonzero((u > unit) | ((u == unit) & (idx >= offset)))
            blocks = b["input_ids"]
            for k in keep.tolist():
                yield blocks[k], Position(epoch, int(u[k]), int(idx[k]) + 1)
            fed += len(keep)
        if fed == 0 and unit == 0 and offset == 0:
            raise CorpusError("the training data yields no block of data.seq_len tokens; add text or lower data.seq_len")
        epoch, unit, offset = epoch + 1, 0, 0


def global_batches(rows: Iterator[tuple[np.ndarray, Position]], size: int) -> Iterator[tuple[np.ndarray, Position]]:
    """Group rows into (size, seq_len) batches, each with the position after its last block."""
    while True:
        got = [next(rows) for _ in range(size)]
        yield np.stack([b for b, _ in got]), got[-1][1]


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    n = len(batch) // world_size
    return batch[rank * n : (rank + 1) * n]


class Feeder:
    """Owns the run's training stream; every rank asks it for its slice of each step's global batch. A Ray actor
    (`raypt.train` starts it); this module itself needs no Ray, so the in-process loop runs without it."""

    def __init__(self, cfg_dict: dict, world_size: int, reserved_cpus: float):
        from raypt.config import config_from_dict, global_batch_size
        from raypt.data import init_ray

        init_ray()  # this process's DataContext: preserve_order, quiet user errors
        self.cfg = config_from_dict(cfg_dict)
        self.world_size, self.reserved = world_size, reserved_cpus
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
        self.batches = global_batches(rows_from(self._read, pos), self.global_batch)
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
