"""The data order on Ray (`raypt.stream` defines it): one actor keeps the order, never the bytes.

- The `Feeder` actor (one per run, beside the driver; it outlives worker-group restarts) runs the train pipeline
  (`raypt.data.build_dataset`) and takes its output as references (`iter_internal_ref_bundles`): every block stays in
  the object store of the node whose tokenize actor made it. Each block's schema carries its unit and the unit's
  block count, so the Feeder puts units back into pass order (`stream.Sequencer`), holds the pipeline at most `AHEAD`
  units past the first missing one (`PipelineStats.turn`), forms the shuffle windows and hands them out a window at
  a time: object references and row counts, some bytes per unit, for thousands of steps.
- Each rank (`RankFeed`) asks for window k+1 while it trains on window k, has its node pull that window's units as
  soon as it knows them (ranks on one node share the copy), and takes its own rows of each global batch from them.
- The driver opens the Feeder where the run will start (`open(warm=True)`), so the pipeline makes the first window
  while the workers start; rank 0 opens it at its checkpoint's position whenever a worker group starts.
- A mixture (`data.sources`) runs one pipeline per source, each with its share of the tokenize actors, and the
  Feeder hands out `stream.mix_windows` of their windows.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Iterator
from functools import partial

import numpy as np
import ray

from raypt.cluster import HEADROOM, actors_needed, init_ray
from raypt.config import config_from_dict, global_batch_size, sources
from raypt.corpus import CorpusError
from raypt.data import build_dataset, table_blocks, unit_tag
from raypt.pipeline_stats import PipelineStats, Stats
from raypt.rundata import DataChangedError, RunData, split_dir
from raypt.storage import filesystem
from raypt.stream import (EmptyStream, MixPosition, Position, RankStream, Sequencer, Unit, Window, gather,
                          mix_windows, order_args, stream_windows, unit_order)

MIX_WINDOW_STEPS = 16
"""A mixture's windows hold a shuffle window's blocks (its sources' own windows are shuffled; the mixture interleaves
them block by block), but never more than this many global batches (a small source would otherwise be read for many
passes before the first step), nor less than one."""
AHEAD = 64
"""Units the pipeline may run past the first one its consumer still waits for (the re-sequencing buffer's bound)."""


def units_in_order(dataset: ray.data.Dataset, order: np.ndarray, first: int, stats=None) -> Iterator[Unit]:
    """The units of a pipeline over `order[first:]`, back in that order, each as (unit id, block references) —
    nothing is fetched. `stats.advance` tells the pipeline's turnstile how far the consumer got."""
    seq_of = {int(u): s for s, u in enumerate(order)}
    seq = Sequencer(first)
    for bundle in dataset.iter_internal_ref_bundles():
        uid, total = unit_tag(bundle.schema)
        ready = seq.add(seq_of[uid], total, bundle.num_rows(), tuple(e.ref for e in bundle.blocks))
        for u in ready:
            yield Unit(u.seq, u.blocks, (int(order[u.seq]), sum(u.data, ())))
        if ready and stats is not None:
            stats.advance(seq.next)
    if len(seq) or seq.next != len(order):
        raise RuntimeError(f"the data pipeline delivered units up to {seq.next} of {len(order)} "
                           f"({len(seq)} more waiting for an earlier one)")


def fetch_unit(unit: Unit) -> np.ndarray:
    """A unit's (n, seq_len) blocks, read from this node's object store (pulled here first if made elsewhere)."""
    uid, refs = unit.data
    tables = ray.get(list(refs))
    for table in tables:  # the unit tag was read from the schema; the rows say it too
        units = table.column("unit")
        if len(units) and (units[0].as_py() != uid or units[-1].as_py() != uid):
            raise RuntimeError(f"a data block tagged as unit {uid} holds rows of unit {units[0].as_py()}")
    blocks = [table_blocks(table) for table in tables]
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class Feeder:
    """Owns the run's training order; ranks ask it for the shuffle windows (`window`) and fetch the blocks
    themselves. A Ray actor (`raypt.train` starts it next to the driver, with no CPU)."""

    def __init__(self, cfg_dict: dict, data: RunData | None = None, encoder=None, stats=None):
        init_ray()  # this process's DataContext; quiet user errors
        self.cfg = config_from_dict(cfg_dict)
        d = self.cfg.data
        self.encoder = encoder
        self._workers(self.cfg.scaling.max_workers)
        self.min_blocks, self.seed = order_args(self.cfg)
        self.data = data or RunData.build(self.cfg, encoder)  # listed once: every pass and resume reuse it
        self.sources, self.num_units = self.data.sources, self.data.num_units
        self.stats_actor = stats or PipelineStats.remote()  # counts and turnstiles of all this run's pipelines
        self.stats: list[Stats] = []  # the pipelines started so far
        self.pools: list = []  # and their tokenize pools' (fewest, most) actors
        self.train_rate = None  # tokens/s rank 0 has been asking for windows at, since the stream was last opened
        self.materialized = [self._materialize(i) for i in range(len(self.sources))] if d.materialize else None
        self.wins, self.opened = None, None
        self._reset()

    def _reset(self) -> None:
        self.held: list[Window] = []  # the windows some rank may still ask for: first_held, first_held + 1, ...
        self.first_held = 0
        self.asked_by: dict[int, int] = {}  # the window each rank asked for last
        self.tokens_before = [0]  # tokens in the windows before window k of the opened stream
        self.rate_from = None  # (when, tokens before window k - 1) at rank 0's first ask for a window k >= 2

    def _workers(self, world_size: int) -> None:
        """The size of the worker group the stream is for (an elastic run's changes with every start), and the CPUs
        its workers hold: the pipeline never takes them, even before they start (`open(warm=True)`); a task waiting
        in the turnstile would otherwise hold one while training, which it waits for, cannot start."""
        sc = self.cfg.scaling
        self.world_size = world_size
        self.reserved = 0.0 if self.cfg.data.materialize else world_size * sc.cpus_per_worker
        with warnings.catch_warnings():  # (deprecated for label selectors, which need labelled nodes; kept to 2027)
            warnings.simplefilter("ignore", DeprecationWarning)
            ray.data.DataContext.get_current().execution_options.exclude_resources = ray.data.ExecutionResources(
                cpu=self.reserved)

    def ready(self) -> list[int]:
        """Units in one pass of each source (the driver waits on this: it surfaces listing errors and the
        materialize step)."""
        return self.num_units

    def _pipeline(self, i: int, order: np.ndarray, first: int) -> Iterator[Unit]:
        """Source i's units `order[first:]`, tokenized by a pool sized to its share of what training reads."""
        actor_rate = self.stats[-1].actor_rate() if self.stats else None
        share = self.sources[i].weight / sum(src.weight for src in self.sources)
        needed = actors_needed(self.train_rate and self.train_rate * share, actor_rate)
        split = build_dataset(self.cfg, "train", reserved_cpus=self.reserved, order=order, first=first, ahead=AHEAD,
                              planned=self.data.train[i], needed=needed, stats=self.stats_actor, encoder=self.encoder,
                              src=self.sources[i])
        self.stats.append(split.stats)
        self.pools.append(split.actors)
        if needed:  # (never for pre-tokenized data: no actor tokenizes)
            n = split.actors[1]
            print(f"tokenize pool sized to the rate: at most {n} actor{'s' * (n > 1)}; training reads "
                  f"{self.train_rate:,.0f} tokens/s, an actor makes {actor_rate:,.0f} (x{HEADROOM:g} headroom)",
                  flush=True)
        return units_in_order(split.dataset, order, first, split.stats)

    def _materialize(self, i: int) -> dict[int, Unit]:
        """Every unit of source i tokenized once, before training; later passes re-order the references."""
        return {u.data[0]: u for u in self._pipeline(i, np.arange(self.num_units[i]), 0)}

    def _read_pass(self, i: int, epoch: int, first: int) -> Iterator[Unit]:
        order = unit_order(self.num_units[i], epoch, self.seed)
        if self.materialized is None:
            return self._pipeline(i, order, first)
        done = self.materialized[i]
        return (Unit(s, done[int(order[s])].blocks, done[int(order[s])].data) for s in range(first, len(order)))

    def open(self, pos: Position, world_size: int | None = None, warm: bool = False) -> None:
        """Restart the order at `pos` (the checkpoint's) for a group of `world_size` workers (default: the most the
        run allows). `warm`: the driver's guess of where rank 0 will open, before the workers start; the pipeline
        starts now and makes the first window while they start up. Rank 0's own `open` then keeps that stream if it
        asks for the same position before any rank asked for a window."""
        before = self.world_size
        self._workers(world_size or self.cfg.scaling.max_workers)
        if self.train_rate and self.world_size != before:  # (a group of another size reads at another rate)
            self.train_rate *= self.world_size / before
        n = len(self.sources)
        if n > 1 and pos == Position():  # a mixture's start (a fresh run, or run.data_changed: restart)
            pos = MixPosition((Position(),) * n, (0,) * n)
        if not warm and self.wins is not None and pos == self.opened and not self.asked_by:
            return
        at = pos.sources if isinstance(pos, MixPosition) else (pos,)
        if len(at) != n or any(p.unit > u or (p.unit == u and p.offset > 0) for p, u in zip(at, self.num_units)):
            if warm:
                return  # (rank 0 meets it and reports it)
            raise DataChangedError(
                f"the checkpoint's data position ({pos}) does not fit the {self.num_units} work units of the training "
                f"data's {n} source(s): the corpus changed since it was saved; start a new run.name or restore the "
                "corpus")
        self.close()
        self._reset()
        streams = [stream_windows(partial(self._read_pass, i), p, self.min_blocks) for i, p in enumerate(at)]
        batch = global_batch_size(self.cfg)
        size = max(batch, min(self.min_blocks, MIX_WINDOW_STEPS * batch))
        self.wins = streams[0] if n == 1 else mix_windows(streams, pos, [src.weight for src in self.sources], size,
                                                          self.seed)
        self.opened = pos
        if warm:
            try:
                self._pull()
            except Exception:  # rank 0's open starts again and raises it where it is reported
                self.close()

    def _pull(self) -> None:
        self.held.append(next(self.wins))
        self.tokens_before.append(self.tokens_before[-1] + self.held[-1].size * self.cfg.data.seq_len)

    def window(self, k: int, rank: int) -> Window:
        """Window k (0: the one holding the opened position) of the stream, as references. Asking for k says that
        the rank has all windows before it, so those are let go once every rank has asked past them."""
        if self.wins is None:
            raise RuntimeError("Feeder.window before Feeder.open")
        if k < self.first_held:
            raise RuntimeError(f"rank {rank} asked for window {k}, already let go; a restarted rank needs Feeder.open")
        if rank == 0 and k >= 2:
            self._measure(k)
        try:
            while self.first_held + len(self.held) <= k:
                self._pull()
        except EmptyStream as e:
            raise CorpusError(str(e)) from None
        self.asked_by[rank] = k
        done = min(self.asked_by.get(r, 0) for r in range(self.world_size))
        if done > self.first_held:
            del self.held[: done - self.first_held]
            self.first_held = done
        return self.held[k - self.first_held]

    def _measure(self, k: int) -> None:
        """Training's read rate from rank 0's asks (from window 2 on: window 0 and 1 are asked at start-up). A rank
        asks for window k as soon as it has window k - 1, so the rate is what it trained at, or what the pipeline
        delivered at when that was slower."""
        now, tokens = time.monotonic(), self.tokens_before[k - 1]
        if self.rate_from is None:
            self.rate_from = now, tokens
        elif now > self.rate_from[0]:
            self.train_rate = (tokens - self.rate_from[1]) / (now - self.rate_from[0])

    def close(self) -> None:
        """End the stream while Ray is still up (Ray Data logs an error when an iterator dies with its process)."""
        if self.wins is not None:
            self.wins.close()
            self.wins, self.opened = None, None

    def counts(self) -> dict:
        """The pipelines' counters so far (documents, skips by reason, tokens, blocks)."""
        total: Counter = Counter()
        for s in self.stats:
            total.update(s.get()[0])
        total.pop("peak_actor_rss_mb", None)
        total["pipelines"] = len(self.stats)  # one per pass over the data, and one per resume
        out = dict(total)
        out["tokenize_pools"] = [list(p) for p in self.pools]
        return out


class RankFeed:
    """A rank's end of the order: windows from the Feeder one ahead, their units pulled to this node as soon as they
    are known, this rank's rows of each step gathered from them: its data-parallel rank's, which the ranks of a
    tensor-parallel group (scaling.tensor_parallel consecutive ranks) share; each asks the Feeder as itself."""

    def __init__(self, feeder, cfg, rank: int, world_size: int, position: Position):
        self.feeder, self.rank = feeder, rank
        _, seed = order_args(cfg)
        self.pending = [feeder.window.remote(0, rank)]
        self.ready: list[Window] = []
        self.next = 1
        tp = cfg.scaling.tensor_parallel
        self.steps = RankStream(self._windows(), position.offset, global_batch_size(cfg), rank // tp, world_size // tp,
                                seed)
        self.cache: dict = {}

    def _take(self) -> None:
        """The window asked for last, with its units' transfer started; and ask for the next."""
        w = ray.get(self.pending.pop())
        refs = list(dict.fromkeys(r for u in w.units for r in u.data[1]))  # (a mixture may hold a unit twice)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)  # starts the pull, returns at once
        self.ready.append(w)
        self.pending.append(self.feeder.window.remote(self.next, self.rank))
        self.next += 1

    def _windows(self) -> Iterator[Window]:
        while True:
            if not self.ready:
                self._take()
            yield self.ready.pop(0)

    def _fetch(self, unit: Unit) -> np.ndarray:
        key = unit.data[1]
        if key not in self.cache:
            self.cache[key] = fetch_unit(unit)
        return self.cache[key]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, Position]:
        rows, pos = next(self.steps)
        if not self.ready and self.pending and ray.wait(self.pending, timeout=0)[0]:
            self._take()  # the next window is known: pull it now (one ahead, never more)
        blocks = gather(rows, self._fetch)
        live = {u.data[1] for w, _ in rows for u in w.units}
        for key in [k for k in self.cache if k not in live]:  # units of windows this rank is done with
            del self.cache[key]
        return blocks, pos


