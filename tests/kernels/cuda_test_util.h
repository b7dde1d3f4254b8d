// Helpers for the `gpu` tests: skip without a device, move host tensors to and from the GPU, and
// compare device results with the CPU oracle; and, for the tests of the launchers' host-side
// argument checks, which need no device, host views and status matchers.
#ifndef EPX_TESTS_KERNELS_CUDA_TEST_UTIL_H_
#define EPX_TESTS_KERNELS_CUDA_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "common/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cuda/runtime.h"

namespace epx::testing {

// Skips the test (with the reason in the log) when no CUDA device can be used.
#define EPX_SKIP_WITHOUT_GPU()                                                              \
  do {                                                                                      \
    if (!::epx::cuda::BuiltWithCuda())                                                      \
      GTEST_SKIP() << "built without CUDA: gpu tests need -DEPX_ENABLE_CUDA=ON";            \
    if (::epx::cuda::DeviceCount() == 0)                                                    \
      GTEST_SKIP() << "no CUDA device visible (driver missing or CUDA_VISIBLE_DEVICES empty)"; \
  } while (0)

// Skips a test that needs the CUDA launchers but no device (the argument-check tests) in a build
// without CUDA. That build does not compile the gpu tests at all, so this is belt and braces.
#define EPX_SKIP_WITHOUT_CUDA_BUILD()                                                \
  do {                                                                               \
    if (!::epx::cuda::BuiltWithCuda())                                               \
      GTEST_SKIP() << "built without CUDA: the launchers need -DEPX_ENABLE_CUDA=ON"; \
  } while (0)

// Host memory standing in for device memory in tests of the launchers' argument checks. Every
// launcher validates its arguments on the host before it launches anything, so a call that fails
// validation never dereferences these pointers, and the tests run where no GPU is (a stream
// argument can be nullptr). Views are non-null even when they have no elements, as a device
// allocation would be.
class HostViews {
 public:
  // A view with its own 64-byte aligned buffer (Tensor::Empty) of the full size.
  TensorView operator()(DType dtype, Shape shape) { return Offset(dtype, std::move(shape), 0); }

  // A view `bytes` past the start of its own aligned buffer: a misaligned pointer when `bytes` is
  // not a multiple of the alignment asked for.
  TensorView Offset(DType dtype, Shape shape, size_t bytes) {
    const size_t size = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
    buffers_.push_back(Tensor::Empty(DType::kU8, {static_cast<int64_t>(size + bytes)}));
    return TensorView(buffers_.back().data<uint8_t>() + bytes, dtype, std::move(shape));
  }

  // A view of a shape too large for any allocation (past a grid or int32 limit) over a small
  // buffer: only for calls that must be refused for that size.
  TensorView Unbacked(DType dtype, Shape shape) {
    buffers_.push_back(Tensor::Empty(DType::kU8, {64}));
    return TensorView(buffers_.back().data<uint8_t>(), dtype, std::move(shape));
  }

