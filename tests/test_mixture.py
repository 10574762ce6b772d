"""Weighted source mixtures (data.sources) on a real local Ray: the order the Feeder hands out, per-source eval, and
a killed run resuming the mixture exactly. The small general source is a Hugging Face dataset (format: hf), so these
runs also train on one."""

import json
import time

import numpy as np
import pytest

from raypt import data, train
from raypt.config import load_config
from raypt.feed import Feeder, fetch_unit, units_in_order
from raypt.stream import Position, RankStream, gather

from conftest import make_docs, write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A domain corpus of text shards, and a small general one as a Hugging Face dataset (format: hf)."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("mixture")
    Dataset.from_dict({"text": make_docs(2, seed=12)}).save_to_disk(root / "general", num_shards=2)
    Dataset.from_dict({"text": make_docs(10, seed=14)}).save_to_disk(root / "general_eval")
    return {"domain": write_shards(root / "domain", make_docs(60, seed=11), shards=3), "general": root / "general",
            "domain_eval": write_shards(root / "domain_eval", make_docs(10, seed=13), shards=1),
            "general_eval": root / "general_eval"}


def mixture(corpora, eval=False):
    """data.sources for the two corpora, 0.7 / 0.3, as a --set value."""
    ev = lambda name: f", eval_paths: [{corpora[name + '_eval']}]" if eval else ""  # noqa: E731
    return (f"data.sources=[{{name: domain, paths: [{corpora['domain']}], weight: 0.7{ev('domain')}}}, "
            f"{{name: general, paths: [{corpora['general']}], format: hf, weight: 0.3{ev('general')}}}]")


def fed(cfg, steps: int, batch: int = 8):
    """The first `steps` global batches the Feeder hands a one-worker run (blocks as tuples), and the position after."""
    feeder = Feeder(cfg.to_dict())
    feeder.open(Position(), world_size=1)  # (a fresh run's start: the mixture's)
    stream = RankStream((feeder.window(k, 0) for k in range(10**6)), 0, batch, 0, 1, cfg.run.seed)
    got, pos = [], None
    for _ in range(steps):
        rows, pos = next(stream)
        got += [tuple(b) for b in gather(rows, fetch_unit)]
    feeder.close()
    return got, pos


def test_the_feeder_mixes_whole_blocks_of_each_source_at_its_weight(ray_local, corpora, tokenizer_dir):
    """1,000 blocks from the Feeder: 0.7 of them from the domain source (within 0.01), every block one of its
    source's own blocks (the two sets share none), the small source upsampled pass after pass."""
    sets = [f"tokenizer.path={tokenizer_dir}", "data.seq_len=32", "data.cpus_per_tokenize_worker=0.5",
            "data.unit_bytes=1024", "data.shuffle_tokens=640", "data.materialize=true"]
    cfg = load_config(None, [mixture(corpora), *sets])
    own = {}
    for name, fmt in (("domain", "text"), ("general", "hf")):
        one = load_config(None, [f"data.train_paths=[{corpora[name]}]", f"data.format={fmt}", *sets])
        split = data.build_dataset(one)
        own[name] = {tuple(b) for u in units_in_order(split.dataset, np.arange(split.units), 0)
                     if u.blocks for b in fetch_unit(u)}
    assert own["domain"].isdisjoint(own["general"]) and len(own["general"]) < 60  # one pass of it: < 60 blocks
    got, pos = fed(cfg, 125)
    src = ["domain" if b in own["domain"] else "general" if b in own["general"] else None for b in got]
    assert None not in src
    assert src.count("domain") / len(got) == pytest.approx(0.7, abs=0.01)
    # the small source's passes, counted: its position at the last window's start is in the pass its blocks reach
    assert pos.sources[1].epoch == pos.taken[1] // len(own["general"]) >= 10
    assert sum(pos.taken) + pos.offset == 1000


def test_a_rank_holds_the_window_it_trains_on_and_one_ahead(ray_local, corpora, tokenizer_dir):
    """A rank asks the Feeder for window k + 2 only once it trains on window k + 1: however fast the Feeder answers,
    a rank holds the window it trains on and the next one, pulled to its node, and has asked for one more."""
    import ray

    from raypt.feed import RankFeed

    sets = [f"tokenizer.path={tokenizer_dir}", "data.seq_len=32", "data.cpus_per_tokenize_worker=0.5",
            "data.unit_bytes=1024", "data.shuffle_tokens=4096", "data.materialize=true", "scaling.num_workers=1",
            "scaling.cpus_per_worker=0", "train.global_batch_size=8", "train.micro_batch_size=8"]
    cfg = load_config(None, [mixture(corpora), *sets])
    feeder = ray.remote(Feeder).options(num_cpus=0).remote(cfg.to_dict())
    ray.get(feeder.open.remote(Position(), 1))
    feed = RankFeed(feeder, cfg, 0, 1, Position())
    per_window = 16  # mixture windows of 128 blocks (a shuffle window: 4,096 tokens / 32)
    for step in range(1, 4 * per_window + 1):
        next(feed)
        time.sleep(0.02)  # (the Feeder has time to answer every ask)
        training = (step - 1) // per_window  # the window this step came from
        assert feed.next <= training + 3 and len(feed.ready) <= 1, (step, feed.next, len(feed.ready))
    ray.kill(feeder)


