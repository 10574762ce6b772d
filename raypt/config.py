"""Typed, nested run configuration: YAML file + ``--set section.key=value`` overrides.

Every problem in a config (unknown key, wrong type, bad value) is collected and reported at once, with the list of
valid keys, before any cluster time is spent.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from raypt.errors import UserError


class ConfigError(UserError):
    """A config that cannot be used; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


FORMAT = Literal["text", "text_file", "jsonl", "parquet", "hf"]


@dataclass
class SourceConfig:
    """One source of a mixture (`data.sources`)."""

    name: str = ""
    """Names its metrics (eval_loss/NAME, pass/NAME) and its directory under `raypt.data --out`."""
    paths: list[str] = field(default_factory=list)
    """Its training files, directories or globs."""
    weight: float = 1.0
    """Its share of every stretch of training blocks: weight / the sum of the weights."""
    eval_paths: list[str] = field(default_factory=list)
    """Its held-out text: eval loss and perplexity are logged for it alone."""
    format: Optional[FORMAT] = None
    """Default: data.format."""
    text_field: Optional[str] = None
    """Default: data.text_field."""


@dataclass
class DataConfig:
    train_paths: list[str] = field(default_factory=list)
    """Files, directories or globs (local, s3://, gs://) of the training corpus (one source; `sources` for several)."""
    eval_paths: list[str] = field(default_factory=list)
    """Same, for the held-out corpus; empty means no eval."""
    format: FORMAT = "text"
    """text: one document per line; text_file: one document per file; jsonl/parquet: `text_field` of each record;
    hf: a Hugging Face dataset saved with `save_to_disk` (one split's directory: its Arrow shards, each a work unit)
    or its Parquet files, `text_field` of each row."""
    text_field: str = "text"
    """Column / key holding the document text for jsonl, parquet and hf."""
    seq_len: int = 512
    """Tokens per training block."""
    decode_errors: Literal["strict", "replace", "skip"] = "strict"
    """Non-UTF-8 bytes: fail naming file and line, replace with U+FFFD (counted), or skip the document (counted)."""
    num_tokenize_workers: Optional[int] = None
    """A fixed number of tokenize/pack actors; default: an autoscaling pool sized to the consumer's need."""
    max_tokenize_workers: int = 64
    """The autoscaling pool's ceiling (also never more than the free CPUs or the work units)."""
    unit_bytes: int = 8 << 20
    """Corpus bytes per work unit (one tokenize task); small corpora are cut finer so every actor gets work. Each
    pipeline start (every pass and resume) costs the head ~0.7 ms and ~0.7 KB per unit (`bench/pipeline_start.py`):
    for corpora of many hundreds of GB, raise it (64 MB: 1 TB in 16k units)."""
    docs_per_batch: int = 512
    """Documents handed to a tokenize actor at once."""
    max_doc_chars: int = 1_000_000
    """Longer documents are tokenized in pieces cut at whitespace, which bounds memory for huge lines."""
    cpus_per_tokenize_worker: float = 1
    """CPUs each tokenize actor reserves (lower it to share a small machine with training workers)."""
    pretokenized: Optional[str] = None
    """A directory written by `python -m raypt.data --out`: train on its Parquet blocks instead of the text paths."""
    shuffle: bool = True
    """Feed blocks in a random order, the same in every run of the same seed (exact resume keeps it): each pass
    visits the work units in a seeded permutation, consecutive whole units are gathered into windows of at least
    shuffle_tokens tokens, and each window is permuted."""
    shuffle_tokens: int = 16 << 20
    """Tokens per shuffle window: what each training node holds of the stream (x4 bytes, twice for the window
    ahead: 128 MB), whatever the seq_len."""
    materialize: bool = False
    """Tokenize the whole corpus before training starts (small corpora, several epochs) instead of streaming."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture: several corpora, each global batch drawing blocks from them in proportion to their weights (a
    deterministic schedule, exactly resumable); a source that runs out starts its next pass. Instead of train_paths
    and eval_paths."""
    document_masking: bool = False
    """Each document in a packed block attends only to itself: position ids restart at every document start (the
    packer's BOS, or the token after its EOS when documents get no BOS) and attention does not cross documents (SDPA,
    eager and flex attention get a block-diagonal causal mask, flash_attention_2 its varlen path); the first token of
    a document is not predicted from the one before it."""


