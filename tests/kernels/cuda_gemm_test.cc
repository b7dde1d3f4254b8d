// The GEMM launchers of kernels/cuda/ops.h against the CPU oracle: Linear against cpu::Linear,
// the three GroupedSwiGlu forms against cpu::GroupedSwiGlu over uneven groups (some empty, some
// of those without weights) with BF16 and FP8 weights, QuantizeFp8RowWise against the host
// quantiser bit for bit, and the argument checks. Those checks also run without a device, over
// host memory (the ...ArgumentsAreCheckedOnTheHost tests). Linear and GroupedSwiGlu get a Blas
// without a cuBLAS handle there, where a valid call with work to do stops (FailedPrecondition);
// each case changes one argument of such a call and expects the message naming that argument.
//
// Inputs are rounded to BF16 first and the oracle is fed the rounded values, so the differences
// left are the ones the GPU contract allows: summation order (fp32 either way), and the BF16
// roundings the GPU path makes on purpose (gate|up, the SiluMul output, the output itself, and
// for FP8 through cuBLAS the dequantised weights). Tolerances are stated where they are used.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "tests/kernels/cuda_test_util.h"

namespace epx::cuda {
namespace {

using ::epx::testing::DeviceEmpty;
using ::epx::testing::DeviceTensor;
using ::epx::testing::Download;
using ::epx::testing::ExpectClose;
using ::epx::testing::HostViews;
using ::epx::testing::IsFailedPrecondition;
using ::epx::testing::IsInvalidArgument;
using ::epx::testing::RandomF32;
using ::epx::testing::RoundedToBf16;
using ::epx::testing::ToBf16;
using ::epx::testing::Upload;

// A stream and the cuBLAS handle bound to it (members destroyed in reverse: handle first).
struct Gpu {
  Stream stream;
  Blas blas;
  StreamHandle s() const { return stream.handle(); }
};

Gpu MakeGpu() {
  auto stream = Stream::Create();
  EPX_CHECK(stream.ok());
  auto blas = Blas::Create(stream->handle());
  EPX_CHECK(blas.ok());
  return Gpu{std::move(*stream), std::move(*blas)};
}

DeviceTensor DeviceBytes(size_t bytes) {
  DeviceTensor out;
  auto buffer = DeviceBuffer::Allocate(std::max<size_t>(bytes, 1));
  EPX_CHECK(buffer.ok());
  out.buffer = std::move(*buffer);
  out.view = out.buffer.view(DType::kU8, {static_cast<int64_t>(bytes)});
  return out;
}

// Root mean square of a host tensor's values (any float dtype).
double Rms(const TensorView& t) {
  auto f = ToF32(t);
  EPX_CHECK(f.ok());
  double sum = 0;
  for (int64_t i = 0; i < f->numel(); ++i) sum += double{f->data<float>()[i]} * f->data<float>()[i];
  return f->numel() == 0 ? 0.0 : std::sqrt(sum / static_cast<double>(f->numel()));
}

// ---------------------------------------------------------------------------------------------
// Linear

TEST(CudaLinearTest, MatchesCpuLinearForF32AndBf16OutputsAndAccumulate) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  // Linear requires nothing of k's alignment (cuBLAS takes any leading dimension; unaligned
  // shapes only get slower kernels), so odd k and n are part of the sweep.
  const std::vector<std::pair<int64_t, int64_t>> nks = {
      {1, 1}, {5, 13}, {67, 130}, {128, 1000}, {300, 4096}};
  uint32_t seed = 1;
  for (int64_t m : {1, 3, 7, 19, 733}) {
    for (const auto& [n, k] : nks) {
      SCOPED_TRACE(absl::StrCat("m=", m, " n=", n, " k=", k));
      // Weights scaled by k^-1/2 keep outputs O(1) whatever k, so fixed tolerances fit all.
      const float w_scale = 1.f / std::sqrt(static_cast<float>(k));
      const Tensor x16 = ToBf16(RandomF32({m, k}, ++seed));
      const Tensor w16 = ToBf16(RandomF32({n, k}, ++seed, -w_scale, w_scale));
      Tensor want = Tensor::Empty(DType::kF32, {m, n});
      ASSERT_TRUE(cpu::Linear(*ToF32(x16), w16, want).ok());
      const DeviceTensor dx = Upload(x16, gpu.s());
      const DeviceTensor dw = Upload(w16, gpu.s());

      // F32 output: both sides sum exact products in fp32, in different orders; with |y| ~ 0.3
      // and k <= 4096 the order changes the result by ~1e-6, so 1e-4 is loose but still catches
      // any wrong element (those are off by O(0.1)).
      const DeviceTensor y32 = DeviceEmpty(DType::kF32, {m, n}, gpu.s());
      absl::Status st = Linear(dx, dw, y32, /*accumulate=*/false, gpu.blas);
      ASSERT_TRUE(st.ok()) << st;
      ExpectClose(Download(y32, gpu.s()), want, 1e-4f, 1e-4f, "F32 y");

      // BF16 output: one rounding (half an ulp, at most 2^-8 relative), possibly to the other
      // side of a tie after the reordered fp32 sum: one ulp, 1/128 relative, plus an absolute
      // floor.
      const DeviceTensor y16 = DeviceEmpty(DType::kBF16, {m, n}, gpu.s());
      st = Linear(dx, dw, y16, false, gpu.blas);
      ASSERT_TRUE(st.ok()) << st;
      ExpectClose(Download(y16, gpu.s()), want, 1e-3f, 1.f / 128, "BF16 y");

      // accumulate: y0 + x w^T, F32 tolerance as above.
      const Tensor y0 = RandomF32({m, n}, ++seed);
      const DeviceTensor yacc = Upload(y0, gpu.s());
      st = Linear(dx, dw, yacc, /*accumulate=*/true, gpu.blas);
      ASSERT_TRUE(st.ok()) << st;
      Tensor want_acc = Tensor::Empty(DType::kF32, {m, n});
      for (int64_t i = 0; i < m * n; ++i)
        want_acc.data<float>()[i] = y0.data<float>()[i] + want.data<float>()[i];
      ExpectClose(Download(yacc, gpu.s()), want_acc, 1e-4f, 1e-4f, "accumulated F32 y");
    }
  }
}

TEST(CudaLinearTest, KZeroGivesZerosOrLeavesTheSum) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  const DeviceTensor x = DeviceEmpty(DType::kBF16, {3, 0}, gpu.s());
  const DeviceTensor w = DeviceEmpty(DType::kBF16, {4, 0}, gpu.s());
  const DeviceTensor y = DeviceEmpty(DType::kF32, {3, 4}, gpu.s());
  ASSERT_TRUE(Linear(x, w, y, false, gpu.blas).ok());
  const Tensor zeros = Tensor::Zeros(DType::kF32, {3, 4});
  ExpectClose(Download(y, gpu.s()), zeros, 0.f, 0.f, "y = 0 for k = 0");
  const Tensor y0 = RandomF32({3, 4}, 5);
  const DeviceTensor yacc = Upload(y0, gpu.s());
  ASSERT_TRUE(Linear(x, w, yacc, true, gpu.blas).ok());
  ExpectClose(Download(yacc, gpu.s()), y0, 0.f, 0.f, "y unchanged when accumulating k = 0");
}

