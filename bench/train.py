"""Training-loop benchmark: raypt (1 Ray Train worker) vs the Hugging Face Trainer vs a bare PyTorch loop
(plus raypt's loop in one process without Ray, to tell the loop's cost from Ray's), each also compiled.

    python bench/train.py [--steps 60] [--warmup 10]

Same tiny Llama (4 layers, d=256, 8 heads, 4 KV heads, 8k vocab), same initial weights (saved once), same blocks of
256 tokens in the same order, batch 8, AdamW (0.9, 0.95), constant LR, clip 1.0, fp32 on CPU. Each runs in its own
fresh process. raypt runs three ways: one worker holding every CPU, and with scaling as a user leaves it (1 CPU
reserved) with one thread (what Ray alone sets) and with its default threads. Reported: steady-state tokens/s (steps
after --warmup), the ratios, and the first losses side by side (they must agree to float noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "cnews" / "train"
SEQ, BATCH, LR = 256, 8, 1e-3


def prepare(tmp: Path, steps: int) -> None:
    """Tokenizer, packed blocks (one Parquet file, in order) and the initial model, shared by all three."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raypt.corpus import iter_documents, list_files
    from raypt.packing import BlockPacker
    from raypt.tokenizer import DocumentEncoder, train_tokenizer

    train_tokenizer([str(CORPUS)], 8000, str(tmp / "init"))
    tok = AutoTokenizer.from_pretrained(tmp / "init")
    from collections import Counter

    docs = [d for f in list_files([str(CORPUS)]).files for d in iter_documents(f, "text", Counter())]
    blocks = BlockPacker(SEQ).add(DocumentEncoder(tok, tok.bos_token_id, tok.eos_token_id)(docs))
    blocks = blocks[: steps * BATCH]
    assert len(blocks) == steps * BATCH, f"corpus too small for {steps} steps"
    for split in ("train", "eval"):
        (tmp / "data" / split).mkdir(parents=True)
        rows = blocks if split == "train" else blocks[:BATCH]
        pq.write_table(pa.table({"input_ids": pa.array(list(rows), pa.list_(pa.int32()))}),
                       tmp / "data" / split / "part-0.parquet")
    np.save(tmp / "blocks.npy", blocks)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ,
                                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                     ).save_pretrained(tmp / "init")


def bare(tmp: Path, compiled: bool = False) -> dict:
    """The limit: a plain PyTorch loop over the same blocks (`compiled`: the whole model under torch.compile)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp / "init", dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    blocks = torch.as_tensor(np.load(tmp / "blocks.npy"), dtype=torch.long)
    losses, times = [], []
    model.train()
    for i in range(0, len(blocks), BATCH):
        t0 = time.perf_counter()
        x = blocks[i : i + BATCH]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return {"losses": losses, "step_s": times}


def hf_trainer(tmp: Path) -> dict:
    """The Hugging Face Trainer used the classic way, on the same blocks in the same order."""
    import numpy as np
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    blocks = np.load(tmp / "blocks.npy").astype(np.int64)
    ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    model = AutoModelForCausalLM.from_pretrained(tmp / "init", dtype=torch.float32)
    losses, times = [], []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    class InOrder(Trainer):  # the same order as the other two, not a shuffle
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=BATCH, learning_rate=LR, adam_beta1=0.9,
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    InOrder(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
            callbacks=[Record()]).train()
    return {"losses": losses, "step_s": times}


def raypt_settings(tmp: Path, steps: int, scaling: tuple[str, ...] = (f"scaling.cpus_per_worker={os.cpu_count()}",)
                   ) -> list[str]:
    """One worker on blocks read before training; `scaling`: the worker's CPUs and threads."""
    return [f"data.pretokenized={tmp / 'data'}", "data.materialize=true", f"data.seq_len={SEQ}",
            f"model.name_or_path={tmp / 'init'}", "model.dtype=float32", "scaling.num_workers=1", *scaling,
            f"train.max_steps={steps}",
            f"train.global_batch_size={BATCH}", f"train.micro_batch_size={BATCH}", f"train.lr={LR}",
            "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.weight_decay=0.0", "train.log_every=1",
            "train.eval_every=0", "train.checkpoint_every=0", "train.eval_batches=1",
            f"run.storage_path={tmp / 'runs'}", "data.shuffle=false"]  # the Trainer's order


def metrics_of(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"losses": [r["loss"] for r in rows], "step_s": [SEQ * BATCH / r["tokens_per_s"] for r in rows]}


