"""The training loop in one process (LocalContext): no Ray, real tiny models, real tokenizer."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypt.config import load_config
from raypt.loop import LocalContext, train
from raypt.model import build_model
from raypt.optim import lr_factor, param_groups


def blocks(tokenizer_dir, n, seq_len, seed=0):
    """Learnable blocks: a few repeated token patterns, so the loss has somewhere to go."""
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    rng = np.random.default_rng(seed)
    patterns = rng.integers(3, vocab, size=(4, seq_len))
    return patterns[rng.integers(0, 4, size=n)].astype(np.int32)


def cfg_for(tokenizer_dir, *sets):
    return load_config(None, ["data.train_paths=[unused]", f"tokenizer.path={tokenizer_dir}", "data.seq_len=32",
                              "scaling.num_workers=1", "train.global_batch_size=8", "train.micro_batch_size=4",
                              "train.max_steps=40", "train.warmup_steps=4", "train.lr=3e-3", "train.log_every=1",
                              "train.eval_every=20", "train.checkpoint_every=20", "run.report=false", *sets])


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def test_scratch_loss_decreases_and_exports(tokenizer_dir, tmp_path):
    cfg = cfg_for(tokenizer_dir)
    out = train(cfg, LocalContext(tmp_path, blocks(tokenizer_dir, 64, 32), blocks(tokenizer_dir, 16, 32, seed=0)))
    train_rows, eval_rows = metrics(tmp_path)
    assert out["step"] == 40 and len(train_rows) == 40 and len(eval_rows) == 2
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert eval_rows[-1]["eval_ppl"] == pytest.approx(math.exp(eval_rows[-1]["eval_loss"]))
    assert train_rows[-1]["tokens_seen"] == 40 * 8 * 32
    # the export is a plain HF model directory
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = model.generate(tok("the", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 1
    assert (tmp_path / "tensorboard").is_dir()
    assert not (tmp_path / "report").exists()  # (run.report: false, as cfg_for sets)
    ckpts = sorted(tmp_path.glob("checkpoint_*"))
    assert [c.name for c in ckpts] == ["checkpoint_000020", "checkpoint_000040"]
    assert (ckpts[0] / "COMPLETE").exists() and (ckpts[0] / "state" / ".metadata").exists()
    assert (ckpts[0] / "rng" / "rank_00000.pt").exists() and (ckpts[0] / "train_state.json").exists()


def test_a_finished_run_started_again_trains_no_further_step(tokenizer_dir, tmp_path):
    cfg = cfg_for(tokenizer_dir, "train.max_steps=4", "train.checkpoint_every=4", "train.sample_tokens=0")
    data = blocks(tokenizer_dir, 64, 32)
    assert train(cfg, LocalContext(tmp_path, data))["step"] == 4
    again = train(cfg, LocalContext(tmp_path, data))
    assert again["step"] == 4 and again["tokens_seen"] == 4 * 8 * 32 and again["final_loss"] is None
    assert [c.name for c in tmp_path.glob("checkpoint_*")] == ["checkpoint_000004"]
    assert max(r["step"] for r in metrics(tmp_path)[0]) == 4 and (tmp_path / "final" / "config.json").is_file()


@pytest.mark.parametrize("base", [None, "llama", "gemma"], ids=["scratch", "pretrained", "gemma"])
def test_resume_continues_at_the_right_step_and_lr(tokenizer_dir, tiny_pretrained, tmp_path, base):
    """Resumed from step 20, the run goes on as if never stopped. A full-parameter run of a pretrained Llama
    resumes without its base weights (the checkpoint holds every weight): they are gone by then. A Gemma has a
    buffer no checkpoint holds and only loading makes (embed_scale): it reads its base again."""
    import shutil

    sets = []
    if base == "llama":
        shutil.copytree(tiny_pretrained, tmp_path / "base")
        generation = json.loads((tmp_path / "base" / "generation_config.json").read_text())
        (tmp_path / "base" / "generation_config.json").write_text(json.dumps(
            generation | {"do_sample": True, "temperature": 0.6}))  # the base's own: kept without its weights
    elif base == "gemma":
        from transformers import GemmaConfig, GemmaForCausalLM

        torch.manual_seed(0)
        GemmaForCausalLM(GemmaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=16)).save_pretrained(tmp_path / "base")
    if base:
        sets = [f"model.name_or_path={tmp_path / 'base'}"]
    data = blocks(tokenizer_dir, 64, 32)
    full = tmp_path / "full"
    train(cfg_for(tokenizer_dir, *sets), LocalContext(full, data))
    part = tmp_path / "part"
    train(cfg_for(tokenizer_dir, "train.max_steps=40", *sets), LocalContext(part, data))
    # drop the last checkpoint: the re-run resumes from step 20
    shutil.rmtree(part / "checkpoint_000040")
    (part / "metrics.jsonl").unlink()
    for weights in (tmp_path / "base").glob("*.safetensors") if base == "llama" else ():
        weights.unlink()
    train(cfg_for(tokenizer_dir, *sets), LocalContext(part, data))
    resumed, _ = metrics(part)
    reference, _ = metrics(full)
    assert resumed[0]["step"] == 21
    for a, b in zip(resumed, reference[20:]):
        assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens_seen"] == b["tokens_seen"]
    if base == "llama":
        assert json.loads((part / "final" / "generation_config.json").read_text())["temperature"] == 0.6


def test_labels_are_shifted_once(tokenizer_dir):
    """labels = input_ids; the model shifts. The loss the loop trains on (model.loss: chunked, the default) must
    equal next-token cross-entropy computed by hand from the model's logits."""
    cfg = cfg_for(tokenizer_dir)
    model, _ = build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))
    x = torch.as_tensor(blocks(tokenizer_dir, 2, 32), dtype=torch.long)
    loss, logits = model(input_ids=x, labels=x).loss, model(input_ids=x).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    unshifted = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert loss.item() != pytest.approx(unshifted.item(), rel=1e-3)


