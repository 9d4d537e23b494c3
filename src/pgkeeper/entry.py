"""The ``pgkeeper`` console entry point: a fast path for ``archive_command``, then the CLI.

``pgkeeper [--env-file F] wal-push PATH`` for a WAL file the background pusher has already
archived, and ``wal-fetch NAME PATH`` for a segment the background prefetcher has fetched
(see ``pgkeeper.wal_spool``), are answered here with the standard library alone, in a few
milliseconds more than the interpreter's start; everything else (and anything this cannot
settle) goes to the Typer application in ``pgkeeper.cli``.
"""

from __future__ import annotations

import os
import sys

FAST_WAIT = 30.0  # seconds to wait here for a running pusher before the full path takes over


def _options(args: list[str]) -> tuple[int, str | None] | None:
    """Skip the global options the fast paths understand; (index of the command, env file)."""
    i, env_file = 0, None
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "--env-file" and i + 1 < len(args):
            env_file, i = args[i + 1], i + 2
        elif args[i].startswith("--env-file="):
            env_file, i = args[i].split("=", 1)[1], i + 1
        elif args[i] in ("-q", "--quiet"):
            i += 1
        else:
            return None  # --debug and anything unknown: the full CLI
    return i, env_file


def fast_wal_push(args: list[str]) -> int | None:
    """0 when ``args`` is a wal-push whose file the pusher acknowledged; None otherwise."""
    parsed = _options(args)
    if parsed is None:
        return None
    i, env_file = parsed
    if len(args) != i + 2 or args[i] != "wal-push":
        return None
    from pgkeeper import wal_spool

    path = args[i + 1]
    if not wal_spool.looks_like_wal(os.path.basename(path)):
        return None
    return 0 if wal_spool.push_fast(path, env_file, FAST_WAIT) else None


def fast_wal_fetch(args: list[str]) -> int | None:
    """0 when ``args`` is a wal-fetch the prefetcher has (or is fetching), 1 when it just found
    the file is not in the archive; None otherwise."""
    parsed = _options(args)
    if parsed is None:
        return None
    i = parsed[0]
    if i >= len(args) or args[i] != "wal-fetch":
        return None
    rest = args[i + 1 :]
    if len(rest) == 4 and rest[0] == "--system-id":
        rest = rest[2:]
    if len(rest) != 2:
        return None
    from pgkeeper import wal_spool

    name, dest = rest[0], rest[1]
    if not wal_spool.looks_like_wal(name) or len(name) not in (24, 16):  # segments, histories
        return None
    found = wal_spool.wait_prefetched(name, dest, FAST_WAIT)
    return None if found is None else (0 if found else 1)


def main() -> None:
    """Console entry point."""
    code = fast_wal_push(sys.argv[1:])
    if code is None:
        code = fast_wal_fetch(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from pgkeeper.cli import main as cli_main

    cli_main()
