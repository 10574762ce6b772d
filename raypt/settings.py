"""Every setting of a run, by section (the top-level keys of a config file), with its default and what it does.

`raypt.config` loads a YAML file into these and checks them; each field's docstring is its reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

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
    """Corpus bytes per work unit (one tokenize task); small corpora are cut finer so every actor gets work. Every
    pipeline start (each pass and resume) sends the Feeder's node one small row per unit: for corpora of many
    hundreds of GB, raise it (64 MB: 1 TB in 16k units)."""
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
    """Scratch architecture: tiny, small, llama-12x1024 (the classic example), llama3.2-1b, llama3-8b, llama3-70b (the
    shapes of those models; see raypt/model.py PRESETS)."""
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
    """Recompute activations in backward: less memory, ~30% more compute (see checkpoint_every_layers and
    checkpoint_ops for less of both)."""
    checkpoint_every_layers: int = 1
    """With gradient_checkpointing: checkpoint every k-th decoder layer (1: all; 2: every second one keeps its
    activations, half the recomputation, half the memory saved)."""
    checkpoint_ops: Literal["none", "matmuls"] = "none"
    """With gradient_checkpointing: what a checkpointed layer keeps for backward. none: only its input (everything
    recomputed); matmuls: the outputs of its matrix multiplications and attention too (selective activation
    checkpointing: the cheap element-wise ops and norms are recomputed, no matmul is)."""
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
    unless model.quantize (bitsandbytes' 4-bit kernels are opaque to the compiler), off on CPU (slower there:
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
    tensor_parallel: int = 1
    """Tensor parallelism: split every decoder layer's attention heads and MLP width, the embedding and the LM head's
    vocabulary over groups of this many consecutive workers (the GPUs of one node: Ray Train numbers a node's
    workers consecutively), with sequence parallelism on the norms and the loss computed over the vocabulary shards;
    FSDP2 (scaling.strategy: fsdp) shards over the groups: a 2-D mesh, num_workers / tensor_parallel data-parallel
    ranks. 1: none. For 70B-class models, whose layers no longer fit FSDP's all-gathers within one node (README)."""
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
    """Worker-group restarts (from the latest checkpoint) before the run fails. A node reclaimed by its cloud (spot
    capacity) is not a failure: those restarts are not counted."""
    preemption_check_s: float = 2.0
    """Ask Ray Train about every this many seconds of training whether a node of the run is being reclaimed, and for
    an elastic run below its most workers whether the cluster has room for more (0: never). The question is a
    barrier across the workers, so it is asked every N steps, N following the measured step time. On either: a
    checkpoint at that step at once, then a new group of workers (on the nodes left, or a larger one) resumes there
    and trains no step twice."""
    checkpoint_failed: Literal["stop", "continue"] = "stop"
    """A checkpoint that cannot be written (a full disk, storage failing past its retries): stop the run with one line
    naming the file and why, or continue training and try again at the next checkpoint step. Either way the newest
    complete checkpoint stays as it was, and a half-written one is never resumed from."""
    storage_retries: int = 10
    """Tries of one request to object storage (s3://, gs://), the first included, when it fails in a way that may
    pass (throttling, a server error, a reset connection); the waits between them back off exponentially, with jitter.
    Retries are counted in metrics.jsonl (storage_retries)."""
    storage_retry_s: float = 300.0
    """Most seconds one request may take, its tries and the waits between them included."""
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
