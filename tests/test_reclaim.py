"""The spot reclaim watcher (`raypt/reclaim.py`) against a fake metadata server on loopback. Its drain of a real Ray
node is in test_multinode.py."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raypt import reclaim

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_a_reclaim_notice_drains_with_its_deadline(metadata_server, cloud):
    drained = []
    notice = lambda: reclaim.NOTICES[cloud](metadata_server.url)  # noqa: E731
    threading.Timer(0.3, metadata_server.reclaim, args=(40,)).start()
    t0 = time.time()
    left = reclaim.watch(notice, drained.append, every=0.05)
    assert drained == [pytest.approx(left, abs=0.1)] and metadata_server.polls >= 3  # (none at first: polled on)
    if cloud == "aws":  # the time EC2 names, in whole seconds
        assert left == pytest.approx(metadata_server.reclaim_at - t0, abs=1.5)
    else:  # GCP names none: its documented notice
        assert left == reclaim.GCP_NOTICE_S


def test_a_failing_metadata_server_is_retried_not_fatal(metadata_server, caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            return reclaim.aws_notice("http://127.0.0.1:9", timeout=0.2)  # (nothing listens: refused)
        return reclaim.aws_notice(metadata_server.url)

    metadata_server.reclaim(100)
    assert reclaim.watch(flaky, lambda s: None, every=0.01) == pytest.approx(100, abs=2)
    assert len(calls) == 3 and "retrying" in caplog.text


def test_it_runs_as_a_plain_script():
    """Cluster files copy the file alone to each node, where raypt is not installed."""
    out = subprocess.run([sys.executable, str(ROOT / "raypt" / "reclaim.py"), "--help"], cwd="/",
                         capture_output=True, text=True, check=True).stdout
    assert "--cloud" in out


def test_a_failed_drain_is_tried_again_until_its_deadline(metadata_server):
    """The GCS unreachable for a moment: the drain is retried with the time still left, not given up."""
    tries = []

    def drain(left):
        tries.append(left)
        if len(tries) < 3:
            raise ConnectionError("GCS unavailable")

    metadata_server.reclaim(60)
    reclaim.watch(lambda: reclaim.aws_notice(metadata_server.url), drain, every=0.05)
    assert len(tries) == 3 and tries[0] > tries[2] > tries[0] - 1  # (the same deadline, counted down)
    assert metadata_server.polls == 1  # (the notice read once)
