"""GPU check of the per-worker loop (one CUDA device, in one process, no Ray needed):

    python bench/gpu.py --out DIR [--steps 30]

1. throughput: a scratch Llama (preset llama-12x1024: 0.25 B parameters with this vocabulary) in bf16
   autocast, seq 2048, micro-batch 8: tokens/s and MFU over the steps after warm-up, peak memory; then Llama-3.2-1B's
   shape with its 128k vocabulary: raypt with HF's own loss, with the chunked one, and with compiled layers, against
   a bare loop over the whole model under torch.compile; beside each peak, what `raypt.plan` counts for its tensors
   (the allocator's reserve above the tensors is what the planner's slack assumes);
2. resume on CUDA: 20 steps straight vs 10 + resume from the step-10 checkpoint: per-step loss difference;
3. non-finite guard on CUDA (fused AdamW's found_inf): a NaN injected in step 4 stops with the step named; in skip
   mode the step is skipped, counted, and the weights stay finite;
4. QLoRA: a small Llama saved locally, loaded in nf4 (bitsandbytes, double quant, bf16 compute) with LoRA r=8 on all
   projections: trains, loss falls, and final/ holds the adapter and a merged bf16 model;
5. FSDP2 on CUDA (one rank: bf16 mixed-precision policy) and the sharded checkpoint of the llama-12x1024 preset with its
   AdamW state: seconds training is blocked by a synchronous save and by an async one (device-to-host copy only);
6. activations: what a decoder layer of Llama-3.2-1B's shape saves for backward under bf16 autocast, and what the
   whole model's forward leaves held for backward, beside what `raypt.plan` counts;
7. tensor_parallel (2 GPUs): Llama-3.2-1B's shape as tensor parallel 2 against FSDP2 over the same 2 GPUs, eager
   and compiled: tokens/s, MFU, peak memory.

    python bench/gpu.py --out DIR --only activations   (parts by name: throughput, throughput_1b, resume, ...)

Prints one JSON object of the numbers (also written to DIR/gpu.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raypt.config import load_config  # noqa: E402
from raypt.loop import LocalContext, NonFiniteError, train  # noqa: E402
from raypt.plan import plan  # noqa: E402


def make_tokenizer(out: Path) -> str:
    from raypt.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, size=rng.integers(2, 9))) for _ in range(3000)]
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(4000)]
    (corpus / "a.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer([str(corpus)], vocab_size=8000, out=str(out / "tok"))
    return str(out / "tok")


def blocks(vocab: int, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    patterns = rng.integers(3, vocab, size=(16, seq_len))
    return patterns[rng.integers(0, 16, size=n)].astype(np.int32)


def cfg_for(tok: str, *sets: str):
    return load_config(None, ["data.train_paths=[unused]", f"tokenizer.path={tok}", "scaling.num_workers=1",
                              "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
                              "train.warmup_steps=2", *sets])


def rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


DEVICE, PRESET, SEQ, MICRO = "cuda", "llama-12x1024", 2048, 8


def speed(tok: str, run_dir: Path, vocab: int, seq: int, micro: int, steps: int, *sets: str) -> dict:
    """Train `steps` steps of one micro-batch each in this process: median tokens/s and MFU after warm-up (kernel
    selection, allocator growth), peak device memory, first and last loss."""
    cfg = cfg_for(tok, f"data.seq_len={seq}", f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
                  f"train.max_steps={steps}", "train.lr=3e-4", *sets)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(cfg, LocalContext(run_dir, blocks(vocab, micro * steps, seq), device=DEVICE))
    every = rows(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # (its checkpoint and export: 20 GB for the 1B shape)
    r = every[5:]
    planned = plan(cfg, gpus=1, vocab_size=vocab)  # its tensors, without the assumed slack, CUDA context and NCCL
    return {"tokens_per_s": round(float(np.median([x["tokens_per_s"] for x in r]))),
            "mfu": round(float(np.median([x["mfu"] for x in r])), 4) if "mfu" in r[0] else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if DEVICE == "cuda" else None,
            "planned_tensors_gb": round(planned.total_gb - planned.runtime_gb, 2),
            "loss_first_last": [every[0]["loss"], r[-1]["loss"]]}


def throughput(tok: str, vocab: int, out: Path, steps: int) -> dict:
    return {"model": f"{PRESET} preset, bf16 autocast", "seq_len": SEQ, "micro_batch": MICRO,
            **speed(tok, out / "speed", vocab, SEQ, MICRO, steps, f"model.preset={PRESET}")}


def throughput_1b(tok: str, out: Path, steps: int) -> dict:
    """Llama-3.2-1B's shape with its 128k vocabulary (model.vocab_size), bf16 autocast, one after the other in this
    process on the same blocks: raypt's loop with HF's own loss (the full fp32 logits) and with the chunked one, eager
    and with compiled layers (train.compile), against a bare loop over the whole model under torch.compile."""
    preset, vocab, seq, micro = ("llama3.2-1b", 128256, 2048, 8) if DEVICE == "cuda" else ("tiny", 16384, 64, 2)
    runs = {name: lambda name=name, sets=sets: speed(tok, out / f"speed-1b-{name}", vocab, seq, micro, steps,
                                                   f"model.preset={preset}", f"model.vocab_size={vocab}", *sets)
            for name, sets in [("hf", ["model.loss=hf", "train.compile=false"]),
                               ("chunked", ["model.loss=chunked", "train.compile=false"]),
                               ("chunked_compiled", ["model.loss=chunked", "train.compile=true"])]}
    runs["bare_compiled"] = lambda: bare_compiled(tok, preset, vocab, seq, micro, steps)
    got = {}
    for name, run in runs.items():
        try:
            got[name] = run()
        except torch.OutOfMemoryError as e:  # (reported: where the eager loss does not fit is a finding)
            got[name] = {"error": f"out of memory: {e}"[:300]}
    base = got["bare_compiled"].get("tokens_per_s")
    for name in ("hf", "chunked", "chunked_compiled"):
        if base and "tokens_per_s" in got[name]:
            got[name]["vs_bare_compiled"] = round(got[name]["tokens_per_s"] / base, 3)
    return {"model": f"{preset} preset, vocab {vocab}, bf16 autocast", "seq_len": seq, "micro_batch": micro, **got}


def bare_compiled(tok: str, preset: str, vocab: int, seq: int, micro: int, steps: int) -> dict:
    """The limit to hold raypt to: the same scratch model and blocks, `torch.compile(model)` (HF's own loss inside
    the graph), bf16 autocast, fused AdamW, no logging, no guard; median tokens/s after 5 warm-up steps."""
    from raypt.model import build_model

    cfg = cfg_for(tok, f"model.preset={preset}", f"model.vocab_size={vocab}", "model.loss=hf")
    model, info = build_model(cfg.model, vocab_size=vocab, seq_len=seq, device=torch.device(DEVICE))
    model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=DEVICE == "cuda")
    data = torch.as_tensor(blocks(vocab, micro * steps, seq), dtype=torch.long, device=DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        x = data[i * micro : (i + 1) * micro]
        with autocast:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tps = micro * seq / float(np.median(times[5:]))
    from raypt.metrics import mfu, peak_flops

    peak = peak_flops(torch.device(DEVICE), None)
    return {"tokens_per_s": round(tps), "mfu": round(mfu(info.flops_per_token, tps, peak), 4) if peak else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None}


def resume(tok: str, vocab: int, out: Path) -> dict:
    data = blocks(vocab, 400, 256, seed=1)
    sets = ["model.preset=small", "data.seq_len=256", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.max_steps=20", "train.checkpoint_every=10", "train.lr=1e-3"]
    train(cfg_for(tok, *sets), LocalContext(out / "straight", data, device=DEVICE))
    part = out / "part"
    train(cfg_for(tok, *sets), LocalContext(part, data, device=DEVICE))
    import shutil

    shutil.rmtree(part / "checkpoint_000020")
    (part / "metrics.jsonl").unlink()
    train(cfg_for(tok, *sets), LocalContext(part, data, device=DEVICE))
    a = {r["step"]: r["loss"] for r in rows(out / "straight")}
    b = {r["step"]: r["loss"] for r in rows(part)}
    diffs = [abs(a[s] - b[s]) for s in b]
    return {"resumed_steps": sorted(b), "max_abs_loss_diff": max(diffs), "exact": max(diffs) == 0.0}


def nan_guard(tok: str, vocab: int, out: Path) -> dict:
    data = blocks(vocab, 200, 128, seed=2)
    sets = ["model.preset=small", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.max_steps=10", "train.log_every=5"]
    res = {}
    os.environ["RAYPT_FAULT"] = "nan:4:0"  # raypt.faults: rank 0's loss is NaN in step 4
    try:
        try:
            train(cfg_for(tok, *sets), LocalContext(out / "nan-stop", data, device=DEVICE))
            res["stop"] = "NOT RAISED"
        except NonFiniteError as e:
            res["stop"] = str(e).split(";")[0]
        r = train(cfg_for(tok, *sets, "train.nonfinite=skip"), LocalContext(out / "nan-skip", data, device=DEVICE))
    finally:
        del os.environ["RAYPT_FAULT"]
    logged = rows(out / "nan-skip")
    res["skip"] = {"steps": r["step"], "skipped_steps": max(x.get("skipped_steps", 0) for x in logged),
                   "final_loss_finite": math.isfinite(r["final_loss"])}
    return res


def qlora(tok: str, vocab: int, out: Path) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = out / "base"
    t = AutoTokenizer.from_pretrained(tok)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(t), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                 bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                                 pad_token_id=t.pad_token_id)).save_pretrained(base)
    t.save_pretrained(base)
    seq, steps = (256, 30) if DEVICE == "cuda" else (32, 3)  # bitsandbytes' CPU kernels are slow: --smoke is tiny
    data = blocks(vocab, 400, seq, seed=3)
    cfg = cfg_for(str(base), f"model.name_or_path={base}", "model.lora=true", "model.quantize=nf4",
                  f"data.seq_len={seq}", "train.micro_batch_size=8", "train.global_batch_size=8",
                  f"train.max_steps={steps}", "train.lr=2e-3")
    t0 = time.perf_counter()
    r = train(cfg, LocalContext(out / "qlora", data, device=DEVICE))
    logged = rows(out / "qlora")
    final = out / "qlora" / "final"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(final)
    return {"steps": r["step"], "loss_first_last": [logged[0]["loss"], logged[-1]["loss"]],
            "seconds": round(time.perf_counter() - t0, 1),
            "adapter": (final / "adapter" / "adapter_model.safetensors").exists(), "merged_dtype": str(merged.dtype)}


def checkpoint_save(tok: str, vocab: int, out: Path) -> dict:
    import socket

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from raypt.checkpoint import Checkpointer
    from raypt.rundata import RunData
    from raypt.model import build_model
    from raypt.optim import build_optimizer
    from raypt.parallel import fsdp_sharder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        device = torch.device(DEVICE)
        cfg = cfg_for(tok, f"model.preset={PRESET}", "scaling.strategy=fsdp", f"data.seq_len={SEQ}")
        model, info = build_model(cfg.model, vocab_size=vocab, seq_len=SEQ, device=device,
                                  shard=fsdp_sharder(cfg.scaling, device, 1, bf16=DEVICE == "cuda"))
        optimizer = build_optimizer(model, cfg.train, device)
        x = torch.as_tensor(blocks(vocab, 2, SEQ), dtype=torch.long, device=device)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        res = {"params": info.total_params}
        for mode in ("sync", "async"):
            ckpt = Checkpointer(str(out / f"ckpt-{mode}"), async_save=mode == "async")
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            state = {"step": 1, "tokens_seen": 0, **RunData([], None).state_dict()}
            ckpt.save(model=model, optimizer=optimizer, state=state, config_yaml="",
                      tokenizer=AutoTokenizer.from_pretrained(tok))
            blocked = time.perf_counter() - t0
            ckpt.wait()
            res[mode] = {"blocked_s": round(blocked, 3), "total_s": round(time.perf_counter() - t0, 3)}
        return res
    finally:
        dist.destroy_process_group()


def activations(tok: str, out: Path) -> dict:
    """What one decoder layer of Llama-3.2-1B's shape saves for backward on this device under bf16 autocast
    (saved-tensor hooks, one layer more), and the memory a forward leaves for backward in the whole model (eager,
    the chunked loss's forward included), each beside what `raypt.plan` counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypt.plan import layer_activation_bytes, saved_for_backward

    preset, vocab, seq, micro = ("llama3.2-1b", 128256, 2048, 8) if DEVICE == "cuda" else ("tiny", 16384, 64, 2)
    cfg = cfg_for(tok, f"model.preset={preset}", f"model.vocab_size={vocab}", f"data.seq_len={seq}",
                  f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}", "train.compile=false")
    from raypt.model import PRESETS

    arch = PRESETS[preset]
    x = torch.randint(0, vocab, (micro, seq), device=DEVICE)

    def saved(layers: int) -> int:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **dict(arch, num_hidden_layers=layers),
                                             attn_implementation="sdpa")).to(DEVICE)

        def forward():
            with torch.autocast(DEVICE, torch.bfloat16):
                model.model(input_ids=x, use_cache=False)

        return saved_for_backward(model, forward)

    measured = saved(3) - saved(2)
    hf = LlamaConfig(vocab_size=vocab, **arch)
    d, kv = hf.hidden_size, hf.num_key_value_heads * (hf.hidden_size // hf.num_attention_heads)
    weights = 2 * d * d + 2 * d * kv + 3 * d * hf.intermediate_size  # q, o; k, v; gate, up, down
    planned = micro * seq * layer_activation_bytes(hf, "autocast") + 2 * weights  # (+ autocast's bf16 copies)
    from raypt.model import build_model

    model, _ = build_model(cfg.model, vocab_size=vocab, seq_len=seq, device=torch.device(DEVICE))
    state = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    with torch.autocast(DEVICE, torch.bfloat16):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    held = (torch.cuda.memory_allocated() - state) if DEVICE == "cuda" else 0
    p = plan(cfg, gpus=1, vocab_size=vocab)
    return {"layer_saved_gb": round(measured / 2**30, 3), "layer_planned_gb": round(planned / 2**30, 3),
            "forward_held_gb": round(held / 2**30, 2), "planned_activations_and_loss_gb": round(p.activations_gb, 2),
            "loss": float(loss)}


def _tp_worker(rank: int, world: int, tp: int, preset: str, vocab: int, seq: int, micro: int, steps: int,
               compile_: bool, port: int, results, cuda: bool) -> None:
    """One rank of `tensor_parallel`: a scratch model built sharded (`raypt.parallel.fsdp_sharder`: FSDP2 over
    world / tp, TP over tp), bf16 compute, trained `steps` steps on random blocks as the loop does it."""
    import torch.distributed as dist

    from raypt import parallel
    from raypt.model import build_model
    from raypt.optim import build_optimizer
    from raypt.settings import ModelConfig, ScalingConfig, TrainConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    sc = ScalingConfig(num_workers=world, strategy="fsdp", tensor_parallel=tp)
    t = TrainConfig(precision="bf16-mixed", lr=3e-4)
    model, info = build_model(ModelConfig(preset=preset, vocab_size=vocab, gradient_checkpointing=cuda),
                              vocab_size=vocab, seq_len=seq, device=device, rank=rank,
                              shard=parallel.fsdp_sharder(sc, device, world, bf16=True))
    if compile_:
        parallel.compile_layers(model)
    optimizer = build_optimizer(model, t, device)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = rank // tp
    x = torch.as_tensor(blocks(vocab, micro * (world // tp), seq, seed=1)[dp * micro:(dp + 1) * micro],
                        dtype=torch.long, device=device)
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        parallel.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if rank == 0:
        step_s = float(np.median(times[min(3, steps - 1):]))  # (after warm-up)
        tps = micro * (world // tp) * seq / step_s
        results.put({"tokens_per_s": round(tps), "tokens_per_s_per_gpu": round(tps / world),
                     "mfu": round(tps / world * info.flops_per_token / 989e12, 4) if cuda else None,
                     "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                     "loss_first_last": [losses[0], losses[-1]]})
    dist.destroy_process_group()


def tensor_parallel(tok: str, out: Path, steps: int) -> dict:
    """Llama-3.2-1B's shape (its 128k vocabulary) on 2 GPUs, one process each over NCCL: tensor parallel 2 (one
    data-parallel rank, micro-batch 8) against FSDP2 over both (micro-batch 4 each: the same 8 sequences a step),
    bf16, every layer checkpointed; eager and with compiled layers. Tokens/s, MFU (H100 peak) and peak memory."""
    import torch.multiprocessing as mp

    gpus = torch.cuda.device_count() if DEVICE == "cuda" else 2
    if gpus < 2:
        return {"skipped": f"needs 2 GPUs, found {gpus}"}
    preset, vocab, seq, micro = ("llama3.2-1b", 128256, 2048, 8) if DEVICE == "cuda" else ("tiny", 512, 64, 4)
    got, ctx = {}, mp.get_context("spawn")
    for name, tp, compile_ in [("fsdp2", 1, False), ("tp2", 2, False), ("fsdp2_compiled", 1, True),
                               ("tp2_compiled", 2, True)]:
        results = ctx.SimpleQueue()
        try:
            mp.spawn(_tp_worker, nprocs=2, args=(2, tp, preset, vocab, seq, micro // (2 // tp), steps, compile_,
                                                 29600 + len(got), results, DEVICE == "cuda"))
            got[name] = results.get()
        except Exception as e:  # noqa: BLE001 (one layout failing must not hide the others)
            got[name] = {"error": f"{type(e).__name__}: {e}"[-400:]}
    for name in ("tp2", "tp2_compiled"):
        other = got.get(name.replace("tp2", "fsdp2"), {}).get("tokens_per_s")
        if other and "tokens_per_s" in got[name]:
            got[name]["vs_fsdp2"] = round(got[name]["tokens_per_s"] / other, 3)
    return {"model": f"{preset} preset, vocab {vocab}, bf16", "seq_len": seq, "sequences_per_step": micro, **got}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks this script, measures nothing")
    ap.add_argument("--only", nargs="*", help="run these parts alone (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global DEVICE, PRESET, SEQ, MICRO
    if args.smoke:
        DEVICE, PRESET, SEQ, MICRO, args.steps = "cpu", "tiny", 64, 2, 8
    else:
        assert torch.cuda.is_available(), "needs CUDA (or --smoke)"
    tok = make_tokenizer(out)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok))
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "vocab": vocab}
    for name, fn in [("throughput", lambda: throughput(tok, vocab, out, args.steps)),
                     ("throughput_1b", lambda: throughput_1b(tok, out, args.steps)),
                     ("resume", lambda: resume(tok, vocab, out)), ("nan_guard", lambda: nan_guard(tok, vocab, out)),
                     ("qlora", lambda: qlora(tok, vocab, out)),
                     ("checkpoint", lambda: checkpoint_save(tok, vocab, out)),
                     ("activations", lambda: activations(tok, out)),
                     ("tensor_parallel", lambda: tensor_parallel(tok, out, args.steps))]:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # one failing part must not hide the others' numbers
            report[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
        report[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: report[name]}), flush=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
