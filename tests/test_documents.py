"""Document masking (data.document_masking): a packed block's documents do not see each other. No Ray: the model
inputs the loop builds (`raypt.loop.document_inputs`) on a real tiny Llama."""

import json

import numpy as np
import pytest
import torch

from raypt.config import ConfigError, load_config
from raypt.loop import LocalContext, document_inputs, inputs, packs_one_row, train
from raypt.model import build_model

BOS, EOS = 1, 2


def doc(rng, n):
    """BOS, n - 2 ordinary tokens, EOS: a document as the packer lays it out."""
    return np.concatenate(([BOS], rng.integers(3, 400, n - 2), [EOS]))


def model_for(*sets):
    cfg = load_config(None, ["data.train_paths=[unused]", "data.seq_len=32", *sets])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, vocab_size=400, seq_len=32, device=torch.device("cpu"))
    return model.eval()


def test_positions_restart_and_the_boundary_is_not_predicted():
    x = torch.tensor([[5, 6, EOS, BOS, 7, 8, EOS, BOS, 9],  # a document's tail, then two more
                      [BOS, 5, EOS, BOS, 6, 7, 8, 9, 10]])
    pos, labels = document_inputs(x, BOS, EOS)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert labels.tolist() == [[5, 6, EOS, -100, 7, 8, EOS, -100, 9], [BOS, 5, EOS, -100, 6, 7, 8, 9, 10]]
    # a tokenizer without BOS: a document starts after its predecessor's EOS
    pos, labels = document_inputs(torch.tensor([[5, EOS, 6, 7, EOS, 8]]), None, EOS)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]] and labels.tolist() == [[5, EOS, -100, 7, EOS, -100]]


@pytest.mark.parametrize("masking", [True, False])
def test_a_packed_document_sees_only_itself(masking):
    """Documents A then B in one block: with masking, B's logits equal B's logits run alone (and A's are A's);
    without it, B attends to A and they differ (the check can fail)."""
    rng = np.random.default_rng(0)
    a, b = doc(rng, 12), doc(rng, 20)
    model = model_for()
    block = torch.tensor(np.concatenate((a, b)))[None]
    with torch.no_grad():
        alone_a = model(input_ids=torch.tensor(a)[None]).logits[0]
        alone_b = model(input_ids=torch.tensor(b)[None]).logits[0]
        pos = document_inputs(block, BOS, EOS)[0] if masking else None
        packed = model(input_ids=block, position_ids=pos, use_cache=False).logits[0]  # (a cache turns it off)
    torch.testing.assert_close(packed[:12], alone_a, atol=1e-5, rtol=0)  # causal: A never sees B
    if masking:
        torch.testing.assert_close(packed[12:], alone_b, atol=1e-5, rtol=0)
    else:
        assert (packed[12:] - alone_b).abs().max() > 1e-2


@pytest.mark.parametrize("loss", ["chunked", "hf"])
def test_the_masked_loss_is_the_documents_own_loss(loss):
    """The loop's loss on a packed block, with masking, is the token-weighted mean of each document's loss alone:
    the first token of B is not predicted from A."""
    rng = np.random.default_rng(1)
    a, b, c = doc(rng, 10), doc(rng, 14), doc(rng, 8)
    model = model_for(f"model.loss={loss}")
    block = torch.tensor(np.concatenate((a, b, c)))[None]
    pos, labels = document_inputs(block, BOS, EOS)
    with torch.no_grad():
        packed = model(input_ids=block, labels=labels, position_ids=pos, use_cache=False).loss
        sums = [model(input_ids=torch.tensor(d)[None], labels=torch.tensor(d)[None]).loss * (len(d) - 1)
                for d in (a, b, c)]
    assert packed.item() == pytest.approx(sum(sums).item() / (len(a) + len(b) + len(c) - 3), rel=1e-5)