TEST(CudaLinearTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  const DeviceTensor x = DeviceEmpty(DType::kBF16, {3, 16}, gpu.s());
  const DeviceTensor x32 = DeviceEmpty(DType::kF32, {3, 16}, gpu.s());
  const DeviceTensor w = DeviceEmpty(DType::kBF16, {5, 16}, gpu.s());
  const DeviceTensor w_other_k = DeviceEmpty(DType::kBF16, {5, 24}, gpu.s());
  const DeviceTensor y32 = DeviceEmpty(DType::kF32, {3, 5}, gpu.s());
  const DeviceTensor y16 = DeviceEmpty(DType::kBF16, {3, 5}, gpu.s());
  const DeviceTensor y_wrong = DeviceEmpty(DType::kF32, {3, 6}, gpu.s());
  const DeviceTensor y_i32 = DeviceEmpty(DType::kI32, {3, 5}, gpu.s());
  EXPECT_EQ(Linear(x32, w, y32, false, gpu.blas).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Linear(x, w_other_k, y32, false, gpu.blas).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Linear(x, w, y_wrong, false, gpu.blas).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Linear(x, w, y_i32, false, gpu.blas).code(), absl::StatusCode::kInvalidArgument);
  // A BF16 running sum would be rounded at every call: refused.
  EXPECT_EQ(Linear(x, w, y16, true, gpu.blas).code(), absl::StatusCode::kInvalidArgument);
  // m == 0 is a no-op.
  const DeviceTensor x0 = DeviceEmpty(DType::kBF16, {0, 16}, gpu.s());
  const DeviceTensor y0 = DeviceEmpty(DType::kF32, {0, 5}, gpu.s());
  EXPECT_TRUE(Linear(x0, w, y0, false, gpu.blas).ok());
}

TEST(CudaLinearTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const Blas no_handle{};
  const TensorView x = host(DType::kBF16, {3, 16});
  const TensorView w = host(DType::kBF16, {5, 16});
  const TensorView y = host(DType::kF32, {3, 5});
  // Valid arguments get as far as the handle, with an F32 or a BF16 y.
  EXPECT_THAT(Linear(x, w, y, false, no_handle),
              IsFailedPrecondition("Linear: blas has no cuBLAS handle"));
  EXPECT_THAT(Linear(x, w, host(DType::kBF16, {3, 5}), false, no_handle),
              IsFailedPrecondition("Linear: blas has no cuBLAS handle"));
  EXPECT_THAT(Linear(x, w, y, true, no_handle),
              IsFailedPrecondition("Linear: blas has no cuBLAS handle"));
  // k = 0 still writes y (zeros).
  EXPECT_THAT(Linear(host(DType::kBF16, {3, 0}), host(DType::kBF16, {5, 0}), y, false, no_handle),
              IsFailedPrecondition("Linear: blas has no cuBLAS handle"));
  // No rows or no columns: nothing to do, so no handle is needed (nor data).
  EXPECT_TRUE(
      Linear(host(DType::kBF16, {0, 16}), w, host(DType::kF32, {0, 5}), false, no_handle).ok());
  EXPECT_TRUE(
      Linear(x, host(DType::kBF16, {0, 16}), host(DType::kF32, {3, 0}), false, no_handle).ok());
  EXPECT_TRUE(Linear(TensorView(nullptr, DType::kBF16, {0, 16}), w,
                     TensorView(nullptr, DType::kF32, {0, 5}), false, no_handle)
                  .ok());

  // x: BF16 [m, k] with data.
  EXPECT_THAT(Linear(host(DType::kF32, {3, 16}), w, y, false, no_handle),
              IsInvalidArgument("Linear: x must be"));
  EXPECT_THAT(Linear(host(DType::kBF16, {48}), w, y, false, no_handle),
              IsInvalidArgument("Linear: x must be"));
  EXPECT_THAT(Linear(TensorView(nullptr, DType::kBF16, {3, 16}), w, y, false, no_handle),
              IsInvalidArgument("Linear: x [3, 16] has no data"));
  // w: BF16 [n, k] with x's k, with data.
  EXPECT_THAT(Linear(x, host(DType::kF32, {5, 16}), y, false, no_handle),
              IsInvalidArgument("Linear: w must be"));
  EXPECT_THAT(Linear(x, host(DType::kBF16, {5, 24}), y, false, no_handle),
              IsInvalidArgument("Linear: w must be BF16 [*, 16]"));
  EXPECT_THAT(Linear(x, host(DType::kBF16, {1, 5, 16}), y, false, no_handle),
              IsInvalidArgument("Linear: w must be"));
  EXPECT_THAT(Linear(x, TensorView(nullptr, DType::kBF16, {5, 16}), y, false, no_handle),
              IsInvalidArgument("Linear: w [5, 16] has no data"));
  // y: BF16 or F32 [m, n] with data.
  EXPECT_THAT(Linear(x, w, host(DType::kI32, {3, 5}), false, no_handle),
              IsInvalidArgument("Linear: y must be BF16 or F32 [3, 5]"));
  EXPECT_THAT(Linear(x, w, host(DType::kF32, {3, 6}), false, no_handle),
              IsInvalidArgument("Linear: y must be BF16 or F32 [3, 5]"));
  EXPECT_THAT(Linear(x, w, host(DType::kF32, {5, 3}), false, no_handle),
              IsInvalidArgument("Linear: y must be BF16 or F32 [3, 5]"));
  EXPECT_THAT(Linear(x, w, host(DType::kF32, {15}), false, no_handle),
              IsInvalidArgument("Linear: y must be BF16 or F32 [3, 5]"));
  EXPECT_THAT(Linear(x, w, TensorView(nullptr, DType::kF32, {3, 5}), false, no_handle),
              IsInvalidArgument("Linear: y [3, 5] has no data"));
  // A BF16 running sum would be rounded at every call.
  EXPECT_THAT(Linear(x, w, host(DType::kBF16, {3, 5}), true, no_handle),
              IsInvalidArgument("Linear: accumulate needs an F32 y"));
  // cuBLAS takes int dimensions.
  const int64_t too_many = int64_t{1} << 31;
  EXPECT_THAT(Linear(host.Unbacked(DType::kBF16, {too_many, 1}), host(DType::kBF16, {1, 1}),
                     host.Unbacked(DType::kF32, {too_many, 1}), false, no_handle),
              IsInvalidArgument("Linear: dimensions must fit in int for cuBLAS, got m=2147483648"));
  EXPECT_THAT(
      Linear(host(DType::kBF16, {1, 1}), host.Unbacked(DType::kBF16, {too_many, 1}),
             host.Unbacked(DType::kF32, {1, too_many}), false, no_handle),
      IsInvalidArgument("Linear: dimensions must fit in int for cuBLAS, got m=1 n=2147483648"));
  EXPECT_THAT(
      Linear(host.Unbacked(DType::kBF16, {1, too_many}), host.Unbacked(DType::kBF16, {1, too_many}),
             host(DType::kF32, {1, 1}), false, no_handle),
      IsInvalidArgument("Linear: dimensions must fit in int for cuBLAS, got m=1 n=1 "
                        "k=2147483648"));
}

// ---------------------------------------------------------------------------------------------
// GroupedSwiGlu

