"""Finding corpus files and reading documents out of them (local paths, s3://, gs://; .gz transparently).

No Ray here: the Ray Data pipeline (`raypt.data`) and the tokenizer trainer (`raypt.tokenizer`) both read through
these functions, so a corpus means the same thing to both. Skipped input is never silent: every reader counts what it
drops in a `collections.Counter` under a reason name, and the pipeline reports those counts.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypt.errors import UserError
from raypt.storage import filesystem, is_uri

READ_CHUNK = 4 << 20  # bytes read from a stream at a time; lines longer than this are assembled across chunks
FORMATS = ("text", "text_file", "jsonl", "parquet", "hf")
HF_DATA = (".arrow", ".parquet")
"""The data files of a Hugging Face dataset directory (`Dataset.save_to_disk` writes Arrow shards and JSON metadata)."""


class CorpusError(UserError):
    """Bad corpus input; the message names the file (and line) and the fix."""


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


@dataclass
class Listing:
    files: list[str] = field(default_factory=list)
    """Every matched file, sorted, as a local path or URI."""
    hidden_skipped: list[str] = field(default_factory=list)
    """Files under a given directory or glob whose name starts with '.' or '_' (not read, like Ray and Spark do)."""
    sizes: list[int] = field(default_factory=list)
    """Bytes of each file on storage (compressed size for .gz)."""
    mtimes: list[float] = field(default_factory=list)
    """Each file's modification time (seconds since the epoch; 0 where the store gives none)."""


def list_files(paths: list[str], what: str = "data.train_paths", fmt: str = "text") -> Listing:
    """Expand files, directories (recursively) and globs; a path that matches nothing is an error naming it. Sizes
    and times come from the listing itself: one request per directory, not one per file. With `fmt` "hf" a directory
    gives its Arrow/Parquet data files alone (`_hf_data`)."""
    out, infos = Listing(), {}
    for spec in paths:
        fs, inner = filesystem(spec)
        scheme = spec.split("://", 1)[0] + "://" if is_uri(spec) else ""
        root = inner
        if glob.has_magic(inner):
            root = _glob_root(inner)
            found = _glob(fs, inner)
            if not found:
                raise CorpusError(f"{what}: the glob {spec!r} matches no file; check the pattern and the directory")
            candidates = [i.path for i in found]
            infos.update((scheme + i.path, i) for i in found)
        else:
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.NotFound:
                raise CorpusError(f"{what}: {spec!r} does not exist; fix the path (relative paths start at {os.getcwd()})")
            if info.type == pafs.FileType.File:
                out.files.append(scheme + inner)  # named explicitly: read even if hidden
                infos[scheme + inner] = info
                continue
            found = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]
            candidates = [i.path for i in found]
            infos.update((scheme + i.path, i) for i in found)
            if not candidates:
                raise CorpusError(f"{what}: the directory {spec!r} contains no file; point it at the corpus shards")
            if fmt == "hf":
                candidates = _hf_data(fs, inner, spec, candidates, what)
        before = len(out.files)
        for p in sorted(candidates):
            rel = p[len(root):] if p.startswith(root) else p
            hidden = any(_is_hidden(part) for part in rel.split("/") if part)
            (out.hidden_skipped if hidden else out.files).append(scheme + p)
        if len(out.files) == before:
            raise CorpusError(
                f"{what}: {spec!r} only matches hidden files (names starting with '.' or '_'), which are skipped; "
                "name such a file explicitly to read it"
            )
    out.files = sorted(dict.fromkeys(out.files))
    out.sizes = [infos[f].size or 0 for f in out.files]
    out.mtimes = [infos[f].mtime.timestamp() if infos[f].mtime else 0.0 for f in out.files]
    return out


