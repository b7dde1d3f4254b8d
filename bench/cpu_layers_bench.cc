// CPU benchmarks of one Mixtral MoE layer and one attention layer, each printed next to the
// memory-read bandwidth and fp32 FMA peak measured in the same run (docs/ARCHITECTURE.md, "Performance targets"), and the MoE
// layer next to a peer: the same layer with its expert GEMMs done by OpenBLAS on fp32 weights.
// See bench/README.md.
//
// Environment:
//   EPX_BENCH_SCALE  "mixtral" (default: hidden 4096, intermediate 14336, 32/8 heads, 2.8 GB of
//                    bf16 expert weights) or "small" (hidden 1024, intermediate 3584, 8/2 heads).
//   EPX_BENCH_BYTES  size of the buffer BM_MemoryReadBandwidth reads, e.g. 1073741824 or 1G
//                    (default 1 GiB; keep it far above the last-level cache).
//
// Every layer benchmark reports "bytes that must move" (the weights it reads, plus the KV cache
// for attention) through SetBytesProcessed and the counters
//   GB/s             those bytes per wall-clock second (decimal GB),
//   read_GB/s        the memory-read bandwidth probed just before and after this row's loop,
//   frac_of_read_bw  GB/s / read_GB/s,
//   TFLOP/s          2 * multiply-adds per wall-clock second,
//   frac_of_fma_peak TFLOP/s as a fraction of BM_Fp32FmaPeak's best pass (the compute limit).
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status.h"
#include "common/tensor.h"
#include "kernels/cpu/ops.h"

namespace epx {
namespace {

// ---------------------------------------------------------------------------------------------
// Configuration

struct Scale {
  std::string name;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t num_experts = 0;
  int64_t num_topk = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;

  static Scale Mixtral() { return {"mixtral", 4096, 14336, 8, 2, 32, 8, 128}; }
  // Same expert count, top-k, head_dim and GQA ratio; a quarter of the width.
  static Scale Small() { return {"small", 1024, 3584, 8, 2, 8, 2, 128}; }
};

Scale g_scale;  // set in main() before any benchmark runs
int64_t g_read_buffer_bytes = int64_t{1} << 30;
// FLOP/s of BM_Fp32FmaPeak's best pass in this process (0 until it has run).
double g_fma_flops_per_second = 0;

absl::Status ParseEnvironment() {
  const char* scale = std::getenv("EPX_BENCH_SCALE");
  if (scale == nullptr || std::strcmp(scale, "mixtral") == 0 || scale[0] == '\0') {
    g_scale = Scale::Mixtral();
  } else if (std::strcmp(scale, "small") == 0) {
    g_scale = Scale::Small();
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("EPX_BENCH_SCALE=", scale, ": expected \"mixtral\" or \"small\""));
  }
  if (const char* bytes = std::getenv("EPX_BENCH_BYTES"); bytes != nullptr && bytes[0] != '\0') {
    char* end = nullptr;
    double value = std::strtod(bytes, &end);
    constexpr char kUnits[] = "KMG";  // binary prefixes
    if (*end != '\0') {
      if (const char* u = std::strchr(kUnits, std::toupper(static_cast<unsigned char>(*end)))) {
        value *= std::pow(1024.0, static_cast<double>(1 + (u - kUnits)));
        ++end;
      }
    }
    if (end == bytes || *end != '\0' || !(value >= 1024.0 * 1024.0))
      return absl::InvalidArgumentError(absl::StrCat(
          "EPX_BENCH_BYTES=", bytes, ": expected a size of at least 1M, e.g. 1073741824 or 1G"));
    g_read_buffer_bytes = static_cast<int64_t>(value);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Fast parallel random fill. Each chunk has its own SplitMix64 stream, so the contents depend on
// the seed only, not on the thread count.

inline uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [-bound, bound), written as F32 or BF16.
void FillUniform(const TensorView& t, float bound, uint64_t seed) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t n = t.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const bool bf16 = t.dtype() == DType::kBF16;
  EPX_CHECK(bf16 || t.dtype() == DType::kF32);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t state = seed * 0xd1342543de82ef95ull + static_cast<uint64_t>(c);
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const float u = static_cast<float>(SplitMix64(state) >> 40) * 0x1.0p-24f;  // [0, 1)
      const float v = (2.f * u - 1.f) * bound;
      if (bf16) {
        t.data<uint16_t>()[i] = F32ToBf16(v);
      } else {
        t.data<float>()[i] = v;
      }
    }
  }
}

