"""Benchmarks and models for ``dispatch``.

* ``python -m bench.all_to_all``  - dispatch/combine bandwidth vs ``torch.distributed.all_to_all_single``
* ``python -m bench.sm_sweep``    - bandwidth and GB/s per SM (or worker thread) against ``num_sms``
* ``python -m bench.cost_model``  - alpha-beta cluster cost model (two-hop vs flat vs hierarchical)

``bench.common`` holds the pieces they share: routing generators, the exact per-rank traffic
counts of a routing (pure torch, the same numbers as ``Buffer.get_traffic_stats()``), record
sizes, and a local process launcher for emulated clusters.
"""
