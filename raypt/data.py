"""The Ray Data corpus pipeline: files -> documents -> parallel tokenize + pack -> blocks of `seq_len` tokens.

    python -m raypt.data --config CFG [--set section.key=value ...] --out DIR

`build_dataset` returns a streaming Ray Dataset of ``{"input_ids": int32[seq_len], "unit"}`` rows, one tagged block
per work unit, that the trainer's order actor (`raypt.feed`) sequences without reading; the CLI writes the same rows
as Parquet under ``DIR/train`` and ``DIR/eval`` plus ``DIR/summary.json``.

The corpus is planned into units of ~8 MB (`raypt.corpus.plan_units`: small files grouped, big ones cut into line
ranges); the plan depends on the data alone, not on the cluster. An actor pool maps units to blocks: each actor loads
the tokenizer once, reads its unit's documents (`raypt.corpus` decodes and counts skips), encodes them in batches with
the fast tokenizer and cuts the unit's stream into blocks (each unit's last tail, < seq_len, is dropped and counted).
A unit's blocks are a pure function of the unit, and each output block names its unit (and the unit's block count) in
its schema, so the consumer puts units back in order whatever order they finish in (`raypt.stream.Sequencer`): block
i of the stream is the same in every run, and exact resume is built on that. Every row also carries its unit.
Reading inside the tokenizing actor means document text never crosses processes; memory is bounded by a batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.extensions import ArrowTensorArray

from raypt.cli import command
from raypt.config import Config, Source, sources
from raypt.corpus import CorpusError, Listing, Segment, filesystem, iter_documents, list_files, plan_units
from raypt.errors import UserError
from raypt.packing import TOKEN_DTYPE, BlockPacker
from raypt.pipeline_stats import Stats
from raypt.progress import Progress
from raypt.tokenizer import TOKENIZER_FILES, EncoderSpec, encoder_spec, tokenizer_path

SPLITS = ("train", "eval")
TEXT_BATCH_CHARS = 8 << 20  # a tokenizer batch is closed at this many characters even if it has few documents
MIN_UNITS = 16  # a small corpus is cut finer (down to 64 KB units) so that actors share it; each unit drops a tail


UNIT_KEY, BLOCKS_KEY = b"raypt.unit", b"raypt.unit_blocks"  # an output block's schema metadata: its unit, and all
# the blocks of that unit (a unit may be cut into several Ray blocks); the order actor reads them without the data


def unit_table(blocks: np.ndarray, unit: int) -> pa.Table:
    """One unit's blocks as a Ray Data block, tagged with the unit so that its consumer can sequence it unread."""
    table = pa.table({"input_ids": ArrowTensorArray.from_numpy(np.ascontiguousarray(blocks, TOKEN_DTYPE)),
                      "unit": pa.array(np.full(len(blocks), unit, np.int64))})
    return table.replace_schema_metadata({UNIT_KEY: str(unit), BLOCKS_KEY: str(len(blocks))})


def unit_tag(schema) -> tuple[int, int]:
    """(unit, its total blocks) from an output block's schema."""
    meta = getattr(schema, "metadata", None) or {}
    if UNIT_KEY not in meta:
        raise RuntimeError(f"a data block without its unit tag (schema {schema}); the pipeline must end in unit_table")
    return int(meta[UNIT_KEY]), int(meta[BLOCKS_KEY])