Tensor RandomTensor(DType dtype, Shape shape, float bound, uint64_t seed) {
  Tensor t = Tensor::Empty(dtype, std::move(shape));
  FillUniform(t, bound, seed);
  return t;
}

// Weights of fan-in k get the usual U(-1/sqrt(k), 1/sqrt(k)) so activations stay O(1).
Tensor RandomWeight(int64_t rows, int64_t k, uint64_t seed) {
  return RandomTensor(DType::kBF16, {rows, k}, 1.f / std::sqrt(static_cast<float>(k)), seed);
}

Tensor Ones(int64_t n) {
  Tensor t = Tensor::Empty(DType::kF32, {n});
  std::fill(t.data<float>(), t.data<float>() + n, 1.f);
  return t;
}

// bf16 -> fp32 copy, in parallel (first touch spreads the pages over the threads' nodes).
Tensor WidenBf16(const TensorView& src) {
  Tensor out = Tensor::Empty(DType::kF32, src.shape());
  const int64_t n = src.numel();
  const uint16_t* s = src.data<const uint16_t>();
  float* d = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) d[i] = Bf16ToF32(s[i]);
  return out;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// `bytes` and `flops` are totals over the measured loop, which took `seconds` of wall-clock time
// (timed around the loop by the caller; the same span as Google Benchmark's real time);
// `read_bytes_per_second` is the read bandwidth probed around that loop. The counters are
// computed here rather than as kIsRate counters so that they print as plain numbers
// ("GB/s=31.2", not "GB/s=31.2/s").
void ReportLayerCounters(benchmark::State& state, double bytes, double flops, double seconds,
                         double read_bytes_per_second) {
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  if (seconds <= 0) return;
  state.counters["GB/s"] = bytes / seconds * 1e-9;
  state.counters["TFLOP/s"] = flops / seconds * 1e-12;
  state.counters["read_GB/s"] = read_bytes_per_second * 1e-9;
  state.counters["frac_of_read_bw"] = bytes / seconds / read_bytes_per_second;
  if (g_fma_flops_per_second > 0)
    state.counters["frac_of_fma_peak"] = flops / seconds / g_fma_flops_per_second;
}

// ---------------------------------------------------------------------------------------------
// Memory-read bandwidth: the hardware limit every layer is reported against.

typedef uint64_t U64x8 __attribute__((vector_size(64)));

struct ReadBuffer {
  struct Free {
    void operator()(U64x8* p) const { std::free(p); }
  };
  std::unique_ptr<U64x8[], Free> data;
  int64_t blocks = 0;  // of 4 vectors = 256 bytes

  int64_t bytes() const { return blocks * 4 * static_cast<int64_t>(sizeof(U64x8)); }
};

const ReadBuffer& GetReadBuffer() {
  static const ReadBuffer* buffer = [] {
    auto* b = new ReadBuffer;
    b->blocks = std::max<int64_t>(1, g_read_buffer_bytes / 256);
    b->data.reset(static_cast<U64x8*>(std::aligned_alloc(64, b->bytes())));
    EPX_CHECK(b->data != nullptr);
    U64x8* p = b->data.get();
    // First touch with the schedule the reads use, so each thread reads pages it faulted in.
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < b->blocks; ++i)
      for (int j = 0; j < 4; ++j) p[4 * i + j] = U64x8{} + static_cast<uint64_t>(4 * i + j);
    return b;
  }();
  return *buffer;
}

// One pass over the buffer with every thread; the sum keeps the loads alive.
uint64_t ReadAll(const ReadBuffer& b) {
  const U64x8* p = b.data.get();
  uint64_t sum = 0;
#pragma omp parallel reduction(+ : sum)
  {
    U64x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < b.blocks; ++i) {
      a0 += p[4 * i];
      a1 += p[4 * i + 1];
      a2 += p[4 * i + 2];
      a3 += p[4 * i + 3];
    }
    const U64x8 t = a0 + a1 + a2 + a3;
    for (int l = 0; l < 8; ++l) sum += t[l];
  }
  return sum;
}

