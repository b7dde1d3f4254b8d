// Tensors: `TensorView` is a non-owning typed view (data pointer, dtype, row-major shape) that
// kernels take; `Tensor` owns a 64-byte aligned host buffer. Neither is thread-safe for writes;
// concurrent reads are fine.
#ifndef EPX_COMMON_TENSOR_H_
#define EPX_COMMON_TENSOR_H_

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "absl/container/inlined_vector.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/status.h"

namespace epx {

using Shape = absl::InlinedVector<int64_t, 4>;

int64_t NumElements(absl::Span<const int64_t> shape);
// "[2, 3, 4]"
std::string ShapeString(absl::Span<const int64_t> shape);

// Where a view's data lives: host memory, or a GPU's (a CUDA device pointer). Views carry no
// memory tag; interfaces that take either say which they expect (ExpertExecutor::memory()).
enum class MemoryKind { kHost, kDevice };

class TensorView {
 public:
  TensorView() = default;
  TensorView(const void* data, DType dtype, Shape shape)
      : data_(const_cast<void*>(data)), dtype_(dtype), shape_(std::move(shape)) {}

  template <typename T>
  T* data() const {
    return static_cast<T*>(data_);
  }
  void* raw() const { return data_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  bool empty() const { return data_ == nullptr; }

  // Rows [begin, end) of the first dimension.
  TensorView Slice(int64_t begin, int64_t end) const;
  // Same data, another shape with the same number of elements (EPX_CHECKed).
  TensorView Reshape(Shape shape) const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Shape shape_;
};

class Tensor {
 public:
  Tensor() = default;
  // Uninitialised storage. Throws std::bad_alloc when memory runs out, as containers do; the
  // binaries report it (cli/main.cc).
  static Tensor Empty(DType dtype, Shape shape);
  static Tensor Zeros(DType dtype, Shape shape);

  Tensor(Tensor&&) = default;
  Tensor& operator=(Tensor&&) = default;

  TensorView view() const { return TensorView(buffer_.get(), dtype_, shape_); }
  operator TensorView() const { return view(); }  // NOLINT: tensors pass where views are taken

  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(buffer_.get());
  }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return view().dim(i); }
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }

 private:
  struct FreeDeleter {
    void operator()(void* p) const;
  };
  std::unique_ptr<uint8_t[], FreeDeleter> buffer_;
  DType dtype_ = DType::kF32;
  Shape shape_;
};

// Converts any floating-point view to a new fp32 tensor of the same shape.
absl::StatusOr<Tensor> ToF32(const TensorView& src);
// Converts fp32 data to `dtype` (F32, F16 or BF16) into a new tensor.
absl::StatusOr<Tensor> FromF32(const TensorView& src, DType dtype);

// Row-wise FP8 e4m3 quantisation of a weight matrix w [n, k] (F32, F16 or BF16; BF16 is what the
// GPU quantises): scale[n] = max|w[n, :]| / 448 in fp32 (1 for an all-zero row), and
// q[n, k] = F32ToFp8E4m3(w[n, k] / scale[n]). The CUDA kernel computes the same bits.
struct Fp8RowWise {
  Tensor q;      // [n, k] F8E4M3
  Tensor scale;  // [n] F32
};
absl::StatusOr<Fp8RowWise> QuantizeFp8RowWise(const TensorView& w);

}  // namespace epx

#endif  // EPX_COMMON_TENSOR_H_
