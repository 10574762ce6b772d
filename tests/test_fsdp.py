"""FSDP2 and sharded checkpoints on a real local Ray (gloo, CPU workers): FSDP == the same loop in one plain process
step for step (tests/test_train.py shows DDP == one process), weight decay on the same parameters, per-rank
checkpoint shards, a rank killed during a sharded save, resume on another world size, LoRA under FSDP, and
meta-device builds that equal eager ones bitwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from raypt import train
from raypt.checkpoint import MARKER

from test_loop import blocks
from test_train import assert_one_shard_per_rank, one_process, write_blocks

pytestmark = pytest.mark.slow
SEQ, STEPS, EVERY = 32, 12, 4
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    return make_data(tmp_path_factory.mktemp("fsdp-data"), tokenizer_dir)


def make_data(root: Path, tokenizer_dir) -> Path:
    """5 global batches of learnable token patterns (the 12-step runs cross passes), and 16 eval blocks."""
    write_blocks(root / "train", blocks(tokenizer_dir, 40, SEQ, seed=0))
    write_blocks(root / "eval", blocks(tokenizer_dir, 16, SEQ, seed=0))
    return root


def settings(tokenizer_dir) -> list[str]:
    """What every run here shares (the one-process reference included)."""
    return [f"tokenizer.path={tokenizer_dir}", f"data.seq_len={SEQ}", "train.global_batch_size=8",
            "train.micro_batch_size=2", f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=6",
            "train.eval_batches=8", "train.warmup_steps=2", "train.lr=3e-3", "train.weight_decay=0.5",
            f"data.shuffle_tokens={16 * SEQ}", "train.sample_tokens=0", "run.report=false"]


def run(storage, tokenizer_dir, data, name, workers, *sets):
    """`python -m raypt.train` on the blocks; (train rows, eval rows) of its metrics.jsonl."""
    argv = []
    for s in (f"data.pretokenized={data}", *settings(tokenizer_dir), f"run.storage_path={storage}", f"run.name={name}",
              f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={1 / max(2, workers)}",
              f"train.checkpoint_every={EVERY}", *sets):
        argv += ["--set", s]
    assert train.main(argv) == 0
    rows = [json.loads(x) for x in (storage / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def by_step(rows):
    """step -> (loss, grad_norm); a step logged twice (before a crash and after the restart) is kept once."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def assert_same(a: dict, b: dict, steps, rel: float = 1e-5) -> None:
    for s in steps:
        assert a[s][0] == pytest.approx(b[s][0], rel=rel), (s, a[s], b[s])
        assert a[s][1] == pytest.approx(b[s][1], rel=10 * rel), (s, a[s], b[s])


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp-runs")


