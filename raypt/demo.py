"""The offline demo corpus: the Python documentation topics that ship with every Python (pydoc_data), as JSON lines.

    python -m raypt.demo --out out/demo

writes ``out/demo/train/topics.jsonl`` and ``out/demo/eval/topics.jsonl`` (every tenth topic held out); ~465k
characters of real English technical prose, no network needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raypt.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args(argv)
    print(f"demo corpus -> {write_demo_corpus(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