def eval_chunks(cfg, world_size: int, encoder=None, stats=None) -> dict[str, list] | None:
    """Each source's fixed eval set (the first blocks of its eval split, in unit order), by source name ("": a
    one-source run), cut into one object per rank so that each rank reads only its own share; None: no eval data."""
    sets = {}
    for src in sources(cfg):
        if (refs := _eval_chunks(cfg, src, world_size, encoder, stats)) is not None:
            sets[src.name] = refs
    return sets or None


def _eval_chunks(cfg, src, world_size: int, encoder=None, stats=None) -> list | None:
    d, t = cfg.data, cfg.train
    if d.pretokenized:
        import pyarrow.fs as pafs

        fs, path = filesystem(split_dir(d.pretokenized, "eval", src))
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return None
    elif not src.eval_paths:
        return None
    per_rank = t.eval_batches * t.micro_batch_size
    need = per_rank * world_size
    split = build_dataset(cfg, "eval", encoder=encoder, stats=stats, src=src)
    parts, have = [], 0
    units = units_in_order(split.dataset, np.arange(split.units), 0)
    for u in units:
        if u.blocks:
            parts.append(fetch_unit(u))
            have += u.blocks
        if have >= need:
            break
    units.close()
    if not have:
        return None
    blocks = np.concatenate(parts)[:need]
    n = len(blocks) // world_size  # the same count on every rank: FSDP's forwards are collective
    return [ray.put(blocks[r * n : (r + 1) * n]) for r in range(world_size)]
