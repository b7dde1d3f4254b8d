// The elementwise CUDA kernels (kernels/cuda/elementwise.cu) against the CPU oracle over the token
// counts the engine sees and over row lengths that take both the 16-byte and the scalar paths;
// and their argument checks, which the ...ArgumentsAreCheckedOnTheHost tests run without a device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/dummy_weights.h"
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
using ::epx::testing::IsInvalidArgument;
using ::epx::testing::NewStream;
using ::epx::testing::RandomF32;
using ::epx::testing::RoundedToBf16;
using ::epx::testing::ToBf16;
using ::epx::testing::Upload;

constexpr int64_t kTokenCounts[] = {1, 3, 7, 19, 733};
// Row lengths: 16-byte paths (multiples of 8) and the scalar path (100).
constexpr int64_t kHiddens[] = {64, 128, 4096, 100};
// A BF16 output may round to the other neighbour of the oracle's fp32 value when the two fp32
// values straddle a rounding midpoint: one BF16 ulp, at most 2^-7 of the value.
constexpr float kBf16Ulp = 1.f / 128;
// More rows than a grid of one block per row can hold; views this long are never backed.
constexpr int64_t kPastTheGrid = int64_t{1} << 31;

// Expects the same dtype, shape and bytes; reports the first differing element.
void ExpectBitwiseEqual(const TensorView& got, const TensorView& want, const std::string& what) {
  ASSERT_EQ(got.dtype(), want.dtype()) << what;
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const size_t size = DTypeSize(got.dtype());
  const auto* g = static_cast<const uint8_t*>(got.raw());
  const auto* w = static_cast<const uint8_t*>(want.raw());
  for (int64_t i = 0; i < got.numel(); ++i) {
    if (std::memcmp(g + i * size, w + i * size, size) != 0) {
      ADD_FAILURE() << what << ": first difference at element " << i;
      return;
    }
  }
}

Tensor Copy(const TensorView& t) {
  Tensor out = Tensor::Empty(t.dtype(), t.shape());
  std::memcpy(out.data<void>(), t.raw(), t.nbytes());
  return out;
}

std::vector<int32_t> RandomIds(int64_t n, int32_t bound, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, bound - 1);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = dist(rng);
  return ids;
}

TensorView I32View(std::vector<int32_t>& v) {
  return TensorView(v.data(), DType::kI32, {static_cast<int64_t>(v.size())});
}

// ---- Convert ----

TEST(CudaConvertTest, MatchesHostConversionBitwise) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  // Signed zeros, overflow to infinity, BF16 denormals, infinities, and ties (1 + 2^-8 rounds
  // down to even, 1 + 3 * 2^-8 up).
  const float kSpecial[] = {0.f,      -0.f,      1.00390625f, -1.01171875f, 3.0e38f, -3.4e38f,
                            1.0e-40f, -2.5e-39f, INFINITY,    -INFINITY,    65504.f, 1.5f};
  const std::pair<DType, DType> kPairs[] = {
      {DType::kF32, DType::kBF16}, {DType::kBF16, DType::kF32}, {DType::kF16, DType::kF32},
      {DType::kF16, DType::kBF16}, {DType::kF32, DType::kF32},  {DType::kBF16, DType::kBF16}};
  for (int64_t n : {1, 7, 8, 19, 733 * 64 + 5}) {
    Tensor f32 = RandomF32({n}, static_cast<uint32_t>(n), -100.f, 100.f);
    for (int64_t i = 0; i < n && i < 12; ++i) f32.data<float>()[i] = kSpecial[i];
    for (const auto& [from, to] : kPairs) {
      // Keep F16 sources finite and in range (no NaN, whose bits are not compared here).
      Tensor src_f32 = Copy(f32);
      if (from == DType::kF16)
        for (int64_t i = 0; i < n; ++i) {
          float& v = src_f32.data<float>()[i];
          v = std::isfinite(v) ? std::fmod(v, 60000.f) : std::copysign(65504.f, v);
        }
      Tensor src = *FromF32(src_f32, from);
      Tensor want = *FromF32(*ToF32(src), to);
      for (bool misaligned : {false, true}) {
        SCOPED_TRACE(absl::StrCat(DTypeName(from), " -> ", DTypeName(to), " n=", n,
                                  misaligned ? " misaligned" : ""));
        // A view one element into the buffer takes the scalar path.
        const int64_t pad = misaligned ? 1 : 0;
        DeviceTensor src_dev = DeviceEmpty(from, {n + pad}, stream.handle());
        DeviceTensor dst_dev = DeviceEmpty(to, {n + pad}, stream.handle());
        const TensorView src_view(
            static_cast<uint8_t*>(src_dev.buffer.data()) + pad * DTypeSize(from), from, {n});
        const TensorView dst_view(
            static_cast<uint8_t*>(dst_dev.buffer.data()) + pad * DTypeSize(to), to, {n});
        ASSERT_TRUE(
            CopyToDevice(src_view.raw(), src.data<void>(), src.nbytes(), stream.handle()).ok());
        const absl::Status status = Convert(src_view, dst_view, stream.handle());
        ASSERT_TRUE(status.ok()) << status;
        ExpectBitwiseEqual(Download(dst_view, stream.handle()), want, "Convert");
      }
    }
  }
}