void BM_MemoryReadBandwidth(benchmark::State& state) {
  const ReadBuffer& b = GetReadBuffer();
  benchmark::DoNotOptimize(ReadAll(b));  // warm: TLB, page tables, thread team
  const double pass_bytes = static_cast<double>(b.bytes());
  double seconds = 0, best = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(ReadAll(b));
    const double s = SecondsSince(start);
    seconds += s;
    best = std::max(best, pass_bytes / s);
  }
  state.SetBytesProcessed(b.bytes() * state.iterations());
  state.counters["GB/s"] = pass_bytes * state.iterations() / seconds * 1e-9;
  state.counters["best_GB/s"] = best * 1e-9;
  state.SetLabel(absl::StrCat(b.bytes() >> 20, " MiB, ", omp_get_max_threads(), " threads"));
}

// The read bandwidth each layer row is divided by: the best of a few passes just before and just
// after its timed loop. Not one number for the whole process, because on a shared VM the memory
// bandwidth the host gives can change 2x from one second to the next (measured on the 2-vCPU
// development VM: about 40 and about 76 GB/s over the same buffer in one process); the best pass,
// not the mean, so that a pass that loses a core to another process does not lower the limit and
// flatter the fraction.
constexpr int kProbePasses = 3;

double ProbeReadBandwidth() {
  const ReadBuffer& b = GetReadBuffer();
  double best = 0;
  for (int i = 0; i < kProbePasses; ++i) {
    const auto start = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(ReadAll(b));
    best = std::max(best, static_cast<double>(b.bytes()) / SecondsSince(start));
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// fp32 FMA peak: the compute limit. Every thread runs independent chains of 16-lane fused
// multiply-adds from registers (12 chains cover the FMA latency times the FMA ports of current
// x86 cores), so this is what the vector units can do, not what any GEMM achieves.

typedef float F32x16 __attribute__((vector_size(64)));
constexpr int kFmaChains = 12;
constexpr int64_t kFmaIterations = int64_t{1} << 21;

// Returns the FLOPs done; `*sink` keeps the chains alive.
double FmaPass(float* sink) {
  float total = 0;
#pragma omp parallel reduction(+ : total)
  {
    // Start values the compiler cannot see (a constant start at the fixed point would let it
    // fold that chain away).
    F32x16 acc[kFmaChains];
    for (int j = 0; j < kFmaChains; ++j)
      acc[j] = F32x16{} + static_cast<float>(2 + j + omp_get_thread_num());
    // acc -> acc * a + b converges to b / (1 - a) = 1: no overflow, no subnormals.
    const F32x16 a = F32x16{} + 0.999f, b = F32x16{} + 0.001f;
    for (int64_t i = 0; i < kFmaIterations; ++i)
      for (int j = 0; j < kFmaChains; ++j) acc[j] = acc[j] * a + b;
    for (int j = 0; j < kFmaChains; ++j)
      for (int l = 0; l < 16; ++l) total += acc[j][l];
  }
  *sink = total;
  return 2.0 * 16 * kFmaChains * static_cast<double>(kFmaIterations) * omp_get_max_threads();
}

void BM_Fp32FmaPeak(benchmark::State& state) {
  float sink = 0;
  FmaPass(&sink);  // warm: clocks, thread team
  double flops = 0, seconds = 0, best = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    const double f = FmaPass(&sink);
    const double s = SecondsSince(start);
    benchmark::DoNotOptimize(sink);
    flops += f;
    seconds += s;
    best = std::max(best, f / s);
  }
  g_fma_flops_per_second = best;  // best pass, as for the read bandwidth
  state.counters["TFLOP/s"] = flops / seconds * 1e-12;
  state.counters["best_TFLOP/s"] = best * 1e-12;
  state.SetLabel(absl::StrCat("16-lane fp32 FMA, ", omp_get_max_threads(), " threads"));
}

void EnsureFmaPeak() {
  if (g_fma_flops_per_second > 0) return;
  float sink = 0;
  FmaPass(&sink);
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    const double f = FmaPass(&sink);
    g_fma_flops_per_second = std::max(g_fma_flops_per_second, f / SecondsSince(start));
  }
  benchmark::DoNotOptimize(sink);
  std::fprintf(stderr,
               "cpu_layers_bench: BM_Fp32FmaPeak filtered out; measured %.3f TFLOP/s "
               "for frac_of_fma_peak\n",
               g_fma_flops_per_second * 1e-12);
}

