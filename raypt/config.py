"""Typed, nested run configuration: YAML file + ``--set section.key=value`` overrides.

Every problem in a config (unknown key, wrong type, bad value) is collected and reported at once, with the list of
valid keys, before any cluster time is spent.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class DataConfig:
    train_paths: list[str] = field(default_factory=list)
    """Files, directories or globs (local, s3://, gs://) of the training corpus."""
    eval_paths: list[str] = field(default_factory=list)
    """Same, for the held-out corpus; empty means no eval."""
    format: Literal["text", "text_file", "jsonl", "parquet"] = "text"
    """text: one document per line; text_file: one document per file; jsonl/parquet: `text_field` of each record."""
    text_field: str = "text"
    """Column / key holding the document text for jsonl and parquet."""
    seq_len: int = 512
    """Tokens per training block."""
    decode_errors: Literal["strict", "replace", "skip"] = "strict"
    """Non-UTF-8 bytes: fail naming file and line, replace with U+FFFD (counted), or skip the document (counted)."""
    num_tokenize_workers: Optional[int] = None
    """Tokenize/pack actors; default: one per CPU in the cluster."""
    docs_per_batch: int = 512
    """Documents handed to a tokenize actor at once."""
    max_doc_chars: int = 1_000_000
    """Longer documents are tokenized in pieces cut at whitespace, which bounds memory for huge lines."""


@dataclass
class TokenizerConfig:
    path: Optional[str] = None
    """Directory loadable by AutoTokenizer; default: the model's directory."""
    add_bos: bool = True
    """Start every document with the BOS token."""
    add_eos: bool = True
    """End every document with the EOS token."""
    bos_id: Optional[int] = None
    """Override the tokenizer's own BOS id."""
    eos_id: Optional[int] = None
    """Override the tokenizer's own EOS id."""


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    """A pretrained model directory or URI to continue from; empty means build a Llama from scratch."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps."""


@dataclass
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (one per GPU when use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""


@dataclass
class RunConfig:
    name: str = "raypt"
    """Run name: the directory under storage_path; re-running a name resumes it."""
    storage_path: str = "runs"
    """Where checkpoints, metrics and the final model go (a shared path or s3:// on multi-node clusters)."""
    seed: int = 0
    """Seeds model init and data order."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``section.key=value`` overrides (values parsed as YAML) and validate.

    Relative paths inside the config are relative to the working directory, as for any command-line tool.
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], source)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(["the top level must be a mapping of sections (data:, model:, ...)"], source)
    problems: list[str] = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} must look like section.key=value")
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parsed
    cfg = _build(Config, raw, "", problems)
    problems.extend(validate(cfg))  # fields that failed to parse kept their (valid) defaults, so this adds no noise
    if problems:
        raise ConfigError(problems, source)
    return cfg


def validate(cfg: Config) -> list[str]:
    """Cross-field checks; returns the problems (empty when the config is usable)."""
    p = []
    d = cfg.data
    if not d.train_paths:
        p.append("data.train_paths is empty: give at least one file, directory or glob of training text")
    if d.seq_len < 2:
        p.append(f"data.seq_len must be at least 2 (a block needs an input and a next token), got {d.seq_len}")
    if d.num_tokenize_workers is not None and d.num_tokenize_workers < 1:
        p.append(f"data.num_tokenize_workers must be >= 1 or null (auto), got {d.num_tokenize_workers}")
    if d.docs_per_batch < 1:
        p.append(f"data.docs_per_batch must be >= 1, got {d.docs_per_batch}")
    if d.max_doc_chars < 1024:
        p.append(f"data.max_doc_chars must be >= 1024, got {d.max_doc_chars}")
    if cfg.scaling.num_workers < 0:
        p.append(f"scaling.num_workers must be >= 0, got {cfg.scaling.num_workers}")
    if cfg.train.max_steps < 1:
        p.append(f"train.max_steps must be >= 1, got {cfg.train.max_steps}")
    return p


def _build(cls: type, raw: Any, prefix: str, problems: list[str]):
    """Instantiate dataclass `cls` from `raw`, appending every problem found to `problems`."""
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        problems.append(f"unknown key {prefix}{key}; valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.", problems)
            continue
        ok, converted = _check(typ, value)
        if ok:
            kwargs[name] = converted
        else:
            problems.append(f"{prefix}{name} must be {_describe(typ)}, got {value!r}")
    return cls(**kwargs)


def _check(typ: Any, value: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, v = _check(arg, value)
            if ok:
                return True, v
        return False, None
    if typ is type(None):
        return value is None, None
    if origin is Literal:
        return value in args, value
    if origin is list:
        if isinstance(value, (str, int, float)) and args and args[0] is str:
            value = [str(value)]  # a single path is a list of one
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _check(args[0], v)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if typ is str:
        return isinstance(value, str), value
    if typ is Any:
        return True, value
    raise TypeError(f"config type {typ} is not supported")


def _describe(typ: Any) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typ is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(typ, str(typ))


def add_config_args(parser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value (parsed as YAML); repeatable",
    )


def config_from_args(args) -> Config:
    """Load the config named on the command line, or exit with every problem listed (no traceback)."""
    try:
        return load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
