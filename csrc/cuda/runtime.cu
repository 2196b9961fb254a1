// Device resources of the CUDA backend (RAII over the CUDA runtime, or the SIMT runtime's copy of
// it): staging allocations, peer mappings, mapped host memory, streams and events; and the loading
// of every kernel.
#include <algorithm>
#include <cstring>

#include "check.h"
#include "kernels.h"
#include "rail_api.h"

namespace dispatch::cuda {

DeviceAllocation::DeviceAllocation(int64_t bytes) : bytes_(bytes) {
  DISPATCH_CUDA_CHECK(cudaMalloc(&ptr_, static_cast<size_t>(bytes)));
  // cudaMemset runs on the legacy stream, which the (non-blocking) streams of the kernels do not
  // wait for: finish it here so that the first notify reads zeroed counters.
  cudaError_t status = cudaMemset(ptr_, 0, static_cast<size_t>(bytes));
  if (status == cudaSuccess) status = cudaStreamSynchronize(0);
  if (status != cudaSuccess) {
    cudaFree(ptr_);
    DISPATCH_CUDA_CHECK(status);
  }
}
DeviceAllocation::~DeviceAllocation() {
  if (ptr_) cudaFree(ptr_);
}
std::string DeviceAllocation::ipc_handle() const {
  cudaIpcMemHandle_t handle;
  DISPATCH_CUDA_CHECK(cudaIpcGetMemHandle(&handle, ptr_));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

PeerMapping::PeerMapping(const std::string& handle) {
  DISPATCH_CHECK_ARG(handle.size() == sizeof(cudaIpcMemHandle_t), "bad CUDA IPC handle size");
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  DISPATCH_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr_, h, cudaIpcMemLazyEnablePeerAccess));
}
PeerMapping::~PeerMapping() {
  if (ptr_) cudaIpcCloseMemHandle(ptr_);
}

MappedHostMemory::MappedHostMemory(int64_t bytes) {
  DISPATCH_CUDA_CHECK(cudaHostAlloc(&host_, static_cast<size_t>(bytes), cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(host_, 0, static_cast<size_t>(bytes));
  const cudaError_t status = cudaHostGetDevicePointer(&device_, host_, 0);
  if (status != cudaSuccess) {
    cudaFreeHost(host_);
    DISPATCH_CUDA_CHECK(status);
  }
}
MappedHostMemory::~MappedHostMemory() {
  if (host_) cudaFreeHost(host_);
}

Stream::Stream() {
  cudaStream_t stream;
  DISPATCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  handle_ = reinterpret_cast<uintptr_t>(stream);
}
Stream::~Stream() {
  if (handle_) cudaStreamDestroy(as_stream(handle_));
}
void Stream::synchronize() const { DISPATCH_CUDA_CHECK(cudaStreamSynchronize(as_stream(handle_))); }

Event::Event() {
  cudaEvent_t event;
  DISPATCH_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  handle_ = reinterpret_cast<uintptr_t>(event);
}
Event::~Event() {
  if (handle_) cudaEventDestroy(reinterpret_cast<cudaEvent_t>(handle_));
}
void Event::record(uintptr_t stream) { DISPATCH_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(handle_), as_stream(stream))); }
void Event::synchronize() const { DISPATCH_CUDA_CHECK(cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(handle_))); }
bool Event::query() const {
  const cudaError_t status = cudaEventQuery(reinterpret_cast<cudaEvent_t>(handle_));
  if (status == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  DISPATCH_CUDA_CHECK(status);
  return true;
}
void Event::wait_on(uintptr_t stream) const {
  DISPATCH_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), reinterpret_cast<cudaEvent_t>(handle_), 0));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void device_synchronize() { DISPATCH_CUDA_CHECK(cudaDeviceSynchronize()); }

// Loads every kernel now. Under lazy module loading (the CUDA default) a kernel's first launch
// waits for the device to drain while holding the context lock: a first launch while a peer's
// kernel spins waiting for this rank would stall both until the timeout.
void preload_kernels() {
  load_layout_kernels();
  load_notify_kernels();
  load_dispatch_kernels();
  load_combine_kernels();
  load_rail_kernels();  // the two-hop path (rail_api.h)
}

bool is_simt() {
#if defined(__CUDACC__)
  return false;
#else
  return true;
#endif
}

}  // namespace dispatch::cuda
