"""The Ray Data corpus pipeline: files -> documents -> parallel tokenize + pack -> blocks of `seq_len` tokens.

    python -m raypt.data --config CFG [--set section.key=value ...] --out DIR

`build_dataset` returns a streaming Ray Dataset of ``{"input_ids": int32[seq_len], "unit"}`` rows, one tagged block
per work unit, that the trainer's `Feeder` (`raypt.feed`) sequences without reading; the CLI writes the same rows
as Parquet under ``DIR/train`` and ``DIR/eval`` plus ``DIR/summary.json``.

The corpus is planned into units of ~8 MB (`raypt.rundata.plan_split`: small files grouped, big ones cut into line
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
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.extensions import ArrowTensorArray

from raypt import faults, storage
from raypt.cli import command
from raypt.cluster import STREAM_CPUS, init_ray, tokenize_pool
from raypt.config import Config, Source, sources
from raypt.corpus import CorpusError, Listing, Segment, iter_documents
from raypt.packing import TOKEN_DTYPE, BlockPacker
from raypt.pipeline_stats import Stats
from raypt.progress import Progress
from raypt.rundata import Split, plan_split, plan_text, split_dir, split_field
from raypt.storage import filesystem
from raypt.tokenizer import EncoderSpec, encoder_spec, tokenizer_path

SPLITS = ("train", "eval")
TEXT_BATCH_CHARS = 8 << 20  # a tokenizer batch is closed at this many characters even if it has few documents


UNIT_KEY, BLOCKS_KEY = b"raypt.unit", b"raypt.unit_blocks"  # an output block's schema metadata: its unit, and all
# the blocks of that unit (a unit may be cut into several Ray blocks); the Feeder reads them without the data


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
        storage.configure(cfg.run)
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
        t0, before = time.perf_counter(), storage.retries()
        counts: Counter = Counter()
        unit = item["index"]
        segments = [Segment(**seg) for seg in item["unit"]]
        blocks = pack_unit(segments, item["format"], item["text_field"], self.encode, self.d, counts)
        if retried := storage.retries() - before:  # (requests to a store tried again: the loop logs them)
            counts["storage_retries"] += retried
        faults.maybe_slow("tokenize")  # (tests only: a stalled pipeline)
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


def read_pretokenized(batch: dict, seq_len: int, stats: Stats, items: pa.Table, run) -> Iterator[pa.Table]:
    """Ray Data task: one Parquet file written by `python -m raypt.data --out` (one unit) -> its tagged blocks; a
    wrong block length is a clear error. `run`: the run's config (its storage retry policy: `storage.configure`)."""
    item = item_of(items, batch)
    stats.turn(item["seq"])
    path, unit = item["path"], item["index"]
    storage.configure(run)
    before = storage.retries()
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        col = pq.read_table(f, columns=["input_ids"]).column("input_ids").combine_chunks()
    if retried := storage.retries() - before:
        stats.add({"storage_retries": retried}, time.time(), _peak_rss_mb(), 0.0)
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


@dataclass
class SplitData:
    dataset: ray.data.Dataset
    listing: Listing
    stats: Stats
    actors: tuple[int, int]
    units: int


