"""Tensor parallelism (`raypt.tensor_parallel`) on real Ray Train workers over gloo: FSDP 2 x TP 2 on 4 workers equals
the same loop in one plain process (which equals DDP: tests/test_train.py) step for step, with weight decay and
clipping on; its checkpoint resumes as TP 2 alone, as FSDP alone and on one worker (DCP reshards the 2-D DTensors);
its final/ is a plain Hugging Face model; shapes that do not split are refused before any worker starts."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from raypt import train
from raypt.config import absolute_paths, load_config
from raypt.loop import LocalContext, train as train_loop

from test_fsdp import EVERY, SEQ, STEPS, assert_same, by_step, make_data, settings

pytestmark = pytest.mark.slow
SAMPLE = ["train.sample_tokens=6", "train.sample_prompt=the"]
CLIP = ["train.grad_clip=0.5"]  # (clips most steps here: the clipped norm must be the global one)


def run(storage, tokenizer_dir, data, name, workers, *sets) -> tuple[dict, list, dict]:
    """`raypt.train.run` on the blocks: (step -> (loss, grad_norm), eval rows, the run's summary)."""
    sets = [f"data.pretokenized={data}", *settings(tokenizer_dir), f"run.storage_path={storage}", f"run.name={name}",
            f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={1 / max(2, workers)}",
            f"train.checkpoint_every={EVERY}", "scaling.strategy=fsdp", *CLIP, *sets]
    out = train.run(absolute_paths(load_config(None, sets)))
    assert "error" not in out, out
    rows = [json.loads(x) for x in (storage / name / "metrics.jsonl").read_text().splitlines()]
    return by_step([r for r in rows if "loss" in r]), [r for r in rows if "eval_loss" in r], out


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    return make_data(tmp_path_factory.mktemp("tp-data"), tokenizer_dir)  # (tests/test_fsdp.py's blocks)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-runs")


@pytest.fixture(scope="module")
def tp_run(ray_local, storage, tokenizer_dir, data):
    """FSDP 2 x TP 2 on 4 workers, checkpoints every 4 steps, a sample at the end."""
    return run(storage, tokenizer_dir, data, "tp", 4, "scaling.tensor_parallel=2", *SAMPLE)


@pytest.fixture(scope="module")
def one(storage, tokenizer_dir, data):
    """The same loop in one plain process: (step -> (loss, grad_norm), eval rows, summary)."""
    def read(split):
        return np.array(pq.read_table(data / split / "part-0.parquet").column("input_ids").to_pylist(), np.int32)

    cfg = load_config(None, [f"data.pretokenized={data}", "scaling.num_workers=1", *settings(tokenizer_dir), *CLIP,
                             *SAMPLE])
    out = train_loop(cfg, LocalContext(storage / "one", read("train"), read("eval")))
    rows = [json.loads(x) for x in (storage / "one" / "metrics.jsonl").read_text().splitlines()]
    return by_step([r for r in rows if "loss" in r]), [r for r in rows if "eval_loss" in r], out


def test_fsdp_by_tensor_parallel_equals_one_process(tp_run, one, storage):
    (tp, tp_evals, tp_out), (ref, ref_evals, ref_out) = tp_run, one
    steps = range(1, STEPS + 1)
    assert sorted(tp) == list(steps)
    assert_same(tp, ref, steps)
    assert all(tp[s][1] > 0.5 for s in steps[:3])  # (the clip was active)
    assert tp[STEPS][0] < 0.8 * tp[1][0]
    assert [e["eval_loss"] for e in tp_evals] == pytest.approx([e["eval_loss"] for e in ref_evals], rel=1e-5)
    assert tp_out["sample"] == ref_out["sample"]  # (greedy, made by the 4 workers together)

    # final/ is a plain HF model: every weight equals the one-process run's (weight decay on the same parameters)
    models = {n: AutoModelForCausalLM.from_pretrained(storage / n / "final") for n in ("tp", "one")}
    ref_sd = models["one"].state_dict()
    for key, value in models["tp"].state_dict().items():
        torch.testing.assert_close(value, ref_sd[key], rtol=1e-5, atol=1e-5, msg=key)
    x = torch.arange(3, 3 + SEQ).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(models["tp"](input_ids=x).logits, models["one"](input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("workers, tp, sets", [(2, 2, []), (2, 1, []),
                                               (1, 1, ["scaling.fsdp_sync_every_micro_batch=true"])],
                         ids=["tp2", "fsdp2", "one-worker"])
def test_a_tensor_parallel_checkpoint_resumes_under_any_layout(tp_run, one, storage, tokenizer_dir, data, workers,
                                                              tp, sets):
    """The checkpoint FSDP 2 x TP 2 wrote at step 8, resumed as TP 2 alone (one data-parallel rank), as FSDP 2 alone
    and on one worker (reduce-scattering every one of its 4 micro-batches): the steps after it are the uninterrupted
    run's, and so (rtol 1e-5) is every final weight of the one-process run's."""
    name = f"from-tp-{workers}x{tp}"
    resumed, evals, _ = run(storage, tokenizer_dir, data, name, workers, f"scaling.tensor_parallel={tp}",
                            f"run.resume_from={storage / 'tp' / 'checkpoint_000008'}", "train.checkpoint_every=0",
                            "train.eval_every=0", *sets)
    assert sorted(resumed) == list(range(9, STEPS + 1))
    assert_same(resumed, tp_run[0], range(9, STEPS + 1))
    assert_same(resumed, one[0], range(9, STEPS + 1))
    assert evals[-1]["eval_loss"] == pytest.approx(tp_run[1][-1]["eval_loss"], rel=1e-5)
    ref = AutoModelForCausalLM.from_pretrained(storage / "one" / "final").state_dict()
    for key, value in AutoModelForCausalLM.from_pretrained(storage / name / "final").state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("sets, says", [
    (["model.num_key_value_heads=1"], "does not divide the model's num_key_value_heads 1"),
    (["model.vocab_size=401"], "vocab_size 401"),
])
def test_a_model_that_does_not_split_is_refused_before_workers_start(ray_local, tmp_path, tokenizer_dir, data,
                                                                      sets, says, capsys):
    argv = []
    for s in (f"data.pretokenized={data}", *settings(tokenizer_dir), f"run.storage_path={tmp_path}",
              "scaling.num_workers=2", "scaling.strategy=fsdp", "scaling.tensor_parallel=2", *sets):
        argv += ["--set", s]
    assert train.main(argv) != 0
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "raypt" / "metrics.jsonl").exists()


def test_tensor_parallel_builds_equal_eager_ones_and_masked_selective_steps_equal_one_process(tokenizer_dir,
                                                                                              tiny_pretrained):
    """Four gloo processes, FSDP 2 x TP 2 (tests/tp_check.py): a scratch model built on the meta device and a
    pretrained one rank 0 read and broadcast equal their eager builds bitwise; a step with document masking and
    selective checkpointing of every second layer has one process's loss and gradient norm; a group whose ranks are
    on two hosts is reported by its first rank. And one more decoder layer issues 2 all-gathers and 2
    reduce-scatters of its whole activations forward and as many backward (each of b x s x d bf16), the planner's
    tensor-parallel bytes; and saves for backward, to the byte, what the planner counts: both gathered inputs whole,
    all else split."""
    from transformers import LlamaConfig

    from raypt.plan import layer_activation_bytes

    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "tests" / "tp_check.py"), tokenizer_dir, str(tiny_pretrained)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    for says in ("scratch: equal", "pretrained: equal", "masked, selective: loss", "placement: warned on ranks [0, 2]"):
        assert says in out.stdout, out.stdout
    [layer] = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("layer ")]
    whole = 2 * 64 * 96 * 2  # b x s x d in bf16
    assert layer["calls"]["all_gather_into_tensor"] == layer["calls"]["reduce_scatter_tensor"] == 4, layer
    assert layer["bytes"]["all_gather_into_tensor"] == layer["bytes"]["reduce_scatter_tensor"] == 4 * whole, layer
    hf = LlamaConfig(hidden_size=96, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2)
    planned = (2 * 64 * layer_activation_bytes(hf, "bf16") - 2 * whole) / 2 + 2 * whole  # (raypt.plan's formula)
    assert layer["saved"] == planned, (layer, planned)