TEST(CudaConvertTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  DeviceTensor f32 = DeviceEmpty(DType::kF32, {4, 8}, stream.handle());
  DeviceTensor bf16 = DeviceEmpty(DType::kBF16, {4, 8}, stream.handle());
  DeviceTensor small = DeviceEmpty(DType::kBF16, {4, 7}, stream.handle());
  DeviceTensor i32 = DeviceEmpty(DType::kI32, {4, 8}, stream.handle());
  DeviceTensor f16 = DeviceEmpty(DType::kF16, {4, 8}, stream.handle());
  EXPECT_EQ(Convert(f32, small, stream.handle()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Convert(i32, bf16, stream.handle()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Convert(f32, f16, stream.handle()).code(), absl::StatusCode::kInvalidArgument);
  // Same element count in another shape is fine.
  EXPECT_TRUE(Convert(f32, bf16.view.Reshape({32}), stream.handle()).ok());
  EXPECT_TRUE(Convert(f32.view.Slice(0, 0), bf16.view.Slice(0, 0), stream.handle()).ok());
}

TEST(CudaConvertTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView f32 = host(DType::kF32, {4, 8});
  const TensorView bf16 = host(DType::kBF16, {4, 8});
  EXPECT_THAT(Convert(f32, host(DType::kBF16, {4, 7}), nullptr),
              IsInvalidArgument("Convert: src [4, 8] and dst [4, 7] differ in size"));
  EXPECT_THAT(Convert(host(DType::kI32, {4, 8}), bf16, nullptr),
              IsInvalidArgument("Convert: src must be"));
  EXPECT_THAT(Convert(host(DType::kF64, {4, 8}), bf16, nullptr),
              IsInvalidArgument("Convert: src must be"));
  EXPECT_THAT(Convert(f32, host(DType::kF16, {4, 8}), nullptr),
              IsInvalidArgument("Convert: dst must be"));
  EXPECT_THAT(Convert(TensorView(nullptr, DType::kF32, {4, 8}), bf16, nullptr),
              IsInvalidArgument("Convert: src has no data"));
  EXPECT_THAT(Convert(f32, TensorView(nullptr, DType::kBF16, {4, 8}), nullptr),
              IsInvalidArgument("Convert: dst has no data"));
}

// ---- FillDummy ----

TEST(CudaFillDummyTest, MatchesHostValuesBitwise) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  struct Fill {
    float scale, offset;
  };
  const Fill kFills[] = {{DummyFill::Matrix(4096).scale, DummyFill::Matrix(4096).offset},
                         {DummyFill::Ones().scale, DummyFill::Ones().offset},
                         {0.37f, -0.125f}};
  for (int64_t n : {1, 7, 19, 733 * 64 + 3}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (const Fill& fill : kFills) {
        const uint64_t seed = DummyTensorSeed(42, absl::StrCat("layer.", n));
        SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " n=", n, " scale=", fill.scale,
                                  " offset=", fill.offset));
        Tensor want_f32 = Tensor::Empty(DType::kF32, {n});
        for (int64_t i = 0; i < n; ++i) {
          // Unfused, as the kernel evaluates it (volatile keeps the host compiler from fusing).
          volatile float product = fill.scale * DummyUniform(seed, static_cast<uint64_t>(i));
          want_f32.data<float>()[i] = fill.offset + product;
        }
        Tensor want = *FromF32(want_f32, dtype);
        DeviceTensor dst = DeviceEmpty(dtype, {n}, stream.handle());
        const absl::Status status = FillDummy(dst, seed, fill.scale, fill.offset, stream.handle());
        ASSERT_TRUE(status.ok()) << status;
        ExpectBitwiseEqual(Download(dst, stream.handle()), want, "FillDummy");
      }
    }
  }
}

TEST(CudaFillDummyTest, RejectsIntegerTensors) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  DeviceTensor dst = DeviceEmpty(DType::kI32, {16}, stream.handle());
  EXPECT_EQ(FillDummy(dst, 1, 1.f, 0.f, stream.handle()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CudaFillDummyTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  EXPECT_THAT(FillDummy(host(DType::kI32, {16}), 1, 1.f, 0.f, nullptr),
              IsInvalidArgument("FillDummy: dst must be BF16 or F32"));
  EXPECT_THAT(FillDummy(host(DType::kF16, {16}), 1, 1.f, 0.f, nullptr),
              IsInvalidArgument("FillDummy: dst must be BF16 or F32"));
  EXPECT_THAT(FillDummy(TensorView(nullptr, DType::kF32, {16}), 1, 1.f, 0.f, nullptr),
              IsInvalidArgument("FillDummy: dst has no data"));
}

// ---- Embedding ----

TEST(CudaEmbeddingTest, MatchesOracleExactly) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const int64_t vocab = 1000;
  for (int64_t hidden : kHiddens) {
    Tensor table = ToBf16(RandomF32({vocab, hidden}, static_cast<uint32_t>(hidden)));
    DeviceTensor table_dev = Upload(table, stream.handle());
    for (int64_t tokens : kTokenCounts) {
      SCOPED_TRACE(absl::StrCat("tokens=", tokens, " hidden=", hidden));
      std::vector<int32_t> ids = RandomIds(tokens, vocab, static_cast<uint32_t>(tokens));
      ids[0] = vocab - 1;
      Tensor want = Tensor::Empty(DType::kF32, {tokens, hidden});
      ASSERT_TRUE(cpu::Embedding(ids, table, want).ok());
      DeviceTensor ids_dev = Upload(I32View(ids), stream.handle());
      DeviceTensor out = DeviceEmpty(DType::kF32, {tokens, hidden}, stream.handle());
      const absl::Status status = Embedding(ids_dev, table_dev, out, stream.handle());
      ASSERT_TRUE(status.ok()) << status;
      // Widening BF16 is exact.
      ExpectBitwiseEqual(Download(out, stream.handle()), want, "Embedding");
    }
  }
}

TEST(CudaEmbeddingTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  DeviceTensor ids = DeviceEmpty(DType::kI32, {3}, stream.handle());
  DeviceTensor ids_f32 = DeviceEmpty(DType::kF32, {3}, stream.handle());
  DeviceTensor table = DeviceEmpty(DType::kBF16, {10, 16}, stream.handle());
  DeviceTensor table_f32 = DeviceEmpty(DType::kF32, {10, 16}, stream.handle());
  DeviceTensor out = DeviceEmpty(DType::kF32, {3, 16}, stream.handle());
  DeviceTensor out_narrow = DeviceEmpty(DType::kF32, {3, 15}, stream.handle());
  DeviceTensor out_bf16 = DeviceEmpty(DType::kBF16, {3, 16}, stream.handle());
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(Embedding(ids_f32, table, out, stream.handle()).code(), kInvalid);
  EXPECT_EQ(Embedding(ids, table_f32, out, stream.handle()).code(), kInvalid);
  EXPECT_EQ(Embedding(ids, table, out_narrow, stream.handle()).code(), kInvalid);
  EXPECT_EQ(Embedding(ids, table, out_bf16, stream.handle()).code(), kInvalid);
  EXPECT_EQ(Embedding(ids.view.Slice(0, 2), table, out, stream.handle()).code(), kInvalid);
  EXPECT_TRUE(Embedding(ids.view.Slice(0, 0), table, out.view.Slice(0, 0), stream.handle()).ok());
}

