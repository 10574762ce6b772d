"""Run by tests/test_fsdp.py in two gloo processes: meta-device FSDP2 builds equal eager builds bitwise.

    python tests/fsdp_build_check.py TOKENIZER_DIR PRETRAINED_DIR
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def check(rank: int, world: int, port: int, tokenizer_dir: str, pretrained: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoTokenizer

    from raypt.checkpoint import full_model_state
    from raypt.config import load_config
    from raypt.model import build_model
    from raypt.parallel import fsdp_sharder

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cpu = torch.device("cpu")
    for kind, sets in (("scratch", ["model.preset=tiny"]), ("pretrained", [f"model.name_or_path={pretrained}"])):
        cfg = load_config(None, ["data.train_paths=[x]", "data.seq_len=32", "scaling.strategy=fsdp",
                                 f"scaling.num_workers={world}", *sets])
        shard = fsdp_sharder(cfg.scaling, cpu, world)
        sharded, _ = build_model(cfg.model, vocab_size=len(tok), seq_len=32, device=cpu, tokenizer=tok, seed=3,
                                 shard=shard, rank=rank)
        local = sum(p.to_local().numel() for p in sharded.parameters())
        total = sum(p.numel() for p in sharded.parameters())
        assert local < 0.75 * total, (kind, local, total)  # this rank holds about half
        full = full_model_state(sharded)
        x = torch.randint(3, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
        loss = sharded(input_ids=x, labels=x).loss.item()  # RoPE buffers and all: the sharded model computes
        if rank == 0:
            eager, _ = build_model(cfg.model, vocab_size=len(tok), seq_len=32, device=cpu, tokenizer=tok, seed=3)
            ref = eager.state_dict()
            assert set(full) <= set(ref) and len(full) >= len(ref) - 1, (sorted(full), sorted(ref))
            for k, v in full.items():
                assert torch.equal(v, ref[k]), (kind, k)
            assert loss == eager(input_ids=x, labels=x).loss.item(), kind
            print(f"{kind}: equal ({len(full)} tensors, rank 0 holds {local:,} of {total:,} parameters)", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def spawn(fn, nprocs: int, *args) -> None:
    """fn(rank, nprocs, port, *args) in `nprocs` processes, which form a gloo group on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(nprocs, port, *args), nprocs=nprocs)


if __name__ == "__main__":
    spawn(check, 2, sys.argv[1], sys.argv[2])
