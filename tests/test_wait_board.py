"""The node's wait board (dispatch/host/wait_board.py) in one process: the words of a node's
ranks live in one tensor, and boards of different ranks read each other's words, as node-mates
do through the node segment."""

from __future__ import annotations

import time

import pytest
import torch

from dispatch.host import wait_board
from dispatch.host.progress import Progress
from dispatch.errors import PeerTimeoutError
from dispatch.host.wait_board import WaitBoard
from dispatch.topology import Topology

R, L = 8, 4  # two nodes of four; node 0 holds ranks 0-3


@pytest.fixture
def boards():
    """The wait boards of ranks 0-3, sharing one word per rank."""
    words = torch.zeros(L, dtype=torch.int64)
    address = lambda j: words.data_ptr() + 8 * j  # noqa: E731
    return [WaitBoard(Topology(R, L, rank), address) for rank in range(L)], words


def test_a_chain_ends_at_a_rank_of_another_node(boards):
    board, _ = boards
    board[1].publish(2)
    board[2].publish(6)
    assert board[0].waits_on(1) == 2
    assert board[0].follow(1) == [1, 2, 6]


def test_a_chain_ends_at_a_node_mate_that_said_nothing(boards):
    board, _ = boards
    board[1].publish(3)
    assert board[0].follow(1) == [1, 3]
    board[3].publish(None)  # waits on nothing known
    assert board[0].follow(1) == [1, 3]


def test_a_chain_stops_before_a_cycle_and_before_this_rank(boards):
    board, _ = boards
    board[1].publish(2)
    board[2].publish(1)
    assert board[0].follow(1) == [1, 2]
    board[2].publish(0)  # back to the rank asking
    assert board[0].follow(1) == [1, 2]


def test_an_old_word_is_ignored(boards, monkeypatch):
    board, _ = boards
    board[1].publish(5)
    now_ms = wait_board._now_ms()
    monkeypatch.setattr(wait_board, "_now_ms", lambda: now_ms + int(wait_board.FRESH_S * 1000) + 1)
    assert board[0].waits_on(1) is None
    assert board[0].follow(1) == [1]


def test_a_closed_board_neither_writes_nor_reads(boards):
    board, words = boards
    board[1].close()
    board[1].publish(5)
    assert int(words[1]) == 0
    board[2].publish(5)
    assert board[1].waits_on(2) is None


def _stall(progress: Progress, seconds: float) -> None:
    """Stalled passes of ``progress`` for about ``seconds`` (each sleeps a little)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        progress.step(False)


def test_a_stalled_loop_says_what_it_waits_on_and_takes_it_back(boards):
    board, _ = boards
    progress = Progress(60.0, "combine", lambda: 6, local_pids={}, waits=board[1])
    _stall(progress, 0.25)  # past the 0.1 s between refreshes
    assert board[0].waits_on(1) == 6
    progress.step(True)
    assert board[0].waits_on(1) is None
    _stall(progress, 0.25)
    progress.finish()
    assert board[0].waits_on(1) is None


def test_a_timeout_on_a_live_node_mate_names_the_end_of_its_chain(boards):
    board, _ = boards
    board[1].publish(2)
    board[2].publish(6)
    progress = Progress(0.05, "combine", lambda: 1, local_pids={1: -1, 2: -1, 3: -1}, waits=board[0])
    with pytest.raises(PeerTimeoutError) as error:
        _stall(progress, 1.0)
    assert error.value.rank == 6
    assert "rank 1 waits on rank 2, which waits on it" in str(error.value)


def test_a_node_mate_that_said_nothing_gets_the_grace_then_is_named(boards):
    board, _ = boards
    progress = Progress(0.2, "dispatch", lambda: 3, local_pids={1: -1, 2: -1, 3: -1}, waits=board[0])
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError) as error:
        _stall(progress, 5.0)
    assert error.value.rank == 3
    assert time.monotonic() - start >= 0.2 * 1.5 - 0.01  # the grace was granted
