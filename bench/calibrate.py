"""Speeds of the CPU backend's own movers (``dispatch._C``), for the cost model's emulated links.

On one host the in-node "link" is the C++ movers writing and reading shared memory, so its
speed is theirs, per kind of move, not memcpy's: records are gathered from scattered token rows,
placed with streaming stores, and combine converts bf16/fp16 to fp32 as it sums. Each mover runs
here on synthetic data of the run's exact row layout, in one process, on memory that stays
mapped (as the backend's recycled staging and receive blocks are), and reports bytes per second
of its own CPU time. The buffers rotate over more memory than the last-level cache holds, as
the 4+ ranks sharing a host do::

    pack        records gathered from x into a staging chunk        (record bytes)
    unpack      records placed into receive rows                    (record bytes)
    gather      combine rows copied to a reducer's return slot      (return-row bytes)
    reduce_first  a record's first row read into its partial       (return-row bytes)
    reduce_more   each further row read and summed into it         (return-row bytes)
    accumulate  one partial added at the source (half of them cast to the output, as the
                last term of a token is)                            (partial bytes)
"""

from __future__ import annotations

import time
from typing import Callable, Dict

import torch

from bench.common import DTYPES, combine_dtype, median_seconds

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3, torch.float8_e4m3fn: 4}


def _cpu_seconds(fn: Callable[[], None], reps: int) -> float:
    """Median thread CPU seconds of ``fn`` after one warm-up call."""
    return max(median_seconds(fn, reps, time.thread_time), 1e-9)


