"""The run's training data as one object (`RunData`): its sources, each source's files and work units, the
fingerprint that its order depends on, and the position in that order.

The driver builds it once per start (each source's files listed once) and hands it to the pre-flight checks, the
`Feeder` (which streams those units), the eval sets and, without its file lists (`light`), to every worker. Its
`state_dict` / `load_state_dict` pair is what a checkpoint holds of the data: the position, and the fingerprint it
refers to. A position only means the same blocks over the same data, so loading refuses a checkpoint whose
fingerprint differs (or with run.data_changed: restart starts the new data's order from its beginning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from raypt.config import Config, Source, sources
from raypt.corpus import CorpusError, Listing, list_files, plan_units
from raypt.errors import UserError
from raypt.storage import filesystem, is_uri
from raypt.stream import MixPosition, Position
from raypt.tokenizer import TOKENIZER_FILES, EncoderSpec, encoder_spec

MIN_UNITS = 16  # a small corpus is cut finer (down to 64 KB units) so that actors share it; each unit drops a tail
ORDER_VERSION = 2  # bump when the stream definition (raypt.stream) changes: old positions then mean other blocks
FINGERPRINT_FILES = 10_000  # a fingerprint lists this many files at most (beyond that, their digest alone)


class DataChangedError(UserError):
    """A checkpoint's data position that refers to other data than the run has now."""


@dataclass(frozen=True)
class Split:
    """A source's split, planned: its files, and its work units in plan order (text: lists of `Segment`s;
    pre-tokenized: one Parquet file each)."""

    listing: Listing
    units: list


def plan_split(cfg: Config, split: str = "train", src: Source | None = None) -> Split:
    """A source's split (default source: the run's first) listed and cut into work units: a function of the data
    alone (never of the cluster), so a data position recorded by one run means the same units in the next."""
    src = src or sources(cfg)[0]
    if cfg.data.pretokenized:
        listing = pretokenized_files(cfg, split, src)
        return Split(listing, listing.files)
    return plan_text(cfg, split, src)


def plan_text(cfg: Config, split: str, src: Source) -> Split:
    """A source's text files (`plan_split`), whether or not the run reads them pre-tokenized: what
    `python -m raypt.data --out` tokenizes."""
    listing = list_files(src.paths if split == "train" else src.eval_paths, split_field(split, src), src.format)
    return Split(listing, plan_units(listing, src.format, cfg.data.unit_bytes, min_units=MIN_UNITS))


def split_field(split: str, src: Source | None) -> str:
    """The config field that names a source's split, for messages."""
    if src is None or not src.name:
        return f"data.{split}_paths"
    return f"data.sources[{src.name}].{'paths' if split == 'train' else 'eval_paths'}"


def split_dir(root: str, split: str, src: Source) -> str:
    """Where `raypt.data --out` puts a source's split: ROOT/split, or ROOT/split/NAME for a mixture's source."""
    return f"{root}/{split}/{src.name}" if src.name else f"{root}/{split}"


def pretokenized_files(cfg: Config, split: str, src: Source) -> Listing:
    """The Parquet files of a pre-tokenized split, sorted: its units."""
    root = cfg.data.pretokenized
    fs, inner = filesystem(f"{root}/train")
    if split == "train" and not is_uri(root) and fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise CorpusError(f"data.pretokenized {root} has no train/ directory; write it with "
                          f"`python -m raypt.data --config ... --out {root}`")
    path = split_dir(root, split, src)
    listing = list_files([path], "data.pretokenized")
    keep = [i for i, f in enumerate(listing.files) if f.endswith(".parquet")]
    if not keep:
        raise CorpusError(f"data.pretokenized: {path} holds no .parquet files; write it with "
                          "`python -m raypt.data --config ... --out DIR`")
    return Listing([listing.files[i] for i in keep], listing.hidden_skipped, [listing.sizes[i] for i in keep],
                   [listing.mtimes[i] for i in keep])


