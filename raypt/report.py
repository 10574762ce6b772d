"""A run's report from its metrics.jsonl: report.md and PNG plots, also written at the end of every run.

    python -m raypt.report RUN_DIR [RUN_DIR ...] [--out DIR]

Plots against tokens seen: train and eval loss (each source's too), eval perplexity, learning rate, gradient norm,
tokens/s and MFU, the share of time the ranks waited for data; dashed lines where the run resumed from a checkpoint,
crosses at skipped (non-finite) steps. report.md counts resumes, reclaim notices and the steps trained again.
Several RUN_DIRs share each plot, one colour per run, and report.md compares them in one table. Steps a resumed run
trained twice count once: its later try. Output: DIR (default RUN_DIR/report, or ./report for several runs or a
URI).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raypt.cli import command
from raypt.errors import UserError
from raypt.storage import filesystem, is_uri

PLOTS = ("loss", "perplexity", "lr", "grad_norm", "throughput", "input_wait", "ranks")


@dataclass
class Run:
    name: str
    logs: list[dict] = field(default_factory=list)
    """Train log rows (loss, lr, grad norm, tokens seen, tokens/s ...), by step."""
    evals: list[dict] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    """Steps the run resumed at."""
    skipped: list[int] = field(default_factory=list)
    """Log steps whose update was skipped (non-finite loss or gradients)."""
    checkpoints: int = 0
    preemptions: int = 0
    """Reclaim notices the run heard (a node of it about to be taken back by its cloud)."""
    retrained: int = 0
    """Steps trained again after resumes (logged past the checkpoint each resumed from)."""

    def tokens(self, steps) -> np.ndarray:
        """Tokens seen at `steps`, from the log rows (eval and event rows carry only a step)."""
        known = [(r["step"], r["tokens_seen"]) for r in self.logs if "tokens_seen" in r]
        if not known:
            return np.asarray(steps, float)
        at, seen = map(np.asarray, zip(*[(0, 0), *known]))
        return np.interp(steps, at, seen, right=None) if len(at) > 1 else np.asarray(steps, float)


def read_run(run_dir: str) -> Run:
    """A run's metrics.jsonl (local path or URI); rows of steps trained again after a resume replace the first."""
    fs, path = filesystem(f"{run_dir.rstrip('/')}/metrics.jsonl")
    try:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode("utf-8").splitlines()
    except (FileNotFoundError, OSError):
        raise UserError(f"{run_dir} has no metrics.jsonl: give a run's directory (run.storage_path/run.name)") from None
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:  # (the last line of a run killed while writing it may be cut short)
                raise UserError(f"{run_dir}/metrics.jsonl line {i + 1} is not JSON") from None
    run = Run(run_dir.rstrip("/").rsplit("/", 1)[-1])
    for r in rows:
        if "resumed_from" in r:  # what the earlier try logged past the checkpoint is superseded
            run.logs = [x for x in run.logs if x["step"] <= r["step"]]
            run.evals = [x for x in run.evals if x["step"] <= r["step"]]
            run.resumes.append(r["step"])
            run.retrained += r.get("steps_retrained", 0)
        elif r.get("preemption_notice"):
            run.preemptions += 1
        elif "eval_loss" in r:
            run.evals.append(r)
        elif "lr" in r:
            run.logs.append(r)
        elif "checkpoint" in r:
            run.checkpoints += 1
    run.skipped = [r["step"] for r in run.logs if "loss" not in r]
    return run


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return tuple(map(list, zip(*pairs))) if pairs else ([], [])


