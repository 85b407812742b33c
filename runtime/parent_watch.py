"""No orphans: a process started by a pagedserve process ends soon after that parent dies, however it dies.

A parent killed by SIGKILL runs no clean-up, so the child watches for itself: when its parent dies the kernel hands
it to init (or to a subreaper) and os.getppid() changes. Polling that is portable and needs no file descriptor
passed down; the child compares with the parent's pid given on its command line, so a parent that died before
the watch started is noticed at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import structlog

log = structlog.get_logger()

POLL_INTERVAL_S = 0.25
STOP_GRACE_S = 1.0  # between the SIGTERM to itself and os._exit


def exit_when_parent_dies(parent_pid: int) -> None:
    """Starts a daemon thread that, once this process's parent is no longer parent_pid, sends SIGTERM to this
    process (its graceful stop, or the default action before signal handlers are installed) and ends it with
    os._exit(1) if it is still running STOP_GRACE_S later: gone within POLL_INTERVAL_S + STOP_GRACE_S."""
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_INTERVAL_S)
    try:
        log.error("parent_process_gone", parent_pid=parent_pid, action="exiting")
    finally:  # the log's stream may be a pipe the parent held, closed now: the process ends all the same
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os._exit(1)