def test_lora_trains_only_adapters(tokenizer_dir, tmp_path):
    base_dir = tmp_path / "base"
    cfg = cfg_for(tokenizer_dir)
    base, _ = build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))
    base.save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    run = tmp_path / "run"
    cfg = cfg_for(tokenizer_dir, f"model.name_or_path={base_dir}", "model.lora=true", "train.max_steps=10",
                  "train.lr=1e-2")
    out = train(cfg, LocalContext(run, blocks(tokenizer_dir, 32, 32)))
    assert out["step"] == 10
    adapter = AutoModelForCausalLM.from_pretrained(base_dir)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(adapter, run / "final" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    # frozen weights are untouched in the adapter model; the merged model differs exactly where LoRA applies
    for name, p in peft_model.base_model.model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p, before[key]), name
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(any(m in k for m in cfg.model.lora_target_modules) for k in changed)
    saved = checkpointed_weights(sorted(run.glob("checkpoint_*"))[-1])
    assert saved and all("lora_" in k for k in saved)  # the frozen base is not checkpointed


def checkpointed_weights(ckpt) -> list[str]:
    """The model tensors a checkpoint's DCP index lists."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt / "state")).read_metadata().state_dict_metadata
    return [k for k in keys if k.startswith("model.")]


def test_param_groups_skip_norms_biases_embeddings(tokenizer_dir):
    cfg = cfg_for(tokenizer_dir)
    model, _ = build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedules(schedule):
    f = [lr_factor(s, max_steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, decay_ratio=0.2)
         for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b - 1e-12 for a, b in zip(f[9:], f[10:]))  # then never increasing
    assert f[-1] == pytest.approx(0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 89 / 90))) if schedule == "cosine"
                                  else 1 - 0.9 * 19 / 20)
    if schedule == "wsd":
        assert f[10:80] == [1.0] * 70  # stable phase, then linear decay over the last 20%


def test_flops_per_token_formula(tokenizer_dir):
    cfg = cfg_for(tokenizer_dir)
    model, info = build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))
    c = model.config
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding doubles as the LM head matmul
    assert info.flops_per_token == 6 * n + 12 * c.num_hidden_layers * c.hidden_size * 32
    assert info.total_params == info.trainable_params == n


def test_lora_flops_count_no_weight_gradient_for_the_frozen_base(tokenizer_dir, tiny_pretrained):
    """LoRA: 4 FLOPs per frozen matmul weight (forward and input gradient), 6 per adapter weight; MFU would be
    overstated ~1.5x at 6N. raypt.plan, whose meta-device model holds no adapters, counts the same."""
    from raypt.metrics import peak_of
    from raypt.plan import plan

    full = build_model(cfg_for(tokenizer_dir, f"model.name_or_path={tiny_pretrained}").model, vocab_size=400,
                       seq_len=32, device=torch.device("cpu"))[1]
    cfg = cfg_for(tokenizer_dir, f"model.name_or_path={tiny_pretrained}", "model.lora=true")
    lora = build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))[1]
    base, adapters, attn = full.total_params - 400 * 64, lora.trainable_params, 12 * 2 * 64 * 32  # (untied head)
    assert full.flops_per_token == 6 * base + attn
    assert lora.flops_per_token == 4 * base + 6 * adapters + attn
    assert plan(cfg).flops_per_token == lora.flops_per_token
    recipe = Path(__file__).parent.parent / "configs" / "llama3-8b-qlora-cpt.yaml"
    qlora = plan(load_config(recipe)).flops_per_token
    whole = plan(load_config(recipe, ["model.lora=false", "model.quantize=null"])).flops_per_token
    assert 1.4 < whole / qlora < 1.5  # what 6N overstated QLoRA's MFU by at 8B
    assert [peak_of(f"NVIDIA {g}") for g in ("H100 PCIe", "H100 NVL", "H100 80GB HBM3", "GB200", "B200", "X1")] == \
        [756e12, 835e12, 989e12, 2.5e15, 2.25e15, None]


def test_seq_len_above_max_positions_is_refused(tokenizer_dir, tmp_path):
    from raypt.model import ModelError

    base_dir = tmp_path / "base"
    cfg = cfg_for(tokenizer_dir)
    base, _ = build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))
    base.config.max_position_embeddings = 16
    base.save_pretrained(base_dir)
    cfg = cfg_for(tokenizer_dir, f"model.name_or_path={base_dir}")
    with pytest.raises(ModelError, match="above the model's max_position_embeddings 16; lower data.seq_len"):
        build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))


class NaNAt(LocalContext):
    """Injects a NaN into the embeddings' output at chosen forward calls, through the Context seam."""

    def __init__(self, *a, nan_calls=(), **kw):
        super().__init__(*a, **kw)
        self.nan_calls, self.calls = set(nan_calls), 0

    def prepare(self, model):
        def hook(module, args, out):
            self.calls += 1
            return out * float("nan") if self.calls in self.nan_calls else out

        model.get_input_embeddings().register_forward_hook(hook)
        return model


