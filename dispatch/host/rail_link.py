"""The slow link of the CPU backend: gloo point-to-point among rail peers.

Ranks with the same local index form one rail (one gloo subgroup each); a rank only ever
talks to its rail peers over it.

Besides the data, the rail carries the *abort channel*: one int64 word per rail peer and
buffer, received by a receive posted for the life of the rail. A rank whose call failed sends
every rail peer the rank it blames (origin + 1); the receiver records it in its node's failure
word (failure.py), so a node that only saw a messenger leave still names the rank that failed
first. A normal close sends 0 (goodbye) instead, which ends the peers' receives, so nothing is
left in flight for the socket shutdown.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import socket
import threading
import time
import weakref
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Set

import torch
import torch.distributed as dist

from ..errors import PeerTimeoutError
from ..topology import Topology


class Pending:
    """A rail transfer in flight: gloo's point-to-point work reports completion only through a
    blocking ``wait()``, so a daemon waiter thread turns it into a flag the event loop polls."""

    __slots__ = ("work", "finished", "error", "on_done", "__weakref__")

    def __init__(self, work: "dist.Work", on_done: Optional[Callable[[], None]] = None) -> None:
        self.work = work
        self.finished = False
        self.error: Optional[BaseException] = None
        self.on_done = on_done


class _Waiters:
    """Daemon threads that block in ``work.wait()``; one more is started whenever all are busy,
    so a transfer never queues behind another.

    A waiter must never return from ``work.wait()`` while the interpreter finalizes: the thread
    would be stopped by ``pthread_exit`` inside pybind11's GIL guard and the process abort
    (``terminate called without an active exception``). ``RailLink.close()`` and the exit hook
    below therefore end every transfer still in flight (see ``RailLink._abort_in_flight``)."""

    def __init__(self) -> None:
        self._queue: "queue.Queue[Pending]" = queue.Queue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, pending: Pending) -> None:
        with self._lock:
            if self._idle == 0:
                threading.Thread(target=self._run, name="dispatch-rail-waiter", daemon=True).start()
            else:
                self._idle -= 1
        self._queue.put(pending)

    def _run(self) -> None:
        while True:
            pending = self._queue.get()
            try:
                pending.work.wait()
            except BaseException as error:  # reported to the event loop, never lost
                pending.error = error
            pending.finished = True
            if pending.on_done is not None:
                try:
                    pending.on_done()
                except BaseException:  # a late ring after close() must not kill the waiter
                    pass
            with self._lock:
                self._idle += 1


_WAITERS = _Waiters()
# Rails not closed yet: closed by the exit hook, which runs before daemon threads are stopped.
_LIVE_RAILS: "weakref.WeakSet[RailLink]" = weakref.WeakSet()
# How long close() waits for waiters to return once their sockets are shut down.
_ABORT_WAIT_S = 5.0
# The abort channel's tag: above every chunk tag and notify's (1 << 24).
ABORT_TAG = (1 << 24) + 1
# Abort-channel word of a rank that closes normally; a rank that gave up sends origin + 1.
_GOODBYE = 0
# How long close() waits for the abort-channel words in flight (the peers' goodbyes: destroy is
# collective, so they come within milliseconds; a buffer freed on one rank alone pays this).
_GOODBYE_WAIT_S = 1.0


def _socket_fds() -> Set[int]:
    """This process's open socket file descriptors."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:  # closed while listing
            pass
    return fds


@atexit.register
def _close_live_rails() -> None:
    for rail in list(_LIVE_RAILS):
        rail.close()


