// Converters from CUDA runtime and cuBLAS status codes to absl::Status, with the failing
// expression and file:line. Included by kernels/cuda/ sources only (it includes CUDA headers).
#ifndef EPX_KERNELS_CUDA_CUDA_CHECK_H_
#define EPX_KERNELS_CUDA_CUDA_CHECK_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx::cuda {

absl::Status CudaError(cudaError_t error, const char* expr, const char* file, int line);
absl::Status CublasError(cublasStatus_t status, const char* expr, const char* file, int line);

}  // namespace epx::cuda

// Returns an error Status from the enclosing function if the CUDA call fails.
#define EPX_CUDA_RETURN_IF_ERROR(expr)                                                \
  do {                                                                                \
    const cudaError_t epx_cuda_error_ = (expr);                                       \
    if (epx_cuda_error_ != cudaSuccess)                                               \
      return ::epx::cuda::CudaError(epx_cuda_error_, #expr, __FILE__, __LINE__);      \
  } while (0)

#define EPX_CUBLAS_RETURN_IF_ERROR(expr)                                              \
  do {                                                                                \
    const cublasStatus_t epx_cublas_status_ = (expr);                                 \
    if (epx_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                  \
      return ::epx::cuda::CublasError(epx_cublas_status_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: the launch configuration error, if any (not errors inside the kernel,
// which surface at the next synchronisation).
#define EPX_CUDA_RETURN_IF_LAUNCH_FAILED() EPX_CUDA_RETURN_IF_ERROR(cudaGetLastError())

#endif  // EPX_KERNELS_CUDA_CUDA_CHECK_H_