@dataclass
class TokenizerConfig:
    path: Optional[str] = None
    """Directory loadable by AutoTokenizer; default: the model's directory."""
    vocab_size: Optional[int] = None
    """If set and `path` does not exist yet, train a byte-level BPE of this size on data.train_paths into `path`."""
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
    """A pretrained model directory (or s3://, gs:// URI, downloaded once per node) to continue from; null builds
    a Llama from scratch out of `preset` and the overrides below."""
    preset: str = "tiny"
    """Scratch architecture: tiny, small, llama-12x1024 (the classic example), llama3.2-1b, llama3-8b (the shapes of
    those models; see raypt/model.py PRESETS)."""
    vocab_size: Optional[int] = None
    """Scratch model: rows of the embedding (null: the tokenizer's size; larger, e.g. a round 128256, is allowed)."""
    num_hidden_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    rope_theta: Optional[float] = None
    tie_word_embeddings: Optional[bool] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the weights that are not trained (LoRA's frozen base; auto: as saved). Trained weights are fp32
    master weights whatever the saved dtype (see train.precision)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    loss: Literal["chunked", "hf"] = "chunked"
    """chunked: the LM head and cross-entropy a chunk of positions at a time, gradients computed in the same pass
    (never the full (batch, seq, vocab) logits; Llama, Mistral, Qwen2/3); hf: the model's own forward and loss."""
    trust_remote_code: bool = False
    """Run model code shipped inside the checkpoint; off unless you trust its author."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    quantize: Optional[Literal["nf4"]] = None
    """4-bit NF4 base weights (bitsandbytes, double quantisation, bf16 compute) under LoRA: QLoRA."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps (the run also stops at max_tokens if that is set)."""
    max_tokens: Optional[int] = None
    """Stop after this many training tokens (all workers together)."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all workers; gradient accumulation makes up the rest."""
    global_batch_tokens: Optional[int] = None
    """Alternative to global_batch_size: tokens per optimizer step (a multiple of data.seq_len)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one worker."""
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """cosine: warmup then cosine decay; wsd: warmup, stable, then linear decay over the last decay_ratio."""
    warmup_steps: int = 10
    decay_ratio: float = 0.2
    """wsd only: fraction of max_steps spent decaying."""
    weight_decay: float = 0.1
    """AdamW weight decay (never on norms, biases, embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient norm: stop with an error naming the step and rank (no update is applied from that
    step on), or skip that step's update and go on, counting skips up to max_skipped_steps."""
    max_skipped_steps: int = 10
    """With nonfinite: skip, stop once more steps than this were skipped."""
    log_every: int = 10
    eval_every: int = 50
    """Evaluate every N steps and at the end (0: only at the end)."""
    eval_batches: int = 20
    """Micro-batches per worker per evaluation."""
    checkpoint_every: int = 50
    """Checkpoint every N steps and at the end (0: only at the end)."""
    precision: Literal["auto", "bf16-mixed", "fp32"] = "auto"
    """Compute dtype. Trained weights, their gradients and AdamW's moments are fp32 in every mode (bf16 weights
    would round away most updates at continued pre-training's learning rates). bf16-mixed: matmuls in bf16
    (autocast under DDP; FSDP2's MixedPrecisionPolicy, gathering bf16 weights and reducing fp32 gradients); fp32:
    everything in fp32. auto: bf16-mixed on GPU, fp32 on CPU (where bf16 is slower; both run there)."""
    compile: Optional[bool] = None
    """torch.compile each decoder layer (its forward; the layer's hooks, DDP and FSDP2 stay outside, activation
    checkpointing inside since transformers 5.23, and identical layers share one compiled graph); null: on GPU
    unless model.quantize (bitsandbytes' 4-bit kernels are opaque to the compiler), off on CPU (measured:
    `python bench/train.py`)."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU; default: known for common GPUs, none on CPU."""
    sample_prompt: str = ""
    """Text to continue with the final model at the end of the run (empty: "The ")."""
    sample_tokens: int = 40
    """Tokens of that greedy continuation, printed by the driver (0: no sample; the driver then never loads the model)."""


@dataclass
class ScalingConfig:
    num_workers: int | list[int] = 2
    """Ray Train workers (one per GPU when use_gpu); [min, max]: elastic, any size in the range (Ray Train starts
    as many as the cluster holds, shrinks the group when a node is lost and grows it when nodes return, each time
    from the latest checkpoint); the global batch and the data order stay the same at every size."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    cpus_per_worker: float = 1
    """CPUs reserved per worker."""
    cpu_threads: Optional[int] = None
    """CPU training: intra-op threads per worker; null: the node's CPUs divided among the run's workers on it (Ray
    alone would give a worker as many threads as the CPUs it reserves, one by default, though the data pipeline's
    actors sleep most of the time)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: a full replica per worker; fsdp: FSDP2, every decoder layer and the root sharded over the workers
    (parameters, gradients and AdamW state: 1/W each), one layer gathered at a time."""
    fsdp_shard_size: Optional[int] = None
    """fsdp only: shard within groups of this many workers (e.g. the GPUs of a node) and replicate across groups
    (HSDP: all-gathers stay on the node's fast links); null: shard over all workers."""
    reshard_after_forward: bool = True
    """fsdp only: free each layer's gathered parameters after its forward (gathered again in backward); false
    keeps them for backward: less communication, the whole unsharded model in memory."""
    fsdp_sync_every_micro_batch: bool = False
    """fsdp with gradient accumulation: reduce-scatter gradients after every micro-batch, so they stay sharded
    (1/W of the memory); false: only after the last one, accumulating a full unsharded gradient in between."""

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


@dataclass
class RunConfig:
    name: str = "raypt"
    """Run name: the directory under storage_path; re-running a name resumes it."""
    storage_path: str = "runs"
    """Where checkpoints, metrics and the final model go (a shared path or s3:// on multi-node clusters)."""
    seed: int = 0
    """Seeds model init and data order."""
    resume_from: Optional[str] = None
    """A checkpoint directory (of any run) to start from when this run has none of its own."""
    data_changed: Literal["refuse", "restart"] = "refuse"
    """A resume whose data (files, tokenizer, data settings) differs from the checkpoint's: refuse, naming what
    changed; or restart: keep the model and optimizer state and start the new data's order from its beginning."""
    checkpoints_to_keep: int = 3
    max_failures: int = 0
    """Worker-group restarts (from the latest checkpoint) before the run fails."""
    async_checkpoint: Optional[bool] = None
    """Write checkpoints in the background (torch.distributed.checkpoint.async_save): training waits only while the
    state is copied to host memory, not for the disk or the upload. null: on when training on GPUs."""
    report: bool = True
    """Write RUN_DIR/report (report.md and plots, `raypt.report`) at the end of the run."""
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 sends metrics besides metrics.jsonl: TensorBoard (run_dir/tensorboard), Weights & Biases, MLflow
    (`pip install 'raypt[trackers]'`). Accounts and servers come from the environment alone, which the workers get:
    WANDB_API_KEY, WANDB_PROJECT (default raypt), WANDB_MODE=offline; MLFLOW_TRACKING_URI (default: a file store in
    run_dir/mlruns), MLFLOW_EXPERIMENT_NAME (default raypt). A resumed run goes on logging to the same tracker run."""


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


def absolute_paths(cfg: Config) -> Config:
    """Local relative paths made absolute against the working directory, because Ray workers run elsewhere.
    A relative model.name_or_path that is not a local directory is left alone (it is a hub name)."""
    def fix(p: str | None) -> str | None:
        return p if p is None or "://" in p else os.path.abspath(p)

    d, t, m, r = cfg.data, cfg.tokenizer, cfg.model, cfg.run
    sources = [dataclasses.replace(src, paths=[fix(p) for p in src.paths], eval_paths=[fix(p) for p in src.eval_paths])
               for src in d.sources]
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(d, train_paths=[fix(p) for p in d.train_paths],
                                 eval_paths=[fix(p) for p in d.eval_paths], pretokenized=fix(d.pretokenized),
                                 sources=sources),
        tokenizer=dataclasses.replace(t, path=fix(t.path)),
        model=dataclasses.replace(m, name_or_path=fix(m.name_or_path) if m.name_or_path and os.path.exists(
            m.name_or_path) else m.name_or_path),
        run=dataclasses.replace(r, storage_path=fix(r.storage_path), resume_from=fix(r.resume_from)),
    )


def config_from_dict(raw: dict) -> Config:
    """A Config from `Config.to_dict()` output (how the launcher hands it to workers)."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems)
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
    if t.micro_batch_size < 1:
        p.append(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    if t.global_batch_tokens is not None and t.global_batch_tokens % d.seq_len:
        p.append(f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of data.seq_len ({d.seq_len})")
    batch_ok = workers_ok and t.micro_batch_size >= 1 and global_batch_size(cfg) >= 1
    if batch_ok and not sc.elastic:
        per_step = t.micro_batch_size * sc.num_workers
        if global_batch_size(cfg) % per_step:
            p.append(
                f"the global batch ({global_batch_size(cfg)} sequences) must be a multiple of train.micro_batch_size x "
                f"scaling.num_workers = {per_step}; change one of them"
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
    if m.lora and m.lora_r < 1:
        p.append(f"model.lora_r must be >= 1, got {m.lora_r}")
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


def has_credentials(uri: str) -> bool:
    """A URI with a user:secret@ part or a key/secret/token/password query parameter (pyarrow accepts both)."""
    from urllib.parse import parse_qs, urlsplit

    if "://" not in uri:
        return False
    parts = urlsplit(uri)
    secret = ("key", "secret", "token", "password", "credential")
    return "@" in parts.netloc or any(s in name.lower() for name in parse_qs(parts.query) for s in secret)


def global_batch_size(cfg: Config) -> int:
    """Sequences per optimizer step over all workers."""
    t = cfg.train
    return t.global_batch_tokens // cfg.data.seq_len if t.global_batch_tokens else t.global_batch_size


def grad_accum_steps(cfg: Config, world_size: int | None = None) -> int:
    """Micro-batches each of `world_size` workers (default: the most the run allows) accumulates per optimizer step."""
    return micro_batches_per_rank(global_batch_size(cfg), world_size or cfg.scaling.max_workers,
                                  cfg.train.micro_batch_size)


def micro_batches_per_rank(global_batch: int, world_size: int, micro_batch_size: int) -> int:
    """The same on every worker (FSDP's collectives pair up forward by forward), enough for the largest share."""
    largest = -(-global_batch // world_size)  # (ceiling divisions)
    return -(-largest // micro_batch_size)


def splits(global_batch: int, world_size: int, micro_batch_size: int) -> bool:
    """Whether every worker's share of the global batch (`stream.rank_rows`) fills each of the common number of
    micro-batches with at least one sequence."""
    return global_batch // world_size >= micro_batches_per_rank(global_batch, world_size, micro_batch_size)


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
        item = (typing.get_args(typ) or [None])[0]
        if typing.get_origin(typ) is list and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                keys = ", ".join(f.name for f in dataclasses.fields(item))
                problems.append(f"{prefix}{name} must be a list of mappings ({keys}), got {value!r}")
                continue
            kwargs[name] = [_build(item, v, f"{prefix}{name}[{i}].", problems) for i, v in enumerate(value)]
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
