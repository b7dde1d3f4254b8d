// Host-side argument checks shared by the CUDA launchers: a launcher validates every view before
// it launches, so kernels never see a wrong dtype or shape.
#ifndef EPX_KERNELS_CUDA_CHECK_ARGS_H_
#define EPX_KERNELS_CUDA_CHECK_ARGS_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "common/tensor.h"

namespace epx::cuda {

// "BF16 or F32".
std::string DTypeList(std::initializer_list<DType> dtypes);

// InvalidArgument naming the op and the argument unless `t` has one of `dtypes`, the rank of
// `shape` and its extents (-1: any extent), and data when it has elements.
absl::Status CheckTensor(const char* op, const char* name, const TensorView& t,
                         std::initializer_list<DType> dtypes,
                         std::initializer_list<int64_t> shape);
inline absl::Status CheckTensor(const char* op, const char* name, const TensorView& t,
                                DType dtype, std::initializer_list<int64_t> shape) {
  return CheckTensor(op, name, t, {dtype}, shape);
}

}  // namespace epx::cuda

#endif  // EPX_KERNELS_CUDA_CHECK_ARGS_H_
