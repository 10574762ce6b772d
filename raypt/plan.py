"""Plan a run before paying for a cluster: parameters, memory per GPU, steps, wall-clock time and GPU-hours.

    python -m raypt.plan --config CFG [--gpus N] [--gpu-mem GB] [--tokens-per-s-per-gpu X | --mfu 0.4 --peak-tflops 989]
                         [--gpus-per-node 8 --write-gb-s 1]

The model is built on PyTorch's meta device (no weights, no memory), so parameter counts are exact. Memory is an
estimate: weights, gradients and AdamW state by dtype (trained weights fp32, a 4-bit base 4-bit; FSDP divides them
by the GPU count), activations of one micro-batch from the bytes a Llama layer saves for backward (sdpa attention;
by compute mode: FSDP2's bf16, DDP's autocast with its fp32 residual stream and bf16 weight copies, or fp32; with
and without gradient checkpointing; measured exactly on CPU by the tests), plus what the loss holds at its peak
(the chunked loss: one chunk's logits; HF's: three fp32 copies of all its logits; with the activations, within 10% of
the peak torch's MemTracker measures on CPU). FSDP2 divides weights, AdamW state and (when they are
reduce-scattered every micro-batch, or there is no accumulation) gradients by the shard group; it adds what it
gathers: the root's parameters (embeddings, LM head) and two decoder layers (the current one and the prefetched next)
in bf16, plus one layer's unsharded gradient and the fp32 reduce-scatter input it is copied into — or, with
reshard_after_forward off, every parameter in bf16. Outside the tensors: 5% allocator slack and ~1 GB for the
CUDA context and NCCL (assumed, not measured without a GPU).

A checkpoint holds the trained weights and their AdamW moments (12 bytes per trained parameter); each node writes its
share at --write-gb-s, and the time is checked against the reclaim notice a cloud gives a spot VM.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from raypt.cli import command
from raypt.config import Config, global_batch_size, grad_accum_steps
from raypt.loop import fits_notices
from raypt.model import PRESETS, ModelError

GB = 1024**3
# Architectures of common open models (the presets of their shapes), for planning from a remote path by its name.
KNOWN = {name: dict(PRESETS[preset], vocab_size=128256, max_position_embeddings=131072)
         for name, preset in (("llama-3.1-8b", "llama3-8b"), ("llama-3.2-1b", "llama3.2-1b"),
                              ("llama-3.1-70b", "llama3-70b"), ("llama-3.3-70b", "llama3-70b"))}


@dataclass
class Plan:
    params: int
    trainable: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    gathered_gb: float
    """FSDP: parameters and gradients gathered unsharded at a time (0 for DDP)."""
    activations_gb: float
    activations_no_ckpt_gb: float
    activations_ckpt_gb: float
    runtime_gb: float
    """Outside the tensors: allocator slack, the CUDA context and NCCL's buffers (assumed)."""
    total_gb: float
    tokens_per_step: int
    steps: int
    tokens: int
    flops_per_token: float
    tokens_per_s_per_gpu: float
    hours: float
    gpu_hours: float
    gpus: int
    checkpoint_gb: float
    """A checkpoint: the trained weights (fp32) and their AdamW moments, all ranks together."""
    checkpoint_s: float
    """Seconds to write one, each node writing its share at the given speed."""
    fits: bool | None
    fsdp_comm_gb: float = 0.0
    """FSDP's all-gathers and reduce-scatters a step (and HSDP's all-reduces), bytes each GPU sends."""
    tp_comm_gb: float = 0.0
    """Tensor parallelism's all-gathers and reduce-scatters a step, bytes each GPU sends (inside a node)."""


def model_config(cfg: Config, vocab_size: int | None):
    """The HF config of the run's model, without loading weights."""
    from transformers import AutoConfig, LlamaConfig

    from raypt.model import scratch_config

    m, tc = cfg.model, cfg.tokenizer
    if m.name_or_path is None:
        if vocab_size is None and tc.path and Path(tc.path).is_dir():
            from raypt.tokenizer import load_tokenizer

            vocab_size = len(load_tokenizer(tc.path))
        return scratch_config(m, vocab_size or tc.vocab_size or 32000, cfg.data.seq_len)
    if Path(m.name_or_path).is_dir():
        return AutoConfig.from_pretrained(m.name_or_path)
    name = m.name_or_path.rstrip("/").rsplit("/", 1)[-1].lower().replace("meta-", "")
    for key, arch in KNOWN.items():
        if key in name:
            return LlamaConfig(**arch)
    raise ModelError(f"cannot plan for {m.name_or_path!r} without its config: use a local model directory "
                     f"or one of the known architectures ({', '.join(KNOWN)})")


