"""The planner against numbers computed by hand for a tiny Llama, and on the shipped recipes."""

from pathlib import Path

import pytest

from raypt.config import load_config
from raypt.plan import GB, main, plan

ROOT = Path(__file__).parent.parent
TINY = ["data.train_paths=[x]", "data.seq_len=8", "model.preset=tiny", "model.hidden_size=16",
        "model.intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=4",
        "model.num_key_value_heads=2", "model.tie_word_embeddings=true", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.max_steps=10", "scaling.num_workers=2"]


def test_tiny_model_by_hand():
    p = plan(load_config(None, TINY), vocab_size=100, tokens_per_s_per_gpu=1000, gpu_mem_gb=1.01)
    # embeddings 100x16; per layer q 16x16, k and v 16x8 (2 KV heads of 4), o 16x16, gate/up/down 16x32, 2 norms;
    # final norm; tied LM head
    per_layer = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16
    assert p.params == p.trainable == 1600 + 2 * per_layer + 16 == 6288
    assert p.weights_gb * GB == pytest.approx(6288 * 4)  # fp32 from scratch
    assert p.grads_gb * GB == pytest.approx(6288 * 4)
    assert p.optimizer_gb * GB == pytest.approx(6288 * 8)
    # DDP's autocast: b x s x (30d + 4kv + 8I + 4h + 8) bytes, and a bf16 copy of the layer's matmul weights
    layer_act = 2 * 8 * (30 * 16 + 4 * 8 + 8 * 32 + 4 * 4 + 8) + 2 * (256 + 128 + 128 + 256 + 3 * 512)
    # the chunked loss: one chunk of fp32 logits and their bf16 gradient (all 14 predicted positions fit one), the
    # hidden states' fp32 gradient, the tied head's fp32 gradient
    logits = 14 * 100 * (4 + 2) + 2 * 8 * 16 * 4 + 100 * 16 * 4
    assert p.activations_no_ckpt_gb * GB == pytest.approx(2 * layer_act + logits)
    assert p.activations_ckpt_gb * GB == pytest.approx(2 * 2 * 8 * 16 * 4 + layer_act + logits)  # fp32 layer inputs
    assert p.total_gb * GB == pytest.approx((6288 * 16 + 2 * layer_act + logits) * 1.05 + GB)  # slack, CUDA, NCCL
    assert p.tokens_per_step == 32 and p.steps == 10 and p.tokens == 320
    assert p.flops_per_token == 6 * 6288 + 12 * 2 * 16 * 8
    assert p.hours == pytest.approx(320 / 2000 / 3600) and p.gpu_hours == pytest.approx(2 * p.hours)
    assert p.fits
    assert p.checkpoint_gb * GB == 6288 * 12 and p.checkpoint_s == pytest.approx(6288 * 12 / GB)  # one node, 1 GB/s


def test_fsdp_shards_weights_gradients_and_optimizer_state():
    full = plan(load_config(None, TINY), vocab_size=100, tokens_per_s_per_gpu=1)
    fsdp = plan(load_config(None, TINY + ["scaling.use_gpu=true", "scaling.strategy=fsdp"]), vocab_size=100,
                tokens_per_s_per_gpu=1)
    assert fsdp.weights_gb == pytest.approx(full.weights_gb / 2) and fsdp.optimizer_gb == pytest.approx(full.optimizer_gb / 2)
    assert fsdp.grads_gb == pytest.approx(full.grads_gb / 2)  # no accumulation: reduce-scattered every step
    # gathered at a time: the root (embeddings 100x16, final norm) and two layers in bf16, one layer's bf16 gradient
    # and the fp32 reduce-scatter input it is copied into
    per_layer = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16
    assert fsdp.gathered_gb * GB == pytest.approx((1616 + 2 * per_layer) * 2 + per_layer * (2 + 4))
    assert fsdp.total_gb * GB == pytest.approx(((full.weights_gb + full.grads_gb + full.optimizer_gb) / 2 * GB
                                                + fsdp.gathered_gb * GB + fsdp.activations_gb * GB) * 1.05 + GB)
    # accumulating 2 micro-batches without reduce-scattering in between keeps a full gradient on every GPU
    accum = TINY + ["scaling.strategy=fsdp", "train.global_batch_size=8"]
    assert plan(load_config(None, accum), vocab_size=100).grads_gb == pytest.approx(full.grads_gb)
    synced = plan(load_config(None, accum + ["scaling.fsdp_sync_every_micro_batch=true"]), vocab_size=100)
    assert synced.grads_gb == pytest.approx(full.grads_gb / 2)
    kept = plan(load_config(None, TINY + ["scaling.strategy=fsdp", "scaling.reshard_after_forward=false"]),
                vocab_size=100)
    assert kept.gathered_gb * GB == pytest.approx(6288 * 2 + per_layer * 6)  # every parameter stays gathered


def test_recipes_plan_and_a_misfit_is_flagged(capsys):
    qlora = load_config(ROOT / "configs" / "llama3-8b-qlora-cpt.yaml")
    p = plan(qlora, gpu_mem_gb=80)
    assert 8.0e9 < p.params < 8.1e9
    assert p.trainable == 32 * 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # r=8 on 7 modules
    assert 7 < p.weights_gb < 8 and p.fits  # a 4-bit base (3.5 GB) and fp32 embeddings and head (peft upcasts them)
    full = load_config(ROOT / "configs" / "llama3-8b-full-fsdp.yaml", ["scaling.strategy=ddp"])
    assert main(["--config", str(ROOT / "configs" / "llama3-8b-full-fsdp.yaml"), "--set", "scaling.strategy=ddp",
                 "--gpu-mem", "80"]) == 1
    assert "DOES NOT FIT in 80 GB" in capsys.readouterr().out
    assert not plan(full, gpu_mem_gb=80).fits


@pytest.mark.parametrize("preset, params", [("llama3.2-1b", 1_235_814_400), ("llama3-8b", 8_030_261_248),
                                            ("llama-12x1024", 12 * (2 * 1024 * 1024 + 2 * 512 * 1024 + 3 * 1024 * 4096
                                                                     + 2 * 1024) + 1024 + 2 * 128256 * 1024)])
def test_presets_are_the_shapes_they_name(preset, params, capsys):
    """Built on the meta device with Llama 3's vocabulary: Llama-3.2-1B's and Llama-3-8B's published parameter
    counts; the classic example's 12 x 1024 shape counted by hand."""
    sets = ["data.train_paths=[x]", f"model.preset={preset}", "model.vocab_size=128256"]
    assert plan(load_config(None, sets)).params == params
    assert main([a for s in sets for a in ("--set", s)]) == 0
    assert f"model: {params / 1e9:.3f} B parameters" in capsys.readouterr().out


def test_a_renamed_preset_and_a_vocabulary_below_the_tokenizers_are_clear_errors():
    from raypt.config import ConfigError
    from raypt.model import ModelError, scratch_config

    with pytest.raises(ModelError, match="is now called llama-12x1024"):
        scratch_config(load_config(None, ["data.train_paths=[x]", "model.preset=llama-1b"]).model, 100, 8)
    with pytest.raises(ModelError, match="model.vocab_size 64 is below the tokenizer's 100 tokens"):
        scratch_config(load_config(None, ["data.train_paths=[x]", "model.vocab_size=64"]).model, 100, 8)
    with pytest.raises(ConfigError, match="a pretrained model keeps its own"):
        load_config(None, ["data.train_paths=[x]", "model.vocab_size=64", "model.name_or_path=/m"])


def test_a_mixture_plan_gives_the_tokens_of_each_source(capsys):
    assert main(["--config", str(ROOT / "configs" / "cpt-mixture.yaml"), "--set", "model.name_or_path=null",
                 "--vocab-size", "2048"]) == 0  # (its base model is made by raypt.demo: planned as a scratch one)
    assert ("200 steps = 0.000 B tokens, of which cnews 70.0% = 286,720 tokens, general 30.0% = 122,880 tokens"
            in capsys.readouterr().out)


def saved_by_one_layer(mode: str, lora_r: int, b: int = 2, s: int = 64) -> int:
    """Bytes one more decoder layer saves for backward (`raypt.plan.saved_for_backward`), for a micro-batch of b x s
    tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypt.plan import saved_for_backward

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=320,
                                             num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                                             attn_implementation="sdpa"))
        if lora_r:
            model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.05, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).get_base_model()
        if mode == "bf16":  # FSDP2's MixedPrecisionPolicy: the layers compute with bf16 weights
            model.to(torch.bfloat16)

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                model.model(input_ids=torch.randint(0, 64, (b, s)), use_cache=False)

        return saved_for_backward(model, forward)

    return saved(3) - saved(2)


@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["bf16", "autocast", "fp32"])
def test_a_layers_activations_are_what_it_saves_for_backward(mode, lora_r):
    """The planner's bytes per decoder layer equal, to the byte, what transformers' Llama layer saves for backward
    on CPU, in each compute mode, with and without LoRA, for a shape the coefficients were not read from."""
    import torch
    from transformers import LlamaConfig

    from raypt.plan import layer_activation_bytes

    hf = LlamaConfig(hidden_size=96, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2)
    planned = 2 * 64 * layer_activation_bytes(hf, mode, lora_r)
    if mode == "autocast":  # its bf16 weight copies, the adapters' included
        planned += 2 * (96 * 96 * 2 + 96 * 32 * 2 + 3 * 96 * 320)
        planned += 2 * lora_r * ((96 + 96) * 2 + (96 + 32) * 2 + 3 * (96 + 320))
    assert saved_by_one_layer(mode, lora_r) == planned


def measured_peak(cfg, vocab: int, rows: int, precision: str) -> int:
    """Peak memory above the parameters of a training forward and backward of the config's model on CPU, on `rows`
    random blocks (torch's MemTracker follows every tensor)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from raypt.model import build_model

    torch.manual_seed(0)
    model, _ = build_model(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, device=torch.device("cpu"))
    model.train()
    x = torch.randint(0, vocab, (rows, cfg.data.seq_len))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            value = model(input_ids=x, labels=x, use_cache=False).loss
        value.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return peak - sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32"])
@pytest.mark.parametrize("loss", ["hf", "chunked"])
def test_activations_and_loss_are_the_measured_peak(loss, precision):
    """A forward and backward of a 2-layer model with a 32k vocabulary (where the loss dominates) on CPU, DDP's
    autocast or fp32: the peak memory above the parameters (torch's MemTracker follows every tensor) is the plan's
    activations and loss within 10%."""
    cfg = load_config(None, ["data.train_paths=[x]", "data.seq_len=512", "model.preset=tiny", "model.hidden_size=64",
                             "model.intermediate_size=128", "model.num_hidden_layers=2", "model.num_attention_heads=4",
                             "model.num_key_value_heads=2", "model.tie_word_embeddings=false",
                             "train.micro_batch_size=2", "train.global_batch_size=2", f"model.loss={loss}",
                             f"train.precision={precision}", "scaling.num_workers=1"])
    planned = plan(cfg, vocab_size=32000, tokens_per_s_per_gpu=1).activations_no_ckpt_gb * GB
    measured = measured_peak(cfg, 32000, 2, precision)
    print(f"{loss} {precision}: measured {measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB")
    assert planned == pytest.approx(measured, rel=0.1)


@pytest.mark.parametrize("choice, precision", [([], "bf16-mixed"), (["model.checkpoint_every_layers=2"], "fp32"),
                                               (["model.checkpoint_ops=matmuls"], "bf16-mixed")],
                         ids=["every-layer", "every-2nd", "matmuls"])
def test_checkpointed_activations_are_the_measured_peak(choice, precision):
    """Gradient checkpointing of every layer, of every 2nd one, and selective (the matmuls' outputs kept): a forward
    and backward of a 4-layer model on CPU (DDP's autocast or fp32), whose peak memory above the parameters (torch's
    MemTracker) the plan's activations bound from above, by at most 30%: the plan adds the loss's peak and a layer
    recomputed in backward, which do not coexist (the loss's logits are gone before backward reaches a layer)."""
    cfg = load_config(None, ["data.train_paths=[x]", "data.seq_len=512", "model.preset=tiny", "model.hidden_size=128",
                             "model.intermediate_size=256", "model.num_hidden_layers=4", "model.num_attention_heads=4",
                             "model.num_key_value_heads=2", "model.tie_word_embeddings=false",
                             "model.gradient_checkpointing=true", *choice, "train.micro_batch_size=4",
                             "train.global_batch_size=4", f"train.precision={precision}", "scaling.num_workers=1"])
    planned = plan(cfg, vocab_size=512, tokens_per_s_per_gpu=1).activations_gb * GB
    measured = measured_peak(cfg, 512, 4, precision)
    print(f"{choice} {precision}: measured {measured / 2**20:.2f} MiB, planned {planned / 2**20:.2f} MiB")
    assert measured <= planned <= 1.3 * measured


def test_tensor_parallel_splits_the_state_the_layers_and_the_loss():
    """FSDP 2 x TP 2 on 4 GPUs against FSDP over 4: the same weights, gradients and AdamW state per GPU (1/4 each),
    half what FSDP gathers (a rank gathers its tensor-parallel slices); each layer's activations split along the
    sequence but for the two inputs its column-parallel matmuls gather whole; the loss over half the vocabulary;
    and the bytes each collective moves, by hand."""
    base = TINY + ["scaling.use_gpu=true", "scaling.strategy=fsdp", "scaling.num_workers=4",
                   "train.global_batch_size=8", "scaling.fsdp_sync_every_micro_batch=true"]
    fsdp = plan(load_config(None, base), vocab_size=100, tokens_per_s_per_gpu=1)
    tp = plan(load_config(None, base + ["scaling.tensor_parallel=2"]), vocab_size=100, tokens_per_s_per_gpu=1)
    for field in ("weights_gb", "grads_gb", "optimizer_gb"):
        assert getattr(tp, field) == pytest.approx(getattr(fsdp, field)), field
    assert tp.gathered_gb == pytest.approx(fsdp.gathered_gb / 2)
    # bf16 (FSDP2): b x s x (20d + 4kv + 8I + 4h + 8) a layer, 2 x 8 x 632; the two gathered inputs 2 x (2 x 8 x 16 x 2)
    layer = (2 * 8 * 632 - 1024) / 2 + 1024
    # the loss: 14 positions x 50 of the vocabulary (fp32 logits and their bf16 gradient), the whole hidden states'
    # fp32 gradient, half the tied head's fp32 gradient
    loss = 14 * 50 * 6 + 2 * 8 * 16 * 4 + 50 * 16 * 4
    assert tp.activations_gb * GB == pytest.approx(2 * layer + loss)
    # 2 micro-batches a step per data-parallel rank; tensor parallel: 8 collectives a layer of 2 x 8 x 16 bf16, half
    # of each sent; FSDP over 2: half the model per rank, gathered twice a micro-batch in bf16 and reduce-scattered
    # in fp32 every micro-batch, half of each sent
    assert tp.tp_comm_gb * GB == pytest.approx(2 * 8 * 2 * (2 * 8 * 16 * 2) / 2)
    assert tp.fsdp_comm_gb * GB == pytest.approx((2 * 2 * 3144 * 2 + 2 * 3144 * 4) / 2)
    assert fsdp.tp_comm_gb == 0


def test_the_70b_recipe_fits_80_gb_and_moves_less_across_nodes_than_fsdp_alone(capsys):
    """configs/llama3-70b-fsdp-tp.yaml (FSDP 8 x TP 8 on 64 GPUs, seq 8192): fits 80 GB; FSDP alone needs a smaller
    micro-batch to fit and sends several times the bytes a step across nodes."""
    path = str(ROOT / "configs" / "llama3-70b-fsdp-tp.yaml")
    tp = plan(load_config(path), gpu_mem_gb=80)
    assert 70.5e9 < tp.params < 70.6e9 and tp.fits and tp.tp_comm_gb > 0
    alone = plan(load_config(path, ["scaling.tensor_parallel=1", "train.micro_batch_size=2"]), gpu_mem_gb=80)
    assert alone.fsdp_comm_gb > 3 * tp.fsdp_comm_gb
    assert not plan(load_config(path, ["scaling.tensor_parallel=1", "train.micro_batch_size=2",
                                       "model.gradient_checkpointing=false"]), gpu_mem_gb=80).fits
    assert main(["--config", path, "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel 8" in out and "fits in 80 GB: yes" in out
