"""Models: a Llama from scratch, a pretrained causal LM, LoRA and 4-bit QLoRA on top; FLOPs per token."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from raypt.settings import ModelConfig
from raypt.errors import UserError
from raypt.storage import is_uri, node_copy_of

log = logging.getLogger("raypt")

# Scratch architectures; model.* keys override any field. Parameter counts (`python -m raypt.plan`) with a 128,256-token
# vocabulary (Llama 3's; a scratch model's comes from its tokenizer unless model.vocab_size says otherwise).
PRESETS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    "small": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                  num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=True),
    # The classic example's LlamaConfig: 12 layers, hidden 1024, intermediate 4096, 8 KV heads; 0.19 B parameters
    # without embeddings (0.21 B with a 8k vocabulary, 0.45 B with 128k).
    "llama-12x1024": dict(num_hidden_layers=12, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                          num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
    # Llama-3.2-1B's shape: 1,235,814,400 parameters with its vocabulary.
    "llama3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                        num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    # Llama-3-8B's shape: 8,030,261,248 parameters with its vocabulary.
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
    # Llama-3-70B's shape: 70,553,706,496 parameters with its vocabulary.
    "llama3-70b": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
}
RENAMED = {"llama-1b": "llama-12x1024 (the same 12 x 1024 shape: 0.2 B parameters; llama3.2-1b is a 1 B-class one)"}
OVERRIDABLE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "rope_theta", "tie_word_embeddings")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(UserError):
    """A model setting that cannot work; the message names the key and the fix."""


@dataclass
class ModelInfo:
    total_params: int
    trainable_params: int
    flops_per_token: float
    """Training FLOPs per token (`training_flops`): 6 per trained matmul weight, 4 per frozen one, plus attention."""


def scratch_config(cfg: ModelConfig, vocab_size: int, seq_len: int, tokenizer=None):
    from transformers import LlamaConfig

    if cfg.preset in RENAMED:
        raise ModelError(f"model.preset {cfg.preset!r} is now called {RENAMED[cfg.preset]}")
    if cfg.preset not in PRESETS:
        raise ModelError(f"model.preset {cfg.preset!r} is not one of {', '.join(PRESETS)}")
    if cfg.vocab_size is not None:
        if cfg.vocab_size < vocab_size:
            raise ModelError(f"model.vocab_size {cfg.vocab_size} is below the tokenizer's {vocab_size} tokens; raise "
                             "it or leave it out (null: the tokenizer's size)")
        vocab_size = cfg.vocab_size
    arch = dict(PRESETS[cfg.preset])
    arch.update({k: getattr(cfg, k) for k in OVERRIDABLE if getattr(cfg, k) is not None})
    if arch["hidden_size"] % arch["num_attention_heads"] or arch["num_attention_heads"] % arch["num_key_value_heads"]:
        raise ModelError(
            f"hidden_size {arch['hidden_size']}, num_attention_heads {arch['num_attention_heads']} and "
            f"num_key_value_heads {arch['num_key_value_heads']} must divide each other in that order"
        )
    specials = {}
    if tokenizer is not None:
        specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(seq_len, 2048), **arch, **specials)


def local_model_dir(name_or_path: str, config_only: bool = False) -> str:
    """A local directory holding the model: `name_or_path` itself, or a node-wide cached copy of an s3://, gs://
    URI (downloaded once per node; concurrent workers wait on a file lock). `config_only`: of a URI, its config.json
    and generation_config.json (and any code beside them) alone, not its weights."""
    if not is_uri(name_or_path):
        if not Path(name_or_path).is_dir():
            raise ModelError(f"model.name_or_path {name_or_path!r} is not a directory; give a saved model's directory")
        return name_or_path
    def pick(names: list[str]) -> list[str]:
        if not names:
            raise ModelError(f"model.name_or_path {name_or_path!r} holds no files; give a saved model's directory")
        if config_only:
            if "config.json" not in names:
                raise ModelError(f"model.name_or_path {name_or_path!r} has no config.json; give a saved model's "
                                 "directory")
            return [n for n in names if n in ("config.json", "generation_config.json") or n.endswith(".py")]
        return read_by_from_pretrained(names)

    return str(node_copy_of(name_or_path, "models", pick))


def read_by_from_pretrained(names: list[str]) -> list[str]:
    """Of a model directory's files, those `from_pretrained` reads: of the weights only the safetensors where there
    are any (not also their `.bin` / `.pth` twins); the top level alone is listed (not a snapshot's `original/`
    consolidated checkpoint, 16 GB for Llama-3-8B)."""
    if any(n.endswith(".safetensors") for n in names):
        return [n for n in names if not n.endswith((".bin", ".pth", ".pt", ".h5", ".msgpack", ".ckpt"))]
    return names


def _check_positions(config, seq_len: int) -> None:
    max_pos = getattr(config, "max_position_embeddings", None) or seq_len
    if seq_len > max_pos:
        raise ModelError(
            f"data.seq_len {seq_len} is above the model's max_position_embeddings {max_pos}; lower data.seq_len"
        )


def check_model(cfg: ModelConfig, seq_len: int, tensor_parallel: int = 1, tokenizer=None) -> None:
    """Refuse in the driver, before any worker starts, what `build_model` would refuse on every worker: a missing
    local model directory, a seq_len above a pretrained model's positions (its config.json is all that is read), a
    model that does not split over `tensor_parallel` ranks (a scratch model's vocabulary: the `tokenizer`'s)."""
    from raypt.tensor_parallel import check

    if not cfg.name_or_path:
        if tensor_parallel > 1:
            check(scratch_config(cfg, len(tokenizer), seq_len), tensor_parallel)
        return
    if is_uri(cfg.name_or_path) and tensor_parallel == 1:
        return
    from transformers import AutoConfig

    path = local_model_dir(cfg.name_or_path, config_only=is_uri(cfg.name_or_path))
    hf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    _check_positions(hf, seq_len)
    check(hf, tensor_parallel, scratch=False)


def build_model(cfg: ModelConfig, *, vocab_size: int, seq_len: int, device: torch.device, tokenizer=None,
                seed: int = 0, shard=None, rank: int = 0, weights: bool = True):
    """The model to train, on `device` (QLoRA: loaded there directly), and its `ModelInfo`.

    With `shard` (FSDP: a function that shards a model in place, `raypt.parallel.fsdp_sharder`) no rank holds a full
    replica: the model is built on the meta device, sharded, and only then materialized. A scratch model gets
    `init_weights` shard by shard; a pretrained one is read by rank 0 alone (one copy in the cluster's host RAM) and
    broadcast, each rank keeping its shards. `weights=False`: a checkpoint of this run will fill every weight, so
    none is read or drawn (only the non-persistent buffers are made); a LoRA model still reads its frozen base,
    which its checkpoints do not hold."""
    torch.manual_seed(seed)  # identical LoRA init on every worker and every run
    weights = weights or bool(cfg.lora)
    if cfg.trust_remote_code and cfg.name_or_path:
        log.warning("WARNING: model.trust_remote_code is on: code inside %s runs on every worker", cfg.name_or_path)
    if cfg.quantize:
        model = _load_pretrained(cfg, device, quantized=True)
    elif cfg.name_or_path is not None and shard is None and weights:
        model = _load_pretrained(cfg, device)
    else:
        with torch.device("meta"):  # a skeleton: no memory, no init work
            model = _skeleton(cfg, vocab_size, seq_len, tokenizer)
        if not weights and (other := unbuildable_buffers(model)):
            if rank == 0:
                log.warning("reading the base model although the checkpoint holds every weight: its buffers %s are "
                            "made only as it loads", ", ".join(other[:3]))
            weights = True
            if shard is None:
                model = _load_pretrained(cfg, device)
    _check_positions(model.config, seq_len)
    if cfg.loss == "chunked":
        from raypt.loss import supported, use_chunked_loss

        if supported(model):
            use_chunked_loss(model)
        elif rank == 0:
            log.warning("model.loss: chunked is not available for %s: it computes its full logits (model.loss: hf)",
                        type(model).__name__)
    if cfg.gradient_checkpointing:
        checkpoint_activations(model, cfg.checkpoint_every_layers, cfg.checkpoint_ops)
    if cfg.lora:
        model = apply_lora(model, cfg)
    for p in model.parameters():  # (on meta: no copy yet)
        if p.requires_grad and p.dtype != torch.float32:  # fp32 master weights, whatever the checkpoint's dtype
            p.data = p.data.float()
        elif p.dtype == torch.float16:  # a frozen fp16 base (saved so, dtype auto): fp16 would need loss scaling
            p.data = p.data.to(torch.bfloat16)
    if shard is not None:
        model = shard(model)
    if _on_meta(model):
        model.to_empty(device=device)
        if shard is None:  # to_empty gave each module its own tensor: tie the LM head to the embeddings again
            model.tie_weights()
        if not weights:
            init_buffers(model)
        elif cfg.name_or_path is None:
            init_weights(model, seed)
        else:
            _broadcast_pretrained(model, cfg, seed, rank)
    torch.manual_seed(seed * 1_000_003 + rank)  # the init is everyone's; dropout masks are each rank's own
    return model, model_info(model, seq_len)


def _load_pretrained(cfg: ModelConfig, device: torch.device, quantized: bool = False, as_saved: bool = False):
    """The pretrained model on `device`: placed there as it is read (on a GPU no host copy per rank); trained in full,
    in fp32 unless `as_saved` (to be copied into fp32 weights elsewhere)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if device.type == "cuda" or quantized:  # placed as it is read: no host copy per GPU rank; a 4-bit model can
        kwargs["device_map"] = {"": device}  # only be placed this way (it cannot be .to()-moved)
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
    elif not cfg.lora and not as_saved:
        kwargs["dtype"] = torch.float32  # every weight is trained: read it as its fp32 master at once
    elif cfg.dtype != "auto":
        kwargs["dtype"] = DTYPES[cfg.dtype]
    return AutoModelForCausalLM.from_pretrained(local_model_dir(cfg.name_or_path), **kwargs)  # (CPU: the default)


def _skeleton(cfg: ModelConfig, vocab_size: int, seq_len: int, tokenizer):
    """The model's modules without weights (call under `torch.device("meta")`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if cfg.name_or_path is None:
        model = LlamaForCausalLM(scratch_config(cfg, vocab_size, seq_len, tokenizer))
        model.config._attn_implementation = cfg.attn_implementation
        return model
    from transformers import GenerationConfig

    where = Path(local_model_dir(cfg.name_or_path, config_only=True))
    hf = AutoConfig.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
    dtype = (DTYPES.get(cfg.dtype) or getattr(hf, "dtype", None) or torch.float32) if cfg.lora else torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, torch.float32)
    model = AutoModelForCausalLM.from_config(hf, attn_implementation=cfg.attn_implementation, dtype=dtype,
                                             trust_remote_code=cfg.trust_remote_code)
    if (where / "generation_config.json").exists():  # (what from_pretrained would read: the export keeps it)
        model.generation_config = GenerationConfig.from_pretrained(where)
    return model


def hf_model(model):
    """The Hugging Face model itself (under peft, its base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _on_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """A scratch model's initial weights, the same whether the model is whole or sharded: every parameter is drawn
    whole from its own generator, seeded by (seed, name), as HF's Llama init does it (normal(0, initializer_range)
    for linear and embedding weights, ones for norms, zeros for biases and the padding row), and each rank keeps
    its shard of it. Also recomputes the non-persistent RoPE buffers a meta-device build leaves empty."""
    import zlib

    from torch.distributed.tensor import DTensor, distribute_tensor

    hf = hf_model(model)
    std = getattr(hf.config, "initializer_range", 0.02)
    kind = {}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            kind[id(p)] = (mod, name)
    for name, p in model.named_parameters():
        mod, attr = kind[id(p)]
        device = p.device
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if attr == "bias":
            full = torch.zeros(p.shape, dtype=p.dtype, device=device)
        elif "Norm" in type(mod).__name__:
            full = torch.ones(p.shape, dtype=p.dtype, device=device)
        else:
            full = torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0.0, std, generator=g)
            pad = getattr(mod, "padding_idx", None)
            if isinstance(mod, torch.nn.Embedding) and pad is not None:
                full[pad] = 0
        if isinstance(p, DTensor):  # keep this rank's slice; every rank drew the same full tensor
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(full)
    init_buffers(model)


ROPE_BUFFERS = {"inv_freq", "original_inv_freq"}


def init_buffers(model) -> None:
    """The non-persistent buffers a meta-device build leaves empty (no state dict holds them): RoPE's inverse
    frequencies, which transformers' `_init_weights` recomputes; `unbuildable_buffers` names any others."""
    hf = hf_model(model)
    for mod in hf.modules():
        if _rope(mod, mod._non_persistent_buffers_set):
            hf._init_weights(mod)


def unbuildable_buffers(model) -> list[str]:
    """Non-persistent buffers `init_buffers` cannot remake (Gemma's embed_scale, a remote-code RoPE): a model that
    has them must be read from its files."""
    return [f"{name}.{b}" if name else b for name, mod in hf_model(model).named_modules()
            if (names := mod._non_persistent_buffers_set) and not _rope(mod, names) for b in sorted(names)]


def _rope(mod, names) -> bool:
    return ("RotaryEmbedding" in type(mod).__name__ and hasattr(mod, "original_inv_freq")
            and set(names) <= ROPE_BUFFERS)


def _broadcast_pretrained(model, cfg: ModelConfig, seed: int, rank: int) -> None:
    """Fill a sharded skeleton with the pretrained weights: rank 0 reads them (and makes the LoRA init), every rank
    keeps its shards of what rank 0 broadcasts, tensor by tensor."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full, buffers = {}, dict(model.named_buffers())
    if rank == 0:
        torch.manual_seed(seed)
        whole = _load_pretrained(cfg, torch.device("cpu"), as_saved=True)  # (a bf16 8B base: 16 GB, not 32, here)
        if cfg.lora:
            whole = apply_lora(whole, cfg)
        full = whole.state_dict()
        for name, b in whole.named_buffers():  # non-persistent buffers (RoPE) are not in the state dict
            buffers[name].copy_(b)
        del whole
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for b in buffers.values():
        dist.broadcast(b, src=0)


def checkpoint_activations(model, every: int = 1, ops: str = "none") -> None:
    """Recompute decoder layers' activations in backward (non-reentrant `torch.utils.checkpoint`), through
    transformers' `activation_checkpointing_enable` (5.23+) or its earlier name: every `every`-th layer (the first,
    the (every+1)-th, ...; the others keep their activations), each keeping only its input (`ops` "none") or also
    what its matrix multiplications and attention return ("matmuls": selective activation checkpointing, torch's
    `create_selective_checkpoint_contexts`; the element-wise ops, norms and activations are recomputed)."""
    import functools
    import inspect

    kwargs = {"use_reentrant": False}
    if ops == "matmuls":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # (transformers before 5.23)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
        every = 1
    else:
        enable(activation_checkpointing_kwargs=kwargs)
    if every > 1:
        from raypt.parallel import decoder_layers

        for i, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = i % every == 0
    model.config.use_cache = False


def _saved_ops() -> set:
    """The ops whose outputs selective activation checkpointing keeps: matrix multiplications, attention (each SDPA
    kernel's, and the flash-attn package's when it is installed; a kernel from the Hugging Face hub is recomputed),
    and tensor parallelism's reduce-scatters (communication is not done twice)."""
    aten, names = torch.ops.aten, ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                   "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           *(getattr(aten, n).default for n in names if hasattr(aten, n))}
    try:
        if importlib.util.find_spec("flash_attn") is not None:
            importlib.import_module("flash_attn")  # (which registers its ops)
    except Exception:  # noqa: BLE001 (a build that does not load here: transformers cannot use it either)
        pass
    ops.update(getattr(torch.ops.flash_attn, n).default for n in ("_flash_attn_forward", "_flash_attn_varlen_forward")
               if hasattr(torch.ops.flash_attn, n))
    if hasattr(torch.ops, "_c10d_functional"):
        ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return ops


