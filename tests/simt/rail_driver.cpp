// Runs the two-hop kernels (csrc/cuda/rail_api.h) for N nodes x L virtual ranks on the SIMT
// runtime, without Python: notify (ring reset), rail sender, the loopback rail copies (each chunk
// throttled), forwarder/receivers; then return/reduce, the partials over the rail, the final sum.
// Every output is checked against a plain C++ reference (dispatch rows by (source, token); the
// combine's fixed order: own node's partial first, then the other nodes ascending). Built by
// tests/test_cuda_two_hop_kernels.py plain, under ThreadSanitizer and with known-bad variant 5.
//
//   rail_driver N L T H k E staging_bytes timeout_s seed chunk_records rail_ns [num_sms]
//
// num_sms (default 2 N): the kernels' SM budget; below 2 N a block pair serves several nodes.
//
// Exit codes: 0 all correct; 3 wrong output; 4 a kernel reported a failure (names rank and
// source node); 5 runtime failure; 2 bad usage.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/codes.h"
#include "common/layout.h"
#include "common/plan.h"
#include "common/record.h"
#include "cuda/api.h"
#include "cuda/port.h"
#include "cuda/rail_api.h"

using namespace dispatch;
using namespace dispatch::cuda;

namespace {

struct Options {
  int N, L, T, H, k, E;
  int64_t staging_bytes;
  double timeout_s;
  unsigned seed;
  int64_t chunk_records, rail_ns;
  int num_sms;
};

template <typename T>
uint64_t addr(std::vector<T>& v) {
  return reinterpret_cast<uint64_t>(v.data());
}

struct Rank {
  std::unique_ptr<DeviceAllocation> staging;
  std::unique_ptr<MappedHostMemory> error, status;
  std::unique_ptr<Stream> stream, rail;
  std::vector<float> x, w;
  std::vector<int64_t> topk_idx;
  std::vector<uint8_t> in_rank;  // [T, R]
  std::vector<int32_t> node_tokens, node_dst_rows, recv_counts, recv_base, routes, positions;
  std::vector<int64_t> node_begin, fwd_begin, fwd_regions, partial_ptrs, regions, num_chunks;
  std::vector<uint64_t> arrival;
  std::vector<std::vector<uint8_t>> rail_recv;  // per source node
  std::vector<uint8_t> send;
  std::vector<std::vector<uint8_t>> partials;
  std::vector<float> recv_x, recv_w, out, out_w;
  std::vector<int64_t> recv_idx;
  std::vector<int32_t> src_rank, src_token;
};

int g_failures = 0;
void wrong(const std::string& what) {
  if (++g_failures <= 10) std::fprintf(stderr, "WRONG: %s\n", what.c_str());
}

void check_reports(std::vector<Rank>& ranks) {
  for (size_t me = 0; me < ranks.size(); ++me) {
    const int32_t* err = reinterpret_cast<const int32_t*>(ranks[me].error->host_address());
    if (err[0]) {
      std::fprintf(stderr, "KERNEL REPORT: rank %d stalled on source node %d (wait kind %d) as seen by rank %zu\n",
                   err[1], err[2], err[3], me);
      std::exit(4);
    }
  }
}

void sync_all(std::vector<Rank>& ranks) {
  for (Rank& r : ranks) {
    r.rail->synchronize();
    r.stream->synchronize();
  }
}

void reset_rings(std::vector<Rank>& ranks, const Options& o) {
  for (int g = 0; g < o.N * o.L; ++g) {
    NotifyArgs a;
    const int node = g / o.L;
    for (int j = 0; j < o.L; ++j) a.peers.ptr[j] = ranks[node * o.L + j].staging->address();
    a.rank = g % o.L;
    a.num_ranks = o.L;
    a.num_channels = o.N;
    a.barrier_only = 1;
    a.status_out = ranks[g].status->device_address();
    a.wait.timeout_ns = static_cast<uint64_t>(o.timeout_s * 1e9);
    a.wait.error = ranks[g].error->device_address();
    launch_notify(a, ranks[g].stream->handle());
  }
}

// Every rank's rail stream waits for what its comm stream queued so far (the events must live
// until the rail streams are synchronized).
std::vector<std::unique_ptr<Event>> rail_after_comm(std::vector<Rank>& ranks) {
  std::vector<std::unique_ptr<Event>> events;
  for (Rank& r : ranks) {
    events.push_back(std::make_unique<Event>());
    events.back()->record(r.stream->handle());
    events.back()->wait_on(r.rail->handle());
  }
  return events;
}

// The rail round: copies chunk c of each rank's region for node m into its rail peer's receive
// region and bumps the peer's counter, on the sender's rail stream.
void rail_round(std::vector<Rank>& ranks, const Options& o, int64_t row_bytes, bool combine) {
  const int R = o.N * o.L;
  for (int g = 0; g < R; ++g) {
    Rank& r = ranks[g];
    const int n = g / o.L, l = g % o.L;
    for (int m = 0; m < o.N; ++m) {
      if (m == n) continue;
      Rank& peer = ranks[m * o.L + l];
      // dispatch: my records for node m -> peer's region for source node n; combine: my
      // partials of source node m's records -> peer's region for node n
      const int64_t first = combine ? 0 : r.node_begin[m];
      const int64_t count = combine ? r.fwd_begin[m + 1] - r.fwd_begin[m] : r.node_begin[m + 1] - r.node_begin[m];
      uint8_t* src = combine ? r.partials[m].data() : r.send.data() + first * row_bytes;
      uint8_t* dst = peer.rail_recv[n].data();
      for (int64_t c = 0; c * o.chunk_records < count; ++c) {
        const int64_t rows = std::min<int64_t>(o.chunk_records, count - c * o.chunk_records);
        rail_loopback_copy(reinterpret_cast<uint64_t>(dst + c * o.chunk_records * row_bytes),
                           reinterpret_cast<uint64_t>(src + c * o.chunk_records * row_bytes), rows * row_bytes,
                           reinterpret_cast<uint64_t>(peer.arrival.data() + n), c + 1, o.rail_ns, r.rail->handle());
      }
    }
  }
}

void run(std::vector<Rank>& ranks, const Options& o, std::mt19937& rng) {
  const int N = o.N, L = o.L, R = N * L, T = o.T, H = o.H, k = o.k, E = o.E, epr = E / R;
  const Topology topo{R, L, E};
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::uniform_int_distribution<int> expert(-1, E - 1);
  std::vector<std::vector<int64_t>> counts(R, std::vector<int64_t>(R, 0));
  for (int g = 0; g < R; ++g) {
    Rank& r = ranks[g];
    r.x.resize(static_cast<size_t>(T) * H);
    for (auto& v : r.x) v = uniform(rng);
    r.w.resize(static_cast<size_t>(T) * k);
    for (auto& v : r.w) v = uniform(rng);
    r.topk_idx.resize(static_cast<size_t>(T) * k);
    for (auto& v : r.topk_idx) v = expert(rng);
    r.in_rank.assign(static_cast<size_t>(T) * R, 0);
    for (int t = 0; t < T; ++t) {
      route_token(r.topk_idx.data() + t * k, k, topo, reinterpret_cast<bool*>(r.in_rank.data()) + t * R);
      for (int d = 0; d < R; ++d) counts[g][d] += r.in_rank[t * R + d];
    }
  }
  // host plan (the CPU backend's planner)
  const RecordLayout rl{L, k, 4LL * H, 0};
  const int64_t rb = rl.bytes();
  for (int g = 0; g < R; ++g) {
    Rank& r = ranks[g];
    const int n = g / L, me = g % L;
    std::vector<int64_t> base(R, 0), node_count(N, 0), scratch_r(R), scratch_n(N);
    for (int s = 0; s < g; ++s)
      for (int d = 0; d < R; ++d) base[d] += counts[s][d];
    for (int t = 0; t < T; ++t)
      for (int m = 0; m < N; ++m) {
        bool any = false;
        for (int j = 0; j < L; ++j) any = any || r.in_rank[t * R + m * L + j];
        node_count[m] += any;
      }
    r.node_begin.assign(N + 1, 0);
    for (int m = 0; m < N; ++m) r.node_begin[m + 1] = r.node_begin[m] + node_count[m];
    r.node_tokens.assign(std::max<int64_t>(r.node_begin[N], 1), 0);
    r.node_dst_rows.assign(std::max<int64_t>(r.node_begin[N], 1) * L, -1);
    plan_dispatch_sends(reinterpret_cast<const bool*>(r.in_rank.data()), T, topo, base.data(), r.node_begin.data(),
                        r.node_tokens.data(), r.node_dst_rows.data(), scratch_r.data(), scratch_n.data());
    r.positions.assign(static_cast<size_t>(T) * N, -1);
    for (int m = 0; m < N; ++m)
      for (int64_t i = r.node_begin[m]; i < r.node_begin[m + 1]; ++i) r.positions[r.node_tokens[i] * N + m] = i - r.node_begin[m];
    (void)me;
  }
  for (int g = 0; g < R; ++g) {
    Rank& r = ranks[g];
    const int n = g / L, l = g % L;
    r.fwd_begin.assign(N + 1, 0);
    for (int m = 0; m < N; ++m) {
      const Rank& src = ranks[m * L + l];
      r.fwd_begin[m + 1] = r.fwd_begin[m] + src.node_begin[n + 1] - src.node_begin[n];
    }
    r.recv_counts.assign(N * L, 0);
    r.recv_base.assign(N * L, 0);
    int64_t row = 0;
    for (int s = 0; s < R; ++s) {
      r.recv_base[s] = static_cast<int32_t>(row);
      r.recv_counts[s] = static_cast<int32_t>(counts[s][g]);
      row += counts[s][g];
    }
    r.send.assign(std::max<int64_t>(r.node_begin[N], 1) * rb, 0xEE);
    r.rail_recv.assign(N, {});
    for (int m = 0; m < N; ++m) r.rail_recv[m].assign(std::max<int64_t>(r.fwd_begin[m + 1] - r.fwd_begin[m], 1) * rb, 0xEE);
    r.fwd_regions.assign(N, 0);
    for (int m = 0; m < N; ++m)
      r.fwd_regions[m] = m == n ? static_cast<int64_t>(addr(r.send) + r.node_begin[n] * rb) : static_cast<int64_t>(addr(r.rail_recv[m]));
    r.arrival.assign(N, 0);
    r.routes.assign(std::max<int64_t>(r.fwd_begin[N], 1) * L, -9);
    r.recv_x.assign(std::max<int64_t>(row, 1) * H, 0.0f);
    r.recv_w.assign(std::max<int64_t>(row, 1) * k, 0.0f);
    r.recv_idx.assign(std::max<int64_t>(row, 1) * k, 0);
    r.src_rank.assign(std::max<int64_t>(row, 1), -1);
    r.src_token.assign(std::max<int64_t>(row, 1), -1);
    std::memset(reinterpret_cast<void*>(r.error->host_address()), 0, 16);
  }
  // dispatch
  reset_rings(ranks, o);
  std::vector<RailDispatchArgs> dargs(R);
  for (int g = 0; g < R; ++g) {
    Rank& r = ranks[g];
    RailDispatchArgs& a = dargs[g];
    const int n = g / L;
    for (int j = 0; j < L; ++j) a.peers.ptr[j] = ranks[n * L + j].staging->address();
    a.rank = g % L, a.num_ranks = L, a.node = n, a.num_nodes = N, a.num_topk = k;
    a.num_tokens = T, a.hidden_bytes = 4LL * H, a.scale_bytes = 0;
    a.ring_slots = (o.staging_bytes - kHeaderBytes) / (N * L * rb);
    if (a.ring_slots < 1) throw std::runtime_error("staging too small");
    a.max_rows = r.recv_counts.empty() ? 0 : static_cast<int64_t>(r.src_rank.size());
    a.chunk_records = o.chunk_records;
    a.x = addr(r.x), a.topk_idx = addr(r.topk_idx), a.topk_weights = addr(r.w);
    a.node_tokens = addr(r.node_tokens), a.node_dst_rows = addr(r.node_dst_rows), a.num_send_records = r.node_begin[N];
    a.send_region = addr(r.send), a.fwd_regions = addr(r.fwd_regions), a.fwd_begin = addr(r.fwd_begin);
    a.arrival = addr(r.arrival), a.routes = addr(r.routes), a.recv_counts = addr(r.recv_counts);
    a.recv_x = addr(r.recv_x), a.recv_topk_idx = addr(r.recv_idx), a.recv_topk_weights = addr(r.recv_w);
    a.recv_src_rank = addr(r.src_rank), a.recv_src_token = addr(r.src_token);
    a.expert_begin = static_cast<int64_t>(g) * epr, a.experts_per_rank = epr;
    a.num_sms = o.num_sms;
    a.wait.timeout_ns = static_cast<uint64_t>(o.timeout_s * 1e9);
    a.wait.error = r.error->device_address();
    launch_rail_pack(a, r.stream->handle());
  }
  {
    auto events = rail_after_comm(ranks);  // after the rail sender
    // the forwarders run while the rail still moves chunks
    for (int g = 0; g < R; ++g) launch_rail_forward(dargs[g], ranks[g].stream->handle());
    rail_round(ranks, o, rb, false);
    sync_all(ranks);
  }
  check_reports(ranks);
  for (int d = 0; d < R; ++d) {
    Rank& r = ranks[d];
    int64_t row = 0;
    for (int s = 0; s < R; ++s)
      for (int t = 0; t < T; ++t) {
        if (!ranks[s].in_rank[t * R + d]) continue;
        if (r.src_rank[row] != s || r.src_token[row] != t) wrong("dispatch source of rank " + std::to_string(d) + " row " + std::to_string(row));
        if (std::memcmp(&r.recv_x[row * H], &ranks[s].x[static_cast<int64_t>(t) * H], 4 * H) != 0) wrong("dispatch row of rank " + std::to_string(d));
        for (int j = 0; j < k; ++j) {
          const int64_t e = ranks[s].topk_idx[t * k + j];
          const bool mine = e >= static_cast<int64_t>(d) * epr && e < static_cast<int64_t>(d + 1) * epr;
          if (r.recv_idx[row * k + j] != (mine ? e - d * epr : -1)) wrong("recv_topk_idx");
          if (r.recv_w[row * k + j] != (mine ? ranks[s].w[t * k + j] : 0.0f)) wrong("recv_topk_weights");
        }
        ++row;
      }
  }
  // combine: x = recv_x, weights = recv_w
  const PartialRowLayout pl{H, 4, k, -1};
  const int64_t pb = pl.bytes();
  const ReturnRowLayout rr{4LL * H, k};
  for (int g = 0; g < R; ++g) {
    Rank& r = ranks[g];
    const int n = g / L;
    r.partials.assign(N, {});
    r.partial_ptrs.assign(N, 0);
    for (int m = 0; m < N; ++m) {
      r.partials[m].assign(std::max<int64_t>(r.fwd_begin[m + 1] - r.fwd_begin[m], 1) * pb, 0xEE);
      r.partial_ptrs[m] = static_cast<int64_t>(addr(r.partials[m]));
    }
    r.rail_recv.assign(N, {});
    r.regions.assign(N, 0);
    r.num_chunks.assign(N, 0);
    for (int m = 0; m < N; ++m) {
      const int64_t count = r.node_begin[m + 1] - r.node_begin[m];
      r.rail_recv[m].assign(std::max<int64_t>(count, 1) * pb, 0xEE);
      r.regions[m] = m == n ? r.partial_ptrs[n] : static_cast<int64_t>(addr(r.rail_recv[m]));
      r.num_chunks[m] = m == n ? 0 : (count + o.chunk_records - 1) / o.chunk_records;
    }
    r.arrival.assign(N, 0);
    r.out.assign(static_cast<size_t>(std::max(T, 1)) * H, -1.0f);
    r.out_w.assign(static_cast<size_t>(std::max(T, 1)) * k, -1.0f);
  }
  reset_rings(ranks, o);
  std::vector<RailCombineArgs> cargs(R);
  for (int g = 0; g < R; ++g) {
    Rank& r = ranks[g];
    RailCombineArgs& a = cargs[g];
    const int n = g / L;
    for (int j = 0; j < L; ++j) a.peers.ptr[j] = ranks[n * L + j].staging->address();
    a.rank = g % L, a.num_ranks = L, a.node = n, a.num_nodes = N, a.num_topk = k, a.dtype = kDtypeFloat32;
    a.hidden = H, a.ring_slots = (o.staging_bytes - kHeaderBytes) / (N * L * rr.bytes()), a.num_tokens = T;
    a.chunk_records = o.chunk_records;
    a.x = addr(r.recv_x), a.topk_weights = addr(r.recv_w), a.recv_base = addr(r.recv_base), a.recv_counts = addr(r.recv_counts);
    a.fwd_begin = addr(r.fwd_begin), a.routes = addr(r.routes), a.partials = addr(r.partial_ptrs);
    a.positions = addr(r.positions), a.partial_regions = addr(r.regions), a.arrival = addr(r.arrival);
    a.num_chunks = addr(r.num_chunks), a.out = addr(r.out), a.out_weights = addr(r.out_w);
    a.num_sms = o.num_sms;
    a.wait.timeout_ns = static_cast<uint64_t>(o.timeout_s * 1e9);
    a.wait.error = r.error->device_address();
    launch_rail_reduce(a, r.stream->handle());
  }
  {
    auto events = rail_after_comm(ranks);  // after the reducers
    for (int g = 0; g < R; ++g) launch_rail_final(cargs[g], ranks[g].stream->handle());
    rail_round(ranks, o, pb, true);
    sync_all(ranks);
  }
  check_reports(ranks);
  // reference: the fixed order of docs/semantics.md (fp32)
  for (int s = 0; s < R; ++s) {
    const int ns = s / L;
    for (int t = 0; t < T; ++t) {
      for (int col = 0; col < H + k; ++col) {
        float acc = 0.0f;
        for (int q = 0; q < N; ++q) {
          const int m = q == 0 ? ns : (q <= ns ? q - 1 : q);
          bool any = false;
          float part = 0.0f;
          for (int j = 0; j < L; ++j) {
            const int d = m * L + j;
            if (!ranks[s].in_rank[t * R + d]) continue;
            any = true;
            int64_t row = 0;  // row of (s, t) at d
            for (int s2 = 0; s2 < s; ++s2) row += counts[s2][d];
            for (int t2 = 0; t2 < t; ++t2) row += ranks[s].in_rank[t2 * R + d];
            part += col < H ? ranks[d].recv_x[row * H + col] : ranks[d].recv_w[row * k + col - H];
          }
          if (any) acc += part;
        }
        const float got = col < H ? ranks[s].out[t * H + col] : ranks[s].out_w[t * k + col - H];
        if (std::memcmp(&got, &acc, 4) != 0) wrong("combine of rank " + std::to_string(s) + " token " + std::to_string(t));
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12 && argc != 13) {
    std::fprintf(stderr, "usage: %s N L T H k E staging_bytes timeout_s seed chunk_records rail_ns [num_sms]\n", argv[0]);
    return 2;
  }
  const Options o{std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                  std::atoi(argv[6]), std::atoll(argv[7]), std::atof(argv[8]), static_cast<unsigned>(std::atoi(argv[9])),
                  std::atoll(argv[10]), std::atoll(argv[11]), argc == 13 ? std::atoi(argv[12]) : 2 * std::atoi(argv[1])};
  if (const char* seed = std::getenv("SIMT_YIELD_SEED")) {
    simt::Options options = simt::options();
    options.yield_seed = std::strtoull(seed, nullptr, 10);
    simt::configure(options);
  }
  try {
    std::vector<Rank> ranks(o.N * o.L);
    for (Rank& r : ranks) {
      r.staging = std::make_unique<DeviceAllocation>(o.staging_bytes);
      r.error = std::make_unique<MappedHostMemory>(16);
      r.status = std::make_unique<MappedHostMemory>(4 * (2 + kMaxPeers));
      r.stream = std::make_unique<Stream>();
      r.rail = std::make_unique<Stream>();
    }
    preload_kernels();
    std::mt19937 rng(o.seed);
    run(ranks, o, rng);
  } catch (const std::exception& exc) {
    std::fprintf(stderr, "RUNTIME FAILURE: %s\n", exc.what());
    return 5;
  }
  if (g_failures) {
    std::fprintf(stderr, "%d wrong outputs\n", g_failures);
    return 3;
  }
  std::printf("OK\n");
  return 0;
}
