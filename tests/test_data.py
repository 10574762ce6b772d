"""The Ray Data pipeline on a real local Ray: conservation, order, bad input through the CLI."""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
import ray
from transformers import AutoTokenizer

from raypt import cluster, data, rundata
from raypt.config import load_config
from raypt.corpus import iter_documents, list_files
from raypt.tokenizer import DocumentEncoder

from conftest import make_docs, write_shards

ROOT = Path(__file__).parent.parent


def reference_stream(paths, tokenizer_dir, fmt="text"):
    """The whole corpus as one BOS/EOS-wrapped token stream, computed in this process without Ray."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = DocumentEncoder(tok, tok.bos_token_id, tok.eos_token_id)
    docs = [d for f in list_files(paths).files for d in iter_documents(f, fmt, Counter())]
    return enc(docs), tok


def run_cli(tmp_path, *sets, name="out"):
    out = tmp_path / name
    rc = data.main(["--out", str(out), *[a for s in sets for a in ("--set", s)]])
    summary = json.loads((out / "summary.json").read_text()) if rc == 0 else None
    return rc, summary, out


def blocks_of(out, split="train"):
    rows = pq.read_table(out / split).column("input_ids").to_pylist()
    return np.array([np.asarray(r).reshape(-1) for r in rows])


def in_order(split):
    """A split's units as the Feeder sees them (re-sequenced references), then read: (blocks, unit ids)."""
    from raypt.feed import fetch_unit, units_in_order

    units = list(units_in_order(split.dataset, np.arange(split.units), 0, split.stats))
    return [fetch_unit(u) for u in units], [u.data[0] for u in units]


def test_one_unit_equals_the_reference_stream(ray_local, corpus, tokenizer_dir):
    """One file (one work unit), many small batches: the blocks are exactly the document stream, in order, minus
    the final tail."""
    shard = corpus / "train" / "shard_00.txt"
    cfg = load_config(None, [f"data.train_paths=[{shard}]", f"tokenizer.path={tokenizer_dir}",
                             "data.seq_len=32", "data.num_tokenize_workers=1", "data.docs_per_batch=7"])
    split = data.build_dataset(cfg)
    batches, _ = in_order(split)
    got = np.concatenate(batches)
    stream, tok = reference_stream([str(shard)], tokenizer_dir)
    assert split.units == 1  # docs_per_batch=7: ~15 packer calls, each carrying its tail into the next
    assert got.shape[1] == 32 and got.dtype == np.int32
    n = got.size
    assert len(stream) - n < 32  # only the final tail is dropped
    assert np.array_equal(got.reshape(-1), stream[:n]), ([len(b) for b in batches], split.units, split.actors)
    s = data.summarize(split, 32, 1.0)
    assert s["tokens"] == len(stream) and s["blocks"] == len(got) and s["dropped_tokens"] == len(stream) - n
    assert s["documents"] == 100
    # documents start with BOS and end with EOS
    flat = got.reshape(-1)
    assert flat[0] == tok.bos_token_id
    bos_at, eos_at = np.flatnonzero(flat == tok.bos_token_id), np.flatnonzero(flat == tok.eos_token_id)
    assert len(bos_at) >= 95 and (flat[bos_at[1:] - 1] == tok.eos_token_id).all()
    assert (flat[eos_at[eos_at < len(flat) - 1] + 1] == tok.bos_token_id).all()


def test_a_mixture_shares_the_tokenize_actors_out_by_weight_at_least_one_each():
    assert cluster.mixture_caps(10, [0.7, 0.3]) == [7, 3]
    assert cluster.mixture_caps(2, [0.9, 0.1]) == [1, 1]  # at least one each
    assert cluster.mixture_caps(3, [0.98, 0.01, 0.01]) == [1, 1, 1]
    assert sum(cluster.mixture_caps(7, [5, 3, 2])) <= 7 and cluster.mixture_caps(5, [1]) == [5]
    with pytest.raises(cluster.ClusterError, match="3 sources stream side by side.*the free CPUs give 2"):
        cluster.mixture_caps(2, [1, 1, 1])


