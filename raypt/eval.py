"""Evaluate a trained model on held-out text:

    python -m raypt.eval --model PATH --data PATH... [--format F] [--seq-len N] [--workers W] [--tasks T,...]

Loss, perplexity and bits per byte over the text's blocks. The text goes through training's own corpus reader, work
units and packer (`raypt.rundata.plan_split`, `raypt.data.pack_unit`) with the model's tokenizer: for a run's own
eval data the blocks are the ones its eval loss was computed on, so the perplexity here is the run's. Bits per byte
(the summed loss in bits over the UTF-8 bytes of the predicted tokens, `raypt.tokenizer.token_bytes`) does not
depend on the tokenizer, so models with different tokenizers compare. Each unit's last tail (< seq_len tokens) is
not scored, as in training; the count is reported. `--workers W` scores the blocks in W Ray tasks (each loads the
model) and sums their totals. `--tasks` hands the model to lm-eval-harness (when installed) for its benchmark tasks.
PATH is anything `raypt.load` reads. The last stdout line is the result as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter

import numpy as np
import torch

from raypt.cli import command, quiet_libraries
from raypt.corpus import FORMATS
from raypt.errors import UserError


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="a run's final/, a LoRA adapter dir or a checkpoint_NNNNNN/ dir")
    ap.add_argument("--data", nargs="+", help="files, directories or globs of held-out text")
    ap.add_argument("--format", choices=FORMATS, help="as data.format (default: the run's, else text)")
    ap.add_argument("--text-field", help="as data.text_field (default: the run's, else text)")
    ap.add_argument("--seq-len", type=int, help="block length (default: the run's data.seq_len)")
    ap.add_argument("--batch-size", type=int, default=8, help="blocks per forward (default 8)")
    ap.add_argument("--max-blocks", type=int, help="score at most this many blocks (the first, in unit order)")
    ap.add_argument("--workers", type=int, default=0, help="score in this many Ray tasks (default: in this process)")
    ap.add_argument("--tasks", help="lm-eval-harness tasks, comma-separated (needs lm-eval installed)")
    ap.add_argument("--include-path", help="a directory of lm-eval task YAML files (local tasks, no downloads)")
    ap.add_argument("--limit", type=int, help="lm-eval: at most this many examples per task")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def eval_config(loaded, args):
    """The run's config (or the defaults) with the data to evaluate in place of its own."""
    from raypt.config import Config

    cfg = loaded.config or Config()
    d = cfg.data
    seq_len = args.seq_len or (d.seq_len if loaded.config is not None else None)
    if not seq_len:
        raise UserError(f"{args.model} has no raypt config.yaml to take the block length from: give --seq-len")
    data = dataclasses.replace(d, train_paths=list(args.data), eval_paths=list(args.data), sources=[],
                               pretokenized=None, seq_len=seq_len, format=args.format or d.format,
                               text_field=args.text_field or d.text_field)
    return dataclasses.replace(cfg, data=data)


def blocks_of(cfg, tok, bos_eos: tuple[int | None, int | None]) -> tuple[np.ndarray, Counter]:
    """The eval text's blocks, unit after unit, as training packs them (documents wrapped in `bos_eos`); the counts
    (tokens, blocks, skips)."""
    from raypt.data import pack_unit
    from raypt.rundata import plan_split
    from raypt.tokenizer import DocumentEncoder

    encode = DocumentEncoder(tok, *bos_eos, cfg.data.max_doc_chars)
    counts: Counter = Counter()
    units = plan_split(cfg, "eval").units
    parts = [pack_unit(unit, cfg.data.format, cfg.data.text_field, encode, cfg.data, counts) for unit in units]
    return np.concatenate(parts), counts


def score(model, blocks: np.ndarray, batch_size: int, nbytes: np.ndarray, docs=None) -> np.ndarray:
    """(summed loss in nats, predicted tokens, their UTF-8 bytes) over `blocks`: each micro-batch's mean loss, as
    the model computes it in training's eval, times its predicted tokens."""
    from raypt.loop import inputs, packs_one_row
    from raypt.loss import IGNORE

    device, one_row = next(model.parameters()).device, packs_one_row(model)
    total = np.zeros(3, np.float64)
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = torch.tensor(blocks[i : i + batch_size], dtype=torch.long, device=device)  # (a read-only view)
            batch = inputs(x, docs, one_row)
            loss = model(**batch, use_cache=False).loss.double().item()
            labels = batch["labels"][:, 1:].cpu().numpy()
            scored = labels[labels != IGNORE]
            total += [loss * len(scored), len(scored), nbytes[scored].sum()]
    return total


