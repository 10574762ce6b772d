"""Bad input through the public CLIs (`python -m raypt.data`, `python -m raypt.train`): each case ends in one message
that names the problem and the fix (exit 2, no traceback) or in a counted skip in the summary. The cases of the
corpus reader already run through the data CLI in test_data.py (non-UTF-8, empty file, blank lines, NUL bytes, CRLF,
hidden files, a missing path, one 10 MB line, a corpus too small for one block); these are the rest."""

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raypt import data, plan, train

from conftest import make_docs, write_shards


def data_cli(tmp_path, *sets):
    out = tmp_path / "out"
    rc = data.main(["--out", str(out), *[a for s in sets for a in ("--set", s)]])
    return rc, (json.loads((out / "summary.json").read_text()) if rc == 0 else None)


def train_cli(tmp_path, tokenizer_dir, *sets):
    base = [f"data.train_paths=[{tmp_path}]", f"tokenizer.path={tokenizer_dir}", f"run.storage_path={tmp_path / 'runs'}",
            "data.seq_len=32", "scaling.num_workers=1", "train.max_steps=2"]
    return train.main([a for s in (*base, *sets) for a in ("--set", s)])


def test_gzip_shard_reads_like_the_plain_one(ray_local, tokenizer_dir, tmp_path):
    plain = write_shards(tmp_path / "plain", make_docs(50, seed=11), shards=1) / "shard_00.txt"
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "shard_00.txt.gz").write_bytes(gzip.compress(plain.read_bytes()))
    sets = (f"tokenizer.path={tokenizer_dir}", "data.seq_len=16")
    rc, s = data_cli(tmp_path / "a", f"data.train_paths=[{plain}]", *sets)
    rc_gz, s_gz = data_cli(tmp_path / "b", f"data.train_paths=[{tmp_path / 'gz'}]", *sets)
    assert rc == rc_gz == 0
    assert (s_gz["train"]["documents"], s_gz["train"]["tokens"]) == (s["train"]["documents"], s["train"]["tokens"])


def test_glob_that_matches_nothing(ray_local, tokenizer_dir, tmp_path, capsys):
    rc, _ = data_cli(tmp_path, f"data.train_paths=[{tmp_path}/*.txt]", f"tokenizer.path={tokenizer_dir}")
    err = capsys.readouterr().err
    assert rc == 2 and "matches no file; check the pattern" in err and "Traceback" not in err


def test_tokenizer_without_eos(ray_local, tokenizer_dir, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "tok")
    write_shards(tmp_path / "c", make_docs(10))
    rc, _ = data_cli(tmp_path, f"data.train_paths=[{tmp_path / 'c'}]", f"tokenizer.path={tmp_path / 'tok'}")
    err = capsys.readouterr().err
    assert rc == 2 and "has no EOS token; set tokenizer.eos_id" in err and "Traceback" not in err


@pytest.mark.parametrize("cli", ["data", "train", "plan"])
@pytest.mark.parametrize("text, expect", [
    ("data:\n  train_paths: [x]\n  seq_lenn: 64\n", "unknown key data.seq_lenn; valid keys in data: train_paths"),
    ("data:\n  train_paths: [x]\n  seq_len: long\ntrain:\n  lr: [1]\n", "2 problem(s)"),
])
def test_config_with_unknown_key_or_wrong_type(cli, text, expect, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    main = {"data": data.main, "train": train.main, "plan": plan.main}[cli]
    rc = main(["--config", str(tmp_path / "c.yaml")] + (["--out", str(tmp_path / "o")] if cli == "data" else []))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and expect in err and "Traceback" not in err
    if "seq_len: long" in text:
        assert "data.seq_len" in err and "train.lr" in err


def test_a_tracker_that_is_not_installed_is_refused_before_the_run_starts(tokenizer_dir, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # (how Python marks a module that cannot be imported)
    write_shards(tmp_path / "c", make_docs(10))
    rc = train_cli(tmp_path / "c", tokenizer_dir, "run.loggers=[tensorboard, wandb]")
    err = capsys.readouterr().err
    assert rc == 2 and "run.loggers names wandb, which is not installed: pip install 'raypt[trackers]'" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_seq_len_above_the_models_positions(ray_local, tokenizer_dir, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=64)).save_pretrained(tmp_path / "m")
    write_shards(tmp_path / "c", make_docs(10))
    rc = train_cli(tmp_path / "c", tokenizer_dir, f"model.name_or_path={tmp_path / 'm'}", "data.seq_len=128")
    err = capsys.readouterr().err
    assert rc == 2 and "data.seq_len 128 is above the model's max_position_embeddings 64" in err
    assert "Traceback" not in err


def test_corrupt_checkpoint_given_to_resume(ray_local, tokenizer_dir, tmp_path, capsys):
    write_shards(tmp_path / "c", make_docs(10))
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "state").mkdir()
    (bad / "state" / "__0_0.distcp").write_bytes(b"\x00" * 64)
    (bad / "COMPLETE").write_text('{"state": {}, "files": {"state/.metadata": 9, "state/__0_0.distcp": 99, '
                                  '"train_state.json": 10}}\n')
    rc = train_cli(tmp_path / "c", tokenizer_dir, f"run.resume_from={bad}")
    err = capsys.readouterr().err
    assert rc == 2 and "is incomplete or damaged: state/.metadata is missing or not 9 bytes" in err
    assert "point to another checkpoint" in err and "Traceback" not in err
    assert not Path(tmp_path / "c" / "runs").exists()


def test_trust_remote_code_is_off_by_default_and_warned_when_on(tokenizer_dir, tmp_path, caplog):
    from raypt.config import load_config
    from raypt.model import build_model

    assert load_config(None, ["data.train_paths=[x]"]).model.trust_remote_code is False
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "m")
    cfg = load_config(None, ["data.train_paths=[x]", f"model.name_or_path={tmp_path / 'm'}",
                             "model.trust_remote_code=true"])
    with caplog.at_level("WARNING"):
        build_model(cfg.model, vocab_size=len(tok), seq_len=32, device=torch.device("cpu"))
    assert "trust_remote_code is on" in caplog.text


@pytest.mark.parametrize("cli", ["raypt.data", "raypt.train"])
def test_a_local_ray_that_ended_uncleanly_is_named_in_seconds_not_retried(tokenizer_dir, tmp_path, cli):
    """Ray's record of the last cluster `ray start` made names a port where nothing listens any more (a cluster
    that ended without `ray stop`): instead of retrying that GCS for minutes, the CLI says what to do at once."""
    import os
    import subprocess
    import time

    from conftest import free_port

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path)}
    docs = write_shards(tmp_path / "docs", make_docs(20), shards=1)
    args = ["--set", f"data.train_paths=[{docs}]", "--set", f"tokenizer.path={tokenizer_dir}",
            "--set", f"run.storage_path={tmp_path / 'runs'}"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", cli, *args, *(["--out", str(tmp_path / "out")] * (cli == "raypt.data"))],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "is not answering" in r.stderr + r.stdout and "ray stop" in r.stderr + r.stdout
    assert time.perf_counter() - t0 < 60  # (the interpreter's start and imports; Ray would retry for minutes)
