#include "kernels/cuda/runtime.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/strings/str_format.h"
#include "kernels/cuda/cuda_check.h"

namespace epx::cuda {

absl::Status CudaError(cudaError_t error, const char* expr, const char* file, int line) {
  const std::string message = absl::StrCat(file, ":", line, ": ", expr, " failed: ",
                                           cudaGetErrorName(error), " (",
                                           cudaGetErrorString(error), ")");
  switch (error) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidConfiguration:
      return absl::InvalidArgumentError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CublasError(cublasStatus_t status, const char* expr, const char* file, int line) {
  const std::string message = absl::StrCat(file, ":", line, ": ", expr, " failed: ",
                                           cublasGetStatusName(status), " (",
                                           cublasGetStatusString(status), ")");
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(message);
    case CUBLAS_STATUS_INVALID_VALUE:
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return absl::InvalidArgumentError(message);
    case CUBLAS_STATUS_NOT_INITIALIZED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

bool BuiltWithCuda() { return true; }

int DeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string DeviceProperties::ToString() const {
  return absl::StrFormat("%s (sm_%d%d, %d SMs, %.1f GiB)", name, sm_major, sm_minor, num_sms,
                         static_cast<double>(memory_bytes) / (1 << 30));
}

absl::StatusOr<DeviceProperties> GetDeviceProperties(int device) {
  cudaDeviceProp prop;
  EPX_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  DeviceProperties out;
  out.name = prop.name;
  out.sm_major = prop.major;
  out.sm_minor = prop.minor;
  out.num_sms = prop.multiProcessorCount;
  out.memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  out.l2_bytes = prop.l2CacheSize;
  out.shared_memory_per_block_optin = static_cast<int64_t>(prop.sharedMemPerBlockOptin);
  return out;
}

std::string DeviceLabel(int device) {
  absl::StatusOr<DeviceProperties> props = GetDeviceProperties(device);
  return absl::StrCat("cuda:", device, props.ok() ? absl::StrCat(" ", props->ToString()) : "");
}

absl::Status SetDevice(int device) {
  const int count = DeviceCount();
  if (count == 0)
    return absl::FailedPreconditionError(
        "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)");
  if (device < 0 || device >= count)
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " does not exist (", count, " visible)"));
  EPX_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  return absl::OkStatus();
}

void Stream::Deleter::operator()(CUstream_st* s) const { cudaStreamDestroy(s); }

absl::StatusOr<Stream> Stream::Create() {
  cudaStream_t s = nullptr;
  EPX_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Stream stream;
  stream.stream_.reset(s);
  return stream;
}

absl::Status Stream::Synchronize() const { return SynchronizeStream(stream_.get()); }

void Event::Deleter::operator()(CUevent_st* e) const { cudaEventDestroy(e); }

absl::StatusOr<Event> Event::Create() {
  cudaEvent_t e = nullptr;
  EPX_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
  Event event;
  event.event_.reset(e);
  return event;
}

absl::Status Event::Record(StreamHandle stream) {
  EPX_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_.get(), stream));
  return absl::OkStatus();
}

absl::Status Event::Synchronize() const {
  EPX_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_.get()));
  return absl::OkStatus();
}

absl::StatusOr<float> Event::ElapsedMs(const Event& start, const Event& end) {
  EPX_RETURN_IF_ERROR(end.Synchronize());
  float ms = 0;
  EPX_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.event_.get(), end.event_.get()));
  return ms;
}

void DeviceBuffer::Deleter::operator()(void* p) const { cudaFree(p); }

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer buffer;
  if (bytes == 0) return buffer;
  void* p = nullptr;
  const cudaError_t error = cudaMalloc(&p, bytes);
  if (error == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %.2f GiB on the GPU: %.2f GiB of %.2f GiB free",
        bytes / double(1 << 30), free_bytes / double(1 << 30), total_bytes / double(1 << 30)));
  }
  EPX_CUDA_RETURN_IF_ERROR(error);
  buffer.data_.reset(p);
  buffer.size_ = bytes;
  return buffer;
}

TensorView DeviceBuffer::view(DType dtype, Shape shape) const {
  EPX_CHECK(static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype) <= size_);
  return TensorView(data_.get(), dtype, std::move(shape));
}

void PinnedBuffer::Deleter::operator()(void* p) const { cudaFreeHost(p); }

