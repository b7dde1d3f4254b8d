// One Mixtral-8x7B MoE layer on the GPU (kernels/cuda/ops.h), for T = 1, 2, 4, ..., 8192 tokens,
// with every GroupedSwiGlu form and BF16 and FP8 expert weights, each printed next to two limits
// measured in this process (docs/ARCHITECTURE.md, "Performance targets"): a device-to-device copy (the memory limit) and a large
// cuBLAS BF16 GEMM (the compute limit). bench/peer/moe_layer_torch.py runs the same layer in
// PyTorch (transformers' MixtralSparseMoeBlock); bench/moe_layer.sh puts the two side by side.
// See bench/README.md.
//
// One layer is the MoE half of a decoder layer as coordinator/ and worker/ run it on one GPU:
//   router Linear (xn @ gate^T -> fp32 logits), RouterTopK, ExpertPermutation, PermuteRows,
//   GroupedSwiGlu over the experts, MoeCombine into the fp32 residual.
// Inputs and weights are synthetic (cuda::FillDummy); the routing is real: the router runs on
// random inputs, and the same inputs every iteration give the same routing. The cuBLAS forms
// need the rows per expert on the host; they come from an untimed pass over the same inputs, as
// an engine gets them from the dispatch counts (docs/ARCHITECTURE.md, "Expert parallelism") rather than from a device read.
//
// Columns: us per layer (mean over the timed repeats); bytes that must move (weights of the
// experts hit, plus the router, plus the activations read and written once: xn BF16 in, the fp32
// residual in and out); GB/s = bytes / time; frac_copy = GB/s over the copy bandwidth; TFLOP/s
// (2 * multiply-adds of the router and the three expert GEMMs of every routed row) and
// frac_gemm = TFLOP/s over the GEMM peak. FP8 rows count FP8 bytes (and the scales): their
// frac_copy says how well they stream their own bytes; compare forms and dtypes on us.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/dummy_weights.h"
#include "common/status.h"
#include "common/tensor.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "nlohmann/json.hpp"

