"""A node's watch for its cloud's reclaim notice, which neither the `ray up` autoscaler (v1) nor KubeRay passes on
to Ray: poll the instance metadata and, on a notice, drain this node for preemption with the notice's deadline. Ray
Train's watcher then hands the notice to the run's workers, which checkpoint at once
(`raypt.train.preemption_notice`, `raypt.loop.Training.check_preemption`).

    python reclaim.py --cloud aws|gcp [--every 2] [--metadata-url URL] [--address GCS] [--node-id HEX]

AWS: the spot `instance-action` (IMDSv2), which names the time of the reclaim, two minutes ahead. GCP: the
`instance/preempted` flag, which gives ~30 s. The cluster files copy this file to every worker node and start it
there (on an on-demand node no notice ever comes): it needs Python and Ray alone (raypt itself comes with the job),
and waits for Ray to start on the node.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime

log = logging.getLogger("raypt.reclaim")

METADATA = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
GCP_NOTICE_S = 30.0
"""Seconds between GCP's preempted flag and the VM's stop (Compute Engine's documented notice)."""


def _get(url: str, headers: dict, timeout: float, method: str = "GET") -> str | None:
    """The body of a metadata request, or None for 404 (no notice)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=timeout) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def aws_notice(base: str, timeout: float = 2.0) -> float | None:
    """Seconds until EC2 reclaims this spot instance, or None while it does not (IMDSv2: a session token, then
    `spot/instance-action`, which is 404 until the notice: {"action": "terminate"|"stop"|"hibernate", "time": ISO})."""
    token = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, timeout, "PUT")
    body = _get(f"{base}/latest/meta-data/spot/instance-action", {"X-aws-ec2-metadata-token": token or ""}, timeout)
    if body is None:
        return None
    when = datetime.fromisoformat(json.loads(body)["time"].replace("Z", "+00:00"))
    return max(0.0, when.timestamp() - time.time())


def gcp_notice(base: str, timeout: float = 2.0) -> float | None:
    """`GCP_NOTICE_S` once Compute Engine flags this VM preempted, else None."""
    body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}, timeout)
    return GCP_NOTICE_S if body is not None and body.strip().upper() == "TRUE" else None


NOTICES = {"aws": aws_notice, "gcp": gcp_notice}


def watch(notice, drain, every: float = 2.0, stop=lambda: False) -> float | None:
    """Poll `notice()` (seconds left, or None) every `every` seconds until it gives a deadline; then `drain(seconds
    left)` and return the seconds left at the notice. A failed poll (the metadata server busy) or drain (the GCS
    restarting) is logged and tried again, the drain until its deadline."""
    deadline = None
    while not stop():
        if deadline is None:
            try:
                left = notice()
            except (OSError, ValueError, KeyError) as e:
                log.warning("reading the reclaim notice failed (%s: %s); retrying", type(e).__name__, e)
                left = None
            deadline = None if left is None else time.time() + left
        if deadline is not None:
            try:
                drain(max(0.0, deadline - time.time()))
                return left
            except Exception as e:  # noqa: BLE001 (whatever Ray raises: the node goes anyway; keep trying)
                if time.time() > deadline:
                    raise
                log.warning("draining this node failed (%s: %s); retrying", type(e).__name__, e)
        time.sleep(every)
    return None


def drain(gcs_address: str, node_id: str, left: float, message: str) -> None:
    """Drain Ray node `node_id` (hex) for preemption, its deadline `left` seconds from now."""
    import ray
    from ray.core.generated import autoscaler_pb2

    deadline_ms = time.time_ns() // 1_000_000 + int(left * 1000)
    accepted, why = ray._raylet.GcsClient(address=gcs_address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")


def local_node(gcs_address: str) -> str:
    """The hex id of the live Ray node with this machine's IP address."""
    import ray

    ip = ray.util.get_node_ip_address(gcs_address)  # (the address `ray start` took: the one facing the GCS)
    nodes = [n for n in ray._raylet.GcsClient(address=gcs_address).get_all_node_info().values()
             if n.node_manager_address == ip and n.state == 0]  # (0: ALIVE)
    if len(nodes) != 1:
        raise RuntimeError(f"{len(nodes)} live Ray nodes at {ip} ({socket.gethostname()}): pass --node-id")
    return nodes[0].node_id.hex()


def wait_for_ray(every: float) -> str:
    """The GCS address `ray start` wrote on this machine, once it has."""
    from ray._private.utils import read_ray_address

    while (address := read_ray_address()) is None:
        time.sleep(every)
    return address


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cloud", choices=sorted(NOTICES), required=True)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between metadata polls (default 2)")
    ap.add_argument("--metadata-url", help="the metadata server (default: the cloud's)")
    ap.add_argument("--address", help="the GCS address (default: the one `ray start` wrote on this machine)")
    ap.add_argument("--node-id", help="the Ray node to drain (default: the one with this machine's IP)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    address = a.address or wait_for_ray(a.every)
    base = a.metadata_url or METADATA[a.cloud]
    log.info("watching %s for a reclaim notice (Ray at %s)", base, address)

    def drain_here(left: float) -> None:  # (the node is looked up at the notice: Ray may have restarted since)
        node = a.node_id or local_node(address)
        drain(address, node, left, f"{a.cloud} reclaims this instance in {left:.0f} s")
        log.info("reclaim notice: drained Ray node %s, %.0f s left", node, left)

    watch(lambda: NOTICES[a.cloud](base), drain_here, a.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
