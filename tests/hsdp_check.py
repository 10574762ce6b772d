"""Run by tests/test_fsdp.py in four gloo processes: HSDP (2 replicas x 2 shards) with gradients reduce-scattered
every micro-batch all-reduces across the replicas once a step, and its gradients are those of an all-reduce after
every micro-batch.

    python tests/hsdp_check.py TOKENIZER_DIR
"""

import os
import sys

import torch
import torch.distributed as dist

MICRO = 3


def check(rank: int, world: int, port: int, tokenizer_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoTokenizer

    from raypt.config import load_config
    from raypt.model import build_model
    from raypt.parallel import accumulating, fsdp_sharder

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = load_config(None, ["data.train_paths=[x]", "data.seq_len=32", "scaling.strategy=fsdp",
                             f"scaling.num_workers={world}", "scaling.fsdp_shard_size=2",
                             "scaling.fsdp_sync_every_micro_batch=true"])
    cpu = torch.device("cpu")
    model, _ = build_model(cfg.model, vocab_size=len(tok), seq_len=32, device=cpu, tokenizer=tok, seed=3,
                           shard=fsdp_sharder(cfg.scaling, cpu, world), rank=rank)
    gen = torch.Generator().manual_seed(rank)
    xs = [torch.randint(3, len(tok), (2, 32), generator=gen) for _ in range(MICRO)]
    counted, original = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted.append(kwargs.get("group", args[1] if len(args) > 1 else None))
        return original(tensor, *args, **kwargs)

    grads = {}
    for mode in ("every micro-batch", "once a step"):
        model.zero_grad(set_to_none=True)
        counted.clear()
        dist.all_reduce = counting
        try:
            for i, x in enumerate(xs):
                last = i == MICRO - 1
                if mode == "once a step":
                    ctx = accumulating(model, last, sync_every_micro_batch=True)
                else:  # reduce-scatter and all-reduce together after every micro-batch
                    model.set_requires_gradient_sync(True)
                    ctx = torch.enable_grad()
                with ctx:
                    model(input_ids=x, labels=x).loss.backward()
        finally:
            dist.all_reduce = original
        grads[mode] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        groups = 3  # two decoder layers and the root: one all-reduce each when the replicas sync
        expected = groups * (MICRO if mode == "every micro-batch" else 1)
        assert len(counted) == expected, (mode, len(counted), expected)
    for n, g in grads["once a step"].items():
        torch.testing.assert_close(g, grads["every micro-batch"][n], rtol=1e-5, atol=1e-7, msg=n)
    if rank == 0:
        print(f"all-reduces a step: {groups * MICRO} -> {groups}; gradients equal", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from fsdp_build_check import spawn

    spawn(check, 4, sys.argv[1])
