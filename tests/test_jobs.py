"""`ray job submit` for real: a Ray head started on loopback, the demo submitted through the Jobs CLI, then resubmitted."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raypt.optim import lr_factor

from conftest import end_processes, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    """A real head node (`ray start --head`) with the dashboard and Jobs API on 127.0.0.1 only; stopped at the end.
    Its own temp dir and ports keep it apart from the tests' in-process cluster, and only its processes are ended."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dash, gcs = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(gcs),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp, "--include-dashboard",
                    "true", "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
    yield env
    end_processes(temp, f":{gcs} ")
    shutil.rmtree(temp, ignore_errors=True)


def submit(env, storage, steps: int) -> subprocess.CompletedProcess:
    """The README's command: `ray job submit --working-dir . -- bash -c "python -m raypt.demo && python -m
    raypt.train --config configs/demo.yaml"` (the demo corpus is written in the job's own working directory)."""
    entry = ["bash", "-c", f"python -m raypt.demo && python -m raypt.train --config configs/demo.yaml "
             f"--set train.max_steps={steps} --set train.warmup_steps=2 --set train.log_every=5 "
             f"--set train.eval_every=10 "
             f"--set train.checkpoint_every=10 --set run.storage_path={storage}"]
    for attempt in range(10):  # the job agent can take a few seconds to come up after `ray start`
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", *entry], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in r.stdout + r.stderr:
            return r
        time.sleep(3)
    return r


def test_job_submit_runs_the_demo_and_a_resubmission_resumes(head, tmp_path):
    storage = tmp_path / "runs"
    r = submit(head, storage, steps=10)
    assert r.returncode == 0 and "succeeded" in r.stdout.lower(), r.stdout[-3000:] + r.stderr[-3000:]
    run = storage / "demo"
    assert (run / "final" / "model.safetensors").exists() and (run / "metrics.jsonl").exists()
    assert (run / "checkpoint_000010" / "COMPLETE").exists()
    assert "done: 10 steps" in r.stdout and "sample:" in r.stdout
    assert "training on 1 CPU thread per worker (the node's CPUs over its workers" in r.stdout  # 2 CPUs, 2 workers

    r = submit(head, storage, steps=20)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from the latest" in r.stdout and "resuming from checkpoint_000010 on 2 workers: step 10" in r.stdout
    assert (run / "checkpoint_000020" / "COMPLETE").exists()
    assert "done: 20 steps (10 by this job), 20,480 tokens in" in r.stdout  # (10 steps x 16 x 128: this job's)
    # it went on at the right step, token count and LR: the schedule of the new max_steps
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows[2:]:
        assert r["tokens_seen"] == r["step"] * 16 * 128
        assert r["lr"] == pytest.approx(3e-3 * lr_factor(r["step"] - 1, max_steps=20, warmup_steps=2,
                                                         schedule="cosine", min_lr_ratio=0.1))
