"""What raypt's storage retries cost and buy, against an S3-protocol server on loopback (the test suite's moto server
behind its fault-injecting layer, `tests/conftest.py`).

One process, side by side, on the same objects: a corpus-sized file read in 4 MB requests (as `raypt.corpus` reads
it) and a checkpoint-sized directory uploaded, through

- pyarrow's own S3 filesystem as `FileSystem.from_uri` makes it (the AWS SDK's 3 tries, not counted), and
- raypt's (`raypt.storage.filesystem`: each request retried and counted by raypt, the SDK's own retries off),

first on a store without faults, then with 10 % of requests answered 503 SlowDown and 2 % of connections reset.
Reported: MB/s, requests tried again (raypt's count; the SDK's are invisible), failures, and the ratios.

    python bench/storage.py                # 64 MB file, 24 MB directory, 5 rounds each
    python bench/storage.py --mb 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import conftest  # noqa: E402  (sets AWS_ENDPOINT_URL and credentials for a loopback port)

import pyarrow.fs as pafs  # noqa: E402

from raypt import storage  # noqa: E402

CHUNK = 4 << 20


def serve() -> str:
    import logging

    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    class Handler(MotoRequestHandler):
        def connection_dropped(self, error, environ=None):
            self.close_connection = True

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = make_server("127.0.0.1", port, conftest.S3_TRAFFIC.wrap(DomainDispatcherApplication(create_backend_app)),
                         threaded=True, request_handler=Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="raypt-bench")
    return "raypt-bench"


def read_all(fs: pafs.FileSystem, path: str) -> int:
    n = 0
    with fs.open_input_file(path) as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
    return n


def upload_dir(fs: pafs.FileSystem, local: Path, dest: str, retried: bool) -> None:
    if retried:
        storage.upload(local, f"s3://{dest}")
        return
    for f in sorted(local.rglob("*")):
        if f.is_file():
            pafs.copy_files(str(f), f"{dest}/{f.relative_to(local).as_posix()}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="size of the file read")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bucket = serve()
    work = Path(tempfile.mkdtemp(prefix="raypt-bench-storage-"))
    big = work / "corpus.txt"
    big.write_bytes(os.urandom(args.mb << 20))
    ckpt = work / "checkpoint"
    (ckpt / "state").mkdir(parents=True)
    for r in range(4):  # (four ranks' shards, and the small files beside them)
        (ckpt / "state" / f"__{r}_0.distcp").write_bytes(os.urandom(6 << 20))
    for name in ("train_state.json", "config.yaml", "tokenizer.json", "state/.metadata"):
        (ckpt / name).write_bytes(os.urandom(20_000))
    raw, _ = pafs.FileSystem.from_uri(f"s3://{bucket}/x")
    pafs.copy_files(str(big), f"{bucket}/corpus.txt", destination_filesystem=raw)
    ours, _ = storage.filesystem(f"s3://{bucket}/x")
    dir_mb = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20

    rows = []
    for faults in ({}, {"slowdown": 0.10, "reset": 0.02}):
        for name, fs in (("pyarrow (SDK retries)", raw), ("raypt (counted retries)", ours)):
            for op, mb in (("read", args.mb), ("upload", dir_mb)):
                conftest.S3_TRAFFIC.fail(seed=1, **faults)
                before, failed, t0 = storage.retries(), 0, time.perf_counter()
                for i in range(args.rounds):
                    try:
                        if op == "read":
                            assert read_all(fs, f"{bucket}/corpus.txt") == args.mb << 20
                        else:
                            upload_dir(fs, ckpt, f"{bucket}/ckpt/{name[:5]}{i}", fs is ours)
                    except OSError as e:
                        failed += 1
                        print(f"  {name} {op} failed: {str(e)[:160]}", flush=True)
                seconds = time.perf_counter() - t0
                injected = sum(conftest.S3_TRAFFIC.injected.values())
                conftest.S3_TRAFFIC.fail()
                rows.append((faults and "10% 503 + 2% reset" or "none", name, op, args.rounds * mb / seconds,
                             storage.retries() - before, injected, failed))
                print(f"{rows[-1][0]:>18} | {name:<24} | {op:<6} | {rows[-1][3]:8.1f} MB/s | raypt retries "
                      f"{rows[-1][4]:4d} | faults injected {injected:4d} | failed {failed}/{args.rounds}", flush=True)
    print("\nratios raypt / pyarrow (MB/s):")
    for faults in ("none", "10% 503 + 2% reset"):
        for op in ("read", "upload"):
            a, b = (r[3] for r in rows if r[0] == faults and r[2] == op)
            print(f"  {faults:>18} {op:<6}: {b / a:.2f}")


if __name__ == "__main__":
    main()
