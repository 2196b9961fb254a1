"""The reduce_chunk mover takes an argument struct and refuses impossible arguments with a
ValueError naming the field, before any byte moves (tests/test_dispatch_combine.py covers the
arguments the event loop really passes)."""

from __future__ import annotations

import pytest
import torch

from dispatch import _C


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