def build_dataset(cfg: Config, split: str = "train", reserved_cpus: float = 0.0, order: list[int] | None = None,
                  first: int = 0, ahead: int | None = None, planned: Split | None = None,
                  needed: int | None = None, stats: ray.actor.ActorHandle | None = None,
                  encoder: EncoderSpec | None = None, src: Source | None = None) -> SplitData:
    """The streaming Ray Dataset of a split's packed blocks ("train" or "eval"; pre-tokenized Parquet with
    data.pretokenized), one tagged table per unit (`unit_table`) in completion order (re-sequence them with
    `raypt.feed.units_in_order`): the units `order[first:]` (default: plan order). With `ahead`, a unit waits to
    start until fewer than `ahead` units before it are still missing. `planned`: the split (`rundata.plan_split`), when
    the caller has it already (no listing again); `needed`: the tokenize actors the rate target asks for
    (`cluster.tokenize_pool`);
    `stats`: the `PipelineStats` actor to count in (default: a new one); `encoder`: the run's `encoder_spec`, when the
    caller has it (a process without transformers imported then never imports it); `src`: the source (default: the
    run's first). Nothing runs until consumed."""
    d, srcs = cfg.data, sources(cfg)
    src = src or srcs[0]
    planned = planned or plan_split(cfg, split, src)
    listing, units = planned.listing, planned.units
    order = list(range(len(units))) if order is None else [int(u) for u in order]
    if first >= len(order):
        raise CorpusError(f"{split_field(split, src)} has {len(units)} work units; a data position at unit {first} is "
                          "past its end (did the corpus change since the checkpoint?)")
    stats = Stats.open(stats, ahead, first)
    seqs = range(first, len(order))
    if d.pretokenized:
        rows, table = unit_rows([{"index": order[s], "seq": s, "path": units[order[s]]} for s in seqs])
        blocks = rows.map_batches(
            read_pretokenized, batch_size=1, batch_format="numpy", num_cpus=STREAM_CPUS,  # light: a Parquet read
            fn_kwargs=dict(seq_len=d.seq_len, stats=stats, items=table, run=cfg.run))
        return SplitData(blocks, listing, stats, (0, 0), len(units))
    fewest, most = tokenize_pool(d, len(order) - first, reserved_cpus, needed, [s.weight for s in srcs],
                                 srcs.index(src))  # (its share)
    encoder = encoder or encoder_spec(cfg)  # (a tokenizer problem fails here, not inside every actor)
    items = [unit_item(order[s], s, units[order[s]], stats, src) for s in seqs]
    blocks = pack(cfg, items, (fewest, most), encoder, stats, turnstile=ahead is not None)
    return SplitData(blocks, listing, stats, (fewest, most), len(units))


ROW_KEY = "item"


def unit_rows(items: list[dict]) -> tuple[ray.data.Dataset, pa.Table]:
    """A pipeline's input: one row per unit, holding only the unit's place in `items`, and the items as one Arrow
    table for its map function to look them up in (sent once with the function; the actors on a node share its
    bytes). Ray Data puts each input row into the object store of the node that runs the pipeline (a run's `Feeder`:
    the head) before the first unit starts, so the rows stay as small as a row can be (`bench/pipeline_start.py`)."""
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
    packs, so that it starts it without a dispatch round trip; with one, an actor holds one unit at a time, so that
    no unit waits behind one that waits in the turnstile."""
    d = cfg.data
    rows, table = unit_rows(items)
    return rows.map_batches(
        TokenizePack, batch_size=1, batch_format="numpy", num_cpus=d.cpus_per_tokenize_worker,
        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1], max_concurrent_calls_per_actor=1,
                                           max_tasks_in_flight_per_actor=1 if turnstile else 2),
        fn_constructor_kwargs=dict(cfg=cfg, encoder=encoder, threads=max(1, int(d.cpus_per_tokenize_worker)),
                                   stats=stats, items=table),
    )


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
    planned = {key: plan_text(cfg, split, src) for key, (split, src) in parts.items()}
    encoder = encoder or encoder_spec(cfg)
    stats, items = {}, []  # one entry per part in one PipelineStats actor
    for key, (split, src) in parts.items():
        stats[key] = Stats.open(next(iter(stats.values())).actor if stats else None, None, 0)
        items += [unit_item(i, i, u, stats[key], src, str((Path(out) / key / f"unit-{i:06d}.parquet").resolve()))
                  for i, u in enumerate(planned[key].units)]
    actors = tokenize_pool(cfg.data, len(items))
    t0 = time.perf_counter()
    with Progress(f"tokenizing and packing on {actors[1]} actors", total=len(items), unit="unit") as bar:
        for _ in pack(cfg, items, actors, encoder, next(iter(stats.values())),
                      turnstile=False).iter_internal_ref_bundles():
            bar.update(1)  # (one empty table per unit)
    seconds = time.perf_counter() - t0
    summary = {"seq_len": cfg.data.seq_len, "tokenizer": tokenizer_path(cfg), "tokenize_actors": actors[1],
               "seconds": round(seconds, 2)}
    for key, (split, src) in parts.items():
        summary[key] = split_counts(stats[key].get()[0], planned[key].listing, cfg.data.seq_len)
        check_not_empty(summary[key], split, cfg, src)
    tokens = sum(summary[key]["tokens"] for key in parts)
    first, last = zip(*(s.span() for s in stats.values()))  # (one pool: the rates are the whole pipeline's)
    steady = max(w for w in last if w) - min(w for w in first if w) if any(last) and any(first) else None
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
