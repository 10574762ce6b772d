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
    p = plan(load_config(None, TINY), vocab_size=100, tokens_per_s_per_gpu=1000, gpu_mem_gb=1)
    # embeddings 100x16; per layer q 16x16, k and v 16x8 (2 KV heads of 4), o 16x16, gate/up/down 16x32, 2 norms;
    # final norm; tied LM head
    per_layer = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16
    assert p.params == p.trainable == 1600 + 2 * per_layer + 16 == 6288
    assert p.weights_gb * GB == pytest.approx(6288 * 4)  # fp32 from scratch
    assert p.grads_gb * GB == pytest.approx(6288 * 4)
    assert p.optimizer_gb * GB == pytest.approx(6288 * 8)
    layer_act = 2 * 8 * (6 * 16 + 2 * 8 + 4 * 32) * 2  # b x s x (6d + 2kv + 4I) bf16 values
    # the chunked loss: one chunk of fp32 logits and their bf16 gradient (all 14 predicted positions fit one), the
    # hidden states' fp32 gradient, the tied head's fp32 gradient
    logits = 14 * 100 * (4 + 2) + 2 * 8 * 16 * 4 + 100 * 16 * 4
    assert p.activations_no_ckpt_gb * GB == pytest.approx(2 * layer_act + logits)
    assert p.activations_ckpt_gb * GB == pytest.approx(2 * 2 * 8 * 16 * 2 + layer_act + logits)
    assert p.total_gb * GB == pytest.approx(6288 * 16 + 2 * layer_act + logits)
    assert p.tokens_per_step == 32 and p.steps == 10 and p.tokens == 320
    assert p.flops_per_token == 6 * 6288 + 12 * 2 * 16 * 8
    assert p.hours == pytest.approx(320 / 2000 / 3600) and p.gpu_hours == pytest.approx(2 * p.hours)
    assert p.fits


def test_fsdp_shards_weights_gradients_and_optimizer_state():
    full = plan(load_config(None, TINY), vocab_size=100, tokens_per_s_per_gpu=1)
    fsdp = plan(load_config(None, TINY + ["scaling.use_gpu=true", "scaling.strategy=fsdp"]), vocab_size=100,
                tokens_per_s_per_gpu=1)
    assert fsdp.weights_gb == pytest.approx(full.weights_gb / 2) and fsdp.optimizer_gb == pytest.approx(full.optimizer_gb / 2)
    assert fsdp.grads_gb == pytest.approx(full.grads_gb / 2)  # no accumulation: reduce-scattered every step
    # gathered at a time: the root (embeddings 100x16, final norm) and two layers in bf16, one layer's fp32 gradient
    per_layer = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16
    assert fsdp.gathered_gb * GB == pytest.approx((1616 + 2 * per_layer) * 2 + per_layer * 4)
    assert fsdp.total_gb * GB == pytest.approx((full.weights_gb + full.grads_gb + full.optimizer_gb) / 2 * GB
                                               + fsdp.gathered_gb * GB + fsdp.activations_gb * GB)
    # accumulating 2 micro-batches without reduce-scattering in between keeps a full gradient on every GPU
    accum = TINY + ["scaling.strategy=fsdp", "train.global_batch_size=8"]
    assert plan(load_config(None, accum), vocab_size=100).grads_gb == pytest.approx(full.grads_gb)
    synced = plan(load_config(None, accum + ["scaling.fsdp_sync_every_micro_batch=true"]), vocab_size=100)
    assert synced.grads_gb == pytest.approx(full.grads_gb / 2)
    kept = plan(load_config(None, TINY + ["scaling.strategy=fsdp", "scaling.reshard_after_forward=false"]),
                vocab_size=100)
    assert kept.gathered_gb * GB == pytest.approx(6288 * 2 + per_layer * 4)  # every parameter stays gathered


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
