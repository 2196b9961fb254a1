// pybind11 bindings of the CUDA backend (every type module_local: both modules bind the same C++
// types and may be loaded in one process): dispatch._cuda (kernels built by nvcc) and dispatch._simt
// (the same kernels built by g++ against the SIMT runtime; DISPATCH_MODULE_NAME says which). Like
// dispatch._C it takes raw addresses (tensor.data_ptr()) and stream handles as integers and needs
// no torch headers; the CUDA runtime is linked statically, so importing needs no GPU driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../common/codes.h"
#include "../cuda/api.h"
#include "../cuda/plan_view.h"
#include "rail_bindings.h"
#if !defined(DISPATCH_WITH_NVCC)
#include "../simt/simt.h"
#endif

#ifndef DISPATCH_MODULE_NAME
#define DISPATCH_MODULE_NAME _cuda
#endif

namespace py = pybind11;
using namespace dispatch::cuda;

#define RW(cls, field) .def_readwrite(#field, &cls::field)

namespace {

template <typename Args>
void set_peer(Args& args, int index, uint64_t address) {
  if (index < 0 || index >= kMaxPeers) throw py::index_error("peer index out of range");
  args.peers.ptr[index] = address;
}

}  // namespace

PYBIND11_MODULE(DISPATCH_MODULE_NAME, m) {
  m.doc() = "dispatch CUDA backend: staging memory, IPC, streams and in-node kernels";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("MAX_PEERS") = kMaxPeers;
  m.attr("MAX_CHANNELS") = kMaxChannels;
  m.attr("MAX_LOCAL_EXPERTS") = kMaxLocalExperts;
  m.attr("HEADER_BYTES") = kHeaderBytes;
  m.attr("IS_SIMT") = is_simt();
  m.def("device_count", &device_count);
  m.def("device_synchronize", &device_synchronize, nogil);
  m.def("preload_kernels", &preload_kernels);
  m.def("resident_block_limit", &resident_block_limit, py::arg("threads_per_block") = kThreads);
  m.attr("THREADS_PER_BLOCK") = kThreads;

  py::dict dtype_codes, wait_kind_names;
  for (const auto& d : dispatch::kDtypeNames) dtype_codes[d.torch_name] = static_cast<int>(d.code);
  for (const auto& w : dispatch::kWaitKindNames) wait_kind_names[py::int_(static_cast<int>(w.kind))] = w.name;
  m.attr("DTYPE_CODES") = dtype_codes;
  m.attr("WAIT_KIND_NAMES") = wait_kind_names;

  py::class_<PlanView>(m, "PlanView", py::module_local(), "Offsets of the int32 plan that notify writes (plan_view.h).")
      .def(py::init([](int L, int C, int experts_per_rank) { return PlanView{L, C, experts_per_rank}; }),
           py::arg("num_ranks_per_node"), py::arg("num_channels"), py::arg("experts_per_rank"))
      .def("num_recv", &PlanView::num_recv)
      .def("recv_count", &PlanView::recv_count)
      .def("recv_base", &PlanView::recv_base)
      .def("src_num_tokens", &PlanView::src_num_tokens)
      .def("recv_chan_count", &PlanView::recv_chan_count)
      .def("send_chan_offset", &PlanView::send_chan_offset)
      .def("expert_count", &PlanView::expert_count)
      .def("size", &PlanView::size);

  py::class_<Stream>(m, "Stream", py::module_local())
      .def(py::init<>())
      .def_property_readonly("handle", &Stream::handle)
      .def("synchronize", &Stream::synchronize, nogil)
      .def("wait_event", [](const Stream& s, const Event& e) { e.wait_on(s.handle()); });
  py::class_<Event>(m, "Event", py::module_local())
      .def(py::init<>())
      .def("record", &Event::record, py::arg("stream"))
      .def("synchronize", &Event::synchronize, nogil)
      .def("query", &Event::query);
#if !defined(DISPATCH_WITH_NVCC)
  m.def("configure", [](int max_resident_blocks, uint64_t yield_seed, int yield_per_mille, double watchdog_s) {
        if (max_resident_blocks < 0) throw py::value_error("max_resident_blocks must be >= 0");
        if (yield_per_mille < 0 || yield_per_mille > 1000) throw py::value_error("yield_per_mille must be in [0, 1000]");
        if (!(watchdog_s > 0)) throw py::value_error("watchdog_s must be positive");
        simt::configure(simt::Options{max_resident_blocks, yield_seed, yield_per_mille, watchdog_s});
      },
      py::arg("max_resident_blocks") = 0, py::arg("yield_seed") = 0, py::arg("yield_per_mille") = 125,
      py::arg("watchdog_s") = 600.0,
      "SIMT runtime options: cap on resident blocks (0 = none), seeded random yields (0 = off), watchdog.");
#endif

  py::class_<DeviceAllocation>(m, "DeviceAllocation", py::module_local())
      .def(py::init<int64_t>(), py::arg("size_bytes"))
      .def_property_readonly("address", &DeviceAllocation::address)
      .def_property_readonly("size_bytes", &DeviceAllocation::size_bytes)
      .def("ipc_handle", [](const DeviceAllocation& a) { return py::bytes(a.ipc_handle()); });
  py::class_<PeerMapping>(m, "PeerMapping", py::module_local())
      .def(py::init([](py::bytes handle) { return new PeerMapping(std::string(handle)); }), py::arg("handle"))
      .def_property_readonly("address", &PeerMapping::address);
  py::class_<MappedHostMemory>(m, "MappedHostMemory", py::module_local())
      .def(py::init<int64_t>(), py::arg("size_bytes"))
      .def_property_readonly("host_address", &MappedHostMemory::host_address)
      .def_property_readonly("device_address", &MappedHostMemory::device_address);

  py::class_<WaitArgs>(m, "WaitArgs", py::module_local()).def(py::init<>()) RW(WaitArgs, timeout_ns) RW(WaitArgs, error);
  py::class_<LayoutArgs>(m, "LayoutArgs", py::module_local())
      .def(py::init<>()) RW(LayoutArgs, topk_idx) RW(LayoutArgs, num_tokens) RW(LayoutArgs, num_topk)
          RW(LayoutArgs, num_ranks) RW(LayoutArgs, num_ranks_per_node) RW(LayoutArgs, num_experts)
              RW(LayoutArgs, num_blocks) RW(LayoutArgs, per_rank) RW(LayoutArgs, per_node)
                  RW(LayoutArgs, per_expert) RW(LayoutArgs, in_rank) RW(LayoutArgs, profile);
  py::class_<NotifyArgs>(m, "NotifyArgs", py::module_local())
      .def(py::init<>())
      .def("set_peer", &set_peer<NotifyArgs>) RW(NotifyArgs, rank) RW(NotifyArgs, num_ranks)
          RW(NotifyArgs, num_channels) RW(NotifyArgs, barrier_only) RW(NotifyArgs, num_tokens)
              RW(NotifyArgs, chan_counts) RW(NotifyArgs, per_expert) RW(NotifyArgs, experts_per_rank)
                  RW(NotifyArgs, expert_alignment) RW(NotifyArgs, plan) RW(NotifyArgs, host_out) RW(NotifyArgs, verdict)
                      RW(NotifyArgs, status_out) RW(NotifyArgs, wait) RW(NotifyArgs, profile);
  py::class_<DispatchArgs>(m, "DispatchArgs", py::module_local())
      .def(py::init<>())
      .def("set_peer", &set_peer<DispatchArgs>) RW(DispatchArgs, rank) RW(DispatchArgs, num_ranks)
          RW(DispatchArgs, num_channels) RW(DispatchArgs, num_topk) RW(DispatchArgs, num_tokens)
              RW(DispatchArgs, hidden_bytes) RW(DispatchArgs, scale_bytes) RW(DispatchArgs, ring_slots) RW(DispatchArgs, max_rows)
                  RW(DispatchArgs, x) RW(DispatchArgs, scales) RW(DispatchArgs, topk_idx)
                      RW(DispatchArgs, topk_weights) RW(DispatchArgs, in_rank) RW(DispatchArgs, plan)
                          RW(DispatchArgs, recv_x) RW(DispatchArgs, recv_scales) RW(DispatchArgs, recv_topk_idx)
                              RW(DispatchArgs, recv_topk_weights) RW(DispatchArgs, recv_src_rank)
                                  RW(DispatchArgs, recv_src_token) RW(DispatchArgs, expert_begin)
                                      RW(DispatchArgs, experts_per_rank) RW(DispatchArgs, wait) RW(DispatchArgs, profile);
  py::class_<CombineArgs>(m, "CombineArgs", py::module_local())
      .def(py::init<>())
      .def("set_peer", &set_peer<CombineArgs>) RW(CombineArgs, rank) RW(CombineArgs, num_ranks)
          RW(CombineArgs, num_channels) RW(CombineArgs, num_topk) RW(CombineArgs, dtype) RW(CombineArgs, num_tokens)
              RW(CombineArgs, hidden) RW(CombineArgs, ring_slots) RW(CombineArgs, x) RW(CombineArgs, topk_weights)
                  RW(CombineArgs, recv_src_token) RW(CombineArgs, in_rank) RW(CombineArgs, plan) RW(CombineArgs, out)
                      RW(CombineArgs, out_weights) RW(CombineArgs, bias0) RW(CombineArgs, bias1)
                          RW(CombineArgs, bias0_dtype) RW(CombineArgs, bias1_dtype) RW(CombineArgs, wait) RW(CombineArgs, profile);

  m.def("launch_layout", &launch_layout, nogil);
  m.def("launch_channel_counts", &launch_channel_counts, nogil);
  m.def("launch_notify", &launch_notify, nogil);
  m.def("launch_dispatch", &launch_dispatch, nogil);
  m.def("launch_combine", &launch_combine, nogil);
  bind_rail(m);  // the two-hop path
}