def table_blocks(table: pa.Table) -> np.ndarray:
    """The (n, seq_len) int32 blocks of a Ray Data block, without a copy."""
    col = table.column("input_ids").combine_chunks()
    return col.to_numpy(zero_copy_only=True) if len(col) else np.empty((0, 0), TOKEN_DTYPE)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TokenizePack:
    """Ray Data actor: a unit of files -> documents -> ``BOS doc EOS`` stream -> full blocks of seq_len tokens, one
    tagged table per unit (`unit_table`).

    Each unit is packed on its own (its tail, < seq_len tokens, is dropped and counted), so its blocks do not depend
    on which actor ran it or what it ran before. The tokenizer is loaded once per actor.
    """

    def __init__(self, cfg: Config, encoder: EncoderSpec, threads: int, stats: Stats, items: pa.Table):
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # before the tokenizer's thread pool starts
        self.d = cfg.data
        self.encode = encoder.encoder(self.d.max_doc_chars)
        self.stats, self.items, self.t_ready, self.told = stats, items, time.time(), set()

    def __call__(self, batch: dict) -> Iterator[pa.Table]:  # (a generator: Ray Data then keeps a raised
        # CorpusError as the cause of the error the consumer sees)
        item = item_of(self.items, batch)
        stats = dataclasses.replace(self.stats, pipe=item["pipe"])  # (one pool may serve several splits)
        if stats.pipe not in self.told:
            stats.ready(self.t_ready)
            self.told.add(stats.pipe)
        stats.turn(item["seq"])
        t0 = time.perf_counter()
        counts: Counter = Counter()
        unit = item["index"]
        segments = [Segment(**seg) for seg in item["unit"]]
        blocks = pack_unit(segments, item["format"], item["text_field"], self.encode, self.d, counts)
        if out := item["out"]:  # `python -m raypt.data --out`: the unit's file, written here
            write_unit(blocks, out)
        stats.add(counts, time.time(), _peak_rss_mb(), time.perf_counter() - t0)
        yield unit_table(blocks[:0] if out else blocks, unit)


def pack_unit(segments: list[Segment], fmt: str, text_field: str, encode, d, counts: Counter) -> np.ndarray:
    """A work unit's blocks: its documents read in order, encoded in batches (`encode`: a `DocumentEncoder`), packed
    into full blocks of `d.seq_len` (`d`: the data config); the tail is dropped. Counts tokens, blocks and skips."""
    packer, parts, docs, chars = BlockPacker(d.seq_len), [], [], 0

    def flush() -> None:
        tokens = encode(docs)
        parts.append(packer.add(tokens))
        counts["tokens"] += len(tokens)
        counts["blocks"] += len(parts[-1])

    for seg in segments:
        for doc in iter_documents(seg, fmt, counts, text_field=text_field, decode_errors=d.decode_errors):
            docs.append(doc)
            chars += len(doc)
            if len(docs) >= d.docs_per_batch or chars >= TEXT_BATCH_CHARS:
                flush()
                docs, chars = [], 0
    if docs:
        flush()
    return np.concatenate(parts) if parts else np.empty((0, d.seq_len), TOKEN_DTYPE)


def write_unit(blocks: np.ndarray, path: str) -> None:
    """One unit's blocks as a Parquet file (local path or URI): an `input_ids` column of fixed-size int32 lists,
    which any Arrow reader takes (and `read_pretokenized` reads back as this unit)."""
    fs, inner = filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    flat = pa.array(np.ascontiguousarray(blocks, TOKEN_DTYPE).reshape(-1))
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, blocks.shape[1])})
    with fs.open_output_stream(inner) as f:
        pq.write_table(table, f)


def read_pretokenized(batch: dict, seq_len: int, stats: Stats, items: pa.Table) -> Iterator[pa.Table]:
    """Ray Data task: one Parquet file written by `python -m raypt.data --out` (one unit) -> its tagged blocks; a
    wrong block length is a clear error."""
    item = item_of(items, batch)
    stats.turn(item["seq"])
    path, unit = item["path"], item["index"]
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        col = pq.read_table(f, columns=["input_ids"]).column("input_ids").combine_chunks()
    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor column, as `--out` writes it
        blocks = col.to_numpy()
    elif len(col):  # a list column
        blocks = np.asarray(col.flatten().to_numpy()).reshape(len(col), -1)
    else:
        blocks = np.empty((0, seq_len), TOKEN_DTYPE)
    if blocks.ndim != 2 or blocks.shape[1] != seq_len:
        raise CorpusError(f"data.pretokenized {path} holds blocks of {blocks.shape[-1]} tokens, but data.seq_len is "
                          f"{seq_len}; set data.seq_len to match, or re-run `python -m raypt.data` with this seq_len")
    yield unit_table(blocks, unit)


def plan(cfg: Config, split: str = "train", src: Source | None = None) -> tuple[Listing, list[list[Segment]]]:
    """A source's split: its files and its work units, in plan order (default source: the run's first). A function
    of the data alone (never of the cluster), so a data position recorded by one run means the same units in the
    next."""
    src = src or sources(cfg)[0]
    paths = src.paths if split == "train" else src.eval_paths
    listing = list_files(paths, split_field(split, src), src.format)
    return listing, plan_units(listing, src.format, cfg.data.unit_bytes, min_units=MIN_UNITS)


