"""Shared fixtures: one real local Ray per test session, a corpus and a tokenizer the tests make themselves."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ACCEPT_CLUSTER_TOKEN_AUTH", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tests fork Ray workers; keep the driver single-threaded
# Ray Train's controller polls its workers every 2 s: a run's end, or a killed worker, is seen that much later. Tests
# run a few dozen short runs; poll them faster (every Ray process inherits this environment).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The suite is bound by process start-up on 2 cores (each Ray worker imports ray, most also torch). Keep idle task
# workers alive for reuse by the next run instead of ending them after 1 s, and leave out the spot-preemption watcher
# (an actor per run; no node is ever drained here). Production keeps Ray's defaults.
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
os.environ.setdefault("RAY_num_workers_soft_limit", "4")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")  # (Ray Train's Prometheus metrics: nobody scrapes them here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 as a cluster sees it: endpoint and credentials in the environment of every Ray process (set before Ray starts),
# served on loopback by the `s3_server` fixture. Never a real AWS account.
S3_SECRET = "raypt-test-secret-" + os.urandom(6).hex()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="raypt-test-key",
                  AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

EN_WORDS = (
    "the model reads a corpus of text and learns to predict the next token from the tokens before it while the "
    "cluster streams shards through tokenizers into fixed blocks for every worker in the ring of data parallel ranks"
).split()
ZH_CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"


def make_docs(n: int, seed: int = 0) -> list[str]:
    """`n` documents, English and Chinese mixed, of varied length (some longer than a block)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 3 == 2:
            docs.append("".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(5, 200))) + "。")
        else:
            words = [rng.choice(EN_WORDS) for _ in range(rng.randint(3, 120))]
            docs.append(" ".join(words).capitalize() + ".")
    return docs


