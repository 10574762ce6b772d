"""The data path on a real multi-node Ray on this machine (`ray.cluster_utils.Cluster`): a head with no CPU (the
driver and the Feeder live there), two 3-CPU worker nodes and a 2-CPU one. No training block ever reaches the
head's object store, whatever the seq_len, and the run trains exactly what a single-node run trains. An elastic run
that loses the node of a training worker goes on with the worker left and still trains the same batches."""

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
    import os

    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()  # (the session's local Ray, if a test before this module started it)
    ray.shutdown()
    # After a node is lost, Ray Train's view of the cluster can lag the loss by up to 20 s (its autoscaling
    # coordinator's tick); a group sized to the old view waits this long for its placement before it is sized again.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"  # (read by the processes the nodes start)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 * MB})
    for cpus in (3, 3, 2):
        c.add_node(num_cpus=cpus, object_store_memory=256 * MB)
    c.wait_for_nodes()
    del os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]
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
            "data.unit_bytes=262144", "data.cpus_per_tokenize_worker=1", "train.sample_tokens=0", "run.report=false"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, rel: float = 0.0) -> list[float]:
    """Per step; a step logged twice (before a failure and after the resume) must log the same loss both times:
    exactly, or within `rel` where the replay ran on a different number of workers (another summation order)."""
    by_step = {}
    for r in rows(run_dir):
        if "loss" in r:
            assert by_step.setdefault(r["step"], r["loss"]) == pytest.approx(r["loss"], rel=rel), r
    return [by_step[s] for s in sorted(by_step)]


def node_cpus(node) -> float:
    return next(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node.node_id)


def lose_a_training_node(cluster, run_dir: Path, after_step: int) -> threading.Thread:
    """Once the run has logged `after_step`, remove a worker node that holds a training worker (its raylet and
    every process on it end, as when a spot node is reclaimed). The node is found at step 1, so that the removal
    itself is quick; on a fast machine the run may still log a step or two more before it is gone."""
    from ray.util.state import list_actors

    def logged() -> int:
        return max((r.get("step", 0) for r in rows(run_dir)), default=0) if (run_dir / "metrics.jsonl").exists() else 0

    def go():
        while logged() < 1:
            time.sleep(0.2)
        node = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0].node_id
        while logged() < after_step:
            time.sleep(0.05)
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("seq_len", [64, 1024])
def test_no_training_block_reaches_the_head(cluster, one_node, big_corpus, tokenizer_dir, tmp_path, seq_len):
    before = created_bytes()
    argv = [a for s in sets(tmp_path, big_corpus, tokenizer_dir, "mn", seq_len) for a in ("--set", s)]
    assert train.main(argv) == 0
    after = created_bytes()
    grew = {k: after[k] - before.get(k, 0) for k in after}
    trained = 6 * 8 * seq_len * 4  # bytes of the blocks the two ranks trained on
    print(f"seq_len {seq_len}: object store bytes created during the run, by node: {grew}; trained on {trained}")
    assert grew["head"] < 256 << 10, grew  # descriptors and small actor state only
    workers = sorted((v for k, v in grew.items() if k != "head"), reverse=True)
    assert sum(workers) >= trained, grew  # the blocks were made and pulled on the worker nodes
    if seq_len == 64:  # the same run on one node trains the same steps
        assert one_node == pytest.approx(losses(tmp_path / "mn"), rel=1e-4)


def test_an_elastic_run_goes_on_with_the_workers_left_and_trains_the_same_batches(cluster, one_node, big_corpus,
                                                                                  tokenizer_dir, tmp_path):
    """scaling.num_workers [1, 2] on two 3-CPU nodes (a training worker and a tokenize actor fit on each). The node
    of a training worker is lost after step 4 and not replaced: Ray Train starts the group again with the one worker
    the cluster still holds, from checkpoint 3; it takes the whole global batch in 4 micro-batches where each of two
    took 2, and the run logs the two-worker run's losses."""
    for node in [n for n in cluster.worker_nodes if node_cpus(n) != 3]:  # (the 2-CPU node)
        cluster.remove_node(node)
    argv = [a for s in sets(tmp_path, big_corpus, tokenizer_dir, "el", 64) for a in ("--set", s)]
    argv += ["--set", "scaling.num_workers=[1, 2]", "--set", "run.max_failures=1"]
    loss = lose_a_training_node(cluster, tmp_path / "el", after_step=4)
    assert train.main(argv) == 0
    loss.join(timeout=1)
    resumed = [(Path(r["resumed_from"]).name, r["workers"]) for r in rows(tmp_path / "el") if "resumed_from" in r]
    assert resumed == [("checkpoint_000003", 1)]
    assert one_node == pytest.approx(losses(tmp_path / "el", rel=1e-5), rel=1e-5)


