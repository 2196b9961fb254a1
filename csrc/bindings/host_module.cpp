// pybind11 bindings of the CPU backend (dispatch._C). Tensors cross as raw addresses
// (tensor.data_ptr()) so the module needs no torch headers; every call releases the GIL.
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>

#include "../common/codes.h"
#include "../common/layout.h"
#include "../common/plan.h"
#include "../common/record.h"
#include "../host/block_pool.h"
#include "../host/combine_reduce.h"
#include "../host/dispatch_records.h"
#include "../host/doorbell.h"
#include "../host/mover_args.h"
#include "../host/parallel.h"
#include "../host/shm_segment.h"

namespace py = pybind11;
using namespace dispatch;
using namespace dispatch::host;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void layout_entry(uintptr_t topk_idx, bool idx_is_int32, int64_t num_tokens, int num_topk, int num_ranks,
                  int num_ranks_per_node, int num_experts, uintptr_t num_tokens_per_rank,
                  uintptr_t num_tokens_per_node, uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank) {
  const Topology topo{num_ranks, num_ranks_per_node, num_experts};
  if (idx_is_int32)
    compute_layout(as_ptr<const int32_t>(topk_idx), num_tokens, num_topk, topo, as_ptr<int32_t>(num_tokens_per_rank),
                   as_ptr<int32_t>(num_tokens_per_node), as_ptr<int32_t>(num_tokens_per_expert),
                   as_ptr<bool>(is_token_in_rank));
  else
    compute_layout(as_ptr<const int64_t>(topk_idx), num_tokens, num_topk, topo, as_ptr<int32_t>(num_tokens_per_rank),
                   as_ptr<int32_t>(num_tokens_per_node), as_ptr<int32_t>(num_tokens_per_expert),
                   as_ptr<bool>(is_token_in_rank));
}

void plan_entry(uintptr_t is_token_in_rank, int64_t num_tokens, int num_ranks, int num_ranks_per_node,
                uintptr_t recv_row_base, uintptr_t node_token_begin, uintptr_t node_tokens, uintptr_t node_dst_rows,
                uintptr_t rank_scratch, uintptr_t node_scratch) {
  const Topology topo{num_ranks, num_ranks_per_node, num_ranks};
  plan_dispatch_sends(as_ptr<const bool>(is_token_in_rank), num_tokens, topo, as_ptr<const int64_t>(recv_row_base),
                      as_ptr<const int64_t>(node_token_begin), as_ptr<int32_t>(node_tokens),
                      as_ptr<int32_t>(node_dst_rows), as_ptr<int64_t>(rank_scratch), as_ptr<int64_t>(node_scratch));
}

uint64_t atomic_load(uintptr_t address) {
  return __atomic_load_n(as_ptr<uint64_t>(address), __ATOMIC_ACQUIRE);
}

void atomic_store(uintptr_t address, uint64_t value) { __atomic_store_n(as_ptr<uint64_t>(address), value, __ATOMIC_RELEASE); }

// Stores `desired` if the word holds `expected`; returns the value it held (== expected on success).
uint64_t atomic_compare_exchange(uintptr_t address, uint64_t expected, uint64_t desired) {
  __atomic_compare_exchange_n(as_ptr<uint64_t>(address), &expected, desired, false, __ATOMIC_ACQ_REL,
                              __ATOMIC_ACQUIRE);
  return expected;
}