def raypt_in_process(tmp: Path) -> dict:
    """raypt's loop without Ray (LocalContext): separates the loop's own cost from Ray's."""
    import numpy as np

    from raypt.config import load_config
    from raypt.loop import LocalContext, train

    blocks = np.load(tmp / "blocks.npy")
    cfg = load_config(None, raypt_settings(tmp, len(blocks) // BATCH) + ["run.name=local"])
    train(cfg, LocalContext(tmp / "runs" / "local", blocks))
    return metrics_of(tmp / "runs" / "local")


def raypt_run(tmp: Path, steps: int, name: str, scaling: tuple[str, ...]) -> dict:
    argv = [a for s in raypt_settings(tmp, steps, scaling) + [f"run.name={name}"] for a in ("--set", s)]
    run = subprocess.run([sys.executable, "-m", "raypt.train", *argv], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"raypt failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return metrics_of(tmp / "runs" / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the tokens/s")
    ap.add_argument("--only", choices=("bare", "bare_compiled", "hf", "local"), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:  # a child process: one method, result as JSON
        fn = {"bare": bare, "bare_compiled": lambda t: bare(t, compiled=True), "hf": hf_trainer,
              "local": raypt_in_process}[args.only]
        print(json.dumps(fn(Path(args.tmp))))
        return 0
    if not CORPUS.is_dir():
        print(f"skipped: {CORPUS} is not here (the benchmark corpus lives in ../shared)")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="raypt-bench-train-"))
    try:
        prepare(tmp, args.steps)
        res = {}
        for name in ("bare", "bare_compiled", "hf", "local"):
            out = subprocess.run([sys.executable, __file__, "--only", name, "--tmp", str(tmp)], capture_output=True,
                                 text=True, cwd=ROOT)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-4000:]}")
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        res["raypt"] = raypt_run(tmp, args.steps, "bench", (f"scaling.cpus_per_worker={os.cpu_count()}",))
        # scaling as a user leaves it (1 CPU reserved per worker): one thread, as Ray alone sets it, and raypt's default
        res["ray1"] = raypt_run(tmp, args.steps, "ray1", ("scaling.cpu_threads=1",))
        res["default"] = raypt_run(tmp, args.steps, "default", ())
        res["compiled"] = raypt_run(tmp, args.steps, "compiled", (f"scaling.cpus_per_worker={os.cpu_count()}",
                                                                   "train.compile=true"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tps = {k: SEQ * BATCH * len(v["step_s"][args.warmup:]) / sum(v["step_s"][args.warmup:]) for k, v in res.items()}
    print(f"tiny Llama 4x256, seq {SEQ}, batch {BATCH}, {args.steps} steps, fp32 CPU ({os.cpu_count()} cores); "
          f"tokens/s over steps {args.warmup + 1}-{args.steps}:")
    print("| loop | tokens/s | vs bare loop | vs HF Trainer | vs bare compiled |\n|---|---:|---:|---:|---:|")
    names = {"raypt": f"raypt (Ray Train, 1 worker of {os.cpu_count()} CPUs)",
             "default": "raypt, default scaling (1 CPU reserved; threads: the node's CPUs)",
             "ray1": "raypt, default scaling with 1 thread (as Ray alone sets it)",
             "local": "raypt loop in-process (no Ray)", "hf": "HF Trainer", "bare": "bare PyTorch loop",
             "compiled": f"raypt, train.compile (1 worker of {os.cpu_count()} CPUs)",
             "bare_compiled": "bare PyTorch loop, torch.compile(model)"}
    for k, name in names.items():
        print(f"| {name} | {tps[k]:,.0f} | {tps[k] / tps['bare']:.3f} | {tps[k] / tps['hf']:.3f} "
              f"| {tps[k] / tps['bare_compiled']:.3f} |")
    n = min(50, *(len(v["losses"]) for v in res.values()))
    worst = max(abs(res["raypt"]["losses"][i] - res[k]["losses"][i]) for i in range(n) for k in ("bare", "hf", "local"))
    rel = max(abs(res[k]["losses"][i] / res[e]["losses"][i] - 1) for i in range(n)
              for k, e in (("compiled", "raypt"), ("bare_compiled", "bare")))
    print(f"\nfirst {n} losses (max |raypt - other| = {worst:.2e}; compiled vs eager: max relative difference "
          f"{rel:.1e}):\nstep  raypt     HF        bare")
    for i in range(n):
        print(f"{i + 1:4d}  {res['raypt']['losses'][i]:.5f}  {res['hf']['losses'][i]:.5f}  {res['bare']['losses'][i]:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
