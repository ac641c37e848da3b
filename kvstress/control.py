"""Run control that needs neither torch nor a model: stop signals (Ctrl-C, SIGTERM) and progress.

    StopRequest          whether a stop signal asked the run to stop, and which; the harness
                         polls it after every forward (stream.py)
    stop_on_interrupt    installs one StopRequest as the handler of SIGINT and SIGTERM: the
                         CLI's, from the moment a command starts (this module owns it)
    Progress             where a run reports how far it got (tables.ProgressBars draws it)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import StopNow

# Signals this close together are one Ctrl-C or SIGTERM (stop_on_interrupt).
_SAME_CTRL_C_S = 1.0
# The signals that stop a run: Ctrl-C, and what a scheduler (Slurm, Kubernetes) sends before it kills a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Progress:
    """Where a run reports how far it got: one bar per label. This one shows nothing."""

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass

    def finish(self) -> None:
        pass


class StopRequest:
    """Whether a stop signal (Ctrl-C's SIGINT, or SIGTERM) asked the run to stop, and which.

    Called, it says whether one did: the harness polls it after every forward. `signum` is the
    signal that asked (SIGTERM once one came: a scheduler is ending the job). Where no forward
    polls it (start-up: the results file, the text, the model), a signal stops at once
    (`at_once()`); while measuring (`deferred()`) the first one waits for the step to end.
    Either way a second one, more than a second after the first, stops at once (StopNow).
    `forwarding(pid)` passes each signal on to a child process (--isolate).
    """

    def __init__(self, *, at_once: bool = False, same_within_s: float | None = None):
        """same_within_s: signals this close together are one (default _SAME_CTRL_C_S)."""
        self.same_within_s = _SAME_CTRL_C_S if same_within_s is None else same_within_s
        self.signum: int | None = None
        self._at_once = at_once
        self._acted: list[float] = []  # when the signals that were acted on came
        self._children: list[int] = []

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame) -> None:
        if self.signum != signal.SIGTERM:
            self.signum = signum
        now = time.monotonic()
        if self._acted and now - self._acted[-1] <= self.same_within_s:
            return  # the same signal again: torchrun, or --isolate's parent, passes it on
        self._acted.append(now)
        for pid in self._children:
            _send(pid, signum)
        if self._at_once or len(self._acted) > 1:
            raise StopNow(self.signum)

    @contextmanager
    def at_once(self) -> Iterator[None]:
        """Work that no forward polls the stop in: a signal stops it at once."""
        yield from self._mode(True)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Measuring: a first signal stops the run after the current forward."""
        yield from self._mode(False)

    def _mode(self, at_once: bool) -> Iterator[None]:
        if self():
            raise StopNow(self.signum)  # asked for after the last poll (compare: in an earlier run)
        previous, self._at_once = self._at_once, at_once
        try:
            yield
        finally:
            self._at_once = previous

    @contextmanager
    def forwarding(self, pid: int) -> Iterator[None]:
        """Pass every stop signal on to process `pid` (one that came before too): it stops with us."""
        self._children.append(pid)
        try:
            if self():
                _send(pid, self.signum)
            yield
        finally:
            self._children.remove(pid)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # it has ended already


_active: StopRequest | None = None


@contextmanager
def stop_on_interrupt(*, at_once: bool = False, same_within_s: float | None = None) -> Iterator[StopRequest]:
    """Ctrl-C or SIGTERM once: the run stops after the current step, keeping what it measured. Twice: now.

    Two within a second count as one: under torchrun every rank gets the terminal's Ctrl-C
    and then the same signal again from torchrun, which passes it on to its workers (and
    kills them 30 s later), and each rank must stop after the same step as the others.
    Yields the StopRequest the harness polls; the previous handlers are restored on exit.
    at_once: a signal stops at once until a deferred() region (the CLI's start-up). Used
    again inside itself, it yields the request already installed (the CLI's, inside a run).
    Outside the main thread (signals cannot be caught there) a stop is never requested.
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    if _active is not None:
        yield _active
        return
    request = StopRequest(at_once=at_once, same_within_s=same_within_s)
    previous = {signum: signal.signal(signum, request.handle) for signum in STOP_SIGNALS}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
