"""What a user runs around training: generate and eval from any of a run's outputs, the trackers, the run report,
progress output, and the CLIs' one way of refusing bad input, on a LoRA run trained here on real local Ray.
`raypt.generate`, `raypt.eval` and lm-eval run end to end in fresh processes; the rest in this one."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raypt import eval as raypt_eval, generate, report, train
from raypt.load import load
from raypt.loop import LocalContext, train as train_loop
from raypt.progress import Progress

from test_loop import blocks, cfg_for

pytestmark = pytest.mark.slow
SEQ = 32
EVAL_BLOCKS = 16  # train.eval_batches x micro_batch_size x 1 worker: the run's eval set


def cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m raypt.X ...` in a fresh process, stdout not a terminal."""
    out = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ""})
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def lora_run(ray_local, tmp_path_factory, corpus, tiny_pretrained):
    """A LoRA run of the tiny base model on the test corpus, to W&B (offline) and MLflow (a file store) as well."""
    root = tmp_path_factory.mktemp("runs")
    sets = [f"data.train_paths=[{corpus / 'train'}]", f"data.eval_paths=[{corpus / 'eval'}]", f"data.seq_len={SEQ}",
            f"model.name_or_path={tiny_pretrained}", "model.lora=true", "scaling.num_workers=1",
            "scaling.cpus_per_worker=1", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.max_steps=6", "train.warmup_steps=1", "train.lr=1e-2", "train.log_every=1",
            "train.eval_every=3", "train.eval_batches=4", "train.checkpoint_every=3", "train.sample_tokens=0",
            f"run.storage_path={root}", "run.name=lora", "run.loggers=[tensorboard, wandb, mlflow]"]
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # (the driver forwards WANDB_* to the workers)
    try:
        assert train.main([a for s in sets for a in ("--set", s)]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    run_dir = root / "lora"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def test_generate_from_final_adapter_and_checkpoint_gives_one_greedy_continuation(lora_run):
    run_dir, _, _ = lora_run
    outputs = {}
    procs = {path.name: subprocess.Popen(  # (side by side: three fresh processes)
        [sys.executable, "-m", "raypt.generate", "--model", str(path), "--prompt", "the", "--temperature", "0",
         "--max-new-tokens", "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for path in (run_dir / "final", run_dir / "final" / "adapter", run_dir / "checkpoint_000006")}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
        outputs[name] = stdout
    assert len(set(outputs.values())) == 1, outputs
    text = outputs["final"]
    assert text.startswith("the") and len(text.strip()) > len("the"), text
    # a checkpoint of the middle of the run is another model
    loaded = [load(str(run_dir / d)).model for d in ("checkpoint_000003", "checkpoint_000006")]
    x = torch.arange(3, 3 + SEQ).unsqueeze(0)
    with torch.no_grad():
        a, b = (m(input_ids=x).logits for m in loaded)
    assert not torch.allclose(a, b), "checkpoint_000003 loaded the final weights"


def test_eval_perplexity_is_the_one_the_run_logged(lora_run, corpus):
    run_dir, _, evals = lora_run
    out = cli("raypt.eval", "--model", str(run_dir / "final"), "--data", str(corpus / "eval"),
              "--max-blocks", str(EVAL_BLOCKS))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["blocks"] == EVAL_BLOCKS and result["seq_len"] == SEQ  # (the run's seq_len, from its config)
    assert result["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(evals[-1]["eval_ppl"], rel=1e-5)


def test_bits_per_byte_by_hand(lora_run, tmp_path, capsys):
    run_dir, _, _ = lora_run
    text = "the quick brown fox jumps over the lazy dog, twice: über naïve"
    (tmp_path / "t.txt").write_text(text + "\n", encoding="utf-8")
    loaded = load(str(run_dir / "final"))
    tok = loaded.tokenizer
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids, tok.eos_token_id]
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    nats = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    by_hand = nats / math.log(2) / len(text.encode("utf-8"))  # the EOS stands for no bytes

    assert raypt_eval.main(["--model", str(run_dir / "final"), "--data", str(tmp_path / "t.txt"),
                            "--seq-len", str(len(ids))]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["blocks"] == 1 and result["tokens_not_scored"] == 0
    assert result["bytes_scored"] == len(text.encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(by_hand, rel=1e-5)
    assert result["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)


def test_wandb_offline_and_mlflow_file_store_hold_the_metrics_and_config(lora_run, monkeypatch):
    run_dir, train_rows, evals = lora_run
    wandb_files = list((run_dir / "wandb").glob("offline-run-*-lora/run-lora.wandb"))
    assert len(wandb_files) == 1, list((run_dir / "wandb").iterdir())
    data = wandb_files[0].read_bytes()
    for needle in (b"eval_loss", b"tokens_per_s", b"max_steps", b"lora_target_modules",
                   json.dumps(evals[-1]["eval_loss"]).encode()):
        assert needle in data, needle

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow 3 reads a file store only when told to)

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "raypt"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.tags["raypt.run"] == "lora" and run.data.params["train.max_steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [r["step"] for r in train_rows]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in train_rows])
    assert client.get_metric_history(run.info.run_id, "eval_loss")[-1].value == pytest.approx(evals[-1]["eval_loss"])
    # events' numbers too: each checkpoint's save time, and the per-rank input wait and busy time of each log row
    assert [m.step for m in client.get_metric_history(run.info.run_id, "checkpoint_s")] == [3, 6]
    for key in ("input_wait_min", "rank_busy_s_max", "straggler_wait"):
        assert len(client.get_metric_history(run.info.run_id, key)) == len(train_rows), key


def test_the_run_ends_with_a_report_and_runs_compare(lora_run, tmp_path, capsys):
    run_dir, _, evals = lora_run
    md = (run_dir / "report" / "report.md").read_text()
    assert f"| eval_loss | {evals[-1]['eval_loss']:.4f} |" in md and "| steps | 6 |" in md
    for name in report.PLOTS:
        png = run_dir / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
        assert f"]({name}.png)" in md
    assert report.main([str(run_dir), str(run_dir), "--out", str(tmp_path / "cmp")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'cmp' / 'report.md'}"
    assert "| metric | lora | lora |" in (tmp_path / "cmp" / "report.md").read_text()


def test_a_report_counts_a_resumed_run_once_and_marks_resumes_and_skips(tmp_path):
    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_seen": 100 * s, "tokens_per_s": 1e3}
            for s in (1, 2, 3, 4)]
    rows[2] = {"step": 3, "lr": 1e-3, "tokens_seen": 300, "tokens_per_s": 1e3, "skipped_steps": 1}  # non-finite
    rows += [{"step": 4, "eval_loss": 4.0, "eval_ppl": math.exp(4.0)}, {"step": 4, "checkpoint": "c4"},
             {"step": 4, "preemption_notice": True, "checkpoint_skipped": True},  # a notice too short to save
             {"step": 2, "resumed_from": "c2", "workers": 1, "steps_retrained": 2}]  # resumed from step 2's
    rows += [{"step": s, "loss": 4.0 - s / 10, "lr": 1e-3, "tokens_seen": 100 * s, "tokens_per_s": 2e3}
             for s in (3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    run = report.read_run(str(tmp_path))
    assert [r["step"] for r in run.logs] == [1, 2, 3, 4, 5] and run.logs[2]["loss"] == pytest.approx(3.7)
    assert run.evals == [] and run.resumes == [2] and run.skipped == [] and run.checkpoints == 1
    assert run.tokens([2.5, 5]).tolist() == [250, 500]
    s = report.summary(run)
    assert s["steps"] == 5 and s["train_loss"] == pytest.approx(3.5) and s["resumes"] == 1
    assert s["preemptions"] == 1 and s["steps_retrained"] == 2
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    assert report.read_run(str(tmp_path / "skip")).skipped == [3]
    assert report.main([str(tmp_path), str(tmp_path / "skip"), "--out", str(tmp_path / "out")]) == 0


def test_a_full_models_checkpoint_loads_as_its_final_export(tokenizer_dir, tmp_path):
    cfg = cfg_for(tokenizer_dir, "train.max_steps=4", "train.checkpoint_every=4", "train.eval_every=0")
    train_loop(cfg, LocalContext(tmp_path, blocks(tokenizer_dir, 64, SEQ)))
    final, ckpt = load(str(tmp_path / "final")), load(str(tmp_path / "checkpoint_000004"))
    assert (final.kind, ckpt.kind) == ("model", "checkpoint")
    x = torch.tensor(blocks(tokenizer_dir, 2, SEQ, seed=3), dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(input_ids=x).logits, final.model(input_ids=x).logits)


@pytest.mark.parametrize("argv, expect", [
    (["raypt.generate", "--model", "/nonexistent/final"], "--model /nonexistent/final is not a directory"),
    (["raypt.eval", "--model", "."], "give --data"),
    (["raypt.report", "/nonexistent/run"], "/nonexistent/run has no metrics.jsonl"),
])
def test_the_tools_refuse_bad_input_with_one_line(argv, expect, capsys):
    main = {"raypt.generate": generate.main, "raypt.eval": raypt_eval.main, "raypt.report": report.main}[argv[0]]
    assert main(argv[1:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and "Traceback" not in err


def test_eval_refuses_a_directory_without_a_model(tmp_path, capsys):
    assert raypt_eval.main(["--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "holds no model: give a run's final/" in capsys.readouterr().err


def test_bits_per_byte_token_table_is_exact_on_byte_level_bpe(tokenizer_dir):
    from transformers import AutoTokenizer

    from raypt.tokenizer import token_bytes

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = token_bytes(tok)
    for text in ("plain ascii text", "中文新闻 über naïve ✓", "  spaces\tand tabs  "):
        ids = tok(text, add_special_tokens=False).input_ids
        assert table[ids].sum() == len(text.encode("utf-8")), text
    assert table[[tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]].tolist() == [0, 0, 0]
    assert np.all(table >= 0)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_on_one():
    plain = io.StringIO()
    with Progress("packing", total=4, unit="unit", every=0, stream=plain) as p:
        for _ in range(4):
            p.update(1, "12 MB")
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and "\x1b" not in plain.getvalue()
    assert lines[0].startswith("packing: 1/4 units (") and "ETA" in lines[0] and lines[0].endswith(", 12 MB)")
    assert lines[-1].startswith("packing: 4/4 units")
    quiet = io.StringIO()
    with Progress("packing", total=4, stream=quiet) as p:  # (a line every 30 s, and one at the end)
        p.update(4)
    assert len(quiet.getvalue().splitlines()) == 1
    tty = Terminal()
    with Progress("packing", total=4, unit="unit", stream=tty) as p:
        p.update(2)
        p.write("a line above the bar")
        p.update(2)
    assert "\r" in tty.getvalue() and "a line above the bar\n" in tty.getvalue() and "4/4" in tty.getvalue()


def test_rank_zeros_lines_reach_the_driver_in_order(ray_local, capsys):
    """On a terminal rank 0 sends its lines to the driver's Monitor, which prints them above its bars."""
    from raypt.pipeline_stats import PipelineStats

    stats = PipelineStats.remote()
    monitor = train.Monitor(stats, max_steps=4, every=0.05)
    for line, fields in [("model: 1 parameter", {}), ("step 2/4 | loss 1.0", {"step": 2, "tokens_per_s": 10.0}),
                         ("step 4/4 | loss 0.5", {"step": 4, "tokens_per_s": 12.0}), ("report: r.md", {})]:
        ray_local.get(stats.say.remote(line, fields))
    monitor.stop()
    out = capsys.readouterr().out
    positions = [out.index(s) for s in ("model: 1 parameter", "step 2/4", "step 4/4", "report: r.md")]
    assert positions == sorted(positions) and "training: 4/4 steps" in out


def test_lm_eval_harness_runs_a_local_task_on_the_model(lora_run, tmp_path):
    pytest.importorskip("lm_eval")
    run_dir, _, _ = lora_run
    docs = [{"question": "the cat sat on the", "choices": [" mat", " sky"], "answer": 0},
            {"question": "one, two,", "choices": [" three", " banana"], "answer": 0},
            {"question": "def f(x):", "choices": [" return x", " zebra"], "answer": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    out = subprocess.run([sys.executable, "-m", "raypt.eval", "--model", str(run_dir / "final"), "--tasks",
                          "tiny_mc", "--include-path", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    task = json.loads(out.stdout.strip().splitlines()[-1])["tasks"]["tiny_mc"]
    assert task["sample_len"] == 3 and task["acc,none"] in (0, 1 / 3, 2 / 3, 1)


def test_the_readme_shows_the_demo_plot_and_the_tools():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert "![the demo run's train and eval loss against tokens seen](bench/plots/demo-loss.png)" in readme
    assert (root / "bench" / "plots" / "demo-loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "readme-plot:" in (root / "Makefile").read_text()
    for command in ("python -m raypt.generate --model", "python -m raypt.eval --model", "python -m raypt.report"):
        assert command in readme


def test_eval_on_ray_workers_sums_to_the_one_process_result(lora_run, corpus, capsys):
    run_dir, _, _ = lora_run
    results = []
    for workers in ("0", "2"):
        assert raypt_eval.main(["--model", str(run_dir / "checkpoint_000006"), "--data", str(corpus / "eval"),
                                "--workers", workers]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    one, two = results
    assert one["blocks"] == two["blocks"] > EVAL_BLOCKS and one["bytes_scored"] == two["bytes_scored"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-6)
