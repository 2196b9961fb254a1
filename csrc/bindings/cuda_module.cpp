// pybind11 bindings of the CUDA backend (dispatch._cuda). Like dispatch._C it takes raw addresses
// (tensor.data_ptr()) and stream handles (torch.cuda.Stream.cuda_stream) as integers and needs no
// torch headers; the CUDA runtime is linked statically, so importing needs no GPU driver.
#include <pybind11/pybind11.h>

#include "../cuda/api.h"

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

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "dispatch CUDA backend: staging memory, IPC and in-node kernels";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("MAX_PEERS") = kMaxPeers;
  m.attr("MAX_CHANNELS") = kMaxChannels;
  m.attr("MAX_LOCAL_EXPERTS") = kMaxLocalExperts;
  m.attr("HEADER_BYTES") = kHeaderBytes;
  m.def("device_count", &device_count);
  m.def("preload_kernels", &preload_kernels);

  py::class_<DeviceAllocation>(m, "DeviceAllocation")
      .def(py::init<int64_t>(), py::arg("size_bytes"))
      .def_property_readonly("address", &DeviceAllocation::address)
      .def_property_readonly("size_bytes", &DeviceAllocation::size_bytes)
      .def("ipc_handle", [](const DeviceAllocation& a) { return py::bytes(a.ipc_handle()); });
  py::class_<PeerMapping>(m, "PeerMapping")
      .def(py::init([](py::bytes handle) { return new PeerMapping(std::string(handle)); }), py::arg("handle"))
      .def_property_readonly("address", &PeerMapping::address);
  py::class_<MappedHostMemory>(m, "MappedHostMemory")
      .def(py::init<int64_t>(), py::arg("size_bytes"))
      .def_property_readonly("host_address", &MappedHostMemory::host_address)
      .def_property_readonly("device_address", &MappedHostMemory::device_address);

  py::class_<WaitArgs>(m, "WaitArgs").def(py::init<>()) RW(WaitArgs, timeout_ns) RW(WaitArgs, error);
  py::class_<LayoutArgs>(m, "LayoutArgs")
      .def(py::init<>()) RW(LayoutArgs, topk_idx) RW(LayoutArgs, num_tokens) RW(LayoutArgs, num_topk)
          RW(LayoutArgs, num_ranks) RW(LayoutArgs, num_ranks_per_node) RW(LayoutArgs, num_experts)
              RW(LayoutArgs, num_blocks) RW(LayoutArgs, per_rank) RW(LayoutArgs, per_node)
                  RW(LayoutArgs, per_expert) RW(LayoutArgs, in_rank);
  py::class_<NotifyArgs>(m, "NotifyArgs")
      .def(py::init<>())
      .def("set_peer", &set_peer<NotifyArgs>) RW(NotifyArgs, rank) RW(NotifyArgs, num_ranks)
          RW(NotifyArgs, num_channels) RW(NotifyArgs, barrier_only) RW(NotifyArgs, num_tokens)
              RW(NotifyArgs, chan_counts) RW(NotifyArgs, per_expert) RW(NotifyArgs, experts_per_rank)
                  RW(NotifyArgs, expert_alignment) RW(NotifyArgs, plan) RW(NotifyArgs, host_out) RW(NotifyArgs, wait);
  py::class_<DispatchArgs>(m, "DispatchArgs")
      .def(py::init<>())
      .def("set_peer", &set_peer<DispatchArgs>) RW(DispatchArgs, rank) RW(DispatchArgs, num_ranks)
          RW(DispatchArgs, num_channels) RW(DispatchArgs, num_topk) RW(DispatchArgs, num_tokens)
              RW(DispatchArgs, hidden_bytes) RW(DispatchArgs, scale_bytes) RW(DispatchArgs, ring_slots) RW(DispatchArgs, max_rows)
                  RW(DispatchArgs, x) RW(DispatchArgs, scales) RW(DispatchArgs, topk_idx)
                      RW(DispatchArgs, topk_weights) RW(DispatchArgs, in_rank) RW(DispatchArgs, plan)
                          RW(DispatchArgs, recv_x) RW(DispatchArgs, recv_scales) RW(DispatchArgs, recv_topk_idx)
                              RW(DispatchArgs, recv_topk_weights) RW(DispatchArgs, recv_src_rank)
                                  RW(DispatchArgs, recv_src_token) RW(DispatchArgs, expert_begin)
                                      RW(DispatchArgs, experts_per_rank) RW(DispatchArgs, wait);
  py::class_<CombineArgs>(m, "CombineArgs")
      .def(py::init<>())
      .def("set_peer", &set_peer<CombineArgs>) RW(CombineArgs, rank) RW(CombineArgs, num_ranks)
          RW(CombineArgs, num_channels) RW(CombineArgs, num_topk) RW(CombineArgs, dtype) RW(CombineArgs, num_tokens)
              RW(CombineArgs, hidden) RW(CombineArgs, ring_slots) RW(CombineArgs, x) RW(CombineArgs, topk_weights)
                  RW(CombineArgs, recv_src_token) RW(CombineArgs, in_rank) RW(CombineArgs, plan) RW(CombineArgs, out)
                      RW(CombineArgs, out_weights) RW(CombineArgs, bias0) RW(CombineArgs, bias1)
                          RW(CombineArgs, bias0_dtype) RW(CombineArgs, bias1_dtype) RW(CombineArgs, wait);

  m.def("launch_layout", &launch_layout, nogil);
  m.def("launch_channel_counts", &launch_channel_counts, nogil);
  m.def("launch_notify", &launch_notify, nogil);
  m.def("launch_dispatch", &launch_dispatch, nogil);
  m.def("launch_combine", &launch_combine, nogil);
}
