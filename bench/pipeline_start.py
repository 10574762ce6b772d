"""What a pipeline's input costs the node that starts it, per work unit, side by side in one Ray:

    python bench/pipeline_start.py [--units 1000,8000] [--repeat 3]

Ray Data puts every input row of a pipeline into the object store of the process that runs it before the first
unit starts; for a run's streaming pipeline that is the `Feeder`, on the head, at every pass and every resume.
  (a) one row per unit holding the unit itself (`raypt.data.unit_item`: its segments, format, place, output), as
      `ray.data.from_items` takes it (raypt's previous input);
  (b) raypt: one row per unit holding only its index (`raypt.data.unit_rows`), the items sent once with the map
      function as one Arrow table (timed here as one `ray.put` of it; Ray Data puts the map function once).
Units are planned as a big corpus's would be: 8 MB line ranges of shards with 60-character paths. Reported per
variant (median of --repeat, alternating): milliseconds per unit to build the input, and the object store's growth
per unit (from `ray.available_resources`, read once it is still).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from raypt.config import Source  # noqa: E402
from raypt.corpus import Segment  # noqa: E402
from raypt.data import unit_item, unit_rows  # noqa: E402
from raypt.pipeline_stats import Stats  # noqa: E402


def store_used() -> float:
    """Bytes in use in the object store, once two reads a quarter second apart agree."""
    last = None
    while True:
        used = ray.cluster_resources()["object_store_memory"] - ray.available_resources()["object_store_memory"]
        if used == last:
            return used
        last = used
        time.sleep(0.25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", default="1000,8000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    src, stats = Source("", ["/data"], [], 1.0, "text", "text"), Stats(None, 0)
    for n in [int(x) for x in args.units.split(",")]:
        items = [unit_item(i, i, [Segment(f"/data/corpora/finance-news/2026/shard-{i // 8:06d}.txt",
                                          (i % 8) << 23, ((i % 8) + 1) << 23)], stats, src) for i in range(n)]

        def index_rows():
            rows, table = unit_rows(items)
            return rows, ray.put(table)

        variants = {
            "rows holding the unit (from_items)": lambda: ray.data.from_items(items, override_num_blocks=n),
            "index rows + items once (unit_rows)": index_rows,
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(args.repeat):
            for name, make in variants.items():
                before = store_used()
                t0 = time.perf_counter()
                held = make()
                seconds = time.perf_counter() - t0
                results[name].append((seconds, store_used() - before))
                del held
        print(f"{n} units:")
        for name, runs in results.items():
            ms = statistics.median(s for s, _ in runs) * 1e3 / n
            kb = statistics.median(b for _, b in runs) / 1e3 / n
            print(f"  {name:38s} {ms:6.3f} ms/unit  {kb:6.2f} KB/unit in the store")
        (a_ms, a_b), (b_ms, b_b) = ([statistics.median(x[i] for x in runs) for i in (0, 1)] for runs in results.values())
        print(f"  ratio (b)/(a): time {b_ms / a_ms:.2f}x, store {b_b / a_b:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
