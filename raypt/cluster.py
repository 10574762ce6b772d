"""What raypt knows of the Ray cluster: joining or starting it, what it has and can grow to, whether a run fits,
how many tokenize actors the data pipeline may have, and how many threads a CPU worker gets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from pathlib import Path

import ray

from raypt.errors import UserError, user_error

HEADROOM = 2.0
"""A rate-sized tokenize pool makes this many times the tokens/s training reads."""
STREAM_CPUS = 0.25
"""What a pre-tokenized stream's read tasks ask for: the least a run must leave free for its data."""


class ClusterError(UserError):
    """A Ray cluster that cannot be joined, or cannot hold the run; the message says what to do."""


# -- joining ----------------------------------------------------------------------------------------------------------


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (what `ray job submit` sets), else the one `ray start` recorded on this
    machine, else start a local one. Ray Data shows no progress bars of its own (raypt shows one per phase), and its
    log of a failed UDF is dropped when the failure is a user's input error (raypt prints its message instead)."""
    if not ray.is_initialized():
        if stale := stale_cluster():
            raise ClusterError(
                f"the Ray cluster this machine last started ({stale[0]}, recorded in {stale[1]}) is not "
                "answering: it ended without `ray stop`, and Ray would retry it for minutes. Run `ray stop` (or "
                "delete that file) to start a fresh local Ray, or set RAY_ADDRESS to the cluster to join")
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # (and Ray Data's advice to turn its own on is not printed)
    for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietUserErrors) for f in logger.filters):
            logger.addFilter(_QuietUserErrors())


class _QuietUserErrors(logging.Filter):
    """Drops Ray Data's log records of a failed UDF when what failed is a user's input error (recognised by type,
    `raypt.errors.user_error`: the record's exception, or one in its arguments), and, for any failure, Ray's advice
    to report it as a Ray bug (the error itself still reaches the caller, with its traceback when it is not a user's
    input error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Exception occurred in Ray Data or Ray Core internal"):
            return False
        errors = [a for a in (record.args or ()) if isinstance(a, BaseException)]
        if record.exc_info and record.exc_info[1] is not None:
            errors.append(record.exc_info[1])
        return not any(user_error(e) for e in errors)


def stale_cluster() -> tuple[str, str] | None:
    """Without RAY_ADDRESS: the address of the cluster `ray start` recorded in Ray's temp dir (which `ray.init()`
    joins) and that file, when nothing listens there any more; else None."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    try:
        from ray._common.utils import get_ray_address_file

        file = get_ray_address_file(None)
        address = Path(file).read_text().strip()
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=3):
            return None
    except (FileNotFoundError, ImportError, ValueError):  # (none recorded; a Ray that keeps it elsewhere)
        return None
    except OSError:  # refused or timed out: nothing answers there
        return address, file


# -- what the cluster has and can grow to -----------------------------------------------------------------------------


def can_grow() -> bool:
    """Whether an autoscaler can add nodes to the cluster (a cold one has no worker node before a job asks). KubeRay
    and Ray's autoscaler v2 publish their node types in the GCS; the v1 autoscaler (`ray up`, `ray start
    --autoscaling-config`) reports its status there, and on a cluster that cannot grow that status names only Ray's
    read-only node types, one per node (`node_<id>`)."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    if state.get_cluster_config() is not None:
        return True
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    types = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {} if status else {}
    return any(not t.startswith("node_") for t in types.values())


def node_types() -> tuple[list[tuple[dict, int]], str] | None:
    """The nodes the cluster has or can have, as (resources, how many at most), and what they are, in words; None
    when that cannot be known before asking."""
    from ray._private.state import state

    config = state.get_cluster_config()  # KubeRay and the v2 autoscaler publish their node groups
    if config is not None and config.node_group_configs:
        return ([(dict(g.resources), g.max_count if g.max_count >= 0 else 1 << 20) for g in config.node_group_configs],
                "the node types of its autoscaler")
    if not can_grow():
        return [(n["Resources"], 1) for n in ray.nodes() if n["Alive"]], "the cluster's nodes (it cannot grow)"
    # The v1 autoscaler publishes no node type's resources; `ray up` leaves its config, the types' resources filled in
    # by the cloud provider, on the head node, where a submitted job's driver runs (Ray Tune reads it there too).
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
    if not bootstrap.is_file():
        return None
    import yaml

    c = yaml.safe_load(bootstrap.read_text()) or {}
    types = (c.get("available_node_types") or {}).items()
    return ([(t.get("resources") or {}, t.get("max_workers", c.get("max_workers", 0)) + (n == c.get("head_node_type")))
             for n, t in types], "the node types of its autoscaler")


def worker_room(need: dict[str, float], nodes: list[tuple[dict, int]]) -> int:
    """How many training workers that each need `need` fit on `nodes`: (resources of a node, how many such nodes)."""
    per_node = [min((int(res.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0), default=1 << 20)
                for res, _ in nodes]
    return sum(n * count for n, (_, count) in zip(per_node, nodes))


def free_worker_room(sc) -> int:
    """How many more training workers (`sc`: the scaling config) the cluster's free resources hold now, node by node;
    a draining node's count for nothing (nothing new is placed there)."""
    from ray._private.state import available_resources_per_node, state

    need = {"CPU": sc.cpus_per_worker, "GPU": 1.0 if sc.use_gpu else 0.0}
    draining = state.get_draining_nodes()
    return worker_room(need, [(free, 1) for node, free in available_resources_per_node().items()
                              if node not in draining])