constexpr int64_t kHidden = 272;        // 17 x 16: K and N tails for both the BF16 (32-element)
constexpr int64_t kIntermediate = 208;  // and FP8 (64-element) steps, and a half-used 32-row block
// With K this short the skinny kernel's K loop makes a second pass in only one of its 16 cases
// (w13 or w2, BF16 or FP8, 1/2/4/8 token tiles), while Mixtral's K makes it loop 2 to 56 times.
// The long-K shape (129 x 16 and 65 x 16, tails kept) loops 2 to 9 times in 15 of the 16.
constexpr int64_t kLongHidden = 2064;
constexpr int64_t kLongIntermediate = 1040;

// One expert's weights on the host (what the oracle multiplies by) and on the device.
struct TestExpert {
  Tensor w13_oracle;  // [2I, H] F32: the exact values the GPU multiplies by (BF16 or dequantised)
  Tensor w2_oracle;   // [H, I] F32
  DeviceTensor w13, w2, w13_scale, w2_scale;
  DeviceExpert device() const {
    return DeviceExpert{w13.view, w2.view, w13_scale.view, w2_scale.view};
  }
};

// Dequantised FP8: fp8[n, k] * scale[n] in fp32, the weight an FP8 expert stands for.
Tensor Dequantised(const Fp8RowWise& q) {
  const int64_t n = q.q.dim(0), k = q.q.dim(1);
  Tensor out = Tensor::Empty(DType::kF32, {n, k});
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      out.data<float>()[r * k + c] =
          Fp8E4m3ToF32(q.q.data<uint8_t>()[r * k + c]) * q.scale.data<float>()[r];
  return out;
}

TestExpert MakeExpert(DType dtype, uint32_t seed, StreamHandle stream, int64_t hidden = kHidden,
                      int64_t inter = kIntermediate) {
  const float s13 = 1.f / std::sqrt(static_cast<float>(hidden));
  const float s2 = 1.f / std::sqrt(static_cast<float>(inter));
  const Tensor w13 = ToBf16(RandomF32({2 * inter, hidden}, seed, -s13, s13));
  const Tensor w2 = ToBf16(RandomF32({hidden, inter}, seed + 1, -s2, s2));
  TestExpert e;
  if (dtype == DType::kBF16) {
    e.w13_oracle = *ToF32(w13);
    e.w2_oracle = *ToF32(w2);
    e.w13 = Upload(w13, stream);
    e.w2 = Upload(w2, stream);
  } else {
    auto q13 = ::epx::QuantizeFp8RowWise(w13);  // the host quantiser
    auto q2 = ::epx::QuantizeFp8RowWise(w2);
    EPX_CHECK(q13.ok() && q2.ok());
    e.w13_oracle = Dequantised(*q13);
    e.w2_oracle = Dequantised(*q2);
    e.w13 = Upload(q13->q, stream);
    e.w2 = Upload(q2->q, stream);
    e.w13_scale = Upload(q13->scale, stream);
    e.w2_scale = Upload(q2->scale, stream);
  }
  return e;
}

// Uneven group sizes summing to num_rows: group 1 always empty (when there are 2+ groups), group
// g otherwise drawing rows with weight g + 1, so small row counts leave more groups empty.
std::vector<int64_t> UnevenOffsets(int64_t num_rows, int num_groups, uint32_t seed) {
  std::vector<int64_t> counts(num_groups, 0);
  std::vector<double> weights(num_groups);
  for (int g = 0; g < num_groups; ++g) weights[g] = (num_groups > 1 && g == 1) ? 0.0 : g + 1.0;
  std::mt19937 rng(seed);
  std::discrete_distribution<int> pick(weights.begin(), weights.end());
  for (int64_t r = 0; r < num_rows; ++r) ++counts[pick(rng)];
  std::vector<int64_t> offsets(num_groups + 1, 0);
  for (int g = 0; g < num_groups; ++g) offsets[g + 1] = offsets[g] + counts[g];
  return offsets;
}

struct GroupedRun {
  Tensor x16;                    // [num_rows, H] BF16
  std::vector<int64_t> offsets;  // host
  DeviceTensor x, offsets_i32;
  std::vector<DeviceExpert> experts;  // empty groups at odd indices get no weights
  Tensor want;                        // [num_rows, H] F32, the oracle
};

// The shape (hidden, intermediate) is the experts' (w2 is [H, I]).
GroupedRun MakeRun(const std::vector<TestExpert>& experts, int64_t num_rows, uint32_t seed,
                   StreamHandle stream) {
  const int num_groups = static_cast<int>(experts.size());
  const int64_t hidden = experts[0].w2_oracle.dim(0), inter = experts[0].w2_oracle.dim(1);
  GroupedRun run;
  run.x16 = ToBf16(RandomF32({num_rows, hidden}, seed));
  run.offsets = UnevenOffsets(num_rows, num_groups, seed + 7);
  run.x = Upload(run.x16, stream);
  Tensor off32 = Tensor::Empty(DType::kI32, {num_groups + 1});
  for (int g = 0; g <= num_groups; ++g)
    off32.data<int32_t>()[g] = static_cast<int32_t>(run.offsets[g]);
  run.offsets_i32 = Upload(off32, stream);
  std::vector<cpu::SwiGluWeights> oracle_weights(num_groups);
  for (int g = 0; g < num_groups; ++g) {
    const bool empty = run.offsets[g + 1] == run.offsets[g];
    if (empty && g % 2 == 1) {
      run.experts.emplace_back();
      continue;
    }
    run.experts.push_back(experts[g].device());
    oracle_weights[g] = {experts[g].w13_oracle.view().Slice(0, inter), experts[g].w2_oracle.view(),
                         experts[g].w13_oracle.view().Slice(inter, 2 * inter)};
  }
  run.want = Tensor::Empty(DType::kF32, {num_rows, hidden});
  std::vector<float> scratch(cpu::GroupedSwiGluScratchFloats(run.offsets, inter));
  const absl::Status st = cpu::GroupedSwiGlu(*ToF32(run.x16), run.offsets, oracle_weights,
                                             absl::MakeSpan(scratch), run.want);
  EPX_CHECK(st.ok());
  return run;
}

// Every GroupedSwiGlu form (the skinny kernel only up to kSkinnyMaxRows) on `run` against the
// oracle.
//
// Tolerance, as a fraction of the output's RMS (elements near zero would make any relative bound
// meaningless): the GPU rounds gate and up, the SiluMul output and (FP8 through cuBLAS) each
// dequantised weight to BF16, each an independent relative error of at most 2^-8 (half an ulp of
// an 8-bit significand). Summed over a row they give an error of about 0.3% of the RMS (0.45%
// with the FP8 weight roundings), 1.3% (2%) at the worst of ~200k elements. Bound: 3% (4%) of
// the RMS, plus 1/64 relative for the output's own BF16 rounding. (A host emulation of these
// roundings at both test shapes reaches about 0.75 of that bound.) A wrong row, group or column
// is off by ~100% of the RMS.
void ExpectEveryFormMatches(const Gpu& gpu, DType dtype, const GroupedRun& run) {
  const int64_t num_rows = run.x16.dim(0), hidden = run.x16.dim(1);
  // w13 of a loaded expert is [2I, H]; at least one expert of a run is loaded.
  int64_t inter = 0;
  for (const DeviceExpert& e : run.experts)
    if (e.loaded()) inter = e.w13.dim(0) / 2;
  const double rms_tolerance = dtype == DType::kBF16 ? 0.03 : 0.04;
  const float atol = static_cast<float>(rms_tolerance * Rms(run.want));
  const DeviceTensor scratch =
      DeviceBytes(GroupedSwiGluScratchBytes(num_rows, hidden, inter, dtype));
  for (GroupedGemmImpl impl : {GroupedGemmImpl::kSkinny, GroupedGemmImpl::kCublasLoop,
                               GroupedGemmImpl::kCublasGrouped, GroupedGemmImpl::kAuto}) {
    const bool skinny = impl == GroupedGemmImpl::kSkinny ||
                        (impl == GroupedGemmImpl::kAuto && num_rows <= kSkinnyMaxRows);
    if (impl == GroupedGemmImpl::kSkinny && num_rows > kSkinnyMaxRows) continue;
    SCOPED_TRACE(GroupedGemmImplName(impl));
    // The skinny forms get no host offsets: they must work from the device's alone.
    const absl::Span<const int64_t> host =
        skinny ? absl::Span<const int64_t>() : absl::Span<const int64_t>(run.offsets);
    const DeviceTensor out = DeviceEmpty(DType::kBF16, {num_rows, hidden}, gpu.s());
    const absl::Status st =
        GroupedSwiGlu(run.x, run.offsets_i32, host, run.experts, impl, scratch, out, gpu.blas);
    ASSERT_TRUE(st.ok()) << st;
    // out starts as 0xff bytes (BF16 NaN): a row left unwritten fails here.
    ExpectClose(Download(out, gpu.s()), run.want, atol, 1.f / 64, "GroupedSwiGlu out");
  }
}