@pytest.fixture(scope="module")
def reference(ray_local, storage, tokenizer_dir, data):
    """The FSDP2 run on 2 workers that the other runs are compared with. Its rank 1 is SIGKILLed after writing its
    shard of checkpoint 8 (in the background writer), before the marker: the group Ray restarts resumes from
    checkpoint 4. (train rows in log order, eval rows)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYPT_FAULT", "save:8:1")
        mp.setenv("RAYPT_FAULT_FILE", str(storage / "fsdp.fault"))
        return run(storage, tokenizer_dir, data, "fsdp", 2, "scaling.strategy=fsdp", "run.async_checkpoint=true",
                   "run.max_failures=1")


def test_rank_killed_during_sharded_async_save_resumes_from_the_previous_one(reference, storage):
    """The steps trained again after the resume (5-8) log the very losses and gradient norms they logged before the
    failure; the half-written checkpoint 8 was written again, complete."""
    rows, _ = reference
    assert (storage / "fsdp.fault").exists()
    events = [json.loads(x) for x in (storage / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [Path(e["resumed_from"]).name for e in events if "resumed_from" in e] == ["checkpoint_000004"]
    first = {}
    for r in rows:
        if r["step"] in first:
            assert (r["loss"], r["grad_norm"]) == first[r["step"]], r
        first.setdefault(r["step"], (r["loss"], r["grad_norm"]))
    steps = [r["step"] for r in rows]
    again = steps.index(5, 5)  # (the background writer may let the first group log a step or two past 8)
    assert again >= 8 and steps == [*range(1, again + 1), *range(5, STEPS + 1)]
    kept = sorted(p.name for p in (storage / "fsdp").glob("checkpoint_*"))
    assert kept == ["checkpoint_000004", "checkpoint_000008", "checkpoint_000012"]
    assert all((storage / "fsdp" / k / MARKER).exists() for k in kept)


def test_fsdp_equals_one_process(reference, storage, tokenizer_dir, data):
    fsdp, fsdp_evals = by_step(reference[0]), reference[1]
    rows = one_process(storage / "one", data, *settings(tokenizer_dir))
    one, one_evals = by_step([r for r in rows if "loss" in r]), [r for r in rows if "eval_loss" in r]
    steps = range(1, STEPS + 1)
    assert sorted(fsdp) == list(steps)
    assert_same(fsdp, one, steps)
    assert fsdp[STEPS][0] < 0.8 * fsdp[1][0]
    assert [e["eval_loss"] for e in fsdp_evals[-2:]] == pytest.approx([e["eval_loss"] for e in one_evals], rel=1e-5)

    # Weight decay on the same parameters: after 12 steps at lr 3e-3 with decay 0.5, a matrix that missed it would
    # differ by ~2% (~1e-3 for these weights); every weight of the exported models agrees to 1e-5 (the two runs sum
    # their micro-batches in another order, and AdamW's step turns a few ulps of gradient into ~5e-6 on a weight
    # here and there).
    models = {n: AutoModelForCausalLM.from_pretrained(storage / n / "final").state_dict() for n in ("fsdp", "one")}
    for key in models["fsdp"]:
        torch.testing.assert_close(models["fsdp"][key], models["one"][key], rtol=1e-5, atol=1e-5, msg=key)

    assert_one_shard_per_rank(storage / "fsdp" / "checkpoint_000012")  # sharded checkpoints


@pytest.mark.parametrize("workers, sets, rel", [(4, ["scaling.fsdp_shard_size=2"], 1e-5),
                                                (2, ["train.compile=true"], 1e-4),
                                                (2, ["scaling.strategy=ddp", "train.compile=true"], 1e-4)],
                         ids=["4-hsdp", "2-compiled", "2-ddp-compiled"])
def test_resume_on_another_world_size(reference, storage, tokenizer_dir, data, workers, sets, rel, request):
    """A checkpoint written by 2 FSDP workers resumes on 4 as HSDP (2 replicas of 2 shards): DCP reshards, the data
    order does not depend on the worker count, the losses (and the final eval) are the 2-worker run's. So are those
    of 2 workers with compiled layers, under FSDP2 and under DDP (to float noise). (On one worker, reduce-scattering
    every micro-batch: tests/test_tp.py, from a 2-D checkpoint.)"""
    rows, evals = run(storage, tokenizer_dir, data, f"w{request.node.callspec.id}", workers, "scaling.strategy=fsdp", *sets,
                      f"run.resume_from={storage / 'fsdp' / 'checkpoint_000004'}", "train.checkpoint_every=0",
                      "train.eval_every=0")
    resumed = by_step(rows)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    assert_same(resumed, by_step(reference[0]), range(5, STEPS + 1), rel)
    assert evals[-1]["eval_loss"] == pytest.approx(reference[1][-1]["eval_loss"], rel=rel)


@pytest.fixture(scope="module")
def lora_fsdp(ray_local, storage, tokenizer_dir, data, tiny_pretrained):
    """A LoRA run on 2 FSDP workers: its train rows."""
    return run(storage, tokenizer_dir, data, "lora", 2, "scaling.strategy=fsdp", f"model.name_or_path={tiny_pretrained}",
               "model.lora=true", "train.max_steps=4", "train.lr=1e-2", "train.eval_every=0")[0]


def test_lora_under_fsdp(lora_fsdp, storage, tiny_pretrained):
    rows = lora_fsdp
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    from peft import PeftModel

    final = storage / "lora" / "final"
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = PeftModel.from_pretrained(base, final / "adapter")
    for name, p in adapter.base_model.model.named_parameters():  # the base stayed frozen
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    merged = AutoModelForCausalLM.from_pretrained(final)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.split(".")[-2].endswith("proj") for k in changed)


def test_sharded_checkpoints_load_as_their_final_export(reference, lora_fsdp, storage):
    """`raypt.load` builds a checkpoint that 2 FSDP ranks wrote (the whole model, and a LoRA adapter) in one process:
    the same logits as the run's export."""
    from raypt.load import load

    x = torch.arange(3, 3 + SEQ).unsqueeze(0)
    for run_dir, ckpt, final in [("fsdp", f"checkpoint_{STEPS:06d}", "final"),
                                 ("lora", "checkpoint_000004", "final/adapter")]:
        a, b = load(str(storage / run_dir / ckpt)), load(str(storage / run_dir / final))
        assert a.kind == "checkpoint"
        with torch.no_grad():
            torch.testing.assert_close(a.model(input_ids=x).logits, b.model(input_ids=x).logits)