def loss_bytes(model, m, b: int, s: int, mode: str = "bf16", tp: int = 1) -> int:
    """What the loss holds at its peak for one micro-batch of b x s tokens. HF's own: three fp32 copies of the
    logits (the upcast logits, the log-softmax cross-entropy keeps, their gradient). The chunked loss
    (`raypt.loss`): one chunk's fp32 logits, turned into their gradient in place (and a bf16 copy of it under bf16
    compute), the gradient of the hidden states (fp32) and a trained head's fp32 gradient. (tests/test_plan.py
    measures both with torch's MemTracker.) Under tensor parallelism `tp` ranks share the vocabulary: each holds
    its slice of a chunk and of the head's gradient, and all of the hidden states' gradient."""
    from raypt.loss import CHUNK_BYTES, supported

    hf = model.config
    if m.loss != "chunked" or not supported(model):
        return b * s * hf.vocab_size * 4 * 3
    vocab = hf.vocab_size // tp
    chunk = min(b * (s - 1), max(1, CHUNK_BYTES // (4 * vocab)))
    head_grad = 0 if m.lora else vocab * hf.hidden_size * 4
    return chunk * vocab * (4 if mode == "fp32" else 4 + 2) + b * s * hf.hidden_size * 4 + head_grad


def compute_mode(cfg: Config) -> str:
    """How a GPU run computes (`raypt.parallel`): "bf16" (FSDP2 gathers bf16 weights: every activation bf16 but the
    norms' fp32 inputs), "autocast" (DDP and QLoRA: fp32 weights, bf16 matmuls, an fp32 residual stream) or
    "fp32" (train.precision: fp32)."""
    from raypt.parallel import bf16_compute

    if not bf16_compute(cfg.train, torch.device("cuda")):
        return "fp32"
    return "bf16" if cfg.scaling.strategy == "fsdp" else "autocast"


def saved_for_backward(model: torch.nn.Module, forward) -> int:
    """Bytes of the tensors `forward()` saves for backward, what `layer_activation_bytes` counts: each storage once
    (views share one), `model`'s parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if (ptr := t.untyped_storage().data_ptr()) not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


# Bytes a Llama decoder layer saves for backward per token (sdpa attention, hidden d, K/V width kv, MLP width I,
# h heads): the coefficients of d, kv and I by compute mode, plus 4 per head (attention's fp32 log-sum-exp) and 8
# (the two norms' fp32 rsqrt). Counted, not estimated: tests/test_plan.py measures them with saved-tensor hooks.
LAYER_BYTES = {"bf16": (20, 4, 8), "autocast": (30, 4, 8), "fp32": (32, 8, 16)}
# What LoRA adapters on all seven projections add (dropout's output and mask, each adapter's rank-r output):
# coefficients of d, I and r.
LORA_BYTES = {"bf16": (16, 2, 14), "autocast": (18, 4, 14), "fp32": (32, 4, 28)}
RUNTIME_GB = 1.0
"""Per GPU process outside PyTorch's allocator: the CUDA context (~0.5 GB) and NCCL's buffers (~0.5 GB for a few
communicators). Assumed, from those libraries' documented defaults; not measured here."""
ALLOCATOR_SLACK = 0.05
"""The caching allocator's fragmentation on top of what tensors hold (assumed; `bench/gpu.py` reports the planned
tensors beside the measured peak allocated and reserved memory)."""


def layer_activation_bytes(hf, mode: str, lora_r: int = 0) -> int:
    """Bytes one decoder layer saves for backward per token (LoRA on all seven projections with rank `lora_r`)."""
    d, i, h = hf.hidden_size, hf.intermediate_size, hf.num_attention_heads
    kv = hf.num_key_value_heads * (d // h)
    a, b, c = LAYER_BYTES[mode]
    n = a * d + b * kv + c * i + 4 * h + 8
    if lora_r:
        a, c, r = LORA_BYTES[mode]
        n += a * d + c * i + r * lora_r
    return n


def selective_bytes(hf, mode: str, tp: int = 1) -> float:
    """Bytes per token a layer under selective activation checkpointing (model.checkpoint_ops: matmuls) keeps beside
    its input: what its matmuls and attention return (q, k, v, the attention's output and fp32 log-sum-exp, o_proj,
    gate, up, down). Under tensor parallelism the heads and the MLP width are split, while o_proj and down return
    whole partial sums (reduce-scattered then: those outputs are kept too)."""
    d, i, h = hf.hidden_size, hf.intermediate_size, hf.num_attention_heads
    kv, unit = hf.num_key_value_heads * (d // h), 2 if mode in ("bf16", "autocast") else 4
    if tp == 1:
        return unit * (4 * d + 2 * kv + 2 * i) + 4 * h
    return unit * ((2 * d + 2 * kv + 2 * i) / tp + 2 * d + 2 * d / tp) + 4 * h / tp


def plan(cfg: Config, *, gpus: int | None = None, gpu_mem_gb: float | None = None, vocab_size: int | None = None,
         tokens_per_s_per_gpu: float | None = None, mfu: float = 0.4, peak_tflops: float = 989.0,
         gpus_per_node: int = 8, write_gb_s: float = 1.0) -> Plan:
    from transformers import AutoModelForCausalLM

    from raypt.model import model_info

    m, t, d = cfg.model, cfg.train, cfg.data
    hf = model_config(cfg, vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    params = sum(p.numel() for p in model.parameters())
    gpus = gpus or cfg.scaling.max_workers
    sc = cfg.scaling
    fsdp, tp = sc.strategy == "fsdp", sc.tensor_parallel
    shard = (sc.fsdp_shard_size or gpus // tp) if fsdp else 1  # FSDP shards over the data-parallel ranks

    linear = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    if m.lora:
        targets = [mod for n, mod in linear.items() if n.rsplit(".", 1)[-1] in m.lora_target_modules]
        trainable = sum(m.lora_r * (mod.in_features + mod.out_features) for mod in targets)
    else:
        trainable = params
    # trained weights are fp32 masters whatever the checkpoint's dtype; a LoRA base stays as saved (or model.dtype)
    frozen_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(m.dtype, 4 if m.name_or_path is None else 2)
    if m.quantize:  # NF4: 4 bits per linear weight + double-quantised scales (~0.127 bits); the rest (embeddings,
        quantized = sum(mod.weight.numel() for mod in linear.values())  # head, norms) fp32, as peft upcasts it
        weights = quantized * (4 + 0.127) / 8 + (params - quantized) * 4 + trainable * 4
    else:
        weights = params * (frozen_bytes if m.lora else 4)
    grads = trainable * 4
    optimizer = trainable * 8  # AdamW: two fp32 moments
    mode = compute_mode(cfg)
    gathered, grads_shard = 0.0, shard
    unit = 2 if mode == "bf16" else 4  # what FSDP2 gathers and computes in (MixedPrecisionPolicy)
    if fsdp:
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        root = params - layer * hf.num_hidden_layers
        # gathered parameters, plus a layer's unsharded gradients and the fp32 reduce-scatter input they are copied
        # into (FSDP2's foreach_reduce; one input is kept in flight at a time)
        gathered = ((params if not sc.reshard_after_forward else root + 2 * layer) * unit + layer * (unit + 4)) / tp
        if grad_accum_steps(cfg, gpus) > 1 and not sc.fsdp_sync_every_micro_batch:
            grads_shard = 1  # accumulated unsharded between reduce-scatters: a full gradient per GPU

    b, s, L, dh = t.micro_batch_size, d.seq_len, hf.num_hidden_layers, hf.hidden_size
    per_layer = b * s * layer_activation_bytes(hf, mode, m.lora_r if m.lora else 0)
    if mode == "autocast":  # autocast's bf16 copy of every matmul weight (adapters' too), kept for backward; a
        base = 0 if m.quantize else sum(mod.weight.numel() for mod in model.model.layers[0].modules()  # 4-bit one
                                        if isinstance(mod, torch.nn.Linear))  # is dequantized again in backward
        per_layer += 2 * (base + (trainable // L if m.lora else 0))
    if tp > 1:  # sequence parallelism splits it all but the inputs its column-parallel matmuls gather whole
        whole = 2 * b * s * dh * unit
        per_layer = (per_layer - whole) / tp + whole
    logits = loss_bytes(model, m, b, s, mode, tp)
    act_full = L * per_layer + logits
    residual = 2 if mode == "bf16" else 4  # each checkpointed layer keeps its input (split along the sequence)
    kept = b * s * (dh * residual / tp + (selective_bytes(hf, mode, tp) if m.checkpoint_ops == "matmuls" else 0))
    checkpointed = -(-L // m.checkpoint_every_layers)
    act_ckpt = checkpointed * kept + (L - checkpointed + 1) * per_layer + logits  # (+ one layer recomputed)
    activations = act_ckpt if m.gradient_checkpointing else act_full
    allocated = (weights + optimizer) / (shard * tp) + grads / (grads_shard * tp) + gathered + activations
    total = allocated * (1 + ALLOCATOR_SLACK) + RUNTIME_GB * GB

    # Bytes each GPU sends a step (ring collectives send (n - 1) / n of the whole). FSDP, over the data-parallel
    # ranks (across nodes): each micro-batch gathers every layer forward and again backward (once with
    # reshard_after_forward off), gradients are reduce-scattered in fp32 once a step (or every micro-batch), HSDP's
    # replicas all-reduce them. Tensor parallelism (inside a node): 2 all-gathers and 2 reduce-scatters of a layer's
    # activations forward and the same backward, and again the forward's for each recomputed layer (its all-gathers
    # only under selective checkpointing, which keeps the reduce-scatters' outputs).
    micro, fsdp_comm, tp_comm = grad_accum_steps(cfg, gpus), 0.0, 0.0
    if fsdp and shard > 1:
        sharded, ring = params / tp, (shard - 1) / shard
        syncs = micro if sc.fsdp_sync_every_micro_batch else 1
        fsdp_comm = (micro * (2 if sc.reshard_after_forward else 1) * sharded * unit + syncs * sharded * 4) * ring
        if (replicas := gpus // tp // shard) > 1:
            fsdp_comm += 2 * sharded / shard * 4 * (replicas - 1) / replicas
    if tp > 1:
        again = checkpointed * (2 if m.checkpoint_ops == "matmuls" else 4) if m.gradient_checkpointing else 0
        tp_comm = micro * (8 * L + again) * b * s * dh * unit * (tp - 1) / tp

    tokens_per_step = global_batch_size(cfg) * d.seq_len
    steps = t.max_steps
    if t.max_tokens:
        steps = min(steps, -(-t.max_tokens // tokens_per_step))
    tokens = steps * tokens_per_step
    fpt = model_info(model, d.seq_len, adapters=trainable if m.lora else 0).flops_per_token
    tps = tokens_per_s_per_gpu or mfu * peak_tflops * 1e12 / fpt
    hours = tokens / (tps * gpus) / 3600
    checkpoint = trainable * (4 + 8)  # (DCP spreads a replicated tensor's writes over the ranks, FSDP's are shards)
    return Plan(params, trainable, weights / (shard * tp) / GB, grads / (grads_shard * tp) / GB,
                optimizer / (shard * tp) / GB, gathered / GB, activations / GB, act_full / GB, act_ckpt / GB,
                (total - allocated) / GB, total / GB, tokens_per_step, steps, tokens, fpt, tps, hours, hours * gpus,
                gpus, checkpoint / GB, checkpoint / GB / -(-gpus // gpus_per_node) / write_gb_s,
                None if gpu_mem_gb is None else total / GB <= gpu_mem_gb, fsdp_comm / GB, tp_comm / GB)


def describe(p: Plan, cfg: Config, gpu_mem_gb: float | None, write_gb_s: float = 1.0) -> str:
    m = cfg.model
    kind = "QLoRA" if m.quantize else "LoRA" if m.lora else "full"
    sc = cfg.scaling
    fsdp = ""
    tp = sc.tensor_parallel
    if sc.strategy == "fsdp":
        fsdp = f", FSDP2 sharded over {sc.fsdp_shard_size or p.gpus // tp} GPUs"
        fsdp += f", replicated {p.gpus // sc.fsdp_shard_size}x" if sc.fsdp_shard_size else ""
        fsdp += f" x tensor parallel {tp}" if tp > 1 else ""
    ckpt = "gradient checkpointing" + (f" every {m.checkpoint_every_layers} layers" if m.checkpoint_every_layers > 1
                                       else "") + (" keeping matmul outputs" if m.checkpoint_ops == "matmuls" else "")
    lines = [
        f"model: {p.params / 1e9:.3f} B parameters, {p.trainable / 1e6:,.2f} M trainable ({kind}{fsdp})",
        f"memory per GPU: weights {p.weights_gb:.2f} GB + gradients {p.grads_gb:.2f} GB + AdamW {p.optimizer_gb:.2f} GB"
        + (f" + gathered by FSDP {p.gathered_gb:.2f} GB" if sc.strategy == "fsdp" else "") +
        f" + activations {p.activations_gb:.2f} GB (micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len}; "
        f"{p.activations_ckpt_gb:.2f} GB with {ckpt}, {p.activations_no_ckpt_gb:.2f} GB without)"
        f" + allocator slack, CUDA context and NCCL {p.runtime_gb:.2f} GB = {p.total_gb:.2f} GB",
        f"batch: {p.tokens_per_step:,} tokens per optimizer step ({global_batch_size(cfg)} sequences, "
        f"{grad_accum_steps(cfg, p.gpus)} accumulation steps on {p.gpus} workers)",
        f"budget: {p.steps:,} steps = {p.tokens / 1e9:.3f} B tokens" + mixture(cfg, p.tokens),
        f"speed: {p.tokens_per_s_per_gpu:,.0f} tokens/s per GPU ({p.flops_per_token / 1e9:.2f} GFLOPs/token) -> "
        f"{p.hours:.1f} h on {p.gpus} GPUs = {p.gpu_hours:,.0f} GPU-hours",
    ]
    if sc.strategy == "fsdp":
        lines.append(f"communication per step per GPU (bytes sent): FSDP {p.fsdp_comm_gb:,.1f} GB over its shard group"
                     f" of {sc.fsdp_shard_size or p.gpus // tp}" + (f", tensor parallel {p.tp_comm_gb:,.1f} GB inside "
                                                                    f"its group of {tp} (a node)" if tp > 1 else ""))
    lines.append(f"checkpoint: {p.checkpoint_gb:,.2f} GB, ~{p.checkpoint_s:,.1f} s to write at {write_gb_s:g} GB/s "
                 f"per node (--write-gb-s; a run logs its own as checkpoint_write_s): "
                 + fits_notices(p.checkpoint_s, cfg.train.checkpoint_every))
    if p.fits is not None:
        lines.append(f"fits in {gpu_mem_gb:g} GB: yes" if p.fits else
                     f"DOES NOT FIT in {gpu_mem_gb:g} GB per GPU ({p.total_gb:.1f} GB needed): try "
                     "model.gradient_checkpointing, a smaller train.micro_batch_size, scaling.strategy fsdp (with "
                     "scaling.fsdp_sync_every_micro_batch under accumulation), or LoRA/QLoRA")
    return "\n".join(lines)


def mixture(cfg: Config, tokens: int) -> str:
    """A mixture's training tokens per source for the budget (each stretch of blocks holds the sources by weight)."""
    if not cfg.data.sources:
        return ""
    total = sum(src.weight for src in cfg.data.sources)
    return ", of which " + ", ".join(f"{src.name} {src.weight / total:.1%} = {tokens * src.weight / total:,.0f} tokens"
                                     for src in cfg.data.sources)


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gpus", type=int, help="GPUs (default: scaling.num_workers, the most of an elastic range)")
    ap.add_argument("--gpu-mem", type=float, help="GB of memory per GPU, to check the fit")
    ap.add_argument("--vocab-size", type=int,
                    help="tokenizer size for a scratch model (default: tokenizer.path's, else tokenizer.vocab_size)")
    ap.add_argument("--tokens-per-s-per-gpu", type=float, help="measured throughput (metrics.jsonl tokens_per_s / GPUs)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU when no throughput is given (default 0.4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 TFLOP/s per GPU (default H100: 989)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, which share its write speed (default 8)")
    ap.add_argument("--write-gb-s", type=float, default=1.0,
                    help="GB/s one node writes a checkpoint to the run's storage (default 1, assumed; measure it: "
                    "bench/checkpoint.py, or a run's checkpoint_write_s)")


@command(__doc__, "raypt.plan", _arguments, config=True)
def main(a) -> int:
    p = plan(a.cfg, gpus=a.gpus, gpu_mem_gb=a.gpu_mem, vocab_size=a.vocab_size,
             tokens_per_s_per_gpu=a.tokens_per_s_per_gpu, mfu=a.mfu, peak_tflops=a.peak_tflops,
             gpus_per_node=a.gpus_per_node, write_gb_s=a.write_gb_s)
    print(describe(p, a.cfg, a.gpu_mem, a.write_gb_s))
    return 0 if p.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
