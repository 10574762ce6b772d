"""The training data order, pure numpy: work units -> shuffle windows -> global batches -> each rank's slice.

One definition serves the Ray run (`raypt.feed`), the in-process loop (`raypt.loop.LocalContext`) and the tests:

- a pass visits the corpus's work units in a seeded permutation of their plan order (`unit_order`), so a corpus laid
  out by domain still mixes; each unit's blocks are a pure function of the unit (`raypt.data`);
- units arrive from the pipeline in any order; a `Sequencer` puts them back into pass order by their index, so the
  stream never depends on which actor finished first;
- consecutive whole units are gathered into windows of at least `min_blocks` blocks (`windows`), and each window is
  read in its own permutation seeded by (seed, pass, first unit): a batch mixes many documents, every pass differs,
  yet block i of the stream is the same in every run;
- global batch s is the next `global_batch` blocks of the stream and rank r of W takes its r-th slice
  (`RankStream`; slices differ by at most one block when W does not divide the batch), so the summed gradient is
  the same for any W, and an elastic run that shrinks or grows goes on with the same batches;
- a `Position` (pass, first unit of the window holding the next block, blocks of it consumed) is saved with every
  checkpoint; resuming re-forms that window from its first unit, so at most one window is read again.
- a mixture of sources interleaves each source's own stream block by block (`mix_schedule`: each block to the
  source furthest behind its weight), and its `MixPosition` holds every source's position and count.

Nothing here touches the data itself: a `Unit` carries an opaque payload (an array, or object references that a rank
fetches), and a rank's slice is a list of (window, block indices) until `gather` reads the rows it needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def order_args(cfg) -> tuple[int, int | None]:
    """(fewest blocks in a window, seed) from a run's config; without shuffling: windows of one unit, plan order."""
    d = cfg.data
    if not d.shuffle:
        return 1, None
    return math.ceil(d.shuffle_tokens / d.seq_len), cfg.run.seed


class EmptyStream(ValueError):
    """A whole pass yielded no block."""


@dataclass(frozen=True)
class Position:
    """Where the next training block comes from."""

    epoch: int = 0
    """Passes over the data started."""
    unit: int = 0
    """First work unit, counted in the pass's order, of the shuffle window holding the next block."""
    offset: int = 0
    """Blocks of that window already consumed."""


@dataclass(frozen=True)
class MixPosition:
    """Where the next block of a mixture of sources comes from."""

    sources: tuple[Position, ...]
    """Each source's own position at the start of the mixture window holding the next block (its `offset`: rows
    of that source window already taken)."""
    taken: tuple[int, ...]
    """Blocks the mixture had taken from each source before that window (all passes): the schedule's state."""
    offset: int = 0
    """Blocks of the mixture window already consumed."""


def unit_order(num_units: int, epoch: int, seed: int | None) -> np.ndarray:
    """The unit ids of one pass in the order it visits them: a permutation seeded by (seed, pass), or plan order."""
    if seed is None:
        return np.arange(num_units)
    return np.random.default_rng([seed, epoch, 0x756E6974]).permutation(num_units)


@dataclass(frozen=True)
class Unit:
    seq: int
    """Place in its pass's order."""
    blocks: int
    """Rows (blocks of seq_len tokens) it holds."""
    data: Any = None
    """The rows, or whatever `gather`'s `fetch` turns into them (object references, say)."""