namespace epx {
namespace {

// ---------------------------------------------------------------------------------------------
// Options

struct MoeShape {
  std::string name;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t num_experts = 0;
  int64_t num_topk = 0;
  static MoeShape Mixtral() { return {"mixtral", 4096, 14336, 8, 2}; }
  // A quarter of the width: a quick run, not a measurement of the model.
  static MoeShape Small() { return {"small", 1024, 3584, 8, 2}; }
};

struct Options {
  MoeShape shape = MoeShape::Mixtral();
  std::vector<int64_t> tokens;
  std::vector<DType> dtypes = {DType::kBF16, DType::kF8E4M3};
  std::vector<cuda::GroupedGemmImpl> impls = {
      cuda::GroupedGemmImpl::kAuto, cuda::GroupedGemmImpl::kSkinny,
      cuda::GroupedGemmImpl::kCublasLoop, cuda::GroupedGemmImpl::kCublasGrouped};
  double min_ms = 200;  // timed time per row, at least
  int64_t copy_bytes = int64_t{1} << 30;
  int64_t gemm_size = 8192;
  std::string json_path;
  int device = 0;
};

constexpr char kUsage[] =
    "usage: cuda_moe_layer_bench [--json FILE] [--tokens 1,2,4,...] [--dtypes bf16,fp8]\n"
    "                            [--impls auto,skinny,cublas-loop,cublas-grouped]\n"
    "                            [--min-ms 200] [--scale mixtral|small] [--device 0]\n"
    "Times one MoE layer per token count T (default 1, 2, 4, ..., 8192) for every weight dtype\n"
    "and GroupedSwiGlu form, next to the device-to-device copy bandwidth and the cuBLAS BF16\n"
    "GEMM peak measured first. --json writes every row for bench/moe_layer.sh.\n";

const char* DTypeLabel(DType dtype) { return dtype == DType::kBF16 ? "bf16" : "fp8"; }

absl::StatusOr<Options> ParseOptions(int argc, char** argv) {
  Options o;
  for (int64_t t = 1; t <= 8192; t *= 2) o.tokens.push_back(t);
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
    const std::string value = argv[++i];
    if (flag == "--json") {
      o.json_path = value;
    } else if (flag == "--tokens") {
      o.tokens.clear();
      for (absl::string_view s : absl::StrSplit(value, ',')) {
        int64_t t = 0;
        if (!absl::SimpleAtoi(s, &t) || t <= 0)
          return absl::InvalidArgumentError(absl::StrCat("--tokens: bad count \"", s, "\""));
        o.tokens.push_back(t);
      }
    } else if (flag == "--dtypes") {
      o.dtypes.clear();
      for (absl::string_view s : absl::StrSplit(value, ',')) {
        if (s == "bf16")
          o.dtypes.push_back(DType::kBF16);
        else if (s == "fp8")
          o.dtypes.push_back(DType::kF8E4M3);
        else
          return absl::InvalidArgumentError(absl::StrCat("--dtypes: bf16 or fp8, not ", s));
      }
    } else if (flag == "--impls") {
      o.impls.clear();
      for (absl::string_view s : absl::StrSplit(value, ',')) {
        absl::StatusOr<cuda::GroupedGemmImpl> impl = cuda::ParseGroupedGemmImpl(std::string(s));
        if (!impl.ok())
          return absl::InvalidArgumentError(absl::StrCat("--impls: ", impl.status().message()));
        o.impls.push_back(*impl);
      }
    } else if (flag == "--min-ms") {
      if (!absl::SimpleAtod(value, &o.min_ms) || o.min_ms <= 0)
        return absl::InvalidArgumentError("--min-ms: a positive number of milliseconds");
    } else if (flag == "--scale") {
      if (value == "mixtral")
        o.shape = MoeShape::Mixtral();
      else if (value == "small")
        o.shape = MoeShape::Small();
      else
        return absl::InvalidArgumentError("--scale: mixtral or small");
    } else if (flag == "--device") {
      if (!absl::SimpleAtoi(value, &o.device))
        return absl::InvalidArgumentError("--device: a device index");
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", flag, "\n", kUsage));
    }
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Limits measured in this process

// Best of a few timed passes of `body` (which enqueues work on `stream`), in milliseconds.
template <typename Body>
absl::StatusOr<float> BestMs(cuda::StreamHandle stream, int passes, Body&& body) {
  EPX_ASSIGN_OR_RETURN(cuda::Event start, cuda::Event::Create());
  EPX_ASSIGN_OR_RETURN(cuda::Event end, cuda::Event::Create());
  EPX_RETURN_IF_ERROR(body());  // warm-up: clocks, TLBs, cuBLAS kernel selection
  float best = 0;
  for (int i = 0; i < passes; ++i) {
    EPX_RETURN_IF_ERROR(start.Record(stream));
    EPX_RETURN_IF_ERROR(body());
    EPX_RETURN_IF_ERROR(end.Record(stream));
    EPX_ASSIGN_OR_RETURN(const float ms, cuda::Event::ElapsedMs(start, end));
    if (i == 0 || ms < best) best = ms;
  }
  return best;
}


// FLOP/s of a size^3 cuBLAS BF16 GEMM with fp32 accumulation and a BF16 output (cuda::Linear).
absl::StatusOr<double> GemmPeak(int64_t size, const cuda::Blas& blas) {
  EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer a, cuda::DeviceBuffer::Allocate(size * size * 2));
  EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer b, cuda::DeviceBuffer::Allocate(size * size * 2));
  EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer c, cuda::DeviceBuffer::Allocate(size * size * 2));
  const TensorView x = a.view(DType::kBF16, {size, size});
  const TensorView w = b.view(DType::kBF16, {size, size});
  const TensorView y = c.view(DType::kBF16, {size, size});
  const DummyFill fill = DummyFill::Matrix(size);
  EPX_RETURN_IF_ERROR(cuda::FillDummy(x, 1, 1.f, 0.f, blas.stream()));
  EPX_RETURN_IF_ERROR(cuda::FillDummy(w, 2, fill.scale, fill.offset, blas.stream()));
  EPX_ASSIGN_OR_RETURN(
      const float ms, BestMs(blas.stream(), 5, [&] { return cuda::Linear(x, w, y, false, blas); }));
  return 2.0 * static_cast<double>(size) * size * size / (ms * 1e-3);
}

