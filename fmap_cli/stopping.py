"""Stopping cleanly on a signal: the CLI's handlers only record a signal, and long-running work polls
for it (``stop_requested`` returns the signal number, or None) between steps and while it waits.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import TypeVar

from .errors import StoppedError

T = TypeVar("T")
POLL_SECONDS = 0.1  # how soon a signal ends a wait for a decoding thread or the writer

StopRequested = Callable[[], int | None]


def check(stop_requested: StopRequested) -> None:
    """Raise StoppedError if a signal came."""
    signum = stop_requested()
    if signum is not None:
        raise StoppedError(signum)


def wait(get: Callable[[float], T], stop_requested: StopRequested) -> T:
    """``get(timeout)`` until it succeeds (``Future.result``, ``Queue.put``...), stopping if a
    signal came meanwhile: a slow read (a network file system, a stalled disk) must not make
    SIGTERM wait for it."""
    while True:
        try:
            return get(POLL_SECONDS)
        except (TimeoutError, queue.Full):
            check(stop_requested)
