"""The training data order (`raypt.stream`), pure: sequencing, shuffle windows, rank slices, resume anywhere."""

import itertools

import numpy as np
import pytest

from raypt.rundata import fingerprint_changes, touched_files
from raypt.stream import (EmptyStream, MixPosition, Position, RankStream, Sequencer, Unit, Window, gather, mix_schedule,
                          mix_windows, stream_windows, unit_order)

SIZES = [3, 7, 1, 0, 4, 6, 2, 5]  # blocks per unit (one without any)


def units_of(sizes=SIZES):
    """Units whose rows are (unit id, row, block id): every block of the corpus has a unique id."""
    ids = np.cumsum([0] + list(sizes))
    return [np.stack([np.full(n, u), np.arange(n), ids[u] + np.arange(n)], axis=1) for u, n in enumerate(sizes)]


def reader(sizes=SIZES, seed=None):
    rows = units_of(sizes)

    def read_pass(epoch, first):
        order = unit_order(len(sizes), epoch, seed)
        return (Unit(s, sizes[order[s]], rows[order[s]]) for s in range(first, len(sizes)))

    return read_pass


def blocks(pos=Position(), window=5, seed=0, sizes=SIZES, batch=1, rank=0, world=1):
    """(block ids of rank `rank`'s slice, position after the batch) of each step."""
    wins = stream_windows(reader(sizes, seed), pos, window)
    for rows, p in RankStream(wins, pos.offset, batch, rank, world, seed):
        yield gather(rows, lambda u: u.data)[:, 2].tolist(), p


def take(it, n):
    return list(itertools.islice(it, n))


@pytest.mark.parametrize("window, seed", [(1, None), (5, 0), (100, 7)])
def test_each_pass_is_a_permutation_made_of_whole_unit_windows(window, seed):
    n = sum(SIZES)
    got = take(blocks(window=window, seed=seed), 2 * n)
    passes = [[b[0] for b, _ in got[p * n : (p + 1) * n]] for p in range(2)]
    for p, ids in enumerate(passes):
        assert sorted(ids) == list(range(n))  # every block once per pass
        assert all(pos.epoch == p for _, pos in got[p * n : (p + 1) * n])
    if seed is None:
        assert passes[0] == passes[1] == list(range(n))
    else:
        assert passes[0] != passes[1]  # each pass has its own unit order and window orders
    # a window holds whole consecutive units (in the pass's order) and closes once it has `window` blocks
    order = unit_order(len(SIZES), 0, seed)
    sizes = np.array(SIZES)[order]
    starts = sorted({pos.unit for _, pos in got[:n]})
    for a, b in zip(starts, starts[1:]):
        assert sizes[a:b].sum() >= window and (b - a == 1 or sizes[a : b - 1].sum() < window)


def test_units_are_visited_in_a_seeded_permutation_per_pass():
    assert unit_order(5, 3, None).tolist() == list(range(5))
    a, b = unit_order(50, 0, 1), unit_order(50, 1, 1)
    assert sorted(a.tolist()) == list(range(50)) and a.tolist() != b.tolist()
    assert unit_order(50, 0, 1).tolist() == a.tolist() and unit_order(50, 0, 2).tolist() != a.tolist()


