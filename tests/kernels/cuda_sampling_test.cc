// The sampling kernels (kernels/cuda/sampling.cu) against the CPU oracle: ArgMax (ties, NaN,
// signed zeros) and Sample with per-row temperature, top-k, top-p and fixed seeds, whose tokens
// must equal cpu::Sample's; and their argument checks, which the ...ArgumentsAreCheckedOnTheHost
// tests run without a device.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
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
using ::epx::testing::HostViews;
using ::epx::testing::IsInvalidArgument;
using ::epx::testing::NewStream;
using ::epx::testing::RandomF32;
using ::epx::testing::ToVector32;
using ::epx::testing::Upload;

constexpr int64_t kRowCounts[] = {1, 3, 7, 19, 733};
const auto kInvalid = absl::StatusCode::kInvalidArgument;
// Logits of 2^31 elements, one more than CUB's segmented sort counts: never backed.
constexpr int64_t kHugeRows = int64_t{1} << 16, kHugeVocab = int64_t{1} << 15;

// ---- ArgMax ----

enum class Logits { kRandom, kTies, kNanFirst, kNanScattered, kSignedZeros };

const char* LogitsName(Logits kind) {
  switch (kind) {
    case Logits::kRandom:
      return "random";
    case Logits::kTies:
      return "ties";
    case Logits::kNanFirst:
      return "nan-first";
    case Logits::kNanScattered:
      return "nan-scattered";
    case Logits::kSignedZeros:
      return "signed-zeros";
  }
  return "";
}

Tensor MakeLogits(int64_t rows, int64_t vocab, Logits kind, uint32_t seed) {
  Tensor t = RandomF32({rows, vocab}, seed, -8.f, 8.f);
  float* l = t.data<float>();
  std::mt19937 rng(seed + 1);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = l + r * vocab;
    switch (kind) {
      case Logits::kRandom:
        break;
      case Logits::kTies:  // a few levels: the maximum repeats, some of the row masked
        for (int64_t i = 0; i < vocab; ++i)
          row[i] = rng() % 4 == 0 ? -INFINITY : std::round(row[i] / 4.f);
        break;
      case Logits::kNanFirst:  // the oracle's scan never moves off a NaN at index 0
        row[0] = NAN;
        break;
      case Logits::kNanScattered:  // NaNs never win elsewhere
        for (int64_t i = 1; i < vocab; i += 3) row[i] = NAN;
        break;
      case Logits::kSignedZeros:  // -0 and +0 tie for the maximum
        for (int64_t i = 0; i < vocab; ++i) row[i] = -std::fabs(row[i]) - 1.f;
        row[(r * 7) % vocab] = -0.f;
        row[vocab - 1 - (r * 3) % vocab] = 0.f;
        break;
    }
  }
  return t;
}

TEST(CudaArgMaxTest, MatchesOracleExactly) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  for (Logits kind : {Logits::kRandom, Logits::kTies, Logits::kNanFirst, Logits::kNanScattered,
                      Logits::kSignedZeros}) {
    // 32000 takes the 16-byte path, 32003 the scalar one.
    for (int64_t vocab : {1, 5, 100, 32000, 32003}) {
      for (int64_t rows : kRowCounts) {
        SCOPED_TRACE(absl::StrCat(LogitsName(kind), " rows=", rows, " vocab=", vocab));
        Tensor logits = MakeLogits(rows, vocab, kind, static_cast<uint32_t>(rows * 7 + vocab));
        std::vector<int32_t> want(rows);
        for (int64_t r = 0; r < rows; ++r)
          want[r] = cpu::ArgMax(absl::MakeConstSpan(logits.data<float>() + r * vocab, vocab));
        DeviceTensor logits_dev = Upload(logits, s);
        DeviceTensor out = DeviceEmpty(DType::kI32, {rows}, s);
        const absl::Status status = ArgMax(logits_dev, out, s);
        ASSERT_TRUE(status.ok()) << status;
        EXPECT_EQ(ToVector32(Download(out, s)), want);
      }
    }
  }
}