TEST(CudaEmbeddingTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView ids = host(DType::kI32, {3});
  const TensorView table = host(DType::kBF16, {10, 16});
  const TensorView out = host(DType::kF32, {3, 16});
  EXPECT_THAT(Embedding(host(DType::kF32, {3}), table, out, nullptr),
              IsInvalidArgument("Embedding: ids must be"));
  EXPECT_THAT(Embedding(host(DType::kI32, {3, 1}), table, out, nullptr),
              IsInvalidArgument("Embedding: ids must be"));
  EXPECT_THAT(Embedding(TensorView(nullptr, DType::kI32, {3}), table, out, nullptr),
              IsInvalidArgument("Embedding: ids [3] has no data"));
  EXPECT_THAT(Embedding(ids, host(DType::kF32, {10, 16}), out, nullptr),
              IsInvalidArgument("Embedding: table must be"));
  EXPECT_THAT(Embedding(ids, host(DType::kBF16, {160}), out, nullptr),
              IsInvalidArgument("Embedding: table must be"));
  EXPECT_THAT(Embedding(ids, TensorView(nullptr, DType::kBF16, {10, 16}), out, nullptr),
              IsInvalidArgument("Embedding: table [10, 16] has no data"));
  EXPECT_THAT(Embedding(ids, table, host(DType::kBF16, {3, 16}), nullptr),
              IsInvalidArgument("Embedding: out must be"));
  EXPECT_THAT(Embedding(ids, table, host(DType::kF32, {3, 15}), nullptr),
              IsInvalidArgument("Embedding: out must be"));
  EXPECT_THAT(Embedding(ids, table, host(DType::kF32, {4, 16}), nullptr),
              IsInvalidArgument("Embedding: out must be"));
  EXPECT_THAT(Embedding(host.Unbacked(DType::kI32, {kPastTheGrid}), table,
                        host.Unbacked(DType::kF32, {kPastTheGrid, 16}), nullptr),
              IsInvalidArgument("Embedding: 2147483648 rows exceed the grid"));
}

// ---- RmsNorm and AddRmsNorm ----

// Tolerances: the kernel's sum of squares is fp64 like the oracle's, in another order, so the
// fp32 scale may differ by an ulp: 1e-6 relative for F32 outputs; one BF16 ulp for BF16 outputs.
void ExpectNormClose(const TensorView& got, const Tensor& want_f32, DType out_dtype,
                     const std::string& what) {
  if (out_dtype == DType::kF32) {
    ExpectClose(got, want_f32, 0.f, 1e-6f, what);
  } else {
    ExpectClose(got, RoundedToBf16(want_f32), 0.f, kBf16Ulp, what);
  }
}

TEST(CudaRmsNormTest, MatchesOracle) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const float eps = 1e-5f;
  for (int64_t hidden : kHiddens) {
    Tensor w = RandomF32({hidden}, 7, 0.5f, 1.5f);
    DeviceTensor w_dev = Upload(w, stream.handle());
    for (int64_t tokens : kTokenCounts) {
      Tensor x = RandomF32({tokens, hidden}, static_cast<uint32_t>(tokens * hidden), -3.f, 3.f);
      Tensor want = Tensor::Empty(DType::kF32, {tokens, hidden});
      ASSERT_TRUE(cpu::RmsNorm(x, w, eps, want).ok());
      DeviceTensor x_dev = Upload(x, stream.handle());
      for (DType out_dtype : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(
            absl::StrCat("tokens=", tokens, " hidden=", hidden, " out=", DTypeName(out_dtype)));
        DeviceTensor out = DeviceEmpty(out_dtype, {tokens, hidden}, stream.handle());
        const absl::Status status = RmsNorm(x_dev, w_dev, eps, out, stream.handle());
        ASSERT_TRUE(status.ok()) << status;
        ExpectNormClose(Download(out, stream.handle()), want, out_dtype, "RmsNorm");
        // x is read only.
        ExpectBitwiseEqual(Download(x_dev, stream.handle()), x, "RmsNorm x");
      }
    }
  }
}

TEST(CudaAddRmsNormTest, MatchesOracleAddThenNorm) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const float eps = 1e-6f;
  for (int64_t hidden : kHiddens) {
    Tensor w = RandomF32({hidden}, 8, 0.5f, 1.5f);
    DeviceTensor w_dev = Upload(w, stream.handle());
    for (int64_t tokens : kTokenCounts) {
      for (DType out_dtype : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(
            absl::StrCat("tokens=", tokens, " hidden=", hidden, " out=", DTypeName(out_dtype)));
        Tensor x = RandomF32({tokens, hidden}, static_cast<uint32_t>(tokens + hidden), -3.f, 3.f);
        Tensor delta = RandomF32({tokens, hidden}, static_cast<uint32_t>(tokens * 3 + 1));
        Tensor want_x = Tensor::Empty(DType::kF32, {tokens, hidden});
        Tensor want = Tensor::Empty(DType::kF32, {tokens, hidden});
        ASSERT_TRUE(cpu::Add(x, delta, want_x).ok());
        ASSERT_TRUE(cpu::RmsNorm(want_x, w, eps, want).ok());
        DeviceTensor x_dev = Upload(x, stream.handle());
        DeviceTensor delta_dev = Upload(delta, stream.handle());
        DeviceTensor out = DeviceEmpty(out_dtype, {tokens, hidden}, stream.handle());
        const absl::Status status = AddRmsNorm(x_dev, delta_dev, w_dev, eps, out, stream.handle());
        ASSERT_TRUE(status.ok()) << status;
        // The residual add is one fp32 addition per element, as on the host: exact.
        ExpectBitwiseEqual(Download(x_dev, stream.handle()), want_x, "AddRmsNorm x");
        ExpectNormClose(Download(out, stream.handle()), want, out_dtype, "AddRmsNorm out");
      }
    }
  }
}