// ---------------------------------------------------------------------------------------------
// One MoE layer: RMSNorm, router, expert FFNs (as coordinator/expert_executor.cc runs them),
// combine with the residual.

struct MoeWeights {
  Tensor norm;                     // [hidden] F32
  Tensor gate;                     // [num_experts, hidden] BF16
  std::vector<Tensor> w1, w2, w3;  // per expert: [intermediate, hidden], [hidden, intermediate]
};

const MoeWeights& GetMoeWeights() {
  static const MoeWeights* weights = [] {
    const Scale& s = g_scale;
    auto* w = new MoeWeights;
    w->norm = Ones(s.hidden);
    w->gate = RandomWeight(s.num_experts, s.hidden, 1);
    for (int64_t e = 0; e < s.num_experts; ++e) {
      w->w1.push_back(RandomWeight(s.intermediate, s.hidden, 100 + 3 * e));
      w->w2.push_back(RandomWeight(s.hidden, s.intermediate, 101 + 3 * e));
      w->w3.push_back(RandomWeight(s.intermediate, s.hidden, 102 + 3 * e));
    }
    return w;
  }();
  return *weights;
}

// fp32 copies of the expert weights for the OpenBLAS peer (twice the bytes of bf16).
struct MoePeerWeights {
  std::vector<Tensor> w1, w2, w3;
};

const MoePeerWeights& GetMoePeerWeights() {
  static const MoePeerWeights* weights = [] {
    const MoeWeights& src = GetMoeWeights();
    auto* w = new MoePeerWeights;
    for (size_t e = 0; e < src.w1.size(); ++e) {
      w->w1.push_back(WidenBf16(src.w1[e]));
      w->w2.push_back(WidenBf16(src.w2[e]));
      w->w3.push_back(WidenBf16(src.w3[e]));
    }
    return w;
  }();
  return *weights;
}

// Different inputs per iteration, so the experts hit (and so the bytes read) vary as in decode.
constexpr int kInputSets = 8;

struct MoeBuffers {
  MoeBuffers(const Scale& s, int64_t num_tokens)
      : num_slots(num_tokens * s.num_topk),
        xn(Tensor::Empty(DType::kF32, {num_tokens, s.hidden})),
        logits(Tensor::Empty(DType::kF32, {num_tokens, s.num_experts})),
        topk_ids(Tensor::Empty(DType::kI32, {num_tokens, s.num_topk})),
        topk_weights(Tensor::Empty(DType::kF32, {num_tokens, s.num_topk})),
        permuted(Tensor::Empty(DType::kF32, {num_slots, s.hidden})),
        expert_out(Tensor::Empty(DType::kF32, {num_slots, s.hidden})),
        slot_out(Tensor::Empty(DType::kF32, {num_slots, s.hidden})),
        out(Tensor::Empty(DType::kF32, {num_tokens, s.hidden})),
        offsets(s.num_experts + 1),
        slots(num_slots) {
    for (int i = 0; i < kInputSets; ++i)
      x.push_back(RandomTensor(DType::kF32, {num_tokens, s.hidden}, 1.f, 1000 + i));
  }

  int64_t num_slots;
  std::vector<Tensor> x;  // kInputSets of [num_tokens, hidden]
  Tensor xn, logits, topk_ids, topk_weights, permuted, expert_out, slot_out, out;
  std::vector<int64_t> offsets;
  std::vector<int64_t> slots;
};

// Runs the layer on input set `input`; `expert_ffn(e, rows, out)` applies expert e to `rows`
// ([n, hidden]) into `out` ([n, hidden]). Sets *experts_hit to the number of distinct experts.
template <typename ExpertFfn>
absl::Status RunMoeLayer(const Scale& s, const MoeWeights& w, MoeBuffers& b, int input,
                         ExpertFfn&& expert_ffn, int64_t* experts_hit) {
  const Tensor& x = b.x[input];
  EPX_RETURN_IF_ERROR(cpu::RmsNorm(x, w.norm, 1e-5f, b.xn));
  EPX_RETURN_IF_ERROR(cpu::Linear(b.xn, w.gate, b.logits));
  EPX_RETURN_IF_ERROR(cpu::RouterTopK(b.logits, b.topk_ids, b.topk_weights));
  EPX_RETURN_IF_ERROR(cpu::ExpertPermutation(b.topk_ids, s.num_experts, absl::MakeSpan(b.offsets),
                                             absl::MakeSpan(b.slots)));
  EPX_RETURN_IF_ERROR(cpu::PermuteRows(b.xn, b.slots, s.num_topk, b.permuted));
  *experts_hit = 0;
  for (int64_t e = 0; e < s.num_experts; ++e) {
    const int64_t begin = b.offsets[e], end = b.offsets[e + 1];
    if (begin == end) continue;
    ++*experts_hit;
    EPX_RETURN_IF_ERROR(
        expert_ffn(e, b.permuted.view().Slice(begin, end), b.expert_out.view().Slice(begin, end)));
  }
  EPX_RETURN_IF_ERROR(cpu::UnpermuteRows(b.expert_out, b.slots, b.slot_out));
  // Into a separate output, so the residual does not drift across iterations.
  return cpu::MoeCombine(x, b.slot_out, b.topk_weights, b.out);
}