def test_nan_stops_before_the_update_naming_step_and_rank(tokenizer_dir, tmp_path):
    from raypt.loop import NonFiniteError

    # 2 micro-batches per step (global 8 / micro 4): forward call 13 is in step 7
    ctx = NaNAt(tmp_path, blocks(tokenizer_dir, 64, 32), nan_calls={13})
    cfg = cfg_for(tokenizer_dir, "train.log_every=5", "train.checkpoint_every=0", "train.eval_every=0")
    with pytest.raises(NonFiniteError, match=r"non-finite loss on rank 0 at step 7; training stopped"):
        train(cfg, ctx)
    rows, _ = metrics(tmp_path)
    assert [r["step"] for r in rows] == [5] and all(math.isfinite(r["loss"]) for r in rows)


def test_nan_skip_mode_counts_and_gives_up_past_the_limit(tokenizer_dir, tmp_path):
    from raypt.loop import NonFiniteError

    cfg = cfg_for(tokenizer_dir, "train.nonfinite=skip", "train.max_skipped_steps=2", "train.max_steps=12",
                  "train.checkpoint_every=0", "train.eval_every=0")
    out = train(cfg, NaNAt(tmp_path / "a", blocks(tokenizer_dir, 64, 32), nan_calls={3, 9}))
    rows, _ = metrics(tmp_path / "a")
    assert out["step"] == 12 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["skipped_steps"] == 2  # steps 2 and 5 were dropped, training went on
    with pytest.raises(NonFiniteError, match=r"3 steps with a non-finite loss or gradient norm, more than "
                                             r"train.max_skipped_steps=2; the first at step 2 \(non-finite loss on rank 0"):
        train(cfg, NaNAt(tmp_path / "b", blocks(tokenizer_dir, 64, 32), nan_calls={3, 9, 15}))