def split_field(split: str, src: Source | None) -> str:
    """The config field that names a source's split, for messages."""
    if src is None or not src.name:
        return f"data.{split}_paths"
    return f"data.sources[{src.name}].{'paths' if split == 'train' else 'eval_paths'}"


def split_dir(root: str, split: str, src: Source) -> str:
    """Where `raypt.data --out` puts a source's split: ROOT/split, or ROOT/split/NAME for a mixture's source."""
    return f"{root}/{split}/{src.name}" if src.name else f"{root}/{split}"


def pretokenized_files(cfg: Config, split: str = "train", src: Source | None = None) -> Listing:
    """The Parquet files of a pre-tokenized split, sorted: its units."""
    path = split_dir(cfg.data.pretokenized, split, src or sources(cfg)[0])
    listing = list_files([path], "data.pretokenized")
    keep = [i for i, f in enumerate(listing.files) if f.endswith(".parquet")]
    if not keep:
        raise CorpusError(f"data.pretokenized: {path} holds no .parquet files; write it with "
                          "`python -m raypt.data --config ... --out DIR`")
    return Listing([listing.files[i] for i in keep], listing.hidden_skipped, [listing.sizes[i] for i in keep],
                   [listing.mtimes[i] for i in keep])


def units_of(cfg: Config, split: str = "train", src: Source | None = None) -> tuple[Listing, list]:
    """A source's split: its listing and its units, the text plan (`plan`) or a pre-tokenized split's Parquet files."""
    if cfg.data.pretokenized:
        listing = pretokenized_files(cfg, split, src)
        return listing, listing.files
    return plan(cfg, split, src)


HEADROOM = 2.0
"""A rate-sized tokenize pool makes this many times the tokens/s training reads."""


def actors_needed(train_tokens_per_s: float | None, actor_tokens_per_s: float | None) -> int | None:
    """The tokenize actors that make HEADROOM x what training reads, from both measured rates (None: not known yet)."""
    if not train_tokens_per_s or not actor_tokens_per_s:
        return None
    return max(1, math.ceil(HEADROOM * train_tokens_per_s / actor_tokens_per_s))