def mover_speeds(hidden: int, topk: int, ranks_per_node: int, dtype: str, chunk_records: int,
                 num_tokens: int = 4096, reps: int = 3, working_set_bytes: int = 96 << 20,
                 seed: int = 0) -> Dict[str, float]:
    """Bytes per CPU-second of each mover for this layout (see the module docstring).

    Args:
        hidden: hidden size.
        topk: top-k carried by dispatch records and combined as weights.
        ranks_per_node: ``L`` (record header size, reduce fan-in).
        dtype: ``bf16``/``fp16``/``fp32``/``fp8`` (dispatch); combine uses ``combine_dtype``.
        chunk_records: records per chunk, as the backend cuts them.
        num_tokens: rows of the synthetic x the records are gathered from.
        reps: timed repetitions (median).
        working_set_bytes: memory the chunks rotate over (above the last-level cache).
    """
    from dispatch import _C
    from dispatch.host.memory import host_empty
    from dispatch.host.movers import mover_args

    L, k = ranks_per_node, topk
    gen = torch.Generator().manual_seed(seed)
    x_dtype = DTYPES[dtype]
    elem = torch.empty(0, dtype=x_dtype).element_size()
    scale_cols = (hidden + 127) // 128 if dtype == "fp8" else 0
    record = _C.RecordLayout(L, k, hidden * elem, scale_cols * 4)
    n = max(1, min(chunk_records, num_tokens))
    chunks = max(2, -(-working_set_bytes // (n * record.bytes)))
    x = torch.randint(0, 256, (num_tokens, hidden * elem), dtype=torch.uint8, generator=gen)
    scales = torch.rand(num_tokens, max(1, scale_cols), generator=gen)
    topk_idx = torch.randint(0, 64, (num_tokens, max(1, k)), generator=gen)
    topk_weights = torch.rand(num_tokens, max(1, k), generator=gen)
    tokens = torch.randperm(num_tokens, generator=gen)[:n].sort().values.to(torch.int32)
    rows = torch.arange(n, dtype=torch.int32)
    dst_rows = torch.full((n, L), -1, dtype=torch.int32)
    dst_rows[:, 0] = rows
    staging = host_empty((chunks, n * record.bytes), torch.uint8, zero=True)
    recv_x = host_empty((chunks, n * hidden * elem), torch.uint8, zero=True)
    recv_scales = torch.zeros(n, max(1, scale_cols))
    recv_idx = torch.zeros(n, max(1, k), dtype=torch.int64)
    recv_w = torch.zeros(n, max(1, k))
    log = torch.empty(3, n, dtype=torch.int32)
    scale_ptr = scales.data_ptr() if scale_cols else 0

    pack_args = mover_args(_C.PackRecordsArgs, out_bytes=n * record.bytes, layout=record, x=x.data_ptr(),
                           num_tokens=num_tokens, scales=scale_ptr, topk_idx=topk_idx.data_ptr() if k else 0,
                           topk_weights=topk_weights.data_ptr() if k else 0, src_rank=0, token_ids=tokens.data_ptr(),
                           dst_rows=dst_rows.data_ptr(), num_records=n)
    unpack_args = mover_args(_C.UnpackRecordsArgs, layout=record, num_records=n, local_rank=0, num_recv_rows=n,
                             recv_scales=recv_scales.data_ptr() if scale_cols else 0,
                             recv_topk_idx=recv_idx.data_ptr() if k else 0, recv_topk_weights=recv_w.data_ptr() if k else 0,
                             expert_begin=0, experts_per_rank=8, rows_out=log[0].data_ptr(),
                             src_ranks_out=log[1].data_ptr(), src_tokens_out=log[2].data_ptr(), log_capacity=n)

    def pack() -> None:
        for c in range(chunks):
            pack_args.out = staging[c].data_ptr()
            _C.pack_records(pack_args, 1)

    def unpack() -> None:
        for c in range(chunks):
            unpack_args.chunk, unpack_args.recv_x = staging[c].data_ptr(), recv_x[c].data_ptr()
            _C.unpack_records(unpack_args, 1)

    moved = chunks * n
    speeds = {"pack": moved * record.bytes / _cpu_seconds(pack, reps)}
    speeds["unpack"] = moved * record.bytes / _cpu_seconds(unpack, reps)
    del staging, recv_x

    # Combine: expert outputs in the combine dtype, returned to a reducer and summed.
    c_dtype = DTYPES[combine_dtype(dtype)]
    c_elem = torch.empty(0, dtype=c_dtype).element_size()
    acc_bytes = 8 if c_dtype == torch.float64 else 4
    y = torch.randn(num_tokens, hidden, generator=gen).to(c_dtype)
    y_weights = torch.rand(num_tokens, max(1, k), generator=gen)
    return_layout = _C.ReturnRowLayout(hidden * c_elem, k)
    partial_layout = _C.PartialRowLayout(hidden, acc_bytes, k)
    slots = max(L, -(-working_set_bytes // (n * return_layout.bytes)))
    returns = host_empty((slots, n * return_layout.bytes), torch.uint8, zero=True)

    gather_args = mover_args(_C.GatherReturnRowsArgs, out_bytes=n * return_layout.bytes, layout=return_layout,
                             x=y.data_ptr(), num_x_rows=num_tokens, weights=y_weights.data_ptr() if k else 0,
                             rows=tokens.data_ptr(), num_rows=n)

    def gather() -> None:
        for c in range(slots):
            gather_args.out = returns[c].data_ptr()
            _C.gather_return_rows(gather_args, 1)

    speeds["gather"] = slots * n * return_layout.bytes / _cpu_seconds(gather, reps)
    groups = slots // L
    pointers = [torch.tensor([returns[g * L + j].data_ptr() for j in range(L)], dtype=torch.int64)
                for g in range(groups)]
    partials = host_empty((groups, n * partial_layout.bytes), torch.uint8, zero=True)
    code = _DTYPE_CODES[c_dtype]

    def reduce_with(fan_in: int) -> Callable[[], None]:
        routes = torch.full((n, L), -1, dtype=torch.int32)
        routes[:, :fan_in] = rows.view(n, 1)
        # The reducer is the last local rank: as in combine, its own rows (when fan_in reaches
        # it) come from its expert outputs, the others' from their return chunks.
        args = _C.ReduceChunkArgs()
        args.num_records, args.num_ranks_per_node = n, L
        args.return_layout, args.partial_layout = return_layout, partial_layout
        args.self_local_rank, args.self_x, args.self_rows = L - 1, y.data_ptr(), rows.data_ptr()
        args.self_weights = y_weights.data_ptr() if k else 0
        args.x_row_bytes, args.dtype = hidden * c_elem, code

        def run() -> None:
            args.dst_rows = routes.data_ptr()  # run keeps routes alive
            for g in range(groups):
                args.return_chunks, args.partials = pointers[g].data_ptr(), partials[g].data_ptr()
                _C.reduce_chunk(args, 1)
        return run

    # cost(fan_in) = first + (fan_in - 1) * more, per record: two fan-ins give both terms.
    one = _cpu_seconds(reduce_with(1), reps) / (groups * n)
    speeds["reduce_first"] = return_layout.bytes / one
    if L > 1:
        full = _cpu_seconds(reduce_with(L), reps) / (groups * n)
        speeds["reduce_more"] = return_layout.bytes / max((full - one) / (L - 1), one * 0.05)
    else:
        speeds["reduce_more"] = speeds["reduce_first"]

    acc = host_empty((num_tokens, hidden), torch.float64 if acc_bytes == 8 else torch.float32, zero=True)
    acc_weights = torch.zeros(num_tokens, max(1, k))
    out = host_empty((num_tokens, hidden), c_dtype, zero=True)
    output = _C.CombineOutput(out.data_ptr(), code, 0, 0, 0, 0)
    last_term = (torch.arange(n) % 2).to(torch.uint8)

    def accumulate() -> None:
        for g in range(groups):
            _C.accumulate_partials(acc.data_ptr(), acc_weights.data_ptr() if k else 0, partials[g].data_ptr(),
                                   partial_layout, tokens.data_ptr(), n, last_term.data_ptr(), output, 1)

    speeds["accumulate"] = groups * n * partial_layout.bytes / _cpu_seconds(accumulate, reps)
    return speeds
