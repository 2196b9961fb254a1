// pybind11 bindings of the two-hop path (csrc/cuda/rail_api.h), included by cuda_module.cpp.
#pragma once

#include <pybind11/pybind11.h>

#include "../cuda/rail_api.h"

namespace dispatch::cuda {

inline void bind_rail(pybind11::module_& m) {
  namespace py = pybind11;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("MAX_NODES") = kMaxNodes;
#define RAIL_RW(cls, field) .def_readwrite(#field, &cls::field)
  py::class_<RailDispatchArgs>(m, "RailDispatchArgs", py::module_local())
      .def(py::init<>())
      .def("set_peer", [](RailDispatchArgs& a, int i, uint64_t address) {
        if (i < 0 || i >= kMaxPeers) throw py::index_error("peer index out of range");
        a.peers.ptr[i] = address;
      })
      RAIL_RW(RailDispatchArgs, rank) RAIL_RW(RailDispatchArgs, num_ranks) RAIL_RW(RailDispatchArgs, node)
      RAIL_RW(RailDispatchArgs, num_nodes) RAIL_RW(RailDispatchArgs, num_topk) RAIL_RW(RailDispatchArgs, num_tokens)
      RAIL_RW(RailDispatchArgs, hidden_bytes) RAIL_RW(RailDispatchArgs, scale_bytes) RAIL_RW(RailDispatchArgs, ring_slots)
      RAIL_RW(RailDispatchArgs, max_rows) RAIL_RW(RailDispatchArgs, chunk_records) RAIL_RW(RailDispatchArgs, x)
      RAIL_RW(RailDispatchArgs, scales) RAIL_RW(RailDispatchArgs, topk_idx) RAIL_RW(RailDispatchArgs, topk_weights)
      RAIL_RW(RailDispatchArgs, node_tokens) RAIL_RW(RailDispatchArgs, node_dst_rows)
      RAIL_RW(RailDispatchArgs, num_send_records) RAIL_RW(RailDispatchArgs, send_region)
      RAIL_RW(RailDispatchArgs, fwd_regions) RAIL_RW(RailDispatchArgs, fwd_begin) RAIL_RW(RailDispatchArgs, arrival)
      RAIL_RW(RailDispatchArgs, routes) RAIL_RW(RailDispatchArgs, recv_counts) RAIL_RW(RailDispatchArgs, recv_x)
      RAIL_RW(RailDispatchArgs, recv_scales) RAIL_RW(RailDispatchArgs, recv_topk_idx)
      RAIL_RW(RailDispatchArgs, recv_topk_weights) RAIL_RW(RailDispatchArgs, recv_src_rank)
      RAIL_RW(RailDispatchArgs, recv_src_token) RAIL_RW(RailDispatchArgs, expert_begin)
      RAIL_RW(RailDispatchArgs, experts_per_rank) RAIL_RW(RailDispatchArgs, num_sms)
      RAIL_RW(RailDispatchArgs, profile) RAIL_RW(RailDispatchArgs, wait);
  py::class_<RailCombineArgs>(m, "RailCombineArgs", py::module_local())
      .def(py::init<>())
      .def("set_peer", [](RailCombineArgs& a, int i, uint64_t address) {
        if (i < 0 || i >= kMaxPeers) throw py::index_error("peer index out of range");
        a.peers.ptr[i] = address;
      })
      RAIL_RW(RailCombineArgs, rank) RAIL_RW(RailCombineArgs, num_ranks) RAIL_RW(RailCombineArgs, node)
      RAIL_RW(RailCombineArgs, num_nodes) RAIL_RW(RailCombineArgs, num_topk) RAIL_RW(RailCombineArgs, dtype)
      RAIL_RW(RailCombineArgs, partial_dtype) RAIL_RW(RailCombineArgs, hidden) RAIL_RW(RailCombineArgs, ring_slots)
      RAIL_RW(RailCombineArgs, num_tokens) RAIL_RW(RailCombineArgs, chunk_records) RAIL_RW(RailCombineArgs, x)
      RAIL_RW(RailCombineArgs, topk_weights) RAIL_RW(RailCombineArgs, recv_base) RAIL_RW(RailCombineArgs, recv_counts)
      RAIL_RW(RailCombineArgs, fwd_begin) RAIL_RW(RailCombineArgs, routes) RAIL_RW(RailCombineArgs, partials)
      RAIL_RW(RailCombineArgs, positions) RAIL_RW(RailCombineArgs, partial_regions) RAIL_RW(RailCombineArgs, arrival)
      RAIL_RW(RailCombineArgs, num_chunks) RAIL_RW(RailCombineArgs, out) RAIL_RW(RailCombineArgs, out_weights)
      RAIL_RW(RailCombineArgs, bias0) RAIL_RW(RailCombineArgs, bias1) RAIL_RW(RailCombineArgs, bias0_dtype)
      RAIL_RW(RailCombineArgs, bias1_dtype) RAIL_RW(RailCombineArgs, num_sms) RAIL_RW(RailCombineArgs, profile)
      RAIL_RW(RailCombineArgs, wait);
#undef RAIL_RW
  m.def("launch_rail_pack", &launch_rail_pack, nogil);
  m.def("launch_rail_forward", &launch_rail_forward, nogil);
  m.def("launch_rail_reduce", &launch_rail_reduce, nogil);
  m.def("launch_rail_final", &launch_rail_final, nogil);
  m.def("rail_loopback_copy", &rail_loopback_copy, nogil, py::arg("dst"), py::arg("src"), py::arg("num_bytes"),
        py::arg("counter"), py::arg("value"), py::arg("min_duration_ns"), py::arg("stream"));
}

}  // namespace dispatch::cuda