TEST(CudaRmsNormTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  DeviceTensor x = DeviceEmpty(DType::kF32, {3, 16}, stream.handle());
  DeviceTensor x_bf16 = DeviceEmpty(DType::kBF16, {3, 16}, stream.handle());
  DeviceTensor delta_short = DeviceEmpty(DType::kF32, {2, 16}, stream.handle());
  DeviceTensor w = DeviceEmpty(DType::kF32, {16}, stream.handle());
  DeviceTensor w_long = DeviceEmpty(DType::kF32, {17}, stream.handle());
  DeviceTensor out = DeviceEmpty(DType::kBF16, {3, 16}, stream.handle());
  DeviceTensor out_i32 = DeviceEmpty(DType::kI32, {3, 16}, stream.handle());
  DeviceTensor out_flat = DeviceEmpty(DType::kF32, {48}, stream.handle());
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  const StreamHandle s = stream.handle();
  EXPECT_EQ(RmsNorm(x_bf16, w, 1e-5f, out, s).code(), kInvalid);
  EXPECT_EQ(RmsNorm(x, w_long, 1e-5f, out, s).code(), kInvalid);
  EXPECT_EQ(RmsNorm(x, w, 1e-5f, out_i32, s).code(), kInvalid);
  EXPECT_EQ(RmsNorm(x, w, 1e-5f, out_flat, s).code(), kInvalid);
  EXPECT_EQ(AddRmsNorm(x, delta_short, w, 1e-5f, out, s).code(), kInvalid);
  EXPECT_EQ(AddRmsNorm(x, TensorView(), w, 1e-5f, out, s).code(), kInvalid);
  EXPECT_TRUE(RmsNorm(x.view.Slice(0, 0), w, 1e-5f, out.view.Slice(0, 0), s).ok());
  EXPECT_TRUE(
      AddRmsNorm(x.view.Slice(0, 0), x.view.Slice(0, 0), w, 1e-5f, out.view.Slice(0, 0), s).ok());
}

TEST(CudaRmsNormTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView x = host(DType::kF32, {3, 16});
  const TensorView delta = host(DType::kF32, {3, 16});
  const TensorView w = host(DType::kF32, {16});
  const TensorView out = host(DType::kBF16, {3, 16});
  const float eps = 1e-5f;
  EXPECT_THAT(RmsNorm(host(DType::kBF16, {3, 16}), w, eps, out, nullptr),
              IsInvalidArgument("RmsNorm: x must be"));
  EXPECT_THAT(RmsNorm(host(DType::kF32, {48}), w, eps, out, nullptr),
              IsInvalidArgument("RmsNorm: x must be"));
  EXPECT_THAT(RmsNorm(TensorView(nullptr, DType::kF32, {3, 16}), w, eps, out, nullptr),
              IsInvalidArgument("RmsNorm: x [3, 16] has no data"));
  EXPECT_THAT(RmsNorm(x, host(DType::kF32, {17}), eps, out, nullptr),
              IsInvalidArgument("RmsNorm: w must be"));
  EXPECT_THAT(RmsNorm(x, host(DType::kBF16, {16}), eps, out, nullptr),
              IsInvalidArgument("RmsNorm: w must be"));
  EXPECT_THAT(RmsNorm(x, w, eps, host(DType::kI32, {3, 16}), nullptr),
              IsInvalidArgument("RmsNorm: out must be"));
  EXPECT_THAT(RmsNorm(x, w, eps, host(DType::kF32, {48}), nullptr),
              IsInvalidArgument("RmsNorm: out must be"));
  EXPECT_THAT(RmsNorm(x, w, eps, host(DType::kF32, {2, 16}), nullptr),
              IsInvalidArgument("RmsNorm: out must be"));
  EXPECT_THAT(RmsNorm(host.Unbacked(DType::kF32, {kPastTheGrid, 16}), w, eps,
                      host.Unbacked(DType::kF32, {kPastTheGrid, 16}), nullptr),
              IsInvalidArgument("RmsNorm: 2147483648 rows exceed the grid"));
  // AddRmsNorm checks delta as well, and reports under its own name.
  EXPECT_THAT(AddRmsNorm(x, host(DType::kF32, {2, 16}), w, eps, out, nullptr),
              IsInvalidArgument("AddRmsNorm: delta must be"));
  EXPECT_THAT(AddRmsNorm(x, host(DType::kBF16, {3, 16}), w, eps, out, nullptr),
              IsInvalidArgument("AddRmsNorm: delta must be"));
  EXPECT_THAT(AddRmsNorm(x, TensorView(), w, eps, out, nullptr),
              IsInvalidArgument("AddRmsNorm: delta must be"));
  EXPECT_THAT(AddRmsNorm(host(DType::kF32, {3, 8}), delta, w, eps, out, nullptr),
              IsInvalidArgument("AddRmsNorm: delta must be"));
  EXPECT_THAT(AddRmsNorm(x, delta, host(DType::kF32, {8}), eps, out, nullptr),
              IsInvalidArgument("AddRmsNorm: w must be"));
  EXPECT_THAT(AddRmsNorm(x, delta, w, eps, host(DType::kBF16, {3, 8}), nullptr),
              IsInvalidArgument("AddRmsNorm: out must be"));
}

// ---- RopeQkvToCache ----

struct RopeCase {
  int64_t num_heads, num_kv_heads, head_dim;
};

