"""Tokenizers: train a byte-level BPE on a corpus, load one, and encode documents with BOS/EOS.

    python -m raypt.tokenizer --data PATH [PATH ...] --vocab-size N --out DIR

writes a directory that ``AutoTokenizer.from_pretrained(DIR)`` loads. Byte-level BPE needs no unknown token and
decodes every UTF-8 text exactly, Chinese as well as English.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypt.cli import command
from raypt.corpus import FORMATS, iter_documents, list_files
from raypt.errors import UserError
from raypt.storage import is_uri, node_copy_of
from raypt.packing import concat_documents
from raypt.progress import Progress

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


class TokenizerError(UserError):
    """A tokenizer that is missing or cannot serve the run (no EOS token, ids outside its vocabulary)."""


TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece")
"""Name prefixes of a tokenizer's own files in a directory (not a model's weights next to them)."""


def load_tokenizer(path: str):
    """The tokenizer in directory `path`, or at an s3:// or gs:// URI (`local_tokenizer_dir`)."""
    from transformers import AutoTokenizer

    if not is_uri(path) and not Path(path).exists():
        raise TokenizerError(
            f"tokenizer.path {path!r} does not exist; train one with `python -m raypt.tokenizer --data ... --out {path}`"
        )
    return AutoTokenizer.from_pretrained(local_tokenizer_dir(path))


def local_tokenizer_dir(path: str) -> str:
    """`path` itself, or for a URI (a model's directory in a bucket, say) a node-wide copy of its tokenizer files
    alone: the driver and the data processes need the tokenizer, not the weights beside it. Keyed by the files'
    names, sizes and times, so a tokenizer uploaded again is fetched again."""
    if not is_uri(path):
        return path

    def pick(names: list[str]) -> list[str]:
        if not any(n.startswith(TOKENIZER_FILES) for n in names):
            raise TokenizerError(f"{path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...); set "
                              "tokenizer.path to the tokenizer's directory")
        return [n for n in names if n.startswith(TOKENIZER_FILES) or n == "config.json"]

    return str(node_copy_of(path, "tokenizers", pick))


def special_ids(tok, add_bos: bool, add_eos: bool, bos_id: int | None = None, eos_id: int | None = None):
    """The (BOS, EOS) ids to wrap each document in, None where not wanted; error if wanted and unknown."""
    bos = (bos_id if bos_id is not None else tok.bos_token_id) if add_bos else None
    eos = (eos_id if eos_id is not None else tok.eos_token_id) if add_eos else None
    name = getattr(tok, "name_or_path", "the tokenizer")
    for what, wanted, value in (("bos", add_bos, bos), ("eos", add_eos, eos)):
        if wanted and value is None:
            raise TokenizerError(
                f"{name} has no {what.upper()} token; set tokenizer.{what}_id to the id to use, "
                f"or tokenizer.add_{what}: false to leave documents without one"
            )
        if value is not None and not 0 <= value < len(tok):
            raise TokenizerError(f"tokenizer.{what}_id {value} is outside the vocabulary (size {len(tok)})")
    return bos, eos


def token_bytes(tok) -> np.ndarray:
    """How many bytes of UTF-8 text each token id stands for (0 for special tokens), for bits per byte: a byte-level
    BPE token's own bytes (GPT-2's byte-to-character map undone), a SentencePiece byte-fallback token `<0xNN>` one
    byte, any other piece its text's bytes with `▁` as a space."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    byte_level = "ByteLevel" in getattr(getattr(tok, "backend_tokenizer", None), "to_str", lambda: "")()
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    out = np.zeros(len(tok), np.int64)
    for piece, i in tok.get_vocab().items():
        if i in special or i >= len(out):
            continue
        if byte_level and all(c in byte_of for c in piece):
            out[i] = len(piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(piece.replace("▁", " ").encode("utf-8"))
    return out


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most max_chars, each cut at the start of a whitespace run where there is one.

    Byte-level BPE's pre-tokenizer splits there anyway, so such a cut leaves the tokens unchanged; without any
    whitespace nearby (e.g. Chinese), a hard cut may change the one or two tokens at the seam.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + max_chars // 2, end), text.rfind("\n", start + max_chars // 2, end))
        if cut > start:
            while cut > start + 1 and text[cut - 1].isspace():  # cut at the start of a whitespace run
                cut -= 1
        else:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class DocumentEncoder:
    """Documents -> one int32 stream ``BOS doc EOS BOS doc EOS ...``, with the fast tokenizer's batch encoding.
    `tok`: a transformers tokenizer, or a `tokenizers.Tokenizer` (its fast backend alone)."""

    def __init__(self, tok, bos_id: int | None, eos_id: int | None, max_doc_chars: int = 1_000_000):
        self.tok, self.bos_id, self.eos_id, self.max_doc_chars = tok, bos_id, eos_id, max_doc_chars
        backend = getattr(tok, "backend_tokenizer", tok)
        # encode_batch_fast skips offsets: the fastest path (tokenizers >= 0.21)
        self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, docs: list[str]) -> np.ndarray:
        if all(len(d) <= self.max_doc_chars for d in docs):
            return concat_documents(self.encode(docs), self.bos_id, self.eos_id)
        # Huge documents: tokenize piece by piece, then glue each document's pieces back together.
        owner, texts = [], []
        for i, d in enumerate(docs):
            for piece in split_long(d, self.max_doc_chars):
                owner.append(i)
                texts.append(piece)
        ids: list[list[int]] = [[] for _ in docs]
        for i, piece_ids in zip(owner, self.encode(texts)):
            ids[i].extend(piece_ids)
        return concat_documents(ids, self.bos_id, self.eos_id)


@dataclass(frozen=True)
class EncoderSpec:
    """What a tokenize worker needs to encode documents, made once where the tokenizer is loaded (`encoder_spec`).
    The fast tokenizer travels as transformers built it (its serialized backend), so a worker rebuilds it with
    `tokenizers` alone: importing transformers there would also import torch, ~4 s of CPU per process. A tokenizer
    without a fast backend is loaded from `path` on the worker."""

    path: str
    bos_id: int | None
    eos_id: int | None
    backend_json: str | None = None

    def encoder(self, max_doc_chars: int) -> DocumentEncoder:
        if self.backend_json is None:
            tok = load_tokenizer(self.path)
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.backend_json)
        return DocumentEncoder(tok, self.bos_id, self.eos_id, max_doc_chars)


def encoder_spec(cfg) -> EncoderSpec:
    """The run's tokenizer (`tokenizer_path`) and BOS/EOS ids (`special_ids`, which also reports a missing one)."""
    t, path = cfg.tokenizer, tokenizer_path(cfg)
    tok = load_tokenizer(path)
    bos, eos = special_ids(tok, t.add_bos, t.add_eos, t.bos_id, t.eos_id)
    backend = getattr(tok, "backend_tokenizer", None)
    return EncoderSpec(path, bos, eos, backend.to_str() if backend is not None else None)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def sample_documents(
    paths: list[str], fmt: str, counts: Counter, *, text_field: str = "text", decode_errors: str = "strict",
    sample_bytes: int = 1 << 30, seed: int = 0, batch_docs: int = 1000,
) -> Iterator[list[str]]:
    """Batches of documents from the files in a seeded random order, until `sample_bytes` of text has been seen."""
    files = list_files(paths, "--data", fmt).files
    random.Random(seed).shuffle(files)
    seen, batch = 0, []
    for f in files:
        for doc in iter_documents(f, fmt, counts, text_field=text_field, decode_errors=decode_errors):
            batch.append(doc)
            seen += len(doc.encode("utf-8"))
            if len(batch) == batch_docs:
                yield batch
                batch = []
            if seen >= sample_bytes:
                counts["sampled_bytes"] = seen
                if batch:
                    yield batch
                return
    counts["sampled_bytes"] = seen
    if batch:
        yield batch


