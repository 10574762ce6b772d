"""Tensor and sequence parallelism (Megatron-LM's layout) for Hugging Face Llama-family models, with PyTorch's DTensor
`parallelize_module`, inside groups of `scaling.tensor_parallel` workers; FSDP2 shards over the groups (`raypt.parallel`
builds the 2-D mesh).

In each decoder layer the attention's q/k/v projections and the MLP's gate/up are split by output (whole heads, a
slice of the MLP width: column-wise) and o_proj/down by input (row-wise), so a layer costs two all-gathers and two
reduce-scatters of its activations forward (the same backward) and no other communication. Between them the residual
stream and the norms are split along the sequence (sequence parallelism): nothing is held or computed twice. The
embedding and the LM head are split by vocabulary; the loss is computed over the head's shards
(`raypt.loss.LinearCrossEntropy` with a group), so no rank ever holds the full-vocabulary logits.

transformers' own `tp_plan` is not used: it is applied only inside `from_pretrained` (a scratch model built on the
meta device gets none), splits neither the sequence nor the embedding, and gathers the full logits.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.distributed as dist

from raypt.errors import UserError

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
"""Model types whose decoder layer is Llama's: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, two RMSNorms."""


class TensorParallelError(UserError):
    """A model that scaling.tensor_parallel cannot split; the message names the numbers."""


def check(hf_config, tp: int, scratch: bool = True) -> None:
    """Refuse, before any worker starts, a model whose shapes do not split over `tp` ranks (the sequence length's is
    a config check: `raypt.config.validate`)."""
    if tp == 1:
        return
    kind = getattr(hf_config, "model_type", "?")
    if kind not in LLAMA_LIKE:
        raise TensorParallelError(f"scaling.tensor_parallel splits Llama-family models ({', '.join(sorted(LLAMA_LIKE))}"
                                  f"), not model_type {kind!r}: use tensor_parallel: 1 (FSDP alone)")
    shapes = {"num_attention_heads": hf_config.num_attention_heads, "num_key_value_heads":
              hf_config.num_key_value_heads, "intermediate_size": hf_config.intermediate_size,
              "vocab_size": hf_config.vocab_size}
    bad = [f"{name} {n}" for name, n in shapes.items() if n % tp]
    if bad:
        fix = (f"; a scratch model can take model.vocab_size {-(-shapes['vocab_size'] // tp) * tp} (unused rows)"
               if scratch and shapes["vocab_size"] % tp else "")
        raise TensorParallelError(f"scaling.tensor_parallel {tp} does not divide the model's {', '.join(bad)} (each "
                                  f"rank takes whole heads and equal slices): choose a divisor{fix}")


def check_placement(mesh, device: torch.device) -> None:
    """Warn (on each group's first rank) when a tensor-parallel group spans hosts: every layer's collectives would
    cross the network. Groups are consecutive ranks, which Ray Train numbers by node; a node holding a number of
    workers that is not a multiple of the group size (GPUs taken by something else) shifts every later group."""
    import socket
    import zlib

    here = torch.tensor([zlib.crc32(socket.gethostname().encode())] * 2, dtype=torch.int64, device=device)
    here[1] = -here[1]
    group = mesh.get_group()
    dist.all_reduce(here, op=dist.ReduceOp.MAX, group=group)  # (the highest host id, and minus the lowest)
    if here[0] != -here[1] and dist.get_rank(group) == 0:
        logging.getLogger("raypt").warning(
            "WARNING: the tensor-parallel group of ranks %d-%d spans more than one host: its collectives cross the "
            "network every layer. Give each node a multiple of scaling.tensor_parallel workers (its GPUs)",
            dist.get_rank(), dist.get_rank() + dist.get_world_size(group) - 1)


def parallelize(model: torch.nn.Module, mesh) -> None:
    """Split a Llama-family causal LM (`check`ed; on the meta device or not) over the 1-D device mesh `mesh`, in
    place, and give it the forward that computes its loss over the vocabulary shards (`vocab_parallel_forward`)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    parallelize_module(model, mesh, {
        # The embedding's output is whole on every rank (an all-reduce, once a forward): the model builds its
        # attention mask and positions from its shape. The first layer keeps its slice of the sequence.
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "model.layers.0": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                             use_local_output=True),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(),  # (its weight's rows; `vocab_parallel_forward` uses the shard itself)
    })
    for layer in model.model.layers:
        parallelize_module(layer, mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    if tied:  # both split the vocabulary's rows alike: one weight again
        model.lm_head.weight = model.model.embed_tokens.weight
    vocab_parallel_forward(model)


def vocab_parallel_forward(model: torch.nn.Module) -> None:
    """The forward of a `parallelize`d model: with labels, the loss of the final hidden states (gathered along the
    sequence) under this rank's slice of the LM head, combined over the group (`raypt.loss.linear_cross_entropy`);
    without, the full logits (every rank's slice gathered), for a sample."""
    from torch.distributed.tensor import Partial, Replicate
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from raypt.loss import linear_cross_entropy

    def forward(self, input_ids=None, labels=None, **kwargs):
        kwargs["use_cache"] = False
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state  # (split along the sequence)
        group = hidden.device_mesh.get_group()
        # every rank's head slice sees every position; the gradient each returns is its part of a sum
        h = hidden.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
        w = self.lm_head.weight.to_local()
        if h.dtype != w.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(w.dtype)
        if labels is None:
            mine = (h @ w.T).float().contiguous()
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(every, mine, group=group)
            return CausalLMOutputWithPast(logits=torch.cat(every, dim=-1))
        loss = linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), w, labels[:, 1:].reshape(-1), group=group)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, tp: int) -> torch.Tensor:
    """`new_tokens` greedy tokens after `ids` (1, n) from a `parallelize`d model, every rank taking part: each
    forward sees the whole sequence so far (no KV cache), padded on the right to a multiple of `tp` (sequence
    parallelism splits it evenly; a causal model's logits at a position do not see what comes after it)."""
    for _ in range(new_tokens):
        n = ids.shape[1]
        padded = torch.nn.functional.pad(ids, (0, -n % tp), value=0)
        logits = model(input_ids=padded).logits
        ids = torch.cat([ids, logits[:, n - 1].argmax(-1, keepdim=True)], dim=1)
    return ids
