"""Where a run's files live: local (or shared) paths and s3:// / gs:// URIs, through pyarrow filesystems.

Every module that reads or writes a path the user gave goes through here: which filesystem a path is on, node-wide
copies of remote directories (models, tokenizers, a replicated checkpoint) made once per node, and the mirror of a
local directory to a URI.

Object storage fails now and then at scale: throttling (S3's 503 SlowDown, GCS's 429), 5xx errors, reset connections.
Every request to a URI is retried here, with exponential backoff and full jitter, up to `run.storage_retries` tries and
`run.storage_retry_s` seconds (`configure`), and each retry is counted (`retries`: the training loop logs them per
interval). The AWS SDK's own retries are off for all but writes, so that the count is whole: a multipart upload's
parts keep the SDK's 3 tries (a part that failed would fail the whole file), and `upload` retries a file that failed
anyway. (GCS's client keeps its own retries under raypt's.)
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raypt.errors import UserError


class StorageError(UserError):
    """A path or URI that cannot be opened; the message names it and why."""


def is_uri(path: str) -> bool:
    """Whether `path` names object storage (s3://, gs://, ...) rather than a local or shared directory."""
    return "://" in path


@dataclass(frozen=True)
class Retries:
    """How a request to object storage is retried (`configure`)."""

    attempts: int = 10
    """Tries of one request, the first included."""
    seconds: float = 300.0
    """Most time one request may take, its tries and the waits between them included."""
    base_s: float = 0.1
    """The first wait's most; each further wait's most doubles, up to `cap_s` (each wait: uniform up to its most)."""
    cap_s: float = 20.0


_policy = Retries()
_lock = threading.Lock()
_retried = 0

TRANSIENT = ("SLOW_DOWN", "SlowDown", "THROTTL", "Throttl", "TooManyRequests", "HTTP status 429", "HTTP status 5",
             "INTERNAL_FAILURE", "InternalError", "SERVICE_UNAVAILABLE", "ServiceUnavailable", "NETWORK_CONNECTION",
             "REQUEST_TIMEOUT", "RequestTimeout", "curlCode", "Connection reset", "timed out", "Broken pipe",
             "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
"""What an error from a store says when trying again may help: throttling, a server error, the network (the AWS
SDK's error names and HTTP statuses as pyarrow words them; gRPC's status names for GCS)."""
PERMANENT = ("curlCode: 60,", "curlCode: 6,", "HTTP status 501")
"""...except these, which trying again does not help: a TLS certificate refused, a host name unknown."""


class GaveUp(OSError):
    """A request that failed as often, or for as long, as the retry policy allows (not tried again by an outer
    `retrying`)."""


def configure(run) -> None:
    """This process's retry policy, from the run's config (`RunConfig`: storage_retries, storage_retry_s); every
    process that reads the config sets it (`raypt.config`, the data pipeline's actors and tasks)."""
    global _policy
    _policy = Retries(run.storage_retries, run.storage_retry_s)


def retries() -> int:
    """Requests to object storage this process has tried again so far."""
    return _retried


def transient(e: BaseException) -> bool:
    """Whether trying again may help (pyarrow raises OSError, or for GCS's RESOURCE_EXHAUSTED ArrowCapacityError)."""
    if not isinstance(e, (OSError, pa.ArrowException)) or isinstance(e, (GaveUp, FileNotFoundError, PermissionError,
                                                                          IsADirectoryError, NotADirectoryError)):
        return False
    text = str(e)
    return any(s in text for s in TRANSIENT) and not any(s in text for s in PERMANENT)


def retrying(request, what: str):
    """`request()`, tried again after a transient error (`transient`) while the policy allows, with exponential backoff
    and full jitter (so that hundreds of ranks throttled at once spread their next tries); `what` names it in the
    error raised when it gives up."""
    global _retried
    policy, t0 = _policy, time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return request()
        except (OSError, pa.ArrowException) as e:
            if not transient(e):
                raise
            wait = random.uniform(0, min(policy.cap_s, policy.base_s * 2 ** (attempt - 1)))
            spent = time.monotonic() - t0
            if attempt == policy.attempts or spent + wait > policy.seconds:
                raise GaveUp(f"{what}: {e} (tried {attempt} times in {spent:.0f} s: run.storage_retries, "
                              "run.storage_retry_s)") from None
            with _lock:
                _retried += 1
                first = _retried == 1
            if first:  # (the count goes to the run's metrics; the first error is shown as it is)
                print(f"storage: trying again ({what}: {e}); retries are counted in metrics.jsonl "
                      "(storage_retries)", file=sys.stderr, flush=True)
            time.sleep(wait)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `path` and the path inside it (a local path made absolute). A URI's filesystem
    retries its requests (`retrying`)."""
    if is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except Exception as e:  # pyarrow raises several kinds for bad schemes / missing credentials
            raise StorageError(f"cannot open {path}: {e}") from None
        return pafs.PyFileSystem(_Retrying(fs)), inner
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _without_sdk_retries(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem like `fs` whose SDK tries each request once (other kinds: `fs`). (The options pyarrow's
    pickling leaves out, such as a URI's tls_verify_certificates, are not carried over.)"""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    _, (options,) = fs.__reduce__()
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))


