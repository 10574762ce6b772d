"""The causal-LM loss: Hugging Face's own (full logits, fp32 cross-entropy) vs raypt's chunked one (`raypt.loss`).

    python bench/loss.py [--vocab 32000 128256] [--seq 512] [--batch 4] [--steps 5] [--device cpu|cuda]

A small Llama (2 layers, hidden 512, tied embeddings), so the LM head and the loss are most of the work, as they are
for a 1B model with a 128k vocabulary. Each variant runs in its own fresh process: forward + backward of one
micro-batch, `--steps` times after one warm-up (gradient buffers allocated before); reported: median seconds per
step, the memory the step adds to what the model already holds (CPU: peak RSS growth; CUDA: peak allocated growth), the loss (it must agree), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(loss: str, vocab: int, seq: int, batch: int, steps: int, device: str) -> dict:
    """In this process: build, warm up, measure."""
    import resource
    import statistics
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypt.loss import use_chunked_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376,
                                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                         tie_word_embeddings=True, max_position_embeddings=seq)).to(device)
    if loss == "chunked":
        use_chunked_loss(model)
    x = torch.randint(0, vocab, (batch, seq), device=device)

    def rss_mb() -> float:
        if device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step() -> float:
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        model.zero_grad(set_to_none=False)
        return out.loss.item()

    for p in model.parameters():  # gradient buffers first: the step's own memory is what the peak adds
        p.grad = torch.zeros_like(p)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    held = rss_mb()
    times, value = [], None
    for _ in range(steps + 1):  # (the first is a warm-up, not timed)
        t0 = time.perf_counter()
        value = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = times[1:]
    return {"loss": loss, "vocab": vocab, "s_per_step": statistics.median(times), "step_mb": rss_mb() - held,
            "value": value}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        loss, vocab = a.one.split(":")
        print(json.dumps(one(loss, int(vocab), a.seq, a.batch, a.steps, a.device)))
        return 0
    print(f"{a.batch} x {a.seq} tokens, {a.device}; each variant in a fresh process")
    for vocab in a.vocab:
        got = {}
        for loss in ("hf", "chunked"):
            cmd = [sys.executable, __file__, "--one", f"{loss}:{vocab}", "--seq", str(a.seq), "--batch",
                   str(a.batch), "--steps", str(a.steps), "--device", a.device]
            got[loss] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                                   .stdout.strip().splitlines()[-1])
        hf, ch = got["hf"], got["chunked"]
        logits_mb = a.batch * a.seq * vocab * 4 / 2**20
        print(f"vocab {vocab:,} (fp32 logits of one micro-batch: {logits_mb:,.0f} MB)")
        for r in (hf, ch):
            print(f"  {r['loss']:8s} {r['s_per_step']:.3f} s/step, step memory {r['step_mb']:,.0f} MB, "
                  f"loss {r['value']:.6f}")
        print(f"  chunked / hf: time {ch['s_per_step'] / hf['s_per_step']:.2f}x, step memory "
              f"{ch['step_mb'] / max(hf['step_mb'], 1):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