def _save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


SAVED_OPS = _saved_ops()


def apply_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # (build_model did)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora_target_modules if m not in present]
    if missing:
        raise ModelError(f"model.lora_target_modules {missing} are not modules of this model")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def model_info(model, seq_len: int, adapters: int = 0) -> ModelInfo:
    """Parameter counts and training FLOPs per token of `model` (whose LoRA adapters, if any, are its only trained
    weights; `adapters`: those of a model that does not hold them yet, as `raypt.plan` builds it)."""
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c = model.config
    embed = c.vocab_size * c.hidden_size
    matmul = total - embed * (1 if getattr(c, "tie_word_embeddings", False) else 2) + embed  # + the LM head
    trained = adapters or (matmul if trainable == total else trainable)
    flops = training_flops(matmul + adapters, trained, c.num_hidden_layers, c.hidden_size, seq_len)
    return ModelInfo(total, trainable, flops)


def training_flops(matmul: int, trained: int, layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per token of a training step: 6 per trained matmul weight (forward, input and weight gradients),
    4 per frozen one (no weight gradient: LoRA's base, whose activations still carry gradients down to the lowest
    adapter), and attention's scores and weighted sum, forward and backward (PaLM appendix B). Recomputation under
    activation checkpointing is not model FLOPs."""
    return 6 * trained + 4 * (matmul - trained) + 12 * layers * hidden * seq_len


def _numel(p) -> int:
    """Parameters as the model has them (a 4-bit weight packs two values per byte)."""
    quant = getattr(p, "quant_state", None)
    return int(torch.Size(quant.shape).numel()) if quant is not None else p.numel()


def unwrap(model):
    """The model inside DDP/FSDP wrappers."""
    return model.module if hasattr(model, "module") else model
