"""Waiting with a deadline: every wait of the CPU backend goes through here.

With a doorbell (the node link), a loop pass that found nothing to do sleeps on this rank's
futex until a peer or a rail waiter thread rings it; without one it polls with back-off."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Protocol, Sequence

from ..errors import PeerTimeoutError

_SLEEP_MIN_S = 20e-6
_SLEEP_MAX_S = 1e-3
_PID_CHECK_INTERVAL_S = 0.1
# A live node-mate that stalls is usually stuck behind the real failure: the wait board names
# what it waits on (wait_board.py); if it said nothing, give it this fraction of timeout_s more
# to record that failure in the node's failure word before blaming it. Without
# it, a CI run (2026-12-03) had rank 2 of a 2x2 cluster, neither node-mate nor rail peer of the
# killed rank 1, name its node-mate 3 (tests/test_faults.py).
LIVE_PEER_GRACE_FRACTION = 0.5
# A rank whose call failed naming a rail peer waits this fraction of timeout_s for that peer's
# abort word (backend.py). Shorter than the grace above, which its node-mates are giving it
# meanwhile: otherwise a rank waiting for a word from across a cut link is blamed by its own
# node-mates before it records whom it blames (tests/test_netns.py, a cut during combine).
MESSENGER_GRACE_FRACTION = 0.25


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
        bell: an object with ``bell_rings()`` and ``wait_bell(seen, timeout_s)`` (the node
            link); every change a pass can wait on must ring it.
        failures: the buffer's ``FailureBoard``: a stalled pass gives up at once, naming the
            first failed rank, when another rank recorded one.
        waits: the node's ``WaitBoard``: a stalled pass says what it waits on there, and a
            timeout on a live node-mate names the end of that node-mate's wait chain.
    """

    def __init__(self, timeout_s: float, what: str, blocker: Callable[[], Optional[int]],
                 local_pids: Optional[dict] = None, bell: Any = None, failures: Any = None,
                 waits: Any = None) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.blocker = blocker
        self.local_pids = local_pids or {}
        self.bell = bell
        self.failures = failures
        self.waits = waits
        # Read before the first pass: a ring during a pass makes the next wait return at once.
        self._seen = bell.bell_rings() if bell is not None else 0
        self._sleep_s = _SLEEP_MIN_S
        now = time.monotonic()
        self._last_progress = now
        self._last_pid_check = now
        self._grace_s = 0.0  # extra wait granted to a live node-mate blocker (see above)
        self._said_waiting = False  # this loop's blocker is on the wait board

    def step(self, progressed: bool) -> None:
        """Call once per loop pass."""
        if progressed:
            self._sleep_s = _SLEEP_MIN_S
            self._last_progress = time.monotonic()
            self._grace_s = 0.0
            if self._said_waiting:  # moving again (a flag test: this runs every pass that moved)
                self.finish()
            if self.bell is not None:
                self._seen = self.bell.bell_rings()
            return
        now = time.monotonic()
        origin = self.failures.origin() if self.failures is not None else None
        if origin is not None:
            raise PeerTimeoutError(origin, f"failed first; {self.what} on this rank gave up")
        if now - self._last_pid_check > _PID_CHECK_INTERVAL_S:
            self._last_pid_check = now
            for rank, pid in self.local_pids.items():
                if not pid_alive(pid):
                    raise PeerTimeoutError(rank, f"died (pid {pid}) during {self.what}")
            if self.waits is not None:
                self.waits.publish(self.blocker())
                self._said_waiting = True
        if now - self._last_progress > self.timeout_s + self._grace_s:
            self._give_up_or_grant_grace()
        if self.bell is not None:
            left_s = self.timeout_s + self._grace_s - (now - self._last_progress)
            wait_s = min(_PID_CHECK_INTERVAL_S, max(left_s, 0.0)) + 1e-3
            self.bell.wait_bell(self._seen, wait_s)
            self._seen = self.bell.bell_rings()
            return
        time.sleep(self._sleep_s)
        self._sleep_s = min(_SLEEP_MAX_S, self._sleep_s * 2)

    def finish(self) -> None:
        """Call when the loop is done: takes back what the wait board says."""
        if self._said_waiting:
            self._said_waiting = False
            self.waits.publish(None)

    def _give_up_or_grant_grace(self) -> None:
        """Past the deadline: raises naming the end of the wait chain from the blocker, unless
        that end is a live node-mate seen for the first time, which gets a grace to record the
        failure it is stuck behind."""
        rank = self.blocker()
        chain = [rank]
        if rank in self.local_pids and self.waits is not None:
            chain = self.waits.follow(rank)
        culprit = chain[-1]
        if self._grace_s == 0.0 and culprit in self.local_pids:
            self._grace_s = LIVE_PEER_GRACE_FRACTION * self.timeout_s
            return
        what = f"did not take part in {self.what}"
        if len(chain) > 1:
            which = ", which" if len(chain) > 2 else ""
            what += f" ({' waits on '.join(f'rank {r}' for r in chain[:-1])}{which} waits on it)"
        raise PeerTimeoutError(-1 if culprit is None else culprit, what, self.timeout_s)


class Role(Protocol):
    """One part of a rank's work in an event loop (dispatch: rail sender, outbox filler, placer;
    combine: returner, reducer, accumulator). ``step`` never blocks."""

    def step(self) -> bool:
        """Does whatever is ready; True if anything moved."""

    @property
    def done(self) -> bool:
        """Nothing left to do in this call."""

    def waiting_on(self) -> Optional[int]:
        """The global rank this role cannot go on without, if any (for the timeout's message)."""


def first_behind(positions: Sequence[int], streams: Sequence[Sequence[Any]]) -> Optional[int]:
    """The first local rank ``j`` whose stream ``streams[j]`` is not consumed up to its end
    (``positions[j]`` items done), or None when all are."""
    for j, stream in enumerate(streams):
        if positions[j] < len(stream):
            return j
    return None


def first_waited(roles: Sequence[Role]) -> Optional[int]:
    """The rank the first waiting role of ``roles`` waits on."""
    for role in roles:
        rank = role.waiting_on()
        if rank is not None:
            return rank
    return None


def drive(roles: Sequence[Role], progress: Progress) -> None:
    """The event loop: every pass steps each role in order, until all are done; a pass that
    moved nothing sleeps (``progress.step``), and raises after the timeout."""
    while True:
        progressed = False
        for role in roles:
            progressed |= role.step()
        if all(role.done for role in roles):
            progress.finish()
            return
        progress.step(progressed)