def workers_after_reclaim(sc, workers: int, reclaimed: int) -> int:
    """The most workers an elastic group (`sc`: the scaling config) of `workers`, `reclaimed` of them on nodes being
    reclaimed, starts again with. Ray Train sizes it by a view of the cluster that still counts a draining node, and
    a group placed there would wait for it until its start timed out (60 s). On a cluster that cannot grow: the
    workers that stay, or the room on the nodes that stay (the old group's resources may not be back yet), whichever
    is more; the run grows back once more room lasts (`raypt.loop.Training.check_cluster`). An autoscaler, though,
    is asked for the group's most workers, and a smaller most would leave the reclaimed node unreplaced: there the
    group may wait instead, until the replacement comes or the draining node has gone."""
    try:
        if not sc.elastic or can_grow():
            return sc.max_workers
    except Exception:  # noqa: BLE001 (the GCS busy: as with an autoscaler, which must not be asked for less)
        return sc.max_workers
    try:
        room = free_worker_room(sc)
    except Exception:  # noqa: BLE001 (the GCS busy: the workers that stay)
        room = 0
    return max(sc.min_workers, min(sc.max_workers, max(workers - reclaimed, room)))


def check_workers_fit(sc) -> None:
    """Refuse, before any worker starts, a run whose training workers (`sc`: the scaling config) fit on no node
    the cluster has or can have: Ray would wait for them forever."""
    need = {"CPU": sc.cpus_per_worker, "GPU": 1.0 if sc.use_gpu else 0.0}
    if (known := node_types()) and (room := worker_room(need, known[0])) < sc.min_workers:
        wants = ", ".join(f"{v:g} {k}" for k, v in need.items() if v)
        raise ClusterError(
            f"the run needs {sc.min_workers} training workers of {wants} each, and {known[1]} hold {room}: "
            + ("set scaling.use_gpu: false or add GPU nodes" if sc.use_gpu and not any(
                r.get("GPU") for r, _ in known[0]) else "lower scaling.num_workers or scaling.cpus_per_worker, or "
               "add nodes"))


def check_data_fits(cfg, reserved_cpus: float, units: list[int], weights: list[float]) -> None:
    """Refuse a run that leaves no CPU to stream its data beside its training workers' `reserved_cpus` (`units`:
    each source's work units, `weights` theirs); on a cluster that an autoscaler can grow, say that the nodes come
    as the run asks for them."""
    d, sc = cfg.data, cfg.scaling
    total = ray.cluster_resources().get("CPU", 0)
    grows = total - reserved_cpus < max(STREAM_CPUS, d.cpus_per_tokenize_worker) and can_grow()
    if grows:
        print(f"the cluster has {total:g} CPUs now: its autoscaler adds nodes as the run asks for them "
              f"({sc.max_workers} training workers of {sc.cpus_per_worker:g} CPUs{', GPUs' * sc.use_gpu}, and the data "
              "pipeline)", flush=True)
    if d.pretokenized:
        if total - reserved_cpus < STREAM_CPUS and not grows:
            raise ClusterError(
                f"the {sc.max_workers} training workers reserve {reserved_cpus:g} of the cluster's {total:g} CPUs, "
                "leaving none to stream data to them; set data.materialize: true (read all data first), lower "
                "scaling.cpus_per_worker, or add CPUs")
        return
    for i, n in enumerate(units):
        tokenize_pool(d, n, reserved_cpus, weights=weights, source=i)