@dataclass
class RunData:
    """The run's training data and where its order stands (see the module's docstring)."""

    sources: list[Source]
    """One, or a mixture's."""
    train: list[Split] | None
    """Each source's training split; None in a `light` copy."""
    fingerprint: dict | None = None
    """What the order depends on (`fingerprint`); None: not checked (a run without a corpus, in tests)."""
    position: Position | MixPosition = field(default_factory=Position)
    """Where the next training block comes from."""

    @classmethod
    def build(cls, cfg: Config, encoder: EncoderSpec | None = None) -> RunData:
        """List and plan every source's training files (once) and fingerprint them. `encoder`: the run's
        `encoder_spec`, when the caller has it (the tokenizer is not loaded again)."""
        srcs = sources(cfg)
        train = [plan_split(cfg, "train", src) for src in srcs]
        return cls(srcs, train, fingerprint(cfg, srcs, train, encoder))

    def light(self) -> RunData:
        """This object without its file lists: what a training worker needs (fingerprint and position)."""
        return dataclasses.replace(self, train=None)

    @property
    def num_units(self) -> list[int]:
        return [len(s.units) for s in self.train]

    @property
    def weights(self) -> list[float]:
        return [src.weight for src in self.sources]

    # -- the checkpoint's part --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position (a mixture's as [epoch, unit, offset, blocks taken] per source) and the fingerprint."""
        pos = self.position
        if isinstance(pos, MixPosition):
            per_source = [[p.epoch, p.unit, p.offset, t] for p, t in zip(pos.sources, pos.taken)]
            return {"epoch": 0, "unit": 0, "offset": pos.offset, "sources": per_source, "data": self.fingerprint}
        return {"epoch": pos.epoch, "unit": pos.unit, "offset": pos.offset, "sources": None, "data": self.fingerprint}

    def load_state_dict(self, saved: dict, checkpoint: str, on_change: str = "error") -> list[str]:
        """Take a checkpoint's position when it refers to this data; returns what changed (empty: nothing). A
        change is refused (`DataChangedError`, naming the checkpoint and the change) unless `on_change` is
        "restart": the new data's order then starts from its beginning."""
        changes = fingerprint_changes(saved.get("data"), self.fingerprint) if self.fingerprint is not None else []
        if changes and on_change != "restart":
            raise DataChangedError(
                f"the training data changed since {checkpoint}: {'; '.join(changes)}. Its data position would point "
                "at other blocks; restore the data, start a new run.name, or set run.data_changed: restart to keep "
                "the model and optimizer and start the new data's order from the beginning")
        if changes:
            self.position = Position()
        elif saved.get("sources") is not None:
            self.position = MixPosition(tuple(Position(*s[:3]) for s in saved["sources"]),
                                        tuple(s[3] for s in saved["sources"]), saved["offset"])
        else:
            self.position = Position(saved.get("epoch", 0), saved.get("unit", 0), saved.get("offset", 0))
        return changes

    # -- in words -----------------------------------------------------------------------------------------------------
    def where(self) -> str:
        """The position in words."""
        pos = self.position
        if isinstance(pos, MixPosition):
            return "; ".join(f"{src.name} pass {p.epoch + 1} unit {p.unit} block {p.offset} ({taken:,} blocks taken)"
                             for src, p, taken in zip(self.sources, pos.sources, pos.taken)) + \
                f"; mixture block {pos.offset}"
        return f"epoch {pos.epoch}, unit {pos.unit}, block {pos.offset}"

    def passes(self) -> dict:
        """A mixture's pass over each source (1: the first) at the start of the current mixture window, as metrics
        pass/NAME: how often a small source has been upsampled."""
        if not isinstance(self.position, MixPosition):
            return {}
        return {f"pass/{src.name}": p.epoch + 1 for src, p in zip(self.sources, self.position.sources)}


# -- the fingerprint ------------------------------------------------------------------------------------------------


def fingerprint(cfg: Config, srcs: list[Source] | None = None, train: list[Split] | None = None,
                encoder: EncoderSpec | None = None) -> dict:
    """What the data order of a run depends on: the files (path, size; mtime too, reported only), the unit plan, the
    tokenizer's files and special tokens, and every data setting that changes the blocks or their order; for a
    mixture, each source's files, plan and weight. `srcs`, `train`: the sources and their planned splits, when the
    caller has them (default: planned here)."""
    d = cfg.data
    srcs = srcs or sources(cfg)
    train = train or [plan_split(cfg, "train", src) for src in srcs]
    fp: dict = {"order_version": ORDER_VERSION, "seq_len": d.seq_len, "shuffle": d.shuffle,
                "shuffle_tokens": d.shuffle_tokens, "seed": cfg.run.seed}
    if d.pretokenized:
        fp["pretokenized"] = d.pretokenized
    else:
        encoder = encoder or encoder_spec(cfg)
        fp.update(decode_errors=d.decode_errors, unit_bytes=d.unit_bytes, max_doc_chars=d.max_doc_chars,
                  tokenizer=_tokenizer_digest(encoder.path), bos_eos=[encoder.bos_id, encoder.eos_id])
    if len(srcs) == 1 and not srcs[0].name:
        fp.update(_source_fingerprint(cfg, srcs[0], train[0]))
    else:
        fp["sources"] = {src.name: {"weight": src.weight, **_source_fingerprint(cfg, src, split)}
                         for src, split in zip(srcs, train)}
    return fp