template <typename ExpertFfn>
void MoeLayerLoop(benchmark::State& state, double bytes_per_expert, ExpertFfn&& expert_ffn) {
  EnsureFmaPeak();
  const Scale& s = g_scale;
  const MoeWeights& w = GetMoeWeights();
  const int64_t num_tokens = state.range(0);
  MoeBuffers b(s, num_tokens);
  int64_t total_hit = 0;
  int input = 0;
  const double read_before = ProbeReadBandwidth();
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    int64_t hit = 0;
    const absl::Status status = RunMoeLayer(s, w, b, input, expert_ffn, &hit);
    if (!status.ok()) {
      state.SkipWithError(std::string(status.message()).c_str());
      break;
    }
    total_hit += hit;
    input = (input + 1) % kInputSets;
  }
  const double seconds = SecondsSince(start);
  const double read_bw = std::max(read_before, ProbeReadBandwidth());
  const double router_bytes = static_cast<double>(w.gate.nbytes()) * state.iterations();
  const double bytes = bytes_per_expert * static_cast<double>(total_hit) + router_bytes;
  const double flops = 2.0 * static_cast<double>(state.iterations()) * num_tokens *
                       (static_cast<double>(s.num_topk) * 3 * s.hidden * s.intermediate +
                        static_cast<double>(s.num_experts) * s.hidden);
  ReportLayerCounters(state, bytes, flops, seconds, read_bw);
  state.counters["experts_hit"] =
      benchmark::Counter(static_cast<double>(total_hit), benchmark::Counter::kAvgIterations);
}

void BM_MoeLayer(benchmark::State& state) {
  const Scale& s = g_scale;
  const MoeWeights& w = GetMoeWeights();
  // Enough for every slot routed to one expert.
  std::vector<float> scratch(cpu::SwiGluScratchFloats(state.range(0) * s.num_topk, s.intermediate));
  MoeLayerLoop(state, 3.0 * s.hidden * s.intermediate * DTypeSize(DType::kBF16),
               [&](int64_t e, const TensorView& rows, const TensorView& out) {
                 return cpu::SwiGluExpert(rows, w.w1[e], w.w2[e], w.w3[e], absl::MakeSpan(scratch),
                                          out);
               });
}

// The peer: the same layer with the expert FFN done by OpenBLAS on fp32 weights. The engine does
// not use BLAS for its GEMMs because (1) sgemm picks kernels and blockings by matrix size, so the
// summation order of one output element, and so its bits, changes with the number of rows in the
// batch, which breaks the batch invariance of ops.h; (2) BLAS wants fp32 (or its own bf16 packed
// formats), twice the bytes of the bf16 checkpoint on a memory-bound decode. A single-row
// product goes to sgemv, as newer OpenBLAS releases do on their own.
void BlasRowsTimesWeightT(int64_t rows, int64_t n, int64_t k, const float* x, const float* w,
                          float* y) {
  if (rows == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(n), static_cast<int>(k), 1.f, w,
                static_cast<int>(k), x, 1, 0.f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                static_cast<int>(n), static_cast<int>(k), 1.f, x, static_cast<int>(k), w,
                static_cast<int>(k), 0.f, y, static_cast<int>(n));
  }
}