def pool_plan(cfg: Config, units: int, reserved_cpus: float = 0.0, needed: int | None = None,
              source: int | None = None) -> tuple[int, int]:
    """(fewest, most) tokenize actors. Ray Data's autoscaling pool grows from two actors while work is queued, up to
    one single-threaded actor per free CPU (measured faster than fewer actors with more tokenizer threads: the
    per-token Python work then also runs in parallel), `data.max_tokenize_workers`, the units, and `needed` (the rate
    target, `actors_needed`, once the run has measured it); `data.num_tokenize_workers` fixes the size. A mixture's
    sources stream side by side, each from its own pool (`source`: which one; None: one pool for all): the actors are
    shared out by weight (`mixture_caps`), so no pool can hold the CPUs another one waits for. `reserved_cpus` are held by training
    workers. On a cluster an autoscaler can grow, CPUs it lacks now are no error: the pool's pending actors are what
    makes it add nodes, so it asks for two until the rate is measured."""
    d = cfg.data
    total = ray.cluster_resources().get("CPU", 0)
    free = total - reserved_cpus
    grows = free < d.cpus_per_tokenize_worker and cluster_can_grow()
    if free < d.cpus_per_tokenize_worker and not grows:
        raise CorpusError(
            f"no CPU left for tokenize actors: training workers reserve {reserved_cpus:g} of the cluster's "
            f"{total:g} CPUs; set data.materialize: true (tokenize before training), lower scaling.cpus_per_worker "
            "or data.cpus_per_tokenize_worker, or add CPU nodes"
        )
    if grows:
        free = d.cpus_per_tokenize_worker * (needed or 2)
    weights = [src.weight for src in sources(cfg)] if source is not None else [1.0]
    if d.num_tokenize_workers:
        n = min(mixture_caps(d.num_tokenize_workers, weights, "data.num_tokenize_workers")[source or 0], units)
        return n, n
    cap = int(free // d.cpus_per_tokenize_worker)
    if not grows:
        cap = mixture_caps(cap, weights, "the free CPUs")[source or 0]
    most = max(1, min(units, cap, d.max_tokenize_workers, needed or units))
    return min(2, most), most


def mixture_caps(actors: int, weights: list[float], what: str = "the free CPUs") -> list[int]:
    """`actors` shared out among a mixture's sources by weight, at least one each (one source: all of them); `what`
    gives the actors, for the error when there are fewer than sources."""
    if len(weights) == 1:
        return [actors]
    if actors < len(weights):
        raise CorpusError(f"the mixture's {len(weights)} sources stream side by side, each needing a tokenize actor, "
                          f"and {what} give {actors}; lower data.cpus_per_tokenize_worker (e.g. 0.5), raise "
                          "data.num_tokenize_workers, set data.materialize: true, or add CPUs")
    caps = [max(1, int(actors * w / sum(weights))) for w in weights]
    while sum(caps) > actors:
        caps[caps.index(max(caps))] -= 1
    return caps


def cluster_can_grow() -> bool:
    """Whether an autoscaler can add nodes to the cluster (a cold one has no worker node before a job asks). KubeRay
    and Ray's autoscaler v2 publish their node types in the GCS; the v1 autoscaler (`ray up`, `ray start
    --autoscaling-config`) reports its status there, and on a cluster that cannot grow that status names only Ray's
    read-only node types, one per node (`node_<id>`)."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    if state.get_cluster_config() is not None:
        return True
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    types = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {} if status else {}
    return any(not t.startswith("node_") for t in types.values())


@dataclass
class SplitData:
    dataset: ray.data.Dataset
    listing: Listing
    stats: Stats
    actors: tuple[int, int]
    units: int


def build_dataset(cfg: Config, split: str = "train", reserved_cpus: float = 0.0, order: list[int] | None = None,
                  first: int = 0, ahead: int | None = None, planned: tuple[Listing, list] | None = None,
                  needed: int | None = None, stats: ray.actor.ActorHandle | None = None,
                  encoder: EncoderSpec | None = None, src: Source | None = None) -> SplitData:
    """The streaming Ray Dataset of a split's packed blocks ("train" or "eval"; pre-tokenized Parquet with
    data.pretokenized), one tagged table per unit (`unit_table`) in completion order (re-sequence them with
    `raypt.feed.units_in_order`): the units `order[first:]` (default: plan order). With `ahead`, a unit waits to
    start until fewer than `ahead` units before it are still missing. `planned`: the split's `units_of`, when the
    caller has it already (no listing again); `needed`: the tokenize actors the rate target asks for (`pool_plan`);
    `stats`: the `PipelineStats` actor to count in (default: a new one); `encoder`: the run's `encoder_spec`, when the
    caller has it (a process without transformers imported then never imports it); `src`: the source (default: the
    run's first). Nothing runs until consumed."""
    d, src = cfg.data, src or sources(cfg)[0]
    listing, units = planned or units_of(cfg, split, src)
    order = list(range(len(units))) if order is None else [int(u) for u in order]
    if first >= len(order):
        raise CorpusError(f"{split_field(split, src)} has {len(units)} work units; a data position at unit {first} is "
                          "past its end (did the corpus change since the checkpoint?)")
    stats = Stats.open(stats, ahead, first)
    seqs = range(first, len(order))
    if d.pretokenized:
        rows, table = unit_rows([{"index": order[s], "seq": s, "path": units[order[s]]} for s in seqs])
        blocks = rows.map_batches(
            read_pretokenized, batch_size=1, batch_format="numpy", num_cpus=0.25,  # light: a Parquet read
            fn_kwargs=dict(seq_len=d.seq_len, stats=stats, items=table))
        return SplitData(blocks, listing, stats, (0, 0), len(units))
    fewest, most = pool_plan(cfg, len(order) - first, reserved_cpus, needed, sources(cfg).index(src))  # (its share)
    encoder = encoder or encoder_spec(cfg)  # (a tokenizer problem fails here, not inside every actor)
    items = [unit_item(order[s], s, units[order[s]], stats, src) for s in seqs]
    blocks = pack(cfg, items, (fewest, most), encoder, stats, turnstile=ahead is not None)
    return SplitData(blocks, listing, stats, (fewest, most), len(units))


ROW_KEY = "item"


def unit_rows(items: list[dict]) -> tuple[ray.data.Dataset, pa.Table]:
    """A pipeline's input: one row per unit, holding only the unit's place in `items`, and the items as one Arrow
    table for its map function to look them up in (sent once with the function; the actors on a node share its
    bytes). Ray Data puts each input row into the object store of the node that runs the pipeline (a run's `Feeder`:
    the head) before the first unit starts: for a row holding only its index that is measured at 0.7 ms and 0.7 KB a
    unit, for one holding its item at 1.2 ms and 2.5 KB (`bench/pipeline_start.py`)."""
    rows = ray.data.from_items([{ROW_KEY: k} for k in range(len(items))], override_num_blocks=len(items))
    return rows, pa.Table.from_pylist(items)


def item_of(items: pa.Table, batch: dict) -> dict:
    """The item (`unit_item`) that a one-row batch of `unit_rows` stands for."""
    return items.slice(int(batch[ROW_KEY][0]), 1).to_pylist()[0]


def unit_item(index: int, seq: int, unit: list[Segment], stats: Stats, src: Source, out: str = "") -> dict:
    """What a pipeline needs to know of one unit: its segments and how to read them, its place in the pass, its
    pipeline's counters, and the Parquet file to write it to (`--out`; "": stream its blocks instead)."""
    return {"index": index, "seq": seq, "unit": [dataclasses.asdict(seg) for seg in unit], "pipe": stats.pipe,
            "format": src.format, "text_field": src.text_field, "out": out}


def pack(cfg: Config, items: list[dict], actors: tuple[int, int], encoder: EncoderSpec, stats: Stats,
         turnstile: bool):
    """Units (`unit_item`) -> tagged blocks, by an autoscaling pool of `TokenizePack` actors. Without a `turnstile`
    (a pipeline whose consumer takes every unit as it comes), each actor has its next unit queued behind the one it
    packs, so that it starts it without a dispatch round trip (measured on 100 MB, 16 units, 2 actors: busy 0.95-0.97
    of the time instead of 0.91-0.93); with one, an actor holds one unit at a time, so that no unit waits behind one
    that waits in the turnstile."""
    d = cfg.data
    rows, table = unit_rows(items)
    return rows.map_batches(
        TokenizePack, batch_size=1, batch_format="numpy", num_cpus=d.cpus_per_tokenize_worker,
        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1], max_concurrent_calls_per_actor=1,
                                           max_tasks_in_flight_per_actor=1 if turnstile else 2),
        fn_constructor_kwargs=dict(cfg=cfg, encoder=encoder, threads=max(1, int(d.cpus_per_tokenize_worker)),
                                   stats=stats, items=table),
    )