def test_an_elastic_run_shrinks_at_a_reclaim_and_grows_back_when_a_node_joins(cluster, one_node, big_corpus,
                                                                              tokenizer_dir, tmp_path, monkeypatch,
                                                                              busy_cpus):
    """After the test before, one 3-CPU node is left; a second joins, and scaling.num_workers [1, 2] starts with two
    workers. Rank 1's node is drained for preemption (30 s left) after step 1: a checkpoint at that step, and a group of
    one resumes there at once on the node left. The cloud takes the drained node and a new one joins (rank 0 lingers 13
    s before steps 2-5: time for the node to come up and for the room to last GROW_AFTER_S, until Ray Train's view of
    the cluster has it too): the run checkpoints at that step, and a group of two resumes there. No step is trained
    twice and the run logs the two-worker run's losses, and the workers at each size. Every core of the machine is busy
    meanwhile."""
    from ray._private.state import state

    cluster.add_node(num_cpus=3, object_store_memory=256 * MB)
    while ray.cluster_resources().get("CPU", 0) < 6:
        time.sleep(0.2)
    ray_train_sees_the_cluster_now()
    monkeypatch.setenv("RAYPT_FAULT", "drain:1:1+slow:2,3,4,5:0")
    monkeypatch.setenv("RAYPT_FAULT_FILE", str(tmp_path / "drained"))
    monkeypatch.setenv("RAYPT_FAULT_DEADLINE", "30")
    monkeypatch.setenv("RAYPT_FAULT_SECONDS", "13")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # (off for the rest of the suite: conftest)
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    run = tmp_path / "elastic"
    argv = [a for s in sets(tmp_path, big_corpus, tokenizer_dir, "elastic", 64) for a in ("--set", s)]
    # (materialized: tokenized before training, so one 3-CPU node may hold the data and the most workers' CPUs)
    argv += ["--set", "scaling.num_workers=[1, 2]", "--set", "run.preemption_check_s=0.001", "--set",
             "data.materialize=true", "--set", "run.max_failures=0"]

    def resumed() -> list[dict]:
        return [r for r in rows(run) if "resumed_from" in r] if (run / "metrics.jsonl").exists() else []

    done = []
    training = threading.Thread(target=lambda: done.append(train.main(argv)), daemon=True)
    training.start()  # (nodes are added from this thread: Ray starts a node from the main thread only)
    while not resumed():
        assert training.is_alive(), done
        time.sleep(0.05)
    draining, up = state.get_draining_nodes(), alive()  # (a drained node with nothing left on it ends by itself)
    for node in [n for n in cluster.worker_nodes if n.node_id in draining or n.node_id not in up]:
        cluster.remove_node(node)  # (the cloud takes it, at the deadline or before)
    cluster.add_node(num_cpus=3, object_store_memory=256 * MB)
    training.join(timeout=300)
    assert done == [0]
    log = rows(run)
    assert [r["step"] for r in log if r.get("preemption_notice")] == [1]
    grown = [r["step"] for r in log if "grow" in r]
    assert len(grown) == 1 and 1 < grown[0] < 6, grown
    assert [(Path(r["resumed_from"]).name, r["workers"], r["steps_retrained"]) for r in log if "resumed_from" in r] == [
        ("checkpoint_000001", 1, 0), (f"checkpoint_{grown[0]:06d}", 2, 0)]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once
    assert one_node == pytest.approx(losses(run, rel=1e-5), rel=1e-5)


