"""A run's configuration: a YAML file + ``--set section.key=value`` overrides, loaded into the typed sections of
`raypt.settings`, checked across fields, and the quantities derived from it (the global batch, accumulation steps).

Every problem in a config (unknown key, wrong type, bad value) is collected and reported at once, with the list of
valid keys, before any cluster time is spent.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raypt import storage
from raypt.errors import UserError
from raypt.schema import apply_overrides, build
from raypt.settings import Config, DataConfig
from raypt.storage import is_uri


class ConfigError(UserError):
    """A config that cannot be used; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


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
    apply_overrides(raw, overrides or [], problems)
    cfg = build(Config, raw, "", problems)
    problems.extend(validate(cfg))  # fields that failed to parse kept their (valid) defaults, so this adds no noise
    if problems:
        raise ConfigError(problems, source)
    storage.configure(cfg.run)  # (this process's requests to storage)
    return cfg


def absolute_paths(cfg: Config) -> Config:
    """Local relative paths made absolute against the working directory, because Ray workers run elsewhere.
    A relative model.name_or_path that is not a local directory is left alone (it is a hub name)."""
    def fix(p: str | None) -> str | None:
        return p if p is None or is_uri(p) else os.path.abspath(p)

    d, tc, m, r = cfg.data, cfg.tokenizer, cfg.model, cfg.run
    sources = [dataclasses.replace(src, paths=[fix(p) for p in src.paths], eval_paths=[fix(p) for p in src.eval_paths])
               for src in d.sources]
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(d, train_paths=[fix(p) for p in d.train_paths],
                                 eval_paths=[fix(p) for p in d.eval_paths], pretokenized=fix(d.pretokenized),
                                 sources=sources),
        tokenizer=dataclasses.replace(tc, path=fix(tc.path)),
        model=dataclasses.replace(m, name_or_path=fix(m.name_or_path) if m.name_or_path and os.path.exists(
            m.name_or_path) else m.name_or_path),
        run=dataclasses.replace(r, storage_path=fix(r.storage_path), resume_from=fix(r.resume_from)),
    )


def config_from_dict(raw: dict) -> Config:
    """A Config from `Config.to_dict()` output (how the launcher hands it to workers)."""
    problems: list[str] = []
    cfg = build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    storage.configure(cfg.run)
    return cfg


def _source_problems(d: DataConfig) -> list[str]:
    p = []
    if d.train_paths or d.eval_paths:
        p.append("data.sources replaces data.train_paths and data.eval_paths: move those paths into a source")
    names = [src.name for src in d.sources]
    for i, src in enumerate(d.sources):
        if not src.name or not src.name.replace("-", "").replace("_", "").isalnum():
            p.append(f"data.sources[{i}].name must be a non-empty name of letters, digits, '-' or '_' (it names "
                     f"metrics and directories), got {src.name!r}")
        elif names.index(src.name) < i:
            p.append(f"data.sources[{i}].name {src.name!r} is used twice; give each source its own name")
        if not src.paths and not d.pretokenized:
            p.append(f"data.sources[{i}].paths is empty: give the source's files, directories or globs")
        if not src.weight > 0:
            p.append(f"data.sources[{i}].weight must be > 0, got {src.weight}")
    return p


@dataclass(frozen=True)
class Source:
    """One corpus of a run, resolved (`sources`): a mixture's source, or the whole of a one-source run's data."""

    name: str
    paths: list[str]
    eval_paths: list[str]
    weight: float
    format: str
    text_field: str


def sources(cfg: Config) -> list[Source]:
    """The run's corpora: data.sources, or one unnamed source made of data.train_paths and data.eval_paths."""
    d = cfg.data
    if not d.sources:
        return [Source("", d.train_paths, d.eval_paths, 1.0, d.format, d.text_field)]
    return [Source(src.name, src.paths, src.eval_paths, src.weight, src.format or d.format,
                   src.text_field or d.text_field) for src in d.sources]