def test_a_pipeline_input_row_holds_only_its_index_and_the_items_come_back_exactly(ray_local):
    from raypt.config import Source
    from raypt.corpus import Segment
    from raypt.pipeline_stats import Stats

    src, stats = Source("", ["/d"], [], 1.0, "jsonl", "body"), Stats(None, 3)
    items = [data.unit_item(5, 0, [Segment("/d/a.txt", 0, 1 << 40), Segment("/d/b.txt")], stats, src, "/o/u.parquet"),
             data.unit_item(2, 1, [Segment("s3://bucket/é.txt", 7, -1)], stats, src)]
    rows, table = data.unit_rows(items)
    assert rows.schema().names == [data.ROW_KEY]  # (not the unit: Ray Data puts every row on the pipeline's node)
    assert [data.item_of(table, {data.ROW_KEY: np.array([r[data.ROW_KEY]])}) for r in rows.take_all()] == items


def test_a_saved_hf_dataset_gives_the_blocks_of_the_same_documents_as_jsonl(ray_local, corpus, tokenizer_dir, tmp_path):
    """format: hf (a `Dataset.save_to_disk` directory, read by the tokenize actors like any shard) and a JSONL file of
    the same documents give the same blocks, one unit each; the fingerprint lists the Arrow shard."""
    from datasets import Dataset

    docs = list(iter_documents(str(corpus / "train" / "shard_00.txt"), "text", Counter()))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(tmp_path / "hf")
    got = {}
    for fmt, path in (("jsonl", tmp_path / "docs.jsonl"), ("hf", tmp_path / "hf")):
        cfg = load_config(None, [f"data.train_paths=[{path}]", f"data.format={fmt}", f"tokenizer.path={tokenizer_dir}",
                                 "data.seq_len=32", "data.num_tokenize_workers=1"])
        split = data.build_dataset(cfg)
        got[fmt] = np.concatenate(in_order(split)[0])
        assert split.units == 1 and data.summarize(split, 32, 1.0)["documents"] == len(docs)
    assert len(got["hf"]) > 50 and np.array_equal(got["hf"], got["jsonl"])
    assert [f[0].rsplit("/", 1)[1] for f in rundata.fingerprint(cfg)["files"]] == ["data-00000-of-00001.arrow"]


def test_the_stream_is_the_same_in_every_run_each_unit_packed_alone(ray_local, corpus, tokenizer_dir, busy_cpus):
    """2 actors, many ~4 KB units, every core also busy with other work: the block stream is the units' own streams
    cut into blocks, in unit order, the same in every run (what exact resume rests on), and that by construction
    (the consumer re-sequences units; Ray Data's preserve_order is off) with the turnstile bounding the pipeline."""
    assert not ray.data.DataContext.get_current().execution_options.preserve_order
    cfg = load_config(None, [f"data.train_paths=[{corpus / 'train'}]", f"tokenizer.path={tokenizer_dir}",
                             "data.seq_len=16", "data.num_tokenize_workers=2", "data.unit_bytes=4096"])
    runs = []
    for ahead in (None, 2, None):
        split = data.build_dataset(cfg, ahead=ahead)
        blocks, ids = in_order(split)
        units = np.concatenate([np.full(len(b), u) for b, u in zip(blocks, ids)])
        runs.append((np.concatenate(blocks), units))
    for blocks, units in runs[1:]:
        assert np.array_equal(runs[0][0], blocks) and np.array_equal(runs[0][1], units)
    units = rundata.plan_split(cfg).units
    assert len(units) > 4
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = DocumentEncoder(tok, tok.bos_token_id, tok.eos_token_id)
    expected, expected_units = [], []
    for i, unit in enumerate(units):
        stream = enc([d for seg in unit for d in iter_documents(seg, "text", Counter())])
        n = len(stream) // 16
        expected.append(stream[: n * 16].reshape(n, 16))
        expected_units += [i] * n
    assert np.array_equal(runs[0][0], np.concatenate(expected)) and runs[0][1].tolist() == expected_units


def test_cli_two_actors_conserves_tokens(ray_local, corpus, tokenizer_dir, tmp_path):
    rc, s, out = run_cli(tmp_path, f"data.train_paths=[{corpus / 'train'}]", f"data.eval_paths=[{corpus / 'eval'}]",
                         f"tokenizer.path={tokenizer_dir}", "data.seq_len=16", "data.num_tokenize_workers=2")
    assert rc == 0
    stream, _ = reference_stream([str(corpus / "train")], tokenizer_dir)
    train = s["train"]
    assert train["tokens"] == len(stream) and train["documents"] == 300 and train["files"] == 3
    assert s["tokenize_actors"] == 2
    assert train["dropped_tokens"] == train["tokens"] - 16 * train["blocks"]
    assert 0 <= train["dropped_tokens"] < 2 * 16  # one tail per actor at most
    blocks = blocks_of(out)
    assert blocks.shape == (train["blocks"], 16)
    # the blocks are the stream's tokens: same multiset, except at most the dropped tails
    assert sum((Counter(stream.tolist()) - Counter(blocks.reshape(-1).tolist())).values()) == train["dropped_tokens"]
    assert s["eval"]["documents"] == 40 and len(blocks_of(out, "eval")) == s["eval"]["blocks"]
    assert (out / "config.yaml").exists()