TEST(CudaRopeQkvToCacheTest, MatchesOracleRopeAndCacheRows) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  // (32, 8, 128) is Mixtral's; head_dim 10 takes the scalar path.
  const RopeCase kCases[] = {{4, 1, 64}, {8, 2, 128}, {32, 8, 128}, {4, 4, 10}};
  for (const RopeCase& c : kCases) {
    const int64_t h = c.num_heads, kv = c.num_kv_heads, d = c.head_dim;
    for (int64_t tokens : kTokenCounts) {
      SCOPED_TRACE(
          absl::StrCat("tokens=", tokens, " heads=", h, " kv_heads=", kv, " head_dim=", d));
      const int64_t cache_rows = tokens + 5;
      std::mt19937 rng(static_cast<uint32_t>(tokens * 31 + d));
      std::vector<int64_t> positions(tokens);
      for (int64_t& p : positions) p = std::uniform_int_distribution<int64_t>(0, 32767)(rng);
      // Distinct cache rows in scrambled order; 5 rows stay untouched.
      std::vector<int32_t> rows(cache_rows);
      std::iota(rows.begin(), rows.end(), 0);
      std::shuffle(rows.begin(), rows.end(), rng);
      rows.resize(tokens);
      Tensor table = Tensor::Empty(DType::kF32, {tokens, d});
      ASSERT_TRUE(cpu::RopeTable(positions, d, 1e6, table).ok());
      Tensor qkv = RandomF32({tokens, (h + 2 * kv) * d}, static_cast<uint32_t>(tokens + h));

      // The oracle: RoPE on the q and k columns, then rounding to BF16.
      Tensor q = Tensor::Empty(DType::kF32, {tokens, h * d});
      Tensor k = Tensor::Empty(DType::kF32, {tokens, kv * d});
      Tensor v = Tensor::Empty(DType::kF32, {tokens, kv * d});
      for (int64_t t = 0; t < tokens; ++t) {
        const float* row = qkv.data<float>() + t * (h + 2 * kv) * d;
        std::memcpy(q.data<float>() + t * h * d, row, h * d * sizeof(float));
        std::memcpy(k.data<float>() + t * kv * d, row + h * d, kv * d * sizeof(float));
        std::memcpy(v.data<float>() + t * kv * d, row + (h + kv) * d, kv * d * sizeof(float));
      }
      ASSERT_TRUE(cpu::ApplyRope(q, d, table).ok());
      ASSERT_TRUE(cpu::ApplyRope(k, d, table).ok());

      DeviceTensor qkv_dev = Upload(qkv, s);
      DeviceTensor table_dev = Upload(table, s);
      DeviceTensor rows_dev = Upload(I32View(rows), s);
      DeviceTensor q_out = DeviceEmpty(DType::kBF16, {tokens, h * d}, s);
      DeviceTensor k_cache = DeviceEmpty(DType::kBF16, {cache_rows, kv * d}, s);
      DeviceTensor v_cache = DeviceEmpty(DType::kBF16, {cache_rows, kv * d}, s);
      const absl::Status status =
          RopeQkvToCache(qkv_dev, table_dev, rows_dev, h, kv, d, q_out, k_cache, v_cache, s);
      ASSERT_TRUE(status.ok()) << status;

      // Tolerance: the kernel forms x1 * cos - x2 * sin with one FMA; which product the host
      // compiler fuses (-ffp-contract=fast) is unspecified, so the fp32 values may differ by an
      // ulp of the larger product (1e-6 absolute covers it near zero), then one BF16 ulp.
      ExpectClose(Download(q_out, s), RoundedToBf16(q), 1e-6f, kBf16Ulp, "q_out");
      Tensor k_got = Download(k_cache, s);
      Tensor v_got = Download(v_cache, s);
      Tensor k_rows = Tensor::Empty(DType::kBF16, {tokens, kv * d});
      Tensor v_rows = Tensor::Empty(DType::kBF16, {tokens, kv * d});
      const size_t row_bytes = kv * d * sizeof(uint16_t);
      std::vector<bool> written(cache_rows, false);
      for (int64_t t = 0; t < tokens; ++t) {
        written[rows[t]] = true;
        std::memcpy(k_rows.data<uint16_t>() + t * kv * d, k_got.data<uint16_t>() + rows[t] * kv * d,
                    row_bytes);
        std::memcpy(v_rows.data<uint16_t>() + t * kv * d, v_got.data<uint16_t>() + rows[t] * kv * d,
                    row_bytes);
      }
      ExpectClose(k_rows, RoundedToBf16(k), 1e-6f, kBf16Ulp, "k_cache rows");
      // v is only rounded: exact.
      ExpectBitwiseEqual(v_rows, ToBf16(v), "v_cache rows");
      for (int64_t r = 0; r < cache_rows; ++r) {
        if (written[r]) continue;
        for (int64_t i = 0; i < kv * d; ++i) {
          ASSERT_EQ(k_got.data<uint16_t>()[r * kv * d + i], 0xffff) << "k row " << r << " written";
          ASSERT_EQ(v_got.data<uint16_t>()[r * kv * d + i], 0xffff) << "v row " << r << " written";
        }
      }
    }
  }
}

TEST(CudaRopeQkvToCacheTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  const int64_t h = 4, kv = 2, d = 8, tokens = 3;
  DeviceTensor qkv = DeviceEmpty(DType::kF32, {tokens, (h + 2 * kv) * d}, s);
  DeviceTensor qkv_narrow = DeviceEmpty(DType::kF32, {tokens, (h + kv) * d}, s);
  DeviceTensor rope = DeviceEmpty(DType::kF32, {tokens, d}, s);
  DeviceTensor rope_bf16 = DeviceEmpty(DType::kBF16, {tokens, d}, s);
  DeviceTensor rows = DeviceEmpty(DType::kI32, {tokens}, s);
  DeviceTensor rows_i64 = DeviceEmpty(DType::kI64, {tokens}, s);
  DeviceTensor q_out = DeviceEmpty(DType::kBF16, {tokens, h * d}, s);
  DeviceTensor q_out_f32 = DeviceEmpty(DType::kF32, {tokens, h * d}, s);
  DeviceTensor k_cache = DeviceEmpty(DType::kBF16, {16, kv * d}, s);
  DeviceTensor v_cache_short = DeviceEmpty(DType::kBF16, {15, kv * d}, s);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(RopeQkvToCache(qkv_narrow, rope, rows, h, kv, d, q_out, k_cache, k_cache, s).code(),
            kInvalid);
  EXPECT_EQ(RopeQkvToCache(qkv, rope_bf16, rows, h, kv, d, q_out, k_cache, k_cache, s).code(),
            kInvalid);
  EXPECT_EQ(RopeQkvToCache(qkv, rope, rows_i64, h, kv, d, q_out, k_cache, k_cache, s).code(),
            kInvalid);
  EXPECT_EQ(RopeQkvToCache(qkv, rope, rows, h, kv, d, q_out_f32, k_cache, k_cache, s).code(),
            kInvalid);
  EXPECT_EQ(RopeQkvToCache(qkv, rope, rows, h, kv, d, q_out, k_cache, v_cache_short, s).code(),
            kInvalid);
  EXPECT_EQ(RopeQkvToCache(qkv, rope, rows, h, kv, 7, q_out, k_cache, k_cache, s).code(), kInvalid);
  EXPECT_TRUE(RopeQkvToCache(qkv.view.Slice(0, 0), rope.view.Slice(0, 0), rows.view.Slice(0, 0), h,
                             kv, d, q_out.view.Slice(0, 0), k_cache, k_cache, s)
                  .ok());
}

TEST(CudaRopeQkvToCacheTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const int64_t h = 4, kv = 2, d = 8, tokens = 3, cache_rows = 16;
  const TensorView qkv = host(DType::kF32, {tokens, (h + 2 * kv) * d});
  const TensorView rope = host(DType::kF32, {tokens, d});
  const TensorView rows = host(DType::kI32, {tokens});
  const TensorView q_out = host(DType::kBF16, {tokens, h * d});
  const TensorView k_cache = host(DType::kBF16, {cache_rows, kv * d});
  const TensorView v_cache = host(DType::kBF16, {cache_rows, kv * d});
  // The views above are valid for (h, kv, d); each call changes one argument.
  auto rope_qkv = [&](const TensorView& qkv_, const TensorView& rope_, const TensorView& rows_,
                      int64_t h_, int64_t kv_, int64_t d_, const TensorView& q_out_,
                      const TensorView& k_cache_, const TensorView& v_cache_) {
    return RopeQkvToCache(qkv_, rope_, rows_, h_, kv_, d_, q_out_, k_cache_, v_cache_, nullptr);
  };
  EXPECT_THAT(rope_qkv(qkv, rope, rows, 0, kv, d, q_out, k_cache, v_cache),
              IsInvalidArgument("RopeQkvToCache: num_heads (0)"));
  EXPECT_THAT(rope_qkv(qkv, rope, rows, h, -2, d, q_out, k_cache, v_cache),
              IsInvalidArgument("num_kv_heads (-2)"));
  EXPECT_THAT(rope_qkv(qkv, rope, rows, h, kv, 7, q_out, k_cache, v_cache),
              IsInvalidArgument("head_dim (7)"));
  EXPECT_THAT(rope_qkv(qkv, rope, rows, h, kv, 0, q_out, k_cache, v_cache),
              IsInvalidArgument("head_dim (0)"));
  EXPECT_THAT(rope_qkv(host(DType::kF32, {tokens, (h + kv) * d}), rope, rows, h, kv, d, q_out,
                       k_cache, v_cache),
              IsInvalidArgument("RopeQkvToCache: qkv must be"));
  EXPECT_THAT(rope_qkv(host(DType::kBF16, {tokens, (h + 2 * kv) * d}), rope, rows, h, kv, d, q_out,
                       k_cache, v_cache),
              IsInvalidArgument("RopeQkvToCache: qkv must be"));
  EXPECT_THAT(
      rope_qkv(qkv, host(DType::kBF16, {tokens, d}), rows, h, kv, d, q_out, k_cache, v_cache),
      IsInvalidArgument("RopeQkvToCache: rope must be"));
  EXPECT_THAT(
      rope_qkv(qkv, host(DType::kF32, {tokens, d / 2}), rows, h, kv, d, q_out, k_cache, v_cache),
      IsInvalidArgument("RopeQkvToCache: rope must be"));
  EXPECT_THAT(
      rope_qkv(qkv, host(DType::kF32, {tokens - 1, d}), rows, h, kv, d, q_out, k_cache, v_cache),
      IsInvalidArgument("RopeQkvToCache: rope must be"));
  EXPECT_THAT(rope_qkv(qkv, rope, host(DType::kI64, {tokens}), h, kv, d, q_out, k_cache, v_cache),
              IsInvalidArgument("RopeQkvToCache: kv_rows must be"));
  EXPECT_THAT(
      rope_qkv(qkv, rope, host(DType::kI32, {tokens + 1}), h, kv, d, q_out, k_cache, v_cache),
      IsInvalidArgument("RopeQkvToCache: kv_rows must be"));
  EXPECT_THAT(
      rope_qkv(qkv, rope, rows, h, kv, d, host(DType::kF32, {tokens, h * d}), k_cache, v_cache),
      IsInvalidArgument("RopeQkvToCache: q_out must be"));
  EXPECT_THAT(
      rope_qkv(qkv, rope, rows, h, kv, d, host(DType::kBF16, {tokens, kv * d}), k_cache, v_cache),
      IsInvalidArgument("RopeQkvToCache: q_out must be"));
  EXPECT_THAT(
      rope_qkv(qkv, rope, rows, h, kv, d, q_out, host(DType::kF32, {cache_rows, kv * d}), v_cache),
      IsInvalidArgument("RopeQkvToCache: k_cache must be"));
  EXPECT_THAT(
      rope_qkv(qkv, rope, rows, h, kv, d, q_out, host(DType::kBF16, {cache_rows, d}), v_cache),
      IsInvalidArgument("RopeQkvToCache: k_cache must be"));
  EXPECT_THAT(rope_qkv(qkv, rope, rows, h, kv, d, q_out, k_cache,
                       host(DType::kBF16, {cache_rows - 1, kv * d})),
              IsInvalidArgument("RopeQkvToCache: v_cache must be"));
  EXPECT_THAT(
      rope_qkv(qkv, rope, rows, h, kv, d, q_out, k_cache, host(DType::kF32, {cache_rows, kv * d})),
      IsInvalidArgument("RopeQkvToCache: v_cache must be"));
  EXPECT_THAT(rope_qkv(qkv, rope, rows, h, kv, d, q_out, k_cache,
                       TensorView(nullptr, DType::kBF16, {cache_rows, kv * d})),
              IsInvalidArgument("RopeQkvToCache: v_cache [16, 16] has no data"));
  EXPECT_THAT(rope_qkv(host.Unbacked(DType::kF32, {kPastTheGrid, (h + 2 * kv) * d}),
                       host.Unbacked(DType::kF32, {kPastTheGrid, d}),
                       host.Unbacked(DType::kI32, {kPastTheGrid}), h, kv, d,
                       host.Unbacked(DType::kBF16, {kPastTheGrid, h * d}), k_cache, v_cache),
              IsInvalidArgument("RopeQkvToCache: 2147483648 rows exceed the grid"));
}

