import numpy as np
import pytest

from raypt.packing import BlockPacker, concat_documents


def hf_group_texts(examples: dict, block_size: int) -> dict:
    """Hugging Face run_clm's group_texts, verbatim in behaviour: concatenate, drop the remainder, cut."""
    concatenated = {k: sum(examples[k], []) for k in examples}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    return {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}


def random_docs(rng, n, max_len=50, vocab=1000):
    return [rng.integers(3, vocab, size=rng.integers(0, max_len)).tolist() for _ in range(n)]


def test_concat_wraps_each_document_in_bos_eos():
    stream = concat_documents([[5, 6], [], [7]], bos_id=1, eos_id=2)
    assert stream.tolist() == [1, 5, 6, 2, 1, 2, 1, 7, 2]
    assert stream.dtype == np.int32
    assert concat_documents([[5, 6], [7]], None, 2).tolist() == [5, 6, 2, 7, 2]
    assert concat_documents([[5, 6], [7]], 1, None).tolist() == [1, 5, 6, 1, 7]
    assert concat_documents([], 1, 2).tolist() == []


@pytest.mark.parametrize("seq_len", [2, 3, 16, 64])
def test_single_batch_equals_hf_group_texts(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = random_docs(rng, 40)
    with_special = [[1] + d + [2] for d in docs]
    expected = hf_group_texts({"input_ids": with_special}, seq_len)["input_ids"]
    blocks = BlockPacker(seq_len).add(concat_documents(docs, 1, 2))
    assert blocks.tolist() == expected


@pytest.mark.parametrize("seed", range(5))
def test_streaming_invariants(seed):
    """Across many batches: every block is seq_len; blocks + tail == the whole stream; only the tail is lost."""
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(2, 100))
    packer = BlockPacker(seq_len)
    stream, blocks = [], []
    for _ in range(int(rng.integers(1, 30))):
        tokens = concat_documents(random_docs(rng, int(rng.integers(0, 20))), 1, 2)
        stream.append(tokens)
        out = packer.add(tokens)
        assert out.ndim == 2 and out.shape[1] == seq_len and out.dtype == np.int32
        blocks.append(out)
    stream = np.concatenate(stream)
    got = np.concatenate([b.reshape(-1) for b in blocks])
    assert len(packer.tail) < seq_len
    assert len(got) + len(packer.tail) == len(stream)
    assert np.array_equal(np.concatenate([got, packer.tail]), stream)
    # BOS/EOS sit exactly at document boundaries of the original stream
    assert np.array_equal(got == 1, stream[: len(got)] == 1)


def test_carry_is_not_a_view_of_the_batch():
    packer = BlockPacker(4)
    batch = np.arange(10, dtype=np.int32)
    packer.add(batch)
    batch[:] = -1
    assert packer.tail.tolist() == [8, 9]


def test_seq_len_below_two_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        BlockPacker(1)