TEST(CudaArgMaxTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  DeviceTensor logits = DeviceEmpty(DType::kF32, {3, 10}, s);
  DeviceTensor logits_bf16 = DeviceEmpty(DType::kBF16, {3, 10}, s);
  DeviceTensor logits_empty_vocab = DeviceEmpty(DType::kF32, {3, 0}, s);
  DeviceTensor out = DeviceEmpty(DType::kI32, {3}, s);
  DeviceTensor out_short = DeviceEmpty(DType::kI32, {2}, s);
  DeviceTensor out_i64 = DeviceEmpty(DType::kI64, {3}, s);
  EXPECT_EQ(ArgMax(logits_bf16, out, s).code(), kInvalid);
  EXPECT_EQ(ArgMax(logits_empty_vocab, out, s).code(), kInvalid);
  EXPECT_EQ(ArgMax(logits, out_short, s).code(), kInvalid);
  EXPECT_EQ(ArgMax(logits, out_i64, s).code(), kInvalid);
  EXPECT_TRUE(ArgMax(logits.view.Slice(0, 0), out.view.Slice(0, 0), s).ok());
}

TEST(CudaArgMaxTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView logits = host(DType::kF32, {3, 10});
  const TensorView out = host(DType::kI32, {3});
  EXPECT_THAT(ArgMax(host(DType::kBF16, {3, 10}), out, nullptr),
              IsInvalidArgument("ArgMax: logits must be"));
  EXPECT_THAT(ArgMax(host(DType::kF32, {30}), out, nullptr),
              IsInvalidArgument("ArgMax: logits must be"));
  EXPECT_THAT(ArgMax(TensorView(nullptr, DType::kF32, {3, 10}), out, nullptr),
              IsInvalidArgument("ArgMax: logits [3, 10] has no data"));
  EXPECT_THAT(ArgMax(host(DType::kF32, {3, 0}), out, nullptr),
              IsInvalidArgument("ArgMax: logits [3, 0] must have a vocabulary of at least 1"));
  EXPECT_THAT(ArgMax(host.Unbacked(DType::kF32, {kHugeRows, kHugeVocab}),
                     host.Unbacked(DType::kI32, {kHugeRows}), nullptr),
              IsInvalidArgument("ArgMax: logits [65536, 32768] must have"));
  EXPECT_THAT(ArgMax(logits, host(DType::kI32, {2}), nullptr),
              IsInvalidArgument("ArgMax: out must be"));
  EXPECT_THAT(ArgMax(logits, host(DType::kI64, {3}), nullptr),
              IsInvalidArgument("ArgMax: out must be"));
  EXPECT_THAT(ArgMax(logits, TensorView(nullptr, DType::kI32, {3}), nullptr),
              IsInvalidArgument("ArgMax: out [3] has no data"));
}

// ---- Sample ----

// Per-row parameters, cycling through lists of coprime lengths: 210 rows meet every
// combination, and the small batches shift their row indices to see many of them.
cpu::SamplingParams RowParams(int64_t row, int64_t vocab) {
  const float kTemperatures[] = {0.f, 0.7f, 1.f, 1.5f, 0.05f};
  const int32_t kTopK[] = {0, -1, 1, 5, 50, static_cast<int32_t>(vocab) + 3};
  const float kTopP[] = {1.f, 0.9f, 0.5f, 0.05f, 0.999f, 0.3f, 1.f};
  cpu::SamplingParams p;
  p.temperature = kTemperatures[row % 5];
  p.top_k = kTopK[row % 6];
  p.top_p = kTopP[row % 7];
  return p;
}

struct SampleInputs {
  Tensor temperature, top_k, top_p, uniform;
};