def fingerprint(cfg: Config, encoder: EncoderSpec | None = None) -> dict:
    """What the data order of a run depends on: the files (path, size; mtime too, reported only), the unit plan, the tokenizer's files
    and special tokens, and every data setting that changes the blocks or their order; for a mixture, each source's
    files, plan and weight. Saved in each checkpoint; a resume against a different fingerprint is refused
    (`run.data_changed`). `encoder`: the run's `encoder_spec`, when the caller has it (the tokenizer is not loaded
    again)."""
    d = cfg.data
    fp: dict = {"order_version": ORDER_VERSION, "seq_len": d.seq_len, "shuffle": d.shuffle,
                "shuffle_tokens": d.shuffle_tokens, "seed": cfg.run.seed}
    if d.pretokenized:
        fp["pretokenized"] = d.pretokenized
    else:
        encoder = encoder or encoder_spec(cfg)
        fp.update(decode_errors=d.decode_errors, unit_bytes=d.unit_bytes, max_doc_chars=d.max_doc_chars,
                  tokenizer=_tokenizer_digest(encoder.path), bos_eos=[encoder.bos_id, encoder.eos_id])
    srcs = sources(cfg)
    if len(srcs) == 1 and not srcs[0].name:
        fp.update(_source_fingerprint(cfg, srcs[0]))
    else:
        fp["sources"] = {src.name: {"weight": src.weight, **_source_fingerprint(cfg, src)} for src in srcs}
    return fp


def _source_fingerprint(cfg: Config, src: Source) -> dict:
    listing, units = units_of(cfg, "train", src)
    fp: dict = {} if cfg.data.pretokenized else {"format": src.format, "text_field": src.text_field}
    files = [[f, s, round(m, 3)] for f, s, m in zip(listing.files, listing.sizes, listing.mtimes)]
    # (paths and sizes decide; a new mtime alone, say a corpus written again with the same bytes, is only reported)
    fp["num_files"], fp["files_sha256"] = len(files), _digest(json.dumps([f[:2] for f in files]))
    if len(files) <= FINGERPRINT_FILES:  # small enough to keep: a refused resume can then name the file
        fp["files"] = files
    if not cfg.data.pretokenized:
        fp["units_sha256"] = _digest(json.dumps([[dataclasses.astuple(s) for s in u] for u in units]))
    return fp


