"""Run by tests/test_tp.py in two gloo processes: what one more decoder layer costs under tensor parallelism 2 (FSDP2's
bf16 policy over one data-parallel rank), measured: the bytes it saves for backward (its own, not the weights FSDP
gathers) and the collectives its forward and backward issue, with the bytes each moves; beside what `raypt.plan`
counts for them.

    python tests/tp_layer_check.py
"""

import json
import os
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from fsdp_build_check import spawn  # (the script's directory is on its path)

SHAPE = dict(hidden_size=96, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2)
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

    sc = ScalingConfig(num_workers=world, strategy="fsdp", tensor_parallel=world)
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


def check(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    (two, c2), (three, c3) = measure(2, world), measure(3, world)
    if rank == 0:
        print(json.dumps({"saved": three - two, "calls": dict(c3.calls - c2.calls),
                          "bytes": dict(c3.bytes - c2.bytes)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    spawn(check, 2)