absl::StatusOr<PinnedBuffer> PinnedBuffer::Allocate(size_t bytes) {
  PinnedBuffer buffer;
  if (bytes == 0) return buffer;
  void* p = nullptr;
  EPX_CUDA_RETURN_IF_ERROR(cudaMallocHost(&p, bytes));
  buffer.data_.reset(p);
  buffer.size_ = bytes;
  return buffer;
}

TensorView PinnedBuffer::view(DType dtype, Shape shape) const {
  EPX_CHECK(static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype) <= size_);
  return TensorView(data_.get(), dtype, std::move(shape));
}

absl::Status SynchronizeStream(StreamHandle stream) {
  EPX_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status GrowBuffer(DeviceBuffer& buffer, size_t bytes, StreamHandle stream) {
  if (buffer.size() >= bytes) return absl::OkStatus();
  EPX_RETURN_IF_ERROR(SynchronizeStream(stream));
  buffer = DeviceBuffer();
  EPX_ASSIGN_OR_RETURN(buffer, DeviceBuffer::Allocate(bytes));
  return absl::OkStatus();
}

absl::Status CopyToDevice(void* dst, const void* src, size_t bytes, StreamHandle stream) {
  if (bytes == 0) return absl::OkStatus();
  EPX_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

absl::Status CopyToHost(void* dst, const void* src, size_t bytes, StreamHandle stream) {
  if (bytes == 0) return absl::OkStatus();
  EPX_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  return absl::OkStatus();
}

absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes, StreamHandle stream) {
  if (bytes == 0) return absl::OkStatus();
  EPX_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
  return absl::OkStatus();
}

absl::Status MemsetAsync(void* dst, int value, size_t bytes, StreamHandle stream) {
  if (bytes == 0) return absl::OkStatus();
  EPX_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dst, value, bytes, stream));
  return absl::OkStatus();
}

absl::StatusOr<double> MeasureCopyBandwidth(size_t bytes, int passes, StreamHandle stream) {
  EPX_ASSIGN_OR_RETURN(DeviceBuffer src, DeviceBuffer::Allocate(bytes));
  EPX_ASSIGN_OR_RETURN(DeviceBuffer dst, DeviceBuffer::Allocate(bytes));
  EPX_ASSIGN_OR_RETURN(Event start, Event::Create());
  EPX_ASSIGN_OR_RETURN(Event end, Event::Create());
  // Touching every page first (and one untimed copy) keeps mapping costs out of the timing.
  EPX_RETURN_IF_ERROR(MemsetAsync(src.data(), 1, bytes, stream));
  EPX_RETURN_IF_ERROR(CopyOnDevice(dst.data(), src.data(), bytes, stream));
  float best_ms = 0;
  for (int i = 0; i < passes; ++i) {
    EPX_RETURN_IF_ERROR(start.Record(stream));
    EPX_RETURN_IF_ERROR(CopyOnDevice(dst.data(), src.data(), bytes, stream));
    EPX_RETURN_IF_ERROR(end.Record(stream));
    EPX_ASSIGN_OR_RETURN(const float ms, Event::ElapsedMs(start, end));
    if (i == 0 || ms < best_ms) best_ms = ms;
  }
  if (!(best_ms > 0))
    return absl::InternalError(absl::StrCat("copy bandwidth: a copy of ", bytes,
                                            " bytes timed at ", best_ms, " ms"));
  return 2.0 * static_cast<double>(bytes) / (best_ms * 1e-3);
}

void Blas::Deleter::operator()(cublasContext* h) const { cublasDestroy(h); }

absl::StatusOr<Blas> Blas::Create(StreamHandle stream) {
  // cuBLAS's own recommendation for Hopper: 32 MiB of workspace.
  constexpr size_t kWorkspaceBytes = size_t{32} << 20;
  Blas blas;
  cublasHandle_t h = nullptr;
  EPX_CUBLAS_RETURN_IF_ERROR(cublasCreate(&h));
  blas.handle_.reset(h);
  blas.stream_ = stream;
  EPX_CUBLAS_RETURN_IF_ERROR(cublasSetStream(h, stream));
  EPX_ASSIGN_OR_RETURN(blas.workspace_, DeviceBuffer::Allocate(kWorkspaceBytes));
  EPX_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(h, blas.workspace_.data(), kWorkspaceBytes));
  // Tensor cores with fp32 accumulation; results must not depend on atomics.
  EPX_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  EPX_CUBLAS_RETURN_IF_ERROR(cublasSetAtomicsMode(h, CUBLAS_ATOMICS_NOT_ALLOWED));
  return blas;
}

}  // namespace epx::cuda