def _hf_data(fs: pafs.FileSystem, inner: str, spec: str, files: list[str], what: str) -> list[str]:
    """A `save_to_disk` directory's data files; a DatasetDict's root is refused (its splits would mix)."""
    info = fs.get_file_info(f"{inner}/dataset_dict.json")
    if info.type == pafs.FileType.File:
        with fs.open_input_stream(info.path) as f:
            splits = json.loads(f.read()).get("splits") or []
        raise CorpusError(f"{what}: {spec!r} is a DatasetDict saved with save_to_disk (splits: "
                          f"{', '.join(sorted(splits))}); give one split's directory, e.g. {spec.rstrip('/')}/"
                          f"{'train' if 'train' in splits else (sorted(splits) or ['SPLIT'])[0]}")
    data = [f for f in files if f.endswith(HF_DATA)]
    if not data:
        raise CorpusError(f"{what}: {spec!r} holds no .arrow or .parquet file; give a directory written by "
                          "datasets' save_to_disk (or its Parquet files)")
    return data


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard."""
    parts = pattern.split("/")
    return "/".join(parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))])


def _glob(fs: pafs.FileSystem, pattern: str) -> list[pafs.FileInfo]:
    if isinstance(fs, pafs.LocalFileSystem):
        return [i for i in fs.get_file_info(glob.glob(pattern, recursive=True)) if i.type == pafs.FileType.File]
    infos = fs.get_file_info(pafs.FileSelector(_glob_root(pattern), recursive=True, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern)]


# ---------------------------------------------------------------------------------------------------------------------
# Work units: which bytes of which files one reader handles


COMPRESSED = (".gz", ".bz2", ".zst", ".lz4", ".br")


@dataclass(frozen=True)
class Segment:
    path: str
    start: int = 0
    end: int = -1
    """Byte range [start, end) of an uncompressed line-oriented file, by where lines start; -1: to the end."""


def plan_units(listing: Listing, fmt: str, target_bytes: int, min_units: int = 1) -> list[list[Segment]]:
    """Split the corpus into units of about `target_bytes` (fewer bytes, down to 64 KB, if that gives fewer than
    `min_units` units).

    Large uncompressed text/jsonl files are cut into byte ranges, so one huge shard still feeds every reader; small
    files are grouped, so per-task overhead stays small. Every byte belongs to exactly one unit, in file order.
    """
    total = sum(listing.sizes)
    target = max(1, min(target_bytes, max(64 << 10, -(-total // max(1, min_units)))))
    segments: list[tuple[Segment, int]] = []
    for path, size in zip(listing.files, listing.sizes):
        splittable = fmt in ("text", "jsonl") and not path.endswith(COMPRESSED) and size > target
        if not splittable:
            segments.append((Segment(path), size))
            continue
        cuts = list(range(0, size, target)) + [size]
        segments.extend((Segment(path, a, b), b - a) for a, b in zip(cuts, cuts[1:]))
    units, unit, unit_bytes = [], [], 0
    for seg, size in segments:
        unit.append(seg)
        unit_bytes += size
        if unit_bytes >= target:
            units.append(unit)
            unit, unit_bytes = [], 0
    if unit:
        units.append(unit)
    return units


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def iter_documents(
    path: str | Segment, fmt: str, counts: Counter, *, text_field: str = "text", decode_errors: str = "strict"
) -> Iterator[str]:
    """Yield the documents of one file (or byte range); count documents and every skip (by reason) in `counts`."""
    seg = path if isinstance(path, Segment) else Segment(path)
    fs, inner = filesystem(seg.path)
    if seg.start == 0:
        counts["files"] += 1
    if fmt == "parquet" or (fmt == "hf" and seg.path.endswith(".parquet")):
        yield from _parquet_docs(fs, inner, seg.path, text_field, counts)
        return
    if fmt == "hf":
        yield from _arrow_docs(fs, inner, seg.path, text_field, counts)
        return
    if fmt not in FORMATS:
        raise CorpusError(f"data.format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "text_file":
        with fs.open_input_stream(inner, compression="detect") as stream:
            yield from _whole_file(stream.read(), seg.path, decode_errors, counts)
        return
    lines = _ranged_lines(fs, inner, seg) if seg.end >= 0 else _stream_lines(fs, inner)
    if fmt == "text":
        yield from _text_lines(lines, seg, decode_errors, counts)
    else:
        yield from _jsonl(lines, seg, text_field, decode_errors, counts)


def _split_lines(read, pos: int, end: int = -1) -> Iterator[tuple[int, bytes]]:
    """(start offset, line without b'\n' or b'\r\n') for lines starting before `end` (-1: all); memory is bounded
    by the longest line."""
    tail = b""
    while True:
        chunk = read(READ_CHUNK)
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if 0 <= end <= pos:
                return
            yield pos, line[:-1] if line.endswith(b"\r") else line
            pos += len(line) + 1
    if tail and not 0 <= end <= pos:
        yield pos, tail[:-1] if tail.endswith(b"\r") else tail


def _stream_lines(fs, inner: str) -> Iterator[tuple[int, bytes]]:
    with fs.open_input_stream(inner, compression="detect") as f:
        yield from _split_lines(f.read, 0)


def _ranged_lines(fs, inner: str, seg: Segment) -> Iterator[tuple[int, bytes]]:
    """The lines that start in [seg.start, seg.end): the line running across seg.start belongs to the range before."""
    with fs.open_input_file(inner) as f:
        pos = seg.start
        if pos > 0:
            f.seek(pos - 1)
            while True:  # skip to just after the first b"\n" at or after pos - 1
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    return
                i = chunk.find(b"\n")
                if i >= 0:
                    pos = f.tell() - len(chunk) + i + 1
                    f.seek(pos)
                    break
        yield from _split_lines(f.read, pos, seg.end)


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (counted only when reporting an error)."""
    fs, inner = filesystem(path)
    n, left = 1, offset
    with fs.open_input_stream(inner, compression="detect") as f:
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _decode(raw: bytes, path: str, offset: int | None, decode_errors: str, counts: Counter) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if decode_errors == "replace":
            counts["documents_with_replaced_bytes"] += 1
            return raw.decode("utf-8", errors="replace")
        if decode_errors == "skip":
            counts["skipped_not_utf8"] += 1
            return None
        where = f":{_line_number(path, offset)}" if offset is not None else ""
        raise CorpusError(
            f"{path}{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); convert the file "
            "to UTF-8, or set data.decode_errors to 'replace' or 'skip'"
        ) from None


