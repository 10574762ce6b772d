"""Writes this directory's checkpoint with the raypt on the path (`python tests/data/compat/make.py OUT`): a tiny
scratch Llama trained 4 steps in one process (`LocalContext`), its checkpoint_000004 resumed for steps 5 and 6, and
the losses of those steps (expected.json). `tests/test_compat.py` resumes the checkpoint kept here with today's
raypt and expects those losses."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def config(tokenizer: Path, steps: int, *sets: str):
    from raypt.config import load_config

    return load_config(None, ["data.train_paths=[unused]", f"tokenizer.path={tokenizer}", "data.seq_len=16",
                              "data.shuffle_tokens=128", "scaling.num_workers=1", "train.global_batch_size=4",
                              "train.micro_batch_size=2", f"train.max_steps={steps}", "train.warmup_steps=2",
                              "train.lr=3e-3", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=4",
                              "run.report=false", "run.loggers=[]", "train.sample_tokens=0", "model.hidden_size=16",
                              "model.intermediate_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
                              "model.num_key_value_heads=1", *sets])


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def main(out: Path) -> None:
    from transformers import AutoTokenizer

    from raypt.loop import LocalContext, train
    from raypt.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat sky river stone green blue".split()
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "corpus" / "a.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(200)) + "\n")
    train_tokenizer([str(out / "corpus")], vocab_size=280, out=str(out / "tok"))
    vocab = len(AutoTokenizer.from_pretrained(out / "tok"))
    blocks = rng.integers(3, vocab, size=(4, 16))[rng.integers(0, 4, size=48)].astype(np.int32)
    train(config(out / "tok", 6), LocalContext(out / "first", blocks))
    ckpt = out / "first" / "checkpoint_000004"
    train(config(out / "tok", 6, f"run.resume_from={ckpt}"), LocalContext(out / "again", blocks))
    shutil.copytree(ckpt, HERE / ckpt.name, dirs_exist_ok=True)
    np.save(HERE / "blocks.npy", blocks)
    resumed = losses(out / "again")
    (HERE / "expected.json").write_text(json.dumps({"steps": {s: resumed[s] for s in (5, 6)},
                                                    "uninterrupted": losses(out / "first")}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
