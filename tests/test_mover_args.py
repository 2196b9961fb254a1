"""The movers (reduce_chunk, pack_records, unpack_records, gather_return_rows) take argument
structs and refuse impossible arguments with a ValueError naming the field, before any byte moves (tests/test_dispatch_combine.py covers the
arguments the event loop really passes)."""

from __future__ import annotations

import pytest
import torch

from dispatch import _C
from dispatch.host.movers import mover_args


def _args(**over):
    hidden, k = 8, 2
    x = torch.zeros(4, hidden, dtype=torch.float32)
    out = torch.zeros(1024, dtype=torch.uint8)
    dst_rows = torch.tensor([[0, -1]], dtype=torch.int32)
    pointers = torch.zeros(2, dtype=torch.int64)
    rows = torch.zeros(1, dtype=torch.int32)
    args = _C.ReduceChunkArgs()
    args.dst_rows, args.num_records, args.num_ranks_per_node = dst_rows.data_ptr(), 1, 2
    args.return_chunks, args.return_layout = pointers.data_ptr(), _C.ReturnRowLayout(hidden * 4, k)
    args.self_local_rank, args.self_x, args.self_rows, args.x_row_bytes, args.dtype = 0, x.data_ptr(), rows.data_ptr(), hidden * 4, 0
    weights = torch.ones(4, k)
    args.self_weights = weights.data_ptr()
    args.partials, args.partial_layout = out.data_ptr(), _C.PartialRowLayout(hidden, 4, k)
    for name, value in over.items():
        setattr(args, name, value)
    return args, (x, out, dst_rows, pointers, rows, weights)  # keep the tensors alive


def test_good_arguments_reduce():
    args, (x, out, *_rest) = _args()
    x[0] = torch.arange(8.0)
    _C.reduce_chunk(args, 1)
    assert torch.equal(out[:32].view(torch.float32), torch.arange(8.0))


@pytest.mark.parametrize("field,value,words", [
    ("num_records", -1, "num_records"),
    ("num_ranks_per_node", 0, "num_ranks_per_node"),
    ("self_local_rank", 2, "self_local_rank"),
    ("self_local_rank", -2, "self_local_rank"),
    ("dtype", 4, "dtype"),
    ("x_row_bytes", 16, "x_row_bytes"),
    ("partial_layout", _C.PartialRowLayout(4, 4, 2), "partial_layout"),
    ("dst_rows", 0, "dst_rows"),
    ("acc", 12345, "exactly one of partials and acc"),
])
def test_bad_arguments_raise(field, value, words):
    args, keep = _args(**{field: value})
    with pytest.raises(ValueError, match=words):
        _C.reduce_chunk(args, 1)


# --- pack_records / unpack_records / gather_return_rows ---------------------------------------

_L, _K, _HIDDEN_BYTES = 2, 2, 32


def _pack_args(**over):
    layout = _C.RecordLayout(_L, _K, _HIDDEN_BYTES, 0)
    x = torch.arange(3 * _HIDDEN_BYTES, dtype=torch.int32).to(torch.uint8).view(3, _HIDDEN_BYTES)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int64)
    weights = torch.rand(3, _K)
    tokens = torch.tensor([2, 0], dtype=torch.int32)
    dst_rows = torch.tensor([[0, -1], [1, 0]], dtype=torch.int32)
    out = torch.zeros(4 * layout.bytes, dtype=torch.uint8)  # room for a layout with scales too
    fields = dict(out=out.data_ptr(), out_bytes=out.numel(), layout=layout, x=x.data_ptr(), num_tokens=3,
                  topk_idx=idx.data_ptr(), topk_weights=weights.data_ptr(), src_rank=5,
                  token_ids=tokens.data_ptr(), dst_rows=dst_rows.data_ptr(), num_records=2)
    fields.update(over)
    return mover_args(_C.PackRecordsArgs, **fields), (layout, x, idx, weights, tokens, dst_rows, out)


def _unpack_args(packed, layout, **over):
    recv_x = torch.zeros(2, _HIDDEN_BYTES, dtype=torch.uint8)
    recv_idx = torch.zeros(2, _K, dtype=torch.int64)
    recv_w = torch.zeros(2, _K)
    log = torch.zeros(3, 2, dtype=torch.int32)
    fields = dict(chunk=packed.data_ptr(), layout=layout, num_records=2, local_rank=0, recv_x=recv_x.data_ptr(),
                  num_recv_rows=2, recv_topk_idx=recv_idx.data_ptr(), recv_topk_weights=recv_w.data_ptr(),
                  expert_begin=0, experts_per_rank=8, rows_out=log[0].data_ptr(), src_ranks_out=log[1].data_ptr(),
                  src_tokens_out=log[2].data_ptr(), log_capacity=2)
    fields.update(over)
    return mover_args(_C.UnpackRecordsArgs, **fields), (recv_x, recv_idx, recv_w, log)