def _keep(text: str, counts: Counter, blank_reason: str) -> bool:
    if not text.strip():
        counts[blank_reason] += 1
        return False
    if "\x00" in text:  # NUL never occurs in real text: this is a binary file read as text
        counts["skipped_binary_nul"] += 1
        return False
    counts["documents"] += 1
    return True


def _text_lines(lines, seg: Segment, decode_errors: str, counts: Counter) -> Iterator[str]:
    empty = True
    for offset, raw in lines:
        empty = False
        text = _decode(raw, seg.path, offset, decode_errors, counts)
        if text is not None and _keep(text, counts, "skipped_blank_lines"):
            yield text
    if empty and seg.start == 0:
        counts["skipped_empty_files"] += 1


def _whole_file(raw: bytes, path: str, decode_errors: str, counts: Counter) -> Iterator[str]:
    if not raw.strip():
        counts["skipped_empty_files"] += 1
        return
    text = _decode(raw, path, None, decode_errors, counts)
    if text is not None and _keep(text, counts, "skipped_empty_files"):
        yield text.replace("\r\n", "\n")


def _jsonl(lines, seg: Segment, text_field: str, decode_errors: str, counts: Counter) -> Iterator[str]:
    for offset, raw in lines:
        if not raw.strip():
            counts["skipped_blank_lines"] += 1
            continue
        line = _decode(raw, seg.path, offset, decode_errors, counts)
        if line is None:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(
                f"{seg.path}:{_line_number(seg.path, offset)}: not valid JSON ({e.msg}); fix or remove that line"
            ) from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            counts["skipped_no_text_field"] += 1
            continue
        if _keep(text, counts, "skipped_blank_documents"):
            yield text


def _parquet_docs(fs, inner: str, path: str, text_field: str, counts: Counter) -> Iterator[str]:
    with fs.open_input_file(inner) as f:
        pf = pq.ParquetFile(f)
        _check_column(pf.schema_arrow.names, path, text_field)
        yield from _texts(pf.iter_batches(columns=[text_field], batch_size=4096), counts)


def _arrow_docs(fs, inner: str, path: str, text_field: str, counts: Counter) -> Iterator[str]:
    """An Arrow IPC file as `datasets` writes its shards (the stream format; the file format is read too), a record
    batch at a time."""
    with fs.open_input_file(inner) as f:
        try:
            reader = pa.ipc.open_stream(f)
            batches = iter(reader)
        except pa.ArrowInvalid:
            f.seek(0)
            try:
                reader = pa.ipc.open_file(f)
            except pa.ArrowInvalid as e:
                raise CorpusError(f"{path}: not an Arrow file ({e}); data.format hf reads datasets' save_to_disk "
                                  "directories") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _check_column(reader.schema.names, path, text_field)
        yield from _texts((b.select([text_field]) for b in batches), counts)


def _check_column(names: list[str], path: str, text_field: str) -> None:
    if text_field not in names:
        raise CorpusError(
            f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set data.text_field to the text column"
        )


def _texts(batches, counts: Counter) -> Iterator[str]:
    """The documents of one-column record batches; rows that are not text, or blank, are counted skips."""
    for batch in batches:
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                counts["skipped_no_text_field"] += 1
            elif _keep(text, counts, "skipped_blank_documents"):
                yield text
