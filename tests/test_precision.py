"""Precision on 2 real Ray Train workers (gloo, CPU): continued pre-training of a base saved in bf16 (as Llama-3's
are) keeps fp32 master weights and AdamW moments under DDP and FSDP2, computes in bf16 with train.precision:
bf16-mixed (autocast; FSDP2's MixedPrecisionPolicy, which runs on CPU too) and tracks an all-fp32 run, and keeps
updates far below bf16's resolution, which bf16 weights would round away."""

import json

import pytest
import torch
from safetensors.torch import load_file

from raypt import train

from conftest import save_tiny_llama
from test_loop import blocks
from test_train import write_blocks

pytestmark = pytest.mark.slow
SEQ, STEPS = 32, 4
LR = 1e-5  # an update of ~LR on a weight of ~0.02 is 5e-4 of it: under half a bf16 step (2^-9), so bf16 drops it


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, tokenizer_dir):
    """The tiny Llama saved in bf16, standing in for a downloaded Llama-3 checkpoint."""
    d = save_tiny_llama(tmp_path_factory.mktemp("bf16-llama"), tokenizer_dir, dtype=torch.bfloat16)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    return d


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, tokenizer_dir, bf16_base):
    """name -> (per-step losses, the final checkpoint's directory), for DDP fp32, DDP bf16-mixed, FSDP2 bf16-mixed."""
    root = tmp_path_factory.mktemp("precision")
    write_blocks(root / "data" / "train", blocks(tokenizer_dir, 32, SEQ, seed=0))
    out = {}
    for name, sets in {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16-mixed"],
                       "fsdp-bf16": ["train.precision=bf16-mixed", "scaling.strategy=fsdp"]}.items():
        argv = []
        for s in (f"data.pretokenized={root / 'data'}", f"tokenizer.path={tokenizer_dir}", f"data.seq_len={SEQ}",
                  f"model.name_or_path={bf16_base}", "train.global_batch_size=8", "train.micro_batch_size=2",
                  f"train.max_steps={STEPS}", f"train.lr={LR}", "train.warmup_steps=1", "train.min_lr_ratio=1.0",
                  "train.weight_decay=0.0", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
                  "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", f"run.storage_path={root}",
                  f"run.name={name}", "train.sample_tokens=0", "run.report=false", *sets):
            argv += ["--set", s]
        assert train.main(argv) == 0
        rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = ([r["loss"] for r in rows if "loss" in r], root / name / f"checkpoint_{STEPS:06d}")
    return out


def checkpoint_dtypes(ckpt) -> dict[str, torch.dtype]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt / "state")).read_metadata().state_dict_metadata
    return {k: m.properties.dtype for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}


def checkpoint_weights(ckpt, tmp_path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt / "state"), str(tmp_path / "state.pt"))
    state = torch.load(tmp_path / "state.pt", weights_only=False)["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", ["bf16", "fsdp-bf16", "fp32"])
def test_master_weights_and_adamw_moments_are_fp32(runs, name):
    dtypes = checkpoint_dtypes(runs[name][1])
    weights = {k: d for k, d in dtypes.items() if k.startswith("model.")}
    moments = {k: d for k, d in dtypes.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert len(weights) == 21 and len(moments) == 42, (len(weights), len(moments))
    assert set(weights.values()) == set(moments.values()) == {torch.float32}


@pytest.mark.parametrize("name", ["bf16", "fsdp-bf16"])
def test_updates_below_bf16_resolution_are_kept(runs, bf16_base, tmp_path, name):
    """Trained at LR 1e-5 from bf16 weights: in fp32 masters nearly every element of every matrix has moved; in bf16
    weights none would have (each update rounds back to the weight it was added to). (Not the embedding: only the
    rows of tokens the batches hold get a gradient.)"""
    base = load_file(bf16_base / "model.safetensors")
    trained = checkpoint_weights(runs[name][1], tmp_path)
    matrices = [k for k, v in base.items() if v.ndim == 2 and "embed_tokens" not in k]
    assert len(matrices) == 15
    for k in matrices:
        moved = (trained[k] != base[k].float()).float().mean().item()
        assert moved > 0.9, (k, moved)


@pytest.mark.parametrize("name", ["bf16", "fsdp-bf16"])
def test_bf16_compute_tracks_fp32_and_is_bf16(runs, name):
    fp32, mixed = runs["fp32"][0], runs[name][0]
    assert len(fp32) == len(mixed) == STEPS
    assert mixed == pytest.approx(fp32, rel=5e-3)  # bf16 matmuls (measured here: within 7e-4)
    assert max(abs(a - b) / b for a, b in zip(mixed, fp32)) > 1e-6  # ... and not silently fp32