// A mover's binding: (args struct, num_threads), the GIL released while it runs; a bad argument
// raises ValueError (std::invalid_argument, from Args::check) before any byte moves.
template <typename Args, typename Result>
void def_mover(py::module_& m, const char* name, Result (*mover)(const Args&, int)) {
  m.def(name, mover, py::arg("args"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dispatch CPU backend: planner, shared-memory segments and byte movers";
  auto nogil = py::call_guard<py::gil_scoped_release>();

  py::class_<RecordLayout>(m, "RecordLayout")
      .def(py::init([](int L, int k, int64_t hidden_bytes, int64_t scale_bytes) {
             return RecordLayout{L, k, hidden_bytes, scale_bytes};
           }),
           py::arg("num_ranks_per_node"), py::arg("num_topk"), py::arg("hidden_bytes"), py::arg("scale_bytes"))
      .def_property_readonly("bytes", &RecordLayout::bytes)
      .def_property_readonly("x_offset", &RecordLayout::x_offset);
  py::class_<ReturnRowLayout>(m, "ReturnRowLayout")
      .def(py::init([](int64_t hidden_bytes, int k) { return ReturnRowLayout{hidden_bytes, k}; }),
           py::arg("hidden_bytes"), py::arg("num_topk"))
      .def_property_readonly("bytes", &ReturnRowLayout::bytes);
  py::class_<PartialRowLayout>(m, "PartialRowLayout")
      .def(py::init([](int64_t hidden, int acc_elem_bytes, int k, int row_dtype) {
             return PartialRowLayout{hidden, acc_elem_bytes, k, row_dtype};
           }),
           py::arg("hidden"), py::arg("acc_elem_bytes"), py::arg("num_topk"), py::arg("row_dtype") = -1)
      .def_property_readonly("bytes", &PartialRowLayout::bytes);

  py::class_<SharedMemorySegment>(m, "SharedMemorySegment")
      .def(py::init<const std::string&, int64_t, bool>(), py::arg("name"), py::arg("size_bytes"), py::arg("create"))
      .def("unlink", &SharedMemorySegment::unlink)
      .def("close", &SharedMemorySegment::close)
      .def_property_readonly("address", &SharedMemorySegment::address)
      .def_property_readonly("size_bytes", &SharedMemorySegment::size_bytes)
      .def_property_readonly("name", &SharedMemorySegment::name);

  // Blocks expose the buffer protocol, so torch.frombuffer(block) keeps the block alive exactly
  // as long as the tensor; its destructor hands the mapping back to the pool.
  py::class_<Block>(m, "Block", py::buffer_protocol())
      .def_property_readonly("address", [](const Block& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("size_bytes", &Block::size_bytes)
      .def_buffer([](Block& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1, {b.size_bytes()}, {1});
      });
  py::class_<BlockPool, std::shared_ptr<BlockPool>>(m, "BlockPool")
      .def(py::init<int64_t>(), py::arg("max_cached_bytes"))
      .def("acquire", &BlockPool::acquire, py::arg("size_bytes"))
      .def("clear", &BlockPool::clear)
      .def_property_readonly("cached_bytes", &BlockPool::cached_bytes);

  m.def("memoryview_at", [](uintptr_t address, int64_t size_bytes) {
    return py::memoryview::from_memory(as_ptr<void>(address), size_bytes, /*readonly=*/false);
  });
  m.def("atomic_load", &atomic_load);
  m.def("atomic_store", &atomic_store);
  m.def("atomic_compare_exchange", &atomic_compare_exchange, py::arg("address"), py::arg("expected"),
        py::arg("desired"));
  m.def("doorbell_ring", [](uintptr_t bell) { doorbell_ring(as_ptr<Doorbell>(bell)); });
  m.def("doorbell_rings", [](uintptr_t bell) { return doorbell_rings(as_ptr<const Doorbell>(bell)); });
  m.def(
      "doorbell_wait",
      [](uintptr_t bell, uint32_t seen, double timeout_s) { return doorbell_wait(as_ptr<Doorbell>(bell), seen, timeout_s); },
      py::arg("bell"), py::arg("seen"), py::arg("timeout_s"), nogil);

  // Profiling: per-worker slices of the movers (dispatch.profile).
  m.def("set_slice_log", [](bool enabled) { SliceLog::instance().set_enabled(enabled); });
  m.def("take_slices", [] {
    py::list out;
    for (const WorkerSlice& s : SliceLog::instance().take())
      out.append(py::make_tuple(s.worker, s.start_ns, s.end_ns, s.items));
    return out;
  });

  m.def("compute_layout", &layout_entry, nogil);
  py::dict dtype_codes;
  for (const auto& d : dispatch::kDtypeNames) dtype_codes[d.torch_name] = static_cast<int>(d.code);
  m.attr("DTYPE_CODES") = dtype_codes;
  m.def("plan_dispatch_sends", &plan_entry, nogil);

  // The movers take argument structs; a bad argument raises ValueError naming the field before any
  // byte moves.
  py::class_<PackRecordsArgs>(m, "PackRecordsArgs")
      .def(py::init<>())
      .def_readwrite("out", &PackRecordsArgs::out)
      .def_readwrite("out_bytes", &PackRecordsArgs::out_bytes)
      .def_readwrite("layout", &PackRecordsArgs::layout)
      .def_readwrite("x", &PackRecordsArgs::x)
      .def_readwrite("num_tokens", &PackRecordsArgs::num_tokens)
      .def_readwrite("scales", &PackRecordsArgs::scales)
      .def_readwrite("topk_idx", &PackRecordsArgs::topk_idx)
      .def_readwrite("topk_weights", &PackRecordsArgs::topk_weights)
      .def_readwrite("src_rank", &PackRecordsArgs::src_rank)
      .def_readwrite("token_ids", &PackRecordsArgs::token_ids)
      .def_readwrite("dst_rows", &PackRecordsArgs::dst_rows)
      .def_readwrite("num_records", &PackRecordsArgs::num_records)
      .def("check", &PackRecordsArgs::check);
  def_mover<PackRecordsArgs>(m, "pack_records", &dispatch::host::pack_records);
  py::class_<UnpackRecordsArgs>(m, "UnpackRecordsArgs")
      .def(py::init<>())
      .def_readwrite("chunk", &UnpackRecordsArgs::chunk)
      .def_readwrite("layout", &UnpackRecordsArgs::layout)
      .def_readwrite("num_records", &UnpackRecordsArgs::num_records)
      .def_readwrite("local_rank", &UnpackRecordsArgs::local_rank)
      .def_readwrite("recv_x", &UnpackRecordsArgs::recv_x)
      .def_readwrite("num_recv_rows", &UnpackRecordsArgs::num_recv_rows)
      .def_readwrite("recv_scales", &UnpackRecordsArgs::recv_scales)
      .def_readwrite("recv_topk_idx", &UnpackRecordsArgs::recv_topk_idx)
      .def_readwrite("recv_topk_weights", &UnpackRecordsArgs::recv_topk_weights)
      .def_readwrite("expert_begin", &UnpackRecordsArgs::expert_begin)
      .def_readwrite("experts_per_rank", &UnpackRecordsArgs::experts_per_rank)
      .def_readwrite("rows_out", &UnpackRecordsArgs::rows_out)
      .def_readwrite("src_ranks_out", &UnpackRecordsArgs::src_ranks_out)
      .def_readwrite("src_tokens_out", &UnpackRecordsArgs::src_tokens_out)
      .def_readwrite("log_capacity", &UnpackRecordsArgs::log_capacity)
      .def("check", &UnpackRecordsArgs::check);
  def_mover<UnpackRecordsArgs>(m, "unpack_records", &dispatch::host::unpack_records);
  m.def(
      "copy_dst_rows",
      [](uintptr_t chunk, const RecordLayout& layout, int64_t num_records, uintptr_t out) {
        copy_dst_rows(as_ptr<const uint8_t>(chunk), layout, num_records, as_ptr<int32_t>(out));
      },
      nogil);
  py::class_<GatherReturnRowsArgs>(m, "GatherReturnRowsArgs")
      .def(py::init<>())
      .def_readwrite("out", &GatherReturnRowsArgs::out)
      .def_readwrite("out_bytes", &GatherReturnRowsArgs::out_bytes)
      .def_readwrite("layout", &GatherReturnRowsArgs::layout)
      .def_readwrite("x", &GatherReturnRowsArgs::x)
      .def_readwrite("num_x_rows", &GatherReturnRowsArgs::num_x_rows)
      .def_readwrite("weights", &GatherReturnRowsArgs::weights)
      .def_readwrite("rows", &GatherReturnRowsArgs::rows)
      .def_readwrite("num_rows", &GatherReturnRowsArgs::num_rows)
      .def("check", &GatherReturnRowsArgs::check);
  def_mover<GatherReturnRowsArgs>(m, "gather_return_rows", &dispatch::host::gather_return_rows);
  py::class_<ReduceChunkArgs>(m, "ReduceChunkArgs")
      .def(py::init<>())
      .def_readwrite("dst_rows", &ReduceChunkArgs::dst_rows)
      .def_readwrite("num_records", &ReduceChunkArgs::num_records)
      .def_readwrite("num_ranks_per_node", &ReduceChunkArgs::num_ranks_per_node)
      .def_readwrite("return_chunks", &ReduceChunkArgs::return_chunks)
      .def_readwrite("return_layout", &ReduceChunkArgs::return_layout)
      .def_readwrite("self_local_rank", &ReduceChunkArgs::self_local_rank)
      .def_readwrite("self_x", &ReduceChunkArgs::self_x)
      .def_readwrite("self_weights", &ReduceChunkArgs::self_weights)
      .def_readwrite("self_rows", &ReduceChunkArgs::self_rows)
      .def_readwrite("x_row_bytes", &ReduceChunkArgs::x_row_bytes)
      .def_readwrite("dtype", &ReduceChunkArgs::dtype)
      .def_readwrite("partials", &ReduceChunkArgs::partials)
      .def_readwrite("acc", &ReduceChunkArgs::acc)
      .def_readwrite("acc_weights", &ReduceChunkArgs::acc_weights)
      .def_readwrite("token_ids", &ReduceChunkArgs::token_ids)
      .def_readwrite("partial_layout", &ReduceChunkArgs::partial_layout)
      .def("check", &ReduceChunkArgs::check);
  def_mover<ReduceChunkArgs>(m, "reduce_chunk", &dispatch::host::reduce_chunk);
  py::class_<CombineOutput>(m, "CombineOutput")
      .def(py::init([](uintptr_t out, int out_dtype, uintptr_t bias0, int bias0_dtype, uintptr_t bias1, int bias1_dtype) {
             return CombineOutput{as_ptr<uint8_t>(out), static_cast<DType>(out_dtype), as_ptr<const uint8_t>(bias0),
                                  static_cast<DType>(bias0_dtype), as_ptr<const uint8_t>(bias1),
                                  static_cast<DType>(bias1_dtype)};
           }),
           py::arg("out"), py::arg("out_dtype"), py::arg("bias0"), py::arg("bias0_dtype"), py::arg("bias1"),
           py::arg("bias1_dtype"));
  m.def(
      "accumulate_partials",
      [](uintptr_t acc, uintptr_t acc_weights, uintptr_t partials, const PartialRowLayout& pl, uintptr_t token_ids,
         int64_t num_rows, uintptr_t last_term, const CombineOutput& output, int num_threads) {
        accumulate_partials(as_ptr<uint8_t>(acc), as_ptr<float>(acc_weights), as_ptr<const uint8_t>(partials), pl,
                            as_ptr<const int32_t>(token_ids), num_rows, as_ptr<const uint8_t>(last_term), output,
                            num_threads);
      },
      nogil);
  m.def(
      "finalize_combine",
      [](uintptr_t acc, int acc_elem_bytes, int64_t hidden, uintptr_t token_ids, int64_t num_rows,
         const CombineOutput& output, int num_threads) {
        finalize_combine(as_ptr<const uint8_t>(acc), acc_elem_bytes, hidden, as_ptr<const int32_t>(token_ids),
                         num_rows, output, num_threads);
      },
      nogil);
}