TEST(CudaSampleTest, MatchesOracleTokensForFixedSeeds) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  for (int64_t vocab : {1, 7, 100, 32000}) {
    for (int64_t rows : kRowCounts) {
      const int64_t shifts = rows < 35 ? 35 / rows + 1 : 1;
      for (int64_t shift = 0; shift < shifts; ++shift) {
        const Logits kind = shift % 2 == 0 ? Logits::kRandom : Logits::kTies;
        SCOPED_TRACE(
            absl::StrCat(LogitsName(kind), " rows=", rows, " vocab=", vocab, " shift=", shift));
        Tensor logits =
            MakeLogits(rows, vocab, kind, static_cast<uint32_t>(rows * 13 + vocab + shift * 101));
        SampleInputs in{Tensor::Empty(DType::kF32, {rows}), Tensor::Empty(DType::kI32, {rows}),
                        Tensor::Empty(DType::kF32, {rows}), Tensor::Empty(DType::kF64, {rows})};
        std::vector<int32_t> want(rows);
        for (int64_t r = 0; r < rows; ++r) {
          const cpu::SamplingParams p = RowParams(r + shift * rows, vocab);
          const uint64_t seed = 1000 * static_cast<uint64_t>(shift) + r;
          in.temperature.data<float>()[r] = p.temperature;
          in.top_k.data<int32_t>()[r] = p.top_k;
          in.top_p.data<float>()[r] = p.top_p;
          in.uniform.data<double>()[r] = cpu::SamplingRng(seed).Uniform();
          cpu::SamplingRng rng(seed);
          auto token =
              cpu::Sample(absl::MakeConstSpan(logits.data<float>() + r * vocab, vocab), p, rng);
          ASSERT_TRUE(token.ok()) << token.status();
          want[r] = *token;
        }
        DeviceTensor logits_dev = Upload(logits, s);
        DeviceTensor temperature = Upload(in.temperature, s);
        DeviceTensor top_k = Upload(in.top_k, s);
        DeviceTensor top_p = Upload(in.top_p, s);
        DeviceTensor uniform = Upload(in.uniform, s);
        const size_t bytes = SampleScratchBytes(rows, vocab);
        ASSERT_GT(bytes, 0u);
        DeviceTensor scratch = DeviceEmpty(DType::kU8, {static_cast<int64_t>(bytes)}, s);
        DeviceTensor out = DeviceEmpty(DType::kI32, {rows}, s);
        const absl::Status status =
            Sample(logits_dev, SampleArgs{temperature, top_k, top_p, uniform}, scratch, out, s);
        ASSERT_TRUE(status.ok()) << status;
        // Exact: the fp64 sums differ from the host's only in rounding, which changes the token
        // only when a draw or the top-p threshold falls within ~1e-15 of a boundary.
        EXPECT_EQ(ToVector32(Download(out, s)), want);
      }
    }
  }
}

TEST(CudaSampleTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  const int64_t rows = 3, vocab = 10;
  DeviceTensor logits = DeviceEmpty(DType::kF32, {rows, vocab}, s);
  DeviceTensor logits_bf16 = DeviceEmpty(DType::kBF16, {rows, vocab}, s);
  DeviceTensor f32 = DeviceEmpty(DType::kF32, {rows}, s);
  DeviceTensor f32_long = DeviceEmpty(DType::kF32, {rows + 1}, s);
  DeviceTensor i32 = DeviceEmpty(DType::kI32, {rows}, s);
  DeviceTensor f64 = DeviceEmpty(DType::kF64, {rows}, s);
  DeviceTensor out = DeviceEmpty(DType::kI32, {rows}, s);
  DeviceTensor out_i64 = DeviceEmpty(DType::kI64, {rows}, s);
  const size_t bytes = SampleScratchBytes(rows, vocab);
  ASSERT_GT(bytes, 0u);
  DeviceTensor scratch = DeviceEmpty(DType::kU8, {static_cast<int64_t>(bytes)}, s);
  DeviceTensor scratch_small = DeviceEmpty(DType::kU8, {static_cast<int64_t>(bytes) - 1}, s);
  const SampleArgs args{f32, i32, f32, f64};
  EXPECT_EQ(Sample(logits_bf16, args, scratch, out, s).code(), kInvalid);
  EXPECT_EQ(Sample(logits, SampleArgs{f32_long, i32, f32, f64}, scratch, out, s).code(), kInvalid);
  EXPECT_EQ(Sample(logits, SampleArgs{f32, f32, f32, f64}, scratch, out, s).code(), kInvalid);
  EXPECT_EQ(Sample(logits, SampleArgs{f32, i32, f64, f64}, scratch, out, s).code(), kInvalid);
  EXPECT_EQ(Sample(logits, SampleArgs{f32, i32, f32, f32}, scratch, out, s).code(), kInvalid);
  EXPECT_EQ(Sample(logits, args, scratch, out_i64, s).code(), kInvalid);
  EXPECT_EQ(Sample(logits, args, scratch_small, out, s).code(), kInvalid);
  const SampleArgs none{f32.view.Slice(0, 0), i32.view.Slice(0, 0), f32.view.Slice(0, 0),
                        f64.view.Slice(0, 0)};
  EXPECT_TRUE(Sample(logits.view.Slice(0, 0), none, TensorView(), out.view.Slice(0, 0), s).ok());
}