@dataclass(frozen=True)
class Window:
    epoch: int
    first: int
    """Seq of its first unit."""
    units: tuple[Unit, ...]
    rows: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Its stream as row indices into its units laid end to end, when given (a mixture's window); else `order`."""
    start: MixPosition | None = None
    """A mixture's position at its first row (None: a source's own window, at (epoch, first))."""
    starts: np.ndarray = field(init=False, repr=False, compare=False)
    """Offset of each unit's first row in the window."""

    def __post_init__(self):
        object.__setattr__(self, "starts", np.cumsum([0] + [u.blocks for u in self.units]))

    @property
    def size(self) -> int:
        return int(self.starts[-1]) if self.rows is None else len(self.rows)

    def order(self, seed: int | None) -> np.ndarray:
        """Row i of the window's stream is row `order[i]` of its units laid end to end."""
        if self.rows is not None:
            return self.rows
        if seed is None:
            return np.arange(self.size)
        return np.random.default_rng([seed, self.epoch, self.first]).permutation(self.size)

    def position(self, consumed: int) -> Position | MixPosition:
        """The data position once `consumed` rows of its stream are taken."""
        if self.start is not None:
            return dataclasses.replace(self.start, offset=consumed)
        return Position(self.epoch, self.first, consumed)


class Sequencer:
    """Units back into pass order. `add` takes a piece of any unit as it arrives (a unit may come in several pieces:
    `total` is its whole row count), and returns the units that are now complete and next in line."""

    def __init__(self, start: int = 0):
        self.next = start
        self.pending: dict[int, tuple[int, int, list]] = {}  # seq -> (total rows, rows so far, pieces)

    def add(self, seq: int, total: int, rows: int, piece) -> list[Unit]:
        if seq < self.next:
            raise RuntimeError(f"unit {seq} arrived twice")
        expected, got, pieces = self.pending.get(seq, (total, 0, []))
        if rows and piece is not None:
            pieces.append(piece)
        if expected != total or got + rows > total:
            raise RuntimeError(f"unit {seq}: {got + rows} rows arrived for a unit of {total}")
        self.pending[seq] = (expected, got + rows, pieces)
        ready = []
        while self.next in self.pending and self.pending[self.next][1] == self.pending[self.next][0]:
            expected, _, pieces = self.pending.pop(self.next)
            ready.append(Unit(self.next, expected, tuple(pieces)))
            self.next += 1
        return ready

    def __len__(self) -> int:
        """Units waiting for an earlier one."""
        return len(self.pending)


def windows(units: Iterable[Unit], epoch: int, min_blocks: int) -> Iterator[Window]:
    """Consecutive whole units (in seq order) gathered into windows, each closed at a unit boundary once it holds
    `min_blocks` rows: a function of the units' row counts alone, so a resume at a window's first unit re-forms it.
    Units without rows are kept (they hold no block, but they are part of the position)."""
    group, n = [], 0
    for u in units:
        group.append(u)
        n += u.blocks
        if n >= max(1, min_blocks):
            yield Window(epoch, group[0].seq, tuple(group))
            group, n = [], 0
    if group:
        yield Window(epoch, group[0].seq, tuple(group))


def stream_windows(read_pass: Callable[[int, int], Iterable[Unit]], start: Position,
                   min_blocks: int) -> Iterator[Window]:
    """Windows from `start` on, pass after pass. `read_pass(epoch, first_seq)` gives that pass's units in seq order
    from `first_seq` on."""
    epoch, first = start.epoch, start.unit
    while True:
        fed = 0
        for w in windows(read_pass(epoch, first), epoch, min_blocks):
            fed += w.size
            yield w
        if fed == 0 and first == 0:
            raise EmptyStream("the training data yields no block of data.seq_len tokens; add text or lower data.seq_len")
        epoch, first = epoch + 1, 0


def mix_schedule(weights, taken: tuple[int, ...], n: int) -> np.ndarray:
    """The sources of the next `n` blocks of a mixture that has taken `taken` blocks from each source: smooth
    weighted round-robin, each block to the source furthest behind its share ((blocks + 1) x weight - taken; ties
    to the first). Any run of consecutive blocks holds each source's share to within about a block, and the schedule
    is a function of `taken` alone, so a resume needs no other state."""
    w = [x / sum(weights) for x in weights]
    got, total, out = list(taken), sum(taken), np.empty(n, np.int64)
    for i in range(n):
        total += 1
        s = max(range(len(w)), key=lambda k: total * w[k] - got[k])
        got[s] += 1
        out[i] = s
    return out


class _Cursor:
    """A source's block stream, one row at a time, in its own windows' order."""

    def __init__(self, wins: Iterator[Window], start: Position, seed: int | None):
        self.wins, self.seed, self.start = wins, seed, start
        self.window, self.order, self.at = None, None, start.offset

    def take(self) -> tuple[Window, int]:
        while self.window is None or self.at == self.window.size:
            if self.window is not None:
                self.at = 0
            self.window = next(self.wins)
            self.order = self.window.order(self.seed)
        self.at += 1
        return self.window, int(self.order[self.at - 1])

    def position(self) -> Position:
        return self.start if self.window is None else Position(self.window.epoch, self.window.first, self.at)


def mix_windows(streams: list[Iterator[Window]], start: MixPosition, weights, size: int,
                seed: int | None) -> Iterator[Window]:
    """A mixture of sources as windows of `size` blocks: each source's windows (`stream_windows`, opened at
    `start.sources`) read in their own order, pass after pass (a source that runs out starts its next pass), and
    interleaved block by block by `mix_schedule`. Each window holds the source windows it draws from and its rows,
    and starts at a `MixPosition`, so a resume re-forms it from the sources' positions."""
    cursors = [_Cursor(wins, pos, seed) for wins, pos in zip(streams, start.sources)]
    taken = list(start.taken)
    while True:
        begin = MixPosition(tuple(c.position() for c in cursors), tuple(taken))
        units, base, rows = [], {}, np.empty(size, np.int64)
        for i, s in enumerate(mix_schedule(weights, tuple(taken), size)):
            w, row = cursors[s].take()
            key = (int(s), w.epoch, w.first)
            if key not in base:
                base[key] = sum(u.blocks for u in units)
                units.extend(w.units)
            rows[i] = base[key] + row
            taken[s] += 1
        yield Window(-1, -1, tuple(units), rows=rows, start=begin)


Slice = list[tuple[Window, np.ndarray]]
"""Rows of a rank's share of one step: (window, row indices into the window's units laid end to end), in order."""


def rank_rows(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of rank `rank`'s slice of a global batch: consecutive slices, the first
    `global_batch % world_size` ranks one row more than the rest."""
    base, extra = divmod(global_batch, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


class RankStream:
    """Rank `rank`'s slice of each global batch of `global_batch` blocks, from `offset` blocks into the first window,
    with the position after the whole batch. Windows are pulled only as the stream reaches them."""

    def __init__(self, wins: Iterator[Window], offset: int, global_batch: int, rank: int, world_size: int,
                 seed: int | None):
        if global_batch < world_size:
            raise ValueError(f"a global batch of {global_batch} leaves some of {world_size} ranks without a block")
        self.wins, self.seed = wins, seed
        self.before, self.mine = rank_rows(global_batch, world_size, rank)
        self.after = global_batch - self.before - self.mine
        self.window: Window | None = None
        self.order, self.at, self._skip_first = None, 0, offset

    def _advance(self, n: int, keep: Slice | None) -> None:
        while n:
            while self.window is None or self.at == self.window.size:
                self.window = next(self.wins)
                self.order, self.at = self.window.order(self.seed), self._skip_first
                self._skip_first = 0
            take = min(n, self.window.size - self.at)
            if keep is not None:
                keep.append((self.window, self.order[self.at : self.at + take]))
            self.at += take
            n -= take

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Slice, Position]:
        mine: Slice = []
        self._advance(self.before, None)
        self._advance(self.mine, mine)
        self._advance(self.after, None)
        return mine, self.window.position(self.at)


def gather(rows: Slice, fetch: Callable[[Unit], np.ndarray]) -> np.ndarray:
    """The blocks of a slice, (n, seq_len), in slice order. `fetch(unit)` gives a unit's rows (it may cache them)."""
    parts = []
    for w, idx in rows:
        unit = np.searchsorted(w.starts, idx, side="right") - 1  # (units without rows share a start: the next wins)
        part = None
        for k in np.unique(unit):
            sel = unit == k
            got = fetch(w.units[k])[idx[sel] - w.starts[k]]
            if part is None:
                part = np.empty((len(idx), *got.shape[1:]), got.dtype)
            part[sel] = got
        parts.append(part)
    return np.concatenate(parts)
