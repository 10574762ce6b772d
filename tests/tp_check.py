"""Run by tests/test_tp.py in four gloo processes, FSDP 2 x tensor parallel 2: a scratch model built on the meta device
and a pretrained one that rank 0 alone read and broadcast equal their eager builds bitwise; with document masking
and selective checkpointing of every second layer, the loss and gradient norm of a step are one process's.

    python tests/tp_check.py TOKENIZER_DIR PRETRAINED_DIR
"""

import sys

import torch
import torch.distributed as dist

from fsdp_build_check import spawn  # (the script's directory is on its path)

TP, SEQ = 2, 32


def check(rank: int, world: int, port: int, tokenizer_dir: str, pretrained: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoTokenizer

    from raypt.checkpoint import full_model_state
    from raypt.config import load_config
    from raypt.loop import inputs
    from raypt.model import build_model
    from raypt.parallel import clip_grad_norm_, fsdp_sharder

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cpu = torch.device("cpu")
    base = ["data.train_paths=[x]", f"data.seq_len={SEQ}", "scaling.strategy=fsdp", f"scaling.num_workers={world}",
            f"scaling.tensor_parallel={TP}"]
    for kind, sets in (("scratch", ["model.preset=tiny"]), ("pretrained", [f"model.name_or_path={pretrained}"])):
        cfg = load_config(None, [*base, *sets])
        sharded, _ = build_model(cfg.model, vocab_size=len(tok), seq_len=SEQ, device=cpu, tokenizer=tok, seed=3,
                                 shard=fsdp_sharder(cfg.scaling, cpu, world), rank=rank)
        full = full_model_state(sharded)
        if rank == 0:
            eager, _ = build_model(cfg.model, vocab_size=len(tok), seq_len=SEQ, device=cpu, tokenizer=tok, seed=3)
            ref = eager.state_dict()
            assert set(full) <= set(ref) and len(full) >= len(ref) - 1, (sorted(full), sorted(ref))
            for k, v in full.items():
                assert torch.equal(v, ref[k]), (kind, k)
            print(f"{kind}: equal ({len(full)} tensors)", flush=True)
        dist.barrier()

    # document masking (BOS starts a document) and selective checkpointing of every second layer
    cfg = load_config(None, [*base, "model.preset=tiny", "model.num_hidden_layers=4", "data.document_masking=true",
                             "model.gradient_checkpointing=true", "model.checkpoint_every_layers=2",
                             "model.checkpoint_ops=matmuls"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, len(tok), (4, SEQ), generator=g)
    x[:, 0], x[:, 11], x[:, 20] = tok.bos_token_id, tok.bos_token_id, tok.bos_token_id  # (as many documents a row)
    docs = (tok.bos_token_id, tok.eos_token_id)
    sharded, _ = build_model(cfg.model, vocab_size=len(tok), seq_len=SEQ, device=cpu, tokenizer=tok, seed=3,
                             shard=fsdp_sharder(cfg.scaling, cpu, world), rank=rank)
    sharded.train()
    dp, dp_size = rank // TP, world // TP
    mine = x[dp * 4 // dp_size:(dp + 1) * 4 // dp_size]
    loss = sharded(**inputs(mine, docs), use_cache=False).loss
    loss.backward()
    norm = clip_grad_norm_([p for p in sharded.parameters()], 0).item()
    losses = [None] * world
    dist.all_gather_object(losses, loss.item())
    if rank == 0:
        eager, _ = build_model(cfg.model, vocab_size=len(tok), seq_len=SEQ, device=cpu, tokenizer=tok, seed=3)
        eager.train()
        ref = eager(**inputs(x, docs), use_cache=False).loss
        ref.backward()
        ref_norm = clip_grad_norm_([p for p in eager.parameters()], 0).item()
        mean = sum(losses) / world  # (every rank of a group has its group's loss; the groups' rows are alike in count)
        assert abs(mean - ref.item()) <= 1e-5 * ref.item(), (losses, ref.item())
        assert abs(norm - ref_norm) <= 1e-4 * ref_norm, (norm, ref_norm)
        print(f"masked, selective: loss {mean:.6f} = {ref.item():.6f}, grad norm {norm:.6f} = {ref_norm:.6f}",
              flush=True)

    # a group whose ranks are on two hosts is reported by its first rank; groups each on one host are not
    import logging
    import socket

    from torch.distributed.device_mesh import init_device_mesh

    from raypt.tensor_parallel import check_placement

    mesh = init_device_mesh("cpu", (world // TP, TP), mesh_dim_names=("shard", "tp"))
    warned = []
    logging.getLogger("raypt").addHandler(type("H", (logging.Handler,), {"emit": lambda _, r: warned.append(r)})())
    for hosts in ("node", "rank"):  # a host per node of TP ranks; a host per rank
        socket.gethostname = lambda: f"host{rank // TP if hosts == 'node' else rank}"
        check_placement(mesh["tp"], cpu)
        if hosts == "node":
            assert not warned, warned
    assert len(warned) == (1 if rank % TP == 0 else 0), warned
    assert all("spans more than one host" in w.getMessage() for w in warned), warned
    counts = [None] * world
    dist.all_gather_object(counts, len(warned))
    if rank == 0:
        print(f"placement: warned on ranks {[r for r, n in enumerate(counts) if n]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    spawn(check, 4, sys.argv[1], sys.argv[2])
