"""Where a run's files live: local (or shared) paths and s3:// / gs:// URIs, through pyarrow filesystems.

Every module that reads or writes a path the user gave goes through here: which filesystem a path is on, node-wide
copies of remote directories (models, tokenizers, a replicated checkpoint) made once per node, and the mirror of a
local directory to a URI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs

from raypt.errors import UserError


class StorageError(UserError):
    """A path or URI that cannot be opened; the message names it and why."""


def is_uri(path: str) -> bool:
    """Whether `path` names object storage (s3://, gs://, ...) rather than a local or shared directory."""
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `path` and the path inside it (a local path made absolute)."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as e:  # pyarrow raises several kinds for bad schemes / missing credentials
            raise StorageError(f"cannot open {path}: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


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
            pafs.copy_files(str(f), f"{path}/{f.relative_to(local).as_posix()}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_if_exists(uri: str, local: Path) -> None:
    """Copy the file at `uri` to `local`, when there is one."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
