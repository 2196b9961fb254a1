// Runs the CUDA backend's real kernels (through their host API, csrc/cuda/api.h) on the SIMT
// runtime for L virtual ranks of one node, without Python, and checks every output against a
// plain C++ reference. Built by tests/test_simt_kernels.py plain, under ThreadSanitizer, and with
// each known-bad variant (csrc/cuda/bad_variants.h).
//
//   kernel_driver L T H k E num_sms staging_bytes timeout_s seed iterations
//   (SIMT_YIELD_SEED=n in the environment turns on the runtime's seeded random yields)
//
// Per iteration: layout, channel counts, notify, dispatch, cached dispatch, combine (bf16 rows, fp32
// weights). Exit codes: 0 all correct; 3 wrong output; 4 a kernel reported a failure (a timeout
// naming rank and channel); 5 the runtime reported a deadlock or watchdog; 2 bad usage.
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
#include "common/record.h"
#include "cuda/api.h"
#include "cuda/plan_view.h"
#include "cuda/port.h"

using namespace dispatch;
using namespace dispatch::cuda;

namespace {

struct Options {
  int L, T, H, k, E, num_sms;
  int64_t staging_bytes;
  double timeout_s;
  unsigned seed;
  int iterations;
};

struct Rank {
  std::unique_ptr<DeviceAllocation> staging;
  std::unique_ptr<MappedHostMemory> host_out, error, status;
  std::unique_ptr<Stream> stream;
  std::vector<uint16_t> x;        // bf16 [T, H]
  std::vector<int64_t> topk_idx;  // [T, k]
  std::vector<float> topk_weights;
  std::vector<int32_t> per_rank, per_node, per_expert, chan_counts, plan;
  std::vector<uint8_t> in_rank;   // bool [T, L]
  std::vector<uint16_t> recv_x, recv_again, combined;
  std::vector<int64_t> recv_idx;
  std::vector<float> recv_w, combined_w;
  std::vector<int32_t> src_rank, src_token, scratch;
  int num_recv = 0;
};

int g_failures = 0;
void wrong(const std::string& what) {
  if (++g_failures <= 10) std::fprintf(stderr, "WRONG: %s\n", what.c_str());
}

template <typename T>
uint64_t addr(std::vector<T>& v) {
  return reinterpret_cast<uint64_t>(v.data());
}

void sync_all(std::vector<Rank>& ranks) {
  for (Rank& r : ranks) r.stream->synchronize();
}

// A kernel's own report (error words): exit 4 naming rank and channel.
void check_reports(std::vector<Rank>& ranks) {
  for (size_t me = 0; me < ranks.size(); ++me) {
    const int32_t* err = reinterpret_cast<const int32_t*>(ranks[me].error->host_address());
    if (err[0]) {
      std::fprintf(stderr, "KERNEL REPORT: rank %d stalled on channel %d (wait kind %d) as seen by rank %zu\n",
                   err[1], err[2], err[3], me);
      std::exit(4);
    }
  }
}

template <typename Args>
void fill_common(Args& a, std::vector<Rank>& ranks, int me, const Options& o) {
  for (int p = 0; p < o.L; ++p) a.peers.ptr[p] = ranks[p].staging->address();
  a.rank = me;
  a.num_ranks = o.L;
  a.wait.timeout_ns = static_cast<uint64_t>(o.timeout_s * 1e9);
  a.wait.error = ranks[me].error->device_address();
}

void notify(std::vector<Rank>& ranks, const Options& o, int C, bool barrier_only) {
  const int epr = o.E / o.L;
  for (int me = 0; me < o.L; ++me) {
    Rank& r = ranks[me];
    NotifyArgs a;
    fill_common(a, ranks, me, o);
    a.num_channels = C;
    a.barrier_only = barrier_only;
    a.num_tokens = o.T;
    if (!barrier_only) {
      a.chan_counts = addr(r.chan_counts);
      a.per_expert = addr(r.per_expert);
      a.experts_per_rank = epr;
      a.plan = addr(r.plan);
      a.host_out = r.host_out->device_address();
    }
    a.status_out = r.status->device_address();
    launch_notify(a, r.stream->handle());
  }
}

void run_iteration(std::vector<Rank>& ranks, const Options& o, std::mt19937& rng) {
  const int L = o.L, T = o.T, H = o.H, k = o.k, E = o.E, C = o.num_sms / 2, epr = E / L;
  const Topology topo{L, L, E};
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::uniform_int_distribution<int> expert(-1, E - 1);
  for (Rank& r : ranks) {
    r.x.resize(static_cast<size_t>(T) * H);
    for (auto& v : r.x) v = port::float_to_bf16_bits(uniform(rng));
    r.topk_idx.resize(static_cast<size_t>(T) * k);
    for (auto& v : r.topk_idx) v = expert(rng);
    r.topk_weights.resize(static_cast<size_t>(T) * k);
    for (auto& v : r.topk_weights) v = uniform(rng);
    r.per_rank.assign(L, 0);
    r.per_node.assign(1, 0);
    r.per_expert.assign(E, 0);
    r.in_rank.assign(static_cast<size_t>(T) * L, 0);
    r.chan_counts.assign(static_cast<size_t>(L) * C, 0);
    r.plan.assign(PlanView{L, C, epr}.size(), -7);
    std::memset(reinterpret_cast<void*>(r.status->host_address()), 0, 4 * (2 + kMaxPeers));
  }
  // layout
  for (int me = 0; me < L; ++me) {
    Rank& r = ranks[me];
    LayoutArgs a;
    a.topk_idx = addr(r.topk_idx);
    a.num_tokens = T;
    a.num_topk = k;
    a.num_ranks = L;
    a.num_ranks_per_node = L;
    a.num_experts = E;
    a.num_blocks = 2;
    a.per_rank = addr(r.per_rank);
    a.per_node = addr(r.per_node);
    a.per_expert = addr(r.per_expert);
    a.in_rank = addr(r.in_rank);
    launch_layout(a, r.stream->handle());
  }
  sync_all(ranks);
  for (int me = 0; me < L; ++me) {
    Rank& r = ranks[me];
    std::vector<int32_t> per_rank(L, 0), per_node(1, 0), per_expert(E, 0);
    std::vector<uint8_t> in_rank(static_cast<size_t>(T) * L);
    compute_layout(r.topk_idx.data(), T, k, topo, per_rank.data(), per_node.data(), per_expert.data(),
                   reinterpret_cast<bool*>(in_rank.data()));
    if (per_rank != r.per_rank || per_node != r.per_node || per_expert != r.per_expert || in_rank != r.in_rank)
      wrong("layout of rank " + std::to_string(me));
  }
  // channel counts + notify
  for (int me = 0; me < L; ++me) {
    Rank& r = ranks[me];
    launch_channel_counts(addr(r.in_rank), T, L, C, addr(r.chan_counts), r.stream->handle());
  }
  notify(ranks, o, C, false);
  sync_all(ranks);
  check_reports(ranks);
  // reference placement: rows ordered by (source rank, source token)
  std::vector<std::vector<std::pair<int, int>>> expected(L);
  for (int d = 0; d < L; ++d)
    for (int s = 0; s < L; ++s)
      for (int t = 0; t < T; ++t)
        if (ranks[s].in_rank[static_cast<size_t>(t) * L + d]) expected[d].emplace_back(s, t);
  for (int me = 0; me < L; ++me) {
    Rank& r = ranks[me];
    const int32_t* status = reinterpret_cast<const int32_t*>(r.status->host_address());
    if (status[0] != 1 || status[1] != -1) wrong("notify status of rank " + std::to_string(me));
    r.num_recv = reinterpret_cast<const int32_t*>(r.host_out->host_address())[0];
    if (r.num_recv != static_cast<int>(expected[me].size())) wrong("receive count of rank " + std::to_string(me));
  }
  // dispatch
  const RecordLayout rl{1, k, 2LL * H, 0};
  auto slots_for = [&](int64_t row_bytes) {
    return (o.staging_bytes - kHeaderBytes) / (static_cast<int64_t>(C) * L * row_bytes);
  };
  auto launch_dispatch_all = [&](bool again) {
    for (int me = 0; me < L; ++me) {
      Rank& r = ranks[me];
      const size_t rows = static_cast<size_t>(r.num_recv);
      auto& out = again ? r.recv_again : r.recv_x;
      out.assign(rows * H, 0);
      if (!again) {
        r.recv_idx.assign(rows * k, -9);
        r.recv_w.assign(rows * k, -9.0f);
        r.src_rank.assign(rows, -1);
        r.src_token.assign(rows, -1);
      }
      r.scratch.assign(2 * rows + 1, 0);
      DispatchArgs a;
      fill_common(a, ranks, me, o);
      a.num_channels = C;
      a.num_topk = again ? 0 : k;
      a.num_tokens = T;
      a.hidden_bytes = 2LL * H;
      a.ring_slots = slots_for(RecordLayout{1, a.num_topk, 2LL * H, 0}.bytes());
      a.max_rows = static_cast<int64_t>(rows);
      a.x = addr(r.x);
      a.topk_idx = again ? 0 : addr(r.topk_idx);
      a.topk_weights = again ? 0 : addr(r.topk_weights);
      a.in_rank = addr(r.in_rank);
      a.plan = addr(r.plan);
      a.recv_x = addr(out);
      a.recv_topk_idx = again ? 0 : addr(r.recv_idx);
      a.recv_topk_weights = again ? 0 : addr(r.recv_w);
      // a cached dispatch knows its routes: source columns go to scratch
      a.recv_src_rank = again ? addr(r.scratch) : addr(r.src_rank);
      a.recv_src_token = again ? addr(r.scratch) + 4 * rows : addr(r.src_token);
      a.expert_begin = static_cast<int64_t>(me) * epr;
      a.experts_per_rank = epr;
      launch_dispatch(a, r.stream->handle());
    }
  };
  launch_dispatch_all(false);
  sync_all(ranks);
  check_reports(ranks);
  if (slots_for(rl.bytes()) < 1) throw std::runtime_error("staging too small");
  for (int d = 0; d < L; ++d) {
    Rank& r = ranks[d];
    for (size_t row = 0; row < expected[d].size() && row < static_cast<size_t>(r.num_recv); ++row) {
      const auto [s, t] = expected[d][row];
      const std::string where = "rank " + std::to_string(d) + " row " + std::to_string(row);
      if (r.src_rank[row] != s || r.src_token[row] != t) wrong("source of " + where);
      if (std::memcmp(&r.recv_x[row * H], &ranks[s].x[static_cast<size_t>(t) * H], 2 * H) != 0) wrong("payload of " + where);
      for (int j = 0; j < k; ++j) {
        const int64_t e = ranks[s].topk_idx[static_cast<size_t>(t) * k + j];
        const bool mine = e >= static_cast<int64_t>(d) * epr && e < static_cast<int64_t>(d + 1) * epr;
        const int64_t want_idx = mine ? e - static_cast<int64_t>(d) * epr : -1;
        const float want_w = mine ? ranks[s].topk_weights[static_cast<size_t>(t) * k + j] : 0.0f;
        if (r.recv_idx[row * k + j] != want_idx || std::memcmp(&r.recv_w[row * k + j], &want_w, 4) != 0)
          wrong("top-k of " + where);
      }
    }
  }
  // cached dispatch: the same routes again
  notify(ranks, o, C, true);
  launch_dispatch_all(true);
  sync_all(ranks);
  check_reports(ranks);
  for (int d = 0; d < L; ++d)
    if (ranks[d].recv_again != ranks[d].recv_x) wrong("cached dispatch of rank " + std::to_string(d));
  // combine: every rank returns its received rows; sources sum them in ascending rank order
  notify(ranks, o, C, true);
  for (int me = 0; me < L; ++me) {
    Rank& r = ranks[me];
    r.combined.assign(static_cast<size_t>(T) * H, 0);
    r.combined_w.assign(static_cast<size_t>(T) * k, -9.0f);
    CombineArgs a;
    fill_common(a, ranks, me, o);
    a.num_channels = C;
    a.num_topk = k;
    a.dtype = kDtypeBFloat16;
    a.num_tokens = T;
    a.hidden = H;
    a.ring_slots = slots_for(ReturnRowLayout{2LL * H, k}.bytes());
    a.x = addr(r.recv_x);
    a.topk_weights = addr(r.recv_w);
    a.recv_src_token = addr(r.src_token);
    a.in_rank = addr(r.in_rank);
    a.plan = addr(r.plan);
    a.out = addr(r.combined);
    a.out_weights = addr(r.combined_w);
    launch_combine(a, r.stream->handle());
  }
  sync_all(ranks);
  check_reports(ranks);
  for (int s = 0; s < L; ++s) {
    std::vector<float> acc(static_cast<size_t>(T) * H, 0.0f), acc_w(static_cast<size_t>(T) * k, 0.0f);
    for (int d = 0; d < L; ++d) {
      for (size_t row = 0; row < expected[d].size(); ++row) {
        if (expected[d][row].first != s) continue;
        const int t = expected[d][row].second;
        for (int h = 0; h < H; ++h) acc[static_cast<size_t>(t) * H + h] += port::bf16_bits_to_float(ranks[d].recv_x[row * H + h]);
        for (int j = 0; j < k; ++j) acc_w[static_cast<size_t>(t) * k + j] += ranks[d].recv_w[row * k + j];
      }
    }
    for (size_t i = 0; i < acc.size(); ++i) {
      if (ranks[s].combined[i] != port::float_to_bf16_bits(acc[i])) {
        wrong("combined x of rank " + std::to_string(s) + " token " + std::to_string(i / H));
        break;
      }
    }
    if (std::memcmp(acc_w.data(), ranks[s].combined_w.data(), 4 * acc_w.size()) != 0)
      wrong("combined weights of rank " + std::to_string(s));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 11) {
    std::fprintf(stderr, "usage: %s L T H k E num_sms staging_bytes timeout_s seed iterations\n", argv[0]);
    return 2;
  }
  const Options o{std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                  std::atoi(argv[6]), std::atoll(argv[7]), std::atof(argv[8]), static_cast<unsigned>(std::atoi(argv[9])),
                  std::atoi(argv[10])};
  if (const char* seed = std::getenv("SIMT_YIELD_SEED")) {
    simt::Options options = simt::options();
    options.yield_seed = std::strtoull(seed, nullptr, 10);
    simt::configure(options);
  }
  try {
    std::vector<Rank> ranks(o.L);
    for (Rank& r : ranks) {
      r.staging = std::make_unique<DeviceAllocation>(o.staging_bytes);
      r.host_out = std::make_unique<MappedHostMemory>(4 * (1 + o.L + kMaxLocalExperts));
      r.error = std::make_unique<MappedHostMemory>(16);
      r.status = std::make_unique<MappedHostMemory>(4 * (2 + kMaxPeers));
      r.stream = std::make_unique<Stream>();
    }
    preload_kernels();
    std::mt19937 rng(o.seed);
    for (int i = 0; i < o.iterations; ++i) run_iteration(ranks, o, rng);
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
