// Host-side interface of the CUDA backend (dispatch._cuda on a GPU, dispatch._simt on the SIMT
// runtime: the same code). No CUDA or torch types appear here, so
// the pybind11 bindings compile with a plain C++ compiler; every address is an integer
// (tensor.data_ptr(), torch.cuda.Stream.cuda_stream).
#pragma once

#include <cstdint>
#include <string>

namespace dispatch::cuda {

constexpr int kMaxPeers = 16;      // ranks per node served by the in-node kernels (a peer mask is 16 bits)
constexpr int kMaxChannels = 128;  // num_sms / 2: every SM of an H200 (132) may be given
constexpr int kMaxLocalExperts = 2048;
constexpr int kThreads = 512;      // 16 warps, all working on every batch whatever L (see batch.h)
constexpr int64_t kHeaderBytes = 512 * 1024;  // control region at the start of every staging buffer

// Staging memory of one rank (cudaMalloc, zeroed); exports a CUDA IPC handle. Freed on destruction.
class DeviceAllocation {
 public:
  explicit DeviceAllocation(int64_t bytes);
  ~DeviceAllocation();
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(ptr_); }
  int64_t size_bytes() const { return bytes_; }
  std::string ipc_handle() const;

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// A peer's staging buffer opened from its IPC handle; closed on destruction.
class PeerMapping {
 public:
  explicit PeerMapping(const std::string& handle);
  ~PeerMapping();
  PeerMapping(const PeerMapping&) = delete;
  PeerMapping& operator=(const PeerMapping&) = delete;
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(ptr_); }

 private:
  void* ptr_ = nullptr;
};

// Pinned, mapped host memory (zeroed): the device writes receive counts and error reports here.
class MappedHostMemory {
 public:
  explicit MappedHostMemory(int64_t bytes);
  ~MappedHostMemory();
  MappedHostMemory(const MappedHostMemory&) = delete;
  MappedHostMemory& operator=(const MappedHostMemory&) = delete;
  uintptr_t host_address() const { return reinterpret_cast<uintptr_t>(host_); }
  uintptr_t device_address() const { return reinterpret_cast<uintptr_t>(device_); }

 private:
  void* host_ = nullptr;
  void* device_ = nullptr;
};

// A stream of the device (cudaStream_t as an integer: the `stream` of every launch_*). Destroyed
// after its queued work.
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  uintptr_t handle() const { return handle_; }
  void synchronize() const;

 private:
  uintptr_t handle_ = 0;
};

// An event: recorded on a stream, waited on by the host or by another stream.
class Event {
 public:
  Event();
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(uintptr_t stream);
  void synchronize() const;
  bool query() const;  // true once the work before the last record() has finished
  void wait_on(uintptr_t stream) const;  // `stream` waits for the last record()

 private:
  uintptr_t handle_ = 0;
};

int device_count();  // 0 when there is no driver or no device (never throws)
void device_synchronize();
void preload_kernels();  // loads every kernel of the module now (see runtime.cu)
// Blocks of `threads_per_block` threads that can be resident at once on the device (occupancy of
// the in-node kernels times SMs on a GPU; the runtime's cap on SIMT): the loopback's virtual
// ranks spin on each other, so all their blocks must fit.
int resident_block_limit(int threads_per_block);
bool is_simt();

struct Peers {
  uint64_t ptr[kMaxPeers];
};

// What every spin-wait needs: a deadline, where to report, and the abort flag.
struct WaitArgs {
  uint64_t timeout_ns = 0;
  uint64_t error = 0;  // device address of mapped int32[4]: flag, stalled rank, channel, kind
};

struct LayoutArgs {
  uint64_t topk_idx = 0;  // int64 [T, k]
  int64_t num_tokens = 0;
  int num_topk = 0, num_ranks = 0, num_ranks_per_node = 0, num_experts = 0, num_blocks = 1;
  uint64_t per_rank = 0, per_node = 0, per_expert = 0, in_rank = 0;  // outputs (counts zeroed by caller)
  uint64_t profile = 0;  // device address of a zeroed uint64 [blocks][3] (profile_record.h), or 0: off
};

struct NotifyArgs {
  Peers peers{};
  int rank = 0, num_ranks = 0, num_channels = 0;
  int barrier_only = 0;
  int64_t num_tokens = 0;
  uint64_t chan_counts = 0;  // int32 [L, C] my tokens per destination per channel
  uint64_t per_expert = 0;   // int32 [E] or 0
  int experts_per_rank = 0, expert_alignment = 1;
  uint64_t plan = 0;         // int32 plan (see plan_view.h)
  uint64_t host_out = 0;     // device address of mapped int32: [0] num_recv, [1..1+L) counts, then experts
  int verdict = 0;           // 0: my arguments are fine; else a code the host defines (the call is void)
  uint64_t status_out = 0;   // device address of mapped int32[2 + kMaxPeers]: done, first bad rank, verdicts
  WaitArgs wait{};
  uint64_t profile = 0;  // device address of a zeroed uint64 [blocks][3] (profile_record.h), or 0: off
};

struct DispatchArgs {
  Peers peers{};
  int rank = 0, num_ranks = 0, num_channels = 0, num_topk = 0;
  int64_t num_tokens = 0, hidden_bytes = 0, scale_bytes = 0, ring_slots = 0;
  int64_t max_rows = 0;  // rows of the receive tensors: a row past them fails the call
  uint64_t x = 0, scales = 0, topk_idx = 0, topk_weights = 0, in_rank = 0, plan = 0;
  uint64_t recv_x = 0, recv_scales = 0, recv_topk_idx = 0, recv_topk_weights = 0;
  uint64_t recv_src_rank = 0, recv_src_token = 0;
  int64_t expert_begin = 0, experts_per_rank = 1;
  WaitArgs wait{};
  uint64_t profile = 0;  // device address of a zeroed uint64 [blocks][3] (profile_record.h), or 0: off
};

struct CombineArgs {
  Peers peers{};
  int rank = 0, num_ranks = 0, num_channels = 0, num_topk = 0;
  int dtype = 0;  // 0 f32, 1 bf16, 2 f16, 3 f64
  int64_t num_tokens = 0, hidden = 0, ring_slots = 0;
  uint64_t x = 0, topk_weights = 0, recv_src_token = 0, in_rank = 0, plan = 0;
  uint64_t out = 0, out_weights = 0, bias0 = 0, bias1 = 0;
  int bias0_dtype = 0, bias1_dtype = 0;
  WaitArgs wait{};
  uint64_t profile = 0;  // device address of a zeroed uint64 [blocks][3] (profile_record.h), or 0: off
};

void launch_layout(const LayoutArgs& args, uintptr_t stream);
void launch_channel_counts(uint64_t in_rank, int64_t num_tokens, int num_ranks, int num_channels,
                           uint64_t chan_counts, uintptr_t stream);
void launch_notify(const NotifyArgs& args, uintptr_t stream);
void launch_dispatch(const DispatchArgs& args, uintptr_t stream);
void launch_combine(const CombineArgs& args, uintptr_t stream);

}  // namespace dispatch::cuda
