"""Shared pytest fixtures: cached multi-process clusters and /dev/shm bookkeeping."""

from __future__ import annotations

import os
import sys

import pytest

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.cluster import ClusterFactory, shm_snapshot  # noqa: E402

# /dev/shm/dispatch* entries that existed before this session (not ours to judge)
SHM_AT_START = shm_snapshot()
_FACTORY = None


def pytest_configure(config):
    config.addinivalue_line("markers", "run_last: run after every other test of the session")
    config.addinivalue_line("markers", "slow: a slow test")


def pytest_collection_modifyitems(session, config, items):
    last = [item for item in items if item.get_closest_marker("run_last")]
    if last:
        items[:] = [item for item in items if not item.get_closest_marker("run_last")] + last


@pytest.fixture(scope="session")
def cluster_factory():
    """``cluster_factory(num_nodes, ranks_per_node) -> Cluster``, cached for the whole session.

    One cluster per shape is kept alive between tests (spawning torch workers is slow); a cluster
    whose job failed is discarded and respawned on the next request. All are closed at the end.
    """
    global _FACTORY
    _FACTORY = ClusterFactory(max_cached_ranks=int(os.environ.get("DISPATCH_TEST_MAX_CACHED_RANKS", "32")))
    yield _FACTORY
    _FACTORY.close_all()
    _FACTORY = None


@pytest.fixture(scope="session")
def shm_at_start():
    """Names of /dev/shm/dispatch* entries that existed before the session started."""
    return SHM_AT_START
