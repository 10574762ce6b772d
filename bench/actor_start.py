"""What one tokenize actor pays to get its tokenizer, side by side, each in a fresh process (as an actor starts):

    python bench/actor_start.py [--runs 3]

  (a) transformers: `AutoTokenizer.from_pretrained(dir)` (what every tokenize actor did), which imports transformers
      and, through it, torch;
  (b) raypt: `EncoderSpec.encoder()`, the fast tokenizer rebuilt from the backend the driver serialized once
      (`raypt.tokenizer.encoder_spec`), with `tokenizers` alone.
Reported per variant (median of --runs, alternating): wall and CPU seconds of the whole process, its peak RSS; then the
ratios. Both encode the same documents and must give the same ids. The tokenizer is trained here (8k byte-level BPE)
on ../shared/corpus/cnews/train when present, else on generated text.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "corpus" / "cnews" / "train"

CHILD = r"""
import json, pickle, resource, sys, time
t0 = time.perf_counter()
variant, arg, docs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if variant == "transformers":
    from transformers import AutoTokenizer
    from raypt.tokenizer import DocumentEncoder
    tok = AutoTokenizer.from_pretrained(arg)
    enc = DocumentEncoder(tok, tok.bos_token_id, tok.eos_token_id)
else:
    with open(arg, "rb") as f:
        enc = pickle.load(f).encoder(1_000_000)
ids = enc(docs).tolist()
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # (ru_maxrss counts
# the parent's memory from before the exec)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "rss_mb": hwm / 1024, "torch": "torch" in sys.modules, "ids": ids}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from raypt.config import load_config
    from raypt.tokenizer import encoder_spec, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = SOURCE if SOURCE.is_dir() else Path(tmp, "corpus")
        if not SOURCE.is_dir():
            corpus.mkdir()
            (corpus / "a.txt").write_text("\n".join(f"document {i} of a small generated corpus" for i in range(2000)))
        tok = str(Path(tmp, "tok"))
        train_tokenizer([str(corpus)], 8000, tok)
        spec_file = Path(tmp, "spec.pkl")
        spec_file.write_bytes(pickle.dumps(encoder_spec(load_config(None, [f"tokenizer.path={tok}",
                                                                           "data.train_paths=[x]"]))))
        first = sorted(corpus.glob("*.txt"))[0]
        docs = json.dumps(first.read_text(encoding="utf-8").splitlines()[:20])
        rows: dict[str, list[dict]] = {"transformers": [], "raypt": []}
        for _ in range(args.runs):
            for variant, arg in (("transformers", tok), ("raypt", str(spec_file))):
                out = subprocess.run([sys.executable, "-c", CHILD, variant, arg, docs], capture_output=True,
                                     text=True, check=True, cwd=ROOT)
                rows[variant].append(json.loads(out.stdout))
    assert rows["transformers"][0]["ids"] == rows["raypt"][0]["ids"], "the two encoders disagree"
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "rss_mb")} for v, rs in rows.items()}
    for v, m in med.items():
        print(f"{v:>12}: {m['wall_s']:5.2f} s wall, {m['cpu_s']:5.2f} CPU-s, peak RSS {m['rss_mb']:6.0f} MB, "
              f"torch imported: {rows[v][0]['torch']}")
    a, b = med["transformers"], med["raypt"]
    print(f"raypt / transformers: wall {b['wall_s'] / a['wall_s']:.2f}x, CPU {b['cpu_s'] / a['cpu_s']:.2f}x, "
          f"RSS {b['rss_mb'] / a['rss_mb']:.2f}x; same ids for {len(json.loads(docs))} documents")


if __name__ == "__main__":
    main()
