"""Data pipeline benchmark: raypt vs the classic Hugging Face recipe vs the tokenizer's raw speed, side by side.

    python bench/data.py [--mb 100] [--repeat 3] [--scale10]

On one corpus (../shared/corpus/cnews/train replicated to --mb megabytes in a temporary directory):
  (a) raypt:   `python -m raypt.data` (local Ray, actor pool, Parquet out)
  (b) classic: datasets.load_dataset("text") -> map(tokenize, num_proc=cores) -> map(group_texts, num_proc=cores)
  (c) raw:     the fast tokenizer's batch encode of every document, already in memory, no packing
Each runs in its own fresh process (--repeat: that many of each, alternating, medians). Reported: tokens/s of the steady-state work (start-up excluded), the whole
process's wall time, and the peak rise of the machine's used memory while it ran; then the ratios.
--scale10 repeats (a) on a 10x corpus to show that streaming keeps memory flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "corpus" / "cnews" / "train"

CLASSIC = r"""
import json, os, sys, time
from itertools import chain
t_start = time.perf_counter()
from datasets import load_dataset, disable_progress_bars
from transformers import AutoTokenizer
disable_progress_bars()
corpus, tok_dir, cache, seq_len, procs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tok = AutoTokenizer.from_pretrained(tok_dir)
files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
t0 = time.perf_counter()
raw = load_dataset("text", data_files=files, split="train", cache_dir=cache)
def tokenize(batch):  # run_clm's tokenize_function, with each document closed by EOS
    ids = tok(batch["text"])["input_ids"]
    return {"input_ids": [x + [tok.eos_token_id] for x in ids]}
