"""Checkpoints written by an earlier raypt resume with this one.

tests/data/compat holds a checkpoint written by raypt at e47694b (`tests/data/compat/make.py`): a tiny scratch Llama
after 4 steps in one process, and the losses that raypt logged when it resumed it for steps 5 and 6.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from raypt.loop import LocalContext, train
from raypt.rundata import DataChangedError, RunData
from raypt.stream import MixPosition, Position

COMPAT = Path(__file__).parent / "data" / "compat"
_spec = importlib.util.spec_from_file_location("compat_make", COMPAT / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def test_a_checkpoint_of_the_earlier_format_resumes_where_it_left_off(tmp_path, capsys):
    ckpt = COMPAT / "checkpoint_000004"
    cfg = make.config(ckpt, 6, f"run.resume_from={ckpt}")  # (the checkpoint holds its tokenizer)
    out = train(cfg, LocalContext(tmp_path, np.load(COMPAT / "blocks.npy")))
    expected = json.loads((COMPAT / "expected.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = next(r for r in rows if "resumed_from" in r)
    assert resumed["step"] == 4
    assert "step 4, 256 tokens seen, data at epoch 0, unit 0, block 16" in capsys.readouterr().out
    assert out["step"] == 6 and out["tokens_seen"] == 6 * 4 * 16
    got = make.losses(tmp_path)
    assert sorted(got) == [5, 6]
    for step, loss in expected["steps"].items():
        assert got[int(step)] == pytest.approx(loss, rel=1e-5)
    saved = json.loads((tmp_path / "checkpoint_000006" / "train_state.json").read_text())["state"]
    assert set(saved) == set(json.loads((ckpt / "train_state.json").read_text())["state"])


OLD_MIXTURE_STATE = {"step": 12, "tokens_seen": 12288, "epoch": 0, "unit": 0, "offset": 5,
                     "sources": [[1, 3, 7, 40], [0, 2, 1, 24]], "data": {"seed": 0, "sources": {}}}
"""A mixture run's train_state.json as raypt wrote it at e47694b."""


def test_the_data_state_reads_and_writes_the_earlier_layout():
    data = RunData([], None, fingerprint={"seed": 0, "sources": {}})
    assert data.load_state_dict(OLD_MIXTURE_STATE, "checkpoint_000012") == []
    assert data.position == MixPosition((Position(1, 3, 7), Position(0, 2, 1)), (40, 24), 5)
    assert {"step": 12, "tokens_seen": 12288, **data.state_dict()} == OLD_MIXTURE_STATE
    one = {"epoch": 2, "unit": 9, "offset": 3, "sources": None, "data": {"seed": 0}}
    data = RunData([], None, fingerprint={"seed": 0})
    data.load_state_dict(one, "c")
    assert data.position == Position(2, 9, 3) and data.state_dict() == one


def test_the_data_state_refuses_other_data_or_restarts_its_order():
    data = RunData([], None, fingerprint={"seed": 1})
    with pytest.raises(DataChangedError, match=r"changed since c: seed: 0 -> 1.*run.data_changed: restart"):
        data.load_state_dict({"epoch": 2, "unit": 9, "offset": 3, "sources": None, "data": {"seed": 0}}, "c")
    assert data.load_state_dict({"epoch": 2, "unit": 9, "offset": 3, "sources": None, "data": {"seed": 0}}, "c",
                                "restart") == ["seed: 0 -> 1"]
    assert data.position == Position() and data.state_dict()["data"] == {"seed": 1}
