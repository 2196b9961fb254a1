"""Polling with back-off and a deadline: every wait of the CPU backend goes through here."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from ..errors import PeerTimeoutError

_SLEEP_MIN_S = 20e-6
_SLEEP_MAX_S = 1e-3
_PID_CHECK_INTERVAL_S = 0.1


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Progress:
    """Drives an event loop: sleeps when a pass made no progress, fails after ``timeout_s``
    without progress, naming the rank the loop was waiting on.

    Args:
        timeout_s: seconds without progress before giving up.
        what: the call, for the error message ("dispatch", "combine").
        blocker: returns the global rank currently waited on (or None) when a pass stalls.
        local_pids: global rank -> pid of node peers, checked for death while stalled.
    """

    def __init__(self, timeout_s: float, what: str, blocker: Callable[[], Optional[int]],
                 local_pids: Optional[dict] = None) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.blocker = blocker
        self.local_pids = local_pids or {}
        self._sleep_s = _SLEEP_MIN_S
        now = time.monotonic()
        self._last_progress = now
        self._last_pid_check = now

    def step(self, progressed: bool) -> None:
        """Call once per loop pass."""
        if progressed:
            self._sleep_s = _SLEEP_MIN_S
            self._last_progress = time.monotonic()
            return
        now = time.monotonic()
        if now - self._last_pid_check > _PID_CHECK_INTERVAL_S:
            self._last_pid_check = now
            for rank, pid in self.local_pids.items():
                if not pid_alive(pid):
                    raise PeerTimeoutError(rank, f"died (pid {pid}) during {self.what}")
        if now - self._last_progress > self.timeout_s:
            rank = self.blocker()
            raise PeerTimeoutError(-1 if rank is None else rank, f"did not take part in {self.what}", self.timeout_s)
        time.sleep(self._sleep_s)
        self._sleep_s = min(_SLEEP_MAX_S, self._sleep_s * 2)