void BM_MoeLayerOpenBlasPeer(benchmark::State& state) {
  const Scale& s = g_scale;
  const MoePeerWeights& w = GetMoePeerWeights();
  std::vector<float> scratch(cpu::SwiGluScratchFloats(state.range(0) * s.num_topk, s.intermediate));
  MoeLayerLoop(state, 3.0 * s.hidden * s.intermediate * DTypeSize(DType::kF32),
               [&](int64_t e, const TensorView& rows, const TensorView& out) {
                 const int64_t n = rows.dim(0), h = s.hidden, inter = s.intermediate;
                 float* gate = scratch.data();
                 float* up = scratch.data() + n * inter;
                 BlasRowsTimesWeightT(n, inter, h, rows.data<const float>(),
                                      w.w1[e].data<const float>(), gate);
                 BlasRowsTimesWeightT(n, inter, h, rows.data<const float>(),
                                      w.w3[e].data<const float>(), up);
                 // The same activation loop as cpu::SwiGluExpert.
                 for (int64_t i = 0; i < n * inter; ++i)
                   gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
                 BlasRowsTimesWeightT(n, h, inter, gate, w.w2[e].data<const float>(),
                                      out.data<float>());
                 return absl::OkStatus();
               });
}

// ---------------------------------------------------------------------------------------------
// One attention layer, decode: B sequences, one new token each at position C - 1, attending to C
// cached keys/values (fp32, as coordinator/kv_cache keeps them). The steps of engine.cc.

struct AttentionWeights {
  Tensor norm;        // [hidden] F32
  Tensor q, k, v, o;  // BF16: [heads*d, hidden], [kv*d, hidden] x2, [hidden, heads*d]
};

const AttentionWeights& GetAttentionWeights() {
  static const AttentionWeights* weights = [] {
    const Scale& s = g_scale;
    const int64_t q_dim = s.num_heads * s.head_dim, kv_dim = s.num_kv_heads * s.head_dim;
    auto* w = new AttentionWeights;
    w->norm = Ones(s.hidden);
    w->q = RandomWeight(q_dim, s.hidden, 11);
    w->k = RandomWeight(kv_dim, s.hidden, 12);
    w->v = RandomWeight(kv_dim, s.hidden, 13);
    w->o = RandomWeight(s.hidden, q_dim, 14);
    return w;
  }();
  return *weights;
}

void BM_AttentionLayer(benchmark::State& state) {
  EnsureFmaPeak();
  const Scale& s = g_scale;
  const AttentionWeights& w = GetAttentionWeights();
  const int64_t batch = state.range(0), context = state.range(1);
  const int64_t q_dim = s.num_heads * s.head_dim, kv_dim = s.num_kv_heads * s.head_dim;

  Tensor x = RandomTensor(DType::kF32, {batch, s.hidden}, 1.f, 2000);
  Tensor xn = Tensor::Empty(DType::kF32, {batch, s.hidden});
  Tensor q = Tensor::Empty(DType::kF32, {batch, q_dim});
  Tensor k = Tensor::Empty(DType::kF32, {batch, kv_dim});
  Tensor v = Tensor::Empty(DType::kF32, {batch, kv_dim});
  Tensor attn = Tensor::Empty(DType::kF32, {batch, q_dim});
  Tensor proj = Tensor::Empty(DType::kF32, {batch, s.hidden});
  Tensor out = Tensor::Empty(DType::kF32, {batch, s.hidden});
  Tensor rope = Tensor::Empty(DType::kF32, {batch, s.head_dim});
  const std::vector<int64_t> positions(batch, context - 1);
  if (absl::Status st = cpu::RopeTable(positions, s.head_dim, 1e6, rope); !st.ok()) {
    state.SkipWithError(std::string(st.message()).c_str());
    return;
  }
  std::vector<Tensor> keys, values;  // per sequence [context, kv_dim]
  std::vector<cpu::AttentionKv> kv(batch);
  for (int64_t b = 0; b < batch; ++b) {
    keys.push_back(RandomTensor(DType::kF32, {context, kv_dim}, 1.f, 3000 + 2 * b));
    values.push_back(RandomTensor(DType::kF32, {context, kv_dim}, 1.f, 3001 + 2 * b));
    kv[b] = {.k = keys[b].data<float>(), .v = values[b].data<float>(), .row_stride = kv_dim, .position = context - 1};
  }
  cpu::AttentionParams ap;
  ap.num_heads = s.num_heads;
  ap.num_kv_heads = s.num_kv_heads;
  ap.head_dim = s.head_dim;
  ap.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));

  auto layer = [&]() -> absl::Status {
    EPX_RETURN_IF_ERROR(cpu::RmsNorm(x, w.norm, 1e-5f, xn));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, w.q, q));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, w.k, k));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, w.v, v));
    EPX_RETURN_IF_ERROR(cpu::ApplyRope(q, s.head_dim, rope));
    EPX_RETURN_IF_ERROR(cpu::ApplyRope(k, s.head_dim, rope));
    for (int64_t b = 0; b < batch; ++b) {
      std::memcpy(keys[b].data<float>() + (context - 1) * kv_dim, k.data<float>() + b * kv_dim,
                  kv_dim * sizeof(float));
      std::memcpy(values[b].data<float>() + (context - 1) * kv_dim, v.data<float>() + b * kv_dim,
                  kv_dim * sizeof(float));
    }
    EPX_RETURN_IF_ERROR(cpu::Attention(q, kv, ap, attn));
    EPX_RETURN_IF_ERROR(cpu::Linear(attn, w.o, proj));
    return cpu::Add(x, proj, out);
  };
  const double read_before = ProbeReadBandwidth();
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (absl::Status st = layer(); !st.ok()) {
      state.SkipWithError(std::string(st.message()).c_str());
      break;
    }
  }
  const double seconds = SecondsSince(start);
  const double read_bw = std::max(read_before, ProbeReadBandwidth());
  const double n = static_cast<double>(state.iterations());
  const double weight_bytes =
      static_cast<double>(w.q.nbytes() + w.k.nbytes() + w.v.nbytes() + w.o.nbytes());
  const double kv_bytes = static_cast<double>(batch) * context * 2 * kv_dim * sizeof(float);
  const double proj_flops = 2.0 * batch * s.hidden * (2.0 * q_dim + 2.0 * kv_dim);
  const double attn_flops = 4.0 * batch * s.num_heads * context * s.head_dim;  // QK^T and PV
  ReportLayerCounters(state, n * (weight_bytes + kv_bytes), n * (proj_flops + attn_flops), seconds,
                      read_bw);
}