def test_cli_tokenizes_the_text_of_a_training_config_that_reads_its_output(ray_local, corpus, tokenizer_dir,
                                                                             tmp_path):
    """A training config that points data.pretokenized at the directory `raypt.data --out` writes: the CLI still
    tokenizes the config's text into it."""
    rc, s, out = run_cli(tmp_path, f"data.train_paths=[{corpus / 'train'}]", f"tokenizer.path={tokenizer_dir}",
                         "data.seq_len=16", f"data.pretokenized={tmp_path / 'out'}")
    assert rc == 0 and s["train"]["documents"] == 300 and len(blocks_of(out)) == s["train"]["blocks"]


def test_cli_writes_each_unit_as_the_stream_makes_it_in_one_pipeline(ray_local, corpus, tokenizer_dir, tmp_path):
    """`--out` runs train and eval in one actor pool; each unit's file holds exactly the blocks the streaming
    pipeline makes for that unit, and is named by it. Writing into a directory that already holds a split is
    refused (the old files would mix with the new units)."""
    sets = [f"data.train_paths=[{corpus / 'train'}]", f"data.eval_paths=[{corpus / 'eval'}]",
            f"tokenizer.path={tokenizer_dir}", "data.seq_len=16", "data.num_tokenize_workers=2", "data.unit_bytes=8192"]
    rc, s, out = run_cli(tmp_path, *sets)
    assert rc == 0
    cfg = load_config(None, sets)
    for split in ("train", "eval"):
        streamed, ids = in_order(data.build_dataset(cfg, split))
        files = sorted((out / split).iterdir())
        assert [f.name for f in files] == [f"unit-{u:06d}.parquet" for u in range(len(files))] and len(files) >= 2
        written = [np.stack(pq.read_table(f).column("input_ids").to_numpy(zero_copy_only=False)) for f in files]
        assert ids == list(range(len(files)))
        for w, b in zip(written, streamed):
            assert np.array_equal(w, b)
        assert sum(map(len, written)) == s[split]["blocks"]
    assert run_cli(tmp_path, *sets)[0] == 2