// ---------------------------------------------------------------------------------------------
// The layer

// Device memory of one MoE layer's weights, BF16 and the FP8 quantisation of the same experts.
struct LayerWeights {
  cuda::DeviceBuffer gate;              // [num_experts, hidden] BF16
  std::vector<cuda::DeviceBuffer> w13;  // [2I, H] BF16 per expert
  std::vector<cuda::DeviceBuffer> w2;   // [H, I] BF16
  std::vector<cuda::DeviceBuffer> q13;  // [2I, H] F8E4M3
  std::vector<cuda::DeviceBuffer> q2;   // [H, I] F8E4M3
  std::vector<cuda::DeviceBuffer> s13;  // [2I] F32
  std::vector<cuda::DeviceBuffer> s2;   // [H] F32
  std::vector<cuda::DeviceExpert> bf16, fp8;
  TensorView gate_view;

  double ExpertBytes(DType dtype, const MoeShape& s) const {
    const double weights = 3.0 * static_cast<double>(s.hidden) * s.intermediate;
    return dtype == DType::kBF16
               ? 2.0 * weights
               : weights + 4.0 * static_cast<double>(2 * s.intermediate + s.hidden);
  }
};

absl::StatusOr<LayerWeights> MakeWeights(const MoeShape& s, bool want_fp8,
                                         cuda::StreamHandle stream) {
  const int64_t h = s.hidden, inter = s.intermediate;
  LayerWeights w;
  EPX_ASSIGN_OR_RETURN(w.gate, cuda::DeviceBuffer::Allocate(s.num_experts * h * 2));
  w.gate_view = w.gate.view(DType::kBF16, {s.num_experts, h});
  const DummyFill gate_fill = DummyFill::Matrix(h);
  EPX_RETURN_IF_ERROR(cuda::FillDummy(w.gate_view, 7, gate_fill.scale, gate_fill.offset, stream));
  for (int64_t e = 0; e < s.num_experts; ++e) {
    EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer w13, cuda::DeviceBuffer::Allocate(2 * inter * h * 2));
    EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer w2, cuda::DeviceBuffer::Allocate(h * inter * 2));
    const TensorView w13_view = w13.view(DType::kBF16, {2 * inter, h});
    const TensorView w2_view = w2.view(DType::kBF16, {h, inter});
    const DummyFill f13 = DummyFill::Matrix(h), f2 = DummyFill::Matrix(inter);
    EPX_RETURN_IF_ERROR(cuda::FillDummy(w13_view, 100 + 2 * e, f13.scale, f13.offset, stream));
    EPX_RETURN_IF_ERROR(cuda::FillDummy(w2_view, 101 + 2 * e, f2.scale, f2.offset, stream));
    cuda::DeviceExpert& bf16 = w.bf16.emplace_back();
    bf16.w13 = w13_view;
    bf16.w2 = w2_view;
    if (want_fp8) {
      EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer q13, cuda::DeviceBuffer::Allocate(2 * inter * h));
      EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer q2, cuda::DeviceBuffer::Allocate(h * inter));
      EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer s13, cuda::DeviceBuffer::Allocate(2 * inter * 4));
      EPX_ASSIGN_OR_RETURN(cuda::DeviceBuffer s2, cuda::DeviceBuffer::Allocate(h * 4));
      const cuda::DeviceExpert q{q13.view(DType::kF8E4M3, {2 * inter, h}),
                                 q2.view(DType::kF8E4M3, {h, inter}),
                                 s13.view(DType::kF32, {2 * inter}), s2.view(DType::kF32, {h})};
      EPX_RETURN_IF_ERROR(cuda::QuantizeFp8RowWise(w13_view, q.w13, q.w13_scale, stream));
      EPX_RETURN_IF_ERROR(cuda::QuantizeFp8RowWise(w2_view, q.w2, q.w2_scale, stream));
      w.fp8.push_back(q);
      w.q13.push_back(std::move(q13));
      w.q2.push_back(std::move(q2));
      w.s13.push_back(std::move(s13));
      w.s2.push_back(std::move(s2));
    }
    w.w13.push_back(std::move(w13));
    w.w2.push_back(std::move(w2));
  }
  EPX_RETURN_IF_ERROR(cuda::SynchronizeStream(stream));
  return w;
}

