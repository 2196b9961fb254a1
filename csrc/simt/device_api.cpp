// The SIMT device's host API: memory, in-process IPC, streams (FIFO, a worker thread each) and
// events, in the names of the CUDA runtime (cuda_api.h), plus simt::launch.
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "grid.h"

struct SimtEvent {
  std::mutex mutex;
  std::condition_variable cv;
  uint64_t recorded = 0;   // records issued
  uint64_t completed = 0;  // records the stream reached
};

// Work runs in submission order on the stream's worker. A failed kernel makes the stream's error
// sticky (as a CUDA launch failure poisons the context): later synchronisations report it.
struct SimtStream {
  SimtStream() : worker([this] { serve(); }) {}
  ~SimtStream() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    cv.notify_all();
    worker.join();
  }

  void submit(std::function<std::string()> op) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      ops.push_back(std::move(op));
      ++submitted;
    }
    cv.notify_all();
  }

  std::string synchronize() {
    std::unique_lock<std::mutex> lock(mutex);
    const uint64_t target = submitted;
    cv.wait(lock, [&] { return done >= target; });
    return failure;
  }

  void serve() {
    std::unique_lock<std::mutex> lock(mutex);
    while (true) {
      cv.wait(lock, [&] { return stopping || !ops.empty(); });
      if (ops.empty()) return;
      std::function<std::string()> op = std::move(ops.front());
      ops.pop_front();
      lock.unlock();
      std::string result = op();
      lock.lock();
      if (!result.empty() && failure.empty()) failure = result;
      ++done;
      cv.notify_all();
    }
  }

  std::mutex mutex;
  std::condition_variable cv;
  std::deque<std::function<std::string()>> ops;
  uint64_t submitted = 0, done = 0;
  bool stopping = false;
  std::string failure;
  std::thread worker;  // last: starts once the fields above exist
};

namespace {

std::mutex g_mutex;  // guards the registries and the error state below
std::set<SimtStream*> g_streams;
std::string g_last_failure;           // message behind cudaErrorLaunchFailure
cudaError_t g_last_error = cudaSuccess;

cudaError_t fail(cudaError_t code, const std::string& message) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_last_error = code;
  if (code == cudaErrorLaunchFailure) g_last_failure = message;
  return code;
}

SimtStream* legacy_stream() {
  static SimtStream* stream = [] {
    auto* s = new SimtStream();  // lives as long as the process: torn down with it
    std::lock_guard<std::mutex> lock(g_mutex);
    g_streams.insert(s);
    return s;
  }();
  return stream;
}

SimtStream* resolve(cudaStream_t stream) { return stream ? stream : legacy_stream(); }

cudaError_t sync_result(const std::string& failure) {
  return failure.empty() ? cudaSuccess : fail(cudaErrorLaunchFailure, failure);
}

// In-process IPC handle: the address and the process id (another process cannot open it).
struct IpcPayload {
  uint64_t address;
  int64_t pid;
};
static_assert(sizeof(IpcPayload) <= sizeof(cudaIpcMemHandle_t), "IPC payload too large");

}  // namespace

namespace simt {

void launch(void* stream, Dim3 grid, Dim3 block, size_t dynamic_shared_bytes, KernelBody body, const char* name) {
  auto launch_state = std::make_shared<GridLaunch>();
  launch_state->grid = grid;
  launch_state->block = block;
  launch_state->dynamic_shared_bytes = dynamic_shared_bytes;
  launch_state->body = std::move(body);
  launch_state->name = name;
  resolve(static_cast<cudaStream_t>(stream))->submit([launch_state] { return run_grid(*launch_state); });
}

}  // namespace simt

// ---- memory -----------------------------------------------------------------------------------
cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  return *pointer ? cudaSuccess : fail(cudaErrorMemoryAllocation, "");
}
cudaError_t cudaFree(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* pointer, int value, size_t bytes) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream) {
  resolve(stream)->submit([=] {
    std::memset(pointer, value, bytes);
    return std::string();
  });
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int, cudaStream_t stream) {
  resolve(stream)->submit([=] {
    std::memcpy(dst, src, bytes);
    return std::string();
  });
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** pointer, size_t bytes, unsigned) { return cudaMalloc(pointer, bytes); }
cudaError_t cudaHostGetDevicePointer(void** device_pointer, void* host_pointer, unsigned) {
  *device_pointer = host_pointer;  // one address space
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* pointer) { return cudaFree(pointer); }

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* pointer) {
  std::memset(handle, 0, sizeof(*handle));
  const IpcPayload payload{reinterpret_cast<uint64_t>(pointer), static_cast<int64_t>(getpid())};
  std::memcpy(handle->reserved, &payload, sizeof(payload));
  return cudaSuccess;
}
cudaError_t cudaIpcOpenMemHandle(void** pointer, cudaIpcMemHandle_t handle, unsigned) {
  IpcPayload payload;
  std::memcpy(&payload, handle.reserved, sizeof(payload));
  if (payload.pid != static_cast<int64_t>(getpid())) return fail(cudaErrorInvalidValue, "");
  *pointer = reinterpret_cast<void*>(payload.address);
  return cudaSuccess;
}
cudaError_t cudaIpcCloseMemHandle(void*) { return cudaSuccess; }

// ---- streams and events -----------------------------------------------------------------------
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) {
  *stream = new SimtStream();
  std::lock_guard<std::mutex> lock(g_mutex);
  g_streams.insert(*stream);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (stream == nullptr) return cudaErrorInvalidValue;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_streams.erase(stream);
  }
  stream->synchronize();  // CUDA lets queued work finish
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) { return sync_result(resolve(stream)->synchronize()); }

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
  *event = new SimtEvent();
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    target = ++event->recorded;
  }
  resolve(stream)->submit([event, target] {
    {
      std::lock_guard<std::mutex> lock(event->mutex);
      event->completed = std::max(event->completed, target);
    }
    event->cv.notify_all();
    return std::string();
  });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  std::unique_lock<std::mutex> lock(event->mutex);
  const uint64_t target = event->recorded;
  event->cv.wait(lock, [&] { return event->completed >= target; });
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard<std::mutex> lock(event->mutex);
  return event->completed >= event->recorded ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
  uint64_t target;
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    target = event->recorded;
  }
  resolve(stream)->submit([event, target] {
    std::unique_lock<std::mutex> lock(event->mutex);
    event->cv.wait(lock, [&] { return event->completed >= target; });
    return std::string();
  });
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  std::set<SimtStream*> streams;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    streams = g_streams;
  }
  std::string failure;
  for (SimtStream* s : streams) {
    std::string f = s->synchronize();
    if (failure.empty()) failure = f;
  }
  return sync_result(failure);
}

// ---- device and errors ------------------------------------------------------------------------
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;  // the SIMT device
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const cudaError_t error = g_last_error;
  g_last_error = cudaSuccess;
  return error;
}
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchFailure: {
      // stable storage: the message of the last failed kernel
      static thread_local std::string message;
      std::lock_guard<std::mutex> lock(g_mutex);
      message = "unspecified launch failure: " + g_last_failure;
      return message.c_str();
    }
    default: return "unknown error";
  }
}