def test_resume_from_refuses_foreign_and_half_written_checkpoints(tokenizer_dir, tmp_path):
    from raypt.checkpoint import CheckpointError

    data = blocks(tokenizer_dir, 64, 32)
    src = tmp_path / "src"
    train(cfg_for(tokenizer_dir, "train.max_steps=20"), LocalContext(src, data))
    good = src / "checkpoint_000020"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a complete raypt checkpoint"):
        train(cfg_for(tokenizer_dir, f"run.resume_from={foreign}"), LocalContext(tmp_path / "a", data))

    import shutil

    half = tmp_path / "half"
    shutil.copytree(good, half)
    (half / "COMPLETE").unlink()  # as if the writer died before the marker
    with pytest.raises(CheckpointError, match="never finished"):
        train(cfg_for(tokenizer_dir, f"run.resume_from={half}"), LocalContext(tmp_path / "b", data))

    damaged = tmp_path / "damaged"
    shutil.copytree(good, damaged)
    with open(damaged / "state" / "__0_0.distcp", "r+b") as f:  # as if a copy was cut short
        f.truncate(100)
    with pytest.raises(CheckpointError, match="state/__0_0.distcp is missing or not"):
        train(cfg_for(tokenizer_dir, f"run.resume_from={damaged}"), LocalContext(tmp_path / "d", data))

    out = train(cfg_for(tokenizer_dir, f"run.resume_from={good}"), LocalContext(tmp_path / "c", data))
    rows, _ = metrics(tmp_path / "c")
    assert rows[0]["step"] == 21 and out["step"] == 40


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tokenizer_dir, tmp_path):
    """A shard of the newest checkpoint cut short after its marker was written (a copy or a disk gone wrong): the
    marker's sizes give it away, the run resumes from the checkpoint before, says which it skipped and why, and
    trains the steps after it again with the same losses."""
    sets = ("train.checkpoint_every=4", "train.eval_every=0", "train.sample_tokens=0")
    data = blocks(tokenizer_dir, 64, 32)
    run = tmp_path / "run"
    train(cfg_for(tokenizer_dir, "train.max_steps=8", *sets), LocalContext(run, data))
    first = [r["loss"] for r in metrics(run)[0]]
    shard = run / "checkpoint_000008" / "state" / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert train(cfg_for(tokenizer_dir, "train.max_steps=10", *sets), LocalContext(run, data))["step"] == 10
    [resumed] = [r for r in events(run) if "resumed_from" in r]
    assert Path(resumed["resumed_from"]).name == "checkpoint_000004" and resumed["steps_retrained"] == 4
    assert resumed["checkpoints_skipped"] == [f"{run}/checkpoint_000008 is incomplete or damaged: "
                                              f"state/__0_0.distcp is missing or not {size} bytes"]
    again = {r["step"]: r["loss"] for r in metrics(run)[0]}  # (a step logged twice: its second loss)
    # (steps 7-8 decay the LR towards another end now: max_steps 10)
    assert [again[s] for s in range(1, 7)] == pytest.approx(first[:6], rel=1e-5)


FULL_DISK_RUNS = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_loop import blocks, cfg_for
from raypt import checkpoint
from raypt.loop import LocalContext, train

tok, run, out = sys.argv[1:4]
sets = ("train.checkpoint_every=2", "train.eval_every=0", "train.sample_tokens=0", "run.loggers=[]")
seen = {{}}
try:  # checkpoint 4 meets the full disk: the run stops with its one line
    train(cfg_for(tok, "train.max_steps=6", *sets), LocalContext(run, blocks(tok, 64, 32)))
except checkpoint.CheckpointError as e:
    seen["error"] = e.message
seen["latest"], seen["listed"] = checkpoint.latest(run), sorted(p.name for p in Path(run).iterdir())
seen["done"] = train(cfg_for(tok, "train.max_steps=8", "run.checkpoint_failed=continue", *sets),
                     LocalContext(run, blocks(tok, 64, 32)))["step"]