// ---- MoeCombine ----

TEST(CudaMoeCombineTest, MatchesOracleInSlotAndPermutedOrder) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  const int64_t num_experts = 8;
  for (int64_t hidden : {64, 4096, 100}) {
    for (int64_t topk : {1, 2, 4}) {
      for (int64_t tokens : kTokenCounts) {
        const int64_t n = tokens * topk;
        // A real permutation: the slots of random routing, grouped by expert.
        std::vector<int32_t> ids = RandomIds(n, num_experts, static_cast<uint32_t>(n + hidden));
        std::vector<int64_t> offsets(num_experts + 1), slots(n);
        ASSERT_TRUE(cpu::ExpertPermutation(TensorView(ids.data(), DType::kI32, {tokens, topk}),
                                           num_experts, absl::MakeSpan(offsets),
                                           absl::MakeSpan(slots))
                        .ok());
        std::vector<int32_t> row_of_slot(n);
        for (int64_t r = 0; r < n; ++r) row_of_slot[slots[r]] = static_cast<int32_t>(r);
        Tensor weights = RandomF32({tokens, topk}, static_cast<uint32_t>(n), 0.f, 1.f);
        Tensor x = RandomF32({tokens, hidden}, static_cast<uint32_t>(tokens + topk), -2.f, 2.f);
        Tensor rows_f32 = RandomF32({n, hidden}, static_cast<uint32_t>(n * 7 + hidden));
        for (DType expert_dtype : {DType::kF32, DType::kBF16}) {
          for (bool permuted : {false, true}) {
            SCOPED_TRACE(absl::StrCat("tokens=", tokens, " hidden=", hidden, " topk=", topk,
                                      " expert_out=", DTypeName(expert_dtype),
                                      permuted ? " permuted" : " slot order"));
            Tensor rows = expert_dtype == DType::kF32 ? Copy(rows_f32) : ToBf16(rows_f32);
            Tensor rows_seen = *ToF32(rows);
            // The oracle takes slot order.
            Tensor slot_order = Tensor::Empty(DType::kF32, {n, hidden});
            for (int64_t slot = 0; slot < n; ++slot) {
              const int64_t r = permuted ? row_of_slot[slot] : slot;
              std::memcpy(slot_order.data<float>() + slot * hidden,
                          rows_seen.data<float>() + r * hidden, hidden * sizeof(float));
            }
            Tensor want = Tensor::Empty(DType::kF32, {tokens, hidden});
            ASSERT_TRUE(cpu::MoeCombine(x, slot_order, weights, want).ok());

            DeviceTensor x_dev = Upload(x, s);
            DeviceTensor rows_dev = Upload(rows, s);
            DeviceTensor weights_dev = Upload(weights, s);
            DeviceTensor row_of_slot_dev = Upload(I32View(row_of_slot), s);
            const absl::Status status = MoeCombine(
                x_dev, rows_dev, permuted ? row_of_slot_dev.view : TensorView(), weights_dev, s);
            ASSERT_TRUE(status.ok()) << status;
            // Tolerance: the same fp32 operations in the same order (FMAs, as the oracle is
            // built with -ffp-contract=fast), bitwise equal on an FMA host; 1e-6 allows for a
            // host that rounds the products separately (at most num_topk ulps of values ~ 1).
            ExpectClose(Download(x_dev, s), want, 1e-6f, 1e-6f, "MoeCombine");
          }
        }
      }
    }
  }
}

TEST(CudaMoeCombineTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  DeviceTensor x = DeviceEmpty(DType::kF32, {3, 16}, s);
  DeviceTensor x_bf16 = DeviceEmpty(DType::kBF16, {3, 16}, s);
  DeviceTensor rows = DeviceEmpty(DType::kBF16, {6, 16}, s);
  DeviceTensor rows_few = DeviceEmpty(DType::kBF16, {5, 16}, s);
  DeviceTensor rows_wide = DeviceEmpty(DType::kBF16, {6, 17}, s);
  DeviceTensor row_of_slot = DeviceEmpty(DType::kI32, {6}, s);
  DeviceTensor row_of_slot_short = DeviceEmpty(DType::kI32, {5}, s);
  DeviceTensor weights = DeviceEmpty(DType::kF32, {3, 2}, s);
  DeviceTensor weights_bf16 = DeviceEmpty(DType::kBF16, {3, 2}, s);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(MoeCombine(x_bf16, rows, row_of_slot, weights, s).code(), kInvalid);
  EXPECT_EQ(MoeCombine(x, rows_wide, row_of_slot, weights, s).code(), kInvalid);
  EXPECT_EQ(MoeCombine(x, rows, row_of_slot_short, weights, s).code(), kInvalid);
  EXPECT_EQ(MoeCombine(x, rows, row_of_slot, weights_bf16, s).code(), kInvalid);
  EXPECT_EQ(MoeCombine(x, rows_few, TensorView(), weights, s).code(), kInvalid);
  EXPECT_TRUE(MoeCombine(x.view.Slice(0, 0), rows, row_of_slot.view.Slice(0, 0),
                         weights.view.Slice(0, 0), s)
                  .ok());
}