 private:
  std::vector<Tensor> buffers_;  // moving a Tensor keeps its buffer where it is
};

// Matches an absl::Status that is InvalidArgument with `text` in its message: the argument at
// fault, so that a test of one check fails when that check goes away even if another check then
// refuses the call. The code alone would not do: CUDA errors such as "invalid device ordinal"
// (a device query without a device) are InvalidArgument too.
MATCHER_P(IsInvalidArgument, text,
          std::string(negation ? "isn't" : "is") + " InvalidArgument naming \"" + text + "\"") {
  return arg.code() == absl::StatusCode::kInvalidArgument && absl::StrContains(arg.message(), text);
}

// The same for FailedPrecondition: well-formed arguments that cannot run as things stand (an
// expert that is not loaded, a Blas without a cuBLAS handle).
MATCHER_P(IsFailedPrecondition, text,
          std::string(negation ? "isn't" : "is") + " FailedPrecondition naming \"" + text + "\"") {
  return arg.code() == absl::StatusCode::kFailedPrecondition &&
         absl::StrContains(arg.message(), text);
}

// A stream for a test (which has checked that a device exists).
inline cuda::Stream NewStream() {
  auto stream = cuda::Stream::Create();
  EPX_CHECK(stream.ok());
  return std::move(*stream);
}

// The values of a host I32 tensor.
inline std::vector<int32_t> ToVector32(const TensorView& t) {
  EPX_CHECK(t.dtype() == DType::kI32);
  return std::vector<int32_t>(t.data<const int32_t>(), t.data<const int32_t>() + t.numel());
}

// A device copy of a tensor, kept alive with its view.
struct DeviceTensor {
  cuda::DeviceBuffer buffer;
  TensorView view;
  operator TensorView() const { return view; }  // NOLINT
};

// Uploads `host` (synchronously). An empty shape allocates nothing.
inline DeviceTensor Upload(const TensorView& host, cuda::StreamHandle stream) {
  DeviceTensor out;
  auto buffer = cuda::DeviceBuffer::Allocate(std::max<size_t>(host.nbytes(), 1));
  EPX_CHECK(buffer.ok());
  out.buffer = std::move(*buffer);
  out.view = out.buffer.view(host.dtype(), host.shape());
  EPX_CHECK(cuda::CopyToDevice(out.buffer.data(), host.raw(), host.nbytes(), stream).ok());
  return out;
}

// Allocates a device tensor of the given type and shape, filled with 0xff bytes so that
// unwritten outputs show up.
inline DeviceTensor DeviceEmpty(DType dtype, Shape shape, cuda::StreamHandle stream) {
  DeviceTensor out;
  const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  auto buffer = cuda::DeviceBuffer::Allocate(std::max<size_t>(bytes, 1));
  EPX_CHECK(buffer.ok());
  out.buffer = std::move(*buffer);
  out.view = out.buffer.view(dtype, std::move(shape));
  EPX_CHECK(cuda::MemsetAsync(out.buffer.data(), 0xff, bytes, stream).ok());
  return out;
}

// Copies a device view back to a new host tensor (synchronises the stream).
inline Tensor Download(const TensorView& device, cuda::StreamHandle stream) {
  Tensor out = Tensor::Empty(device.dtype(), device.shape());
  EPX_CHECK(cuda::CopyToHost(out.data<void>(), device.raw(), device.nbytes(), stream).ok());
  const absl::Status synced = cuda::SynchronizeStream(stream);
  EXPECT_TRUE(synced.ok()) << synced;
  return out;
}

// A host F32 tensor of uniform values in [lo, hi), reproducible from `seed`.
inline Tensor RandomF32(Shape shape, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::Empty(DType::kF32, std::move(shape));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = dist(rng);
  return t;
}

// The BF16 copy of an F32 tensor, and that copy widened back to F32: the values a GPU kernel
// actually sees, to feed the CPU oracle the same inputs.
inline Tensor ToBf16(const TensorView& f32) {
  auto t = FromF32(f32, DType::kBF16);
  EPX_CHECK(t.ok());
  return std::move(*t);
}
inline Tensor RoundedToBf16(const TensorView& f32) {
  auto t = ToF32(ToBf16(f32));
  EPX_CHECK(t.ok());
  return std::move(*t);
}

// Expects |got - want| <= atol + rtol * |want| elementwise (both widened to F32); reports the
// worst element and the count of misses.
inline void ExpectClose(const TensorView& got, const TensorView& want, float atol, float rtol,
                        const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  auto g = ToF32(got);
  auto w = ToF32(want);
  ASSERT_TRUE(g.ok() && w.ok()) << what;
  int64_t misses = 0, worst = -1;
  float worst_excess = 0;
  for (int64_t i = 0; i < g->numel(); ++i) {
    const float a = g->data<float>()[i], b = w->data<float>()[i];
    const float excess = std::fabs(a - b) - (atol + rtol * std::fabs(b));
    if (!(excess <= 0)) {
      ++misses;
      if (worst < 0 || !(excess <= worst_excess)) worst = i, worst_excess = excess;
    }
  }
  if (misses > 0)
    ADD_FAILURE() << what << ": " << misses << " of " << g->numel()
                  << " elements outside atol " << atol << " + rtol " << rtol << "; worst at " << worst
                  << ": got " << g->data<float>()[worst] << ", want " << w->data<float>()[worst];
}

}  // namespace epx::testing

#endif  // EPX_TESTS_KERNELS_CUDA_TEST_UTIL_H_