seen["rows"] = [json.loads(line) for line in open(f"{{run}}/metrics.jsonl")]
seen["final"] = sorted(p.name for p in Path(run, "final").iterdir())
json.dump(seen, open(out, "w"))
"""


def test_a_full_disk_fails_a_checkpoint_cleanly_and_the_run_resumes_from_the_one_before(tokenizer_dir, tmp_path):
    """The run's directory on a small real disk (a 2.6 MB tmpfs, in a mount namespace of its own): checkpoint 2 fits
    (1.7 MB), checkpoint 4 runs out of space halfway. The run stops with one line naming the checkpoint and the
    error, the half-written directory is gone, and checkpoint 2 is whole. Started again with
    run.checkpoint_failed: continue, it resumes from checkpoint 2, reports each checkpoint the disk refuses, trains on
    to the end with an uninterrupted run's losses, and exports its model (which fits)."""
    import subprocess
    import sys

    disk, out = tmp_path / "disk", tmp_path / "seen.json"
    disk.mkdir()
    if subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                      capture_output=True).returncode:
        pytest.skip("no tmpfs here: this machine lets no process make a mount namespace (unshare -rm)")
    script = tmp_path / "runs.py"
    script.write_text(FULL_DISK_RUNS.format(tests=str(Path(__file__).parent)))
    run = disk / "run"
    subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=2600k tmpfs {disk} && exec "$@"', "sh",
                    sys.executable, str(script), tokenizer_dir, str(run), str(out)], check=True, timeout=600)
    seen = json.loads(out.read_text())
    # (torch's zip writer says "unexpected pos", not ENOSPC: the line adds the disk's free space)
    assert seen["error"].startswith(f"{run}/checkpoint_000004 could not be written (rank 0: ") and re.search(
        r"; its disk has only 0\.\d MB free\)", seen["error"]), seen["error"]
    assert seen["latest"] == f"{run}/checkpoint_000002" and seen["listed"] == ["checkpoint_000002", "metrics.jsonl"]
    assert seen["done"] == 8 and "model.safetensors" in seen["final"]
    rows = seen["rows"]
    [resumed] = [r for r in rows if "resumed_from" in r]
    assert resumed["resumed_from"] == f"{run}/checkpoint_000002" and resumed["steps_retrained"] == 2
    failed = [r["step"] for r in rows if "checkpoint_failed" in r]
    assert failed == [4, 6, 8] and all("MB free" in r["checkpoint_failed"] for r in rows if "checkpoint_failed" in r)
    ref = tmp_path / "ref"
    train(cfg_for(tokenizer_dir, "train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=0",
                  "train.sample_tokens=0", "run.loggers=[]"), LocalContext(ref, blocks(tokenizer_dir, 64, 32)))
    again = {r["step"]: r["loss"] for r in rows if "loss" in r}  # (a step logged twice: its second loss)
    assert [again[s] for s in range(1, 9)] == pytest.approx([r["loss"] for r in metrics(ref)[0]], rel=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_world_size_computes_the_global_batchs_gradient(tokenizer_dir, world):
    """What an elastic run relies on: each rank's slice of the global batch (uneven when the size does not divide it),
    cut into the same number of micro-batches on every rank, each loss weighted by its share; summed over the ranks
    and averaged as DDP/FSDP do, the gradient is the whole batch's."""
    from raypt.loop import micro_batches, weighted
    from raypt.stream import rank_rows

    cfg = cfg_for(tokenizer_dir, "scaling.num_workers=[1, 5]", "train.global_batch_size=8", "train.micro_batch_size=2")
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), seq_len=32,
                        device=torch.device("cpu"), seed=0)[0]
    batch = torch.as_tensor(blocks(tokenizer_dir, 8, 32, seed=1), dtype=torch.long)

    model(input_ids=batch, labels=batch).loss.backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    counts = set()
    for r in range(world):
        first, n = rank_rows(8, world, r)
        micro = micro_batches(batch[first : first + n], cfg, world)
        counts.add(len(micro))
        assert all(len(x) for x in micro) and max(len(x) for x in micro) <= 2
        for x in micro:
            weighted(model(input_ids=x, labels=x).loss, len(x), 8, world).backward()
    assert len(counts) == 1  # every rank runs the same number of forwards
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad / world, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_the_chunked_loss_is_hfs_loss_and_gradients(tokenizer_dir, tied, lora):
    """model.loss: chunked never makes the (batch, seq, vocab) logits, and gives HF's own loss and gradients (fp32,
    rel 1e-5), here 7 positions a chunk (so chunks straddle sequences), ignoring exactly the -100 labels."""
    import copy

    from peft import LoraConfig, get_peft_model

    from raypt.loss import supported, use_chunked_loss

    cfg = cfg_for(tokenizer_dir, "model.loss=hf", f"model.tie_word_embeddings={str(tied).lower()}")
    torch.manual_seed(0)
    hf = build_model(cfg.model, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), seq_len=32,
                     device=torch.device("cpu"), seed=0)[0]
    chunked = copy.deepcopy(hf)
    assert supported(chunked)
    use_chunked_loss(chunked, chunk=7)
    if lora:
        def adapted(m):
            torch.manual_seed(1)  # the same adapters on both
            return get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.0))

        hf, chunked = adapted(hf), adapted(chunked)
    x = torch.as_tensor(blocks(tokenizer_dir, 3, 32, seed=2), dtype=torch.long)
    labels = x.clone()
    labels[0, 5:9] = -100  # (not predicted)
    losses = []
    for m in (hf, chunked):
        out = m(input_ids=x, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert chunked(input_ids=x, labels=labels).logits is None  # no logits made
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (hf, chunked)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    assert torch.equal(chunked(input_ids=x).logits, hf(input_ids=x).logits)  # without labels: the model's own forward


@pytest.mark.parametrize("quantize", [False, True], ids=["full", "qlora"])
def test_gradient_checkpointing_recomputes_every_layer_in_backward(tokenizer_dir, tiny_pretrained, quantize):
    """model.gradient_checkpointing under the transformers installed (which renamed the API and moved the checkpoint
    into the layer's forward in 5.23): each decoder layer's MLP starts twice per forward/backward (the recompute
    stops once it has what backward needs: a pre-hook counts), once without it, for a full model and 4-bit QLoRA."""
    from raypt.parallel import decoder_layers

    sets = [f"model.name_or_path={tiny_pretrained}", "model.lora_dropout=0.0"]
    sets += ["model.lora=true", "model.quantize=nf4"] if quantize else []
    x = torch.as_tensor(blocks(tokenizer_dir, 2, 32), dtype=torch.long)
    calls = {}
    for checkpointed in (False, True):
        cfg = cfg_for(tokenizer_dir, *sets, f"model.gradient_checkpointing={str(checkpointed).lower()}")
        model = build_model(cfg.model, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), seq_len=32,
                            device=torch.device("cpu"))[0]
        model.train()
        counts = []
        for layer in decoder_layers(model):
            counts.append(0)
            layer.mlp.register_forward_pre_hook(lambda *_, i=len(counts) - 1: counts.__setitem__(i, counts[i] + 1))
        model(input_ids=x, labels=x).loss.backward()
        calls[checkpointed] = counts
    assert calls == {False: [1, 1], True: [2, 2]}


