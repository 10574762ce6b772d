"""The data path on a real multi-node Ray on this machine (`ray.cluster_utils.Cluster`): a head with no CPU (the
driver and the order actor live there) and four 2-CPU worker nodes, two for the training workers, one for the
tokenize actors and a spare. No training block ever reaches the head's object store, whatever the seq_len; the run
trains exactly what a single-node run trains, even when a whole node holding a training worker is lost mid-run."""

import json
import threading
import time
from pathlib import Path

import pytest
import ray

from raypt import train

from conftest import make_docs, write_shards

pytestmark = pytest.mark.slow
MB = 1 << 20


@pytest.fixture(scope="module")
def one_node(ray_local, big_corpus, tokenizer_dir, tmp_path_factory):
    """The seq_len-64 run on the session's one-node local Ray (before this module replaces it): its losses."""
    d = tmp_path_factory.mktemp("one-node")
    argv = [a for s in sets(d, big_corpus, tokenizer_dir, "one", 64) for a in ("--set", s)]
    argv[argv.index("scaling.cpus_per_worker=2")] = "scaling.cpus_per_worker=0.5"
    assert train.main(argv) == 0
    return losses(d / "one")


@pytest.fixture(scope="module")
def cluster(one_node):
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()  # (the session's local Ray, if a test before this module started it)
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 * MB})
    for _ in range(4):  # (one spare: the node-loss run needs somewhere to restart)
        c.add_node(num_cpus=2, object_store_memory=256 * MB)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()
    if was_up:
        ray.init(num_cpus=2, include_dashboard=False)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~2 MB of text: at seq_len 1024 the blocks (~2 MB of int32) dwarf anything else the head stores."""
    return write_shards(tmp_path_factory.mktemp("big") / "train", make_docs(6000, seed=5), shards=4)


def created_bytes() -> dict[str, int]:
    """Bytes ever created in each node's object store (objects put there or pulled there), by node: head or
    worker ids."""
    from ray._private.internal_api import node_stats

    out = {}
    for n in ray.nodes():
        if n["Alive"]:
            s = node_stats(n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False)
            out["head" if not n["Resources"].get("CPU") else n["NodeID"][:8]] = s.store_stats.cumulative_created_bytes
    return out


def sets(tmp_path, corpus, tokenizer_dir, name, seq_len):
    return [f"data.train_paths=[{corpus}]", f"tokenizer.path={tokenizer_dir}", f"data.seq_len={seq_len}",
            f"run.storage_path={tmp_path}", f"run.name={name}", "scaling.num_workers=2", "scaling.cpus_per_worker=2",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=6", "train.log_every=1",
            "train.eval_every=0", "train.checkpoint_every=3", "train.warmup_steps=2", "train.lr=3e-3",
            "data.unit_bytes=262144", "data.cpus_per_tokenize_worker=1", "train.sample_tokens=0"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    """Per step; a step logged twice (before a failure and after the resume) must log the same loss both times."""
    by_step = {}
    for r in rows(run_dir):
        if "loss" in r:
            assert by_step.setdefault(r["step"], r["loss"]) == r["loss"], r
    return [by_step[s] for s in sorted(by_step)]


def lose_a_training_node(cluster, run_dir: Path, after_step: int) -> threading.Thread:
    """Once the run has logged `after_step`, remove a worker node that holds a training worker (its raylet and
    every process on it end, as when a spot node is reclaimed)."""
    from ray.util.state import list_actors

    def logged() -> int:
        return max((r["step"] for r in rows(run_dir)), default=0) if (run_dir / "metrics.jsonl").exists() else 0

    def go():
        while logged() < after_step:
            time.sleep(0.2)
        node = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0].node_id
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("seq_len", [64, 1024])
def test_no_training_block_reaches_the_head(cluster, one_node, big_corpus, tokenizer_dir, tmp_path, seq_len):
    before = created_bytes()
    argv = [a for s in sets(tmp_path, big_corpus, tokenizer_dir, "mn", seq_len) for a in ("--set", s)]
    if seq_len == 64:  # and a node with a training worker is lost after step 4: the run restarts from checkpoint 3
        loss = lose_a_training_node(cluster, tmp_path / "mn", after_step=4)
        argv += ["--set", "run.max_failures=1"]
    assert train.main(argv) == 0
    after = created_bytes()
    grew = {k: after[k] - before.get(k, 0) for k in after}
    trained = 6 * 8 * seq_len * 4  # bytes of the blocks the two ranks trained on
    print(f"seq_len {seq_len}: object store bytes created during the run, by node: {grew}; trained on {trained}")
    # descriptors and small actor state only, for each start: the resume after a lost node starts the workers and
    # the pipeline again
    starts = 1 + sum("resumed_from" in r for r in rows(tmp_path / "mn"))
    assert grew["head"] < starts * (256 << 10), grew
    workers = sorted((v for k, v in grew.items() if k != "head"), reverse=True)
    assert sum(workers) >= trained, grew  # the blocks were made and pulled on the worker nodes
    if seq_len == 64:  # the same run on one node trains the same steps
        loss.join(timeout=1)
        assert [Path(r["resumed_from"]).name for r in rows(tmp_path / "mn") if "resumed_from" in r] == [
            "checkpoint_000003"]
        assert one_node == pytest.approx(losses(tmp_path / "mn"), rel=1e-4)
