// The CUDA runtime as the rest of epx sees it: device discovery, and move-only RAII owners for
// streams, events, device memory, pinned host memory and the cuBLAS handles, each made by a
// static Create() returning absl::StatusOr. This header includes no CUDA header, so code outside
// kernels/cuda/ can hold these objects and pass streams around as the opaque `StreamHandle`
// (the same pointer type as cudaStream_t).
//
// Every CUDA/cuBLAS error becomes an absl::Status carrying the failing call, its file:line and
// CUDA's message. A build without CUDA links kernels/cuda/unavailable.cc instead: DeviceCount()
// is 0 and every Create() is FailedPrecondition("built without CUDA").
//
// Thread-safety: objects are not shared between threads without external locking; different
// objects may be used from different threads.
#ifndef EPX_KERNELS_CUDA_RUNTIME_H_
#define EPX_KERNELS_CUDA_RUNTIME_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor.h"

struct CUstream_st;    // cudaStream_t is CUstream_st*
struct CUevent_st;     // cudaEvent_t is CUevent_st*
struct cublasContext;  // cublasHandle_t is cublasContext*

namespace epx::cuda {

using StreamHandle = CUstream_st*;

// True when this binary was built with the CUDA backend.
bool BuiltWithCuda();

// Devices the driver shows; 0 when there is no driver or no device (never an error).
int DeviceCount();

struct DeviceProperties {
  std::string name;
  int sm_major = 0;
  int sm_minor = 0;
  int num_sms = 0;
  int64_t memory_bytes = 0;
  int64_t l2_bytes = 0;
  int64_t shared_memory_per_block_optin = 0;
  std::string ToString() const;  // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)"
};
absl::StatusOr<DeviceProperties> GetDeviceProperties(int device);

// "cuda:N <DeviceProperties::ToString()>", or "cuda:N" if the device cannot be queried.
std::string DeviceLabel(int device);

// Makes `device` current for the calling thread. FailedPrecondition when no device is visible
// (or the build has no CUDA), InvalidArgument for an ordinal that is not there.
absl::Status SetDevice(int device);

// A non-blocking stream of the current device.
class Stream {
 public:
  static absl::StatusOr<Stream> Create();
  StreamHandle handle() const { return stream_.get(); }
  // Blocks until the stream's work is done; returns an asynchronous kernel error if one occurred.
  absl::Status Synchronize() const;

 private:
  struct Deleter {
    void operator()(CUstream_st* s) const;
  };
  std::unique_ptr<CUstream_st, Deleter> stream_;
};

// A timing event.
class Event {
 public:
  static absl::StatusOr<Event> Create();
  absl::Status Record(StreamHandle stream);
  absl::Status Synchronize() const;
  // Milliseconds between two recorded events (blocks on `end`).
  static absl::StatusOr<float> ElapsedMs(const Event& start, const Event& end);

 private:
  struct Deleter {
    void operator()(CUevent_st* e) const;
  };
  std::unique_ptr<CUevent_st, Deleter> event_;
};

// Device memory of the current device. Empty (size 0) buffers are allowed and hold no memory.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // ResourceExhausted naming the size and the free memory when the device is full.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  void* data() const { return data_.get(); }
  size_t size() const { return size_; }
  // A view of the buffer as `dtype` of `shape`. REQUIRES: the shape fits.
  TensorView view(DType dtype, Shape shape) const;

 private:
  struct Deleter {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Deleter> data_;
  size_t size_ = 0;
};

// Page-locked host memory, for asynchronous copies.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static absl::StatusOr<PinnedBuffer> Allocate(size_t bytes);
  void* data() const { return data_.get(); }
  size_t size() const { return size_; }
  TensorView view(DType dtype, Shape shape) const;

 private:
  struct Deleter {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Deleter> data_;
  size_t size_ = 0;
};

// Blocks until the work queued on `stream` is done; returns an asynchronous kernel error if any.
absl::Status SynchronizeStream(StreamHandle stream);

// Makes `buffer` at least `bytes` long; a buffer that is already is kept. Growing waits for
// `stream` first (work queued there may still use the old memory) and frees the old memory
// before allocating (a large buffer may need it), so on an allocation error `buffer` is empty.
// The contents are not kept.
absl::Status GrowBuffer(DeviceBuffer& buffer, size_t bytes, StreamHandle stream);

// The memory-bandwidth limit benchmarks report against: device-to-device copies of `bytes` on the
// current device, counting the bytes read and the bytes written (2 x bytes per copy), as
// bandwidth tests do. Best of `passes` timed copies after one warm-up, in bytes per second.
// Allocates two buffers of `bytes` for the duration. Blocks.
absl::StatusOr<double> MeasureCopyBandwidth(size_t bytes, int passes, StreamHandle stream);

// Copies on `stream`; asynchronous with respect to the host when the host side is pinned.
absl::Status CopyToDevice(void* dst, const void* src, size_t bytes, StreamHandle stream);
absl::Status CopyToHost(void* dst, const void* src, size_t bytes, StreamHandle stream);
absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes, StreamHandle stream);
absl::Status MemsetAsync(void* dst, int value, size_t bytes, StreamHandle stream);

// A view carried to the other memory, for code whose data plane and compute sit in different
// memories (host rows for MPI or gloo, device rows for a GPU). Each keeps one buffer that grows
// as needed, waiting for the stream only then (queued copies may still read the old one). The
// returned view, of the same dtype and shape, is valid until the next call; the copy is queued on
// `stream`, so a downloaded view is readable once the stream has synchronised.
class DeviceStaging {
 public:
  absl::StatusOr<TensorView> Upload(const TensorView& host, StreamHandle stream);
  // A device view of `dtype` and `shape` in the buffer, grown as Upload grows it; its contents
  // are whatever the buffer held (a scratch or output buffer of a size that varies by call).
  absl::StatusOr<TensorView> View(DType dtype, Shape shape, StreamHandle stream);

 private:
  DeviceBuffer buffer_;
};
class HostStaging {
 public:
  absl::StatusOr<TensorView> Download(const TensorView& device, StreamHandle stream);

 private:
  PinnedBuffer buffer_;
};

// cuBLAS (and cuBLASLt) handles bound to one stream, with their workspace. GEMM launchers in
// kernels/cuda/ops.h take one. Create() fails with the cuBLAS status name.
class Blas {
 public:
  static absl::StatusOr<Blas> Create(StreamHandle stream);
  cublasContext* handle() const { return handle_.get(); }
  StreamHandle stream() const { return stream_; }
  void* workspace() const { return workspace_.data(); }
  size_t workspace_size() const { return workspace_.size(); }

 private:
  struct Deleter {
    void operator()(cublasContext* h) const;
  };
  std::unique_ptr<cublasContext, Deleter> handle_;
  StreamHandle stream_ = nullptr;
  DeviceBuffer workspace_;
};

}  // namespace epx::cuda

#endif  // EPX_KERNELS_CUDA_RUNTIME_H_
