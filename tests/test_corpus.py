import gzip
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypt.corpus import CorpusError, Listing, Segment, iter_documents, list_files, plan_units


def docs_of(path, fmt="text", **kw):
    counts = Counter()
    return list(iter_documents(str(path), fmt, counts, **kw)), counts


# ---- listing ---------------------------------------------------------------------------------------------------------


def test_missing_path_names_it(tmp_path):
    with pytest.raises(CorpusError, match=r"'.*nope' does not exist"):
        list_files([str(tmp_path / "nope")])


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(CorpusError, match="matches no file"):
        list_files([str(tmp_path / "*.txt")])


def test_empty_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="contains no file"):
        list_files([str(tmp_path / "d")])


def test_directories_recurse_and_hidden_files_are_reported(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x\n")
    (tmp_path / "b.txt").write_text("b\n")
    (tmp_path / ".hidden.txt").write_text("h\n")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "y.txt").write_text("y\n")
    listing = list_files([str(tmp_path)])
    assert [p.rsplit("/", 1)[1] for p in listing.files] == ["x.txt", "b.txt"]
    assert sorted(p.rsplit("/", 1)[1] for p in listing.hidden_skipped) == [".hidden.txt", "_SUCCESS", "y.txt"]
    assert listing.sizes == [2, 2]
    # named explicitly, a hidden file is read
    assert list_files([str(tmp_path / ".hidden.txt")]).files == [str(tmp_path / ".hidden.txt")]


def test_only_hidden_files_is_an_error(tmp_path):
    (tmp_path / "_x.txt").write_text("x\n")
    with pytest.raises(CorpusError, match="only matches hidden files"):
        list_files([str(tmp_path)])


def test_globs(tmp_path):
    for name in ("a.txt", "b.txt", "c.json"):
        (tmp_path / name).write_text("x\n")
    assert len(list_files([str(tmp_path / "*.txt")]).files) == 2
    assert len(list_files([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")]).files) == 2  # no duplicates


# ---- reading ---------------------------------------------------------------------------------------------------------


def test_crlf_blank_and_whitespace_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"first doc\r\n\r\n   \t \r\nsecond doc\r\nlast without newline")
    docs, counts = docs_of(p)
    assert docs == ["first doc", "second doc", "last without newline"]
    assert counts["skipped_blank_lines"] == 2 and counts["documents"] == 3
    assert not any("\r" in d for d in docs)


def test_empty_file_is_counted(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    assert docs_of(p) == ([], Counter(files=1, skipped_empty_files=1))
    assert docs_of(p, "text_file")[1]["skipped_empty_files"] == 1


def test_non_utf8_strict_names_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok\nok too\nbad \xff here\n")
    with pytest.raises(CorpusError, match=r"bad\.txt:3: not valid UTF-8.*decode_errors"):
        docs_of(p)


def test_non_utf8_replace_and_skip_are_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok\nbad \xff here\n")
    docs, counts = docs_of(p, decode_errors="replace")
    assert docs == ["ok", "bad \ufffd here"] and counts["documents_with_replaced_bytes"] == 1
    docs, counts = docs_of(p, decode_errors="skip")
    assert docs == ["ok"] and counts["skipped_not_utf8"] == 1


def test_nul_bytes_are_a_counted_skip(tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"text\n\x00\x01\x02binary\n")
    docs, counts = docs_of(p)
    assert docs == ["text"] and counts["skipped_binary_nul"] == 1


def test_gzip_is_transparent(tmp_path):
    p = tmp_path / "a.txt.gz"
    p.write_bytes(gzip.compress("one\ntwo\n中文\n".encode()))
    assert docs_of(p)[0] == ["one", "two", "中文"]


def test_text_file_format_is_one_document_per_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"line one\r\nline two\r\n")
    assert docs_of(p, "text_file")[0] == ["line one\nline two\n"]


def test_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"text": "a"}, {"body": "x"}, {"text": "b\nc"}]) + "\n\n")
    docs, counts = docs_of(p, "jsonl")
    assert docs == ["a", "b\nc"] and counts["skipped_no_text_field"] == 1
    p.write_text('{"text": "a"}\n{broken\n')
    with pytest.raises(CorpusError, match=r"a\.jsonl:2: not valid JSON"):
        docs_of(p, "jsonl")