def test_cli_end_to_end_in_a_fresh_process(corpus, tokenizer_dir, tmp_path):
    """`python -m raypt.data` as a user runs it: its own local Ray, a config file, a summary at the end."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train_paths: [{corpus / 'train'}]\n  seq_len: 64\ntokenizer:\n  path: {tokenizer_dir}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "raypt.data", "--config", str(cfg), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: 3 files, 300 documents" in r.stdout
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["train"]["blocks"] > 0


# ---- bad input: a clear error naming the problem, or a counted skip ---------------------------------------------------


def test_missing_path(ray_local, tokenizer_dir, tmp_path, capsys):
    rc, _, _ = run_cli(tmp_path, f"data.train_paths=[{tmp_path / 'nope'}]", f"tokenizer.path={tokenizer_dir}")
    assert rc == 2 and "nope' does not exist" in capsys.readouterr().err


def test_non_utf8_strict_fails_naming_file_and_line(ray_local, tokenizer_dir, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"good line\nbad \xff\xfe line\n")
    rc, _, _ = run_cli(tmp_path, f"data.train_paths=[{tmp_path / 'c'}]", f"tokenizer.path={tokenizer_dir}")
    err = capsys.readouterr().err
    assert rc == 2
    assert "a.txt:2: not valid UTF-8" in err and "decode_errors" in err
    assert "Traceback" not in err
    # the failed pipeline's tokenize actors are gone, with the CPUs they held: a later run of this process gets them
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_skips_are_counted_in_the_summary(ray_local, tokenizer_dir, tmp_path, capsys):
    c = tmp_path / "c"
    write_shards(c, make_docs(60, seed=3), shards=2)
    (c / "bad.txt").write_bytes(b"bad \xff line\nfine line here\n")
    (c / "crlf.txt").write_bytes(b"windows line one\r\n\r\n   \r\nwindows line two\r\n")
    (c / "empty.txt").write_bytes(b"")
    (c / "nul.txt").write_bytes(b"\x00\x01\x02\x03 binary\n")
    (c / ".hidden.txt").write_text("never read\n")
    (c / "_SUCCESS").write_text("")
    rc, s, out = run_cli(tmp_path, f"data.train_paths=[{c}]", f"tokenizer.path={tokenizer_dir}", "data.seq_len=8",
                         "data.decode_errors=skip")
    assert rc == 0
    t = s["train"]
    assert t["skipped"] == {"skipped_blank_lines": 2, "skipped_binary_nul": 1, "skipped_empty_files": 1,
                            "skipped_not_utf8": 1}
    assert t["documents"] == 60 + 1 + 2
    assert sorted(Path(p).name for p in t["hidden_files_skipped"]) == [".hidden.txt", "_SUCCESS"]
    printed = capsys.readouterr().out
    assert "skipped_not_utf8=1" in printed and "hidden files not read (2)" in printed
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cr = set(tok("\r", add_special_tokens=False)["input_ids"])
    assert not cr & set(blocks_of(out).reshape(-1).tolist())  # CRLF leaves no stray \r


def test_replace_counts_documents(ray_local, tokenizer_dir, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"bad \xff line\n" + " ".join(["word"] * 100).encode() + b"\n")
    rc, s, _ = run_cli(tmp_path, f"data.train_paths=[{tmp_path / 'c'}]", f"tokenizer.path={tokenizer_dir}",
                       "data.seq_len=8", "data.decode_errors=replace")
    assert rc == 0 and s["train"]["skipped"] == {"documents_with_replaced_bytes": 1} and s["train"]["documents"] == 2


def test_corpus_with_no_block_left(ray_local, tokenizer_dir, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("tiny\n\n   \n")
    rc, _, _ = run_cli(tmp_path, f"data.train_paths=[{tmp_path / 'c'}]", f"tokenizer.path={tokenizer_dir}",
                       "data.seq_len=512")
    err = capsys.readouterr().err
    assert rc == 2 and "yields no block of data.seq_len=512" in err and "lower data.seq_len" in err


def test_ten_megabyte_line(ray_local, tokenizer_dir, tmp_path):
    """One 10 MB document: tokenized in pieces (bounded memory), many blocks out, no token lost but the tail."""
    (tmp_path / "c").mkdir()
    words = " ".join(make_docs(4000, seed=6)).replace("\n", " ")
    line = (words * (10_000_000 // len(words) + 1))[:10_000_000]
    (tmp_path / "c" / "huge.txt").write_text(line + "\n")
    rc, s, _ = run_cli(tmp_path, f"data.train_paths=[{tmp_path / 'c'}]", f"tokenizer.path={tokenizer_dir}",
                       "data.seq_len=1024", "data.max_doc_chars=200000")
    assert rc == 0
    t = s["train"]
    assert t["documents"] == 1 and t["blocks"] > 1000
    assert t["dropped_tokens"] == t["tokens"] - 1024 * t["blocks"] < 1024
    assert t["peak_actor_rss_mb"] < 1500, t  # ~10x the line's size would mean it was held whole several times


def test_a_pass_after_the_first_sizes_its_tokenize_pool_to_what_training_reads(ray_local, tokenizer_dir, tmp_path):
    """The Feeder measures how fast training asks for windows and how fast one actor tokenizes; the next pass's
    pool is what makes HEADROOM x training's rate: one actor, for a consumer this slow (~6k tokens/s)."""
    import time

    from raypt.feed import Feeder
    from raypt.stream import Position

    text = write_shards(tmp_path / "text", make_docs(120, seed=3), shards=4)
    cfg = load_config(None, [f"data.train_paths=[{text}]", f"tokenizer.path={tokenizer_dir}", "data.seq_len=32",
                             "data.unit_bytes=1024", "data.shuffle_tokens=3200", "scaling.num_workers=1",
                             "scaling.cpus_per_worker=0"])  # (no training worker holds a CPU here)
    feeder = ray.remote(Feeder).options(num_cpus=0).remote(cfg.to_dict())
    assert ray.get(feeder.ready.remote())[0] >= 4  # (units of its one source)
    ray.get(feeder.open.remote(Position()))
    k = 0
    while ray.get(feeder.window.remote(k, 0)).epoch == 0 or len(ray.get(feeder.counts.remote())["tokenize_pools"]) < 2:
        time.sleep(0.5)  # "training" on a window of >= 3,200 tokens
        k += 1
    ray.get(feeder.close.remote())
    pools = ray.get(feeder.counts.remote())["tokenize_pools"]
    ray.kill(feeder)
    assert pools[0] == [2, 2] and pools[1] == [1, 1], pools
