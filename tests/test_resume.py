"""Exact resume on a real local Ray with 2 CPU workers: a run whose worker is killed, or which dies and is run again,
trains the steps it goes back over exactly as it trained them the first time (the same losses, token counts and LRs,
to the bit), across a shuffle window and a pass boundary, with every core of the machine also busy. Streaming text and
pre-tokenized data; the kill is a real SIGKILL of a worker process (`raypt.faults`). The run before the failure is
the run that was never interrupted, so no second run is needed to compare with."""

import json
import shutil
from pathlib import Path

import pytest

from raypt import data, train
from raypt.checkpoint import MARKER

from conftest import make_docs, write_shards

pytestmark = pytest.mark.slow
STEPS, EVERY = 24, 6
PASS_BLOCKS = 118  # blocks in one pass over the corpus below: pass 2 starts inside step 15 (global batch 8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir, ray_local):
    """A corpus of ~15 global batches (so the runs cross into a second pass) as text, and the same pre-tokenized."""
    root = tmp_path_factory.mktemp("resume")
    text = write_shards(root / "text", make_docs(30, seed=7), shards=3)
    units = "data.unit_bytes=1024"  # ~1 KB work units: a resume starts mid-stream, several units in
    assert data.main(["--out", str(root / "pretok"), "--set", f"data.train_paths=[{text}]", "--set", units,
                      "--set", f"tokenizer.path={tokenizer_dir}", "--set", "data.seq_len=32"]) == 0
    blocks = json.loads((root / "pretok" / "summary.json").read_text())["train"]["blocks"]
    assert blocks == PASS_BLOCKS  # (the resumes below go back from step 17 or 18 to checkpoint 12, across it)
    return {"text": [f"data.train_paths=[{text}]", units], "pretokenized": [f"data.pretokenized={root / 'pretok'}"]}


def run(tmp_path, tokenizer_dir, source, name, monkeypatch, fault=None, *sets):
    monkeypatch.delenv("RAYPT_FAULT", raising=False)
    if fault:
        monkeypatch.setenv("RAYPT_FAULT", fault)
        monkeypatch.setenv("RAYPT_FAULT_FILE", str(tmp_path / f"{name}.fault"))
    argv = []
    for s in (*source, f"tokenizer.path={tokenizer_dir}", "data.seq_len=32", f"run.storage_path={tmp_path}",
              f"run.name={name}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "train.micro_batch_size=2",
              "train.global_batch_size=8", f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}",
              "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2", "train.lr=3e-3",
              "data.shuffle_tokens=960",  # windows of a few units (30 blocks): resumes land inside one
              "train.sample_tokens=0", "run.report=false", *sets):
        argv += ["--set", s]
    return train.main(argv)


def resumed(tmp_path, name):
    """The checkpoints the run resumed from, by name, in order."""
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [Path(r["resumed_from"]).name for r in rows if "resumed_from" in r]


def trained_twice(tmp_path, name):
    """The steps logged twice (before the failure, and again after the resume), each checked to have the very same
    (loss, tokens_seen, lr) both times; every step of the run logged, with the right token count."""
    seen, twice = {}, []
    for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            row = (r["loss"], r["tokens_seen"], r["lr"])
            if r["step"] in seen:
                assert seen[r["step"]] == row, (r["step"], seen[r["step"]], row)
                twice.append(r["step"])
            seen[r["step"]] = row
    assert sorted(seen) == list(range(1, STEPS + 1)) and seen[STEPS][1] == STEPS * 8 * 32
    return twice


def test_killed_worker_resumes_exactly(sources, tmp_path, tokenizer_dir, monkeypatch, busy_cpus):
    """Streaming text: rank 1's process is SIGKILLed after step 17; Ray restarts the group, which resumes from
    checkpoint 12 and trains steps 13-17 again, into the second pass."""
    assert run(tmp_path, tokenizer_dir, sources["text"], "b", monkeypatch, "step:17:1", "run.max_failures=1") == 0
    assert (tmp_path / "b.fault").exists() and resumed(tmp_path, "b") == ["checkpoint_000012"]
    # (rank 0 may be stopped before it logs step 17: 13-16 are certain)
    assert trained_twice(tmp_path, "b")[:4] == [13, 14, 15, 16]


def test_killed_during_a_checkpoint_save_then_run_again_resumes_from_the_previous_one(sources, tmp_path,
                                                                                     tokenizer_dir, monkeypatch,
                                                                                     capsys, busy_cpus):
    """Pre-tokenized: rank 0 dies while writing checkpoint 18 (weights on disk, no marker yet), with no restarts
    left, so the run fails; the same command again resumes from checkpoint 12 and trains steps 13-18 again."""
    src, keep = sources["pretokenized"], "run.checkpoints_to_keep=2"
    with pytest.raises(Exception):
        run(tmp_path, tokenizer_dir, src, "d", monkeypatch, "save:18:0", keep)
    assert (tmp_path / "d.fault").exists()
    assert not (tmp_path / "d" / "checkpoint_000018" / MARKER).exists()
    # the half-written checkpoint is not one: the run goes on from 12
    capsys.readouterr()
    assert run(tmp_path, tokenizer_dir, src, "d", monkeypatch, None, keep) == 0
    assert "resuming from the latest, checkpoint_000012" in capsys.readouterr().out
    assert resumed(tmp_path, "d") == ["checkpoint_000012"]
    assert trained_twice(tmp_path, "d") == [13, 14, 15, 16, 17, 18]
    # keep-2 kept the newest two, both complete
    kept = sorted(p.name for p in (tmp_path / "d").glob("checkpoint_*"))
    assert kept == ["checkpoint_000018", "checkpoint_000024"]
    assert all((tmp_path / "d" / k / MARKER).exists() for k in kept)


def test_resume_refuses_other_data_naming_it_and_restart_goes_on(ray_local, tmp_path, tokenizer_dir, monkeypatch,
                                                                 capsys):
    text = write_shards(tmp_path / "text", make_docs(30, seed=7), shards=3)
    tok = Path(shutil.copytree(tokenizer_dir, tmp_path / "tok"))
    src = [f"data.train_paths=[{text}]", "data.unit_bytes=1024"]
    short = ("train.max_steps=4", "train.checkpoint_every=4", "scaling.num_workers=1")
    assert run(tmp_path, str(tok), src, "f", monkeypatch, None, *short) == 0

    def refused(*sets, tok=tok):  # the driver refuses before any worker starts, naming the difference
        capsys.readouterr()
        assert run(tmp_path, str(tok), src, "f", monkeypatch, None, *short, *sets) == 2
        err = capsys.readouterr().err
        assert "the training data changed since checkpoint_000004" in err and "run.data_changed: restart" in err
        return err

    (text / "shard_09.txt").write_text("one more document for the corpus\n")
    assert "shard_09.txt (added)" in refused()
    (text / "shard_09.txt").unlink()
    assert "seq_len: 32 -> 16" in refused("data.seq_len=16")
    with (tok / "tokenizer_config.json").open("a") as f:
        f.write("\n")
    assert "tokenizer: its files changed" in refused()
    # restart: the model and optimizer go on from step 4, the new data from the start of its order
    assert run(tmp_path, str(tok), src, "f", monkeypatch, None, "train.max_steps=6", "scaling.num_workers=1",
               "run.data_changed=restart") == 0
    rows = [json.loads(x) for x in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    changed = [r for r in rows if "data_changed" in r]
    assert len(changed) == 1 and changed[0]["step"] == 4 and "tokenizer" in changed[0]["data_changed"][0]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