def _source_fingerprint(cfg: Config, src: Source, split: Split) -> dict:
    listing = split.listing
    fp: dict = {} if cfg.data.pretokenized else {"format": src.format, "text_field": src.text_field}
    files = [[f, s, round(m, 3)] for f, s, m in zip(listing.files, listing.sizes, listing.mtimes)]
    # (paths and sizes decide; a new mtime alone, say a corpus written again with the same bytes, is only reported)
    fp["num_files"], fp["files_sha256"] = len(files), _digest(json.dumps([f[:2] for f in files]))
    if len(files) <= FINGERPRINT_FILES:  # small enough to keep: a refused resume can then name the file
        fp["files"] = files
    if not cfg.data.pretokenized:
        fp["units_sha256"] = _digest(json.dumps([[dataclasses.astuple(s) for s in u] for u in split.units]))
    return fp


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tokenizer_digest(path: str) -> str:
    """sha256 over the tokenizer's own files in `path` (not a model's weights next to them)."""
    fs, inner = filesystem(path)
    h = hashlib.sha256()
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and info.base_name.startswith(TOKENIZER_FILES):
            with fs.open_input_stream(info.path) as f:
                h.update(info.base_name.encode() + b"\0" + f.read())
    return h.hexdigest()


def fingerprint_changes(saved: dict | None, now: dict, prefix: str = "") -> list[str]:
    """What differs between a checkpoint's data fingerprint and the current one, in words (empty: the same); a
    mixture's sources are compared one by one (`prefix`: the source's, in their words)."""
    if saved is None:
        return ["the checkpoint records no data fingerprint (saved by an older raypt)"]
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in ("files", "files_sha256", "units_sha256", "num_files") or saved.get(key) == now.get(key):
            continue
        if key == "sources" and isinstance(saved.get(key), dict) and isinstance(now.get(key), dict):
            before, after = saved[key], now[key]
            out += [f"source {name}: {'added' if name in after else 'removed'}" for name in sorted(
                set(before) ^ set(after))]
            for name in sorted(set(before) & set(after)):
                out += fingerprint_changes(before[name], after[name], f"source {name}: ")
            continue
        out.append(prefix + ("tokenizer: its files changed" if key == "tokenizer" else
                             f"{key}: {saved.get(key)!r} -> {now.get(key)!r}"))
    if saved.get("files_sha256") != now.get("files_sha256"):
        if "files" in saved and "files" in now:
            before, after = {f[0]: f[1] for f in saved["files"]}, {f[0]: f[1] for f in now["files"]}
            changed = [f"{p} (added)" for p in after if p not in before] + [
                f"{p} (removed)" for p in before if p not in after] + [
                f"{p} (size {before[p]} -> {after[p]})" for p in after if p in before and before[p] != after[p]]
            out.append(prefix + "files: " + ", ".join(changed[:5])
                       + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
        else:
            out.append(f"{prefix}files: the list of {saved.get('num_files')} files changed "
                       f"(now {now.get('num_files')})")
    elif saved.get("units_sha256") != now.get("units_sha256"):
        out.append(prefix + "the work-unit plan changed")
    return out


def touched_files(saved: dict | None, now: dict) -> list[str]:
    """Files of a fingerprint whose size is the same but whose mtime is new (written again, say): reported, since
    only the bytes could tell whether they changed."""
    if saved and isinstance(saved.get("sources"), dict) and isinstance(now.get("sources"), dict):
        return [f for name, fp in now["sources"].items() for f in touched_files(saved["sources"].get(name), fp)]
    if not saved or "files" not in saved or "files" not in now:
        return []
    before = {f[0]: f[1:] for f in saved["files"]}
    return [f[0] for f in now["files"] if f[0] in before and before[f[0]][0] == f[1] and before[f[0]][1] != f[2]]