def test_parquet(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["x", None, "y"], "id": [1, 2, 3]}), p)
    docs, counts = docs_of(p, "parquet", text_field="content")
    assert docs == ["x", "y"] and counts["skipped_no_text_field"] == 1
    with pytest.raises(CorpusError, match="no column 'text'.*content"):
        docs_of(p, "parquet")


def test_hf_saved_dataset(tmp_path):
    """format: hf reads a `Dataset.save_to_disk` directory: its Arrow shards in order (not its JSON metadata),
    `text_field` of each row, skips counted; a DatasetDict must be pointed at one split."""
    from datasets import Dataset, DatasetDict

    texts = [f"doc {i}" for i in range(50)] + ["", None, "last"]
    ds = Dataset.from_dict({"body": texts, "id": list(range(len(texts)))})
    ds.save_to_disk(tmp_path / "ds", num_shards=3)
    listing = list_files([str(tmp_path / "ds")], fmt="hf")
    assert [f.rsplit("/", 1)[1] for f in listing.files] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    counts = Counter()
    docs = [d for f in listing.files for d in iter_documents(f, "hf", counts, text_field="body")]
    assert docs == texts[:50] + ["last"]
    assert counts["skipped_blank_documents"] == 1 and counts["skipped_no_text_field"] == 1 and counts["files"] == 3
    with pytest.raises(CorpusError, match="no column 'text'.*body"):
        docs_of(listing.files[0], "hf")
    DatasetDict(train=ds, test=ds).save_to_disk(tmp_path / "dd")
    with pytest.raises(CorpusError, match=r"DatasetDict.*splits: test, train.*dd/train"):
        list_files([str(tmp_path / "dd")], fmt="hf")
    assert len(list_files([str(tmp_path / "dd" / "train")], fmt="hf").files) == 1
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "state.json").write_text("{}")
    with pytest.raises(CorpusError, match="no .arrow or .parquet file"):
        list_files([str(tmp_path / "meta")], fmt="hf")


# ---- work units ------------------------------------------------------------------------------------------------------


def test_byte_ranges_read_every_line_exactly_once(tmp_path):
    lines = [f"line {i} " + "x" * (i * 37 % 301) for i in range(3000)]
    lines[100] = "y" * 5000  # one line longer than a range
    p = tmp_path / "big.txt"
    p.write_text("\n".join(lines) + "\n")
    size = p.stat().st_size
    for n_ranges in (2, 3, 7, 50, 400):
        cuts = sorted({0, size} | {size * k // n_ranges for k in range(1, n_ranges)})
        got = []
        for a, b in zip(cuts, cuts[1:]):
            got.extend(iter_documents(Segment(str(p), a, b), "text", Counter()))
        assert got == lines, n_ranges


def test_error_line_numbers_inside_a_later_range(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)) + b"bad \xff\n")
    with pytest.raises(CorpusError, match=r"bad\.txt:1001:"):
        list(iter_documents(Segment(str(p), 4000, p.stat().st_size), "text", Counter()))


def test_plan_units_groups_small_files_and_splits_big_ones():
    listing = Listing(files=["a.txt", "b.txt", "big.txt", "c.txt.gz"], sizes=[100, 100, 10 << 20, 5 << 20])
    units = plan_units(listing, "text", target_bytes=4 << 20)
    segs = [s for u in units for s in u]
    big = [s for s in segs if s.path == "big.txt"]
    assert len(big) == 3 and big[0].start == 0 and big[-1].end == 10 << 20
    assert all(x.end == y.start for x, y in zip(big, big[1:]))
    assert [s for s in segs if s.path == "c.txt.gz"] == [Segment("c.txt.gz")]  # compressed: never split
    assert units[0][:2] == [Segment("a.txt"), Segment("b.txt")]
    # parquet and whole-file formats are never split
    assert all(s.end == -1 for u in plan_units(listing, "parquet", 4 << 20) for s in u)