class CudaGroupedSwiGluTest : public ::testing::TestWithParam<DType> {};

TEST_P(CudaGroupedSwiGluTest, EveryFormMatchesTheCpuOracle) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  const DType dtype = GetParam();
  uint32_t seed = 100;
  for (int num_groups : {1, 4, 8}) {
    std::vector<TestExpert> experts;
    for (int g = 0; g < num_groups; ++g) experts.push_back(MakeExpert(dtype, seed += 2, gpu.s()));
    for (int64_t num_rows : {1, 3, 7, 19, 64, 733}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " groups=", num_groups, " rows=", num_rows));
      ExpectEveryFormMatches(gpu, dtype, MakeRun(experts, num_rows, seed += 3, gpu.s()));
    }
  }
}

// The skinny kernel's K loop past its first pass (see kLongHidden) for each of its row-count
// instantiations (1, 9, 19, 64 rows: 1, 2, 4 and 8 token tiles), and the cuBLAS forms at the
// same shape.
TEST_P(CudaGroupedSwiGluTest, LongKMatchesTheCpuOracle) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  const DType dtype = GetParam();
  uint32_t seed = 300;
  std::vector<TestExpert> experts;
  // Three groups: UnevenOffsets leaves group 1 empty (and MakeRun leaves it without weights), so
  // rows go to groups 0 and 2.
  for (int g = 0; g < 3; ++g)
    experts.push_back(MakeExpert(dtype, seed += 2, gpu.s(), kLongHidden, kLongIntermediate));
  for (int64_t num_rows : {1, 9, 19, 64, 100}) {
    SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " long K, rows=", num_rows));
    ExpectEveryFormMatches(gpu, dtype, MakeRun(experts, num_rows, seed += 3, gpu.s()));
  }
}