def test_selective_checkpointing_recomputes_less_and_trains_the_same(tokenizer_dir, tmp_path):
    """model.checkpoint_every_layers: 2 checkpoints the 1st and 3rd of 4 layers (their MLPs run twice); with
    model.checkpoint_ops: matmuls the recompute in backward runs no matrix multiplication again (backward's
    matmuls are those of a run without checkpointing), where full checkpointing runs six of each layer's seven again
    (it stops before down_proj, whose output backward does not need). Each
    choice trains with the losses of a run without checkpointing (rel 1e-6)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from raypt.parallel import decoder_layers

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    four = ["model.num_hidden_layers=4", "train.max_steps=6", "train.eval_every=0", "train.checkpoint_every=0",
            "train.sample_tokens=0"]
    choices = {"none": ["model.gradient_checkpointing=false"], "all": ["model.gradient_checkpointing=true"],
               "every-2": ["model.gradient_checkpointing=true", "model.checkpoint_every_layers=2"],
               "matmuls": ["model.gradient_checkpointing=true", "model.checkpoint_ops=matmuls"],
               "every-2-matmuls": ["model.gradient_checkpointing=true", "model.checkpoint_every_layers=2",
                                   "model.checkpoint_ops=matmuls"]}
    x = torch.as_tensor(blocks(tokenizer_dir, 2, 32), dtype=torch.long)
    mlp_calls, backward_matmuls, losses = {}, {}, {}
    for name, sets in choices.items():
        cfg = cfg_for(tokenizer_dir, *four, *sets)
        model = build_model(cfg.model, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), seq_len=32,
                            device=torch.device("cpu"))[0]
        model.train()
        counts = [0] * 4
        for i, layer in enumerate(decoder_layers(model)):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        loss = model(input_ids=x, labels=x).loss
        with Matmuls() as mode:
            loss.backward()
        mlp_calls[name], backward_matmuls[name] = counts, mode.count
        train(cfg, LocalContext(tmp_path / name, blocks(tokenizer_dir, 64, 32)))
        losses[name] = [r["loss"] for r in metrics(tmp_path / name)[0]]
    assert mlp_calls == {"none": [1] * 4, "all": [2] * 4, "every-2": [2, 1, 2, 1], "matmuls": [2] * 4,
                         "every-2-matmuls": [2, 1, 2, 1]}
    assert backward_matmuls["all"] == backward_matmuls["none"] + 4 * 6
    assert backward_matmuls["every-2"] == backward_matmuls["none"] + 2 * 6
    assert backward_matmuls["matmuls"] == backward_matmuls["every-2-matmuls"] == backward_matmuls["none"]
    for name in choices:
        assert losses[name] == pytest.approx(losses["none"], rel=1e-6), name


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trained-head"])
def test_the_chunked_loss_casts_the_head_once_under_autocast(frozen):
    """bf16 autocast (CPU here, as on GPU): the fp32 LM head is cast to bf16 once per loss, not in every chunk's
    matmuls (autocast caches no cast of a frozen weight: with a 128k-vocabulary head that was ~1 GB a chunk), and
    the loss and gradients stay those of autocast's own per-matmul casts (rel 1e-2: bf16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from raypt.loss import linear_cross_entropy

    class Casts(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func is torch.ops.aten._to_copy.default and args[0].shape == self.shape
                    and (kwargs or {}).get("dtype") == torch.bfloat16):  # (the head to bf16)
                self.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=not frozen)
    targets = torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts(weight.shape) as casts:
        loss = linear_cross_entropy(h, weight, targets, chunk=7)  # 6 chunks
    assert casts.count == 1, casts.count
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy((h @ weight.T).float(), targets)
    grads = torch.autograd.grad(ref, [h] + ([] if frozen else [weight]))
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(h.grad, grads[0], rtol=1e-2, atol=1e-3)
    if not frozen:
        torch.testing.assert_close(weight.grad, grads[1], rtol=1e-2, atol=1e-3)


def test_lora_on_an_fp16_base_freezes_it_in_bf16_and_trains_fp32_adapters(tokenizer_dir, tiny_pretrained, tmp_path):
    """A base saved in fp16 (model.dtype: auto keeps what is saved): its frozen weights become bf16 (fp16 activations
    would need loss scaling), the adapters are fp32 master weights; the 4-bit path's compute dtype is bf16 anyway."""
    saved = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(tiny_pretrained).to(torch.float16).save_pretrained(saved)
    cfg = cfg_for(tokenizer_dir, f"model.name_or_path={saved}", "model.lora=true")
    model = build_model(cfg.model, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), seq_len=32,
                        device=torch.device("cpu"))[0]
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}, dtypes


