"""Data parallelism inside one worker group: DDP replicas, or FSDP2 shards (`torch.distributed.fsdp.fully_shard`).

FSDP2 shards every decoder layer and the root (embeddings, final norm, LM head) over the workers, each parameter a
DTensor split on dim 0, so a rank holds 1/W of the weights, gradients and AdamW state and gathers one layer at a time
(the next one prefetched). With `scaling.fsdp_shard_size` < W it is HSDP: shard within groups of that many ranks
(a node), replicate across them. Parameter names and shapes stay those of the unwrapped model, so the optimizer's
decay groups, clipping and checkpoints see the same model as under DDP.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist

from raypt.settings import ScalingConfig, TrainConfig


def bf16_compute(train: TrainConfig, device: torch.device) -> bool:
    """train.precision: bf16 matmuls (bf16-mixed; auto on GPU), or fp32 ones. Weights stay fp32 either way."""
    return train.precision == "bf16-mixed" or (train.precision == "auto" and device.type == "cuda")


def autocast(train: TrainConfig, device: torch.device, model: torch.nn.Module):
    """The context each forward runs in: bf16 autocast for bf16 compute under DDP or one process (FSDP2 computes in
    bf16 through its MixedPrecisionPolicy instead, gathering bf16 weights), nothing for fp32."""
    if bf16_compute(train, device) and not is_sharded(model):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fsdp_sharder(sc: ScalingConfig, device: torch.device, world_size: int, bf16: bool = False):
    """A function that applies FSDP2 to a model (built on the meta device or not) in place and returns it; with
    `bf16`, layers gather their weights in bf16 and reduce gradients in fp32 (the weights themselves stay fp32).
    With scaling.tensor_parallel, the model is first split inside each group (`raypt.tensor_parallel`) and FSDP2
    shards over the groups: a 2-D mesh (data-parallel "shard" x "tp")."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shard, tp = sc.fsdp_shard_size or world_size, sc.tensor_parallel
    if tp > 1:  # FSDP over the tensor-parallel groups, each group consecutive ranks (a node's)
        mesh = init_device_mesh(device.type, (world_size // tp, tp), mesh_dim_names=("shard", "tp"))
        mesh[("shard", "tp")]._flatten("all")  # (a sum over both, the gradient norm's, is then one all-reduce)
        from raypt.tensor_parallel import check_placement

        check_placement(mesh["tp"], device)
    elif shard == world_size:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    else:  # HSDP: ranks are grouped by node (Ray Train numbers a node's workers consecutively)
        mesh = init_device_mesh(device.type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())

    def apply(model: torch.nn.Module) -> torch.nn.Module:
        if tp > 1:
            from raypt.tensor_parallel import parallelize

            parallelize(model, mesh["tp"])
        kw = dict(mesh=mesh["shard"] if tp > 1 else mesh, mp_policy=mp)
        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            # the last layer's parameters are needed again at once by backward: keep them gathered
            fully_shard(layer, reshard_after_forward=sc.reshard_after_forward and i < len(layers) - 1, **kw)
        fully_shard(model, reshard_after_forward=sc.reshard_after_forward, **kw)
        return model

    return apply


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: modules whose class the HF model names in `_no_split_modules`."""
    from raypt.model import ModelError, hf_model

    hf = hf_model(model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]  # (FSDP2 subclasses)
    if not layers:
        raise ModelError(f"{type(hf).__name__} names no decoder layer class (_no_split_modules); FSDP and "
                         "train.compile work layer by layer: use scaling.strategy: ddp and train.compile: false")
    return layers


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every decoder layer's forward, in place. Module hooks (FSDP2's gathers) and wrappers (DDP) run
    around it uncompiled, peft's adapters inside it are compiled with it, parameter names do not change, and the
    layers, alike but for their weights, share one compiled graph (Dynamo treats a module's parameters as inputs;
    training must not build a KV cache, whose per-layer slot would be guarded on).

    Activation checkpointing: transformers before 5.23 checkpoints in the layer's `__call__`, around the compiled
    forward; later ones checkpoint inside `forward`, so Dynamo traces `torch.utils.checkpoint` as one region and
    compiles the recompute with it. There the attention's hub-kernel routing (the `kernels` package, which
    transformers needs since 5.25, sets a global and resets it on the way out) is a side effect that Dynamo refuses
    to replay in backward, and the whole layer would silently stay eager; not replaying it is right, as it leaves
    nothing changed."""
    from torch._dynamo import config as dynamo

    layers = decoder_layers(model)
    can_skip = hasattr(dynamo, "skip_fwd_side_effects_in_bwd_under_checkpoint")
    if not can_skip and any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        logging.getLogger("raypt").warning(
            "WARNING: train.compile with model.gradient_checkpointing: this torch cannot skip the side effects "
            "Dynamo refuses inside a checkpointed forward (transformers 5.23+ with the kernels package): layers may "
            "stay eager")
    for layer in layers:
        compiled = torch.compile(layer.forward)
        if can_skip:
            compiled = dynamo.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)(compiled)
        layer.forward = compiled


def ddp_options() -> dict:
    """DDP without its buffer broadcast in the forward: the model's buffers (rotary frequencies) are the same on every
    rank, and the broadcast would make each step's first forward wait for the other ranks. (torch 2.13 renamed the
    option.)"""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def accumulating(model: torch.nn.Module, last: bool, sync_every_micro_batch: bool = False):
    """Context for one micro-batch's forward/backward: reduce gradients only on the last one of a step.
    DDP: `no_sync`. FSDP2: `set_requires_gradient_sync` — without sync, gradients accumulate unsharded (no
    communication, a full gradient in memory); with `sync_every_micro_batch` they are reduce-scattered every
    micro-batch and stay sharded (1/W of the memory, W-1 more reduce-scatters per step). HSDP all-reduces across
    the replicas (the nodes) once a step either way: the reduce-scattered shards accumulate until the last one."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last or sync_every_micro_batch)
        model.set_requires_all_reduce(last)
        return contextlib.nullcontext()
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm over all ranks' shards; returns that norm as a plain tensor (under FSDP the
    per-parameter norms are DTensors whose sum is reduced across ranks: every rank clips with the same norm)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm > 0 else math.inf, norm, foreach=True)
    return norm


def distributed() -> bool:
    """Whether this process is part of a process group (a Ray Train worker; not `LocalContext`)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if distributed():
        dist.all_reduce(x, op=op)
    return x