// The skinny kernel computes each output element the same way whatever the other rows are (the
// MMA columns are independent and the split-K sum has a fixed order), so a row alone and the
// same row among 19 or 64 (other kernel instantiations) give the same bits.
TEST_P(CudaGroupedSwiGluTest, SkinnyRowDoesNotDependOnTheOtherRows) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  const DType dtype = GetParam();
  std::vector<TestExpert> experts;
  experts.push_back(MakeExpert(dtype, 7, gpu.s()));
  const std::vector<DeviceExpert> device = {experts[0].device()};
  for (int64_t num_rows : {19, 64}) {
    SCOPED_TRACE(absl::StrCat("rows=", num_rows));
    const Tensor x16 = ToBf16(RandomF32({num_rows, kHidden}, 11));
    Tensor off = Tensor::Empty(DType::kI32, {2});
    off.data<int32_t>()[0] = 0;
    off.data<int32_t>()[1] = static_cast<int32_t>(num_rows);
    const DeviceTensor x = Upload(x16, gpu.s()), offsets = Upload(off, gpu.s());
    const DeviceTensor scratch =
        DeviceBytes(GroupedSwiGluScratchBytes(num_rows, kHidden, kIntermediate, dtype));
    const DeviceTensor out = DeviceEmpty(DType::kBF16, {num_rows, kHidden}, gpu.s());
    ASSERT_TRUE(
        GroupedSwiGlu(x, offsets, {}, device, GroupedGemmImpl::kSkinny, scratch, out, gpu.blas)
            .ok());
    const Tensor all = Download(out, gpu.s());
    for (int64_t r : {int64_t{0}, num_rows / 2, num_rows - 1}) {
      const DeviceTensor x1 = Upload(x16.view().Slice(r, r + 1), gpu.s());
      off.data<int32_t>()[1] = 1;
      const DeviceTensor offsets1 = Upload(off, gpu.s());
      const DeviceTensor out1 = DeviceEmpty(DType::kBF16, {1, kHidden}, gpu.s());
      ASSERT_TRUE(
          GroupedSwiGlu(x1, offsets1, {}, device, GroupedGemmImpl::kSkinny, scratch, out1, gpu.blas)
              .ok());
      const Tensor one = Download(out1, gpu.s());
      EXPECT_EQ(0, std::memcmp(one.data<uint16_t>(), all.data<uint16_t>() + r * kHidden,
                               kHidden * sizeof(uint16_t)))
          << "row " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(WeightTypes, CudaGroupedSwiGluTest,
                         ::testing::Values(DType::kBF16, DType::kF8E4M3),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return info.param == DType::kBF16 ? std::string("Bf16")
                                                             : std::string("Fp8");
                         });

TEST(CudaGroupedSwiGluErrorsTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  std::vector<TestExpert> experts;
  for (int g = 0; g < 3; ++g) experts.push_back(MakeExpert(DType::kBF16, 30 + 2 * g, gpu.s()));
  const int64_t rows = 6;
  const DeviceTensor x = DeviceEmpty(DType::kBF16, {rows, kHidden}, gpu.s());
  const DeviceTensor out = DeviceEmpty(DType::kBF16, {rows, kHidden}, gpu.s());
  const std::vector<int64_t> host = {0, 2, 4, 6};
  Tensor off = Tensor::Empty(DType::kI32, {4});
  for (int g = 0; g < 4; ++g) off.data<int32_t>()[g] = static_cast<int32_t>(host[g]);
  const DeviceTensor offsets = Upload(off, gpu.s());
  const DeviceTensor scratch =
      DeviceBytes(GroupedSwiGluScratchBytes(rows, kHidden, kIntermediate, DType::kBF16));
  std::vector<DeviceExpert> device;
  for (const TestExpert& e : experts) device.push_back(e.device());
  const auto run = [&](const TensorView& x_, const TensorView& offsets_,
                       absl::Span<const int64_t> host_, absl::Span<const DeviceExpert> experts_,
                       GroupedGemmImpl impl, const TensorView& scratch_, const TensorView& out_) {
    return GroupedSwiGlu(x_, offsets_, host_, experts_, impl, scratch_, out_, gpu.blas);
  };
  constexpr auto kLoop = GroupedGemmImpl::kCublasLoop;
  constexpr auto kSkinny = GroupedGemmImpl::kSkinny;
  ASSERT_TRUE(run(x, offsets, host, device, kLoop, scratch, out).ok());

  // A group with rows whose expert is not loaded: FailedPrecondition naming the group.
  std::vector<DeviceExpert> missing = device;
  missing[2] = DeviceExpert{};
  const absl::Status st = run(x, offsets, host, missing, kLoop, scratch, out);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("group 2"), std::string::npos) << st;

  const auto invalid = absl::StatusCode::kInvalidArgument;
  // offsets must have experts + 1 entries, on the device and on the host.
  const DeviceTensor short_offsets = Upload(off.view().Slice(0, 3), gpu.s());
  EXPECT_EQ(run(x, short_offsets, {}, device, kSkinny, scratch, out).code(), invalid);
  const std::vector<int64_t> short_host = {0, 2, 6};
  EXPECT_EQ(run(x, offsets, short_host, device, kLoop, scratch, out).code(), invalid);
  const std::vector<int64_t> descending = {0, 4, 2, 6};
  EXPECT_EQ(run(x, offsets, descending, device, kLoop, scratch, out).code(), invalid);
  // The cuBLAS forms need host offsets; the skinny kernel takes at most kSkinnyMaxRows rows.
  EXPECT_EQ(run(x, offsets, {}, device, kLoop, scratch, out).code(), invalid);
  EXPECT_EQ(run(x, offsets, {}, device, GroupedGemmImpl::kCublasGrouped, scratch, out).code(),
            invalid);
  {
    const int64_t many = kSkinnyMaxRows + 1;
    const DeviceTensor xm = DeviceEmpty(DType::kBF16, {many, kHidden}, gpu.s());
    const DeviceTensor om = DeviceEmpty(DType::kBF16, {many, kHidden}, gpu.s());
    const DeviceTensor sm =
        DeviceBytes(GroupedSwiGluScratchBytes(many, kHidden, kIntermediate, DType::kBF16));
    EXPECT_EQ(run(xm, offsets, {}, device, kSkinny, sm, om).code(), invalid);
    // kAuto above kSkinnyMaxRows is a cuBLAS form: host offsets needed.
    EXPECT_EQ(run(xm, offsets, {}, device, GroupedGemmImpl::kAuto, sm, om).code(), invalid);
  }
  // Dtypes and shapes of x and out.
  const DeviceTensor x32 = DeviceEmpty(DType::kF32, {rows, kHidden}, gpu.s());
  EXPECT_EQ(run(x32, offsets, host, device, kLoop, scratch, out).code(), invalid);
  const DeviceTensor out_short = DeviceEmpty(DType::kBF16, {rows - 1, kHidden}, gpu.s());
  EXPECT_EQ(run(x, offsets, host, device, kLoop, scratch, out_short).code(), invalid);
  // hidden must be a multiple of 16 (the kernels' 16-byte loads).
  {
    const DeviceTensor x40 = DeviceEmpty(DType::kBF16, {rows, 40}, gpu.s());
    const DeviceTensor o40 = DeviceEmpty(DType::kBF16, {rows, 40}, gpu.s());
    EXPECT_EQ(run(x40, offsets, host, device, kLoop, scratch, o40).code(), invalid);
  }
  // Weights that do not match x's hidden or each other.
  {
    TestExpert other = MakeExpert(DType::kBF16, 99, gpu.s());
    std::vector<DeviceExpert> mixed = device;
    mixed[1].w2 = other.w13.view;  // [2I, H] where [H, I] is expected
    EXPECT_EQ(run(x, offsets, host, mixed, kLoop, scratch, out).code(), invalid);
  }
  // FP8 weights need their scales.
  {
    TestExpert fp8 = MakeExpert(DType::kF8E4M3, 50, gpu.s());
    std::vector<DeviceExpert> no_scale(3, fp8.device());
    no_scale[0].w13_scale = TensorView();
    const DeviceTensor fp8_scratch =
        DeviceBytes(GroupedSwiGluScratchBytes(rows, kHidden, kIntermediate, DType::kF8E4M3));
    EXPECT_EQ(run(x, offsets, host, no_scale, kLoop, fp8_scratch, out).code(), invalid);
  }
  // Scratch smaller than GroupedSwiGluScratchBytes.
  EXPECT_EQ(run(x, offsets, host, device, kLoop, scratch.view.Slice(0, 1024), out).code(), invalid);
  // No rows: nothing to do, whatever the impl.
  const DeviceTensor x0 = DeviceEmpty(DType::kBF16, {0, kHidden}, gpu.s());
  const std::vector<int64_t> zeros = {0, 0, 0, 0};
  EXPECT_TRUE(run(x0, offsets, zeros, device, kLoop, scratch, x0).ok());
}

// The arguments of one GroupedSwiGlu call, for tests that change them one at a time.
struct GroupedArgs {
  TensorView x, offsets;
  std::vector<int64_t> host_offsets;
  std::vector<DeviceExpert> experts;
  GroupedGemmImpl impl = GroupedGemmImpl::kCublasLoop;
  TensorView scratch, out;

  absl::Status Run(const Blas& blas) const {
    return GroupedSwiGlu(x, offsets, host_offsets, experts, impl, scratch, out, blas);
  }
};

TEST(CudaGroupedSwiGluErrorsTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const Blas no_handle{};
  // The smallest shape the kernels take: hidden and intermediate are multiples of 16.
  constexpr int64_t kH = 32, kI = 16, kRows = 6;
  constexpr auto kSkinny = GroupedGemmImpl::kSkinny;
  constexpr auto kAuto = GroupedGemmImpl::kAuto;
  const auto bf16_expert = [&] {
    return DeviceExpert{host(DType::kBF16, {2 * kI, kH}), host(DType::kBF16, {kH, kI})};
  };
  const auto fp8_expert = [&] {
    return DeviceExpert{host(DType::kF8E4M3, {2 * kI, kH}), host(DType::kF8E4M3, {kH, kI}),
                        host(DType::kF32, {2 * kI}), host(DType::kF32, {kH})};
  };
  const auto scratch_bytes = [&](int64_t rows, DType dtype) {
    return static_cast<int64_t>(GroupedSwiGluScratchBytes(rows, kH, kI, dtype));
  };
  const auto scratch = [&](int64_t rows, DType dtype) {
    return host(DType::kU8, {scratch_bytes(rows, dtype)});
  };
  // Three groups of two rows each.
  GroupedArgs valid;
  valid.x = host(DType::kBF16, {kRows, kH});
  valid.offsets = host(DType::kI32, {4});
  valid.host_offsets = {0, 2, 4, 6};
  valid.experts = {bf16_expert(), bf16_expert(), bf16_expert()};
  valid.scratch = scratch(kRows, DType::kBF16);
  valid.out = host(DType::kBF16, {kRows, kH});
  GroupedArgs valid_fp8 = valid;
  valid_fp8.experts = {fp8_expert(), fp8_expert(), fp8_expert()};
  valid_fp8.scratch = scratch(kRows, DType::kF8E4M3);
  // `base` with one change, run without a handle.
  const auto run_from = [&](const GroupedArgs& base, const auto& change) {
    GroupedArgs args = base;
    change(args);
    return args.Run(no_handle);
  };
  const auto run = [&](const auto& change) { return run_from(valid, change); };
  const auto run_fp8 = [&](const auto& change) { return run_from(valid_fp8, change); };
  // An expert without weights, copied in by the cases: assigning a temporary DeviceExpert{}
  // instead trips GCC 12's -Wmaybe-uninitialized (a false positive on the move of a TensorView's
  // inline shape storage).
  const DeviceExpert unloaded{};
  const auto no_handle_refused = IsFailedPrecondition("GroupedSwiGlu: blas has no cuBLAS handle");

  // Valid calls get as far as the handle: every form, and the skinny ones (kAuto up to
  // kSkinnyMaxRows) from the device offsets alone.
  EXPECT_THAT(valid.Run(no_handle), no_handle_refused);
  EXPECT_THAT(valid_fp8.Run(no_handle), no_handle_refused);
  for (GroupedGemmImpl impl : {kSkinny, GroupedGemmImpl::kCublasGrouped, kAuto}) {
    SCOPED_TRACE(GroupedGemmImplName(impl));
    EXPECT_THAT(run([&](GroupedArgs& a) { a.impl = impl; }), no_handle_refused);
    EXPECT_THAT(run_fp8([&](GroupedArgs& a) { a.impl = impl; }), no_handle_refused);
  }
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.impl = kSkinny;
                a.host_offsets.clear();
              }),
              no_handle_refused);
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.impl = kAuto;
                a.host_offsets.clear();
              }),
              no_handle_refused);
  // An empty group needs no loaded expert.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.host_offsets = {0, 2, 2, 6};
                a.experts[1] = unloaded;
              }),
              no_handle_refused);
  // No rows to run: nothing to do, so no handle is needed (nor data).
  EXPECT_TRUE(run([&](GroupedArgs& a) {
                a.x = host(DType::kBF16, {0, kH});
                a.out = host(DType::kBF16, {0, kH});
                a.host_offsets = {0, 0, 0, 0};
              }).ok());
  EXPECT_TRUE(run([&](GroupedArgs& a) {
                a.x = TensorView(nullptr, DType::kBF16, {0, kH});
                a.out = TensorView(nullptr, DType::kBF16, {0, kH});
                a.host_offsets.clear();
                a.impl = kSkinny;
              }).ok());
  EXPECT_TRUE(run([&](GroupedArgs& a) {
                a.host_offsets = {0, 0, 0, 0};
                a.experts.assign(3, unloaded);
              }).ok());

  // x: BF16 [num_rows, hidden] with data.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.x = host(DType::kF32, {kRows, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: x must be"));
  EXPECT_THAT(run([&](GroupedArgs& a) { a.x = host(DType::kBF16, {kRows * kH}); }),
              IsInvalidArgument("GroupedSwiGlu: x must be"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.x = TensorView(nullptr, DType::kBF16, {kRows, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: x [6, 32] has no data"));
  // out: BF16, x's shape, with data.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.out = host(DType::kF32, {kRows, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: out must be BF16 [6, 32]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.out = host(DType::kBF16, {kRows - 1, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: out must be BF16 [6, 32]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.out = host(DType::kBF16, {kRows, 2 * kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: out must be BF16 [6, 32]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.out = TensorView(nullptr, DType::kBF16, {kRows, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: out [6, 32] has no data"));
  // hidden: a positive multiple of 16 (the kernels' 16-byte loads).
  for (int64_t hidden : {40, 8, 0}) {
    SCOPED_TRACE(absl::StrCat("hidden=", hidden));
    EXPECT_THAT(run([&](GroupedArgs& a) {
                  a.x = host(DType::kBF16, {kRows, hidden});
                  a.out = host(DType::kBF16, {kRows, hidden});
                }),
                IsInvalidArgument("GroupedSwiGlu: hidden must be a positive multiple of 16"));
  }
  // Rows are int on the device (I32 offsets) and for cuBLAS.
  const int64_t too_many = int64_t{1} << 31;
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.x = host.Unbacked(DType::kBF16, {too_many, kH});
                a.out = host.Unbacked(DType::kBF16, {too_many, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: x has 2147483648 rows"));
  // x, out and scratch: 16-byte aligned.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.x = host.Offset(DType::kBF16, {kRows, kH}, 8);
              }),
              IsInvalidArgument("GroupedSwiGlu: x must be 16-byte aligned"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.out = host.Offset(DType::kBF16, {kRows, kH}, 8);
              }),
              IsInvalidArgument("GroupedSwiGlu: out must be 16-byte aligned"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.scratch = host.Offset(DType::kU8, {scratch_bytes(kRows, DType::kBF16)}, 8);
              }),
              IsInvalidArgument("GroupedSwiGlu: scratch must be 16-byte aligned"));
  // offsets: I32 [experts + 1] with data, whatever the form (the skinny kernel reads them).
  EXPECT_THAT(run([&](GroupedArgs& a) { a.offsets = host(DType::kF32, {4}); }),
              IsInvalidArgument("GroupedSwiGlu: offsets must be I32 [4]"));
  EXPECT_THAT(run([&](GroupedArgs& a) { a.offsets = host(DType::kI64, {4}); }),
              IsInvalidArgument("GroupedSwiGlu: offsets must be I32 [4]"));
  EXPECT_THAT(run([&](GroupedArgs& a) { a.offsets = host(DType::kI32, {3}); }),
              IsInvalidArgument("GroupedSwiGlu: offsets must be I32 [4]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.offsets = host(DType::kI32, {4, 1});
              }),
              IsInvalidArgument("GroupedSwiGlu: offsets must be I32 [4]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.offsets = TensorView(nullptr, DType::kI32, {4});
                a.impl = kSkinny;
              }),
              IsInvalidArgument("GroupedSwiGlu: offsets [4] has no data"));
  // host_offsets, when given: experts + 1 entries ascending from 0 to at most num_rows.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.host_offsets = {0, 2, 6};
              }),
              IsInvalidArgument("GroupedSwiGlu: host_offsets must have 4 entries"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.host_offsets = {0, 2, 4, 6, 6};
              }),
              IsInvalidArgument("GroupedSwiGlu: host_offsets must have 4 entries"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.host_offsets = {0, 4, 2, 6};
              }),
              IsInvalidArgument("GroupedSwiGlu: host_offsets must ascend within [0, 6]; entry 2"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.host_offsets = {-1, 2, 4, 6};
              }),
              IsInvalidArgument("GroupedSwiGlu: host_offsets must ascend within [0, 6]; entry 0"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.host_offsets = {0, 2, 4, 7};
              }),
              IsInvalidArgument("GroupedSwiGlu: host_offsets must ascend within [0, 6]; entry 3"));
  // Rows for an expert that is not loaded: FailedPrecondition naming the group (with host
  // offsets), or, without them, when no expert at all is loaded.
  EXPECT_THAT(run([&](GroupedArgs& a) { a.experts[2] = unloaded; }),
              IsFailedPrecondition("GroupedSwiGlu: expert group 2 has 2 rows but its expert is "
                                   "not loaded"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts.assign(3, unloaded);
                a.host_offsets.clear();
                a.impl = kSkinny;
              }),
              IsFailedPrecondition("GroupedSwiGlu: 6 rows but no expert is loaded"));

  // Each loaded expert's w13: BF16 or F8E4M3 [2 * intermediate, hidden], the same for all.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[0].w13 = host(DType::kF32, {2 * kI, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: w13 must be BF16 or F8E4M3"));
  EXPECT_THAT(run([&](GroupedArgs& a) { a.experts[0].w13 = host(DType::kBF16, {2 * kI * kH}); }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: w13 must be [2 * intermediate, hidden]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[0].w13 = host(DType::kBF16, {2 * kI + 1, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: w13 must be [2 * intermediate, hidden]"));
  // intermediate: a positive multiple of 16, like hidden.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                for (DeviceExpert& e : a.experts) {
                  e.w13 = host(DType::kBF16, {2 * 8, kH});
                  e.w2 = host(DType::kBF16, {kH, 8});
                }
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: intermediate must be a positive "
                                "multiple of 16"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[0].w13 = host(DType::kBF16, {2 * kI, 48});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: w13 must be BF16 [32, 32] like the "
                                "other experts and x"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[1].w13 = host(DType::kBF16, {4 * kI, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 1: w13 must be BF16 [32, 32]"));
  EXPECT_THAT(run([&](GroupedArgs& a) { a.experts[2] = fp8_expert(); }),
              IsInvalidArgument("GroupedSwiGlu: expert 2: w13 must be BF16 [32, 32]"));
  // w2: [hidden, intermediate] of w13's dtype, with data.
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[0].w2 = host(DType::kBF16, {kI, kH});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: w2 must be BF16 [32, 16]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[1].w2 = host(DType::kF8E4M3, {kH, kI});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 1: w2 must be BF16 [32, 16]"));
  EXPECT_THAT(run([&](GroupedArgs& a) { a.experts[1].w2 = TensorView(); }),
              IsInvalidArgument("GroupedSwiGlu: expert 1: w2 must be BF16 [32, 16]"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[2].w2 = TensorView(nullptr, DType::kBF16, {kH, kI});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 2: w2 [32, 16] has no data"));
  EXPECT_THAT(run_fp8([&](GroupedArgs& a) {
                a.experts[0].w2 = host(DType::kBF16, {kH, kI});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: w2 must be F8_E4M3 [32, 16]"));
  // Weights: 16-byte aligned (the skinny kernel's loads).
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[0].w13 = host.Offset(DType::kBF16, {2 * kI, kH}, 8);
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: weights must be 16-byte aligned"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.experts[2].w2 = host.Offset(DType::kBF16, {kH, kI}, 8);
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 2: weights must be 16-byte aligned"));
  // FP8 weights: F32 row scales of w13's and w2's rows.
  EXPECT_THAT(run_fp8([&](GroupedArgs& a) { a.experts[0].w13_scale = TensorView(); }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: FP8 w13 needs w13_scale F32 [32], got "
                                "none"));
  EXPECT_THAT(run_fp8([&](GroupedArgs& a) {
                a.experts[0].w13_scale = TensorView(nullptr, DType::kF32, {2 * kI});
              }),
              IsInvalidArgument("GroupedSwiGlu: expert 0: FP8 w13 needs w13_scale F32 [32], got "
                                "none"));
  EXPECT_THAT(
      run_fp8([&](GroupedArgs& a) { a.experts[1].w13_scale = host(DType::kF32, {2 * kI - 1}); }),
      IsInvalidArgument("GroupedSwiGlu: expert 1: FP8 w13 needs w13_scale F32 [32], got F32 [31]"));
  EXPECT_THAT(
      run_fp8([&](GroupedArgs& a) { a.experts[1].w13_scale = host(DType::kBF16, {2 * kI}); }),
      IsInvalidArgument("GroupedSwiGlu: expert 1: FP8 w13 needs w13_scale F32 [32], got BF16"));
  EXPECT_THAT(run_fp8([&](GroupedArgs& a) { a.experts[2].w2_scale = TensorView(); }),
              IsInvalidArgument("GroupedSwiGlu: expert 2: FP8 w2 needs w2_scale F32 [32], got "
                                "none"));
  EXPECT_THAT(run_fp8([&](GroupedArgs& a) { a.experts[2].w2_scale = host(DType::kF32, {kI}); }),
              IsInvalidArgument("GroupedSwiGlu: expert 2: FP8 w2 needs w2_scale F32 [32], got F32 "
                                "[16]"));

  // The forms' limits: the skinny kernel takes at most kSkinnyMaxRows rows and kSkinnyMaxGroups
  // (256) experts; the cuBLAS forms size their GEMMs from host_offsets.
  GroupedArgs many_rows = valid;
  many_rows.x = host(DType::kBF16, {kSkinnyMaxRows + 1, kH});
  many_rows.out = host(DType::kBF16, {kSkinnyMaxRows + 1, kH});
  many_rows.host_offsets = {0, 2, 4, kSkinnyMaxRows + 1};
  many_rows.scratch = scratch(kSkinnyMaxRows + 1, DType::kBF16);
  EXPECT_THAT(run_from(many_rows, [&](GroupedArgs& a) { a.impl = kAuto; }), no_handle_refused);
  EXPECT_THAT(run_from(many_rows, [&](GroupedArgs& a) { a.impl = kSkinny; }),
              IsInvalidArgument("GroupedSwiGlu: the skinny kernel takes at most 64 rows, got 65"));
  // Above kSkinnyMaxRows kAuto takes the cuBLAS loop.
  EXPECT_THAT(run_from(many_rows,
                       [&](GroupedArgs& a) {
                         a.impl = kAuto;
                         a.host_offsets.clear();
                       }),
              IsInvalidArgument("GroupedSwiGlu: cublas-loop needs host_offsets"));
  EXPECT_THAT(run([&](GroupedArgs& a) { a.host_offsets.clear(); }),
              IsInvalidArgument("GroupedSwiGlu: cublas-loop needs host_offsets"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.impl = GroupedGemmImpl::kCublasGrouped;
                a.host_offsets.clear();
              }),
              IsInvalidArgument("GroupedSwiGlu: cublas-grouped needs host_offsets"));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.impl = kSkinny;
                a.host_offsets.clear();
                a.experts.assign(257, unloaded);
                a.offsets = host(DType::kI32, {258});
              }),
              IsInvalidArgument("GroupedSwiGlu: the skinny kernel takes at most 256 experts, "
                                "got 257"));
  // Scratch: at least GroupedSwiGluScratchBytes, which FP8 weights raise (the dequantised
  // matrix); a scratch without data holds nothing.
  EXPECT_THAT(run([&](GroupedArgs& a) { a.scratch = host(DType::kU8, {1024}); }),
              IsInvalidArgument(absl::StrCat("GroupedSwiGlu: scratch has 1024 bytes, needs ",
                                             scratch_bytes(kRows, DType::kBF16))));
  EXPECT_THAT(run([&](GroupedArgs& a) {
                a.scratch = TensorView(nullptr, DType::kU8, {scratch_bytes(kRows, DType::kBF16)});
              }),
              IsInvalidArgument("GroupedSwiGlu: scratch has 0 bytes"));
  EXPECT_THAT(run_fp8([&](GroupedArgs& a) { a.scratch = scratch(kRows, DType::kBF16); }),
              IsInvalidArgument(absl::StrCat("GroupedSwiGlu: scratch has ",
                                             scratch_bytes(kRows, DType::kBF16), " bytes, needs ",
                                             scratch_bytes(kRows, DType::kF8E4M3))));
  EXPECT_THAT(
      run_from(many_rows, [&](GroupedArgs& a) { a.scratch = scratch(kRows, DType::kBF16); }),
      IsInvalidArgument("GroupedSwiGlu: scratch has"));
}

// ---------------------------------------------------------------------------------------------
// QuantizeFp8RowWise

// A weight with rows that exercise the encoder: a zero row (scale 1), rows whose amax is exactly
// 448 (scale 1, so w / scale = w) holding exact round-to-nearest-even ties (1.0625 lies halfway
// between 1 and 1.125; 3 * 2^-10 halfway between the subnormals 2^-9 and 2^-8) and values that
// underflow to zero, then random rows of varied magnitude.
Tensor QuantizeInput(int64_t n, int64_t k, uint32_t seed) {
  Tensor w = RandomF32({n, k}, seed);
  float* v = w.data<float>();
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> exponent(-20.f, 10.f);
  for (int64_t r = 0; r < n; ++r) {
    float* row = v + r * k;
    if (r == 0 && n > 1) {
      std::fill(row, row + k, 0.f);
    } else if (r == 1 || r == 2) {
      static constexpr float kTies[] = {1.0625f,     -1.1875f,  0x1.0p-10f, 3 * 0x1.0p-10f,
                                        -0x1.0p-11f, 0x1.8p-3f, -0.f,       5 * 0x1.0p-10f,
                                        240.f,       -232.f,    0x1.0p-30f, 17.f};
      for (int64_t c = 0; c < k; ++c) row[c] = kTies[c % 12] * (r == 2 ? -1.f : 1.f);
      row[k / 2] = r == 1 ? 448.f : -448.f;
    } else {
      const float magnitude = std::exp2(exponent(rng));
      for (int64_t c = 0; c < k; ++c) row[c] *= magnitude;
    }
  }
  return ToBf16(w);
}

TEST(CudaQuantizeFp8Test, MatchesTheHostQuantiserBitForBit) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {3, 37}, {17, 1000}, {5, 4096}, {64, 14336}};
  uint32_t seed = 40;
  for (const auto& [n, k] : shapes) {
    SCOPED_TRACE(absl::StrCat("n=", n, " k=", k));
    const Tensor w = QuantizeInput(n, k, ++seed);
    auto want = ::epx::QuantizeFp8RowWise(w);
    ASSERT_TRUE(want.ok()) << want.status();
    const DeviceTensor dw = Upload(w, gpu.s());
    const DeviceTensor q = DeviceEmpty(DType::kF8E4M3, {n, k}, gpu.s());
    const DeviceTensor scale = DeviceEmpty(DType::kF32, {n}, gpu.s());
    const absl::Status st = QuantizeFp8RowWise(dw, q, scale, gpu.s());
    ASSERT_TRUE(st.ok()) << st;
    const Tensor got_q = Download(q, gpu.s());
    const Tensor got_scale = Download(scale, gpu.s());
    EXPECT_EQ(0, std::memcmp(got_scale.data<float>(), want->scale.data<float>(), n * sizeof(float)))
        << "scales differ";
    int64_t mismatches = 0, first = -1;
    for (int64_t i = 0; i < n * k; ++i) {
      if (got_q.data<uint8_t>()[i] != want->q.data<uint8_t>()[i]) {
        if (first < 0) first = i;
        ++mismatches;
      }
    }
    EXPECT_EQ(mismatches, 0) << "first at row " << first / k << ", column " << first % k
                             << ": got 0x" << std::hex
                             << int{got_q.data<uint8_t>()[std::max<int64_t>(first, 0)]}
                             << ", want 0x"
                             << int{want->q.data<uint8_t>()[std::max<int64_t>(first, 0)]};
  }
}

TEST(CudaQuantizeFp8Test, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Gpu gpu = MakeGpu();
  const DeviceTensor w = DeviceEmpty(DType::kBF16, {4, 32}, gpu.s());
  const DeviceTensor w32 = DeviceEmpty(DType::kF32, {4, 32}, gpu.s());
  const DeviceTensor q = DeviceEmpty(DType::kF8E4M3, {4, 32}, gpu.s());
  const DeviceTensor q_u8 = DeviceEmpty(DType::kU8, {4, 32}, gpu.s());
  const DeviceTensor q_shape = DeviceEmpty(DType::kF8E4M3, {4, 31}, gpu.s());
  const DeviceTensor scale = DeviceEmpty(DType::kF32, {4}, gpu.s());
  const DeviceTensor scale_short = DeviceEmpty(DType::kF32, {3}, gpu.s());
  const auto invalid = absl::StatusCode::kInvalidArgument;
  EXPECT_TRUE(QuantizeFp8RowWise(w, q, scale, gpu.s()).ok());
  EXPECT_EQ(QuantizeFp8RowWise(w32, q, scale, gpu.s()).code(), invalid);
  EXPECT_EQ(QuantizeFp8RowWise(w, q_u8, scale, gpu.s()).code(), invalid);
  EXPECT_EQ(QuantizeFp8RowWise(w, q_shape, scale, gpu.s()).code(), invalid);
  EXPECT_EQ(QuantizeFp8RowWise(w, q, scale_short, gpu.s()).code(), invalid);
}

TEST(CudaQuantizeFp8Test, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView w = host(DType::kBF16, {4, 32});
  const TensorView q = host(DType::kF8E4M3, {4, 32});
  const TensorView scale = host(DType::kF32, {4});
  EXPECT_THAT(QuantizeFp8RowWise(host(DType::kF32, {4, 32}), q, scale, nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: w must be"));
  EXPECT_THAT(QuantizeFp8RowWise(host(DType::kBF16, {128}), q, scale, nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: w must be"));
  EXPECT_THAT(QuantizeFp8RowWise(w, host(DType::kU8, {4, 32}), scale, nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: q must be"));
  EXPECT_THAT(QuantizeFp8RowWise(w, host(DType::kF8E4M3, {4, 31}), scale, nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: q must be"));
  EXPECT_THAT(QuantizeFp8RowWise(w, q, host(DType::kF32, {3}), nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: scale must be"));
  EXPECT_THAT(QuantizeFp8RowWise(w, q, host(DType::kBF16, {4}), nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: scale must be"));
  // Views with elements must have data.
  EXPECT_THAT(QuantizeFp8RowWise(TensorView(nullptr, DType::kBF16, {4, 32}), q, scale, nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: w [4, 32] has no data"));
  EXPECT_THAT(QuantizeFp8RowWise(w, TensorView(nullptr, DType::kF8E4M3, {4, 32}), scale, nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: q [4, 32] has no data"));
  EXPECT_THAT(QuantizeFp8RowWise(w, q, TensorView(nullptr, DType::kF32, {4}), nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: scale [4] has no data"));
  // No rows: nothing to launch, and no data needed.
  EXPECT_TRUE(QuantizeFp8RowWise(TensorView(nullptr, DType::kBF16, {0, 32}),
                                 TensorView(nullptr, DType::kF8E4M3, {0, 32}),
                                 TensorView(nullptr, DType::kF32, {0}), nullptr)
                  .ok());
  // One block per row.
  const int64_t too_many = int64_t{1} << 31;
  EXPECT_THAT(QuantizeFp8RowWise(host.Unbacked(DType::kBF16, {too_many, 1}),
                                 host.Unbacked(DType::kF8E4M3, {too_many, 1}),
                                 host.Unbacked(DType::kF32, {too_many}), nullptr),
              IsInvalidArgument("QuantizeFp8RowWise: at most 2147483647 rows"));
}

}  // namespace
}  // namespace epx::cuda
