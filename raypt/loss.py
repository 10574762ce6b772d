"""The causal-LM loss without the full-vocabulary logits.

Hugging Face's `LlamaForCausalLM(input_ids, labels=...)` computes `(batch, seq, vocab)` logits and an fp32
cross-entropy over them: for a 128k vocabulary at 8 x 2048 tokens that is 8.6 GB of fp32 logits per micro-batch,
kept for backward. `linear_cross_entropy` computes the LM head and the loss a chunk of positions at a time and, in the
same pass, the loss's gradients with respect to the hidden states and the head's weight (as Liger's fused linear
cross-entropy does, in plain PyTorch so it also runs on CPU): at most one chunk's logits exist at a time, no
recomputation, and backward only scales the stored gradients.

`use_chunked_loss(model)` makes a supported HF model's own forward compute its loss this way when given labels, so
DDP, FSDP2 (the head's weight is gathered by the root's forward), LoRA and gradient checkpointing wrap it unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE = -100
"""Label of a position that is not predicted (Hugging Face's convention)."""
CHUNK_BYTES = 256 << 20
"""fp32 logits per chunk: 512 positions of a 128k vocabulary."""
SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
"""Forwards that are exactly decoder -> final norm -> bias-free LM head -> mean cross-entropy of shifted labels (no
logit soft-capping or scaling)."""


class LinearCrossEntropy(torch.autograd.Function):
    """mean over non-ignored rows of cross_entropy(h @ weight.T, targets), h (n, d), weight (vocab, d); the gradients
    asked for (`need`: of h, of weight) are computed in forward.

    With a process `group` (tensor parallelism), `weight` is this rank's consecutive slice of the vocabulary (rank k
    of the group holds rows k * len(weight) onwards): each chunk's log-sum-exp and target logits are combined over
    the group in one all-gather of 2 numbers per row, and the gradient of h is this rank's part of a sum over the
    group (Megatron's vocabulary-parallel cross-entropy)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, need: tuple[bool, bool], group=None):
        valid = targets != IGNORE
        rows = weight.shape[0]
        start = 0 if group is None else dist.get_rank(group) * rows
        count = valid.sum().clamp(min=1)
        grad_h = torch.zeros_like(h) if need[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # Under autocast the head's matmuls run in bf16, as in HF's forward: cast the head once, not in each chunk's
        # two matmuls (autocast caches no cast of a weight without gradient: LoRA's frozen head, upcast by peft).
        device = h.device.type
        head = weight.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else weight
        for i in range(0, h.shape[0], chunk):
            hc, ok = h[i : i + chunk], valid[i : i + chunk]
            tc = targets[i : i + chunk] - start
            here = (tc >= 0) & (tc < rows)  # (the targets in this rank's slice of the vocabulary)
            tc = tc.clamp(0, rows - 1)
            logits = (hc @ head.T).float()
            lse = logits.logsumexp(-1)
            picked = logits.gather(1, tc[:, None]).squeeze(1) * here
            if group is not None:
                lse, picked = _over_group(group, lse, picked)
            total += ((lse - picked) * ok).sum()
            if any(need):  # d loss / d logits = (softmax - onehot) / count, for the rows that count
                g = logits.sub_(lse[:, None]).exp_()  # (in place: one chunk of logits is all there is)
                g[torch.arange(len(tc), device=g.device), tc] -= here.to(g.dtype)
                g = g.mul_((ok / count)[:, None]).to(hc.dtype)
                if need[0]:
                    grad_h[i : i + chunk] = g @ head
                if need[1]:
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype), None, None, None, None)


def _over_group(group, lse: torch.Tensor, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole vocabulary's log-sum-exp and target logit of each row, from every rank's over its slice."""
    mine = torch.stack([lse, picked])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every)
    return every[:, 0].logsumexp(0), every[:, 1].sum(0)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None, group=None) -> torch.Tensor:
    """The mean next-token loss of hidden states `h` (n, d) under an LM head `weight` (vocab, d) for `targets` (n,)
    (IGNORE: not counted), `chunk` rows at a time (default: CHUNK_BYTES of fp32 logits). `group`: `weight` is this
    rank's slice of a vocabulary sharded over the group (`LinearCrossEntropy`)."""
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    grad = torch.is_grad_enabled()  # (no gradient in eval, none for a frozen head under LoRA)
    need = (grad and h.requires_grad, grad and weight.requires_grad)
    return LinearCrossEntropy.apply(h, weight, targets, chunk, need, group)


def supported(model: torch.nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return (type(model).__name__ in SUPPORTED and type(head) is torch.nn.Linear and head.bias is None
            and getattr(model.config, "final_logit_softcapping", None) is None)


def use_chunked_loss(model: torch.nn.Module, chunk: int | None = None) -> None:
    """Give a supported HF causal LM (`supported`) a forward whose loss, when it is given labels, is
    `linear_cross_entropy` of the final hidden states: the same loss as its own, without its logits. Without labels it
    is the model's own forward (generation, logits)."""
    own = type(model).forward

    def forward(self, input_ids=None, labels=None, **kwargs):
        if labels is None:
            return own(self, input_ids=input_ids, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        h, w = hidden[:, :-1].reshape(-1, hidden.shape[-1]), self.lm_head.weight  # position t predicts label t + 1
        if h.dtype != w.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(w.dtype)  # (what the head's own Linear would need too)
        loss = linear_cross_entropy(h, w, labels[:, 1:].reshape(-1), chunk)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