def group_texts(examples):  # run_clm's group_texts
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total = (len(concatenated["input_ids"]) // seq_len) * seq_len
    return {k: [t[i : i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}
toks = raw.map(tokenize, batched=True, num_proc=procs, remove_columns=["text"])
t1 = time.perf_counter()
blocks = toks.map(group_texts, batched=True, num_proc=procs)
t2 = time.perf_counter()
tokens = sum(len(x) for x in toks["input_ids"])
print(json.dumps({"tokens": tokens, "blocks": len(blocks), "steady_s": t2 - t0, "tokenize_s": t1 - t0}))
"""

RAW = r"""
import json, os, sys, time
from transformers import AutoTokenizer
corpus, tok_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(tok_dir).backend_tokenizer
docs = []
for f in sorted(os.listdir(corpus)):
    with open(os.path.join(corpus, f), encoding="utf-8") as fh:
        docs.extend(line.rstrip("\n") for line in fh if line.strip())
t0 = time.perf_counter()
tokens = 0
for i in range(0, len(docs), 1024):
    tokens += sum(len(e.ids) for e in tok.encode_batch_fast(docs[i : i + 1024], add_special_tokens=False))
dt = time.perf_counter() - t0
print(json.dumps({"tokens": tokens + 2 * len(docs), "steady_s": dt}))
"""


class MemorySampler:
    """Peak rise of the machine's used memory (all processes: Ray's too) over the value at start."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.base = psutil.virtual_memory().used

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, psutil.virtual_memory().used - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak memory rise in MB, stdout) of a fresh process."""
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{r.stderr[-4000:]}")
    return wall, mem.peak / 2**20, r.stdout


def make_corpus(root: Path, mb: int) -> Path:
    root.mkdir(parents=True)
    shards = sorted(SOURCE.glob("*.txt"))
    size = sum(p.stat().st_size for p in shards)
    for i in range(max(1, round(mb * 1e6 / size))):
        for p in shards:
            shutil.copyfile(p, root / f"r{i:03d}_{p.name}")
    return root


def raypt_run(corpus: Path, tok: Path, out: Path, seq_len: int) -> dict:
    wall, mem, stdout = run([
        sys.executable, "-m", "raypt.data", "--out", str(out),
        "--set", f"data.train_paths=[{corpus}]", "--set", f"tokenizer.path={tok}", "--set", f"data.seq_len={seq_len}",
    ])
    summary = json.loads((out / "summary.json").read_text())
    s = summary["train"]
    return {"tokens": s["tokens"], "blocks": s["blocks"], "tok_s": summary["steady_tokens_per_s"], "wall_s": wall,
            "mem_mb": mem, "actor_rss_mb": s["peak_actor_rss_mb"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100, help="corpus size in MB (default 100)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each, alternating; medians reported")
    ap.add_argument("--scale10", action="store_true", help="also run raypt on a 10x corpus (memory stays flat?)")
    args = ap.parse_args()
    if not SOURCE.is_dir():
        print(f"skipped: {SOURCE} is not here (the benchmark corpus lives in ../shared)")
        return 0
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="raypt-bench-"))
    try:
        corpus = make_corpus(tmp / "corpus", args.mb)
        mb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
        tok = tmp / "tok"
        subprocess.run([sys.executable, "-m", "raypt.tokenizer", "--data", str(SOURCE), "--vocab-size", "8000",
                        "--out", str(tok)], check=True, capture_output=True, cwd=ROOT)
        print(f"corpus: {mb:.0f} MB ({len(list(corpus.iterdir()))} shards), 8k byte-level BPE, seq_len "
              f"{args.seq_len}, {cores} cores", flush=True)

        runs = {"a": [], "b": [], "c": []}
        for i in range(args.repeat):  # alternating, so that a slow spell of the machine hits every kind
            runs["a"].append(raypt_run(corpus, tok, tmp / f"out-a{i}", args.seq_len))
            shutil.rmtree(tmp / f"out-a{i}")
            print(f"(a) raypt    {runs['a'][-1]}", flush=True)
            wall, mem, out = run([sys.executable, "-c", CLASSIC, str(corpus), str(tok), str(tmp / f"hf-cache{i}"),
                                  str(args.seq_len), str(cores)], env={"HF_DATASETS_OFFLINE": "1"})
            shutil.rmtree(tmp / f"hf-cache{i}")
            b = json.loads(out.strip().splitlines()[-1])
            runs["b"].append({"tokens": b["tokens"], "blocks": b["blocks"], "tok_s": b["tokens"] / b["steady_s"],
                              "wall_s": wall, "mem_mb": mem})
            print(f"(b) classic  {runs['b'][-1]}", flush=True)
            wall, mem, out = run([sys.executable, "-c", RAW, str(corpus), str(tok)])
            c = json.loads(out.strip().splitlines()[-1])
            runs["c"].append({"tokens": c["tokens"], "tok_s": c["tokens"] / c["steady_s"], "wall_s": wall,
                              "mem_mb": mem})
            print(f"(c) raw      {runs['c'][-1]}", flush=True)
        res = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}  # medians
        print(f"\nmedians of {args.repeat} run(s) each:")

        a, b, c = res["a"], res["b"], res["c"]
        print("\n| run | tokens | steady tokens/s | whole process s | peak memory rise MB |")
        print("|---|---:|---:|---:|---:|")
        for key, name in (("a", "(a) raypt"), ("b", "(b) HF datasets map"), ("c", "(c) raw batch encode")):
            r = res[key]
            print(f"| {name} | {r['tokens']:,} | {r['tok_s']:,.0f} | {r['wall_s']:.1f} | {r['mem_mb']:,.0f} |")
        print(f"\nsteady throughput  a/c = {a['tok_s'] / c['tok_s']:.2f}  (goal >= 0.90)   b/c = {b['tok_s'] / c['tok_s']:.2f}"
              f"   a/b = {a['tok_s'] / b['tok_s']:.2f}")
        print(f"whole process      a/b = {a['wall_s'] / b['wall_s']:.2f}: raypt at {b['wall_s'] / a['wall_s']:.2f}x the "
              "classic recipe's speed (goal >= 1.0x at 100 MB, >= 1.5x at 1 GB)")
        if args.scale10:
            big = tmp / "corpus10"
            big.mkdir()
            for i in range(10):
                for p in corpus.iterdir():
                    os.link(p, big / f"x{i}_{p.name}")
            a10 = raypt_run(big, tok, tmp / "out-a10", args.seq_len)
            print(f"(a) raypt 10x {a10}")
            print(f"memory 10x/1x: machine {a10['mem_mb'] / a['mem_mb']:.2f}, per actor "
                  f"{a10['actor_rss_mb'] / a['actor_rss_mb']:.2f} (output Parquet excluded: it is on disk)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