TEST(CudaSampleTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const int64_t rows = 3, vocab = 10;
  const TensorView logits = host(DType::kF32, {rows, vocab});
  const TensorView f32 = host(DType::kF32, {rows});
  const TensorView i32 = host(DType::kI32, {rows});
  const TensorView f64 = host(DType::kF64, {rows});
  const TensorView out = host(DType::kI32, {rows});
  const SampleArgs args{f32, i32, f32, f64};
  // Whatever the device's sort needs, the scratch holds the logits' keys and ids first: one byte
  // is short on any device, and refused before CUB's size query, which needs a device.
  const TensorView scratch = host(DType::kU8, {1});
  EXPECT_THAT(Sample(host(DType::kBF16, {rows, vocab}), args, scratch, out, nullptr),
              IsInvalidArgument("Sample: logits must be"));
  EXPECT_THAT(Sample(host(DType::kF32, {rows * vocab}), args, scratch, out, nullptr),
              IsInvalidArgument("Sample: logits must be"));
  EXPECT_THAT(Sample(host(DType::kF32, {rows, 0}), args, scratch, out, nullptr),
              IsInvalidArgument("Sample: logits [3, 0] must have a vocabulary of at least 1"));
  {
    const TensorView huge_f32 = host.Unbacked(DType::kF32, {kHugeRows});
    const SampleArgs huge{huge_f32, host.Unbacked(DType::kI32, {kHugeRows}), huge_f32,
                          host.Unbacked(DType::kF64, {kHugeRows})};
    EXPECT_THAT(Sample(host.Unbacked(DType::kF32, {kHugeRows, kHugeVocab}), huge, scratch,
                       host.Unbacked(DType::kI32, {kHugeRows}), nullptr),
                IsInvalidArgument("Sample: logits [65536, 32768] must have"));
  }
  EXPECT_THAT(Sample(logits, SampleArgs{host(DType::kF32, {rows + 1}), i32, f32, f64}, scratch, out,
                     nullptr),
              IsInvalidArgument("Sample: temperature must be"));
  EXPECT_THAT(Sample(logits, SampleArgs{i32, i32, f32, f64}, scratch, out, nullptr),
              IsInvalidArgument("Sample: temperature must be"));
  EXPECT_THAT(Sample(logits, SampleArgs{f32, f32, f32, f64}, scratch, out, nullptr),
              IsInvalidArgument("Sample: top_k must be"));
  EXPECT_THAT(Sample(logits, SampleArgs{f32, TensorView(), f32, f64}, scratch, out, nullptr),
              IsInvalidArgument("Sample: top_k must be"));
  EXPECT_THAT(Sample(logits, SampleArgs{f32, i32, f64, f64}, scratch, out, nullptr),
              IsInvalidArgument("Sample: top_p must be"));
  EXPECT_THAT(Sample(logits, SampleArgs{f32, i32, f32, f32}, scratch, out, nullptr),
              IsInvalidArgument("Sample: uniform must be"));
  EXPECT_THAT(Sample(logits, SampleArgs{f32, i32, f32, TensorView(nullptr, DType::kF64, {rows})},
                     scratch, out, nullptr),
              IsInvalidArgument("Sample: uniform [3] has no data"));
  EXPECT_THAT(Sample(logits, args, scratch, host(DType::kI64, {rows}), nullptr),
              IsInvalidArgument("Sample: out must be"));
  EXPECT_THAT(Sample(logits, args, scratch, host(DType::kI32, {rows - 1}), nullptr),
              IsInvalidArgument("Sample: out must be"));
  EXPECT_THAT(Sample(logits, args, TensorView(), out, nullptr),
              IsInvalidArgument("Sample: scratch F32 [] has 0 bytes"));
  EXPECT_THAT(Sample(logits, args, scratch, out, nullptr),
              IsInvalidArgument("Sample: scratch U8 [1] has 1 bytes"));
}

}  // namespace
}  // namespace epx::cuda
