"""The training data order (`raypt.feed`), pure functions: shuffle windows and resume from any position."""

import itertools

import numpy as np
import pytest

from raypt.corpus import CorpusError
from raypt.feed import Position, global_batches, rank_slice, rows_from

SIZES = [3, 7, 1, 4, 6, 2, 5]  # blocks per unit


def source(sizes=SIZES, ray_blocks=2):
    """read(first_unit) as the pipeline gives it: units in order, each cut into a few batches; block ids unique."""
    ids = np.arange(sum(sizes))
    units = np.repeat(np.arange(len(sizes)), sizes)

    def read(first_unit):  # like a materialized dataset, it may start before first_unit
        for chunk in np.array_split(np.arange(len(ids)), max(1, len(ids) // ray_blocks)):
            yield {"input_ids": np.stack([ids[chunk], ids[chunk]], axis=1), "unit": units[chunk]}

    return read


def take(rows, n):
    return list(itertools.islice(rows, n))


@pytest.mark.parametrize("window, seed", [(0, None), (5, 0), (100, 7)])
def test_each_pass_is_a_permutation_made_of_whole_unit_windows(window, seed):
    n = sum(SIZES)
    got = take(rows_from(source(), Position(), window, seed), 2 * n)
    for p in range(2):
        ids = [int(b[0]) for b, _ in got[p * n : (p + 1) * n]]
        assert sorted(ids) == list(range(n))  # every block once per pass
        assert all(pos.epoch == p for _, pos in got[p * n : (p + 1) * n])
        if seed is None:
            assert ids == list(range(n))
    if seed is not None:
        first, second = ([int(b[0]) for b, _ in got[p * n : (p + 1) * n]] for p in range(2))
        assert first != second  # each pass has its own order
    # a window holds whole units and closes at a unit boundary once it has `window` blocks
    starts = sorted({pos.unit for _, pos in got[:n]})
    bounds = np.r_[0, np.cumsum(SIZES)]
    for a, b in zip(starts, starts[1:] + [len(SIZES)]):
        assert bounds[b] - bounds[a] >= min(window, 1) and (b - a == 1 or bounds[b - 1] - bounds[a] < window)


@pytest.mark.parametrize("window, seed", [(0, None), (5, 0), (9, 3), (100, 1)])
def test_resuming_at_any_position_continues_the_same_stream(window, seed):
    n = sum(SIZES)
    stream = take(rows_from(source(), Position(), window, seed), 3 * n)
    for k in range(2 * n):
        resumed = take(rows_from(source(), stream[k][1], window, seed), n)
        assert [int(b[0]) for b, _ in resumed] == [int(b[0]) for b, _ in stream[k + 1 : k + 1 + n]], k
        assert [p for _, p in resumed] == [p for _, p in stream[k + 1 : k + 1 + n]]


def test_no_blocks_is_a_clear_error():
    with pytest.raises(CorpusError, match="yields no block"):
        next(rows_from(source([]), Position()))


def test_global_batches_span_passes_and_ranks_split_them():
    n = sum(SIZES)
    batches = take(global_batches(rows_from(source(), Position(), 5, 0), 8), 6)  # 48 blocks: more than 1 pass
    ids = np.concatenate([b[:, 0] for b, _ in batches])
    assert sorted(ids[:n].tolist()) == list(range(n)) and batches[-1][1].epoch == 48 // n
    for b, _ in batches:
        assert np.array_equal(np.concatenate([rank_slice(b, r, 4) for r in range(4)]), b)
