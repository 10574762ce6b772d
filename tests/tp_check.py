"""Run by tests/test_tp.py in four gloo processes, FSDP 2 x tensor parallel 2: a scratch model built on the meta device
and a pretrained one that rank 0 alone read and broadcast equal their eager builds bitwise; with document masking
and selective checkpointing of every second layer, the loss and gradient norm of a step are one process's; what one
more decoder layer costs under FSDP2's bf16 policy, measured: the bytes it saves for backward (its own, not the
weights FSDP gathers) and tensor parallelism's collectives, forward and backward, with the bytes each moves; and a
group spread over two hosts is reported.

    python tests/tp_check.py TOKENIZER_DIR PRETRAINED_DIR
"""

import json
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from fsdp_build_check import spawn  # (the script's directory is on its path)

TP, SEQ = 2, 32
SHAPE = dict(hidden_size=96, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2)  # (the layer's)
B, S, VOCAB = 2, 64, 64


class Collectives(TorchDispatchMode):
    """Counts functional collectives (DTensor's) by name, with the bytes of the whole tensor each gathers or
    reduces."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
            self.calls[name] += 1
            whole = out if name != "reduce_scatter_tensor" else args[0]
            self.bytes[name] += whole.numel() * whole.element_size()
        return out


def local(t):
    return t._local_tensor if isinstance(t, DTensor) else t


def measure(layers: int, world: int) -> tuple[int, Collectives]:
    from raypt.model import build_model
    from raypt.parallel import fsdp_sharder
    from raypt.settings import ModelConfig, ScalingConfig

    sc = ScalingConfig(num_workers=world, strategy="fsdp", tensor_parallel=TP)
    cpu = torch.device("cpu")
    model, _ = build_model(ModelConfig(preset="tiny", num_hidden_layers=layers, tie_word_embeddings=False, **SHAPE),
                           vocab_size=VOCAB, seq_len=S, device=cpu, shard=fsdp_sharder(sc, cpu, world, bf16=True))
    weights, saved = set(), {}

    def gathered(*_):  # the weights as FSDP gathered them for this layer's forward: not activations (FSDP frees
        weights.clear()  # a layer's after it: their addresses are new activations' afterwards)
        weights.update(local(p).untyped_storage().data_ptr() for p in model.parameters())

    for layer in model.model.layers:
        layer.register_forward_pre_hook(gathered)

    def pack(t):
        storage = local(t).untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(0))
    gathered()
    with Collectives() as counted:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
    return sum(saved.values()), counted


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

    (two, c2), (three, c3) = measure(2, world), measure(3, world)
    if rank == 0:
        print("layer " + json.dumps({"saved": three - two, "calls": dict(c3.calls - c2.calls),
                                     "bytes": dict(c3.bytes - c2.bytes)}), flush=True)

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
