"""Ray Train end to end on a real local Ray (gloo, CPU workers): DDP equivalence, export, sharded checkpoints,
NaN handling across ranks, QLoRA."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypt import train
from raypt.checkpoint import MARKER

from test_loop import checkpointed_weights

pytestmark = pytest.mark.slow
SEQ = 32


def write_blocks(path: Path, arr: np.ndarray) -> None:
    path.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array(list(arr), pa.list_(pa.int32()))}), path / "part-0.parquet")


@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory, tokenizer_dir):
    """Exactly one global batch (16 blocks) of learnable token patterns, as `raypt.data --out` lays it out."""
    root = tmp_path_factory.mktemp("pretok")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    rng = np.random.default_rng(0)
    patterns = rng.integers(3, vocab, size=(4, SEQ))
    write_blocks(root / "train", patterns[rng.integers(0, 4, size=16)].astype(np.int32))
    write_blocks(root / "eval", patterns[rng.integers(0, 4, size=16)].astype(np.int32))
    return root


def run(tmp_path, tokenizer_dir, pretokenized, name, *sets):
    argv = ["--set", f"data.pretokenized={pretokenized}", "--set", f"tokenizer.path={tokenizer_dir}",
            "--set", f"data.seq_len={SEQ}", "--set", f"run.storage_path={tmp_path}", "--set", f"run.name={name}",
            "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=4", "--set", "train.lr=3e-3",
            "--set", "train.warmup_steps=1", "--set", "train.log_every=1", "--set", "train.eval_batches=2",
            "--set", "scaling.cpus_per_worker=0.5",  # 2 CPUs here: leave one to stream the blocks
            "--set", "train.sample_tokens=0", "--set", "run.report=false"]  # (only where a test reads them)
    for s in sets:
        argv += ["--set", s]
    assert train.main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def assert_one_shard_per_rank(ckpt: Path) -> None:
    """A checkpoint of 2 ranks: each wrote its own shard file, about half the state, and its own RNG state."""
    files = json.loads((ckpt / MARKER).read_text())["files"]
    shards = {f: size for f, size in files.items() if f.endswith(".distcp")}
    assert sorted(shards) == ["state/__0_0.distcp", "state/__1_0.distcp"], files
    a, b = shards.values()
    assert 0.7 < a / b < 1.4, shards
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt", "train_state.json", "state/.metadata"} <= set(files)


def one_process(run_dir: Path, pretokenized: Path, *sets: str) -> list[dict]:
    """The same loop, data order and initial weights in one plain process without Ray (`LocalContext`): the
    reference a multi-worker run must equal. `pretokenized` holds one Parquet file of train blocks (and of eval
    blocks, if any). Its metrics rows."""
    from raypt.config import load_config
    from raypt.loop import LocalContext, train as train_loop

    def read(split):
        f = pretokenized / split / "part-0.parquet"
        return np.array(pq.read_table(f).column("input_ids").to_pylist(), dtype=np.int32) if f.exists() else None

    cfg = load_config(None, [f"data.pretokenized={pretokenized}", "scaling.num_workers=1", *sets])
    train_loop(cfg, LocalContext(run_dir, read("train"), read("eval")))
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_match_one_process_export_and_write_sharded_checkpoints(ray_local, tmp_path, tokenizer_dir, pretokenized,
                                                              capsys):
    """...and rank 1, slowed by 1 s before steps 3 and 4 (a straggler), is named in those log rows."""
    one = one_process(tmp_path / "one", pretokenized, f"tokenizer.path={tokenizer_dir}", f"data.seq_len={SEQ}",
                      "train.global_batch_size=16", "train.micro_batch_size=4", "train.lr=3e-3",
                      "train.warmup_steps=1", "train.log_every=1", "train.max_steps=2", "train.eval_every=0",
                      "train.sample_tokens=0", "run.report=false")
    one = [r for r in one if "loss" in r]
    with pytest.MonkeyPatch.context() as driver:  # the driver (this process) never loads model weights: the
        def refused(*args, **kwargs):  # sample is made on the workers (a head may hold less than the model)
            raise AssertionError("the driver loaded model weights")

        driver.setattr("transformers.PreTrainedModel.from_pretrained", refused)
        driver.setenv("RAYPT_FAULT", "slow:3,4:1")
        driver.setenv("RAYPT_FAULT_SECONDS", "1")
        two, evals = run(tmp_path, tokenizer_dir, pretokenized, "two", "scaling.num_workers=2", "train.max_steps=4",
                         "train.checkpoint_every=2", "train.eval_every=2", "train.sample_tokens=8")
    # Same global batch, same init: DDP over 2 workers (2 micro-batches each) == one process (4 micro-batches)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-4)
    assert [r["step"] for r in two] == [1, 2, 3, 4] and len(evals) == 2
    assert two[-1]["loss"] < two[0]["loss"]
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "sample:" in out
    for r in two[2:]:  # each rank's busy seconds per step, before it waits for the other in the gradient all-reduce
        assert r["slowest_rank"] == 1 and r["rank_busy_s_max"] >= 1.0, r
        assert r["rank_busy_s_max"] - r["rank_busy_s_mean"] > 0.4, r  # (rank 0's: about 1 s less)
        assert r["straggler_wait"] > 0.3, r  # (the mean rank waits that share of the step for rank 1)
        assert f"step {r['step']}/4" in out and "rank 1 slowest" in out

    final = tmp_path / "two" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.generate(tok("x", return_tensors="pt").input_ids, max_new_tokens=4, do_sample=False).shape[1] > 1
    ckpts = sorted(p.name for p in (tmp_path / "two").glob("checkpoint_0*"))
    assert ckpts == ["checkpoint_000002", "checkpoint_000004"]

    # Sharded checkpoints under DDP too: each rank wrote its own shard file, about half the state, and its RNG state.
    # (A run submitted again resumes from the latest of these: tests/test_jobs.py, tests/test_resume.py.)
    assert_one_shard_per_rank(tmp_path / "two" / "checkpoint_000004")


def test_nan_on_one_of_two_ray_workers_is_skipped_by_both_then_stops_past_the_limit(ray_local, tmp_path, tokenizer_dir,
                                                                                   pretokenized, monkeypatch, capsys):
    """Rank 1's loss is NaN in steps 3 and 5, rank 0's never: both ranks drop step 3 and go on (`nonfinite: skip`);
    step 5 is one bad step more than the run allows, and the run stops with no update from it, naming the rank.
    (`nonfinite: stop` and the limit's counting, in one process: tests/test_loop.py.)"""
    monkeypatch.setenv("RAYPT_FAULT", "nan:3,5:1")
    argv = [a for s in (f"data.pretokenized={pretokenized}", f"tokenizer.path={tokenizer_dir}", f"data.seq_len={SEQ}",
                        f"run.storage_path={tmp_path}", "run.name=nan", "scaling.num_workers=2",
                        "scaling.cpus_per_worker=0.5", "train.global_batch_size=8", "train.micro_batch_size=2",
                        "train.max_steps=6", "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=0",
                        "train.nonfinite=skip", "train.max_skipped_steps=1", "train.sample_tokens=0",
                        "run.report=false")
            for a in ("--set", s)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert ("error: 2 steps with a non-finite loss or gradient norm, more than train.max_skipped_steps=1; the first "
            "at step 3 (non-finite loss on rank 1)") in err and "Traceback" not in err
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["skipped_steps"] == 1
    assert "loss" not in rows[2] and all(np.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    assert sorted(p.name for p in (tmp_path / "nan").glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000004"]


def test_qlora_on_two_workers(ray_local, tmp_path, tokenizer_dir, pretokenized, tiny_pretrained):
    rows, evals = run(tmp_path, tokenizer_dir, pretokenized, "qlora", "scaling.num_workers=2", "train.max_steps=3",
                      f"model.name_or_path={tiny_pretrained}", "model.lora=true", "model.quantize=nf4",
                      "train.lr=1e-2", "train.eval_every=3")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows) and evals
    final = tmp_path / "qlora" / "final"
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("x", return_tensors="pt").input_ids
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pretrained), final / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert merged.dtype == torch.bfloat16
    for m in (adapter, merged):
        assert m.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > 1
    last = sorted((tmp_path / "qlora").glob("checkpoint_0*"))[-1]
    saved = checkpointed_weights(last)
    assert saved and all("lora_" in k for k in saved)
    rng = [torch.load(last / "rng" / f"rank_{r:05d}.pt", weights_only=True)["torch"] for r in (0, 1)]
    assert not torch.equal(*rng)  # each rank draws its own LoRA dropout masks (lora_dropout 0.05; the init is shared)


def test_a_stalled_tokenize_pool_shows_as_input_wait_on_every_rank_and_in_the_report(ray_local, tmp_path, corpus,
                                                                                    tokenizer_dir, monkeypatch,
                                                                                    capsys):
    """Every tokenize actor sleeps 0.5 s per work unit (1 KB of text, a few hundred tokens); a step takes 1,024 tokens:
    once what the pipeline made while the workers started is used up (by step 8 here, by step 12 where the workers
    are slow to start on a loaded machine), both ranks spend most of each log interval waiting for their blocks. metrics.jsonl says so for the rank that waited least too, the progress line says
    "waiting for data", and the report gives the median wait and plots it."""
    monkeypatch.setenv("RAYPT_FAULT", "tokenize")
    monkeypatch.setenv("RAYPT_FAULT_SECONDS", "0.5")
    argv = [a for s in (f"data.train_paths=[{corpus / 'train'}]", f"tokenizer.path={tokenizer_dir}", "data.seq_len=64",
                        "data.unit_bytes=1024", "data.shuffle_tokens=1024", f"run.storage_path={tmp_path}",
                        "run.name=stall", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
                        "data.cpus_per_tokenize_worker=1", "train.global_batch_size=16", "train.micro_batch_size=4",
                        "train.max_steps=16", "train.log_every=4", "train.eval_every=0", "train.checkpoint_every=0",
                        "train.sample_tokens=0")
            for a in ("--set", s)]
    assert train.main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "stall" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    assert rows[-1]["input_wait_min"] > 0.5, rows[-1]
    assert "waiting for data" in capsys.readouterr().out
    md = (tmp_path / "stall" / "report" / "report.md").read_text()
    assert "| input_wait | " in md and (tmp_path / "stall" / "report" / "input_wait.png").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_on_gpus(ray_local, tmp_path, tokenizer_dir, pretokenized):
    n = torch.cuda.device_count()
    rows, _ = run(tmp_path, tokenizer_dir, pretokenized, "fsdp", f"scaling.num_workers={n}", "scaling.use_gpu=true",
                  "scaling.strategy=fsdp", "train.max_steps=2", "train.micro_batch_size=2",
                  "train.global_batch_size=16")
    assert [r["step"] for r in rows] == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final") is not None


@pytest.mark.parametrize("source", ["text", "pretokenized"])
def test_no_cpu_left_to_stream_data_is_refused_before_training(ray_local, tmp_path, tokenizer_dir, pretokenized,
                                                                corpus, source, capsys):
    data = (f"data.pretokenized={pretokenized}" if source == "pretokenized"
            else f"data.train_paths=[{corpus / 'train'}]")
    argv = ["--set", data, "--set", f"tokenizer.path={tokenizer_dir}", "--set", f"data.seq_len={SEQ}",
            "--set", f"run.storage_path={tmp_path}", "--set", "scaling.num_workers=2",
            "--set", "scaling.cpus_per_worker=1", "--set", "train.micro_batch_size=4"]
    assert train.main(argv) == 2  # the cluster has 2 CPUs and the workers would hold both: a hang, not a run
    err = capsys.readouterr().err
    assert "set data.materialize: true" in err and "scaling.cpus_per_worker" in err
    assert not (tmp_path / "raypt").exists()


@pytest.mark.parametrize("sets, fix", [(["scaling.use_gpu=true"], "set scaling.use_gpu: false or add GPU nodes"),
                                       (["scaling.num_workers=[3, 4]"], "lower scaling.num_workers")])
def test_workers_no_node_can_hold_are_refused_before_anything_starts(ray_local, tmp_path, pretokenized, tokenizer_dir,
                                                                     sets, fix, capsys):
    """On a cluster that cannot grow (here: one node of 2 CPUs), Ray would wait for such workers forever."""
    assert train.main(refused_argv(tmp_path, pretokenized, tokenizer_dir, *sets)) == 2
    err = capsys.readouterr().err
    assert "the cluster's nodes (it cannot grow) hold " in err and fix in err and "Traceback" not in err
    assert not (tmp_path / "raypt").exists()


def test_workers_no_node_type_can_hold_are_refused_on_a_cluster_that_grows(ray_local, tmp_path, pretokenized,
                                                                           tokenizer_dir, capsys):
    """KubeRay and Ray's v2 autoscaler publish their node groups in the GCS (written here as they write it, and
    taken back after): GPU workers on a cluster whose node types have no GPU are refused before anything starts."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY, GCS_AUTOSCALER_STATE_NAMESPACE as NS
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    groups = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="cpu16", resources={"CPU": 16}, max_count=10)])
    _internal_kv_put(KEY, groups.SerializeToString(), namespace=NS)
    try:
        code = train.main(refused_argv(tmp_path, pretokenized, tokenizer_dir, "scaling.use_gpu=true"))
    finally:
        _internal_kv_del(KEY, namespace=NS)
    err = capsys.readouterr().err
    assert code == 2 and ("the run needs 2 training workers of 1 CPU, 1 GPU each, and the node types of its "
                          "autoscaler hold 0: set scaling.use_gpu: false or add GPU nodes") in err


def refused_argv(tmp_path, pretokenized, tokenizer_dir, *sets) -> list[str]:
    return [a for s in [f"data.pretokenized={pretokenized}", f"tokenizer.path={tokenizer_dir}", f"data.seq_len={SEQ}",
                        f"run.storage_path={tmp_path}", "scaling.cpus_per_worker=1", "train.global_batch_size=12",
                        "train.micro_batch_size=1", "data.materialize=true", *sets] for a in ("--set", s)]
