// kernels/cuda/runtime.h for builds without CUDA: no devices, and every resource refuses to be
// created with a message saying how to get the backend.
#include "kernels/cuda/runtime.h"

namespace epx::cuda {
namespace {
absl::Status NotBuilt() {
  return absl::FailedPreconditionError(
      "this epx was built without CUDA (nvcc not found, or -DEPX_ENABLE_CUDA=OFF); rebuild on a "
      "machine with the CUDA toolkit to use --device cuda");
}
}  // namespace

bool BuiltWithCuda() { return false; }
int DeviceCount() { return 0; }
std::string DeviceProperties::ToString() const { return name; }
absl::StatusOr<DeviceProperties> GetDeviceProperties(int) { return NotBuilt(); }
std::string DeviceLabel(int device) { return "cuda:" + std::to_string(device); }
absl::Status SetDevice(int) { return NotBuilt(); }
void Stream::Deleter::operator()(CUstream_st*) const {}
absl::StatusOr<Stream> Stream::Create() { return NotBuilt(); }
absl::Status Stream::Synchronize() const { return NotBuilt(); }
void Event::Deleter::operator()(CUevent_st*) const {}
absl::StatusOr<Event> Event::Create() { return NotBuilt(); }
absl::Status Event::Record(StreamHandle) { return NotBuilt(); }
absl::Status Event::Synchronize() const { return NotBuilt(); }
absl::StatusOr<float> Event::ElapsedMs(const Event&, const Event&) { return NotBuilt(); }
void DeviceBuffer::Deleter::operator()(void*) const {}
absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t) { return NotBuilt(); }
TensorView DeviceBuffer::view(DType dtype, Shape shape) const { return {}; }
void PinnedBuffer::Deleter::operator()(void*) const {}
absl::StatusOr<PinnedBuffer> PinnedBuffer::Allocate(size_t) { return NotBuilt(); }
TensorView PinnedBuffer::view(DType dtype, Shape shape) const { return {}; }
absl::Status SynchronizeStream(StreamHandle) { return NotBuilt(); }
absl::Status GrowBuffer(DeviceBuffer& buffer, size_t bytes, StreamHandle) {
  return buffer.size() >= bytes ? absl::OkStatus() : NotBuilt();
}
absl::Status CopyToDevice(void*, const void*, size_t, StreamHandle) { return NotBuilt(); }
absl::Status CopyToHost(void*, const void*, size_t, StreamHandle) { return NotBuilt(); }
absl::Status CopyOnDevice(void*, const void*, size_t, StreamHandle) { return NotBuilt(); }
absl::Status MemsetAsync(void*, int, size_t, StreamHandle) { return NotBuilt(); }
absl::StatusOr<double> MeasureCopyBandwidth(size_t, int, StreamHandle) { return NotBuilt(); }
void Blas::Deleter::operator()(cublasContext*) const {}
absl::StatusOr<Blas> Blas::Create(StreamHandle) { return NotBuilt(); }

}  // namespace epx::cuda
