"""Soak: a long run on local Ray, watched from outside.

    python bench/soak.py [--steps 500] [--workers 2] [--out runs/soak]

Trains the `small` preset (4 x 256) on 2 CPU workers for 500 steps, a checkpoint every 25, keeping 3, on a streamed
text corpus (the demo corpus, written first). While it runs, a thread samples the resident memory of every Ray Train
worker process every second. Afterwards it reports and checks:

- memory: each worker's RSS over the first and the last fifth of the run (after warm-up): flat = the last fifth's
  median within 10 % of the first's;
- checkpoint overhead: the time in checkpoint saves (logged per save as `checkpoint_s` in metrics.jsonl) over the
  training time: at most 5 %;
- exactly `run.checkpoints_to_keep` complete checkpoints remain, the newest being the last step's.

Prints one JSON object; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raypt import checkpoint, train  # noqa: E402


def sample_workers(samples: dict, stop: threading.Event, t0: float) -> None:
    while not stop.wait(1.0):
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any("RayTrainWorker" in part for part in p.info["cmdline"] or []):
                    samples.setdefault(p.info["pid"], []).append((time.perf_counter() - t0, p.memory_info().rss))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--out", default="runs/soak")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    from raypt import demo

    demo.main(["--out", str(out / "demo")])
    sets = [f"data.train_paths=[{out}/demo/train]", "data.format=jsonl", f"tokenizer.path={out}/tokenizer",
            "tokenizer.vocab_size=2000", "data.seq_len=256", "model.preset=small",
            f"scaling.num_workers={args.workers}", "scaling.cpus_per_worker=0.5", "train.micro_batch_size=4",
            f"train.global_batch_size={4 * args.workers}", f"train.max_steps={args.steps}", "train.log_every=10",
            "train.eval_every=0", f"train.checkpoint_every={args.every}", f"run.checkpoints_to_keep={args.keep}",
            f"run.storage_path={out}", "run.name=soak", "train.lr=1e-3"]
    samples: dict[int, list] = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    watcher = threading.Thread(target=sample_workers, args=(samples, stop, t0), daemon=True)
    watcher.start()
    rc = train.main([a for s in sets for a in ("--set", s)])
    stop.set()
    wall = time.perf_counter() - t0

    rows = [json.loads(x) for x in (out / "soak" / "metrics.jsonl").read_text().splitlines()]
    saves = [r["checkpoint_s"] for r in rows if "checkpoint_s" in r]
    steps = [r for r in rows if "tokens_per_s" in r]
    train_s = sum(10 * 4 * args.workers * 256 / r["tokens_per_s"] for r in steps)  # log_every=10 steps per row
    memory = {}
    for pid, series in samples.items():
        if len(series) < 20:
            continue  # a process that did not live through the run
        span = series[-1][0] - series[0][0]
        first = [rss for t, rss in series if t - series[0][0] < span / 5 and t - series[0][0] > 10]
        last = [rss for t, rss in series if t - series[0][0] >= 4 * span / 5]
        if first and last:
            memory[pid] = {"first_fifth_mb": round(statistics.median(first) / 2**20),
                           "last_fifth_mb": round(statistics.median(last) / 2**20),
                           "max_mb": round(max(r for _, r in series) / 2**20), "samples": len(series)}
    kept = sorted(p.name for p in (out / "soak").glob("checkpoint_*"))
    complete = [k for k in kept if checkpoint.problem(str(out / "soak" / k)) is None]
    report = {
        "rc": rc, "wall_s": round(wall, 1), "steps": args.steps, "workers": args.workers,
        "train_s": round(train_s, 1), "checkpoints_saved": len(saves), "checkpoint_s_total": round(sum(saves), 2),
        "checkpoint_s_median": round(statistics.median(saves), 3) if saves else None,
        "checkpoint_overhead": round(sum(saves) / train_s, 4) if train_s else None,
        "memory": memory, "kept": kept, "complete": complete,
    }
    checks = {
        "finished": rc == 0 and steps and steps[-1]["step"] == args.steps,
        "memory_flat": bool(memory) and all(m["last_fifth_mb"] <= 1.10 * m["first_fifth_mb"] for m in memory.values()),
        "checkpoint_overhead_le_5pct": report["checkpoint_overhead"] is not None and report["checkpoint_overhead"] <= 0.05,
        "exactly_keep_complete": complete == kept and len(kept) == args.keep
                                 and kept[-1] == checkpoint.dirname(args.steps),
    }
    report["checks"] = checks
    print(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
