"""A cold autoscaling cluster, as `ray up cluster/...yaml` leaves it: a head with no CPU, worker nodes only when a job
asks. Ray's fake multi-node provider (what `ray.cluster_utils.AutoscalingCluster` wraps) adds real raylets on this
machine; `python -m raypt.train` on streamed text starts with no CPU in the cluster, the autoscaler adds the nodes,
the run finishes; a run no node type can hold is refused at once."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import end_processes, free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def fake_cluster_config(gcs_address: str) -> dict:
    """The fake provider's config (the pip wheel lacks the example file AutoscalingCluster reads): a head type with
    no resources, one worker type of 2 CPUs from zero to three nodes, no commands."""
    commands = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": "raypt-fake", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "available_node_types": {
            "ray.head.default": {"resources": {}, "max_workers": 0, "node_config": {}},
            "cpu2": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 3, "node_config": {}},
        },
        "head_node_type": "ray.head.default", **{c: [] for c in commands},
    }


@pytest.fixture(scope="module")
def cold_cluster():
    """A fake autoscaling cluster's head (`ray start --head --num-cpus=0 --autoscaling-config`), ended at the end."""
    from ray._private.services import get_node_ip_address

    temp = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs = free_port()
    address = f"{get_node_ip_address()}:{gcs}"
    config = Path(temp) / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(address)))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    if not (Path.home() / ".ray" / "auth_token").exists():  # `ray start` makes none (ray.init would): a fresh
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"],  # machine whose first Ray is this one
                       check=True, env=env, capture_output=True, timeout=120)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=0", f"--autoscaling-config={config}",
                    "--port", str(gcs), "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    env["RAY_ADDRESS"] = address
    env["RAY_AUTH_TOKEN_PATH"] = str(Path.home() / ".ray" / "auth_token")  # (what `ray start` made, before HOME moves)
    env["HOME"] = str(Path(temp, "home"))  # the driver's: where `ray up` leaves its config on the head node
    Path(env["HOME"]).mkdir()
    shutil.copy(config, Path(env["HOME"], "ray_bootstrap_config.yaml"))
    yield env
    end_processes(temp, f":{gcs} ")
    shutil.rmtree(temp, ignore_errors=True)


def train(env: dict, corpus: Path, tokenizer_dir: str, tmp_path: Path, *more: str) -> subprocess.CompletedProcess:
    sets = [f"data.train_paths=[{corpus / 'train'}]", f"tokenizer.path={tokenizer_dir}", "data.seq_len=32",
            f"run.storage_path={tmp_path}", "run.name=cold", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=4", "train.eval_every=0",
            "train.sample_tokens=0", "run.report=false", *more]
    return subprocess.run([sys.executable, "-m", "raypt.train", *[a for s in sets for a in ("--set", s)]], env=env,
                          capture_output=True, text=True, timeout=600)


def test_workers_no_node_type_can_hold_are_refused_before_the_autoscaler_is_asked(cold_cluster, corpus,
                                                                                  tokenizer_dir, tmp_path):
    """The `ray up` autoscaler publishes no node type's resources; its config on the head says them (the cloud
    provider's fill-out included). GPU workers on a cluster of 2-CPU types would be waited for forever."""
    r = train(cold_cluster, corpus, tokenizer_dir, tmp_path, "scaling.use_gpu=true")
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    assert ("the run needs 2 training workers of 1 CPU, 1 GPU each, and the node types of its autoscaler hold 0: "
            "set scaling.use_gpu: false or add GPU nodes") in r.stderr


def test_streaming_run_starts_on_a_cluster_with_no_cpu_and_the_autoscaler_adds_nodes(cold_cluster, corpus,
                                                                                      tokenizer_dir, tmp_path):
    r = train(cold_cluster, corpus, tokenizer_dir, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "the cluster has 0 CPUs now: its autoscaler adds nodes as the run asks for them" in out
    assert "Adding 1 node(s) of type cpu2" in out and "done: 4 steps" in out
    assert (tmp_path / "cold" / "final" / "model.safetensors").exists()


def test_an_elastic_restart_after_a_reclaim_keeps_its_most_workers_where_an_autoscaler_replaces_nodes(cold_cluster):
    """After a reclaim a smaller elastic group starts at once on a cluster that cannot grow; with an autoscaler the
    group keeps its most workers, which is what Ray Train asks the autoscaler for (`workers_after_reclaim`)."""
    code = ("import ray; from types import SimpleNamespace as S; from raypt.cluster import workers_after_reclaim; "
            "ray.init(); sc = S(elastic=True, min_workers=1, max_workers=4, cpus_per_worker=2.0, use_gpu=False); "
            "print(workers_after_reclaim(sc, 4, 2))")
    r = subprocess.run([sys.executable, "-c", code], env=cold_cluster, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-1] == "4", (r.stdout + r.stderr)[-3000:]