def test_pack_then_unpack_moves_the_rows():
    args, (layout, x, idx, weights, tokens, dst_rows, out) = _pack_args()
    _C.pack_records(args, 1)
    uargs, (recv_x, recv_idx, recv_w, log) = _unpack_args(out, layout)
    assert _C.unpack_records(uargs, 1) == 2
    assert torch.equal(recv_x[0], x[2]) and torch.equal(recv_x[1], x[0])  # dst rows 0 and 1 at local rank 0
    assert log[0].tolist() == [0, 1] and log[1].tolist() == [5, 5] and log[2].tolist() == [2, 0]
    assert torch.equal(recv_idx[0], idx[2]) and torch.equal(recv_w[1], weights[0])


@pytest.mark.parametrize("field,value,words", [
    ("num_records", -1, "num_records"),
    ("out", 0, "out is null"),
    ("out_bytes", 10, "out_bytes"),
    ("x", 0, "x is null"),
    ("topk_idx", 0, "topk_idx"),
    ("topk_weights", 0, "topk_weights"),
    ("token_ids", 0, "token_ids"),
    ("dst_rows", 0, "dst_rows"),
    ("num_tokens", 2, r"token_ids\[0\] = 2 outside"),  # token 2 of a 2-row x
    ("src_rank", -1, "src_rank"),
    ("layout", _C.RecordLayout(0, _K, _HIDDEN_BYTES, 0), "layout.num_ranks_per_node"),
    ("layout", _C.RecordLayout(_L, _K, _HIDDEN_BYTES, 16), "scales"),
])
def test_pack_bad_arguments_raise(field, value, words):
    args, keep = _pack_args(**{field: value})
    out = keep[-1]
    with pytest.raises(ValueError, match="pack_records: .*" + words):
        _C.pack_records(args, 1)
    assert not out.any()  # refused before any byte moved


@pytest.mark.parametrize("field,value,words", [
    ("num_records", -1, "num_records"),
    ("chunk", 0, "chunk is null"),
    ("local_rank", 2, "local_rank"),
    ("local_rank", -1, "local_rank"),
    ("recv_x", 0, "recv_x is null"),
    ("recv_topk_weights", 0, "recv_topk_idx and recv_topk_weights"),
    ("rows_out", 0, "rows_out"),
    ("src_tokens_out", 0, "src_tokens_out"),
    ("num_recv_rows", 1, "names row 1 outside num_recv_rows"),
    ("log_capacity", 1, "log_capacity"),
    ("experts_per_rank", 0, "experts_per_rank"),
])
def test_unpack_bad_arguments_raise(field, value, words):
    args, (layout, *_rest, out) = _pack_args()
    _C.pack_records(args, 1)
    uargs, (recv_x, *_keep) = _unpack_args(out, layout, **{field: value})
    with pytest.raises(ValueError, match="unpack_records: .*" + words):
        _C.unpack_records(uargs, 1)
    assert not recv_x.any()


def _gather_args(**over):
    layout = _C.ReturnRowLayout(16, _K)
    x = torch.arange(48, dtype=torch.int32).to(torch.uint8).view(3, 16)
    weights = torch.rand(3, _K)
    rows = torch.tensor([2, 0], dtype=torch.int32)
    out = torch.zeros(2 * layout.bytes, dtype=torch.uint8)
    fields = dict(out=out.data_ptr(), out_bytes=out.numel(), layout=layout, x=x.data_ptr(), num_x_rows=3,
                  weights=weights.data_ptr(), rows=rows.data_ptr(), num_rows=2)
    fields.update(over)
    return mover_args(_C.GatherReturnRowsArgs, **fields), (layout, x, weights, rows, out)


def test_gather_return_rows_moves_the_rows():
    args, (layout, x, weights, rows, out) = _gather_args()
    _C.gather_return_rows(args, 1)
    first = out[:layout.bytes]
    assert torch.equal(first[:16], x[2]) and torch.equal(first[16:16 + 4 * _K].view(torch.float32), weights[2])


@pytest.mark.parametrize("field,value,words", [
    ("num_rows", -1, "num_rows"),
    ("out", 0, "out is null"),
    ("out_bytes", 32, "out_bytes"),
    ("x", 0, "x is null"),
    ("weights", 0, "weights is null"),
    ("rows", 0, "rows is null"),
    ("num_x_rows", 2, r"rows\[0\] = 2 outside"),
])
def test_gather_bad_arguments_raise(field, value, words):
    args, keep = _gather_args(**{field: value})
    with pytest.raises(ValueError, match="gather_return_rows: .*" + words):
        _C.gather_return_rows(args, 1)
    assert not keep[-1].any()


def test_mover_args_refuses_unknown_field():
    with pytest.raises(AttributeError):
        mover_args(_C.GatherReturnRowsArgs, row=0)
