"""Real servers for the test suite: PostgreSQL, an S3 server, a GCS emulator, a fault proxy.

Each helper is plain Python (no pytest import) so it can also be driven from a REPL or a
script. `tests/conftest.py` wraps them in session-scoped fixtures that start lazily.

Cleanup happens in three layers: `stop()` (fixture teardown), `atexit` (Ctrl-C, errors),
and, for a test process killed outright (SIGKILL, SIGTERM), orphan guards: server
subprocesses run under `guarded_module_argv`, which exits them when their parent dies, and
PostgreSQL (a daemon started by pg_ctl) gets a small reaper process that does the same.
"""

from __future__ import annotations

import sys

from pgkeeper.sandbox import free_port

# Runs `python -m <module> <args>` (or `python <script.py> <args>`) in-process, plus a daemon
# thread that exits the process once its parent (the test process) is gone. SIGINT is left
# alone: Ctrl-C in a terminal reaches the whole process group and may stop the server early,
# which is harmless.
_GUARD = """
import os, runpy, sys, threading, time
parent = os.getppid()
def _watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=_watch, daemon=True).start()
target = sys.argv[1]
sys.argv = [target, *sys.argv[2:]]
if target.endswith(".py"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


__all__ = ["free_port", "guarded_module_argv", "guarded_script_argv"]


def guarded_module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` that also exits when the launching process dies."""
    return [sys.executable, "-c", _GUARD, module, *args]


def guarded_script_argv(script: str, *args: str) -> list[str]:
    """argv for `python script.py args` that also exits when the launching process dies."""
    return [sys.executable, "-c", _GUARD, script, *args]