// Activation buffers sized for the largest T; Views(t) gives the views of t tokens.
struct LayerBuffers {
  cuda::DeviceBuffer x, xn, logits, topk_ids, topk_weights, offsets, slots, row_of_slot,
      perm_scratch, permuted, expert_out, swiglu_scratch;

  struct Views {
    TensorView x, xn, logits, topk_ids, topk_weights, offsets, slots, row_of_slot, perm_scratch,
        permuted, expert_out, swiglu_scratch;
  };

  static absl::StatusOr<LayerBuffers> Make(const MoeShape& s, int64_t max_tokens,
                                           cuda::StreamHandle stream) {
    const int64_t h = s.hidden, rows = max_tokens * s.num_topk;
    LayerBuffers b;
    EPX_ASSIGN_OR_RETURN(b.x, cuda::DeviceBuffer::Allocate(max_tokens * h * 4));
    EPX_ASSIGN_OR_RETURN(b.xn, cuda::DeviceBuffer::Allocate(max_tokens * h * 2));
    EPX_ASSIGN_OR_RETURN(b.logits, cuda::DeviceBuffer::Allocate(max_tokens * s.num_experts * 4));
    EPX_ASSIGN_OR_RETURN(b.topk_ids, cuda::DeviceBuffer::Allocate(rows * 4));
    EPX_ASSIGN_OR_RETURN(b.topk_weights, cuda::DeviceBuffer::Allocate(rows * 4));
    EPX_ASSIGN_OR_RETURN(b.offsets, cuda::DeviceBuffer::Allocate((s.num_experts + 1) * 4));
    EPX_ASSIGN_OR_RETURN(b.slots, cuda::DeviceBuffer::Allocate(rows * 4));
    EPX_ASSIGN_OR_RETURN(b.row_of_slot, cuda::DeviceBuffer::Allocate(rows * 4));
    EPX_ASSIGN_OR_RETURN(
        b.perm_scratch,
        cuda::DeviceBuffer::Allocate(std::max<size_t>(
            1, cuda::ExpertPermutationScratchBytes(max_tokens, s.num_topk, s.num_experts))));
    EPX_ASSIGN_OR_RETURN(b.permuted, cuda::DeviceBuffer::Allocate(rows * h * 2));
    EPX_ASSIGN_OR_RETURN(b.expert_out, cuda::DeviceBuffer::Allocate(rows * h * 2));
    // FP8 needs the most (its dequantisation buffer on top of the BF16 needs).
    EPX_ASSIGN_OR_RETURN(
        b.swiglu_scratch,
        cuda::DeviceBuffer::Allocate(
            std::max(cuda::GroupedSwiGluScratchBytes(rows, h, s.intermediate, DType::kBF16),
                     cuda::GroupedSwiGluScratchBytes(rows, h, s.intermediate, DType::kF8E4M3))));
    // Random normed inputs (what the router and the experts see) and a residual.
    EPX_RETURN_IF_ERROR(
        cuda::FillDummy(b.xn.view(DType::kBF16, {max_tokens, h}), 11, 1.f, 0.f, stream));
    EPX_RETURN_IF_ERROR(
        cuda::FillDummy(b.x.view(DType::kF32, {max_tokens, h}), 12, 1.f, 0.f, stream));
    return b;
  }