def _counted(batches: Iterator[list[str]], bar: Progress) -> Iterator[list[str]]:
    for batch in batches:
        bar.update(sum(len(d.encode("utf-8")) for d in batch) / 1e6)
        yield batch
    bar.write("text read; computing the merges")


def tokenizer_path(cfg) -> str:
    """The run's tokenizer directory: tokenizer.path, else the pretrained model's own."""
    path = cfg.tokenizer.path or cfg.model.name_or_path
    if not path:
        raise TokenizerError(
            "no tokenizer: set tokenizer.path (train one with `python -m raypt.tokenizer`) or model.name_or_path"
        )
    return path


def train_tokenizer(
    paths: list[str], vocab_size: int, out: str, *, fmt: str = "text", text_field: str = "text",
    decode_errors: str = "strict", sample_bytes: int = 1 << 30, min_frequency: int = 2, seed: int = 0,
) -> dict:
    """Train a byte-level BPE with <s>, </s>, <pad> and save it where AutoTokenizer loads it; return a summary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 3:
        raise TokenizerError(f"--vocab-size must be at least 259 (256 bytes + 3 special tokens), got {vocab_size}")
    t0 = time.perf_counter()
    counts: Counter = Counter()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # (its own bars would run beside raypt's)
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    docs = sample_documents(
        paths, fmt, counts, text_field=text_field, decode_errors=decode_errors, sample_bytes=sample_bytes, seed=seed
    )
    total = min(sample_bytes, sum(list_files(paths, "--data", fmt).sizes)) / 1e6
    with Progress("reading and counting text for the tokenizer", total=round(total, 1), unit="MB") as bar:
        tk.train_from_iterator(_counted(docs, bar), trainer=trainer)
    if counts["documents"] == 0:
        raise TokenizerError(f"--data {' '.join(paths)} holds no document to train a tokenizer on")
    # Like Llama's tokenizer, a plain tok(text) starts with BOS; raypt's pipeline adds BOS/EOS itself.
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tk.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )
    fast.save_pretrained(out)
    return {
        "out": str(out), "vocab_size": len(fast), "documents": counts["documents"],
        "sampled_bytes": counts["sampled_bytes"], "files": counts["files"],
        "skipped": {k: v for k, v in counts.items() if k.startswith("skipped") or k.startswith("documents_with")},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", nargs="+", required=True, help="files, directories or globs of training text")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--out", required=True, help="directory to write (AutoTokenizer.from_pretrained loads it)")
    ap.add_argument("--format", choices=FORMATS, default="text", help="as data.format (default: one document per line)")
    ap.add_argument("--text-field", default="text", help="text column/key for jsonl and parquet")
    ap.add_argument("--decode-errors", choices=("strict", "replace", "skip"), default="strict")
    ap.add_argument("--sample-bytes", type=float, default=1 << 30, help="train on at most this much text (default 1 GiB)")
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)


@command(__doc__, "raypt.tokenizer", _arguments)
def main(a) -> None:
    summary = train_tokenizer(
        a.data, a.vocab_size, a.out, fmt=a.format, text_field=a.text_field, decode_errors=a.decode_errors,
        sample_bytes=int(a.sample_bytes), min_frequency=a.min_frequency, seed=a.seed,
    )
    print(
        f"trained a byte-level BPE of {summary['vocab_size']} tokens on {summary['documents']} documents "
        f"({summary['sampled_bytes'] / 1e6:.1f} MB from {summary['files']} files) in {summary['seconds']} s -> {a.out}"
    )
    if summary["skipped"]:
        print(f"skipped: {summary['skipped']}")


if __name__ == "__main__":
    sys.exit(main())
