"""Checkpoint cost under FSDP2, side by side in one command: the full-gather format raypt used to write (every
weight and AdamW moment gathered to rank 0's CPU, rank 0 writes `save_pretrained` + `torch.save` while the others
wait) against raypt's sharded `Checkpointer` (each rank writes its own DCP shard), synchronous and async.

    python bench/checkpoint.py                      # a 134M-parameter Llama (fp32, AdamW state) on 2 gloo ranks
    python bench/checkpoint.py --hidden 512 --layers 8 --json    # 58M: what tests/test_fsdp.py runs

Each format runs in a fresh pair of processes (so one's freed memory does not flatter the next). Reported per
format: seconds training is blocked, seconds until the checkpoint is complete, rank 0's peak RSS above its level
before the save (sampled every millisecond), and bytes written by each rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

FORMATS = ("full-gather", "sharded", "sharded-async")


class PeakRSS:
    """This process's resident memory, sampled every millisecond by a thread, as a peak above a baseline."""

    def __init__(self):
        self._proc, self._peak, self._on = psutil.Process(), 0, True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while self._on:
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def reset(self) -> int:
        self._peak = base = self._proc.memory_info().rss
        return base

    @property
    def peak(self) -> int:
        return max(self._peak, self._proc.memory_info().rss)


class NoTokenizer:
    def save_pretrained(self, directory):
        pass


def worker(rank: int, world: int, port: int, fmt: str, args, out: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from raypt.checkpoint import Checkpointer
    from raypt.rundata import RunData
    from raypt.config import load_config
    from raypt.model import build_model
    from raypt.optim import build_optimizer
    from raypt.parallel import fsdp_sharder

    cfg = load_config(None, ["data.train_paths=[x]", "data.seq_len=64", "scaling.strategy=fsdp",
                             f"scaling.num_workers={world}", "model.preset=small", f"model.hidden_size={args.hidden}",
                             f"model.num_hidden_layers={args.layers}", f"model.intermediate_size={args.hidden * 8 // 3}",
                             f"model.num_attention_heads={args.hidden // 64}",
                             f"model.num_key_value_heads={args.hidden // 64}", "model.tie_word_embeddings=false"])
    cpu = torch.device("cpu")
    model, info = build_model(cfg.model, vocab_size=args.vocab, seq_len=64, device=cpu,
                              shard=fsdp_sharder(cfg.scaling, cpu, world), rank=rank)
    optimizer = build_optimizer(model, cfg.train, cpu)
    x = torch.randint(0, args.vocab, (1, 64))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()  # AdamW state exists: a real checkpoint's size
    optimizer.zero_grad()
    rss = PeakRSS()
    dist.barrier()
    base = rss.reset()
    t0 = time.perf_counter()
    if fmt == "full-gather":  # what raypt wrote before sharded checkpoints
        model_sd, optim_sd = get_state_dict(model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(out, state_dict=model_sd, safe_serialization=True)
            torch.save({"optimizer": optim_sd}, Path(out) / "train_state.pt")
        dist.barrier()
        blocked = done = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) if rank == 0 else 0
    else:
        ckpt = Checkpointer(out, rank=rank, keep=1, async_save=fmt == "sharded-async")
        state = {"step": 1, "tokens_seen": 0, **RunData([], None).state_dict()}
        ckpt.save(model=model, optimizer=optimizer, state=state, config_yaml="", tokenizer=NoTokenizer())
        blocked = time.perf_counter() - t0
        ckpt.wait()
        dist.barrier()
        done = time.perf_counter() - t0
        d = Path(out) / "checkpoint_000001"
        mine = [d / "state" / f"__{rank}_0.distcp", d / "rng" / f"rank_{rank:05d}.pt"]
        if rank == 0:
            mine += [d / "state" / ".metadata", d / "train_state.json", d / "COMPLETE"]
        written = sum(f.stat().st_size for f in mine)
    results[rank] = dict(format=fmt, rank=rank, blocked_s=blocked, total_s=done, peak_rss_mb=(rss.peak - base) / 2**20,
                         written_mb=written / 2**20, params=info.total_params)
    dist.barrier()
    dist.destroy_process_group()


def measure(fmt: str, args) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="raypt-bench-ckpt-") as out, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, port, fmt, args, out, results), nprocs=2)
        return [results[r] for r in range(2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", action="store_true", help="one JSON line of all results at the end")
    args = ap.parse_args()
    rows = [r for fmt in args.formats.split(",") for r in measure(fmt, args)]
    print(f"{rows[0]['params'] / 1e6:.0f}M-parameter Llama, fp32 weights + AdamW state, FSDP2 over 2 gloo ranks")
    print(f"{'format':<14} {'rank':>4} {'blocked s':>10} {'total s':>8} {'peak RSS MB':>12} {'written MB':>11}")
    for r in rows:
        print(f"{r['format']:<14} {r['rank']:>4} {r['blocked_s']:>10.2f} {r['total_s']:>8.2f} "
              f"{r['peak_rss_mb']:>12.0f} {r['written_mb']:>11.0f}")
    by = {(r["format"], r["rank"]): r for r in rows}
    if ("full-gather", 0) in by:
        old = by["full-gather", 0]
        for fmt in ("sharded", "sharded-async"):
            if (fmt, 0) in by:
                new = by[fmt, 0]
                print(f"{fmt} / full-gather on rank 0: blocked {new['blocked_s'] / old['blocked_s']:.2f}x, "
                      f"total {new['total_s'] / old['total_s']:.2f}x, peak RSS "
                      f"{new['peak_rss_mb'] / old['peak_rss_mb']:.2f}x, written {new['written_mb'] / old['written_mb']:.2f}x")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
