"""A pipeline's counters and its turnstile, in one small actor per run (`PipelineStats`).

Kept apart from `raypt.data` so that the actor's process imports Ray alone, not Ray Data: it starts with every run.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import ray


class _Pipe:
    """One pipeline's counters and turnstile."""

    def __init__(self, ahead: int | None, first: int):
        self.counts: Counter = Counter()
        self.busy_s = 0.0  # summed over actors: time spent reading, tokenizing and packing (not waiting)
        self.first_ready = self.last_add = None
        self.ahead, self.next = ahead, first
        self.moved = asyncio.Condition()


@ray.remote(num_cpus=0)
class PipelineStats:
    """Counters a pipeline's actors add to, read once at the end; and the turnstile that keeps the pipeline at most
    `ahead` units in front of the first unit its consumer still waits for (`advance`), so units finished out of order
    wait in a bounded buffer. One actor serves every pipeline of its owner (each pass and each resume of a run: `start`
    opens the next one's entry), so a new pass starts no actor of its own. (An async actor: many actors wait on
    `turn` at once.)"""

    def __init__(self):
        self.pipes: list[_Pipe] = []
        self.lines: list[tuple[str, dict]] = []

    async def say(self, line: str, fields: dict) -> None:
        """A line of rank 0's for the driver to print (on a terminal, above its progress bar: `raypt.train`)."""
        self.lines.append((line, fields))

    async def heard(self) -> tuple[list[tuple[str, dict]], int]:
        """The lines said since the last call, and the blocks every pipeline has made so far."""
        lines, self.lines = self.lines, []
        return lines, sum(p.counts["blocks"] for p in self.pipes)

    async def start(self, ahead: int | None, first: int) -> int:
        self.pipes.append(_Pipe(ahead, first))
        return len(self.pipes) - 1

    async def ready(self, p: int, t: float) -> None:
        """An actor finished starting up at wall time `t`: steady-state work is timed from the first such call."""
        pipe = self.pipes[p]
        pipe.first_ready = t if pipe.first_ready is None else min(pipe.first_ready, t)

    async def add(self, p: int, counts: dict, t: float, rss_mb: float, busy_s: float) -> None:
        pipe = self.pipes[p]
        pipe.counts.update(counts)
        pipe.busy_s += busy_s
        pipe.counts["peak_actor_rss_mb"] = max(pipe.counts["peak_actor_rss_mb"], round(rss_mb))
        pipe.last_add = t if pipe.last_add is None else max(pipe.last_add, t)

    async def turn(self, p: int, seq: int) -> None:
        """Returns once unit `seq` (in the pass's order) may start."""
        pipe = self.pipes[p]
        if pipe.ahead is not None:
            async with pipe.moved:
                await pipe.moved.wait_for(lambda: seq < pipe.next + pipe.ahead)

    async def advance(self, p: int, next_seq: int) -> None:
        """Every unit before `next_seq` has reached the consumer."""
        pipe = self.pipes[p]
        async with pipe.moved:
            pipe.next = max(pipe.next, next_seq)
            pipe.moved.notify_all()

    async def actor_rate(self, p: int) -> float | None:
        """Tokens per second one actor makes while it works (None before any unit is done)."""
        pipe = self.pipes[p]
        return pipe.counts["tokens"] / pipe.busy_s if pipe.busy_s > 0 and pipe.counts["tokens"] else None

    async def total(self, key: str) -> int:
        """A counter summed over every pipeline so far."""
        return sum(p.counts[key] for p in self.pipes)

    async def span(self, p: int) -> tuple[float | None, float | None]:
        return self.pipes[p].first_ready, self.pipes[p].last_add

    async def get(self, p: int) -> tuple[dict, float | None]:
        pipe = self.pipes[p]
        steady = pipe.last_add - pipe.first_ready if pipe.last_add and pipe.first_ready else None
        return dict(pipe.counts), steady


@dataclass(frozen=True)
class Stats:
    """One pipeline's entry in a `PipelineStats` actor, as its tasks and its consumer use it."""

    actor: ray.actor.ActorHandle
    pipe: int

    @classmethod
    def open(cls, actor: ray.actor.ActorHandle | None, ahead: int | None, first: int) -> Stats:
        """A new pipeline's entry, in `actor` (a new actor if None)."""
        actor = actor or PipelineStats.remote()
        return cls(actor, ray.get(actor.start.remote(ahead, first)))

    def ready(self, when: float) -> None:
        self.actor.ready.remote(self.pipe, when)

    def add(self, counts: dict, when: float, rss_mb: float, busy_s: float) -> None:
        self.actor.add.remote(self.pipe, counts, when, rss_mb, busy_s)

    def turn(self, seq: int) -> None:
        ray.get(self.actor.turn.remote(self.pipe, seq))

    def advance(self, next_seq: int) -> None:
        self.actor.advance.remote(self.pipe, next_seq)

    def actor_rate(self) -> float | None:
        return ray.get(self.actor.actor_rate.remote(self.pipe))

    def get(self) -> tuple[dict, float | None]:
        return ray.get(self.actor.get.remote(self.pipe))

    def span(self) -> tuple[float | None, float | None]:
        """Wall times of the first actor ready and the last unit done."""
        return ray.get(self.actor.span.remote(self.pipe))
