"""The scaffold every `python -m raypt.*` command shares: its arguments (with `--config`/`--set` where it reads a
run config), one user-input error -> `error: ...` on stderr and exit status 2, no traceback; anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable

from raypt.errors import UserError, user_error


def command(doc: str, prog: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None, *,
            config: bool = False) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable]:
    """Decorate a command's body, `body(args) -> exit status` (None: 0), into its `main(argv=None) -> int`.
    `config`: the command reads a run config; `args.cfg` is it, resolved (paths made absolute)."""

    def wrap(body: Callable[[argparse.Namespace], int | None]) -> Callable[[list[str] | None], int]:
        def main(argv: list[str] | None = None) -> int:
            ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
            if config:
                from raypt.config import add_config_args

                add_config_args(ap)
            if arguments is not None:
                arguments(ap)
            args = ap.parse_args(argv)
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            try:
                if config:
                    from raypt.config import absolute_paths, load_config

                    args.cfg = absolute_paths(load_config(args.config, args.set))
                return body(args) or 0
            except Exception as e:
                if (err := user_error(e)) is None:
                    raise
                message = err.message
            return fail(message)  # (outside the except block: see `fail`)

        main.__doc__ = doc
        return main

    return wrap


def quiet_libraries() -> None:
    """No progress bars or advice from transformers: raypt says what happens."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def fail(message: str) -> int:
    """A user error's one line; the exit status for it. Also frees what a failed Ray Data pipeline still holds: its
    executor keeps the exception, whose traceback keeps the executor, a cycle that holds the pipeline's actors and
    their CPUs until Python's cyclic collector runs, which in a process that goes on (a test session, a notebook) can
    take minutes. Called where nothing references the exception any more."""
    gc.collect()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


__all__ = ["UserError", "command", "fail", "quiet_libraries"]
