import pytest
from transformers import AutoTokenizer

from raypt.tokenizer import DocumentEncoder, TokenizerError, main, special_ids, split_long

from conftest import make_docs

SAMPLES = [
    "Hello  world,\n\ttabs and  double spaces, trailing ",
    "中文新闻：北京时间今天，国家队在比赛中获胜。",
    "Mixed 中英文 text with émojis 🙂 and numbers 12345.",
    "   leading spaces",
]


def test_cli_trains_a_tokenizer_autotokenizer_loads(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    assert main(["--data", str(corpus / "train"), "--vocab-size", "500", "--out", str(out)]) == 0
    assert "trained a byte-level BPE" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert len(tok) <= 500
    for text in SAMPLES + make_docs(20, seed=9):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # exact round trip, Chinese and English
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # like Llama's tokenizer, plain calls start with BOS


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--vocab-size", "500", "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert main(["--data", str(tmp_path / "blank.txt"), "--vocab-size", "500", "--out", str(tmp_path / "t")]) == 2
    assert "no document" in capsys.readouterr().err


def test_special_ids(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert special_ids(tok, True, True) == (tok.bos_token_id, tok.eos_token_id)
    assert special_ids(tok, False, True) == (None, tok.eos_token_id)
    assert special_ids(tok, True, True, bos_id=7, eos_id=8) == (7, 8)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        special_ids(tok, True, True, eos_id=10**6)


def test_tokenizer_without_eos_is_a_clear_error(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = None
    with pytest.raises(TokenizerError, match="has no EOS token; set tokenizer.eos_id"):
        special_ids(tok, True, True)
    assert special_ids(tok, True, False) == (tok.bos_token_id, None)


def test_split_long_keeps_english_tokens_identical(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = " ".join(make_docs(200, seed=4))
    pieces = split_long(text, 3000)
    assert len(pieces) > 5 and "".join(pieces) == text and all(len(p) <= 3000 for p in pieces)
    whole = DocumentEncoder(tok, 1, 2, max_doc_chars=10**9)([text])
    cut = DocumentEncoder(tok, 1, 2, max_doc_chars=3000)([text])
    assert cut.tolist() == whole.tolist()


def test_split_long_without_whitespace_cuts_hard():
    text = "中" * 2500
    assert [len(p) for p in split_long(text, 1024)] == [1024, 1024, 452]


def test_split_long_inside_whitespace_runs(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "    ".join(make_docs(300, seed=5)).replace(". ", ".  \n  ")
    whole = DocumentEncoder(tok, None, None, max_doc_chars=10**9)([text])
    for max_chars in (1500, 1501, 1502, 1503):
        assert DocumentEncoder(tok, None, None, max_doc_chars=max_chars)([text]).tolist() == whole.tolist()