def write_shards(root: Path, docs: list[str], shards: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        (root / f"shard_{s:02d}.txt").write_text("\n".join(docs[s::shards]) + "\n", encoding="utf-8")
    return root


def end_processes(*marks: str) -> None:
    """End the processes of a Ray head this test started: those whose command line names one of `marks` (its temp
    dir, its GCS port), and all their children (the dashboard and runtime-env agents retitle themselves `ray::...`
    and would otherwise outlive it, polling a dead GCS for the rest of the suite). `ray stop` would end every Ray
    process on the machine, the session's own local Ray included."""
    import signal

    import psutil

    procs = {p.pid: p for p in psutil.process_iter(["cmdline"])
             if p.pid != os.getpid() and any(m in " ".join(p.info["cmdline"] or []) + " " for m in marks)}
    for p in list(procs.values()):
        with contextlib.suppress(psutil.Error):
            procs.update((c.pid, c) for c in p.children(recursive=True))
    procs = list(procs.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


class S3Traffic:
    """What the test S3 server sent: bytes of GET response bodies by request path (/bucket/key), counted as they
    leave the server, whichever process asked."""

    def __init__(self):
        self.sent: Counter = Counter()
        self.gets: Counter = Counter()
        self._lock = threading.Lock()
        self.refuse: str | None = None
        """Objects whose key ends so are refused every write (500 InternalError), as from a store that keeps failing."""
        self.refused = 0
        self.faults: list[tuple[str, float]] = []  # (fault, share of requests): `fail`
        self.injected: Counter = Counter()
        self._rng = random.Random(0)

    def fail(self, seed: int = 0, **shares: float) -> None:
        """Answer a share of all requests with a fault, as a store under load does, chosen at random (seeded):
        `slowdown` (503 SlowDown: throttling), `error` (500 InternalError), `reset` (the connection reset before any
        answer), `delay` (an answer held back 0.5 s). No argument: no more faults. `injected` counts them."""
        with self._lock:
            self.faults, self._rng = list(shares.items()), random.Random(seed)
            self.injected.clear()

    def _fault(self) -> str | None:
        with self._lock:
            x = self._rng.random()
            for fault, share in self.faults:
                if x < share:
                    self.injected[fault] += 1
                    return fault
                x -= share
        return None

    def reset(self) -> None:
        with self._lock:
            self.sent.clear()
            self.gets.clear()

    def requests(self, prefix: str, suffix: str = "") -> int:
        """GET requests for the objects `under` counts."""
        return self._sum(self.gets, prefix, suffix)

    def under(self, prefix: str, suffix: str = "") -> int:
        """Bytes sent of the objects whose key starts with `prefix` ("bucket/key...") and ends with `suffix`."""
        return self._sum(self.sent, prefix, suffix)

    def _sum(self, counts: Counter, prefix: str, suffix: str) -> int:
        with self._lock:
            return sum(n for path, n in counts.items() if path.startswith("/" + prefix) and path.endswith(suffix))

    def wrap(self, app):
        def counted(environ, start_response):
            fault = self._fault()
            if fault == "reset":  # (an RST, not a FIN: the server drops the connection with no linger)
                # (after the request's body: the client is waiting for its answer, as when a store drops it)
                environ["wsgi.input"].read(*[] if environ.get("wsgi.input_terminated") else
                                           [int(environ.get("CONTENT_LENGTH") or 0)])  # (chunked: to its end)
                environ["werkzeug.socket"].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raise ConnectionResetError("an injected reset")  # (the server's Handler closes the connection)
            if fault in ("slowdown", "error"):
                status, code = (("503 Slow Down", "SlowDown") if fault == "slowdown" else
                                ("500 Internal Server Error", "InternalError"))
                start_response(status, [("Content-Type", "application/xml")])
                yield (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>Please try again."
                       "</Message></Error>").encode()
                return
            if fault == "delay":
                time.sleep(0.5)
            if self.refuse and environ["REQUEST_METHOD"] in ("PUT", "POST") and environ["PATH_INFO"].endswith(
                    self.refuse):
                with self._lock:
                    self.refused += 1
                start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
                yield (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                       b"<Message>We encountered an internal error. Please try again.</Message></Error>")
                return
            if environ["REQUEST_METHOD"] == "GET":
                with self._lock:
                    self.gets[environ["PATH_INFO"]] += 1
            body = app(environ, start_response)
            try:
                for chunk in body:
                    if environ["REQUEST_METHOD"] == "GET":
                        with self._lock:
                            self.sent[environ["PATH_INFO"]] += len(chunk)
                    yield chunk
            finally:
                if hasattr(body, "close"):
                    body.close()
        return counted


S3_TRAFFIC = S3Traffic()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's, as its ThreadedMotoServer runs it) on the loopback port in
    AWS_ENDPOINT_URL, its responses counted in `S3_TRAFFIC`; yields a bucket name."""
    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    class Handler(MotoRequestHandler):
        def connection_dropped(self, error, environ=None):
            self.close_connection = True  # (an injected reset: closed now, so the client sees it at once)

    server = make_server("127.0.0.1", port, S3_TRAFFIC.wrap(DomainDispatcherApplication(create_backend_app)),
                         threaded=True, request_handler=Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="raypt-test")
    yield "raypt-test"
    server.shutdown()
    thread.join()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small train/eval corpus in the classic layout: TXT shards, one document per line."""
    root = tmp_path_factory.mktemp("corpus")
    write_shards(root / "train", make_docs(300, seed=1))
    write_shards(root / "eval", make_docs(40, seed=2), shards=1)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> str:
    from raypt.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(corpus / "train")], vocab_size=400, out=str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tokenizer_dir):
    """A small 'open model' saved locally, standing in for a downloaded checkpoint."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def save_tiny_llama(d: Path, tokenizer_dir: str, dtype=None) -> Path:
    """A seeded 2-layer Llama for the tokenizer, saved in `d` (in `dtype`, as a Llama-3 checkpoint is in bf16) with
    the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    (model if dtype is None else model.to(dtype)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@contextlib.contextmanager
def busy():
    """Every core of the machine also busy with a spinning process (CI and clusters are loaded: an order that holds
    only on a quiet machine is not an order). They run at the niceness Ray gives its workers (15), so they compete
    with them as equals instead of starving them."""
    import subprocess
    import sys

    spin = "import os; os.nice(15 - os.nice(0)); exec('while True: pass')"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    try:
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def busy_cpus():
    """`busy` for the whole test."""
    with busy() as n:
        yield n


class FakeMetadata:
    """A cloud's instance metadata server on loopback, as `raypt.reclaim` reads it: AWS's IMDSv2 (a token by PUT,
    `spot/instance-action` 404 until a reclaim) and GCP's (`instance/preempted`, FALSE until one). `reclaim(s)`
    announces one `s` seconds ahead; `polls` counts the reads."""

    def __init__(self):
        import http.server
        import json
        from datetime import datetime, timezone

        meta, self.reclaim_at, self.polls = self, None, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, code: int, body: str = "") -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self):
                ok = self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
                self.reply(200, "token-1") if ok else self.reply(400)

            def do_GET(self):
                meta.polls += 1
                at = meta.reclaim_at
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers["X-aws-ec2-metadata-token"] != "token-1":
                        return self.reply(401)
                    if at is None:
                        return self.reply(404)
                    when = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                    return self.reply(200, json.dumps({"action": "terminate", "time": when}))
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers["Metadata-Flavor"] != "Google":
                        return self.reply(403)
                    return self.reply(200, "FALSE" if at is None else "TRUE")
                self.reply(404)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reclaim(self, seconds: float) -> None:
        import math
        import time

        self.reclaim_at = math.ceil(time.time() + seconds)  # (the notice names a whole second)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata_server():
    server = FakeMetadata()
    yield server
    server.close()
