"""What a finished run leaves: the final model (`export`), a sample from it (`end_sample`), the report."""

from __future__ import annotations

from pathlib import Path

import torch

from raypt import parallel
from raypt.checkpoint import full_model_state
from raypt.config import Config
from raypt.metrics import emit
from raypt.model import unwrap


def export(cfg: Config, rank: int, run_dir: Path, model, tok) -> None:
    """`run_dir/final` (every rank calls, rank 0 writes): a model AutoModelForCausalLM loads, plus the tokenizer; LoRA
    also leaves `final/adapter` (PeftModel loads it). A 4-bit (QLoRA) or sharded (FSDP) LoRA model's adapter is
    merged into its base's files one file at a time (`raypt.merge`; QLoRA: unquantized, in bf16), never the
    whole base in this process's memory."""
    sd = full_model_state(model)  # a collective under FSDP: the whole model on rank 0's CPU
    if rank != 0:
        return
    final, inner = run_dir / "final", unwrap(model)
    if not cfg.model.lora:
        inner.save_pretrained(final, state_dict=sd, safe_serialization=True)
    else:
        inner.save_pretrained(final / "adapter", state_dict=sd, safe_serialization=True)
        if cfg.model.quantize or parallel.is_sharded(model):
            from raypt.merge import merge_adapter, merges_by_file
            from raypt.model import DTYPES, local_model_dir

            base = local_model_dir(cfg.model.name_or_path)
            dtype = torch.bfloat16 if cfg.model.quantize else DTYPES.get(cfg.model.dtype)
            if merges_by_file(base, final / "adapter"):
                merge_adapter(base, final / "adapter", final, dtype)
            else:  # (a base saved as .bin, an adapter on the embeddings: peft's merge, the whole base in memory)
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                whole = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto",
                                                             trust_remote_code=cfg.model.trust_remote_code)
                merged = PeftModel.from_pretrained(whole, final / "adapter").merge_and_unload()
                merged.save_pretrained(final, safe_serialization=True)
        else:
            inner.merge_and_unload().save_pretrained(final, safe_serialization=True)
    tok.save_pretrained(final)
    (final / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")


def end_sample(cfg: Config, model, tok, autocast) -> str | None:
    """The run's sample: train.sample_tokens of greedy continuation of train.sample_prompt by the trained model,
    made where it already is (on the workers' devices; the driver, on a head with less memory than the model, never
    loads it). Every rank takes part: under FSDP each forward gathers the layers, so every rank makes all the tokens
    (none stops at an EOS before the others). Compiled layers run eagerly here: a few forwards of growing length are
    not worth new graphs."""
    from types import SimpleNamespace

    from raypt.generate import generate

    n = cfg.train.sample_tokens
    if not n:
        return None
    inner = unwrap(model)
    inner.eval()
    if (tp := cfg.scaling.tensor_parallel) > 1:  # (HF's generate would split each new token along the sequence)
        from raypt.tensor_parallel import greedy

        device = next(inner.parameters()).device
        ids = tok(cfg.train.sample_prompt or "The ", return_tensors="pt").input_ids.to(device)
        with autocast, torch.compiler.set_stance("force_eager"):
            return tok.decode(greedy(inner, ids, n, tp)[0, ids.shape[1]:], skip_special_tokens=True)
    with autocast, torch.compiler.set_stance("force_eager"):
        return generate(SimpleNamespace(model=inner, tokenizer=tok), cfg.train.sample_prompt or "The ",
                        max_new_tokens=n, temperature=0, top_p=1, seed=0,
                        min_new_tokens=n if parallel.is_sharded(model) else None)


def write_report(run_dir: Path) -> None:
    """run_dir/report (`raypt.report`); a failure to plot is reported, never the end of a finished run."""
    from raypt.report import write

    try:
        emit(f"report: {write([str(run_dir)])}")
    except Exception as e:  # noqa: BLE001 (the model is saved; the report can be made again with raypt.report)
        emit(f"WARNING: no report ({type(e).__name__}: {e}); make it with `python -m raypt.report {run_dir}`")