def test_meta_device_builds_equal_eager_builds(tokenizer_dir, tiny_pretrained, tmp_path):
    """Two gloo processes: a scratch model built on the meta device and sharded equals the whole eager build bitwise,
    and so does a pretrained model that rank 0 alone read and broadcast."""
    script = ROOT / "tests" / "fsdp_build_check.py"
    out = subprocess.run([sys.executable, str(script), tokenizer_dir, str(tiny_pretrained)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scratch: equal" in out.stdout and "pretrained: equal" in out.stdout, out.stdout


def test_hsdp_all_reduces_across_replicas_once_a_step(tokenizer_dir):
    """Four gloo processes, HSDP 2 replicas x 2 shards, 3 micro-batches reduce-scattered each: one all-reduce across
    the replicas per FSDP group a step, not one per micro-batch, and the same gradients."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "hsdp_check.py"), tokenizer_dir], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all-reduces a step: 9 -> 3; gradients equal" in out.stdout, out.stdout


def test_sharded_save_needs_a_fraction_of_a_full_gather():
    """A 58M-parameter Llama under FSDP2 on 2 gloo ranks (bench/checkpoint.py): rank 0's peak RSS while saving, and the
    bytes it writes, against the full-gather format that collects every weight and AdamW moment on rank 0."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint.py"), "--hidden", "512", "--layers", "8",
                          "--formats", "full-gather,sharded", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {(r["format"], r["rank"]): r for r in json.loads(out.stdout.strip().splitlines()[-1])}
    old, new = rows["full-gather", 0], rows["sharded", 0]
    assert new["params"] >= 50e6
    assert old["peak_rss_mb"] > 0.5 * old["written_mb"]  # the gather really held the state on rank 0
    assert new["peak_rss_mb"] < 0.6 * old["peak_rss_mb"], (old, new)
    for rank in (0, 1):  # each rank writes its half
        assert 0.4 < rows["sharded", rank]["written_mb"] / old["written_mb"] < 0.6, rows


def test_sharded_saves_put_what_every_rank_holds_in_rank_0s_file_and_spread_replicas():
    """The sharded save plan over 4 ranks as HSDP makes it (2 replicas of 2 shards): a tensor all 4 hold (a step
    count) is written once, by rank 0, after its shards; a shard both replicas hold is written once, by whichever
    rank DCP's default picks, so neither replica group writes everything."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from raypt.checkpoint import _Planner

    def item(fqn, offset, size, total=None):
        return WriteItem(index=MetadataIndex(fqn, torch.Size([offset])), type=WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size([offset]),
                                                                                torch.Size([size])),
                                                     properties=TensorProperties.create_from_tensor(torch.zeros(1)),
                                                     size=torch.Size([total or size])))

    step = lambda: item("step", 0, 1)  # noqa: E731
    plans = [SavePlan([item("w", 0 if rank % 2 == 0 else 1000, 1000, 2000), item(f"v{rank % 2}", 0, 10), step()],
                      planner_data={}) for rank in range(4)]
    planner = _Planner()
    planner.set_up_planner({}, is_coordinator=True)
    out, _ = planner.create_global_plan(plans)
    written = [(i.index.fqn, i.index.offset[0]) for p in out for i in p.items]
    assert sorted(written) == sorted(set(written))  # every item once
    assert [(i.index.fqn) for i in out[0].items][-1] == "step" and all("step" not in
                                                                        [i.index.fqn for i in p.items] for p in out[1:])
    assert all(p.items for p in out[1:]) and not any(len(p.items) > 3 for p in out)  # the replicas share the writing