STREAM_BUFFER = 8 << 20
"""Bytes a stream (`open_input_stream`) asks a store for at a time."""


class _Retrying(pafs.FileSystemHandler):
    """A pyarrow filesystem whose every request is `retrying`: listings, metadata, deletes, and each read of a file
    (one ranged GET on S3). Writes go to pyarrow's own filesystem, whose SDK tries each request (each part of a
    multipart upload) 3 times; a whole file is retried by `upload` and the checkpoint's marker by its writer."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs, self.writes = _without_sdk_retries(fs), fs

    def _do(self, what: str, request):
        return retrying(request, f"{what} ({self.fs.type_name})")

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._do(f"reading the information of {paths[0] if paths else '-'}",
                        lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._do(f"listing {selector.base_dir}", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._do(f"creating {path}", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._do(f"deleting {path}", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._do(f"deleting {path}", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete a whole bucket")

    def delete_file(self, path):
        self._do(f"deleting {path}", lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._do(f"moving {src}", lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._do(f"copying {src}", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):  # (buffered: a decompressor's 64 KB reads are not one request each)
        return pa.BufferedInputStream(pa.PythonFile(_Reader(self, path), mode="r"), STREAM_BUFFER)

    def open_input_file(self, path):
        return pa.PythonFile(_Reader(self, path), mode="r")

    def open_output_stream(self, path, metadata):
        return self.writes.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.writes.open_append_stream(path, metadata=metadata)


class _Reader(io.RawIOBase):
    """A file on a store, each read of it one request (`retrying`)."""

    def __init__(self, owner: _Retrying, path: str):
        super().__init__()
        self.owner, self.path, self.pos = owner, path, 0
        self.file = owner._do(f"opening {path}", lambda: owner.fs.open_input_file(path))
        self.size = self.file.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, self.size)[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        data = self.owner._do(f"reading {self.path}", lambda: self.file.read_at(n, self.pos))
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read()

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


def node_copy(uri: str, kind: str, key: str | None = None, files: list[str] | None = None) -> Path:
    """A local copy of the directory at `uri`, shared by the processes of this node: downloaded once into
    $RAYPT_CACHE/kind (default ~/.cache/raypt), the others waiting on a file lock. `key` (default: the URI) names the
    copy; `files`: only these files of the directory (default: all of it)."""
    from filelock import FileLock

    cache = Path(os.environ.get("RAYPT_CACHE", Path.home() / ".cache" / "raypt")) / kind
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / hashlib.sha256((key or uri).encode()).hexdigest()[:16]
    with FileLock(str(dest) + ".lock"):
        if not (dest / ".complete").exists():
            fs, path = filesystem(uri)
            dest.mkdir(exist_ok=True)
            for src, to in [(path, dest)] if files is None else [(f"{path}/{f}", dest / f) for f in files]:
                pafs.copy_files(src, str(to), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            (dest / ".complete").touch()
    return dest


def node_copy_of(uri: str, kind: str, pick) -> Path:
    """A node-wide copy (`node_copy`) of the files at the top of the directory at `uri` that `pick` chooses from
    their sorted names (it may raise, naming what is missing), keyed by their names, sizes and times: files uploaded
    again are fetched again."""
    fs, inner = filesystem(uri)
    infos = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
             if i.type == pafs.FileType.File}
    names = pick(sorted(infos))
    return node_copy(uri, kind, uri + "".join(f"|{n}:{infos[n].size}:{infos[n].mtime_ns}" for n in names), names)


def upload(local: Path, uri: str) -> None:
    """Copy the files under the local directory `local` to the directory `uri`, keeping their relative paths: one
    copy per file (a directory copy would also write an empty marker object for every directory level on S3)."""
    fs, path = filesystem(uri)
    for f in sorted(Path(local).rglob("*")):
        if f.is_file():
            to = f"{path}/{f.relative_to(local).as_posix()}"
            retrying(lambda: pafs.copy_files(str(f), to, source_filesystem=pafs.LocalFileSystem(),
                                             destination_filesystem=fs), f"uploading {f.name} to {to}")


def download_if_exists(uri: str, local: Path) -> None:
    """Copy the file at `uri` to `local`, when there is one."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
