"""The file-by-file LoRA merge (`raypt.merge`): peft's merged weights, in the base's files, in a fraction of the
memory of peft's whole-model merge."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from raypt.merge import MergeError, merge_adapter, merges_by_file

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_and_adapter(tmp_path, layers=2, hidden=32, vocab=96, shard="16KB"):
    """A bf16 Llama saved in several files, and a LoRA adapter on it whose B is not zero (so merging changes W)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base", max_shard_size=shard)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def merged_by_peft(base, adapter) -> dict:
    """peft's merge_and_unload on the base in fp32 (no rounding before the sum), rounded to bf16 once."""
    whole = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(whole, adapter).merge_and_unload()
    return {k: v.to(torch.bfloat16) for k, v in merged.state_dict().items()}


def test_the_merge_equals_peft_file_by_file(tmp_path):
    base, adapter = base_and_adapter(tmp_path)
    merge_adapter(base, adapter, tmp_path / "out", torch.bfloat16)
    files = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(files) >= 3 and sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == files
    ours = {k: v for f in files for k, v in load_file(tmp_path / "out" / f).items()}
    reference, before = merged_by_peft(base, adapter), {k: v for f in files for k, v in load_file(base / f).items()}
    assert ours.keys() == reference.keys()
    adapted = {k for k in ours if k.split(".")[-2] in TARGETS}
    assert len(adapted) == 2 * len(TARGETS)
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        if k in adapted:
            assert not torch.equal(v, before[k])  # the adapter moved it
            torch.testing.assert_close(v.float(), reference[k].float(), rtol=2 ** -8, atol=1e-6)  # one bf16 rounding
        else:
            assert torch.equal(v, before[k]), k
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the index and config came along
    assert loaded.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"].keys() == ours.keys()


def test_only_what_merges_file_by_file_is_merged_so(tmp_path):
    """An adapter on the embeddings (peft merges those transposed) and a base saved as .bin go to peft's merge."""
    base, adapter = base_and_adapter(tmp_path)
    assert merges_by_file(base, adapter)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])).save_pretrained(tmp_path / "emb")
    assert not merges_by_file(base, tmp_path / "emb")
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert not merges_by_file(tmp_path / "bin", adapter)


def test_an_adapter_for_another_model_is_refused_naming_the_weight(tmp_path):
    base, adapter = base_and_adapter(tmp_path)
    other, _ = base_and_adapter(tmp_path / "other", layers=1)
    with pytest.raises(MergeError, match="does not have: model.layers.1.mlp.down_proj.weight"):
        merge_adapter(other, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


PEAK = """
import os, sys, threading, time, torch
from raypt.merge import merge_adapter
kind, base, adapter, out = sys.argv[1:]
if kind == "peft":  # imported beforehand, as raypt's are
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
if kind == "peft":
    whole = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(whole, adapter).merge_and_unload().save_pretrained(out)
else:
    merge_adapter(base, adapter, out, torch.bfloat16)
done.set()
print(max(peak[0], rss()) - before)
"""


def test_the_merge_holds_one_file_not_the_model(tmp_path):
    """Peak memory the merge adds, for a ~170 MB bf16 base in 4 MB files: peft's whole-model merge more than the
    model; the file-by-file one a few files' worth (the file read, its tensors, the merged copy and its
    serialization), whatever the model's size."""
    base, adapter = base_and_adapter(tmp_path, layers=32, hidden=512, vocab=4096, shard="4MB")
    files = [p.stat().st_size for p in base.glob("*.safetensors")]
    peak = {kind: int(subprocess.run([sys.executable, "-c", PEAK, kind, str(base), str(adapter),
                                      str(tmp_path / kind)], capture_output=True, text=True, check=True).stdout)
            for kind in ("peft", "raypt")}
    print(f"base {sum(files) / 1e6:.0f} MB in {len(files)} files of at most {max(files) / 1e6:.1f} MB; peak memory "
          f"added: peft {peak['peft'] / 1e6:.0f} MB, raypt {peak['raypt'] / 1e6:.0f} MB")
    assert peak["peft"] > sum(files)
    assert peak["raypt"] < 0.3 * sum(files)  # (measured: ~30 MB, the same for 8 MB files or a model half as big)