@pytest.mark.parametrize("window, seed", [(1, None), (5, 0), (9, 3), (100, 1)])
def test_resuming_at_any_position_continues_the_same_stream(window, seed):
    n = sum(SIZES)
    stream = take(blocks(window=window, seed=seed), 3 * n)
    for k in range(2 * n):
        resumed = take(blocks(stream[k][1], window=window, seed=seed), n)
        assert resumed == stream[k + 1 : k + 1 + n], k


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_rank_slices_of_a_global_batch_are_the_batch_for_any_world_size(world):
    """Also when the world size does not divide the batch (an elastic run at 3 or 5 workers): slices differ by at
    most one block, and together they are the batch."""
    whole = take(blocks(window=6, seed=2, batch=8), 12)  # 96 blocks: over two passes
    ranks = [take(blocks(window=6, seed=2, batch=8, rank=r, world=world), 12) for r in range(world)]
    for s, (batch, pos) in enumerate(whole):
        assert sum((ranks[r][s][0] for r in range(world)), []) == batch
        assert all(ranks[r][s][1] == pos for r in range(world))  # every rank saves the same position
        assert {len(ranks[r][s][0]) for r in range(world)} <= {8 // world, -(-8 // world)}
    with pytest.raises(ValueError, match="without a block"):
        next(blocks(batch=8, world=9))


def test_sequencer_restores_the_order_whatever_the_arrival():
    rng = np.random.default_rng(0)
    pieces = [(u, n, part) for u, n in enumerate(SIZES) for part in (range(2) if n > 3 else range(1))]
    for _ in range(20):
        seq, out = Sequencer(), []
        for i in rng.permutation(len(pieces)):
            u, n, part = pieces[i]
            rows = n if n <= 3 else (n // 2 if part == 0 else n - n // 2)  # bigger units come in two pieces
            out += seq.add(u, n, rows, (u, part))
        assert [u.seq for u in out] == list(range(len(SIZES))) and not len(seq)
        assert [u.blocks for u in out] == SIZES
    with pytest.raises(RuntimeError, match="arrived twice"):
        s = Sequencer()
        s.add(0, 1, 1, "a")
        s.add(0, 1, 1, "a")
    with pytest.raises(RuntimeError, match="rows arrived for a unit of"):
        Sequencer().add(1, 2, 3, "a")


def test_no_blocks_is_a_clear_error():
    with pytest.raises(EmptyStream, match="yields no block"):
        next(blocks(sizes=[0, 0]))


def test_fingerprint_changes_name_what_changed():
    fp = {"seq_len": 64, "files": [["/a", 1, 2.0]], "files_sha256": "x", "num_files": 1, "tokenizer": "t1"}
    assert fingerprint_changes(fp, dict(fp)) == []
    now = dict(fp, seq_len=128, tokenizer="t2", files=[["/a", 5, 3.0], ["/b", 1, 1.0]], files_sha256="y", num_files=2)
    changes = "; ".join(fingerprint_changes(fp, now))
    assert "seq_len: 64 -> 128" in changes and "tokenizer: its files changed" in changes
    assert "/b (added)" in changes and "/a (size 1 -> 5)" in changes
    rewritten = dict(fp, files=[["/a", 1, 9.0]])  # same bytes written again: a new mtime alone is no change
    assert fingerprint_changes(fp, rewritten) == [] and touched_files(fp, rewritten) == ["/a"]
    assert "older raypt" in fingerprint_changes(None, fp)[0]
    # a mixture's sources one by one
    mix = {"seq_len": 64, "sources": {"news": dict(fp, weight=0.7), "web": dict(fp, weight=0.3)}}
    assert fingerprint_changes(mix, mix) == []
    now = {"seq_len": 64, "sources": {"news": dict(fp, weight=0.5), "books": dict(fp, weight=0.3)}}
    assert fingerprint_changes(mix, now) == ["source books: added", "source web: removed",
                                             "source news: weight: 0.7 -> 0.5"]
    again = {"seq_len": 64, "sources": {"news": dict(rewritten, weight=0.7), "web": dict(fp, weight=0.3)}}
    assert fingerprint_changes(mix, again) == [] and touched_files(mix, again) == ["/a"]


# ---- mixtures --------------------------------------------------------------------------------------------------------


def mixed(weights, sizes, pos=None, window=5, seed=0, batch=4, rank=0, world=1):
    """(global block ids tagged by source (source * 1000 + block id), position after the batch) of each step of a
    mixture of sources with these unit sizes."""
    pos = pos or MixPosition(tuple(Position() for _ in sizes), (0,) * len(sizes))
    streams = [stream_windows(reader(s, seed), p, window) for s, p in zip(sizes, pos.sources)]

    def tagged(s, w):  # a source's window with its block ids tagged by the source
        return Window(w.epoch, w.first, tuple(Unit(u.seq, u.blocks, u.data + [1000 * s, 0, 1000 * s]) for u in w.units))

    streams = [map(lambda w, s=s: tagged(s, w), st) for s, st in enumerate(streams)]
    wins = mix_windows(streams, pos, weights, window, seed)
    for rows, p in RankStream(wins, pos.offset, batch, rank, world, seed):
        yield gather(rows, lambda u: u.data)[:, 2].tolist(), p


def test_the_schedule_keeps_every_window_of_blocks_at_the_weights():
    src = mix_schedule([0.7, 0.3], (0, 0), 1000)
    assert np.mean(src == 0) == pytest.approx(0.7, abs=0.01)
    for n in (10, 37, 100):  # any window of n consecutive blocks: within one block of its share
        counts = np.convolve(src == 0, np.ones(n), "valid")
        assert abs(counts - 0.7 * n).max() <= 1 + 1e-9
    three = mix_schedule([5, 3, 2], (0, 0, 0), 1000)
    assert np.bincount(three).tolist() == [500, 300, 200]
    # a pure function of what was taken: the schedule from any point on is the tail of the whole one
    assert mix_schedule([0.7, 0.3], tuple(np.bincount(src[:413], minlength=2)), 587).tolist() == src[413:].tolist()


def test_a_mixture_draws_each_block_from_one_source_at_its_weight_and_upsamples_the_small_one():
    sizes = [SIZES, [2, 1, 3]]  # source 1: 6 blocks a pass
    got = take(mixed([0.7, 0.3], sizes), 250)  # 1000 blocks
    ids = [b for step, _ in got for b in step]
    src = np.array(ids) // 1000
    assert np.mean(src == 0) == pytest.approx(0.7, abs=0.01)
    # each source's blocks come in its own order, pass after pass: source 1's 300 blocks are 50 passes of 6
    for s, per_pass in ((0, sum(SIZES)), (1, 6)):
        own = [b % 1000 for b in ids if b // 1000 == s]
        for p in range(len(own) // per_pass):
            assert sorted(own[p * per_pass : (p + 1) * per_pass]) == list(range(per_pass))
    last = got[-1][1]
    assert last.sources[1].epoch >= 49 and sum(last.taken) + last.offset == 1000  # passes counted


@pytest.mark.parametrize("at", [0, 3, 17, 40])
def test_resuming_a_mixture_at_any_step_continues_the_same_stream(at):
    sizes = [SIZES, [2, 1, 3]]
    whole = take(mixed([0.7, 0.3], sizes), 60)
    pos = whole[at][1]
    again = take(mixed([0.7, 0.3], sizes, pos=pos), 60 - at - 1)
    assert [b for b, _ in again] == [b for b, _ in whole[at + 1 :]]
    assert [p for _, p in again] == [p for _, p in whole[at + 1 :]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_mixture_is_the_same_batches_for_any_world_size(world):
    sizes = [SIZES, [2, 1, 3]]
    one = [b for b, _ in take(mixed([0.6, 0.4], sizes, batch=6), 20)]
    parts = [[b for b, _ in take(mixed([0.6, 0.4], sizes, batch=6, rank=r, world=world), 20)] for r in range(world)]
    assert [sum((p[i] for p in parts), []) for i in range(20)] == one
