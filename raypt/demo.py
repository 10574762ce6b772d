"""The offline demo corpus: the Python documentation topics that ship with every Python (pydoc_data), as JSON lines.

    python -m raypt.demo --out out/demo

writes ``out/demo/train/topics.jsonl`` and ``out/demo/eval/topics.jsonl`` (every tenth topic held out); ~465k
characters of real English technical prose, no network needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raypt.cli import command


def write_demo_corpus(out: str | Path) -> Path:
    from pydoc_data.topics import topics

    out = Path(out)
    for split in ("train", "eval"):
        (out / split).mkdir(parents=True, exist_ok=True)
    with open(out / "train" / "topics.jsonl", "w", encoding="utf-8") as tr, \
            open(out / "eval" / "topics.jsonl", "w", encoding="utf-8") as ev:
        for i, (name, text) in enumerate(sorted(topics.items())):
            (ev if i % 10 == 9 else tr).write(json.dumps({"topic": name, "text": text}) + "\n")
    return out


def write_tiny_model(corpus: Path, out: str | Path, vocab_size: int = 2048) -> Path:
    """A small Llama (random weights) with a tokenizer trained on the demo corpus, saved like a downloaded open
    model: a stand-in base for continued pre-training (LoRA/QLoRA) when no real checkpoint is at hand."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raypt.tokenizer import train_tokenizer

    out = Path(out)
    train_tokenizer([str(corpus / "train")], vocab_size, str(out), fmt="jsonl")
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--tiny-model", metavar="DIR", help="also save a small Llama + tokenizer there (for cpt-qlora-tiny)")


@command(__doc__, "raypt.demo", _arguments)
def main(args) -> None:
    corpus = write_demo_corpus(args.out)
    print(f"demo corpus -> {corpus}")
    if args.tiny_model:
        print(f"tiny base model -> {write_tiny_model(corpus, args.tiny_model)}")


if __name__ == "__main__":
    raise SystemExit(main())