  Views For(const MoeShape& s, int64_t t) const {
    const int64_t h = s.hidden, rows = t * s.num_topk;
    return Views{x.view(DType::kF32, {t, h}),
                 xn.view(DType::kBF16, {t, h}),
                 logits.view(DType::kF32, {t, s.num_experts}),
                 topk_ids.view(DType::kI32, {t, s.num_topk}),
                 topk_weights.view(DType::kF32, {t, s.num_topk}),
                 offsets.view(DType::kI32, {s.num_experts + 1}),
                 slots.view(DType::kI32, {rows}),
                 row_of_slot.view(DType::kI32, {rows}),
                 perm_scratch.view(DType::kU8, {static_cast<int64_t>(perm_scratch.size())}),
                 permuted.view(DType::kBF16, {rows, h}),
                 expert_out.view(DType::kBF16, {rows, h}),
                 swiglu_scratch.view(DType::kU8, {static_cast<int64_t>(swiglu_scratch.size())})};
  }
};

// Router, top-k, permutation: the part of the layer that decides which experts run.
absl::Status Route(const MoeShape& s, const LayerWeights& w, const LayerBuffers::Views& v,
                   const cuda::Blas& blas) {
  EPX_RETURN_IF_ERROR(cuda::Linear(v.xn, w.gate_view, v.logits, false, blas));
  EPX_RETURN_IF_ERROR(cuda::RouterTopK(v.logits, v.topk_ids, v.topk_weights, blas.stream()));
  return cuda::ExpertPermutation(v.topk_ids, s.num_experts, v.offsets, v.slots, v.row_of_slot,
                                 v.perm_scratch, blas.stream());
}

absl::Status RunLayer(const MoeShape& s, const LayerWeights& w, const LayerBuffers::Views& v,
                      absl::Span<const cuda::DeviceExpert> experts,
                      absl::Span<const int64_t> host_offsets, cuda::GroupedGemmImpl impl,
                      const cuda::Blas& blas) {
  EPX_RETURN_IF_ERROR(Route(s, w, v, blas));
  EPX_RETURN_IF_ERROR(cuda::PermuteRows(v.xn, v.slots, s.num_topk, v.permuted, blas.stream()));
  EPX_RETURN_IF_ERROR(cuda::GroupedSwiGlu(v.permuted, v.offsets, host_offsets, experts, impl,
                                          v.swiglu_scratch, v.expert_out, blas));
  // The residual accumulates across repeats; it only grows linearly, and nothing reads it.
  return cuda::MoeCombine(v.x, v.expert_out, v.row_of_slot, v.topk_weights, blas.stream());
}

// ---------------------------------------------------------------------------------------------
// The sweep

struct Row {
  int64_t tokens = 0;
  std::string dtype, impl;
  int64_t experts_hit = 0;
  int repeats = 0;
  double us = 0, bytes = 0, flops = 0;
};

