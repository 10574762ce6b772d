"""Where a one-worker raypt run's CPU goes: each process's share of the machine over the steady steps.

    python bench/cpu_share.py [--steps 60] [--warmup 10]

The same run as `bench/train.py`'s first raypt variant (one Ray Train worker holding every CPU, blocks read before
training). Every process the run starts is sampled twice a second; printed: CPU-seconds and share of all cores
between the log lines of step warmup+1 and the last step, by process, largest first.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import CORPUS, ROOT, prepare, raypt_settings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    if not CORPUS.is_dir():
        print(f"skipped: {CORPUS} is not here (the benchmark corpus lives in ../shared)")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="raypt-bench-cpu-"))
    try:
        prepare(tmp, args.steps)
        argv = [a for s in raypt_settings(tmp, args.steps) + ["run.name=cpu"] for a in ("--set", s)]
        before = {p.pid for p in psutil.process_iter()}
        run = subprocess.Popen([sys.executable, "-m", "raypt.train", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        lines: list[tuple[float, str]] = []
        threading.Thread(target=lambda: lines.extend((time.time(), x) for x in run.stdout), daemon=True).start()
        names, samples = {}, []
        while run.poll() is None:
            snap = {}
            for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
                if p.pid in before or p.info["cpu_times"] is None:
                    continue
                names[p.pid] = " ".join(p.info["cmdline"] or [p.info["name"]])[:60]
                snap[p.pid] = p.info["cpu_times"].user + p.info["cpu_times"].system
            samples.append((time.time(), snap))
            time.sleep(0.5)
        if run.returncode != 0:
            sys.exit("raypt failed:\n" + "".join(x for _, x in lines[-40:]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def logged(step: int) -> float:
        return next(t for t, x in lines if f"step {step}/" in x)

    t0, t1 = logged(args.warmup + 1), logged(args.steps)
    (s0, a), (s1, b) = (min(samples, key=lambda s: abs(s[0] - t)) for t in (t0, t1))
    cores, per = os.cpu_count() or 1, collections.Counter()
    for pid, cpu in b.items():
        per[names[pid]] += cpu - a.get(pid, 0.0)
    print(f"steps {args.warmup + 1}-{args.steps}: {s1 - s0:.1f} s x {cores} cores = {cores * (s1 - s0):.1f} CPU-s")
    print("| process | CPU-s | share of the machine |\n|---|---:|---:|")
    for name, cpu in per.most_common():
        if cpu > 0.05:
            print(f"| {name.strip()} | {cpu:.2f} | {100 * cpu / (cores * (s1 - s0)):.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