ORDER_VERSION = 2  # bump when the stream definition (raypt.stream) changes: old positions then mean other blocks
FINGERPRINT_FILES = 10_000


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tokenizer_digest(path: str) -> str:
    """sha256 over the tokenizer's own files in `path` (not a model's weights next to them)."""
    fs, inner = filesystem(path)
    h = hashlib.sha256()
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and info.base_name.startswith(TOKENIZER_FILES):
            with fs.open_input_stream(info.path) as f:
                h.update(info.base_name.encode() + b"\0" + f.read())
    return h.hexdigest()


def summarize(split: SplitData, seq_len: int, seconds: float) -> dict:
    """A consumed split's counters (`split_counts`), its pool's size, its time and rates."""
    counts, steady = split.stats.get()
    tokens = counts.get("tokens", 0)
    return {**split_counts(counts, split.listing, seq_len), "tokenize_actors": split.actors[1],
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds) if seconds > 0 else None,
            "steady_tokens_per_s": round(tokens / steady) if steady else None}


def split_counts(counts: dict, listing: Listing, seq_len: int) -> dict:
    """A split's counters after it has been consumed: documents, skips by reason, tokens, blocks, dropped tail."""
    c = Counter(counts)
    skipped = {k: v for k, v in sorted(c.items()) if k.startswith("skipped_") or k.startswith("documents_with_")}
    return {
        "files": c["files"],
        "hidden_files_skipped": listing.hidden_skipped,
        "documents": c["documents"],
        "skipped": skipped,
        "tokens": c["tokens"],
        "blocks": c["blocks"],
        "dropped_tokens": c["tokens"] - c["blocks"] * seq_len,
        "peak_actor_rss_mb": c["peak_actor_rss_mb"],
    }


def check_not_empty(summary: dict, split: str, cfg: Config, src: Source | None = None) -> None:
    if summary["blocks"] == 0:
        hint = ""
        if summary["skipped"]:
            hint = f" (skipped: {summary['skipped']})"
        raise CorpusError(
            f"{split_field(split, src)} yields no block of data.seq_len={cfg.data.seq_len} tokens: "
            f"{summary['documents']} documents gave {summary['tokens']} tokens{hint}; "
            "add text or lower data.seq_len"
        )


