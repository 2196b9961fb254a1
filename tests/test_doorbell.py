"""The doorbell (futex in shared memory) the CPU backend's loops sleep on, in one or two
processes: a ring is never lost, a wait without a ring times out, a ring from another process
wakes the sleeper early."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from dispatch import _C

_BELL_BYTES = 64


@pytest.fixture
def segment(request):
    """A fresh shared-memory segment (zeroed: every bell starts at 0 rings), removed afterwards."""
    seg = _C.SharedMemorySegment(f"/dispatch-test-bell-{request.node.name[:40]}-{os.getpid()}", 4096, True)
    yield seg
    seg.unlink()
    seg.close()


def test_wait_returns_at_once_after_a_ring_it_has_not_seen(segment):
    bell = segment.address
    seen = _C.doorbell_rings(bell)
    _C.doorbell_ring(bell)  # a ring between reading the count and waiting
    start = time.monotonic()
    assert _C.doorbell_wait(bell, seen, 5.0) is True
    assert time.monotonic() - start < 1.0
    assert _C.doorbell_rings(bell) == seen + 1


def test_wait_without_a_ring_times_out(segment):
    bell = segment.address
    seen = _C.doorbell_rings(bell)
    start = time.monotonic()
    assert _C.doorbell_wait(bell, seen, 0.05) is False
    assert time.monotonic() - start >= 0.04


def test_ring_from_a_thread_wakes_the_sleeper_early(segment):
    bell = segment.address
    seen = _C.doorbell_rings(bell)
    timer = threading.Timer(0.05, _C.doorbell_ring, args=(bell,))
    start = time.monotonic()
    timer.start()
    assert _C.doorbell_wait(bell, seen, 10.0) is True
    assert time.monotonic() - start < 5.0
    timer.join()


def _ring_later(name: str, delay_s: float) -> None:
    from dispatch import _C as C
    segment = C.SharedMemorySegment(name, 4096, False)
    time.sleep(delay_s)
    C.doorbell_ring(segment.address + _BELL_BYTES)  # the second bell of the segment
    segment.close()


def test_ring_from_another_process_wakes_only_its_bell(segment):
    first, second = segment.address, segment.address + _BELL_BYTES
    seen_first, seen_second = _C.doorbell_rings(first), _C.doorbell_rings(second)
    peer = mp.get_context("spawn").Process(target=_ring_later, args=(segment.name, 0.2))
    peer.start()
    start = time.monotonic()
    assert _C.doorbell_wait(second, seen_second, 30.0) is True
    assert time.monotonic() - start < 25.0
    peer.join(timeout=30)
    assert peer.exitcode == 0
    assert _C.doorbell_rings(first) == seen_first