void RegisterBenchmarks() {
  // Registration order is run order: the limits first, so that they print first (the layers
  // divide by the FMA peak, and probe the read bandwidth again around their own loops); the
  // OpenBLAS peer last, because its idle pool threads keep spinning for a
  // while after each call and would steal cycles from the OpenMP kernels measured after it.
  benchmark::RegisterBenchmark("BM_MemoryReadBandwidth", BM_MemoryReadBandwidth)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("BM_Fp32FmaPeak", BM_Fp32FmaPeak)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  const std::vector<int64_t> tokens = {1, 4, 16, 64, 256};
  auto* moe = benchmark::RegisterBenchmark("BM_MoeLayer", BM_MoeLayer);
  moe->ArgName("T")->UseRealTime()->Unit(benchmark::kMillisecond);
  for (int64_t t : tokens) moe->Arg(t);
  benchmark::RegisterBenchmark("BM_AttentionLayer", BM_AttentionLayer)
      ->ArgNames({"B", "C"})
      ->Args({1, 1024})
      ->Args({8, 1024})
      ->Args({1, 8192})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  auto* peer = benchmark::RegisterBenchmark("BM_MoeLayerOpenBlasPeer", BM_MoeLayerOpenBlasPeer);
  peer->ArgName("T")->UseRealTime()->Unit(benchmark::kMillisecond);
  for (int64_t t : tokens) peer->Arg(t);
}

}  // namespace
}  // namespace epx

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (absl::Status st = epx::ParseEnvironment(); !st.ok()) {
    std::fprintf(stderr, "cpu_layers_bench: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  const epx::Scale& s = epx::g_scale;
  benchmark::AddCustomContext(
      "epx_scale", absl::StrCat(s.name, ": hidden ", s.hidden, ", intermediate ", s.intermediate,
                                ", experts ", s.num_experts, " top-", s.num_topk, ", heads ",
                                s.num_heads, "/", s.num_kv_heads, " x ", s.head_dim));
  benchmark::AddCustomContext("omp_threads", absl::StrCat(omp_get_max_threads()));
  benchmark::AddCustomContext("openblas", absl::StrCat(openblas_get_config(), ", ",
                                                       openblas_get_num_threads(), " threads"));
  epx::RegisterBenchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