class RailLink:
    """gloo subgroup of this rank's rail.

    Args:
        group: the buffer's process group (collective: every rank constructs it).
        topo: this rank's topology.
        timeout_s: the buffer's timeout; gloo's own is set longer so ours fires first.
    """

    def __init__(self, group: dist.ProcessGroup, topo: Topology, timeout_s: float) -> None:
        self.topo = topo
        self.group: Optional[dist.ProcessGroup] = None
        # Called by the waiter thread when a transfer finishes (the backend rings its doorbell).
        self.on_complete: Optional[Callable[[], None]] = None
        self._global = [dist.get_global_rank(group, r) for r in range(topo.num_ranks)]
        self._in_flight: "weakref.WeakSet[Pending]" = weakref.WeakSet()
        # Sockets of this rail's gloo context (the ones its construction opened).
        self._socket_fds: Set[int] = set()
        self._rail_peers = [topo.rail_peer(m) for m in range(topo.num_nodes) if m != topo.node]
        self._on_abort: Optional[Callable[[int], None]] = None
        self._abort_receives: Dict[int, Pending] = {}
        self._abort_heard: Dict[int, threading.Event] = {}
        self._abort_sends: List[Pending] = []
        self._abort_said = False
        if topo.num_nodes == 1:
            return
        gloo_timeout = timedelta(seconds=2 * timeout_s + 30)
        before = _socket_fds()
        # Every rank builds every rail group, in the same order: torch names groups by a
        # counter, so a second Buffer gets fresh groups (hashed names would collide).
        for local in range(topo.num_ranks_per_node):
            ranks = [self._global[r] for r in topo.rail_ranks(local)]
            rail_group = dist.new_group(ranks=ranks, backend="gloo", timeout=gloo_timeout)
            if local == topo.local_rank:
                self.group = rail_group
        self._socket_fds = _socket_fds() - before
        _LIVE_RAILS.add(self)

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Pending:
        """Starts sending ``tensor`` to group rank ``peer``."""
        return self._start(dist.isend, tensor, peer, tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Pending:
        """Starts receiving into ``tensor`` from group rank ``peer``."""
        return self._start(dist.irecv, tensor, peer, tag)

    def _start(self, op, tensor: torch.Tensor, peer: int, tag: int,
               on_finish: Optional[Callable[[Pending], None]] = None) -> Pending:
        try:
            pending = Pending(op(tensor, self._global[peer], group=self.group, tag=tag))
        except RuntimeError as error:
            raise PeerTimeoutError(peer, f"is unreachable on the rail ({error})") from error

        def finished() -> None:  # in the waiter thread
            if on_finish is not None:
                on_finish(pending)
            if self.on_complete is not None:
                self.on_complete()

        pending.on_done = finished
        self._in_flight.add(pending)
        _WAITERS.submit(pending)
        return pending

    # --- the abort channel: the first failure, carried across nodes ---------------------------
    def listen_for_aborts(self, on_abort: Callable[[int], None]) -> None:
        """Posts one receive per rail peer on the abort channel for the life of the rail: a rail
        peer that gives up sends the rank it blames (``announce_abort``), and ``on_abort(origin)``
        runs in a waiter thread when it arrives. Called once, before the first call."""
        self._on_abort = on_abort
        for peer in self._rail_peers:
            inbox = torch.zeros(1, dtype=torch.int64)
            self._abort_heard[peer] = threading.Event()
            self._abort_receives[peer] = self._start(dist.irecv, inbox, peer, ABORT_TAG,
                                                     functools.partial(self._abort_arrived, peer, inbox))

    def _abort_arrived(self, peer: int, inbox: torch.Tensor, pending: Pending) -> None:
        word = int(inbox[0]) if pending.error is None else _GOODBYE
        if word != _GOODBYE and self._on_abort is not None:
            self._on_abort(word - 1)
        self._abort_heard[peer].set()

    def abort_heard_from(self, peer: int) -> bool:
        """Whether ``peer``'s abort-channel word (an origin, its goodbye, or its connection's
        failure) has been handled; True for a rank that is not a rail peer."""
        heard = self._abort_heard.get(peer)
        return heard is None or heard.is_set()

    def announce_abort(self, origin: int) -> None:
        """Tells every rail peer, once, that this rank gave up blaming ``origin`` (best effort:
        never raises, never waits)."""
        if self._abort_said or not self._abort_receives:
            return
        self._abort_said = True
        self._send_abort_word(origin + 1)

    def _send_abort_word(self, word: int) -> None:
        for peer in self._rail_peers:
            try:
                self._abort_sends.append(self._start(dist.isend, torch.tensor([word], dtype=torch.int64), peer,
                                                     ABORT_TAG))
            except Exception:  # a peer (or the process group) already gone needs no word
                pass

    def _close_abort_channel(self) -> None:
        """Sends the goodbye word unless an origin was sent, then waits (bounded) for the words
        in flight both ways, so that a normal close leaves nothing for the socket shutdown."""
        if not self._abort_receives:
            return
        if not self._abort_said:
            self._abort_said = True
            self._send_abort_word(_GOODBYE)
        deadline = time.monotonic() + _GOODBYE_WAIT_S
        waiting = list(self._abort_sends) + list(self._abort_receives.values())
        while any(not p.finished for p in waiting) and time.monotonic() < deadline:
            time.sleep(0.002)

    @staticmethod
    def done(pending: Pending, peer: int) -> bool:
        """True once the transfer finished; a failed transfer raises naming ``peer``."""
        if not pending.finished:
            return False
        if pending.error is not None:
            raise PeerTimeoutError(peer, f"failed on the rail ({pending.error})") from pending.error
        return True

    def close(self) -> None:
        """Says goodbye on the abort channel, ends transfers still in flight (after a failure,
        or on a rank closing alone), then frees the rail group."""
        _LIVE_RAILS.discard(self)
        if self.group is not None:
            self._close_abort_channel()
            self._abort_in_flight()
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # the default group may already be gone at exit
                pass
            self.group = None

    def _abort_in_flight(self) -> None:
        """Makes every waiter blocked on this rail return, and waits until they have.

        Only a failed call leaves transfers in flight. gloo's Python API cannot abort them, so
        the rail's own sockets are shut down: gloo then fails every pending transfer at once.
        """
        in_flight = [p for p in self._in_flight if not p.finished]
        if not in_flight:
            return
        for fd in self._socket_fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                # Never the listener: gloo's accept loop treats a shut listener as fatal.
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # not a stream socket, or already closed
                pass
            finally:
                sock.detach()  # gloo still owns the descriptor
        deadline = time.monotonic() + _ABORT_WAIT_S
        while any(not p.finished for p in in_flight) and time.monotonic() < deadline:
            time.sleep(0.01)


def wait_all(pending: Dict[int, Pending], progress) -> None:
    """Waits for every ``peer -> work`` with the progress object's timeout, deleting each from
    ``pending`` as it finishes: a blocker that reads ``pending`` names a peer still waited on."""
    while pending:
        finished = [peer for peer, work in pending.items() if RailLink.done(work, peer)]
        for peer in finished:
            del pending[peer]
        if pending:
            progress.step(bool(finished))
    progress.finish()
