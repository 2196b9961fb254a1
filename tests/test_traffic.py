"""Traffic counters (get_traffic_stats) against reference_traffic after every dispatch, cached
dispatch and combine of the cases; rail bytes = copies * bytes per token."""

from __future__ import annotations

import pytest

from tests.dispatch_utils import SHAPE_IDS, SHAPES, failures, shape_results


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_traffic_counters(cluster_factory, shape):
    fails = failures(shape_results(cluster_factory, shape), categories=["traffic"])
    assert not fails, "\n".join(fails[:30])