def validate(cfg: Config) -> list[str]:
    """Cross-field checks; returns the problems (empty when the config is usable)."""
    p = []
    d = cfg.data
    if d.sources:
        p.extend(_source_problems(d))
    elif not d.train_paths and not d.pretokenized:
        p.append("data.train_paths is empty: give at least one file, directory or glob of training text "
                 "(or data.pretokenized, or data.sources)")
    if d.seq_len < 2:
        p.append(f"data.seq_len must be at least 2 (a block needs an input and a next token), got {d.seq_len}")
    if d.num_tokenize_workers is not None and d.num_tokenize_workers < 1:
        p.append(f"data.num_tokenize_workers must be >= 1 or null (auto), got {d.num_tokenize_workers}")
    if d.shuffle_tokens < 1:
        p.append(f"data.shuffle_tokens must be >= 1, got {d.shuffle_tokens}")
    if d.max_tokenize_workers < 1:
        p.append(f"data.max_tokenize_workers must be >= 1, got {d.max_tokenize_workers}")
    if d.unit_bytes < 1024:
        p.append(f"data.unit_bytes must be >= 1024, got {d.unit_bytes}")
    if d.docs_per_batch < 1:
        p.append(f"data.docs_per_batch must be >= 1, got {d.docs_per_batch}")
    if d.max_doc_chars < 1024:
        p.append(f"data.max_doc_chars must be >= 1024, got {d.max_doc_chars}")
    if d.document_masking and not (cfg.tokenizer.add_bos or cfg.tokenizer.add_eos):
        p.append("data.document_masking finds documents by their BOS or EOS token, but tokenizer.add_bos and "
                 "tokenizer.add_eos are both false; turn one of them on, or masking off")
    t, m, sc = cfg.train, cfg.model, cfg.scaling
    workers_ok = (len(sc.num_workers) == 2 and 1 <= sc.num_workers[0] <= sc.num_workers[1]
                  if isinstance(sc.num_workers, list) else sc.num_workers >= 1)
    if not workers_ok:
        p.append(f"scaling.num_workers must be a count >= 1 or [min, max] with 1 <= min <= max, got {sc.num_workers}")
    if t.max_steps < 1:
        p.append(f"train.max_steps must be >= 1, got {t.max_steps}")
    if t.log_every < 1:
        p.append(f"train.log_every must be >= 1, got {t.log_every}")
    if t.micro_batch_size < 1:
        p.append(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    if t.global_batch_tokens is not None and t.global_batch_tokens % d.seq_len:
        p.append(f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of data.seq_len ({d.seq_len})")
    tp_ok = _tensor_parallel_problems(cfg, workers_ok, p)
    batch_ok = workers_ok and tp_ok and t.micro_batch_size >= 1 and global_batch_size(cfg) >= 1
    if batch_ok and not sc.elastic:
        per_step = t.micro_batch_size * data_parallel_size(cfg)
        if global_batch_size(cfg) % per_step:
            ranks = ("scaling.num_workers" if sc.tensor_parallel == 1 else
                     f"{data_parallel_size(cfg)} data-parallel ranks (scaling.num_workers / scaling.tensor_parallel)")
            p.append(
                f"the global batch ({global_batch_size(cfg)} sequences) must be a multiple of train.micro_batch_size x "
                f"{ranks} = {per_step}; change one of them"
            )
    elif batch_ok:
        sizes = range(sc.min_workers, sc.max_workers + 1)
        good = [w for w in sizes if splits(global_batch_size(cfg), w, t.micro_batch_size)]
        if len(good) < len(sizes):
            p.append(
                f"the global batch ({global_batch_size(cfg)} sequences) cannot be cut into the same number of "
                f"micro-batches of at most {t.micro_batch_size} on every worker for each size in scaling.num_workers "
                f"{sc.num_workers}; sizes that work: {good or 'none'}: narrow the range, or raise "
                "train.global_batch_size or train.micro_batch_size"
            )
        if sc.fsdp_shard_size is not None:
            p.append("scaling.fsdp_shard_size needs a fixed scaling.num_workers (the shard groups must divide it); "
                     "with an elastic range, shard over all workers (fsdp_shard_size: null)")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.sample_tokens < 0:
        p.append(f"train.sample_tokens must be >= 0 (0: no sample), got {t.sample_tokens}")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not 0 < t.decay_ratio <= 1:
        p.append(f"train.decay_ratio must be in (0, 1], got {t.decay_ratio}")
    if m.dtype == "float16":
        p.append("model.dtype float16 would need loss scaling (a GradScaler), which raypt does not do: use bfloat16 "
                 "(the same memory, with fp32's range) or auto")
    if m.quantize and not m.lora:
        p.append("model.quantize: nf4 trains LoRA adapters on a frozen 4-bit base: set model.lora: true as well")
    if m.quantize and not m.name_or_path:
        p.append("model.quantize needs a pretrained model.name_or_path (a scratch model has nothing to quantize)")
    if m.quantize and sc.strategy == "fsdp":
        p.append("scaling.strategy fsdp cannot shard model.quantize's 4-bit weights (bitsandbytes packs them in "
                 "uint8 tensors FSDP2 cannot split); use scaling.strategy: ddp, whose 4-bit base fits one GPU")
    if m.vocab_size is not None and m.name_or_path:
        p.append("model.vocab_size sizes a scratch model's embedding; a pretrained model keeps its own (remove it)")
    if m.lora and not m.name_or_path:
        p.append("model.lora adapts a pretrained model: set model.name_or_path, or train a scratch model fully "
                 "(model.lora: false)")
    if workers_ok and not sc.elastic and sc.fsdp_shard_size is not None and (
            sc.fsdp_shard_size < 1 or sc.num_workers % sc.fsdp_shard_size):
        p.append(f"scaling.fsdp_shard_size {sc.fsdp_shard_size} must divide scaling.num_workers {sc.num_workers} "
                 "(e.g. the GPUs of one node)")
    if m.checkpoint_every_layers < 1:
        p.append(f"model.checkpoint_every_layers must be >= 1 (1: every layer), got {m.checkpoint_every_layers}")
    if m.lora and m.lora_r < 1:
        p.append(f"model.lora_r must be >= 1, got {m.lora_r}")
    if cfg.run.preemption_check_s < 0:
        p.append(f"run.preemption_check_s must be >= 0 (0: never), got {cfg.run.preemption_check_s}")
    if cfg.run.storage_retries < 1:
        p.append(f"run.storage_retries must be >= 1 (tries of a request, the first included), got "
                 f"{cfg.run.storage_retries}")
    if cfg.run.storage_retry_s < 0:
        p.append(f"run.storage_retry_s must be >= 0, got {cfg.run.storage_retry_s}")
    if cfg.run.checkpoints_to_keep < 1:
        p.append(f"run.checkpoints_to_keep must be >= 1 (the newest checkpoint is always kept), got "
                 f"{cfg.run.checkpoints_to_keep}")
    locations = {"data.train_paths": d.train_paths, "data.eval_paths": d.eval_paths,
                 "data.pretokenized": [d.pretokenized], "tokenizer.path": [cfg.tokenizer.path],
                 "model.name_or_path": [m.name_or_path], "run.storage_path": [cfg.run.storage_path],
                 "run.resume_from": [cfg.run.resume_from]}
    for key, values in locations.items():
        if any(v and has_credentials(v) for v in values):
            p.append(f"{key} carries credentials inside a URI; configs are printed and saved with every checkpoint, "
                     "so give them to every node's environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                     "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL for a non-AWS endpoint; GOOGLE_APPLICATION_CREDENTIALS)")
    return p


def _tensor_parallel_problems(cfg: Config, workers_ok: bool, p: list[str]) -> bool:
    """Adds what keeps scaling.tensor_parallel from working with the rest of the config to `p`; whether the worker
    count splits into tensor-parallel groups (the model's own shapes are checked where it is known:
    `raypt.tensor_parallel.check`)."""
    sc, m, tp = cfg.scaling, cfg.model, cfg.scaling.tensor_parallel
    if tp < 1:
        p.append(f"scaling.tensor_parallel must be >= 1 (1: none), got {tp}")
        return False
    if tp == 1:
        return True
    if sc.strategy != "fsdp":
        p.append("scaling.tensor_parallel shards the model inside groups of workers and FSDP2 over them: set "
                 "scaling.strategy: fsdp")
    if sc.elastic:
        p.append(f"scaling.tensor_parallel needs a fixed scaling.num_workers (a multiple of {tp}), not a range")
        return False
    if sc.fsdp_shard_size is not None:
        p.append("scaling.fsdp_shard_size (HSDP) cannot be combined with scaling.tensor_parallel: FSDP shards over "
                 "all the tensor-parallel groups (fsdp_shard_size: null)")
    if m.lora or m.quantize:
        p.append("scaling.tensor_parallel cannot shard LoRA models (peft wraps the very projections it splits); "
                 "LoRA's trained weights are small: train it with scaling.strategy: fsdp and tensor_parallel: 1")
    if m.loss != "chunked":
        p.append("scaling.tensor_parallel computes the loss over the LM head's vocabulary shards: set model.loss: "
                 "chunked")
    if cfg.data.seq_len % tp:
        p.append(f"data.seq_len {cfg.data.seq_len} must be a multiple of scaling.tensor_parallel {tp} (sequence "
                 "parallelism splits each sequence over the group)")
    if workers_ok and sc.num_workers % tp:
        p.append(f"scaling.num_workers {sc.num_workers} must be a multiple of scaling.tensor_parallel {tp}")
        return False
    return workers_ok


def has_credentials(uri: str) -> bool:
    """A URI with a user:secret@ part or a key/secret/token/password query parameter (pyarrow accepts both)."""
    from urllib.parse import parse_qs, urlsplit

    if not is_uri(uri):
        return False
    parts = urlsplit(uri)
    secret = ("key", "secret", "token", "password", "credential")
    return "@" in parts.netloc or any(s in name.lower() for name in parse_qs(parts.query) for s in secret)


def global_batch_size(cfg: Config) -> int:
    """Sequences per optimizer step over all workers."""
    t = cfg.train
    return t.global_batch_tokens // cfg.data.seq_len if t.global_batch_tokens else t.global_batch_size


def data_parallel_size(cfg: Config, world_size: int | None = None) -> int:
    """Data-parallel ranks among `world_size` workers (default: the most the run allows): each tensor-parallel group
    of scaling.tensor_parallel workers trains on one share of the global batch together."""
    return (world_size or cfg.scaling.max_workers) // cfg.scaling.tensor_parallel


def grad_accum_steps(cfg: Config, world_size: int | None = None) -> int:
    """Micro-batches each of `world_size` workers (default: the most the run allows) accumulates per optimizer step."""
    return micro_batches_per_rank(global_batch_size(cfg), data_parallel_size(cfg, world_size),
                                  cfg.train.micro_batch_size)


def micro_batches_per_rank(global_batch: int, world_size: int, micro_batch_size: int) -> int:
    """The same on every worker (FSDP's collectives pair up forward by forward), enough for the largest share."""
    largest = -(-global_batch // world_size)  # (ceiling divisions)
    return -(-largest // micro_batch_size)


def splits(global_batch: int, world_size: int, micro_batch_size: int) -> bool:
    """Whether every worker's share of the global batch (`stream.rank_rows`) fills each of the common number of
    micro-batches with at least one sequence."""
    return global_batch // world_size >= micro_batches_per_rank(global_batch, world_size, micro_batch_size)


def add_config_args(parser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value (parsed as YAML); repeatable",
    )