def ray_train_sees_the_cluster_now() -> None:
    """Ray Train sizes an elastic group by its autoscaling coordinator's view of the nodes, which it refreshes every
    20 s by itself: refreshed now, for a test that just added a node."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator)

    ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("raypt-test", recompute=True))


def alive() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_a_reclaimed_node_costs_no_step(cluster, one_node, big_corpus, tokenizer_dir, tmp_path, monkeypatch,
                                        busy_cpus):
    """Rank 1's node is drained for preemption, 120 s left (AWS's notice), after step 4 (not a checkpoint step:
    every 3), as a cloud's reclaim notice reaches Ray. A checkpoint at step 4 appears at once, the workers leave and a
    new group starts on the nodes left without waiting for the deadline, resuming from it: no step is trained twice,
    the losses are the one-node run's, and with run.max_failures 0 the run finishes (a reclaim is not a failure).
    Every core of the machine is busy meanwhile."""
    from ray._private.state import state

    monkeypatch.setenv("RAYPT_FAULT", "drain:4:1")
    monkeypatch.setenv("RAYPT_FAULT_FILE", str(tmp_path / "drained"))
    monkeypatch.setenv("RAYPT_FAULT_DEADLINE", "120")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # (off for the rest of the suite: conftest)
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    argv = [a for s in sets(tmp_path, big_corpus, tokenizer_dir, "spot", 64) for a in ("--set", s)]
    cluster.add_node(num_cpus=3, object_store_memory=256 * MB)  # (after the growth test: a spare for the reclaimed)
    while ray.cluster_resources().get("CPU", 0) < 9:
        time.sleep(0.2)
    try:
        assert train.main([*argv, "--set", "run.preemption_check_s=0.001"]) == 0
        assert time.time() < (tmp_path / "drained").stat().st_mtime + 120  # done before the deadline (the drain: then)
    finally:
        for node in [n for n in cluster.worker_nodes if n.node_id in state.get_draining_nodes()]:
            cluster.remove_node(node)  # (the module's last test: nothing needs it replaced)
    log = rows(tmp_path / "spot")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [r["step"] for r in log if r.get("preemption_notice")] == [4]
    assert [(Path(r["resumed_from"]).name, r["workers"], r["steps_retrained"]) for r in log if "resumed_from" in r] == [
        ("checkpoint_000004", 2, 0)]
    assert one_node == pytest.approx(losses(tmp_path / "spot"), rel=1e-5)


def test_the_spot_watcher_drains_its_node_with_the_clouds_deadline(cluster, metadata_server, tmp_path):
    """raypt/reclaim.py, as a spot node of the `ray up` autoscaler runs it: EC2's notice (two minutes ahead) on a
    fake metadata server drains that node for preemption, with the deadline EC2 names."""
    from ray._private.state import state
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypt import reclaim

    node = cluster.add_node(num_cpus=1, object_store_memory=128 * MB)
    on_it = NodeAffinitySchedulingStrategy(node.node_id, soft=False)  # (work there: an idle node drains at once)
    started = tmp_path / "started"
    busy = ray.remote(num_cpus=1)(lambda: (started.touch(), time.sleep(60))).options(scheduling_strategy=on_it).remote()
    while not started.exists():
        time.sleep(0.1)
    watcher = threading.Thread(target=reclaim.main, args=([
        "--cloud", "aws", "--every", "0.1", "--metadata-url", metadata_server.url, "--address", cluster.address,
        "--node-id", node.node_id],))
    watcher.start()
    time.sleep(0.5)
    assert node.node_id not in state.get_draining_nodes()  # (no notice yet)
    metadata_server.reclaim(120)
    watcher.join(timeout=10)
    try:
        assert state.get_draining_nodes()[node.node_id] == pytest.approx(metadata_server.reclaim_at * 1000, abs=500)
    finally:
        ray.cancel(busy, force=True)
        cluster.remove_node(node)


def test_room_for_more_workers_is_counted_on_each_nodes_free_resources(cluster):
    """What an elastic run below its most workers asks before it grows (`raypt.cluster.free_worker_room`): the
    workers that fit in what each node has free now. A node's CPUs taken by other work, or the node draining, do not
    count. After a reclaim, an elastic group starts again with at most that room or the workers that stay."""
    from types import SimpleNamespace

    from ray._private.state import available_resources_per_node
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypt.cluster import free_worker_room, workers_after_reclaim
    from raypt.reclaim import drain

    sc = SimpleNamespace(cpus_per_worker=2.0, use_gpu=False, elastic=True, min_workers=1, max_workers=8)
    before = free_worker_room(sc)
    # (this cluster cannot grow: a group of 8 that loses 5 to a reclaim starts again with the 3 left, or the room)
    assert workers_after_reclaim(sc, 8, 5) == max(3, before)
    node = cluster.add_node(num_cpus=3, object_store_memory=128 * MB)

    def free_cpus():
        return available_resources_per_node().get(node.node_id, {}).get("CPU", 0)

    while free_cpus() < 3:
        time.sleep(0.1)
    assert free_worker_room(sc) == before + 1
    hold = ray.remote(num_cpus=2)(lambda: time.sleep(600)).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
    while free_cpus() > 1:
        time.sleep(0.1)
    assert free_worker_room(sc) == before  # (1 CPU free there: no worker of 2)
    ray.cancel(hold, force=True)
    while free_cpus() < 3:
        time.sleep(0.1)
    hold = ray.remote(num_cpus=1)(lambda: time.sleep(600)).options(  # (work there: an idle node drains at once)
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
    while free_cpus() > 2:
        time.sleep(0.1)
    drain(cluster.address, node.node_id, 60, "test")
    try:
        given = time.monotonic() + 10
        while free_worker_room(sc) != before and time.monotonic() < given:
            time.sleep(0.1)
        assert free_worker_room(sc) == before  # (draining: its 2 free CPUs are not room)
    finally:
        ray.cancel(hold, force=True)
        cluster.remove_node(node)