class CompileCounting(LocalContext):
    """LocalContext that notes Dynamo's counters once steps 1 and 2 are done (when step 3's batch is asked for)."""

    def train_steps(self, cfg, position):
        from torch._dynamo.utils import counters

        for i, item in enumerate(super().train_steps(cfg, position)):
            if i == 2:
                self.after_two = {k: dict(v) for k, v in counters.items()}
            yield item


@pytest.mark.parametrize("lora", [False, True], ids=["scratch", "lora-checkpointed"])
def test_compiled_layers_train_as_eager_ones_and_compile_once(tokenizer_dir, tiny_pretrained, tmp_path, lora):
    """train.compile: the same per-step losses as eager over 10 steps (rel 1e-4), for a scratch model with HF's loss
    and for LoRA on a pretrained one with activation checkpointing and the chunked loss; nothing is compiled again
    after step 2, and both layers share one graph."""
    from torch._dynamo.utils import counters

    data = blocks(tokenizer_dir, 80, 32)
    sets = ([f"model.name_or_path={tiny_pretrained}", "model.lora=true", "model.gradient_checkpointing=true",
             "model.lora_dropout=0.0"] if lora  # (compiled dropout draws other masks than eager's: not comparable)
            else ["model.loss=hf"])  # (HF's own forward: it must not build a KV cache either)
    common = ["train.max_steps=10", "train.eval_every=0", "train.checkpoint_every=0", "run.seed=3", *sets]
    train(cfg_for(tokenizer_dir, *common), LocalContext(tmp_path / "eager", data))
    torch._dynamo.reset()
    counters.clear()
    ctx = CompileCounting(tmp_path / "compiled", data)
    train(cfg_for(tokenizer_dir, "train.compile=true", *common), ctx)
    eager, compiled = ([r["loss"] for r in metrics(tmp_path / d)[0]] for d in ("eager", "compiled"))
    assert len(compiled) == 10 and compiled == pytest.approx(eager, rel=1e-4)
    assert ctx.after_two["stats"]["unique_graphs"] == 1  # it compiled, once for both layers
    assert {k: dict(v) for k, v in counters.items()} == ctx.after_two, "compiled again after step 2"


class SlowInput(LocalContext):
    """LocalContext whose blocks take `delay` seconds to arrive each step, as from a stalled pipeline."""

    delay = 0.1

    def train_steps(self, cfg, position):
        import time

        for item in super().train_steps(cfg, position):
            time.sleep(self.delay)
            yield item


def test_a_stalled_input_shows_as_input_wait_not_as_compute(tokenizer_dir, tmp_path):
    """Each log row says what share of its interval the ranks waited for their blocks (mean and most)."""
    sets = ("train.max_steps=6", "train.log_every=2", "train.eval_every=0", "train.checkpoint_every=0",
            "train.sample_tokens=0")
    data = blocks(tokenizer_dir, 64, 32)
    train(cfg_for(tokenizer_dir, *sets), SlowInput(tmp_path / "slow", data))
    train(cfg_for(tokenizer_dir, *sets), LocalContext(tmp_path / "fed", data))
    slow, fed = metrics(tmp_path / "slow")[0], metrics(tmp_path / "fed")[0]
    assert [r["step"] for r in slow] == [2, 4, 6]
    for r in slow:
        interval = 2 * 8 * 32 / r["tokens_per_s"]  # 2 steps of 8 sequences of 32 tokens
        assert r["input_wait"] == r["input_wait_max"] == r["input_wait_min"] == pytest.approx(
            2 * SlowInput.delay / interval, rel=0.2)
        # busy: a step's own work up to its last backward (where DDP would wait for other ranks), without the wait
        assert r["slowest_rank"] == 0 and r["rank_busy_s_max"] == r["rank_busy_s_mean"]
        assert 0 < 2 * r["rank_busy_s_max"] < interval * (1 - r["input_wait"])
    assert max(r["input_wait"] for r in fed) < min(r["input_wait"] for r in slow) / 2


