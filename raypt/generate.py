"""Generate text from a trained model:

    python -m raypt.generate --model PATH [--prompt TEXT | --prompts FILE] [--max-new-tokens N]
                             [--temperature T] [--top-p P] [--seed S]

PATH is a run's `final/`, a LoRA adapter directory or a `checkpoint_NNNNNN/` (`raypt.load`), local or s3:// / gs://.
Each prompt's continuation streams to stdout as it is generated, one prompt after another (`--prompts`: a file of
one prompt per line). `--temperature 0` is greedy decoding: the same continuation every time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from raypt.cli import command, quiet_libraries
from raypt.errors import UserError


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="a run's final/, a LoRA adapter dir or a checkpoint_NNNNNN/ dir")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--prompt", help="the text to continue (default: the run's train.sample_prompt, else 'The ')")
    which.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling's mass (default 0.95)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def prompts_of(args, loaded) -> list[str]:
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise UserError(f"--prompts {args.prompts} is not a file")
        lines = [line.rstrip("\n") for line in Path(args.prompts).read_text(encoding="utf-8").splitlines()]
        if not (prompts := [p for p in lines if p.strip()]):
            raise UserError(f"--prompts {args.prompts} holds no prompt (one per line)")
        return prompts
    if args.prompt is not None:
        return [args.prompt]
    return [getattr(getattr(loaded.config, "train", None), "sample_prompt", None) or "The "]


def generate(loaded, prompt: str, *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
             stream=None, min_new_tokens: int | None = None) -> str:
    """The continuation of `prompt` (its text), streamed to `stream` (a text file) as it is made; `loaded` needs a
    `model` and a `tokenizer` (`raypt.load`)."""
    from transformers import TextStreamer

    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    streamer = None
    if stream is not None:
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: (stream.write(text), stream.flush())
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             streamer=streamer, **sampling)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@command(__doc__, "raypt.generate", _arguments)
def main(args) -> None:
    from raypt.load import load

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    quiet_libraries()
    loaded = load(args.model, args.device)
    print(loaded.describe(), file=sys.stderr, flush=True)
    for prompt in prompts_of(args, loaded):
        sys.stdout.write(prompt)
        generate(loaded, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                 seed=args.seed, stream=sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