def test_the_loop_trains_and_evaluates_with_masking(tokenizer_dir, tmp_path):
    """The loop passes the masked inputs: the first step's loss (no update yet) and the eval loss differ from the same
    run without masking, and eval counts only the positions it predicts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = np.random.default_rng(2)
    stream = np.concatenate([np.concatenate(([tok.bos_token_id], rng.integers(3, len(tok), n), [tok.eos_token_id]))
                             for n in rng.integers(4, 20, 200)])
    blocks = stream[: len(stream) // 32 * 32].reshape(-1, 32).astype(np.int32)
    out = {}
    for masking in (True, False):
        cfg = load_config(None, ["data.train_paths=[unused]", f"tokenizer.path={tokenizer_dir}", "data.seq_len=32",
                                 "scaling.num_workers=1", "train.global_batch_size=8", "train.micro_batch_size=4",
                                 "train.max_steps=2", "train.log_every=1", "train.eval_every=2",
                                 f"data.document_masking={str(masking).lower()}"])
        out[masking] = train(cfg, LocalContext(tmp_path / str(masking), blocks[:64], blocks[64:72]))
    assert out[True]["step"] == out[False]["step"] == 2
    assert np.isfinite(out[True]["eval_loss"]) and out[True]["eval_loss"] != pytest.approx(out[False]["eval_loss"])
    first = {m: next(r["loss"] for r in map(json.loads, (tmp_path / str(m) / "metrics.jsonl").read_text().splitlines())
                     if "loss" in r) for m in (True, False)}
    assert first[True] != pytest.approx(first[False], rel=1e-4)


@pytest.mark.parametrize("loss", ["chunked", "hf"])
def test_one_row_is_the_batched_loss_and_what_flash_attention_reads(loss):
    """flash_attention_2 finds packed documents in position ids only in a batch of one row (transformers'
    `_is_packed_sequence`): a masked micro-batch of 3 blocks would attend across documents. The loop lays it out as
    one row with its boundaries: on CPU (SDPA) that gives the batched layout's loss and gradients, and the boundaries
    are those flash's own inference from the position ids finds."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, _prepare_from_posids

    rng = np.random.default_rng(3)
    stream = np.concatenate([doc(rng, n) for n in rng.integers(4, 30, 12)])[5:]  # (starts inside a document)
    x = torch.tensor(stream[: 3 * 32].reshape(3, 32))
    model = model_for(f"model.loss={loss}").train()
    losses, grads = [], []
    for one_row in (False, True):
        batch = inputs(x, (BOS, EOS), one_row)
        out = model(**batch, use_cache=False).loss
        out.backward()
        losses.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    batched, flat = inputs(x, (BOS, EOS)), inputs(x, (BOS, EOS), one_row=True)
    assert not _is_packed_sequence(batched["position_ids"], 3)  # (what flash would make of the batched layout)
    assert flat["input_ids"].shape == (1, 96) and _is_packed_sequence(flat["position_ids"], 1)
    q = torch.zeros(1, 96, 1, 1)
    _, _, _, (cu_q, cu_k), (max_q, _) = _prepare_from_posids(q, q, q, flat["position_ids"])
    assert torch.equal(flat["cu_seq_lens_q"], cu_q) and torch.equal(flat["cu_seq_lens_k"], cu_k)
    assert flat["max_length_q"] == flat["max_length_k"] == max_q
    assert packs_one_row(model_for("model.attn_implementation=flash_attention_2")) and not packs_one_row(model)


def test_masking_needs_document_boundaries():
    with pytest.raises(ConfigError, match="data.document_masking"):
        load_config(None, ["data.train_paths=[x]", "data.document_masking=true", "tokenizer.add_bos=false",
                           "tokenizer.add_eos=false"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention needs CUDA")
def test_flash_attention_masks_documents_from_positions():
    """The same as the SDPA check on flash_attention_2's varlen path (position ids, no mask tensor)."""
    pytest.importorskip("flash_attn")
    rng = np.random.default_rng(0)
    a, b = doc(rng, 12), doc(rng, 20)
    model = model_for("model.attn_implementation=flash_attention_2", "model.dtype=bfloat16").cuda()
    block = torch.tensor(np.concatenate((a, b)), device="cuda")[None]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor(b, device="cuda")[None]).logits[0].float()
        pos = document_inputs(block, BOS, EOS)[0]
        packed = model(input_ids=block, position_ids=pos, use_cache=False).logits[0].float()
    torch.testing.assert_close(packed[12:], alone, atol=2e-2, rtol=0)  # bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention needs CUDA")
def test_flash_attention_masks_documents_in_a_micro_batch_of_several_rows():
    """The loop's one-row layout on flash_attention_2's varlen path: every document of a 2-block micro-batch gets
    the logits it gets alone."""
    pytest.importorskip("flash_attn")
    rng = np.random.default_rng(0)
    a, b, c = doc(rng, 12), doc(rng, 20), doc(rng, 32)
    model = model_for("model.attn_implementation=flash_attention_2").cuda().to(torch.bfloat16)
    x = torch.tensor(np.stack([np.concatenate((a, b)), c]), device="cuda")  # (2, 32)
    with torch.no_grad():
        batch = inputs(x, (BOS, EOS), packs_one_row(model))
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0].float()
        for d, start in ((a, 0), (b, 12), (c, 32)):
            alone = model(input_ids=torch.tensor(d, device="cuda")[None]).logits[0].float()
            torch.testing.assert_close(packed[start : start + len(d)], alone, atol=2e-2, rtol=0)  # bf16