def test_raypt_data_writes_a_directory_per_source_that_trains_as_the_text_does(ray_local, corpora, tokenizer_dir,
                                                                              tmp_path):
    """`raypt.data --out` with sources: train/NAME and eval/NAME per source, counted per source; a run on that
    directory (data.pretokenized, the same names and weights) gets the text mixture's blocks, in its order, and each
    source's eval set."""
    sets = [f"tokenizer.path={tokenizer_dir}", "data.seq_len=32", "data.cpus_per_tokenize_worker=0.5",
            "data.unit_bytes=1024", "data.shuffle_tokens=640"]
    out = tmp_path / "pretok"
    assert data.main(["--out", str(out), *[a for s in [mixture(corpora, eval=True), *sets] for a in ("--set", s)]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {k for k, v in summary.items() if isinstance(v, dict)} == {"train/domain", "train/general", "eval/domain",
                                                                       "eval/general"}
    units = {key: len(list((out / key).glob("unit-*.parquet"))) for key in ("train/domain", "train/general")}
    assert units["train/domain"] > 1 and units["train/general"] >= 1 and summary["train/general"]["blocks"] > 0
    text = load_config(None, [mixture(corpora), *sets])
    pretok = load_config(None, ["data.sources=[{name: domain, weight: 0.7}, {name: general, weight: 0.3}]",
                                f"data.pretokenized={out}", *sets])
    assert fed(pretok, 25)[0] == fed(text, 25)[0]
    from raypt.feed import eval_chunks

    assert set(eval_chunks(pretok, 1)) == {"domain", "general"}


def test_a_killed_mixture_run_resumes_exactly_and_evaluates_each_source(ray_local, corpora, tokenizer_dir, tmp_path,
                                                                        monkeypatch, busy_cpus):
    """Streaming text, two workers, every core also busy: rank 1 is SIGKILLed after step 10, the group restarts from
    checkpoint 8 and trains steps 9-10 again with the very same losses, token counts and LRs; eval loss and
    perplexity are logged for each source and for both together; the small source's passes are counted."""
    monkeypatch.setenv("RAYPT_FAULT", "step:10:1")
    monkeypatch.setenv("RAYPT_FAULT_FILE", str(tmp_path / "fault"))
    argv = []
    for s in (mixture(corpora, eval=True), f"tokenizer.path={tokenizer_dir}", "data.seq_len=32",
              "data.unit_bytes=1024", "data.shuffle_tokens=320", "data.cpus_per_tokenize_worker=0.5",
              f"run.storage_path={tmp_path}", "run.name=mix", "run.max_failures=1", "scaling.num_workers=2",
              "scaling.cpus_per_worker=0.5", "train.micro_batch_size=2", "train.global_batch_size=8",
              "train.max_steps=12", "train.checkpoint_every=4", "train.eval_every=4", "train.log_every=1",
              "train.warmup_steps=2", "train.lr=3e-3", "train.sample_tokens=0", "run.report=false"):
        argv += ["--set", s]
    assert train.main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_from"].rsplit("/", 1)[1] for r in rows if "resumed_from" in r] == ["checkpoint_000008"]
    seen, twice = {}, []
    for r in (r for r in rows if "loss" in r):
        row = (r["loss"], r["tokens_seen"], r["lr"], r["pass/domain"], r["pass/general"])
        if r["step"] in seen:
            assert seen[r["step"]] == row, (r["step"], seen[r["step"]], row)
            twice.append(r["step"])
        seen[r["step"]] = row
    assert sorted(seen) == list(range(1, 13)) and twice[:1] == [9]  # (rank 0 may be stopped before it logs 10)
    # ~29 blocks of the general source, a few a pass: its passes are counted (at the start of each window of 10)
    assert seen[12][4] >= 2, [seen[s][4] for s in sorted(seen)]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals][-1] == 12
    for r in evals:
        for name in ("domain", "general"):
            assert r[f"eval_ppl/{name}"] == pytest.approx(np.exp(r[f"eval_loss/{name}"]))
        assert min(r["eval_loss/domain"], r["eval_loss/general"]) <= r["eval_loss"] <= max(
            r["eval_loss/domain"], r["eval_loss/general"])