absl::Status RunBench(const Options& o) {
  EPX_RETURN_IF_ERROR(cuda::SetDevice(o.device));
  EPX_ASSIGN_OR_RETURN(const cuda::DeviceProperties props, cuda::GetDeviceProperties(o.device));
  EPX_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::Create());
  EPX_ASSIGN_OR_RETURN(cuda::Blas blas, cuda::Blas::Create(stream.handle()));
  const MoeShape& s = o.shape;
  std::printf("device: %s\n", props.ToString().c_str());
  std::printf("layer: %s, hidden %lld, intermediate %lld, %lld experts, top-%lld\n", s.name.c_str(),
              static_cast<long long>(s.hidden), static_cast<long long>(s.intermediate),
              static_cast<long long>(s.num_experts), static_cast<long long>(s.num_topk));

  // The limits first, in buffers freed before the layer's are allocated.
  EPX_ASSIGN_OR_RETURN(const double copy_bps,
                       cuda::MeasureCopyBandwidth(o.copy_bytes, 5, stream.handle()));
  EPX_ASSIGN_OR_RETURN(const double gemm_flops, GemmPeak(o.gemm_size, blas));
  std::printf(
      "limits: device-to-device copy %.0f GB/s (%.2f GiB copied, read + write counted); "
      "cuBLAS BF16 GEMM %lld^3 %.1f TFLOP/s\n",
      copy_bps * 1e-9, static_cast<double>(o.copy_bytes) / (1 << 30),
      static_cast<long long>(o.gemm_size), gemm_flops * 1e-12);
  std::fflush(stdout);

  const bool want_fp8 =
      std::find(o.dtypes.begin(), o.dtypes.end(), DType::kF8E4M3) != o.dtypes.end();
  EPX_ASSIGN_OR_RETURN(const LayerWeights w, MakeWeights(s, want_fp8, stream.handle()));
  const int64_t max_tokens = *std::max_element(o.tokens.begin(), o.tokens.end());
  EPX_ASSIGN_OR_RETURN(const LayerBuffers buffers,
                       LayerBuffers::Make(s, max_tokens, stream.handle()));
  EPX_ASSIGN_OR_RETURN(cuda::Event start, cuda::Event::Create());
  EPX_ASSIGN_OR_RETURN(cuda::Event end, cuda::Event::Create());

  std::printf("\n%6s %6s %4s %-5s %-15s %10s %9s %9s %8s %9s %9s\n", "T", "rows", "hit", "dtype",
              "impl", "us", "MB", "GB/s", "frac_cp", "TFLOP/s", "frac_gemm");
  std::vector<Row> rows;
  for (const int64_t t : o.tokens) {
    const LayerBuffers::Views v = buffers.For(s, t);
    const int64_t num_rows = t * s.num_topk;
    // The routing of these inputs, and the per-expert row counts the cuBLAS forms need.
    EPX_RETURN_IF_ERROR(Route(s, w, v, blas));
    std::vector<int32_t> offsets32(s.num_experts + 1);
    EPX_RETURN_IF_ERROR(cuda::CopyToHost(offsets32.data(), v.offsets.raw(),
                                         offsets32.size() * sizeof(int32_t), stream.handle()));
    EPX_RETURN_IF_ERROR(stream.Synchronize());
    const std::vector<int64_t> host_offsets(offsets32.begin(), offsets32.end());
    int64_t hit = 0;
    for (int64_t e = 0; e < s.num_experts; ++e) hit += host_offsets[e + 1] > host_offsets[e];

    for (const DType dtype : o.dtypes) {
      const std::vector<cuda::DeviceExpert>& experts = dtype == DType::kBF16 ? w.bf16 : w.fp8;
      const double bytes = static_cast<double>(hit) * w.ExpertBytes(dtype, s) +
                           static_cast<double>(w.gate_view.nbytes()) +
                           static_cast<double>(t) * s.hidden * (2 + 4 + 4);
      const double flops = 2.0 * static_cast<double>(t) * s.hidden * s.num_experts +
                           2.0 * static_cast<double>(num_rows) * 3 * s.hidden * s.intermediate;
      for (const cuda::GroupedGemmImpl impl : o.impls) {
        if (impl == cuda::GroupedGemmImpl::kSkinny && num_rows > cuda::kSkinnyMaxRows) continue;
        const auto layer = [&] { return RunLayer(s, w, v, experts, host_offsets, impl, blas); };
        // Warm-up, then one timed layer to size the repeats.
        for (int i = 0; i < 2; ++i) EPX_RETURN_IF_ERROR(layer());
        EPX_RETURN_IF_ERROR(start.Record(stream.handle()));
        EPX_RETURN_IF_ERROR(layer());
        EPX_RETURN_IF_ERROR(end.Record(stream.handle()));
        EPX_ASSIGN_OR_RETURN(const float once_ms, cuda::Event::ElapsedMs(start, end));
        const int repeats =
            static_cast<int>(std::clamp(o.min_ms / std::max(once_ms, 1e-3f), 3.0, 2000.0));
        EPX_RETURN_IF_ERROR(start.Record(stream.handle()));
        for (int i = 0; i < repeats; ++i) EPX_RETURN_IF_ERROR(layer());
        EPX_RETURN_IF_ERROR(end.Record(stream.handle()));
        EPX_ASSIGN_OR_RETURN(const float ms, cuda::Event::ElapsedMs(start, end));
        // Kernel errors surface here rather than as a silently fast row.
        EPX_RETURN_IF_ERROR(stream.Synchronize());

        Row r;
        r.tokens = t;
        r.dtype = DTypeLabel(dtype);
        r.impl = cuda::GroupedGemmImplName(impl);
        r.experts_hit = hit;
        r.repeats = repeats;
        r.us = 1e3 * ms / repeats;
        r.bytes = bytes;
        r.flops = flops;
        const double seconds = r.us * 1e-6;
        std::printf("%6lld %6lld %4lld %-5s %-15s %10.1f %9.1f %9.1f %8.3f %9.2f %9.3f\n",
                    static_cast<long long>(t), static_cast<long long>(num_rows),
                    static_cast<long long>(hit), r.dtype.c_str(), r.impl.c_str(), r.us,
                    bytes * 1e-6, bytes / seconds * 1e-9, bytes / seconds / copy_bps,
                    flops / seconds * 1e-12, flops / seconds / gemm_flops);
        std::fflush(stdout);
        rows.push_back(std::move(r));
      }
    }
  }

  if (!o.json_path.empty()) {
    nlohmann::json j;
    j["bench"] = "cuda_moe_layer_bench";
    j["device"] = props.ToString();
    j["layer"] = {{"name", s.name},
                  {"hidden", s.hidden},
                  {"intermediate", s.intermediate},
                  {"num_experts", s.num_experts},
                  {"num_topk", s.num_topk}};
    j["copy_GBps"] = copy_bps * 1e-9;
    j["gemm_peak_TFLOPs"] = gemm_flops * 1e-12;
    j["rows"] = nlohmann::json::array();
    for (const Row& r : rows) {
      const double seconds = r.us * 1e-6;
      j["rows"].push_back({{"T", r.tokens},
                           {"dtype", r.dtype},
                           {"impl", r.impl},
                           {"experts_hit", r.experts_hit},
                           {"repeats", r.repeats},
                           {"us", r.us},
                           {"bytes", r.bytes},
                           {"GBps", r.bytes / seconds * 1e-9},
                           {"frac_copy_bw", r.bytes / seconds / copy_bps},
                           {"flops", r.flops},
                           {"TFLOPs", r.flops / seconds * 1e-12},
                           {"frac_gemm_peak", r.flops / seconds / gemm_flops}});
    }
    std::ofstream out(o.json_path);
    out << j.dump(2) << "\n";
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", o.json_path));
    std::printf("\nwrote %s\n", o.json_path.c_str());
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace epx

int main(int argc, char** argv) {
  auto options = epx::ParseOptions(argc, argv);
  if (!options.ok()) {
    std::fprintf(stderr, "cuda_moe_layer_bench: %s\n",
                 std::string(options.status().message()).c_str());
    return 2;
  }
  if (const absl::Status st = epx::RunBench(*options); !st.ok()) {
    std::fprintf(stderr, "cuda_moe_layer_bench: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