def _score_remote(path: str, blocks: np.ndarray, batch_size: int, docs) -> np.ndarray:
    from raypt.load import load
    from raypt.tokenizer import token_bytes

    quiet_libraries()
    loaded = load(path, "cuda" if torch.cuda.is_available() else "cpu")
    return score(loaded.model, blocks, batch_size, token_bytes(loaded.tokenizer), docs)


def score_on_ray(path: str, blocks: np.ndarray, batch_size: int, workers: int, docs) -> np.ndarray:
    """`score` in `workers` Ray tasks, each on its share of the blocks (one GPU each where the cluster has GPUs)."""
    import ray

    from raypt.cluster import init_ray

    init_ray()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_score_remote)
    shares = [s for s in np.array_split(blocks, workers) if len(s)]
    return sum(ray.get([task.remote(path, ray.put(s), batch_size, docs) for s in shares]))


def lm_eval_tasks(loaded, tasks: str, include_path: str | None, batch_size: int, limit: int | None) -> dict:
    """lm-eval-harness's results for `tasks` (its HF model class around the loaded model), metric by task."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-eval-harness: pip install 'raypt[eval]' (or lm-eval)") from None
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    manager = TaskManager(include_path=include_path)
    if unknown := [name for name in names if name not in manager.all_tasks]:
        raise UserError(f"--tasks: unknown lm-eval task(s) {unknown}" + (
            "" if include_path else "; a local task YAML needs --include-path DIR"))
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False)
    return {task: {k: v for k, v in r.items() if isinstance(v, (int, float))}
            for task, r in results["results"].items()}


@command(__doc__, "raypt.eval", _arguments)
def main(args) -> None:
    from raypt.load import load
    from raypt.tokenizer import special_ids, token_bytes

    if not args.data and not args.tasks:
        raise UserError("give --data (held-out text to score) and/or --tasks (lm-eval tasks)")
    quiet_libraries()
    loaded = load(args.model, args.device)
    print(loaded.describe(), file=sys.stderr, flush=True)
    result = {"model": args.model}
    if args.data:
        cfg = eval_config(loaded, args)
        tok, tc = loaded.tokenizer, cfg.tokenizer
        bos_eos = special_ids(tok, tc.add_bos, tc.add_eos, tc.bos_id, tc.eos_id)
        blocks, counts = blocks_of(cfg, tok, bos_eos)
        tails = int(counts["tokens"] - len(blocks) * cfg.data.seq_len)
        if args.max_blocks:
            blocks = blocks[: args.max_blocks]
        if not len(blocks):
            raise UserError(f"--data {' '.join(args.data)} holds no block of {cfg.data.seq_len} tokens "
                            f"({counts['tokens']} tokens in all): give more text or a smaller --seq-len")
        docs = bos_eos if cfg.data.document_masking else None
        if args.workers > 0:
            nats, n, nbytes = score_on_ray(args.model, blocks, args.batch_size, args.workers, docs)
        else:
            nats, n, nbytes = score(loaded.model, blocks, args.batch_size, token_bytes(tok), docs)
        loss = nats / n
        result.update(loss=loss, perplexity=math.exp(min(loss, 50)), bits_per_byte=nats / math.log(2) / nbytes,
                      blocks=len(blocks), seq_len=cfg.data.seq_len, tokens_scored=int(n), bytes_scored=int(nbytes),
                      tokens_not_scored=tails,
                      skipped={k: v for k, v in counts.items() if k.startswith("skipped_")})
        print(f"{len(blocks):,} blocks of {cfg.data.seq_len} tokens: loss {loss:.4f}, perplexity "
              f"{result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits per byte "
              f"({result['tokens_not_scored']:,} tokens in units' tails < seq_len not scored)")
    if args.tasks:
        result["tasks"] = lm_eval_tasks(loaded, args.tasks, args.include_path, args.batch_size, args.limit)
        for task, metrics in result["tasks"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