def plot(runs: list[Run], out: Path) -> list[Path]:
    """The PNGs (`PLOTS`) for `runs` in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(runs) > 1
    written = []
    for name in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        twin = ax.twinx() if name == "throughput" and any(_series(r.logs, "mfu")[0] for r in runs) else None
        for i, run in enumerate(runs):
            c, prefix = colours[i % len(colours)], f"{run.name}: " if several else ""
            if name == "loss":
                _line(ax, run, run.logs, "loss", c, prefix + "train")
                keys = sorted({k for r in run.evals for k in r if k.startswith("eval_loss")})
                for j, k in enumerate(keys):
                    _line(ax, run, run.evals, k, c, prefix + k.replace("eval_loss", "eval"), marker="o",
                          style=("--", ":", "-.")[j % 3])
                for s in run.skipped:
                    ax.axvline(run.tokens([s])[0], color=c, alpha=0.6, lw=0.8, ls=":")
                    ax.plot(run.tokens([s]), [0], "x", color="red", transform=ax.get_xaxis_transform(), clip_on=False)
            elif name == "perplexity":
                for j, k in enumerate(sorted({k for r in run.evals for k in r if k.startswith("eval_ppl")})):
                    _line(ax, run, run.evals, k, c, prefix + k.replace("eval_ppl", "eval"), marker="o",
                          style=("-", "--", ":")[j % 3])
                ax.set_yscale("log")
            elif name == "throughput":
                _line(ax, run, run.logs, "tokens_per_s", c, prefix + "tokens/s")
                if twin is not None:
                    steps, v = _series(run.logs, "mfu")
                    twin.plot(run.tokens(steps), [100 * x for x in v], color=c, ls="--", label=prefix + "MFU")
            elif name == "input_wait":  # (the share of each log interval the ranks waited for their blocks)
                _line(ax, run, [{**r, "wait": 100 * r["input_wait"]} for r in run.logs if "input_wait" in r], "wait",
                      c, prefix + "mean over ranks")
                for key, label, style in (("input_wait_max", "most waiting rank", "--"),
                                          ("input_wait_min", "least waiting rank", ":")):
                    _line(ax, run, [{**r, "wait": 100 * r[key]} for r in run.logs if key in r], "wait", c,
                          prefix + label, style=style)
            elif name == "ranks":  # (each rank's busy time per step, before it waits for the others: the straggler)
                _line(ax, run, run.logs, "rank_busy_s_mean", c, prefix + "mean over ranks")
                _line(ax, run, run.logs, "rank_busy_s_max", c, prefix + "slowest rank", style="--")
            else:
                _line(ax, run, run.logs, name, c, (prefix + name) if several else name)
            for s in run.resumes:
                ax.axvline(run.tokens([s])[0], color=c, ls="--", lw=1, alpha=0.7)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel({"loss": "loss (nats/token)", "perplexity": "eval perplexity", "lr": "learning rate",
                       "grad_norm": "gradient norm (before clipping)", "throughput": "tokens/s",
                       "input_wait": "time waiting for data (%)",
                       "ranks": "busy seconds per step (before the gradient sync)"}[name])
        if twin is not None:
            twin.set_ylabel("MFU (%)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if len(labels) > 1:
            ax.legend(handles, labels, fontsize=8)
        title = " vs ".join(r.name for r in runs)
        ax.set_title(f"{title}: {name.replace('_', ' ')}" + (" (dashed: resumed)" if any(r.resumes for r in runs)
                                                             else ""), fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def _line(ax, run: Run, rows, key, colour, label, marker=None, style="-"):
    steps, values = _series(rows, key)
    if steps:
        ax.plot(run.tokens(steps), values, color=colour, ls=style, marker=marker, ms=3, label=label)


def summary(run: Run) -> dict:
    """The run's final numbers: last step, tokens, last train loss, last eval, median tokens/s and MFU."""
    last = run.logs[-1] if run.logs else {}
    losses = [r for r in run.logs if "loss" in r]
    out = {"steps": last.get("step", 0), "tokens_seen": last.get("tokens_seen", 0),
           "train_loss": losses[-1]["loss"] if losses else None}
    if run.evals:
        out.update({k: v for k, v in run.evals[-1].items() if k != "step"})
    for key in ("tokens_per_s", "mfu", "input_wait"):
        if v := _series(run.logs, key)[1]:
            out[key] = float(np.median(v))
    out.update(resumes=len(run.resumes), preemptions=run.preemptions, steps_retrained=run.retrained,
               skipped_steps=len(run.skipped), checkpoints=run.checkpoints,
               storage_retries=sum(r.get("storage_retries", 0) for r in run.logs))
    return out


def markdown(runs: list[Run], plots: list[Path]) -> str:
    rows = [summary(r) for r in runs]
    keys = ["steps", "tokens_seen", "train_loss"] + sorted({k for s in rows for k in s if k.startswith("eval_")}) + [
        k for k in ("tokens_per_s", "mfu", "input_wait", "resumes", "preemptions", "steps_retrained", "skipped_steps",
                    "checkpoints", "storage_retries")
        if any(k in s for s in rows)]
    lines = [f"# {' vs '.join(r.name for r in runs)}", "", "| metric | " + " | ".join(r.name for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(k, s.get(k)) for s in rows) + " |")
    lines += ["", "Final values: the last logged train loss and eval; tokens/s, MFU and input_wait (the share of "
              "time the ranks waited for their data) are medians over log steps; storage_retries: requests to object "
              "storage tried again (throttling, server errors, resets), all told.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("mfu", "input_wait"):
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:,.0f}" if key == "tokens_per_s" else f"{v:.4f}" if v < 1000 else f"{v:,.1f}"
    return f"{v:,}"


def write(run_dirs: list[str], out: str | Path | None = None) -> Path:
    """report.md and the plots of `run_dirs` in `out`; returns report.md's path."""
    runs = [read_run(d) for d in run_dirs]
    if out is None:
        one_local = len(run_dirs) == 1 and not is_uri(run_dirs[0])
        out = Path(run_dirs[0]) / "report" if one_local else Path("report")
    out = Path(out)
    plots = plot(runs, out)
    (out / "report.md").write_text(markdown(runs, plots), encoding="utf-8")
    return out / "report.md"


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's directory (its metrics.jsonl)")
    ap.add_argument("--out", help="where to write (default RUN_DIR/report, or ./report for several runs)")


@command(__doc__, "raypt.report", _arguments)
def main(args) -> None:
    path = write(args.run_dirs, args.out)
    print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(main())