# -- sizing --------------------------------------------------------------------------------------------------------


def actors_needed(train_tokens_per_s: float | None, actor_tokens_per_s: float | None) -> int | None:
    """The tokenize actors that make HEADROOM x what training reads, from both measured rates (None: not known yet)."""
    if not train_tokens_per_s or not actor_tokens_per_s:
        return None
    return max(1, math.ceil(HEADROOM * train_tokens_per_s / actor_tokens_per_s))


def tokenize_pool(d, units: int, reserved_cpus: float = 0.0, needed: int | None = None,
                  weights: list[float] | None = None, source: int = 0) -> tuple[int, int]:
    """(fewest, most) tokenize actors for a pipeline of `units` work units (`d`: the data config). Ray Data's
    autoscaling pool grows from two actors while work is queued, up to one single-threaded actor per free CPU
    (faster than fewer actors with more tokenizer threads: the per-token Python work then also runs in
    parallel), `data.max_tokenize_workers`, the units, and `needed` (the rate target, `actors_needed`, once the run
    has measured it); `data.num_tokenize_workers` fixes the size. A mixture's sources stream side by side, each from
    its own pool (`weights`: the sources'; `source`: which one; None: one pool for all): the actors are shared out by
    weight (`mixture_caps`), so no pool can hold the CPUs another one waits for. `reserved_cpus` are held by
    training workers. On a cluster an autoscaler can grow, CPUs it lacks now are no error: the pool's pending actors
    are what makes it add nodes, so it asks for two until the rate is measured."""
    total = ray.cluster_resources().get("CPU", 0)
    free = total - reserved_cpus
    grows = free < d.cpus_per_tokenize_worker and can_grow()
    if free < d.cpus_per_tokenize_worker and not grows:
        raise ClusterError(
            f"no CPU left for tokenize actors: training workers reserve {reserved_cpus:g} of the cluster's "
            f"{total:g} CPUs; set data.materialize: true (tokenize before training), lower scaling.cpus_per_worker "
            "or data.cpus_per_tokenize_worker, or add CPU nodes"
        )
    if grows:
        free = d.cpus_per_tokenize_worker * (needed or 2)
    weights = weights or [1.0]
    if d.num_tokenize_workers:
        n = min(mixture_caps(d.num_tokenize_workers, weights, "data.num_tokenize_workers")[source], units)
        return n, n
    cap = int(free // d.cpus_per_tokenize_worker)
    if not grows:
        cap = mixture_caps(cap, weights, "the free CPUs")[source]
    most = max(1, min(units, cap, d.max_tokenize_workers, needed or units))
    return min(2, most), most


def mixture_caps(actors: int, weights: list[float], what: str = "the free CPUs") -> list[int]:
    """`actors` shared out among a mixture's sources by weight, at least one each (one source: all of them); `what`
    gives the actors, for the error when there are fewer than sources."""
    if len(weights) == 1:
        return [actors]
    if actors < len(weights):
        raise ClusterError(f"the mixture's {len(weights)} sources stream side by side, each needing a tokenize actor, "
                           f"and {what} give {actors}; lower data.cpus_per_tokenize_worker (e.g. 0.5), raise "
                           "data.num_tokenize_workers, set data.materialize: true, or add CPUs")
    caps = [max(1, int(actors * w / sum(weights))) for w in weights]
    while sum(caps) > actors:
        caps[caps.index(max(caps))] -= 1
    return caps


def cpu_threads(local_workers: int) -> int:
    """This node's CPUs (as Ray counts them, and no more than this process may run on) divided among the run's
    workers on it."""
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node), 1)
    return max(1, int(min(cpus, len(os.sched_getaffinity(0))) // max(1, local_workers)))