class Reclaimed(LocalContext):
    """LocalContext told at its `at`-th preemption check that a node of the run goes in `left` seconds."""

    def __init__(self, run_dir, data, at: int, left: float):
        super().__init__(run_dir, data)
        self.at, self.left, self.checks = at, left, 0

    def preemption(self):
        self.checks += 1
        return (self.left, 1) if self.checks >= self.at else None


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_reclaim_notice_checkpoints_and_leaves_or_falls_back_when_too_short(tokenizer_dir, tmp_path):
    """A notice: a checkpoint at that step and the workers leave; started again, the run resumes there, trains no step
    twice and logs an uninterrupted run's losses. A notice shorter than the last checkpoint took to write: no
    checkpoint (it would be lost half-written); the restart resumes from the periodic one and says how many steps it
    trains again. The question is asked about every run.preemption_check_s of training."""
    sets = ("train.max_steps=7", "train.checkpoint_every=3", "train.eval_every=0", "train.sample_tokens=0",
            "run.preemption_check_s=0.001")
    cfg, data = cfg_for(tokenizer_dir, *sets), blocks(tokenizer_dir, 64, 32)
    train(cfg, LocalContext(tmp_path / "calm", data))
    calm = [r["loss"] for r in metrics(tmp_path / "calm")[0]]

    early = tmp_path / "early"
    assert train(cfg, Reclaimed(early, data, at=2, left=0.001)) == {"restart": "reclaim", "step": 2, "workers": 1,
                                                                    "reclaimed": 1}
    assert [r["step"] for r in events(early) if "checkpoint" in r] == [2]  # (none measured yet: saved)
    assert not (early / "final").exists()
    assert train(cfg, LocalContext(early, data))["step"] == 7
    resumed = [(Path(r["resumed_from"]).name, r["steps_retrained"]) for r in events(early) if "resumed_from" in r]
    assert resumed == [("checkpoint_000002", 0)]
    assert [r["loss"] for r in metrics(early)[0]] == pytest.approx(calm, rel=1e-5)

    late = tmp_path / "late"
    assert train(cfg, Reclaimed(late, data, at=5, left=0.001)) == {"restart": "reclaim", "step": 5, "workers": 1,
                                                                  "reclaimed": 1}
    rows = events(late)
    written = [r["checkpoint_write_s"] for r in rows if "checkpoint_write_s" in r]
    assert len(written) == 1 and written[0] > 0.001  # said once, at the first checkpoint
    assert [(r["step"], r["checkpoint_skipped"]) for r in rows if r.get("preemption_notice")] == [(5, True)]
    assert [r["step"] for r in rows if "checkpoint" in r] == [3]
    train(cfg, LocalContext(late, data))
    resumed = [(Path(r["resumed_from"]).name, r["steps_retrained"]) for r in events(late) if "resumed_from" in r]
    assert resumed == [("checkpoint_000003", 2)]  # (steps 4 and 5)

    rare = Reclaimed(tmp_path / "rare", data, at=2, left=0.001)  # asked about every 1000 s: once in 6 steps
    train(cfg_for(tokenizer_dir, *sets, "train.max_steps=6", "run.preemption_check_s=1000"), rare)
    assert rare.checks == 1  # (at step 1, before a step time was measured)


class Roomy(LocalContext):
    """LocalContext of an elastic run whose cluster has room for one more worker from its `at`-th question on."""

    def __init__(self, run_dir, data, at: int):
        super().__init__(run_dir, data)
        self.at, self.asked = at, 0

    def room(self):
        self.asked += 1
        return 1 if self.asked >= self.at else 0


def test_an_elastic_run_with_room_for_more_workers_checkpoints_and_leaves_to_grow(tokenizer_dir, tmp_path):
    """Below its most workers, the run asks whether the cluster has room for more; with room: a checkpoint at that
    step and the workers leave, for the driver to start a larger group that resumes there (no step twice)."""
    sets = ("train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=0", "train.sample_tokens=0",
            "run.preemption_check_s=0.001")
    data = blocks(tokenizer_dir, 64, 32)
    fixed = Roomy(tmp_path / "fixed", data, at=1)
    assert train(cfg_for(tokenizer_dir, *sets), fixed)["step"] == 6 and fixed.asked == 0  # (not elastic: not asked)
    run, elastic = tmp_path / "grow", cfg_for(tokenizer_dir, *sets, "scaling.num_workers=[1, 2]")
    assert train(elastic, Roomy(run, data, at=4)) == {"restart": "grow", "step": 4, "workers": 1, "reclaimed": 0}
    assert [(r["step"], r["grow"]) for r in events(run) if "grow" in r] == [(4, 1)]
    again = Roomy(run, data, at=1)
    again.grew_from = 1  # (the group that left to grow had 1 worker, and this one is no larger: room is not asked)
    assert train(elastic, again)["step"] == 6 and again.asked == 0
    assert [(Path(r["resumed_from"]).name, r["steps_retrained"]) for r in events(run) if "resumed_from" in r] == [
        ("checkpoint_000004", 0)]
    assert [r["loss"] for r in metrics(run)[0]] == pytest.approx([r["loss"] for r in metrics(tmp_path / "fixed")[0]],
                                                                  rel=1e-5)