def write_pretokenized(cfg: Config, out: str, encoder: EncoderSpec | None = None) -> dict:
    """Tokenize and pack every split of every source that has paths in one pipeline (one actor pool, started once),
    each actor writing its units' blocks to ``out/<split>/unit-NNNNNN.parquet`` (a mixture's source:
    ``out/<split>/<name>/...``; nothing passes through this process or the object store); write config.yaml and
    summary.json. `encoder`: the `encoder_spec`, when the caller has it."""
    parts = {split_dir(out, split, src).removeprefix(f"{out}/"): (split, src) for src in sources(cfg)
             for split in SPLITS if split == "train" or src.eval_paths}  # "train", "eval/news", ...
    for key in parts:
        if (Path(out) / key).is_dir() and any(f.is_file() for f in (Path(out) / key).iterdir()):
            raise CorpusError(f"--out {out}: {Path(out) / key} already holds files, which would mix with this "
                              "run's units; give a new directory or delete it")
    planned = {key: plan(cfg, split, src) for key, (split, src) in parts.items()}
    encoder = encoder or encoder_spec(cfg)
    stats, items = {}, []  # one entry per part in one PipelineStats actor
    for key, (split, src) in parts.items():
        stats[key] = Stats.open(next(iter(stats.values())).actor if stats else None, None, 0)
        items += [unit_item(i, i, u, stats[key], src, str((Path(out) / key / f"unit-{i:06d}.parquet").resolve()))
                  for i, u in enumerate(planned[key][1])]
    actors = pool_plan(cfg, len(items))
    t0 = time.perf_counter()
    with Progress(f"tokenizing and packing on {actors[1]} actors", total=len(items), unit="unit") as bar:
        for _ in pack(cfg, items, actors, encoder, next(iter(stats.values())),
                      turnstile=False).iter_internal_ref_bundles():
            bar.update(1)  # (one empty table per unit)
    seconds = time.perf_counter() - t0
    summary = {"seq_len": cfg.data.seq_len, "tokenizer": tokenizer_path(cfg), "tokenize_actors": actors[1],
               "seconds": round(seconds, 2)}
    for key, (split, src) in parts.items():
        summary[key] = split_counts(stats[key].get()[0], planned[key][0], cfg.data.seq_len)
        check_not_empty(summary[key], split, cfg, src)
    tokens = sum(summary[key]["tokens"] for key in parts)
    first, last = zip(*(s.span() for s in stats.values()))  # (one pool: the rates are the whole pipeline's)
    steady = max(t for t in last if t) - min(t for t in first if t) if any(last) and any(first) else None
    summary["tokens_per_s"] = round(tokens / seconds) if seconds > 0 else None
    summary["steady_tokens_per_s"] = round(tokens / steady) if steady else None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: dict) -> str:
    lines = []
    for split, s in summary.items():
        if not isinstance(s, dict):
            continue
        lines.append(
            f"{split}: {s['files']} files, {s['documents']:,} documents -> {s['tokens']:,} tokens -> "
            f"{s['blocks']:,} blocks of {summary['seq_len']} ({s['dropped_tokens']:,} tail tokens dropped)"
        )
        if s["skipped"]:
            lines.append("  skipped: " + ", ".join(f"{k}={v}" for k, v in s["skipped"].items()))
        if s["hidden_files_skipped"]:
            lines.append(f"  hidden files not read ({len(s['hidden_files_skipped'])}): "
                         + ", ".join(s["hidden_files_skipped"][:5]) + (" ..." if len(s["hidden_files_skipped"]) > 5 else ""))
    lines.append(f"{summary['seconds']} s with {summary['tokenize_actors']} tokenize actors at most: "
                 f"{summary['tokens_per_s']:,} tokens/s ({summary['steady_tokens_per_s'] or 0:,} once started)")
    return "\n".join(lines)


class _QuietUserErrors(logging.Filter):
    """Ray Data logs a failed UDF's stack trace before raising; for a user's input error raypt prints one clear
    line instead, so those records are dropped (other errors keep their traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += repr(record.exc_info[1])
        return "CorpusError" not in text and not text.startswith("Exception occurred in Ray Data or Ray Core internal")


class ClusterError(UserError):
    """A Ray cluster that cannot be joined; the message says what to do."""


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (what `ray job submit` sets), else the one `ray start` recorded on this
    machine, else start a local one."""
    if not ray.is_initialized():
        if stale := stale_cluster():
            raise ClusterError(
                f"the Ray cluster this machine last started ({stale[0]}, recorded in {stale[1]}) is not "
                "answering: it ended without `ray stop`, and Ray would retry it for minutes. Run `ray stop` (or "
                "delete that file) to start a fresh local Ray, or set RAY_ADDRESS to the cluster to join")
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # (raypt shows one bar per phase, `raypt.progress`, not one per operator)
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # (and Ray Data's advice to turn its own on is not printed)
    for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
        logging.getLogger(name).addFilter(_QuietUserErrors())


def stale_cluster() -> tuple[str, str] | None:
    """Without RAY_ADDRESS: the address of the cluster `ray start` recorded in Ray's temp dir (which `ray.init()`
    joins) and that file, when nothing listens there any more; else None."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    try:
        from ray._common.utils import get_ray_address_file

        file = get_ray_address_file(None)
        address = Path(file).read_text().strip()
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=3):
            return None
    except (FileNotFoundError, ImportError, ValueError):  # (none recorded; a Ray that keeps it elsewhere)
        return None
    except OSError:  # refused or timed out: nothing answers there
        return address, file


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", required=True, help="directory for Parquet blocks (train/, eval/) and summary.json")


@command(__doc__, "raypt.data", _arguments, config=True)
def main(args) -> None:
    cfg = args.cfg
    print("resolved config:\n" + cfg.to_yaml(), flush=True)
    with ThreadPoolExecutor(1) as pool:
        encoder = pool.submit(encoder_spec, cfg)  # (loading transformers overlaps Ray's start)
        init_ray()
    summary = write_pretokenized(cfg, args.out, encoder.result())
    print(format_summary(summary))
    print(f"wrote {args.out}/summary.json")


if __name__ == "__main__":
    sys.exit(main())
