"""Run the served deployments until stopped, and stop within a bounded time whatever Prefect does.

``prefect.serve`` pauses every deployment on shutdown through Prefect's client, which retries a
server that is gone for about a minute per call, and cancels in-flight runs only after reading
each one from that server: with the Prefect server killed first, SIGTERM left ``serve`` hanging
in "Pausing all deployments..." (issue 13). So this runs Prefect's ``Runner`` itself:

1. Register every deployment (``Runner.add_deployment``), then call ``after_registration``
   (serve records what the environment's schedules were, see ``deployments.schedule_edits``).
2. Poll and run until SIGTERM or Ctrl-C; Prefect's runner then cancels in-flight runs.
3. Pause the deployments ourselves (which also deletes their queued scheduled runs): through
   ``PrefectLink`` (5 s per call, no retry of a refused connection), ``PAUSE_SECONDS`` in all.
   What could not be paused is said in one line.

A watchdog bounds the whole stop: armed by the signal, it fires ``WATCHDOG_SECONDS`` later if
the process is still stopping (Prefect's runner waiting on a server that does not answer), stops
the flow run processes itself (SIGTERM to each run's process group: the backup engine removes
its partial backup and releases its lock; SIGKILL after ``KILL_GRACE_SECONDS``), says in one
line what it could not do, and exits. Stopping thus takes at most about 25 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from pgkeeper.prefect_api import PrefectLink, PrefectUnavailableError
from tasks.alerts import prefect_link  # serve asks serving.prefect_link()

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

PAUSE_SECONDS = 10.0  # our own pause of the deployments, all calls together
WATCHDOG_SECONDS = 15.0  # from the stop signal to the watchdog taking over
KILL_GRACE_SECONDS = 8.0  # flow processes' time to clean up after SIGTERM before SIGKILL


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Watchdog:
    """Ends the process if stopping takes longer than ``seconds`` after ``arm``."""

    def __init__(self, link: PrefectLink, seconds: float = WATCHDOG_SECONDS) -> None:
        self.link = link
        self.seconds = seconds
        self.processes: Callable[[], list[Any]] = list  # the runner's live process handles
        self._done = threading.Event()
        self._armed = False

    def arm(self) -> None:
        if self._armed:
            return
        self._armed = True
        threading.Thread(target=self._watch, name="pgkeeper-stop-watchdog", daemon=True).start()

    def disarm(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        try:  # the runner may not have started: nothing of it must keep this from ending
            handles = self.processes()
        except Exception:
            handles = []
        for handle in handles:
            _quietly(handle.graceful_kill)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while any(_alive(h) for h in handles) and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = [h for h in handles if _alive(h)]
        for handle in killed:
            _quietly(handle.hard_kill)
        runs = f"; stopped {len(handles)} flow run process(es) itself" if handles else ""
        if killed:
            runs += f" ({len(killed)} with SIGKILL)"
        say(
            f"warning: could not stop through the Prefect server at {self.link.shown} within "
            f"{self.seconds:.0f}s: the deployments are not paused and "
            f"runs cancelled now may still show Running in the UI{runs}"
        )
        os._exit(0)  # the stop was asked for; what is left undone is said above


def _alive(handle: Any) -> bool:
    try:
        return bool(handle.is_alive())
    except Exception:
        return False


def _quietly(action: Callable[[], Any]) -> None:
    with contextlib.suppress(OSError):  # the process is gone already, or not ours any more
        action()


def pause(link: PrefectLink, ids: Sequence[UUID], seconds: float = PAUSE_SECONDS) -> str | None:
    """Pause the deployments (their queued scheduled runs are deleted); None when all were,
    else the one line saying what could not be done. Stops at the first unreachable call."""
    if not link.api_url:
        return None  # a temporary server of Prefect's own: nothing of it outlives this process
    deadline = time.monotonic() + seconds
    done = 0
    for deployment_id in ids:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        link.timeout = min(link.timeout, left)
        try:
            link.request("PATCH", f"/deployments/{deployment_id}", {"paused": True})
        except PrefectUnavailableError as exc:
            return (
                f"warning: could not pause {len(ids) - done} of the {len(ids)} served "
                f"deployments on stopping: {exc.message}"
            )
        done += 1
    if done < len(ids):
        return (
            f"warning: could not pause {len(ids) - done} of the {len(ids)} served deployments "
            f"on stopping: the Prefect server at {link.shown} took more than {seconds:.0f}s"
        )
    return None


def run(
    deployments: Sequence[RunnerDeployment],
    after_registration: Callable[[], None] = lambda: None,
) -> None:
    """Register ``deployments``, serve them until SIGTERM/Ctrl-C, then pause them (bounded)."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    link = prefect_link()
    watchdog = Watchdog(link)

    class BoundedRunner(Runner):
        """Prefect's runner whose stop signal also arms the watchdog."""

        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            watchdog.arm()
            super().handle_sigterm(*args, **kwargs)

        async def start(self, run_once: bool = False, webserver: bool | None = None) -> None:
            # Ctrl-C stops like SIGTERM (bounded too), unless SIGINT is ignored (a job started
            # with & from a script): then it stays ignored.
            main = threading.current_thread() is threading.main_thread()
            if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, self.handle_sigterm)
            await super().start(run_once=run_once, webserver=webserver)

    # limit=None: no cap on concurrent runs, as prefect.serve has; pausing is ours (step 3).
    runner = BoundedRunner(pause_on_shutdown=False, limit=None)

    def processes() -> list[Any]:
        # Prefect's process manager is private API; Prefect is pinned (pyproject.toml).
        manager = runner._process_manager
        found = (manager.get(run_id) for run_id in manager.flow_run_ids())
        return [h for h in found if h is not None and h.pid is not None]

    watchdog.processes = processes
    # Called outside an event loop, add_deployment is the synchronous form: it returns the id.
    ids = [cast(UUID, runner.add_deployment(deployment)) for deployment in deployments]
    after_registration()
    print(f"serving {len(ids)} deployments; Prefect UI: {link.ui_url or link.shown}", flush=True)
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):  # the stop we were asked for
        asyncio.run(runner.start())
    problem = pause(link, ids)
    watchdog.disarm()
    if problem:
        say(problem)
