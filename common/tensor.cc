#include "common/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "absl/strings/str_join.h"

namespace epx {

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

TensorView TensorView::Slice(int64_t begin, int64_t end) const {
  EPX_CHECK(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0]);
  const int64_t row = shape_[0] == 0 ? 0 : numel() / shape_[0];
  Shape s = shape_;
  s[0] = end - begin;
  return TensorView(static_cast<uint8_t*>(data_) + begin * row * DTypeSize(dtype_), dtype_, s);
}

TensorView TensorView::Reshape(Shape shape) const {
  EPX_CHECK(NumElements(shape) == numel());
  return TensorView(data_, dtype_, std::move(shape));
}

void Tensor::FreeDeleter::operator()(void* p) const { std::free(p); }

Tensor Tensor::Empty(DType dtype, Shape shape) {
  Tensor t;
  const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  const size_t rounded = (bytes + 63) / 64 * 64;
  t.buffer_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, rounded == 0 ? 64 : rounded)));
  // Out of memory is not a programmer error: it surfaces like any failed allocation.
  if (t.buffer_ == nullptr) throw std::bad_alloc();
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::Zeros(DType dtype, Shape shape) {
  Tensor t = Empty(dtype, std::move(shape));
  std::memset(t.data<uint8_t>(), 0, t.nbytes());
  return t;
}

absl::StatusOr<Tensor> ToF32(const TensorView& src) {
  Tensor out = Tensor::Empty(DType::kF32, src.shape());
  float* dst = out.data<float>();
  const int64_t n = src.numel();
  switch (src.dtype()) {
    case DType::kF32:
      std::memcpy(dst, src.raw(), n * sizeof(float));
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(src.data<const uint16_t>()[i]);
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = F16ToF32(src.data<const uint16_t>()[i]);
      break;
    case DType::kF64:
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src.data<const double>()[i]);
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("cannot convert ", DTypeName(src.dtype()), " to F32"));
  }
  return out;
}

absl::StatusOr<Tensor> FromF32(const TensorView& src, DType dtype) {
  if (src.dtype() != DType::kF32) return absl::InvalidArgumentError("FromF32 needs an F32 source");
  Tensor out = Tensor::Empty(dtype, src.shape());
  const float* s = src.data<const float>();
  const int64_t n = src.numel();
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out.data<float>(), s, n * sizeof(float));
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) out.data<uint16_t>()[i] = F32ToBf16(s[i]);
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) out.data<uint16_t>()[i] = F32ToF16(s[i]);
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("cannot convert F32 to ", DTypeName(dtype)));
  }
  return out;
}

absl::StatusOr<Fp8RowWise> QuantizeFp8RowWise(const TensorView& w) {
  if (w.rank() != 2)
    return absl::InvalidArgumentError(
        absl::StrCat("QuantizeFp8RowWise: want a matrix, got shape ", ShapeString(w.shape())));
  EPX_ASSIGN_OR_RETURN(Tensor wf, ToF32(w));
  const int64_t n = w.dim(0), k = w.dim(1);
  Fp8RowWise out{Tensor::Empty(DType::kF8E4M3, {n, k}), Tensor::Empty(DType::kF32, {n})};
  for (int64_t r = 0; r < n; ++r) {
    const float* row = wf.data<const float>() + r * k;
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
    const float scale = amax > 0.f ? amax / 448.f : 1.f;
    out.scale.data<float>()[r] = scale;
    uint8_t* q = out.q.data<uint8_t>() + r * k;
    for (int64_t i = 0; i < k; ++i) q[i] = F32ToFp8E4m3(row[i] / scale);
  }
  return out;
}

}  // namespace epx
