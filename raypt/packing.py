"""Block packing, pure numpy: documents -> one token stream -> fixed blocks of `seq_len` tokens.

This is Hugging Face ``run_clm``'s ``group_texts`` made streaming: instead of dropping the remainder of every batch,
a `BlockPacker` carries it into the next batch, so only the final tail of its stream (< seq_len) is lost (the data
pipeline packs each work unit with its own packer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOKEN_DTYPE = np.int32


def concat_documents(docs: Sequence[Sequence[int]], bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """``[BOS] + doc + [EOS]`` for every document, concatenated into one int32 stream."""
    if not docs:
        return np.empty(0, TOKEN_DTYPE)
    extra = (bos_id is not None) + (eos_id is not None)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs)) + extra
    out = np.empty(int(lengths.sum()), TOKEN_DTYPE)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    first = 1 if bos_id is not None else 0
    for start, length, doc in zip(starts.tolist(), lengths.tolist(), docs):
        out[start + first : start + length - (eos_id is not None)] = doc
    if bos_id is not None:
        out[starts] = bos_id
    if eos_id is not None:
        out[starts + lengths - 1] = eos_id
    return out


class BlockPacker:
    """Cuts a token stream, arriving in pieces, into ``[n, seq_len]`` blocks, carrying the remainder across calls."""

    def __init__(self, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self._carry = np.empty(0, TOKEN_DTYPE)

    @property
    def tail(self) -> np.ndarray:
        """Tokens waiting for the next call (always fewer than seq_len)."""
        return self._carry

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append `tokens` to the stream; return every block completed so far, shape (n, seq_len)."""
        stream = np.concatenate((self._carry, np.asarray(tokens, TOKEN_DTYPE))) if len(self._carry) else tokens
        n = len(stream) // self.seq_len
        cut = n * self.seq_len
        self._carry = np.array(stream[cut:], TOKEN_DTYPE)  # a copy: never pin the whole batch behind a small tail
        return np.asarray(stream[:cut], TOKEN_DTYPE).reshape(n, self.seq_len)
