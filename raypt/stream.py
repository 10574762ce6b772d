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

Nothing here touches the data itself: a `Unit` carries an opaque payload (an array, or object references that a rank
fetches), and a rank's slice is a list of (window, block indices) until `gather` reads the rows it needs.
"""

from __future__ import annotations

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
    starts: np.ndarray = field(init=False, repr=False, compare=False)
    """Offset of each unit's first row in the window."""

    def __post_init__(self):
        object.__setattr__(self, "starts", np.cumsum([0] + [u.blocks for u in self.units]))

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def order(self, seed: int | None) -> np.ndarray:
        """Row i of the window's stream is row `order[i]` of its units laid end to end."""
        if seed is None:
            return np.arange(self.size)
        return np.random.default_rng([seed, self.epoch, self.first]).permutation(self.size)


class Sequencer:
    """Units back into pass order. `add` takes a piece of any unit as it arrives (a unit may come in several pieces:
    `total` is its whole row count), and returns the units that are now complete and next in line."""

    def __init__(self, start: int = 0):
        self.next = start
        self.pending: dict[int, tuple[int, int, list]] = {}  # seq -> (total rows, rows so far, pieces)

    def add(self, seq: int, total: int, rows: int, piece) -> list[Unit]:
        if seq < self.next:
            raise RuntimeError(f"unit {seq} arrived twice")
        t, got, pieces = self.pending.get(seq, (total, 0, []))
        if rows and piece is not None:
            pieces.append(piece)
        if t != total or got + rows > total:
            raise RuntimeError(f"unit {seq}: {got + rows} rows arrived for a unit of {total}")
        self.pending[seq] = (t, got + rows, pieces)
        ready = []
        while self.next in self.pending and self.pending[self.next][1] == self.pending[self.next][0]:
            t, _, pieces = self.pending.pop(self.next)
            ready.append(Unit(self.next, t, tuple(pieces)))
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
        return mine, Position(self.window.epoch, self.window.first, self.at)


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


def fingerprint_changes(saved: dict | None, now: dict) -> list[str]:
    """What differs between a checkpoint's data fingerprint and the current one, in words (empty: the same)."""
    if saved is None:
        return ["the checkpoint records no data fingerprint (saved by an older raypt)"]
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in ("files", "files_sha256", "units_sha256", "num_files") or saved.get(key) == now.get(key):
            continue
        out.append("tokenizer: its files changed" if key == "tokenizer" else
                   f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    if saved.get("files_sha256") != now.get("files_sha256"):
        if "files" in saved and "files" in now:
            before, after = {f[0]: f[1] for f in saved["files"]}, {f[0]: f[1] for f in now["files"]}
            changed = [f"{p} (added)" for p in after if p not in before] + [
                f"{p} (removed)" for p in before if p not in after] + [
                f"{p} (size {before[p]} -> {after[p]})" for p in after if p in before and before[p] != after[p]]
            out.append("files: " + ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
        else:
            out.append(f"files: the list of {saved.get('num_files')} files changed (now {now.get('num_files')})")
    elif saved.get("units_sha256") != now.get("units_sha256"):
        out.append("the work-unit plan changed")
    return out


def touched_files(saved: dict | None, now: dict) -> list[str]:
    """Files of a fingerprint whose size is the same but whose mtime is new (written again, say): reported, since
    only the bytes could tell whether they changed."""
    if not saved or "files" not in saved or "files" not in now:
        return []
    before = {f[0]: f[1:] for f in saved["files"]}
    return [f[0] for f in now["files"] if f[0] in before and before[f[0]][0] == f[1] and before[f[0]][1] != f[2]]
