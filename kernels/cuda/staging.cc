// DeviceStaging and HostStaging (runtime.h), built on the runtime's buffers and copies, so the
// same code serves builds with and without CUDA (where the copies refuse).
#include "common/status.h"
#include "kernels/cuda/runtime.h"

namespace epx::cuda {

absl::StatusOr<TensorView> DeviceStaging::View(DType dtype, Shape shape, StreamHandle stream) {
  const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  // Some headroom, so that a batch growing a row at a time does not reallocate every step.
  if (buffer_.size() < bytes) EPX_RETURN_IF_ERROR(GrowBuffer(buffer_, bytes + bytes / 2, stream));
  return buffer_.view(dtype, std::move(shape));
}

absl::StatusOr<TensorView> DeviceStaging::Upload(const TensorView& host, StreamHandle stream) {
  EPX_ASSIGN_OR_RETURN(const TensorView device, View(host.dtype(), host.shape(), stream));
  EPX_RETURN_IF_ERROR(CopyToDevice(device.raw(), host.raw(), host.nbytes(), stream));
  return device;
}

absl::StatusOr<TensorView> HostStaging::Download(const TensorView& device, StreamHandle stream) {
  if (buffer_.size() < device.nbytes()) {
    EPX_RETURN_IF_ERROR(SynchronizeStream(stream));
    buffer_ = PinnedBuffer();
    EPX_ASSIGN_OR_RETURN(buffer_, PinnedBuffer::Allocate(device.nbytes() + device.nbytes() / 2));
  }
  const TensorView host = buffer_.view(device.dtype(), device.shape());
  EPX_RETURN_IF_ERROR(CopyToHost(host.raw(), device.raw(), device.nbytes(), stream));
  return host;
}

}  // namespace epx::cuda
