"""Progress of the long phases a person waits on: a bar on a terminal, plain lines anywhere else.

On a terminal (the stream is a TTY) `Progress` is one tqdm bar with its rate and ETA. Anywhere else (a pipe, CI, the
log of `ray job submit`, whose driver writes to a file) it is a plain line at most every `every` seconds and one at
the end: no carriage returns, no escape codes in a log.
"""

from __future__ import annotations

import sys
import time


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """`with Progress("tokenizing", total=n, unit="unit") as p: ... p.update(1)`; `p.write(line)` prints a line
    without breaking the bar."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", every: float = 30.0, stream=None):
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.stream = stream or sys.stderr
        self.n, self._t0 = 0, time.perf_counter()
        self._last = self._t0
        self._bar = None
        self._postfix = ""
        if is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: float = 1, postfix: str = "") -> None:
        self.set(self.n + n, postfix)

    def set(self, n: float, postfix: str = "") -> None:
        """The count is `n` now."""
        step, self.n = n - self.n, n
        self._postfix = postfix or self._postfix
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(step)
        elif time.perf_counter() - self._last >= self.every:
            self._line()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.n:
            self._line()

    def _line(self) -> None:
        self._last = now = time.perf_counter()
        rate = self.n / max(now - self._t0, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        extra = f", {self._postfix}" if self._postfix else ""
        n = f"{self.n:,.1f}" if isinstance(self.n, float) else f"{self.n:,}"
        unit = self.unit if self.unit.isupper() else f"{self.unit}s"
        print(f"{self.desc}: {n}{of} {unit} ({rate:,.1f}/s{eta}{extra})", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