TEST(CudaMoeCombineTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  // 3 tokens, top-2, hidden 16.
  const TensorView x = host(DType::kF32, {3, 16});
  const TensorView rows = host(DType::kBF16, {6, 16});
  const TensorView row_of_slot = host(DType::kI32, {6});
  const TensorView weights = host(DType::kF32, {3, 2});
  EXPECT_THAT(MoeCombine(host(DType::kBF16, {3, 16}), rows, row_of_slot, weights, nullptr),
              IsInvalidArgument("MoeCombine: x must be"));
  EXPECT_THAT(MoeCombine(host(DType::kF32, {48}), rows, row_of_slot, weights, nullptr),
              IsInvalidArgument("MoeCombine: x must be"));
  EXPECT_THAT(MoeCombine(x, rows, row_of_slot, host(DType::kBF16, {3, 2}), nullptr),
              IsInvalidArgument("MoeCombine: weights must be"));
  EXPECT_THAT(MoeCombine(x, rows, row_of_slot, host(DType::kF32, {2, 2}), nullptr),
              IsInvalidArgument("MoeCombine: weights must be"));
  EXPECT_THAT(MoeCombine(x, rows, row_of_slot, TensorView(nullptr, DType::kF32, {3, 2}), nullptr),
              IsInvalidArgument("MoeCombine: weights [3, 2] has no data"));
  EXPECT_THAT(MoeCombine(x, host(DType::kI32, {6, 16}), row_of_slot, weights, nullptr),
              IsInvalidArgument("MoeCombine: expert_out must be"));
  EXPECT_THAT(MoeCombine(x, host(DType::kBF16, {6, 17}), row_of_slot, weights, nullptr),
              IsInvalidArgument("MoeCombine: expert_out must be"));
  EXPECT_THAT(MoeCombine(x, rows, host(DType::kI32, {5}), weights, nullptr),
              IsInvalidArgument("MoeCombine: row_of_slot must be"));
  EXPECT_THAT(MoeCombine(x, rows, host(DType::kI64, {6}), weights, nullptr),
              IsInvalidArgument("MoeCombine: row_of_slot must be"));
  EXPECT_THAT(MoeCombine(x, rows, host(DType::kI32, {3, 2}), weights, nullptr),
              IsInvalidArgument("MoeCombine: row_of_slot must be"));
  // Slot order (no row_of_slot) needs a row per slot.
  EXPECT_THAT(MoeCombine(x, host(DType::kBF16, {5, 16}), TensorView(), weights, nullptr),
              IsInvalidArgument("MoeCombine: expert_out [5, 16] has fewer than"));
  EXPECT_THAT(MoeCombine(host.Unbacked(DType::kF32, {kPastTheGrid, 16}),
                         host.Unbacked(DType::kBF16, {2 * kPastTheGrid, 16}), TensorView(),
                         host.Unbacked(DType::kF32, {kPastTheGrid, 2}), nullptr),
              IsInvalidArgument("MoeCombine: 2147483648 rows exceed the grid"));
}

// ---- SiluMul ----

TEST(CudaSiluMulTest, MatchesOracleFormula) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  struct Shape2 {
    int64_t rows, inter;
  };
  std::vector<Shape2> shapes;
  for (int64_t rows : kTokenCounts)
    for (int64_t inter : {64, 1024, 100}) shapes.push_back({rows, inter});
  shapes.push_back({19, 14336});  // Mixtral's intermediate size
  for (const Shape2& shape : shapes) {
    SCOPED_TRACE(absl::StrCat("rows=", shape.rows, " inter=", shape.inter));
    const int64_t rows = shape.rows, inter = shape.inter;
    Tensor gate_up_f32 =
        RandomF32({rows, 2 * inter}, static_cast<uint32_t>(rows * inter), -6.f, 6.f);
    Tensor gate_up = ToBf16(gate_up_f32);
    Tensor seen = RoundedToBf16(gate_up_f32);
    // The oracle's expression (cpu::SwiGluExpert), rounded to BF16 as the kernel's output is.
    Tensor want = Tensor::Empty(DType::kF32, {rows, inter});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < inter; ++i) {
        const float g = seen.data<float>()[r * 2 * inter + i];
        const float u = seen.data<float>()[r * 2 * inter + inter + i];
        want.data<float>()[r * inter + i] = g / (1.f + std::exp(-g)) * u;
      }
    DeviceTensor gate_up_dev = Upload(gate_up, s);
    DeviceTensor out = DeviceEmpty(DType::kBF16, {rows, inter}, s);
    const absl::Status status = SiluMul(gate_up_dev, out, s);
    ASSERT_TRUE(status.ok()) << status;
    // Tolerance: CUDA's expf is within 2 ulps of the host's, so the fp32 values agree to a few
    // ulps and the BF16 results to one BF16 ulp.
    ExpectClose(Download(out, s), RoundedToBf16(want), 1e-30f, kBf16Ulp, "SiluMul");
  }
}

TEST(CudaSiluMulTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  DeviceTensor gate_up = DeviceEmpty(DType::kBF16, {3, 16}, s);
  DeviceTensor gate_up_odd = DeviceEmpty(DType::kBF16, {3, 15}, s);
  DeviceTensor gate_up_f32 = DeviceEmpty(DType::kF32, {3, 16}, s);
  DeviceTensor out = DeviceEmpty(DType::kBF16, {3, 8}, s);
  DeviceTensor out_wide = DeviceEmpty(DType::kBF16, {3, 16}, s);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(SiluMul(gate_up_odd, out, s).code(), kInvalid);
  EXPECT_EQ(SiluMul(gate_up_f32, out, s).code(), kInvalid);
  EXPECT_EQ(SiluMul(gate_up, out_wide, s).code(), kInvalid);
  EXPECT_TRUE(SiluMul(gate_up.view.Slice(0, 0), out.view.Slice(0, 0), s).ok());
}

TEST(CudaSiluMulTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView gate_up = host(DType::kBF16, {3, 16});
  const TensorView out = host(DType::kBF16, {3, 8});
  EXPECT_THAT(SiluMul(host(DType::kBF16, {3, 15}), out, nullptr),
              IsInvalidArgument("SiluMul: gate_up [3, 15] must have an even number of columns"));
  EXPECT_THAT(SiluMul(host(DType::kF32, {3, 16}), out, nullptr),
              IsInvalidArgument("SiluMul: gate_up must be"));
  EXPECT_THAT(SiluMul(host(DType::kBF16, {48}), out, nullptr),
              IsInvalidArgument("SiluMul: gate_up must be"));
  EXPECT_THAT(SiluMul(TensorView(nullptr, DType::kBF16, {3, 16}), out, nullptr),
              IsInvalidArgument("SiluMul: gate_up [3, 16] has no data"));
  EXPECT_THAT(SiluMul(gate_up, host(DType::kBF16, {3, 16}), nullptr),
              IsInvalidArgument("SiluMul: out must be"));
  EXPECT_THAT(SiluMul(gate_up, host(DType::kF32, {3, 8}), nullptr),
              IsInvalidArgument("SiluMul: out must be"));
  EXPECT_THAT(SiluMul(gate_up, host(DType::kBF16, {2, 8}), nullptr),
              IsInvalidArgument("SiluMul: out must be"));
}

}  // namespace
}  // namespace epx::cuda
